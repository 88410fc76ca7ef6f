"""The ordered view of a shard's keys (scans, min/max, neighbours), kept current as writes arrive.

The view holds no key bytes: it orders *index entry ids* (shards/keyindex.py), whose entries
point at the keys' records in the log. It is a small log-structured merge of sorted runs
("levels"), each an array of entry ids (uint32) beside an array of the keys' first 8 bytes
(big-endian uint64, zero-padded: the "prefix"):

- level 0 holds up to SMALL_CAPACITY (4096) entries and changes in place: a new key is bisected
  in and the tail shifted (a few microseconds), a removed key shifted out;
- level i >= 1 holds up to SMALL_CAPACITY * 16**i entries (64k, 1M, 16M, 256M; the last one
  any number). When level 0 is full, it is merged (numpy) into level 1; a level that would
  outgrow its capacity moves, merged, into the next. So each key is rewritten about 8 times
  per level it passes, a bounded cost per write (no rebuild, no cliff).

Opening a shard puts every key into one level (the smallest that fits): loaded from a saved view
(`SortedView.load`), built from the index at once for small shards, or in a background thread
(`start_build`) for big ones while writes go on.

A key removed from a level >= 1 leaves a tombstone (entry id DEAD; its prefix stays, so the run
stays sorted) until that level is next merged; `where[e]` says which level holds entry e and at
which position, so removing needs no search. Every live key is in exactly one level, once.

Order is byte order (bytes comparison). Two prefixes decide unless they are equal; then the
keys are compared in full, read from the log (`KeySource`): by a vectorised most-significant-
digit refinement over 8-byte chunks when sorting many (`sort_by_key`), by binary search when
placing one. Keys that share their first 8 bytes therefore cost more to order, never less.

Where the arrays live is up to `storage`: private numpy arrays (`PrivateRuns`), or shared memory
that clients read (shards/viewpublisher.py writes what shardkv/ipc/sortedview.py reads). Finding
a key or a window in the runs is shardkv/ipc/sortedruns.py, shared with the clients' reader. The engine changes the view only with its lock
held and its seqlock version odd, like the hash index.
"""

from __future__ import annotations

import bisect
import os
import threading
from typing import Callable

import numpy as np

from crc32c import crc32c

from shardkv import faults
from shardkv.ipc.messages import BATCH_RING  # the last batches whose key ranges readers can look up
# The runs' entries, keys and prefixes as both the view and its readers in clients see them.
from shardkv.ipc.sortedruns import DEAD, LEVELS, find_position, gather_chunks, key_prefix, key_prefixes, window
from shardkv.wal.format import FORMAT_VERSION, HINT_CRC, RECORD_HEADER_SIZE, SORTED_FILE, SORTED_HEADER, SORTED_MAGIC, TMP_SUFFIX

SMALL = 0  # the level that changes in place
SMALL_CAPACITY = 4096
GROWTH = 16  # level i >= 1 holds up to SMALL_CAPACITY * GROWTH**i entries (the last: any number)
DEAD_MIN = 1 << 16  # a level whose tombstones pass this many and half of it is merged to drop them
SYNC_BUILD_MAX = 1 << 16  # views of up to this many keys are built at open; bigger ones in a thread
POSITION_BITS = 29  # where[e] = level << 29 | position, for levels >= 1
POSITION_MASK = (1 << POSITION_BITS) - 1
IN_SMALL = 0xFFFFFFFE  # where[e]: in level 0 (found by search: its positions shift)
NOWHERE = 0xFFFFFFFF  # where[e]: in no level


def level_capacity(level: int) -> int:
    """How many entries level `level` may hold (the last level: any number)."""
    return (1 << 62) if level == LEVELS - 1 else SMALL_CAPACITY * GROWTH**level


_EMPTY_EIDS = np.zeros(0, dtype=np.int64)
_EMPTY_PREFIXES = np.zeros(0, dtype=np.uint64)

# states of a view
EMPTY, BUILDING, READY = 0, 1, 2


