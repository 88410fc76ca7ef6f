"""Atomic batches through the cluster: the API, preconditions, limits, isolation (no fractured
reads), concurrent batches from several processes, and processes killed at every named fault
point of two-phase commit (docs/TRANSACTIONS.md).

Every test has its own data directory and, through the `cluster` fixture, leaves no process
and no /dev/shm entry behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import shardkv
from shardkv.ops.verify import verify_store

import client_support as cs
from cluster_support import cluster_fixture, keys_by_shard, wait_until


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def spread(db, count: int, fmt: bytes) -> list[bytes]:
    """`count` keys covering every shard."""
    found = keys_by_shard(db, (count + db.shards - 1) // db.shards, fmt)
    keys = [k for group in zip(*found.values()) for k in group]
    return keys[:count]


def coordinator_stats(db) -> dict:
    import json

    from shardkv.ipc import messages as m

    return json.loads(bytes(cs.call(db, db.shards, m.request(m.STATS), read=True)[1]))


# -- the API ------------------------------------------------------------------------------------------
def test_batch_write_and_put_many_apply_across_shards(cluster):
    db = cluster.open()
    keys = spread(db, 8, b"k%d")
    assert len({db.shard_of(k) for k in keys}) == db.shards
    db.put_many({k: b"v1" for k in keys})
    assert db.get_many(keys) == [b"v1"] * 8
    with db.batch() as b:
        b.put(keys[0], b"new")
        b.delete(keys[1])
        b.expect(keys[2], b"v1")
        b.put(keys[3], b"ttl", ttl=60)
    assert db.get_many(keys[:4]) == [b"new", None, b"v1", b"ttl"]
    assert 55 < db.ttl(keys[3]) <= 60
    db.write([("put", keys[4], b"w"), ("delete", keys[5]), ("expect", keys[1], None), ("put", keys[4], b"last")])
    assert db.get_many(keys[4:6]) == [b"last", None]
    assert coordinator_stats(db)["committed"] == 3


def test_single_shard_batch_does_not_go_through_the_coordinator(cluster):
    db = cluster.open()
    keys = keys_by_shard(db, 5)[1]
    db.put_many({k: b"x" for k in keys})
    with db.batch() as b:
        for k in keys:
            b.put(k, b"y")
        b.expect(keys[0], b"x")
    assert db.get_many(keys) == [b"y"] * 5
    assert coordinator_stats(db)["committed"] == 0


def test_an_exception_in_the_block_applies_nothing(cluster):
    db = cluster.open()
    keys = spread(db, 4, b"e%d")
    with pytest.raises(RuntimeError):
        with db.batch() as b:
            for k in keys:
                b.put(k, b"never")
            raise RuntimeError("changed my mind")
    assert db.get_many(keys) == [None] * 4
    with pytest.raises(ValueError):
        b.put(keys[0], b"after")  # a finished batch takes nothing more


@pytest.mark.parametrize("single_shard", [False, True])
def test_failed_precondition_raises_conflict_and_applies_nothing(cluster, single_shard):
    db = cluster.open()
    keys = keys_by_shard(db, 4)[0] if single_shard else spread(db, 4, b"c%d")
    db.put_many({k: b"old" for k in keys})
    for expectation in [(keys[3], b"other"), (keys[3], None), (b"missing-key", b"x")]:
        with pytest.raises(shardkv.Conflict):
            db.write([("put", keys[0], b"new"), ("delete", keys[1]), ("put", keys[2], b"new"), ("expect", *expectation)])
        assert db.get_many(keys) == [b"old"] * 4
    # and nothing is left locked: a plain write goes through at once
    started = time.monotonic()
    db.put(keys[0], b"free")
    assert time.monotonic() - started < 1.0 and db.get(keys[0]) == b"free"


def test_bad_input_is_rejected_before_anything_is_written(cluster):
    db = cluster.open()
    keys = spread(db, 2, b"b%d")
    for ops, error in [
        ([("put", keys[0], b"v"), ("put", 1, b"v")], TypeError),
        ([("put", keys[0], b"v"), ("put", keys[1], "text")], TypeError),
        ([("put", keys[0], b"v"), ("frobnicate", keys[1])], ValueError),
        ([("put", keys[0], b"v"), ("delete",)], ValueError),
        ([("put", keys[0], b"v"), ("put", b"", b"v")], ValueError),
        ([("put", keys[0], b"v", -1)], ValueError),
        ([("put", keys[0], b"v"), "put"], TypeError),
        (b"not ops", TypeError),
        ({keys[0]: b"v"}, TypeError),
    ]:
        with pytest.raises(error):
            db.write(ops)
    with pytest.raises(TypeError):
        db.put_many([(keys[0], b"v"), (keys[1],)])
    with pytest.raises(TypeError):
        db.put_many(5)
    assert db.get_many(keys) == [None, None] and len(db) == 0


def test_batch_limits_are_value_errors_naming_the_limit(cluster):
    db = cluster.open(max_batch_ops=10, max_batch_bytes=1000)
    keys = spread(db, 11, b"l%d")
    with pytest.raises(ValueError, match="10 operations"):
        db.put_many({k: b"v" for k in keys})
    with pytest.raises(ValueError, match="1000 bytes"):
        db.put_many({keys[0]: b"x" * 600, keys[1]: b"y" * 600})
    with pytest.raises(ValueError, match="max_batch_ops"):
        with db.batch() as b:
            for k in keys:
                b.put(k, b"v")
    assert db.get_many(keys) == [None] * 11
    with pytest.raises(ValueError):
        shardkv.open(cluster.directory, max_batch_ops=0)


def test_a_batch_larger_than_many_ring_slots_is_streamed(cluster):
    db = cluster.open()
    count = 60_000  # about 6 MB of operations: dozens of 128 KiB frames to the coordinator and each worker
    items = {b"big-%07d" % i: b"%090d" % i for i in range(count)}
    db.put_many(items)
    sample = [b"big-%07d" % i for i in range(0, count, 997)]
    assert db.get_many(sample) == [items[k] for k in sample]
    assert len(db) == count
    db.write([("delete", k) for k in items])
    assert len(db) == 0


# -- isolation ----------------------------------------------------------------------------------------
def test_read_of_a_key_locked_by_a_prepared_batch_waits_for_the_decision(cluster, monkeypatch, tmp_path):
    """The coordinator dies right after logging COMMIT: the participants hold the batch prepared
    and locked until the restarted coordinator delivers it. A get in that window must return
    the committed value, never the old one."""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_FAULTS", "coordinator.decision_logged@2")
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open()
    keys = spread(db, 4, b"w%d")
    db.put_many({k: b"before" for k in keys})
    with pytest.raises(shardkv.Unavailable):
        db.put_many({k: b"after" for k in keys})  # the coordinator is killed: outcome unknown
    assert (state / "coordinator.decision_logged.fired").exists()
    assert [db.get(k) for k in keys] == [b"after"] * 4  # decided: every read sees the commit
    assert db.get_many(keys) == [b"after"] * 4


BANK_SCRIPT = """
import random, sys, shardkv
directory, seconds = sys.argv[1], float(sys.argv[2])
accounts = [bytes.fromhex(h) for h in sys.argv[3:]]
db = shardkv.open(directory)
print("ready", flush=True)
sys.stdin.readline()
import time
rng = random.Random(1)
done = conflicts = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    a, b = rng.sample(accounts, 2)
    va, vb = db.get_many([a, b])
    amount = rng.randint(1, 5)
    try:
        db.write([("expect", a, va), ("expect", b, vb), ("put", a, b"%d" % (int(va) - amount)), ("put", b, b"%d" % (int(vb) + amount))])
        done += 1
    except shardkv.Conflict:
        conflicts += 1
