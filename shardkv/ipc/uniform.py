"""A batch of plain puts that all have one key length and one value length, kept as columns.

A worker decodes such a batch with numpy into `PutColumns` (shardkv/ipc/messages.py,
decode_ops); the engine checks it once for the whole batch as `UniformPuts` and keeps it in
this form through the log encoding, the index update and, for a cross-shard batch, the PREPARE
record and the commit: no tuple per operation on the way. Both types live here, apart from the
wire code, so that the engine takes the decoded batch without importing the protocol.
"""

from __future__ import annotations

from itertools import repeat

from shardkv.wal.format import PUT


class UniformPuts:
    """Puts (keys[i], values[i]); every key is `key_len` bytes, every value `value_len`, none
    expires. `head`, if set, is the (record type, key) of an empty record logged first in the
    same batch: the COMMIT record of a cross-shard batch."""

    __slots__ = ("keys", "values", "key_len", "value_len", "head")

    def __init__(self, keys: list, values: list, key_len: int, value_len: int, head: tuple[int, bytes] | None = None):
        self.keys, self.values, self.key_len, self.value_len, self.head = keys, values, key_len, value_len, head

    def __len__(self) -> int:
        return len(self.keys) + (self.head is not None)

    def headed(self, rtype: int, key: bytes) -> "UniformPuts":
        """The same puts, logged after an empty record of type `rtype` and key `key`."""
        return UniformPuts(self.keys, self.values, self.key_len, self.value_len, (rtype, key))

    def tuples(self) -> list:
        """The batch in its general form: (type, key, value, expires_at) tuples."""
        head = [] if self.head is None else [(self.head[0], self.head[1], b"", 0)]
        return head + list(zip(repeat(PUT), self.keys, self.values, repeat(0)))

    def columns(self) -> tuple[list, list, list, list, list, list]:
        """(types, keys, values, expires, key_lens, value_lens) of every record, head first."""
        n = len(self.keys)
        types, keys, values, expires = [PUT] * n, self.keys, self.values, [0] * n
        key_lens, value_lens = [self.key_len] * n, [self.value_len] * n
        if self.head is not None:
            rtype, key = self.head
            types, keys, values = [rtype, *types], [key, *keys], [b"", *values]
            expires.append(0)
            key_lens, value_lens = [len(key), *key_lens], [0, *value_lens]
        return types, keys, values, expires, key_lens, value_lens


class Writes(list):
    """A batch's writes as a worker decodes them from its ring, in the engine's own terms:
    (PUT, key, value, ttl_ms) and (DELETE, key, b"", 0) tuples, PUT and DELETE the record types
    of wal/format.py, ttl_ms whole milliseconds (0: never expires). No operation names, no
    seconds: the engine checks sizes and turns each ttl into an expiry instant, nothing else
    (`ShardEngine._check_ops`). Lengths are not trusted: the engine checks them like any input."""

    __slots__ = ()


class PutColumns(Writes):
    """A decoded batch of plain puts of one key length and one value length: (PUT, key, value,
    0) tuples like any other `Writes`, which also keeps its keys and values as columns, so that a
    shard engine can log and index the batch without a loop over tuples."""

    __slots__ = ("keys", "values", "key_len", "value_len")

    @classmethod
    def of(cls, keys: list, values: list, key_len: int, value_len: int) -> "PutColumns":
        """The puts (keys[i], values[i]); every key is `key_len` bytes, every value `value_len`."""
        self = cls(zip(repeat(PUT), keys, values, repeat(0)))
        self.keys, self.values, self.key_len, self.value_len = keys, values, key_len, value_len
        return self
