"""Direct reads through a real cluster: clients answer `get` in their own process from each
shard worker's index in shared memory (docs/IPC.md, "Shared index"; shardkv/ipc/sharedindex.py).

Covered here (the in-process tests of the index and of IndexReader are elsewhere):
- gets are really answered in the client (IndexReader.get answers, the workers' request
  counters stay still) and agree with the ring (`direct_reads=False`) for present, absent,
  deleted, overwritten, expired, empty and 1 MiB values, in the active segment and in a sealed
  one (a compaction output);
- monotonic reads across processes: a reader process never sees a key go back, nor miss a
  write that finished before a write it already saw began, while a writer process makes the
  index grow (table swaps); it sees the last value once the writer is done;
- shard workers killed with SIGKILL while a reader and a writer run: nothing older than what
  was seen, nothing never written; direct reads resume after the restart with the latest values;
- keys locked by cross-shard batches held prepared (the supervisor is stopped with SIGSTOP so
  the dead coordinator stays dead): the shard falls back to the ring, a get of a locked key is
  Busy (never the value from before a decided batch), direct reads resume once it is settled;
- a client of a killed cluster never returns a value overwritten through the next cluster, and
  its get fails fast like its put (test_a_get_through_a_killed_cluster_fails_fast: fails today,
  Client._call retries a read's Unavailable for RETRY_TIMEOUT = 30 s);
- the index objects are owner-only and a client maps them read-only;
- nothing `-idx` is left in /dev/shm, and a dead worker's index is marked "not serving" and
  its tables unlinked by the supervisor before the worker is restarted.

Every test has its own data directory and, through the `cluster` fixture, leaves no process
and no /dev/shm entry behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
import time

import numpy as np
import pytest
from crc32c import crc32c

import shardkv
from shardkv.ipc.layout import PROC_UP
from shardkv.ipc.sharedindex import FALLBACK, HEADER, NOT_SERVING, SUPPORTED

import client_support as cs
from cluster_support import SHARDS, alive, cluster_fixture, cluster_pids, keys_by_shard, nothing_left, shm_entries, wait_until

pytestmark = [
    pytest.mark.skipif(not SUPPORTED, reason="direct reads are x86-64 only (elsewhere clients always use the ring)"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"),
]


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


# -- helpers ---------------------------------------------------------------------------------------
def direct(db, key: bytes):
    """What the client's shared-index reader of `key`'s shard answers (a value, None or FALLBACK)."""
    return cs.index_readers(db)[db.shard_of(key)].get(key, crc32c(key))


def header(db, shard: int) -> dict:
    """The fields of shard `shard`'s index header, as `db` sees them."""
    _, version, state, locked, table, active, epoch, active_end = HEADER.unpack_from(cs.index_header(cs.index_readers(db)[shard]), 0)
    return {"version": version, "state": state, "locked": locked, "table": table, "active": active, "epoch": epoch, "active_end": active_end}


def served(db) -> np.ndarray:
    """Requests served so far by each shard worker (its control block counter)."""
    return db.cluster_view.control.procs["requests"][1:].astype(np.int64).copy()


def worker(db, shard: int) -> tuple[int, int]:
    entry = db.cluster_view.control.procs[1 + shard]
    return int(entry["pid"]), int(entry["state"])


def kill_worker(db, shard: int) -> int:
    """SIGKILL shard `shard`'s worker; return its pid."""
    pid, state = worker(db, shard)
    assert pid and state == PROC_UP, (pid, state)
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_restarted(db, shard: int, old_pid: int, timeout: float = 20) -> None:
    def up():
        pid, state = worker(db, shard)
        return pid not in (0, old_pid) and state == PROC_UP

    wait_until(up, timeout, message=f"restart of shard {shard}'s worker")


def index_entries(directory) -> list[str]:
    """The /dev/shm entries of `directory`'s shared indexes (headers and tables)."""
    return [e for e in shm_entries(directory) if re.search(r"-idx\d+(-\d+)?$", e)]


