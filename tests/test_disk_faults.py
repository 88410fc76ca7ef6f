"""Disk faults injected in the file layer (wal/fileio.py), no root needed: a full disk on
append, an I/O error on fsync, and a fault at the Nth file operation swept over a whole
workload (once, and from then on), including during recovery - the way SQLite tests I/O errors.

After every fault: nothing acknowledged is lost, no batch is half applied, reads go on, and
the shard opens again once the fault is gone.
"""

from __future__ import annotations

import errno
import os

import pytest

import shardkv
from shardkv.errors import StorageError
from shardkv.wal import fileio

from cluster_support import cluster_fixture, keys_by_shard, wait_until
from engine_support import crash, open_engine


class Injector:
    """Counts file operations; fails the chosen ones with OSError(code)."""

    def __init__(self, fail_at: int | None = None, persistent: bool = False, ops: tuple = (), code: int = errno.EIO):
        self.count = 0
        self.fail_at, self.persistent, self.ops, self.code = fail_at, persistent, ops, code
        self.fired = 0

    def __call__(self, op: str, target) -> None:
        if self.ops and op not in self.ops:
            return
        self.count += 1
        if self.fail_at is not None and (self.count == self.fail_at or (self.persistent and self.count > self.fail_at)):
            self.fired += 1
            raise OSError(self.code, f"{os.strerror(self.code)} (injected at {op} #{self.count})")


@pytest.fixture
def inject():
    """Install an Injector for the test; always removed afterwards."""
    installed = []

    def install(injector: Injector | None) -> Injector | None:
        fileio.set_injector(injector)
        installed.append(injector)
        return injector

    yield install
    fileio.set_injector(None)


# -- a full disk ---------------------------------------------------------------------------------------
@pytest.mark.engine
@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_full_disk_on_append_fails_the_write_and_nothing_else(tmp_path, inject, durability):
    e = open_engine(tmp_path, durability=durability)
    for i in range(50):
        e.put(b"k%02d" % i, b"v%d" % i)
    inject(Injector(fail_at=1, persistent=True, ops=("write",), code=errno.ENOSPC))
    with pytest.raises(StorageError, match="No space left"):
        e.put(b"new", b"x")
    with pytest.raises(StorageError):
        e.apply([("put", b"b1", b"1"), ("put", b"b2", b"2")])
    assert e.get(b"k07") == b"v7" and e.get(b"new") is None and len(e) == 50  # reads go on
    inject(None)  # space is back
    e.put(b"new", b"y")
    e.apply([("put", b"b1", b"1"), ("put", b"b2", b"2")])
    crash(e)
    with open_engine(tmp_path, durability=durability) as e:
        assert e.get(b"new") == b"y" and e.get_many([b"b1", b"b2"]) == [b"1", b"2"] and len(e) == 53


# -- a failed fsync ---------------------------------------------------------------------------------------
@pytest.mark.engine
def test_a_failed_fsync_is_never_reported_as_success(tmp_path, inject):
    e = open_engine(tmp_path, durability="fsync")
    for i in range(20):
        e.put(b"k%02d" % i, b"v")
    inject(Injector(fail_at=1, ops=("fsync",), code=errno.EIO))
    with pytest.raises(StorageError, match="fsync failed"):
        e.put(b"lost?", b"x")
    inject(None)
    # The page cache may hold what the disk never got: no later write is acknowledged by this
    # engine (its fsync would "succeed" on pages the kernel already gave up on).
    with pytest.raises(StorageError, match="reopen"):
        e.put(b"after", b"x")
    assert e.write_failure() is not None
    assert e.get(b"k05") == b"v"  # reads go on
    crash(e)
    with open_engine(tmp_path, durability="fsync") as e:  # recovery from the log
        assert all(e.get(b"k%02d" % i) == b"v" for i in range(20))
        e.put(b"after", b"y")
        assert e.get(b"after") == b"y"


# -- a fault at the Nth file operation, swept ---------------------------------------------------------
def operations() -> list:
    """The workload: (name, action(engine), writes, deletes); fresh keys in every write, so
    that each operation's effect can be checked on its own."""
    ops = []
    for i in range(12):
        key, value = b"single-%02d" % i, b"v%d" % i * 60
        ops.append((f"put {i}", lambda e, k=key, v=value: e.put(k, v), {key: value}, []))
    for i in range(4):
        writes = {b"batch-%d-%d" % (i, j): b"b%d" % j * 70 for j in range(5)}
        ops.append((f"batch {i}", lambda e, w=writes: e.apply([("put", k, v) for k, v in w.items()]), writes, []))
    ops.append(("delete", lambda e: e.delete(b"single-03"), {}, [b"single-03"]))
    ops.append(("prepare+commit", lambda e: (e.prepare(77, [("put", b"tx-a", b"A"), ("put", b"tx-b", b"B")]), e.commit(77)), {b"tx-a": b"A", b"tx-b": b"B"}, []))
    ops.append(("compact", lambda e: e.compact(), {}, []))
    for i in range(6):
        key = b"late-%d" % i
        ops.append((f"late {i}", lambda e, k=key: e.put(k, b"L" * 100), {key: b"L" * 100}, []))
    return ops


