"""What `shardkv status` shows: health, per-shard space and load, as a table, JSON or Prometheus."""

from __future__ import annotations

import json
import time

import numpy as np

from shardkv.ipc import messages as m
from shardkv.ipc.layout import SLOT_REQUEST, is_own_entry, name_prefix, shm_entries_with_prefix
from shardkv.ipc.transport import Unresponsive

EXIT_HEALTHY, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2
SHARD_FIELDS = ("keys", "live_bytes", "total_bytes", "garbage_ratio", "segments", "last_fsync_age", "index_repairs")


def collect_status(client, sample_seconds: float = 0.25) -> dict:
    """Health plus, for every shard: space, requests waiting in its ring, operations per second,
    age of the last fsync, in-doubt batches (prepared, awaiting the coordinator's decision) and
    index repairs (times its worker found its shared index disagreeing with the log, and
    rebuilt it, since the worker started). Each process marked up is probed (a second at
    most): one that does not answer is shown "unresponsive".

    ops_per_second is measured over `sample_seconds`; with 0 it is the average since the start.
    """
    before = client._control.procs["requests"].copy()
    started = time.monotonic()
    health = status_from_shared_memory(client)
    answers = {}
    for target, message in probes(health, client.shards).items():
        try:
            answers[target] = client._probe(target, message)
        except Exception as exc:  # noqa: BLE001 — recorded: see record_probes
            answers[target] = exc
    record_probes(health, answers, client.shards)
    if sample_seconds > 0:
        time.sleep(max(0.0, sample_seconds - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        after = client._control.procs["requests"]
    for index, entry in enumerate([health["coordinator"], *health["shards"]]):
        if sample_seconds > 0:
            entry["ops_per_second"] = round(float(after[index] - before[index]) / elapsed, 1)
        else:
            entry["ops_per_second"] = round(entry["requests"] / entry["uptime"], 1) if entry["uptime"] else 0.0
    return finish_status(health)


def status_from_shared_memory(client) -> dict:
    """The health object as the control block and the rings show it, before any probe."""
    from shardkv.client import health_from_control  # noqa: PLC0415 (the client imports this module)

    health = health_from_control(client._control, client._info)
    for entry in health["shards"]:
        entry["waiting"] = int(np.count_nonzero(client._rings[entry["shard"]].states == SLOT_REQUEST))
    return health


def probes(health: dict, shards: int) -> dict[int, bytes]:
    """The probe of each process marked up: target (shard; `shards` for the coordinator) -> message."""
    targets = {shards: m.request(m.PING)} if health["coordinator"]["state"] == "up" else {}
    targets.update({entry["shard"]: m.request(m.STATS) for entry in health["shards"] if entry["state"] == "up"})
    return targets


def record_probes(health: dict, answers: dict, shards: int) -> None:
    """Put the probes' answers ((status, body) or the exception raised) into `health`."""
    if isinstance(answers.get(shards), Unresponsive):
        health["coordinator"]["state"] = "unresponsive"
    for entry in health["shards"]:
        answer = answers.get(entry["shard"])
        if isinstance(answer, Unresponsive):
            entry["state"] = "unresponsive"  # alive (it is "up") but answered no probe in time
        stats = json.loads(bytes(answer[1])) if isinstance(answer, tuple) else None  # an error: shown without figures
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
    """0 healthy, 1 degraded (something restarting, quarantined or in doubt), 2 down."""
    return {"healthy": EXIT_HEALTHY, "degraded": EXIT_DEGRADED}.get(status["status"], EXIT_DOWN)


def _size(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def render_table(status: dict) -> str:
    """A fixed-width table, one row per process."""
    header = ("role", "shard", "pid", "state", "uptime", "restarts", "keys", "live", "total", "garbage", "segs", "waiting", "ops/s", "fsync age", "in doubt")
    rows = [header]
    sup = status["supervisor"]
    rows.append(("supervisor", "-", str(sup["pid"]), sup["state"]) + ("-",) * (len(header) - 4))
    for entry in [status["coordinator"], *status["shards"]]:
        is_shard = entry["role"] == "shard"
        rows.append(
            (
                entry["role"],
                str(entry["shard"]) if is_shard else "-",
                str(entry["pid"] or "-"),
                entry["state"] + (" (compacting)" if entry.get("compacting") else ""),
                f"{entry['uptime']:.0f}s",
                str(entry["restarts"]),
                str(entry.get("keys", "-")) if is_shard and entry.get("keys") is not None else "-",
                _size(entry.get("live_bytes")) if is_shard else "-",
                _size(entry.get("total_bytes")) if is_shard else "-",
                f"{entry['garbage_ratio']:.0%}" if is_shard and entry.get("garbage_ratio") is not None else "-",
                str(entry.get("segments", "-")) if is_shard and entry.get("segments") is not None else "-",
                str(entry.get("waiting", "-")) if is_shard else "-",
                str(entry.get("ops_per_second", "-")),
                f"{entry['last_fsync_age']:.1f}s" if is_shard and entry.get("last_fsync_age") is not None else "-",
                str(entry.get("in_doubt", "-")) if is_shard else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([f"status: {status['status']}", *lines])


def render_prometheus(status: dict) -> str:
    """The same figures in the Prometheus text exposition format."""
    metrics = {
        "shardkv_up": ("gauge", "1 if the process is up", lambda e: 1 if e["state"] == "up" else 0),
        "shardkv_restarts_total": ("counter", "restarts of the process", lambda e: e["restarts"]),
        "shardkv_uptime_seconds": ("gauge", "seconds since the process started", lambda e: e["uptime"]),
        "shardkv_ops_per_second": ("gauge", "requests served per second", lambda e: e.get("ops_per_second")),
        "shardkv_keys": ("gauge", "live keys", lambda e: e.get("keys")),
        "shardkv_live_bytes": ("gauge", "bytes of live records", lambda e: e.get("live_bytes")),
        "shardkv_total_bytes": ("gauge", "bytes of all records in the log", lambda e: e.get("total_bytes")),
        "shardkv_garbage_ratio": ("gauge", "share of the log that compaction would reclaim", lambda e: e.get("garbage_ratio")),
        "shardkv_segments": ("gauge", "log segments", lambda e: e.get("segments")),
        "shardkv_waiting_requests": ("gauge", "requests waiting in the ring", lambda e: e.get("waiting")),
        "shardkv_last_fsync_age_seconds": ("gauge", "seconds since the last fsync", lambda e: e.get("last_fsync_age")),
        "shardkv_in_doubt_batches": ("gauge", "prepared batches awaiting a decision", lambda e: e.get("in_doubt")),
        "shardkv_index_repairs_total": ("counter", "index tables rebuilt from the log since the worker started", lambda e: e.get("index_repairs")),
    }
    lines = [f"shardkv_healthy {1 if status['status'] == 'healthy' else 0}"]
    processes = [status["coordinator"], *status["shards"]]
    for name, (kind, text, value) in metrics.items():
        samples = []
        for entry in processes:
            sample = value(entry)
            if sample is not None and (entry["role"] == "shard" or name in ("shardkv_up", "shardkv_restarts_total", "shardkv_uptime_seconds", "shardkv_ops_per_second")):
                label = f'role="{entry["role"]}"' + (f',shard="{entry["shard"]}"' if entry["role"] == "shard" else "")
                samples.append(f"{name}{{{label}}} {sample}")
        if samples:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"
