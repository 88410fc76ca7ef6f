"""What `shardkv status` and `health()` show: health, per-shard space and load.

Shared by the blocking client, the asyncio client and the command line; it imports neither
client (they hand it themselves), so that the clients can import it; what it reads of one is
its public `cluster_view` (shardkv/client.py `ClusterView`). Rendering lives with its
readers: the table in `shardkv/cli/status.py`, the Prometheus exposition in `ops/metrics.py`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from shardkv.ipc import protocol
from shardkv.ipc.layout import PROC_STATE_NAMES, READY, ControlBlock, is_own_entry, name_prefix, shm_entries_with_prefix
from shardkv.ipc.transport import Unresponsive
from shardkv.ops.exitcodes import DEGRADED as EXIT_DEGRADED
from shardkv.ops.exitcodes import DOWN as EXIT_DOWN
from shardkv.ops.exitcodes import OK as EXIT_HEALTHY

SHARD_FIELDS = ("keys", "live_bytes", "total_bytes", "garbage_ratio", "segments", "last_fsync_age", "index_repairs")


def collect_status(client, sample_seconds: float = 0.25) -> dict:
    """Health plus, for every shard: space, requests waiting in its ring, operations per second,
    age of the last fsync, in-doubt batches (prepared, awaiting the coordinator's decision) and
    index repairs (times its worker found its shared index disagreeing with the log, and
    rebuilt it, since the worker started). Each process marked up is probed (a second at
    most): one that does not answer is shown "unresponsive".

    ops_per_second is measured over `sample_seconds`, after the probes, so that they are not
    counted (a process counts a request before it answers it); with 0 it is the average since
    the start.
    """
    view = client.cluster_view
    health = status_from_shared_memory(client)
    answers = {}
    for target, message in probes(health, client.shards).items():
        try:
            answers[target] = view.probe(target, message)
        except Exception as exc:  # noqa: BLE001 — recorded: see record_probes
            answers[target] = exc
    record_probes(health, answers, client.shards)
    if sample_seconds > 0:
        before = view.control.procs["requests"].copy()
        started = time.monotonic()
        time.sleep(sample_seconds)
        elapsed = time.monotonic() - started
        after = view.control.procs["requests"]
    for index, entry in enumerate([health["coordinator"], *health["shards"]]):
        if sample_seconds > 0:
            entry["ops_per_second"] = round(float(after[index] - before[index]) / elapsed, 1)
        else:
            entry["ops_per_second"] = round(entry["requests"] / entry["uptime"], 1) if entry["uptime"] else 0.0
    return finish_status(health)


def health_from_control(control: ControlBlock, info: Mapping) -> dict:
    """The health object as the control block shows it (`info`: the cluster's run/cluster.json):
    overall status, supervisor, coordinator and every shard worker."""
    now = time.time()
    processes = []
    for index, entry in enumerate(control.procs):
        state = PROC_STATE_NAMES.get(int(entry["state"]), "unknown")
        processes.append(
            {
                "role": "coordinator" if index == 0 else "shard",
                "shard": None if index == 0 else index - 1,
                "pid": int(entry["pid"]) or None,
                "state": state,
                "restarts": int(entry["restarts"]),
                "uptime": round(now - float(entry["started_at"]), 3) if state == "up" else 0.0,
                "requests": int(entry["requests"]),
            }
        )
    states = {p["state"] for p in processes}
    overall = "healthy" if states == {"up"} and control.state == READY else ("down" if states <= {"down"} else "degraded")
    return {
        "status": overall,
        "supervisor": {"role": "supervisor", "pid": info["pid"], "state": "up" if control.state == READY else "starting"},
        "coordinator": processes[0],
        "shards": processes[1:],
    }


def status_from_shared_memory(client) -> dict:
    """The health object as the control block and the rings show it, before any probe."""
    view = client.cluster_view
    health = health_from_control(view.control, view.info)
    for entry in health["shards"]:
        entry["waiting"] = view.waiting(entry["shard"])
    return health


def probes(health: dict, shards: int) -> dict[int, bytes]:
    """The probe of each process marked up: target (shard; `shards` for the coordinator) -> message."""
    targets = {shards: protocol.PING.encode(0)} if health["coordinator"]["state"] == "up" else {}
    targets.update({entry["shard"]: protocol.STATS.encode(0) for entry in health["shards"] if entry["state"] == "up"})
    return targets


def record_probes(health: dict, answers: dict, shards: int) -> None:
    """Put the probes' answers ((status, body) or the exception raised) into `health`."""
    if isinstance(answers.get(shards), Unresponsive):
        health["coordinator"]["state"] = "unresponsive"
    for entry in health["shards"]:
        answer = answers.get(entry["shard"])
        if isinstance(answer, Unresponsive):
            entry["state"] = "unresponsive"  # alive (it is "up") but answered no probe in time
        stats = protocol.STATS.result(*answer) if isinstance(answer, tuple) else None  # an error: shown without figures
        for name in SHARD_FIELDS:
            entry[name] = None if stats is None else stats[name]
        entry["compacting"] = bool(stats and stats["compaction"]["running"])
        entry["in_doubt"] = None if stats is None else stats["in_doubt"]


def finish_status(health: dict) -> dict:
    """The overall status and exit code, once every process's state is known."""
    if health["status"] == "healthy" and any(e["state"] != "up" for e in [health["coordinator"], *health["shards"]]):
        health["status"] = "degraded"
    health["exit_code"] = exit_code(health)
    return health


def stale_objects(directory: str) -> list[str]:
    """The /dev/shm entries of `directory`'s clusters that this user owns: with no cluster
    running, the leftovers of a killed one (`shardkv stop` removes them)."""
    return [entry for entry in shm_entries_with_prefix(name_prefix(directory)) if is_own_entry(entry)]


def exit_code(status: dict) -> int:
    """0 healthy, 1 degraded (something restarting, unresponsive or quarantined), 2 down
    (shardkv.ops.exitcodes)."""
    return {"healthy": EXIT_HEALTHY, "degraded": EXIT_DEGRADED}.get(status["status"], EXIT_DOWN)
