"""Every operation of the protocol, declared once (docs/IPC.md, "Messages").

An `Operation` says, for one op code (`messages.PING` ... `messages.PENDING`), who serves it,
whether it writes, and the four functions that carry it across a ring:

    encode(flags, *args) -> request       the sender's side (a client, the coordinator)
    decode(request) -> args               the server's side: the arguments in the form the
                                          engine takes them (MessageError if malformed)
    answer(result) -> response            what the server's handler returned, as an answer
    result(status, body) -> result        the sender's side again (after parse_response)

so that `result(*parse_response(answer(handler(*decode(encode(flags, *args))))))` is the
handler's result seen by the sender. A ttl is whole milliseconds everywhere on this path (the
wire's unit and the log's): requests carry it so, and `decode` hands it to the engine as a
`limits.Milliseconds`, which the engine takes as is (no trip through float seconds).

A server builds its dispatch table with `dispatch_table`: one handler per operation it serves,
checked against these declarations.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Callable, NamedTuple

from shardkv.batches import decode_txn_parts, encode_txn
from shardkv.ipc import messages as m
from shardkv.limits import Milliseconds

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAX_TTL_MS = 2**53  # ttls at or above this are refused (limits.ttl_milliseconds)

WORKER, COORDINATOR = "worker", "coordinator"


class Operation(NamedTuple):
    """One operation of the protocol (see the module docstring).

    servers: who answers it (WORKER, COORDINATOR); write: a worker fsyncs its log before the
    answer when the flags byte asks (FLAG_FSYNC); coordinator_only: a worker accepts it only
    through the coordinator's ring slots."""

    code: int
    name: str
    servers: frozenset
    write: bool
    coordinator_only: bool
    encode: Callable[..., bytes]
    decode: Callable[[bytes], tuple]
    answer: Callable[[Any], bytes]
    result: Callable[[int, memoryview], Any]


# -- field helpers -----------------------------------------------------------------------------
def _reader(message) -> m.Reader:
    """A reader past the op and flags bytes (the server looked at them already)."""
    if len(message) < 2:
        raise m.MessageError("message shorter than its op and flags")
    reader = m.Reader(message)
    reader.pos = 2
    return reader


def _ttl(ttl_ms: int) -> Milliseconds:
    if not 0 < ttl_ms < _MAX_TTL_MS:
        raise m.MessageError(f"ttl of {ttl_ms} ms is out of range")
    return Milliseconds(ttl_ms)


# -- requests ----------------------------------------------------------------------------------
def _encode_nothing(code: int) -> Callable[[int], bytes]:
    def encode(flags: int) -> bytes:
        return bytes((code, flags))

    return encode


def _decode_nothing(message) -> tuple:
    if len(message) != 2:
        _reader(message).end()  # names what is wrong: too short, or bytes left over
    return ()


def _encode_key(code: int) -> Callable[[int, bytes], bytes]:
    def encode(flags: int, key: bytes) -> bytes:
        return bytes((code, flags)) + _U32.pack(len(key)) + key

    return encode


def _decode_key(message) -> tuple:
    reader = _reader(message)
    key = reader.blob()
    reader.end()
    return (key,)


def _encode_txid(code: int) -> Callable[[int, int], bytes]:
    def encode(flags: int, txid: int) -> bytes:
        return bytes((code, flags)) + _U64.pack(txid)

    return encode


def _decode_txid(message) -> tuple:
    reader = _reader(message)
    txid = reader.u64()
    reader.end()
    return (txid,)


def _encode_put(flags: int, key: bytes, value: bytes) -> bytes:
    return b"".join((bytes((m.PUT, flags)), _U32.pack(len(key)), key, _U32.pack(len(value)), value))


def _decode_put(message) -> tuple:
    reader = _reader(message)
    key, value = reader.blob(), reader.blob()
    reader.end()
    return key, value


def _encode_put_ttl(flags: int, key: bytes, value: bytes, ttl_ms: int) -> bytes:
    return b"".join((bytes((m.PUT_TTL, flags)), _U32.pack(len(key)), key, _U32.pack(len(value)), value, _U64.pack(ttl_ms)))


def _decode_put_ttl(message) -> tuple:
    reader = _reader(message)
    key, value, ttl_ms = reader.blob(), reader.blob(), reader.u64()
    reader.end()
    return key, value, _ttl(ttl_ms)


def _encode_expire(flags: int, key: bytes, ttl_ms: int | None) -> bytes:
    """ttl_ms None: never expire (0 on the wire)."""
    return bytes((m.EXPIRE, flags)) + _U32.pack(len(key)) + key + _U64.pack(ttl_ms or 0)


def _decode_expire(message) -> tuple:
    reader = _reader(message)
    key, ttl_ms = reader.blob(), reader.u64()
    reader.end()
    return key, (_ttl(ttl_ms) if ttl_ms else None)


