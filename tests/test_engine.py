"""ShardEngine's API: basic behaviour, argument checking, lifecycle, permissions, concurrency."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from crc32c import crc32c

import shardkv
from shardkv.limits import MAX_KEY_LEN
from shardkv.shards import DirectoryLocked, ShardEngine
from shardkv.wal import fileio

from engine_support import assert_matches, crash, log_writer, open_engine, segment_numbers

pytestmark = pytest.mark.engine

BAD_TYPES = ["str", 5, None, [b"a"], 1.5, object()]


@pytest.fixture
def engine(tmp_path):
    e = open_engine(tmp_path / "shard")
    yield e
    e.close()


# -- basics ------------------------------------------------------------------------------------
def test_basic_operations(engine):
    assert engine.get(b"k") is None
    assert engine.get(b"k", b"dflt") == b"dflt"
    assert b"k" not in engine and len(engine) == 0
    assert engine.min() is None and engine.max() is None
    assert engine.above(b"a") is None and engine.below(b"a") is None
    engine.put(b"k", b"v")
    assert engine.get(b"k") == b"v" and b"k" in engine and len(engine) == 1
    engine.put(b"k", b"w")
    assert engine.get(b"k") == b"w" and len(engine) == 1
    assert engine.delete(b"k") is True
    assert engine.delete(b"k") is False
    assert engine.get(b"k") is None and len(engine) == 0


def test_empty_value_is_present(engine):
    engine.put(b"k", b"")
    assert engine.get(b"k") == b""
    assert engine.get(b"k", b"dflt") == b""
    assert b"k" in engine
    assert engine.cas(b"k", None, b"x") is False  # present (with an empty value), not absent
    assert engine.cas(b"k", b"", b"x") is True
    assert engine.get(b"k") == b"x"


def test_cas(engine):
    assert engine.cas(b"k", b"v", b"w") is False  # absent, expected a value
    assert engine.get(b"k") is None
    assert engine.cas(b"k", None, None) is True  # absent and stays absent
    assert engine.cas(b"k", None, b"v1") is True
    assert engine.cas(b"k", None, b"v2") is False
    assert engine.cas(b"k", b"other", b"v2") is False
    assert engine.get(b"k") == b"v1"
    assert engine.cas(b"k", bytearray(b"v1"), memoryview(b"v2")) is True
    assert engine.get(b"k") == b"v2"
    assert engine.cas(b"k", b"v1", None) is False
    assert engine.cas(b"k", b"v2", None) is True
    assert engine.get(b"k") is None and len(engine) == 0


def test_apply_is_ordered_and_later_ops_win(engine):
    engine.put(b"gone", b"1")
    engine.apply(
        [
            ("put", b"a", b"1"),
            ("put", b"a", b"2"),
            ("delete", b"gone"),
            ["put", b"b", b"x"],
            ("delete", b"b"),
            ("put", b"c", b"3"),
            ("delete", b"never-there"),
        ]
    )
    assert_matches(engine, {b"a": b"2", b"c": b"3"})
    engine.apply([])  # an empty batch is a no-op
    engine.apply(iter([("put", b"d", b"4")]))  # any iterable of ops
    assert engine.get(b"d") == b"4"


def test_bytes_like_keys_and_values(engine):
    engine.put(bytearray(b"ba"), memoryview(b"mv"))
    engine.put(memoryview(b"mk"), bytearray(b"bv"))
    engine.apply([("put", bytearray(b"x"), memoryview(b"1")), ("delete", memoryview(b"ba"))])
    assert engine.get(memoryview(b"mk")) == b"bv"
    assert engine.get(bytearray(b"x")) == b"1"
    assert engine.get(b"ba") is None
    assert type(engine.get(b"mk")) is bytes
    assert list(engine.scan(start=bytearray(b"a"), stop=memoryview(b"z"))) == [(b"mk", b"bv"), (b"x", b"1")]
    assert engine.above(bytearray(b"mk")) == (b"x", b"1")
    assert engine.below(memoryview(b"x")) == (b"mk", b"bv")
    assert engine.delete(bytearray(b"x")) is True


def test_scan_bounds_prefix_limit_reverse(engine):
    keys = [b"a", b"ab", b"abc", b"abd", b"b", b"b\xff", b"b\xff\xff", b"c", b"\xff", b"\xff\xff"]
    for k in keys:
        engine.put(k, k.upper())
    everything = [(k, k.upper()) for k in sorted(keys)]
    assert list(engine.scan()) == everything
    assert list(engine.scan(reverse=True)) == everything[::-1]
    assert list(engine.scan(start=b"ab", stop=b"b")) == [(k, k.upper()) for k in (b"ab", b"abc", b"abd")]
    assert list(engine.scan(start=b"ab", stop=b"b", reverse=True, limit=2)) == [(b"abd", b"ABD"), (b"abc", b"ABC")]
    assert list(engine.scan(prefix=b"ab")) == [(k, k.upper()) for k in (b"ab", b"abc", b"abd")]
    assert [k for k, _ in engine.scan(prefix=b"b\xff")] == [b"b\xff", b"b\xff\xff"]
    assert [k for k, _ in engine.scan(prefix=b"\xff")] == [b"\xff", b"\xff\xff"]
    assert [k for k, _ in engine.scan(prefix=b"\xff\xff")] == [b"\xff\xff"]
    assert [k for k, _ in engine.scan(prefix=b"")] == sorted(keys)
    assert [k for k, _ in engine.scan(prefix=b"ab", start=b"abc", stop=b"abd")] == [b"abc"]
    assert list(engine.scan(start=b"c", stop=b"a")) == []
    assert list(engine.scan(start=b"c", stop=b"a", reverse=True)) == []
    assert list(engine.scan(limit=0)) == []
    assert [k for k, _ in engine.scan(limit=3)] == sorted(keys)[:3]
    assert engine.min() == (b"a", b"A")
    assert engine.max() == (b"\xff\xff", b"\xff\xff")
    assert engine.above(b"abc") == (b"abd", b"ABD")
    assert engine.above(b"abcc") == (b"abd", b"ABD")
    assert engine.above(b"\xff\xff") is None
    assert engine.below(b"a") is None
    assert engine.below(b"abd") == (b"abc", b"ABC")
    assert engine.below(b"\x00") is None


def test_scan_sees_changes_after_ordered_view_is_built(engine):
    for k in (b"b", b"d", b"f"):
        engine.put(k, b"1")
    assert [k for k, _ in engine.scan()] == [b"b", b"d", b"f"]
    engine.put(b"a", b"2")
    engine.delete(b"d")
    engine.apply([("put", b"e", b"3"), ("delete", b"e"), ("put", b"c", b"4"), ("delete", b"f"), ("put", b"f", b"5")])
    assert list(engine.scan()) == [(b"a", b"2"), (b"b", b"1"), (b"c", b"4"), (b"f", b"5")]


def test_scan_skips_keys_deleted_while_iterating(engine):
    for k in (b"a", b"b", b"c"):
        engine.put(k, k)
    it = engine.scan()
    assert next(it) == (b"a", b"a")
    engine.delete(b"b")
    assert list(it) == [(b"c", b"c")]


def test_large_keys_and_values_and_records_bigger_than_a_segment(tmp_path):
    big_key = b"K" * MAX_KEY_LEN
    big_value = bytes(range(256)) * 64  # 16 KiB, four times the 4 KiB segment size
    with open_engine(tmp_path) as e:
        e.put(b"small", b"s")
        e.put(big_key, big_value)
        e.apply([("put", b"k2" * 1000, big_value), ("put", b"k3", big_value)])
        e.put(b"after", b"a")
        expected = {b"small": b"s", big_key: big_value, b"k2" * 1000: big_value, b"k3": big_value, b"after": b"a"}
        assert_matches(e, expected)
    with open_engine(tmp_path) as e:
        assert_matches(e, expected)
        e.compact()
        assert_matches(e, expected)
    with open_engine(tmp_path) as e:
        assert_matches(e, expected)


def test_value_at_max_value_size_is_accepted(tmp_path):
    with open_engine(tmp_path, max_value_size=100) as e:
        e.put(b"k", b"x" * 100)
        assert e.get(b"k") == b"x" * 100
        with pytest.raises(ValueError, match="max_value_size"):
            e.put(b"k", b"x" * 101)
        assert e.get(b"k") == b"x" * 100
    with open_engine(tmp_path / "zero", max_value_size=0) as e:
        e.put(b"k", b"")
        with pytest.raises(ValueError):
            e.put(b"k", b"x")


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD_TYPES, ids=lambda b: type(b).__name__)
def test_bad_key_types_raise_type_error(engine, bad):
    engine.put(b"a", b"1")
    calls = [
        lambda: engine.get(bad),
        lambda: engine.get(bad, b"default"),
        lambda: bad in engine,
        lambda: engine.put(bad, b"v"),
        lambda: engine.delete(bad),
        lambda: engine.cas(bad, None, b"v"),
        lambda: engine.apply([("put", bad, b"v")]),
        lambda: engine.apply([("delete", bad)]),
        lambda: engine.above(bad),
        lambda: engine.below(bad),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    if bad is not None:  # None is a valid (open) bound
        for kwargs in ({"start": bad}, {"stop": bad}, {"prefix": bad}):
            with pytest.raises(TypeError):
                engine.scan(**kwargs)
    assert_matches(engine, {b"a": b"1"})


@pytest.mark.parametrize("bad", [b for b in BAD_TYPES if b is not None], ids=lambda b: type(b).__name__)
def test_bad_value_types_raise_type_error(engine, bad):
    engine.put(b"a", b"1")
    calls = [
        lambda: engine.put(b"k", bad),
        lambda: engine.cas(b"a", bad, b"v"),
        lambda: engine.cas(b"a", b"1", bad),
        lambda: engine.cas(b"k", None, bad),
        lambda: engine.apply([("put", b"k", bad)]),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    assert_matches(engine, {b"a": b"1"})


def test_put_none_value_raises_type_error(engine):
    with pytest.raises(TypeError):
        engine.put(b"k", None)
    with pytest.raises(TypeError):
        engine.apply([("put", b"k", None)])
    assert len(engine) == 0


def test_key_length_limits(engine):
    too_long = b"x" * (MAX_KEY_LEN + 1)
    for bad in (b"", bytearray(), memoryview(b""), too_long, bytearray(too_long)):
        for call in (
            lambda: engine.get(bad),
            lambda: engine.put(bad, b"v"),
            lambda: engine.delete(bad),
            lambda: engine.cas(bad, None, b"v"),
            lambda: engine.apply([("put", bad, b"v")]),
            lambda: engine.apply([("delete", bad)]),
            lambda: engine.above(bad),
            lambda: engine.below(bad),
        ):
            with pytest.raises(ValueError):
                call()
    longest = b"y" * MAX_KEY_LEN
    engine.put(longest, b"v")
    assert engine.get(longest) == b"v"
    assert list(engine.scan()) == [(longest, b"v")]
    assert len(engine) == 1


def test_value_over_max_value_size(tmp_path):
    with open_engine(tmp_path, max_value_size=1000) as e:
        e.put(b"k", b"old")
        for call in (
            lambda: e.put(b"k", b"v" * 1001),
            lambda: e.cas(b"k", b"old", b"v" * 1001),
            lambda: e.apply([("put", b"j", b"1"), ("put", b"k", b"v" * 1001)]),
        ):
            with pytest.raises(ValueError):
                call()
        assert_matches(e, {b"k": b"old"})
        # `expected` is only compared, so it may exceed the limit
        assert e.cas(b"k", b"v" * 1001, b"new") is False


@pytest.mark.parametrize(
    "ops, error",
    [
        (None, TypeError),
        (5, TypeError),
        ("put", TypeError),
        (b"put", TypeError),
        ([None], TypeError),
        ([()], TypeError),
        ([b"put"], TypeError),
        (["put"], TypeError),
        ([("upsert", b"k", b"v")], ValueError),
        ([("PUT", b"k", b"v")], ValueError),
        ([(b"put", b"k", b"v")], ValueError),
        ([("put", b"k")], ValueError),
        ([("put", b"k", b"v", b"extra")], TypeError),  # the 4th field is a ttl in seconds
        ([("put", b"k", b"v", 0)], ValueError),  # a ttl must be positive
        ([("put", b"k", b"v", 5, b"extra")], ValueError),
        ([("delete",)], ValueError),
        ([("delete", b"k", b"v")], ValueError),
        ([("put", "k", b"v")], TypeError),
        ([("put", b"k", "v")], TypeError),
        ([("put", b"", b"v")], ValueError),
    ],
    ids=repr,
)
def test_bad_apply_writes_nothing(tmp_path, ops, error):
    model = {b"a": b"1", b"b": b"2"}
    with open_engine(tmp_path) as e:
        e.apply([("put", k, v) for k, v in model.items()])
        seq = e.stats()["seq"]
        # A good op first: it must not be written either.
        batch = ops if not isinstance(ops, list) else [("put", b"a", b"changed"), ("delete", b"b")] + ops
        with pytest.raises(error):
            e.apply(batch)
        assert_matches(e, model)
        assert e.stats()["seq"] == seq
    with open_engine(tmp_path) as e:
        assert_matches(e, model)


def test_bad_apply_from_a_generator_writes_nothing(engine):
    def ops():
        yield ("put", b"a", b"1")
        yield ("put", b"b", b"2")
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        engine.apply(ops())
    assert len(engine) == 0 and engine.get(b"a") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": -1}, {"limit": "3"}, {"limit": 1.0}, {"limit": True}],
    ids=repr,
)
def test_bad_scan_limit(engine, kwargs):
    with pytest.raises((TypeError, ValueError)):
        engine.scan(**kwargs)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"durability": "bogus"}, ValueError),
        ({"durability": None}, ValueError),
        ({"segment_size": 10}, ValueError),
        ({"segment_size": 4095}, ValueError),
        ({"segment_size": 2**32}, ValueError),
        ({"segment_size": "big"}, TypeError),
        ({"segment_size": 4096.0}, TypeError),
        ({"max_value_size": -1}, ValueError),
        ({"shard_id": -1}, ValueError),
        ({"shard_id": 2**32}, ValueError),
        ({"sync_interval": 0}, ValueError),
        ({"sync_interval": -1.0}, ValueError),
    ],
    ids=repr,
)
def test_bad_open_options(tmp_path, options, error):
    directory = tmp_path / "never-created"
    with pytest.raises(error):
        ShardEngine.open(str(directory), **options)
    assert not directory.exists()


def test_bad_directory_type(tmp_path):
    with pytest.raises(TypeError):
        ShardEngine.open(5)
    with pytest.raises(TypeError):
        ShardEngine.open(None)


def test_smallest_segment_size_and_pathlike_directory(tmp_path):
    with ShardEngine.open(tmp_path / "p", segment_size=4096, durability="process") as e:
        for i in range(100):
            e.put(b"%03d" % i, b"v" * 100)
        assert e.stats()["segments"] > 1
    with ShardEngine.open(tmp_path / "p") as e:
        assert len(e) == 100


# -- lifecycle ---------------------------------------------------------------------------------
def test_use_after_close_raises_closed(tmp_path):
    e = open_engine(tmp_path)
    e.put(b"k", b"v")
    e.close()
    e.close()  # idempotent
    calls = [
        lambda: e.get(b"k"),
        lambda: b"k" in e,
        lambda: e.put(b"k", b"v"),
        lambda: e.delete(b"k"),
        lambda: e.cas(b"k", b"v", b"w"),
        lambda: e.apply([("put", b"k", b"w")]),
        lambda: e.scan(),
        lambda: list(e.scan(prefix=b"k")),
        lambda: e.min(),
        lambda: e.max(),
        lambda: e.above(b"a"),
        lambda: e.below(b"z"),
        lambda: e.stats(),
        lambda: e.compact(),
        lambda: e.sync(),
    ]
    for call in calls:
        with pytest.raises(shardkv.Closed):
            call()
    with open_engine(tmp_path) as again:
        assert again.get(b"k") == b"v"


def test_apply_empty_batch_after_close_raises_closed(tmp_path):
    """Every operation on a closed engine raises Closed; an empty batch is no exception."""
    e = open_engine(tmp_path)
    e.close()
    with pytest.raises(shardkv.Closed):
        e.apply([])


def test_scan_iterator_outliving_close_raises_closed(tmp_path):
    e = open_engine(tmp_path)
    for k in (b"a", b"b", b"c"):
        e.put(k, k)
    it = e.scan()
    assert next(it) == (b"a", b"a")
    e.close()
    with pytest.raises(shardkv.Closed):
        next(it)


def test_context_manager_closes(tmp_path):
    with open_engine(tmp_path) as e:
        e.put(b"k", b"v")
    with pytest.raises(shardkv.Closed):
        e.get(b"k")
    assert "closed" in repr(e)


def test_second_open_of_same_directory_is_locked(tmp_path):
    first = open_engine(tmp_path)
    first.put(b"k", b"v")
    with pytest.raises(DirectoryLocked):
        open_engine(tmp_path)
    with pytest.raises(DirectoryLocked):
        ShardEngine.open(str(tmp_path) + "/")  # same directory, spelled differently
    assert isinstance(DirectoryLocked("x"), shardkv.Error)
    first.put(b"k2", b"v2")  # the failed opens did not disturb the first engine
    first.close()
    with open_engine(tmp_path) as second:
        assert_matches(second, {b"k": b"v", b"k2": b"v2"})


def test_directory_lock_holds_across_processes(tmp_path):
    import subprocess
    import sys

    child = (
        "import sys\n"
        "from shardkv.shards import DirectoryLocked, ShardEngine\n"
        "try:\n"
        "    ShardEngine.open(sys.argv[1]).close()\n"
        "except DirectoryLocked:\n"
        "    print('locked')\n"
        "else:\n"
        "    print('opened')\n"
    )
    with open_engine(tmp_path) as e:
        e.put(b"k", b"v")
        run = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == "locked", run.stderr
    run = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "opened", run.stderr


def test_failed_open_releases_the_lock(tmp_path):
    with open_engine(tmp_path) as e:
        e.put(b"k", b"v")
    with pytest.raises(shardkv.CorruptionError):
        open_engine(tmp_path, shard_id=7)  # the segments belong to shard 0
    with open_engine(tmp_path) as e:  # not DirectoryLocked
        assert e.get(b"k") == b"v"


def test_reopen_keeps_data_and_stats(tmp_path):
    with open_engine(tmp_path) as e:
        for i in range(300):
            e.put(b"key%04d" % i, b"value%d" % i)
        for i in range(0, 300, 3):
            e.delete(b"key%04d" % i)
        before = e.stats()
        model = dict(e.scan())
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
        after = e.stats()
        for name in ("keys", "live_bytes", "total_bytes", "segments", "seq"):
            assert after[name] == before[name], name
        e.put(b"new", b"1")
        assert e.stats()["seq"] == before["seq"] + 1


def test_stats(engine):
    s = engine.stats()
    assert s["keys"] == 0 and s["live_bytes"] == 0 and s["total_bytes"] == 0 and s["garbage_ratio"] == 0.0
    assert s["durability"] == "process" and s["index_bytes"] > 0 and s["segments"] == 1
    engine.put(b"k", b"12345")
    s = engine.stats()
    assert s["keys"] == 1 and s["live_bytes"] == 40 + 1 + 5 == s["total_bytes"] and s["garbage_ratio"] == 0.0
    engine.put(b"k", b"12345")
    s = engine.stats()
    assert s["live_bytes"] == 46 and s["total_bytes"] == 92 and s["garbage_ratio"] == pytest.approx(0.5)


# -- files on disk -----------------------------------------------------------------------------
def test_new_directory_and_files_are_owner_only(tmp_path):
    old_umask = os.umask(0)  # the modes must come from the engine, not from a umask
    try:
        directory = tmp_path / "parent" / "shard"
        with open_engine(directory) as e:
            for i in range(200):
                e.put(b"%04d" % i, b"x" * 50)
            for i in range(0, 200, 2):
                e.delete(b"%04d" % i)
            e.compact()
            e.put(b"more", b"1")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = os.listdir(directory)
    assert any(n.endswith(".log") for n in names) and any(n.endswith(".hint") for n in names) and "LOCK" in names
    for name in names:
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"


def test_segment_numbers_only_grow(tmp_path):
    seen = []
    with open_engine(tmp_path) as e:
        for round_ in range(3):
            for i in range(60):
                e.put(b"%03d" % i, b"r%d" % round_ * 30)
            e.compact()
            seen.append(segment_numbers(tmp_path))
    with open_engine(tmp_path) as e:
        e.put(b"x", b"1" * 4000)
        e.put(b"y", b"1" * 4000)
        seen.append(segment_numbers(tmp_path))
    for earlier, later in zip(seen, seen[1:]):
        deleted = set(earlier) - set(later)
        new = set(later) - set(earlier)
        assert not new or min(new) > max(earlier), (earlier, later)
        assert not deleted & new


# -- concurrency -------------------------------------------------------------------------------
def test_fsync_durability_with_concurrent_writers(tmp_path, monkeypatch):
    """With durability "fsync" a write is acknowledged only after an fdatasync (or the fsync of a
    segment seal) that started after the write had reached the file; 4 threads share them."""
    n_threads, per_thread = 4, 150
    errors = []
    e = open_engine(tmp_path, durability="fsync", segment_size=16384)
    writer = log_writer(e)
    durable = {"upto": writer.position}
    durable_lock = threading.Lock()
    mine = threading.local()
    real_sync_data, real_append, real_on_seal = fileio.sync_data, writer.append, writer._on_seal
    syncs = []

    def sync_data(fd):
        position = writer.position  # everything written up to here is covered by this call
        real_sync_data(fd)
        syncs.append(position)
        with durable_lock:
            durable["upto"] = max(durable["upto"], position)

    def append(data):
        segment, offset = real_append(data)
        mine.last = (segment, offset + len(data))
        return segment, offset

    def on_seal(segment, end):  # the writer fsyncs a segment before sealing it
        with durable_lock:
            durable["upto"] = max(durable["upto"], (segment, end))
        real_on_seal(segment, end)

    monkeypatch.setattr(fileio, "sync_data", sync_data)
    monkeypatch.setattr(writer, "append", append)
    monkeypatch.setattr(writer, "_on_seal", on_seal)
    barrier = threading.Barrier(n_threads)

    def check_acknowledged():
        with durable_lock:
            assert mine.last <= durable["upto"], (mine.last, durable["upto"])

    def work(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                e.put(b"t%d-%04d" % (t, i), b"%d" % i * 20)
                check_acknowledged()
                if i % 10 == 0:
                    e.apply([("put", b"t%d-batch-%04d" % (t, i), b"b"), ("delete", b"t%d-%04d" % (t, i))])
                    check_acknowledged()
                if i % 50 == 0:  # the batch key of this i exists
                    assert e.delete(b"t%d-batch-%04d" % (t, i)) is True
                    check_acknowledged()
                    assert e.cas(b"t%d-batch-%04d" % (t, i), None, b"b") is True
                    check_acknowledged()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    expected = {}
    for t in range(n_threads):
        for i in range(per_thread):
            if i % 10 == 0:
                expected[b"t%d-batch-%04d" % (t, i)] = b"b"
            else:
                expected[b"t%d-%04d" % (t, i)] = b"%d" % i * 20
    assert_matches(e, expected)
    assert e.stats()["segments"] > 1
    assert 0 < len(syncs) <= n_threads * per_thread * 1.4  # no more than one per write
    crash(e)
    with open_engine(tmp_path, durability="fsync") as e:
        assert_matches(e, expected)


def test_concurrent_readers_and_writers(tmp_path):
    """Lock-free gets racing writes (and segment rolls) never see a torn or foreign value."""
    stop = threading.Event()
    errors = []
    with open_engine(tmp_path, segment_size=8192) as e:
        keys = [b"key%02d" % i for i in range(20)]
        for k in keys:
            e.put(k, k + b":0")

        def writer():
            try:
                n = 0
                while not stop.is_set():
                    n += 1
                    for k in keys:
                        e.put(k, k + b":%d" % n + b"." * (n % 50))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def reader():
            try:
                while not stop.is_set():
                    for k in keys:
                        v = e.get(k)
                        assert v is not None and v.startswith(k + b":"), (k, v)
                    assert [k for k, _ in e.scan()] == keys
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
        for th in threads:
            th.start()
        stop.wait(1.0)
        stop.set()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        assert e.stats()["segments"] > 2


# -- hash collisions ---------------------------------------------------------------------------
def _colliding_key(key: bytes, prefix: bytes) -> bytes:
    """A key as long as `key`, starting with `prefix`, whose CRC-32C equals that of `key`.

    For a fixed length CRC-32C is affine in the message bits, so the last 4 bytes can be solved
    for over GF(2)."""
    free = len(key) - len(prefix)
    assert free == 4
    base = prefix + bytes(4)
    c0 = crc32c(base)
    basis: list[tuple[int, int]] = []  # (crc effect, bit mask of the last 4 bytes), reduced
    for j in range(32):
        flipped = bytearray(base)
        flipped[len(prefix) + j // 8] ^= 1 << (j % 8)
        vec, mask = crc32c(bytes(flipped)) ^ c0, 1 << j
        for bvec, bmask in basis:
            if vec ^ bvec < vec:
                vec, mask = vec ^ bvec, mask ^ bmask
        if vec:
            basis.append((vec, mask))
            basis.sort(reverse=True)
    want, mask = crc32c(key) ^ c0, 0
    for bvec, bmask in basis:
        if want ^ bvec < want:
            want, mask = want ^ bvec, mask ^ bmask
    assert want == 0, "no solution"
    forged = prefix + mask.to_bytes(4, "little")
    assert crc32c(forged) == crc32c(key) and forged != key
    return forged


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_keys_with_the_same_crc32c(tmp_path, verify_checksums):
    """The index hashes keys with CRC-32C; keys that collide (same hash, same length) are told
    apart by the key bytes in the log, and an intact colliding record is not "corruption"."""
    k1 = b"alpha-key"
    k2 = _colliding_key(k1, b"beta-")
    k3 = _colliding_key(k1, b"gamma")
    assert len({k1, k2, k3}) == 3 and crc32c(k1) == crc32c(k2) == crc32c(k3)
    with open_engine(tmp_path, verify_checksums=verify_checksums) as e:
        e.put(k1, b"1")
        assert e.get(k2) is None and k2 not in e
        assert e.delete(k2) is False
        assert e.cas(k2, b"1", b"x") is False
        e.put(k2, b"2")
        e.apply([("put", k3, b"3")])
        assert (e.get(k1), e.get(k2), e.get(k3)) == (b"1", b"2", b"3")
        assert e.delete(k1) is True
        assert (e.get(k1), e.get(k2), e.get(k3)) == (None, b"2", b"3")
        e.put(k1, b"1b")
        assert e.cas(k3, b"3", b"3b") is True
        model = {k1: b"1b", k2: b"2", k3: b"3b"}
        assert_matches(e, model)
        e.compact()
        assert_matches(e, model)
    with open_engine(tmp_path, verify_checksums=verify_checksums) as e:
        assert_matches(e, model)
        assert e.delete(k2) is True
        del model[k2]
        assert_matches(e, model)
