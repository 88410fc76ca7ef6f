"""The shared index in one process: an engine publishing through an IndexPublisher and an
IndexReader answering from the shared table and the segment files (docs/IPC.md, "Shared index").

The reader must agree with a dict model after every operation (puts, overwrites, deletes, expiry,
segment rolls, index resizes, compactions), must never answer from a state that is changing
(threads race a writer and a compactor against it), and must fall back to the worker - never
answer - when the shard is not serving, is locked, or a record is damaged.
"""

import os
import random
import sys
import threading
import time
import uuid

import posix_ipc
import pytest
from crc32c import crc32c

from shardkv.errors import CorruptionError
from shardkv.ipc.sharedindex import (
    FALLBACK,
    SERVING,
    SUPPORTED,
    IndexPublisher,
    IndexReader,
    create_header,
    header_name,
    mark_not_serving,
)
from shardkv.shards.engine import ShardEngine

from clock_support import FakeClock
from engine_support import holds_write_lock, index_header, key_index, prepared_locks, store

pytestmark = [pytest.mark.engine, pytest.mark.skipif(not SUPPORTED, reason="direct reads are x86-64 only (docs/IPC.md)")]


class Shard:
    """An engine with a shared index under unique names, and a reader of it."""

    def __init__(self, directory, segment_size=4096, clock=time.time):
        self.prefix = f"/shardkv-test-{uuid.uuid4().hex[:12]}"
        self.header = create_header(header_name(self.prefix, 0))
        self.directory = str(directory)
        self.segment_size = segment_size
        self.clock = clock  # the engine's and the reader's
        self.open()

    def open(self):
        self.publisher = IndexPublisher(self.prefix, 0)
        self.engine = ShardEngine.open(self.directory, durability="process", segment_size=self.segment_size, shared_index=self.publisher, clock=self.clock)
        self.publisher.set_state(SERVING)
        self.reader = IndexReader(self.prefix, 0, self.directory, clock=self.clock)

    def reopen(self):
        self.publisher.close()
        self.engine.close()
        self.reader.close()
        self.open()

    def read(self, key: bytes):
        return self.reader.get(key, crc32c(key))

    def shm_entries(self):
        stem = self.prefix[1:]
        return sorted(e for e in os.listdir("/dev/shm") if e.startswith(stem))

    def close(self):
        self.publisher.close()
        self.engine.close()
        self.reader.close()
        posix_ipc.unlink_shared_memory(header_name(self.prefix, 0))


@pytest.fixture
def shard(tmp_path):
    s = Shard(tmp_path / "shard")
    yield s
    s.close()
    assert s.shm_entries() == [], "shared memory left behind"


def check_all(shard, model, keys):
    for key in keys:
        got = shard.read(key)
        assert got is not FALLBACK, f"a quiescent shard fell back for {key!r}"
        assert got == model.get(key), key


@pytest.mark.parametrize("seed", range(4))
def test_reader_agrees_with_a_model_through_rolls_resizes_and_compactions(shard, seed):
    rng = random.Random(seed)
    keys = [b"key-%d" % i for i in range(300)]
    model = {}
    for step in range(1500):
        key = rng.choice(keys)
        action = rng.random()
        if action < 0.6:
            value = rng.randbytes(rng.choice((0, 1, 10, 100, 700, 3000)))
            shard.engine.put(key, value)
            model[key] = value
        elif action < 0.75:
            assert shard.engine.delete(key) == (key in model)
            model.pop(key, None)
        elif action < 0.85:
            batch = {rng.choice(keys): rng.randbytes(rng.randrange(50)) for _ in range(rng.randrange(1, 20))}
            shard.engine.apply([("put", k, v) for k, v in batch.items()])
            model.update(batch)
        elif action < 0.86:
            shard.engine.compact()
        elif action < 0.865:
            shard.reopen()
        if step % 50 == 0:
            check_all(shard, model, keys)
        else:
            got = shard.read(key)
            assert got is not FALLBACK and got == model.get(key)
    check_all(shard, model, keys)
    assert len(shard.engine.segments()) > 2, "the test should span several segments"


def test_growing_index_publishes_new_tables_and_unlinks_old_ones(shard):
    first = shard.reader._table
    values = {b"grow-%d" % i: b"v%d" % i for i in range(20000)}
    for key, value in values.items():
        shard.engine.put(key, value)
    tables = [e for e in shard.shm_entries() if e.count("-idx0-")]
    assert len(tables) == 1, f"exactly one live table, not {tables}"
    for key, value in list(values.items())[::97]:
        assert shard.read(key) == value
    assert shard.reader._table is not first and shard.reader._table[0] > (first[0] if first else 0)


