"""The `shardkv` command line: hex literals, the data commands, start/status/stop, bench.

Each test uses its own tmp_path; every cluster a test starts is stopped in a fixture or a
finally block, and the test checks that no shared-memory object of its directory is left.
Errors and exit codes of every command: test_cli_errors.py; status, metrics, copy and stopped
stores: test_cli_status.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shardkv.cli import main
from shardkv.cli.common import UsageError, format_bytes, parse_bytes
from shardkv.coordinator.manifest import write_manifest
from shardkv.ipc.layout import name_prefix, process_start_time
from shardkv.ops.cluster import is_running, process_running, read_health, stop_cluster

from clock_support import still_before, wait_past

START = 60  # seconds a subprocess may take


def shm_entries(directory) -> list[str]:
    """The /dev/shm entries of any cluster of `directory`."""
    prefix = name_prefix(os.fspath(directory))[1:]
    return [e for e in os.listdir("/dev/shm") if e.startswith(prefix) or e.startswith("sem." + prefix)]


def run_cli(*args, timeout=START) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardkv.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def call(capsys, *args) -> tuple[int, str, str]:
    """main(args) in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def stop_and_check(directory) -> None:
    stop_cluster(directory)
    assert not is_running(directory)
    assert shm_entries(directory) == []


@pytest.fixture
def cluster(tmp_path):
    """A started 2-shard cluster on tmp_path/db (stopped afterwards)."""
    directory = tmp_path / "db"
    try:
        assert main(["start", str(directory), "--shards", "2"]) == 0
        yield str(directory)
    finally:
        stop_and_check(directory)


# -- hex literals and output (no cluster) ---------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x'00cafebabe'", b"\x00\xca\xfe\xba\xbe"),
        ("X'00CAFEBABE'", b"\x00\xca\xfe\xba\xbe"),
        ("x'DeadBeef'", b"\xde\xad\xbe\xef"),
        ("x''", b""),
        ("hello", b"hello"),
        ("héllo wörld", "héllo wörld".encode()),
        ("x", b"x"),
        ("xyz'", b"xyz'"),
        ("", b""),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.unit
@pytest.mark.parametrize("text", ["x'abc'", "x'zz'", "x'00", "X'0 0'", "x'00'x", "x'0x00'", "x'"])
def test_parse_bytes_rejects_bad_hex(text):
    with pytest.raises(UsageError, match="invalid hex literal"):
        parse_bytes(text, "key")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"hello", "hello"),
        ("héllo".encode(), "héllo"),
        (b"\x00\xca\xfe", "x'00cafe'"),
        (b"\xff", "x'ff'"),
        (b"a\tb", "x'610962'"),
        (b"line\n", "x'6c696e650a'"),
        (b"x'00'", "x'7827303027'"),  # text that reads as a hex literal is shown as hex
        (b"", ""),
    ],
)
def test_format_bytes(data, shown):
    assert format_bytes(data) == shown


@pytest.mark.unit
def test_format_then_parse_round_trips():
    samples = [b"plain", b"\x00", bytes(range(256)), b"x'", b"X'ab'", "ünï".encode(), b"tab\there", b"\x7f", b"a b"]
    for data in samples:
        assert parse_bytes(format_bytes(data)) == data


@pytest.mark.engine
def test_bad_hex_exits_4_without_starting_a_cluster(tmp_path, capsys):
    directory = tmp_path / "db"
    for args in (["get", directory, "x'zz'"], ["put", directory, "k", "x'123'"], ["scan", directory, "--prefix", "x'g0'"], ["above", directory, "x'0"]):
        code, out, err = call(capsys, *args)
        assert code == 4, args
        assert "invalid hex literal" in err and "Traceback" not in err
    assert not is_running(directory)
    assert shm_entries(directory) == []


@pytest.mark.engine
def test_not_running(tmp_path, capsys):
    directory = tmp_path / "db"
    directory.mkdir()
    write_manifest(str(directory), 2)  # a store that no cluster serves
    code, out, _ = call(capsys, "status", directory)
    assert code == 2 and "not running" in out
    code, out, _ = call(capsys, "status", directory, "--json")
    assert code == 2 and json.loads(out)["status"] == "not running"
    code, out, _ = call(capsys, "stop", directory)
    assert code == 0 and "not running" in out
    assert not is_running(directory)


