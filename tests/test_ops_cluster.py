"""Ops through a running cluster: online compaction under load, status figures, quarantine."""

import json
import os
import time

import pytest

import shardkv
from cluster_support import cluster_fixture, wait_until
from shardkv.cli.status import status_table
from shardkv.ops.metrics import render_prometheus
from shardkv.ops.status import collect_status, exit_code
from shardkv.ops.verify import verify_store
from shardkv.coordinator.manifest import shard_directory

WRITER = r"""
import sys, shardkv
db = shardkv.open(sys.argv[1])
worker = int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
last = {}
for round_ in range(int(sys.argv[3])):
    for i in range(50):
        key = b"w%d-%03d" % (worker, i)
        db.put(key, b"%d" % round_ * 40)
        last[key] = round_
print("done", flush=True)
db.close()
"""


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def test_compaction_while_four_client_processes_write(cluster):
    db = cluster.open()
    for i in range(2000):
        db.put(b"base%05d" % i, b"x" * 300)
    for i in range(2000):
        db.put(b"base%05d" % i, b"y" * 300)  # half of the log is now garbage
    rounds = 30
    writers = [cluster.spawn(WRITER, cluster.directory, w, rounds) for w in range(4)]
    for writer in writers:
        writer.expect("ready")
    for writer in writers:
        writer.send("go")
    calls = []
    results = db.compact(progress=lambda done, total: calls.append((done, total)))
    for writer in writers:
        writer.expect("done", timeout=60)
    assert len(results) == db.shards
    for result in results:
        assert result["after"]["total_bytes"] < result["before"]["total_bytes"]
    for w in range(4):
        for i in range(50):
            assert db.get(b"w%d-%03d" % (w, i)) == b"%d" % (rounds - 1) * 40
    assert all(db.get(b"base%05d" % i) == b"y" * 300 for i in range(0, 2000, 7))
    assert len(db) == 2000 + 4 * 50


def test_status_figures_and_renderings(cluster):
    db = cluster.open()
    for i in range(300):
        db.put(b"k%04d" % i, b"v" * 100)
    status = collect_status(db, sample_seconds=0.1)
    assert status["status"] == "healthy" and exit_code(status) == 0
    json.dumps(status)  # the --json form must be serialisable
    assert sum(entry["keys"] for entry in status["shards"]) == 300
    for entry in status["shards"]:
        assert entry["state"] == "up" and entry["waiting"] == 0 and entry["in_doubt"] == 0
        assert entry["live_bytes"] <= entry["total_bytes"] and 0 <= entry["garbage_ratio"] <= 1
        assert entry["last_fsync_age"] >= 0 and entry["segments"] >= 1
    assert sum(entry["requests"] for entry in status["shards"]) >= 300
    table = render_table(status)
    assert "status: healthy" in table and table.count("\nshard ") == db.shards
    assert table.count("\ncoordinator ") == 1 and "\nsupervisor " in table
    text = render_prometheus(status)
    assert 'shardkv_keys{role="shard",shard="0"}' in text and "# TYPE shardkv_restarts_total counter" in text


