"""Reading many records at once, every one checked (docs/IPC.md, "Ordered view"): the keys and
values of a window of index entries, gathered from the segment mappings as rows of one length
with numpy, each row's CRC-32C checked in bulk. Used by the clients' ordered reads
(ipc/sortedview.py) and by the engine's own scans (shards/store.py).
"""

from __future__ import annotations

import numpy as np
from crc32c import crc32c

from shardkv.ipc.sortedruns import key_prefix
from shardkv.wal.format import PUT, RECORD_HEADER, RECORD_HEADER_SIZE

_RECORD = RECORD_HEADER  # crc, header_crc, type, flags, reserved, key_len, value_len, batch_left, seq, expires_at


# Records are read as rows of one length (numpy copies each row: a memcpy) and checked in bulk:
# CRC-32C is affine over GF(2) (zlib's crc32_combine: crc(X + Y) = A_len(Y)(crc(X)) ^ crc(Y), A
# linear), so the CRC of a run of intact records follows from their stored CRCs, and one call
# over the run checks them all. A run that does not check out is not read from here at all.
_shift_tables: dict[int, np.ndarray] = {}
_record_tables: dict[int, tuple[np.ndarray, int]] = {}
_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1


def _tables_of(columns: np.ndarray) -> np.ndarray:
    """4 x 256 lookup tables of the GF(2)-linear map whose images of bit i are `columns[i]`."""
    return np.stack([np.bitwise_xor.reduce(np.where(_BITS == 1, columns[8 * j : 8 * j + 8], 0).astype(np.uint32), axis=1) for j in range(4)])


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The map of `tables` applied to each uint32 of `x` (one table per byte)."""
    b = np.ascontiguousarray(x, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return _apply_bytes(tables, b)


def _apply_bytes(tables: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The same for uint32s given as their 4 little-endian bytes (rows of `b`)."""
    return tables[0][b[:, 0]] ^ tables[1][b[:, 1]] ^ tables[2][b[:, 2]] ^ tables[3][b[:, 3]]