def test_locked_or_not_serving_shard_falls_back(shard):
    shard.engine.put(b"k", b"v")
    assert shard.read(b"k") == b"v"
    shard.publisher.set_locked(1)
    assert shard.read(b"k") is FALLBACK
    assert shard.read(b"absent") is FALLBACK, "even an absent key: it may be in a prepared batch"
    shard.publisher.set_locked(0)
    assert shard.read(b"k") == b"v"
    mark_not_serving(shard.header)
    assert shard.read(b"k") is FALLBACK


def test_prepared_batch_locks_reads_through_the_worker_in_a_cluster_like_sequence(shard):
    """The worker publishes the lock count after PREPARE and after COMMIT (shards/worker.py);
    here the same calls in sequence, with the engine's own lock set as the source."""
    shard.engine.put(b"a", b"old")
    shard.engine.prepare(7, [("put", b"a", b"new")])
    shard.publisher.set_locked(prepared_locks(shard.engine))
    assert shard.read(b"a") is FALLBACK
    shard.engine.commit(7)
    shard.publisher.set_locked(prepared_locks(shard.engine))
    assert shard.read(b"a") == b"new"


def test_expired_keys_read_as_absent(tmp_path):
    """The reader judges expiry by its clock, the engine's: a key reads as absent from the
    instant its ttl ran out (a fake clock years behind the real one: a reader that looked at
    the real clock would see every key expired at once)."""
    clock = FakeClock()
    shard = Shard(tmp_path / "shard", clock=clock)
    try:
        shard.engine.put(b"short", b"x", ttl=5)
        shard.engine.put(b"long", b"y", ttl=1000)
        assert shard.read(b"short") == b"x"
        clock.advance(4)
        assert shard.read(b"short") == b"x"
        clock.advance(1)
        assert shard.read(b"short") is None, "still read one ttl after the write"
        assert shard.read(b"long") == b"y"
    finally:
        shard.close()
    assert shard.shm_entries() == [], "shared memory left behind"


def test_damaged_record_falls_back_and_the_engine_reports_it(shard):
    shard.engine.put(b"victim", b"v" * 200)
    for i in range(100):  # roll the victim's segment into a sealed one
        shard.engine.put(b"filler-%d" % i, b"f" * 100)
    index = key_index(shard.engine)
    location = index.locations[index.find(b"victim", crc32c(b"victim"))]
    segment, offset = int(location) >> 32, int(location) & 0xFFFFFFFF
    assert segment != shard.engine.log_position()[0]
    path = shard.engine.segments()[segment]
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"X", offset + 40 + len(b"victim") + 10)  # one byte of the value
    finally:
        os.close(fd)
    assert shard.read(b"victim") is FALLBACK, "a damaged record is never answered directly"
    with pytest.raises(CorruptionError):
        shard.engine.get(b"victim")


def test_reader_mapping_of_the_header_is_read_only(shard):
    with pytest.raises(TypeError):
        shard.reader._header[8:16] = b"\x00" * 8


def test_concurrent_writer_and_compactor_never_show_a_torn_or_older_value(tmp_path):
    """A writer thread bumps counters (new values grow and shrink in size so entries are
    rewritten in place and relocated), a compactor thread compacts, the main thread reads:
    every answer is a value that was written, and per key never older than one seen before."""
    shard = Shard(tmp_path / "race", segment_size=16384)
    keys = [b"c-%d" % i for i in range(50)]
    for key in keys:
        shard.engine.put(key, b"0:")
    stop = threading.Event()
    errors = []

    def write():
        n = 0
        rng = random.Random(1)
        while not stop.is_set():
            n += 1
            key = rng.choice(keys)
            shard.engine.put(key, b"%d:" % n + b"p" * rng.randrange(0, 300))
            if n % 7 == 0:
                shard.engine.delete(rng.choice(keys[40:]))

    def compact():
        while not stop.is_set():
            try:
                shard.engine.compact()
            except Exception as exc:  # reported below
                errors.append(exc)
            time.sleep(0.01)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings of reads and writes
    threads = [threading.Thread(target=write), threading.Thread(target=compact)]
    for t in threads:
        t.start()
    seen = {}
    answered = fallbacks = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            key = random.choice(keys)
            got = shard.read(key)
            if got is FALLBACK:
                fallbacks += 1
                continue
            answered += 1
            if got is None:
                assert key in keys[40:], f"{key!r} was never deleted"
                continue
            counter, _, padding = got.partition(b":")
            assert padding == b"p" * len(padding), f"torn value {got[:40]!r}"
            if key not in keys[40:]:
                assert int(counter) >= seen.get(key, 0), f"{key!r} went back from {seen[key]} to {counter}"
                seen[key] = int(counter)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old_interval)
    assert not errors, errors
    assert answered > 1000 and answered > fallbacks, (answered, fallbacks)
    shard.close()


