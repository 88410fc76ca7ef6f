"""The worker's side of the ordered view in shared memory (docs/IPC.md, "Ordered view"):
`ViewPublisher`, the `storage` of a shard's SortedView (shards/sortedkeys.py), writes its runs
into shared objects laid out as shardkv/ipc/viewlayout.py says (clients read them with
shardkv/ipc/sortedview.py).

It lives on the worker's side so that the clients' reader imports nothing of shardkv.shards:
the worker imports the layout it publishes (shardkv/ipc/viewlayout.py, sortedruns.py), never
the reverse.
"""

from __future__ import annotations

import struct

import numpy as np
import posix_ipc

from shardkv.ipc.messages import BATCH_RING
from shardkv.ipc.sharedindex import U32, _map
from shardkv.ipc.sortedruns import LEVELS
from shardkv.ipc import viewlayout as layout
from shardkv.shards.sortedkeys import PrivateRuns


class ViewPublisher(PrivateRuns):
    """The worker's side: the SortedView's runs in shared memory objects, a view object listing
    them, and its number in the index header (`<prefix>-ord<S>-<G>`, created by the worker, 0600;
    the supervisor unlinks a dead worker's with `unlink_views`). Every call comes with the
    engine's lock held and its version odd (or before the shard serves). If shared memory runs
    out, the view goes on in private memory and clients scan through the ring."""

    def __init__(self, index):
        self.index = index
        self.buf = None
        self.name = None
        self.names = [None] * LEVELS  # the shared object of each level
        self.runs = [None] * LEVELS  # ... and its mapping
        self._next = 1
        made = self._create(layout.VIEW_BYTES) if index.enabled else None
        if made is not None:
            self.buf, number, self.name = made
            layout.VIEW_HEADER.pack_into(self.buf, 0, layout.VIEW_MAGIC, 0, LEVELS, 0)
            U32.pack_into(index.header, layout.VIEW_FIELD, number)

    def allocate(self, level, capacity):
        if self.buf is None or not capacity:
            return super().allocate(level, capacity)
        prefixes_at, size = layout.run_layout(capacity)
        made = self._create(size)
        if made is None:
            self._disable()
            return super().allocate(level, capacity)
        buf, number, name = made
        layout.RUN_HEADER.pack_into(buf, 0, layout.RUN_MAGIC, capacity, 0)
        eids = np.frombuffer(buf, dtype="<u4", count=capacity, offset=layout.HEADER_BYTES)
        prefixes = np.frombuffer(buf, dtype="<u8", count=capacity, offset=prefixes_at)
        return eids, prefixes, (number, name, capacity, buf)

    def install(self, level, token, count, dead):
        if self.buf is None:
            return
        number, name, capacity, buf = token if token is not None else (0, None, 0, None)
        layout.LEVEL_ENTRY.pack_into(self.buf, layout.LEVELS_AT + layout.LEVEL_ENTRY.size * level, number, count, dead, capacity)
        self.runs[level] = buf
        previous, self.names[level] = self.names[level], name
        if previous is not None:
            _unlink(previous)  # readers' mappings stay valid; they see the new number

    def set_count(self, level, count, dead, rewritten=True):
        if self.buf is not None:
            struct.pack_into("<II", self.buf, layout.LEVELS_AT + layout.LEVEL_ENTRY.size * level + 4, count, dead)
            run = self.runs[level]
            if rewritten and run is not None:
                # Readers keep what they checked of a run for as long as `rewrites` stays.
                layout.REWRITES.pack_into(run, layout.REWRITES_AT, (layout.REWRITES.unpack_from(run, layout.REWRITES_AT)[0] + 1) & 0xFFFFFFFFFFFFFFFF)

    def set_ready(self, ready):
        if self.buf is not None:
            U32.pack_into(self.buf, 8, 1 if ready else 0)

    def note_batch(self, batch, first, last):
        if self.buf is not None:
            layout.BATCH_ENTRY.pack_into(self.buf, layout.BATCHES_AT + layout.BATCH_ENTRY.size * (batch % BATCH_RING), batch, first, last)
            struct.pack_into("<Q", self.buf, 16, batch)

    def _create(self, size: int):
        """A new shared object of `size` bytes: (mapping, number, name), or None if shared
        memory ran out."""
        while True:
            number = self._next
            self._next += 1
            name = layout.view_name(self.index.prefix, self.index.shard, number)
            try:
                return _map(name, create_size=size), number, name
            except posix_ipc.ExistentialError:
                continue  # a leftover of an earlier worker: take the next number
            except (OSError, ValueError, posix_ipc.Error):
                return None

    def _disable(self) -> None:
        """No shared memory for a run: clients scan through the ring from now on."""
        U32.pack_into(self.index.header, layout.VIEW_FIELD, 0)
        self.close()

    def close(self):
        if self.buf is not None:
            U32.pack_into(self.buf, 8, 0)
        for name in self.names + [self.name]:
            if name is not None:
                _unlink(name)
        self.names = [None] * LEVELS
        self.runs = [None] * LEVELS
        self.name = None
        self.buf = None


def _unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
