"""Request and response messages between clients and shard workers (docs/IPC.md, "Messages").

Every request starts with `op` (u8) and `flags` (u8). A worker decodes untrusted bytes with
`Reader`, which checks every length against what is left, so a malformed message raises
MessageError (a ValueError) instead of reading out of bounds.
"""

from __future__ import annotations

import struct
from itertools import repeat
from operator import add

import numpy as np

from shardkv.errors import Busy, Conflict, CorruptionError, Error, StorageError, Unavailable
from shardkv.ipc.uniform import PutColumns, Writes
from shardkv.wal.format import DELETE as RECORD_DELETE, PUT as RECORD_PUT  # (PUT and DELETE here are op codes)

PING, GET, PUT, DELETE, CAS, APPLY, GET_MANY, SCAN, LEN, STATS, SYNC, COMPACT, PUT_TTL, TTL, EXPIRE = range(1, 16)
TXN, PREPARE, COMMIT, ABORT, PENDING = range(16, 21)
OP_NAMES = {
    PING: "PING", GET: "GET", PUT: "PUT", DELETE: "DELETE", CAS: "CAS", APPLY: "APPLY", GET_MANY: "GET_MANY", SCAN: "SCAN",
    LEN: "LEN", STATS: "STATS", SYNC: "SYNC", COMPACT: "COMPACT", PUT_TTL: "PUT_TTL", TTL: "TTL", EXPIRE: "EXPIRE",
    TXN: "TXN", PREPARE: "PREPARE", COMMIT: "COMMIT", ABORT: "ABORT", PENDING: "PENDING",
}
FLAG_FSYNC = 1

# Operation kinds inside APPLY, TXN and PREPARE (docs/IPC.md, "Batches").
OP_PUT, OP_DELETE, OP_PUT_TTL, OP_EXPECT, OP_EXPECT_ABSENT = 1, 2, 3, 4, 5

