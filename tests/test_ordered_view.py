"""The ordered view of a shard (shards/sortedkeys.py) inside the engine: kept current by every
write, built at open (in a background thread for big shards), ordering keys as bytes.

Level capacities are made tiny here so that every merge path (level 0 into 1, a cascade into
the last level, tombstones dropped) runs many times in a few thousand operations.
"""

import os
import random
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine_support import crash, key_index, open_engine, ordered_view
from shardkv.shards import sortedkeys
from shardkv.shards.sortedkeys import DEAD, key_prefix, key_prefixes, sort_by_key

pytestmark = pytest.mark.engine

TINY = {"SMALL_CAPACITY": 8, "GROWTH": 2, "DEAD_MIN": 4, "SYNC_BUILD_MAX": 16}


@pytest.fixture
def tiny(monkeypatch):
    for name, value in TINY.items():
        monkeypatch.setattr(sortedkeys, name, value)


class ListSource:
    """KeySource over a Python list of keys (entry id = position)."""

    def __init__(self, keys):
        self.keys = keys

    def key(self, e):
        return self.keys[e]

    def lengths(self, eids):
        return np.array([len(self.keys[e]) for e in eids], dtype=np.int64)

    def chunks(self, eids, k):
        return key_prefixes([self.keys[e][8 * k : 8 * k + 8] for e in eids]) if len(eids) else np.zeros(0, dtype=np.uint64)


# Keys that stress the prefix: short ones, zero bytes at the end (b"a" < b"a\0"), long shared heads.
tricky_keys = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.builds(lambda n, tail: b"https://example.com/" + n.to_bytes(2, "big") + tail, st.integers(0, 300), st.binary(max_size=3)),
    st.builds(lambda head, zeros: head + b"\0" * zeros, st.binary(min_size=1, max_size=9), st.integers(0, 9)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(tricky_keys, unique=True, max_size=60))
def test_sort_by_key_is_bytes_order(keys):
    source = ListSource(keys)
    eids = np.arange(len(keys), dtype=np.int64)
    ordered, prefixes = sort_by_key(eids, key_prefixes(keys), source)
    assert [keys[e] for e in ordered] == sorted(keys)
    assert prefixes.tolist() == [key_prefix(k) for k in sorted(keys)]


def test_key_prefix_orders_like_bytes():
    keys = [b"a", b"a\0", b"a\0\0\0\0\0\0\0\0", b"ab", b"\xff" * 9, b"\0", b"abcdefgh", b"abcdefgh\0"]
    for a in keys:
        for b in keys:
            if a < b:
                assert key_prefix(a) <= key_prefix(b)


values = st.binary(max_size=24)


class ViewMachine(RuleBasedStateMachine):
    """Puts, deletes, batches (one by one and as columns), expiry, compaction, reopening (clean
    and crashed) against a dict; every scan must be the sorted dict."""

    def __init__(self):
        super().__init__()
        self.saved = {name: getattr(sortedkeys, name) for name in TINY}
        for name, value in TINY.items():
            setattr(sortedkeys, name, value)
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="ordered-view-")
        self.now = 1_000_000.0
        self.engine = self._open()
        self.model = {}
        self.expiry = {}
        self.rng = random.Random(0)

    def _open(self):
        return open_engine(self.dir, segment_size=4096, clock=lambda: self.now)

    def _live(self):
        now_ms = int(self.now * 1000)
        return {k: v for k, v in self.model.items() if k not in self.expiry or self.expiry[k] > now_ms}

    def teardown(self):
        self.engine.close()
        for name, value in self.saved.items():
            setattr(sortedkeys, name, value)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(keys=st.lists(tricky_keys, min_size=20, max_size=80, unique=True))
    def load(self, keys):
        self.engine.apply([("put", k, k[::-1]) for k in keys])
        self.model.update({k: k[::-1] for k in keys})

    @rule(key=tricky_keys, value=values)
    def put(self, key, value):
        self.engine.put(key, value)
        self.model[key] = value
        self.expiry.pop(key, None)

    @rule(key=tricky_keys, value=values, ttl=st.integers(1, 5))
    def put_expiring(self, key, value, ttl):
        self.engine.put(key, value, ttl=ttl)
        self.model[key] = value
        self.expiry[key] = int(self.now * 1000) + ttl * 1000

    @rule(seconds=st.integers(1, 4))
    def time_passes(self, seconds):
        self.now += seconds

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        live = key in self._live()
        assert self.engine.delete(key) == live
        self.model.pop(key)
        self.expiry.pop(key, None)

    @rule(puts=st.lists(st.tuples(tricky_keys, values), max_size=12), deletes=st.integers(0, 6))
    def batch(self, puts, deletes):
        gone = self.rng.sample(sorted(self.model), min(deletes, len(self.model)))
        ops = [("delete", k) for k in gone] + [("put", k, v) for k, v in puts]
        self.engine.apply(ops)
        for k in gone:
            self.model.pop(k)
            self.expiry.pop(k, None)
        for k, v in puts:
            self.model[k] = v
            self.expiry.pop(k, None)

    @rule(count=st.integers(64, 200), length=st.sampled_from([3, 8, 16]))
    def column_batch(self, count, length):
        """Same-size puts: indexed by KeyIndex.upsert_many, added to the view in one go."""
        keys = [self.rng.randbytes(length) for _ in range(count)]
        self.engine.apply([("put", k, b"c" * 5) for k in keys])
        for k in keys:
            self.model[k] = b"c" * 5
            self.expiry.pop(k, None)

    @rule()
    def compact(self):
        self.engine.compact()

    @rule(crashed=st.booleans())
    def reopen(self, crashed):
        if crashed:
            crash(self.engine)
        else:
            self.engine.close()
        self.engine = self._open()

    @rule(start=st.one_of(st.none(), tricky_keys), stop=st.one_of(st.none(), tricky_keys), reverse=st.booleans(),
          limit=st.one_of(st.none(), st.integers(0, 7)), prefix=st.one_of(st.none(), st.binary(min_size=1, max_size=2)))  # fmt: skip
    def scan(self, start, stop, reverse, limit, prefix):
        expected = [
            kv
            for kv in sorted(self._live().items())
            if (start is None or kv[0] >= start) and (stop is None or kv[0] < stop) and (prefix is None or kv[0].startswith(prefix))
        ]
        if reverse:
            expected.reverse()
        if limit is not None:
            expected = expected[:limit]
        assert list(self.engine.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit)) == expected

    @rule(key=tricky_keys)
    def neighbours(self, key):
        ordered = sorted(self._live().items())
        above = [kv for kv in ordered if kv[0] > key]
        below = [kv for kv in ordered if kv[0] < key]
        assert self.engine.above(key) == (above[0] if above else None)
        assert self.engine.below(key) == (below[-1] if below else None)
        assert self.engine.min() == (ordered[0] if ordered else None)
        assert self.engine.max() == (ordered[-1] if ordered else None)

    @invariant()
    def every_key_in_one_level(self):
        view = ordered_view(self.engine)
        if not view.ready:
            return
        seen = []
        for run in view.runs:
            eids = run.eids[: run.count]
            seen.extend(int(e) for e in eids if e != DEAD)
            assert run.dead == int((eids == DEAD).sum())
        assert len(seen) == len(set(seen)) == key_index(self.engine).count