def test_close_stops_serving_and_unlinks_the_table(tmp_path):
    shard = Shard(tmp_path / "close")
    shard.engine.put(b"k", b"v")
    assert any("-idx0-" in e for e in shard.shm_entries())
    shard.publisher.close()
    assert shard.read(b"k") is FALLBACK
    assert [e for e in shard.shm_entries() if "-idx0-" in e] == []
    shard.engine.close()
    shard.reader.close()
    posix_ipc.unlink_shared_memory(header_name(shard.prefix, 0))


def test_a_read_during_a_change_is_never_answered(shard):
    """While the version is odd the table may be half-changed (here: the key's slot emptied,
    as in the middle of a backward-shift deletion): the reader must not answer "absent"."""
    shard.engine.put(b"k", b"v")
    index = key_index(shard.engine)
    slot = next(i for i in range(len(index.slots)) if index.slots[i] and index.slots[i] - 1 == index.find(b"k", crc32c(b"k")))
    header = index_header(shard.engine)
    header.bump()  # a change begins
    saved, index.slots[slot] = index.slots[slot], 0
    assert shard.read(b"k") is FALLBACK
    index.slots[slot] = saved
    header.bump()
    assert shard.read(b"k") == b"v"


def test_get_many_reads_one_instant_and_ignores_locks(shard):
    """get_many runs inside a snapshot of cross-shard commits (client.py), so a prepared batch's
    locks do not stop it; it answers for every key at once or falls back."""
    for i in range(50):
        shard.engine.put(b"m-%d" % i, b"v-%d" % i)
    shard.engine.delete(b"m-3")
    keys = [b"m-%d" % i for i in range(55)]
    expected = [None if i == 3 or i >= 50 else b"v-%d" % i for i in range(55)]
    assert shard.reader.get_many(keys, [crc32c(k) for k in keys]) == expected
    shard.publisher.set_locked(2)
    assert shard.reader.get_many(keys, [crc32c(k) for k in keys]) == expected
    assert shard.read(b"m-1") is FALLBACK
    mark_not_serving(shard.header)
    assert shard.reader.get_many(keys, [crc32c(k) for k in keys]) is FALLBACK


def test_an_answer_is_dropped_when_the_version_moved_during_the_read(shard, monkeypatch):
    shard.engine.put(b"k", b"v")
    real_find = shard.reader._find
    calls = []

    def racing_find(*args):
        calls.append(1)
        if len(calls) == 1:
            index_header(shard.engine).bump()  # a whole change went by while this read ran
            index_header(shard.engine).bump()
            return b"stale"
        return real_find(*args)

    monkeypatch.setattr(shard.reader, "_find", racing_find)
    assert shard.read(b"k") == b"v"
    assert len(calls) == 2


def test_mappings_of_compacted_segments_are_dropped(shard):
    for round_ in range(3):
        for i in range(200):
            shard.engine.put(b"key-%d" % i, b"round-%d-" % round_ + b"x" * 50)
    for i in range(200):
        assert shard.read(b"key-%d" % i) == b"round-2-" + b"x" * 50
    before = set(shard.reader._segments[1])
    assert before, "reads went through sealed segments"
    shard.engine.compact()
    for i in range(200):
        assert shard.read(b"key-%d" % i) == b"round-2-" + b"x" * 50
    mapped = set(shard.reader._segments[1])
    assert mapped <= set(shard.engine.segments()), "a mapping of a deleted segment was kept"
    assert not (mapped & before - set(shard.engine.segments()))


