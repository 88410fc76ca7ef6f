"""The protocol's declarations (shardkv/ipc/protocol.py): one per op code, each request and each
answer round-trips through its encoder and decoder, malformed requests are refused, the
servers' dispatch tables match the declarations, and a ttl keeps its milliseconds exactly from
the wire to the engine (issue #23)."""

from __future__ import annotations

import math
import struct
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkv.coordinator.coordinator import Coordinator
from shardkv.errors import Busy
from shardkv.ipc import messages as m
from shardkv.ipc import protocol as p
from shardkv.limits import Milliseconds
from shardkv.log import get_logger
from shardkv.shards.engine import ShardEngine
from shardkv.shards.worker import Worker
from shardkv.wal.format import DELETE, PUT

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_U64 = struct.Struct("<Q")

keys = st.binary(min_size=1, max_size=40)
values = st.binary(max_size=80)
optionals = st.none() | values
ttls = st.integers(1, 2**53 - 1)
txids = st.integers(0, 2**64 - 1)
u64s = st.integers(0, 2**64 - 1)
wire_ops = st.lists(
    st.one_of(
        st.tuples(st.just(m.OP_PUT), keys, values),
        st.tuples(st.just(m.OP_PUT_TTL), keys, st.tuples(ttls, values).map(lambda tv: _U64.pack(tv[0]) + tv[1])),
        st.tuples(st.just(m.OP_DELETE), keys, st.just(b"")),
        st.tuples(st.just(m.OP_EXPECT), keys, values),
        st.tuples(st.just(m.OP_EXPECT_ABSENT), keys, st.just(b"")),
    ),
    max_size=20,
) | st.integers(16, 40).flatmap(lambda n: st.lists(st.tuples(st.just(m.OP_PUT), st.binary(min_size=6, max_size=6), st.binary(min_size=9, max_size=9)), min_size=n, max_size=n))


def native_ops(ops) -> tuple[list, list]:
    """The (writes, expects) the engine takes for these wire operations (the reference)."""
    writes, expects = [], []
    for kind, key, value in ops:
        if kind == m.OP_PUT:
            writes.append((PUT, key, value, 0))
        elif kind == m.OP_PUT_TTL:
            writes.append((PUT, key, value[8:], _U64.unpack(value[:8])[0]))
        elif kind == m.OP_DELETE:
            writes.append((DELETE, key, b"", 0))
        else:
            expects.append((key, value if kind == m.OP_EXPECT else None))
    return writes, expects


# code -> (strategy of the encoder's arguments after flags, the decoder's arguments for them)
REQUESTS = {
    m.PING: (st.just(()), lambda: ()),
    m.GET: (st.tuples(keys), lambda key: (key,)),
    m.PUT: (st.tuples(keys, values), lambda key, value: (key, value)),
    m.DELETE: (st.tuples(keys), lambda key: (key,)),
    m.CAS: (st.tuples(keys, optionals, optionals), lambda *args: args),
    m.APPLY: (st.tuples(wire_ops), native_ops),
    m.GET_MANY: (st.tuples(st.lists(keys, max_size=30)), lambda ks: (ks,)),
    m.SCAN: (st.tuples(optionals, optionals, st.booleans(), optionals, st.integers(0, 2**32 - 1)), lambda *args: args),
    m.LEN: (st.just(()), lambda: ()),
    m.STATS: (st.just(()), lambda: ()),
    m.SYNC: (st.just(()), lambda: ()),
    m.COMPACT: (st.just(()), lambda: ()),
    m.PUT_TTL: (st.tuples(keys, values, ttls), lambda *args: args),
    m.TTL: (st.tuples(keys), lambda key: (key,)),
    m.EXPIRE: (st.tuples(keys, st.none() | ttls), lambda *args: args),
    m.TXN: (
        st.tuples(st.dictionaries(st.integers(0, 2**16 - 1), wire_ops, min_size=1, max_size=4)),
        lambda by_shard: ([(shard, m.encode_ops(ops)) for shard, ops in by_shard.items()],),
    ),
    m.PREPARE: (st.tuples(txids, wire_ops.map(m.encode_ops)), lambda txid, op_list: (txid, *native_ops(_decoded_wire(op_list)))),
    m.COMMIT: (st.tuples(txids), lambda txid: (txid,)),
    m.ABORT: (st.tuples(txids), lambda txid: (txid,)),
    m.PENDING: (st.just(()), lambda: ()),
}