def tables_of(directory, shard: int) -> list[int]:
    """The numbers of shard `shard`'s index tables in /dev/shm."""
    return sorted(int(m.group(1)) for e in shm_entries(directory) if (m := re.search(rf"-idx{shard}-(\d+)$", e)))


# Values that name their key and write number, with a length that varies (so the index's
# value lengths change): a reader can tell a value that was never written.
VALUE_CODE = r"""
def value_of(j, i):
    return b"%d:%d:" % (j, i) + b"." * ((i * 7 + j * 13) % 300)

def number_of(j, value, n):
    # The write number i of `value` for key j (-1 for absent), or None if it was never written.
    if value is None:
        return -1
    try:
        kj, ki, _ = value.split(b":", 2)
        i = int(ki)
    except ValueError:
        return None
    return i if int(kj) == j and 0 <= i < n and value == value_of(j, i) else None
"""
namespace: dict = {}
exec(VALUE_CODE, namespace)  # noqa: S102 - the same two functions in the test and in its scripts
value_of = namespace["value_of"]

WRITER_SCRIPT = VALUE_CODE + r"""
import sys, time, shardkv
directory, n, fillers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keys = [bytes.fromhex(h) for h in sys.argv[4:]]
db = shardkv.open(directory)
retries = 0

def put(key, value):
    global retries
    while True:  # a put answered Unavailable (its worker died) may or may not be applied: again
        try:
            return db.put(key, value)
        except shardkv.Unavailable:
            retries += 1
            time.sleep(0.01)

print("ready", flush=True)
sys.stdin.readline()
filler = 0
for i in range(n):
    for j, key in enumerate(keys):
        put(key, value_of(j, i))  # acknowledged before the next write begins
    for _ in range(fillers):  # new keys: the shards' indexes grow into new tables
        put(b"filler-%d" % filler, b"f")
        filler += 1
    if i % 10 == 0:
        print("at", i, flush=True)
print("done", retries, flush=True)
db.close()
"""

READER_SCRIPT = cs.SUBPROCESS_PATH + VALUE_CODE + r"""
import json, select, sys, shardkv
import client_support
directory, n = sys.argv[1], int(sys.argv[2])
keys = [bytes.fromhex(h) for h in sys.argv[3:]]
K = len(keys)
db = shardkv.open(directory)
counts = {"direct": 0, "fallback": 0, "unavailable": 0}
client_support.count_direct_reads(db, counts)
last = [-1] * K  # the newest write number seen of each key
high = -1  # the latest write seen, as a position in the writer's order (i * K + j)
seen = set()
problems = []

def check(j, value):
    global high
    i = number_of(j, value, n)
    if i is None:
        problems.append(f"key {j}: a value that was never written: {value[:40]!r}")
        return
    # Every write before position `high` had been acknowledged when write `high` began.
    floor = (high - 1 - j) // K if high - 1 - j >= 0 else -1
    if i < last[j]:
        problems.append(f"key {j}: write {i} read after write {last[j]}")
    elif i < floor:
        problems.append(f"key {j}: write {i} read after a write that began once its write {floor} was acknowledged")
    last[j] = max(last[j], i)
    if i >= 0:
        high = max(high, i * K + j)
        seen.add((j, i))

def get(j):
    while True:
        try:
            return db.get(keys[j])
        except shardkv.Unavailable:
            counts["unavailable"] += 1

print("ready", flush=True)
rounds = 0
while True:
    for j in range(K):
        check(j, get(j))
    rounds += 1
    if rounds % 16 == 0 and select.select([sys.stdin], [], [], 0)[0]:
        sys.stdin.readline()
        break
final = []
for j in range(K):
    value = get(j)
    check(j, value)
    final.append(number_of(j, value, n))
print("result", json.dumps({"final": final, "counts": counts, "distinct": len(seen), "problems": problems[:20]}), flush=True)
db.close()
"""


