"""One API suite, run against every backend: the local store (a shardkv cluster in a temporary
directory) and a Redis Cluster (redis_cluster_support.py, through `shardkv.open("redis://...")`).

A test skips only because of what `db.features` says the backend lacks (or because no Redis
Cluster can be started here: the reason is shown in the summary); where the backends differ by
design (a batch across hash slots) the test checks each side of the feature.

Every Redis test works in a namespace of its own on the session's cluster, so the tests need no
flushing and cannot see each other's keys.
"""

from __future__ import annotations

import math

import asyncio
import json
import os
import random
import sys
import time
import uuid

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import shardkv
from clock_support import still_before, wait_past
from cluster_support import ClientProcess, cluster_fixture
from redis_cluster_support import reference_slot, require_redis

BACKENDS = ("local", "redis")


def features_of(db):
    """db.features, or the local backend's table for a local client that has no property yet."""
    features = getattr(db, "features", None)
    if features is None:
        from shardkv.backends import LOCAL_FEATURES  # noqa: PLC0415

        return LOCAL_FEATURES
    return features


class Backend:
    """How a test reaches one backend: `target` and `options` open it (also from another
    process: both are JSON-able), `db` is the test's own client."""

    def __init__(self, name: str, target, options: dict, opener):
        self.name, self.target, self.options = name, target, options
        self._opener = opener
        self.db = opener()

    def open(self, **extra):
        """Another blocking client of the same store."""
        return shardkv.open(self.target, **{**self.options, **extra})

    def aopen(self, **extra):
        """An asyncio client of the same store (await it, or `async with`)."""
        return shardkv.aopen(self.target, **{**self.options, **extra})


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """A Backend for each of the local store and a Redis Cluster; closed afterwards."""
    if request.param == "local":
        gen = cluster_fixture(tmp_path / "db")
        harness = next(gen)
        try:
            yield Backend("local", str(tmp_path / "db"), {}, harness.open)
        finally:
            next(gen, None)  # tears the local cluster down, failing the test if anything is left
        return
    require_redis()
    cluster = request.getfixturevalue("redis_cluster")
    options = {"namespace": "t" + uuid.uuid4().hex[:12]}
    made = Backend("redis", cluster.url, options, lambda: shardkv.open(cluster.url, **options))
    try:
        yield made
    finally:
        made.db.close()


def keys_in_different_slots() -> tuple[bytes, bytes]:
    a, b = b"alpha", b"beta"
    assert reference_slot(a) != reference_slot(b)
    return a, b


# -- the basic API -----------------------------------------------------------------------------
def test_features_are_a_frozen_table(backend):
    features = features_of(backend.db)
    for name in ("cas", "ttl", "cross_shard_batches", "ordered_scans", "durability_levels", "asyncio"):
        assert features[name] == getattr(features, name)
    assert set(features["durability_levels"]) <= set(shardkv.DURABILITY_LEVELS)
    with pytest.raises((AttributeError, TypeError)):
        features.cas = False  # noqa: B010 - read-only
    with pytest.raises(KeyError):
        features["no_such_feature"]
    assert dict(features)["cas"] is features.cas


def test_single_key_operations(backend):
    db = backend.db
    assert db.get(b"k") is None and db.get(b"k", b"dflt") == b"dflt"
    db.put(b"k", b"v1")
    assert db.get(b"k") == b"v1"
    db.put(bytearray(b"k"), memoryview(b"v2"))  # bytes-like in, bytes out
    assert db.get(memoryview(b"k")) == b"v2" and type(db.get(b"k")) is bytes
    db.put(b"empty", b"")
    assert db.get(b"empty") == b""
    assert db.delete(b"k") is True and db.delete(b"k") is False
    assert db.get(b"k") is None
    binary = bytes(range(256))
    db.put(binary, binary * 3)
    assert db.get(binary) == binary * 3
    big = os.urandom(3 * 1024 * 1024)
    db.put(b"big", big)
    assert db.get(b"big") == big


def test_cas(backend):
    db = backend.db
    assert db.cas(b"c", None, b"1") is True  # absent: set
    assert db.cas(b"c", None, b"2") is False  # present now
    assert db.cas(b"c", b"0", b"2") is False and db.get(b"c") == b"1"
    assert db.cas(b"c", b"1", b"2") is True and db.get(b"c") == b"2"
    assert db.cas(b"c", b"2", None) is True and db.get(b"c") is None  # old -> None deletes
    assert db.cas(b"c", b"2", None) is False
    assert db.cas(b"c", None, None) is True  # absent and stays absent
    assert db.cas(b"c", None, b"") is True and db.get(b"c") == b""
    assert db.cas(b"c", b"", b"x") is True and db.get(b"c") == b"x"  # "" is a value, not absence


