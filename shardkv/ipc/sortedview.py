"""Ordered reads in the client's own process (docs/IPC.md, "Ordered view").

Each shard worker publishes its ordered view (shards/sortedkeys.py: levels of index entry ids
in key order, with the keys' first 8 bytes) in shared memory beside its hash index, under the
index's seqlock. A client scans by reading windows of entries from every level, merging them by
prefix (and by key where prefixes are equal), and reading keys and values from its own
read-only mappings of the segment files, every record's CRC-32C checked: no round trip per page.

The layout of the shared objects is ipc/viewlayout.py (the worker's shards/viewpublisher.py
writes it); reading and checking a window's records in bulk is ipc/bulkread.py. Here:

- `ViewReader`, one shard's view (`window`: the next entries after a key, read and
  checked at one seqlock version; `first`: one item, for min/max/above/below);
- `OrderedScan`, a scan over every shard: each shard's windows read directly, or as SCAN pages
  through the ring when that cannot be done safely, merged in key order under the isolation rules
  of docs/TRANSACTIONS.md ("Isolation"); `scan` and `ascan` drive it for Client and AsyncClient.

Nothing read from shared memory is trusted: entry ids, counts and locations are bounds-checked,
every record must be an intact PUT of the length the index says, the keys returned must rise
strictly (fall, in reverse), and anything unexpected means: ask the worker through the ring.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import chain
import mmap
import struct
import time

import numpy as np
import posix_ipc
from crc32c import crc32c

from shardkv.errors import Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc.bulkread import NO_ITEMS, Items, by_segment, check_order, read_records
from shardkv.ipc.messages import BATCH_RING
from shardkv.ipc.sharedindex import HEADER_FIELDS, SERVING, VERSION, VERSION_OFFSET, U32, _map
from shardkv.ipc.sortedruns import DEAD, LEVELS, find_position, gather_chunks, key_prefix, key_prefixes, scan_bounds, window
from shardkv.ipc.viewlayout import (
    BATCH_ENTRY,
    BATCHES_AT,
    HEADER_BYTES,
    LEVEL_ENTRY,
    LEVELS_AT,
    REWRITES,
    REWRITES_AT,
    RUN_HEADER,
    RUN_MAGIC,
    VIEW_BYTES,
    VIEW_FIELD,
    VIEW_HEADER,
    VIEW_MAGIC,
    run_layout,
    view_name,
)
from shardkv.wal.format import PUT, RECORD_HEADER, RECORD_HEADER_SIZE

RETRIES = 8  # a window that overlapped a change is read again this often (smaller), then the ring
FIRST_WINDOW = 64  # a scan's first window per shard; then 4x bigger each time, up to MAX_WINDOW
# Large windows pay for each window's fixed work (numpy calls per level and per segment file
# touched: at 10M keys a window touches all ~10 segments of its shard): 8192 -> 32768 took a
# 10M-key iteration from 613 to 434 ns an item (medians of 5 alternating runs), about 2.4 MB of
# records per shard window.
MAX_WINDOW = 32768
PAGE = 1000  # items per SCAN page through the ring
MAX_RESTARTS = 50  # a scan that has returned nothing starts again at most this often
CHECK_AFTER = 64  # a run of n entries is checked whole once searched n / 64 + 4 times unchanged
CHECK_CHUNK = 1 << 18  # ... in pieces of this many entries (temporary arrays of ~150 bytes each)


# -- client: one shard -------------------------------------------------------------------------------
class _State:
    """What one read of a shard's header found: everything a window needs, at `version`."""

    __slots__ = ("version", "runs", "levels", "locations", "key_lens", "value_lens", "active", "active_end", "epoch", "history", "key_of", "entry_views")