print("done", done, conflicts, flush=True)
db.close()
"""


def test_get_many_and_scan_never_see_part_of_a_batch(cluster):
    """Transfers between accounts on different shards conserve the total; readers check the
    total through get_many and scan while the transfers commit."""
    db = cluster.open()
    accounts = spread(db, 6, b"acct-%d")
    db.put_many({a: b"100" for a in accounts})
    writers = [cluster.spawn(BANK_SCRIPT, cluster.directory, 4.0, *[a.hex() for a in accounts]) for _ in range(2)]
    for w in writers:
        w.expect("ready")
    for w in writers:
        w.send("go")
    reads = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        values = db.get_many(accounts)
        assert sum(int(v) for v in values) == 600, values
        if reads % 5 == 0:
            scanned = dict(db.scan(prefix=b"acct-"))
            assert sum(int(v) for v in scanned.values()) == 600, scanned
        reads += 1
    transfers = [int(w.expect("done", timeout=60).split()[0]) for w in writers]
    assert sum(transfers) > 20, transfers  # the readers really overlapped committing batches
    assert reads > 20
    assert sum(int(v) for v in db.get_many(accounts)) == 600


COUNTER_SCRIPT = """
import sys, shardkv
directory, n = sys.argv[1], int(sys.argv[2])
a, b = bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
db = shardkv.open(directory)
print("ready", flush=True)
sys.stdin.readline()
acknowledged = conflicts = 0
while acknowledged < n:
    va, vb = db.get_many([a, b])
    new_a = b"1" if va is None else b"%d" % (int(va) + 1)
    new_b = b"1" if vb is None else b"%d" % (int(vb) + 1)
    try:
        with db.batch() as batch:
            batch.expect(a, va)
            batch.expect(b, vb)
            batch.put(a, new_a)
            batch.put(b, new_b)
        acknowledged += 1
    except shardkv.Conflict:
        conflicts += 1
