"""ShardEngine: one shard served in-process - a small facade over the parts that do the work.

- the store (store.py): segments, log writer, hash index and ordered view, kept in step under
  one lock, with the seqlock version its lock-free readers check (indexheader.py);
- the expiry table (expiry.py): which keys expire, and when;
- the participant (participant.py): cross-shard batches prepared here (two-phase commit);
- the compactor (compaction.py): rewrites sealed segments, through two calls to the store;
- the ordered reads (ordered.py): scans, min, max, above, below, in windows of the view;
- the batch writes (batchwrites.py): atomic batches and the two phases of cross-shard ones
  under the lock, answered before they are indexed when a worker asks (`*_deferred`);
- the batch checks (batchcheck.py): every batch in the engine's own terms before it is logged.

The engine checks arguments and preconditions, takes the lock and answers. `get`, `get_many`
and `put` stay flat (no call layer more than needed: each costs ~50-100 ns there): they read
through the store's `read` and write through its `log_put` directly.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from typing import Callable, Iterable, Iterator

from shardkv.errors import Closed, Conflict, CorruptionError, Error, StorageError
from shardkv.log import get_logger
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, MAX_KEY_LEN, check_key, check_value
from shardkv.shards.batchcheck import MAX_BATCH_BYTES, check_expects, check_ops
from shardkv.shards.batchwrites import BatchWrites
from shardkv.shards.compaction import Compactor
from shardkv.shards.expiry import ExpiryTable
from shardkv.shards.ordered import OrderedReads
from shardkv.shards.participant import Participant
from shardkv.shards.recovery import recover
from shardkv.shards.store import Store
from shardkv.ipc.uniform import UniformPuts
from shardkv.wal import fileio
from shardkv.wal.format import DELETE, MAX_VALUE_LEN_FORMAT, PUT, RECORD_HEADER_SIZE
from shardkv.wal.writer import DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE, check_durability

LOCK_FILE = "LOCK"
_RETRY = object()


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
        self._closed = True
        fileio.make_dir(self.directory)
        self._lock_fd = _lock_directory(self.directory)
        try:
            state = recover(self.directory, shard_id, segment_size, int(clock() * 1000))
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.recovery = {"records": state.records_read, "torn_bytes": state.torn_bytes, "unsynced_records_dropped": state.unsynced_records_dropped, "seconds": state.seconds}
        self._log = log = get_logger("shardkv.shard", shard=shard_id, directory=self.directory)
        if state.torn_bytes:
            log.warning("torn tail truncated", segment=state.active, bytes=state.torn_bytes, end=state.active_end, unsynced_records_dropped=state.unsynced_records_dropped)
        log.info("recovered", records=state.records_read, keys=len(state.live[0]), seconds=round(state.seconds, 4))
        self._expiry = expiry = ExpiryTable(clock, state.expiring)
        try:
            self._store = store = Store(
                self.directory,
                shard_id,
                state,
                expiry,
                durability=durability,
                segment_size=segment_size,
                sync_interval=sync_interval,
                verify_checksums=self.verify_checksums,
                shared_index=shared_index,
                log=log,
            )
        except BaseException:
            os.close(self._lock_fd)  # an engine that failed to open holds nothing
            raise
        self._participant = Participant(store, self._check_expects_locked, log)
        self._participant.load(state.prepared)
        store.before_compaction = self._participant.carry
        self._compactor = Compactor(store, segment_size)
        self._ordered = OrderedReads(store, self._check_open)
        self._batches = BatchWrites(store, self._participant, self._check_open, self._check_expects_locked, durability)
        # The parts' state the hot paths and the worker use, bound once (one attribute load
        # each, no property): the same objects for the engine's life.
        self._lock = store.lock
        self._header = store.header
        self._read = store.read
        self._expires = expiry.expires  # never replaced: empty when no key expires
        self._expired = expiry.expired
        self._prepared = self._participant.prepared  # the worker reads its `locks`
        self._compaction_lock = self._compactor.lock  # the worker asks whether one runs
        self._closed = False

    # -- reading ---------------------------------------------------------------------------
    def get(self, key, default=None):
        """Return the value of `key`, or `default` if it is absent."""
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_LEN:
            key = check_key(key)
        if self._closed:
            raise Closed("the shard engine is closed")
        # Lock-free first: the GIL makes each step atomic, and the version (odd while a writer
        # changes the index, bumped again after) tells whether a write overlapped this read.
        header = self._header
        version = header.version
        if not version & 1:
            try:
                value = self._read(key)
            except (KeyError, IndexError, ValueError, TypeError, CorruptionError):
                value = _RETRY
            if value is not _RETRY and header.version == version:
                if value is None or (self._expires and self._expired(key)):
                    return default
                return value
        with self._lock:
            self._check_open()
            value = self._read(key)
        if value is None or (self._expires and self._expired(key)):
            return default
        return value

    def get_many(self, keys) -> list:
        """The values of `keys` (None for a missing key), read together: one check for an
        overlapping write covers the whole batch."""
        keys = [k if type(k) is bytes and 0 < len(k) <= MAX_KEY_LEN else check_key(k) for k in keys]
        if self._closed:
            raise Closed("the shard engine is closed")
        header = self._header
        version = header.version
        read = self._read
        if not version & 1:
            try:
                values = [read(key) for key in keys]
            except (KeyError, IndexError, ValueError, TypeError, CorruptionError):
                values = None
            if values is not None and header.version == version:
                return self._hide_expired(keys, values)
        with self._lock:
            self._check_open()
            values = [read(key) for key in keys]
        return self._hide_expired(keys, values)

    def _hide_expired(self, keys: list, values: list) -> list:
        if self._expires:
            expired = self._expired
            values = [None if v is not None and expired(k) else v for k, v in zip(keys, values)]
        return values

    def ttl(self, key):
        """Seconds left before `key` expires: None if it is absent, math.inf if it never expires."""
        left = self.ttl_ms(key)
        return left / 1000 if left is not None and left != math.inf else left

    def ttl_ms(self, key):
        """ttl() in whole milliseconds, the protocol's unit (a worker answers TTL with it)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if self._read(key) is None:
                return None
            return self._expiry.ms_left(key)

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        if self._expires:
            with self._lock:
                self._check_open()
                self._store.purge_expired()
        return self._store.index.count

    def log_position(self) -> tuple[int, int]:
        """(segment, offset) where the next record will be appended: the active segment's
        number and the end of the data written to it (for tests and tools that look at the files)."""
        return self._store.log_position()

    def segments(self) -> dict[int, str]:
        """The segments the engine reads now: segment number -> path of its file."""
        with self._lock:
            return dict(self._store.paths)

    # -- writing ---------------------------------------------------------------------------
    def put(self, key, value, ttl=None) -> None:
        """Set `key` to `value`; with `ttl`, the key expires that many seconds from now."""
        key = check_key(key)
        value = check_value(value, self.max_value_size, "max_value_size")
        expires_at = 0 if ttl is None else self._expiry.expiry_for(ttl)
        with self._lock:
            self._check_open()
            if self._prepared.locks:
                self._prepared.check_unlocked((key,))
            end = self._store.log_put(key, value, expires_at)
        if self.durability == "fsync":
            self._store.writer.sync_upto(*end)

    def expire(self, key, seconds) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if the key is absent."""
        key = check_key(key)
        expires_at = self._expiry.expiry_for(seconds)
        with self._lock:
            self._check_open()
            self._prepared.check_unlocked((key,))
            value = self._current(key)
            if value is None:
                return False
            end = self._store.write([(PUT, key, value, expires_at)])
        self._store.make_durable(end)
        return True

    def delete(self, key) -> bool:
        """Remove `key`; return True if it was present."""
        key = check_key(key)
        store = self._store
        with self._lock:
            self._check_open()
            self._prepared.check_unlocked((key,))
            if self._expires:
                store.purge_expired()
            if not store.contains(key):
                return False
            end = store.write([(DELETE, key, b"", 0)])
        store.make_durable(end)
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
                end = self._store.write([(DELETE, key, b"", 0)])
            else:
                end = self._store.write([(PUT, key, new, 0)])
        self._store.make_durable(end)
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
        now = self._expiry.now_ms()
        batch = []
        for key, value, expires_at in records:
            key, value = check_key(key), check_value(value, self.max_value_size)
            _check_int("expires_at", expires_at, 0, 2**64 - 1)
            if expires_at == 0 or expires_at > now:
                batch.append((PUT, key, value, expires_at))
        if sum(RECORD_HEADER_SIZE + len(key) + len(value) for _, key, value, _ in batch) > MAX_BATCH_BYTES:
            raise ValueError(f"batch is over the limit of {MAX_BATCH_BYTES} encoded bytes")
        return self._batches.put_records(batch)

    def apply_deferred(self, ops: Iterable, expects: Iterable = ()) -> Callable[[], None] | None:
        """`apply` for a shard worker that answers before it indexes. A batch of DEFER_MIN (64) or
        more operations without preconditions, at a durability other than "fsync", returns as
        soon as it is logged, with the engine's lock still held and the shared index's version
        odd (clients' direct reads ask the worker meanwhile); the function returned indexes it
        and releases the lock, and must run before anything else uses the engine. Any other
        batch is applied as `apply` does, and None is returned."""
        return self._apply(ops, expects, defer=True)

    def _apply(self, ops: Iterable, expects: Iterable, defer: bool) -> Callable[[], None] | None:
        return self._batches.apply(self._check_ops(ops), check_expects(expects), defer)

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

    def _check_ops(self, ops) -> list | UniformPuts:
        """The checked batch of `ops` (shards/batchcheck.py)."""
        return check_ops(ops, self.max_value_size, self._expiry)

    # -- cross-shard batches (docs/TRANSACTIONS.md; participant.py) ------------------------
    def prepare(self, txid: int, ops: Iterable, expects: Iterable = ()) -> None:
        """Phase one of cross-shard batch `txid` on this shard: check `expects`, lock every key
        named, and log the writes in a PREPARE record (durable at the engine's level when this
        returns). Raises Conflict if a precondition fails or Busy if another prepared batch
        locks a key; then nothing is logged or locked. Preparing a batch twice is a no-op."""
        _check_int("txid", txid, 0, 2**64 - 1)
        self._batches.prepare(txid, self._check_ops(ops), check_expects(expects))

    def commit(self, txid: int) -> bool:
        """Phase two: apply prepared batch `txid` (one batch: a COMMIT record, then its writes)
        and release its locks. False if no such batch is prepared here (already settled)."""
        return self._batches.commit(txid, defer=False)[0]

    def commit_deferred(self, txid: int) -> tuple[bool, Callable[[], None] | None]:
        """`commit` for a shard worker that answers before it indexes, as `apply_deferred`
        does: (settled, the function that indexes the batch and releases the lock, or None)."""
        return self._batches.commit(txid, defer=True)

    def abort(self, txid: int) -> bool:
        """Drop prepared batch `txid` (logging an ABORT record) and release its locks; False if
        no such batch is prepared here. If the disk refuses the ABORT record (full), the batch
        is dropped all the same (presumed abort settles it after a restart, see
        Participant.abort)."""
        return self._batches.abort(txid)

    def prepared(self) -> list[int]:
        """The ids of the batches prepared here and awaiting their decision."""
        with self._lock:
            return list(self._prepared.batches)

    def locked(self, key: bytes) -> bool:
        """Whether a prepared batch locks `key` (reads of it wait for the decision)."""
        return key in self._prepared.locks

    # -- ordered reads (ordered.py) ---------------------------------------------------------
    def batch_history(self) -> tuple[int, list]:
        """The single-shard batches applied so far and the key range of the last few, for scans
        through a worker's ring (SortedView.history)."""
        return self._store.sorted.history()

    def view_sorting(self) -> bool:
        """Whether the ordered view is still being sorted in the background (after a crash): an
        ordered read now would wait for it (a worker answers Busy instead of waiting)."""
        return self._ordered.view_sorting()

    def scan(self, start=None, stop=None, reverse=False, prefix=None, limit=None) -> Iterator[tuple[bytes, bytes]]:
        """Yield (key, value) in key order with start <= key < stop (descending if `reverse`).

        `prefix` keeps only keys that start with it; `limit` caps the number of items. The scan
        is a cursor over the live data: each item is the next key present when it is reached,
        with its value then (keys are read in chunks, each chunk again if a write came between
        two items); a key written ahead of the cursor meanwhile shows, one deleted does not.
        """
        return self._ordered.scan(start, stop, reverse, prefix, limit)

    def min(self):
        """(key, value) of the smallest key, or None if the shard is empty."""
        return self._ordered.first()

    def max(self):
        """(key, value) of the largest key, or None if the shard is empty."""
        return self._ordered.first(reverse=True)

    def above(self, key):
        """(key, value) of the smallest key strictly greater than `key`, or None."""
        return self._ordered.above(key)

    def below(self, key):
        """(key, value) of the largest key strictly less than `key`, or None."""
        return self._ordered.below(key)

    # -- maintenance -----------------------------------------------------------------------
    @property
    def index_repairs(self) -> int:
        """Times the index was found to disagree with the log and rebuilt."""
        return self._store.index_repairs

    def stats(self) -> dict:
        """keys, live_bytes, total_bytes, segments, garbage_ratio, index_bytes, seq, durability,
        last_fsync_age, compaction, recovery and in_doubt (prepared batches awaiting a decision)."""
        store = self._store
        with self._lock:
            self._check_open()
            stats = store.space()
            stats["index_bytes"] = store.index.nbytes + store.sorted.nbytes
            stats["seq"] = store.seq
            stats["durability"] = self.durability
            stats["last_fsync_age"] = round(max(0.0, time.time() - store.writer.last_sync), 3)
            running, done, total = self._compactor.running()
            stats["compaction"] = {"running": running, "done": done, "total": total, "last": self._compactor.last}
            stats["recovery"] = dict(self.recovery)
            stats["in_doubt"] = len(self._prepared)
            stats["index_repairs"] = store.index_repairs
            return stats

    def index_problem(self) -> str | None:
        """What a quick look finds wrong with the index (KeyIndex.quick_problem), or None. The
        next compaction compares every entry with the log and rebuilds the index if they
        disagree; a shard worker runs one as soon as this finds something."""
        with self._lock:
            self._check_open()
            return self._store.index.quick_problem()

    def compact(self) -> dict:
        """Rewrite the live records of all sealed segments (and the active one, sealed first)
        into new segments and drop the old ones. Reads and writes continue meanwhile.

        Returns {"before": space, "after": space, "seconds": ..., ...} with space as in stats().
        """
        with self._compaction_lock:
            if self._store.index_failure is not None:  # it keeps what the index points at: not now
                raise StorageError(f"shard {self.shard_id}: the index failed to take a logged batch; reopen to recover")
            result = self._compactor.run()
            self._compactor.last = result
            return result

    def write_failure(self) -> str | None:
        """Why the log stopped accepting writes (a failed write or fsync, or an index that failed
        to take a logged batch), or None. Writes then raise StorageError until the shard is
        reopened, which recovers from what is on disk."""
        failure = self._store.writer.failure
        if failure is None and self._store.index_failure is not None:
            return f"the index failed to take a logged batch: {self._store.index_failure!r}"
        return None if failure is None else repr(failure)

    def sync(self) -> None:
        """fsync everything written so far, whatever the durability level."""
        self._check_open()
        self._store.writer.sync()

    def close(self) -> None:
        """fsync, write the active segment's hint and release the directory. Idempotent."""
        with self._compaction_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._store.close()
            finally:
                os.close(self._lock_fd)

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
