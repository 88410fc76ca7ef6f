"""The coordinator's decision log (docs/TRANSACTIONS.md, "Decision log").

Segments of kind DECISIONS in `DIR/coordinator/`, written by the ordinary log writer. Each
record is a COMMIT: the key is the batch id (u64), the value the participating shards (u16
each). Presumed abort: a batch with no COMMIT record here was not committed. A record is needed
until every participant has applied the commit; a sealed segment whose batches are all applied
is deleted.
"""

from __future__ import annotations

import os
import struct

from shardkv.errors import CorruptionError
from shardkv.wal import fileio
from shardkv.wal.format import COMMIT, KIND_DECISIONS, RECORD_HEADER_SIZE, segment_name
from shardkv.wal.reader import map_file, scan_segment
from shardkv.wal.records import encode_record, txid_key, txid_of
from shardkv.wal.segment import create_segment, decode_segment_header, list_segments
from shardkv.wal.writer import LogWriter, cut_tail

DECISION_SEGMENT_SIZE = 1024 * 1024  # about 20,000 decisions: what a restart may send again
_SHARD = struct.Struct("<H")


def decisions_directory(directory: str) -> str:
    """Where the coordinator of the store in `directory` keeps its decision log."""
    return os.path.join(directory, "coordinator")


class DecisionLog:
    """Open (recovering) the decision log in `directory`; see the module docstring."""

    def __init__(self, directory: str, segment_size: int = DECISION_SEGMENT_SIZE):
        self.directory = directory
        fileio.make_dir(directory)
        self.outstanding: dict[int, tuple[list[int], int]] = {}  # txid -> (participants, segment)
        self._per_segment: dict[int, int] = {}  # segment -> outstanding batches logged in it
        numbers = list_segments(directory)
        if not numbers:
            create_segment(directory, 1, KIND_DECISIONS, 0, segment_size)
            numbers = [1]
        end = 0
        for number in numbers:
            end = self._read_segment(number, active=number == numbers[-1], capacity=segment_size)
        self.active = numbers[-1]
        self._sealed = set(numbers[:-1])
        self.writer = LogWriter(directory, 0, self.active, end, durability="interval", segment_size=segment_size, on_seal=self._on_seal, kind=KIND_DECISIONS)
        # What was read back is made durable before anything is decided from it: after an fsync
        # failed, the page cache may hold decisions the disk lacks (docs/TRANSACTIONS.md).
        self.writer.sync()
        self._seq = 0
        for number in list(self._sealed):
            self._delete_if_done(number)

    def _read_segment(self, number: int, active: bool, capacity: int) -> int:
        path = os.path.join(self.directory, segment_name(number))
        buf = map_file(path)
        try:
            header = decode_segment_header(buf, path)
            if header.kind != KIND_DECISIONS or header.segment != number:
                raise CorruptionError(f"{path}: not decision log segment {number} at offset 0")
            scan = scan_segment(buf, path, active=active)
            for offset, key, value_len in zip(scan.offsets, scan.keys, scan.value_lens):
                start = offset + RECORD_HEADER_SIZE + len(key)
                value = buf[start : start + value_len]
                participants = [_SHARD.unpack_from(value, i)[0] for i in range(0, len(value), 2)]
                self._note(txid_of(key), participants, number)
        finally:
            buf.close()
        if scan.torn_bytes:
            cut_tail(path, scan.end, max(capacity, scan.end))
        return scan.end

    def _note(self, txid: int, participants: list[int], segment: int) -> None:
        if txid not in self.outstanding:
            self._per_segment[segment] = self._per_segment.get(segment, 0) + 1
        self.outstanding[txid] = (participants, segment)

    def log_commit(self, txid: int, participants: list[int], durable: bool) -> None:
        """Log the decision to commit batch `txid`; with `durable`, fsync it before returning."""
        self._seq += 1
        value = b"".join(_SHARD.pack(shard) for shard in participants)
        segment, offset = self.writer.append(encode_record(COMMIT, txid_key(txid), value, self._seq))
        self._note(txid, list(participants), segment)
        if durable:
            self.writer.sync_upto(segment, offset + RECORD_HEADER_SIZE + 8 + len(value))

    def sync(self) -> None:
        """fsync every decision logged so far (one fsync for a round of batches)."""
        self.writer.sync()

    @property
    def failure(self) -> BaseException | None:
        """The write or fsync error after which this log takes nothing more, or None."""
        return self.writer.failure

    def applied(self, txid: int) -> None:
        """Every participant applied batch `txid`: its record is no longer needed."""
        entry = self.outstanding.pop(txid, None)
        if entry is not None:
            segment = entry[1]
            self._per_segment[segment] -= 1
            self._delete_if_done(segment)

    def _on_seal(self, segment: int, end: int) -> None:
        self._sealed.add(segment)
        self.active = segment + 1
        self._delete_if_done(segment)

    def _delete_if_done(self, segment: int) -> None:
        if segment in self._sealed and not self._per_segment.get(segment):
            self._sealed.discard(segment)
            self._per_segment.pop(segment, None)
            fileio.unlink(self.directory, segment_name(segment))

    def close(self) -> None:
        """fsync and close; when every batch is applied, seal the active segment first so that
        it is deleted and the next start has nothing to deliver again."""
        if not self.outstanding and self.failure is None:
            self.writer.seal()
        self.writer.close()