def run_writer_and_reader(cluster, keys: list[bytes], n: int, fillers: int, during=None) -> dict:
    """Start a reader and a writer process on `keys`; call `during(writer)` while the writer runs;
    return the reader's report once the writer is done."""
    hexes = [k.hex() for k in keys]
    reader = cluster.spawn(READER_SCRIPT, cluster.directory, n, *hexes)
    writer = cluster.spawn(WRITER_SCRIPT, cluster.directory, n, fillers, *hexes)
    reader.expect("ready", 60)
    writer.expect("ready", 60)
    writer.send("go")
    if during is not None:
        during(writer)
    writer.expect("done", 60)
    assert writer.wait(20) == 0
    reader.send("final")
    report = json.loads(reader.expect("result", 60))
    assert reader.wait(20) == 0
    return report


# -- 1. gets are answered in the client ----------------------------------------------------------------
def test_gets_are_answered_in_the_client_and_agree_with_the_ring(cluster):
    db = cluster.open()
    ring = cluster.open(direct_reads=False)
    assert cs.index_readers(db) is not None and cs.index_readers(ring) is None
    groups = keys_by_shard(db, 12, b"direct-%d")
    k = {name: [groups[0][i], groups[1][i]] for i, name in enumerate(
        ["sealed", "sealed_over", "sealed_del", "sealed_big", "present", "over", "deleted", "absent", "expired", "ttl_live", "big", "empty"])}
    model = {}

    def put(key, value, **kw):
        db.put(key, value, **kw)
        model[key] = value

    def delete(key):
        assert db.delete(key)
        del model[key]

    # Written before a compaction, which copies them into a new segment: not the active one.
    for key in k["sealed"] + k["sealed_over"] + k["sealed_del"]:
        put(key, b"sealed-" + key * 40)
    for key in k["sealed_big"]:
        put(key, os.urandom(1 << 20))
    db.compact()
    for h in (header(db, s) for s in range(db.shards)):
        assert h["state"] != NOT_SERVING and h["locked"] == 0, h
    for key in k["sealed_over"]:
        put(key, b"new " + key)
    for key in k["sealed_del"]:
        delete(key)
    # The active segment.
    for key in k["present"]:
        put(key, b"v-" + key)
    for key in k["over"]:
        put(key, b"first")
        put(key, b"second " + key * 3)
    for key in k["deleted"]:
        put(key, b"gone")
        delete(key)
    for key in k["expired"]:
        db.put(key, b"short-lived", ttl=0.3)
    for key in k["ttl_live"]:
        put(key, b"long-lived", ttl=600)
    for key in k["big"]:
        put(key, os.urandom(1 << 20))
    for key in k["empty"]:
        put(key, b"")
    wait_until(lambda: all(ring.get(key) is None for key in k["expired"]), 10, message="expiry of the short-lived keys")

    everything = [key for keys in k.values() for key in keys]
    for reader in cs.index_readers(db):
        cs.forget_sealed_segments(reader)  # so that the sealed-segment cache below shows this pass's reads
    for key in everything:
        got = direct(db, key)
        assert got is not FALLBACK, f"{key!r} ({[n for n, ks in k.items() if key in ks]}) was not answered from the shared index"
        assert got == model.get(key), (key, None if got is None else got[:50])
    for shard, reader in enumerate(cs.index_readers(db)):
        assert cs.sealed_segments(reader), f"no read of shard {shard} touched a sealed segment: the sealed-segment path went untested"
        assert cs.active_segment(reader)[0] == header(db, shard)["active"]
    for key in everything:
        expected = model.get(key)
        assert db.get(key) == expected and ring.get(key) == expected, key
        assert db.get(key, b"default") == ring.get(key, b"default") == (b"default" if expected is None else expected)

    # Changes after the readers mapped the table and the active segment are seen at once.
    for key in k["present"]:
        put(key, os.urandom(1 << 20))
    for key in k["sealed"]:
        put(key, b"rewritten")
    for key in k["big"]:
        delete(key)
    for key in k["absent"]:
        put(key, b"late")
    for key in k["present"] + k["sealed"] + k["big"] + k["absent"]:
        got = direct(db, key)
        assert got is not FALLBACK and got == model.get(key), (key, got if got is FALLBACK or got is None else got[:50])

    # 1000 gets through the shared index: no request reaches a worker (but for the
    # coordinator's periodic PENDING question, at most one per worker every 5 s).
    small = [key for key in everything if key in model and len(model[key]) < 1000]
    before = served(db)
    for i in range(1000):
        key = small[i % len(small)]
        assert db.get(key) == model[key]
    grown = served(db) - before
    assert grown.sum() <= 2, f"direct gets reached the workers: their request counters grew by {grown.tolist()}"
    before = served(ring)
    for i in range(1000):
        key = small[i % len(small)]
        assert ring.get(key) == model[key]
    grown = served(ring) - before
    assert grown.sum() >= 1000 and all(grown > 0), f"gets with direct_reads=False did not reach the workers: {grown.tolist()}"


