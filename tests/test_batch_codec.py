"""The column-wise fast paths of atomic batches against the simple one-operation-at-a-time code
they replace (issue #8): the client's checking, routing and encoding (shardkv/batches.py,
shardkv/ipc/messages.py), the worker's decoding, the engine's checking, and the log's batch
encoding (wal/records.py). Each fast path must give the same bytes, the same values and the
same errors as its reference, and fall back to it for anything unusual.
"""

from __future__ import annotations

import math
import random
import struct

import crcmod.predefined
import numpy as np
import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkv import batches
from shardkv.errors import Busy
from shardkv.ipc import messages as m
from shardkv.shards.engine import ShardEngine
from shardkv.ipc.uniform import PutColumns, Writes
from shardkv.wal import records
from shardkv.wal.format import COMMIT, DELETE, MAX_KEY_LEN, PUT, RECORD_HEADER_SIZE

from engine_support import check_ops

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_crc32c_reference = crcmod.predefined.mkCrcFun("crc-32c")
_U32 = struct.Struct("<I")


# -- references: the code before the fast paths -----------------------------------------------
def reference_check_ops(ops, max_ops, max_bytes):
    checked = []
    for op in ops:
        checked.append(batches.check_op(op))
        if len(checked) > max_ops:
            raise ValueError(f"a batch may hold at most {max_ops} operations (max_batch_ops)")
    ttl_fields = 8 * sum(1 for item in checked if item[0] == m.OP_PUT_TTL)
    if sum(len(item[1]) + len(item[2]) for item in checked) - ttl_fields > max_bytes:
        raise ValueError(f"a batch may hold at most {max_bytes} bytes of keys and values (max_batch_bytes)")
    return checked


def reference_route(checked, shard_map):
    by_shard: dict[int, list] = {}
    for item in checked:
        by_shard.setdefault(shard_map[crc32c(item[1]) >> 20], []).append(item)
    return by_shard


def reference_txn(by_shard, flags):
    parts = [bytes((m.TXN, flags)), _U32.pack(len(by_shard))]
    for shard, items in by_shard.items():
        body = m._encode_ops_each(items)
        parts += [struct.pack("<HI", shard, len(body)), body]
    return b"".join(parts)


def reference_decode(message: bytes, start: int):
    """decode_ops with its numpy path switched off: the loop over operations."""
    saved = m._decode_same_size_puts
    m._decode_same_size_puts = lambda *args: None
    try:
        return _decode(message, start)
    finally:
        m._decode_same_size_puts = saved


def _decode(message: bytes, start: int):
    reader = m.Reader(memoryview(message))
    reader.pos = start
    writes, expects = m.decode_ops(reader)
    reader.end()
    return writes, expects


def _outcome(fn, *args):
    """What a call returns, or the type and text of what it raises."""
    try:
        return ("ok", fn(*args))
    except (TypeError, ValueError) as exc:
        return ("raised", type(exc), str(exc))


# -- strategies -----------------------------------------------------------------------------------
keys = st.binary(min_size=1, max_size=40)
values = st.binary(max_size=200)


@st.composite
def put_batches(draw, min_size=0, max_size=60):
    """Plain ("put", key, value) batches: sometimes every key and value of one size each."""
    n = draw(st.integers(min_size, max_size))
    if draw(st.booleans()):
        key_len, value_len = draw(st.integers(1, 24)), draw(st.integers(0, 120))
        ks = draw(st.lists(st.binary(min_size=key_len, max_size=key_len), min_size=n, max_size=n))
        vs = draw(st.lists(st.binary(min_size=value_len, max_size=value_len), min_size=n, max_size=n))
    else:
        ks = draw(st.lists(keys, min_size=n, max_size=n))
        vs = draw(st.lists(values, min_size=n, max_size=n))
    return [("put", k, v) for k, v in zip(ks, vs)]


odd_ops = st.one_of(
    st.tuples(st.just("put"), keys, values, st.one_of(st.none(), st.integers(1, 10**6))),
    st.tuples(st.just("delete"), keys),
    st.tuples(st.just("expect"), keys, st.one_of(st.none(), values)),
    st.tuples(st.just("put"), st.binary(max_size=3), values),  # maybe an empty key
    st.tuples(st.just("put"), st.text(max_size=3), values),  # not bytes
    st.lists(st.binary(max_size=3), max_size=3),  # a list, not a tuple
    st.tuples(st.just("nope"), keys),
    st.just(("put", bytearray(b"k"), b"v")),
    st.just(("put", b"k", memoryview(b"v"))),
    st.just(("put", b"x" * (MAX_KEY_LEN + 1), b"v")),
    st.just({"put": 1, b"k": 2, b"v": 3}),
    st.just("put"),
    st.just(7),
)