json_objects = st.dictionaries(st.text(max_size=10), st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10), max_size=6)
history = st.tuples(u64s, st.lists(st.tuples(u64s, u64s, u64s), min_size=m.BATCH_RING, max_size=m.BATCH_RING))
# code -> strategy of what a handler returns (the answer's decoder must give it back)
ANSWERS = {
    m.PING: st.none(),
    m.GET: optionals,
    m.PUT: st.none(),
    m.DELETE: st.booleans(),
    m.CAS: st.booleans(),
    m.APPLY: st.none(),
    m.GET_MANY: st.lists(optionals, max_size=30),
    m.SCAN: st.tuples(st.lists(st.tuples(keys, values), max_size=10), st.booleans(), history),
    m.LEN: u64s,
    m.STATS: json_objects,
    m.SYNC: st.none(),
    m.COMPACT: json_objects,
    m.PUT_TTL: st.none(),
    m.TTL: st.none() | st.just(math.inf) | st.integers(1, 2**64 - 2),
    m.EXPIRE: st.booleans(),
    m.TXN: st.none(),
    m.PREPARE: st.none(),
    m.COMMIT: st.booleans(),
    m.ABORT: st.booleans(),
    m.PENDING: st.lists(u64s, max_size=10),
}


def _decoded_wire(op_list: bytes) -> list:
    """The (kind, key, value) operations of an encoded operation list (test-side reader)."""
    reader = m.Reader(op_list)
    return [(reader.u8(), reader.blob(), reader.blob()) for _ in range(reader.u32())]


def _comparable(args: tuple) -> tuple:
    return tuple([(shard, bytes(ops)) for shard, ops in a] if isinstance(a, list) and a and isinstance(a[0], tuple) and isinstance(a[0][1], memoryview) else a for a in args)


# -- one declaration per op code --------------------------------------------------------------
@pytest.mark.unit
def test_every_op_code_has_exactly_one_declaration():
    codes = [op.code for op in p.OPERATIONS]
    assert sorted(codes) == sorted(m.OP_NAMES) and len(set(codes)) == len(codes)
    for op in p.OPERATIONS:
        assert op.name == m.OP_NAMES[op.code] and getattr(p, op.name) is op and p.BY_CODE[op.code] is op
        assert op.servers and op.servers <= {p.WORKER, p.COORDINATOR}
    # Every message constant of messages.py is an op code of OP_NAMES (none left undeclared).
    assert {getattr(m, name) for name in m.OP_NAMES.values()} == set(m.OP_NAMES)
    assert set(REQUESTS) == set(ANSWERS) == set(p.BY_CODE)  # every operation is tested below


@pytest.mark.unit
def test_write_and_coordinator_only_sets():
    """What the worker fsyncs for and what it takes only from the coordinator (the sets that
    shards/worker.py spelled out before the declarations)."""
    assert p.WRITES == {m.PUT, m.DELETE, m.CAS, m.APPLY, m.PUT_TTL, m.EXPIRE, m.PREPARE, m.COMMIT, m.ABORT}
    assert p.COORDINATOR_ONLY == {m.PREPARE, m.COMMIT, m.ABORT, m.PENDING}
    assert p.served_by(p.COORDINATOR) == {m.PING, m.STATS, m.TXN}


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("code", sorted(p.BY_CODE), ids=lambda c: m.OP_NAMES[c])
@SETTINGS
@given(data=st.data())
def test_request_round_trips(code, data):
    op = p.BY_CODE[code]
    args_strategy, expected = REQUESTS[code]
    args = data.draw(args_strategy)
    flags = data.draw(st.sampled_from((0, m.FLAG_FSYNC))) if op.write or code == m.TXN else 0
    message = op.encode(flags, *args)
    assert message[0] == code and message[1] == flags
    decoded = op.decode(message)
    assert _comparable(decoded) == _comparable(expected(*args))
    if code in (m.PUT_TTL, m.EXPIRE) and decoded[-1] is not None:
        assert type(decoded[-1]) is Milliseconds  # the engine takes it as is
    if code in (m.APPLY, m.PREPARE):
        # The engine's own terms: record types and whole milliseconds, no operation names.
        assert all(type(w) is tuple and w[0] in (PUT, DELETE) and type(w[3]) is int for w in decoded[-2])


