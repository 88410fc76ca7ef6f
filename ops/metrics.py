"""The Prometheus exposition of `shardkv status`: `--format prometheus` prints it once,
`--serve PORT` serves it on http://127.0.0.1:PORT/metrics, measured afresh at each scrape.

The figures come from a status object (ops/status.py `collect_status`), one per scrape, not from
counters kept in this process: a custom collector turns it into metric families, and
prometheus_client writes the text format (HELP and TYPE lines, escaping) and serves it.
Imported by the command line only: the library never needs prometheus_client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from shardkv.ops.exitcodes import DOWN, FAILED

# name, type, help, the figure of one process (None: not known now), whether shards only have it.
# A counter's name gets "_total" in the exposition.
PROCESS_METRICS: tuple[tuple[str, str, str, Callable[[dict], object], bool], ...] = (
    ("shardkv_up", "gauge", "1 if the process is up (answered its probe), 0 otherwise", lambda e: 1 if e["state"] == "up" else 0, False),
    ("shardkv_restarts", "counter", "times the supervisor restarted the process", lambda e: e["restarts"], False),
    ("shardkv_requests", "counter", "requests the process served since it started", lambda e: e.get("requests"), False),
    ("shardkv_uptime_seconds", "gauge", "seconds since the process started", lambda e: e["uptime"], False),
    ("shardkv_ops_per_second", "gauge", "requests served per second, sampled over a quarter of a second (the probe not counted)", lambda e: e.get("ops_per_second"), False),
    ("shardkv_keys", "gauge", "live keys of the shard", lambda e: e.get("keys"), True),
    ("shardkv_live_bytes", "gauge", "bytes of the shard's live records", lambda e: e.get("live_bytes"), True),
    ("shardkv_total_bytes", "gauge", "bytes of all records in the shard's log", lambda e: e.get("total_bytes"), True),
    ("shardkv_garbage_ratio", "gauge", "share of the shard's log that compaction would reclaim", lambda e: e.get("garbage_ratio"), True),
    ("shardkv_segments", "gauge", "log segments of the shard", lambda e: e.get("segments"), True),
    ("shardkv_waiting_requests", "gauge", "requests waiting in the shard's ring", lambda e: e.get("waiting"), True),
    ("shardkv_last_fsync_age_seconds", "gauge", "seconds since the shard's last fsync", lambda e: e.get("last_fsync_age"), True),
    ("shardkv_in_doubt_batches", "gauge", "cross-shard batches prepared on the shard, awaiting the coordinator's decision", lambda e: e.get("in_doubt"), True),
    ("shardkv_index_repairs", "counter", "times the worker rebuilt its shared index from its log (it disagreed with the log) since it started", lambda e: e.get("index_repairs"), True),
    ("shardkv_compacting", "gauge", "1 while the shard compacts its log", lambda e: None if e.get("keys") is None else int(bool(e.get("compacting"))), True),
)


def families(status: dict) -> Iterator[Metric]:
    """The metric families of one status object (ops/status.py; or {"status": "not running"})."""
    code = status.get("exit_code", DOWN if status.get("status") in ("down", "not running") else FAILED)
    yield GaugeMetricFamily("shardkv_healthy", "1 if every process of the cluster is up and answering", value=1 if status.get("status") == "healthy" else 0)
    yield GaugeMetricFamily("shardkv_status_code", "the exit code of `shardkv status`: 0 healthy, 1 degraded, 2 down or not running", value=code)
    if "stale_objects" in status:
        yield GaugeMetricFamily("shardkv_stale_objects", "shared-memory objects a killed cluster left (`shardkv stop` removes them)", value=status["stale_objects"])
    processes = [entry for entry in [status.get("coordinator"), *(status.get("shards") or [])] if entry]
    if not processes:
        return
    for name, kind, text, figure, shards_only in PROCESS_METRICS:
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, text, labels=["role", "shard"])
        for entry in processes:
            if shards_only and entry["role"] != "shard":
                continue
            value = figure(entry)
            if value is not None:
                family.add_metric([entry["role"], "" if entry["shard"] is None else str(entry["shard"])], float(value))
        if family.samples:
            yield family


class StatusCollector:
    """A prometheus_client collector that reads a fresh status object at each collection.

    `read_status()` returns the status object, or the text exposition of another backend (a
    str, e.g. a Redis Cluster's), which is passed on as it is parsed. One collection at a time:
    concurrent scrapes wait for each other rather than probing the cluster twice at once.
    """

    def __init__(self, read_status: Callable[[], dict | str]):
        self.read_status = read_status
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        """The families of one fresh reading."""
        with self._lock:
            status = self.read_status()
        if isinstance(status, str):
            yield from text_string_to_metric_families(status)
        else:
            yield from families(status)


def registry_for(read_status: Callable[[], dict | str]) -> CollectorRegistry:
    """A registry holding only a StatusCollector (none of prometheus_client's process metrics:
    they would describe this command, not the cluster)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(read_status))
    return registry


def render_prometheus(status: dict) -> str:
    """The status object in the Prometheus text exposition format (HELP and TYPE lines)."""
    return generate_latest(registry_for(lambda: status)).decode()


def serve(read_status: Callable[[], dict | str], port: int, host: str = "127.0.0.1"):
    """Serve the metrics of `read_status()` on http://host:port/metrics (loopback by default:
    the figures are for a local scraper, not the network) from a daemon thread; returns the
    server (`.shutdown()` stops it). OSError if the port cannot be bound."""
    server, _thread = start_http_server(port, addr=host, registry=registry_for(read_status))
    return server


__all__ = ["PROCESS_METRICS", "StatusCollector", "families", "registry_for", "render_prometheus", "serve"]
