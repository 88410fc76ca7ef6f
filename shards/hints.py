"""Hint files (docs/FORMAT.md, "Hint file") and the per-segment record tables they store.

A `SegmentRecords` table lists every record of one segment (live or not) without values; the
index is rebuilt from these tables at open. The active segment's table grows as records are
appended and becomes its hint when the segment is sealed or the shard is closed.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

import numpy as np
from crc32c import crc32c

from shardkv.wal import fileio
from shardkv.wal.format import FORMAT_VERSION, HINT_CRC, HINT_ENTRY, HINT_HEADER, HINT_MAGIC, RECORD_HEADER_SIZE, hint_name
from shardkv.wal.reader import SegmentScan

HINT_DTYPE = np.dtype(
    [("offset", "<u4"), ("type", "u1"), ("reserved", "V3"), ("key_len", "<u4"), ("value_len", "<u4"), ("seq", "<u8"), ("expires_at", "<u8")]
)
assert HINT_DTYPE.itemsize == HINT_ENTRY.size


@dataclass
class SegmentRecords:
    """Column arrays describing the records of one segment, in file order."""

    offsets: np.ndarray
    types: np.ndarray
    key_lens: np.ndarray
    value_lens: np.ndarray
    seqs: np.ndarray
    expires: np.ndarray
    keys: list  # bytes of each record's key

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def from_scan(cls, scan: SegmentScan) -> "SegmentRecords":
        """Columns of a segment read record by record."""
        return cls(
            np.array(scan.offsets, dtype=np.uint32),
            np.array(scan.types, dtype=np.uint8),
            np.array(scan.key_lens, dtype=np.uint32),
            np.array(scan.value_lens, dtype=np.uint32),
            np.array(scan.seqs, dtype=np.uint64),
            np.array(scan.expires, dtype=np.uint64),
            scan.keys,
        )

    @classmethod
    def empty(cls) -> "SegmentRecords":
        """A table with no rows."""
        return cls(*(np.zeros(0, dtype=t) for t in (np.uint32, np.uint8, np.uint32, np.uint32, np.uint64, np.uint64)), [])

    @classmethod
    def from_active(cls, table: "ActiveRecords", buf) -> "SegmentRecords":
        """The columns of a table kept while appending (no keys), with each key read from the
        segment's bytes in `buf`."""
        offsets = np.frombuffer(table.offsets, dtype=np.uint32).copy()
        key_lens = np.frombuffer(table.key_lens, dtype=np.uint32).copy()
        starts = (offsets.astype(np.int64) + RECORD_HEADER_SIZE).tolist()
        keys = [buf[s : s + n] for s, n in zip(starts, key_lens.tolist())]
        return cls(
            offsets,
            np.frombuffer(table.types, dtype=np.uint8).copy(),
            key_lens,
            np.frombuffer(table.value_lens, dtype=np.uint32).copy(),
            np.frombuffer(table.seqs, dtype=np.uint64).copy(),
            np.frombuffer(table.expires, dtype=np.uint64).copy(),
            keys,
        )

    def take(self, rows: np.ndarray) -> "SegmentRecords":
        """A table of the rows numbered in `rows`, in that order."""
        keys = self.keys
        return SegmentRecords(
            self.offsets[rows], self.types[rows], self.key_lens[rows], self.value_lens[rows], self.seqs[rows], self.expires[rows], [keys[i] for i in rows.tolist()]
        )

    @classmethod
    def concat(cls, parts: list["SegmentRecords"]) -> "SegmentRecords":
        """One table with the rows of `parts`, in order."""
        keys: list = []
        for part in parts:
            keys.extend(part.keys)
        columns = [np.concatenate([getattr(p, name) for p in parts]) for name in ("offsets", "types", "key_lens", "value_lens", "seqs", "expires")]
        return cls(*columns, keys)


