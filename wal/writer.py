"""The log writer: appends encoded batches to the active segment, one write call each.

Durability levels (the names are part of the API):
  "process"  - the write has reached the operating system: it survives a killed process;
  "interval" - as "process", and a background thread fsyncs at least every `sync_interval` s;
  "fsync"    - acknowledged only after fdatasync; concurrent writers share one (group commit).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from shardkv.errors import Closed, StorageError
from shardkv.wal import fileio
from shardkv.wal.format import KIND_LOG, SEGMENT_HEADER_SIZE, segment_name
from shardkv.wal.segment import create_segment
from shardkv.wal.watermark import Watermark

DURABILITY_LEVELS = ("process", "interval", "fsync")
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
MAX_SEGMENT_SIZE = 2**32 - 1  # record offsets are 32-bit


def check_durability(durability: str) -> str:
    """Return `durability` if it names a level, else raise ValueError listing the levels."""
    if durability not in DURABILITY_LEVELS:
        raise ValueError(f"durability must be one of {', '.join(map(repr, DURABILITY_LEVELS))}, not {durability!r}")
    return durability


def cut_tail(path: str, end: int, capacity: int) -> None:
    """Cut the active segment at `end` and zero everything after it (torn-tail repair)."""
    fd = fileio.open_rw(path)
    try:
        fileio.truncate(fd, end)
        fileio.truncate(fd, max(capacity, end))
        fileio.sync_file(fd)
    finally:
        os.close(fd)


class LogWriter:
    """Appends to one shard's log; thread-safe.

    `on_seal(segment, end)` is called (under the writer's lock) after a segment has been sealed
    and fsynced and before the next one exists.
    """

    def __init__(
        self,
        directory: str,
        shard: int,
        segment: int,
        end: int,
        *,
        durability: str = "interval",
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        sync_interval: float = 1.0,
        on_seal: Callable[[int, int], None] | None = None,
        kind: int = KIND_LOG,
        watermark: "Watermark | None" = None,
    ):
        self.directory = directory
        self.kind = kind
        self._watermark = watermark
        self.shard = shard
        self.durability = check_durability(durability)
        self.segment_size = segment_size
        self.sync_interval = sync_interval
        self._on_seal = on_seal
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segment = segment
        self._end = end
        self._fd = fileio.open_rw(os.path.join(directory, segment_name(segment)))
        self._capacity = max(os.fstat(self._fd).st_size, end)
        self._next_number = segment + 1
        # Nothing is vouched for until this writer's first fsync: what recovery read back may be
        # only in the page cache (the process before this one may have died after a failed fsync).
        self._synced = (segment, 0)
        self.last_sync = time.time()  # wall-clock time of the last completed fsync
        self._failure: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._syncer = None
        if durability == "interval":
            self._syncer = threading.Thread(target=self._sync_periodically, name=f"shardkv-sync-{shard}", daemon=True)
            self._syncer.start()

    # -- appending -------------------------------------------------------------------------
    @property
    def failure(self) -> BaseException | None:
        """The write or fsync error that stopped this writer (every later append raises), or None."""
        return self._failure

    @property
    def position(self) -> tuple[int, int]:
        """(segment, end) of the data written so far."""
        return self._segment, self._end

    def reserve_segment_number(self) -> int:
        """Hand out a segment number nobody else will use (for compaction output)."""
        with self._lock:
            number = self._next_number
            self._next_number += 1
            return number

    def ensure_next_number(self, number: int) -> None:
        """Make sure segment numbers handed out later are above `number`."""
        with self._lock:
            self._next_number = max(self._next_number, number + 1)

    def append(self, data: bytes) -> tuple[int, int]:
        """Write `data` (one encoded batch) with one write call; return (segment, offset).

        The data has reached the operating system when this returns. With durability "fsync"
        the caller then calls `sync_upto(segment, offset + len(data))` before acknowledging.
        """
        with self._lock:
            if self._closed:
                raise Closed("the log writer is closed")
            if self._failure is not None:
                raise StorageError(f"shard {self.shard}: an earlier write or fsync failed ({self._failure}); reopen to recover")
            if self._end + len(data) > self._capacity:
                self._roll(len(data))
            offset = self._end
            try:
                fileio.pwrite_all(self._fd, data, offset)
            except OSError as exc:
                self._undo_partial_write(offset)
                raise StorageError(f"shard {self.shard}: write of {len(data)} bytes failed: {exc}") from exc
            self._end = offset + len(data)
            return self._segment, offset

    def seal(self) -> bool:
        """Seal the active segment now (if it holds any record) and start the next one."""
        with self._lock:
            if self._closed:
                raise Closed("the log writer is closed")
            if self._failure is not None:
                raise StorageError(f"shard {self.shard}: an earlier write or fsync failed ({self._failure}); reopen to recover")
            if self._end == SEGMENT_HEADER_SIZE:
                return False
            self._roll(0)
            return True

    def _undo_partial_write(self, offset: int) -> None:
        """Zero whatever a failed write left after `offset`, so no half record survives."""
        try:
            fileio.truncate(self._fd, offset)
            fileio.truncate(self._fd, self._capacity)
        except OSError as exc:
            self._failure = exc

    def _roll(self, needed: int) -> None:
        """Seal the active segment and start the next one, big enough for `needed` bytes."""
        old, end = self._segment, self._end
        try:
            fileio.truncate(self._fd, end)
            fileio.sync_file(self._fd)
        except OSError as exc:
            self._failure = exc
            raise StorageError(f"shard {self.shard}: sealing segment {old} failed: {exc}") from exc
        os.close(self._fd)
        self._fd = -1
        self._synced = max(self._synced, (old, end))
        if self._on_seal is not None:
            self._on_seal(old, end)
        number = self._next_number
        self._next_number += 1
        capacity = max(self.segment_size, SEGMENT_HEADER_SIZE + needed)
        try:
            path = create_segment(self.directory, number, self.kind, self.shard, capacity)
            self._fd = fileio.open_rw(path)
        except OSError as exc:
            self._failure = exc
            raise StorageError(f"shard {self.shard}: creating segment {number} failed: {exc}") from exc
        self._segment, self._end, self._capacity = number, SEGMENT_HEADER_SIZE, capacity

    # -- durability ------------------------------------------------------------------------
    def sync_upto(self, segment: int, end: int) -> None:
        """Return once everything up to (segment, end) is fsynced; one fsync serves many callers."""
        with self._sync_lock:
            if (segment, end) <= self._synced:
                return  # a sync that finished while we waited covered this write
            with self._lock:
                if self._fd < 0:
                    raise Closed("the log writer is closed")
                target = (self._segment, self._end)
                fd = os.dup(self._fd)  # the active fd may be closed by a roll meanwhile
            try:
                fileio.sync_data(fd)
            except OSError as exc:
                self._failure = exc
                raise StorageError(f"shard {self.shard}: fsync failed: {exc}") from exc
            finally:
                os.close(fd)
            self._synced = max(self._synced, target)
            self.last_sync = time.time()
            if self._watermark is not None:
                self._watermark.maybe_publish(*self._synced)

    def sync_and_publish(self) -> None:
        """fsync everything written so far and publish that position to the watermark now
        (on open: what recovery found is then durable and vouched for)."""
        self.sync()
        if self._watermark is not None:
            self._watermark.publish(*self.position)

    def sync(self) -> None:
        """fsync everything written so far."""
        segment, end = self.position
        self.sync_upto(segment, end)

    def _sync_periodically(self) -> None:
        while not self._stop.wait(self.sync_interval):
            if self._synced < self.position and self._failure is None:
                try:
                    self.sync()
                except (StorageError, Closed, OSError):
                    return

    def close(self) -> None:
        """Stop the background syncer, fsync what was written and close the segment."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._failure is None:
                self.sync()
                if self._watermark is not None:
                    self._watermark.publish(*self._synced)
        finally:
            with self._lock:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
            if self._watermark is not None:
                self._watermark.close()

