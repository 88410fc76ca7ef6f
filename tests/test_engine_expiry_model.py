"""Expiry against a model: a hypothesis state machine mixing ttl writes, a clock that moves,
reopens, crashes and compactions (the engine never sees a real clock)."""

from __future__ import annotations

import math
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from engine_support import crash, open_engine

pytestmark = pytest.mark.soak

keys = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"k" * 100])
values = st.binary(max_size=60)
ttls = st.one_of(st.none(), st.sampled_from([0.001, 0.5, 1, 2.5, 10]))


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class ExpiryMachine(RuleBasedStateMachine):
    def __init__(self, base: str):
        super().__init__()
        self.directory = tempfile.mkdtemp(dir=base)
        self.clock = Clock()
        self.model: dict[bytes, tuple[bytes, int | None]] = {}  # key -> (value, expires_at ms)
        self.engine = open_engine(self.directory, clock=self.clock)

    def teardown(self):
        self.engine.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def now_ms(self) -> int:
        return int(self.clock.now * 1000)

    def live(self) -> dict[bytes, bytes]:
        now = self.now_ms()
        return {k: v for k, (v, at) in self.model.items() if at is None or at > now}

    def expiry(self, ttl) -> int | None:
        return None if ttl is None else self.now_ms() + max(1, math.ceil(ttl * 1000))

    @rule(key=keys, value=values, ttl=ttls)
    def put(self, key, value, ttl):
        self.engine.put(key, value, ttl=ttl)
        self.model[key] = (value, self.expiry(ttl))

    @rule(key=keys)
    def delete(self, key):
        assert self.engine.delete(key) == (key in self.live())
        self.model.pop(key, None)

    @rule(key=keys, ttl=ttls)
    def expire(self, key, ttl):
        present = key in self.live()
        assert self.engine.expire(key, ttl) == present
        if present:
            self.model[key] = (self.model[key][0], self.expiry(ttl))

    @rule(batch=st.lists(st.tuples(keys, values, ttls), max_size=4))
    def apply(self, batch):
        self.engine.apply([("put", k, v) if t is None else ("put", k, v, t) for k, v, t in batch])
        for key, value, ttl in batch:
            self.model[key] = (value, self.expiry(ttl))

    @rule(key=keys, new=values)
    def cas_absent(self, key, new):
        swapped = self.engine.cas(key, None, new)
        assert swapped == (key not in self.live())
        if swapped:
            self.model[key] = (new, None)

    @rule(seconds=st.sampled_from([0.0005, 0.3, 1, 2, 5, 20]))
    def advance(self, seconds):
        self.clock.now += seconds

    @rule()
    def reopen(self):
        self.engine.close()
        self.engine = open_engine(self.directory, clock=self.clock)

    @rule()
    def crash_and_reopen(self):
        crash(self.engine)
        self.engine = open_engine(self.directory, clock=self.clock)

    @rule()
    def compact(self):
        result = self.engine.compact()
        assert result["after"]["keys"] == len(self.live())

    @rule(key=keys)
    def ttl(self, key):
        live = self.live()
        expected = None  # absent
        if key in live:
            expiry = self.model[key][1]
            expected = math.inf if expiry is None else (expiry - self.now_ms()) / 1000
        assert self.engine.ttl(key) == expected

    @invariant()
    def same_contents(self):
        live = self.live()
        # get() first: len() and scan() purge expired keys from the index, so only a get made
        # before them meets an expired key that is still indexed.
        assert [self.engine.get(k) for k in sorted(self.model)] == [live.get(k) for k in sorted(self.model)]
        assert len(self.engine) == len(live)
        assert list(self.engine.scan()) == sorted(live.items())


def test_expiry_matches_model(tmp_path):
    run_state_machine_as_test(
        lambda: ExpiryMachine(str(tmp_path)),
        settings=settings(max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
    )