def run_with_fault(directory, injector, keep_going: bool = False) -> tuple[list, list]:
    """Run the workload with `injector` installed until an operation fails (with `keep_going`:
    to the end, the same engine going on after each failure); (the operations acknowledged,
    those that failed)."""
    acknowledged: list = []
    failed: list = []
    fileio.set_injector(injector)
    try:
        e = open_engine(directory, durability="fsync", segment_size=4096)
    except (OSError, StorageError):  # the open's own writes and fsyncs can fail too
        fileio.set_injector(None)
        return acknowledged, failed
    try:
        for op in operations():
            try:
                op[1](e)
            except (StorageError, OSError):
                failed.append(op)
                if not keep_going:
                    break
                continue
            acknowledged.append(op)
        return acknowledged, failed
    finally:
        fileio.set_injector(None)
        crash(e)


def check_recovered(directory, acknowledged, failed) -> None:
    """Every acknowledged operation's effect is there; each failed one's whole or absent."""
    with open_engine(directory, durability="fsync", segment_size=4096) as e:
        maybe = {key for op in failed for key in list(op[2]) + op[3]}
        for name, _, writes, deletes in acknowledged:
            for key, value in writes.items():
                if key not in maybe and not any(key in later[3] for later in acknowledged):
                    assert e.get(key) == value, f"acknowledged {name}: {key!r} lost"
            for key in deletes:
                assert e.get(key) is None, f"acknowledged {name}: {key!r} came back"
        for op in failed:
            if op[2]:
                values = e.get_many(list(op[2]))
                assert values in (list(op[2].values()), [None] * len(values)), f"{op[0]} half applied: {values}"
        tried = {op[0] for op in acknowledged + failed}
        for name, _, writes, _ in operations():  # nothing that was never run appears
            if name not in tried:
                assert e.get_many(list(writes)) == [None] * len(writes), f"{name} appeared without being run"
        assert e.prepared() in ([], [77])


def count_operations(tmp_path) -> int:
    counter = Injector()
    acknowledged, failed = run_with_fault(tmp_path / "count", counter)
    assert not failed and len(acknowledged) == len(operations())
    return counter.count


@pytest.mark.soak
@pytest.mark.parametrize("persistent, keep_going", [(False, False), (False, True), (True, False)], ids=["once", "once-then-go-on", "persistent"])
def test_a_fault_at_every_file_operation_of_a_workload(tmp_path, persistent, keep_going):
    total = count_operations(tmp_path)
    assert total > 60
    for n in range(1, total + 1):
        directory = tmp_path / f"run-{n}"
        injector = Injector(fail_at=n, persistent=persistent)
        acknowledged, failed = run_with_fault(directory, injector, keep_going)
        assert injector.fired, f"operation {n} of {total} was never reached"
        if not os.path.exists(directory / "LOCK"):
            continue  # the fault came before the shard existed
        check_recovered(directory, acknowledged, failed)
        # and again, after the first recovery (which may itself have repaired things)
        check_recovered(directory, acknowledged, failed)


@pytest.mark.engine
def test_a_fault_during_recovery_leaves_a_shard_that_opens_later(tmp_path):
    source = tmp_path / "source"
    acknowledged, failed = run_with_fault(source, Injector())
    assert not failed
    counter = Injector()
    fileio.set_injector(counter)
    try:
        with open_engine(source, durability="fsync", segment_size=4096):
            pass
    finally:
        fileio.set_injector(None)
    assert counter.count > 0
    import shutil

    for n in range(1, counter.count + 1):
        for persistent in (False, True):
            directory = tmp_path / f"recover-{n}-{persistent}"
            shutil.copytree(source, directory)
            fileio.set_injector(Injector(fail_at=n, persistent=persistent))
            try:
                with open_engine(directory, durability="fsync", segment_size=4096):
                    pass
            except (OSError, StorageError):
                pass
            finally:
                fileio.set_injector(None)
            check_recovered(directory, acknowledged, [])


