"""A shard worker process: serves one ShardEngine to clients through its shared-memory ring.

Started by the supervisor as `python -m shardkv.shards.worker CONFIG_FILE SHARD`. Each wake-up it
answers every slot holding a request (docs/IPC.md); write requests that asked for durability
"fsync" share one fsync per pass.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time

import numpy as np
import posix_ipc
import setproctitle

from shardkv import faults
from shardkv.coordinator.manifest import shard_directory
from shardkv.coordinator.membership import EXIT_CORRUPT, EXIT_STORAGE, leave_cluster, stop_confirmed
from shardkv.coordinator.runfiles import read_config
from shardkv.errors import Busy, Closed, Conflict, CorruptionError, Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc import protocol
from shardkv.ipc.transport import RingServer
from shardkv.ipc.sharedindex import SERVING, IndexPublisher
from shardkv.ipc.layout import (
    COORDINATOR_SLOTS,
    PROC_DTYPE,
    PROC_UP,
    STOPPING,
    ControlBlock,
    Ring,
    join_cluster,
    map_shared_memory,
    worker_ring_slots,
)
from shardkv.log import configure_service_logging, get_logger
from shardkv.shards.engine import ShardEngine

_U32 = struct.Struct("<I")
_COUNTER = struct.Struct("<Q")
SCAN_PAGE_BYTES = 1 << 20


class Worker:
    """Serves one shard; see the module docstring."""

    def __init__(self, config: dict, clock=time.time):
        """`clock`: wall-clock seconds for the engine's expiry (ShardEngine.open's `clock`)."""
        self.config = config
        self.clock = clock
        self.shard = config["shard"]
        self.max_message = config["max_message"]
        self.log = get_logger("shardkv.worker", shard=self.shard)
        names = config["names"]
        self.control_buf = map_shared_memory(names["control"])
        self.control = ControlBlock(self.control_buf, config["shards"], config["leases"])
        self.ring_buf = map_shared_memory(names["rings"][self.shard])
        self.ring = Ring(self.ring_buf, worker_ring_slots(config["leases"]), config["slot_size"])
        self.wake = posix_ipc.Semaphore(names["wake"][self.shard])
        # The slots after the leases (L, L + 1, ...) belong to the coordinator, which runs up to
        # COORDINATOR_SLOTS cross-shard batches at once; their answers post coord_done.
        self.coordinator_slots = list(range(config["leases"], config["leases"] + COORDINATOR_SLOTS))
        coordinator_done = posix_ipc.Semaphore(names["coord_done"])
        self.done = [posix_ipc.Semaphore(name) for name in names["done"]] + [coordinator_done] * COORDINATOR_SLOTS
        # Most wake-ups look only at the slots of leases held by a client (and the coordinator's).
        leases = self.control.leases
        self.server = RingServer(self.ring, self.wake, self.done, self.max_message, lambda: np.flatnonzero(leases["pid"]).tolist() + self.coordinator_slots)
        self.stopping = False
        self.voted = False  # a PREPARE was answered in this pass (for the worker.voted fault point)
        self.finish_indexing = None  # indexes a batch answered before it was indexed (engine.apply_deferred)
        self.exit_code = 0
        self.engine = None
        self.table: dict = {}  # op code -> serve(request), once the engine is open (_dispatch_table)
        # The index lives in shared memory, where clients answer gets themselves (docs/IPC.md).
        self.shared_index = IndexPublisher(names["prefix"], self.shard, self.log)
        self.compact_threshold = config.get("compact_threshold", 0.5)
        self.compact_min_bytes = config.get("compact_min_bytes", 64 << 20)
        self.compact_check_interval = config.get("compact_check_interval", 10.0)
        self.compactor: threading.Thread | None = None
        self.next_compaction_check = 0.0
        self.requests_offset = self.control.procs_offset + (1 + self.shard) * PROC_DTYPE.itemsize + PROC_DTYPE.fields["requests"][1]

    # -- life cycle ------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        try:
            self.engine = ShardEngine.open(
                shard_directory(self.config["directory"], self.shard),
                shard_id=self.shard,
                durability=self.config["durability"],
                shared_index=self.shared_index,
                clock=self.clock,
            )
        except CorruptionError as exc:
            self.shared_index.close()
            self.log.error("shard quarantined: log is corrupt", error=str(exc))
            return EXIT_CORRUPT
        except BaseException:
            self.shared_index.close()
            raise
        self.table = self._dispatch_table()
        self.log.info("started", pid=os.getpid(), recovery=self.engine.recovery, seconds=round(time.monotonic() - started, 3))
        self._abandon_stale_requests()
        self._publish_locks()
        self.shared_index.set_state(SERVING)
        entry = self.control.procs[1 + self.shard]
        entry["state"] = PROC_UP
        supervisor = self.config["supervisor_pid"]
        try:
            while True:
                self._serve()
                if self.stopping or self.exit_code or os.getppid() != supervisor:
                    break
                if stop_confirmed(self.control, lambda: self.stopping, supervisor, self.log):
                    break
        finally:
            self._finish_indexing()  # it holds the engine's lock, which the compactor and close wait for
            if self.compactor is not None:
                self.compactor.join()
            self.shared_index.close()  # clients go back to the ring before the files close
            try:
                self.engine.close()
            except Exception as exc:  # a failed log cannot always be closed cleanly; recovery copes
                self.log.error("closing the shard failed", error=repr(exc))
            self.log.info("stopped", requests=int(entry["requests"]), exit_code=self.exit_code)
        return self.exit_code

    def _abandon_stale_requests(self) -> None:
        """Requests left by a previous generation of this worker may have been applied already:
        answer them Unavailable rather than apply them twice."""
        self.server.abandon_stale(Unavailable("the shard worker restarted; the request may or may not have been applied"))

    def _serve(self) -> None:
        supervisor = self.config["supervisor_pid"]
        control, server = self.control, self.server
        served = 0
        for ready in server.serve(lambda: not self.stopping and control.state != STOPPING and os.getppid() == supervisor, 1.0):
            self._maybe_compact()
            if not ready:
                continue
            replies = []
            sync = False
            for lease in ready:
                if not self._finish_indexing():
                    return  # the successor answers the requests left: Unavailable
                reply, wants_sync = self._handle(lease)
                if reply is not None:
                    replies.append((lease, *reply))
                    sync = sync or wants_sync
            if sync:
                try:
                    self.engine.sync()
                except Exception as exc:  # a failed fsync must never be acknowledged
                    replies = [(lease, rid, m.error_response(exc)) for lease, rid, _ in replies]
            served += len(ready)  # counted before answering: a client that has its answer sees it
            _COUNTER.pack_into(self.control_buf, self.requests_offset, served)
            for lease, request_id, response in replies:
                server.answer(lease, request_id, response)
            # A big batch is answered once logged and indexed now, while its client goes on.
            if self.finish_indexing is not None:
                faults.point("worker.answered_unindexed")
            self._finish_indexing()  # a failure shows in write_failure
            failure = self.engine.write_failure()
            if failure is not None:
                # After a failed fsync the page cache may hold data the disk never got: only a
                # fresh process that recovers from the log knows what is really there.
                self.log.error("the log failed a write or fsync; restarting to recover from the log", error=failure)
                self.exit_code = EXIT_STORAGE
                return
            if self.voted:
                self.voted = False
                faults.point("worker.voted")

    def _finish_indexing(self) -> bool:
        """Index the batch the last request logged and answered early (apply_deferred), if any:
        before the engine serves anything else. False if that failed: the index no longer
        matches the log, the engine takes no more writes, and the worker must end (its
        successor recovers from the log)."""
        finish, self.finish_indexing = self.finish_indexing, None
        if finish is None:
            return True
        try:
            finish()
            return True
        except Exception as exc:
            self.log.error("indexing a logged batch failed; restarting to recover from the log", error=repr(exc))
            self.exit_code = EXIT_STORAGE
            return False

    def _publish_locks(self) -> None:
        """Tell clients whether any key here is locked by an undecided cross-shard batch."""
        self.shared_index.set_locked(len(self.engine._prepared.locks))

    def _maybe_compact(self) -> None:
        """Start a background compaction when garbage passes the threshold, or when the index
        (in shared memory, where other processes can write) looks damaged: compaction checks it
        against the log and rebuilds it (checked now and then)."""
        now = time.monotonic()
        if now < self.next_compaction_check or (self.compactor is not None and self.compactor.is_alive()):
            return
        self.next_compaction_check = now + self.compact_check_interval
        problem = self.engine.index_problem()
        if problem is not None:
            self.log.warning("index damaged; compacting to rebuild it from the log", problem=problem)
            self._start_compaction()
            return
        space = self.engine.stats()
        if space["total_bytes"] >= self.compact_min_bytes and space["garbage_ratio"] >= self.compact_threshold:
            self._start_compaction()

    def _start_compaction(self) -> bool:
        """Start a compaction in a background thread unless one is running; True if started."""
        if (self.compactor is not None and self.compactor.is_alive()) or self.engine._compaction_lock.locked():
            return False
        self.compactor = threading.Thread(target=self._compact_in_background, name="shardkv-compactor", daemon=True)
        self.compactor.start()
        return True

    def _compact_in_background(self) -> None:
        try:
            result = self.engine.compact()
            self.log.info(
                "compacted",
                bytes_before=result["before"]["total_bytes"],
                bytes_after=result["after"]["total_bytes"],
                seconds=round(result["seconds"], 3),
                index_repair=result.get("index_repair"),
            )
        except Exception as exc:  # the next check tries again; requests are unaffected
            self.log.error("compaction failed", error=repr(exc))

    # -- frames ----------------------------------------------------------------------------
    def _handle(self, lease: int):
        """Take the frame in slot `lease`; return ((request_id, response), wants_sync)."""
        request_id, message, reply = self.server.receive(lease)
        if message is None:
            return (request_id, reply), False
        if message[0] in protocol.COORDINATOR_ONLY and lease < self.coordinator_slots[0]:
            return (request_id, m.error_response(ValueError(f"op {message[0]} is only accepted from the coordinator"))), False
        wants_sync = len(message) > 1 and bool(message[1] & m.FLAG_FSYNC) and message[0] in protocol.WRITES
        return (request_id, self._dispatch(message)), wants_sync

    # -- requests --------------------------------------------------------------------------
    def _dispatch(self, message: bytes) -> bytes:
        try:
            return self._execute(message)
        except (ValueError, TypeError, CorruptionError, Unavailable, Conflict) as exc:
            return m.error_response(exc)
        except Closed as exc:
            return m.error_response(Unavailable(str(exc)))
        except Exception as exc:  # keep serving everyone else
            self.log.error("request failed", error=repr(exc), op=message[0] if message else None)
            return m.error_response(exc)

    def _execute(self, message: bytes) -> bytes:
        op = message[0]
        # GET and PUT, the hottest requests, are decoded inline (protocol.GET and protocol.PUT
        # declare the same layout; anything unusual goes on to the table).
        if op == m.GET and len(message) >= 6:
            key_len = _U32.unpack_from(message, 2)[0]
            if 6 + key_len == len(message):
                key = message[6:]
                if self.engine._prepared.locks and key in self.engine._prepared.locks:
                    raise Busy("the key is locked by a cross-shard batch awaiting its decision")
                value = self.engine.get(key)
                return m.NOT_FOUND_RESPONSE if value is None else b"\x00" + value
        elif op == m.PUT and len(message) >= 10:
            key_len = _U32.unpack_from(message, 2)[0]
            value_at = 6 + key_len
            if value_at + 4 <= len(message) and value_at + 4 + _U32.unpack_from(message, value_at)[0] == len(message):
                self.engine.put(message[6:value_at], message[value_at + 4 :])
                return m.OK_RESPONSE
        serve = self.table.get(op)
        if serve is None:
            raise m.MessageError(f"unknown op {op}")
        return serve(message)

    def _dispatch_table(self) -> dict:
        """{op code: serve(request) -> response} of every operation a worker serves: each
        handler takes the arguments protocol.py decodes and returns what it encodes."""
        engine = self.engine
        return protocol.dispatch_table(
            protocol.WORKER,
            {
                m.PING: lambda: None,
                m.GET: self._get,
                m.PUT: engine.put,
                m.PUT_TTL: engine.put,  # the ttl comes as limits.Milliseconds
                m.TTL: engine.ttl_ms,
                m.EXPIRE: engine.expire,
                m.DELETE: engine.delete,
                m.CAS: engine.cas,
                m.APPLY: self._apply,
                m.PREPARE: self._prepare,
                m.COMMIT: self._commit,
                m.ABORT: self._abort,
                m.PENDING: engine.prepared,
                m.GET_MANY: engine.get_many,
                m.SCAN: self._scan_page,
                m.LEN: engine.__len__,
                m.STATS: engine.stats,
                m.COMPACT: lambda: {"started": self._start_compaction()},  # in the background: requests go on
                m.SYNC: engine.sync,
            },
        )

    # -- handlers (see _dispatch_table) ----------------------------------------------------
    def _get(self, key: bytes) -> bytes | None:
        if self.engine.locked(key):
            raise Busy("the key is locked by a cross-shard batch awaiting its decision")
        return self.engine.get(key)

    def _apply(self, writes: list, expects: list) -> None:
        self.finish_indexing = self.engine.apply_deferred(writes, expects)

    def _prepare(self, txid: int, writes: list, expects: list) -> None:
        self.engine.prepare(txid, writes, expects)
        self._publish_locks()  # before the vote: from now on clients ask us about this shard
        faults.point("worker.prepare_logged")
        self.voted = True

    def _commit(self, txid: int) -> bool:
        settled, self.finish_indexing = self.engine.commit_deferred(txid)
        self._publish_locks()
        return settled

    def _abort(self, txid: int) -> bool:
        settled = self.engine.abort(txid)
        self._publish_locks()
        return settled

    def _scan_page(self, start, stop, reverse: bool, prefix, limit: int) -> tuple:
        """(items, more, batch history) of one SCAN page: up to `limit` items and about
        SCAN_PAGE_BYTES."""
        if self.engine.view_sorting():  # the client asks again: meanwhile this loop serves the others
            raise Busy("the shard's ordered view is being sorted after a restart")
        items, size, more = [], 0, False
        for key, value in self.engine.scan(start=start, stop=stop, reverse=reverse, prefix=prefix):
            if len(items) >= limit or (items and size + len(key) + len(value) > SCAN_PAGE_BYTES):
                more = True
                break
            items.append((key, value))
            size += len(key) + len(value) + 8
        return items, more, self.engine.batch_history()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m shardkv.shards.worker CONFIG_FILE SHARD` (the supervisor's
    owner-only run/config-<cluster>.json: nothing of it on the command line)."""
    argv = sys.argv[1:] if argv is None else argv
    config = dict(read_config(argv[0]), shard=int(argv[1]))
    setproctitle.setproctitle(f"shardkv: shard {config['shard']} of {config['directory']}")
    faults.set_role("worker")
    # A background compaction is CPU-bound Python: hand the GIL back to the serving thread every
    # millisecond (default 5 ms) so that requests do not queue behind it.
    sys.setswitchinterval(0.001)
    configure_service_logging(config["log_dir"], f"shard-{config['shard']:03d}")
    member = join_cluster(config["names"]["control"])
    worker = Worker(config)

    def stop(signum, frame):
        worker.stopping = True
        worker.wake.release()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    try:
        return worker.run()
    finally:
        leave_cluster(member, config, worker.log)


if __name__ == "__main__":
    sys.exit(main())
