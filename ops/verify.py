"""`shardkv verify`: read every record of every segment and check it, changing nothing.

Unlike open(), verify does not stop at the first damaged place: after one it looks for the next
intact record header and goes on, so one run reports every corrupt place by file and offset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from shardkv.errors import CorruptionError
from shardkv.shards.recovery import synced_end
from shardkv.wal.format import KIND_DECISIONS, KIND_LOG, KIND_RECORD_TYPES, SEGMENT_HEADER_SIZE, segment_name
from shardkv.wal.reader import intact_header_after, all_zero_from, map_file, unreadable_reason
from shardkv.wal.records import RecordHeader, decode_header
from shardkv.wal.segment import decode_segment_header, list_segments


@dataclass
class Problem:
    """One damaged place."""

    file: str
    offset: int
    problem: str
    end: int  # where reading resumed (or the end of the data)

    def __str__(self) -> str:
        return f"{self.file}: {self.problem} at offset {self.offset} ({self.end - self.offset} bytes unreadable)"


def walk_segment(buf, path: str, active: bool, synced_end: int | None = None) -> Iterator[tuple[int, RecordHeader] | Problem]:
    """Yield (offset, header) of each whole batch's records and a Problem for each damaged place.

    Records of a batch are yielded only once the whole batch has been read. A torn tail of the
    active segment (nothing intact after it, or anything past `synced_end`, the SYNCED
    watermark) is yielded as a Problem whose `problem` starts with "torn tail".
    """
    header = decode_segment_header(buf, path)
    allowed = KIND_RECORD_TYPES[header.kind]
    size = len(buf)
    offset = SEGMENT_HEADER_SIZE
    batch: list[tuple[int, RecordHeader]] = []
    while offset < size:
        record = decode_header(buf, offset)
        if record is None and not batch and active and all_zero_from(buf, offset):
            return
        problem = unreadable_reason(buf, offset, record)
        if problem is None and batch and (record.batch_left != batch[-1][1].batch_left - 1 or record.seq != batch[-1][1].seq):
            problem = "batch numbering broken"
        if problem is None and record.type not in allowed:
            problem = f"record type {record.type} not allowed in a segment of kind {header.kind}"
        if problem is not None:
            start = batch[0][0] if batch else offset
            resume = intact_header_after(buf, offset + 1)
            if resume is not None and active and synced_end is not None and start >= synced_end:
                problem, resume = f"torn tail ({problem}; never fsynced: the records after it are dropped on open too)", size
                yield Problem(path, offset, problem, resume)
                return
            if resume is None:
                resume = size
                if active:
                    problem = f"torn tail ({problem})"
            yield Problem(path, offset, problem + (f"; the unfinished batch from offset {start} is dropped" if batch else ""), resume)
            batch = []
            offset = resume
            continue
        batch.append((offset, record))
        offset += record.size
        if record.batch_left == 0:
            yield from batch
            batch = []
    if batch:
        yield Problem(path, batch[0][0], "batch cut off by the end of the file", size)


def shard_directories(directory: str) -> list[str]:
    """The shard directories of a store, or [directory] if it is itself a shard directory."""
    names = sorted(n for n in os.listdir(directory) if n.startswith("shard-") and os.path.isdir(os.path.join(directory, n)))
    return [os.path.join(directory, n) for n in names] if names else [directory]


def log_directories(directory: str) -> list[str]:
    """Every directory of segments in a store: the shards' and the coordinator's decision log."""
    decisions = os.path.join(directory, "coordinator")
    return shard_directories(directory) + ([decisions] if os.path.isdir(decisions) else [])


def active_segment(directory: str, numbers: list[int]) -> int | None:
    """The number of the active segment of a directory: its highest LOG (or DECISIONS) one."""
    active = None
    for number in numbers:
        path = os.path.join(directory, segment_name(number))
        try:
            buf = map_file(path)
        except (OSError, ValueError):
            continue
        try:
            if decode_segment_header(buf, path).kind in (KIND_LOG, KIND_DECISIONS):
                active = number
        except CorruptionError:
            pass
        finally:
            buf.close()
    return active


def verify_store(directory: str) -> dict:
    """Check every record of every segment of the store (or shard) in `directory`.

    Returns {"ok": bool, "segments": n, "records": n, "problems": [str, ...], "torn_tails": [...]}.
    """
    report = {"ok": True, "segments": 0, "records": 0, "problems": [], "torn_tails": []}
    for shard_dir in log_directories(directory):
        numbers = list_segments(shard_dir)
        active = active_segment(shard_dir, numbers)
        for number in numbers:
            path = os.path.join(shard_dir, segment_name(number))
            report["segments"] += 1
            try:
                buf = map_file(path)
            except (OSError, ValueError) as exc:
                report["problems"].append(f"{path}: cannot be read ({exc}) at offset 0")
                continue
            try:
                watermark = synced_end(shard_dir, active) if number == active else None
                for item in walk_segment(buf, path, number == active, watermark):
                    if isinstance(item, Problem):
                        target = report["torn_tails"] if item.problem.startswith("torn tail") else report["problems"]
                        target.append(str(item))
                    else:
                        report["records"] += 1
            except CorruptionError as exc:
                report["problems"].append(str(exc))
            finally:
                buf.close()
    report["ok"] = not report["problems"]
    return report


__all__ = ["Problem", "active_segment", "log_directories", "shard_directories", "verify_store", "walk_segment"]