def test_mutable_mapping_protocol(backend):
    db = backend.db
    db[b"a"] = b"1"
    db[b"b"] = b"2"
    assert db[b"a"] == b"1" and b"a" in db and b"zz" not in db
    with pytest.raises(TypeError):
        "text" in db  # noqa: B015 — not a key: the same TypeError as db["text"]
    with pytest.raises(KeyError):
        db[b"zz"]
    with pytest.raises(KeyError):
        del db[b"zz"]
    del db[b"a"]
    assert b"a" not in db and len(db) == 1
    assert db.setdefault(b"c", b"3") == b"3" and db.pop(b"c") == b"3"
    db.update({b"d": b"4"})
    assert len(db) == 2
    if features_of(db).ordered_scans:
        assert list(db) == [b"b", b"d"] and dict(db.items()) == {b"b": b"2", b"d": b"4"}
    if features_of(db).ordered_scans:  # as a dict's since Python 3.8, in key order here
        assert list(reversed(db)) == [b"d", b"b"] and list(reversed(db.keys())) == [b"d", b"b"]
        assert list(reversed(db.items())) == [(b"d", b"4"), (b"b", b"2")] and list(reversed(db.values())) == [b"4", b"2"]
    db.update([(b"e", b"5")])
    db.update({b"f": b"6"}.items())
    assert db[b"e"] == b"5" and db[b"f"] == b"6" and len(db) == 4
    db.clear()
    assert len(db) == 0 and db.get(b"b") is None


