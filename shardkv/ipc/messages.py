"""Request and response messages between clients and shard workers (docs/IPC.md, "Messages").

Every request starts with `op` (u8) and `flags` (u8). A worker decodes untrusted bytes with
`Reader`, which checks every length against what is left, so a malformed message raises
MessageError (a ValueError) instead of reading out of bounds.
"""

from __future__ import annotations

import struct

from shardkv.errors import Busy, Conflict, CorruptionError, Error, StorageError, Unavailable

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
ERR_VALUE, ERR_TYPE, ERR_CORRUPTION, ERR_UNAVAILABLE, ERR_STORAGE, ERR_OTHER, ERR_BUSY, ERR_CONFLICT = 1, 2, 3, 4, 5, 6, 7, 8
_ERROR_KINDS = {
    ERR_VALUE: ValueError, ERR_TYPE: TypeError, ERR_CORRUPTION: CorruptionError, ERR_BUSY: Busy, ERR_CONFLICT: Conflict,
    ERR_UNAVAILABLE: Unavailable, ERR_STORAGE: StorageError, ERR_OTHER: Error,
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


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
    return bytes((APPLY, flags)) + encode_ops(ops)


def decode_ops(reader: "Reader") -> tuple[list, list]:
    """(writes, expects) of the operation list at the reader's position, which ends the
    message: writes as the engine takes them (("put", key, value), ("put", key, value,
    ttl_seconds), ("delete", key)), expects as (key, value or None). A tight loop: batches
    carry up to a million operations."""
    data, pos = bytes(reader.buf), reader.pos
    size = len(data)
    if pos + 4 > size:
        raise MessageError("operation list shorter than its count")
    count = _U32.unpack_from(data, pos)[0]
    pos += 4
    if 9 * count > size - pos:
        raise MessageError(f"list of {count} operations cannot fit in the {size - pos} bytes left")
    writes: list = []
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
            put(("put", key, data[key_end + 4 : value_end]))
        elif kind == OP_DELETE and value_end == key_end + 4:
            put(("delete", key))
        elif kind == OP_PUT_TTL and value_end >= key_end + 12:
            ttl_ms = _U64.unpack_from(data, key_end + 4)[0]
            if not 0 < ttl_ms < 2**53:
                raise MessageError(f"ttl of {ttl_ms} ms is out of range")
            put(("put", key, data[key_end + 12 : value_end], ttl_ms / 1000))
        elif kind == OP_EXPECT:
            expects.append((key, data[key_end + 4 : value_end]))
        elif kind == OP_EXPECT_ABSENT and value_end == key_end + 4:
            expects.append((key, None))
        else:
            raise MessageError(f"bad batch operation kind {kind} at offset {pos}")
        pos = value_end
    reader.pos = pos
    return writes, expects


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
    """A SCAN response body."""
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