def test_a_batch_answered_before_it_is_indexed_is_never_read_half_done(shard):
    """apply_deferred / commit_deferred (a worker answers a big batch once logged): until the
    returned function has indexed it, direct reads of that shard fall back to the worker (the
    version is odd) and the engine's lock is held; then every key reads its new value."""
    engine = shard.engine
    engine.apply([("put", b"k%04d" % i, b"old") for i in range(100)])
    finish = engine.apply_deferred([("put", b"k%04d" % i, b"new") for i in range(100)])
    assert finish is not None
    try:
        assert holds_write_lock(engine)
        seen = [shard.read(b"k0000"), shard.read(b"k0099"), shard.read(b"absent")]
    finally:
        finish()  # (also when an assertion failed: the fixture's close needs the lock)
    assert seen == [FALLBACK] * 3
    assert not holds_write_lock(engine)
    assert [shard.read(b"k%04d" % i) for i in range(100)] == [b"new"] * 100
    engine.prepare(9, [("put", b"t%04d" % i, b"tx") for i in range(100)])
    assert engine.commit_deferred(10) == (False, None)  # not prepared here: nothing to do
    settled, finish = engine.commit_deferred(9)
    assert finish is not None
    try:
        seen = shard.read(b"t0000")
    finally:
        finish()
    assert settled and seen is FALLBACK
    assert shard.read(b"t0050") == b"tx" and not holds_write_lock(engine)


def _applied_at_once(finish) -> bool:
    """Whether apply_deferred applied the batch before returning; if not, index it now (a
    failing test must not leave the engine's lock held: closing would wait for it)."""
    if finish is None:
        return True
    finish()
    return False


def test_batches_that_are_not_answered_early(tmp_path, shard):
    """Small batches, batches with preconditions, and any batch at durability "fsync" are
    applied (and indexed) before apply_deferred returns; one that fails takes no lock."""
    from shardkv.errors import Busy, Conflict

    engine = shard.engine
    assert _applied_at_once(engine.apply_deferred([("put", b"small%d" % i, b"v") for i in range(10)]))
    assert shard.read(b"small9") == b"v" and not holds_write_lock(engine)
    assert _applied_at_once(engine.apply_deferred([("put", b"x%03d" % i, b"v") for i in range(100)], [(b"small0", b"v")]))
    assert shard.read(b"x099") == b"v"
    with pytest.raises(Conflict):
        engine.apply_deferred([("put", b"y%03d" % i, b"v") for i in range(100)], [(b"small0", b"other")])
    engine.prepare(3, [("put", b"locked", b"v")])
    with pytest.raises(Busy):
        engine.apply_deferred([("put", b"z%03d" % i, b"v") for i in range(100)] + [("put", b"locked", b"w")])
    assert not holds_write_lock(engine) and shard.read(b"z000") is None
    with ShardEngine.open(str(tmp_path / "fsync"), durability="fsync") as synced:
        assert _applied_at_once(synced.apply_deferred([("put", b"f%03d" % i, b"v") for i in range(100)]))
        assert synced.get(b"f099") == b"v"


@pytest.mark.parametrize("failing", ["index", "record_table"])
@pytest.mark.parametrize("deferred", [True, False], ids=["answered-early", "answered-after"])
def test_an_index_that_fails_to_take_a_logged_batch_stops_the_engine_until_reopened(tmp_path, deferred, failing):
    """If indexing a logged batch fails (MemoryError from the key index, or from the active
    segment's record table, which the hint is written from), the index no longer matches the
    log: the engine reports a write failure, refuses writes and compactions, closes without a
    hint for the active segment, and a reopen recovers the batch from the log. A small COMMIT
    refused this way stays prepared (retryable)."""
    from shardkv.errors import StorageError

    path = str(tmp_path / "e")
    batch = [("put", b"b%04d" % i, b"new") for i in range(100)]
    with ShardEngine.open(path, durability="process") as engine:
        engine.apply([("put", b"b%04d" % i, b"old") for i in range(100)])
        engine.prepare(4, [("put", b"tx", b"committed")])

        def fail(*args, **kwargs):
            raise MemoryError("test")

        if failing == "index":
            key_index(engine).upsert_many = fail
        else:
            store(engine).active_records.add_batch = fail
        if deferred:
            finish = engine.apply_deferred(batch)
            assert finish is not None
            with pytest.raises(MemoryError):
                finish()
        else:
            with pytest.raises(MemoryError):
                engine.apply(batch)
        assert not holds_write_lock(engine) and index_header(engine).version % 2 == 0
        assert "index failed" in engine.write_failure()
        with pytest.raises(StorageError):
            engine.put(b"later", b"x")
        with pytest.raises(StorageError):
            engine.commit(4)
        assert engine.prepared() == [4]
        with pytest.raises(StorageError):
            engine.compact()
    with ShardEngine.open(path, durability="process") as engine:
        assert engine.write_failure() is None
        assert [engine.get(b"b%04d" % i) for i in range(100)] == [b"new"] * 100
        assert engine.get(b"later") is None and engine.prepared() == [4]
        assert engine.commit(4) and engine.get(b"tx") == b"committed"