# -- 2. monotonic reads across processes ------------------------------------------------------------------
@pytest.mark.parametrize("per_shard", [0, 2], ids=["one-key", "two-keys-per-shard"])
def test_a_reader_process_never_sees_a_key_go_back(cluster, per_shard):
    """A writer process writes 0..n-1 to each key in turn (each acknowledged before the next
    write), plus filler keys that make each shard's index grow into new tables; a reader
    process reads the keys in a loop through its direct-reads client."""
    db = cluster.open()
    keys = [b"counter"] if not per_shard else [k for ks in keys_by_shard(db, per_shard, b"counter-%d").values() for k in ks]
    n = 250 if per_shard else 400
    tables_before = [header(db, s)["table"] for s in range(db.shards)]
    report = run_writer_and_reader(cluster, keys, n, fillers=8 if per_shard else 5)  # > 716 new keys a shard: a bigger table
    assert not report["problems"], report["problems"]
    assert report["final"] == [n - 1] * len(keys), report
    assert report["counts"]["direct"] >= 100, f"the reader hardly read directly: {report['counts']}"
    assert report["distinct"] >= 3, f"the reader saw almost none of the writes as they happened: {report}"
    assert all(header(db, s)["table"] > tables_before[s] for s in range(db.shards)), "no index table was replaced during the test"
    assert [direct(db, key) for key in keys] == [value_of(j, n - 1) for j in range(len(keys))]


# -- 3. workers killed with SIGKILL --------------------------------------------------------------------------
def test_killed_workers_never_make_reads_go_back_and_direct_reads_resume(cluster):
    db = cluster.open()
    keys = [k for ks in keys_by_shard(db, 2, b"kill-%d").values() for k in ks]
    n = 240
    restarted = []

    def kill_both(writer):
        for shard, at in ((0, 40), (1, 120)):
            while int(writer.expect("at", 60)) < at:
                pass
            old = kill_worker(db, shard)
            wait_restarted(db, shard, old)
            restarted.append(shard)

    report = run_writer_and_reader(cluster, keys, n, fillers=2, during=kill_both)
    assert restarted == [0, 1]
    assert all(p["restarts"] == 1 for p in db.health()["shards"]), db.health()
    assert not report["problems"], report["problems"]
    assert report["final"] == [n - 1] * len(keys), report
    assert report["counts"]["direct"] >= 100, report["counts"]
    # The restarted workers serve their indexes again: direct reads return the latest values.
    latest = {key: value_of(j, n - 1) for j, key in enumerate(keys)}
    wait_until(lambda: all(direct(db, key) == value for key, value in latest.items()), 5, message="direct reads of the restarted shards")
    assert [db.get(key) for key in keys] == list(latest.values())


