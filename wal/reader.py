"""Reading segments back: record iteration, torn-tail truncation and corruption detection.

The rules are those of docs/FORMAT.md, "Recovery: torn tails and corruption": a failure inside a
sealed segment is corruption; in the active segment it is a torn tail only if no intact record
header follows it anywhere in the file.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
from shardkv.errors import CorruptionError
from shardkv.wal import fileio
from shardkv.wal.format import KIND_RECORD_TYPES, RECORD_HEADER_SIZE, RECORD_TYPES, SEGMENT_HEADER_SIZE
from shardkv.wal.records import RecordHeader, decode_header, record_crc_ok
from shardkv.wal.segment import SegmentHeader, decode_segment_header


class Record(NamedTuple):
    """One record read back from a segment, with where it was found."""

    segment: int
    offset: int
    type: int
    key: bytes
    value: bytes
    seq: int
    expires_at: int
    batch_left: int


@dataclass
class SegmentScan:
    """The metadata of every record of one segment, in file order, and where its data ends."""

    header: SegmentHeader
    end: int = SEGMENT_HEADER_SIZE
    offsets: list = field(default_factory=list)
    types: list = field(default_factory=list)
    key_lens: list = field(default_factory=list)
    value_lens: list = field(default_factory=list)
    seqs: list = field(default_factory=list)
    expires: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    torn_bytes: int = 0  # bytes of a torn tail that were (or would be) cut off
    unsynced_records_dropped: bool = False  # intact records after the damage were cut too (past the watermark)


def map_file(path: str, writable: bool = False) -> mmap.mmap:
    """Map a whole file into memory (read-only unless `writable`)."""
    fd = fileio.open_rw(path) if writable else fileio.open_ro(path)
    try:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, 0, access=access)
    finally:
        os.close(fd)


def intact_header_after(buf, start: int) -> int | None:
    """Return the offset of the first intact record header at or after `start`, or None.

    Vectorised: candidate offsets are those whose type byte is valid and whose flags and
    reserved bytes are zero; only those are checked with header_crc.
    """
    limit = len(buf) - RECORD_HEADER_SIZE
    if limit < start:
        return None
    data = np.frombuffer(buf, dtype=np.uint8)
    chunk = 1 << 24
    for base in range(start, limit + 1, chunk):
        stop = min(base + chunk, limit + 1)
        kind = data[base + 8 : stop + 8]
        candidates = np.isin(kind, RECORD_TYPES)
        candidates &= data[base + 9 : stop + 9] == 0
        candidates &= data[base + 10 : stop + 10] == 0
        candidates &= data[base + 11 : stop + 11] == 0
        for rel in np.flatnonzero(candidates):
            offset = base + int(rel)
            if decode_header(buf, offset) is not None:
                return offset
    return None


def scan_segment(buf, path: str, active: bool, want_keys: bool = True, start: int = SEGMENT_HEADER_SIZE, synced_end: int | None = None) -> SegmentScan:
    """Read every record of the segment held in `buf` (a mapping of the whole file).

    For the active segment a torn tail is reported in `torn_bytes`, and `end` is where the good
    data ends (the caller cuts the file there); anything else unreadable raises CorruptionError
    naming `path` and the offset. `start` (a batch boundary) skips records known from a hint.
    `synced_end` (from the SYNCED file): the active segment is known fsynced up to there, so
    damage after it is a torn tail even when intact records follow (docs/FORMAT.md).
    """
    scan = SegmentScan(decode_segment_header(buf, path))
    offset = start
    size = len(buf)
    batch_start = offset
    pending = 0  # records of the current, still unfinished batch
    expect_left = expect_seq = None
    allowed = KIND_RECORD_TYPES[scan.header.kind]
    while True:
        if expect_left is None:
            batch_start, pending = offset, 0  # a new batch starts here, whether or not it reads
            if offset == size:
                scan.end = offset
                return scan
        header = decode_header(buf, offset)
        if header is None and active and expect_left is None and all_zero_from(buf, offset):
            scan.end = offset  # the unwritten, sparse rest of the active segment
            return scan
        torn_problem = unreadable_reason(buf, offset, header)
        if torn_problem is not None:
            after = intact_header_after(buf, offset + 1) if active else None
            if active and after is not None and synced_end is not None and batch_start >= synced_end:
                scan.unsynced_records_dropped = True  # sectors of unsynced writes reached the disk out of order
                after = None
            if active and after is None:
                _drop_last(scan, pending)
                scan.end = batch_start
                scan.torn_bytes = _data_end(buf, offset) - batch_start
                return scan
            detail = f" (an intact record follows at offset {after}, so this is not a torn tail)" if active else ""
            raise CorruptionError(f"{path}: {torn_problem} at offset {offset}{detail}")
        if expect_left is not None and (header.batch_left != expect_left or header.seq != expect_seq):
            raise CorruptionError(f"{path}: batch numbering broken at offset {offset}")
        if header.type not in allowed:
            raise CorruptionError(f"{path}: record type {header.type} not allowed in a segment of kind {scan.header.kind} at offset {offset}")
        scan.offsets.append(offset)
        scan.types.append(header.type)
        scan.key_lens.append(header.key_len)
        scan.value_lens.append(header.value_len)
        scan.seqs.append(header.seq)
        scan.expires.append(header.expires_at)
        if want_keys:
            key_start = offset + RECORD_HEADER_SIZE
            scan.keys.append(bytes(buf[key_start : key_start + header.key_len]))
        pending += 1
        offset += header.size
        if header.batch_left:
            expect_left, expect_seq = header.batch_left - 1, header.seq
        else:
            expect_left = expect_seq = None
            pending = 0


def unreadable_reason(buf, offset: int, header: RecordHeader | None) -> str | None:
    """Why the record at `offset` (header as decode_header returned it) cannot be read whole, or
    None. These are the failures a torn write can cause; the caller decides if it was one."""
    if header is None:
        return "unreadable record header"
    if offset + header.size > len(buf):
        return "record runs past the end of the file"
    if not record_crc_ok(buf, offset, header):
        return "record checksum mismatch"
    return None


def all_zero_from(buf, offset: int) -> bool:
    """True if every byte from `offset` to the end of `buf` is zero (the unwritten sparse tail)."""
    return not np.frombuffer(buf, dtype=np.uint8, offset=offset).any()


def _drop_last(scan: SegmentScan, count: int) -> None:
    """Forget the last `count` records of `scan` (an unfinished batch)."""
    if count:
        for column in (scan.offsets, scan.types, scan.key_lens, scan.value_lens, scan.seqs, scan.expires, scan.keys):
            del column[len(column) - count :]


def _data_end(buf, offset: int) -> int:
    """Return the offset just after the last non-zero byte at or after `offset` (for reporting)."""
    tail = np.frombuffer(buf, dtype=np.uint8, offset=offset)
    nonzero = np.flatnonzero(tail)
    return offset + (int(nonzero[-1]) + 1 if len(nonzero) else 0)


def iter_records(path: str, active: bool = False) -> Iterator[Record]:
    """Yield every complete record of the segment file at `path` with its segment and offset.

    A torn tail (active segment only) is left out; corruption raises CorruptionError.
    """
    buf = map_file(path)
    try:
        scan = scan_segment(buf, path, active)
        for i, offset in enumerate(scan.offsets):
            header = decode_header(buf, offset)
            start = offset + RECORD_HEADER_SIZE + header.key_len
            value = bytes(buf[start : start + header.value_len])
            yield Record(
                scan.header.segment, offset, header.type, scan.keys[i], value, header.seq, header.expires_at, header.batch_left
            )
    finally:
        buf.close()


def check_record_at(buf, offset: int, path: str) -> RecordHeader:
    """Decode and fully verify the record at `offset`, raising CorruptionError if it is bad."""
    header = decode_header(buf, offset)
    if header is None or offset + header.size > len(buf) or not record_crc_ok(buf, offset, header):
        raise CorruptionError(f"{path}: record checksum mismatch at offset {offset}")
    return header
