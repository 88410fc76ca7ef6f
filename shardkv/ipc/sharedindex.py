"""The shared index of a shard: its hash table in shared memory, so that clients answer `get`
in their own process (docs/IPC.md, "Shared index").

Three parties, one module:
- the supervisor creates each shard's header (`create_header`) and clears it when the worker
  dies or a dead cluster is cleaned up (`mark_not_serving`);
- the worker allocates the table arrays of its `KeyIndex` here (`IndexPublisher` is its
  `tables`) and publishes the seqlock version, the active segment, the epoch and the lock count;
- a client reads through `IndexReader.get`, which answers a value, None (absent), or
  `FALLBACK`: "ask the worker through the ring".

Nothing a reader does can disturb the worker: the header is mapped read-only in clients, tables
and segment files are mapped read-only, and every read is validated by the seqlock.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import time

import numpy as np
import posix_ipc
from crc32c import crc32c

from shardkv.ipc.probe import GOLDEN32, KEY_IN_CHECKED, DamagedRecord, checked_fields
from shardkv.wal.format import PUT, RECORD_CRC_FROM, RECORD_HEADER_SIZE, segment_name

HEADER_MAGIC = b"SHKVIDX\n"
HEADER_SIZE = 64
HEADER = struct.Struct("<8sQIIIIII24x")  # magic, version, state, locked, table, active, epoch, active_end
HEADER_FIELDS = struct.Struct("<QIIIIII")  # the same fields from offset 8, read in one go
VERSION = struct.Struct("<Q")
U32 = struct.Struct("<I")
VERSION_OFFSET, STATE_OFFSET, LOCKED_OFFSET, TABLE_OFFSET, ACTIVE_OFFSET, EPOCH_OFFSET, ACTIVE_END_OFFSET = 8, 16, 20, 24, 28, 32, 36
NOT_SERVING, SERVING = 0, 1

TABLE_MAGIC = b"SHKVTBL\n"
TABLE_HEADER = struct.Struct("<8sIIQQ32x")  # magic, bits, reserved, slots, entries
ARRAYS = (("slots", "<u4"), ("locations", "<u8"), ("hashes", "<u4"), ("key_lens", "<u4"), ("value_lens", "<u4"), ("seqs", "<u8"))

# Direct reads rely on x86-64's ordering of plain stores and of plain loads (see docs/IPC.md);
# Python has no memory fence, so on other machines clients always use the ring.
SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")
RETRIES = 8  # reads that overlapped a change are retried this often, then the ring answers
FALLBACK = object()


def header_name(prefix: str, shard: int) -> str:
    """The POSIX name of shard `shard`'s index header."""
    return f"{prefix}-idx{shard}"


def table_name(prefix: str, shard: int, number: int) -> str:
    """The POSIX name of table `number` of shard `shard`."""
    return f"{prefix}-idx{shard}-{number}"


def table_layout(n_slots: int, n_entries: int) -> tuple[list[tuple[str, str, int, int]], int]:
    """[(array, dtype, offset, length)] of a table with these lengths, and its total size."""
    layout, offset = [], TABLE_HEADER.size
    for name, dtype in ARRAYS:
        length = n_slots if name == "slots" else n_entries
        layout.append((name, dtype, offset, length))
        offset += (length * np.dtype(dtype).itemsize + 7) // 8 * 8
    return layout, offset


def _map(name: str, *, create_size: int | None = None, read_only: bool = False) -> mmap.mmap:
    if create_size is not None:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=create_size)
    else:
        shm = posix_ipc.SharedMemory(name, read_only=read_only)
    try:
        if create_size is not None:
            # Reserve the pages now: a full /dev/shm must fail here, cleanly, and not later as
            # a SIGBUS when a page is first written.
            os.posix_fallocate(shm.fd, 0, create_size)
        return mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        if create_size is not None:
            posix_ipc.unlink_shared_memory(name)
        raise
    finally:
        shm.close_fd()


# -- supervisor ------------------------------------------------------------------------------
def create_header(name: str) -> mmap.mmap:
    """Create an index header (not serving, version 0); return its read-write mapping."""
    buf = _map(name, create_size=HEADER_SIZE)
    HEADER.pack_into(buf, 0, HEADER_MAGIC, 0, NOT_SERVING, 0, 0, 0, 0, 0)
    return buf


def mark_not_serving(buf) -> None:
    """Tell readers to use the ring (the worker died or the cluster is gone): a version bump
    makes any read in flight retry and see the new state."""
    version = VERSION.unpack_from(buf, VERSION_OFFSET)[0]
    VERSION.pack_into(buf, VERSION_OFFSET, version | 1)
    U32.pack_into(buf, STATE_OFFSET, NOT_SERVING)
    VERSION.pack_into(buf, VERSION_OFFSET, (version | 1) + 1)