@pytest.mark.engine
def test_usage_errors(tmp_path, capsys):
    directory = tmp_path / "db"
    for args in (["scan", directory, "--limit", "-1"], ["start", directory, "--durability", "sometimes"], ["start", directory, "--shards", "0"], ["get", directory]):
        code, out, err = call(capsys, *args)
        assert code == 4 and out == "" and err.startswith("shardkv: ") and len(err.splitlines()) == 1, args
    assert not is_running(directory) and not directory.exists()


# -- data commands ------------------------------------------------------------------------------
def test_data_commands_round_trip(cluster, capsys):
    d = cluster
    assert call(capsys, "len", d) == (0, "0\n", "")
    code, _, err = call(capsys, "min", d)
    assert code == 1 and "empty" in err
    assert call(capsys, "put", d, "apple", "red")[0] == 0
    assert call(capsys, "put", d, "banana", "yellow")[0] == 0
    assert call(capsys, "put", d, "cherry", "dark red", "--durability", "fsync")[0] == 0
    assert call(capsys, "put", d, "x'00cafebabe'", "x'00deadbeef'")[0] == 0
    assert call(capsys, "put", d, "X'FF'", "")[0] == 0

    assert call(capsys, "get", d, "apple") == (0, "red\n", "")
    assert call(capsys, "get", d, "cherry") == (0, "dark red\n", "")
    assert call(capsys, "get", d, "X'00CAFEBABE'") == (0, "x'00deadbeef'\n", "")
    assert call(capsys, "get", d, "x'6170706c65'") == (0, "red\n", "")  # "apple" in hex
    code, out, err = call(capsys, "get", d, "durian")
    assert (code, out) == (1, "") and "not found" in err

    assert call(capsys, "len", d) == (0, "5\n", "")
    everything = "x'00cafebabe'\tx'00deadbeef'\napple\tred\nbanana\tyellow\ncherry\tdark red\nx'ff'\t\n"
    assert call(capsys, "scan", d) == (0, everything, "")
    assert call(capsys, "scan", d, "--reverse") == (0, "".join(reversed(everything.splitlines(keepends=True))), "")
    assert call(capsys, "scan", d, "--start", "b", "--stop", "c") == (0, "banana\tyellow\n", "")
    assert call(capsys, "scan", d, "--start", "apple", "--limit", "2") == (0, "apple\tred\nbanana\tyellow\n", "")
    assert call(capsys, "scan", d, "--prefix", "ch") == (0, "cherry\tdark red\n", "")
    assert call(capsys, "scan", d, "--prefix", "x'00'") == (0, "x'00cafebabe'\tx'00deadbeef'\n", "")
    assert call(capsys, "scan", d, "--limit", "0") == (0, "", "")

    assert call(capsys, "min", d) == (0, "x'00cafebabe'\tx'00deadbeef'\n", "")
    assert call(capsys, "max", d) == (0, "x'ff'\t\n", "")
    assert call(capsys, "above", d, "apple") == (0, "banana\tyellow\n", "")
    assert call(capsys, "above", d, "b") == (0, "banana\tyellow\n", "")
    assert call(capsys, "below", d, "banana") == (0, "apple\tred\n", "")
    assert call(capsys, "below", d, "x'00cafebabe'")[0] == 1
    assert call(capsys, "above", d, "x'ff'")[0] == 1

    assert call(capsys, "delete", d, "banana") == (0, "", "")
    code, _, err = call(capsys, "delete", d, "banana")
    assert code == 1 and "not found" in err
    assert call(capsys, "get", d, "banana")[0] == 1
    assert call(capsys, "len", d) == (0, "4\n", "")

    # Bad input against a running cluster: a message and exit 4, never a traceback.
    for args in (["put", d, "", "v"], ["get", d, "x'0g'"], ["delete", d, "x''"], ["put", d, "k" * 70000, "v"]):
        code, out, err = call(capsys, *args)
        assert code == 4 and err.startswith("shardkv: ") and "Traceback" not in err, args

    # put --ttl: the key expires.
    started = time.monotonic()
    assert call(capsys, "put", d, "session", "s", "--ttl", "0.3")[0] == 0
    written = time.monotonic()
    got = call(capsys, "get", d, "session")
    if still_before(started, 0.3):
        assert got == (0, "s\n", "")
    wait_past(written, 0.3)
    assert call(capsys, "get", d, "session")[0] == 1


def test_data_commands_attach_to_the_running_cluster_and_leave_it_running(cluster, capsys):
    """A data command detaches when done; the cluster `shardkv start` started keeps serving, and
    the data outlive it (a stopped store's data commands: test_cli_status.py)."""
    assert call(capsys, "put", cluster, "k", "v")[0] == 0
    assert is_running(cluster)
    stop_cluster(cluster)
    assert call(capsys, "start", cluster)[0] == 0
    assert call(capsys, "scan", cluster) == (0, "k\tv\n", "")


