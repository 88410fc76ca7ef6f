"""The cluster under concurrency and failures: client processes racing on counters, shard
workers, clients and the supervisor killed with SIGKILL.

Every test has its own data directory and, through the `cluster` fixture, leaves no process
and no /dev/shm entry behind, even when it fails.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import threading
import time

import pytest

import shardkv
from shardkv.coordinator.runfiles import lease_path, lock_is_held

from cluster_support import SHARDS, alive, keys_by_shard, cluster_fixture, nothing_left, shm_entries, wait_until


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def keys_on_each_shard(db, count_per_shard: int, fmt: bytes) -> list[bytes]:
    return [k for keys in keys_by_shard(db, count_per_shard, fmt).values() for k in keys]


def shard_entry(db, shard: int) -> dict:
    return db.health()["shards"][shard]


# -- concurrent client processes ----------------------------------------------------------------------
COUNTER_SCRIPT = """
import sys, shardkv
directory, n = sys.argv[1], int(sys.argv[2])
keys = [bytes.fromhex(h) for h in sys.argv[3:]]
db = shardkv.open(directory)
print("ready", db.lease, flush=True)
sys.stdin.readline()
conflicts = 0
for i in range(n):
    key = keys[i % len(keys)]
    while True:
        old = db.get(key)
        new = b"1" if old is None else b"%d" % (int(old) + 1)
        if db.cas(key, old, new):
            break
        conflicts += 1
