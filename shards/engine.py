"""ShardEngine: one shard served in-process — a log, a hash index and an ordered key view.

The path of a put: `put` checks its arguments, encodes one record (wal/records.py), appends it
with one write call (wal/writer.py), points the hash index at it (keyindex.py) and notes a new
key in the ordered view (sortedkeys.py). A get hashes the key, probes the index and slices the
value out of the segment's memory map, without taking the lock (see `get`).
"""

from __future__ import annotations

import fcntl
import heapq
import math
import os
import struct
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np
from crc32c import crc32c

from shardkv import faults
from shardkv.errors import Closed, Conflict, CorruptionError, Error, StorageError
from shardkv.ipc.messages import PutColumns
from shardkv.ipc import sortedview  # (imports shardkv.shards: used at run time only)
from shardkv.log import get_logger
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, MAX_KEY_LEN, check_key, check_scan_args, check_value, ttl_milliseconds
from shardkv.shards import compaction
from shardkv.shards.hints import ActiveRecords, SegmentRecords, write_hint
from shardkv.shards.keyindex import GOLDEN32, KeyIndex
from shardkv.shards.prepared import PreparedBatches, batch_keys, encode_prepare, txid_key
from shardkv.shards.recovery import latest_state, recover, sealed_records, unmap_all
from shardkv.shards import sortedkeys
from shardkv.shards.sortedkeys import BUILDING, READY, KeySource, SortedView, prefix_successor
from shardkv.shards.uniform import UniformPuts
from shardkv.wal import fileio
from shardkv.wal.format import ABORT, COMMIT, DELETE, MAX_VALUE_LEN_FORMAT, PREPARE, PUT, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, segment_name
from shardkv.wal.reader import map_file
from shardkv.wal.records import COLUMNS_MIN, encode_columns, encode_record
from shardkv.wal.watermark import Watermark
from shardkv.wal.writer import DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE, LogWriter, check_durability

LOCK_FILE = "LOCK"
MAX_BATCH_BYTES = MAX_SEGMENT_SIZE - SEGMENT_HEADER_SIZE
DEFER_MIN = 64  # apply_deferred answers before indexing from this many records of a batch
SCAN_FIRST = 64  # a scan reads this many keys first (min(), above() need one), then 4x more each time
SCAN_CHUNK = 4096  # up to this many
_RETRY = object()
_unpack_crc = struct.Struct("<I").unpack_from


class DirectoryLocked(Error):
    """Another engine (in this or another process) already has the shard directory open."""


