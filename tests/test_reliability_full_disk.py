"""A full disk fails every write path with StorageError at once (issue #19, item 6).

Before the fix, a cross-shard batch whose PREPARE met ENOSPC was answered Busy by the
coordinator; the client retried it as "locked" for its whole lock timeout (10 s) and then
raised Busy, while single puts and single-shard batches raised StorageError at once.

The disk is made full through the file layer (shardkv/faults.py, `write:ENOSPC@while=PATH`: every
write of the chosen processes fails while PATH exists) and freed by deleting PATH. Covered here:
- the shard workers' disk full: put, delete, cas, expire, a single-shard batch, cross-shard
  batches (with and without preconditions) all raise StorageError within 2 s; reads go on;
  nothing is left prepared; once space is back every kind of write works, everything
  acknowledged is there and nothing that failed was applied;
- the coordinator's disk full (its decision log cannot take the COMMIT): the batch raises
  StorageError at once, is applied nowhere, and its participants' locks are released;
- in one engine: an ABORT that cannot be logged (the disk filled between PREPARE and ABORT)
  still releases the batch's locks, and the PREPARE left undecided in the log is aborted on
  recovery as presumed abort prescribes.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

import shardkv
from shardkv.errors import StorageError
from shardkv.wal import fileio

from cluster_support import cluster_fixture, keys_by_shard, wait_until
from engine_support import crash, open_engine

PROMPT = 2.0  # seconds within which a write on a full disk must fail


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def fails_promptly(action) -> float:
    """Run `action`, which must raise StorageError within PROMPT seconds; return how long it took."""
    started = time.monotonic()
    with pytest.raises(StorageError):
        action()
    took = time.monotonic() - started
    assert took < PROMPT, f"StorageError came after {took:.1f} s"
    return took


def nothing_in_doubt(db) -> bool:
    return all(s["in_doubt"] == 0 for s in db.health()["shards"])


def test_a_full_disk_fails_every_write_path_at_once_and_writes_resume_once_freed(cluster, monkeypatch, tmp_path):
    full = tmp_path / "disk-is-full"
    monkeypatch.setenv("SHARDKV_DISK_FAULTS", f"worker/write:ENOSPC@while={full}")
    db = cluster.open()
    found = keys_by_shard(db, 20, b"acct-%d")
    a, b = found[0], found[1]
    acknowledged = {a[0]: b"a0", b[0]: b"b0", a[1]: b"a1", b[1]: b"b1"}
    db.put_many({a[0]: b"a0", b[0]: b"b0"})
    db.put(a[1], b"a1")
    db.put(b[1], b"b1")
    full.touch()
    attempts = {
        "put": lambda: db.put(a[2], b"x"),
        "put with ttl": lambda: db.put(a[2], b"x", ttl=60),
        "delete": lambda: db.delete(a[1]),
        "cas": lambda: db.cas(a[1], b"a1", b"changed"),
        "expire": lambda: db.expire(a[1], 30),
        "single-shard batch": lambda: db.put_many({a[3]: b"x", a[4]: b"y"}),
        "cross-shard batch": lambda: db.put_many({a[5]: b"x", b[5]: b"y"}),
        "cross-shard batch with a precondition": lambda: db.write([("put", a[6], b"x"), ("put", b[6], b"y"), ("expect", a[0], b"a0")]),
        "cross-shard delete": lambda: db.write([("delete", a[0]), ("delete", b[0])]),
    }
    took = {name: fails_promptly(action) for name, action in attempts.items()}
    assert db.get_many(list(acknowledged)) == list(acknowledged.values())  # reads go on
    assert nothing_in_doubt(db)
    full.unlink()  # space is back
    db.put(a[2], b"after")
    db.put_many({a[5]: b"x", b[5]: b"y"})
    db.write([("put", a[6], b"x"), ("put", b[6], b"y"), ("expect", a[0], b"a0")])
    db.put_many({a[3]: b"x", a[4]: b"y"})
    assert db.delete(a[1]) and db.cas(a[2], b"after", b"cas") and db.expire(b[1], 60)
    assert db.get_many([a[0], b[0], a[1], b[1], a[2], a[3], a[4], a[5], b[5], a[6], b[6]]) == [b"a0", b"b0", None, b"b1", b"cas", b"x", b"y", b"x", b"y", b"x", b"y"]
    assert [db.get(a[k]) for k in range(7, 20)] == [None] * 13
    assert nothing_in_doubt(db)
    db.close()
    cluster.kill_supervisor()  # and after a restart: nothing lost, nothing failed applied
    db = cluster.open()
    assert db.get_many([a[0], b[0], a[1], b[1], a[5], b[5]]) == [b"a0", b"b0", None, b"b1", b"x", b"y"]
    assert len(db) == 10, took


def test_a_full_disk_under_the_coordinator_fails_cross_shard_batches_at_once(cluster, monkeypatch, tmp_path):
    full = tmp_path / "disk-is-full"
    monkeypatch.setenv("SHARDKV_DISK_FAULTS", f"coordinator/write:ENOSPC@while={full}")
    db = cluster.open()
    found = keys_by_shard(db, 4, b"k-%d")
    a, b = found[0], found[1]
    db.put_many({a[0]: b"1", b[0]: b"1"})
    full.touch()
    fails_promptly(lambda: db.put_many({a[1]: b"2", b[1]: b"2"}))
    fails_promptly(lambda: db.write([("put", a[2], b"3"), ("delete", b[0])]))
    assert db.get_many([a[1], b[1], a[2], b[0]]) == [None, None, None, b"1"]  # applied nowhere
    wait_until(lambda: nothing_in_doubt(db), 10, message="the participants' locks released")
    db.put(a[1], b"single puts do not touch the decision log")
    full.unlink()
    db.put_many({a[3]: b"4", b[3]: b"4"})
    assert db.get_many([a[3], b[3], a[1]]) == [b"4", b"4", b"single puts do not touch the decision log"]


# -- in one engine -----------------------------------------------------------------------------------
class FullDisk:
    """A fileio injector: every write fails with ENOSPC while `full` is True."""

    def __init__(self):
        self.full = False

    def __call__(self, op: str, target) -> None:
        if self.full and op == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk():
    injector = FullDisk()
    fileio.set_injector(injector)
    yield injector
    fileio.set_injector(None)


@pytest.mark.engine
@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_an_abort_that_cannot_be_logged_still_releases_the_locks(tmp_path, disk, durability):
    e = open_engine(tmp_path, durability=durability)
    e.put(b"k", b"before")
    e.prepare(5, [("put", b"k", b"in the batch"), ("put", b"other", b"x")])
    disk.full = True  # the other participant's PREPARE failed; so does this ABORT's record
    assert e.abort(5) is True
    assert e.prepared() == [] and not e.locked(b"k")
    with pytest.raises(StorageError):
        e.put(b"k", b"a full disk, not a lock")  # StorageError, not Busy
    disk.full = False
    e.put(b"k", b"after")
    assert e.get(b"k") == b"after" and e.get(b"other") is None
    crash(e)
    with open_engine(tmp_path, durability=durability) as e:
        # The PREPARE is in the log with no decision: undecided until its coordinator, which
        # has no COMMIT for it, aborts it (presumed abort).
        assert e.prepared() == [5]
        assert e.abort(5) is True
        assert e.get(b"k") == b"after" and e.get(b"other") is None


@pytest.mark.engine
def test_a_commit_the_disk_refuses_keeps_its_locks_and_writes_to_them_fail_storage_error(tmp_path, disk):
    """The disk filled between PREPARE and COMMIT: the batch is decided, so it keeps its keys
    until the COMMIT is logged; meanwhile a write to one of them fails StorageError at once
    (not Busy, which a client retries for its whole lock timeout)."""
    e = open_engine(tmp_path)
    e.prepare(9, [("put", b"held", b"committed value")])
    disk.full = True
    with pytest.raises(StorageError):
        e.commit(9)
    assert e.prepared() == [9] and e.locked(b"held")
    with pytest.raises(StorageError, match="committed cross-shard batch"):
        e.put(b"held", b"x")
    with pytest.raises(StorageError, match="committed cross-shard batch"):
        e.prepare(10, [("put", b"held", b"y")])
    disk.full = False  # the coordinator delivers the COMMIT again (its sweep, every 0.25 s)
    assert e.commit(9) is True
    assert e.get(b"held") == b"committed value" and not e.locked(b"held")
    e.put(b"held", b"later")
    crash(e)
    with open_engine(tmp_path) as e:
        assert e.get(b"held") == b"later" and e.prepared() == []


@pytest.mark.unit
def test_what_a_client_is_told_when_a_batch_could_not_prepare():
    """The coordinator's mapping of PREPARE failures: an error that retrying cannot cure goes
    to the client as it is; only locks and unreachable workers become Busy (retried)."""
    from shardkv.coordinator.coordinator import WorkerUnavailable, _prepare_error

    storage, busy, conflict = StorageError("disk full"), shardkv.Busy("locked"), shardkv.Conflict("no")
    corrupt, gone = shardkv.CorruptionError("bad record"), WorkerUnavailable("restarting")
    assert _prepare_error([busy, storage]) is storage
    assert _prepare_error([storage, conflict]) is conflict  # a failed precondition says more
    assert _prepare_error([gone, corrupt]) is corrupt
    assert type(_prepare_error([busy, gone])) is shardkv.Busy
