"""Finding a key in a shard's hash table and reading its record: the one home of the probe and
of the record check, for the engine and for clients' direct reads.

`find_value` is the reference. The two hot paths that do this - the engine's `Store.read`
(shards/store.py) and clients' `IndexReader._find` (shardkv/ipc/sharedindex.py, with its bounds
checks inline) - are flat copies of it, because a call layer there costs measurably (~5-10% of
a read); tests/test_probe.py checks that both agree with it, record for record, on random
tables with collisions, impostor entries and damage. Change the three together.

The table is a KeyIndex's (shards/keyindex.py): slots hold entry id + 1 (0: empty) and are
probed linearly from the key's home slot; the last slot is always empty. Keys are not in the
table: a candidate entry (same hash, same key length) is confirmed by the key in its record.
"""

from __future__ import annotations

from typing import Callable

from crc32c import crc32c

from shardkv.wal.format import PUT, RECORD_CHECKED, RECORD_CRC_FROM, RECORD_HEADER_SIZE

GOLDEN32 = 0x9E3779B1  # Fibonacci hashing spreads CRC-32C values over the table's top bits
KEY_IN_CHECKED = RECORD_HEADER_SIZE - RECORD_CRC_FROM  # where the key starts in the bytes the crc covers
checked_fields = RECORD_CHECKED.unpack_from  # (crc, type, expires_at) of the record at an offset


class DamagedRecord(ValueError):
    """A record an index entry names fails its checks (checksum, type, or bounds)."""

    def __init__(self, segment: int, offset: int, why: str = "record checksum mismatch"):
        super().__init__(f"segment {segment}: {why} at offset {offset}")
        self.segment, self.offset, self.why = segment, offset, why


def home_slot(h: int, shift: int) -> int:
    """The slot where the probe for hash `h` starts, in a table of 2**(32 - shift) home slots."""
    return ((h * GOLDEN32) & 0xFFFFFFFF) >> shift


def find_value(key: bytes, h: int, table: tuple, buffer_of: Callable, context=None, verify: bool = True, now_ms: Callable[[], float] | None = None):
    """The value of `key` (whose CRC-32C is `h`), or None if `table` has no entry for it.

    table: (shift, slots, hashes, key_lens, locations, value_lens), each indexable (KeyIndex.table).
    buffer_of(segment, end, context): the bytes of `segment`, readable at least up to `end`;
    it raises ValueError where the record may not be read.
    verify: check the record's CRC-32C, and that it is a PUT.
    now_ms: with it, a record that expired at or before now_ms() reads as absent.
    Raises DamagedRecord when a record fails its checks, also when an entry with the key's hash
    and length names an intact-looking record of another key that fails its checksum: a
    damaged key must not read as "absent".
    """
    shift, slots, hashes, key_lens, locations, value_lens = table
    key_len = len(key)
    i = ((h * GOLDEN32) & 0xFFFFFFFF) >> shift
    while True:
        s = slots[i]
        if not s:
            return None
        e = s - 1
        if hashes[e] == h and key_lens[e] == key_len:
            location = locations[e]
            offset = location & 0xFFFFFFFF
            value_start = offset + RECORD_HEADER_SIZE + key_len
            end = value_start + value_lens[e]
            buf = buffer_of(location >> 32, end, context)
            if verify:
                crc, rtype, expires_at = checked_fields(buf, offset)
                record = buf[offset + RECORD_CRC_FROM : end]  # exactly the bytes the crc covers
                if crc32c(record) != crc or rtype != PUT:
                    raise DamagedRecord(location >> 32, offset)
                if record.startswith(key, KEY_IN_CHECKED):
                    if now_ms is not None and expires_at and expires_at <= now_ms():
                        return None
                    return record[KEY_IN_CHECKED + key_len :]
            elif buf[offset + RECORD_HEADER_SIZE : value_start] == key:
                if now_ms is not None:
                    expires_at = checked_fields(buf, offset)[2]
                    if expires_at and expires_at <= now_ms():
                        return None
                return buf[value_start:end]
        i += 1
