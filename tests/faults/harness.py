"""The fault harness: a workload from several client processes (tests/faults/client.py) while a
killer sends SIGKILL to shard workers, the coordinator, the supervisor, clients, and workers in
the middle of their recovery; named fault points fire too. Afterwards the oracle is checked:

- every acknowledged put is there with its latest acknowledged value (or the value of a later
  put whose outcome is unknown); durability "process", so no kill may lose one;
- every counter counts every acknowledged increment, and none twice (at most acknowledged +
  unknown);
- the accounts still add up (no transfer half applied) and the two lists are equal and hold
  every acknowledged append once (no append half applied, none applied twice);
- no reader ever saw part of a batch (through get_many or scan);
- `shardkv verify` finds nothing wrong and no prepared batch is left in doubt.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import shardkv
from shardkv.ops.cluster import stop_cluster
from shardkv.ipc.layout import process_start_time
from shardkv.ops.verify import verify_store

from .client import ACCOUNTS, COUNTERS, LISTS, TOTAL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULT_POINTS = ["coordinator.decision_logged", "coordinator.commit_sent", "worker.voted", "shard.commit_logged", "worker.prepare_logged", "worker.answered_unindexed"]


class Harness:
    """One run: `Harness(directory, seconds, clients, seed).run()` returns the figures."""

    def __init__(self, directory: str, seconds: float, clients: int = 3, seed: int | None = None, say=print):
        self.directory = os.path.abspath(directory)
        self.seconds = seconds
        self.clients = clients
        self.rng = random.Random(seed)
        self.say = say
        self.logs = os.path.join(self.directory + "-oracle")
        self.kills: Counter = Counter()
        self.env = dict(os.environ)
        state = self.logs + "/faults"
        os.makedirs(state, exist_ok=True)
        armed = self.rng.sample(FAULT_POINTS, 3)
        self.env["SHARDKV_FAULTS"] = ",".join(f"{p}@{self.rng.randint(5, 40)}" for p in armed)
        self.env["SHARDKV_FAULTS_STATE"] = state
        self.state_dir = state
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")
        self.procs: dict[int, subprocess.Popen] = {}

    # -- running ---------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.monotonic()
        old_env = dict(os.environ)
        os.environ.update({k: self.env[k] for k in ("SHARDKV_FAULTS", "SHARDKV_FAULTS_STATE")})
        try:
            db = shardkv.open(self.directory, shards=2, durability="process")
            db.put_many({a: b"100" for a in ACCOUNTS})
            assert db.shard_of(LISTS[0]) != db.shard_of(LISTS[1])
            end = time.monotonic() + self.seconds
            for ident in range(self.clients):
                self._spawn(ident, end)
            db = self._kill_until(db, end)
            for proc in self.procs.values():
                proc.wait(timeout=120)
            db = self._settle(db)
            report = self._check(db)
            db.close()
        finally:
            os.environ.clear()
            os.environ.update(old_env)
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stop_cluster(self.directory)
        verified = verify_store(self.directory)
        if verified["problems"]:
            report["anomalies"].append(f"verify: {verified['problems'][:3]}")
        report["fault_points_fired"] = sorted(name[: -len(".fired")] for name in os.listdir(self.state_dir))
        report["kills"] = dict(self.kills)
        report["kills_total"] = sum(self.kills.values())
        report["seconds"] = round(time.monotonic() - started, 1)
        return report

    def _spawn(self, ident: int, end: float) -> None:
        seconds = max(0.5, end - time.monotonic())
        log = os.path.join(self.logs, f"client-{ident}.jsonl")
        command = [sys.executable, "-m", "tests.faults.client", self.directory, str(ident), str(seconds), log]
        self.procs[ident] = subprocess.Popen(command, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def _kill_until(self, db, end: float):
        while time.monotonic() < end - 1.0:
            time.sleep(self.rng.uniform(0.4, 1.6))
            victim = self.rng.choices(["worker", "coordinator", "client", "supervisor", "recovering worker"], [40, 20, 15, 10, 15])[0]
            try:
                db = self._kill(db, victim, end)
            except shardkv.Unavailable:
                db = self._reopen(db)
        return db

    def _kill(self, db, victim: str, end: float):
        procs = db.cluster_view.control.procs
        if victim == "client":
            ident = self.rng.randrange(self.clients)
            self.procs[ident].kill()
            self.procs[ident].wait()
            self._spawn(ident, end)
        elif victim == "supervisor":
            os.kill(db.cluster_view.info["pid"], signal.SIGKILL)
            db = self._reopen(db)
        else:
            index = 0 if victim == "coordinator" else 1 + self.rng.randrange(db.shards)
            pid = int(procs[index]["pid"])
            if not pid:
                return db
            os.kill(pid, signal.SIGKILL)
            if victim == "recovering worker":
                # Kill it again as soon as its successor exists: in the middle of recovery.
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and int(procs[index]["pid"]) in (0, pid):
                    time.sleep(0.005)
                new = int(procs[index]["pid"])
                if new and new != pid:
                    time.sleep(self.rng.uniform(0.0, 0.05))
                    os.kill(new, signal.SIGKILL)
                    self.kills["during recovery"] += 1
        self.kills[victim if victim != "recovering worker" else "worker"] += 1
        return db

    def _reopen(self, db):
        """The cluster this client knew is gone (supervisor killed): attach to (start) the next."""
        deadline = time.monotonic() + 60
        while True:
            try:
                db.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                supervisor = db.cluster_view.info
                while process_start_time(supervisor["pid"]) == supervisor["start_time"] and time.monotonic() < deadline:
                    time.sleep(0.01)  # the killed supervisor must be gone before we look again
                return shardkv.open(self.directory, durability="process")
            except shardkv.Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _settle(self, db):
        """Wait until the cluster is healthy with nothing in doubt (restarts done, sweeps run)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                health = db.health()
                if health["status"] == "healthy" and all(s["in_doubt"] == 0 for s in health["shards"]):
                    return db
            except shardkv.Unavailable:
                db = self._reopen(db)
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not settle: {db.health()}")
            time.sleep(0.1)

    # -- the oracle ------------------------------------------------------------------------
    def _entries(self):
        for name in sorted(os.listdir(self.logs)):
            if name.endswith(".jsonl"):
                with open(os.path.join(self.logs, name)) as f:
                    for line in f:
                        try:
                            yield name, json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by a kill

    def _check(self, db) -> dict:
        anomalies: list[str] = []
        puts: dict[str, list] = {}  # key -> [(value, acknowledged)] in order
        increments, unknown_increments = Counter(), Counter()
        appended, attempted_tokens = set(), set()
        counts: Counter = Counter()
        for _, entry in self._entries():
            op, state = entry["op"], entry["state"]
            counts[f"{op} {state}"] += 1
            if op == "put":
                if state == "begin":
                    puts.setdefault(entry["key"], []).append([entry["value"], False])
                else:
                    puts[entry["key"]][-1][1] = True
            elif op == "incr":
                if state == "begin":
                    unknown_increments[entry["key"]] += 1
                else:
                    unknown_increments[entry["key"]] -= 1
                    increments[entry["key"]] += 1
            elif op == "append":
                if state == "begin":
                    attempted_tokens.add(entry["token"])
                elif state == "ok":
                    appended.add(entry["token"])
                else:
                    attempted_tokens.discard(entry["token"])  # a Conflict: certainly not applied
            elif op == "read" and state == "anomaly":
                anomalies.append(f"reader: {entry}")
        verified = 0
        for key, history in puts.items():
            last_ok = max((i for i, (_, ok) in enumerate(history) if ok), default=-1)
            allowed = {history[last_ok][0]} if last_ok >= 0 else {None}
            allowed |= {value for value, _ in history[last_ok + 1 :]}
            value = db.get(bytes.fromhex(key))
            if (value.hex() if value is not None else None) not in allowed:
                anomalies.append(f"put {key}: found {value!r}, expected one of {sorted(map(str, allowed))}")
            verified += sum(1 for _, ok in history if ok)
        for counter in COUNTERS:
            value = int(db.get(counter) or 0)
            low, high = increments[counter.hex()], increments[counter.hex()] + unknown_increments[counter.hex()]
            if not low <= value <= high:
                anomalies.append(f"counter {counter!r} = {value}, acknowledged {low}, at most {high}")
            verified += low
        balances = db.get_many(ACCOUNTS)
        if sum(int(v) for v in balances) != TOTAL:
            anomalies.append(f"accounts add up to {sum(int(v) for v in balances)}, not {TOTAL}")
        list_a, list_b = db.get_many(LISTS)
        tokens = [t for t in (list_a or b"").split(b";") if t]
        if list_a != list_b:
            anomalies.append("the two lists differ: an append was half applied")
        if len(tokens) != len(set(tokens)):
            anomalies.append("a token was appended twice")
        present = {(t + b";").hex() for t in tokens}
        if appended - present:
            anomalies.append(f"acknowledged appends lost: {sorted(appended - present)[:5]}")
        if present - attempted_tokens - appended:
            anomalies.append(f"appends that were never attempted (or failed with Conflict) are present: {sorted(present - attempted_tokens - appended)[:5]}")
        verified += len(appended) + counts["transfer ok"] + counts["read ok"]
        return {
            "operations_verified": verified,
            "acknowledged": {k: v for k, v in counts.items() if k.endswith(" ok")},
            "unknown_outcome": counts["error unknown"],
            "anomalies": anomalies,
        }