print("done", acknowledged, conflicts, flush=True)
db.close()
"""


def test_concurrent_batches_with_preconditions_lose_no_increment(cluster):
    db = cluster.open()
    found = keys_by_shard(db, 1, b"counter-%d")
    a, b = found[0][0], found[1][0]
    per_process = 40
    procs = [cluster.spawn(COUNTER_SCRIPT, cluster.directory, per_process, a.hex(), b.hex()) for _ in range(3)]
    for p in procs:
        p.expect("ready")
    for p in procs:
        p.send("go")
    results = [p.expect("done", timeout=90).split() for p in procs]
    acknowledged = sum(int(r[0]) for r in results)
    assert acknowledged == 3 * per_process
    assert db.get_many([a, b]) == [b"%d" % acknowledged] * 2


# -- processes killed at the fault points ---------------------------------------------------------------
FAULT_POINTS = [
    "coordinator.prepare_sent",
    "coordinator.decision_logged",
    "coordinator.commit_sent",
    "worker.prepare_logged",
    "worker.voted",
    "shard.commit_logged",
]


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_batches_stay_atomic_when_a_process_dies_at_a_fault_point(cluster, monkeypatch, tmp_path, point):
    """Run cross-shard batches while the process owning `point` kills itself there (once);
    after the supervisor restarts it: every batch entirely applied or entirely absent, every
    acknowledged batch applied, nothing left locked or in doubt, verify clean."""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_FAULTS", f"{point}@5")
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open()
    batches = [spread(db, 6, b"b%d-" % i + b"%d") for i in range(14)]
    outcome = {}
    for i, keys in enumerate(batches):
        try:
            db.put_many({k: b"v%d" % i for k in keys})
            outcome[i] = "acknowledged"
        except shardkv.Unavailable:
            outcome[i] = "unknown"
    assert (state / f"{point}.fired").exists(), f"{point} was never reached"
    # Wait until every prepared batch is settled (the restarted process recovers, the
    # coordinator's sweep delivers or aborts), then check every key of every batch.
    wait_until(lambda: all(s["in_doubt"] == 0 for s in db.health()["shards"]), 30, message="no batch in doubt")
    for i, keys in enumerate(batches):
        values = db.get_many(keys)
        assert values in ([b"v%d" % i] * 6, [None] * 6), f"batch {i} partly applied: {values}"
        if outcome[i] == "acknowledged":
            assert values == [b"v%d" % i] * 6, f"acknowledged batch {i} lost"
    for keys in batches:  # nothing left locked: a write to every key goes through at once
        db.put_many({k: b"after" for k in keys})
    assert db.health()["status"] == "healthy"
    db.close()
    cluster.kill_supervisor()
    report = verify_store(cluster.directory)
    assert not report["problems"], report["problems"]


def test_undecided_batch_of_a_dead_coordinator_is_aborted_by_the_next(cluster, monkeypatch, tmp_path):
    """Presumed abort: the coordinator dies after some PREPAREs and before any decision; the
    participants that prepared are told to abort once it is back, and their keys are free."""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_FAULTS", "coordinator.prepare_sent@1")
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open()
    keys = spread(db, 4, b"u%d")
    with pytest.raises(shardkv.Unavailable):
        db.put_many({k: b"x" for k in keys})
    wait_until(lambda: all(s["in_doubt"] == 0 for s in db.health()["shards"]), 30, message="the prepared batch aborted")
    assert db.get_many(keys) == [None] * 4
    db.put_many({k: b"y" for k in keys})
    assert db.get_many(keys) == [b"y"] * 4


def test_clients_cannot_send_participant_messages_to_a_worker(cluster):
    from shardkv.ipc import messages as m

    db = cluster.open()
    for op in (m.PREPARE, m.COMMIT, m.ABORT):
        with pytest.raises(ValueError, match="only accepted from the coordinator"):
            cs.call(db, 0, bytes((op, 0)) + m.u64(7) + m.encode_ops([(m.OP_PUT, b"k", b"v")]), read=False)
    with pytest.raises(ValueError, match="coordinator"):
        cs.call(db, 0, bytes((m.PENDING, 0)), read=False)
    assert db.get(b"k") is None


def test_threads_sharing_a_client_run_batches_and_snapshot_reads(cluster):
    db = cluster.open()
    keys = spread(db, 4, b"t%d")
    db.put_many({k: b"0" for k in keys})
    errors = []

    def writer(n):
        try:
            for i in range(n):
                db.put_many({k: b"%d" % i for k in keys})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader(n):
        try:
            for _ in range(n):
                values = db.get_many(keys)
                assert len(set(values)) == 1, values
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(150,)), threading.Thread(target=reader, args=(300,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert db.get_many(keys) == [b"149"] * 4
    assert os.getpid() == cs.owner_pid(db)


# -- rounds: batches waiting together are prepared and committed together ----------------------
def _in_one_round(db, clients, batches: list[dict]) -> list:
    """Send batch i through clients[i] while the coordinator is stopped (SIGSTOP), so that they
    all wait in its ring, then let it go on: it finds them together. The errors raised."""
    coordinator = db.health()["coordinator"]["pid"]
    errors: list = []

    def send(client, batch):
        try:
            client.put_many(batch)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=pair) for pair in zip(clients, batches)]
    os.kill(coordinator, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        wait_until(lambda: db.cluster_view.waiting(db.shards) == len(batches), timeout=30, message="every batch waiting")
    finally:
        os.kill(coordinator, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_batches_waiting_together_run_as_one_round(cluster):
    db = cluster.open()
    clients = [cluster.open() for _ in range(5)]
    keys = spread(db, 30, b"round%d")
    batches = [{k: b"from %d" % i for k in keys[6 * i : 6 * i + 6]} for i in range(5)]
    assert all(len({db.shard_of(k) for k in batch}) == db.shards for batch in batches)
    assert _in_one_round(db, clients, batches) == []
    stats = coordinator_stats(db)
    assert (stats["largest_round"], stats["committed"], stats["ran_again"], stats["aborted"]) == (5, 5, 0, 0)
    for batch in batches:
        assert db.get_many(list(batch)) == list(batch.values())
    assert verify_store(cluster.directory)["ok"]


def test_batches_of_one_round_on_the_same_keys_commit_one_after_another(cluster):
    """The first batch of the round locks the keys; the others vote Busy there, are aborted and
    run again alone after the round, in order, each whole: none fails, and the keys end up
    all from the last. (A worker that scans its slots while the coordinator is still filling
    them may serve batch 1 before batch 0: then batch 0 loses too and runs again first.)"""
    db = cluster.open()
    clients = [cluster.open() for _ in range(4)]
    keys = spread(db, 6, b"same%d")
    db.put_many({k: b"before" for k in keys})
    batches = [{k: b"from %d" % i for k in keys} for i in range(4)]
    assert _in_one_round(db, clients, batches) == []
    stats = coordinator_stats(db)
    assert (stats["largest_round"], stats["committed"]) == (4, 1 + 4)
    assert stats["ran_again"] in (3, 4) and stats["aborted"] == stats["ran_again"], stats
    assert db.get_many(keys) == [b"from 3"] * len(keys)
    assert verify_store(cluster.directory)["ok"]


def test_a_round_at_durability_fsync_fsyncs_its_decisions_once(cluster):
    db = cluster.open()
    clients = [cluster.open(durability="fsync") for _ in range(4)]
    keys = spread(db, 16, b"durable%d")
    batches = [{k: b"d%d" % i for k in keys[4 * i : 4 * i + 4]} for i in range(4)]
    assert _in_one_round(db, clients, batches) == []
    stats = coordinator_stats(db)
    assert (stats["largest_round"], stats["committed"], stats["decision_fsyncs"]) == (4, 4, 1)
    db.put_many({k: b"not fsynced" for k in keys[:4]})  # durability "interval": no fsync asked
    assert coordinator_stats(db)["decision_fsyncs"] == 1
    clients[0].put_many({k: b"fsynced" for k in keys[:4]})
    assert coordinator_stats(db)["decision_fsyncs"] == 2
    for i, batch in enumerate(batches[1:], 1):
        assert db.get_many(list(batch)) == [b"d%d" % i] * 4


def test_a_failed_precondition_in_a_round_fails_that_batch_only(cluster):
    db = cluster.open()
    clients = [cluster.open() for _ in range(3)]
    keys = spread(db, 12, b"pre%d")
    checked = b"checked, in no batch"
    db.put(checked, b"old")
    errors = []

    def conflicting(client, batch):
        try:
            client.write([("expect", checked, b"not what it holds")] + [("put", k, v) for k, v in batch.items()])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    batches = [{k: b"ok" for k in keys[4 * i : 4 * i + 4]} for i in range(3)]
    clients[1].put_many = lambda batch, client=clients[1]: conflicting(client, batch)  # the middle one fails
    assert _in_one_round(db, clients, batches) == []
    assert len(errors) == 1 and isinstance(errors[0], shardkv.Conflict), errors
    assert db.get_many(keys[4:8]) == [None] * 4
    assert db.get_many(keys[:4]) == [b"ok"] * 4 and db.get_many(keys[8:]) == [b"ok"] * 4
    stats = coordinator_stats(db)
    assert (stats["largest_round"], stats["ran_again"], stats["aborted"]) == (3, 0, 1)


def test_a_corrupt_decision_log_quarantines_the_coordinator_only(cluster):
    from shardkv.coordinator.decisions import decisions_directory
    from shardkv.wal.format import COMMIT, KIND_DECISIONS
    from shardkv.wal.records import encode_record
    from shardkv.wal.segment import create_segment

    directory = decisions_directory(cluster.directory)
    os.makedirs(directory, mode=0o700)
    path = create_segment(directory, 1, KIND_DECISIONS, 0, 1 << 20)
    first = bytearray(encode_record(COMMIT, b"\x01" * 8, b"\x00\x00\x01\x00", 1))
    first[-1] ^= 0xFF  # a damaged record with an intact one after it: not a torn tail
    with open(path, "r+b") as f:
        f.seek(32)
        f.write(bytes(first) + encode_record(COMMIT, b"\x02" * 8, b"\x00\x00\x01\x00", 2))
    db = cluster.open()
    wait_until(lambda: db.health()["coordinator"]["state"] == "quarantined", 20, message="coordinator quarantined")
    keys = spread(db, 4, b"q%d")
    with pytest.raises(shardkv.CorruptionError, match="coordinator"):
        db.put_many({k: b"v" for k in keys})
    single = keys_by_shard(db, 2)[0]
    db.put_many({k: b"v" for k in single})  # one shard: no coordinator needed
    assert db.get_many(single) == [b"v", b"v"]
    report = verify_store(cluster.directory)
    assert any(path in problem and "offset 32" in problem for problem in report["problems"]), report
