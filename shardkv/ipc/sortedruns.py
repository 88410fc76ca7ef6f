"""Sorted runs of index entries, and how to find a key and a window of keys in them: shared by
the worker's ordered view (shards/sortedkeys.py, which keeps the runs) and the client's reader of
it in shared memory (shardkv/ipc/sortedview.py, docs/IPC.md "Ordered view"), so that the reader
does not import the worker's package.

A run is an array of index entry ids (uint32; DEAD for a removed key) beside an array of the
keys' first 8 bytes (big-endian uint64, zero-padded: the "prefix", `key_prefix`), in key order.
Equal prefixes are told apart by the keys themselves, read from the log (`key_of`,
`gather_chunks`). Pure functions of their arguments: no state, no lock, no shared memory of
their own.
"""

from __future__ import annotations

import bisect
from typing import Callable

import numpy as np

from shardkv.wal.format import RECORD_HEADER_SIZE

DEAD = 0xFFFFFFFF  # a run slot whose key was removed (a tombstone)
LEVELS = 6  # runs of a shard's ordered view (level 0 changes in place; see shards/sortedkeys.py)
_BYTES8 = np.arange(8, dtype=np.int64)
_EMPTY_EIDS = np.zeros(0, dtype=np.int64)
_EMPTY_PREFIXES = np.zeros(0, dtype=np.uint64)


# -- keys and their prefixes -------------------------------------------------------------------------
def key_prefix(key: bytes) -> int:
    """The first 8 bytes of `key` as a big-endian number, zero-padded: ordering prefixes orders
    keys, except that equal prefixes say nothing."""
    return int.from_bytes(key[:8], "big") << (8 * (8 - len(key))) if len(key) < 8 else int.from_bytes(key[:8], "big")


def key_prefixes(keys: list) -> np.ndarray:
    """`key_prefix` of each key, as uint64."""
    n = len(keys)
    if not n:
        return np.zeros(0, dtype=np.uint64)
    first = len(keys[0])
    if first >= 8 and min(map(len, keys)) == max(map(len, keys)):
        block = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(n, first)[:, :8]
    else:
        block = np.frombuffer(b"".join(k[:8].ljust(8, b"\0") for k in keys), dtype=np.uint8).reshape(n, 8)
    return np.ascontiguousarray(block).view(">u8").ravel().astype(np.uint64)


def prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def scan_bounds(start: bytes | None, stop: bytes | None, prefix: bytes | None) -> tuple:
    """(start, stop) of a scan with `prefix` folded in (the engine's and clients' scans)."""
    if prefix:
        if start is None or start < prefix:
            start = prefix
        successor = prefix_successor(prefix)
        if successor is not None and (stop is None or successor < stop):
            stop = successor
    return start, stop


def gather_chunks(maps: dict, locations: np.ndarray, key_lens: np.ndarray, k: int) -> np.ndarray:
    """Chunk k (bytes 8k .. 8k+8, big-endian, zero-padded) of the keys of the records at
    `locations` (segment << 32 | offset) with `key_lens`, read from `maps` (segment -> buffer)."""
    n = len(locations)
    out = np.zeros(n, dtype=np.uint64)
    if not n:
        return out
    locations = np.asarray(locations, dtype=np.uint64)
    segments = (locations >> np.uint64(32)).astype(np.int64)
    starts = (locations & np.uint64(0xFFFFFFFF)).astype(np.int64) + RECORD_HEADER_SIZE + 8 * k
    available = np.clip(np.asarray(key_lens, dtype=np.int64) - 8 * k, 0, 8)
    for segment in np.unique(segments).tolist():
        rows = np.flatnonzero(segments == segment)
        data = np.frombuffer(maps[segment], dtype=np.uint8)
        index = np.minimum(starts[rows, None] + _BYTES8, len(data) - 1)
        block = data[index]
        block[_BYTES8[None, :] >= available[rows, None]] = 0
        out[rows] = block.view(">u8").ravel()
    return out


# -- reading a sorted run (the engine and clients) ---------------------------------------------------
def find_position(eids, prefixes, count: int, key: bytes, prefix: int, key_of: Callable[[int], bytes], after: bool = False, check: bool = False) -> int:
    """The first position in [0, count) of a run whose key is >= `key` (> with `after`), or
    `count`. Equal prefixes are told apart by the keys themselves (`key_of(entry id)`);
    tombstones (DEAD) among them are passed over. `eids` and `prefixes` may be memoryviews.
    With `check` (a client reading shared memory), the keys on both sides of the position
    found are read: a run whose prefixes lie raises ValueError."""
    lo = bisect.bisect_left(prefixes, prefix, 0, count)
    if lo == count or prefixes[lo] != prefix:
        if check:
            _check_boundary(eids, count, lo, key, key_of, after)
        return lo
    hi = bisect.bisect_right(prefixes, prefix, lo, count)
    # Binary search over the live entries of [lo, hi): tombstones hold no key to compare.
    live = [i for i in range(lo, hi) if eids[i] != DEAD] if hi - lo < 64 else (lo + np.flatnonzero(np.asarray(eids[lo:hi]) != DEAD)).tolist()
    a, b = 0, len(live)
    while a < b:
        mid = (a + b) // 2
        other = key_of(eids[live[mid]])
        if other < key or (after and other == key):
            a = mid + 1
        else:
            b = mid
    position = live[a] if a < len(live) else hi
    if check:
        _check_boundary(eids, count, position, key, key_of, after)
    return position


