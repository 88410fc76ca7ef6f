"""ShardEngine against a dict model: a hypothesis state machine of writes, reads, reopens,
crashes and compactions.

Segments are 4 KiB, so they roll every few writes and compaction, hints and recovery all get
exercised; keys come from a small alphabet so that they collide.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from shardkv.wal.format import RECORD_HEADER_SIZE

from engine_support import crash, open_engine

pytestmark = pytest.mark.soak

FIXED_KEYS = [b"a", b"ab", b"abc", b"b", b"ba", b"c", b"\x00", b"\xff", b"\xff\xff", b"a\xff", b"b\x00", b"k" * 200]
keys = st.one_of(
    st.sampled_from(FIXED_KEYS),
    st.lists(st.sampled_from([b"a", b"b", b"\x00", b"\xff"]), min_size=1, max_size=3).map(b"".join),
)
bounds = st.one_of(st.none(), keys)
prefixes = st.one_of(st.none(), st.lists(st.sampled_from([b"a", b"b", b"\x00", b"\xff"]), max_size=2).map(b"".join))
raw_values = st.one_of(st.binary(max_size=20), st.binary(min_size=200, max_size=300))
# Values are passed as bytes, bytearray or memoryview: all are accepted and stored as bytes.
values = st.tuples(raw_values, st.sampled_from([bytes, bytearray, memoryview]))
ops = st.one_of(
    st.tuples(st.just("put"), keys, values),
    st.tuples(st.just("delete"), keys),
)


def _value(v) -> tuple[bytes, object]:
    raw, kind = v
    return raw, kind(raw)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self, base: str):
        super().__init__()
        self.directory = tempfile.mkdtemp(dir=base)
        self.model: dict[bytes, bytes] = {}
        self.engine = None
        self.options = {}

    @initialize(durability=st.sampled_from(["process", "interval"]), verify_checksums=st.booleans())
    def open(self, durability, verify_checksums):
        self.options = {
            "durability": durability,
            "segment_size": 4096,
            "sync_interval": 0.05,
            "verify_checksums": verify_checksums,
        }
        self.engine = open_engine(self.directory, **self.options)

    def teardown(self):
        if self.engine is not None:
            self.engine.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- writes ------------------------------------------------------------------------------
    @rule(key=keys, value=values)
    def put(self, key, value):
        raw, passed = _value(value)
        self.engine.put(key, passed)
        self.model[key] = raw

    @rule(key=keys)
    def delete(self, key):
        assert self.engine.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=keys, mode=st.sampled_from(["current", "absent", "other"]), other=raw_values, new=st.one_of(st.none(), values))
    def cas(self, key, mode, other, new):
        if mode == "current":
            expected = self.model.get(key)  # matches (None when absent)
        elif mode == "absent":
            expected = None
        else:
            expected = other
        new_raw, new_passed = (None, None) if new is None else _value(new)
        should = self.model.get(key) == expected
        assert self.engine.cas(key, expected, new_passed) is should
        if should:
            if new_raw is None:
                self.model.pop(key, None)
            else:
                self.model[key] = new_raw

    @rule(batch=st.lists(ops, max_size=6))
    def apply(self, batch):
        passed = []
        for op in batch:
            if op[0] == "put":
                raw, value = _value(op[2])
                passed.append(("put", op[1], value))
            else:
                passed.append(op)
        self.engine.apply(passed)
        for op in batch:
            if op[0] == "put":
                self.model[op[1]] = op[2][0]
            else:
                self.model.pop(op[1], None)

    @rule(key=keys, value=values)
    def apply_same_key_twice(self, key, value):
        raw, passed = _value(value)
        self.engine.apply([("put", key, b"first"), ("delete", key), ("put", key, passed)])
        self.model[key] = raw

    # -- reads -------------------------------------------------------------------------------
    @rule(key=keys)
    def get(self, key):
        assert self.engine.get(key) == self.model.get(key)
        assert self.engine.get(key, b"default") == self.model.get(key, b"default")
        assert (key in self.engine) == (key in self.model)

    @rule(start=bounds, stop=bounds, prefix=prefixes, limit=st.one_of(st.none(), st.integers(0, 5)), reverse=st.booleans())
    def scan(self, start, stop, prefix, limit, reverse):
        expected = [
            (k, v)
            for k, v in sorted(self.model.items())
            if (start is None or k >= start) and (stop is None or k < stop) and (prefix is None or k.startswith(prefix))
        ]
        if reverse:
            expected.reverse()
        if limit is not None:
            expected = expected[:limit]
        got = list(self.engine.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit))
        assert got == expected

    @rule(
        start=bounds,
        stop=bounds,
        prefix=prefixes,
        limit=st.one_of(st.none(), st.integers(1, 6)),
        reverse=st.booleans(),
        batch=st.lists(ops, min_size=1, max_size=4),
    )
    def scan_with_interleaved_write(self, start, stop, prefix, limit, reverse, batch):
        """A scan is a cursor over the live data (ShardEngine.scan's docstring): after a write
        between two items, it goes on from the last key returned with what is there now - keys
        written ahead of it show, keys deleted do not, values are the new ones."""

        def in_range(k):
            return (start is None or k >= start) and (stop is None or k < stop) and (prefix is None or k.startswith(prefix))

        snapshot = [k for k in sorted(self.model, reverse=reverse) if in_range(k)]
        it = self.engine.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit)
        first = next(it, None)
        assert first == ((snapshot[0], self.model[snapshot[0]]) if snapshot else None)
        self.apply(batch)  # deletes free index entries that the puts of the same batch reuse
        if first is None:
            return
        after = [k for k in sorted(self.model, reverse=reverse) if in_range(k) and (k < first[0] if reverse else k > first[0])]
        rest = [(k, self.model[k]) for k in after]
        if limit is not None:
            rest = rest[: limit - 1]
        assert list(it) == rest

    @rule(key=keys)
    def neighbours(self, key):
        ordered = sorted(self.model.items())
        assert self.engine.min() == (ordered[0] if ordered else None)
        assert self.engine.max() == (ordered[-1] if ordered else None)
        above = [kv for kv in ordered if kv[0] > key]
        below = [kv for kv in ordered if kv[0] < key]
        assert self.engine.above(key) == (above[0] if above else None)
        assert self.engine.below(key) == (below[-1] if below else None)

    # -- lifecycle ---------------------------------------------------------------------------
    @rule()
    def reopen(self):
        self.engine.close()
        self.engine = open_engine(self.directory, **self.options)
        assert self.engine.recovery["torn_bytes"] == 0

    @rule()
    def crash_and_reopen(self):
        crash(self.engine)
        self.engine = open_engine(self.directory, **self.options)
        assert self.engine.recovery["torn_bytes"] == 0

    @rule()
    def compact(self):
        result = self.engine.compact()
        assert {"before", "after", "seconds"} <= set(result)
        after = result["after"]
        # Nothing else writes meanwhile, so only live records remain.
        assert after["keys"] == len(self.model)
        assert after["live_bytes"] == after["total_bytes"]
        assert after["garbage_ratio"] == 0.0
        assert not [n for n in os.listdir(self.directory) if n.endswith(".tmp") or n == "COMPACTION"]

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def same_contents(self):
        if self.engine is None:
            return
        assert len(self.engine) == len(self.model)
        assert list(self.engine.scan()) == sorted(self.model.items())

    @invariant()
    def stats_agree(self):
        if self.engine is None:
            return
        stats = self.engine.stats()
        assert stats["keys"] == len(self.model)
        assert stats["live_bytes"] == sum(RECORD_HEADER_SIZE + len(k) + len(v) for k, v in self.model.items())
        assert stats["total_bytes"] >= stats["live_bytes"]
        assert 0.0 <= stats["garbage_ratio"] <= 1.0


def test_engine_matches_dict_model(tmp_path):
    run_state_machine_as_test(
        lambda: EngineMachine(str(tmp_path)),
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