class ShardEngine:
    """One shard of shardkv, served in-process. Thread-safe. Open with `ShardEngine.open()`."""

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        shard_id: int = 0,
        durability: str = "interval",
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        sync_interval: float = 1.0,
        verify_checksums: bool = True,
        clock: Callable[[], float] = time.time,
        shared_index=None,
    ) -> "ShardEngine":
        """Open (creating if needed) the shard stored in `directory` and recover its state.

        durability: "process", "interval" (default) or "fsync" (see wal/writer.py).
        segment_size: bytes at which the log rolls over to a new segment (default 64 MiB).
        max_value_size: largest value accepted (default 64 MiB).
        verify_checksums: check each record's CRC-32C when it is read (default True).
        clock: wall-clock time in seconds, for expiry (tests pass a controllable one).
        shared_index: an IndexPublisher (shardkv/ipc/sharedindex.py) when a worker serves the
        engine: the index then lives in shared memory, where clients read it.
        Raises CorruptionError if the log is damaged anywhere but a torn tail.
        """
        return cls(directory, shard_id, durability, segment_size, max_value_size, sync_interval, verify_checksums, clock, shared_index)

    def __init__(self, directory, shard_id, durability, segment_size, max_value_size, sync_interval, verify_checksums, clock=time.time, shared_index=None):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, not {type(directory).__name__}")
        check_durability(durability)
        _check_int("shard_id", shard_id, 0, 2**32 - 1)
        _check_int("segment_size", segment_size, 4096, MAX_SEGMENT_SIZE)
        _check_int("max_value_size", max_value_size, 0, MAX_VALUE_LEN_FORMAT)
        if isinstance(sync_interval, bool) or not isinstance(sync_interval, (int, float)) or not sync_interval > 0:
            raise ValueError(f"sync_interval must be a positive number of seconds, not {sync_interval!r}")
        self.directory = os.fspath(directory)
        self.shard_id = shard_id
        self.durability = durability
        self.segment_size = segment_size
        self.max_value_size = max_value_size
        self.verify_checksums = bool(verify_checksums)
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        self._clock = clock
        self._closed = True
        fileio.make_dir(self.directory)
        self._lock_fd = _lock_directory(self.directory)
        try:
            state = recover(self.directory, shard_id, segment_size, self._now_ms())
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.recovery = {"records": state.records_read, "torn_bytes": state.torn_bytes, "unsynced_records_dropped": state.unsynced_records_dropped, "seconds": state.seconds}
        self._log = log = get_logger("shardkv.shard", shard=shard_id, directory=self.directory)
        if state.torn_bytes:
            log.warning("torn tail truncated", segment=state.active, bytes=state.torn_bytes, end=state.active_end, unsynced_records_dropped=state.unsynced_records_dropped)
        log.info("recovered", records=state.records_read, keys=len(state.live[0]), seconds=round(state.seconds, 4))
        self._lock = threading.Lock()
        self._compaction_lock = threading.Lock()
        self._unfinished_compaction = None  # "committed"/"swapped" while a failed one awaits cleanup
        self._orphan_segments: list[int] = []  # on disk, never mapped: deleted by the next compaction
        self._compaction_progress = (0, 0)  # (records copied, records to copy) of the running one
        self._last_compaction: dict | None = None
        self.index_repairs = 0  # times the index was found to disagree with the log and rebuilt
        self._shared = shared_index
        # The seqlock of lock-free readers: odd while the index is being changed, bumped again
        # after; mirrored into shared memory for clients when there is a shared index.
        self._version_value = shared_index.start_version if shared_index is not None else 0
        self._maps = state.maps
        self._paths = state.paths
        self._ends = state.ends  # sealed segment -> data length
        self._active = state.active
        self._active_records = state.active_records
        self._seq = state.max_seq
        self._index = KeyIndex(self._key_at, tables=shared_index)
        self._index.load(*state.live)
        # The ordered view, kept current by every write (sortedkeys.py); built from the index now
        # for small shards, in a background thread for big ones.
        # With a shared index, the view's runs are published beside it for clients' scans.
        self._sorted = SortedView(KeySource(self._entry_keys, self._maps), sortedview.ViewPublisher(shared_index) if shared_index is not None else None)
        self._sorted.key_count = lambda: self._index.count
        self._open_view()
        # Keys that expire: key -> expires_at (ms), and a heap of (expires_at, key) that tells
        # which to purge first (entries whose time no longer matches the dict are stale).
        self._expires: dict[bytes, int] = dict(state.expiring)
        self._expiry_heap = [(at, key) for key, at in state.expiring]
        heapq.heapify(self._expiry_heap)
        # Cross-shard batches prepared here and not yet decided (docs/TRANSACTIONS.md).
        self._prepared = PreparedBatches()
        for txid, (batch, expects) in state.prepared.items():
            self._prepared.add(txid, batch, expects)
        try:
            self._writer = LogWriter(
                self.directory,
                shard_id,
                state.active,
                state.active_end,
                durability=durability,
                segment_size=segment_size,
                sync_interval=sync_interval,
                on_seal=self._on_seal,
                watermark=Watermark(self.directory),
            )
        except BaseException:
            unmap_all(self._maps)
            os.close(self._lock_fd)  # an engine that failed to open holds nothing
            raise
        self._writer.ensure_next_number(state.max_segment)
        if shared_index is not None:
            shared_index.set_active(state.active, state.active_end)
        try:
            self._writer.sync_and_publish()
        except BaseException:
            self._writer.close()
            unmap_all(self._maps)
            os.close(self._lock_fd)
            raise
        self._closed = False
        self._index_failure: BaseException | None = None  # the index failed to take a logged batch

    @property
    def _version(self) -> int:
        return self._version_value

    @_version.setter
    def _version(self, value: int) -> None:
        self._version_value = value
        if self._shared is not None:
            self._shared.set_version(value)

    # -- reading ---------------------------------------------------------------------------
    def _key_at(self, location: int, key_len: int) -> bytes:
        start = (location & 0xFFFFFFFF) + RECORD_HEADER_SIZE
        return self._maps[location >> 32][start : start + key_len]

    def _read(self, key: bytes):
        """The value of `key` or None. Callers either hold the lock or check `_version`.

        The index probe is inlined here (see KeyIndex.find) because this is the hottest path.
        """
        index = self._index
        h = crc32c(key)
        slots, hashes = index._slot_v, index._hash_v
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> index._shift
        key_len = len(key)
        while True:
            s = slots[i]
            if not s:
                return None
            e = s - 1
            if hashes[e] == h and index._klen_v[e] == key_len:
                location = index._loc_v[e]
                offset = location & 0xFFFFFFFF
                buf = self._maps[location >> 32]
                key_start = offset + RECORD_HEADER_SIZE
                value_start = key_start + key_len
                value_end = value_start + index._vlen_v[e]
                if self.verify_checksums:
                    # One slice from header_crc on: the stored crc covers exactly these bytes.
                    record = buf[offset + 4 : value_end]
                    if record.startswith(key, RECORD_HEADER_SIZE - 4):
                        if crc32c(record) != _unpack_crc(buf, offset)[0]:
                            raise CorruptionError(f"{self._paths[location >> 32]}: record checksum mismatch at offset {offset}")
                        return record[RECORD_HEADER_SIZE - 4 + key_len :]
                elif buf[key_start:value_start] == key:
                    return buf[value_start:value_end]
                if self.verify_checksums and crc32c(buf[offset + 4 : value_end]) != _unpack_crc(buf, offset)[0]:
                    # Same hash and length but another key: genuine collisions are rare, a
                    # damaged key must not read as "missing".
                    raise CorruptionError(f"{self._paths[location >> 32]}: record checksum mismatch at offset {offset}")
            i += 1

    def get(self, key, default=None):
        """Return the value of `key`, or `default` if it is absent."""
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_LEN:
            key = check_key(key)
        if self._closed:
            raise Closed("the shard engine is closed")
        # Lock-free first: the GIL makes each step atomic, and `_version` (odd while a writer
        # changes the index, bumped again after) tells whether a write overlapped this read.
        version = self._version
        if not version & 1:
            try:
                value = self._read(key)
            except (KeyError, IndexError, ValueError, TypeError, CorruptionError):
                value = _RETRY
            if value is not _RETRY and self._version == version:
                if value is None or (self._expires and self._expired(key)):
                    return default
                return value
        with self._lock:
            self._check_open()
            value = self._read(key)
        if value is None or (self._expires and self._expired(key)):
            return default
        return value

    # -- expiry ----------------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _expired(self, key: bytes) -> bool:
        at = self._expires.get(key)
        return at is not None and at <= self._now_ms()

    def _expiry_for(self, ttl) -> int:
        """The expires_at (ms) of a write with `ttl` seconds to live (0: never)."""
        return 0 if ttl is None else self._now_ms() + ttl_milliseconds(ttl)  # ttl() never reports more than asked

    def _note_expiry(self, key: bytes, expires_at: int) -> None:
        """Record the expiry of the newest write of `key` (0: it never expires). Lock held."""
        if expires_at:
            self._expires[key] = expires_at
            heapq.heappush(self._expiry_heap, (expires_at, key))
        elif self._expires:
            self._expires.pop(key, None)

    def _purge_expired(self, now: int | None = None) -> None:
        """Drop keys expired at `now` (ms; default: the clock) from the index (no tombstone:
        their records say they expired, so recovery and compaction drop them too). The caller
        holds the lock."""
        heap = self._expiry_heap
        if now is None:
            now = self._now_ms()
        if not heap or heap[0][0] > now:
            return
        self._version += 1
        try:
            while heap and heap[0][0] <= now:
                at, key = heapq.heappop(heap)
                if self._expires.get(key) == at:
                    del self._expires[key]
                    self._remove_key(key, crc32c(key))
        finally:
            self._version += 1

    def ttl(self, key):
        """Seconds left before `key` expires: None if it is absent, math.inf if it never expires."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if self._read(key) is None:
                return None
            at = self._expires.get(key)
            if at is None:
                return math.inf
            left = at - self._now_ms()
            return left / 1000 if left > 0 else None

    def expire(self, key, seconds) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if the key is absent."""
        key = check_key(key)
        expires_at = self._expiry_for(seconds)
        with self._lock:
            self._check_open()
            self._prepared.check_unlocked((key,))
            value = self._current(key)
            if value is None:
                return False
            end = self._write_locked([(PUT, key, value, expires_at)])
        self._make_durable(end)
        return True

    def get_many(self, keys) -> list:
        """The values of `keys` (None for a missing key), read together: one check for an
        overlapping write covers the whole batch."""
        keys = [k if type(k) is bytes and 0 < len(k) <= MAX_KEY_LEN else check_key(k) for k in keys]
        if self._closed:
            raise Closed("the shard engine is closed")
        version = self._version
        if not version & 1:
            try:
                values = [self._read(key) for key in keys]
            except (KeyError, IndexError, ValueError, TypeError, CorruptionError):
                values = None
            if values is not None and self._version == version:
                return self._hide_expired(keys, values)
        with self._lock:
            self._check_open()
            values = [self._read(key) for key in keys]
        return self._hide_expired(keys, values)

    def _hide_expired(self, keys: list, values: list) -> list:
        if self._expires:
            values = [None if v is not None and self._expired(k) else v for k, v in zip(keys, values)]
        return values

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        if self._expires:
            with self._lock:
                self._check_open()
                self._purge_expired()
        return self._index.count

    # -- writing ---------------------------------------------------------------------------
    def put(self, key, value, ttl=None) -> None:
        """Set `key` to `value`; with `ttl`, the key expires that many seconds from now."""
        key = check_key(key)
        value = check_value(value, self.max_value_size, "max_value_size")
        expires_at = self._expiry_for(ttl)
        with self._lock:
            self._check_open()
            if self._prepared.locks:
                self._prepared.check_unlocked((key,))
            seq = self._seq + 1
            data = encode_record(PUT, key, value, seq, 0, expires_at)
            segment, offset = self._append(data)
            self._seq = seq
            self._version += 1
            try:
                self._active_records.add(offset, PUT, len(key), len(value), seq, expires_at)
                self._index_record(PUT, key, (segment << 32) | offset, len(value), seq, expires_at)
            except BaseException as exc:
                self._index_failure = exc  # see _index_batch
                raise
            finally:
                self._version += 1
        if self.durability == "fsync":
            self._writer.sync_upto(segment, offset + len(data))

    def delete(self, key) -> bool:
        """Remove `key`; return True if it was present."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            self._prepared.check_unlocked((key,))
            if self._expires:
                self._purge_expired()
            if self._index.find(key, crc32c(key)) < 0:
                return False
            end = self._write_locked([(DELETE, key, b"", 0)])
        self._make_durable(end)
        return True

    def cas(self, key, expected, new) -> bool:
        """Set `key` to `new` only if its value is `expected`; return whether it was set.

        `expected=None`: the key must be absent. `new=None`: delete the key.
        """
        key = check_key(key)
        if expected is not None:
            expected = check_value(expected, MAX_VALUE_LEN_FORMAT)
        if new is not None:
            new = check_value(new, self.max_value_size, "max_value_size")
        with self._lock:
            self._check_open()
            self._prepared.check_unlocked((key,))
            current = self._current(key)
            if current != expected:
                return False
            if new is None:
                if current is None:
                    return True
                end = self._write_locked([(DELETE, key, b"", 0)])
            else:
                end = self._write_locked([(PUT, key, new, 0)])
        self._make_durable(end)
        return True

    def apply(self, ops: Iterable, expects: Iterable = ()) -> None:
        """Apply ("put", key, value[, ttl]) and ("delete", key) operations atomically, in order.

        expects: (key, value) pairs that must all hold first (value None: the key is absent);
        if one does not, nothing is written and Conflict is raised.
        """
        self._apply(ops, expects, defer=False)

    def put_records(self, records: Iterable) -> int:
        """Write (key, value, expires_at) puts atomically, as one batch, each expiring at the
        instant `expires_at` (milliseconds since the epoch, 0: never) exactly as given rather
        than after a TTL counted from now: for tools that copy records from another store
        (`shardkv salvage`). Records already expired are skipped. Returns how many were written."""
        now = self._now_ms()
        batch = []
        for key, value, expires_at in records:
            key, value = check_key(key), check_value(value, self.max_value_size)
            _check_int("expires_at", expires_at, 0, 2**64 - 1)
            if expires_at == 0 or expires_at > now:
                batch.append((PUT, key, value, expires_at))
        if sum(RECORD_HEADER_SIZE + len(key) + len(value) for _, key, value, _ in batch) > MAX_BATCH_BYTES:
            raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
        if not batch:
            return 0
        with self._lock:
            self._check_open()
            if self._prepared.locks:
                self._prepared.check_unlocked(batch_keys(batch))
            end = self._write_locked(batch)
        self._make_durable(end)
        return len(batch)

    def apply_deferred(self, ops: Iterable, expects: Iterable = ()) -> Callable[[], None] | None:
        """`apply` for a shard worker that answers before it indexes. A batch of DEFER_MIN or
        more operations without preconditions, at a durability other than "fsync", returns as
        soon as it is logged, with the engine's lock still held and the shared index's version
        odd (clients' direct reads ask the worker meanwhile); the function returned indexes it
        and releases the lock, and must run before anything else uses the engine. Any other
        batch is applied as `apply` does, and None is returned."""
        return self._apply(ops, expects, defer=True)

    def _apply(self, ops: Iterable, expects: Iterable, defer: bool) -> Callable[[], None] | None:
        batch = self._check_ops(ops)
        expects = _check_expects(expects)
        self._check_open()
        if not batch and not expects:
            return None
        deferred = None
        self._lock.acquire()
        try:
            self._check_open()
            if self._prepared.locks:
                self._prepared.check_unlocked([*batch_keys(batch), *(key for key, _ in expects)])
            self._check_expects_locked(expects)
            if not batch:
                return None
            end, index = self._log_locked(batch)
            if not expects and self._answers_early(defer, batch):
                deferred = self._then_unlock(index)
                return deferred
            index()
        finally:
            if deferred is None:
                self._lock.release()
        self._make_durable(end)
        return None

    def _answers_early(self, defer: bool, batch) -> bool:
        """Whether a deferred write may be answered before it is indexed: a big batch, unless
        every write is fsynced before its answer."""
        return defer and len(batch) >= DEFER_MIN and self.durability != "fsync"

    def _then_unlock(self, index: Callable[[], None]) -> Callable[[], None]:
        """`index`, then the engine's lock released (taken by the deferred write)."""

        def finish() -> None:
            try:
                index()
            finally:
                self._lock.release()

        return finish

    def _current(self, key: bytes):
        """The value of `key` (None if absent or expired); the caller holds the lock."""
        value = self._read(key)
        if value is not None and self._expires and self._expired(key):
            return None
        return value

    def _check_expects_locked(self, expects: list) -> None:
        for key, expected in expects:
            current = self._current(key)
            if current != expected:
                state = "absent" if current is None else f"{len(current)} bytes"
                raise Conflict(f"precondition failed: key {key[:40]!r} is {state}, not {'absent' if expected is None else repr(expected[:40])}")

    # -- cross-shard batches (docs/TRANSACTIONS.md) ----------------------------------------
    def prepare(self, txid: int, ops: Iterable, expects: Iterable = ()) -> None:
        """Phase one of cross-shard batch `txid` on this shard: check `expects`, lock every key
        named, and log the writes in a PREPARE record (durable at the engine's level when this
        returns). Raises Conflict if a precondition fails or Busy if another prepared batch
        locks a key; then nothing is logged or locked. Preparing a batch twice is a no-op."""
        _check_int("txid", txid, 0, 2**64 - 1)
        batch = self._check_ops(ops)
        expects = _check_expects(expects)
        self._check_open()
        with self._lock:
            self._check_open()
            if txid in self._prepared.batches:
                return
            self._prepared.check_unlocked([*batch_keys(batch), *(key for key, _ in expects)])
            self._check_expects_locked(expects)
            end = self._log_marker(PREPARE, txid, encode_prepare(batch, expects))
            self._prepared.add(txid, batch, expects)
        self._make_durable(end)

    def commit(self, txid: int) -> bool:
        """Phase two: apply prepared batch `txid` (one batch: a COMMIT record, then its writes)
        and release its locks. False if no such batch is prepared here (already settled)."""
        return self._commit(txid, defer=False)[0]

    def commit_deferred(self, txid: int) -> tuple[bool, Callable[[], None] | None]:
        """`commit` for a shard worker that answers before it indexes, as `apply_deferred`
        does: (settled, the function that indexes the batch and releases the lock, or None)."""
        return self._commit(txid, defer=True)

    def _commit(self, txid: int, defer: bool) -> tuple[bool, Callable[[], None] | None]:
        deferred = None
        self._lock.acquire()
        try:
            self._check_open()
            entry = self._prepared.batches.get(txid)
            if entry is None:
                return False, None
            batch = entry[0]
            if type(batch) is UniformPuts:
                batch = batch.headed(COMMIT, txid_key(txid))
            else:
                batch = [(COMMIT, txid_key(txid), b"", 0)] + batch
            try:
                end, index = self._log_locked(batch, committing=True)
            except StorageError as exc:
                self._prepared.stalled[txid] = str(exc)  # writes to its keys fail StorageError, not Busy
                raise
            if self._answers_early(defer, batch):
                # Its locks go now, so that the worker publishes the count before answering;
                # clients still cannot read these keys: the version stays odd until indexed.
                self._prepared.pop(txid)
                deferred = self._then_unlock(index)
                return True, deferred
            index()
            self._prepared.pop(txid)
        finally:
            if deferred is None:
                self._lock.release()
        self._make_durable(end)
        return True, None

    def abort(self, txid: int) -> bool:
        """Drop prepared batch `txid` (logging an ABORT record) and release its locks; False if
        no such batch is prepared here. If the disk refuses the ABORT record (full), the batch
        is dropped all the same: an aborted batch is never committed, and a PREPARE left
        undecided in the log is aborted again after a restart, when the coordinator, which
        logged no COMMIT for it, is asked (presumed abort, docs/TRANSACTIONS.md). Its keys must
        not stay locked until space comes back: writes to them would wait, then fail Busy."""
        with self._lock:
            self._check_open()
            if txid not in self._prepared.batches:
                return False
            try:
                end = self._log_marker(ABORT, txid, b"")
            except StorageError as exc:
                self._prepared.pop(txid)
                self._log.warning("abort not logged; the batch is dropped (presumed abort settles it after a restart)", txid=txid, error=str(exc))
                return True
            self._prepared.pop(txid)
        self._make_durable(end)
        return True

    def prepared(self) -> list[int]:
        """The ids of the batches prepared here and awaiting their decision."""
        with self._lock:
            return list(self._prepared.batches)

    def locked(self, key: bytes) -> bool:
        """Whether a prepared batch locks `key` (reads of it wait for the decision)."""
        return key in self._prepared.locks

    def _log_marker(self, rtype: int, txid: int, value: bytes) -> tuple[int, int]:
        """Append a PREPARE or ABORT record (outside the index); the caller holds the lock."""
        seq = self._seq + 1
        data = encode_record(rtype, txid_key(txid), value, seq)
        segment, offset = self._append(data)
        self._seq = seq
        self._active_records.add(offset, rtype, 8, len(value), seq, 0)
        return segment, offset + len(data)

    def _carry_prepared(self) -> None:
        """Log every undecided PREPARE again in the (new) active segment and fsync it, so that
        a compaction of the sealed segments cannot drop it; the caller holds the lock."""
        for txid, (batch, expects) in self._prepared.batches.items():
            end = self._log_marker(PREPARE, txid, encode_prepare(batch, expects))
        # The copies replace PREPAREs in sealed (fsynced) segments that the compaction deletes:
        # they must be as durable before it commits, whatever the durability level.
        self._writer.sync_upto(*end)

    def _check_ops(self, ops) -> list | UniformPuts:
        """The checked batch of `ops`: (PUT/DELETE, key, value, expires_at) tuples, or, for puts
        a worker decoded as columns, UniformPuts (checked as a whole: one size for all)."""
        if type(ops) is PutColumns:
            n = len(ops.keys)
            if not 0 < ops.key_len <= MAX_KEY_LEN or ops.value_len > self.max_value_size:
                check_key(ops.keys[0])
                check_value(ops.values[0], self.max_value_size, "max_value_size")
            if n * (RECORD_HEADER_SIZE + ops.key_len + ops.value_len) > MAX_BATCH_BYTES:
                raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
            return UniformPuts(ops.keys, ops.values, ops.key_len, ops.value_len)
        if isinstance(ops, (str, bytes, bytearray, memoryview)) or not isinstance(ops, Iterable):
            raise TypeError(f"ops must be an iterable of operation tuples, not {type(ops).__name__}")
        batch = []
        size = 0
        max_value = self.max_value_size
        for op in ops:
            if type(op) is tuple and len(op) == 3 and op[0] == "put" and type(op[1]) is bytes and type(op[2]) is bytes:
                key, value = op[1], op[2]  # the common case, checked inline
                if not 0 < len(key) <= MAX_KEY_LEN or len(value) > max_value:
                    key, value = check_key(key), check_value(value, max_value, "max_value_size")
                batch.append((PUT, key, value, 0))
            elif not isinstance(op, (tuple, list)) or not op:
                raise TypeError(f"each op must be a tuple like ('put', key, value) or ('delete', key), not {op!r:.80}")
            elif op[0] == "put" and len(op) in (3, 4):
                key, value = check_key(op[1]), check_value(op[2], max_value, "max_value_size")
                batch.append((PUT, key, value, self._expiry_for(op[3]) if len(op) == 4 else 0))
            elif op[0] == "delete" and len(op) == 2:
                key, value = check_key(op[1]), b""
                batch.append((DELETE, key, b"", 0))
            else:
                raise ValueError(f"unknown op {op!r:.80}: expected ('put', key, value[, ttl]) or ('delete', key)")
            size += RECORD_HEADER_SIZE + len(key) + len(value)
        if size > MAX_BATCH_BYTES:
            raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
        return batch

    def _write_locked(self, batch: list, committing: bool = False) -> tuple[int, int]:
        """Append `batch` as one unit and apply it to the index; the caller holds the lock.
        (A COMMIT record at its head is logged with it but stays out of the index.)"""
        end, index = self._log_locked(batch, committing)
        index()
        return end

    def _log_locked(self, batch: list, committing: bool = False) -> tuple[tuple[int, int], Callable[[], None]]:
        """Append `batch` as one unit; return where it ends, and the function that applies it
        to the index. From the append until that function returns, the shared version is odd
        (clients' direct reads ask the worker); the caller holds the lock throughout."""
        seq = self._seq + 1
        if type(batch) is UniformPuts:
            types, keys, values, expires, key_lens, value_lens = batch.columns()
        else:
            types, keys, values, expires = zip(*batch)
            key_lens, value_lens = list(map(len, keys)), list(map(len, values))
        # (A big batch is encoded in one pass, column by column; a small one record by record.)
        data, relative = encode_columns(types, keys, values, expires, seq, key_lens, value_lens)
        segment, offset = self._append(data)
        self._seq = seq
        if committing:
            faults.point("shard.commit_logged")
        self._version += 1
        return (segment, offset + len(data)), lambda: self._index_batch(segment, offset, relative, types, keys, expires, key_lens, value_lens, seq)

    def _index_batch(self, segment: int, offset: int, relative: list, types, keys, expires, key_lens, value_lens, seq: int) -> None:
        """Point the index at the records of a batch just appended at `offset` of `segment`
        (`relative`: their offsets in the batch); then the shared version is even again. If
        this fails, the index no longer matches the log: the engine takes no more writes and
        reports it through write_failure (its owner reopens it, which recovers from the log)."""
        try:
            n = len(types)
            columns = n >= COLUMNS_MIN
            base = segment << 32
            offsets = list(map(offset.__add__, relative))
            first = 1 if types[0] > DELETE else 0  # a COMMIT record heads a committed batch
            if not first and n > 1:
                self._sorted.note_batch(list(keys))  # scans must not show part of it
            self._active_records.add_batch(offsets, list(types), key_lens, value_lens, seq, list(expires))
            if columns and types.count(PUT) == n - first and expires.count(0) == n:
                # Only puts that never expire: indexed in one tight loop.
                keys = keys[first:]
                locations = list(map(base.__or__, offsets[first:]))
                added = self._index.upsert_many(keys, list(map(crc32c, keys)), locations, key_lens[first:], value_lens[first:], seq)
                if added:
                    self._sorted.insert_many([key for key, _ in added], [entry for _, entry in added])
                if self._expires:  # these keys now never expire
                    pop = self._expires.pop
                    for key in keys:
                        pop(key, None)
            else:
                index_record = self._index_record
                for rtype, key, value_len, expires_at, record_offset in zip(types, keys, value_lens, expires, offsets):
                    index_record(rtype, key, base | record_offset, value_len, seq, expires_at)
        except BaseException as exc:
            self._index_failure = exc
            raise
        finally:
            self._version += 1

    def _index_record(self, rtype: int, key: bytes, location: int, value_len: int, seq: int, expires_at: int) -> None:
        """Point the index, the ordered view and the expiry table at one record just appended:
        the one place a write reaches them. The caller holds the lock with `_version` odd."""
        if rtype > DELETE:
            return  # a COMMIT record: it names a batch, not a key
        if rtype == PUT:
            if self._index.upsert(key, crc32c(key), location, len(key), value_len, seq):
                self._sorted.insert(key, self._index.last_entry)
        else:
            self._remove_key(key, crc32c(key))
        if expires_at or self._expires:
            self._note_expiry(key, expires_at)

    def _remove_key(self, key: bytes, h: int) -> bool:
        """Drop `key` from the index and the ordered view; True if it was there. Lock held,
        version odd."""
        e = self._index.find(key, h)
        if e < 0:
            return False
        self._index.remove(key, h)
        self._sorted.remove(e)
        return True

    def _make_durable(self, end: tuple[int, int]) -> None:
        if self.durability == "fsync":
            self._writer.sync_upto(*end)

    def _append(self, data: bytes) -> tuple[int, int]:
        if self._index_failure is not None:
            raise StorageError(f"shard {self.shard_id}: the index failed to take a logged batch ({self._index_failure!r}); reopen to recover")
        segment, offset = self._writer.append(data)
        if segment != self._active:
            self._start_active(segment)
        if self._shared is not None:
            self._shared.set_active_end(offset + len(data))  # before the index points at it
        return segment, offset

    def _start_active(self, segment: int) -> None:
        self._active = segment
        self._paths[segment] = os.path.join(self.directory, segment_name(segment))
        self._maps[segment] = map_file(self._paths[segment])
        self._active_records = ActiveRecords()
        if self._shared is not None:
            # Before any index entry points into it: clients read the active segment only below
            # the published end (it shrinks to its end when it is sealed).
            self._version += 1
            self._shared.set_active(segment, SEGMENT_HEADER_SIZE)
            self._version += 1

    def _on_seal(self, segment: int, end: int) -> None:
        """Writer callback: `segment` is sealed at `end` bytes; remap it and write its hint."""
        path = self._paths[segment]
        self._maps[segment] = buf = map_file(path)  # the old mapping covered the sparse tail
        self._ends[segment] = end
        try:
            write_hint(self.directory, self.shard_id, segment, end, self._active_records, buf)
        except OSError:
            pass  # a hint only speeds up open; the segment itself is intact
        self._active_records = ActiveRecords()

    def _seal_active(self) -> None:
        """Seal the active segment (for compaction); the caller holds the lock."""
        if self._writer.seal():
            self._start_active(self._writer.position[0])

    # -- ordered reads ---------------------------------------------------------------------
    def _entry_keys(self) -> tuple:
        """(locations, key_lens) of the index's entries (the arrays change when it grows)."""
        return self._index.locations, self._index.key_lens

    def _open_view(self) -> None:
        """Give the ordered view every key at open: the one saved by the last clean close if it
        describes exactly these keys, else sorted at once for a small shard, or in a background
        thread (writes go on meanwhile; an ordered read waits for it)."""
        ids = self._index.live_ids()
        saved = sortedkeys.load_view(self.directory, self.shard_id, self._seq, self._index.locations[ids])
        if saved is not None:
            self._sorted.load(ids[saved[0]], saved[1])
            return
        if len(ids) <= sortedkeys.SYNC_BUILD_MAX:
            self._sorted.build_now(ids)
            return
        # The thread reads keys through copies of the entry arrays and of the segment table:
        # writes and compactions change those, never the records the copies point at.
        locations, key_lens = self._index.locations.copy(), self._index.key_lens.copy()
        self._sorted.start_build(ids, KeySource(lambda: (locations, key_lens), dict(self._maps)))

    def _view_ready(self) -> None:
        """Make the ordered view complete; the caller holds the lock (after wait_built)."""
        view = self._sorted
        if view.state == READY:
            return
        self._version += 1  # clients may be reading the view: it changes now
        try:
            if view.state == BUILDING:
                view.finish_build(self._index.live_ids)
            else:
                view.build_now(self._index.live_ids())
        finally:
            self._version += 1

    def batch_history(self) -> tuple[int, list]:
        """The single-shard batches applied so far and the key range of the last few, for scans
        through a worker's ring (SortedView.history)."""
        return self._sorted.history()

    def view_sorting(self) -> bool:
        """Whether the ordered view is still being sorted in the background (after a crash): an
        ordered read now would wait for it (a worker answers Busy instead of waiting)."""
        return self._sorted.state == BUILDING and not self._sorted.wait_built(0)

    def scan(self, start=None, stop=None, reverse=False, prefix=None, limit=None) -> Iterator[tuple[bytes, bytes]]:
        """Yield (key, value) in key order with start <= key < stop (descending if `reverse`).

        `prefix` keeps only keys that start with it; `limit` caps the number of items. The scan
        is a cursor over the live data: each item is the next key present when it is reached,
        with its value then (keys are read in chunks, each chunk again if a write came between
        two items); a key written ahead of the cursor meanwhile shows, one deleted does not.
        """
        start, stop, prefix = check_scan_args(start, stop, prefix, limit)
        if prefix:
            if start is None or start < prefix:
                start = prefix
            successor = prefix_successor(prefix)
            if successor is not None and (stop is None or successor < stop):
                stop = successor
        self._check_open()
        return self._scan(start, stop, bool(reverse), limit)

    def _scan(self, start, stop, reverse, limit):
        if limit == 0 or (start is not None and stop is not None and start >= stop):
            return
        cursor, bound = (stop, start) if reverse else (start, stop)
        inclusive = not reverse  # a reverse scan starts below `stop`, a forward one at `start`
        size = SCAN_FIRST if limit is None else min(SCAN_FIRST, limit)
        produced = 0
        version_of = self.__dict__.get
        while True:
            items, more, version = self._scan_window(cursor, inclusive, bound, reverse, size)
            for item in zip(*items):  # zip's one tuple is reused when the caller lets it go
                if version_of("_version_value") != version:
                    size = SCAN_FIRST  # a write came: read again from the cursor
                    break
                yield item
                produced += 1
                if limit is not None and produced >= limit:
                    return
                cursor, inclusive = item[0], False
            else:
                if not more and version_of("_version_value") == version:
                    return  # nothing left, and nothing written since it was read
                size = min(size * 4, SCAN_CHUNK)

    def _scan_window(self, cursor, inclusive, bound, reverse, size) -> tuple[list, bool, int]:
        """The next (key, value) items of a scan from `cursor`, read with the lock held:
        (items, more, the version they were read at)."""
        if self._sorted.state == BUILDING:
            self._sorted.wait_built()  # without the lock: writes go on meanwhile
        with self._lock:
            self._check_open()
            if self._expires:
                self._purge_expired()
            self._view_ready()
            eids, more = self._sorted.window(cursor, inclusive, bound, reverse, size)
            return self._entry_items(eids), more, self._version_value

    def _entry_items(self, eids: list) -> tuple[list, list]:
        """(keys, values) of index entries `eids`, checked (sortedview.read_records: numpy, one
        CRC-32C call per run of records of one length). Lock held."""
        if len(eids) < 8 or not self.verify_checksums:
            return [list(t) for t in zip(*map(self._entry_item, eids))] or ([], [])
        index = self._index
        e = np.array(eids, dtype=np.int64)
        locations = index.locations[e]
        segments = (locations >> np.uint64(32)).astype(np.int64)
        buffers = {int(segment): self._maps[int(segment)] for segment in np.unique(segments).tolist()}
        try:
            items = sortedview.read_records(buffers, segments, (locations & np.uint64(0xFFFFFFFF)).astype(np.int64), index.key_lens[e].astype(np.int64), index.value_lens[e].astype(np.int64), 0)
        except ValueError:
            return [list(t) for t in zip(*map(self._entry_item, eids))]  # one by one: names the damaged record
        return items.lists()

    def _entry_item(self, e: int) -> tuple[bytes, bytes]:
        """(key, value) of index entry `e`, its record's checksum verified. Lock held."""
        index = self._index
        location = index._loc_v[e]
        key_len = index._klen_v[e]
        offset = location & 0xFFFFFFFF
        buf = self._maps[location >> 32]
        value_end = offset + RECORD_HEADER_SIZE + key_len + index._vlen_v[e]
        record = buf[offset + 4 : value_end]
        if self.verify_checksums and crc32c(record) != _unpack_crc(buf, offset)[0]:
            raise CorruptionError(f"{self._paths[location >> 32]}: record checksum mismatch at offset {offset}")
        return record[RECORD_HEADER_SIZE - 4 : RECORD_HEADER_SIZE - 4 + key_len], record[RECORD_HEADER_SIZE - 4 + key_len :]

    def min(self):
        """(key, value) of the smallest key, or None if the shard is empty."""
        return next(self.scan(limit=1), None)

    def max(self):
        """(key, value) of the largest key, or None if the shard is empty."""
        return next(self.scan(reverse=True, limit=1), None)

    def above(self, key):
        """(key, value) of the smallest key strictly greater than `key`, or None."""
        key = check_key(key)
        for found in self.scan(start=key, limit=2):
            if found[0] != key:
                return found
        return None

    def below(self, key):
        """(key, value) of the largest key strictly less than `key`, or None."""
        key = check_key(key)
        return next(self.scan(stop=key, reverse=True, limit=1), None)

    # -- maintenance -----------------------------------------------------------------------
    def _space(self) -> dict:
        index = self._index
        ids = index.live_ids()
        live = int((index.key_lens[ids].astype(np.int64) + index.value_lens[ids] + RECORD_HEADER_SIZE).sum())
        ends = dict(self._ends)
        ends[self._active] = self._writer.position[1]
        total = sum(end - SEGMENT_HEADER_SIZE for end in ends.values())
        return {
            "keys": index.count,
            "live_bytes": live,
            "total_bytes": total,
            "segments": len(ends),
            "garbage_ratio": (1 - live / total) if total else 0.0,
        }

    def stats(self) -> dict:
        """keys, live_bytes, total_bytes, segments, garbage_ratio, index_bytes, seq, durability,
        last_fsync_age, compaction, recovery and in_doubt (prepared batches awaiting a decision)."""
        with self._lock:
            self._check_open()
            stats = self._space()
            stats["index_bytes"] = self._index.nbytes + self._sorted.nbytes
            stats["seq"] = self._seq
            stats["durability"] = self.durability
            stats["last_fsync_age"] = round(max(0.0, time.time() - self._writer.last_sync), 3)
            running = self._compaction_lock.locked()
            done, total = self._compaction_progress if running else (0, 0)
            stats["compaction"] = {"running": running, "done": done, "total": total, "last": self._last_compaction}
            stats["recovery"] = dict(self.recovery)
            stats["in_doubt"] = len(self._prepared)
            stats["index_repairs"] = self.index_repairs
            return stats

    def _segment_tables(self, known: dict | None = None) -> dict[int, SegmentRecords]:
        """The record table of every segment the engine reads (segment number -> table), from
        private state and the files, never from the index: the active segment's from the table
        kept while appending, `known` ones (segment -> ActiveRecords) from those, the others
        from their hints or their bytes. The caller holds the lock."""
        known = known or {}
        tables = {}
        for number in sorted(self._ends):
            if number in known:
                tables[number] = SegmentRecords.from_active(known[number], self._maps[number])
            else:
                tables[number] = sealed_records(self.directory, self.shard_id, number, self._maps[number], self._paths[number], self._ends[number])
        tables[self._active] = SegmentRecords.from_active(self._active_records, self._maps[self._active])
        return tables

    def _rebuild_index_locked(self, why: str, known: dict | None = None) -> None:
        """The index disagreed with the log (`why`): rebuild it from the log, as an open does,
        and publish it as a new table (clients map it by its new number; the old one is
        unlinked). Logged and counted in stats()["index_repairs"]. The caller holds the lock
        with `_version` odd; `known` as for _segment_tables."""
        live, expiring = latest_state(self._segment_tables(known), self._now_ms())
        self._index.load(*live)
        # The ordered view names entry ids of the old table: build it again from the new one.
        if self._sorted.state == BUILDING:
            self._sorted.abandon_build()
        self._sorted.build_now(self._index.live_ids())
        self._expires = dict(expiring)
        self._expiry_heap = [(at, key) for key, at in expiring]
        heapq.heapify(self._expiry_heap)
        self.index_repairs += 1
        self._log.warning("index repaired", reason=why, keys=self._index.count, repairs=self.index_repairs)

    def index_problem(self) -> str | None:
        """What a quick look finds wrong with the index (KeyIndex.quick_problem), or None. The
        next compaction compares every entry with the log and rebuilds the index if they
        disagree; a shard worker runs one as soon as this finds something."""
        with self._lock:
            self._check_open()
            return self._index.quick_problem()

    def compact(self) -> dict:
        """Rewrite the live records of all sealed segments (and the active one, sealed first)
        into new segments and drop the old ones. Reads and writes continue meanwhile.

        Returns {"before": space, "after": space, "seconds": ..., ...} with space as in stats().
        """
        with self._compaction_lock:
            if self._index_failure is not None:  # it keeps what the index points at: not now
                raise StorageError(f"shard {self.shard_id}: the index failed to take a logged batch; reopen to recover")
            result = compaction.compact(self)
            self._last_compaction = result
            return result

    def write_failure(self) -> str | None:
        """Why the log stopped accepting writes (a failed write or fsync, or an index that failed
        to take a logged batch), or None. Writes then raise StorageError until the shard is
        reopened, which recovers from what is on disk."""
        failure = self._writer.failure
        if failure is None and self._index_failure is not None:
            return f"the index failed to take a logged batch: {self._index_failure!r}"
        return None if failure is None else repr(failure)

    def sync(self) -> None:
        """fsync everything written so far, whatever the durability level."""
        self._check_open()
        self._writer.sync()

    def close(self) -> None:
        """fsync, write the active segment's hint and release the directory. Idempotent."""
        with self._compaction_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._version_value += 1  # scans part-way through read again, and find it closed
            try:
                self._writer.close()
                segment, end = self._writer.position
                try:
                    if self._index_failure is None:  # else the record table may lack a logged batch: recovery reads the segment
                        write_hint(self.directory, self.shard_id, segment, end, self._active_records, self._maps[segment])
                except OSError:
                    pass
                self._save_view()
            finally:
                self._sorted.close()  # a background build reads the mappings: it ends first
                unmap_all(self._maps)
                os.close(self._lock_fd)

    def _save_view(self) -> None:
        """Write the ordered view for the next open (docs/FORMAT.md, "Ordered view file"): big
        shards only, the others sort at once."""
        view = self._sorted
        if self._index_failure is not None or view.state != READY or self._index.count <= sortedkeys.SYNC_BUILD_MAX:
            return
        try:
            eids, prefixes = view.ordered_eids()
            sortedkeys.save_view(self.directory, self.shard_id, self._seq, eids, prefixes, self._index.locations[eids])
        except OSError:
            pass  # derived data: the next open sorts instead

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the shard engine is closed")

    def __enter__(self) -> "ShardEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} keys"
        return f"<ShardEngine {self.directory!r} shard {self.shard_id}, {state}>"


def _check_expects(expects) -> list:
    """Validated (key, value or None) preconditions."""
    if isinstance(expects, (str, bytes, bytearray, memoryview)) or not isinstance(expects, Iterable):
        raise TypeError(f"expects must be an iterable of (key, value) pairs, not {type(expects).__name__}")
    checked = []
    for item in expects:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"each expectation must be a (key, value) pair, not {item!r:.80}")
        checked.append((check_key(item[0]), None if item[1] is None else check_value(item[1], MAX_VALUE_LEN_FORMAT)))
    return checked


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high}, not {value}" if high else f"{name} must be >= {low}, not {value}")


def _lock_directory(directory: str) -> int:
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, fileio.FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryLocked(f"{directory} is already open in another ShardEngine") from None
    return fd
