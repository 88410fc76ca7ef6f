"""Atomic batches on the client side: checking operations, routing them to shards and encoding
them for a worker (one shard: APPLY) or the coordinator (several: TXN). docs/TRANSACTIONS.md
says what happens next; the blocking and the asyncio clients share this module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from crc32c import crc32c

from shardkv.ipc import messages as m
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, MAX_KEY_LEN, check_key, check_value, ttl_milliseconds

MAX_BATCH_OPS = 1_000_000
MAX_BATCH_BYTES = 384 * 1024 * 1024  # keys and values; the messages carrying them stay under 512 MiB
_PART = struct.Struct("<HI")  # shard, length of the part's operation list
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def check_op(op) -> tuple[int, bytes, bytes]:
    """One operation as (kind, key, value) for the wire: ("put", key, value[, ttl]),
    ("delete", key) or ("expect", key, value or None)."""
    if type(op) is tuple and len(op) == 3 and op[0] == "put" and type(op[1]) is bytes and type(op[2]) is bytes:
        if 0 < len(op[1]) <= MAX_KEY_LEN and len(op[2]) <= DEFAULT_MAX_VALUE_SIZE:
            return m.OP_PUT, op[1], op[2]  # the common case, checked inline
    if not isinstance(op, (tuple, list)) or not op or not isinstance(op[0], str):
        raise TypeError(f"each operation must be a tuple like ('put', key, value), not {op!r:.80}")
    name = op[0]
    if name == "put" and len(op) in (3, 4):
        key, value = check_key(op[1]), check_value(op[2], DEFAULT_MAX_VALUE_SIZE)
        if len(op) == 4 and op[3] is not None:
            return m.OP_PUT_TTL, key, _U64.pack(ttl_milliseconds(op[3])) + value
        return m.OP_PUT, key, value
    if name == "delete" and len(op) == 2:
        return m.OP_DELETE, check_key(op[1]), b""
    if name == "expect" and len(op) == 3:
        if op[2] is None:
            return m.OP_EXPECT_ABSENT, check_key(op[1]), b""
        return m.OP_EXPECT, check_key(op[1]), check_value(op[2], 2**31 - 1)
    raise ValueError(f"unknown operation {op!r:.80}: expected ('put', key, value[, ttl]), ('delete', key) or ('expect', key, value)")


def check_ops(ops, max_ops: int, max_bytes: int) -> list[tuple[int, bytes, bytes]]:
    """Every operation of `ops` checked, and the batch within the limits (ValueError naming
    the limit otherwise; nothing has been sent yet)."""
    if isinstance(ops, (str, bytes, bytearray, memoryview, Mapping)) or not isinstance(ops, Iterable):
        raise TypeError(f"ops must be an iterable of operation tuples, not {type(ops).__name__}")
    checked = []
    append = checked.append
    for op in ops:
        append(check_op(op))
        if len(checked) > max_ops:
            raise ValueError(f"a batch may hold at most {max_ops} operations (max_batch_ops)")
    check_limits(checked, max_ops, max_bytes)
    return checked


def check_limits(checked: list, max_ops: int, max_bytes: int) -> None:
    """ValueError naming the limit if a batch of checked operations is too big."""
    if len(checked) > max_ops:
        raise ValueError(f"a batch may hold at most {max_ops} operations (max_batch_ops)")
    ttl_fields = 8 * sum([1 for item in checked if item[0] == m.OP_PUT_TTL])  # not the user's bytes
    if sum([len(item[1]) + len(item[2]) for item in checked]) - ttl_fields > max_bytes:
        raise ValueError(f"a batch may hold at most {max_bytes} bytes of keys and values (max_batch_bytes)")


def put_many_ops(items) -> list:
    """("put", key, value) operations from a mapping or an iterable of (key, value) pairs."""
    if isinstance(items, Mapping):
        items = items.items()
    elif isinstance(items, (str, bytes, bytearray, memoryview)) or not isinstance(items, Iterable):
        raise TypeError(f"put_many takes a mapping or (key, value) pairs, not {type(items).__name__}")
    ops = []
    append = ops.append
    for pair in items:
        if type(pair) is not tuple and (not isinstance(pair, (tuple, list)) or len(pair) != 2):
            raise TypeError(f"put_many takes (key, value) pairs, not {pair!r:.80}")
        if len(pair) != 2:
            raise TypeError(f"put_many takes (key, value) pairs, not {pair!r:.80}")
        append(("put", pair[0], pair[1]))
    return ops


def route_ops(checked: list, shard_map) -> dict[int, list]:
    """The checked operations grouped by the shard that owns each key (in batch order)."""
    by_shard: dict[int, list] = {}
    for item in checked:
        shard = shard_map[crc32c(item[1]) >> 20]
        part = by_shard.get(shard)
        if part is None:
            by_shard[shard] = part = []
        part.append(item)
    return by_shard


def encode_txn(by_shard: dict[int, list], flags: int) -> bytes:
    """A TXN request for the coordinator: u32 part count, then per part u16 shard, u32 length
    and the part's operation list (encoded as in APPLY, so it is forwarded without decoding)."""
    parts = [bytes((m.TXN, flags)), _U32.pack(len(by_shard))]
    for shard, items in by_shard.items():
        body = m.encode_ops(items)
        parts.append(_PART.pack(shard, len(body)))
        parts.append(body)
    return b"".join(parts)


def decode_txn_parts(message: bytes) -> list[tuple[int, memoryview]]:
    """(shard, operation list) of each part of a TXN request; MessageError if malformed."""
    view = memoryview(message)
    if len(view) < 6:
        raise m.MessageError("TXN request shorter than its part count")
    count = _U32.unpack_from(view, 2)[0]
    pos, parts = 6, []
    for _ in range(count):
        if pos + _PART.size > len(view):
            raise m.MessageError("TXN request truncated")
        shard, length = _PART.unpack_from(view, pos)
        pos += _PART.size
        if pos + length > len(view):
            raise m.MessageError("TXN part runs past the end of the request")
        parts.append((shard, view[pos : pos + length]))
        pos += length
    if pos != len(view):
        raise m.MessageError(f"{len(view) - pos} unexpected bytes at the end of the TXN request")
    return parts


class Batch:
    """Operations collected for one atomic batch (`db.batch()`): applied all together when the
    `with` block exits normally, not at all if it raises. Each call checks its arguments."""

    def __init__(self, submit):
        self._submit = submit
        self._ops: list = []
        self._done = False

    def put(self, key, value, ttl=None) -> None:
        """Set `key` to `value` (expiring `ttl` seconds after the batch is applied, if given)."""
        self._add(("put", key, value, ttl))

    def delete(self, key) -> None:
        """Remove `key` (absent already is fine)."""
        self._add(("delete", key))

    def expect(self, key, value) -> None:
        """Precondition: the batch applies only if `key` holds `value` (None: is absent) when
        it commits; otherwise it raises shardkv.Conflict and applies nothing."""
        self._add(("expect", key, value))

    def _add(self, op) -> None:
        if self._done:
            raise ValueError("this batch has already been applied or discarded")
        self._ops.append(check_op(op))

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done = True
        if exc_type is None:
            self._submit(self._ops)
