"""The coordinator process: owns the shard map and runs two-phase commit for batches that span
shards (docs/TRANSACTIONS.md).

Hash slot h belongs to shard h mod N. Clients send TXN requests through the coordinator's ring;
the coordinator talks to each worker through the COORDINATOR_SLOTS ring slots reserved for it
(slots L, L + 1, ...). It runs the TXNs waiting in its ring in rounds of up to COORDINATOR_SLOTS
batches: one PREPARE fan-out for the whole round, the decisions, one COMMIT fan-out. A PREPARE
never waits on a lock (it votes Busy), so batches never wait on each other; one that met the
lock of another batch of its round runs again alone right after it.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time

import numpy as np
import posix_ipc
import setproctitle

from shardkv import faults
from shardkv.coordinator.decisions import DecisionLog, decisions_directory
from shardkv.errors import Busy, Conflict, CorruptionError, StorageError, Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc import protocol
from shardkv.ipc.layout import (
    COORDINATOR_SLOTS,
    PROC_QUARANTINED,
    PROC_UP,
    STOPPING,
    ControlBlock,
    Ring,
    default_shard_map,
    join_cluster,
    map_shared_memory,
    process_start_time,
    readers_waited_for,
    worker_ring_slots,
)
from shardkv.ipc.transport import Channel, Requester, RingServer
from shardkv.log import configure_service_logging, get_logger
from shardkv.coordinator.runfiles import read_config
from shardkv.coordinator.membership import EXIT_CORRUPT, EXIT_STORAGE, leave_cluster, stop_confirmed

WORKER_TIMEOUT = 60.0  # the longest wait for one worker's answer (a 256 MiB PREPARE included)
READER_WAIT = 5.0  # how long a commit phase waits for multi-key reads in progress
SWEEP_INTERVAL = 0.25  # seconds between checks for undelivered commits and restarted workers
PENDING_CHECK_INTERVAL = 5.0  # seconds between asking every worker for its undecided batches


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
        self.wake = posix_ipc.Semaphore(names["coord_wake"])
        self.client_done = [posix_ipc.Semaphore(name) for name in names["done"]]
        self.server = RingServer(self.ring, self.wake, self.client_done, config["max_message"])
        self.worker_bufs = [map_shared_memory(name) for name in names["rings"]]
        self.worker_rings = [Ring(buf, worker_ring_slots(self.leases), config["slot_size"]) for buf in self.worker_bufs]
        self.worker_wake = [posix_ipc.Semaphore(name) for name in names["wake"]]
        self.worker_done = posix_ipc.Semaphore(names["coord_done"])
        # channels[shard][k]: coordinator slot k of that worker's ring (slot leases + k).
        self.channels = [
            [Channel(self.worker_rings[s], self.leases + k, self.worker_wake[s], s, f"shard {s}") for k in range(COORDINATOR_SLOTS)] for s in range(self.shards)
        ]
        self.requester = Requester(self.worker_done, self._check_worker)
        self.stopping = False
        self.decisions: DecisionLog | None = None
        self.undelivered: dict[int, set[int]] = {}  # decided txid -> shards yet to apply it
        self.seen_generation = [0] * self.shards  # worker generation whose prepared batches were settled
        self.next_sweep = 0.0
        self.next_pending_check = 0.0
        # rounds: rounds of cross-shard batches run; largest_round: the most batches in one;
        # ran_again: batches run again alone after meeting a lock of their round;
        # decision_fsyncs: fsyncs of the decision log (one per round that asks for one).
        self.stats = {"committed": 0, "aborted": 0, "rounds": 0, "largest_round": 0, "ran_again": 0, "decision_fsyncs": 0}
        self.served = 0
        self.exit_code = 0
        self.commits = (0, 0)  # what this coordinator last wrote as (commits_started, commits_finished)
        self.table = self._dispatch_table()

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
        started, finished = control.commits_started, control.commits_finished
        if self.undelivered and started == finished:
            started += 1  # the crash came before the commit phase was opened
        self._publish_commits(started, finished if self.undelivered else started)
        self._abandon_stale_requests()
        control.procs[0]["state"] = PROC_UP
        self.log.info("started", pid=os.getpid(), map_version=control.map_version, undelivered=len(self.undelivered))
        supervisor = self.config["supervisor_pid"]
        try:
            for ready in self.server.serve(lambda: not self.stopping and control.state != STOPPING and os.getppid() == supervisor, SWEEP_INTERVAL):
                if time.monotonic() >= self.next_sweep:
                    self._sweep()
                if ready:
                    self._serve(ready)
                self._decision_log_failed()  # the background fsync may have failed meanwhile
        finally:
            self.decisions.close()
            self.log.info("stopped", **self.stats)
        return self.exit_code

    def _abandon_stale_requests(self) -> None:
        """A request left in the ring by the previous coordinator may have been decided already:
        answer it Unavailable (outcome unknown) rather than run it twice."""
        self.server.abandon_stale(Unavailable("the coordinator restarted; the batch may or may not have been applied (each batch is all or nothing)"))

    def _serve(self, slots: list[int]) -> None:
        """Answer the requests in these slots of the coordinator's ring: TXNs in rounds of up to
        COORDINATOR_SLOTS batches, anything else at once."""
        batches = []
        for slot in slots:
            request_id, message, reply = self.server.receive(slot)
            if message is not None:
                try:
                    if message[0] == m.TXN:
                        batches.append(self._parse_txn(slot, request_id, message))
                        continue
                    reply = self._execute(message)
                except (ValueError, TypeError) as exc:
                    reply = m.error_response(exc)
                except Exception as exc:  # keep serving everyone else
                    self.log.error("request failed", error=repr(exc))
                    reply = m.error_response(exc)
            self._answer(slot, request_id, reply)
        for start in range(0, len(batches), COORDINATOR_SLOTS):
            if self.stopping:
                break  # the requests left are answered by the next coordinator (Unavailable)
            self._transact(batches[start : start + COORDINATOR_SLOTS])

    def _answer(self, slot: int, request_id: int, reply: bytes) -> None:
        self.served += 1
        self.control.procs[0]["requests"] = self.served  # counted before answering, as workers do
        self.server.answer(slot, request_id, reply)

    def _execute(self, message: bytes) -> bytes:
        """The answer to a request that is not a TXN (TXNs run in rounds: _serve)."""
        serve = self.table.get(message[0])
        if serve is None:
            raise m.MessageError(f"op {message[0]} is not served by the coordinator")
        return serve(message)

    def _dispatch_table(self) -> dict:
        """{op code: serve(request) -> response} of the coordinator's operations but TXN."""
        return protocol.dispatch_table(
            protocol.COORDINATOR,
            {
                m.PING: lambda: None,
                m.STATS: lambda: {**self.stats, "undelivered": len(self.undelivered)},
            },
            elsewhere=frozenset((m.TXN,)),
        )

    def _parse_txn(self, slot: int, request_id: int, message: bytes) -> "_Batch":
        """A TXN request as a batch to run (MessageError if malformed)."""
        (parts,) = protocol.TXN.decode(message)
        shards = [shard for shard, _ in parts]
        if not parts or len(set(shards)) != len(shards) or max(shards) >= self.shards:
            raise m.MessageError(f"TXN parts must name distinct shards below {self.shards}, not {shards}")
        return _Batch(slot, request_id, message[1] & m.FLAG_FSYNC, parts)

    # -- two-phase commit ------------------------------------------------------------------
    def _transact(self, batches: list["_Batch"]) -> None:
        """Run a round of cross-shard batches and answer each client; then run again, alone,
        each batch that met the lock of another batch of the round."""
        try:
            again = self._round(batches)
        except Exception as exc:  # keep serving everyone else
            self.log.error("cross-shard batch failed", error=repr(exc))
            for batch in batches:
                if not batch.answered:
                    self._answer_batch(batch, m.error_response(exc))
            return
        for batch in again:
            if self.stopping:  # aborted and not logged: not applied, the client sends it again
                self._answer_batch(batch, m.error_response(Busy("the coordinator is restarting; the batch was not applied")))
                continue
            self.stats["ran_again"] += 1
            self._transact([batch.renewed()])

    def _round(self, batches: list["_Batch"]) -> list["_Batch"]:
        """PREPARE every batch everywhere at once (batch k through coordinator slot k of each
        of its shards), decide each, COMMIT the committed ones everywhere at once, answer.
        Returns the batches to run again alone: those that met a lock held by another batch of
        the round (in a round of one, that is answered Busy, as the client retries it)."""
        self.stats["rounds"] += 1
        self.stats["largest_round"] = max(self.stats["largest_round"], len(batches))
        votes = self._call_workers(
            {(shard, k): protocol.PREPARE.encode(batch.flags, batch.txid, part) for k, batch in enumerate(batches) for shard, part in batch.parts},
            fault="coordinator.prepare_sent",
        )  # fmt: skip
        again, failed, prepared = [], [], []
        for k, batch in enumerate(batches):
            failures = [vote for vote in (votes[(shard, k)] for shard in batch.shards) if isinstance(vote, BaseException)]
            (failed if failures else prepared).append((k, batch, failures))
        if failed:
            self._abort([(k, batch) for k, batch, _ in failed])
            for _, batch, failures in failed:
                if len(batches) > 1 and all(type(failure) is Busy for failure in failures):
                    again.append(batch)  # a lock of a batch of this round (or an older one)
                else:
                    self._answer_batch(batch, m.error_response(_prepare_error(failures)))
        logged = []
        for k, batch, _ in prepared:
            try:
                self.decisions.log_commit(batch.txid, batch.shards, durable=False)
            except Exception as exc:
                # A failed write leaves no whole record (a torn tail is cut on recovery): the
                # batch is not committed, and aborting it is safe.
                self._abort([(k, batch)])
                self._answer_batch(batch, m.error_response(exc))
                continue
            logged.append((k, batch))
        if any(batch.flags for _, batch in logged):
            try:
                self.decisions.sync()  # one fsync makes every decision of the round durable
                self.stats["decision_fsyncs"] += 1
            except Exception:
                if self.decisions.failure is None:
                    raise  # not a failed fsync (the log was closed, say): the round fails as a whole
        if self._decision_log_failed():
            # The records written may or may not reach the disk: committed or not is decided by
            # what the next coordinator reads back, so send neither COMMIT nor ABORT now, and
            # tell the clients the outcome is unknown.
            for _, batch in logged:
                self._answer_batch(batch, m.error_response(Unavailable(_DECISION_UNKNOWN)))
            return again
        decided = [batch for _, batch in logged]
        if decided:
            faults.point("coordinator.decision_logged")
            for batch in decided:
                self.undelivered[batch.txid] = set(batch.shards)
            self._wait_for_readers({batch.slot for batch in batches})
            self._publish_commits(self.commits[0] + 1, self.commits[1])
            self._deliver(max(batch.flags for batch in decided))
            self.stats["committed"] += len(decided)
            for batch in decided:
                self._answer_batch(batch, m.ok())
        return again

    def _decision_log_failed(self) -> bool:
        """True if a write or fsync of the decision log failed; the coordinator then stops with
        EXIT_STORAGE and the supervisor starts another, which reads the log back and makes what
        it finds durable: after a failed fsync only a fresh reader knows which decisions hold
        (as for a worker, shards/worker.py)."""
        failure = self.decisions.failure
        if failure is None:
            return False
        if not self.stopping:
            self.log.error("the decision log failed a write or fsync; restarting to recover from it", error=repr(failure))
        self.stopping = True
        self.exit_code = EXIT_STORAGE
        return True

    def _answer_batch(self, batch: "_Batch", reply: bytes) -> None:
        batch.answered = True
        self._answer(batch.slot, batch.request_id, reply)

    def _abort(self, batches: list[tuple[int, "_Batch"]]) -> None:
        """Presumed abort: nothing is logged; tell the participants, best effort (one that does
        not hear it settles the batch when the sweep asks for its prepared batches).
        `batches`: (coordinator slot, batch) pairs."""
        self.stats["aborted"] += len(batches)
        self._call_workers({(shard, k): protocol.ABORT.encode(0, batch.txid) for k, batch in batches for shard in batch.shards})

    def _deliver(self, flags: int = m.FLAG_FSYNC) -> None:
        """Send COMMIT for every decided batch to each participant that has not applied it, up
        to COORDINATOR_SLOTS batches at once; once none is left, close the commit phase
        (docs/TRANSACTIONS.md, "Isolation")."""
        txids = list(self.undelivered)
        for start in range(0, len(txids), COORDINATOR_SLOTS):
            group = txids[start : start + COORDINATOR_SLOTS]
            messages = {(shard, k): protocol.COMMIT.encode(flags, txid) for k, txid in enumerate(group) for shard in sorted(self.undelivered[txid])}
            answers = self._call_workers(messages, fault="coordinator.commit_sent")
            for (shard, k), answer in answers.items():
                if not isinstance(answer, BaseException):
                    self.undelivered[group[k]].discard(shard)
            for txid in group:
                if not self.undelivered[txid]:
                    del self.undelivered[txid]
                    self.decisions.applied(txid)
        if not self.undelivered:
            self._publish_commits(self.commits[0], self.commits[0])

    def _publish_commits(self, started: int, finished: int) -> None:
        """Write the commit-phase counters (docs/TRANSACTIONS.md, "Isolation"), keeping a private
        copy: the coordinator is their only writer, so a difference is a stray write."""
        self.commits = (started, finished)
        self.control.commits_started = started
        self.control.commits_finished = finished

    def _repair_commits(self) -> None:
        """Put the commit-phase counters back if a stray write changed them (multi-key reads
        would wait for a commit phase that does not run, or restart for one that never was)."""
        control = self.control
        if (control.commits_started, control.commits_finished) != self.commits:
            self.log.warning("the control block's commit counters were overwritten; repaired", found=[control.commits_started, control.commits_finished], kept=list(self.commits))
            self._publish_commits(*self.commits)

    def _wait_for_readers(self, requesters: set[int]) -> None:
        """Hold the commit phase back while clients run multi-key reads (up to READER_WAIT),
        so that long scans finish instead of starting over. The requesting clients' own flags
        are not waited for: a reading thread may be queued behind the thread that sent a batch."""
        leases = self.control.leases
        if not readers_waited_for(leases["reading"]).any():
            return
        started = time.monotonic()
        pause = 0.00005
        while True:
            reading = [i for i in np.flatnonzero(readers_waited_for(leases["reading"])).tolist() if i not in requesters]
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
        self._repair_commits()
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
            answer = self._call_worker(shard, protocol.PENDING.encode(0))
            if isinstance(answer, BaseException):
                continue
            for txid in protocol.PENDING.result(*answer):
                if txid in self.undelivered:
                    self.undelivered[txid].add(shard)
                else:
                    self.log.info("aborting a prepared batch with no decision", shard=shard, txid=txid)
                    self._call_worker(shard, protocol.ABORT.encode(0, txid))
            self.seen_generation[shard] = generation
        if self.undelivered:
            self._deliver()

    # -- talking to workers ----------------------------------------------------------------
    def _call_worker(self, shard: int, message: bytes):
        """Send one worker one message (through the coordinator's first slot) and wait for the
        answer: (status, body), or the exception it carried (WorkerUnavailable if none came)."""
        return self._call_workers({(shard, 0): message})[(shard, 0)]

    def _call_workers(self, messages: dict[tuple[int, int], bytes], fault: str | None = None) -> dict:
        """Send every message at once - (shard, k) through coordinator slot k of that shard's
        ring - and wait for every answer: (shard, k) -> (status, body), or the exception its
        answer carried (WorkerUnavailable if none came)."""
        keys = list(messages)
        results = self.requester.call_many(
            [(self.channels[shard][k], messages[(shard, k)]) for shard, k in keys],
            WORKER_TIMEOUT,
            after_first_post=None if fault is None else (lambda: faults.point(fault)),
        )
        answers: dict = {}
        for key, result in zip(keys, results):
            if isinstance(result, BaseException):
                answers[key] = result if isinstance(result, WorkerUnavailable) else WorkerUnavailable(str(result))
                continue
            try:
                answers[key] = m.parse_response(result)
            except Exception as exc:
                answers[key] = exc
        return answers

    def _check_worker(self, channel: Channel) -> None:
        """The liveness check of a wait for a worker's answer (transport.Requester)."""
        shard = channel.target
        if self.control.procs[1 + shard]["state"] == PROC_QUARANTINED:
            raise WorkerUnavailable(f"shard {shard} is quarantined")
        if os.getppid() != self.config["supervisor_pid"]:
            self.stopping = True
            raise WorkerUnavailable("the supervisor is gone")
        if self.control.state == STOPPING:
            raise WorkerUnavailable("the cluster is stopping")


