"""The hash probe and record check have one home (ipc/probe.py `find_value`) and two flat
copies on hot paths: the engine's (shards/store.py `Store.read`) and clients' direct reads'
(shardkv/ipc/sharedindex.py `IndexReader._find`). They must agree on every table, intact or
not - value, absent (or expired, for the reader), or damaged."""

from __future__ import annotations

import random
import struct
import time
from types import SimpleNamespace

import pytest
from crc32c import crc32c

from shardkv.errors import CorruptionError
from shardkv.ipc.sharedindex import IndexReader
from shardkv.ipc.probe import GOLDEN32, DamagedRecord, find_value
from shardkv.shards.store import Store
from shardkv.wal.format import DELETE, PUT, RECORD_CHECKED, RECORD_CRC_FROM, RECORD_HEADER, RECORD_HEADER_SIZE
from shardkv.wal.records import encode_record

SEGMENT = 3
BITS = 4  # 16 home slots: probes run into each other often

pytestmark = pytest.mark.unit  # in-memory tables and buffers: no files, no processes


def _table(entries: list[tuple[int, int, int, int]]) -> tuple:
    """A probe table (ipc/probe.py) of (hash, key_len, location, value_len) entries placed by
    linear probing from their stored hash, as KeyIndex places them."""
    shift = 32 - BITS
    slots = [0] * ((1 << BITS) + len(entries) + 1)  # the last slot stays empty
    for e, (h, *_rest) in enumerate(entries):
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> shift
        while slots[i]:
            i += 1
        slots[i] = e + 1
    columns = list(zip(*entries)) if entries else [(), (), (), ()]
    hashes, key_lens, locations, value_lens = (list(c) for c in columns)
    return (shift, slots, hashes, key_lens, locations, value_lens)


def _outcome(read, key):
    try:
        value = read(key)
    except (CorruptionError, ValueError, struct.error):  # (DamagedRecord is a ValueError)
        return "damaged"
    return None if value is None else bytes(value)


def _both(table, buf: bytes, verify: bool):
    """(the reference's read, the engine's flat copy's read) over `table` and segment `buf`."""
    maps = {SEGMENT: buf}
    store = SimpleNamespace(index=SimpleNamespace(table=table), maps=maps, paths={SEGMENT: "segment"}, verify_checksums=verify)
    reference = lambda key: find_value(key, crc32c(key), table, lambda segment, end, context: maps[segment], verify=verify)  # noqa: E731
    return reference, lambda key: Store.read(store, key)


def _reader_pair(table, buf: bytes):
    """(the reference's read, with the reader's bounds and expiry, and the reader's copy's read)
    over `table` and `buf` as the active segment, published up to its end."""
    shift, slots, hashes, key_lens, locations, value_lens = table
    reader = IndexReader.__new__(IndexReader)  # the mappings only: no shared memory here
    reader._active = (SEGMENT, buf, len(buf))
    reader._clock = time.time
    reader_table = (1, shift, slots, locations, hashes, key_lens, value_lens, table)

    def buffer_of(segment, end, context):
        if segment != SEGMENT or end > len(buf):
            raise ValueError("record out of bounds")
        return buf

    reference = lambda key: find_value(key, crc32c(key), table, buffer_of, now_ms=lambda: time.time() * 1000)  # noqa: E731
    return reference, lambda key: reader._find(reader_table, key, crc32c(key), SEGMENT, len(buf), 0, 0)


def _random_case(rng: random.Random):
    """A segment of PUT (and a few DELETE) records of short keys, an index naming them - with
    impostor entries (a key's hash and length, another key's record), and some damage."""
    keys = sorted({bytes(rng.randrange(3) for _ in range(rng.randrange(1, 3))) for _ in range(rng.randrange(1, 12))})
    buf = bytearray(b"\0" * 64)
    entries, records = [], []
    for key in keys:
        rtype = DELETE if rng.random() < 0.1 else PUT
        value = b"" if rtype == DELETE else bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20)))
        expires_at = rng.choice([0, 0, 0, 1000, 2**62])  # long past, far ahead
        offset = len(buf)
        buf += encode_record(rtype, key, value, rng.randrange(1, 100), 0, expires_at)
        records.append((key, offset, len(value)))
    for key, offset, value_len in records:
        if rng.random() < 0.9:
            entries.append((crc32c(key), len(key), (SEGMENT << 32) | offset, value_len))
    if rng.random() < 0.1:  # an entry past the end of the segment
        key = rng.choice(keys)
        entries.append((crc32c(key), len(key), (SEGMENT << 32) | len(buf), 4))
    for _ in range(rng.randrange(3)):  # an entry with a key's hash and length naming another record
        key = rng.choice(keys)
        others = [r for r in records if len(r[0]) == len(key)]
        _, offset, value_len = rng.choice(others)
        entries.append((crc32c(key), len(key), (SEGMENT << 32) | offset, value_len))
    rng.shuffle(entries)
    for _ in range(rng.randrange(3)):  # damage: one flipped bit anywhere in a record
        _, offset, value_len = rng.choice(records)
        at = offset + rng.randrange(RECORD_HEADER_SIZE)
        buf[at] ^= 1 << rng.randrange(8)
    absent = [bytes([9, i]) for i in range(3)]
    return _table(entries), bytes(buf), keys + absent


@pytest.mark.parametrize("verify", [True, False])
def test_the_engine_copy_agrees_with_the_reference(verify):
    rng = random.Random(23)
    outcomes = set()
    for _ in range(3000):
        table, buf, queries = _random_case(rng)
        reference, engine = _both(table, buf, verify)
        for key in queries:
            expected = _outcome(reference, key)
            assert _outcome(engine, key) == expected, (key, table)
            outcomes.add(expected if expected in (None, "damaged") else "value")
    assert outcomes == ({None, "damaged", "value"} if verify else {None, "value"}), "the cases should cover every outcome"


def test_the_readers_copy_agrees_with_the_reference():
    rng = random.Random(29)
    outcomes = set()
    for _ in range(3000):
        table, buf, queries = _random_case(rng)
        reference, reader = _reader_pair(table, buf)
        for key in queries:
            expected = _outcome(reference, key)
            assert _outcome(reader, key) == expected, (key, table)
            outcomes.add(expected if expected in (None, "damaged") else "value")
    assert outcomes == {None, "damaged", "value"}


def test_a_colliding_entry_whose_record_is_damaged_is_not_read_as_absent():
    """Same hash and length, another key in the record, and the record fails its checksum: its
    key may be this one, damaged. All three report damage rather than "absent"."""
    record = bytearray(encode_record(PUT, b"kb", b"value", 1))
    record[RECORD_HEADER_SIZE] ^= 0x01  # the key: "jb" now, and the checksum fails
    buf = bytes(64) + bytes(record)
    table = _table([(crc32c(b"kb"), 2, (SEGMENT << 32) | 64, 5)])
    reference, engine = _both(table, buf, verify=True)
    _, reader = _reader_pair(table, buf)
    assert _outcome(reference, b"kb") == _outcome(engine, b"kb") == _outcome(reader, b"kb") == "damaged"


def test_record_checked_fields_are_those_of_the_record_header():
    """RECORD_CHECKED (what a reader checks) is crc, type and expires_at as RECORD_HEADER lays them out."""
    record = encode_record(PUT, b"key", b"value", 77, 0, 123456789)
    fields = RECORD_HEADER.unpack_from(record)
    assert RECORD_CHECKED.unpack_from(record) == (fields[0], fields[2], fields[9])
    assert RECORD_CHECKED.size == RECORD_HEADER.size
    assert crc32c(record[RECORD_CRC_FROM:]) == fields[0]