def _encode_cas(flags: int, key: bytes, expected: bytes | None, new: bytes | None) -> bytes:
    return bytes((m.CAS, flags)) + m.blob(key) + m.optional(expected) + m.optional(new)


def _decode_cas(message) -> tuple:
    reader = _reader(message)
    key, expected, new = reader.blob(), reader.optional(), reader.optional()
    reader.end()
    return key, expected, new


def _encode_apply(flags: int, ops) -> bytes:
    """ops: (kind, key, value) operations (batches.check_ops)."""
    return m.encode_apply(ops, flags)


def _decode_apply(message) -> tuple:
    """(writes, expects) as the engine takes them (messages.decode_ops)."""
    reader = _reader(message)
    writes, expects = m.decode_ops(reader)
    reader.end()
    return writes, expects


def _encode_prepare(flags: int, txid: int, op_list) -> bytes:
    """op_list: an encoded operation list (a TXN part, forwarded as it came)."""
    return b"".join((bytes((m.PREPARE, flags)), _U64.pack(txid), op_list))


def _decode_prepare(message) -> tuple:
    reader = _reader(message)
    txid = reader.u64()
    writes, expects = m.decode_ops(reader)
    reader.end()
    return txid, writes, expects


def _encode_get_many(flags: int, keys: list) -> bytes:
    return bytes((m.GET_MANY, flags)) + m.blob_list(keys)


def _decode_get_many(message) -> tuple:
    if len(message) < 2:
        raise m.MessageError("message shorter than its op and flags")
    return (m.decode_blob_list(bytes(message), 2),)


def _encode_scan(flags: int, start, stop, reverse: bool, prefix, limit: int) -> bytes:
    """One page of a scan (a read: no flags to carry)."""
    return m.encode_scan(start, stop, reverse, prefix, limit)


def _decode_scan(message) -> tuple:
    reader = _reader(message)
    start, stop, reverse, prefix, limit = reader.optional(), reader.optional(), reader.u8(), reader.optional(), reader.u32()
    reader.end()
    return start, stop, bool(reverse), prefix, limit


def _encode_txn(flags: int, by_shard: dict) -> bytes:
    """by_shard: {shard: its (kind, key, value) operations} (batches.route_ops)."""
    return encode_txn(by_shard, flags)


def _decode_txn(message) -> tuple:
    return (decode_txn_parts(message),)


# -- answers -----------------------------------------------------------------------------------
_FLAG_ANSWERS = (b"\x00\x00", b"\x00\x01")


def _answer_none(result: None) -> bytes:
    return m.OK_RESPONSE


def _result_none(status: int, body) -> None:
    return None


def _answer_flag(result: bool) -> bytes:
    return _FLAG_ANSWERS[1 if result else 0]


def _result_flag(status: int, body) -> bool:
    return body[0] == 1


def _answer_value(value: bytes | None) -> bytes:
    return m.NOT_FOUND_RESPONSE if value is None else b"\x00" + value


def _result_value(status: int, body) -> bytes | None:
    return None if status == m.NOT_FOUND else bytes(body)


def _answer_ttl(left_ms) -> bytes:
    """left_ms: whole milliseconds left, None (absent) or math.inf (never expires)."""
    if left_ms is None:
        return m.NOT_FOUND_RESPONSE
    return b"\x00" + _U64.pack(m.TTL_NEVER if left_ms == math.inf else left_ms)


def _result_ttl(status: int, body) -> int | float | None:
    if status == m.NOT_FOUND:
        return None
    left = _U64.unpack(body)[0]
    return math.inf if left == m.TTL_NEVER else left


def _answer_u64(n: int) -> bytes:
    return b"\x00" + _U64.pack(n)


def _result_u64(status: int, body) -> int:
    return _U64.unpack(body)[0]


def _answer_txids(txids: list[int]) -> bytes:
    return b"\x00" + b"".join(map(_U64.pack, txids))


def _result_txids(status: int, body) -> list[int]:
    if len(body) % 8:
        raise m.MessageError(f"a list of txids cannot be {len(body)} bytes")
    return [txid for (txid,) in _U64.iter_unpack(body)]


def _answer_json(obj: dict) -> bytes:
    return b"\x00" + json.dumps(obj).encode()


def _result_json(status: int, body) -> dict:
    return json.loads(bytes(body))


def _answer_values(values: list) -> bytes:
    return b"\x00" + m.encode_optionals(values)


def _result_values(status: int, body) -> list:
    return m.decode_optionals(body)


def _answer_page(page: tuple) -> bytes:
    """page: (items, more, batch history) of one SCAN page."""
    items, more, history = page
    return b"\x00" + m.encode_items(items, more) + m.encode_history(history)


def _result_page(status: int, body) -> tuple:
    return m.decode_scan_page(body)


# -- the operations ----------------------------------------------------------------------------
_W, _C, _BOTH = frozenset((WORKER,)), frozenset((COORDINATOR,)), frozenset((WORKER, COORDINATOR))