db.close()
print("done", conflicts, flush=True)
"""


def test_cas_counters_from_four_processes_lose_no_increment(cluster):
    db = cluster.open()
    keys = keys_on_each_shard(db, 2, b"counter-%d")
    n, workers = 300, 4
    procs = [cluster.spawn(COUNTER_SCRIPT, cluster.directory, n, *(k.hex() for k in keys)) for _ in range(workers)]
    leases = {int(p.expect("ready", 60)) for p in procs}
    assert len(leases) == workers and db.lease not in leases
    for p in procs:
        p.send("go")
    conflicts = [int(p.expect("done", 120)) for p in procs]
    for p in procs:
        assert p.wait(10) == 0
    per_key = n * workers // len(keys)
    assert db.get_many(keys) == [b"%d" % per_key] * len(keys), f"lost increments (conflicts retried: {conflicts})"
    assert len(db) == len(keys)


# -- a shard worker killed ------------------------------------------------------------------------
def test_killed_shard_worker_is_restarted_and_acknowledged_writes_survive(cluster):
    db = cluster.open()
    acked: dict[bytes, bytes] = {}
    maybe: dict[bytes, bytes] = {}
    errors: list[str] = []
    stop = threading.Event()

    def writer():
        rng = random.Random(5)
        i = 0
        while not stop.is_set():
            key = b"w-%07d" % i
            value = (b"%d:" % i) * (1 + i % 7) if i % 97 else rng.randbytes(300_000)  # some multi-frame writes
            try:
                db.put(key, value)
            except shardkv.Unavailable:
                maybe[key] = value  # sent to a worker that died: applied or not
            except Exception as exc:  # noqa: BLE001
                errors.append(f"put {key!r}: {exc!r}")
                return
            else:
                acked[key] = value
            if i % 3 == 0 and acked:  # reads are retried across a restart: they never fail
                probe = rng.choice(list(acked)[-50:])
                try:
                    got = db.get(probe)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"get {probe!r}: {exc!r}")
                    return
                if got != acked[probe]:
                    errors.append(f"get {probe!r} returned {got[:40]!r}, not the acknowledged value")
                    return
            i += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(acked) > 300 or errors, 30, message="300 writes before the kill")
        for shard in range(SHARDS):
            before = shard_entry(db, shard)
            assert before["state"] == "up" and before["restarts"] == 0
            os.kill(before["pid"], signal.SIGKILL)
            wait_until(
                lambda: (e := shard_entry(db, shard))["restarts"] >= 1 and e["state"] == "up" and e["pid"] not in (None, before["pid"]),
                10,
                message=f"restart of shard {shard} after SIGKILL",
            )
            count = len(acked)
            wait_until(lambda: len(acked) > count + 300 or errors or not thread.is_alive(), 20, message=f"300 more writes after the restart of shard {shard}")
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the writer hung"
    assert not errors, errors
    health = db.health()
    assert health["status"] == "healthy", health
    assert all(s["restarts"] == 1 and s["state"] == "up" for s in health["shards"]), health
    assert len(maybe) <= 10, f"{len(maybe)} writes answered Unavailable for two kills"
    keys = list(acked)
    assert db.get_many(keys) == [acked[k] for k in keys], "an acknowledged write was lost"
    for key, value in maybe.items():
        assert db.get(key) in (None, value)
    assert len(db) >= len(acked)
    db.put(b"after", b"ok")
    assert db.get(b"after") == b"ok"


def test_killed_coordinator_is_restarted(cluster):
    db = cluster.open()
    keys = keys_on_each_shard(db, 20, b"c-%d")
    for key in keys:
        db.put(key, key)
    before = db.health()["coordinator"]
    shard_map = bytes(db.cluster_view.control.shard_map)
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: (e := db.health()["coordinator"])["restarts"] >= 1 and e["state"] == "up" and e["pid"] not in (None, before["pid"]), 10, message="restart of the coordinator")
    assert bytes(db.cluster_view.control.shard_map) == shard_map
    assert db.get_many(keys) == keys
    db.put(b"after", b"ok")
    assert db.get(b"after") == b"ok" and db.health()["status"] == "healthy"


# -- a client killed -------------------------------------------------------------------------------
LOOP_SCRIPT = """
import sys, shardkv
db = shardkv.open(sys.argv[1])
print("lease", db.lease, flush=True)
i = 0
while True:
    value = b"%d|" % i * (1 if i % 10 else 40000)  # every tenth put spans several frames
    db.put(b"loop-%07d" % i, value)
    if i % 3 == 0:
        db.get(b"loop-%07d" % (i // 2))
    print("ack", i, flush=True)
    i += 1
"""


def loop_value(i: int) -> bytes:
    return b"%d|" % i * (1 if i % 10 else 40000)


def test_killed_client_does_not_disturb_others_and_its_lease_is_reclaimed(cluster):
    a = cluster.open()
    info = cluster.info()
    errors: list[str] = []
    stop = threading.Event()

    def other_client():
        i = 0
        while not stop.is_set():
            key, value = b"a-%06d" % i, b"%d" % i
            try:
                a.put(key, value)
                if a.get(key) != value:
                    errors.append(f"a.get({key!r}) wrong")
                    return
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return
            i += 1

    thread = threading.Thread(target=other_client, daemon=True)
    thread.start()
    try:
        p = cluster.spawn(LOOP_SCRIPT, cluster.directory)
        lease = int(p.expect("lease", 60))
        assert lease != a.lease and lock_is_held(lease_path(cluster.directory, lease))
        p.expect("ack 400", 60)
        time.sleep(random.Random(0).uniform(0, 0.05))
        p.kill()  # SIGKILL, in the middle of a request
        # Only whole lines count: the kill may cut the last one (seen once under heavy load).
        acknowledged = [int(line.split()[1]) for line in p.drain() if re.fullmatch(r"ack \d+", line)]
        assert not lock_is_held(lease_path(cluster.directory, lease)), "the kernel dropped the dead client's flock"
        time.sleep(0.3)
        assert not errors, errors
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and not errors, errors

    # its lease is the first free one again: a new client takes it, and gets its own answers
    b = cluster.open()
    assert b.lease == lease
    c = cluster.open()
    for client in (b, c):
        client.put(b"new-%d" % client.lease, b"fresh")
        assert client.get(b"new-%d" % client.lease) == b"fresh"
        assert client.get_many([b"new-%d" % client.lease, b"loop-0000000"]) == [b"fresh", loop_value(0)]
    assert b.get(b"new-%d" % c.lease) == b"fresh"
    # everything the dead client had acknowledged is there
    last = max(acknowledged + [400])
    keys = [b"loop-%07d" % i for i in range(last + 1)]
    assert b.get_many(keys) == [loop_value(i) for i in range(last + 1)]
    assert a.get(b"a-000000") == b"0" and len(a) >= last + 1
    health = a.health()
    assert health["status"] == "healthy" and health["supervisor"]["pid"] == info["pid"]
    assert all(s["restarts"] == 0 for s in health["shards"])


# -- the supervisor killed ---------------------------------------------------------------------------
def kill_cluster(cluster) -> dict:
    """SIGKILL the supervisor and its children at once (its process group: `open()` starts it in
    a session of its own), so that nobody is left to remove the cluster's shared objects (a
    supervisor killed alone: test_reliability_b_orphans.py); return its cluster.json."""
    info = cluster.info()
    group = os.getpgid(info["pid"])
    assert group != os.getpgid(0) and all(os.getpgid(pid) == group for pid, _ in info["children"])
    os.killpg(group, signal.SIGKILL)
    wait_until(lambda: not alive(info["pid"], info["start_time"]), 10, message="death of the supervisor")
    started = time.monotonic()
    try:
        wait_until(lambda: not any(alive(pid, start) for pid, start in info["children"]), 5, message="exit of the orphaned children")
    finally:
        info["children_exit_s"] = time.monotonic() - started
        for pid, start in info["children"]:
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
    return info


def test_reopen_after_supervisor_killed(cluster):
    """Reopening a directory whose supervisor was killed starts a new cluster that removes the
    old one's leftovers, and the client attaches to the new cluster (not to the killed one that
    the stale run/cluster.json describes until the new supervisor removes it: see
    test_open_never_attaches_to_a_killed_clusters_description).
    """
    db = cluster.open()
    rng = random.Random(9)
    model = {b"s-%04d" % i: rng.randbytes(rng.randrange(0, 200)) for i in range(300)}
    model[b"large"] = rng.randbytes(1_500_000)
    for key, value in model.items():
        db.put(key, value)
    old = kill_cluster(cluster)
    old_names = [e for e in shm_entries(cluster.directory) if old["cluster"] in e]
    assert old_names, "a killed supervisor cannot unlink its shared memory"
    with cluster.watchdog(15, "a put to a killed cluster"), pytest.raises(shardkv.Unavailable):
        db.put(b"while-down", b"x")  # nobody serves it: a clear error, not a hang
    db.close()

    with cluster.watchdog(30, "attaching and reading after the restart"):
        try:
            db = cluster.open()
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"shardkv.open() after a killed supervisor raised {exc!r}")
        assert db.health()["supervisor"]["pid"] != old["pid"], "the new client attached to the killed cluster (stale run/cluster.json)"
        new = cluster.info()
        assert new["cluster"] != old["cluster"] and new["pid"] != old["pid"]
        left = [e for e in shm_entries(cluster.directory) if old["cluster"] in e]
        assert not left, f"shared objects of the killed cluster were not removed: {left[:5]}"
        assert all(new["cluster"] in e for e in shm_entries(cluster.directory))
        assert db.health()["status"] == "healthy"
        assert dict(db.scan()) == model
    db.close()
    wait_until(lambda: nothing_left(cluster.directory), 10, message="stop of the new cluster after its last client closed")


def test_open_never_attaches_to_a_killed_clusters_description(cluster):
    """Between a new supervisor's flock of run/supervisor.lock and its removal of the killed
    cluster's run/cluster.json, a client sees "lock held" and a "ready" description. It must
    check that the supervisor described there is alive (pid and start time) instead of
    attaching to the dead cluster, whose shared memory is still there until the new supervisor
    removes it. The test holds the lock itself to keep that window open.
    """
    db = cluster.open()
    db.put(b"k", b"v")
    old = kill_cluster(cluster)
    db.close()
    assert cluster.info()["pid"] == old["pid"] and shm_entries(cluster.directory)
    lock_fd = os.open(os.path.join(cluster.directory, "run", "supervisor.lock"), os.O_RDWR)
    attached_to = None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "a new supervisor, still starting"
        started = time.monotonic()
        try:
            with cluster.watchdog(20, "open() while a supervisor starts"):
                stale = shardkv.open(cluster.directory, shards=SHARDS, start_timeout=1.0)
        except shardkv.Unavailable:
            assert time.monotonic() - started < 10
        else:
            attached_to = stale.health()["supervisor"]["pid"]
            stale.close()
    finally:
        os.close(lock_fd)
    db = cluster.open()  # a real supervisor now: it removes the leftovers
    assert db.get(b"k") == b"v" and not [e for e in shm_entries(cluster.directory) if old["cluster"] in e]
    assert attached_to is None, f"open() attached to the killed cluster (supervisor pid {attached_to}, dead) described by a stale run/cluster.json"


STALE_SCRIPT = """
import sys, time, shardkv
db = shardkv.open(sys.argv[1], shards=int(sys.argv[2]))  # as many as the fixture's (not one per CPU)
db.put(b"before", b"1")
print("ready", flush=True)
for line in sys.stdin:
    started = time.monotonic()
    try:
        db.put(line.strip().encode(), b"v")
        print("result ok", round(time.monotonic() - started, 2), flush=True)
    except Exception as exc:
        print("result", type(exc).__name__, round(time.monotonic() - started, 2), exc, flush=True)