# -- 4. keys locked by a cross-shard batch -----------------------------------------------------------------
@pytest.mark.parametrize(
    "point, outcome",
    [("coordinator.prepare_sent", b"before"), ("coordinator.commit_sent", b"after")],
    ids=["undecided-then-aborted", "committed-on-one-shard-only"],
)
def test_locked_keys_are_read_through_the_ring_until_the_batch_is_settled(cluster, monkeypatch, tmp_path, point, outcome):
    """The coordinator kills itself at `point` in the second cross-shard batch while the
    supervisor is stopped (SIGSTOP), so nobody restarts it: the participants hold the batch as
    long as the test needs. prepare_sent: one shard prepared, the batch undecided (the next
    coordinator aborts it). commit_sent: COMMIT decided, applied on one shard, not yet on the
    other: there a direct read of the old value would show half of a committed batch."""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_FAULTS", f"{point}@2")
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open(lock_timeout=0.5)
    writer = cluster.open()
    by_shard = keys_by_shard(db, 3, b"lock-%d")
    batch = by_shard[0][:2] + by_shard[1][:2]  # two keys on each shard
    bystanders = [by_shard[0][2], by_shard[1][2]]  # same shards, not in the batch
    db.put_many({k: b"before" for k in batch})  # the first batch passes the fault point once
    for k in bystanders:
        db.put(k, b"bystander")
    assert [direct(db, k) for k in batch + bystanders] == [b"before"] * 4 + [b"bystander"] * 2

    supervisor = cluster.info()["pid"]
    result = {}

    def write():
        try:
            writer.put_many({k: b"after" for k in batch})
            result["outcome"] = "acknowledged"
        except shardkv.Unavailable as exc:
            result["outcome"] = repr(exc)

    os.kill(supervisor, signal.SIGSTOP)
    thread = threading.Thread(target=write, daemon=True)
    try:
        thread.start()
        wait_until(lambda: (state / f"{point}.fired").exists(), 20, message=f"the coordinator reaching {point}")
        if point == "coordinator.prepare_sent":
            wait_until(lambda: any(header(db, s)["locked"] for s in range(db.shards)), 10, message="a shard holding the prepared batch")
        else:
            # The one that got COMMIT applies it and unlocks; the other keeps its keys locked.
            wait_until(lambda: sorted(bool(header(db, s)["locked"]) for s in range(db.shards)) == [False, True], 10, message="COMMIT applied on one shard only")
        locked = [s for s in range(db.shards) if header(db, s)["locked"]]
        assert len(locked) == 1, [header(db, s) for s in range(db.shards)]
        shard = locked[0]
        other = 1 - shard
        assert header(db, shard)["locked"] == 2  # its two keys of the batch
        other_value = b"after" if point == "coordinator.commit_sent" else b"before"
        # A get of a locked key waits for the decision (Busy after lock_timeout): never the old
        # value, which, with COMMIT applied on the other shard, would show half of the batch.
        for k in by_shard[shard][:2]:
            try:
                got = db.get(k)
            except shardkv.Busy:
                continue
            pytest.fail(f"get of a key locked by a prepared batch returned {got!r} (the batch's keys on the other shard read {direct(db, by_shard[other][0])!r})")
        # The whole locked shard is read through the ring, the other shard directly.
        assert [direct(db, k) for k in by_shard[shard][:2]] == [FALLBACK, FALLBACK]
        assert direct(db, bystanders[shard]) is FALLBACK
        assert db.get(bystanders[shard]) == b"bystander"  # not locked: the worker answers it
        assert direct(db, bystanders[other]) == b"bystander"
        assert [direct(db, k) for k in by_shard[other][:2]] == [other_value] * 2
        assert thread.is_alive()  # the writer still waits for the dead coordinator
    finally:
        os.kill(supervisor, signal.SIGCONT)
    thread.join(30)
    assert not thread.is_alive(), "the batch's writer never got an answer"
    wait_until(lambda: not any(header(db, s)["locked"] for s in range(db.shards)), 30, message="the batch settled by the restarted coordinator")
    # Settled: direct reads resume and agree with the ring.
    assert [direct(db, k) for k in batch] == [outcome] * 4, (result, [direct(db, k) for k in batch])
    assert [db.get(k) for k in batch] == [outcome] * 4
    assert writer.get_many(batch) == [outcome] * 4


