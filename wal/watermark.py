"""The SYNCED file of a shard: how far the log is known to be fsynced (docs/FORMAT.md, "SYNCED
file"). Recovery uses it to tell the damage a power failure leaves in data that was never
fsynced (a torn tail, even with intact records after it: sectors may reach the disk out of
order) from damage to data that was (corruption).

Two slots, written in turn, each with its own CRC: a write torn by a power failure spoils at
most the slot being written, and the other still holds the previous watermark. A watermark
only ever names data already fsynced when it is written, so whenever it reaches the disk it is
true; it may lag behind (it is written at most once a second, and when a new segment starts).
"""

from __future__ import annotations

import os
import time

from crc32c import crc32c

from shardkv.wal import fileio
from shardkv.wal.format import FORMAT_VERSION, SYNCED_CRC, SYNCED_FILE, SYNCED_MAGIC, SYNCED_SLOT, SYNCED_SLOT_STRIDE

PUBLISH_INTERVAL = 1.0


def read_watermark(directory: str) -> tuple[int, int] | None:
    """(segment, end) of the newest valid slot of `directory`'s SYNCED file, or None."""
    newest = _newest_slot(directory)
    return None if newest is None else (newest[1], newest[2])


def _newest_slot(directory: str) -> tuple[int, int, int] | None:
    """(counter, segment, end) of the newest valid slot, or None."""
    try:
        with open(os.path.join(directory, SYNCED_FILE), "rb") as f:
            data = f.read(2 * SYNCED_SLOT_STRIDE)
    except FileNotFoundError:
        return None
    best = None
    for slot in range(2):
        start = slot * SYNCED_SLOT_STRIDE
        body = data[start : start + SYNCED_SLOT.size]
        stored = data[start + SYNCED_SLOT.size : start + SYNCED_SLOT.size + SYNCED_CRC.size]
        if len(body) != SYNCED_SLOT.size or len(stored) != SYNCED_CRC.size or crc32c(body) != SYNCED_CRC.unpack(stored)[0]:
            continue
        magic, version, _, counter, segment, end = SYNCED_SLOT.unpack(body)
        if magic == SYNCED_MAGIC and version == FORMAT_VERSION and (best is None or counter > best[0]):
            best = (counter, segment, end)
    return best


class Watermark:
    """Publishes a log's fsynced position to the SYNCED file of `directory` (see the module
    docstring); publishing errors are ignored: an old watermark is only more cautious."""

    def __init__(self, directory: str):
        self.directory = directory
        newest = _newest_slot(directory)
        self.counter = 0 if newest is None else newest[0]  # go on numbering: the newest must win
        self.published: tuple[int, int] = (0, 0)
        self.at = 0.0
        self.fd = -1

    def maybe_publish(self, segment: int, end: int) -> None:
        """Publish (segment, end), known fsynced, if a second passed or the segment changed."""
        if (segment, end) <= self.published:
            return
        if segment == self.published[0] and time.monotonic() - self.at < PUBLISH_INTERVAL:
            return
        self.publish(segment, end)

    def publish(self, segment: int, end: int) -> None:
        """Write (segment, end) into the next slot and fsync it."""
        try:
            if self.fd < 0:
                path = os.path.join(self.directory, SYNCED_FILE)
                if os.path.exists(path):
                    self.fd = fileio.open_rw(path)
                else:
                    self.fd = fileio.create_exclusive(path)
                    fileio.fsync_dir(self.directory)
            self.counter += 1
            body = SYNCED_SLOT.pack(SYNCED_MAGIC, FORMAT_VERSION, 0, self.counter & 0xFFFFFFFF, segment, end)
            fileio.pwrite_all(self.fd, body + SYNCED_CRC.pack(crc32c(body)), (self.counter % 2) * SYNCED_SLOT_STRIDE)
            fileio.sync_data(self.fd)
        except OSError:
            return
        self.published, self.at = (segment, end), time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
