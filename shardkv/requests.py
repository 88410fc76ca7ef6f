"""Every client request, built once for both clients.

`Client` (blocking) and `AsyncClient` (asyncio) are two thin shells around the same `Requests`
object: it checks the arguments (through the store's codecs, `shardkv/codecs.py`), picks the
shard, encodes the message and knows how to turn the answer into the result (both as
`shardkv/ipc/protocol.py` declares each operation). A shell only sends: `Client._run(request)` blocks on the ring, `AsyncClient._run`
awaits it. So each operation's checking, routing and decoding is written once.

A `Request` goes to one server (a shard, or the coordinator for a batch across shards); a
`Fanout` is one read message to each of several shards, answered together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Callable, Iterator, NamedTuple

from crc32c import crc32c

from shardkv.batches import Batch, check_limits, check_op, check_ops, put_many_ops, route_ops
from shardkv.codecs import Codec
from shardkv.ipc import protocol as p
from shardkv.ipc.messages import OP_DELETE
from shardkv.limits import MAX_KEY_LEN, check_key, check_scan_args, check_value, ttl_milliseconds

NEVER = math.inf  # ttl() of a key that never expires
# update() and clear() are not atomic: they send batches of this size (large enough that a
# round trip is a small share of a batch, small enough not to hold a shard's log for long).
BULK_OPS = 1000
BULK_BYTES = 16 << 20


class Request(NamedTuple):
    """One message to one server: `shard` (the shard count N: the coordinator), whether it is a
    read (retried while a worker restarts), and `finish(status, body)` giving the result."""

    shard: int
    message: bytes
    read: bool
    finish: Callable[[int, memoryview], Any]


class Fanout(NamedTuple):
    """One read message per shard, sent at once; `finish({shard: (status, body)})` gives the result."""

    messages: dict[int, bytes]
    finish: Callable[[dict], Any]


_new = tuple.__new__  # builds a Request without the Python-level NamedTuple.__new__ (hot path)
_encode_put, _put_result = p.PUT.encode, p.PUT.result  # (a put is the hottest write)


def _sum_u64(answers: dict) -> int:
    return sum(p.LEN.result(status, body) for status, body in answers.values())


def _seconds_left(status: int, body) -> float | None:
    """A TTL answer (milliseconds) in the API's unit, seconds."""
    left = p.TTL.result(status, body)
    return left if left is None or left == NEVER else left / 1000