# -- 5. a client of a killed cluster ----------------------------------------------------------------------
STALE_GET_SCRIPT = r"""
import sys, time, shardkv
db = shardkv.open(sys.argv[1], shards=int(sys.argv[2]))  # as many as the fixture's (not one per CPU)
print("ready", db.cluster_id, flush=True)
for line in sys.stdin:
    started = time.monotonic()
    try:
        print("result", repr(db.get(line.strip().encode())), round(time.monotonic() - started, 2), flush=True)
    except shardkv.Error as exc:
        print("result", type(exc).__name__, round(time.monotonic() - started, 2), exc, flush=True)
"""


def kill_cluster_processes(cluster) -> None:
    """SIGKILL the supervisor, then every other cluster process (not the test's clients)."""
    info = cluster.info()
    os.kill(info["pid"], signal.SIGKILL)
    # alive() looks for the zombie state: a dying process's command line is empty before it
    # has released its files (the supervisor lock), and a client may still take it for alive.
    wait_until(lambda: not alive(info["pid"], info["start_time"]), 10, message="death of the supervisor")
    for pid in cluster_pids(cluster.directory):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not cluster_pids(cluster.directory) and not any(alive(pid, start) for pid, start in info["children"]), 10, message="death of the cluster")


def start_over_a_killed_cluster(cluster, key: bytes):
    """A client attached to a cluster that is then killed with SIGKILL (all its processes);
    a new cluster on the same directory, through which `key` goes from b"old" to b"new"."""
    stale = cluster.open()
    stale.put(key, b"old")
    assert direct(stale, key) == b"old"
    kill_cluster_processes(cluster)
    fresh = cluster.open()
    assert cluster.info()["cluster"] != stale.cluster_id
    fresh.put(key, b"new")
    assert fresh.get(key) == b"new"
    return stale, fresh


def test_a_client_of_a_killed_cluster_never_returns_a_value_overwritten_since(cluster, monkeypatch):
    stale, fresh = start_over_a_killed_cluster(cluster, b"key")
    # The new supervisor told the killed cluster's readers to use the ring (before it wrote
    # anything), where the client learns that its cluster is gone.
    other = keys_by_shard(fresh, 1, b"other-%d")
    assert direct(stale, b"key") is FALLBACK and all(direct(stale, k[0]) is FALLBACK for k in other.values())
    # Reads retry Unavailable for RETRY_TIMEOUT (30 s); shortened, as how long is not the point
    # here (see test_a_get_through_a_killed_cluster_fails_fast).
    monkeypatch.setattr(shardkv.client, "RETRY_TIMEOUT", 1.0)
    for key in (b"key", other[0][0], other[1][0]):
        try:
            got = stale.get(key)
        except shardkv.Unavailable:
            continue
        assert got != b"old", "a client of the killed cluster returned a value overwritten through the next cluster"
        assert got == fresh.get(key), (key, got)


def test_a_get_through_a_killed_cluster_fails_fast(cluster):
    """A put through a killed cluster raises Unavailable at once (its supervisor is gone:
    test_cluster_faults.py::test_client_of_a_killed_cluster_fails_fast_after_a_new_cluster_starts);
    a get, now sent to the ring because the index says "not serving", must too."""
    p = cluster.spawn(STALE_GET_SCRIPT, cluster.directory, str(SHARDS))
    p.expect("ready", 60)
    start_over_a_killed_cluster(cluster, b"key")
    p.send("key")
    try:
        answer = p.expect("result", 10)
    except AssertionError:
        answer = None
    assert answer is not None, (
        "a get through a killed cluster did not answer within 10 s (it raises Unavailable after 30 s, a put after 0.2 s): "
        "Client._call retries every Unavailable of a read until RETRY_TIMEOUT, even the permanent "
        "'the cluster this client attached to ... has stopped' raised by Client._check_cluster"
    )
    assert not answer.startswith("b'old'"), answer
    assert answer.startswith(("Unavailable", "b'new'")), answer