TestViewMachine = ViewMachine.TestCase
TestViewMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_writes_during_a_background_build_are_kept(tmp_path, tiny, monkeypatch):
    """A big shard's view is sorted in a thread after open; puts, deletes and reused index
    entries meanwhile end up in it, and the first scan waits for it."""
    engine = open_engine(tmp_path, segment_size=1 << 16)
    keys = [b"k%05d" % i for i in range(3000)]
    engine.apply([("put", k, b"v") for k in keys])
    engine.close()
    os.unlink(tmp_path / "SORTED")  # no saved view: sorted in the background
    release = threading.Event()
    original = sortedkeys.sort_by_key

    def slow_sort(eids, prefixes, source, presorted=False):
        if threading.current_thread().name == "shardkv-sorted-view":
            assert release.wait(30)
        return original(eids, prefixes, source, presorted)

    monkeypatch.setattr(sortedkeys, "sort_by_key", slow_sort)
    engine = open_engine(tmp_path, segment_size=1 << 16)
    assert ordered_view(engine).state == sortedkeys.BUILDING
    model = dict.fromkeys(keys, b"v")
    for i in range(0, 3000, 7):  # deletes free entries...
        engine.delete(keys[i])
        del model[keys[i]]
    for i in range(500):  # ...that new keys take
        engine.put(b"new%04d" % i, b"n")
        model[b"new%04d" % i] = b"n"
    engine.apply([("put", b"k%05d" % i, b"w") for i in range(1, 3000, 11)])  # overwrites
    model.update({b"k%05d" % i: b"w" for i in range(1, 3000, 11)})
    release.set()
    assert list(engine.scan()) == sorted(model.items())
    assert ordered_view(engine).state == sortedkeys.READY
    engine.close()


def test_close_waits_for_a_background_build(tmp_path, tiny):
    engine = open_engine(tmp_path, segment_size=1 << 16)
    engine.apply([("put", b"%06d" % i, b"v") for i in range(2000)])
    engine.close()
    os.unlink(tmp_path / "SORTED")
    engine = open_engine(tmp_path, segment_size=1 << 16)
    assert ordered_view(engine).state == sortedkeys.BUILDING
    engine.close()  # must not unmap what the build thread reads
    assert ordered_view(engine)._builder is None


def test_keys_sharing_their_first_bytes_order_through_the_log(tmp_path, tiny):
    """Prefixes all equal: every comparison reads keys from the log."""
    engine = open_engine(tmp_path, segment_size=1 << 14)
    rng = random.Random(3)
    model = {}
    for step in range(1500):
        key = b"https://example.com/%d" % rng.randrange(800)
        if rng.random() < 0.3 and key in model:
            engine.delete(key)
            del model[key]
        else:
            engine.put(key, b"%d" % step)
            model[key] = b"%d" % step
    assert list(engine.scan()) == sorted(model.items())
    assert list(engine.scan(reverse=True, start=b"https://example.com/3", stop=b"https://example.com/5")) == sorted(
        (kv for kv in model.items() if b"https://example.com/3" <= kv[0] < b"https://example.com/5"), reverse=True
    )
    engine.close()


