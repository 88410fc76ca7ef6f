"""The coordinator process: owns the shard map and runs two-phase commit for batches that span
shards (docs/TRANSACTIONS.md).

Hash slot h belongs to shard h mod N. Clients send TXN requests through the coordinator's ring;
the coordinator talks to each worker through the ring slot reserved for it (slot L) and answers
one batch at a time, so cross-shard batches never wait on each other's locks.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import struct
import sys
import time

import numpy as np
import posix_ipc

from shardkv import faults
from shardkv.batches import decode_txn_parts
from shardkv.coordinator.decisions import DecisionLog, decisions_directory
from shardkv.errors import Busy, Conflict, CorruptionError, Unavailable
from shardkv.ipc import frames
from shardkv.ipc import messages as m
from shardkv.ipc.frames import FrameServer
from shardkv.ipc.layout import (
    HASH_SLOTS,
    PROC_QUARANTINED,
    PROC_UP,
    SLOT_HEADER_SIZE,
    SLOT_REQUEST,
    SLOT_RESPONSE,
    SLOT_STATE,
    STOPPING,
    ControlBlock,
    Ring,
    map_shared_memory,
    process_start_time,
    read_frame,
    worker_ring_slots,
    write_frame,
)
from shardkv.log import configure_service_logging, get_logger
from shardkv.shards.worker import EXIT_CORRUPT

WORKER_TIMEOUT = 60.0  # the longest wait for one worker's answer (a 256 MiB PREPARE included)
READER_WAIT = 5.0  # how long a commit phase waits for multi-key reads in progress
SWEEP_INTERVAL = 0.25  # seconds between checks for undelivered commits and restarted workers
PENDING_CHECK_INTERVAL = 5.0  # seconds between asking every worker for its undecided batches
_U64 = struct.Struct("<Q")


def default_shard_map(shards: int) -> np.ndarray:
    """The map of a new cluster: slot h -> shard h mod `shards`."""
    return (np.arange(HASH_SLOTS) % shards).astype("<u2")


class WorkerUnavailable(Unavailable):
    """A worker did not answer (it restarted, is quarantined, or timed out)."""


class Coordinator:
    """One coordinator process; see the module docstring."""

    def __init__(self, config: dict):
        self.config = config
        self.shards = config["shards"]
        self.leases = config["leases"]
        self.log = get_logger("shardkv.coordinator")
        names = config["names"]
        self.control_buf = map_shared_memory(names["control"])
        self.control = ControlBlock(self.control_buf, self.shards, self.leases)
        self.ring_buf = map_shared_memory(names["coord_ring"])
        self.ring = Ring(self.ring_buf, self.leases, config["slot_size"])
        self.frames = FrameServer(self.ring, config["max_message"])
        self.wake = posix_ipc.Semaphore(names["coord_wake"])
        self.client_done = [posix_ipc.Semaphore(name) for name in names["done"]]
        self.worker_bufs = [map_shared_memory(name) for name in names["rings"]]
        self.worker_rings = [Ring(buf, worker_ring_slots(self.leases), config["slot_size"]) for buf in self.worker_bufs]
        self.worker_wake = [posix_ipc.Semaphore(name) for name in names["wake"]]
        self.worker_done = posix_ipc.Semaphore(names["coord_done"])
        self.request_id = secrets.randbits(62)
        self.stopping = False
        self.decisions: DecisionLog | None = None
        self.undelivered: dict[int, set[int]] = {}  # decided txid -> shards yet to apply it
        self.seen_generation = [0] * self.shards  # worker generation whose prepared batches were settled
        self.next_sweep = 0.0
        self.next_pending_check = 0.0
        self.stats = {"committed": 0, "aborted": 0}
        self.served = 0

    # -- life cycle ------------------------------------------------------------------------
    def run(self) -> int:
        control = self.control
        control.shard_map[:] = default_shard_map(self.shards)
        control.map_version = control.map_version + 1
        try:
            self.decisions = DecisionLog(decisions_directory(self.config["directory"]))
        except CorruptionError as exc:
            self.log.error("coordinator quarantined: decision log is corrupt", error=str(exc))
            return EXIT_CORRUPT
        for txid, (participants, _) in self.decisions.outstanding.items():
            self.undelivered[txid] = set(participants)
        if self.undelivered and control.commits_started == control.commits_finished:
            control.commits_started += 1  # the crash came before the commit phase was opened
        self._abandon_stale_requests()
        control.procs[0]["state"] = PROC_UP
        self.log.info("started", pid=os.getpid(), map_version=control.map_version, undelivered=len(self.undelivered))
        supervisor = self.config["supervisor_pid"]
        try:
            while not self.stopping and control.state != STOPPING and os.getppid() == supervisor:
                try:
                    self.wake.acquire(SWEEP_INTERVAL)
                except (posix_ipc.BusyError, posix_ipc.SignalError):
                    pass
                if time.monotonic() >= self.next_sweep:
                    self._sweep()
                for slot in np.flatnonzero(self.ring.states == SLOT_REQUEST).tolist():
                    self._serve(slot)
        finally:
            self.decisions.close()
            self.log.info("stopped", **self.stats)
        return 0

    def _abandon_stale_requests(self) -> None:
        """A request left in the ring by the previous coordinator may have been decided already:
        answer it Unavailable (outcome unknown) rather than run it twice."""
        for slot in np.flatnonzero(self.ring.states == SLOT_REQUEST).tolist():
            request_id = read_frame(self.ring.slot(slot))[2]
            error = Unavailable("the coordinator restarted; the batch may or may not have been applied (each batch is all or nothing)")
            self.frames.respond(slot, request_id, m.error_response(error))
            self.client_done[slot].release()

    def _serve(self, slot: int) -> None:
        request_id, message, reply = self.frames.receive(slot)
        if message is not None:
            try:
                reply = self._execute(message, slot)
            except (ValueError, TypeError, Unavailable, Conflict) as exc:
                reply = m.error_response(exc)
            except Exception as exc:  # keep serving everyone else
                self.log.error("request failed", error=repr(exc))
                reply = m.error_response(exc)
        self.served += 1
        self.control.procs[0]["requests"] = self.served  # counted before answering, as workers do
        self.frames.respond(slot, request_id, reply)
        self.client_done[slot].release()

    def _execute(self, message: bytes, lease: int) -> bytes:
        op = message[0]
        if op == m.TXN:
            return self._transact(message, lease)
        if op == m.PING and len(message) == 2:
            return m.ok()
        if op == m.STATS and len(message) == 2:
            return m.ok(json.dumps({**self.stats, "undelivered": len(self.undelivered)}).encode())
        raise m.MessageError(f"op {op} is not served by the coordinator")

    # -- two-phase commit ------------------------------------------------------------------
    def _transact(self, message: bytes, lease: int) -> bytes:
        """Run one cross-shard batch: PREPARE everywhere, decide, COMMIT everywhere."""
        flags = message[1] & m.FLAG_FSYNC
        parts = decode_txn_parts(message)
        shards = [shard for shard, _ in parts]
        if not parts or len(set(shards)) != len(shards) or max(shards) >= self.shards:
            raise m.MessageError(f"TXN parts must name distinct shards below {self.shards}, not {shards}")
        txid = secrets.randbits(64) or 1
        prefix = bytes((m.PREPARE, flags)) + _U64.pack(txid)
        votes = self._call_workers({shard: prefix + part for shard, part in parts}, fault="coordinator.prepare_sent")
        failures = [vote for vote in votes.values() if isinstance(vote, BaseException)]
        if failures:
            self._abort(txid, shards)
            for kind in (Conflict, ValueError, TypeError):
                for failure in failures:
                    if isinstance(failure, kind):
                        raise failure
            raise Busy(f"a shard could not prepare the batch ({failures[0]}); it was not applied")
        try:
            self.decisions.log_commit(txid, shards, durable=bool(flags))
        except BaseException:
            self._abort(txid, shards)  # not logged, so not committed
            raise
        faults.point("coordinator.decision_logged")
        self.undelivered[txid] = set(shards)
        self._wait_for_readers(lease)
        self.control.commits_started += 1
        self._deliver(flags)
        self.stats["committed"] += 1
        return m.ok()

    def _abort(self, txid: int, shards: list[int]) -> None:
        """Presumed abort: nothing is logged; tell the participants, best effort (one that does
        not hear it settles the batch when the sweep asks for its prepared batches)."""
        self.stats["aborted"] += 1
        self._call_workers({shard: bytes((m.ABORT, 0)) + _U64.pack(txid) for shard in shards})

    def _deliver(self, flags: int = m.FLAG_FSYNC) -> None:
        """Send COMMIT for every decided batch to each participant that has not applied it;
        once none is left, close the commit phase (docs/TRANSACTIONS.md, "Isolation")."""
        for txid in list(self.undelivered):
            shards = self.undelivered[txid]
            answers = self._call_workers({shard: bytes((m.COMMIT, flags)) + _U64.pack(txid) for shard in sorted(shards)}, fault="coordinator.commit_sent")
            for shard, answer in answers.items():
                if not isinstance(answer, BaseException):
                    shards.discard(shard)
            if not shards:
                del self.undelivered[txid]
                self.decisions.applied(txid)
        if not self.undelivered:
            self.control.commits_finished = self.control.commits_started

    def _wait_for_readers(self, requester: int) -> None:
        """Hold the commit phase back while clients run multi-key reads (up to READER_WAIT),
        so that long scans finish instead of starting over. The requesting client's own flag
        is not waited for: its reading thread may be queued behind the thread that sent this."""
        leases = self.control.leases
        if not leases["reading"].any():
            return
        started = time.monotonic()
        pause = 0.00005
        while True:
            reading = [i for i in np.flatnonzero(leases["reading"]).tolist() if i != requester]
            if not reading:
                return
            waited = time.monotonic() - started
            if waited > READER_WAIT:
                self.log.warning("commit phase stopped waiting for readers", leases=reading, seconds=round(waited, 3))
                return
            if waited > 0.01:
                # A reader killed mid-scan leaves its flag set: ignore leases of dead processes.
                if not any(process_start_time(int(leases[i]["pid"])) == int(leases[i]["start_time"]) for i in reading):
                    return
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _sweep(self) -> None:
        """Deliver decided commits that could not be delivered yet, and settle the prepared
        batches of every worker that (re)started since the last sweep - and of every worker
        now and then, for a PREPARE that arrived after its batch was given up (a worker slower
        than WORKER_TIMEOUT). No batch is in progress during a sweep, so every undecided one
        it finds is aborted."""
        self.next_sweep = time.monotonic() + SWEEP_INTERVAL
        if self.undelivered:
            self._deliver()
        procs = self.control.procs
        now = time.monotonic()
        recheck = now >= self.next_pending_check
        if recheck:
            self.next_pending_check = now + PENDING_CHECK_INTERVAL
        for shard in range(self.shards):
            entry = procs[1 + shard]
            generation = int(entry["generation"])
            if (generation == self.seen_generation[shard] and not recheck) or entry["state"] != PROC_UP:
                continue
            answer = self._call_workers({shard: bytes((m.PENDING, 0))})[shard]
            if isinstance(answer, BaseException):
                continue
            body = answer[1]
            for i in range(0, len(body), 8):
                txid = _U64.unpack_from(body, i)[0]
                if txid in self.undelivered:
                    self.undelivered[txid].add(shard)
                else:
                    self.log.info("aborting a prepared batch with no decision", shard=shard, txid=txid)
                    self._call_workers({shard: bytes((m.ABORT, 0)) + _U64.pack(txid)})
            self.seen_generation[shard] = generation
        if self.undelivered:
            self._deliver()

    # -- talking to workers ----------------------------------------------------------------
    def _call_workers(self, messages: dict[int, bytes], fault: str | None = None) -> dict:
        """Send each worker its message at once and wait for every answer: shard -> (status,
        body), or the exception its answer carried (WorkerUnavailable if none came)."""
        answers: dict = {}
        pending = {}
        for shard, message in messages.items():
            ring = self.worker_rings[shard]
            slot = ring.slot(self.leases)
            if SLOT_STATE.unpack_from(slot, 0)[0] == SLOT_REQUEST:
                answers[shard] = WorkerUnavailable(f"shard {shard} has not answered an earlier request")
                continue
            request_id = self._next_id()
            if len(message) <= ring.capacity:
                write_frame(slot, SLOT_REQUEST, 0, request_id, message, len(message))
                self.worker_wake[shard].release()
                pending[shard] = (slot, request_id)
            else:
                answers[shard] = self._send_long(shard, slot, request_id, message)
            if fault is not None and len(messages) > 1:
                faults.point(fault)
                fault = None
        deadline = time.monotonic() + WORKER_TIMEOUT
        for shard, (slot, request_id) in pending.items():
            try:
                self._wait(shard, slot, request_id, deadline)
                answers[shard] = m.parse_response(bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + read_frame(slot)[3]]))
            except Exception as exc:
                answers[shard] = exc
        return answers

    def _send_long(self, shard: int, slot, request_id: int, message: bytes):
        deadline = time.monotonic() + WORKER_TIMEOUT
        try:
            response = frames.send(slot, self.worker_rings[shard].capacity, self.worker_wake[shard], request_id, message, lambda: self._wait(shard, slot, request_id, deadline))
            return m.parse_response(response)
        except Exception as exc:
            return exc

    def _wait(self, shard: int, slot, request_id: int, deadline: float) -> None:
        # Spin-then-sleep, as a client does (Client._wait): posts of answers found by polling
        # are taken first (only this process takes posts of `worker_done`), then the slot is
        # polled for frames.REQUESTER_SPIN before sleeping on the semaphore.
        frames.drain(self.worker_done)
        if frames.spin_for_response(slot, request_id):
            return
        while True:
            if SLOT_STATE.unpack_from(slot, 0)[0] == SLOT_RESPONSE and read_frame(slot)[2] == request_id:
                return
            try:
                self.worker_done.acquire(0.05)
                continue
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass
            if self.control.procs[1 + shard]["state"] == PROC_QUARANTINED:
                raise WorkerUnavailable(f"shard {shard} is quarantined")
            if os.getppid() != self.config["supervisor_pid"]:
                self.stopping = True
                raise WorkerUnavailable("the supervisor is gone")
            if time.monotonic() > deadline or self.control.state == STOPPING:
                raise WorkerUnavailable(f"shard {shard} did not answer within {WORKER_TIMEOUT} s")

    def _next_id(self) -> int:
        self.request_id = (self.request_id + 1) & 0xFFFFFFFFFFFFFFFF
        return self.request_id


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m shardkv.coordinator.coordinator CONFIG_JSON`."""
    config = json.loads((sys.argv[1:] if argv is None else argv)[0])
    configure_service_logging(config["log_dir"], "coordinator")
    coordinator = Coordinator(config)

    def stop(signum, frame):
        coordinator.stopping = True
        coordinator.wake.release()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return coordinator.run()


if __name__ == "__main__":
    sys.exit(main())