def _check_boundary(eids, count: int, position: int, key: bytes, key_of, after: bool, reach: int = 16) -> None:
    """Raise ValueError unless the nearest live keys before and from `position` lie on the
    right sides of `key` (looking past at most `reach` tombstones each way)."""
    i = position - 1
    while i >= 0 and i >= position - reach and eids[i] == DEAD:
        i -= 1
    if i >= 0 and eids[i] != DEAD:
        other = key_of(eids[i])
        if other > key or (other == key and not after):
            raise ValueError("run out of order")
    i = position
    while i < count and i < position + reach and eids[i] == DEAD:
        i += 1
    if i < count and eids[i] != DEAD:
        other = key_of(eids[i])
        if other < key or (other == key and after):
            raise ValueError("run out of order")


def window(runs: list, key_of: Callable[[int], bytes], cursor, inclusive: bool, bound, reverse: bool, size: int, check: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """The next entries of a scan over sorted runs (see SortedView.window): (entry ids and
    their prefixes as numpy arrays, more). `runs`: (eids, prefixes, count) each (numpy arrays or memoryviews), eids possibly
    holding DEAD. Forward: keys after `cursor` and below `bound`; reverse: keys before `cursor`
    and from `bound` on. A window that would come back empty with keys left is taken again,
    bigger: every call makes progress. `check`: see find_position and _take."""
    spans = []
    for eids, prefixes, count in runs:
        if not count:
            continue
        if not reverse:
            lo = 0 if cursor is None else find_position(eids, prefixes, count, cursor, key_prefix(cursor), key_of, not inclusive, check)
            hi = count if bound is None else find_position(eids, prefixes, count, bound, key_prefix(bound), key_of, False, check)
        else:
            hi = count if cursor is None else find_position(eids, prefixes, count, cursor, key_prefix(cursor), key_of, inclusive, check)
            lo = 0 if bound is None else find_position(eids, prefixes, count, bound, key_prefix(bound), key_of, False, check)
        if lo < hi:
            spans.append((eids, prefixes, lo, hi))
    while spans:
        found, prefixes, more = _take(spans, key_of, reverse, size, check)
        if len(found) or not more:
            return found, prefixes, more
        size *= 4
    return _EMPTY_EIDS, _EMPTY_PREFIXES, False


def _take(spans: list, key_of, reverse: bool, size: int, check: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """Up to `size` entries of each span (eids, prefixes, lo, hi) merged in scan order, cut
    where a span that has more stops knowing its keys: (entry ids, prefixes, more)."""
    pieces = []
    limits = []  # spans with entries left beyond those taken: the last taken (prefix, entry id)
    for eids, prefixes, lo, hi in spans:
        if not reverse:
            end = min(hi, lo + size)
            taken_eids, taken_prefixes = np.asarray(eids[lo:end]), np.asarray(prefixes[lo:end])
            more = end < hi
        else:
            begin = max(lo, hi - size)
            taken_eids, taken_prefixes = np.asarray(eids[begin:hi])[::-1], np.asarray(prefixes[begin:hi])[::-1]
            more = begin > lo
        if more:
            limits.append((int(taken_prefixes[-1]), int(taken_eids[-1])))
        live = taken_eids != DEAD
        pieces.append((taken_eids[live], taken_prefixes[live]))
    if len(pieces) == 1:
        merged_eids, merged_prefixes = pieces[0]
    else:
        merged_eids = np.concatenate([p[0] for p in pieces])
        merged_prefixes = np.concatenate([p[1] for p in pieces])
        order = np.argsort(~merged_prefixes if reverse else merged_prefixes, kind="stable")  # merges the runs
        merged_eids, merged_prefixes = merged_eids[order], merged_prefixes[order]
    if len(pieces) > 1 and (merged_prefixes[1:] == merged_prefixes[:-1]).any():
        merged_eids = np.array(_order_ties(merged_eids.tolist(), merged_prefixes.tolist(), key_of, reverse), dtype=merged_eids.dtype)
    if not limits:
        return merged_eids, merged_prefixes, False
    # Beyond the last key taken from a span that has more, that span's keys are unknown: stop
    # at the nearest such key (by prefix; by key among equal prefixes, when all are known).
    edge = min(p for p, _ in limits) if not reverse else max(p for p, _ in limits)
    at_edge = [e for p, e in limits if p == edge]
    if not reverse:
        cut = int(np.searchsorted(merged_prefixes, np.uint64(edge), side="left"))
    else:
        cut = int(np.searchsorted(~merged_prefixes, ~np.uint64(edge), side="left"))
    if DEAD not in at_edge:
        edge_keys = [key_of(e) for e in at_edge]
        edge_key = min(edge_keys) if not reverse else max(edge_keys)
        while cut < len(merged_prefixes) and merged_prefixes[cut] == edge:
            key = key_of(int(merged_eids[cut]))
            if (key > edge_key) if not reverse else (key < edge_key):
                break
            cut += 1
    if check and cut:
        # The last entry returned must not pass any run's last taken key: prefixes that lie
        # would make the next window start past keys never returned.
        last = key_of(int(merged_eids[cut - 1]))
        for _, e in limits:
            if e != DEAD and ((key_of(e) < last) if not reverse else (key_of(e) > last)):
                raise ValueError("run out of order")
    return merged_eids[:cut], merged_prefixes[:cut], True


def _order_ties(eids: list, prefixes: list, key_of, reverse: bool) -> list:
    """Order runs of equal prefixes by key (the rest is in order already)."""
    n = len(prefixes)
    i = 0
    out = None
    while i < n - 1:
        if prefixes[i] != prefixes[i + 1]:
            i += 1
            continue
        j = i + 1
        while j < n and prefixes[j] == prefixes[i]:
            j += 1
        if out is None:
            out = list(eids)
        out[i:j] = sorted(eids[i:j], key=key_of, reverse=reverse)
        i = j
    return eids if out is None else out