def test_the_view_grows_with_the_index_through_doublings(tmp_path):
    engine = open_engine(tmp_path, segment_size=1 << 20)
    bits = key_index(engine)._bits
    keys = [random.Random(i).randbytes(16) for i in range(20000)]
    for i in range(0, len(keys), 500):
        engine.apply([("put", k, b"x") for k in keys[i : i + 500]])
    for k in keys[:3000]:
        engine.put(k[::-1], b"y")
    assert key_index(engine)._bits > bits + 3
    expected = sorted({**dict.fromkeys(keys, b"x"), **{k[::-1]: b"y" for k in keys[:3000]}}.items())
    assert list(engine.scan()) == expected
    engine.close()


def test_scan_is_a_cursor_over_live_data(tmp_path):
    """Between two items, a write ahead of the cursor shows, one behind it does not."""
    engine = open_engine(tmp_path)
    for k in (b"b", b"d", b"f"):
        engine.put(k, k)
    it = engine.scan()
    assert next(it) == (b"b", b"b")
    engine.put(b"a", b"a")  # behind: not seen
    engine.put(b"c", b"c")  # ahead: seen
    engine.delete(b"d")
    engine.put(b"f", b"F")
    assert list(it) == [(b"c", b"c"), (b"f", b"F")]
    engine.close()


def test_removing_most_keys_drops_tombstones(tmp_path, tiny):
    engine = open_engine(tmp_path, segment_size=1 << 16)
    keys = [b"%05d" % i for i in range(2000)]
    engine.apply([("put", k, b"v") for k in keys])
    engine.apply([("delete", k) for k in keys[:1900]])
    view = ordered_view(engine)
    assert sum(run.dead for run in view.runs) < 1900  # merged away, not all kept as tombstones
    assert list(engine.scan()) == [(k, b"v") for k in keys[1900:]]
    engine.close()


def test_no_ordered_read_sorts_the_whole_shard(tmp_path, tiny, monkeypatch):
    """No cliff: after a bulk load, and after reopening (once the background build is done),
    the first scan finds the view complete: nothing sorts every key on the caller's time."""
    engine = open_engine(tmp_path, segment_size=1 << 16)
    keys = [random.Random(i).randbytes(12) for i in range(3000)]
    for i in range(0, 3000, 100):
        engine.apply([("put", k, b"v") for k in keys[i : i + 100]])
    assert ordered_view(engine).ready  # kept current, no scan yet
    engine.close()
    os.unlink(tmp_path / "SORTED")  # the saved view: tests/test_ordered_saved.py
    engine = open_engine(tmp_path, segment_size=1 << 16)
    ordered_view(engine).wait_built(30)

    def refuse(*args, **kwargs):
        raise AssertionError("an ordered read sorted the whole shard")

    monkeypatch.setattr(sortedkeys.SortedView, "build_now", refuse)
    original = sortedkeys.sort_by_key
    monkeypatch.setattr(sortedkeys, "sort_by_key", lambda eids, *a, **k: refuse() if len(eids) >= 3000 else original(eids, *a, **k))
    assert engine.min() == (min(keys), b"v")
    assert [k for k, _ in engine.scan()] == sorted(keys)
    engine.close()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), key_len=st.integers(1, 40), value_len=st.integers(0, 60), data=st.data())
def test_records_are_checked_together_by_crc(n, key_len, value_len, data):
    """bulkread._check_crcs: the CRC-32C of a window's rows computed from their stored CRCs
    (one tree, zeros in front up to a power of two) matches the rows' own when every record is
    intact, and not when any byte of any record is changed."""
    from shardkv.ipc import bulkread
    from shardkv.wal.records import encode_record

    rng = random.Random(data.draw(st.integers(0, 2**32)))
    records = b"".join(encode_record(1, rng.randbytes(key_len), rng.randbytes(value_len), rng.randrange(2**40)) for _ in range(n))
    length = len(records) // n
    rows = np.frombuffer(records, dtype=np.uint8).reshape(n, length).copy()
    assert bulkread._check_crcs(rows, length)
    row, column = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, length - 1))
    rows[row, column] ^= 1 << data.draw(st.integers(0, 7))
    assert not bulkread._check_crcs(rows, length)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.integers(65_000, 70_000), st.integers(2**32 - 8, 2**32 - 1)), min_size=1, max_size=300))
def test_by_segment_groups_every_position_once(segments):
    """bulkread.by_segment: each segment named, with exactly the positions that name it, in
    order; close numbers by a radix sort, numbers far apart (untrusted) by sorting."""
    from shardkv.ipc.bulkread import by_segment

    array = np.array(segments, dtype=np.int64)
    expected: dict = {}
    for position, segment in enumerate(segments):
        expected.setdefault(segment, []).append(position)
    found = {segment: np.arange(len(segments))[picked].tolist() for segment, picked in by_segment(array)}
    assert found == expected
    assert [segment for segment, _ in by_segment(array)] == sorted(expected)
