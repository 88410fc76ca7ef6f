"""The ordered view of a shard's keys, for scans, min/max and neighbours.

Keys are kept sorted in one bytes arena with an offsets array, beside the index entry id of
each key (key bytes + 16 bytes per key, no Python object per key). Entry ids are hints: a
reader checks that the entry still holds the key before using it. Changes since the last merge wait in two small sets; an ordered read
merges them first. If the sets grow past a quarter of the arena the view is dropped and rebuilt
lazily on the next ordered read, so writes never pay for a large merge.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

MIN_PENDING_LIMIT = 65536


class SortedKeys:
    """Sorted set of keys, built and merged lazily (see module docstring)."""

    def __init__(self):
        self.built = False
        self._arena = b""
        self._offsets = np.zeros(1, dtype=np.int64)
        self._offsets_v = memoryview(self._offsets)
        self._eids = np.zeros(0, dtype=np.int64)
        self._added: dict[bytes, int] = {}  # key -> entry id, keys not in the arena (or replacing one in `_removed`)
        self._removed: set[bytes] = set()  # keys in the arena that are gone

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def nbytes(self) -> int:
        """Memory held by the arena, offsets and entry ids, plus an estimate of pending changes."""
        pending = sum(len(k) + 49 for k in self._added) + sum(len(k) + 41 for k in self._removed)
        return len(self._arena) + self._offsets.nbytes + self._eids.nbytes + pending

    def drop(self) -> None:
        """Forget everything; the next ordered read rebuilds from the index."""
        self.__init__()

    # -- change tracking (called by the engine for keys that appear or disappear) ------------
    def note_added(self, key: bytes, eid: int) -> None:
        """Record that `key` is now present (it was absent before), held by index entry `eid`."""
        if not self.built:
            return
        self._added[key] = eid  # if the arena still has it (in `_removed`), the merge replaces it
        self._check_pending()

    def note_removed(self, key: bytes) -> None:
        """Record that `key` is now absent (it was present before)."""
        if not self.built:
            return
        if key in self._added:
            del self._added[key]
        else:
            self._removed.add(key)
        self._check_pending()

    def _check_pending(self) -> None:
        if len(self._added) + len(self._removed) > max(MIN_PENDING_LIMIT, len(self) // 4):
            self.drop()

    # -- building --------------------------------------------------------------------------
    def ensure(self, all_keys: Callable[[], Iterable[tuple[bytes, int]]]) -> None:
        """Make the arena current: build it from `all_keys()` ((key, eid) pairs) or merge pending changes."""
        if not self.built:
            pairs = sorted(all_keys())
            self._set([k for k, _ in pairs], np.fromiter((e for _, e in pairs), dtype=np.int64, count=len(pairs)))
            self.built = True
        elif self._added or self._removed:
            self._merge()

    def _set(self, keys: list[bytes], eids: np.ndarray) -> None:
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self._arena = b"".join(keys)
        self._offsets = offsets
        self._offsets_v = memoryview(offsets)
        self._eids = eids
        self._added = {}
        self._removed = set()

    def _merge(self) -> None:
        removed, added = self._removed, sorted(self._added)
        added_eids = [self._added[k] for k in added]
        if removed:
            keep = np.ones(len(self), dtype=bool)
            for key in removed:
                i = self.bisect_left(key)
                keep[i] = False
            lengths = np.diff(self._offsets)
            arena = np.frombuffer(self._arena, dtype=np.uint8)[np.repeat(keep, lengths)].tobytes()
            offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
            np.cumsum(lengths[keep], out=offsets[1:])
            self._arena, self._offsets = arena, offsets
            self._offsets_v = memoryview(offsets)
            self._eids = self._eids[keep]
            self._removed = set()
        if added:
            positions = [self.bisect_left(key) for key in added]
            pieces = []
            previous = 0
            offsets_v = self._offsets_v
            for position, key in zip(positions, added):
                pieces.append(self._arena[offsets_v[previous] : offsets_v[position]])
                pieces.append(key)
                previous = position
            pieces.append(self._arena[offsets_v[previous] :])
            lengths = np.insert(np.diff(self._offsets), positions, [len(k) for k in added])
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            self._arena, self._offsets = b"".join(pieces), offsets
            self._offsets_v = memoryview(offsets)
            self._eids = np.insert(self._eids, positions, added_eids)
            self._added = {}

    # -- reading (after ensure) -------------------------------------------------------------
    def key_at(self, i: int) -> bytes:
        """The i-th smallest key."""
        return self._arena[self._offsets_v[i] : self._offsets_v[i + 1]]

    def bisect_left(self, key: bytes) -> int:
        """Index of the first key >= `key`."""
        lo, hi = 0, len(self)
        arena, offsets = self._arena, self._offsets_v
        while lo < hi:
            mid = (lo + hi) // 2
            if arena[offsets[mid] : offsets[mid + 1]] < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def bisect_right(self, key: bytes) -> int:
        """Index of the first key > `key`."""
        lo, hi = 0, len(self)
        arena, offsets = self._arena, self._offsets_v
        while lo < hi:
            mid = (lo + hi) // 2
            if key < arena[offsets[mid] : offsets[mid + 1]]:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def snapshot(self) -> tuple[bytes, np.ndarray, np.ndarray]:
        """The current arena, offsets and entry ids; later merges replace them, never mutate them."""
        return self._arena, self._offsets, self._eids


def prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