"""


def test_client_of_a_killed_cluster_fails_fast_after_a_new_cluster_starts(cluster):
    """A client attached to a cluster whose supervisor was killed must not wait for answers
    that will never come, neither while the directory has no cluster nor once another cluster
    runs on it (its requests go to the old cluster's unlinked rings, which nobody serves; a
    check of "is some supervisor holding run/supervisor.lock" would pass and hang it for
    its request_timeout, 20 s by default).
    """
    p = cluster.spawn(STALE_SCRIPT, cluster.directory, str(SHARDS))
    p.expect("ready", 60)
    old = kill_cluster(cluster)
    p.send("while-down")
    answer = p.expect("result", 10)
    assert answer.startswith("Unavailable"), answer

    os.unlink(os.path.join(cluster.directory, "run", "cluster.json"))  # keeps clear of the stale-description race (test_open_never_attaches_...)
    db = cluster.open()
    assert cluster.info()["cluster"] != old["cluster"] and db.get(b"before") == b"1"
    p.send("after-restart")
    try:
        answer = p.expect("result", 8)
    except AssertionError:
        pytest.fail("a client of the killed cluster hung on a put after a new cluster started on its directory")
    assert answer.startswith(("ok", "Unavailable", "Closed")), answer
    if answer.startswith("ok"):
        assert db.get(b"after-restart") == b"v"
