"""Hostile arguments through the public API of a blocking client, checked against a dict model.

Hypothesis calls `shardkv.open()` clients with arbitrary Python values of every type and of sizes
around every limit: keys and values (str, int, None, float, list, dict, bytearray, memoryviews
of every shape, bytes of 0, 1, 64 KiB, 64 KiB + 1 bytes and far beyond), ttl values (negative,
zero, NaN, inf, bool, str, huge), scan bounds and limits of wrong types and values, batches
(`write`, `put_many`, `batch()`) with malformed tuples, wrong arities, unknown operation names
and bad expects, `cas`, `expire`, `ttl`, `get_many` with mixed lists, `compact(shard=...)`.

The property, for every call:
- it works, or raises TypeError / ValueError (bad arguments), shardkv.Conflict (a failed
  precondition) or KeyError (`db[k]`, `del db[k]` of a missing key) -- never another exception,
  never a hang (watchdog), never a crash or restart of a worker or of the coordinator;
- what it did agrees with a dict model that follows README.md ("API"): a call the model
  considers valid must work and return what the model says, a call with bad arguments must
  raise TypeError or ValueError, and afterwards the store holds exactly the model's content
  (checked through scan, len and get_many after every call).

Where README.md leaves a case open (a bytes subclass or an array.array as a key, operations as
lists instead of tuples, a non-bool `reverse`, `x in db` for a non-key), both readings are
accepted: the strict one (TypeError or ValueError) and the liberal one (Python duck typing).

Each test function opens one cluster (through the `cluster` fixture of cluster_support, which
checks that no process and no /dev/shm entry is left) and reuses it across its examples; the
store is emptied at the start of every example. The last test runs a RuleBasedStateMachine of
valid operations (put, delete, cas, put_many, write with expects, batch, get_many, scan, len) on
a small key alphabet spread over both shards, so that cross-shard batches and Conflicts happen.
"""

from __future__ import annotations

import array
import inspect
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import shardkv
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, MAX_KEY_LEN

from cluster_support import SHARDS, cluster_fixture

pytestmark = pytest.mark.soak


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


# No "explain" phase: it replays a failing example many times over, each a round of cluster calls.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]


def hypothesis_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # leave nothing behind (no .hypothesis/ entries)
        phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example, HealthCheck.filter_too_much],
    )


# -- sizes, pools and strategies ---------------------------------------------------------------------
KIB64 = 64 * 1024
assert MAX_KEY_LEN == KIB64
SLOT = 128 * 1024  # one ring slot: longer messages travel in several frames
EXPECT_LIMIT = 2**31 - 1  # an expected value (cas, expect) may be as long as the log format allows
HUGE = bytes(DEFAULT_MAX_VALUE_SIZE + 1)  # zero pages: costs no memory until something reads it
# Strategies draw the over-limit value as a memoryview: hypothesis prints drawn values with
# repr() when it reports a failure, and repr(HUGE) would be a string of 256 MiB. The exact
# bytes object goes through every path in test_size_limits_exactly.
HUGE_VIEW = memoryview(HUGE)
SMALL_LIMITS = {"max_batch_ops": 4, "max_batch_bytes": 1000}
DEFAULT_LIMITS = {"max_batch_ops": 1_000_000, "max_batch_bytes": 384 * 1024 * 1024}

VALID_KEYS = [b"a", b"b", b"c", b"\x00", b"\xff\xfe", b"k" * KIB64]
BAD_LENGTH_KEYS = [b"", b"k" * (KIB64 + 1), b"h" * (1 << 20)]
VALID_VALUES = [b"", b"\x00", b"v1", b"v2", b"x" * 1000, b"y" * (KIB64 + 1), b"z" * (2 * SLOT + 3)]
BOUNDS_POOL = [b"", b"\x00", b"a", b"b", b"c", b"k", b"\xff", b"k" * KIB64, b"k" * (KIB64 + 1), b"h" * (1 << 20)]

SHORT_TTL = 0.005  # valid ttls are either at most this (gone before the next check) ...
LONG_TTL = 3600.0  # ... or at least this (outlive the test); the model knows nothing in between
TTL_MS_LIMIT = 2**53


class BytesSubclass(bytes):
    pass


class UserAbort(Exception):
    """Raised by the test inside a `with db.batch()` block: the batch must be discarded."""


def _released() -> memoryview:
    view = memoryview(b"gone")
    view.release()
    return view


def _strided(raw: bytes) -> memoryview:
    doubled = bytearray(2 * len(raw))
    doubled[::2] = raw
    return memoryview(doubled)[::2]  # not contiguous


def _words(raw: bytes):
    return memoryview(raw).cast("I") if raw and len(raw) % 4 == 0 else memoryview(raw)  # len() counts words


