"""The real `shardkv` console script against running clusters: status figures and Prometheus
metrics (#22 item 7), `--serve PORT`, `--watch`, data commands on a stopped store (#22 item 10)
and `shardkv copy`.

Each test starts its own clusters in its own tmp_path and stops them in a finally block, then
checks that no process and no /dev/shm entry of their directories is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import shardkv
from cli_support import SHARDKV, TIMEOUT, assert_one_line_error, shardkv as run, stop_and_check
from cluster_support import cluster_pids, shm_entries
from shardkv.ops import exitcodes


def start(directory, shards: int = 2) -> None:
    done = run("start", directory, "--shards", shards)
    assert done.returncode == 0, done.stderr


def metric_lines(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every sample line of an exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def assert_help_and_type_for_every_metric(text: str) -> None:
    """Every sample's metric has a HELP and a TYPE line, and the text parses as Prometheus's."""
    families = list(text_string_to_metric_families(text))
    assert families
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            assert re.search(rf"^# HELP {name} \S", text, re.M), f"no HELP line for {name}"
            assert re.search(rf"^# TYPE {name} (gauge|counter)$", text, re.M), f"no TYPE line for {name}"


@pytest.mark.cluster
def test_status_does_not_count_its_own_probe_and_every_metric_is_described(tmp_path):
    """An idle cluster used to show 4.0 ops/s per shard: the status probe itself; and
    shardkv_healthy had neither HELP nor TYPE."""
    directory = tmp_path / "db"
    try:
        start(directory)
        time.sleep(0.3)  # past the start's own requests
        # The coordinator asks each worker for its undecided batches every 5 s (one request):
        # a quarter-second sample may meet it. The probe came in every sample, so the least
        # of three samples (taken within 5 s) is 0.0 only if the probe is not counted.
        rates = []
        for _ in range(3):
            done = run("status", directory, "--json")
            assert done.returncode == 0, done.stderr
            status = json.loads(done.stdout)
            rates.append([entry["ops_per_second"] for entry in [status["coordinator"], *status["shards"]]])
        assert [min(column) for column in zip(*rates)] == [0.0, 0.0, 0.0], rates
        done = run("status", directory, "--format", "prometheus")
        assert done.returncode == 0, done.stderr
        assert_help_and_type_for_every_metric(done.stdout)
        samples = metric_lines(done.stdout)
        assert samples["shardkv_healthy"] == 1 and samples["shardkv_status_code"] == 0
        assert samples['shardkv_up{role="shard",shard="1"}'] == 1
        assert samples['shardkv_keys{role="shard",shard="0"}'] == 0
        # Load shows: puts from this process during the sample.
        with shardkv.open(directory, create=False) as db:
            proc = subprocess.Popen([SHARDKV, "status", str(directory), "--json"], stdout=subprocess.PIPE, text=True)
            i = 0
            while proc.poll() is None:
                db.put(b"k%d" % i, b"v")
                i += 1
            status = json.loads(proc.communicate(timeout=TIMEOUT)[0])
        assert sum(entry["ops_per_second"] for entry in status["shards"]) > 0
    finally:
        stop_and_check(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) listening on TCP `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(address)
    return found


@pytest.mark.cluster
def test_serve_metrics_on_loopback(tmp_path):
    directory = tmp_path / "db"
    server = None
    try:
        start(directory)
        port = free_port()
        server = subprocess.Popen([SHARDKV, "status", str(directory), "--serve", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = server.stdout.readline()
        assert line.startswith(f"serving http://127.0.0.1:{port}/metrics"), (line, server.poll())
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        assert_help_and_type_for_every_metric(text)
        samples = metric_lines(text)
        assert samples["shardkv_healthy"] == 1 and samples['shardkv_up{role="shard",shard="0"}'] == 1
        assert not any(name.startswith(("process_", "python_")) for name in samples)  # the cluster's figures only
        server.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
        # A stopped cluster is shown as down, not as a failed scrape.
        stop_and_check(directory)
        server = subprocess.Popen([SHARDKV, "status", str(directory), "--serve", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = re.match(r"serving (\S+)", server.stdout.readline()).group(1)
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            samples = metric_lines(response.read().decode())
        assert samples["shardkv_healthy"] == 0 and samples["shardkv_status_code"] == exitcodes.DOWN
        server.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
        assert not cluster_pids(directory) and shm_entries(directory) == []  # scraping started nothing
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        stop_and_check(directory)


@pytest.mark.engine
def test_serve_refuses_a_taken_port_and_a_missing_store(tmp_path):
    assert_one_line_error(run("status", tmp_path / "typo", "--serve", "0"), exitcodes.NO_STORE)
    directory = tmp_path / "db"
    directory.mkdir()
    from shardkv.coordinator.manifest import write_manifest

    write_manifest(str(directory), 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_one_line_error(run("status", directory, "--serve", taken.getsockname()[1]), exitcodes.FAILED, "cannot serve")


@pytest.mark.cluster
def test_data_commands_on_a_stopped_store_say_start_it(tmp_path):
    """#22 item 10: a data command on a stopped store started a cluster (about 1 s) that lingered
    5 s after it; now it says how to start one, and starts nothing."""
    directory, other = tmp_path / "db", tmp_path / "other"
    try:
        start(directory)
        assert run("put", directory, "k", "v").returncode == 0
        assert run("stop", directory).returncode == 0
        start(other, shards=1)
        for args in (["get", directory, "k"], ["put", directory, "k", "w"], ["delete", directory, "k"], ["scan", directory], ["len", directory],
                     ["min", directory], ["compact", directory], ["copy", directory, other], ["copy", other, directory]):  # fmt: skip
            done = run(*args)
            assert_one_line_error(done, exitcodes.NOT_RUNNING, "not running", f"shardkv start {os.path.realpath(directory)}")
            assert not cluster_pids(directory) and shm_entries(directory) == [], args
        start(directory)
        assert run("get", directory, "k").stdout == "v\n"  # nothing was written meanwhile
    finally:
        stop_and_check(directory)
        stop_and_check(other)


@pytest.mark.cluster
def test_copy_streams_every_key_with_its_ttl(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    try:
        start(source)
        start(destination, shards=1)
        with shardkv.open(source, create=False) as db:
            db.put_many({b"k%04d" % i: b"v%d" % i for i in range(1500)})
            db.put(b"session", b"s", ttl=120)
        done = run("copy", source, destination, "--batch", "500")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("copied 1,501 keys (1 with a ttl) from ")
        with shardkv.open(source, create=False) as src, shardkv.open(destination, create=False) as dst:
            assert list(dst.scan()) == list(src.scan())
            assert 100 < dst.ttl(b"session") <= 120 and dst.ttl(b"k0001") == float("inf")
        assert_one_line_error(run("copy", source, source), exitcodes.USAGE, "same store")
    finally:
        stop_and_check(source)
        stop_and_check(destination)


@pytest.mark.cluster
def test_watch_redraws_until_interrupted(tmp_path):
    directory = tmp_path / "db"
    watch = None
    try:
        start(directory)
        watch = subprocess.Popen([SHARDKV, "status", str(directory), "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = 0
        deadline = time.monotonic() + TIMEOUT
        while seen < 2 and time.monotonic() < deadline:  # off a terminal: one table after another
            seen += watch.stdout.readline().strip() == "status: healthy"
        assert seen == 2
        watch.send_signal(signal.SIGINT)  # Ctrl-C: the way out, with the last reading's code
        assert watch.wait(TIMEOUT) == exitcodes.OK
        assert "Traceback" not in watch.stderr.read()
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.wait()
        stop_and_check(directory)


@pytest.mark.cluster
def test_status_exit_code_of_a_degraded_cluster(tmp_path):
    """`status` keeps its exit codes: a stopped (SIGSTOP) worker makes the cluster degraded (1)."""
    directory = tmp_path / "db"
    pid = None
    try:
        start(directory)
        pid = json.loads(run("status", directory, "--json").stdout)["shards"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        done = run("status", directory)
        assert done.returncode == exitcodes.DEGRADED, done.stdout + done.stderr
        assert "status: degraded" in done.stdout and "unresponsive" in done.stdout
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        stop_and_check(directory)