def test_get_many(backend):
    db = backend.db
    keys = [b"gm-%03d" % i for i in range(300)]
    for i, key in enumerate(keys[::2]):
        db.put(key, b"v%d" % i)
    want = [None if i % 2 else b"v%d" % (i // 2) for i in range(300)]
    assert db.get_many(keys) == want
    assert db.get_many([]) == []
    assert db.get_many([keys[0], keys[0], b"missing"]) == [b"v0", b"v0", None]


def test_bad_arguments_raise_type_and_value_errors(backend):
    db = backend.db
    for bad in ("text", 42, None, 1.5):
        with pytest.raises(TypeError):
            db.get(bad)
        with pytest.raises(TypeError):
            db.put(bad, b"v")
        with pytest.raises(TypeError):
            db.put(b"k", bad)
    with pytest.raises(ValueError):
        db.put(b"", b"v")
    with pytest.raises(ValueError):
        db.get(b"k" * (64 * 1024 + 1))
    with pytest.raises(ValueError):
        db.put(b"k", b"v", ttl=-1)
    with pytest.raises(TypeError):
        db.put(b"k", b"v", ttl="10")
    with pytest.raises(ValueError):
        db.write([("frobnicate", b"k")])
    with pytest.raises(TypeError):
        db.put_many([b"not a pair"])
    assert db.get(b"k") is None  # nothing was written by any of these


def test_closed_client_raises_closed(backend):
    db = backend.open()
    db.put(b"k", b"v")
    db.close()
    db.close()  # idempotent
    for call in (lambda: db.get(b"k"), lambda: db.put(b"k", b"v"), lambda: db.delete(b"k"), lambda: db.cas(b"k", None, b"v"), lambda: db.get_many([b"k"])):
        with pytest.raises(shardkv.Closed):
            call()
    assert backend.db.get(b"k") == b"v"


# -- TTL ---------------------------------------------------------------------------------------
def test_ttl(backend):
    db = backend.db
    if not features_of(db).ttl:
        pytest.skip("the backend has no ttl")
    started = time.monotonic()
    db.put(b"t", b"x", ttl=0.3)
    written = time.monotonic()
    db.put(b"keep", b"y")
    left = db.ttl(b"t")
    if still_before(started, 0.3):
        assert left is not None and 0 < left <= 0.3
    assert db.ttl(b"keep") == math.inf and db.ttl(b"absent") is None
    assert db.expire(b"keep", 30) is True and 20 < db.ttl(b"keep") <= 30
    assert db.expire(b"keep", None) is True and db.ttl(b"keep") == math.inf
    assert db.expire(b"absent", 5) is False and db.expire(b"absent", None) is False
    count = len(db)
    if still_before(started, 0.3):
        assert count == 2
    wait_past(written, 0.3)
    assert db.get(b"t") is None and b"t" not in db and db.get_many([b"t", b"keep"]) == [None, b"y"]
    assert len(db) == 1
    if features_of(db).ordered_scans:
        assert [k for k, _ in db.scan()] == [b"keep"]
    db.put(b"t", b"again")  # a put without ttl makes it permanent
    assert db.ttl(b"t") == math.inf
    db.put(b"t", b"short", ttl=60)
    assert db.cas(b"t", b"short", b"long") and db.ttl(b"t") == math.inf  # as a put: no expiry
    started = time.monotonic()
    with db.batch() as b:
        b.put(b"t", b"batched", ttl=0.2)
    written = time.monotonic()
    left = db.ttl(b"t")
    if still_before(started, 0.2):
        assert left is not None and 0 < left <= 0.2
    wait_past(written, 0.2)
    assert db.get(b"t") is None and len(db) == 1


# -- batches -----------------------------------------------------------------------------------
TAGGED = [b"{user42}:name", b"{user42}:email", b"{user42}:age"]


def test_batches_within_one_slot_are_atomic(backend):
    db = backend.db
    assert len({reference_slot(k) for k in TAGGED}) == 1
    db.put_many({TAGGED[0]: b"ann", TAGGED[1]: b"ann@example.com"})
    assert db.get_many(TAGGED) == [b"ann", b"ann@example.com", None]
    db.write([("put", TAGGED[2], b"42"), ("delete", TAGGED[1]), ("expect", TAGGED[0], b"ann")])
    assert db.get_many(TAGGED) == [b"ann", None, b"42"]
    with pytest.raises(shardkv.Conflict):
        db.write([("put", TAGGED[0], b"bob"), ("expect", TAGGED[1], None), ("expect", TAGGED[2], b"41")])
    assert db.get_many(TAGGED) == [b"ann", None, b"42"]  # nothing applied
    with pytest.raises(shardkv.Conflict):
        with db.batch() as b:
            b.put(TAGGED[1], b"x")
            b.expect(TAGGED[0], None)
    assert db.get(TAGGED[1]) is None
    with db.batch() as b:
        b.put(TAGGED[1], b"new@example.com")
        b.expect(TAGGED[1], None)  # preconditions see the state before the batch
        b.delete(TAGGED[2])
    assert db.get_many(TAGGED) == [b"ann", b"new@example.com", None]
    with pytest.raises(RuntimeError):
        with db.batch() as b:
            b.put(TAGGED[0], b"discarded")
            raise RuntimeError("the block failed: nothing is sent")
    assert db.get(TAGGED[0]) == b"ann"
    db.write([])  # empty: nothing to do


def test_batch_across_slots(backend):
    db = backend.db
    a, b = keys_in_different_slots()
    db.put(a, b"old")
    if features_of(db).cross_shard_batches:
        db.write([("put", a, b"1"), ("put", b, b"2")])
        assert db.get_many([a, b]) == [b"1", b"2"]
        return
    for attempt in (
        lambda: db.put_many({a: b"1", b: b"2"}),
        lambda: db.write([("put", a, b"1"), ("expect", b, None)]),
    ):
        with pytest.raises(shardkv.Unsupported) as info:
            attempt()
        assert isinstance(info.value, shardkv.Error)
        assert str(reference_slot(a)) in str(info.value) and str(reference_slot(b)) in str(info.value)
    with pytest.raises(shardkv.Unsupported):
        with db.batch() as batch:
            batch.put(a, b"1")
            batch.delete(b)
    assert db.get_many([a, b]) == [b"old", None]  # nothing was sent


# -- many processes ----------------------------------------------------------------------------
CAS_COUNTER = r"""
import json, sys
import shardkv
target, options, key, n = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
with shardkv.open(target, **options) as db:
    done = conflicts = 0
    while done < n:
        current = db.get(key)
        new = b"%d" % (int(current) + 1) if current is not None else b"1"
        if db.cas(key, current, new):
            done += 1
        else:
            conflicts += 1
print("done", conflicts, flush=True)
"""


def test_cas_counters_from_four_processes(backend):
    per_process = 60
    procs = [ClientProcess(CAS_COUNTER, backend.target, json.dumps(backend.options), "counter", per_process) for _ in range(4)]
    try:
        for proc in procs:
            proc.expect("done", timeout=60)
            assert proc.wait(30) == 0
    finally:
        for proc in procs:
            proc.kill()
    assert backend.db.get(b"counter") == b"%d" % (4 * per_process)


# -- ordered reads -----------------------------------------------------------------------------
def test_ordered_scans_match_sorted(backend):
    db = backend.db
    if not features_of(db).ordered_scans:
        pytest.skip("the backend keeps no ordered index")
    rng = random.Random(20)
    model = {}
    for _ in range(600):
        key = bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randint(1, 4)))
        model[key] = b"%d" % rng.randint(0, 999)
    for key, value in model.items():
        db.put(key, value)
    ordered = sorted(model.items())
    assert list(db.scan()) == ordered
    assert list(db.scan(reverse=True)) == ordered[::-1]
    assert list(db) == [k for k, _ in ordered] and len(db) == len(model)
    for _ in range(40):
        start, stop = (bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randint(0, 3))) or None for _ in range(2))
        prefix = rng.choice([None, b"a", b"\xff", b"b\x00"])
        limit = rng.choice([None, 0, 1, 7, 100])
        reverse = rng.random() < 0.5
        want = [(k, v) for k, v in ordered if (start is None or k >= start) and (stop is None or k < stop) and (prefix is None or k.startswith(prefix))]
        if reverse:
            want.reverse()
        if limit is not None:
            want = want[:limit]
        assert list(db.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit)) == want, (start, stop, prefix, limit, reverse)
    assert db.min() == ordered[0] and db.max() == ordered[-1]
    for probe in (b"a", b"a\x00", b"b", b"\x00", b"\xff\xff\xff\xff\xff"):
        after = [kv for kv in ordered if kv[0] > probe]
        before = [kv for kv in ordered if kv[0] < probe]
        assert db.above(probe) == (after[0] if after else None)
        assert db.below(probe) == (before[-1] if before else None)
    for key in list(model)[:100]:
        db.delete(key)
        del model[key]
    assert list(db.scan()) == sorted(model.items())


