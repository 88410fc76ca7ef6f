"""The hash index of a shard: key -> location of its newest record, in fixed-size entries.

Entries live in parallel numpy arrays (28 bytes each), so that a later step can place them in
shared memory. A slot table (uint32 entry id + 1; 0 = empty) is probed linearly from the key's
home slot without wrapping around: the table has an overflow tail and its last slot is always
empty, which ends every probe. Deletion shifts later entries back (no tombstones).

Keys are not kept in memory: a candidate entry is confirmed by reading its key from the log
through the `key_at(location, key_len)` callable the owner supplies.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from shardkv.ipc.sharedindex import PrivateTables
from shardkv.ipc.probe import GOLDEN32
MAX_LOAD = 0.5  # linear probing: ~2.5 probes to learn a key is absent (6 at 0.7), for ~2 more bytes of slots a key
MIN_BITS = 10
OVERFLOW = 64
VECTOR_MIN = 64  # upsert_many places a batch's new keys with numpy from this size
PROBE_WINDOW = 8  # slots read at once per key by that placement (fewer than OVERFLOW)
_PROBE_OFFSETS = np.arange(PROBE_WINDOW, dtype=np.int64)

KeyAt = Callable[[int, int], bytes]
ENTRY_ARRAYS = ("locations", "hashes", "key_lens", "value_lens", "seqs")


def make_location(segment: int, offset: int) -> int:
    """Pack a segment number and an offset into one nonzero 64-bit location."""
    return (segment << 32) | offset


class KeyIndex:
    """Open-addressing hash index with fixed-size entries (see module docstring)."""

    def __init__(self, key_at: KeyAt, expected: int = 0, tables=None):
        self._key_at = key_at
        # Where the arrays live: private memory, or shared memory that clients read
        # (shardkv/ipc/sharedindex.py). Every resize allocates a whole new table and installs it.
        self._tables = tables if tables is not None else PrivateTables()
        self.count = 0
        self.last_entry = -1  # the entry id given to the most recent new key
        self._free: list[int] = []
        self._high = 0  # entry ids below this have been handed out at some time
        bits = MIN_BITS
        while (1 << bits) * MAX_LOAD < expected:
            bits += 1
        self._install(bits, self._tables.allocate(bits, (1 << bits) + OVERFLOW, max(1024, expected)))

    # -- storage ---------------------------------------------------------------------------
    def _install(self, bits: int, arrays: dict) -> None:
        """Use `arrays` (filled) from now on."""
        self._bits = bits
        self._shift = 32 - bits
        self.slots = arrays["slots"]
        self.locations = arrays["locations"]  # 0 = free entry
        self.hashes = arrays["hashes"]
        self.key_lens = arrays["key_lens"]
        self.value_lens = arrays["value_lens"]
        self.seqs = arrays["seqs"]
        # memoryview item access is ~3x faster than numpy scalar indexing on the hot path.
        self._slot_v = memoryview(self.slots)
        self._loc_v = memoryview(self.locations)
        self._hash_v = memoryview(self.hashes)
        self._klen_v = memoryview(self.key_lens)
        self._vlen_v = memoryview(self.value_lens)
        self._seq_v = memoryview(self.seqs)
        # What a probe reads (ipc/probe.py), swapped in one assignment for lock-free readers.
        self.table = (self._shift, self._slot_v, self._hash_v, self._klen_v, self._loc_v, self._vlen_v)
        self._tables.install(arrays)

    def _entry_arrays(self) -> tuple:
        return (self.locations, self.hashes, self.key_lens, self.value_lens, self.seqs)

    def _grow_entries(self) -> None:
        arrays = self._tables.allocate(self._bits, len(self.slots), len(self.locations) * 3 // 2 + 1024)
        arrays["slots"][:] = self.slots
        for name, previous in zip(ENTRY_ARRAYS, self._entry_arrays()):
            arrays[name][: len(previous)] = previous
        self._install(self._bits, arrays)

    @property
    def nbytes(self) -> int:
        """Bytes of memory held by the slot table and the entry arrays."""
        return self.slots.nbytes + sum(a.nbytes for a in (self.locations, self.hashes, self.key_lens, self.value_lens, self.seqs))

    def home(self, h: int) -> int:
        """The home slot of hash `h`."""
        return ((h * GOLDEN32) & 0xFFFFFFFF) >> self._shift

    # -- lookups ---------------------------------------------------------------------------
    def find(self, key: bytes, h: int) -> int:
        """Return the entry id of `key` (whose CRC-32C is `h`), or -1."""
        slots, hashes = self._slot_v, self._hash_v
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> self._shift
        while True:
            s = slots[i]
            if not s:
                return -1
            e = s - 1
            if hashes[e] == h and self._key_at(self._loc_v[e], self._klen_v[e]) == key:
                return e
            i += 1

    def entry(self, e: int) -> tuple[int, int, int, int]:
        """(location, key_len, value_len, seq) of entry `e`."""
        return self._loc_v[e], self._klen_v[e], self._vlen_v[e], self._seq_v[e]

    # -- updates ---------------------------------------------------------------------------
    def upsert(self, key: bytes, h: int, location: int, key_len: int, value_len: int, seq: int) -> bool:
        """Point `key` at a new record; return True if the key was not in the index before."""
        slots, hashes = self._slot_v, self._hash_v
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> self._shift
        while True:
            s = slots[i]
            if not s:
                break
            e = s - 1
            if hashes[e] == h and self._key_at(self._loc_v[e], self._klen_v[e]) == key:
                self._loc_v[e] = location
                self._vlen_v[e] = value_len
                self._seq_v[e] = seq
                return False
            i += 1
        if i >= len(slots) - 1 or self.count + 1 > MAX_LOAD * (1 << self._bits):
            self._rebuild(self._bits + (self.count + 1 > MAX_LOAD * (1 << self._bits)))
            return self._insert_new(h, location, key_len, value_len, seq)
        e = self._new_entry(h, location, key_len, value_len, seq)
        self._slot_v[i] = e + 1
        return True

    def upsert_many(self, keys, hashes, locations, key_lens, value_lens, seq: int) -> list:
        """`upsert` of many keys of one batch (later ones win); returns (key, entry id) of
        each key that was not in the index before. Room for every key is made once, up front,
        and the probe and entry writes are inlined: this is the indexing of a batch append."""
        n = len(keys)
        bits = self._bits
        while (self.count + n) > MAX_LOAD * (1 << bits):
            bits += 1
        if bits != self._bits:
            self._rebuild(bits)
        if self._high + n - len(self._free) > len(self.locations):
            self._grow_entries_to(self._high + n)
        added = []
        if n >= VECTOR_MIN:
            added, rest = self._place_new_keys(keys, hashes, locations, key_lens, value_lens, seq)
            if added:  # the loop below takes the others, in their order
                keys, hashes, locations = list(map(keys.__getitem__, rest)), list(map(hashes.__getitem__, rest)), list(map(locations.__getitem__, rest))
                key_lens, value_lens = list(map(key_lens.__getitem__, rest)), list(map(value_lens.__getitem__, rest))
        slots, hash_v, loc_v, klen_v, vlen_v, seq_v = self._slot_v, self._hash_v, self._loc_v, self._klen_v, self._vlen_v, self._seq_v
        key_at, free, last = self._key_at, self._free, len(slots) - 1
        shift = self._shift
        for key, h, location, key_len, value_len in zip(keys, hashes, locations, key_lens, value_lens):
            i = ((h * GOLDEN32) & 0xFFFFFFFF) >> shift
            while True:
                s = slots[i]
                if not s:
                    break
                e = s - 1
                if hash_v[e] == h and klen_v[e] == key_len and key_at(loc_v[e], key_len) == key:
                    loc_v[e] = location
                    vlen_v[e] = value_len
                    seq_v[e] = seq
                    break
                i += 1
            if s:
                continue  # an existing key, updated
            if i >= last:  # ran into the end of the overflow tail: the general path rebuilds
                if self.upsert(key, h, location, key_len, value_len, seq):
                    added.append((key, self.last_entry))
                slots, hash_v, loc_v, klen_v, vlen_v, seq_v = self._slot_v, self._hash_v, self._loc_v, self._klen_v, self._vlen_v, self._seq_v
                last, shift = len(slots) - 1, self._shift
                continue
            if free:
                e = free.pop()
            else:
                e = self._high
                self._high = e + 1
            hash_v[e] = h
            klen_v[e] = key_len
            vlen_v[e] = value_len
            seq_v[e] = seq
            loc_v[e] = location
            slots[i] = e + 1
            self.count += 1
            added.append((key, e))
        if added:
            self.last_entry = added[-1][1]
        return added

    def _place_new_keys(self, keys, hashes, locations, key_lens, value_lens, seq: int) -> tuple[list, list]:
        """upsert_many's first pass, vectorised. A key whose probe reaches an empty slot before
        any entry with its hash is not in the index, and linear probing would put it in that
        slot: its home slot if empty, else the first empty one of the next PROBE_WINDOW slots,
        read at once. Keys that picked the same slot leave it to the first of them in the batch
        (so a key repeated in the batch, or two keys with one hash, reach the loop but once).
        Filling empty slots keeps every other key reachable, so all the placements hold
        together. Returns (key, entry id) of the keys placed, and the positions in the batch of
        the others (for the loop, in order)."""
        n = len(keys)
        h = np.asarray(hashes, dtype=np.uint64)
        home = _homes(h, self._bits)
        slot = home.copy()
        placeable = np.ones(n, dtype=bool)
        busy = np.flatnonzero(self.slots[home])  # home taken: look further (about a third of the keys)
        if len(busy):
            window = self.slots[home[busy, None] + _PROBE_OFFSETS]  # the slot array ends in OVERFLOW spare slots
            empty = window == 0
            first_empty = empty.argmax(axis=1)
            rows, columns = np.nonzero(_PROBE_OFFSETS < first_empty[:, None])  # the occupied slots probed
            same_hash = self.hashes[window[rows, columns].astype(np.int64) - 1] == h[busy[rows]]
            unsure = ~empty.any(axis=1)
            unsure[rows[same_hash]] = True  # maybe this very key: the loop compares keys
            slot[busy] += first_empty
            placeable[busy[unsure]] = False
        candidates = np.flatnonzero(placeable)
        _, first = np.unique(slot[candidates], return_index=True)
        chosen = np.sort(candidates[first])
        m = len(chosen)
        if not m:
            return [], range(n)
        reuse = self._free[len(self._free) - min(m, len(self._free)) :]
        del self._free[len(self._free) - len(reuse) :]
        ids = np.empty(m, dtype=np.int64)
        ids[: len(reuse)] = reuse
        ids[len(reuse) :] = np.arange(self._high, self._high + m - len(reuse))
        self._high += m - len(reuse)
        self.hashes[ids] = h[chosen]
        self.key_lens[ids] = _column(key_lens, chosen)
        self.value_lens[ids] = _column(value_lens, chosen)
        self.seqs[ids] = seq
        self.locations[ids] = np.asarray(locations, dtype=np.uint64)[chosen]
        self.slots[slot[chosen]] = ids + 1
        self.count += m
        placed = np.zeros(n, dtype=bool)
        placed[chosen] = True
        return list(zip(map(keys.__getitem__, chosen.tolist()), ids.tolist())), np.flatnonzero(~placed).tolist()

    def _grow_entries_to(self, n: int) -> None:
        while len(self.locations) < n:
            self._grow_entries()

    def _insert_new(self, h: int, location: int, key_len: int, value_len: int, seq: int) -> bool:
        slots = self._slot_v
        i = self.home(h)
        while slots[i]:
            i += 1
        if i >= len(slots) - 1:
            self._rebuild(self._bits)
            return self._insert_new(h, location, key_len, value_len, seq)
        e = self._new_entry(h, location, key_len, value_len, seq)
        self._slot_v[i] = e + 1  # not `slots`: making the entry may have installed a grown table
        return True

    def _new_entry(self, h: int, location: int, key_len: int, value_len: int, seq: int) -> int:
        if self._free:
            e = self._free.pop()
        else:
            if self._high == len(self.locations):
                self._grow_entries()
            e = self._high
            self._high += 1
        self._hash_v[e] = h
        self._klen_v[e] = key_len
        self._vlen_v[e] = value_len
        self._seq_v[e] = seq
        self._loc_v[e] = location
        self.count += 1
        self.last_entry = e
        return e

    def remove(self, key: bytes, h: int) -> bool:
        """Remove `key`; return True if it was present."""
        slots, hashes = self._slot_v, self._hash_v
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> self._shift
        while True:
            s = slots[i]
            if not s:
                return False
            e = s - 1
            if hashes[e] == h and self._key_at(self._loc_v[e], self._klen_v[e]) == key:
                break
            i += 1
        self._loc_v[e] = 0
        self._free.append(e)
        self.count -= 1
        # Backward-shift deletion: move later members of the probe run into the hole.
        j = i
        while True:
            j += 1
            s = slots[j]
            if not s:
                break
            if self.home(hashes[s - 1]) <= i:
                slots[i] = s
                i = j
        slots[i] = 0
        return True

    def relocate(self, ids: np.ndarray, old_locations: np.ndarray, new_locations: np.ndarray) -> int:
        """Move entries that still point at `old_locations` to `new_locations` (compaction swap).

        An entry that changed meanwhile (overwritten, deleted, reused) keeps its newer location.
        Returns how many entries moved.
        """
        still = self.locations[ids] == old_locations
        self.locations[ids[still]] = new_locations[still]
        return int(still.sum())

    # -- bulk ------------------------------------------------------------------------------
    def load(self, hashes, locations, key_lens, value_lens, seqs) -> None:
        """Replace the contents with these entries (one per distinct key), placed vectorised."""
        n = len(hashes)
        bits = MIN_BITS
        while (1 << bits) * MAX_LOAD < n:
            bits += 1
        live = np.arange(n, dtype=np.int64)
        length, positions, order = _placement(np.asarray(hashes, dtype=np.uint32), live, bits)
        arrays = self._tables.allocate(bits, length, max(1024, n + n // 8))
        for name, values in zip(ENTRY_ARRAYS, (locations, hashes, key_lens, value_lens, seqs)):
            arrays[name][:n] = values
        arrays["slots"][positions] = (live[order] + 1).astype(np.uint32)
        self._high = n
        self._free = []
        self.count = n
        self._install(bits, arrays)

    def _rebuild(self, bits: int) -> None:
        """Place every live entry into a fresh slot table of 2**bits home slots."""
        live = np.flatnonzero(self.locations[: self._high])
        length, positions, order = _placement(self.hashes[live], live, bits)
        arrays = self._tables.allocate(bits, length, len(self.locations))
        for name, previous in zip(ENTRY_ARRAYS, self._entry_arrays()):
            arrays[name][:] = previous
        arrays["slots"][positions] = (live[order] + 1).astype(np.uint32)
        self._install(bits, arrays)

    def live_ids(self) -> np.ndarray:
        """Entry ids in use."""
        return np.flatnonzero(self.locations[: self._high])

    def quick_problem(self) -> str | None:
        """A cheap look (a few numpy passes, no log read) for states an intact table never has,
        such as another process's stray writes leave: what is wrong, or None. Entries that
        merely point at the wrong record pass it; compaction compares every entry with the log."""
        high = self._high
        used = int(np.count_nonzero(self.locations[:high]))
        if used != self.count:
            return f"{used} entries in use for {self.count} keys"
        slots = self.slots
        occupied = int(np.count_nonzero(slots))
        if occupied != self.count:
            return f"{occupied} slots in use for {self.count} keys"
        if slots[-1] or (occupied and int(slots.max()) > high):
            return "slots name entries that do not exist"
        return None

    def snapshot(self) -> "IndexSnapshot":
        """A private copy of the table as it is now (the caller holds the owner's lock)."""
        return IndexSnapshot(self)


class IndexSnapshot:
    """A private copy of a KeyIndex's table, taken at one instant: compaction compares it with
    what the log says is live after releasing the engine's lock. The table itself may be in
    shared memory, where any process of the same user can write: nothing read from it decides
    what is kept (docs/RELIABILITY.md, "Garbage in the shared index")."""

    def __init__(self, index: KeyIndex):
        high = index._high  # private state of the owner: entries at or past it were never used
        self.bits = index._bits
        self.count = index.count
        self.slots = index.slots.copy()
        self.locations = index.locations[:high].copy()
        self.hashes = index.hashes[:high].copy()
        self.key_lens = index.key_lens[:high].copy()
        self.value_lens = index.value_lens[:high].copy()
        self.seqs = index.seqs[:high].copy()

    def live_ids(self) -> np.ndarray:
        """Entry ids in use (nonzero location)."""
        return np.flatnonzero(self.locations)

    def disagreement(self, live: tuple) -> str | None:
        """Why this table is not an index of exactly `live` - (hashes, locations, key_lens,
        value_lens, seqs) of one record per key, as KeyIndex.load takes them - or None if it
        is: one entry per live record with the same fields, no other entry in use, and each
        entry in one slot from which a probe of its hash reaches it. Vectorised: O(slots)."""
        hashes, locations, key_lens, value_lens, seqs = live
        ids = self.live_ids()
        if len(ids) != self.count:
            return f"{len(ids)} entries in use for {self.count} keys"
        if len(ids) != len(locations):
            return f"{len(ids)} entries in use, the log has {len(locations)} live keys"
        ids = ids[np.argsort(self.locations[ids], kind="stable")]
        order = np.argsort(locations, kind="stable")
        for name, mine, theirs in (
            ("locations", self.locations, locations),
            ("hashes", self.hashes, hashes),
            ("key lengths", self.key_lens, key_lens),
            ("value lengths", self.value_lens, value_lens),
            ("seqs", self.seqs, seqs),
        ):
            wrong = int(np.count_nonzero(mine[ids] != np.asarray(theirs)[order]))
            if wrong:
                return f"{wrong} entries disagree with the log on their {name}"
        slots = self.slots
        if slots[-1]:
            return "the last slot, which ends every probe, is in use"
        positions = np.flatnonzero(slots)
        entries = slots[positions].astype(np.int64) - 1
        if len(positions) != len(ids):
            return f"{len(positions)} slots in use for {len(ids)} entries"
        if np.any(entries >= len(self.locations)) or not np.array_equal(np.sort(entries), np.sort(ids)):
            return "the slots do not name each entry in use exactly once"
        homes = _homes(self.hashes[entries], self.bits)
        if np.any(homes > positions):
            return "entries sit before their home slot"
        empty = slots == 0
        empty_before = np.cumsum(empty) - empty  # empty slots below each position
        if np.any(empty_before[positions] != empty_before[homes]):
            return "entries are cut off from their home slot by an empty slot"
        return None


def _placement(hashes: np.ndarray, live: np.ndarray, bits: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Where linear probing puts entries `live` (with these hashes) in a table of 2**bits home
    slots: (slot array length, positions, order) - entry live[order[k]] goes to positions[k]."""
    home = _homes(hashes, bits)
    order = np.argsort(home, kind="stable")
    ranks = np.arange(len(live), dtype=np.int64)
    # Linear probing without wrap-around, in closed form: in home order, each entry lands at
    # max(its home, previous position + 1).
    positions = np.maximum.accumulate(home[order] - ranks) + ranks if len(live) else ranks
    length = max((1 << bits) + OVERFLOW, (int(positions[-1]) if len(live) else 0) + OVERFLOW)
    return length, positions, order


def _homes(hashes: np.ndarray, bits: int) -> np.ndarray:
    """`KeyIndex.home` of each hash, for a table of 2**bits home slots (int64)."""
    return (((hashes.astype(np.uint64) * GOLDEN32) & 0xFFFFFFFF) >> (32 - bits)).astype(np.int64)


def _column(values, chosen: np.ndarray):
    """values[chosen] as numpy, or the one value when a list holds only that (a batch of
    same-size records: cheaper to check than to convert)."""
    if type(values) is list and values and values.count(values[0]) == len(values):
        return values[0]
    return np.asarray(values)[chosen]
