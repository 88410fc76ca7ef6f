"""Checking a batch before a shard engine logs it: every operation in the engine's own terms,
(PUT or DELETE, key, value, expires_at), or the whole batch as columns (`UniformPuts`).

Three shapes come in, and all leave as a checked batch (or a TypeError / ValueError, with nothing
logged):

- `PutColumns`, plain puts of one key and one value size a worker decoded with numpy: checked
  once for the whole batch;
- `Writes`, any other batch a worker decoded (ipc/uniform.py): already in the engine's terms,
  so only the sizes, which came from a ring, are checked, and each ttl becomes an instant;
- anything else: the engine's public form, ("put", key, value[, ttl seconds]) and ("delete",
  key) tuples, as `ShardEngine.apply` documents it.
"""

from __future__ import annotations

from typing import Iterable

from shardkv.limits import MAX_KEY_LEN, check_key, check_value
from shardkv.shards.expiry import ExpiryTable
from shardkv.ipc.uniform import PutColumns, UniformPuts, Writes
from shardkv.wal.format import DELETE, MAX_VALUE_LEN_FORMAT, PUT, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from shardkv.wal.writer import MAX_SEGMENT_SIZE

MAX_BATCH_BYTES = MAX_SEGMENT_SIZE - SEGMENT_HEADER_SIZE  # a batch is logged whole, in one segment


def check_ops(ops, max_value_size: int, expiry: ExpiryTable) -> list | UniformPuts:
    """The checked batch of `ops`: (PUT/DELETE, key, value, expires_at) tuples, or, for puts
    a worker decoded as columns, UniformPuts (checked as a whole: one size for all)."""
    if type(ops) is PutColumns:
        n = len(ops.keys)
        if not 0 < ops.key_len <= MAX_KEY_LEN or ops.value_len > max_value_size:
            check_key(ops.keys[0])
            check_value(ops.values[0], max_value_size, "max_value_size")
        if n * (RECORD_HEADER_SIZE + ops.key_len + ops.value_len) > MAX_BATCH_BYTES:
            raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
        return UniformPuts(ops.keys, ops.values, ops.key_len, ops.value_len)
    if type(ops) is Writes:
        return check_writes(ops, max_value_size, expiry.now_ms())
    if isinstance(ops, (str, bytes, bytearray, memoryview)) or not isinstance(ops, Iterable):
        raise TypeError(f"ops must be an iterable of operation tuples, not {type(ops).__name__}")
    batch = []
    size = 0
    for op in ops:
        if type(op) is tuple and len(op) == 3 and op[0] == "put" and type(op[1]) is bytes and type(op[2]) is bytes:
            key, value = op[1], op[2]  # the common case, checked inline
            if not 0 < len(key) <= MAX_KEY_LEN or len(value) > max_value_size:
                key, value = check_key(key), check_value(value, max_value_size, "max_value_size")
            batch.append((PUT, key, value, 0))
        elif not isinstance(op, (tuple, list)) or not op:
            raise TypeError(f"each op must be a tuple like ('put', key, value) or ('delete', key), not {op!r:.80}")
        elif op[0] == "put" and len(op) in (3, 4):
            key, value = check_key(op[1]), check_value(op[2], max_value_size, "max_value_size")
            batch.append((PUT, key, value, expiry.expiry_for(op[3]) if len(op) == 4 else 0))
        elif op[0] == "delete" and len(op) == 2:
            key, value = check_key(op[1]), b""
            batch.append((DELETE, key, b"", 0))
        else:
            raise ValueError(f"unknown op {op!r:.80}: expected ('put', key, value[, ttl]) or ('delete', key)")
        size += RECORD_HEADER_SIZE + len(key) + len(value)
    if size > MAX_BATCH_BYTES:
        raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
    return batch


def check_writes(writes: Writes, max_value_size: int, now_ms: int) -> list:
    """The checked batch of writes a worker decoded (already in the engine's terms: only the
    sizes are checked, and each ttl in ms becomes an expiry instant from `now_ms`)."""
    batch = []
    size = 0
    append = batch.append
    for write in writes:
        rtype, key, value, ttl_ms = write
        if not 0 < len(key) <= MAX_KEY_LEN or len(value) > max_value_size:
            check_key(key), check_value(value, max_value_size, "max_value_size")
        if ttl_ms:
            if not 0 < ttl_ms < 2**53:
                raise ValueError(f"ttl must be between 1 and 2**53 - 1 ms, not {ttl_ms}")
            append((rtype, key, value, now_ms + ttl_ms))
        else:
            append(write)  # (type, key, value, 0) is already the batch's own form
        size += RECORD_HEADER_SIZE + len(key) + len(value)
    if size > MAX_BATCH_BYTES:
        raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
    return batch


def check_expects(expects) -> list:
    """Validated (key, value or None) preconditions."""
    if isinstance(expects, (str, bytes, bytearray, memoryview)) or not isinstance(expects, Iterable):
        raise TypeError(f"expects must be an iterable of (key, value) pairs, not {type(expects).__name__}")
    checked = []
    for item in expects:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"each expectation must be a (key, value) pair, not {item!r:.80}")
        checked.append((check_key(item[0]), None if item[1] is None else check_value(item[1], MAX_VALUE_LEN_FORMAT)))
    return checked