class ActiveRecords:
    """The growing record table of the active segment (cheap appends, no keys kept)."""

    def __init__(self, start: SegmentRecords | None = None):
        self.offsets = array("I")
        self.types = array("B")
        self.key_lens = array("I")
        self.value_lens = array("I")
        self.seqs = array("Q")
        self.expires = array("Q")
        if start is not None:
            self.offsets.frombytes(start.offsets.astype(np.uint32).tobytes())
            self.types.frombytes(start.types.astype(np.uint8).tobytes())
            self.key_lens.frombytes(start.key_lens.astype(np.uint32).tobytes())
            self.value_lens.frombytes(start.value_lens.astype(np.uint32).tobytes())
            self.seqs.frombytes(start.seqs.astype(np.uint64).tobytes())
            self.expires.frombytes(start.expires.astype(np.uint64).tobytes())

    def add(self, offset: int, rtype: int, key_len: int, value_len: int, seq: int, expires_at: int) -> None:
        """Note one record appended to the active segment."""
        self.offsets.append(offset)
        self.types.append(rtype)
        self.key_lens.append(key_len)
        self.value_lens.append(value_len)
        self.seqs.append(seq)
        self.expires.append(expires_at)

    def add_batch(self, offsets: list, types: list, key_lens: list, value_lens: list, seq: int, expires: list) -> None:
        """Note the records of one batch appended to the active segment."""
        self.offsets.extend(offsets)
        self.types.extend(types)
        self.key_lens.extend(key_lens)
        self.value_lens.extend(value_lens)
        self.seqs.extend([seq] * len(offsets))
        self.expires.extend(expires)

    def __len__(self) -> int:
        return len(self.offsets)


def write_hint(directory: str, shard: int, segment: int, length: int, table: ActiveRecords, segment_buf) -> None:
    """Write the hint file of `segment` (data ending at `length`), taking keys from its bytes."""
    n = len(table)
    entries = np.zeros(n, dtype=HINT_DTYPE)
    entries["offset"] = np.frombuffer(table.offsets, dtype=np.uint32)
    entries["type"] = np.frombuffer(table.types, dtype=np.uint8)
    key_lens = np.frombuffer(table.key_lens, dtype=np.uint32)
    entries["key_len"] = key_lens
    entries["value_len"] = np.frombuffer(table.value_lens, dtype=np.uint32)
    entries["seq"] = np.frombuffer(table.seqs, dtype=np.uint64)
    entries["expires_at"] = np.frombuffer(table.expires, dtype=np.uint64)
    keys = _gather_keys(segment_buf, entries["offset"].astype(np.int64) + RECORD_HEADER_SIZE, key_lens.astype(np.int64))
    body = b"".join((HINT_HEADER.pack(HINT_MAGIC, FORMAT_VERSION, 0, shard, segment, length, n), entries.tobytes(), keys))
    fileio.write_file_atomically(directory, hint_name(segment), body + HINT_CRC.pack(crc32c(body)))


def _gather_keys(buf, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate buf[starts[i] : starts[i] + lengths[i]] for all i, vectorised."""
    if not len(starts):
        return b""
    data = np.frombuffer(buf, dtype=np.uint8)
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)
    return data[index].tobytes()


def read_hint(directory: str, shard: int, segment: int, max_length: int) -> tuple[SegmentRecords, int] | None:
    """Load the hint of `segment`: (records, data length), or None if it is missing or not valid.

    A hint is valid if its checksum, magic, version, shard and segment match and the data it
    describes fits in the segment's `max_length` bytes.
    """
    path = os.path.join(directory, hint_name(segment))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < HINT_HEADER.size + HINT_CRC.size:
        return None
    body = memoryview(data)[: -HINT_CRC.size]
    if crc32c(body) != HINT_CRC.unpack_from(data, len(data) - HINT_CRC.size)[0]:
        return None
    magic, version, _, hint_shard, hint_segment, length, count = HINT_HEADER.unpack_from(data)
    if (magic, version, hint_shard, hint_segment) != (HINT_MAGIC, FORMAT_VERSION, shard, segment) or length > max_length:
        return None
    entries_end = HINT_HEADER.size + count * HINT_DTYPE.itemsize
    if entries_end > len(body):
        return None
    entries = np.frombuffer(data, dtype=HINT_DTYPE, count=count, offset=HINT_HEADER.size)
    key_lens = entries["key_len"].astype(np.int64)
    ends = np.cumsum(key_lens)
    if entries_end + (int(ends[-1]) if count else 0) != len(body):
        return None
    starts = (ends - key_lens + entries_end).tolist()
    keys = [data[s:e] for s, e in zip(starts, (ends + entries_end).tolist())]
    records = SegmentRecords(
        entries["offset"].copy(),
        entries["type"].copy(),
        entries["key_len"].copy(),
        entries["value_len"].copy(),
        entries["seq"].copy(),
        entries["expires_at"].copy(),
        keys,
    )
    return records, length