@pytest.mark.unit
@pytest.mark.parametrize("code", sorted(p.BY_CODE), ids=lambda c: m.OP_NAMES[c])
@SETTINGS
@given(data=st.data())
def test_answer_round_trips(code, data):
    op = p.BY_CODE[code]
    result = data.draw(ANSWERS[code])
    got = op.result(*m.parse_response(op.answer(result)))
    if code == m.SCAN:
        items, more, (batches, ring) = result
        assert got == (items, more, (batches, ring))
    else:
        assert got == result


@pytest.mark.unit
@pytest.mark.parametrize("code", sorted(p.BY_CODE), ids=lambda c: m.OP_NAMES[c])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_malformed_requests_are_refused(code, data):
    """Every strict prefix of a request, and the request with a byte more, is a MessageError."""
    op = p.BY_CODE[code]
    message = op.encode(0, *data.draw(REQUESTS[code][0]))
    for cut in range(len(message)):
        with pytest.raises(m.MessageError):
            op.decode(message[:cut])
    with pytest.raises(m.MessageError):
        op.decode(message + b"\x00")


@pytest.mark.unit
@pytest.mark.parametrize("ttl_ms", [0, 2**53])
def test_out_of_range_ttls_are_refused(ttl_ms):
    with pytest.raises(m.MessageError, match="out of range"):
        p.PUT_TTL.decode(b"".join((bytes((m.PUT_TTL, 0)), m.blob(b"k"), m.blob(b"v"), _U64.pack(ttl_ms))))
    if ttl_ms:
        with pytest.raises(m.MessageError, match="out of range"):
            p.EXPIRE.decode(bytes((m.EXPIRE, 0)) + m.blob(b"k") + _U64.pack(ttl_ms))


# -- the servers' tables ----------------------------------------------------------------------
@pytest.mark.unit
def test_dispatch_table_must_match_the_declarations():
    with pytest.raises(ValueError, match="missing"):
        p.dispatch_table(p.WORKER, {m.PING: lambda: None})
    with pytest.raises(ValueError, match="TXN"):
        p.dispatch_table(p.COORDINATOR, {m.PING: lambda: None, m.STATS: dict, m.TXN: list}, elsewhere=frozenset((m.TXN,)))
    with pytest.raises(ValueError, match="GET"):
        p.dispatch_table(p.COORDINATOR, {m.PING: lambda: None, m.STATS: dict, m.TXN: list, m.GET: bytes})


@pytest.fixture
def clock():
    return [1_000_000.0]


@pytest.fixture
def worker(tmp_path, clock):
    """A Worker around a real engine, without its rings and processes: requests go straight
    to _execute."""
    engine = ShardEngine.open(str(tmp_path / "shard"), clock=lambda: clock[0])
    worker = Worker.__new__(Worker)
    worker.engine, worker.finish_indexing, worker.voted = engine, None, False
    worker.shared_index = types.SimpleNamespace(set_locked=lambda count: None)
    worker.compactor, worker.log = None, get_logger("shardkv.worker", shard=0)
    worker.table = worker._dispatch_table()
    yield worker
    if worker.compactor is not None:
        worker.compactor.join()
    engine.close()


def _call(worker, op, *args, flags=0, table=False):
    """Send one request to `worker` and return its result as the client sees it."""
    message = op.encode(flags, *args)
    response = worker.table[op.code](message) if table else worker._execute(message)
    result = op.result(*m.parse_response(response))
    if worker.finish_indexing is not None:
        worker.finish_indexing, finish = None, worker.finish_indexing
        finish()
    return result


