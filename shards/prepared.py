"""Cross-shard batches prepared on one shard and awaiting the coordinator's decision.

A participant logs a batch's writes and preconditions in one PREPARE record (its value laid out
as docs/FORMAT.md, "PREPARE value", says) and locks every key the batch names until a COMMIT or
ABORT record settles it (docs/TRANSACTIONS.md). This module holds that state in memory and
encodes the PREPARE value; the engine does the logging.
"""

from __future__ import annotations


from shardkv.errors import Busy, CorruptionError, StorageError
from shardkv.ipc.uniform import UniformPuts
from shardkv.wal.format import DELETE, PREPARE_COUNT, PREPARE_ENTRY, PREPARE_EXPECT, PREPARE_EXPECT_ABSENT, PUT

EXPECT = PREPARE_EXPECT  # the key must hold the value
EXPECT_ABSENT = PREPARE_EXPECT_ABSENT  # the key must be absent


def encode_prepare(batch: list, expects: list) -> bytes:
    """The value of a PREPARE record: u32 count, then per entry (type, key_len, value_len,
    expires_at), key and value. `batch` holds (PUT/DELETE, key, value, expires_at) tuples,
    `expects` (key, value or None); or `batch` is UniformPuts, whose entries are all alike
    but for their keys and values (one join, no loop)."""
    pack = PREPARE_ENTRY.pack
    if type(batch) is UniformPuts:
        if batch.head is None and not expects:
            n = len(batch.keys)
            parts = [None] * (3 * n + 1)
            parts[0] = PREPARE_COUNT.pack(n)
            parts[1::3] = [pack(PUT, batch.key_len, batch.value_len, 0)] * n
            parts[2::3] = batch.keys
            parts[3::3] = batch.values
            return b"".join(parts)
        batch = batch.tuples()
    parts = [PREPARE_COUNT.pack(len(batch) + len(expects))]
    append = parts.append
    for rtype, key, value, expires_at in batch:
        append(pack(rtype, len(key), len(value), expires_at))
        append(key)
        append(value)
    for key, value in expects:
        if value is None:
            append(pack(EXPECT_ABSENT, len(key), 0, 0))
            append(key)
        else:
            append(pack(EXPECT, len(key), len(value), 0))
            append(key)
            append(value)
    return b"".join(parts)


def decode_prepare(payload, where: str) -> tuple[list, list]:
    """(batch, expects) of a PREPARE value; CorruptionError naming `where` if it is malformed
    (its record passed its checksum, so this means a bug or a forged record)."""
    data = bytes(payload)
    size = len(data)
    if size < 4:
        raise CorruptionError(f"{where}: PREPARE value shorter than its count")
    count = PREPARE_COUNT.unpack_from(data)[0]
    batch: list = []
    expects: list = []
    pos = 4
    unpack = PREPARE_ENTRY.unpack_from
    for _ in range(count):
        if pos + PREPARE_ENTRY.size > size:
            raise CorruptionError(f"{where}: PREPARE value truncated")
        rtype, key_len, value_len, expires_at = unpack(data, pos)
        pos += PREPARE_ENTRY.size
        key, value = data[pos : pos + key_len], data[pos + key_len : pos + key_len + value_len]
        pos += key_len + value_len
        if pos > size or not key_len:
            raise CorruptionError(f"{where}: PREPARE entry runs past the end of the value")
        if rtype in (PUT, DELETE):
            batch.append((rtype, key, value, expires_at))
        elif rtype == EXPECT:
            expects.append((key, value))
        elif rtype == EXPECT_ABSENT:
            expects.append((key, None))
        else:
            raise CorruptionError(f"{where}: PREPARE entry of unknown type {rtype}")
    if pos != size:
        raise CorruptionError(f"{where}: {size - pos} unexpected bytes after the PREPARE entries")
    return batch, expects


class PreparedBatches:
    """The prepared, undecided batches of one shard and the keys they lock."""

    def __init__(self):
        self.batches: dict[int, tuple[list, list]] = {}  # txid -> (batch, expects)
        self.locks: dict[bytes, int] = {}  # key -> txid of the batch holding it
        # txid -> why the disk refused its COMMIT (full): decided, it keeps its locks until the
        # coordinator delivers the COMMIT again and it is logged.
        self.stalled: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def check_unlocked(self, keys) -> None:
        """Raise Busy if a prepared batch locks any of `keys` - StorageError if that batch is
        committed but the disk refused its COMMIT: the key is held until space comes back, and
        a client should not wait out its lock timeout for it (docs/RELIABILITY.md)."""
        locks = self.locks
        if locks:
            for key in keys:
                if key in locks:
                    why = self.stalled.get(locks[key])
                    if why is not None:
                        raise StorageError(f"key {bytes(key)[:40]!r} is held by a committed cross-shard batch that the disk refused to log ({why})")
                    raise Busy(f"key {bytes(key)[:40]!r} is locked by a cross-shard batch awaiting its decision")

    def add(self, txid: int, batch: list, expects: list) -> None:
        """Hold `txid`'s batch and lock its keys (the caller checked they were free)."""
        self.batches[txid] = (batch, expects)
        self.locks.update(dict.fromkeys(batch_keys(batch), txid))
        for key, _ in expects:
            self.locks[key] = txid

    def pop(self, txid: int) -> tuple[list, list] | None:
        """Forget `txid` and release its locks; its (batch, expects), or None if unknown."""
        entry = self.batches.pop(txid, None)
        if self.stalled:
            self.stalled.pop(txid, None)
        if entry is not None:
            locks = self.locks
            if not self.batches:
                # Every lock belongs to a prepared batch, so the last one's going frees them all:
                # the common case (one batch at a time) costs no loop over its keys.
                locks.clear()
                return entry
            for key in [*batch_keys(entry[0]), *(key for key, _ in entry[1])]:
                if locks.get(key) == txid:
                    del locks[key]
        return entry


def batch_keys(batch) -> list:
    """The keys a prepared batch writes."""
    return batch.keys if type(batch) is UniformPuts else [op[1] for op in batch]
