"""The store of a shard: its log (segments and their writer), the hash index over it, and the
ordered view of its keys - the state a write changes, kept in step under one lock.

A write appends its record(s) with one write call (wal/writer.py), then points the index
(keyindex.py), the ordered view (sortedkeys.py) and the expiry table (expiry.py) at them, with
the seqlock version odd meanwhile (indexheader.py): lock-free readers compare it before and
after a read. The engine (engine.py) checks arguments and preconditions and takes the lock;
the compactor (compaction.py) uses two calls: `compaction_inputs` and `swap_compacted`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from crc32c import crc32c

from shardkv import faults
from shardkv.errors import Closed, CorruptionError, StorageError
from shardkv.ipc.bulkread import read_records
from shardkv.shards import sortedkeys
from shardkv.shards.expiry import ExpiryTable
from shardkv.shards.hints import ActiveRecords, SegmentRecords, write_hint
from shardkv.shards.indexheader import IndexHeader
from shardkv.shards.keyindex import KeyIndex
from shardkv.ipc.probe import GOLDEN32, KEY_IN_CHECKED, checked_fields
from shardkv.shards.recovery import Recovered, latest_state, sealed_records, unmap_all
from shardkv.shards.sortedkeys import BUILDING, READY, KeySource, SortedView
from shardkv.ipc.uniform import UniformPuts
from shardkv.shards.viewpublisher import ViewPublisher
from shardkv.wal.format import DELETE, PUT, RECORD_CRC_FROM, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, segment_name
from shardkv.wal.reader import map_file
from shardkv.wal.records import COLUMNS_MIN, encode_columns, encode_record, txid_key
from shardkv.wal.watermark import Watermark
from shardkv.wal.writer import LogWriter


@dataclass
class CompactionInputs:
    """What a compaction copies from: the sealed segments at one instant, with a private copy
    of the index then (KeyIndex.snapshot) and the space figures before."""

    numbers: list  # segment numbers, ascending
    maps: dict  # segment -> mapping
    paths: dict  # segment -> path
    ends: dict  # segment -> data length
    snapshot: object  # an IndexSnapshot
    now: int  # ms: the instant expired keys were purged at, for the log's verdict
    before: dict  # space() before
    reserve_segment_number: Callable[[], int]  # numbers for the outputs


class Store:
    """Segments, log writer, hash index and ordered view of one shard (see module docstring).

    Every method but `read` (and the lock-free parts of the engine) runs with `lock` held."""

    def __init__(self, directory: str, shard_id: int, state: Recovered, expiry: ExpiryTable, *, durability, segment_size, sync_interval, verify_checksums: bool, shared_index=None, log=None):
        self.directory, self.shard_id = directory, shard_id
        self.verify_checksums = verify_checksums
        self.log = log
        self.lock = threading.Lock()
        self.closed = False
        self.expiry = expiry
        self._expires = expiry.expires  # (never replaced) one load on the write path: empty when no key expires
        self.header = IndexHeader(shared_index)
        self.index_failure: BaseException | None = None  # the index failed to take a logged batch
        # Run with the lock held when a compaction has sealed the active segment: logs what
        # must outlive the segments compacted away (the participant's undecided PREPAREs).
        self.before_compaction: Callable[[], None] | None = None
        self.index_repairs = 0  # times the index was found to disagree with the log and rebuilt
        self.maps = state.maps  # segment -> read-only mapping
        self.paths = state.paths
        self.ends = state.ends  # sealed segment -> data length
        self.active = state.active
        self.active_records = state.active_records
        self.seq = state.max_seq
        self.index = KeyIndex(self.key_at, tables=shared_index)
        self.index.load(*state.live)
        # The ordered view, kept current by every write (sortedkeys.py); built from the index now
        # for small shards, in a background thread for big ones.
        # With a shared index, the view's runs are published beside it for clients' scans.
        self.sorted = SortedView(KeySource(self.entry_keys, self.maps), ViewPublisher(shared_index) if shared_index is not None else None)
        self.sorted.key_count = lambda: self.index.count
        self._open_view()
        try:
            self.writer = LogWriter(
                directory,
                shard_id,
                state.active,
                state.active_end,
                durability=durability,
                segment_size=segment_size,
                sync_interval=sync_interval,
                on_seal=self._on_seal,
                watermark=Watermark(directory),
            )
        except BaseException:
            unmap_all(self.maps)
            raise
        self.writer.ensure_next_number(state.max_segment)
        self.header.set_active(state.active, state.active_end)
        try:
            self.writer.sync_and_publish()
        except BaseException:
            self.writer.close()
            unmap_all(self.maps)
            raise

    # -- reading ---------------------------------------------------------------------------
    def key_at(self, location: int, key_len: int) -> bytes:
        """The key of the record at `location` (the index confirms candidates with it)."""
        start = (location & 0xFFFFFFFF) + RECORD_HEADER_SIZE
        return self.maps[location >> 32][start : start + key_len]

    def read(self, key: bytes):
        """The value of `key` or None. Callers either hold the lock or check the version.

        A flat copy of ipc/probe.py's find_value (tests/test_probe.py checks they agree):
        this is the hottest path of a shard, and a call layer costs measurably here."""
        shift, slots, hashes, key_lens, locations, value_lens = self.index.table
        h = crc32c(key)
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> shift
        key_len = len(key)
        while True:
            s = slots[i]
            if not s:
                return None
            e = s - 1
            if hashes[e] == h and key_lens[e] == key_len:
                location = locations[e]
                offset = location & 0xFFFFFFFF
                buf = self.maps[location >> 32]
                value_start = offset + RECORD_HEADER_SIZE + key_len
                end = value_start + value_lens[e]
                if self.verify_checksums:
                    crc, rtype, _ = checked_fields(buf, offset)
                    record = buf[offset + RECORD_CRC_FROM : end]  # exactly the bytes the crc covers
                    if crc32c(record) != crc or rtype != PUT:
                        # Also for another key of the same hash and length: genuine collisions
                        # are rare, a damaged key must not read as "missing".
                        raise CorruptionError(f"{self.paths[location >> 32]}: record checksum mismatch at offset {offset}")
                    if record.startswith(key, KEY_IN_CHECKED):
                        return record[KEY_IN_CHECKED + key_len :]
                elif buf[offset + RECORD_HEADER_SIZE : value_start] == key:
                    return buf[value_start:end]
            i += 1

    def contains(self, key: bytes) -> bool:
        """Whether the index has `key` (expired or not)."""
        return self.index.find(key, crc32c(key)) >= 0

    def log_position(self) -> tuple[int, int]:
        """(active segment, end of the data written to it)."""
        return self.writer.position

    # -- writing ---------------------------------------------------------------------------
    def log_put(self, key: bytes, value: bytes, expires_at: int) -> tuple[int, int]:
        """Append and index one PUT; return where it ends. The put path: flat on purpose."""
        seq = self.seq + 1
        data = encode_record(PUT, key, value, seq, 0, expires_at)
        segment, offset = self.append(data)
        self.seq = seq
        header = self.header
        header.bump()
        try:
            self.active_records.add(offset, PUT, len(key), len(value), seq, expires_at)
            self.index_record(PUT, key, (segment << 32) | offset, len(value), seq, expires_at)
        except BaseException as exc:
            self.index_failure = exc  # see index_batch
            raise
        finally:
            header.bump()
        return segment, offset + len(data)

    def write(self, batch: list, committing: bool = False) -> tuple[int, int]:
        """Append `batch` as one unit and apply it to the index; return where it ends.
        (A COMMIT record at its head is logged with it but stays out of the index.)"""
        end, index = self.log_batch(batch, committing)
        index()
        return end

    def log_batch(self, batch, committing: bool = False) -> tuple[tuple[int, int], Callable[[], None]]:
        """Append `batch` as one unit; return where it ends, and the function that applies it
        to the index. From the append until that function returns, the version is odd
        (clients' direct reads ask the worker); the caller holds the lock throughout."""
        seq = self.seq + 1
        if type(batch) is UniformPuts:
            types, keys, values, expires, key_lens, value_lens = batch.columns()
        else:
            types, keys, values, expires = zip(*batch)
            key_lens, value_lens = list(map(len, keys)), list(map(len, values))
        # (A big batch is encoded in one pass, column by column; a small one record by record.)
        data, relative = encode_columns(types, keys, values, expires, seq, key_lens, value_lens)
        segment, offset = self.append(data)
        self.seq = seq
        if committing:
            faults.point("shard.commit_logged")
        self.header.bump()
        return (segment, offset + len(data)), lambda: self.index_batch(segment, offset, relative, types, keys, expires, key_lens, value_lens, seq)

    def index_batch(self, segment: int, offset: int, relative: list, types, keys, expires, key_lens, value_lens, seq: int) -> None:
        """Point the index at the records of a batch just appended at `offset` of `segment`
        (`relative`: their offsets in the batch); then the version is even again. If this
        fails, the index no longer matches the log: the store takes no more writes and
        reports it through index_failure (its owner reopens it, which recovers from the log)."""
        try:
            n = len(types)
            columns = n >= COLUMNS_MIN
            base = segment << 32
            offsets = list(map(offset.__add__, relative))
            first = 1 if types[0] > DELETE else 0  # a COMMIT record heads a committed batch
            if not first and n > 1:
                self.sorted.note_batch(list(keys))  # scans must not show part of it
            self.active_records.add_batch(offsets, list(types), key_lens, value_lens, seq, list(expires))
            if columns and types.count(PUT) == n - first and expires.count(0) == n:
                # Only puts that never expire: indexed in one tight loop.
                keys = keys[first:]
                locations = list(map(base.__or__, offsets[first:]))
                added = self.index.upsert_many(keys, list(map(crc32c, keys)), locations, key_lens[first:], value_lens[first:], seq)
                if added:
                    self.sorted.insert_many([key for key, _ in added], [entry for _, entry in added])
                if self._expires:
                    self.expiry.forget(keys)  # these keys now never expire
            else:
                index_record = self.index_record
                for rtype, key, value_len, expires_at, record_offset in zip(types, keys, value_lens, expires, offsets):
                    index_record(rtype, key, base | record_offset, value_len, seq, expires_at)
        except BaseException as exc:
            self.index_failure = exc
            raise
        finally:
            self.header.bump()

    def index_record(self, rtype: int, key: bytes, location: int, value_len: int, seq: int, expires_at: int) -> None:
        """Point the index, the ordered view and the expiry table at one record just appended:
        the one place a write reaches them. The caller holds the lock with the version odd."""
        if rtype > DELETE:
            return  # a COMMIT record: it names a batch, not a key
        if rtype == PUT:
            if self.index.upsert(key, crc32c(key), location, len(key), value_len, seq):
                self.sorted.insert(key, self.index.last_entry)
        else:
            self._remove_key(key, crc32c(key))
        if expires_at or self._expires:
            self.expiry.note(key, expires_at)

    def _remove_key(self, key: bytes, h: int) -> bool:
        """Drop `key` from the index and the ordered view; True if it was there (version odd)."""
        e = self.index.find(key, h)
        if e < 0:
            return False
        self.index.remove(key, h)
        self.sorted.remove(e)
        return True

    def purge_expired(self, now: int | None = None) -> None:
        """Drop keys expired at `now` (ms; default: the clock) from the index (no tombstone:
        their records say they expired, so recovery and compaction drop them too)."""
        due = self.expiry.take_due(now)
        if not due:
            return
        self.header.bump()
        try:
            for key in due:
                self._remove_key(key, crc32c(key))
        finally:
            self.header.bump()

    def log_marker(self, rtype: int, txid: int, value: bytes) -> tuple[int, int]:
        """Append a PREPARE or ABORT record (outside the index); return where it ends."""
        seq = self.seq + 1
        data = encode_record(rtype, txid_key(txid), value, seq)
        segment, offset = self.append(data)
        self.seq = seq
        self.active_records.add(offset, rtype, 8, len(value), seq, 0)
        return segment, offset + len(data)

    def make_durable(self, end: tuple[int, int]) -> None:
        """fsync up to `end` if the durability level asks for it before a write returns."""
        if self.writer.durability == "fsync":
            self.writer.sync_upto(*end)

    def append(self, data: bytes) -> tuple[int, int]:
        """Append `data` to the log; return (segment, offset) where it starts."""
        if self.index_failure is not None:
            raise StorageError(f"shard {self.shard_id}: the index failed to take a logged batch ({self.index_failure!r}); reopen to recover")
        segment, offset = self.writer.append(data)
        if segment != self.active:
            self._start_active(segment)
        self.header.set_active_end(offset + len(data))  # before the index points at it
        return segment, offset

    def _start_active(self, segment: int) -> None:
        self.active = segment
        self.paths[segment] = os.path.join(self.directory, segment_name(segment))
        self.maps[segment] = map_file(self.paths[segment])
        self.active_records = ActiveRecords()
        self.header.new_active(segment, SEGMENT_HEADER_SIZE)  # before any index entry points into it

    def _on_seal(self, segment: int, end: int) -> None:
        """Writer callback: `segment` is sealed at `end` bytes; remap it and write its hint."""
        path = self.paths[segment]
        self.maps[segment] = buf = map_file(path)  # the old mapping covered the sparse tail
        self.ends[segment] = end
        try:
            write_hint(self.directory, self.shard_id, segment, end, self.active_records, buf)
        except OSError:
            pass  # a hint only speeds up open; the segment itself is intact
        self.active_records = ActiveRecords()

    def seal_active(self) -> None:
        """Seal the active segment (for compaction)."""
        if self.writer.seal():
            self._start_active(self.writer.position[0])

    # -- compaction (compaction.py) --------------------------------------------------------
    def compaction_inputs(self) -> CompactionInputs:
        """Take the lock, purge expired keys, seal the active segment, run `before_compaction`
        and return the sealed segments with a snapshot of the index: the first of the two calls
        a compaction makes. Every key's newest record is in an input then (the new active
        segment holds at most copies of PREPAREs)."""
        with self.lock:
            self.check_open()
            now = self.expiry.now_ms()  # one instant for the purge and for the log's verdict
            if self._expires:
                self.purge_expired(now)  # expired keys are not copied
            before = self.space()
            self.seal_active()
            if self.before_compaction is not None:
                self.before_compaction()
            numbers = sorted(self.ends)
            return CompactionInputs(
                numbers,
                {n: self.maps[n] for n in numbers},
                {n: self.paths[n] for n in numbers},
                {n: self.ends[n] for n in numbers},
                self.index.snapshot(),
                now,
                before,
                self.writer.reserve_segment_number,
            )

    def swap_compacted(self, inputs: list[int], outputs: dict[int, tuple], moves: tuple | None, repair: str | None) -> tuple[int | None, dict]:
        """Read compaction outputs instead of `inputs`: the second call of a compaction.

        outputs: segment -> (mapping, path, data length, ActiveRecords). moves: (entry ids, old
        locations, new locations) of the index entries that move, or None with `repair` (why
        the index disagreed with the log): the index is then rebuilt from the log.
        Returns (records moved, or None after a rebuild; space after)."""
        with self.lock:
            header = self.header
            header.bump()
            try:
                for number, (buf, path, end, _) in outputs.items():
                    self.maps[number], self.paths[number], self.ends[number] = buf, path, end
                header.bump_epoch()  # the inputs are deleted next: clients drop their mappings
                for number in inputs:
                    del self.maps[number], self.paths[number], self.ends[number]
                if repair is None:
                    moved = self.index.relocate(*moves)
                else:
                    try:
                        self._rebuild_index(repair, {number: output[3] for number, output in outputs.items()})
                    except BaseException as exc:
                        self.index_failure = exc  # no index to trust: writes stop until a reopen rebuilds it
                        raise
                    moved = None
            finally:
                header.bump()
            return moved, self.space()

    def _segment_tables(self, known: dict | None = None) -> dict[int, SegmentRecords]:
        """The record table of every segment the store reads (segment number -> table), from
        private state and the files, never from the index: the active segment's from the table
        kept while appending, `known` ones (segment -> ActiveRecords) from those, the others
        from their hints or their bytes."""
        known = known or {}
        tables = {}
        for number in sorted(self.ends):
            if number in known:
                tables[number] = SegmentRecords.from_active(known[number], self.maps[number])
            else:
                tables[number] = sealed_records(self.directory, self.shard_id, number, self.maps[number], self.paths[number], self.ends[number])
        tables[self.active] = SegmentRecords.from_active(self.active_records, self.maps[self.active])
        return tables

    def _rebuild_index(self, why: str, known: dict | None = None) -> None:
        """The index disagreed with the log (`why`): rebuild it from the log, as an open does,
        and publish it as a new table (clients map it by its new number; the old one is
        unlinked). Counted in index_repairs. The version is odd; `known` as for _segment_tables."""
        live, expiring = latest_state(self._segment_tables(known), self.expiry.now_ms())
        self.index.load(*live)
        # The ordered view names entry ids of the old table: build it again from the new one.
        if self.sorted.state == BUILDING:
            self.sorted.abandon_build()
        self.sorted.build_now(self.index.live_ids())
        self.expiry.reset(expiring)
        self.index_repairs += 1
        if self.log is not None:
            self.log.warning("index repaired", reason=why, keys=self.index.count, repairs=self.index_repairs)

    # -- ordered view ----------------------------------------------------------------------
    def entry_keys(self) -> tuple:
        """(locations, key_lens) of the index's entries (the arrays change when it grows)."""
        return self.index.locations, self.index.key_lens

    def _open_view(self) -> None:
        """Give the ordered view every key at open: the one saved by the last clean close if it
        describes exactly these keys, else sorted at once for a small shard, or in a background
        thread (writes go on meanwhile; an ordered read waits for it)."""
        ids = self.index.live_ids()
        saved = sortedkeys.load_view(self.directory, self.shard_id, self.seq, self.index.locations[ids])
        if saved is not None:
            self.sorted.load(ids[saved[0]], saved[1])
            return
        if len(ids) <= sortedkeys.SYNC_BUILD_MAX:
            self.sorted.build_now(ids)
            return
        # The thread reads keys through copies of the entry arrays and of the segment table:
        # writes and compactions change those, never the records the copies point at.
        locations, key_lens = self.index.locations.copy(), self.index.key_lens.copy()
        self.sorted.start_build(ids, KeySource(lambda: (locations, key_lens), dict(self.maps)))

    def view_ready(self) -> None:
        """Make the ordered view complete (after wait_built)."""
        view = self.sorted
        if view.state == READY:
            return
        self.header.bump()  # clients may be reading the view: it changes now
        try:
            if view.state == BUILDING:
                view.finish_build(self.index.live_ids)
            else:
                view.build_now(self.index.live_ids())
        finally:
            self.header.bump()

    def entry_items(self, eids: list) -> tuple[list, list]:
        """(keys, values) of index entries `eids`, checked (ipc/bulkread.py read_records: numpy, one
        CRC-32C call per run of records of one length)."""
        if len(eids) < 8 or not self.verify_checksums:
            return [list(t) for t in zip(*map(self._entry_item, eids))] or ([], [])
        index = self.index
        e = np.array(eids, dtype=np.int64)
        locations = index.locations[e]
        segments = (locations >> np.uint64(32)).astype(np.int64)
        buffers = {int(segment): self.maps[int(segment)] for segment in np.unique(segments).tolist()}
        try:
            items = read_records(buffers, segments, (locations & np.uint64(0xFFFFFFFF)).astype(np.int64), index.key_lens[e].astype(np.int64), index.value_lens[e].astype(np.int64), 0)
        except ValueError:
            return [list(t) for t in zip(*map(self._entry_item, eids))]  # one by one: names the damaged record
        return items.lists()

    def _entry_item(self, e: int) -> tuple[bytes, bytes]:
        """(key, value) of index entry `e`, its record's checksum verified."""
        location, key_len, value_len, _ = self.index.entry(e)
        offset = location & 0xFFFFFFFF
        buf = self.maps[location >> 32]
        record = buf[offset + RECORD_CRC_FROM : offset + RECORD_HEADER_SIZE + key_len + value_len]
        if self.verify_checksums and crc32c(record) != checked_fields(buf, offset)[0]:
            raise CorruptionError(f"{self.paths[location >> 32]}: record checksum mismatch at offset {offset}")
        return record[KEY_IN_CHECKED : KEY_IN_CHECKED + key_len], record[KEY_IN_CHECKED + key_len :]

    def _save_view(self) -> None:
        """Write the ordered view for the next open (docs/FORMAT.md, "Ordered view file"): big
        shards only, the others sort at once."""
        view = self.sorted
        if self.index_failure is not None or view.state != READY or self.index.count <= sortedkeys.SYNC_BUILD_MAX:
            return
        try:
            eids, prefixes = view.ordered_eids()
            sortedkeys.save_view(self.directory, self.shard_id, self.seq, eids, prefixes, self.index.locations[eids])
        except OSError:
            pass  # derived data: the next open sorts instead

    # -- state -----------------------------------------------------------------------------
    def space(self) -> dict:
        """keys, live_bytes, total_bytes, segments and garbage_ratio (as in stats())."""
        index = self.index
        ids = index.live_ids()
        live = int((index.key_lens[ids].astype(np.int64) + index.value_lens[ids] + RECORD_HEADER_SIZE).sum())
        ends = dict(self.ends)
        ends[self.active] = self.writer.position[1]
        total = sum(end - SEGMENT_HEADER_SIZE for end in ends.values())
        return {
            "keys": index.count,
            "live_bytes": live,
            "total_bytes": total,
            "segments": len(ends),
            "garbage_ratio": (1 - live / total) if total else 0.0,
        }

    def check_open(self) -> None:
        """Raise Closed if the store is closed."""
        if self.closed:
            raise Closed("the shard engine is closed")

    def close(self) -> None:
        """fsync, write the active segment's hint and the ordered view, unmap everything."""
        self.closed = True
        self.header.invalidate_private()  # scans part-way through read again, and find it closed
        try:
            self.writer.close()
            segment, end = self.writer.position
            try:
                if self.index_failure is None:  # else the record table may lack a logged batch: recovery reads the segment
                    write_hint(self.directory, self.shard_id, segment, end, self.active_records, self.maps[segment])
            except OSError:
                pass
            self._save_view()
        finally:
            self.sorted.close()  # a background build reads the mappings: it ends first
            unmap_all(self.maps)
