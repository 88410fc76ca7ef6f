"""The expiry table of a shard: which keys expire, and when (docs/FORMAT.md, "Record":
expires_at). Records carry their own expiry, so this is derived state, rebuilt at open.

Keys that expire map to their expires_at (ms since the epoch); a heap of (expires_at, key) says
which to purge first (an entry whose time no longer matches the dict is stale). The store notes
every write here (Store.index_record); the engine asks it whether a key it read has expired.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Iterable

from shardkv.limits import ttl_milliseconds


class ExpiryTable:
    """key -> expires_at of the live keys that expire, with the order to purge them in.

    `expires` is never replaced (the engine keeps a reference to it, for the one dict check
    of its hot paths: empty means no key expires). Not thread-safe: the engine's lock."""

    def __init__(self, clock: Callable[[], float], expiring: Iterable[tuple[bytes, int]] = ()):
        self.clock = clock
        self.expires: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self.reset(expiring)

    def reset(self, expiring: Iterable[tuple[bytes, int]]) -> None:
        """Start again from (key, expires_at) pairs (at open, and when the index is rebuilt)."""
        self.expires.clear()
        self.expires.update(expiring)
        self._heap = [(at, key) for key, at in self.expires.items()]
        heapq.heapify(self._heap)

    def now_ms(self) -> int:
        """The clock, in whole milliseconds."""
        return int(self.clock() * 1000)

    def expired(self, key: bytes) -> bool:
        """Whether `key` has an expiry that has come."""
        at = self.expires.get(key)
        return at is not None and at <= int(self.clock() * 1000)

    def expiry_for(self, ttl) -> int:
        """The expires_at (ms) of a write with `ttl` seconds to live (None: 0, never)."""
        return 0 if ttl is None else self.now_ms() + ttl_milliseconds(ttl)  # ttl() never reports more than asked

    def ms_left(self, key: bytes):
        """Whole milliseconds before `key` expires (math.inf: never; None: it has expired)."""
        at = self.expires.get(key)
        if at is None:
            return math.inf
        left = at - self.now_ms()
        return left if left > 0 else None

    def note(self, key: bytes, expires_at: int) -> None:
        """The newest write of `key` expires at `expires_at` (0: never)."""
        if expires_at:
            self.expires[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))
        elif self.expires:
            self.expires.pop(key, None)

    def forget(self, keys: Iterable[bytes]) -> None:
        """`keys` were written without an expiry: they never expire now."""
        if self.expires:
            pop = self.expires.pop
            for key in keys:
                pop(key, None)

    def take_due(self, now: int | None = None) -> list[bytes]:
        """Remove and return the keys whose expiry has come at `now` (ms; default: the clock):
        the caller drops them from the index."""
        heap = self._heap
        if not heap:
            return []
        if now is None:
            now = self.now_ms()
        due = []
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            if self.expires.get(key) == at:
                del self.expires[key]
                due.append(key)
        return due
