"""Opening a shard's directory: find the segments, repair a torn tail, rebuild the index.

Reads each sealed segment's hint (or the segment itself when the hint is missing or stale, then
rewrites the hint), reads the active segment past its hint, and keeps for every key the record
with the highest seq (docs/FORMAT.md, "Compaction commit record").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from crc32c import crc32c

from shardkv.errors import CorruptionError
from shardkv.shards.compaction import finish_interrupted_compaction
from shardkv.shards.hints import ActiveRecords, SegmentRecords, read_hint, write_hint
from shardkv.shards.prepared import decode_prepare
from shardkv.wal import fileio
from shardkv.wal.format import DELETE, KIND_LOG, PREPARE, PUT, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, TMP_SUFFIX
from shardkv.wal.reader import map_file, scan_segment
from shardkv.wal.records import txid_of
from shardkv.wal.segment import create_segment, decode_segment_header, list_segments
from shardkv.wal.watermark import read_watermark
from shardkv.wal.writer import cut_tail


@dataclass
class Recovered:
    """What open() learned from the directory."""

    maps: dict = field(default_factory=dict)  # segment -> read-only mmap of the file
    paths: dict = field(default_factory=dict)  # segment -> path
    ends: dict = field(default_factory=dict)  # sealed segment -> data length
    active: int = 0
    active_end: int = SEGMENT_HEADER_SIZE
    active_records: ActiveRecords | None = None
    max_seq: int = 0
    max_segment: int = 0
    live: tuple = ()  # (hashes, locations, key_lens, value_lens, seqs) of the live keys
    expiring: list = field(default_factory=list)  # (key, expires_at ms) of live keys that expire
    prepared: dict = field(default_factory=dict)  # txid -> (batch, expects) of undecided PREPAREs
    records_read: int = 0
    torn_bytes: int = 0
    unsynced_records_dropped: bool = False
    seconds: float = 0.0


def recover(directory: str, shard: int, segment_size: int, now_ms: int) -> Recovered:
    """Open every segment of the shard in `directory` and rebuild its live key set (a key whose
    newest record expired at or before `now_ms` is not live)."""
    started = time.perf_counter()
    finish_interrupted_compaction(directory)
    for name in os.listdir(directory):
        if name.endswith(TMP_SUFFIX):
            fileio.unlink(directory, name)
    numbers = list_segments(directory)
    state = Recovered()
    headers = {}
    for number in numbers:
        path = os.path.join(directory, f"{number:016x}.log")
        buf = map_file(path)
        header = decode_segment_header(buf, path)
        if header.segment != number or header.shard != shard:
            raise CorruptionError(f"{path}: header says shard {header.shard} segment {header.segment} at offset 12")
        state.maps[number], state.paths[number], headers[number] = buf, path, header
    logs = [n for n in numbers if headers[n].kind == KIND_LOG]
    state.max_segment = numbers[-1] if numbers else 0
    if not logs:
        # A new shard (or one holding only compaction output): start an active log segment.
        # Otherwise the highest-numbered LOG segment is the active one, even when compaction
        # output carries higher numbers.
        number = state.max_segment + 1
        path = create_segment(directory, number, KIND_LOG, shard, segment_size)
        state.maps[number], state.paths[number] = map_file(path), path
        logs.append(number)
        numbers.append(number)
        state.max_segment = number
    state.active = logs[-1]

    tables: list[SegmentRecords] = []
    segment_of_row: list[np.ndarray] = []
    for number in numbers:
        buf = state.maps[number]
        active = number == state.active
        table, end = _read_segment(directory, shard, number, buf, state.paths[number], active, state)
        tables.append(table)
        segment_of_row.append(np.full(len(table), number, dtype=np.uint64))
        if active:
            state.active_end = end
            state.active_records = ActiveRecords(table)
        else:
            state.ends[number] = end
    rows = SegmentRecords.concat(tables)
    state.records_read = len(rows)
    state.max_seq = int(rows.seqs.max()) if len(rows) else 0
    segments = np.concatenate(segment_of_row)
    markers = np.flatnonzero(rows.types > DELETE)
    if len(markers):
        # PREPARE, COMMIT and ABORT records name batches, not keys: settle them apart.
        state.prepared = _undecided_prepares(rows, segments, markers, state)
        data = np.flatnonzero(rows.types <= DELETE)
        rows, segments = rows.take(data), segments[data]
    state.live, state.expiring = _live_keys(rows, segments, now_ms)
    state.seconds = time.perf_counter() - started
    return state


def _read_segment(directory, shard, number, buf, path, active, state) -> tuple[SegmentRecords, int]:
    """The record table of one segment and where its data ends."""
    hinted = read_hint(directory, shard, number, len(buf))
    if not active:
        if hinted is not None and hinted[1] == len(buf):
            return hinted
        scan = scan_segment(buf, path, active=False)
        table = SegmentRecords.from_scan(scan)
        _rewrite_hint(directory, shard, number, scan.end, table, buf)
        return table, scan.end
    start = hinted[1] if hinted is not None else SEGMENT_HEADER_SIZE
    scan = scan_segment(buf, path, active=True, start=start, synced_end=synced_end(directory, number))
    if scan.torn_bytes:
        state.torn_bytes = scan.torn_bytes
        state.unsynced_records_dropped = scan.unsynced_records_dropped
        cut_tail(path, scan.end, len(buf))
        state.maps[number] = map_file(path)  # the old mapping is dropped, not closed: views may remain
    table = SegmentRecords.from_scan(scan)
    if hinted is not None:
        table = SegmentRecords.concat([hinted[0], table])
    return table, scan.end


def sealed_records(directory: str, shard: int, number: int, buf, path: str, end: int) -> SegmentRecords:
    """The record table of sealed segment `number` (data ending at `end`): from its hint when
    that is valid and describes exactly `end` bytes, else read from the segment's bytes in `buf`
    (a hint may be missing: its write failed, or a finished compaction deleted the file)."""
    hinted = read_hint(directory, shard, number, len(buf))
    if hinted is not None and hinted[1] == end:
        return hinted[0]
    return SegmentRecords.from_scan(scan_segment(buf, path, active=False))


def latest_state(tables: dict[int, SegmentRecords], now_ms: int) -> tuple[tuple, list]:
    """What the log says is live, from the record tables of its segments (segment number ->
    table): for each key its newest record, if that is a PUT that has not expired at `now_ms`.
    Returns (hashes, locations, key_lens, value_lens, seqs) of those records, as KeyIndex.load
    takes them, and (key, expires_at) of the ones that expire. Batch markers are ignored."""
    numbers = list(tables)
    if not numbers:
        return _live_keys(SegmentRecords.empty(), np.zeros(0, dtype=np.uint64), now_ms)
    rows = SegmentRecords.concat([tables[n] for n in numbers])
    segments = np.concatenate([np.full(len(tables[n]), n, dtype=np.uint64) for n in numbers])
    data = np.flatnonzero(rows.types <= DELETE)
    if len(data) != len(rows):
        rows, segments = rows.take(data), segments[data]
    return _live_keys(rows, segments, now_ms)


def _undecided_prepares(rows: SegmentRecords, segments: np.ndarray, markers: np.ndarray, state: Recovered) -> dict:
    """txid -> (batch, expects) of every PREPARE record with no COMMIT or ABORT of its batch
    anywhere in the log (docs/TRANSACTIONS.md, "Participant recovery")."""
    for i in markers.tolist():
        if rows.key_lens[i] != 8:
            number = int(segments[i])
            raise CorruptionError(f"{state.paths[number]}: batch record with a {int(rows.key_lens[i])}-byte id at offset {int(rows.offsets[i])}")
    decided = {rows.keys[i] for i in markers.tolist() if rows.types[i] != PREPARE}
    prepared = {}
    for i in markers.tolist():
        key = rows.keys[i]
        if rows.types[i] != PREPARE or key in decided:
            continue
        number, offset = int(segments[i]), int(rows.offsets[i])
        start = offset + RECORD_HEADER_SIZE + int(rows.key_lens[i])
        where = f"{state.paths[number]} offset {offset}"
        prepared[txid_of(key)] = decode_prepare(state.maps[number][start : start + int(rows.value_lens[i])], where)
    return prepared


def synced_end(directory: str, active: int) -> int | None:
    """How far the active segment `active` is known fsynced (its SYNCED watermark), or None
    when nothing says (then only a tail with nothing intact after it counts as torn)."""
    watermark = read_watermark(directory)
    if watermark is None or watermark[0] > active:
        return None
    return watermark[1] if watermark[0] == active else SEGMENT_HEADER_SIZE


def _rewrite_hint(directory, shard, number, end, table: SegmentRecords, buf) -> None:
    try:
        write_hint(directory, shard, number, end, ActiveRecords(table), buf)
    except OSError:
        pass  # a hint is an optimisation; the segment stays readable without it


def _live_keys(rows: SegmentRecords, segments: np.ndarray, now_ms: int) -> tuple[tuple, list]:
    """Arrays describing, for each key, its newest record if that record is a PUT that has not
    expired; and (key, expires_at) of those that will expire."""
    if not len(rows):
        empty = np.zeros(0, dtype=np.uint64)
        return (np.zeros(0, dtype=np.uint32), empty, np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint32), empty), []
    keys = rows.keys
    hashes = np.fromiter(map(crc32c, keys), dtype=np.uint32, count=len(keys))
    # A row whose hash no other row has is its key's only record (the usual case after a load
    # or a compaction). Only rows sharing a hash (overwrites, deletes and the odd collision of
    # 32-bit hashes) go through a dictionary, in seq order, to find each key's newest record.
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts[inverse] > 1)
    picked = np.flatnonzero(counts[inverse] == 1)
    if len(shared):
        shared = shared[np.argsort(rows.seqs[shared], kind="stable")]  # file order breaks ties within a batch
        newest = dict(zip([keys[i] for i in shared.tolist()], shared.tolist()))  # later rows overwrite earlier
        picked = np.concatenate([picked, np.fromiter(newest.values(), dtype=np.int64, count=len(newest))])
    expires = rows.expires[picked]
    picked = picked[(rows.types[picked] == PUT) & ((expires == 0) | (expires > now_ms))]
    hashes = hashes[picked]
    with_expiry = picked[rows.expires[picked] != 0]
    expiring = [(keys[i], int(rows.expires[i])) for i in with_expiry.tolist()]
    locations = (segments[picked] << np.uint64(32)) | rows.offsets[picked].astype(np.uint64)
    return (hashes, locations, rows.key_lens[picked], rows.value_lens[picked], rows.seqs[picked]), expiring


def unmap_all(maps: dict) -> None:
    """Close every mapping (at engine close)."""
    for buf in maps.values():
        try:
            buf.close()
        except (BufferError, ValueError):
            pass


__all__ = ["Recovered", "latest_state", "recover", "sealed_records", "unmap_all"]