class Requests:
    """The request-building core of one client (see the module docstring)."""

    def __init__(self, shard_map, shards: int, flags: int, key_codec: Codec | None, value_codec: Codec | None, max_batch_ops: int, max_batch_bytes: int):
        self.shard_map = shard_map  # the coordinator's map in shared memory: hash slot -> shard
        self.shards = shards
        self.flags = flags
        self.key_codec = key_codec
        self.value_codec = value_codec
        self.max_batch_ops = max_batch_ops
        self.max_batch_bytes = max_batch_bytes
        # Keys and values in and out, as fast as the codecs allow (None: bytes, no call at all).
        self.key_in: Callable[[Any], bytes] = check_key if key_codec is None else (lambda key: check_key(key_codec.encode(key)))
        self.value_in: Callable[[Any], bytes] = check_value if value_codec is None else (lambda value: check_value(value_codec.encode(value)))
        self.key_out = None if key_codec is None else key_codec.decode
        self.value_out = None if value_codec is None else value_codec.decode

    # -- keys and values -----------------------------------------------------------------------
    def shard_of(self, key: bytes) -> int:
        """The shard that owns the (encoded) `key`."""
        return self.shard_map[crc32c(key) >> 20]

    def keys_in(self, keys) -> list[bytes]:
        """Each key of an iterable, encoded and checked."""
        if isinstance(keys, (str, bytes, bytearray, memoryview)):
            raise TypeError(f"keys must be an iterable of keys, not a single {type(keys).__name__}")
        if self.key_codec is None:
            return [k if type(k) is bytes and 0 < len(k) <= MAX_KEY_LEN else check_key(k) for k in keys]
        key_in = self.key_in
        return [key_in(k) for k in keys]

    def value_or_none(self, value: bytes | None) -> Any:
        """A stored value (None: absent) as the caller sees it."""
        if value is None or self.value_out is None:
            return value
        return self.value_out(value)

    def values_out(self, values: list) -> list:
        """Stored values (None: absent) as the caller sees them."""
        value_out = self.value_out
        if value_out is None:
            return values
        return [None if v is None else value_out(v) for v in values]

    def items_out(self, items: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[Any, Any]]:
        """(key, value) pairs as the caller sees them."""
        key_out, value_out = self.key_out, self.value_out
        if key_out is None and value_out is None:
            return items
        return ((k if key_out is None else key_out(k), v if value_out is None else value_out(v)) for k, v in items)

    def item_or_none(self, item: tuple[bytes, bytes] | None) -> tuple[Any, Any] | None:
        """One (key, value) pair (or None) as the caller sees it."""
        return None if item is None else next(self.items_out(iter((item,))))

    def scan_args(self, start, stop, prefix, limit) -> tuple:
        """A scan's bounds encoded with the key codec and checked."""
        if self.key_codec is not None:
            start, stop, prefix = (None if b is None else self.key_codec.encode(b) for b in (start, stop, prefix))
        return check_scan_args(start, stop, prefix, limit)

    # -- single-key requests -------------------------------------------------------------------
    def put(self, key: Any, value: Any, ttl: Any = None) -> Request:
        """Set `key` to `value`, expiring `ttl` seconds (or a timedelta) from now if given."""
        key, value = self.key_in(key), self.value_in(value)
        if ttl is None:
            return _new(Request, (self.shard_of(key), _encode_put(self.flags, key, value), False, _put_result))
        message = p.PUT_TTL.encode(self.flags, key, value, ttl_milliseconds(ttl))
        return _new(Request, (self.shard_of(key), message, False, p.PUT_TTL.result))

    def delete(self, key: Any) -> Request:
        """Remove `key`; the result says whether it was there."""
        key = self.key_in(key)
        return _new(Request, (self.shard_of(key), p.DELETE.encode(self.flags, key), False, p.DELETE.result))

    def cas(self, key: Any, expected: Any, new: Any) -> Request:
        """Set `key` to `new` if it holds `expected` (None: absent); `new` None deletes."""
        key = self.key_in(key)
        if expected is not None:
            expected = check_value(expected if self.value_codec is None else self.value_codec.encode(expected), 2**31 - 1)
        new = None if new is None else self.value_in(new)
        return _new(Request, (self.shard_of(key), p.CAS.encode(self.flags, key, expected, new), False, p.CAS.result))

    def ttl(self, key: Any) -> Request:
        """Seconds before `key` expires: None if it is absent, NEVER (math.inf) if it never expires."""
        key = self.key_in(key)
        return _new(Request, (self.shard_of(key), p.TTL.encode(0, key), True, _seconds_left))

    def expire(self, key: Any, seconds: Any) -> Request:
        """Make `key` expire `seconds` (or a timedelta) from now, never if None."""
        key = self.key_in(key)
        ttl_ms = None if seconds is None else ttl_milliseconds(seconds)
        return _new(Request, (self.shard_of(key), p.EXPIRE.encode(self.flags, key, ttl_ms), False, p.EXPIRE.result))

    # -- reads of several keys -----------------------------------------------------------------
    def get_many_plan(self, keys: list[bytes]) -> tuple[list[int], dict[int, list[int]]]:
        """(the crc32c of each key, {shard: the indexes of its keys}) for a get_many."""
        hashes = [crc32c(key) for key in keys]
        shard_map = self.shard_map
        by_shard: dict[int, list[int]] = {}
        for i, h in enumerate(hashes):
            by_shard.setdefault(shard_map[h >> 20], []).append(i)
        return hashes, by_shard

    @staticmethod
    def get_many_message(shard_keys: list[bytes]) -> bytes:
        """The GET_MANY request of one shard's keys."""
        return p.GET_MANY.encode(0, shard_keys)

    get_many_result = staticmethod(p.GET_MANY.result)  # a GET_MANY answer: the values of its keys

    def get_many_values(self, count: int, by_shard: dict[int, list[int]], found: dict[int, list]) -> list:
        """The values of a get_many of `count` keys, in order, as the caller sees them, from
        `found` ({shard: the values of its keys}, in the order of `by_shard`)."""
        values: list = [None] * count
        for shard, idx in by_shard.items():
            for i, value in zip(idx, found[shard]):
                values[i] = value
        return self.values_out(values)

    # -- batches -------------------------------------------------------------------------------
    def encode_op(self, op: Any) -> Any:
        """A batch operation with its key and value passed through the codecs (as given when
        they are bytes: batches.check_op checks it)."""
        if (self.key_codec is None and self.value_codec is None) or not isinstance(op, (tuple, list)) or len(op) < 2:
            return op
        name = op[0]
        key = op[1] if self.key_codec is None else self.key_codec.encode(op[1])
        if name == "put" and len(op) in (3, 4):
            value = op[2] if self.value_codec is None else self.value_codec.encode(op[2])
            return ("put", key, value, *op[3:])
        if name == "expect" and len(op) == 3:
            value = op[2] if self.value_codec is None or op[2] is None else self.value_codec.encode(op[2])
            return ("expect", key, value)
        return (name, key, *op[2:])

    def checked_ops(self, ops: Any) -> list:
        """The operations of a batch, encoded, checked and within the limits."""
        if self.key_codec is not None or self.value_codec is not None:
            if isinstance(ops, (str, bytes, bytearray, memoryview)) or not hasattr(ops, "__iter__"):
                raise TypeError(f"ops must be an iterable of operation tuples, not {type(ops).__name__}")
            ops = [self.encode_op(op) for op in ops]
        return check_ops(ops, self.max_batch_ops, self.max_batch_bytes)

    def put_many_ops(self, items: Any) -> list:
        """put_many's pairs (a mapping or an iterable of pairs) as checked put operations."""
        if self.key_codec is not None or self.value_codec is not None:
            items = list(self._encoded_pairs(items))
        return check_ops(put_many_ops(items, self.max_batch_ops), self.max_batch_ops, self.max_batch_bytes)

    def _encoded_pairs(self, items: Any) -> Iterator[tuple[bytes, bytes]]:
        """The (key, value) pairs of put_many through the codecs (at most max_batch_ops + 1)."""
        if isinstance(items, Mapping):
            items = items.items()
        elif isinstance(items, (str, bytes, bytearray, memoryview)) or not isinstance(items, Iterable):
            raise TypeError(f"put_many takes a mapping or (key, value) pairs, not {type(items).__name__}")
        return self._pairs_through_codecs(islice(items, self.max_batch_ops + 1), "put_many")

    def _pairs_through_codecs(self, pairs: Iterable, caller: str) -> Iterator[tuple[bytes, bytes]]:
        """Each (key, value) of `pairs` through the store's codecs (a TypeError naming `caller`
        for anything but a pair)."""
        key_encode = (lambda k: k) if self.key_codec is None else self.key_codec.encode
        value_encode = (lambda v: v) if self.value_codec is None else self.value_codec.encode
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"{caller} takes (key, value) pairs, not {pair!r:.80}")
            yield key_encode(pair[0]), value_encode(pair[1])

    def batch(self, submit: Callable[[list], Any], batch_class: type = Batch) -> Batch:
        """A batch whose operations go through the codecs, then `submit(checked ops)`."""
        return batch_class(submit, self.encode_op)

    def write(self, checked: list) -> Request | None:
        """An atomic batch of checked operations: APPLY to its one shard, or TXN to the
        coordinator when it spans shards (None: nothing to do)."""
        check_limits(checked, self.max_batch_ops, self.max_batch_bytes)
        by_shard = route_ops(checked, self.shard_map)
        if not by_shard:
            return None
        if len(by_shard) == 1:
            shard, items = next(iter(by_shard.items()))
            return _new(Request, (shard, p.APPLY.encode(self.flags, items), False, p.APPLY.result))
        return _new(Request, (self.shards, p.TXN.encode(self.flags, by_shard), False, p.TXN.result))

    def update_batches(self, pairs: Iterable) -> Iterator[list]:
        """dict.update's (key, value) pairs through the codecs as batches of checked puts, each
        of at most BULK_OPS pairs and about BULK_BYTES (one pair alone may be larger, up to the
        limits); a bad pair raises TypeError or ValueError once the batches before it are sent."""
        max_ops, max_bytes = min(BULK_OPS, self.max_batch_ops), min(BULK_BYTES, self.max_batch_bytes)
        batch: list = []
        size = 0
        for key, value in self._pairs_through_codecs(pairs, "update"):
            op = check_op(("put", key, value))
            if batch and (len(batch) >= max_ops or size + len(op[1]) + len(op[2]) > max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(op)
            size += len(op[1]) + len(op[2])
        if batch:
            yield batch

    def delete_each(self, keys: list[bytes]) -> list[Request]:
        """Requests deleting `keys` (encoded, as a scan returns them): one APPLY per shard, not a
        batch across shards, since clear() promises no atomicity (no two-phase commit)."""
        by_shard = route_ops([(OP_DELETE, key, b"") for key in keys], self.shard_map)
        return [_new(Request, (shard, p.APPLY.encode(self.flags, items), False, p.APPLY.result)) for shard, items in by_shard.items()]

    # -- every shard ---------------------------------------------------------------------------
    def len(self) -> Fanout:
        """The number of keys."""
        return Fanout({s: p.LEN.encode(0) for s in range(self.shards)}, _sum_u64)

    def stats(self) -> Fanout:
        """Per-shard engine statistics and their totals."""

        def finish(answers: dict) -> dict:
            shards = [p.STATS.result(*answers[s]) for s in range(self.shards)]
            totals = {k: sum(s[k] for s in shards) for k in ("keys", "live_bytes", "total_bytes", "segments")}
            totals["garbage_ratio"] = 1 - totals["live_bytes"] / totals["total_bytes"] if totals["total_bytes"] else 0.0
            return {"shards": shards, **totals}

        return Fanout({s: p.STATS.encode(0) for s in range(self.shards)}, finish)

    def sync(self) -> Fanout:
        """fsync every shard's log."""
        return Fanout({s: p.SYNC.encode(0) for s in range(self.shards)}, lambda answers: None)

    def compact_targets(self, shard: Any) -> list[int]:
        """The shards a compact() call names (all of them for None)."""
        if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int)):
            raise TypeError(f"shard must be an int or None, not {type(shard).__name__}")
        if shard is not None and not 0 <= shard < self.shards:
            raise ValueError(f"shard must be between 0 and {self.shards - 1}, not {shard}")
        return list(range(self.shards)) if shard is None else [shard]

    def compact_start(self, shard: int) -> Request:
        """Start an online compaction of `shard`."""
        return _new(Request, (shard, p.COMPACT.encode(0), False, p.COMPACT.result))

    def compaction_state(self, targets: list[int]) -> Fanout:
        """{shard: its compaction state} (running, done, total, last) of the target shards."""
        return Fanout({s: p.STATS.encode(0) for s in targets}, lambda answers: {s: p.STATS.result(*answers[s])["compaction"] for s in targets})