# -- 6. permissions ----------------------------------------------------------------------------------------
def test_index_objects_are_owner_only_and_mapped_read_only_by_clients(cluster):
    old_umask = os.umask(0)  # the modes must not come from the umask
    try:
        db = cluster.open()
        for key in keys_by_shard(db, 2, b"perm-%d")[0] + keys_by_shard(db, 2, b"perm-%d")[1]:
            db.put(key, b"v")
    finally:
        os.umask(old_umask)
    entries = index_entries(cluster.directory)
    headers = [e for e in entries if re.search(r"-idx\d+$", e)]
    tables = [e for e in entries if re.search(r"-idx\d+-\d+$", e)]
    assert len(headers) == db.shards and len(tables) >= db.shards, entries
    modes = {e: stat.S_IMODE(os.stat(os.path.join("/dev/shm", e)).st_mode) for e in entries}
    assert all(mode == 0o600 for mode in modes.values()), {e: oct(m) for e, m in modes.items()}
    assert {os.stat(os.path.join("/dev/shm", e)).st_uid for e in entries} == {os.getuid()}

    key = keys_by_shard(db, 1, b"perm-%d")[0][0]
    assert direct(db, key) == b"v"
    reader = cs.index_readers(db)[0]
    mapped = cs.index_header(reader)
    before = bytes(mapped[:64])
    with pytest.raises(TypeError):
        mapped[16:20] = b"\0\0\0\0"  # "not serving"
    with pytest.raises(TypeError):
        mapped.write_byte(0)
    with pytest.raises(TypeError):
        cs.index_table(reader)[2][0] = 0  # the slot array
    with pytest.raises(TypeError):
        cs.active_segment(reader)[1][0:4] = b"evil"  # the active segment file
    assert bytes(mapped[:64]) == before
    assert direct(db, key) == b"v"


# -- 7. nothing left behind ----------------------------------------------------------------------------------
def test_dead_workers_indexes_are_withdrawn_and_nothing_is_left_behind(cluster):
    db = cluster.open()
    keys = keys_by_shard(db, 3, b"left-%d")
    for shard_keys in keys.values():
        for key in shard_keys:
            db.put(key, key)
    for shard in range(db.shards):
        assert tables_of(cluster.directory, shard) == [header(db, shard)["table"]]

    conclusive = 0
    for shard in (0, 0, 1, 0):  # shard 0's restarts back off: 0.1, 0.2, 0.4 s
        table = header(db, shard)["table"]
        old = kill_worker(db, shard)
        # Between the supervisor noticing the death (pid 0) and the restart, readers must
        # already be sent to the ring: the supervisor marks the header, not the next worker.
        states_while_dead = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid, _ = worker(db, shard)
            state = header(db, shard)["state"]
            if pid == 0:
                states_while_dead.add(state)
            elif pid != old:
                break
        if states_while_dead:  # (a test process kept off the CPU for the whole window saw nothing)
            conclusive += 1
            assert NOT_SERVING in states_while_dead, f"shard {shard}'s header still said 'serving' while its worker was dead and not yet restarted"
        wait_restarted(db, shard, old)
        wait_until(lambda: all(direct(db, key) == key for key in keys[shard]), 10, message=f"direct reads of shard {shard} after its restart")
        # The dead worker's table is gone; the new worker's is the only one.
        assert tables_of(cluster.directory, shard) == [header(db, shard)["table"]] and header(db, shard)["table"] > table
        assert [db.get(key) for shard_keys in keys.values() for key in shard_keys] == [key for shard_keys in keys.values() for key in shard_keys]

    assert conclusive >= 2, f"the test saw a dead worker's window before its restart only {conclusive} times out of 4"
    assert len(index_entries(cluster.directory)) == 2 * db.shards
    db.close()  # the last client: the embedded cluster stops by itself
    wait_until(lambda: cluster.info() is None and not cluster_pids(cluster.directory), 20, message="stop of the idle embedded cluster")
    assert not index_entries(cluster.directory), f"index objects left in /dev/shm after the cluster stopped: {index_entries(cluster.directory)}"
    assert nothing_left(cluster.directory), shm_entries(cluster.directory)