# -- a model of the whole API --------------------------------------------------------------------
MODEL_KEYS = [b"{m}a", b"{m}b", b"{m}c", b"{m}\x00", b"{m}\xff\xfe", b"x", b"y\x00"]
BATCH_KEYS = MODEL_KEYS[:5]  # one hash tag: a batch of these is on one slot on every backend
VALUES = st.sampled_from([b"", b"v1", b"v2", b"\x00" * 3, b"long" * 300])


def model_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        stateful_step_count=25,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


def make_machine(db, ordered: bool):
    class StoreMatchesDict(RuleBasedStateMachine):
        """Random valid calls against `db` and a dict; both must agree after every step."""

        def __init__(self):
            super().__init__()
            for key in MODEL_KEYS:
                db.delete(key)
            self.model: dict[bytes, bytes] = {}

        @rule(key=st.sampled_from(MODEL_KEYS), value=VALUES)
        def put(self, key, value):
            db.put(key, value)
            self.model[key] = value

        @rule(key=st.sampled_from(MODEL_KEYS))
        def delete(self, key):
            assert db.delete(key) == (key in self.model)
            self.model.pop(key, None)

        @rule(key=st.sampled_from(MODEL_KEYS), expected=st.one_of(st.none(), VALUES), new=st.one_of(st.none(), VALUES))
        def cas(self, key, expected, new):
            ok = self.model.get(key) == expected
            assert db.cas(key, expected, new) == ok
            if ok:
                if new is None:
                    self.model.pop(key, None)
                else:
                    self.model[key] = new

        @rule(items=st.dictionaries(st.sampled_from(BATCH_KEYS), VALUES, max_size=4))
        def put_many(self, items):
            db.put_many(items)
            self.model.update(items)

        @rule(
            ops=st.lists(
                st.one_of(
                    st.tuples(st.just("put"), st.sampled_from(BATCH_KEYS), VALUES),
                    st.tuples(st.just("delete"), st.sampled_from(BATCH_KEYS)),
                    st.tuples(st.just("expect"), st.sampled_from(BATCH_KEYS), st.one_of(st.none(), VALUES)),
                ),
                max_size=5,
            )
        )
        def write(self, ops):
            holds = all(self.model.get(op[1]) == op[2] for op in ops if op[0] == "expect")
            if holds:
                db.write(ops)
                for op in ops:
                    if op[0] == "put":
                        self.model[op[1]] = op[2]
                    elif op[0] == "delete":
                        self.model.pop(op[1], None)
            else:
                before = db.get_many(BATCH_KEYS)
                try:
                    db.write(ops)
                except shardkv.Conflict:
                    pass
                else:
                    raise AssertionError("a failed precondition must raise Conflict")
                assert db.get_many(BATCH_KEYS) == before

        @rule(keys=st.lists(st.sampled_from(MODEL_KEYS), max_size=6))
        def get_many(self, keys):
            assert db.get_many(keys) == [self.model.get(k) for k in keys]

        @precondition(lambda self: ordered)
        @rule(reverse=st.booleans(), limit=st.one_of(st.none(), st.integers(0, 4)), start=st.sampled_from([None, *MODEL_KEYS]))
        def scan(self, reverse, limit, start):
            want = sorted((kv for kv in self.model.items() if start is None or kv[0] >= start), reverse=reverse)
            assert list(db.scan(start=start, reverse=reverse, limit=limit)) == want[:limit]

        @invariant()
        def agrees(self):
            assert [db.get(k) for k in MODEL_KEYS] == [self.model.get(k) for k in MODEL_KEYS]
            assert len(db) == len(self.model)

    return StoreMatchesDict