# -- through the cluster ------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def test_a_worker_whose_fsync_failed_restarts_and_recovers(cluster, monkeypatch, tmp_path):
    """EIO on an fsync of a worker at durability "fsync": the write waiting for it fails with
    StorageError, the worker exits and is restarted, recovers its log, and serves again; every
    write acknowledged before is there."""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_DISK_FAULTS", "fsync:EIO@40")
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open(durability="fsync")
    acknowledged = {}
    failures = 0
    for i in range(120):
        key = b"k%03d" % i
        try:
            db.put(key, b"v%d" % i)
            acknowledged[key] = b"v%d" % i
        except (StorageError, shardkv.Unavailable):
            failures += 1
    assert (state / "disk-fsync.fired").exists()
    assert failures >= 1
    wait_until(lambda: db.health()["status"] == "healthy", 30, message="the worker back up")
    assert sum(s["restarts"] for s in db.health()["shards"]) >= 1
    assert db.get_many(list(acknowledged)) == list(acknowledged.values())
    db.put(b"after", b"ok")
    assert db.get(b"after") == b"ok"


def test_a_coordinator_whose_decision_fsync_failed_restarts_and_batches_stay_whole(cluster, monkeypatch, tmp_path):
    """EIO on an fsync of the coordinator's decision log (durability "fsync"): the batches
    whose decision it was to make durable are answered Unavailable (outcome unknown), the
    coordinator exits and is restarted, reads its log back and settles each of them all or
    nothing; cross-shard batches go through again. (Before, it kept running with a log that
    refused every later write: every cross-shard batch failed until the cluster restarted.)"""
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.setenv("SHARDKV_DISK_FAULTS", "coordinator/fsync:EIO@4")
    monkeypatch.setenv("SHARDKV_FAULTS_STATE", str(state))
    db = cluster.open(durability="fsync")
    found = keys_by_shard(db, 40, b"decided-%d")
    batches = [{found[0][i]: b"v%d" % i, found[1][i]: b"v%d" % i} for i in range(40)]
    outcome = {}
    for i, batch in enumerate(batches):
        try:
            db.put_many(batch)
            outcome[i] = "acknowledged"
        except (shardkv.Unavailable, StorageError):
            outcome[i] = "unknown"
    assert (state / "disk-fsync.fired").exists()
    assert "unknown" in outcome.values()
    wait_until(lambda: db.health()["status"] == "healthy", 30, message="the coordinator back up")
    assert db.health()["coordinator"]["restarts"] >= 1
    with open(os.path.join(cluster.directory, "logs", "supervisor.log")) as f:
        assert "exit code 66" in f.read()  # EXIT_STORAGE: it stopped by itself, it did not crash
    for i, batch in enumerate(batches):
        values = db.get_many(list(batch))
        assert values in ([b"v%d" % i] * 2, [None] * 2), f"batch {i} half applied: {values}"
        if outcome[i] == "acknowledged":
            assert values == [b"v%d" % i] * 2, f"acknowledged batch {i} lost"
    db.put_many({found[0][0]: b"after", found[1][0]: b"after"})
    assert db.get_many([found[0][0], found[1][0]]) == [b"after", b"after"]


# -- a sector of zeros inside a sealed segment ---------------------------------------------------------------
@pytest.mark.engine
def test_a_zeroed_sector_in_a_sealed_segment_is_found_by_open_and_verify(tmp_path):
    from shardkv.errors import CorruptionError
    from shardkv.ops.verify import verify_store

    from engine_support import segment_numbers, segment_path

    e = open_engine(tmp_path, segment_size=1 << 14)
    for i in range(400):
        e.put(b"k%03d" % i, b"v" * 90)
    e.close()
    sealed = segment_numbers(tmp_path)[0]
    path = segment_path(tmp_path, sealed)
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(bytes(512))  # a sector the disk lost, in the middle of fsynced data
    # With the segment's hint, open does not read the segment: every read checks its record's
    # CRC, so the first read of a damaged record names file and offset.
    with open_engine(tmp_path, segment_size=1 << 14) as e:
        damaged = []
        for i in range(400):
            try:
                e.get(b"k%03d" % i)
            except CorruptionError as exc:
                damaged.append(str(exc))
        assert damaged and all(path in message and "offset" in message for message in damaged)
    os.unlink(str(path)[: -len(".log")] + ".hint")  # now open reads the segment itself
    report = verify_store(str(tmp_path))
    assert any(path in problem and "offset" in problem for problem in report["problems"]), report
    with pytest.raises(CorruptionError) as info:
        open_engine(tmp_path, segment_size=1 << 14)
    assert path in str(info.value) and "offset" in str(info.value)