def render_table(status: dict) -> str:
    """The table `shardkv status` prints, as text."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=300, record=True)
    console.print(status_table(dict(status, directory="/some/dir")))
    return console.export_text()


def test_corrupt_shard_is_quarantined_and_the_others_serve(cluster):
    db = cluster.open()
    for i in range(3000):
        db.put(b"k%05d" % i, b"v" * 200)
    db.compact()  # leaves sealed segments without garbage: a flipped byte there is corruption
    victim = db.shard_of(b"k00000")
    keys_elsewhere = [b"k%05d" % i for i in range(3000) if db.shard_of(b"k%05d" % i) != victim][:20]
    db.close()
    cluster.clients.clear()
    cluster.kill_supervisor()
    shard_dir = shard_directory(cluster.directory, victim)
    sealed = sorted(f for f in os.listdir(shard_dir) if f.endswith(".log"))[-1]  # compaction output (sealed)
    os.unlink(os.path.join(shard_dir, sealed[:-4] + ".hint"))  # make open read the damaged segment
    with open(os.path.join(shard_dir, sealed), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not verify_store(cluster.directory)["ok"]
    db = cluster.open()
    health = db.health()
    assert health["shards"][victim]["state"] == "quarantined" and health["status"] == "degraded"
    with pytest.raises(shardkv.CorruptionError):
        db.get(b"k00000")
    assert all(db.get(k) == b"v" * 200 for k in keys_elsewhere)
    # A window for a restart loop to show (the first restart comes 0.1 s after an exit); not a
    # wait for anything to finish: the quarantine was decided when the state said so.
    time.sleep(1.0)
    assert db.health()["shards"][victim]["restarts"] == 0  # not restarted in a loop
    status = collect_status(db, sample_seconds=0.05)
    assert exit_code(status) == 1


def test_workers_compact_on_their_own_past_the_threshold(cluster):
    import subprocess
    import sys

    command = [sys.executable, "-m", "shardkv.coordinator.supervisor", cluster.directory, "--shards", "2",
               "--compact-threshold", "0.5", "--compact-min-bytes", "0", "--compact-check-interval", "0.2"]
    assert subprocess.run(command, timeout=60).returncode == 0  # detaches once the directory is locked
    db = cluster.open()
    for round_ in range(4):
        for i in range(200):
            db.put(b"k%04d" % i, b"%d" % round_ * 500)
    wait_until(lambda: db.stats()["garbage_ratio"] < 0.5, 20, message="automatic compaction")
    assert all(db.get(b"k%04d" % i) == b"3" * 500 for i in range(200))
    logs = "".join(open(os.path.join(cluster.directory, "logs", f"shard-{s:03d}.log")).read() for s in range(2))
    assert '"event": "compacted"' in logs


def test_shared_memory_semaphores_and_files_are_owner_only(cluster):
    from shardkv.ipc.layout import name_prefix

    db = cluster.open()
    db.put(b"k", b"v")
    prefix = name_prefix(db.directory)[1:]
    entries = [e for e in os.listdir("/dev/shm") if e.startswith(prefix) or e.startswith("sem." + prefix)]
    assert any(e.startswith("sem.") for e in entries) and any(not e.startswith("sem.") for e in entries)
    for entry in entries:
        mode = os.stat(os.path.join("/dev/shm", entry)).st_mode & 0o777
        assert mode & 0o077 == 0, f"{entry} has mode {oct(mode)}"
    for root, dirs, files in os.walk(db.directory):
        for name in dirs:
            assert os.stat(os.path.join(root, name)).st_mode & 0o077 == 0, os.path.join(root, name)
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o077 == 0, os.path.join(root, name)


def test_the_cluster_view_ops_tools_read(cluster):
    """Client.cluster_view: the process table, the supervisor, the ring queues and the probes,
    read-only, as ops/status.py and the fault harness use them."""
    from shardkv.ipc import protocol
    from shardkv.ipc.layout import PROC_UP

    db = cluster.open()
    view = db.cluster_view
    info = cluster.info()
    assert view.info["pid"] == info["pid"] and view.info["start_time"] == info["start_time"] and view.info["shards"] == db.shards
    with pytest.raises(TypeError):
        view.info["pid"] = 1  # read-only: a client keeps the description it attached with
    health = db.health()
    procs = view.control.procs
    assert len(procs) == 1 + db.shards and all(int(entry["state"]) == PROC_UP for entry in procs)
    assert [int(procs[1 + s]["pid"]) for s in range(db.shards)] == [entry["pid"] for entry in health["shards"]]
    assert [view.waiting(target) for target in range(db.shards + 1)] == [0] * (db.shards + 1)
    db.put(b"k", b"v")
    assert protocol.STATS.result(*view.probe(db.shard_of(b"k"), protocol.STATS.encode(0)))["keys"] == 1
    status, _ = view.probe(db.shards, protocol.PING.encode(0))  # the coordinator
    assert status == 0
    with pytest.raises(ValueError, match="health probes only"):
        view.probe(0, protocol.DELETE.encode(0, b"k"))  # no back door around the client
    assert db.get(b"k") == b"v"
    db.close()
    with pytest.raises(shardkv.Closed):
        view.probe(0, protocol.PING.encode(0))
