"""A shard's part in cross-shard batches: the participant of two-phase commit
(docs/TRANSACTIONS.md).

Phase one logs a batch's writes and preconditions in a PREPARE record and locks its keys
(prepared.py holds that state); phase two logs a COMMIT record heading the writes, or an ABORT
record. Everything goes through the store's log (store.py); the engine takes the lock, checks
arguments, and decides when a write is answered.
"""

from __future__ import annotations

from typing import Callable

from shardkv.errors import StorageError
from shardkv.shards.prepared import PreparedBatches, batch_keys, encode_prepare
from shardkv.ipc.uniform import UniformPuts
from shardkv.wal.format import ABORT, COMMIT, PREPARE
from shardkv.wal.records import txid_key


class Participant:
    """The cross-shard batches prepared on one shard. Every method runs with the store's lock held."""

    def __init__(self, store, check_expects: Callable[[list], None], log):
        self.store = store
        self.check_expects = check_expects  # raises Conflict unless every (key, value) holds
        self.log = log
        self.prepared = PreparedBatches()

    def load(self, prepared: dict) -> None:
        """Take the batches recovery found prepared and undecided (txid -> (batch, expects))."""
        for txid, (batch, expects) in prepared.items():
            self.prepared.add(txid, batch, expects)

    def prepare(self, txid: int, batch, expects: list) -> tuple[int, int] | None:
        """Check `expects`, lock the keys and log the PREPARE; where it ends, or None if the
        batch is prepared already (a no-op). Raises Conflict or Busy, having done nothing."""
        if txid in self.prepared.batches:
            return None
        self.prepared.check_unlocked([*batch_keys(batch), *(key for key, _ in expects)])
        self.check_expects(expects)
        end = self.store.log_marker(PREPARE, txid, encode_prepare(batch, expects))
        self.prepared.add(txid, batch, expects)
        return end

    def log_commit(self, txid: int):
        """Log prepared batch `txid` headed by a COMMIT record: (the batch logged, where it
        ends, the function that indexes it), or None if no such batch is prepared here. The
        batch stays prepared (its keys locked) until `settle`."""
        entry = self.prepared.batches.get(txid)
        if entry is None:
            return None
        batch = entry[0]
        if type(batch) is UniformPuts:
            batch = batch.headed(COMMIT, txid_key(txid))
        else:
            batch = [(COMMIT, txid_key(txid), b"", 0)] + batch
        try:
            end, index = self.store.log_batch(batch, committing=True)
        except StorageError as exc:
            self.prepared.stalled[txid] = str(exc)  # writes to its keys fail StorageError, not Busy
            raise
        return batch, end, index

    def settle(self, txid: int) -> None:
        """Forget batch `txid` and release its locks (committed or aborted)."""
        self.prepared.pop(txid)

    def abort(self, txid: int) -> tuple[bool, tuple[int, int] | None]:
        """Log an ABORT for `txid` and release its locks: (whether it was prepared here, where
        the record ends or None if it could not be logged). A batch whose ABORT the disk
        refuses (full) is dropped all the same: an aborted batch is never committed, and a
        PREPARE left undecided in the log is aborted again after a restart, when the
        coordinator, which logged no COMMIT for it, is asked (presumed abort). Its keys must not
        stay locked until space comes back: writes to them would wait, then fail Busy."""
        if txid not in self.prepared.batches:
            return False, None
        try:
            end = self.store.log_marker(ABORT, txid, b"")
        except StorageError as exc:
            self.prepared.pop(txid)
            self.log.warning("abort not logged; the batch is dropped (presumed abort settles it after a restart)", txid=txid, error=str(exc))
            return True, None
        self.prepared.pop(txid)
        return True, end

    def carry(self) -> None:
        """Log every undecided PREPARE again in the (new) active segment and fsync it, so that
        a compaction of the sealed segments cannot drop it (Store.before_compaction)."""
        if not self.prepared:
            return
        for txid, (batch, expects) in self.prepared.batches.items():
            end = self.store.log_marker(PREPARE, txid, encode_prepare(batch, expects))
        # The copies replace PREPAREs in sealed (fsynced) segments that the compaction deletes:
        # they must be as durable before it commits, whatever the durability level.
        self.store.writer.sync_upto(*end)