@st.composite
def mixed_batches(draw):
    """Mostly plain puts, with unusual or bad operations inserted at random places."""
    ops = draw(put_batches(max_size=40))
    for _ in range(draw(st.integers(0, 3))):
        ops.insert(draw(st.integers(0, len(ops))), draw(odd_ops))
    return ops


# -- wal/records.py -------------------------------------------------------------------------------
@pytest.mark.unit
@SETTINGS
@given(st.integers(1, 48), st.integers(0, 40), st.randoms(use_true_random=False))
def test_crc32c_rows_matches_crc32c(length, n, rnd):
    rows = np.frombuffer(bytes(rnd.getrandbits(8) for _ in range(length * n)), dtype=np.uint8).reshape(n, length)
    if n > 2 and rnd.random() < 0.5:
        rows = rows.copy()
        rows[:, : length // 2] = rows[0, : length // 2]  # some columns constant
    assert records.crc32c_rows(rows).tolist() == [_crc32c_reference(row.tobytes()) for row in rows]


record_ops = st.lists(
    st.tuples(
        st.sampled_from([PUT, PUT, PUT, DELETE, COMMIT]),
        keys,
        values,
        st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.integers(0, 2**41)),
    ),
    max_size=70,
)


@pytest.mark.unit
@SETTINGS
@given(record_ops, st.integers(0, 2**64 - 1), st.booleans())
def test_encode_batch_columns_match_one_at_a_time(ops, seq, uniform_lengths):
    if uniform_lengths:
        ops = [(t, k[:1], v[:3].ljust(3, b"-"), e) for t, k, v, e in ops]
    expected = records._encode_each(ops, seq)
    assert records.encode_batch(ops, seq) == expected
    columns = [tuple(column) for column in zip(*ops)] or [(), (), (), ()]
    saved = records.COLUMNS_MIN
    records.COLUMNS_MIN = 1  # the column-wise code for every size
    try:
        assert records.encode_batch(ops, seq) == expected
        if ops:
            assert records.encode_columns(*columns, seq) == expected
    finally:
        records.COLUMNS_MIN = saved


@pytest.mark.unit
def test_encode_batch_records_read_back():
    ops = [(PUT, b"key-%d" % i, b"v" * (i % 7), 0 if i % 3 else 10**12 + i) for i in range(100)] + [(DELETE, b"gone", b"", 0)]
    data, offsets = records.encode_batch(ops, 77)
    assert len(offsets) == len(ops) and offsets[0] == 0
    for i, (offset, (rtype, key, value, expires_at)) in enumerate(zip(offsets, ops)):
        header = records.decode_header(data, offset)
        assert header is not None and records.record_crc_ok(data, offset, header)
        assert (header.type, header.key_len, header.value_len, header.seq, header.expires_at) == (rtype, len(key), len(value), 77, expires_at)
        assert header.batch_left == len(ops) - 1 - i
        assert data[offset + RECORD_HEADER_SIZE : offset + header.size] == key + value
        # both CRCs also against an independent implementation
        assert _U32.unpack_from(data, offset + 4)[0] == _crc32c_reference(data[offset + 8 : offset + RECORD_HEADER_SIZE])
        assert _U32.unpack_from(data, offset)[0] == _crc32c_reference(data[offset + 4 : offset + header.size])
    assert offsets[-1] + RECORD_HEADER_SIZE + len(b"gone") == len(data)


@pytest.mark.unit
@pytest.mark.parametrize(
    "bad",
    [
        (PUT, bytearray(b"k"), b"v", 0),  # not bytes: one at a time, as before
        (PUT, b"k", b"v", -1),
        (PUT, b"k", b"v", 2**64),
        (256, b"k", b"v", 0),
        (PUT, b"k", b"v", 1.5),
        (PUT, b"k", b"v"),
    ],
)
def test_encode_batch_unusual_input_behaves_as_before(bad):
    ops = [(PUT, b"a%d" % i, b"v", 0) for i in range(30)] + [bad]
    assert _outcome_any(records.encode_batch, ops, 5) == _outcome_any(records._encode_each, ops, 5)