def _unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def unlink_tables(prefix: str, shard: int) -> list[str]:
    """Unlink every table of shard `shard` (a dead worker's); return their names."""
    stem = table_name(prefix, shard, 0)[1:-1]  # "<prefix>-idx<S>-" without the leading "/"
    removed = []
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(stem) and entry[len(stem) :].isdigit():
            try:
                # The prefix is visible in /dev/shm: another user may have made a name like
                # these. Never ours to remove, and never a reason to fail (docs/IPC.md).
                if os.stat("/dev/shm/" + entry).st_uid != os.geteuid():
                    continue
                posix_ipc.unlink_shared_memory("/" + entry)
                removed.append(entry)
            except (posix_ipc.Error, OSError):
                pass
    return removed


# -- worker ----------------------------------------------------------------------------------
class PrivateTables:
    """Table arrays in the process's own memory: what a `KeyIndex` uses by default."""

    def allocate(self, bits: int, n_slots: int, n_entries: int) -> dict:
        """Zeroed arrays for a table of these lengths."""
        return {name: np.zeros(n_slots if name == "slots" else n_entries, dtype=dtype) for name, dtype in ARRAYS}

    def install(self, arrays: dict) -> None:
        """The index now uses `arrays` (nothing to publish)."""


class IndexPublisher(PrivateTables):
    """The worker's side: allocates tables in shared memory and publishes the header fields.

    The engine calls `set_version` around every change (shards/indexheader.py); tables are
    installed inside such a window. If shared memory runs out, the index goes on in private
    memory and this shard stays "not serving" (clients use the ring).
    """

    def __init__(self, prefix: str, shard: int, log=None):
        self.prefix, self.shard, self.log = prefix, shard, log
        self.header = _map(header_name(prefix, shard))
        magic, version, _, _, table, _, epoch, _ = HEADER.unpack_from(self.header, 0)
        if magic != HEADER_MAGIC:
            raise ValueError(f"{header_name(prefix, shard)} is not a shardkv index header")
        self.enabled = SUPPORTED
        self.start_version = (version | 1) + 1  # readers of a previous worker's index retry
        self._next_table = table + 1
        # Tables allocated and not yet installed (by id of their slot array), and the installed
        # one: (name, number). A mapping lives as long as the numpy arrays made on it.
        self._pending: dict[int, tuple[str, int]] = {}
        self._current: str | None = None
        VERSION.pack_into(self.header, VERSION_OFFSET, self.start_version - 1)
        U32.pack_into(self.header, STATE_OFFSET, NOT_SERVING)
        U32.pack_into(self.header, EPOCH_OFFSET, (epoch + 1) & 0xFFFFFFFF)  # segment numbers may be reused
        VERSION.pack_into(self.header, VERSION_OFFSET, self.start_version)

    def allocate(self, bits: int, n_slots: int, n_entries: int) -> dict:
        if not self.enabled:
            return super().allocate(bits, n_slots, n_entries)
        layout, size = table_layout(n_slots, n_entries)
        while True:
            name = table_name(self.prefix, self.shard, self._next_table)
            self._next_table += 1
            try:
                buf = _map(name, create_size=size)
                break
            except posix_ipc.ExistentialError:
                continue  # a leftover of an earlier worker: take the next number
            except (OSError, ValueError, posix_ipc.Error) as exc:
                self._disable(f"no shared memory for the index ({exc}): clients read through the ring")
                return super().allocate(bits, n_slots, n_entries)
        TABLE_HEADER.pack_into(buf, 0, TABLE_MAGIC, bits, 0, n_slots, n_entries)
        arrays = {name: np.frombuffer(buf, dtype=dtype, count=length, offset=offset) for name, dtype, offset, length in layout}
        self._pending[id(arrays["slots"])] = (name, self._next_table - 1)
        return arrays

    def install(self, arrays: dict) -> None:
        """Name the table holding `arrays` in the header and drop the previous one. Called
        with the version odd."""
        allocated = self._pending.pop(id(arrays["slots"]), None)
        if allocated is None:
            return  # private arrays
        name, number = allocated
        U32.pack_into(self.header, TABLE_OFFSET, number)
        self._drop_current()
        self._current = name

    def _drop_current(self) -> None:
        if self._current is not None:
            _unlink(self._current)  # readers' mappings stay valid
            self._current = None

    def _disable(self, why: str) -> None:
        if self.enabled and self.log is not None:
            self.log.warning(why)
        self.enabled = False
        self.set_state(NOT_SERVING)

    def set_version(self, version: int) -> None:
        """Publish the engine's seqlock version."""
        VERSION.pack_into(self.header, VERSION_OFFSET, version)

    def set_active(self, segment: int, end: int) -> None:
        """Publish the segment the worker appends to and where its data ends (inside a version window)."""
        U32.pack_into(self.header, ACTIVE_END_OFFSET, end)
        U32.pack_into(self.header, ACTIVE_OFFSET, segment)

    def set_active_end(self, end: int) -> None:
        """Publish where the active segment's written data ends (after each append, before the
        index points at it). Readers never read the active segment past it."""
        U32.pack_into(self.header, ACTIVE_END_OFFSET, end)

    def bump_epoch(self) -> None:
        """Segment files are about to be deleted: readers drop their mappings (inside a version window)."""
        U32.pack_into(self.header, EPOCH_OFFSET, (U32.unpack_from(self.header, EPOCH_OFFSET)[0] + 1) & 0xFFFFFFFF)

    def set_locked(self, count: int) -> None:
        """Publish how many keys are locked by undecided cross-shard batches."""
        U32.pack_into(self.header, LOCKED_OFFSET, min(count, 0xFFFFFFFF))

    def set_state(self, state: int) -> None:
        """SERVING once the index is published; NOT_SERVING when the worker stops."""
        U32.pack_into(self.header, STATE_OFFSET, state if self.enabled else NOT_SERVING)

    def close(self) -> None:
        """Stop serving and unlink the current table."""
        mark_not_serving(self.header)
        self._drop_current()
        for name, _ in self._pending.values():
            _unlink(name)
        self._pending.clear()