_DECISION_UNKNOWN = "the coordinator's decision log failed; the batch may or may not have been applied (each batch is all or nothing)"


class _Batch:
    """One cross-shard batch in the coordinator: where its client waits, its parts, its txid."""

    __slots__ = ("slot", "request_id", "flags", "parts", "shards", "txid", "answered")

    def __init__(self, slot: int, request_id: int, flags: int, parts: list):
        self.slot, self.request_id, self.flags, self.parts = slot, request_id, flags, parts
        self.shards = [shard for shard, _ in parts]
        self.txid = secrets.randbits(64) or 1
        self.answered = False

    def renewed(self) -> "_Batch":
        """The same batch under a new txid (an aborted txid is never used again)."""
        return _Batch(self.slot, self.request_id, self.flags, self.parts)


def _prepare_error(failures: list[BaseException]) -> BaseException:
    """What the client is told when a batch could not prepare: a precondition or input error,
    a write the disk refused (StorageError: a full disk, say) or a damaged log as it is - the
    client would retry a Busy until its lock timeout for nothing - and anything else (a lock,
    a worker restarting or too slow) as Busy (nothing was applied; the client retries)."""
    for kind in (Conflict, ValueError, TypeError, StorageError, CorruptionError):
        for failure in failures:
            if isinstance(failure, kind):
                return failure
    return Busy(f"a shard could not prepare the batch ({failures[0]}); it was not applied")


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m shardkv.coordinator.coordinator CONFIG_FILE` (the supervisor's
    owner-only run/config-<cluster>.json)."""
    config = read_config((sys.argv[1:] if argv is None else argv)[0])
    setproctitle.setproctitle(f"shardkv: coordinator of {config['directory']}")
    faults.set_role("coordinator")
    configure_service_logging(config["log_dir"], "coordinator")
    member = join_cluster(config["names"]["control"])
    coordinator = Coordinator(config)

    def stop(signum, frame):
        coordinator.stopping = True
        coordinator.wake.release()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor = config["supervisor_pid"]
    try:
        while True:
            code = coordinator.run()
            if code or coordinator.stopping or os.getppid() != supervisor:
                return code
            # The loop saw STOPPING with no SIGTERM: a stray write (shards/worker.py,
            # stop_confirmed). Start over in this process: the decision log is read back and
            # the requests left in the ring are answered, as a successor would.
            if stop_confirmed(coordinator.control, lambda: coordinator.stopping, supervisor, coordinator.log):
                return code
    finally:
        leave_cluster(member, config, coordinator.log)


if __name__ == "__main__":
    sys.exit(main())