def _outcome_any(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the exact type is what is compared
        return ("raised", type(exc))


# -- shardkv/ipc/messages.py ----------------------------------------------------------------------
op_triples = st.lists(
    st.tuples(st.sampled_from([m.OP_PUT, m.OP_PUT, m.OP_DELETE, m.OP_PUT_TTL, m.OP_EXPECT, m.OP_EXPECT_ABSENT]), keys, values),
    max_size=60,
)


@pytest.mark.unit
@SETTINGS
@given(op_triples, st.integers(0, 1))
def test_encode_ops_and_apply_match_one_at_a_time(ops, flags):
    assert m.encode_ops(ops) == m._encode_ops_each(ops)
    assert m.encode_apply(ops, flags) == bytes((m.APPLY, flags)) + m._encode_ops_each(ops)
    parts, length = m.ops_parts(m.op_columns(ops))
    assert length == len(b"".join(parts))


@pytest.mark.unit
@SETTINGS
@given(put_batches(max_size=80), st.integers(0, 1))
def test_decode_ops_numpy_path_matches_loop(ops, flags):
    message = m.encode_apply([(m.OP_PUT, k, v) for _, k, v in ops], flags)
    native = [(PUT, k, v, 0) for _, k, v in ops]  # the engine's own terms: no "put" strings
    assert _decode(message, 2) == reference_decode(message, 2) == (native, [])


@pytest.mark.unit
@SETTINGS
@given(put_batches(min_size=16, max_size=40), st.data())
def test_decode_ops_damaged_messages_fail_alike(ops, data):
    """A hostile or damaged operation list: the numpy path gives what the loop gives, or
    raises what it raises (MessageError)."""
    message = bytearray(m.encode_apply([(m.OP_PUT, k, v) for _, k, v in ops], 0))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(2, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        message = message[: data.draw(st.integers(2, len(message)))]
    message = bytes(message)
    assert _outcome(_decode, message, 2) == _outcome(reference_decode, message, 2)


@pytest.mark.unit
@SETTINGS
@given(put_batches(min_size=16, max_size=40), st.data())
def test_decode_ops_damaged_operation_heads_fail_alike(ops, data):
    """The same with the damage in one operation's kind or lengths (the bytes the numpy path
    must check on every row, not only the first)."""
    message = bytearray(m.encode_apply([(m.OP_PUT, k, v) for _, k, v in ops], 0))
    at = 6
    for _, k, v in ops[: data.draw(st.integers(0, len(ops) - 1))]:
        at += 9 + len(k) + len(v)
    key_len = _U32.unpack_from(message, at + 1)[0]
    field = data.draw(st.sampled_from([0, 1, 2, 5 + key_len, 6 + key_len, 8 + key_len]))
    message[at + field] = data.draw(st.integers(0, 255))
    message = bytes(message)
    assert _outcome(_decode, message, 2) == _outcome(reference_decode, message, 2)


@pytest.mark.unit
def test_decode_ops_same_size_prepare():
    """PREPARE: the list starts after the txid, and may carry empty values."""
    ops = [(m.OP_PUT, b"k%03d" % i, b"") for i in range(20)]
    message = bytes((m.PREPARE, 0)) + (9).to_bytes(8, "little") + m.encode_ops(ops)
    assert _decode(message, 10) == reference_decode(message, 10) == ([(PUT, k, b"", 0) for _, k, _ in ops], [])


# -- shardkv/batches.py ---------------------------------------------------------------------------
SHARD_MAP = memoryview(np.repeat(np.arange(4, dtype=np.uint16), 1024))  # 4 shards
ONE_SHARD = memoryview(np.zeros(4096, dtype=np.uint16))


def route(checked, shard_map):
    """route_ops through both of its paths (column-wise, as for big batches, and the loop, as
    for small ones): they must agree; the column-wise answer is returned."""
    saved = batches.COLUMNS_MIN
    try:
        batches.COLUMNS_MIN = 1
        columns = batches.route_ops(checked, shard_map)
        batches.COLUMNS_MIN = 10**9
        loop = batches.route_ops(checked, shard_map)
    finally:
        batches.COLUMNS_MIN = saved
    assert list(columns) == list(loop) and {s: list(p) for s, p in columns.items()} == {s: list(p) for s, p in loop.items()}
    return columns


@pytest.mark.unit
@SETTINGS
@given(put_batches(max_size=80))
def test_client_path_matches_reference_for_puts(ops):
    expected = reference_check_ops(ops, batches.MAX_BATCH_OPS, batches.MAX_BATCH_BYTES)
    mapping = {k: v for _, k, v in ops}
    for given_ops, want in (
        (ops, expected),
        (iter(ops), expected),
        (batches.put_many_ops([(k, v) for _, k, v in ops]), expected),
        (batches.put_many_ops(mapping), [(m.OP_PUT, k, v) for k, v in mapping.items()]),
    ):
        checked = batches.check_ops(given_ops, batches.MAX_BATCH_OPS, batches.MAX_BATCH_BYTES)
        assert checked == want
        batches.check_limits(checked, batches.MAX_BATCH_OPS, batches.MAX_BATCH_BYTES)
        for shard_map in (SHARD_MAP, ONE_SHARD):
            by_shard = route(checked, shard_map)
            reference = reference_route(list(checked), shard_map)
            assert list(by_shard) == list(reference) and {s: list(p) for s, p in by_shard.items()} == reference
            assert all(type(shard) is int for shard in by_shard)
            assert batches.encode_txn(by_shard, 1) == reference_txn(reference, 1)
            for shard, items in by_shard.items():
                assert m.encode_apply(items, 0) == bytes((m.APPLY, 0)) + m._encode_ops_each(reference[shard])


@pytest.mark.unit
@SETTINGS
@given(mixed_batches(), st.integers(1, 50), st.integers(1, 4000))
def test_check_ops_errors_match_reference(ops, max_ops, max_bytes):
    """Whatever the batch, check_ops returns or raises exactly what the loop over check_op
    did, limits included."""
    got = _outcome(batches.check_ops, ops, max_ops, max_bytes)
    assert got == _outcome(reference_check_ops, ops, max_ops, max_bytes)
    assert _outcome(batches.check_ops, iter(ops), max_ops, max_bytes) == got
    if got[0] == "ok":
        by_shard = route(got[1], SHARD_MAP)
        reference = reference_route(got[1], SHARD_MAP)
        assert {s: list(p) for s, p in by_shard.items()} == reference and list(by_shard) == list(reference)
        assert batches.encode_txn(by_shard, 0) == reference_txn(reference, 0)


@pytest.mark.unit
@SETTINGS
@given(st.lists(st.one_of(st.tuples(keys, values), st.tuples(st.text(max_size=2), values), st.tuples(keys), st.just([b"k", b"v"])), max_size=30))
def test_put_many_errors_match_reference(pairs):
    def reference(items):
        ops = []
        for pair in items:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"put_many takes (key, value) pairs, not {pair!r:.80}")
            ops.append(("put", pair[0], pair[1]))
        return reference_check_ops(ops, batches.MAX_BATCH_OPS, batches.MAX_BATCH_BYTES)

    def new(items):
        return batches.check_ops(batches.put_many_ops(items), batches.MAX_BATCH_OPS, batches.MAX_BATCH_BYTES)

    assert _outcome(new, pairs) == _outcome(reference, pairs)


# -- shards/engine.py -----------------------------------------------------------------------------
@pytest.mark.engine
def test_engine_check_ops_big_batches(tmp_path):
    with ShardEngine.open(str(tmp_path / "a"), max_value_size=50) as engine:
        ops = [("put", b"k%d" % i, b"v" * (i % 40)) for i in range(40)]
        fast = check_ops(engine, ops)
        assert fast == [(PUT, k, v, 0) for _, k, v in ops]
        for bad, error in [
            (("put", b"", b"v"), ValueError),
            (("put", b"x" * (MAX_KEY_LEN + 1), b"v"), ValueError),
            (("put", b"k", b"v" * 51), ValueError),
            (("put", "k", b"v"), TypeError),
            (("put", b"k"), ValueError),
            ("nope", TypeError),
        ]:
            slow = ops[:20] + [bad] + ops[20:]
            with pytest.raises(error) as info:
                check_ops(engine, slow)
            with pytest.raises(error) as expected:
                check_ops(engine, iter(slow))  # not a list: the loop
            assert str(info.value) == str(expected.value)


@pytest.mark.engine
def test_engine_checks_decoded_writes_like_any_batch(tmp_path):
    """A worker's decoded batch (`Writes`, the engine's own terms) skips the operation names,
    not the checks: the sizes in it came from a ring and are not trusted."""
    now = [1_700_000_000.0]
    with ShardEngine.open(str(tmp_path / "w"), max_value_size=50, clock=lambda: now[0]) as engine:
        good = [(PUT, b"k%d" % i, b"v" * (i % 40), 0) for i in range(30)]
        for bad, error in [
            ((PUT, b"", b"v", 0), ValueError),
            ((PUT, b"x" * (MAX_KEY_LEN + 1), b"v", 0), ValueError),
            ((PUT, b"k", b"v" * 51, 0), ValueError),
            ((PUT, b"k", b"v", 2**53), ValueError),
        ]:
            with pytest.raises(error):
                engine.apply(Writes([*good[:10], bad, *good[10:]]))
            assert len(engine) == 0  # all or nothing
        engine.apply(Writes([*good, (PUT, b"ttl", b"t", 2500), (DELETE, b"k3", b"", 0)]))
        assert engine.get(b"k1") == b"v" and engine.get(b"k3") is None
        assert engine.ttl_ms(b"ttl") == 2500 and engine.ttl(b"k1") == math.inf
        now[0] += 2.5
        assert engine.get(b"ttl") is None  # expired exactly 2500 ms after the batch


@pytest.mark.engine
def test_engine_big_batches_index_and_recover(tmp_path):
    """Big batches through the column-wise write: plain puts, puts over keys that expire,
    deletes, a cross-shard commit; all visible at once, and the same after a reopen."""
    now = [1_000_000.0]
    path = str(tmp_path / "e")
    model = {}
    with ShardEngine.open(path, clock=lambda: now[0]) as engine:
        first = [("put", b"k%04d" % i, b"v%d" % i) for i in range(300)]
        engine.apply(first)
        model.update({k: v for _, k, v in first})
        engine.apply([("put", b"k%04d" % i, b"ttl", 5) for i in range(0, 300, 7)])  # general path
        engine.apply([("put", b"k%04d" % i, b"again") for i in range(0, 300, 2)])  # clears those expiries
        for i in range(0, 300, 2):
            model[b"k%04d" % i] = b"again"
        for i in range(0, 300, 7):
            if i % 2:
                model[b"k%04d" % i] = b"ttl"
        engine.apply([("delete", b"k%04d" % i) for i in range(0, 300, 5)] + [("put", b"new%d" % i, b"n") for i in range(20)])
        for i in range(0, 300, 5):
            model.pop(b"k%04d" % i, None)
        model.update({b"new%d" % i: b"n" for i in range(20)})
        engine.prepare(42, [("put", b"tx%d" % i, b"t%d" % i) for i in range(100)])  # its COMMIT: the column path
        assert engine.commit(42)
        model.update({b"tx%d" % i: b"t%d" % i for i in range(100)})
        assert dict(engine.scan()) == model
        assert len(engine) == len(model)
        now[0] += 10  # the ttl keys that were not overwritten expire
        for i in range(0, 300, 7):
            if i % 2 and i % 5:
                del model[b"k%04d" % i]
        assert dict(engine.scan()) == model
    with ShardEngine.open(path, clock=lambda: now[0]) as engine:
        assert dict(engine.scan()) == model
        assert engine.get_many(list(model)) == list(model.values())


@pytest.mark.unit
def test_put_many_of_an_endless_iterator_is_a_value_error_not_a_hang():
    import itertools

    pairs = ((b"k%d" % i, b"v") for i in itertools.count())
    with pytest.raises(ValueError, match="max_batch_ops"):
        batches.check_ops(batches.put_many_ops(pairs, 1000), 1000, batches.MAX_BATCH_BYTES)


def _decoded_puts(pairs) -> PutColumns:
    """What a worker decodes from an APPLY of these same-size puts."""
    writes, expects = _decode(m.encode_apply([(m.OP_PUT, k, v) for k, v in pairs], 0), 2)
    assert type(writes) is PutColumns and expects == []
    return writes


@pytest.mark.engine
def test_engine_applies_decoded_same_size_puts_like_tuples(tmp_path):
    """A batch decoded as columns (PutColumns -> UniformPuts) leaves the engine exactly as the
    same operations given as tuples: values, index, a reopen; over existing keys, repeated keys,
    a key locked by a prepared batch (Busy, nothing written) and a prepare of columns."""
    rng = random.Random(3)
    keys = [b"%08d" % i for i in range(400)]
    batches_ = [[(rng.choice(keys), rng.randbytes(24)) for _ in range(300)] for _ in range(4)]
    paths = {"columns": str(tmp_path / "c"), "tuples": str(tmp_path / "t")}
    engines = {name: ShardEngine.open(path) for name, path in paths.items()}
    try:
        for pairs in batches_:
            engines["columns"].apply(_decoded_puts(pairs))
            engines["tuples"].apply([("put", k, v) for k, v in pairs])
        for engine in engines.values():
            engine.prepare(7, _decoded_puts([(keys[0], b"p" * 24)] + [(b"tx%06d" % i, b"x" * 24) for i in range(30)]))
            with pytest.raises(Busy):
                engine.apply(_decoded_puts([(b"zz%06d" % i, b"y" * 24) for i in range(20)] + [(keys[0], b"q" * 24)]))
            assert engine.commit(7)
        assert dict(engines["columns"].scan()) == dict(engines["tuples"].scan())
        assert engines["columns"].get(keys[0]) == b"p" * 24 and engines["columns"].get(b"zz000000") is None
    finally:
        for engine in engines.values():
            engine.close()
    with ShardEngine.open(paths["columns"]) as columns, ShardEngine.open(paths["tuples"]) as tuples:
        assert dict(columns.scan()) == dict(tuples.scan())


@pytest.mark.engine
def test_engine_checks_decoded_same_size_puts(tmp_path):
    """The sizes of a decoded batch are checked once for all: too long a key or value is a
    ValueError and nothing is written."""
    with ShardEngine.open(str(tmp_path / "a"), max_value_size=50) as engine:
        engine.apply(_decoded_puts([(b"k%05d" % i, b"v" * 50) for i in range(20)]))
        for pairs in ([(b"x%05d" % i, b"v" * 51) for i in range(20)], [(b"y" * (MAX_KEY_LEN + 1), b"v")] * 17):
            with pytest.raises(ValueError):
                engine.apply(_decoded_puts(pairs))
        assert len(engine) == 20 and engine.get(b"x00000") is None


@pytest.mark.unit
def test_prepare_value_of_same_size_puts_matches_tuples():
    """encode_prepare of columns (one join) gives the bytes of the same puts as tuples."""
    from shardkv.shards.prepared import decode_prepare, encode_prepare
    from shardkv.ipc.uniform import UniformPuts

    keys, values = [b"key-%04d" % i for i in range(50)], [b"v%04d" % i for i in range(50)]
    uniform = UniformPuts(keys, values, 8, 5)
    assert encode_prepare(uniform, []) == encode_prepare(uniform.tuples(), [])
    assert encode_prepare(uniform, [(b"x", None)]) == encode_prepare(uniform.tuples(), [(b"x", None)])
    assert decode_prepare(encode_prepare(uniform, []), "test") == (uniform.tuples(), [])
    assert uniform.headed(COMMIT, b"12345678").tuples() == [(COMMIT, b"12345678", b"", 0)] + uniform.tuples()


@pytest.mark.engine
def test_prepared_same_size_puts_survive_a_reopen_and_abort_releases_them(tmp_path):
    """A cross-shard batch prepared from decoded columns: undecided across a reopen (then
    committed from its PREPARE record), and another one aborted: locks gone, nothing written."""
    path = str(tmp_path / "p")
    pairs = [(b"pk%06d" % i, b"v" * 16) for i in range(100)]
    with ShardEngine.open(path) as engine:
        engine.prepare(5, _decoded_puts(pairs))
        engine.prepare(6, _decoded_puts([(b"ab%06d" % i, b"w" * 16) for i in range(40)]))
        with pytest.raises(Busy):
            engine.put(b"ab000003", b"x")
        assert engine.abort(6)
        engine.put(b"ab000003", b"x")  # released
        assert engine.get(b"ab000004") is None and engine.get(b"pk000000") is None
    with ShardEngine.open(path) as engine:
        assert engine.prepared() == [5]
        assert engine.locked(b"pk000099")
        assert engine.commit(5)
        assert dict(engine.scan(prefix=b"pk")) == dict(pairs)
        assert not engine.locked(b"pk000099") and engine.get(b"ab000003") == b"x"