@pytest.mark.engine
@pytest.mark.parametrize("table", [False, True], ids=["fast paths", "table"])
def test_worker_serves_every_operation(worker, clock, table):
    call = lambda op, *args, flags=0: _call(worker, op, *args, flags=flags, table=table)  # noqa: E731
    assert call(p.PING) is None
    assert call(p.PUT, b"a", b"1") is None and call(p.GET, b"a") == b"1" and call(p.GET, b"zz") is None
    assert call(p.PUT_TTL, b"t", b"2", 2007) is None
    assert call(p.TTL, b"t") == 2007 and call(p.TTL, b"a") == math.inf and call(p.TTL, b"zz") is None
    assert call(p.EXPIRE, b"a", 5000) is True and call(p.TTL, b"a") == 5000
    assert call(p.EXPIRE, b"a", None) is True and call(p.TTL, b"a") == math.inf and call(p.EXPIRE, b"zz", 5) is False
    assert call(p.CAS, b"a", b"1", b"3") is True and call(p.CAS, b"a", b"1", b"4") is False
    assert call(p.DELETE, b"a") is True and call(p.DELETE, b"a") is False
    assert call(p.APPLY, [(m.OP_PUT, b"b", b"x"), (m.OP_PUT_TTL, b"c", _U64.pack(2011) + b"y")], flags=m.FLAG_FSYNC) is None
    assert call(p.GET_MANY, [b"b", b"c", b"zz"]) == [b"x", b"y", None] and call(p.TTL, b"c") == 2011
    items, more, _ = call(p.SCAN, None, None, False, None, 2)
    assert items == [(b"b", b"x"), (b"c", b"y")] and more is True
    assert call(p.LEN) == 3 and call(p.STATS)["keys"] == 3 and call(p.SYNC) is None
    assert call(p.PREPARE, 7, m.encode_ops([(m.OP_PUT, b"d", b"z")])) is None and worker.voted
    assert call(p.PENDING) == [7]
    with pytest.raises(Busy):
        call(p.GET, b"d")
    assert call(p.COMMIT, 7) is True and call(p.COMMIT, 7) is False and call(p.GET, b"d") == b"z"
    assert call(p.PREPARE, 8, m.encode_ops([(m.OP_DELETE, b"d", b"")])) is None and call(p.ABORT, 8) is True and call(p.PENDING) == []
    clock[0] += 2.011
    assert call(p.GET, b"t") is None and call(p.GET, b"c") is None
    assert call(p.COMPACT)["started"] is True
    with pytest.raises(m.MessageError, match="unknown op 99"):
        worker._execute(bytes((99, 0)))


@pytest.mark.unit
def test_coordinator_table():
    coordinator = Coordinator.__new__(Coordinator)
    coordinator.stats, coordinator.undelivered = {"committed": 3}, {}
    coordinator.table = coordinator._dispatch_table()
    assert p.PING.result(*m.parse_response(coordinator._execute(p.PING.encode(0)))) is None
    assert p.STATS.result(*m.parse_response(coordinator._execute(p.STATS.encode(0)))) == {"committed": 3, "undelivered": 0}
    with pytest.raises(m.MessageError, match="not served by the coordinator"):
        coordinator._execute(p.GET.encode(0, b"k"))


# -- a ttl keeps its milliseconds -------------------------------------------------------------
@pytest.mark.engine
@pytest.mark.parametrize("ttl_ms", [2007, 2011, 1, 2**40 + 3])
def test_a_batch_ttl_reaches_the_engine_exactly(tmp_path, ttl_ms):
    """A put with a ttl in an APPLY expires exactly ttl_ms after the worker's clock: the
    milliseconds no longer go through float seconds (2007 / 1000 * 1000 is 2007.0000000000002,
    which the engine rounded up to 2008). Fails before issue #23."""
    now = [1_000_000.0]
    reader = m.Reader(m.encode_apply([(m.OP_PUT_TTL, b"k", _U64.pack(ttl_ms) + b"v")], 0))
    reader.pos = 2
    writes, expects = m.decode_ops(reader)
    with ShardEngine.open(str(tmp_path / "e"), clock=lambda: now[0]) as engine:
        engine.apply(writes, expects)
        assert engine.ttl(b"k") == ttl_ms / 1000 and engine.ttl_ms(b"k") == ttl_ms
