"""Segment files: the 32-byte header, creation and listing (docs/FORMAT.md, "Segment file")."""

from __future__ import annotations

import os
from typing import NamedTuple

from crc32c import crc32c

from shardkv.errors import CorruptionError
from shardkv.wal import fileio
from shardkv.wal.format import (
    FORMAT_VERSION,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_KINDS,
    SEGMENT_MAGIC,
    TMP_SUFFIX,
    parse_segment_name,
    segment_name,
)


class SegmentHeader(NamedTuple):
    """The decoded header of a segment file."""

    kind: int
    shard: int
    segment: int


def encode_segment_header(kind: int, shard: int, segment: int) -> bytes:
    """Return the 32 header bytes of a segment."""
    body = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, kind, 0, shard, segment, 0)
    return body + crc32c(body).to_bytes(4, "little")


def decode_segment_header(buf, path: str) -> SegmentHeader:
    """Decode and check a segment header; raise CorruptionError naming `path` if it is bad."""
    if len(buf) < SEGMENT_HEADER_SIZE:
        raise CorruptionError(f"{path}: segment header is short ({len(buf)} bytes) at offset 0")
    body = bytes(buf[: SEGMENT_HEADER.size])
    stored = int.from_bytes(buf[SEGMENT_HEADER.size : SEGMENT_HEADER_SIZE], "little")
    if crc32c(body) != stored:
        raise CorruptionError(f"{path}: segment header checksum mismatch at offset 0")
    magic, version, kind, _, shard, segment, _ = SEGMENT_HEADER.unpack(body)
    if magic != SEGMENT_MAGIC:
        raise CorruptionError(f"{path}: not a shardkv segment (bad magic) at offset 0")
    if version != FORMAT_VERSION:
        raise CorruptionError(f"{path}: unsupported format version {version} at offset 8")
    if kind not in SEGMENT_KINDS:
        raise CorruptionError(f"{path}: unknown segment kind {kind} at offset 10")
    return SegmentHeader(kind, shard, segment)


def create_segment(directory: str, number: int, kind: int, shard: int, capacity: int = 0, final: bool = True) -> str:
    """Create segment `number` with its header, fsynced, and return its path.

    The file is written under a temporary name and renamed, so a crash never leaves a segment
    with a partial header. With `capacity`, the file is extended (sparsely) to that size.
    With `final=False` the file keeps its temporary name (compaction output before its commit).
    """
    name = segment_name(number)
    tmp_path = os.path.join(directory, name + TMP_SUFFIX)
    if os.path.exists(tmp_path):
        fileio.unlink(directory, name + TMP_SUFFIX)
    fd = fileio.create_exclusive(tmp_path)
    try:
        fileio.pwrite_all(fd, encode_segment_header(kind, shard, number), 0)
        if capacity > SEGMENT_HEADER_SIZE:
            fileio.truncate(fd, capacity)
        fileio.sync_file(fd)
    finally:
        os.close(fd)
    if not final:
        return tmp_path
    fileio.rename(directory, name + TMP_SUFFIX, name)
    fileio.fsync_dir(directory)
    return os.path.join(directory, name)


def list_segments(directory: str) -> list[int]:
    """Return the numbers of the segments in `directory`, ascending."""
    numbers = []
    for name in os.listdir(directory):
        number = parse_segment_name(name)
        if number is not None:
            numbers.append(number)
    return sorted(numbers)