# -- client ----------------------------------------------------------------------------------
class IndexReader:
    """A client's view of one shard's shared index; `get` answers without a round trip.
    Safe to share between threads: every piece of cached state is swapped in one assignment."""

    def __init__(self, prefix: str, shard: int, shard_directory: str, clock=time.time):
        """`clock`: wall-clock seconds, which expired keys are judged by (as the engine's
        `clock`: tests pass a controllable one)."""
        self.prefix, self.shard, self.directory = prefix, shard, shard_directory
        self._clock = clock
        self._header = _map(header_name(prefix, shard), read_only=True)
        if self._header[:8] != HEADER_MAGIC:
            raise ValueError(f"{header_name(prefix, shard)} is not a shardkv index header")
        self._table = None  # (number, shift, slots, locations, hashes, key_lens, value_lens, probe table)
        self._segments: tuple[int, dict] = (-1, {})  # (epoch, segment -> (segment, mapping, size))
        self._active: tuple = (-1, b"", 0)  # (segment, mapping, size) of the active segment

    def get(self, key, h, many: bool = False):
        """The value of `key` (whose CRC-32C is `h`), None if absent, or FALLBACK. With `many`,
        `key` and `h` are lists: the values of all, read within one unchanged version."""
        header, fields, version_of = self._header, HEADER_FIELDS.unpack_from, VERSION.unpack_from
        for _ in range(RETRIES):
            version, state, locked, table_number, active, epoch, active_end = fields(header, VERSION_OFFSET)
            if version & 1:
                continue  # the worker is changing the index right now
            if state != SERVING or (locked and not many):
                return FALLBACK
            table = self._table
            if table is None or table[0] != table_number:
                table = self._map_table(table_number)
                if table is None:
                    if version_of(header, VERSION_OFFSET)[0] != version:
                        continue  # the table was replaced while we looked for it
                    return FALLBACK
            try:
                if many:
                    find = self._find
                    result = [find(table, k, kh, active, active_end, epoch, version) for k, kh in zip(key, h)]
                else:
                    result = self._find(table, key, h, active, active_end, epoch, version)
            except (IndexError, ValueError, TypeError, OSError, struct.error):
                if version_of(header, VERSION_OFFSET)[0] == version:
                    return FALLBACK  # not a race: let the worker answer (and report damage)
                continue
            if version_of(header, VERSION_OFFSET)[0] == version:
                return result
        return FALLBACK

    def get_many(self, keys: list, hashes: list):
        """The values of `keys` (None: absent) read at one instant of this shard, or FALLBACK.
        Keys locked by a prepared batch are read too: a multi-key read runs inside a snapshot
        of cross-shard commits (client.py `_Snapshot`), in which a prepared batch is not applied."""
        return self.get(keys, hashes, True)

    def _find(self, table: tuple, key: bytes, h: int, active: int, active_end: int, epoch: int, version: int):
        """Probe `table` for `key` and read its record: the value, or None. Everything read here
        may be garbage if the worker changed something meanwhile (the caller's version check
        decides); until then, every read is bounds-checked. Raises on anything unreadable (the
        worker reports corruption properly).

        A flat copy of ipc/probe.py `find_value` with this reader's bounds checks inline:
        calling it, with a callback for the segment, costs ~10% of a direct read.
        tests/test_probe.py checks that the two agree."""
        _, shift, slots, locations, hashes, key_lens, value_lens, _ = table
        key_len = len(key)
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> shift
        while True:
            s = slots[i]
            if not s:
                return None
            e = s - 1
            if hashes[e] == h and key_lens[e] == key_len:
                location = locations[e]
                segment = location >> 32
                offset = location & 0xFFFFFFFF
                end = offset + RECORD_HEADER_SIZE + key_len + value_lens[e]
                if segment == active:
                    mapped = self._active
                    if mapped[0] != segment:
                        mapped = self._map_active(segment)
                    limit = active_end  # written and published: never cut while mapped
                else:
                    mapped = self._sealed(segment, epoch, version)
                    limit = mapped[2]
                if end > limit or end > mapped[2]:
                    raise ValueError("record out of bounds")
                buf = mapped[1]
                crc, rtype, expires_at = checked_fields(buf, offset)
                record = buf[offset + RECORD_CRC_FROM : end]  # exactly the bytes the crc covers
                if crc32c(record) != crc or rtype != PUT:
                    # Also for another key of the same hash and length: it may be this one, damaged.
                    raise DamagedRecord(segment, offset)
                if record.startswith(key, KEY_IN_CHECKED):
                    if expires_at and expires_at <= self._now_ms():
                        return None
                    return record[KEY_IN_CHECKED + key_len :]
            i += 1

    def _now_ms(self) -> float:
        """Now by the reader's clock, in milliseconds since the epoch (records' expires_at)."""
        return self._clock() * 1000

    def _map_active(self, segment: int) -> tuple:
        """(segment, mapping, size) of the active segment. Reads of it stay below the published
        `active_end`, which a seal never cuts below, so the mapping is safe after the seal too."""
        mapped = self._map_segment(segment)
        if mapped is None:
            raise ValueError("active segment missing")
        self._active = (segment, *mapped)
        return self._active

    def _sealed(self, segment: int, epoch: int, version: int) -> tuple:
        """(segment, mapping, size) of a segment that is not the active one."""
        seen_epoch, maps = self._segments
        if seen_epoch != epoch:
            maps = {}
            self._segments = (epoch, maps)  # mappings of deleted files go with the old dict
        mapped = maps.get(segment)
        if mapped is None:
            found = self._map_segment(segment)
            if found is None:
                raise ValueError("segment missing")
            mapped = (segment, *found)
            # Keep a mapping only if nothing changed while it was made: then the segment was not
            # the active one, and a sealed segment never shrinks, so reads within its size are safe.
            if VERSION.unpack_from(self._header, VERSION_OFFSET)[0] != version:
                raise ValueError("changed while mapping")
            maps[segment] = mapped
        return mapped

    def _map_segment(self, segment: int):
        try:
            fd = os.open(os.path.join(self.directory, segment_name(segment)), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            length = os.fstat(fd).st_size
            if length == 0:
                return None
            return mmap.mmap(fd, length, prot=mmap.PROT_READ), length
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def _map_table(self, number: int):
        try:
            buf = _map(table_name(self.prefix, self.shard, number), read_only=True)
        except (posix_ipc.ExistentialError, OSError, ValueError):
            return None
        magic, bits, _, n_slots, n_entries = TABLE_HEADER.unpack_from(buf, 0)
        layout, size = table_layout(n_slots, n_entries)
        if magic != TABLE_MAGIC or size > len(buf) or not 0 < bits <= 32:
            return None
        arrays = {name: memoryview(buf)[offset : offset + length * np.dtype(dtype).itemsize].cast("I" if dtype == "<u4" else "Q") for name, dtype, offset, length in layout}
        slots, locations, hashes, key_lens, value_lens = (arrays[name] for name in ("slots", "locations", "hashes", "key_lens", "value_lens"))
        # The last item is the same arrays as ipc/probe.py takes them (KeyIndex.table's order).
        table = (number, 32 - bits, slots, locations, hashes, key_lens, value_lens, (32 - bits, slots, hashes, key_lens, locations, value_lens))
        self._table = table
        return table

    def close(self) -> None:
        """Drop every mapping and descriptor (the caller makes sure no `get` runs)."""
        self._table = None
        self._segments = (-1, {})
        self._active = (-1, b"", 0)
