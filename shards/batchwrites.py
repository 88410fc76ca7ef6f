"""Atomic batches on one shard, written under the engine's lock: single-shard ones (`apply`),
copied records (`put_records`), and the cross-shard ones' two phases (`prepare`, `commit`,
`abort`, through the participant, participant.py), with the early answer a shard worker uses
for big batches (docs/IPC.md says why no read can miss one).

The engine (engine.py) checks the arguments and hands over batches in its own terms
(batchcheck.py); this part takes the lock, checks locks and preconditions, logs through the
store (store.py) and makes the write durable, or, deferred, returns with the lock still held
and a function that indexes the batch and releases the lock.
"""

from __future__ import annotations

from typing import Callable

from shardkv.shards.prepared import batch_keys

DEFER_MIN = 64  # a deferred batch is answered before it is indexed from this many records


class BatchWrites:
    """The batch writes of one engine. `lock`: the engine's (the store's) lock; `check_open`
    raises Closed once the engine is closed; `check_expects` raises Conflict unless every
    (key, value) precondition holds (called with the lock held)."""

    def __init__(self, store, participant, check_open: Callable[[], None], check_expects: Callable[[list], None], durability: str):
        self.store = store
        self.participant = participant
        self.lock = store.lock
        self.prepared = participant.prepared
        self.check_open = check_open
        self.check_expects = check_expects
        self.durability = durability

    def apply(self, batch, expects: list, defer: bool) -> Callable[[], None] | None:
        """Write checked `batch` atomically once `expects` hold (Conflict otherwise: nothing
        written). Deferred (see ShardEngine.apply_deferred): the function that indexes a big
        batch and releases the lock, or None once it is written and indexed."""
        self.check_open()
        if not batch and not expects:
            return None
        deferred = None
        lock = self.lock
        lock.acquire()
        try:
            self.check_open()
            if self.prepared.locks:
                self.prepared.check_unlocked([*batch_keys(batch), *(key for key, _ in expects)])
            self.check_expects(expects)
            if not batch:
                return None
            end, index = self.store.log_batch(batch)
            if not expects and self._answers_early(defer, batch):
                deferred = self._then_unlock(index)
                return deferred
            index()
        finally:
            if deferred is None:
                lock.release()
        self.store.make_durable(end)
        return None

    def put_records(self, batch: list) -> int:
        """Write checked (PUT, key, value, expires_at) records as one batch; how many."""
        if not batch:
            return 0
        with self.lock:
            self.check_open()
            if self.prepared.locks:
                self.prepared.check_unlocked(batch_keys(batch))
            end = self.store.write(batch)
        self.store.make_durable(end)
        return len(batch)

    def prepare(self, txid: int, batch, expects: list) -> None:
        """Phase one of cross-shard batch `txid` (Participant.prepare), durable on return."""
        self.check_open()
        with self.lock:
            self.check_open()
            end = self.participant.prepare(txid, batch, expects)
        if end is not None:
            self.store.make_durable(end)

    def commit(self, txid: int, defer: bool) -> tuple[bool, Callable[[], None] | None]:
        """Phase two: (whether `txid` was prepared here, and deferred, the function that
        indexes it and releases the lock, or None)."""
        deferred = None
        lock = self.lock
        lock.acquire()
        try:
            self.check_open()
            logged = self.participant.log_commit(txid)
            if logged is None:
                return False, None
            batch, end, index = logged
            if self._answers_early(defer, batch):
                # Its locks go now, so that the worker publishes the count before answering;
                # clients still cannot read these keys: the version stays odd until indexed.
                self.participant.settle(txid)
                deferred = self._then_unlock(index)
                return True, deferred
            index()
            self.participant.settle(txid)
        finally:
            if deferred is None:
                lock.release()
        self.store.make_durable(end)
        return True, None

    def abort(self, txid: int) -> bool:
        """Drop prepared batch `txid` (Participant.abort); whether it was prepared here."""
        with self.lock:
            self.check_open()
            found, end = self.participant.abort(txid)
        if end is not None:
            self.store.make_durable(end)
        return found

    def _answers_early(self, defer: bool, batch) -> bool:
        """Whether a deferred write may be answered before it is indexed: a big batch, unless
        every write is fsynced before its answer."""
        return defer and len(batch) >= DEFER_MIN and self.durability != "fsync"

    def _then_unlock(self, index: Callable[[], None]) -> Callable[[], None]:
        """`index`, then the engine's lock released (taken by the deferred write)."""
        lock = self.lock

        def finish() -> None:
            try:
                index()
            finally:
                lock.release()

        return finish
