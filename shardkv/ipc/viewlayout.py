"""The layout of a shard's ordered view in shared memory (docs/IPC.md, "Ordered view"): the
view object (its levels and the ring of the last batches' key ranges) and one object per sorted
run, named after the shard's index. The worker's publisher (shards/viewpublisher.py) writes
them and the clients' reader (ipc/sortedview.py) reads them; both take the layout from here.
"""

from __future__ import annotations

import os
import struct

import posix_ipc

from shardkv.ipc.messages import BATCH_RING
from shardkv.ipc.sortedruns import LEVELS

VIEW_FIELD = 40  # offset of `view` (u32) in the shard's index header: the view object's number
VIEW_MAGIC = b"SHKVORD\n"
RUN_MAGIC = b"SHKVRUN\n"
VIEW_HEADER = struct.Struct("<8sIIQ")  # magic, ready, levels, batches (then reserved up to 64)
LEVEL_ENTRY = struct.Struct("<IIII")  # number, count, dead, capacity
BATCH_ENTRY = struct.Struct("<QQQ")  # batch, first, last
RUN_HEADER = struct.Struct("<8sQQ")  # magic, capacity, rewrites (then reserved up to 64)
REWRITES = struct.Struct("<Q")
REWRITES_AT = 16  # a run's `rewrites`: bumped each time its entries change but by a tombstone
HEADER_BYTES = 64
LEVELS_AT = HEADER_BYTES
BATCHES_AT = LEVELS_AT + LEVEL_ENTRY.size * LEVELS
VIEW_BYTES = BATCHES_AT + BATCH_ENTRY.size * BATCH_RING


def view_name(prefix: str, shard: int, number: int) -> str:
    """The POSIX name of shared object `number` of shard `shard`'s ordered view."""
    return f"{prefix}-ord{shard}-{number}"


def unlink_views(prefix: str, shard: int) -> list[str]:
    """Unlink every ordered-view object of shard `shard` (a dead or stopped worker's); return
    their names. (The supervisor calls this beside sharedindex.unlink_tables.)"""
    stem = view_name(prefix, shard, 0)[1:-1]
    removed = []
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(stem) and entry[len(stem) :].isdigit():
            try:
                posix_ipc.unlink_shared_memory("/" + entry)
                removed.append(entry)
            except posix_ipc.ExistentialError:
                pass
    return removed


def run_layout(capacity: int) -> tuple[int, int]:
    """(offset of the prefixes, size in bytes) of a run object of `capacity` entries."""
    prefixes_at = (HEADER_BYTES + 4 * capacity + 7) // 8 * 8
    return prefixes_at, prefixes_at + 8 * capacity