def _shift(length: int) -> np.ndarray:
    """Tables of A_length: what `length` more bytes do to the CRC of what came before."""
    tables = _shift_tables.get(length)
    if tables is None:
        if length > 4096 and length % 2 == 0:
            half = _shift(length // 2)  # A_2n = A_n after A_n: no long buffer of zeros
            columns = _apply(half, _apply(half, (np.uint32(1) << np.arange(32, dtype=np.uint32))))
        else:
            zeros = bytes(length)
            base = crc32c(zeros)
            columns = np.array([crc32c(zeros, 1 << i) ^ base for i in range(32)], dtype=np.uint32)
        tables = _tables_of(columns)
        if len(_shift_tables) > 4096:
            _shift_tables.clear()
        _shift_tables[length] = tables
    return tables


def _record_crc(length: int) -> tuple[np.ndarray, int]:
    """(tables, constant): the CRC-32C of a whole record of `length` bytes (its stored crc s,
    then the body that crc covers) is _apply(tables, s) ^ constant when the body is intact."""
    found = _record_tables.get(length)
    if found is None:
        zeros = bytes(length - 4)
        base = crc32c(bytes(4) + zeros)
        columns = np.array([crc32c((1 << i).to_bytes(4, "little") + zeros) ^ base ^ (1 << i) for i in range(32)], dtype=np.uint32)
        found = (_tables_of(columns), base ^ crc32c(zeros))
        if len(_record_tables) > 4096:
            _record_tables.clear()
        _record_tables[length] = found
    return found


def _check_crcs(rows: np.ndarray, length: int) -> bool:
    """Whether every row of `rows` (records of `length` bytes, C-contiguous) is intact."""
    n = len(rows)
    if not n:
        return True
    tables, constant = _record_crc(length)
    crcs = _apply_bytes(tables, rows[:, :4]) ^ np.uint32(constant)
    size = 1 << (n - 1).bit_length()
    if size != n:
        # A regular tree of 2**k: zeros in front stand for empty prefixes (A(0) = 0, so the CRC
        # of the concatenation is unchanged).
        crcs = np.concatenate((np.zeros(size - n, dtype=np.uint32), crcs))
    level = 0
    while len(crcs) > 1:
        crcs = _apply(_shift(length << level), crcs[0::2]) ^ crcs[1::2]
        level += 1
    return crc32c(rows) == int(crcs[0])


def _row_reader(buf, length: int):
    """Records of `length` bytes starting at any offset of `buf`: a read-only numpy view whose
    item i is bytes i .. i + length (one `length`-byte item each: a gather copies each with one
    memcpy, twice as fast as rows of bytes)."""
    data = np.frombuffer(buf, dtype=np.uint8)
    if len(data) < length:
        return None
    return np.ndarray(shape=(len(data) - length + 1,), dtype=f"V{length}", buffer=data, strides=(1,))


def _column(rows: np.ndarray, start: int, width: int):
    """Bytes start..start+width of each row as a numpy array of `width`-byte items (None for
    width 0): reordered, sliced and merged as numpy, made bytes objects only when handed out."""
    if not width:
        return None
    return np.ascontiguousarray(rows[:, start : start + width]).view(f"V{width}").ravel()


class Items:
    """Keys and values of a window in scan order, with the keys' prefixes (uint64): columns of
    one key length and one value length (numpy arrays of fixed-size items; values None when
    empty), or lists of bytes."""

    __slots__ = ("keys", "values", "prefixes")

    def __init__(self, keys, values, prefixes: np.ndarray):
        self.keys, self.values, self.prefixes = keys, values, prefixes

    def __len__(self) -> int:
        return len(self.prefixes)

    @property
    def columns(self) -> bool:
        return type(self.keys) is np.ndarray

    def key(self, i: int) -> bytes:
        key = self.keys[i]
        return key if type(key) is bytes else key.tobytes()

    def take(self, rows) -> "Items":
        """The items picked by `rows` (a mask or an index array)."""
        if self.columns:
            return Items(self.keys[rows], None if self.values is None else self.values[rows], self.prefixes[rows])
        picked = np.arange(len(self.prefixes))[rows].tolist()
        return Items([self.keys[i] for i in picked], [self.values[i] for i in picked], self.prefixes[rows])

    def part(self, start: int, end: int) -> "Items":
        values = self.values
        return Items(self.keys[start:end], None if values is None else values[start:end], self.prefixes[start:end])

    def lists(self) -> tuple[list, list]:
        """(keys, values) as lists of bytes."""
        if not self.columns:
            return self.keys, self.values
        return self.keys.tolist(), [b""] * len(self.keys) if self.values is None else self.values.tolist()


NO_ITEMS = Items([], [], np.zeros(0, dtype=np.uint64))


def read_records(buffers: dict, segments: np.ndarray, offsets: np.ndarray, key_lens: np.ndarray, value_lens: np.ndarray, now_ms: int, published=None):
    """Keys and values of the PUT records at (`segments`[i], `offsets`[i]) with these lengths,
    read from `buffers` (segment -> buffer; the caller checked every record lies within), each
    record checked (CRC-32C, type PUT, its lengths). Returns (keys, values, prefixes of the
    keys) as Items, records that expired at or before `now_ms` left out; raises ValueError if a
    record is not what the index says, or its key's prefix is not the one `published` for it."""
    n = len(offsets)
    shapes = (key_lens << 32) | value_lens
    distinct = shapes[:1] if (shapes == shapes[0]).all() else np.unique(shapes)
    if len(distinct) > 8:
        return _read_one_by_one(buffers, segments, offsets, key_lens, value_lens, now_ms, published)
    if len(distinct) > 1:
        keys, values = [None] * n, [None] * n
        prefixes = np.zeros(n, dtype=np.uint64)
        expires = np.zeros(n, dtype=np.uint64)
    one_segment = len(buffers) == 1
    for shape in distinct.tolist():
        group = np.flatnonzero(shapes == shape) if len(distinct) > 1 else None
        key_len, value_len = shape >> 32, shape & 0xFFFFFFFF
        length = RECORD_HEADER_SIZE + key_len + value_len
        rows = _gather_rows(buffers, segments, offsets, group, length, one_segment)
        header = np.ascontiguousarray(rows[:, 8:20])
        if not (
            (header[:, 0] == PUT).all()
            and (header[:, 4:12].view("<u4") == np.array([key_len, value_len], dtype=np.uint32)).all()
            and _check_crcs(rows, length)
        ):
            raise ValueError("not an intact PUT record of the indexed lengths")
        found_keys = _column(rows, RECORD_HEADER_SIZE, key_len)
        found_values = _column(rows, RECORD_HEADER_SIZE + key_len, value_len)
        head = np.zeros((len(rows), 8), dtype=np.uint8)
        head[:, : min(8, key_len)] = rows[:, RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + min(8, key_len)]
        found_prefixes = head.view(">u8").ravel().astype(np.uint64)
        found_expires = np.ascontiguousarray(rows[:, 32:40]).view("<u8").ravel()
        if group is None:
            items, expires = Items(found_keys, found_values, found_prefixes), found_expires
            break
        for i, k, v in zip(group.tolist(), found_keys.tolist(), [b""] * len(group) if found_values is None else found_values.tolist()):
            keys[i], values[i] = k, v
        prefixes[group] = found_prefixes
        expires[group] = found_expires
    else:
        items = Items(keys, values, prefixes)
    if published is not None and not (len(published) == n and (items.prefixes == published).all()):
        raise ValueError("keys that the runs do not place there")
    return _unexpired(items, expires, now_ms)


def by_segment(segments: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
    """(segment, positions in `segments` that name it: a slice if all do) for each segment
    named, in one pass whatever their number (a radix sort of 16-bit offsets, not a comparison
    of every entry per segment). Segment numbers come from shared memory: numbers far apart are
    grouped by sorting, never by an array as long as their span."""
    first, last = int(segments.min()), int(segments.max())
    if first == last:
        return [(first, slice(None))]
    if last - first < 1 << 16:
        relative = (segments - first).astype(np.uint16)
        order = np.argsort(relative, kind="stable")  # radix sort for 16-bit keys
        counts = np.bincount(relative)
        named = np.flatnonzero(counts)
        ends = np.cumsum(counts[named])
        numbers = (named + first).tolist()
    else:
        found, inverse, counts = np.unique(segments, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        ends = np.cumsum(counts)
        numbers = found.tolist()
    starts = [0, *ends[:-1].tolist()]
    return [(number, order[a:b]) for number, a, b in zip(numbers, starts, ends.tolist())]


def _gather_rows(buffers: dict, segments, offsets, group, length: int, one_segment: bool) -> np.ndarray:
    """The records (rows of `length` bytes) at the offsets of `group` (None: all)."""
    where = offsets if group is None else offsets[group]
    if one_segment:
        (buf,) = buffers.values()
        return _row_reader(buf, length)[where].view(np.uint8).reshape(len(where), length)
    rows = np.empty(len(where), dtype=f"V{length}")
    for segment, picked in by_segment(segments if group is None else segments[group]):
        rows[picked] = _row_reader(buffers[segment], length)[where[picked]]
    return rows.view(np.uint8).reshape(len(where), length)


def _unexpired(items: Items, expires: np.ndarray, now_ms: int) -> Items:
    if expires.any():
        live = (expires == 0) | (expires > now_ms)
        if not live.all():
            return items.take(live)
    return items


def _read_one_by_one(buffers: dict, segments, offsets, key_lens, value_lens, now_ms: int, published=None):
    """read_records for windows of many record lengths: a slice and a CRC-32C per record."""
    keys, values, prefixes, expires = [], [], [], []
    for segment, offset, key_len, value_len in zip(segments.tolist(), offsets.tolist(), key_lens.tolist(), value_lens.tolist()):
        record = bytes(buffers[segment][offset : offset + RECORD_HEADER_SIZE + key_len + value_len])
        crc, _, rtype, _, _, stored_key_len, stored_value_len, _, _, expires_at = _RECORD.unpack_from(record)
        if rtype != PUT or stored_key_len != key_len or stored_value_len != value_len or crc32c(memoryview(record)[4:]) != crc:
            raise ValueError("not an intact PUT record of the indexed lengths")
        key = record[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + key_len]
        keys.append(key)
        values.append(record[RECORD_HEADER_SIZE + key_len :])
        prefixes.append(key_prefix(key))
        expires.append(expires_at)
    prefixes = np.array(prefixes, dtype=np.uint64)
    if published is not None and not (len(published) == len(prefixes) and (prefixes == published).all()):
        raise ValueError("keys that the runs do not place there")
    return _unexpired(Items(keys, values, prefixes), np.array(expires, dtype=np.uint64), now_ms)


def check_order(items: Items, reverse: bool) -> bool:
    """Whether the keys of `items` rise strictly (fall, with `reverse`)."""
    prefixes = items.prefixes
    if len(prefixes) < 2:
        return True
    before, after = prefixes[:-1], prefixes[1:]
    if ((after > before) if reverse else (after < before)).any():
        return False
    for i in np.flatnonzero(after == before).tolist():
        first, second = items.key(i), items.key(i + 1)
        if not ((first > second) if reverse else (first < second)):
            return False
    return True