def _two_d(raw: bytes):
    return memoryview(raw).cast("B", (2, len(raw) // 2)) if raw and len(raw) % 2 == 0 else bytearray(raw)


def _mv_of_bytearray(raw: bytes) -> memoryview:
    return memoryview(bytearray(raw))


PRESENTERS = [bytes, bytearray, memoryview, _mv_of_bytearray, _strided, _words, _two_d]


def pick(pool) -> st.SearchStrategy:
    """One of `pool` (drawn by index: hypothesis never has to show a 64 MiB literal)."""
    pool = list(pool)
    return st.integers(0, len(pool) - 1).map(lambda i: pool[i])


def weighted(*choices) -> st.SearchStrategy:
    """One of several strategies, chosen with the given weights (hypothesis flattens nested
    one_of()s into one uniform choice: a pool of 15 junk types would drown the valid values)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def bytes_like(pool) -> st.SearchStrategy:
    """A bytes-like object (bytes, bytearray, memoryviews of every shape) holding one of `pool`."""
    return st.tuples(pick(pool), st.sampled_from(PRESENTERS)).map(lambda t: t[1](t[0]))


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**64, -(2**63), 10**400]),
    st.floats(),
    st.text(max_size=6),
    st.complex_numbers(max_magnitude=10, allow_nan=False),
    st.lists(st.binary(max_size=3), max_size=3),
    st.tuples(st.binary(min_size=1, max_size=3)),
    st.dictionaries(st.binary(max_size=2), st.binary(max_size=2), max_size=2),
    st.frozensets(st.binary(max_size=2), max_size=2),
    st.builds(object),
    st.builds(_released),
    st.binary(min_size=1, max_size=4).map(BytesSubclass),
    st.binary(min_size=1, max_size=4).map(lambda b: array.array("B", b)),
)
VALID_KEY = bytes_like(VALID_KEYS)
VALID_VALUE = bytes_like(VALID_VALUES)
KEYS = weighted((6, VALID_KEY), (1, bytes_like(BAD_LENGTH_KEYS)), (3, JUNK))
VALUES = weighted((6, VALID_VALUE), (1, st.just(HUGE_VIEW)), (3, JUNK))
OPTIONAL_VALUES = weighted((1, st.none()), (4, VALUES))
HASHABLE_KEYS = KEYS.filter(lambda k: _hashable(k))


def _hashable(obj) -> bool:
    try:
        hash(obj)
    except Exception:  # noqa: BLE001 - unhashable types and memoryviews of other formats
        return False
    return True


# ttl values. Positive ints too large for a float are kept apart (HUGE_INT_TTLS): they are
# exercised by test_ttl_arguments_of_every_kind, and left out of the other tests so that those
# report their own findings.
SHORT_TTLS = [5e-324, 1e-300, 1e-9, 0.001, 0.004, SHORT_TTL]
LONG_TTLS = [3600, 86400.5, 10**6, TTL_MS_LIMIT // 1000 - 1, (TTL_MS_LIMIT - 1) / 1000, 9007199254740]
BAD_TTLS = [0, 0.0, -0.0, -1, -1e-9, -(10**400), float("nan"), float("inf"), -float("inf"), TTL_MS_LIMIT / 1000, TTL_MS_LIMIT // 1000 + 1,
            1e300, 1.7e308, 10**20, 2**64, True, False, "5", b"5", [5], (5,), 5j, object()]
HUGE_INT_TTLS = [10**400, 2**1024, 2**1100 + 1]
FINITE_TTLS = st.one_of(
    st.none(),
    pick(SHORT_TTLS + LONG_TTLS),
    pick(BAD_TTLS),
    st.integers(max_value=0),
    st.integers(min_value=int(LONG_TTL), max_value=2**62),
    st.floats().filter(lambda x: not SHORT_TTL < x < LONG_TTL),
    st.text(max_size=3),
)
ALL_TTLS = st.one_of(FINITE_TTLS, pick(HUGE_INT_TTLS), st.integers(min_value=2**1024, max_value=2**1200))


class IterOf:
    """An argument given as a one-shot iterator over `items` (the model reads the list)."""

    def __init__(self, items):
        self.items = list(items)

    def __repr__(self) -> str:
        return f"iter({describe(self.items)})"


def describe(obj) -> str:
    """A short, readable repr (memoryviews and long bytes included)."""
    if isinstance(obj, (bytes, bytearray)) and len(obj) > 24:
        return f"{type(obj).__name__}(<{len(obj)} bytes {bytes(obj[:6])!r}...>)"
    if isinstance(obj, memoryview):
        try:
            content = f"<{obj.nbytes} bytes>" if obj.nbytes > 24 else repr(obj.tobytes())
            return f"memoryview(format={obj.format!r}, shape={obj.shape}, contiguous={obj.contiguous}, {content})"
        except ValueError:
            return "memoryview(<released>)"
    if isinstance(obj, list):
        return "[" + ", ".join(describe(x) for x in obj) + "]"
    if isinstance(obj, tuple):
        return "(" + ", ".join(describe(x) for x in obj) + ("," if len(obj) == 1 else "") + ")"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{describe(k)}: {describe(v)}" for k, v in obj.items()) + "}"
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Call:
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    client: str = "db"

    def __repr__(self) -> str:
        parts = [describe(a) for a in self.args] + [f"{k}={describe(v)}" for k, v in self.kwargs.items()]
        return f"{self.client}.{self.name}({', '.join(parts)})"


def call(name, *args, client="db", **kwargs) -> st.SearchStrategy:
    return st.tuples(st.tuples(*args), st.fixed_dictionaries(kwargs)).map(lambda t: Call(name, t[0], t[1], client))


# -- the model -------------------------------------------------------------------------------------
UNKNOWN = "unknown"  # a ttl the model does not predict (after cas)


class Bad(Exception):
    """The model's verdict: these arguments must raise TypeError or ValueError."""


@dataclass
class State:
    data: dict = field(default_factory=dict)
    ttls: dict = field(default_factory=dict)  # key -> (asked seconds, set at monotonic) | UNKNOWN; absent: permanent
    expiring: set = field(default_factory=set)  # keys given a short ttl: gone by the next check

    def copy(self) -> "State":
        return State(dict(self.data), dict(self.ttls), set(self.expiring))

    def set(self, key: bytes, value: bytes, ttl) -> None:
        self.data[key] = value
        self.set_ttl(key, ttl)

    def set_ttl(self, key: bytes, ttl) -> None:
        self.ttls.pop(key, None)
        self.expiring.discard(key)
        if ttl is None:
            return
        if ttl is UNKNOWN:
            self.ttls[key] = UNKNOWN
        elif ttl <= SHORT_TTL:
            self.expiring.add(key)
        elif ttl >= LONG_TTL:
            self.ttls[key] = (ttl, time.monotonic())
        else:
            raise AssertionError(f"the test generated a ttl of {ttl!r} s, which the model cannot follow")

    def remove(self, key: bytes) -> None:
        self.data.pop(key, None)
        self.ttls.pop(key, None)
        self.expiring.discard(key)


@dataclass
class Outcome:
    kind: str  # "ok", "bad", "conflict", "missing" (KeyError), "abort" (UserAbort)
    state: State | None = None
    check: object = None  # for "ok": callable(result) -> bool
    expected: str = ""

    def __repr__(self) -> str:
        return self.kind + (f"({self.expected})" if self.expected else "")


BAD = Outcome("bad")
CONFLICT = Outcome("conflict")
MISSING = Outcome("missing")
ABORT = Outcome("abort")


def same(result, expected) -> bool:
    """Equal, and of the same types all the way down (bytes, not bytearray or memoryview)."""
    if type(result) is not type(expected):
        return False
    if isinstance(expected, (list, tuple)):
        return len(result) == len(expected) and all(same(r, e) for r, e in zip(result, expected))
    return result == expected


def ok(state: State, expected=None, check=None) -> Outcome:
    if check is None:
        check = lambda result: same(result, expected)  # noqa: E731
    return Outcome("ok", state, check, describe(expected))


def to_bytes(obj, liberal: bool) -> bytes:
    if type(obj) is bytes:
        return obj
    if isinstance(obj, (bytearray, memoryview)) or (liberal and isinstance(obj, (bytes, array.array))):
        try:
            return bytes(obj)
        except ValueError:  # a released memoryview
            raise Bad from None
    raise Bad


def key_of(obj, liberal: bool) -> bytes:
    key = to_bytes(obj, liberal)
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise Bad
    return key


def value_of(obj, liberal: bool, limit: int = DEFAULT_MAX_VALUE_SIZE) -> bytes:
    value = to_bytes(obj, liberal)
    if len(value) > limit:
        raise Bad
    return value


def optional_value_of(obj, liberal: bool, limit: int = DEFAULT_MAX_VALUE_SIZE):
    return None if obj is None else value_of(obj, liberal, limit)


def ttl_of(ttl):
    """A valid ttl in seconds (README: a positive, finite number of seconds; not a bool)."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise Bad
    if isinstance(ttl, int):
        valid = 0 < ttl and ttl * 1000 < TTL_MS_LIMIT
    else:
        valid = ttl > 0 and math.isfinite(ttl) and ttl * 1000 < TTL_MS_LIMIT
    if not valid:
        raise Bad
    return ttl


def iterate(obj, liberal: bool, what: str):
    """The items of an iterable argument (strictly: not a str or a bytes-like object)."""
    if isinstance(obj, IterOf):
        return obj.items
    if not liberal and isinstance(obj, (str, bytes, bytearray, memoryview, array.array)):
        raise Bad
    try:
        return list(obj)
    except (TypeError, ValueError):
        raise Bad from None


def op_of(op, liberal: bool):
    """One batch operation as ("put", key, value, ttl) | ("delete", key) | ("expect", key, value)."""
    if not (isinstance(op, tuple) or (liberal and isinstance(op, list))):
        raise Bad
    if not op or not isinstance(op[0], str):
        raise Bad
    name = op[0]
    if name == "put" and len(op) in (3, 4):
        key, value = key_of(op[1], liberal), value_of(op[2], liberal)
        return ("put", key, value, ttl_of(op[3]) if len(op) == 4 and op[3] is not None else None)
    if name == "delete" and len(op) == 2:
        return ("delete", key_of(op[1], liberal))
    if name == "expect" and len(op) == 3:
        return ("expect", key_of(op[1], liberal), optional_value_of(op[2], liberal, EXPECT_LIMIT))
    raise Bad


def apply_batch(state: State, ops: list, limits: dict) -> Outcome:
    """All or nothing: limits, then every expect against the state before the batch, then the
    writes in order."""
    size = 0
    for op in ops:
        size += len(op[1]) + (len(op[2]) if len(op) > 2 and op[2] is not None else 0)
    if len(ops) > limits["max_batch_ops"] or size > limits["max_batch_bytes"]:
        raise Bad
    for op in ops:
        if op[0] == "expect" and state.data.get(op[1]) != op[2]:
            return CONFLICT
    new = state.copy()
    for op in ops:
        if op[0] == "put":
            new.set(op[1], op[2], op[3])
        elif op[0] == "delete":
            new.remove(op[1])
    return ok(new, None)


def model_scan(data: dict, start, stop, reverse, prefix, limit) -> list:
    items = sorted(
        (k, v) for k, v in data.items() if (start is None or k >= start) and (stop is None or k < stop) and (prefix is None or k.startswith(prefix))
    )
    if reverse:
        items.reverse()
    return items if limit is None else items[:limit]


def ttl_check(state: State, key: bytes):
    if key not in state.data:
        return lambda result: result is None, "None"
    if key not in state.ttls:
        return lambda result: result == math.inf, "math.inf (never expires)"
    entry = state.ttls[key]
    if entry is UNKNOWN:
        return lambda result: result is None or (isinstance(result, (int, float)) and result >= 0), "None or a number"
    asked, set_at = entry

    def check(result) -> bool:
        elapsed = time.monotonic() - set_at
        return isinstance(result, float) and asked - elapsed - 5 <= result <= asked * (1 + 1e-12) + 0.002

    return check, f"about {asked} s"


class Model:
    """One method per call, with the API's signature after (state, liberal, limits). Each
    returns an Outcome (or a list of acceptable ones) or raises Bad."""

    def put(self, s, lib, lim, key, value, ttl=None):
        key, value = key_of(key, lib), value_of(value, lib)
        ttl = None if ttl is None else ttl_of(ttl)
        new = s.copy()
        new.set(key, value, ttl)
        return ok(new, None)

    def setitem(self, s, lib, lim, key, value):
        return self.put(s, lib, lim, key, value)

    def get(self, s, lib, lim, key, default=None):
        key = key_of(key, lib)
        if key in s.data:
            return ok(s, s.data[key])
        return ok(s, default, check=lambda result: result is default)

    def getitem(self, s, lib, lim, key):
        key = key_of(key, lib)
        return ok(s, s.data[key]) if key in s.data else MISSING

    def contains(self, s, lib, lim, key):
        try:
            key = key_of(key, lib)
        except Bad:
            return [BAD, ok(s, False)]
        return ok(s, key in s.data)

    def delete(self, s, lib, lim, key):
        key = key_of(key, lib)
        new = s.copy()
        new.remove(key)
        return ok(new, key in s.data)

    def delitem(self, s, lib, lim, key):
        key = key_of(key, lib)
        if key not in s.data:
            return MISSING
        new = s.copy()
        new.remove(key)
        return ok(new, None)

    def cas(self, s, lib, lim, key, expected, new):
        key = key_of(key, lib)
        expected = optional_value_of(expected, lib, EXPECT_LIMIT)
        new_value = optional_value_of(new, lib)
        if s.data.get(key) != expected:
            return ok(s, False)
        after = s.copy()
        if new_value is None:
            after.remove(key)
        else:
            after.set(key, new_value, UNKNOWN)  # README does not say whether cas keeps a ttl
        return ok(after, True)

    def ttl(self, s, lib, lim, key):
        key = key_of(key, lib)
        check, text = ttl_check(s, key)
        return Outcome("ok", s, check, text)

    def expire(self, s, lib, lim, key, seconds):
        key = key_of(key, lib)
        seconds = None if seconds is None else ttl_of(seconds)
        if key not in s.data:
            return ok(s, False)
        new = s.copy()
        new.set_ttl(key, seconds)
        return ok(new, True)

    def get_many(self, s, lib, lim, keys):
        keys = [key_of(k, lib) for k in iterate(keys, lib, "keys")]
        return ok(s, [s.data.get(k) for k in keys])

    def scan(self, s, lib, lim, start=None, stop=None, reverse=False, prefix=None, limit=None):
        start, stop, prefix = (None if b is None else to_bytes(b, lib) for b in (start, stop, prefix))
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise Bad
        if limit is not None and limit < 0:
            raise Bad
        if lib:
            try:
                reverse = bool(reverse)
            except Exception:  # noqa: BLE001 - e.g. a released memoryview
                raise Bad from None
        elif type(reverse) is not bool:
            raise Bad
        return ok(s, model_scan(s.data, start, stop, reverse, prefix, limit))

    def min(self, s, lib, lim):
        items = model_scan(s.data, None, None, False, None, 1)
        return ok(s, items[0] if items else None)

    def max(self, s, lib, lim):
        items = model_scan(s.data, None, None, True, None, 1)
        return ok(s, items[0] if items else None)

    def above(self, s, lib, lim, key):
        key = key_of(key, lib)
        items = [(k, v) for k, v in sorted(s.data.items()) if k > key]
        return ok(s, items[0] if items else None)

    def below(self, s, lib, lim, key):
        key = key_of(key, lib)
        items = [(k, v) for k, v in sorted(s.data.items()) if k < key]
        return ok(s, items[-1] if items else None)

    def len(self, s, lib, lim):
        return ok(s, len(s.data))

    def list(self, s, lib, lim):
        return ok(s, sorted(s.data))

    def write(self, s, lib, lim, ops):
        if not isinstance(ops, IterOf) and isinstance(ops, Mapping):
            raise Bad
        return apply_batch(s, [op_of(op, lib) for op in iterate(ops, lib, "ops")], lim)

    def put_many(self, s, lib, lim, items):
        if isinstance(items, Mapping):
            pairs = list(items.items())
        else:
            pairs = iterate(items, lib, "items")
            for pair in pairs:
                if not (isinstance(pair, tuple) or (lib and isinstance(pair, list))) or len(pair) != 2:
                    raise Bad
        return apply_batch(s, [op_of(("put", k, v), lib) for k, v in pairs], lim)

    def batch(self, s, lib, lim, steps, abort_at):
        ops = []
        for i, (name, args, kwargs) in enumerate(steps):
            if i == abort_at:
                return ABORT
            try:
                bound = inspect.signature(BATCH_SIGNATURES[name]).bind(*args, **kwargs)
            except TypeError:
                raise Bad from None
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            if name == "put":
                ops.append(op_of(("put", arguments["key"], arguments["value"], arguments["ttl"]), lib))
            elif name == "delete":
                ops.append(op_of(("delete", arguments["key"]), lib))
            else:
                ops.append(op_of(("expect", arguments["key"], arguments["value"]), lib))
        if abort_at == len(steps):
            return ABORT
        return apply_batch(s, ops, lim)

    def compact(self, s, lib, lim, shard=None):
        if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < SHARDS):
            raise Bad

        def check(result) -> bool:
            return isinstance(result, list) and len(result) == (SHARDS if shard is None else 1) and all(isinstance(r, dict) for r in result)

        return Outcome("ok", s, check, "a list of compaction results")


def _batch_put(key, value, ttl=None): ...
def _batch_delete(key): ...
def _batch_expect(key, value): ...


BATCH_SIGNATURES = {"put": _batch_put, "delete": _batch_delete, "expect": _batch_expect}
MODEL = Model()


def expected_outcomes(call: Call, state: State, limits: dict) -> list[Outcome]:
    """The acceptable outcomes of `call`: the strict and the liberal reading of the README."""
    method = getattr(MODEL, call.name)
    outcomes = []
    for liberal in (False, True):
        try:
            inspect.signature(method).bind(state, liberal, limits, *call.args, **call.kwargs)
        except TypeError:
            outcomes.append(BAD)  # a wrong number of arguments or an unknown keyword
            continue
        try:
            found = method(state, liberal, limits, *call.args, **call.kwargs)
        except Bad:
            found = BAD
        outcomes.extend(found if isinstance(found, list) else [found])
    return outcomes


def execute(client, call: Call):
    args, kwargs = tuple(iter(a.items) if isinstance(a, IterOf) else a for a in call.args), call.kwargs
    name = call.name
    if name == "scan":
        return list(client.scan(*args, **kwargs))
    if name == "contains":
        return args[0] in client
    if name == "getitem":
        return client[args[0]]
    if name == "setitem":
        client[args[0]] = args[1]
        return None
    if name == "delitem":
        del client[args[0]]
        return None
    if name == "len":
        return len(client)
    if name == "list":
        return list(client)
    if name == "batch":
        steps, abort_at = args
        with client.batch() as b:
            for i, (step, step_args, step_kwargs) in enumerate(steps):
                if i == abort_at:
                    raise UserAbort
                getattr(b, step)(*step_args, **step_kwargs)
            if abort_at == len(steps):
                raise UserAbort
        return None
    return getattr(client, name)(*args, **kwargs)


# -- the harness around one cluster ---------------------------------------------------------------
def process_table(db) -> dict:
    health = db.health()
    return {
        "status": health["status"],
        "coordinator": (health["coordinator"]["pid"], health["coordinator"]["state"], health["coordinator"]["restarts"]),
        "shards": [(s["pid"], s["state"], s["restarts"], s["in_doubt"]) for s in health["shards"]],
    }


class Harness:
    """Clients of one cluster, the model, and the checks made after every call."""

    def __init__(self, cluster, small_client: bool = False):
        self.cluster = cluster
        self.clients = {"db": cluster.open()}
        self.limits = {"db": DEFAULT_LIMITS}
        if small_client:
            self.clients["small"] = cluster.open(**SMALL_LIMITS)
            self.limits["small"] = SMALL_LIMITS
        self.db = self.clients["db"]
        assert self.db.shards == SHARDS
        assert len({self.db.shard_of(k) for k in VALID_KEYS}) == SHARDS, "the key pool should span every shard"
        self.baseline = process_table(self.db)
        assert self.baseline["status"] == "healthy", self.baseline
        assert self.baseline["coordinator"][2] == 0 and all(s[2] == 0 for s in self.baseline["shards"]), self.baseline
        self.state = State()

    def reset(self, initial: dict | None = None) -> None:
        db = self.db
        for key, _ in list(db.scan()):
            db.delete(key)
        self.state = State()
        if initial:
            db.put_many(initial)
            self.state.data.update(initial)
        self.check_store("at the start of the example")

    def check_store(self, after: str) -> None:
        db, data = self.db, self.state.data
        content = dict(self.db.scan())
        if content != data:
            extra = {describe(k): describe(v) for k, v in content.items() if data.get(k) != v}
            lacking = {describe(k): describe(v) for k, v in data.items() if content.get(k) != v}
            raise AssertionError(f"{after}: the store differs from the model; in the store only (or different): {extra}; in the model only: {lacking}")
        assert len(db) == len(data), f"{after}: len(db) is {len(db)}, the model has {len(data)} keys"
        probe = VALID_KEYS + [b"zz-absent"]
        assert db.get_many(probe) == [data.get(k) for k in probe], f"{after}: get_many disagrees with the model"

    def check_processes(self, after: str) -> None:
        now = process_table(self.db)
        assert now == self.baseline, f"{after}: the cluster's processes changed (a crash and a restart?): {self.baseline} -> {now}"

    def run(self, call: Call) -> None:
        note(f"call {call!r}")
        before = self.state
        outcomes = expected_outcomes(call, before, self.limits[call.client])
        try:
            result = execute(self.clients[call.client], call)
        except BaseException as exc:  # noqa: BLE001 - classified below
            if isinstance(exc, UserAbort):
                kind = "abort"
            elif isinstance(exc, KeyError):
                kind = "missing"
            elif isinstance(exc, shardkv.Conflict):
                kind = "conflict"
            elif isinstance(exc, (TypeError, ValueError)):
                kind = "bad"
            elif isinstance(exc, shardkv.Error):
                raise AssertionError(f"{call!r} raised {exc!r}: no shardkv.Error other than Conflict is expected here (model: {outcomes})") from exc
            else:
                raise AssertionError(f"{call!r} raised {type(exc).__name__}, not TypeError, ValueError or shardkv.Error: {exc!r} (model: {outcomes})") from exc
            if not any(o.kind == kind for o in outcomes):
                raise AssertionError(f"{call!r} raised {exc!r}, but the model expects {outcomes}") from exc
            self.check_store(f"after {call!r} raised {exc!r}")
        else:
            matching = [o for o in outcomes if o.kind == "ok" and o.check(result)]
            if not matching:
                raise AssertionError(f"{call!r} returned {describe(result)}, but the model expects {outcomes}")
            self.state = matching[0].state
            if self.state.expiring:
                time.sleep(2 * SHORT_TTL + 0.002)
                self.state = self.state.copy()
                for key in list(self.state.expiring):
                    self.state.remove(key)
            self.check_store(f"after {call!r} returned {describe(result)}")

    def run_example(self, calls: list[Call], initial: dict | None = None) -> None:
        with self.cluster.watchdog(60, "one example"):
            self.reset(initial)
            for c in calls:
                self.run(c)
            self.check_processes("after the example")


INITIAL = st.dictionaries(pick(VALID_KEYS), pick(VALID_VALUES[:5]), min_size=2, max_size=6)


# -- single-key calls ----------------------------------------------------------------------------------
def single_key_calls(ttls) -> st.SearchStrategy:
    return st.one_of(
        call("put", KEYS, VALUES),
        call("put", KEYS, VALUES, ttl=ttls),
        call("put", VALID_KEY, VALID_VALUE, ttl=ttls),
        call("get", KEYS),
        call("get", KEYS, JUNK),
        call("delete", KEYS),
        call("cas", KEYS, OPTIONAL_VALUES, OPTIONAL_VALUES),
        call("cas", VALID_KEY, st.one_of(st.none(), VALID_VALUE), st.one_of(st.none(), VALID_VALUE)),
        call("contains", KEYS),
        call("getitem", KEYS),
        call("setitem", KEYS, VALUES),
        call("delitem", KEYS),
        call("ttl", KEYS),
        call("expire", KEYS, ttls),
        call("expire", VALID_KEY, ttls),
        # wrong arities and keywords
        call("put", KEYS),
        call("put", KEYS, VALUES, ttls, JUNK),
        call("put", VALID_KEY, VALID_VALUE, tll=ttls),
        call("get"),
        call("cas", KEYS, OPTIONAL_VALUES),
        call("expire", KEYS),
        call("delete", KEYS, JUNK),
    )


def test_single_key_calls_with_arbitrary_arguments(cluster):
    harness = Harness(cluster)

    @hypothesis_settings(120)
    @given(initial=INITIAL, calls=st.lists(single_key_calls(FINITE_TTLS), min_size=1, max_size=10))
    def check(initial, calls):
        harness.run_example(calls, initial)

    check()
    harness.check_processes("at the end")


def test_ttl_arguments_of_every_kind(cluster):
    """put(ttl=), expire(), ("put", k, v, ttl) in write() and batch.put(ttl=) with every kind of
    ttl, positive ints too large for a float included."""
    harness = Harness(cluster)
    calls = st.one_of(
        call("put", VALID_KEY, VALID_VALUE, ttl=ALL_TTLS),
        call("expire", VALID_KEY, ALL_TTLS),
        call("ttl", VALID_KEY),
        call("get", VALID_KEY),
        call("write", st.lists(st.tuples(st.just("put"), VALID_KEY, VALID_VALUE, ALL_TTLS), min_size=1, max_size=3)),
        call("batch", st.lists(st.tuples(st.just("put"), st.tuples(VALID_KEY, VALID_VALUE), st.fixed_dictionaries({"ttl": ALL_TTLS})), max_size=3), st.none()),
    )

    @hypothesis_settings(80)
    @given(initial=INITIAL, calls=st.lists(calls, min_size=1, max_size=8))
    def check(initial, calls):
        harness.run_example(calls, initial)

    check()
    harness.check_processes("at the end")


# -- multi-key reads -----------------------------------------------------------------------------------
BOUNDS = weighted((5, st.none()), (4, bytes_like(BOUNDS_POOL)), (1, JUNK))
PREFIXES = weighted((5, st.none()), (3, bytes_like([b"", b"a", b"k", b"\xff"])), (1, bytes_like(BOUNDS_POOL)), (1, JUNK))
LIMITS = weighted((2, st.none()), (5, st.integers(-2, 4)), (1, st.sampled_from([2**31, 2**32, 2**64, 10**30, -(10**30), 1.0, True, False, "3"])), (2, JUNK))
REVERSE = weighted((8, st.booleans()), (2, JUNK))
KEY_LISTS = weighted(
    (3, st.lists(VALID_KEY, max_size=8)),
    (2, st.lists(KEYS, max_size=6)),
    (1, st.lists(VALID_KEY, max_size=8).map(tuple)),
    (1, st.lists(VALID_KEY, max_size=8).map(IterOf)),
    (1, st.dictionaries(pick(VALID_KEYS), JUNK, max_size=3)),
    (1, st.lists(pick(VALID_KEYS), min_size=60, max_size=200)),  # duplicates, several frames of answer
    (1, JUNK),
)


def read_calls() -> st.SearchStrategy:
    return weighted(
        (3, call("put", VALID_KEY, VALID_VALUE)),
        (1, call("delete", VALID_KEY)),
        (4, call("get_many", KEY_LISTS)),
        (1, call("get_many")),
        (1, call("get_many", KEY_LISTS, JUNK)),
        (6, call("scan", start=BOUNDS, stop=BOUNDS, reverse=REVERSE, prefix=PREFIXES, limit=LIMITS)),
        (
            3,
            st.fixed_dictionaries({}, optional={"start": BOUNDS, "stop": BOUNDS, "reverse": REVERSE, "prefix": PREFIXES, "limit": LIMITS}).map(
                lambda kwargs: Call("scan", (), kwargs)
            ),
        ),
        (2, st.lists(weighted((1, BOUNDS), (1, REVERSE), (1, LIMITS)), max_size=6).map(lambda args: Call("scan", tuple(args)))),
        (1, call("scan", BOUNDS, BOUNDS, REVERSE, BOUNDS, LIMITS, stat=JUNK)),
        (1, call("min")),
        (1, call("max")),
        (1, call("above", KEYS)),
        (1, call("below", KEYS)),
        (1, call("above", bytes_like(BOUNDS_POOL))),
        (1, call("below", bytes_like(BOUNDS_POOL))),
        (1, call("len")),
        (1, call("list")),
    )


def test_multi_key_reads_with_bad_arguments(cluster):
    harness = Harness(cluster)

    @hypothesis_settings(120)
    @given(initial=INITIAL, calls=st.lists(read_calls(), min_size=1, max_size=10))
    def check(initial, calls):
        harness.run_example(calls, initial)

    check()
    harness.check_processes("at the end")


# -- atomic batches --------------------------------------------------------------------------------
VALID_OP = st.one_of(
    st.tuples(st.just("put"), VALID_KEY, VALID_VALUE),
    st.tuples(st.just("put"), VALID_KEY, VALID_VALUE, st.one_of(st.none(), pick(SHORT_TTLS + LONG_TTLS))),
    st.tuples(st.just("delete"), VALID_KEY),
    st.tuples(st.just("expect"), VALID_KEY, st.one_of(st.none(), VALID_VALUE)),
)
ANY_OP = weighted(
    (8, VALID_OP),
    (1, VALID_OP.map(list)),
    (1, st.tuples(st.just("put"), KEYS, VALUES)),
    (1, st.tuples(st.just("put"), KEYS, VALUES, FINITE_TTLS)),
    (1, st.tuples(st.just("delete"), KEYS)),
    (1, st.tuples(st.just("expect"), KEYS, OPTIONAL_VALUES)),
    (1, st.tuples(st.just("expect"), VALID_KEY, pick([HUGE_VIEW, b"x" * (KIB64 + 1)]))),
    # wrong arities
    (1, st.tuples(st.sampled_from(["put", "delete", "expect"]), st.lists(weighted((1, VALID_KEY), (1, VALID_VALUE), (1, st.none())), max_size=5)).map(lambda t: (t[0], *t[1]))),
    # unknown names, names of other types, not a tuple at all
    (1, st.tuples(st.sampled_from(["PUT", "get", "del", "", "put ", "expect_absent", "Delete", "cas"]), VALID_KEY, VALID_VALUE)),
    (1, st.tuples(st.sampled_from([b"put", None, 1, ("put",), ["delete"]]), VALID_KEY, VALID_VALUE)),
    (1, st.sampled_from(["put", b"put", (), [], ("delete",), ("put", b"k")])),
    (1, JUNK),
)
OP_LISTS = weighted(
    (4, st.lists(VALID_OP, max_size=6)),
    (4, st.lists(ANY_OP, max_size=5)),
    (1, st.lists(VALID_OP, max_size=6).map(tuple)),
    (1, st.lists(VALID_OP, max_size=6).map(IterOf)),
    (1, st.lists(VALID_OP, max_size=6).map(lambda ops: {op: None for op in ops if _hashable(op)})),
    (1, st.sampled_from(["put", b"put", ("put", b"a", b"1")])),
    (1, JUNK),
)
PAIRS = weighted(
    (3, st.dictionaries(pick(VALID_KEYS), VALID_VALUE, max_size=5)),
    (1, st.dictionaries(HASHABLE_KEYS, VALUES, max_size=3)),
    (3, st.lists(st.tuples(VALID_KEY, VALID_VALUE), max_size=5)),
    (1, st.lists(st.tuples(KEYS, VALUES), max_size=3)),
    (1, st.lists(st.lists(weighted((1, VALID_KEY), (1, VALID_VALUE)), min_size=1, max_size=3), max_size=3)),
    (1, st.lists(st.tuples(VALID_KEY, VALID_VALUE), max_size=5).map(IterOf)),
    (1, st.lists(st.tuples(VALID_KEY, VALID_VALUE, VALID_VALUE), min_size=1, max_size=2)),
    (1, JUNK),
)
BATCH_STEP = weighted(
    (3, st.tuples(st.just("put"), st.tuples(VALID_KEY, VALID_VALUE), st.just({}))),
    (2, st.tuples(st.just("put"), st.tuples(VALID_KEY, VALID_VALUE), st.fixed_dictionaries({"ttl": pick(SHORT_TTLS + LONG_TTLS)}))),
    (2, st.tuples(st.just("delete"), st.tuples(VALID_KEY), st.just({}))),
    (3, st.tuples(st.just("expect"), st.tuples(VALID_KEY, st.one_of(st.none(), VALID_VALUE)), st.just({}))),
    (1, st.tuples(st.just("put"), st.tuples(KEYS, VALUES), st.just({}))),
    (1, st.tuples(st.just("put"), st.tuples(KEYS, VALUES), st.fixed_dictionaries({"ttl": FINITE_TTLS}))),
    (1, st.tuples(st.just("delete"), st.tuples(KEYS), st.just({}))),
    (1, st.tuples(st.just("expect"), st.tuples(KEYS, OPTIONAL_VALUES), st.just({}))),
    (1, st.tuples(st.sampled_from(["put", "delete", "expect"]), st.lists(VALID_KEY, max_size=4).map(tuple), st.just({}))),
    (1, st.tuples(st.just("put"), st.tuples(VALID_KEY, VALID_VALUE), st.fixed_dictionaries({"tll": st.just(5)}))),
)


def batch_calls(client: str) -> st.SearchStrategy:
    return weighted(
        (8, call("write", OP_LISTS, client=client)),
        (1, call("write", client=client)),
        (1, call("write", OP_LISTS, JUNK, client=client)),
        (5, call("put_many", PAIRS, client=client)),
        (5, call("batch", st.lists(BATCH_STEP, max_size=6), weighted((3, st.none()), (1, st.integers(0, 6))), client=client)),
        (2, call("get_many", st.lists(VALID_KEY, max_size=6), client=client)),
    )


def test_atomic_batches_with_malformed_operations(cluster):
    """write(), put_many() and batch() through a client with the default limits and one with
    max_batch_ops=4, max_batch_bytes=1000."""
    harness = Harness(cluster, small_client=True)

    @hypothesis_settings(120)
    @given(initial=INITIAL, calls=st.lists(st.one_of(batch_calls("db"), batch_calls("small")), min_size=1, max_size=8))
    def check(initial, calls):
        harness.run_example(calls, initial)

    check()
    harness.check_processes("at the end")


def test_a_finished_batch_cannot_be_reused(cluster):
    harness = Harness(cluster)
    db = harness.db
    with db.batch() as b:
        b.put(b"a", b"1")
    for late in (lambda: b.put(b"b", b"2"), lambda: b.delete(b"a"), lambda: b.expect(b"a", b"1")):
        with pytest.raises(ValueError):
            late()
    with pytest.raises(UserAbort):
        with db.batch() as discarded:
            discarded.put(b"c", b"3")
            raise UserAbort
    with pytest.raises(ValueError):
        discarded.put(b"d", b"4")
    assert dict(db.scan()) == {b"a": b"1"}
    harness.check_processes("at the end")


# -- compaction ---------------------------------------------------------------------------------------
SHARD_ARGS = weighted((2, st.none()), (2, st.integers(0, SHARDS - 1)), (4, st.sampled_from([SHARDS, -1, True, False, 1.0, 0.0, "0", b"0", 10**30, -(10**30), 2**63, [0]])), (2, JUNK))


def test_compact_with_bad_shard_values(cluster):
    harness = Harness(cluster)
    calls = st.one_of(
        call("put", VALID_KEY, VALID_VALUE),
        call("put", VALID_KEY, VALID_VALUE),
        call("delete", VALID_KEY),
        call("compact", shard=SHARD_ARGS),
        call("compact", SHARD_ARGS),
        call("compact"),
    )

    @hypothesis_settings(30)
    @given(initial=INITIAL, calls=st.lists(calls, min_size=1, max_size=6))
    def check(initial, calls):
        harness.run_example(calls, initial)

    check()
    harness.check_processes("at the end")


# -- limits, exactly -------------------------------------------------------------------------------
def test_size_limits_exactly(cluster):
    """A 64 KiB key and a 64 MiB value are accepted; one byte more is a ValueError on every path
    (put, cas, write, put_many, get_many, batch), and nothing is written."""
    harness = Harness(cluster)
    db = harness.db
    big_key, big_value = b"K" * MAX_KEY_LEN, bytes(DEFAULT_MAX_VALUE_SIZE)
    db.put(big_key, big_value)
    assert db.get(big_key) == big_value
    assert db.cas(big_key, big_value, b"small") is True and db.get(big_key) == b"small"
    for reject in (
        lambda: db.put(big_key + b"K", b"v"),
        lambda: db.put(b"v", HUGE),
        lambda: db.cas(big_key, b"small", HUGE),
        lambda: db.write([("put", b"a", b"1"), ("put", b"b", HUGE)]),
        lambda: db.put_many({b"a": b"1", big_key + b"K": b"v"}),
        lambda: db.get_many([b"a", big_key + b"K"]),
    ):
        with pytest.raises(ValueError):
            reject()
    with pytest.raises(ValueError):
        with db.batch() as b:
            b.put(b"a", b"1")
            b.put(b"b", HUGE)
    assert dict(db.scan()) == {big_key: b"small"}
    assert db.delete(big_key)
    harness.check_processes("at the end")


def test_batch_limits_count_operations_and_bytes_of_keys_and_values(cluster):
    """max_batch_ops and max_batch_bytes (README: "Up to 1,000,000 operations and 384 MiB per
    batch (`open(..., max_batch_ops=, max_batch_bytes=)`); beyond, a ValueError"; docs/
    TRANSACTIONS.md: "`max_batch_bytes` bytes of keys and values") at their exact edges: a batch
    of exactly max_batch_bytes bytes of keys and values is accepted, ttl or not."""
    harness = Harness(cluster)
    db = harness.db
    small = cluster.open(max_batch_ops=2, max_batch_bytes=10)
    small.write([("put", b"k", b"123456789")])  # exactly 10 bytes
    small.write([("expect", b"k", b"123456789")])  # exactly 10 bytes
    small.write([("delete", b"z"), ("put", b"y", b"12345678")])  # exactly 2 operations, 10 bytes
    for too_big in ([("put", b"k", b"1234567890")], [("expect", b"k", b"1234567890")], [("delete", b"a"), ("delete", b"b"), ("delete", b"c")]):
        with pytest.raises(ValueError):
            small.write(too_big)
        with pytest.raises(ValueError):
            with small.batch() as b:
                for op in too_big:
                    getattr(b, op[0])(*op[1:])
    with pytest.raises(ValueError):
        small.put_many({b"a": b"1", b"b": b"2", b"c": b"3"})
    assert dict(db.scan()) == {b"k": b"123456789", b"y": b"12345678"}
    small.write([("put", b"j", b"1", 60)])  # 2 bytes of keys and values, with a ttl
    assert db.get(b"j") == b"1"
    # 10 bytes of keys and values: within the limit, ttl or not.
    try:
        small.write([("put", b"t", b"123456789", 60)])
    except ValueError as exc:
        raise AssertionError(f"a batch of exactly max_batch_bytes=10 bytes of keys and values was refused because a put has a ttl: {exc}") from exc
    assert db.get(b"t") == b"123456789"
    harness.check_processes("at the end")


# -- a state machine of valid operations ------------------------------------------------------------
MACHINE_KEYS = [b"a", b"b", b"c", b"d", b"e", b"f"]
MACHINE_VALUES = [b"", b"0", b"1", b"22", b"x" * 300]
m_keys = st.sampled_from(MACHINE_KEYS)
m_values = st.sampled_from(MACHINE_VALUES)
m_optional = st.one_of(st.none(), m_values)


class BatchMachine(RuleBasedStateMachine):
    """Valid operations, single-key and atomic batches, against a dict; a small key alphabet
    over both shards makes batches cross shards and expects fail."""

    db = None  # set by the test: one client of one cluster for every run
    counts: dict = {}

    def __init__(self):
        super().__init__()
        self.model: dict[bytes, bytes] = {}
        for key, _ in list(self.db.scan()):
            self.db.delete(key)
        assert len(self.db) == 0

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _crosses(self, keys) -> bool:
        return len({self.db.shard_of(k) for k in keys}) > 1

    def _apply(self, ops: list) -> None:
        """Run db.write(ops) and check it against the model."""
        fails = any(op[0] == "expect" and self.model.get(op[1]) != op[2] for op in ops)
        crosses = self._crosses([op[1] for op in ops])
        try:
            self.db.write(ops)
        except shardkv.Conflict:
            assert fails, f"write({ops!r}) raised Conflict but every expect holds in the model"
            self._count("cross-shard conflict" if crosses else "conflict")
            return
        assert not fails, f"write({ops!r}) succeeded although an expect fails in the model {self.model!r}"
        self._count("cross-shard batch" if crosses else "batch")
        for op in ops:
            if op[0] == "put":
                self.model[op[1]] = op[2]
            elif op[0] == "delete":
                self.model.pop(op[1], None)

    @rule(key=m_keys, value=m_values)
    def put(self, key, value):
        self.db.put(key, value)
        self.model[key] = value

    @rule(key=m_keys)
    def get(self, key):
        assert self.db.get(key) == self.model.get(key)

    @rule(key=m_keys)
    def delete(self, key):
        assert self.db.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=m_keys, data=st.data(), new=m_optional)
    def cas(self, key, data, new):
        expected = data.draw(st.one_of(st.just(self.model.get(key)), m_optional), label="expected")
        swapped = self.db.cas(key, expected, new)
        assert swapped == (self.model.get(key) == expected)
        if swapped:
            if new is None:
                self.model.pop(key, None)
            else:
                self.model[key] = new

    @rule(items=st.dictionaries(m_keys, m_values, max_size=4))
    def put_many(self, items):
        self.db.put_many(items)
        self.model.update(items)
        self._count("cross-shard batch" if self._crosses(items) else "batch")

    @rule(data=st.data())
    def write(self, data):
        op = st.one_of(
            st.tuples(st.just("put"), m_keys, m_values),
            st.tuples(st.just("delete"), m_keys),
            # an expect that holds (the model's value) or a random one
            m_keys.flatmap(lambda k: st.tuples(st.just("expect"), st.just(k), st.one_of(st.just(self.model.get(k)), m_optional))),
        )
        self._apply(data.draw(st.lists(op, max_size=6), label="ops"))

    @rule(data=st.data(), discard=st.booleans())
    def batch(self, data, discard):
        op = st.one_of(
            st.tuples(st.just("put"), m_keys, m_values),
            st.tuples(st.just("delete"), m_keys),
            m_keys.flatmap(lambda k: st.tuples(st.just("expect"), st.just(k), st.one_of(st.just(self.model.get(k)), m_optional))),
        )
        ops = data.draw(st.lists(op, max_size=6), label="ops")
        fails = any(o[0] == "expect" and self.model.get(o[1]) != o[2] for o in ops)
        try:
            with self.db.batch() as b:
                for o in ops:
                    getattr(b, o[0])(*o[1:])
                if discard:
                    raise UserAbort
        except UserAbort:
            assert discard
            return
        except shardkv.Conflict:
            assert fails and not discard
            self._count("conflict")
            return
        assert not fails and not discard
        for o in ops:
            if o[0] == "put":
                self.model[o[1]] = o[2]
            elif o[0] == "delete":
                self.model.pop(o[1], None)

    @rule(keys=st.lists(m_keys, max_size=8))
    def get_many(self, keys):
        assert self.db.get_many(keys) == [self.model.get(k) for k in keys]

    @rule(start=st.one_of(st.none(), m_keys), stop=st.one_of(st.none(), m_keys), reverse=st.booleans(),
          prefix=st.one_of(st.none(), st.sampled_from([b"", b"a", b"c", b"z"])), limit=st.one_of(st.none(), st.integers(0, 7)))
    def scan(self, start, stop, reverse, prefix, limit):
        got = list(self.db.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit))
        assert got == model_scan(self.model, start, stop, reverse, prefix, limit)

    @rule()
    def length(self):
        assert len(self.db) == len(self.model)

    @invariant()
    def matches_the_model(self):
        assert dict(self.db.scan()) == self.model


def test_valid_operations_against_a_dict_state_machine(cluster):
    harness = Harness(cluster)
    assert len({harness.db.shard_of(k) for k in MACHINE_KEYS}) == SHARDS, "the machine's keys should span both shards"
    BatchMachine.db = harness.db
    BatchMachine.counts = {}
    try:
        with cluster.watchdog(100, "the state machine"):
            run_state_machine_as_test(
                BatchMachine,
                settings=settings(
                    max_examples=40,
                    stateful_step_count=30,
                    deadline=None,
                    database=None,
                    phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
    finally:
        BatchMachine.db = None
    counts = BatchMachine.counts
    assert counts.get("cross-shard batch", 0) > 0 and counts.get("cross-shard conflict", 0) > 0, f"the machine did not exercise cross-shard batches and conflicts: {counts}"
    harness.check_processes("at the end")