def test_model_based_against_a_dict(backend):
    db = backend.db
    machine = make_machine(db, features_of(db).ordered_scans)
    run_state_machine_as_test(machine, settings=model_settings(15))


# -- durability ----------------------------------------------------------------------------------
def test_durability_levels(backend):
    levels = features_of(backend.db).durability_levels
    for level in levels:
        backend.open(durability=level).close()
    for level in set(shardkv.DURABILITY_LEVELS) - set(levels):
        with pytest.raises(shardkv.Unsupported):
            backend.open(durability=level)


# -- asyncio -----------------------------------------------------------------------------------
def test_asyncio_api(backend):
    if not features_of(backend.db).asyncio:
        pytest.skip("the backend has no asyncio client")
    ordered = features_of(backend.db).ordered_scans

    async def main():
        async with backend.aopen() as db:
            await asyncio.gather(*(db.put(b"a%03d" % i, b"v%d" % i) for i in range(100)))
            assert await db.get(b"a007") == b"v7" and await db.get(b"nope", b"d") == b"d"
            assert await db.delete(b"a001") and not await db.delete(b"a001")
            assert await db.cas(b"a002", b"v2", b"new") and not await db.cas(b"a002", b"v2", b"x")
            assert await db.get_many([b"a003", b"missing", b"a002"]) == [b"v3", None, b"new"]
            assert await db.len() == 99
            await db.put_many({TAGGED[0]: b"1", TAGGED[1]: b"2"})
            async with db.batch() as b:
                b.put(TAGGED[2], b"3")
                b.expect(TAGGED[0], b"1")
            with pytest.raises(shardkv.Conflict):
                await db.write([("put", TAGGED[0], b"x"), ("expect", TAGGED[1], None)])
            assert await db.get_many(TAGGED) == [b"1", b"2", b"3"]
            await db.put(b"t", b"x", ttl=20)
            assert 10 < await db.ttl(b"t") <= 20
            if ordered:
                got = [k async for k, _ in db.scan(prefix=b"a00")]
                assert got == [b"a000", b"a002", b"a003", b"a004", b"a005", b"a006", b"a007", b"a008", b"a009"]
                assert [k async for k, _ in db.scan(prefix=b"a09", reverse=True, limit=2)] == [b"a099", b"a098"]
            with pytest.raises(TypeError):
                await db.get("text")
        with pytest.raises(shardkv.Closed):
            await db.get(b"a007")

    asyncio.run(main())
    assert backend.db.get(TAGGED[2]) == b"3"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_update_takes_what_dict_update_takes(backend):
    db = backend.db

    class KeysOnly:  # dict.update's "has keys()" rule
        def keys(self):
            return [b"ko"]

        def __getitem__(self, key):
            return b"from keys()"

    db.update({b"u-%04d" % i: b"%d" % i for i in range(2500)})  # more than one batch
    db.update([(b"p", b"1")])
    db.update(KeysOnly())
    db.update()
    assert db[b"u-2499"] == b"2499" and db[b"p"] == b"1" and db[b"ko"] == b"from keys()"
    with pytest.raises(TypeError):
        db.update([(b"only-one",)])
    with pytest.raises(TypeError):
        db.update(k="a str key where bytes are wanted")