def _op(code, servers, write, encode, decode, answer, result, coordinator_only=False) -> Operation:
    return Operation(code, m.OP_NAMES[code], servers, write, coordinator_only, encode, decode, answer, result)


PING = _op(m.PING, _BOTH, False, _encode_nothing(m.PING), _decode_nothing, _answer_none, _result_none)
GET = _op(m.GET, _W, False, _encode_key(m.GET), _decode_key, _answer_value, _result_value)
PUT = _op(m.PUT, _W, True, _encode_put, _decode_put, _answer_none, _result_none)
DELETE = _op(m.DELETE, _W, True, _encode_key(m.DELETE), _decode_key, _answer_flag, _result_flag)
CAS = _op(m.CAS, _W, True, _encode_cas, _decode_cas, _answer_flag, _result_flag)
APPLY = _op(m.APPLY, _W, True, _encode_apply, _decode_apply, _answer_none, _result_none)
GET_MANY = _op(m.GET_MANY, _W, False, _encode_get_many, _decode_get_many, _answer_values, _result_values)
SCAN = _op(m.SCAN, _W, False, _encode_scan, _decode_scan, _answer_page, _result_page)
LEN = _op(m.LEN, _W, False, _encode_nothing(m.LEN), _decode_nothing, _answer_u64, _result_u64)
STATS = _op(m.STATS, _BOTH, False, _encode_nothing(m.STATS), _decode_nothing, _answer_json, _result_json)
SYNC = _op(m.SYNC, _W, False, _encode_nothing(m.SYNC), _decode_nothing, _answer_none, _result_none)
COMPACT = _op(m.COMPACT, _W, False, _encode_nothing(m.COMPACT), _decode_nothing, _answer_json, _result_json)
PUT_TTL = _op(m.PUT_TTL, _W, True, _encode_put_ttl, _decode_put_ttl, _answer_none, _result_none)
TTL = _op(m.TTL, _W, False, _encode_key(m.TTL), _decode_key, _answer_ttl, _result_ttl)
EXPIRE = _op(m.EXPIRE, _W, True, _encode_expire, _decode_expire, _answer_flag, _result_flag)
TXN = _op(m.TXN, _C, False, _encode_txn, _decode_txn, _answer_none, _result_none)
PREPARE = _op(m.PREPARE, _W, True, _encode_prepare, _decode_prepare, _answer_none, _result_none, coordinator_only=True)
COMMIT = _op(m.COMMIT, _W, True, _encode_txid(m.COMMIT), _decode_txid, _answer_flag, _result_flag, coordinator_only=True)
ABORT = _op(m.ABORT, _W, True, _encode_txid(m.ABORT), _decode_txid, _answer_flag, _result_flag, coordinator_only=True)
PENDING = _op(m.PENDING, _W, False, _encode_nothing(m.PENDING), _decode_nothing, _answer_txids, _result_txids, coordinator_only=True)

OPERATIONS: tuple[Operation, ...] = (
    PING, GET, PUT, DELETE, CAS, APPLY, GET_MANY, SCAN, LEN, STATS, SYNC, COMPACT, PUT_TTL, TTL, EXPIRE,
    TXN, PREPARE, COMMIT, ABORT, PENDING,
)  # fmt: skip
BY_CODE: dict[int, Operation] = {op.code: op for op in OPERATIONS}
# (A TXN's FLAG_FSYNC is the coordinator's business: it fsyncs its decision log once per round
# and passes the flag on in PREPARE and COMMIT.)
WRITES = frozenset(op.code for op in OPERATIONS if op.write)
COORDINATOR_ONLY = frozenset(op.code for op in OPERATIONS if op.coordinator_only)


def served_by(server: str) -> frozenset:
    """The op codes `server` (WORKER or COORDINATOR) answers."""
    return frozenset(op.code for op in OPERATIONS if server in op.servers)


def dispatch_table(server: str, handlers: dict[int, Callable], elsewhere: frozenset = frozenset()) -> dict[int, Callable[[bytes], bytes]]:
    """{op code: serve(request) -> response} for `server`, from one handler per operation it
    serves: serve decodes the request, calls the handler with its arguments and encodes what it
    returns. `elsewhere`: operations the server answers by other means (the coordinator's TXN,
    run in rounds). ValueError if the handlers and the declarations disagree."""
    expected = served_by(server) - elsewhere
    if set(handlers) != expected:
        missing = sorted(m.OP_NAMES[c] for c in expected - set(handlers))
        extra = sorted(m.OP_NAMES.get(c, str(c)) for c in set(handlers) - expected)
        raise ValueError(f"the {server}'s handlers do not match the protocol: missing {missing}, not served by it {extra}")
    return {code: _server(BY_CODE[code], handler) for code, handler in handlers.items()}


def _server(op: Operation, handler: Callable) -> Callable[[bytes], bytes]:
    decode, answer = op.decode, op.answer

    def serve(message) -> bytes:
        return answer(handler(*decode(message)))

    serve.__name__ = f"serve_{op.name.lower()}"
    return serve
