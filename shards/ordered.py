"""A shard engine's ordered reads: scans, min, max, above and below over the store's ordered
view (shards/sortedkeys.py), in windows read under the engine's lock.

A scan is a cursor over the live data: it reads the next few keys and their values under the
lock, hands them out one by one without it, and reads the window again from the cursor if the
store's version moved meanwhile (a write came), so every item is the next key present when it
is reached. Windows grow 4x from SCAN_FIRST (min() and above() need one key) to SCAN_CHUNK.
"""

from __future__ import annotations

from typing import Callable, Iterator

from shardkv.limits import check_key, check_scan_args
from shardkv.ipc.sortedruns import scan_bounds
from shardkv.shards.sortedkeys import BUILDING
from shardkv.shards.store import Store

SCAN_FIRST = 64  # a scan reads this many keys first (min(), above() need one), then 4x more each time
SCAN_CHUNK = 4096  # up to this many


class OrderedReads:
    """The ordered reads of one engine: `store` its store, `check_open` raises Closed once the
    engine is closed (called under the store's lock, before each window)."""

    def __init__(self, store: Store, check_open: Callable[[], None]):
        self._store = store
        self._check_open = check_open

    def view_sorting(self) -> bool:
        """Whether the ordered view is still being sorted in the background (after a crash)."""
        view = self._store.sorted
        return view.state == BUILDING and not view.wait_built(0)

    def scan(self, start, stop, reverse, prefix, limit) -> Iterator[tuple[bytes, bytes]]:
        """ShardEngine.scan: (key, value) in key order, start <= key < stop, keys starting with
        `prefix`, at most `limit` of them (descending if `reverse`)."""
        start, stop = scan_bounds(*check_scan_args(start, stop, prefix, limit))
        self._check_open()
        return self._scan(start, stop, bool(reverse), limit)

    def _scan(self, start, stop, reverse, limit):
        if limit == 0 or (start is not None and stop is not None and start >= stop):
            return
        cursor, bound = (stop, start) if reverse else (start, stop)
        inclusive = not reverse  # a reverse scan starts below `stop`, a forward one at `start`
        size = SCAN_FIRST if limit is None else min(SCAN_FIRST, limit)
        produced = 0
        header = self._store.header
        while True:
            items, more, version = self._window(cursor, inclusive, bound, reverse, size)
            for item in zip(*items):  # zip's one tuple is reused when the caller lets it go
                if header.version != version:
                    size = SCAN_FIRST  # a write came: read again from the cursor
                    break
                yield item
                produced += 1
                if limit is not None and produced >= limit:
                    return
                cursor, inclusive = item[0], False
            else:
                if not more and header.version == version:
                    return  # nothing left, and nothing written since it was read
                size = min(size * 4, SCAN_CHUNK)

    def _window(self, cursor, inclusive, bound, reverse, size) -> tuple[list, bool, int]:
        """The next (key, value) items of a scan from `cursor`, read with the lock held:
        (items, more, the version they were read at)."""
        store = self._store
        if store.sorted.state == BUILDING:
            store.sorted.wait_built()  # without the lock: writes go on meanwhile
        with store.lock:
            self._check_open()
            if store.expiry.expires:
                store.purge_expired()
            store.view_ready()
            eids, more = store.sorted.window(cursor, inclusive, bound, reverse, size)
            return store.entry_items(eids), more, store.header.version

    def first(self, reverse: bool = False):
        """(key, value) of the smallest key (the largest if `reverse`), or None if none."""
        return next(self.scan(None, None, reverse, None, 1), None)

    def above(self, key):
        """(key, value) of the smallest key strictly greater than `key`, or None."""
        key = check_key(key)
        for found in self.scan(key, None, False, None, 2):
            if found[0] != key:
                return found
        return None

    def below(self, key):
        """(key, value) of the largest key strictly less than `key`, or None."""
        key = check_key(key)
        return next(self.scan(None, key, True, None, 1), None)