class ViewReader:
    """A client's view of one shard's ordered view (wraps the shard's IndexReader, whose table
    and segment mappings it shares). Safe to share between threads: cached mappings are swapped
    in one assignment."""

    def __init__(self, index_reader):
        self.reader = index_reader
        # (epoch, number, mapping) of the view object; (epoch, number) -> (mapping, capacity,
        # eids view, prefixes view) of the runs. Numbers start again with each worker, which changes the
        # epoch: mappings are kept for one epoch only.
        self._view = (None, 0, None)
        self._runs: dict[int, tuple] = {}
        self._table = (None, None)  # (table tuple of the IndexReader, numpy arrays of it)
        self._state = None  # the last state read (see state())
        # Runs whose every entry was checked against its key (see check_run), by (epoch, run
        # number, rewrites); and how often each unchecked run was searched (when to check it).
        self._checked: set = set()
        self._searches: dict = {}

    # -- mapping ----------------------------------------------------------------------------
    def _map_object(self, number: int):
        try:
            return _map(view_name(self.reader.prefix, self.reader.shard, number), read_only=True)
        except (posix_ipc.ExistentialError, OSError, ValueError):
            return None

    def _view_buf(self, epoch: int, number: int):
        view = self._view
        if view[0] != epoch or view[1] != number:
            self._runs = {}
            buf = self._map_object(number)
            if buf is None or len(buf) < VIEW_BYTES or buf[:8] != VIEW_MAGIC:
                self._view = (None, 0, None)
                return None
            view = (epoch, number, buf)
            self._view = view
        return view[2]

    def _run(self, epoch: int, number: int, capacity: int):
        run = self._runs.get((epoch, number))
        if run is None:
            buf = self._map_object(number)
            prefixes_at, size = run_layout(capacity)
            if buf is None or len(buf) < size or buf[:8] != RUN_MAGIC or RUN_HEADER.unpack_from(buf)[1] != capacity:
                return None
            data = memoryview(buf)
            run = (buf, capacity, data[HEADER_BYTES : HEADER_BYTES + 4 * capacity].cast("I"), data[prefixes_at:size].cast("Q"))
            self._runs[(epoch, number)] = run  # (two threads may fill it at once: keyed by epoch too)
        return run

    def state(self) -> _State | None:
        """The shard's view at its current version, or None (use the ring): not serving, changing
        right now, no view published, not complete, or anything that does not check out. (Kept
        while the version stays: every change to what it describes moves the version.)"""
        reader = self.reader
        header = reader._header
        cached = self._state
        if cached is not None and VERSION.unpack_from(header, VERSION_OFFSET)[0] == cached.version:
            return cached
        version, serving, _, table_number, active, epoch, active_end = HEADER_FIELDS.unpack_from(header, VERSION_OFFSET)
        if version & 1 or serving != SERVING:
            return None
        number = U32.unpack_from(header, VIEW_FIELD)[0]
        if not number:
            return None
        buf = self._view_buf(epoch, number)
        if buf is None:
            return None
        magic, ready, levels, batches = VIEW_HEADER.unpack_from(buf)
        if not ready or levels != LEVELS:
            return None
        table = reader._table
        if table is None or table[0] != table_number:
            table = reader._map_table(table_number)
            if table is None:
                return None
        cached = self._table
        if cached[0] is not table:
            arrays = tuple(np.frombuffer(view, dtype=dtype) for view, dtype in zip(table[3:], ("<u8", "<u4", "<u4", "<u4")))
            cached = (table, arrays)
            self._table = cached
        runs, levels = [], []
        for level in range(LEVELS):
            run_number, count, dead, capacity = LEVEL_ENTRY.unpack_from(buf, LEVELS_AT + LEVEL_ENTRY.size * level)
            if not count:
                continue
            if count > capacity or not run_number:
                return None
            run = self._run(epoch, run_number, capacity)
            if run is None:
                return None
            runs.append((run[2], run[3], count))
            checked_as = (epoch, run_number, REWRITES.unpack_from(run[0], REWRITES_AT)[0])
            levels.append([run[2], run[3], count, checked_as, checked_as in self._checked])
        state = _State()
        state.version = version
        state.runs = runs
        state.levels = levels
        state.locations, _, state.key_lens, state.value_lens = cached[1]
        state.active, state.active_end, state.epoch = active, active_end, epoch
        ring = [BATCH_ENTRY.unpack_from(buf, BATCHES_AT + BATCH_ENTRY.size * i) for i in range(BATCH_RING)]
        state.history = (batches, ring)
        state.entry_views = table[3], table[5], table[6]  # locations, key_lens, value_lens
        state.key_of = self._key_of(state)
        self._state = state
        return state

    def same_version(self, state: _State) -> bool:
        """Whether nothing changed in the shard since `state` was read."""
        return VERSION.unpack_from(self.reader._header, VERSION_OFFSET)[0] == state.version

    def _segment(self, state: _State, segment: int) -> tuple:
        """(mapping, readable length) of `segment`: the active one only below its published end."""
        reader = self.reader
        if segment == state.active:
            mapped = reader._active
            if mapped[0] != segment:
                mapped = reader._map_active(segment)
            return mapped[1], min(state.active_end, mapped[2])
        mapped = reader._sealed(segment, state.epoch, state.version)
        return mapped[1], mapped[2]

    def _key_of(self, state: _State):
        """key_of(entry id): the key bytes, bounds-checked (for ordering equal prefixes and
        checking positions; the hottest path of min/max/above/below)."""
        locations, key_lens, _ = state.entry_views
        entries = len(locations)
        segment_of = self._segment
        mapped: dict[int, tuple] = {}  # segment -> (buffer, readable length), for this state

        def key_of(e: int) -> bytes:
            if not 0 <= e < entries:
                raise ValueError("entry id out of range")
            location = locations[e]
            found = mapped.get(location >> 32)
            if found is None:
                found = mapped[location >> 32] = segment_of(state, location >> 32)
            start = (location & 0xFFFFFFFF) + RECORD_HEADER_SIZE
            end = start + key_lens[e]
            if not location or end > found[1]:
                raise ValueError("key out of bounds")
            return found[0][start:end]

        return key_of

    def read(self, state: _State, eids, now_ms: int, published=None):
        """(keys, values, prefixes) of entries `eids` in `state`; raises ValueError on anything
        out of bounds or not intact, or a key whose prefix is not in `published` (if given)."""
        e = np.asarray(eids, dtype=np.int64)
        if not len(e):
            return NO_ITEMS
        if int(e.max()) >= len(state.locations) or int(e.min()) < 0:
            raise ValueError("entry id out of range")
        locations = state.locations[e]
        key_lens = state.key_lens[e].astype(np.int64)
        value_lens = state.value_lens[e].astype(np.int64)
        segments = (locations >> np.uint64(32)).astype(np.int64)
        offsets = (locations & np.uint64(0xFFFFFFFF)).astype(np.int64)
        ends = offsets + RECORD_HEADER_SIZE + key_lens + value_lens
        buffers = {}
        for segment, picked in by_segment(segments):
            buf, limit = self._segment(state, segment)
            if int(ends[picked].max()) > limit:
                raise ValueError("record out of bounds")
            buffers[segment] = memoryview(buf)[:limit] if limit < len(buf) else buf
        if (key_lens == 0).any() or not (locations != 0).all():
            raise ValueError("a free entry")
        return read_records(buffers, segments, offsets, key_lens, value_lens, now_ms, published)

    def window(self, cursor, inclusive: bool, bound, reverse: bool, size: int):
        """The next keys after `cursor` (see sortedkeys.window) with their values, read and
        checked at one version of the shard: (Items, more, history), or None (use the ring)."""
        for _ in range(RETRIES):
            state = self.state()
            if state is None:
                return None
            try:
                eids, published, more = window(state.runs, state.key_of, cursor, inclusive, bound, reverse, size, check=True)
                # The keys read must be those the runs place there (their prefixes), in order.
                items = self.read(state, eids, int(time.time() * 1000), published)
                ordered = check_order(items, reverse)
            except (ValueError, IndexError, KeyError, TypeError, OSError, struct.error, mmap.error):
                if self.same_version(state):
                    return None  # not a race: let the worker answer
                size = max(16, size // 4)
                continue
            if not self.same_version(state):
                size = max(16, size // 4)  # a write came meanwhile: a smaller window is likelier to fit
                continue
            if not ordered or (len(items) and not _within(items.key(0), items.key(len(items) - 1), cursor, inclusive, bound, reverse)):
                return None
            return items, more, state.history
        return None


    # -- one item (min, max, above, below) ------------------------------------------------------
    def candidates(self, state: _State, cursor, cursor_prefix, inclusive: bool, reverse: bool, out: list) -> None:
        """Append to `out`, for each level, its first live entry after `cursor` (before it, with
        `reverse`; at it too if `inclusive`; None: from the first or last) as (prefix, key or
        None, entry id, self, state). A run checked whole (check_run) is trusted as it stands:
        a bisect, no key read unless prefixes tie. In any other run the position is checked
        against the keys themselves (the entry found and the live one before it), so that
        prefixes that lie cannot hide a key. Raises ValueError."""
        key_of = state.key_of
        step = -1 if reverse else 1
        for level in state.levels:
            eids, prefixes, count, checked_as, checked = level
            if not checked:
                searches = self._searches.get(checked_as, 0) + 1
                self._searches[checked_as] = searches
                if searches >= count // CHECK_AFTER + 4 and searches > 0:
                    # Searched often enough at this content to pay for checking all of it once.
                    checked = level[4] = self.check_run(state, level)
            if cursor is None:
                position = count - 1 if reverse else 0
            else:
                position = bisect_left(prefixes, cursor_prefix, 0, count)
                if position < count and prefixes[position] == cursor_prefix:
                    # Equal prefixes: keys decide. (A checked run's order among equal prefixes
                    # was not checked: the keys on both sides of the position are, here.)
                    position = find_position(eids, prefixes, count, cursor, cursor_prefix, key_of, inclusive if reverse else not inclusive, checked)
                if reverse:
                    position -= 1
            if checked:
                if 0 <= position < count:
                    e = eids[position]
                    if e == DEAD:
                        position = _live(eids, count, position, step)
                        if not 0 <= position < count:
                            continue
                        e = eids[position]
                    out.append((prefixes[position], None, e, self, state))
                continue
            position = _live(eids, count, position, step)
            previous = _live(eids, count, position - step, -step)
            if cursor is not None and 0 <= previous < count and _after(key_of(eids[previous]), cursor, inclusive, reverse):
                raise ValueError("run out of order")
            if not 0 <= position < count:
                continue
            e = eids[position]
            key = key_of(e)
            prefix = prefixes[position]
            if key_prefix(key) != prefix or (cursor is not None and not _after(key, cursor, inclusive, reverse)):
                raise ValueError("run out of order")
            out.append((prefix, key, e, self, state))

    def check_run(self, state: _State, level: list) -> bool:
        """Check every entry of a run at once (numpy): prefixes in order, and each live entry's
        key, read from the segment files within bounds, has its prefix. True (and remembered
        for as long as the run's `rewrites` and the epoch stay) if it all holds at one version;
        a run that does not check out is searched with per-position checks from then on."""
        eids_view, prefixes_view, count, checked_as, _ = level
        try:
            eids = np.frombuffer(eids_view, dtype=np.uint32, count=count)
            prefixes = np.frombuffer(prefixes_view, dtype=np.uint64, count=count)
            ok = not (prefixes[1:] < prefixes[:-1]).any()
            for start in range(0, count, CHECK_CHUNK) if ok else ():  # bounded temporary arrays
                ok = self._keys_have_prefixes(state, eids[start : start + CHECK_CHUNK], prefixes[start : start + CHECK_CHUNK])
                if not ok:
                    break
        except (ValueError, IndexError, KeyError, TypeError, OSError, struct.error, mmap.error):
            ok = False
        if not self.same_version(state):
            return False  # read while it changed: nothing learnt
        if not ok:
            self._searches[checked_as] = -(1 << 62)  # garbage: per-position checks, no new try
            return False
        if len(self._checked) > 64:
            self._checked.clear()
        self._checked.add(checked_as)
        self._searches.pop(checked_as, None)
        if len(self._searches) > 256:
            self._searches.clear()
        return True

    def _keys_have_prefixes(self, state: _State, eids: np.ndarray, prefixes: np.ndarray) -> bool:
        """Whether each live entry of `eids` holds a key, within its segment's readable part,
        whose first 8 bytes are its entry of `prefixes`."""
        live = eids != DEAD
        entries = eids[live].astype(np.int64)
        if not len(entries):
            return True
        if int(entries.max()) >= len(state.locations):
            return False
        locations = state.locations[entries]
        key_lens = state.key_lens[entries].astype(np.int64)
        if not (locations.all() and key_lens.all()):
            return False
        segments = (locations >> np.uint64(32)).astype(np.int64)
        ends = (locations & np.uint64(0xFFFFFFFF)).astype(np.int64) + RECORD_HEADER_SIZE + key_lens
        buffers = {}
        for segment, picked in by_segment(segments):
            buf, limit = self._segment(state, segment)
            if int(ends[picked].max()) > limit:
                return False
            buffers[segment] = buf
        return bool((gather_chunks(buffers, locations, key_lens, 0) == prefixes[live]).all())

    def item(self, state: _State, e: int, key, prefix: int, cursor, inclusive: bool, reverse: bool, now_ms: int):
        """(key, value) of entry `e`, its record checked: its key `key` if known, else one of
        prefix `prefix` after `cursor`; None if it expired. Raises ValueError on anything out of
        bounds or not intact."""
        locations, key_lens, value_lens = state.entry_views
        location, key_len = locations[e], key_lens[e]
        offset = location & 0xFFFFFFFF
        end = offset + RECORD_HEADER_SIZE + key_len + value_lens[e]
        buf, limit = self._segment(state, location >> 32)
        if not location or not key_len or end > limit:
            raise ValueError("record out of bounds")
        record = buf[offset:end]
        crc, _, rtype, _, _, stored_key_len, _, _, _, expires_at = RECORD_HEADER.unpack_from(record)
        if rtype != PUT or stored_key_len != key_len or crc32c(memoryview(record)[4:]) != crc:
            raise ValueError("not an intact PUT record of the indexed lengths")
        found = record[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + key_len]
        if key is not None:
            if found != key:
                raise ValueError("the entry changed")
        elif key_prefix(found) != prefix or (cursor is not None and not _after(found, cursor, inclusive, reverse)):
            raise ValueError("run out of order")
        if expires_at and expires_at <= now_ms:
            return None
        return found, record[RECORD_HEADER_SIZE + key_len :]


def _live(eids, count: int, position: int, step: int) -> int:
    """The nearest position from `position` on (going by `step`) that is no tombstone; out of
    [0, count) if there is none."""
    for _ in range(64):
        if not 0 <= position < count or eids[position] != DEAD:
            return position
        position += step
    raise ValueError("too many tombstones in a row")  # rare: the general path copes


def _after(key: bytes, cursor: bytes, inclusive: bool, reverse: bool) -> bool:
    """Whether `key` comes after `cursor` in scan order (or is it, with `inclusive`)."""
    if reverse:
        return key < cursor or (inclusive and key == cursor)
    return key > cursor or (inclusive and key == cursor)


def _best(found: list, reverse: bool) -> tuple:
    """The candidate (see ViewReader.candidates) that comes first in scan order: by prefix,
    by key where prefixes are equal (read now if not yet)."""
    best = found[0]
    for other in found[1:]:
        if other[0] != best[0]:
            if (other[0] > best[0]) if reverse else (other[0] < best[0]):
                best = other
            continue
        key = other[1] if other[1] is not None else other[4].key_of(other[2])
        best_key = best[1] if best[1] is not None else best[4].key_of(best[2])
        if key == best_key:
            raise ValueError("one key in two places")
        best = (best[0], best_key, best[2], best[3], best[4])
        if (key > best_key) if reverse else (key < best_key):
            best = (other[0], key, other[2], other[3], other[4])
    return best


def first(readers: list, control, start, stop, reverse: bool):
    """(key, value) of the smallest key in [start, stop) (the largest, with `reverse`), None if
    there is none, or FALLBACK (the general scan answers): min, max, above and below. Every
    shard is read at one version each, inside one stretch of no cross-shard commit phase."""
    cursor, inclusive, bound = (stop, False, start) if reverse else (start, True, stop)
    cursor_prefix = None if cursor is None else key_prefix(cursor)
    for _ in range(RETRIES):
        finished = control.commits_finished  # read before started (docs/TRANSACTIONS.md)
        started = control.commits_started
        if started != finished:
            return FALLBACK  # a commit phase runs: the general path waits for it
        states = []
        found = []
        try:
            for reader in readers:
                state = reader.state()
                if state is None:
                    return FALLBACK
                states.append((reader, state))
                reader.candidates(state, cursor, cursor_prefix, inclusive, reverse, found)
            item = None
            if found:
                prefix, key, e, reader, state = _best(found, reverse)
                item = reader.item(state, e, key, prefix, cursor, inclusive, reverse, int(time.time() * 1000))
                if item is None:
                    return FALLBACK  # expired, not yet purged: the general path skips it
                if bound is not None and ((item[0] < bound) if reverse else (item[0] >= bound)):
                    item = None  # the first key of all lies past the bound: none in range
        except (ValueError, IndexError, KeyError, TypeError, OSError, struct.error):
            if all(reader.same_version(state) for reader, state in states):
                return FALLBACK
            continue
        if all(reader.same_version(state) for reader, state in states) and control.commits_started == started:
            return item
    return FALLBACK


FALLBACK = object()


def _within(first: bytes, last: bytes, cursor, inclusive: bool, bound, reverse: bool) -> bool:
    """Whether keys from `first` to `last` lie in the range a window was asked for."""
    if not reverse:
        after = cursor is None or (first >= cursor if inclusive else first > cursor)
        return after and (bound is None or last < bound)
    before = cursor is None or (first <= cursor if inclusive else first < cursor)
    return before and (bound is None or last >= bound)


# -- a scan over every shard ---------------------------------------------------------------------------
class _Shard:
    __slots__ = ("cursor", "inclusive", "items", "taken", "more", "size", "batches", "direct")

    def __init__(self, cursor, inclusive: bool, size: int, direct: bool):
        self.cursor, self.inclusive = cursor, inclusive  # where the next window starts
        self.items, self.taken = NO_ITEMS, 0  # read, and how many of them were handed out
        self.more = True
        self.size = size
        self.batches = None  # the shard's batch count when its first window was read
        self.direct = direct


class Restart(Exception):
    """The scan must start again from its beginning (it has returned nothing yet)."""


class OrderedScan:
    """One scan over all shards, without I/O of its own: `next_items()` returns the next items
    in order, [] when done, or raises NeedPage (the caller fetches a SCAN page through the ring
    and hands it to `add_page`) or Restart. `snapshot` is the client's _Snapshot (commit phases
    of cross-shard batches); single-shard batches are checked here through each shard's batch
    history (docs/TRANSACTIONS.md, "Isolation")."""

    def __init__(self, readers, shards: int, start, stop, reverse: bool, prefix, limit, snapshot):
        start, stop = scan_bounds(start, stop, prefix)
        self.readers = readers  # ViewReader per shard, or None: every page through the ring
        self.shards, self.reverse, self.limit, self.snapshot = shards, reverse, limit, snapshot
        self.start, self.stop = start, stop
        self.bound = start if reverse else stop
        self.produced = 0
        self.empty = start is not None and stop is not None and start >= stop
        self.reset()

    def reset(self) -> None:
        """Back to the beginning (after a Restart)."""
        first = FIRST_WINDOW if self.limit is None else max(1, min(FIRST_WINDOW, self.limit))
        cursor = self.stop if self.reverse else self.start
        self.state = [_Shard(cursor, not self.reverse, first, self.readers is not None) for _ in range(self.shards)]

    # -- filling ----------------------------------------------------------------------------
    def fill(self, s: int) -> tuple[int, bytes] | None:
        """Read shard `s`'s next window directly; or return (shard, SCAN message) to be fetched."""
        shard = self.state[s]
        if shard.direct:
            self.snapshot.fetching(True)
            try:
                found = self.readers[s].window(shard.cursor, shard.inclusive, self.bound, self.reverse, shard.size)
            finally:
                self.snapshot.fetching(False)
            if found is not None:
                self._accept(s, *found)
                return None
        return s, self._page_request(shard)

    def _page_request(self, shard: _Shard) -> bytes:
        page = PAGE if self.limit is None else max(1, min(PAGE, self.limit - self.produced))
        if not self.reverse:
            start = shard.cursor if shard.cursor is None or shard.inclusive else shard.cursor + b"\0"
            return m.encode_scan(start, self.stop, False, None, page)
        stop = shard.cursor if shard.cursor is None or not shard.inclusive else shard.cursor + b"\0"
        return m.encode_scan(self.start, stop, True, None, page)

    def add_page(self, s: int, body) -> None:
        """A SCAN page of shard `s` fetched through the ring."""
        items, more, history = m.decode_scan_page(body)
        keys = [k for k, _ in items]
        self._accept(s, Items(keys, [v for _, v in items], key_prefixes(keys)), more and bool(items), history)

    def _accept(self, s: int, items: Items, more: bool, history) -> None:
        shard = self.state[s]
        if not self.snapshot.still_valid():
            self._moved("a cross-shard batch committed while this scan was running (for longer than the coordinator waits for scans)")
        if history is not None:
            self._check_batches(shard, history)
        shard.items, shard.taken = items, 0
        shard.more = more
        if len(items):
            shard.cursor, shard.inclusive = items.key(len(items) - 1), False
        shard.size = min(shard.size * 4, MAX_WINDOW)

    def _check_batches(self, shard: _Shard, history) -> None:
        """A single-shard batch applied between two windows of this shard must lie wholly on one
        side of what the scan has read of it; else the scan would show part of it."""
        batches, ring = history
        if shard.batches is None or batches == shard.batches:
            shard.batches = batches
            return
        if batches < shard.batches or batches - shard.batches > BATCH_RING:
            self._moved("batches were applied on a shard while this scan was reading it")
        position = key_prefix(shard.cursor) if shard.cursor is not None else None
        for batch in range(shard.batches + 1, batches + 1):
            number, first, last = ring[batch % BATCH_RING]
            if number != batch:
                self._moved("batches were applied on a shard while this scan was reading it")
            if position is None:
                continue
            ahead = last < position if self.reverse else first > position
            behind = first > position if self.reverse else last < position
            if not (ahead or behind):
                self._moved("a batch was applied across the position of this scan")
        shard.batches = batches

    def _moved(self, why: str):
        if self.snapshot.yielded:
            raise Unavailable(f"{why}; start the scan again")
        raise Restart(why)

    # -- merging ------------------------------------------------------------------------------
    def next_items(self) -> tuple[list, list]:
        """The next keys and their values in order (empty once the scan is done); raises
        NeedPage or Restart. (Lists, not (key, value) tuples: a caller that zips them makes no
        tuple per item - zip reuses one - and so no work for the garbage collector.)"""
        if self.empty or (self.limit is not None and self.produced >= self.limit):
            return [], []
        while True:
            for s, shard in enumerate(self.state):
                if shard.taken >= len(shard.items) and shard.more:
                    request = self.fill(s)
                    if request is not None:
                        raise NeedPage(*request)
            keys, values = self._merge()
            if keys or not any(shard.more for shard in self.state):
                if self.limit is not None and self.produced + len(keys) > self.limit:
                    keys, values = keys[: self.limit - self.produced], values[: self.limit - self.produced]
                self.produced += len(keys)
                return keys, values

    def _merge(self) -> tuple[list, list]:
        """Every buffered item up to the nearest last key of a shard that has more, in order."""
        reverse = self.reverse
        edge = None
        for shard in self.state:
            if shard.more and len(shard.items):
                last = shard.items.key(len(shard.items) - 1)
                if edge is None or (last > edge if reverse else last < edge):
                    edge = last
        parts = []
        for shard in self.state:
            items, taken = shard.items, shard.taken
            if taken >= len(items):
                continue
            end = len(items) if edge is None else _upto(items, taken, edge, reverse)
            if end > taken:
                parts.append(items.part(taken, end))
                shard.taken = end
        if not parts:
            return [], []
        if len(parts) == 1:
            return parts[0].lists()
        prefixes = np.concatenate([part.prefixes for part in parts])
        order = np.argsort(~prefixes if reverse else prefixes, kind="stable")  # merges the shards' runs
        ordered = prefixes[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(same):
            order = _order_equal_prefixes(parts, order, same.tolist(), reverse)
        kinds = {(part.keys.dtype, None if part.values is None else part.values.dtype) if part.columns else None for part in parts}
        if len(kinds) == 1 and None not in kinds:
            # One key length, one value length: reorder the columns, then make bytes objects.
            keys = np.concatenate([part.keys for part in parts])[order].tolist()
            if parts[0].values is None:
                return keys, [b""] * len(keys)
            return keys, np.concatenate([part.values for part in parts])[order].tolist()
        keys, values = [], []
        for part in parts:
            part_keys, part_values = part.lists()
            keys += part_keys
            values += part_values
        order = order.tolist()
        return list(map(keys.__getitem__, order)), list(map(values.__getitem__, order))


def _upto(items: Items, start: int, edge: bytes, reverse: bool) -> int:
    """The end of the items from `start` on that are at or before `edge` in scan order."""
    prefixes, edge_prefix = items.prefixes[start:], np.uint64(key_prefix(edge))
    if not reverse:
        end = start + int(np.searchsorted(prefixes, edge_prefix, side="right"))
        while end > start and items.prefixes[end - 1] == edge_prefix and items.key(end - 1) > edge:
            end -= 1
    else:
        end = start + int(np.searchsorted(~prefixes, ~edge_prefix, side="right"))
        while end > start and items.prefixes[end - 1] == edge_prefix and items.key(end - 1) < edge:
            end -= 1
    return end


def _order_equal_prefixes(parts: list, order: np.ndarray, same: list, reverse: bool) -> np.ndarray:
    """`order` with each run of equal prefixes (positions `same` and the next) put in key order."""
    keys = []
    for part in parts:
        keys += part.lists()[0]
    order = order.tolist()
    i = 0
    while i < len(same):
        j = i
        while j + 1 < len(same) and same[j + 1] == same[j] + 1:
            j += 1
        lo, hi = same[i], same[j] + 2
        order[lo:hi] = sorted(order[lo:hi], key=keys.__getitem__, reverse=reverse)
        i = j + 1
    return np.array(order, dtype=np.int64)


class NeedPage(Exception):
    """OrderedScan needs SCAN page `message` of shard `shard` fetched through the ring."""

    def __init__(self, shard: int, message: bytes):
        super().__init__(shard)
        self.shard, self.message = shard, message


# -- drivers --------------------------------------------------------------------------------------
def view_readers(client) -> list | None:
    """The client's ViewReader per shard (made on first use), or None without direct reads."""
    readers = client._index_readers
    if readers is None:
        return None
    views = getattr(client, "_view_readers", None)
    if views is None or views[0].reader is not readers[0]:
        views = [ViewReader(reader) for reader in readers]
        client._view_readers = views
    return views


def seek(client, start, stop, reverse: bool):
    """Client.min/max/above/below: (key, value) of the first key in [start, stop) (the last,
    with `reverse`), or None; read directly when possible (`first`), else by a scan."""
    found = first_direct(client, start, stop, reverse)
    if found is not FALLBACK:
        return found
    return next(_scan(client, start, stop, reverse, None, 1), None)


def first_direct(client, start, stop, reverse: bool):
    """`first` through `client`'s view readers (a Client; an AsyncClient's first one), or
    FALLBACK without direct reads."""
    readers = view_readers(client)
    return FALLBACK if readers is None else first(readers, client._control, start, stop, reverse)


def scan(client, start, stop, reverse: bool, prefix, limit):
    """Client._scan: (key, value) in key order across all shards (docs/TRANSACTIONS.md)."""
    if limit == 1 and view_readers(client) is not None:
        return _first_or_scan(client, start, stop, reverse, prefix)
    return _scan(client, start, stop, reverse, prefix, limit)  # (no generator in between)


def _first_or_scan(client, start, stop, reverse: bool, prefix):
    found = first(view_readers(client), client._control, *scan_bounds(start, stop, prefix), reverse)
    if found is FALLBACK:
        yield from _scan(client, start, stop, reverse, prefix, 1)
    elif found is not None:
        yield found


class ScanIterator:
    """What `scan` returns: the items of a generator of windows, chained in C by itertools
    (no Python generator resumed per item: about 25 ns an item less), with `close()` ending
    the scan and its snapshot as closing a generator does."""

    __slots__ = ("_windows", "_items")

    def __init__(self, windows):
        self._windows = windows
        self._items = chain.from_iterable(windows)

    def __iter__(self):
        return self._items  # a for loop runs on the chain itself

    def __next__(self):
        return next(self._items)

    def close(self) -> None:
        """End the scan now (its snapshot is released)."""
        self._windows.close()


def _scan(client, start, stop, reverse: bool, prefix, limit) -> ScanIterator:
    """The general path of `scan`: windows read directly or fetched as SCAN pages, merged."""
    return ScanIterator(_windows(client, start, stop, reverse, prefix, limit))


def _windows(client, start, stop, reverse: bool, prefix, limit):
    """The merged windows of a scan, each an iterator of (key, value)."""
    with client._snapshot() as snapshot:
        scan = OrderedScan(view_readers(client), client.shards, start, stop, reverse, prefix, limit, snapshot)
        restarts = 0
        while True:
            try:
                items = scan.next_items()
            except NeedPage as need:
                snapshot.fetching(True)
                try:
                    _, body = client._call(need.shard, need.message, read=True)
                finally:
                    snapshot.fetching(False)
                try:
                    scan.add_page(need.shard, body)
                except Restart:
                    restarts = _restart(scan, snapshot, restarts)
                continue
            except Restart:
                restarts = _restart(scan, snapshot, restarts)
                continue
            if not items[0]:
                return
            snapshot.yielded = True
            yield zip(*items)


def _restart(scan: OrderedScan, snapshot, restarts: int) -> int:
    if restarts >= MAX_RESTARTS:
        raise Unavailable("batches kept landing across this scan before it could return anything; start the scan again")
    snapshot.restart()
    scan.reset()
    return restarts + 1


async def ascan(aclient, start, stop, reverse: bool, prefix, limit, snapshot):
    """AsyncClient._scan: the same, pages through the ring awaited (the caller holds `snapshot`)."""
    scan = OrderedScan(view_readers(aclient._clients[0]), aclient.shards, start, stop, reverse, prefix, limit, snapshot)
    restarts = 0
    while True:
        try:
            items = scan.next_items()
        except NeedPage as need:
            snapshot.fetching(True)
            try:
                _, body = await aclient._call(need.shard, need.message, read=True)
            finally:
                snapshot.fetching(False)
            try:
                scan.add_page(need.shard, body)
            except Restart:
                restarts = await _arestart(scan, snapshot, restarts)
            continue
        except Restart:
            restarts = await _arestart(scan, snapshot, restarts)
            continue
        if not items[0]:
            return
        snapshot.yielded = True
        for item in zip(*items):
            yield item


async def _arestart(scan: OrderedScan, snapshot, restarts: int) -> int:
    if restarts >= MAX_RESTARTS:
        raise Unavailable("batches kept landing across this scan before it could return anything; start the scan again")
    await snapshot.arestart()
    scan.reset()
    return restarts + 1