OK, NOT_FOUND, ERROR = 0, 1, 2
TTL_NEVER = 2**64 - 1  # a TTL answer's milliseconds for a key that never expires
ERR_VALUE, ERR_TYPE, ERR_CORRUPTION, ERR_UNAVAILABLE, ERR_STORAGE, ERR_OTHER, ERR_BUSY, ERR_CONFLICT = 1, 2, 3, 4, 5, 6, 7, 8
_ERROR_KINDS = {
    ERR_VALUE: ValueError, ERR_TYPE: TypeError, ERR_CORRUPTION: CorruptionError, ERR_BUSY: Busy, ERR_CONFLICT: Conflict,
    ERR_UNAVAILABLE: Unavailable, ERR_STORAGE: StorageError, ERR_OTHER: Error,
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
BATCH_RING = 8  # how many of a shard's last batches a scan can look up (shards/sortedkeys.py)
HISTORY = struct.Struct("<Q" + "QQQ" * BATCH_RING)  # a SCAN page's tail: batches, then (batch, first, last) each


class MessageError(ValueError):
    """A message does not follow the format (it came from a buggy or hostile peer)."""


class Reader:
    """Bounds-checked decoding of a message."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def _take(self, n: int):
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise MessageError(f"message truncated: field of {n} bytes at offset {self.pos} of {len(self.buf)}")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def blob(self) -> bytes:
        return bytes(self._take(self.u32()))

    def optional(self) -> bytes | None:
        present = self.u8()
        if present > 1:
            raise MessageError(f"bad presence byte {present} at offset {self.pos - 1}")
        return self.blob() if present else None

    def count(self, min_item: int) -> int:
        """A list length, checked against the bytes left (each item needs `min_item` bytes)."""
        n = self.u32()
        if n * min_item > len(self.buf) - self.pos:
            raise MessageError(f"list of {n} items cannot fit in the {len(self.buf) - self.pos} bytes left")
        return n

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise MessageError(f"{len(self.buf) - self.pos} unexpected bytes at the end of the message")


def blob(data: bytes) -> bytes:
    """Encode a bytes field."""
    return _U32.pack(len(data)) + data


def optional(data: bytes | None) -> bytes:
    """Encode an optional bytes field."""
    return b"\x00" if data is None else b"\x01" + _U32.pack(len(data)) + data


def blob_list(items) -> bytes:
    """Encode a list of bytes fields."""
    return b"".join([_U32.pack(len(items))] + [_U32.pack(len(x)) + x for x in items])


# -- requests (client side) -------------------------------------------------------------------
def request(op: int, flags: int = 0, *fields: bytes) -> bytes:
    """A request: op, flags and already-encoded fields."""
    return bytes((op, flags)) + b"".join(fields)


def u64(value: int) -> bytes:
    """Encode a u64 field."""
    return _U64.pack(value)


def encode_ops(ops) -> bytes:
    """The operation list of APPLY, PREPARE and a TXN part: u32 count, then (u8 kind, key,
    value) for each (kind, key, value) tuple; see the OP_* kinds."""
    columns = op_columns(ops)
    if columns is None:
        return _encode_ops_each(ops)
    return b"".join(ops_parts(columns)[0])


def _encode_ops_each(ops) -> bytes:
    """encode_ops one operation at a time (the reference `ops_parts` must match)."""
    pack = _U32.pack
    parts = [pack(len(ops))]
    append = parts.append
    for kind, key, value in ops:
        append(bytes((kind,)) + pack(len(key)))
        append(key)
        append(pack(len(value)))
        append(value)
    return b"".join(parts)


def encode_apply(ops, flags: int) -> bytes:
    """An APPLY request from (kind, key, value) tuples."""
    columns = op_columns(ops)
    if columns is None:
        return bytes((APPLY, flags)) + _encode_ops_each(ops)
    parts = ops_parts(columns)[0]
    parts[0] = bytes((APPLY, flags)) + parts[0]
    return b"".join(parts)


class CheckedOps(list):
    """Checked (kind, key, value) operations (shardkv/batches.py builds them): a list, which
    also keeps its keys, values and their lengths as columns (tuples of equal length), so that
    routing and encoding need no loop over the tuples. Treat it as read-only."""

    __slots__ = ("kinds", "keys", "values", "key_lens", "value_lens", "nbytes")

    @classmethod
    def of(cls, kinds, keys, values, key_lens, value_lens, nbytes: int) -> "CheckedOps":
        """Operations from columns; kinds None: every operation is a plain put (OP_PUT).
        nbytes: the user's bytes of keys and values (a ttl field does not count)."""
        self = cls(zip(repeat(OP_PUT) if kinds is None else kinds, keys, values))
        self.kinds, self.keys, self.values = kinds, keys, values
        self.key_lens, self.value_lens, self.nbytes = key_lens, value_lens, nbytes
        return self


def op_columns(ops) -> tuple | None:
    """(kinds, or None when every one is OP_PUT; keys; values; key_lens; value_lens) of
    (kind, key, value) operations, or None if they are not all such triples of an int kind
    and bytes-like key and value."""
    if type(ops) is CheckedOps:
        return ops.kinds, ops.keys, ops.values, ops.key_lens, ops.value_lens
    if not ops:
        return None, (), (), (), ()
    if set(map(len, ops)) != {3}:
        return None
    kinds, keys, values = zip(*ops)
    if set(map(type, kinds)) != {int} or min(kinds) < 0 or max(kinds) > 255:
        return None
    if not set(map(type, keys)) <= _BYTES_LIKE or not set(map(type, values)) <= _BYTES_LIKE:
        return None
    return (None if kinds.count(OP_PUT) == len(kinds) else kinds), keys, values, tuple(map(len, keys)), tuple(map(len, values))


_BYTES_LIKE = frozenset((bytes, bytearray))


class _PackCache(dict):
    """u32 little-endian encodings of lengths (with a prefix), kept for the lengths seen most."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: bytes):
        super().__init__()
        self.prefix = prefix

    def __missing__(self, n: int) -> bytes:
        encoded = self.prefix + _U32.pack(n)
        if len(self) < 4096:
            self[n] = encoded
        return encoded


_LENGTHS = _PackCache(b"")
_PUT_HEADS = _PackCache(bytes((OP_PUT,)))  # kind byte of a plain put, then the key length
_KIND_BYTES = [bytes((kind,)) for kind in range(256)]


def ops_parts(columns: tuple) -> tuple[list, int]:
    """The pieces of an operation list (b"".join makes it) and its length in bytes, from
    `op_columns`: one join over the whole batch, no loop per operation."""
    kinds, keys, values, key_lens, value_lens = columns
    n = len(keys)
    parts = [None] * (4 * n + 1)
    parts[0] = _U32.pack(n)
    if kinds is None:
        parts[1::4] = list(map(_PUT_HEADS.__getitem__, key_lens))
    else:
        parts[1::4] = list(map(add, map(_KIND_BYTES.__getitem__, kinds), map(_LENGTHS.__getitem__, key_lens)))
    parts[2::4] = keys
    parts[3::4] = list(map(_LENGTHS.__getitem__, value_lens))
    parts[4::4] = values
    return parts, 4 + 9 * n + sum(key_lens) + sum(value_lens)


def decode_ops(reader: "Reader") -> tuple[list, list]:
    """(writes, expects) of the operation list at the reader's position, which ends the
    message: writes in the engine's native form (`ipc.uniform.Writes`: (RECORD_PUT, key,
    value, ttl_ms) and (RECORD_DELETE, key, b"", 0)), expects as (key, value or None). A
    tight loop: batches carry up to a million operations."""
    data, pos = bytes(reader.buf), reader.pos
    size = len(data)
    if pos + 4 > size:
        raise MessageError("operation list shorter than its count")
    count = _U32.unpack_from(data, pos)[0]
    pos += 4
    if 9 * count > size - pos:
        raise MessageError(f"list of {count} operations cannot fit in the {size - pos} bytes left")
    if count >= 16:
        writes = _decode_same_size_puts(data, pos, count)
        if writes is not None:
            reader.pos = size
            return writes, []
    writes = Writes()
    expects: list = []
    put = writes.append
    unpack = _U32.unpack_from
    for _ in range(count):
        if pos + 5 > size:
            raise MessageError("operation list truncated")
        kind = data[pos]
        key_end = pos + 5 + unpack(data, pos + 1)[0]
        if key_end + 4 > size:
            raise MessageError("operation key runs past the end of the message")
        value_end = key_end + 4 + unpack(data, key_end)[0]
        if value_end > size:
            raise MessageError("operation value runs past the end of the message")
        key = data[pos + 5 : key_end]
        if kind == OP_PUT:
            put((RECORD_PUT, key, data[key_end + 4 : value_end], 0))
        elif kind == OP_DELETE and value_end == key_end + 4:
            put((RECORD_DELETE, key, b"", 0))
        elif kind == OP_PUT_TTL and value_end >= key_end + 12:
            ttl_ms = _U64.unpack_from(data, key_end + 4)[0]
            if not 0 < ttl_ms < 2**53:
                raise MessageError(f"ttl of {ttl_ms} ms is out of range")
            put((RECORD_PUT, key, data[key_end + 12 : value_end], ttl_ms))
        elif kind == OP_EXPECT:
            expects.append((key, data[key_end + 4 : value_end]))
        elif kind == OP_EXPECT_ABSENT and value_end == key_end + 4:
            expects.append((key, None))
        else:
            raise MessageError(f"bad batch operation kind {kind} at offset {pos}")
        pos = value_end
    reader.pos = pos
    return writes, expects


def _decode_same_size_puts(data: bytes, pos: int, count: int) -> list | None:
    """decode_ops' writes, decoded with numpy, when the list holds only plain puts whose keys
    are all one length and whose values are all one length and ends the message (a batch of
    fixed-size records); None otherwise (decode_ops then walks the list)."""
    size = len(data)
    if data[pos] != OP_PUT or pos + 9 > size:
        return None
    key_len = _U32.unpack_from(data, pos + 1)[0]
    if not key_len or pos + 9 + key_len > size:
        return None
    value_len = _U32.unpack_from(data, pos + 5 + key_len)[0]
    stride = 9 + key_len + value_len
    if stride * count != size - pos:
        return None
    rows = np.frombuffer(data, dtype=np.uint8, count=stride * count, offset=pos).reshape(count, stride)
    head, value_head = slice(0, 5), slice(5 + key_len, 9 + key_len)
    if not ((rows[:, head] == rows[0, head]).all() and (rows[:, value_head] == rows[0, value_head]).all()):
        return None
    keys = rows[:, 5 : 5 + key_len].copy().view(f"V{key_len}").ravel().tolist()
    values = rows[:, 9 + key_len :].copy().view(f"V{value_len}").ravel().tolist() if value_len else [b""] * count
    return PutColumns.of(keys, values, key_len, value_len)


def encode_scan(start, stop, reverse: bool, prefix, limit: int) -> bytes:
    """A SCAN request for one page."""
    return request(SCAN, 0, optional(start), optional(stop), bytes((1 if reverse else 0,)), optional(prefix), _U32.pack(limit))


# -- responses --------------------------------------------------------------------------------
OK_RESPONSE = b"\x00"
NOT_FOUND_RESPONSE = b"\x01"


def ok(body: bytes = b"") -> bytes:
    """An OK response."""
    return b"\x00" + body


def not_found() -> bytes:
    """A NOT_FOUND response."""
    return b"\x01"


def error_response(exc: BaseException) -> bytes:
    """An ERROR response describing `exc`."""
    kind = ERR_OTHER
    for code, cls in _ERROR_KINDS.items():
        if type(exc) is cls or (code != ERR_OTHER and isinstance(exc, cls)):
            kind = code
            break
    message = f"{exc}" if kind != ERR_OTHER else f"{type(exc).__name__}: {exc}"
    return bytes((ERROR, kind)) + message.encode("utf-8", "replace")[:4096]


def parse_response(message) -> tuple[int, memoryview]:
    """(status, body) of a response; raises the error an ERROR response carries."""
    if not message:
        raise MessageError("empty response")
    status = message[0]
    if status == ERROR:
        kind = message[1] if len(message) > 1 else ERR_OTHER
        text = bytes(message[2:]).decode("utf-8", "replace")
        raise _ERROR_KINDS.get(kind, Error)(text)
    if status not in (OK, NOT_FOUND):
        raise MessageError(f"unknown response status {status}")
    return status, memoryview(message)[1:]


def encode_items(items: list[tuple[bytes, bytes]], more: bool) -> bytes:
    """A SCAN response body without its batch history (see encode_history)."""
    parts = [_U32.pack(len(items))]
    for key, value in items:
        parts.append(_U32.pack(len(key)) + key)
        parts.append(_U32.pack(len(value)) + value)
    parts.append(b"\x01" if more else b"\x00")
    return b"".join(parts)


def decode_items(body) -> tuple[list[tuple[bytes, bytes]], bool]:
    """(items, more) of a SCAN response body."""
    reader = Reader(body)
    items = [(reader.blob(), reader.blob()) for _ in range(reader.count(8))]
    more = reader.u8() == 1
    reader.end()
    return items, more


def encode_history(history: tuple) -> bytes:
    """The batch history a SCAN page carries after its items: (batches, [(batch, first, last)]),
    the shard's count of single-shard batches and the key-prefix range of the last few
    (shards/sortedkeys.py `SortedView.note_batch`)."""
    batches, ring = history
    return HISTORY.pack(batches, *(value for entry in ring for value in entry))


def decode_scan_page(body) -> tuple[list[tuple[bytes, bytes]], bool, tuple]:
    """(items, more, batch history) of a SCAN response body."""
    reader = Reader(body)
    items = [(reader.blob(), reader.blob()) for _ in range(reader.count(8))]
    more = reader.u8() == 1
    values = HISTORY.unpack(reader._take(HISTORY.size))
    reader.end()
    return items, more, (values[0], [tuple(values[1 + 3 * i : 4 + 3 * i]) for i in range(BATCH_RING)])


def encode_optionals(values: list[bytes | None]) -> bytes:
    """A GET_MANY response body."""
    return b"".join([_U32.pack(len(values))] + [optional(v) for v in values])


def decode_optionals(body) -> list[bytes | None]:
    """The values of a GET_MANY response body (a tight loop: this decodes thousands at a time)."""
    data = bytes(body)
    size = len(data)
    if size < 4:
        raise MessageError("GET_MANY response shorter than its count")
    count = _U32.unpack_from(data, 0)[0]
    if count > size - 4:
        raise MessageError(f"GET_MANY response of {size} bytes cannot hold {count} values")
    values: list[bytes | None] = []
    append = values.append
    unpack = _U32.unpack_from
    pos = 4
    for _ in range(count):
        if pos >= size:
            raise MessageError("GET_MANY response truncated")
        present = data[pos]
        if present == 1:
            if pos + 5 > size:
                raise MessageError("GET_MANY response truncated")
            end = pos + 5 + unpack(data, pos + 1)[0]
            if end > size:
                raise MessageError("GET_MANY value runs past the end of the response")
            append(data[pos + 5 : end])
            pos = end
        elif present == 0:
            append(None)
            pos += 1
        else:
            raise MessageError(f"bad presence byte {present} at offset {pos}")
    if pos != size:
        raise MessageError(f"{size - pos} unexpected bytes at the end of the message")
    return values


def decode_blob_list(data: bytes, pos: int) -> list[bytes]:
    """A list of bytes fields starting at `pos` and ending the message (a tight loop)."""
    size = len(data)
    if pos + 4 > size:
        raise MessageError("list shorter than its count")
    count = _U32.unpack_from(data, pos)[0]
    if 4 * count > size - pos - 4:
        raise MessageError(f"list of {count} items cannot fit in the {size - pos - 4} bytes left")
    items = []
    append = items.append
    unpack = _U32.unpack_from
    pos += 4
    for _ in range(count):
        if pos + 4 > size:
            raise MessageError("list truncated")
        end = pos + 4 + unpack(data, pos)[0]
        if end > size:
            raise MessageError("list item runs past the end of the message")
        append(data[pos + 4 : end])
        pos = end
    if pos != size:
        raise MessageError(f"{size - pos} unexpected bytes at the end of the message")
    return items