# -- the service ---------------------------------------------------------------------------------
@pytest.mark.cluster
def test_start_status_stop(tmp_path):
    directory = tmp_path / "db"
    try:
        started = run_cli("start", directory, "--shards", "2")
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(f"started {os.path.realpath(directory)} (2 shards, pid ")
        again = run_cli("start", directory, "--shards", "2")
        assert again.returncode == 0 and "already running" in again.stdout
        wrong = run_cli("start", directory, "--shards", "3")
        assert wrong.returncode == 4 and "2 shards" in wrong.stderr

        status = run_cli("status", directory, "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        health = json.loads(status.stdout)
        assert health["status"] == "healthy"
        assert [s["shard"] for s in health["shards"]] == [0, 1]
        assert all(s["state"] == "up" and s["pid"] for s in health["shards"])
        assert health["coordinator"]["state"] == "up"
        supervisor = (health["supervisor"]["pid"], process_start_time(health["supervisor"]["pid"]))

        table = run_cli("status", directory)
        assert table.returncode == 0
        lines = table.stdout.splitlines()
        assert lines[1] == "status: healthy"
        assert lines[2].split()[:6] == ["role", "shard", "pid", "state", "uptime", "restarts"]
        assert {"keys", "garbage", "waiting", "ops/s", "fsync", "doubt"} <= set(lines[2].split())
        assert [line.split()[0] for line in lines[3:]] == ["supervisor", "coordinator", "shard", "shard"]
        prometheus = run_cli("status", directory, "--format", "prometheus")
        assert prometheus.returncode == 0 and 'shardkv_up{role="shard",shard="1"} 1' in prometheus.stdout

        stopped = run_cli("stop", directory)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert not process_running(*supervisor)  # gone (or a zombie waiting for init) once stop returns
        after = run_cli("status", directory)
        assert after.returncode == 2 and "not running" in after.stdout
        assert shm_entries(directory) == []
        assert run_cli("stop", directory).returncode == 0
    finally:
        stop_and_check(directory)


@pytest.mark.cluster
def test_start_with_bad_config(tmp_path, capsys):
    directory = tmp_path / "db"
    try:
        assert call(capsys, "start", directory, "--shards", "2")[0] == 0
        assert call(capsys, "stop", directory)[0] == 0
        code, out, err = call(capsys, "start", directory, "--shards", "3")
        assert code == 4 and "bad configuration" in err and "created with 2 shards" in err
        assert not is_running(directory)
    finally:
        stop_and_check(directory)


@pytest.mark.cluster
def test_start_foreground_stops_on_sigterm(tmp_path):
    directory = tmp_path / "db"
    proc = subprocess.Popen([sys.executable, "-m", "shardkv.cli", "start", str(directory), "--shards", "2", "--foreground"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START
        while (read_health(directory) or {}).get("status") != "healthy":
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(START) == 0
        assert not is_running(directory)
        assert shm_entries(directory) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_and_check(directory)


@pytest.mark.cluster
def test_cluster_bench_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    code, out, err = call(capsys, "bench", "--keys", "300", "--shards", "2")
    assert code == 0, out + err
    for phase in ("put", "get", "get_many", "scan asc", "scan desc", "delete"):
        assert f"  {phase} " in out
    assert "PROBLEM" not in out
    assert list(tmp_path.iterdir()) == []  # the temporary store is gone


@pytest.mark.engine
def test_verify_and_salvage_commands(tmp_path, capsys):
    from shardkv.shards import ShardEngine

    source = tmp_path / "src"
    with ShardEngine.open(source, segment_size=4096) as engine:
        for i in range(100):
            engine.put(b"k%03d" % i, b"v" * 40)
    assert main(["verify", str(source)]) == 0
    assert "ok" in capsys.readouterr().out
    segment = sorted(p for p in source.iterdir() if p.suffix == ".log")[1]
    data = bytearray(segment.read_bytes())
    data[100] ^= 1
    segment.write_bytes(bytes(data))
    assert main(["verify", str(source)]) == 3  # corrupt
    out = capsys.readouterr().out
    assert str(segment) in out and "offset" in out
    assert main(["salvage", str(source), str(tmp_path / "dst")]) == 3  # something was lost
    out = capsys.readouterr().out
    assert "saved 99 keys" in out
    assert main(["verify", str(tmp_path / "dst")]) == 0