def test_a_big_batch_is_read_back_at_once_though_indexed_after_its_answer(cluster):
    """A worker answers a big batch once it is logged and indexes it right after (so that the
    client's next batch overlaps the indexing). A get or get_many made as soon as put_many
    returns, by the writer or by another client, must see every key of it: the shard's
    version stays odd until the batch is indexed, so direct reads ask the worker meanwhile."""
    db, other = cluster.open(), cluster.open()
    # Big enough that indexing takes longer than the client takes to wake up and read.
    on_shard_0 = keys_by_shard(db, 5000, b"early-%06d")[0]
    across = [b"early-x%05d" % i for i in range(5000)]
    assert len({db.shard_of(k) for k in across}) > 1
    for round_ in range(8):
        keys = on_shard_0 if round_ % 2 else across  # one APPLY, or PREPARE + COMMIT on each shard
        value = b"round-%04d" % round_
        db.put_many([(key, value) for key in keys])
        assert [db.get(key) for key in keys[:: 7]] == [value] * len(keys[:: 7])
        assert other.get_many(keys) == [value] * len(keys)
        assert [other.get(key) for key in keys[1:: 7]] == [value] * len(keys[1:: 7])


@pytest.mark.parametrize("spread", ["one-shard", "across"])
def test_a_worker_killed_after_answering_a_batch_it_had_not_indexed_loses_nothing(cluster, monkeypatch, tmp_path, spread):
    """Fault point worker.answered_unindexed: the worker answers a big batch (APPLY, or its
    part of a COMMIT) and dies before indexing it. The batch was acknowledged, so after the
    restart every key of it reads its new value, directly and through the ring.

    A big batch is answered early only when it is the last request of the worker's pass:
    another request in the same pass (the coordinator's PENDING check, every 5 s) has it
    indexed first, and then answered, which is no early answer and does not count. So batches
    are sent until the point fires, each only once the worker that took the last one has
    answered a read through the ring (it would have killed itself before that read): a batch
    never meets the dead worker (Unavailable, outcome unknown)."""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_FAULTS", "worker.answered_unindexed@2")  # each worker's 2nd early answer
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open()
    ring = cluster.open(direct_reads=False)
    keys = keys_by_shard(db, 200, b"unindexed-%05d")[0] if spread == "one-shard" else [b"unindexed-x%04d" % i for i in range(400)]
    pids = {shard: worker(db, shard)[0] for shard in range(db.shards)}
    restarted = lambda: [shard for shard in range(db.shards) if worker(db, shard)[0] != pids[shard]]  # noqa: E731
    for round_ in range(10):
        value = b"value-%d" % round_
        db.put_many([(key, value) for key in keys])  # acknowledged (the kill comes after the answer)
        # Through the ring: answered by the same worker, or (reads are retried while a worker
        # restarts) by its successor, recovered from the log.
        assert ring.get_many(keys) == [value] * len(keys)
        if round_ >= 1 and restarted():
            break
    else:
        raise AssertionError("no batch was answered before it was indexed twice by one worker in 10 rounds")
    for shard in restarted():  # (the point fires once per cluster: one worker dies)
        wait_restarted(db, shard, pids[shard])
    assert ring.get_many(keys) == [value] * len(keys)
    wait_until(lambda: all(direct(db, key) is not FALLBACK for key in keys[:5]), 20, message="direct reads resume")
    assert [db.get(key) for key in keys] == [value] * len(keys)