class KeySource:
    """Reads keys of index entries from the log: one (`key`) or 8-byte chunks of many (`chunks`).

    `locations`, `key_lens`: the index's entry arrays (numpy); `maps`: segment -> buffer.
    """

    def __init__(self, locations_of: Callable[[], tuple], maps: dict):
        self._arrays = locations_of  # () -> (locations, key_lens): the index may swap arrays
        self.maps = maps

    def key(self, e: int) -> bytes:
        """The key of entry `e`."""
        locations, key_lens = self._arrays()
        location = int(locations[e])
        start = (location & 0xFFFFFFFF) + RECORD_HEADER_SIZE
        return bytes(self.maps[location >> 32][start : start + int(key_lens[e])])

    def lengths(self, eids: np.ndarray) -> np.ndarray:
        """The key lengths of entries `eids` (int64)."""
        return self._arrays()[1][eids].astype(np.int64)

    def chunks(self, eids: np.ndarray, k: int) -> np.ndarray:
        """Bytes 8k .. 8k+8 of each entry's key as big-endian uint64, zero past the key's end."""
        locations, key_lens = self._arrays()
        return gather_chunks(self.maps, locations[eids], key_lens[eids], k)


def sort_by_key(eids: np.ndarray, prefixes: np.ndarray, source: KeySource, presorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(eids, prefixes) in key order. `presorted`: already in prefix order (a concatenation of
    sorted runs also sorts fast: numpy's stable sort merges runs). Equal prefixes are refined
    with the next 8-byte chunks of the keys, read from the log, and at last the lengths: the
    order of (chunk 0, chunk 1, ..., length) with zero-padded chunks is byte order."""
    if not presorted:
        order = np.argsort(prefixes, kind="stable")
        eids, prefixes = eids[order], prefixes[order]
    n = len(eids)
    if n < 2:
        return eids, prefixes
    same = prefixes[1:] == prefixes[:-1]
    if not same.any():
        return eids, prefixes
    eids = eids.copy()
    starts = np.concatenate(([True], ~same))
    group = np.cumsum(starts) - 1  # grows with position: a group is a contiguous range
    sizes = np.bincount(group)
    pending = np.flatnonzero(sizes[group] > 1)  # positions whose group needs more than the prefix
    level = 1
    while len(pending):
        members = eids[pending]
        lengths = source.lengths(members)
        chunk = source.chunks(members, level)
        shortened = np.minimum(lengths, 8 * (level + 1))
        groups = group[pending]
        # Sorting by group first keeps each group in its own positions (pending is in order).
        order = np.lexsort((shortened, chunk, groups))
        eids[pending] = members[order]
        groups, chunk, shortened, lengths = groups[order], chunk[order], shortened[order], lengths[order]
        tie = (groups[1:] == groups[:-1]) & (chunk[1:] == chunk[:-1]) & (shortened[1:] == shortened[:-1])
        new_start = np.concatenate(([True], ~tie))
        local = np.cumsum(new_start) - 1
        group[pending] = pending[np.flatnonzero(new_start)][local]  # a new group's id: its first position
        counts = np.bincount(local)
        longer = np.bincount(local, weights=lengths > 8 * (level + 1)) > 0
        pending = pending[(counts[local] > 1) & longer[local]]  # still tied, with bytes left to compare
        level += 1
    return eids, prefixes


class PrivateRuns:
    """Run arrays in the process's own memory (the default `storage` of a SortedView)."""

    def allocate(self, level: int, capacity: int) -> tuple[np.ndarray, np.ndarray, object]:
        """Zeroed (eids, prefixes) arrays for a run of `capacity` entries, and a token for `install`."""
        return np.zeros(capacity, dtype=np.uint32), np.zeros(capacity, dtype=np.uint64), None

    def install(self, level: int, token, count: int, dead: int) -> None:
        """Run `level` now uses the arrays of `token` and holds `count` entries (`dead` tombstones)."""

    def set_count(self, level: int, count: int, dead: int, rewritten: bool = True) -> None:
        """Run `level` now holds `count` entries, `dead` of them tombstones; `rewritten`: its
        entries changed other than by a new tombstone (readers that checked them check again)."""

    def set_ready(self, ready: bool) -> None:
        """Whether the view is complete (readers may use it)."""

    def note_batch(self, batch: int, first: int, last: int) -> None:
        """Batch number `batch`, of two or more keys with prefixes in [first, last], was applied."""

    def close(self) -> None:
        """Release everything."""


class _Run:
    __slots__ = ("eids", "prefixes", "count", "dead", "eids_v", "prefixes_v")

    def __init__(self, eids: np.ndarray, prefixes: np.ndarray, count: int = 0, dead: int = 0):
        self.eids, self.prefixes, self.count, self.dead = eids, prefixes, count, dead
        # memoryview item access and slice moves are several times faster than numpy's on the
        # one-key paths (bisect, shifting SMALL).
        self.eids_v, self.prefixes_v = memoryview(eids), memoryview(prefixes)


class SortedView:
    """The ordered view (see the module docstring). All changes happen with the engine's lock
    held; `start_build` sorts in a background thread and installs with the lock."""

    def __init__(self, source: KeySource, storage=None):
        self.source = source
        self.storage = storage if storage is not None else PrivateRuns()
        self.state = EMPTY
        self.runs: list[_Run] = []
        for level in range(LEVELS):
            capacity = SMALL_CAPACITY if level == SMALL else 0
            eids, prefixes, token = self.storage.allocate(level, capacity)
            self.runs.append(_Run(eids, prefixes))
            self.storage.install(level, token, 0, 0)
        self.where = np.full(1024, NOWHERE, dtype=np.uint32)
        self.where_v = memoryview(self.where)
        self._events: list | None = None  # changes made while a background build runs
        self._builder: threading.Thread | None = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.key_count: Callable[[], int] = lambda: len(self)
        self.batches = 0  # single-shard batches of two or more keys applied (see note_batch)
        self.batch_ring = [(0, 0, 0)] * BATCH_RING

    def __len__(self) -> int:
        return sum(run.count - run.dead for run in self.runs)

    @property
    def ready(self) -> bool:
        """Whether the view holds every key (else ordered reads wait for or start a build)."""
        return self.state == READY

    @property
    def nbytes(self) -> int:
        """Bytes of memory held by the runs and the entry -> position table."""
        return sum(run.eids.nbytes + run.prefixes.nbytes for run in self.runs) + self.where.nbytes

    # -- building ---------------------------------------------------------------------------
    def build_now(self, eids: np.ndarray) -> None:
        """Sort live entries `eids` into one level at once (the caller holds the engine's lock)."""
        eids = np.asarray(eids, dtype=np.int64)
        order, prefixes = sort_by_key(eids, self.source.chunks(eids, 0), self.source)
        self._install_base(order, prefixes)
        self.state = READY
        self.storage.set_ready(True)
        self._built.set()

    def start_build(self, eids: np.ndarray, source: KeySource) -> None:
        """Sort live entries `eids` in a background thread (keys read through `source`, a
        snapshot of the log's mappings); writes meanwhile are recorded and replayed when the
        result is installed (`finish_build`, with the engine's lock). The caller holds the lock."""
        self.state = BUILDING
        self.storage.set_ready(False)
        self._events = []
        self._built.clear()
        self._build_error = None
        eids = np.asarray(eids, dtype=np.int64).copy()

        def run() -> None:
            try:
                faults.hold("sortedkeys.background_sort")
                self._result = sort_by_key(eids, source.chunks(eids, 0), source)
            except BaseException as exc:  # an ordered read then builds it itself
                self._build_error = exc
                self._result = None
            self._built.set()

        self._builder = threading.Thread(target=run, name="shardkv-sorted-view", daemon=True)
        self._builder.start()

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait (without the engine's lock) for a background build to finish sorting."""
        return self._built.wait(timeout)

    def finish_build(self, live_eids: Callable[[], np.ndarray]) -> None:
        """Install a finished background build and replay the writes made meanwhile; build at
        once (from `live_eids()`) if it failed. The caller holds the engine's lock."""
        if self.state != BUILDING:
            return
        self._builder.join()
        self._builder = None
        result, events = self._result, self._events
        self._result, self._events = None, None
        if result is None:
            self.build_now(live_eids())
            return
        self._install_base(*result)
        self.state = READY
        # The net effect of the writes made meanwhile: entries of the sorted snapshot removed
        # (an entry may have been reused since: the index says what it holds now), and the
        # entries added that are still there.
        removed, added = set(), {}
        for event in events:
            if event[0] == "add":
                added[event[2]] = event[1]
            elif added.pop(event[1], None) is None:
                removed.add(event[1])
        for e in removed:
            self.remove(e)
        self.insert_many(list(added.values()), list(added))
        self.storage.set_ready(True)

    def abandon_build(self) -> None:
        """Stop waiting for a background build (the engine closes)."""
        if self._builder is not None:
            self._builder.join()
            self._builder = None
        self._events = None
        self.state = EMPTY

    def load(self, eids: np.ndarray, prefixes: np.ndarray) -> None:
        """Install `eids` (in key order, with their `prefixes`) as the whole view: a saved view."""
        self._install_base(np.asarray(eids, dtype=np.int64), np.asarray(prefixes, dtype=np.uint64))
        self.state = READY
        self.storage.set_ready(True)
        self._built.set()

    def _install_base(self, eids: np.ndarray, prefixes: np.ndarray) -> None:
        """Every key in one level: the smallest >= 1 that holds them all."""
        self.where[:] = NOWHERE
        home = next(level for level in range(1, LEVELS) if len(eids) <= level_capacity(level))
        for level in range(LEVELS):
            if level != home:
                self._set_run(level, _EMPTY_EIDS, _EMPTY_PREFIXES)
        self._set_run(home, eids, prefixes)

    # -- changes (the engine's lock held, its version odd) -----------------------------------
    def insert(self, key: bytes, e: int) -> None:
        """`key` (held by entry `e`) is now present; it was absent."""
        if self.state != READY:
            if self._events is not None:
                self._events.append(("add", key, e))
            return
        small = self.runs[SMALL]
        if small.count >= len(small.eids):
            self._spill(_EMPTY_EIDS, _EMPTY_PREFIXES)
            small = self.runs[SMALL]
        prefix = key_prefix(key)
        count = small.count
        eids_v, prefixes_v = small.eids_v, small.prefixes_v
        position = bisect.bisect_left(prefixes_v, prefix, 0, count)
        if position < count and prefixes_v[position] == prefix:
            position = find_position(eids_v, prefixes_v, count, key, prefix, self.source.key)
        if position < count:
            eids_v[position + 1 : count + 1] = eids_v[position:count]
            prefixes_v[position + 1 : count + 1] = prefixes_v[position:count]
        eids_v[position] = e
        prefixes_v[position] = prefix
        small.count = count + 1
        if e >= len(self.where):
            self._ensure_where(e)
        self.where_v[e] = IN_SMALL
        self.storage.set_count(SMALL, count + 1, 0)

    def insert_many(self, keys: list, eids: list) -> None:
        """Keys of one batch (held by entries `eids`), each absent before."""
        if not keys:
            return
        if self.state != READY or len(keys) < 8:
            for key, e in zip(keys, eids):
                self.insert(key, e)
            return
        new_eids = np.asarray(eids, dtype=np.int64)
        new_prefixes = key_prefixes(keys)
        new_eids, new_prefixes = sort_by_key(new_eids, new_prefixes, self.source)
        small = self.runs[SMALL]
        if small.count + len(keys) > len(small.eids):
            self._spill(new_eids, new_prefixes)
            return
        count = small.count
        merged_eids, merged_prefixes = self._merged([(small.eids[:count], small.prefixes[:count]), (new_eids, new_prefixes)])
        m = len(merged_eids)
        small.eids[:m] = merged_eids
        small.prefixes[:m] = merged_prefixes
        small.count = m
        self._ensure_where(int(new_eids.max()))
        self.where[new_eids] = IN_SMALL
        self.storage.set_count(SMALL, m, 0)

    def remove(self, e: int) -> None:
        """The key held by entry `e` is gone (the entry may be reused next)."""
        if self.state != READY:
            if self._events is not None:
                self._events.append(("remove", e))
            return
        where = int(self.where[e]) if e < len(self.where) else NOWHERE
        if where != NOWHERE:
            self.where[e] = NOWHERE
        if where == IN_SMALL:
            small = self.runs[SMALL]
            found = np.flatnonzero(small.eids[: small.count] == e)
            if not len(found):
                raise AssertionError(f"entry {e} is not in the small run")
            position, count = int(found[0]), small.count
            small.eids[position : count - 1] = small.eids[position + 1 : count]
            small.prefixes[position : count - 1] = small.prefixes[position + 1 : count]
            small.count = count - 1
            self.storage.set_count(SMALL, small.count, 0)
            return
        if where == NOWHERE:
            raise AssertionError(f"entry {e} is in no level")
        level, position = where >> POSITION_BITS, where & POSITION_MASK
        run = self.runs[level]
        if position >= run.count or run.eids_v[position] != e:
            raise AssertionError(f"entry {e} is not where the view says")
        run.eids_v[position] = DEAD
        run.dead += 1
        self.storage.set_count(level, run.count, run.dead, rewritten=False)
        if run.dead > DEAD_MIN and 2 * run.dead > run.count:
            self._set_run(level, *self._live(level))  # drop the tombstones

    # -- merges -----------------------------------------------------------------------------
    def _spill(self, extra_eids: np.ndarray, extra_prefixes: np.ndarray) -> None:
        """Level 0 (with a sorted batch) into level 1; a level that would outgrow its capacity
        goes on, merged, into the next."""
        carry = self._merged([self._live(SMALL), (extra_eids, extra_prefixes)])
        self._clear_small()
        level = 1
        while True:
            merged = self._merged([self._live(level), carry])
            if len(merged[0]) <= level_capacity(level) or level == LEVELS - 1:
                self._set_run(level, *merged)
                return
            self._set_run(level, _EMPTY_EIDS, _EMPTY_PREFIXES)
            carry = merged
            level += 1

    def _clear_small(self) -> None:
        small = self.runs[SMALL]
        small.count = 0
        self.storage.set_count(SMALL, 0, 0)

    def _live(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        run = self.runs[level]
        eids, prefixes = run.eids[: run.count], run.prefixes[: run.count]
        if run.dead:
            keep = eids != DEAD
            eids, prefixes = eids[keep], prefixes[keep]
        return eids, prefixes  # (views when nothing is dropped: every merge writes new arrays)

    def _merged(self, parts: list) -> tuple[np.ndarray, np.ndarray]:
        """One sorted run of the sorted runs `parts` ((eids, prefixes) each)."""
        parts = sorted((p for p in parts if len(p[0])), key=lambda p: -len(p[0]))
        if not parts:
            return _EMPTY_EIDS, _EMPTY_PREFIXES
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            # The smaller run's places in the bigger one: no pass over the bigger run but the copy.
            (big_eids, big_prefixes), (eids, prefixes) = parts
            places = np.searchsorted(big_prefixes, prefixes, side="left")
            merged = np.insert(big_eids, places, eids), np.insert(big_prefixes, places, prefixes)
        else:
            eids = np.concatenate([p[0] for p in parts])
            prefixes = np.concatenate([p[1] for p in parts])
            order = np.argsort(prefixes, kind="stable")  # merges the sorted runs
            merged = eids[order], prefixes[order]
        return sort_by_key(*merged, self.source, presorted=True)  # equal prefixes: by key

    def _set_run(self, level: int, eids: np.ndarray, prefixes: np.ndarray) -> None:
        """Make run `level` hold exactly these sorted entries (in place when it has room)."""
        n = len(eids)
        if level == SMALL:
            run = self.runs[SMALL]
            run.eids[:n] = eids
            run.prefixes[:n] = prefixes
            run.count = n
            self.storage.set_count(SMALL, n, 0)
            if n:
                self._ensure_where(int(eids.max()))
                self.where[eids] = IN_SMALL
            return
        if n > POSITION_MASK + 1:
            raise ValueError(f"a shard's ordered view holds at most {POSITION_MASK + 1} keys")
        run = self.runs[level]
        if n <= len(run.eids):
            # Room in the level's arrays: rewritten in place, no new object (readers retry: the
            # version is odd). `eids` may be a view of these very arrays, at the same places.
            run.eids[:n] = eids
            run.prefixes[:n] = prefixes
            run.count, run.dead = n, 0
            self.storage.set_count(level, n, 0)
        else:
            # A level that grows gets half again as much room, so that most merges into it
            # write in place; a level filled at once (open) gets what it needs.
            capacity = n if not len(run.eids) else min(level_capacity(level), max(n + n // 2, SMALL_CAPACITY))
            new_eids, new_prefixes, token = self.storage.allocate(level, capacity)
            new_eids[:n] = eids
            new_prefixes[:n] = prefixes
            self.runs[level] = _Run(new_eids, new_prefixes, n, 0)
            self.storage.install(level, token, n, 0)
        if n:
            self._ensure_where(int(eids.max()))
            self.where[eids] = np.arange(n, dtype=np.uint32) | np.uint32(level << POSITION_BITS)

    def _ensure_where(self, e: int) -> None:
        if e >= len(self.where):
            grown = np.full(max(e + 1, len(self.where) * 3 // 2), NOWHERE, dtype=np.uint32)
            grown[: len(self.where)] = self.where
            self.where = grown
            self.where_v = memoryview(grown)

    def note_batch(self, keys: list) -> None:
        """A single-shard batch changed these keys at once: scans part-way through this shard
        learn where (the prefixes of its first and last keys), so that none shows part of it."""
        if len(keys) < 2:
            return
        first, last = min(keys), max(keys)
        self.batches += 1
        entry = (self.batches, key_prefix(first), key_prefix(last))
        self.batch_ring[self.batches % BATCH_RING] = entry
        self.storage.note_batch(*entry)

    def history(self) -> tuple[int, list]:
        """(batches noted, the last BATCH_RING of them as (batch, first prefix, last prefix))."""
        return self.batches, list(self.batch_ring)

    # -- searching --------------------------------------------------------------------------
    def window(self, cursor: bytes | None, inclusive: bool, bound: bytes | None, reverse: bool, size: int) -> tuple[list, bool]:
        """The entry ids of the next keys after `cursor` (from it if `inclusive`; None: from the
        first, or the last if `reverse`), in scan order, up to about `size` of them, not past
        `bound` (forward: below it; reverse: from it on; None: no bound): (eids, more). `more` is
        False once nothing is left."""
        found, _, more = window([(run.eids_v, run.prefixes_v, run.count) for run in self.runs], self.source.key, cursor, inclusive, bound, reverse, size)
        return found.tolist(), more

    def ordered_eids(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live entry id in key order, with its prefix (a merge of the levels)."""
        return self._merged([self._live(level) for level in range(LEVELS)])

    def close(self) -> None:
        """Stop a build and release the runs."""
        self.abandon_build()
        self.storage.close()


# -- the saved view (docs/FORMAT.md, "Ordered view file") ----------------------------------------
def save_view(directory: str, shard: int, max_seq: int, eids: np.ndarray, prefixes: np.ndarray, locations: np.ndarray) -> None:
    """Write SORTED: the keys of entries `eids` (in key order, with their `prefixes`) located
    at `locations` (of those entries, same order). Derived data: no fsync; OSError propagates."""
    n = len(eids)
    by_location = np.argsort(locations, kind="stable")
    ordered_locations = np.ascontiguousarray(locations[by_location], dtype="<u8")
    header = SORTED_HEADER.pack(SORTED_MAGIC, FORMAT_VERSION, 0, shard, n, max_seq, crc32c(ordered_locations), 0)
    body = b"".join((header, by_location.astype("<u4").tobytes(), np.ascontiguousarray(prefixes, dtype="<u8").tobytes()))
    temporary = os.path.join(directory, SORTED_FILE + TMP_SUFFIX)
    with open(temporary, "wb") as f:
        f.write(body)
        f.write(HINT_CRC.pack(crc32c(body)))
    os.replace(temporary, os.path.join(directory, SORTED_FILE))


def load_view(directory: str, shard: int, max_seq: int, locations: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The saved view for a shard whose live entries 0..n-1 are at `locations`: (entry ids in key
    order, their prefixes), or None if SORTED is missing or does not describe exactly these
    keys. The file is deleted either way: it describes one close only."""
    path = os.path.join(directory, SORTED_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
    except OSError:
        return None
    n = len(locations)
    if len(data) != SORTED_HEADER.size + 12 * n + HINT_CRC.size:
        return None
    body = memoryview(data)[: -HINT_CRC.size]
    if crc32c(body) != HINT_CRC.unpack_from(data, len(body))[0]:
        return None
    magic, version, _, saved_shard, count, saved_seq, live_crc, _ = SORTED_HEADER.unpack_from(data)
    if (magic, version, saved_shard, count, saved_seq) != (SORTED_MAGIC, FORMAT_VERSION, shard, n, max_seq):
        return None
    by_location = np.argsort(locations, kind="stable")  # nearly sorted after recovery: fast
    if crc32c(np.ascontiguousarray(locations[by_location], dtype="<u8")) != live_crc:
        return None
    ranks = np.frombuffer(data, dtype="<u4", count=n, offset=SORTED_HEADER.size).astype(np.int64)
    prefixes = np.frombuffer(data, dtype="<u8", count=n, offset=SORTED_HEADER.size + 4 * n).astype(np.uint64)
    if n and (int(ranks.max()) >= n or (n > 1 and bool((prefixes[1:] < prefixes[:-1]).any()))):
        return None
    eids = np.full(n, -1, dtype=np.int64)
    eids[ranks] = by_location
    if n and int(eids.min()) < 0:
        return None  # the ranks are not a permutation
    return eids, prefixes
