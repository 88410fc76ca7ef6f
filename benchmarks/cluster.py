"""Cluster benchmark: a shardkv cluster (`shardkv.open`, 2 shard workers) beside Redis (redis-py
on a unix socket) and LMDB (py-lmdb), every client in its own process.

Run from the repository root::

    python -m benchmarks.cluster                 # 100k keys x 100-byte values
    python -m benchmarks.cluster --quick         # 20k keys, fewer operations
    python -m benchmarks.cluster --stores shardkv,lmdb --keys 50000 --json out.json

Workload, for each store in a fresh temporary directory (deleted right after that store):

* load (untimed)   - N keys of 16 random bytes (fixed seed), 100-byte values (a pool of 1024
                     random values; key i gets pool[i % 1024]); shardkv one put at a time,
                     Redis MSET of 1000, LMDB one write transaction per 1000;
* get / put        - single-key round trips of random existing keys (puts write the key's own
                     value again), from 1 client process and then from 2 client processes at
                     once (each doing --ops operations, released together by a barrier). Each
                     operation is timed on its own: p50 and p99 over every operation of every
                     process; ops/s = all operations / (last finish - first start);
* get_many 1000    - batches of 1000 random keys (shardkv get_many, Redis MGET, LMDB one read
                     transaction per batch) from 1 process; keys/s, median of 3 runs;
* scan, full       - every item (shardkv scan() in key order, LMDB cursor in key order, Redis
                     SCAN COUNT 1000 + MGET, in no order); items/s, median of 3 runs.

The "shardkv via ring" column is the same kind of cluster opened with `direct_reads=False`: every
get a round trip to the worker (as before the shared index); it is never counted as a peer.

Durability is alike for every store - nothing is fsynced per write: shardkv durability
"process" (cluster and clients), LMDB sync=False + metasync=False, Redis --save '' --appendonly
no. LMDB gets open one read transaction per get (what a per-request server would do); the two
LMDB processes share one environment. Redis is a private redis-server (--port 0, a unix socket
in the temporary directory), skipped with a note when redis-server or redis-py is missing.

After the timed phases each store is checked (untimed): N items in all, and a sample of gets
returns the value that was put. The table's ratio column is shardkv / best peer as a speed ratio
(above 1.0: shardkv faster; for latencies: best peer's latency / shardkv's); a last column gives
the same ratio against Redis alone (LMDB answers in the client's own process, with no IPC).

Every process and server started here is stopped before the run ends, also on an error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Sequence

import numpy as np

from benchmarks.common import (
    RedisServer,
    available_stores,
    check_terminating,
    close_quietly,
    fmt_rate,
    print_problems,
    redis_server_version,
    sigterm_exits,
)
from benchmarks.peers import check_available

KEY_SIZE = 16
VALUE_SIZE = 100
VALUE_POOL = 1024
DEFAULT_KEYS = 100_000
QUICK_KEYS = 20_000
DEFAULT_OPS = 50_000
QUICK_OPS = 10_000
BATCH = 1000
SHARDS = 2
SEED = 20240601
CHECK_SAMPLE = 2000
REPEAT = 3
PHASE_TIMEOUT = 600.0

STORE_NAMES = ("shardkv", "shardkv-ring", "redis", "lmdb")
STORE_LABELS = {"shardkv": "shardkv", "shardkv-ring": "shardkv via ring", "redis": "Redis", "lmdb": "LMDB"}
SHARDKV_STORES = ("shardkv", "shardkv-ring")  # the second: the same cluster with direct_reads=False, never a peer


# -- data -----------------------------------------------------------------------------------------
class Data:
    """Keys and values, regenerated identically in every process from (n, seed)."""

    def __init__(self, n: int, seed: int = SEED, value_size: int = VALUE_SIZE):
        rng = np.random.default_rng(seed)
        raw = rng.bytes(KEY_SIZE * n)
        self.keys = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
        if len(set(self.keys)) != n:
            raise RuntimeError("duplicate keys generated; change the seed")
        buf = np.random.default_rng(seed + 1).bytes(value_size * VALUE_POOL)
        self.pool = [buf[j * value_size : (j + 1) * value_size] for j in range(VALUE_POOL)]
        self.n, self.seed = n, seed

    def value(self, i: int) -> bytes:
        return self.pool[i % VALUE_POOL]

    def indices(self, stream: int, count: int) -> np.ndarray:
        """`count` random key indices (with repetition) for random stream `stream`."""
        return np.random.default_rng([self.seed, stream]).integers(0, self.n, size=count)


# -- store clients (one per process) ----------------------------------------------------------------
class ShardKVClient:
    def __init__(self, spec: dict):
        import shardkv  # noqa: PLC0415

        self.db = shardkv.open(spec["path"], durability="process", direct_reads=spec["store"] == "shardkv")
        self.get, self.put = self.db.get, self.db.put

    def get_many(self, keys):
        return self.db.get_many(keys)

    def scan_count(self) -> int:
        n = 0
        for _ in self.db.scan():
            n += 1
        return n

    def load(self, data: Data) -> None:
        put = self.db.put
        for i, key in enumerate(data.keys):
            put(key, data.value(i))

    def count(self) -> int:
        return len(self.db)

    def close(self) -> None:
        self.db.close()


class RedisClient:
    def __init__(self, spec: dict):
        import redis  # noqa: PLC0415

        self.r = redis.Redis(unix_socket_path=spec["socket"])
        self.get, self.put = self.r.get, self.r.set

    def get_many(self, keys):
        return self.r.mget(keys)

    def scan_count(self) -> int:
        n = 0
        keys = []
        for key in self.r.scan_iter(count=BATCH):
            keys.append(key)
            if len(keys) >= BATCH:
                n += len(self.r.mget(keys))
                keys = []
        if keys:
            n += len(self.r.mget(keys))
        return n

    def load(self, data: Data) -> None:
        for i in range(0, data.n, BATCH):
            self.r.mset({data.keys[j]: data.value(j) for j in range(i, min(i + BATCH, data.n))})

    def count(self) -> int:
        return int(self.r.dbsize())

    def close(self) -> None:
        self.r.close()


class LmdbClient:
    def __init__(self, spec: dict):
        import lmdb  # noqa: PLC0415

        self.env = lmdb.open(spec["path"], map_size=spec["map_size"], sync=False, metasync=False, max_readers=64)
        env = self.env

        def get(key):
            with env.begin() as txn:
                return txn.get(key)

        def put(key, value):
            with env.begin(write=True) as txn:
                txn.put(key, value)

        self.get, self.put = get, put

    def get_many(self, keys):
        with self.env.begin() as txn:
            return [txn.get(k) for k in keys]

    def scan_count(self) -> int:
        n = 0
        with self.env.begin() as txn:
            for _ in txn.cursor():
                n += 1
        return n

    def load(self, data: Data) -> None:
        for i in range(0, data.n, BATCH):
            with self.env.begin(write=True) as txn:
                for j in range(i, min(i + BATCH, data.n)):
                    txn.put(data.keys[j], data.value(j))

    def count(self) -> int:
        return int(self.env.stat()["entries"])

    def close(self) -> None:
        self.env.close()


CLIENTS = {"shardkv": ShardKVClient, "shardkv-ring": ShardKVClient, "redis": RedisClient, "lmdb": LmdbClient}


# -- servers --------------------------------------------------------------------------------------
class Server:
    """What one store needs running while it is measured; `spec` tells clients where it is."""

    def __init__(self, name: str, directory: str, n: int):
        self.name, self.directory, self.n = name, directory, n
        self.spec: dict = {"store": name}
        self.redis: RedisServer | None = None

    def start(self) -> None:
        if self.name in SHARDKV_STORES:
            from shardkv.ops.cluster import start_cluster  # noqa: PLC0415

            path = os.path.join(self.directory, "store")
            _, info = start_cluster(path, SHARDS, "process")
            self.spec.update(path=path, supervisor_pid=info.get("pid"))
        elif self.name == "lmdb":
            path = os.path.join(self.directory, "lmdb")
            os.makedirs(path)
            self.spec.update(path=path, map_size=max(1 << 30, self.n * (KEY_SIZE + VALUE_SIZE + 64) * 8))
        else:
            self.redis = RedisServer(self.directory)  # no RDB, no AOF
            self.spec.update(socket=self.redis.socket)

    def stop(self) -> None:
        if self.name in SHARDKV_STORES and "path" in self.spec:
            from shardkv.ops.cluster import stop_cluster  # noqa: PLC0415

            stop_cluster(self.spec["path"])
        if self.redis is not None:
            self.redis.stop()  # SIGTERM: a clean shutdown (nothing to save)
            self.redis = None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        import shardkv  # noqa: PLC0415

        out["shardkv"] = shardkv.__version__
    except ImportError:
        out["shardkv"] = "missing"
    try:
        import lmdb  # noqa: PLC0415

        out["lmdb"] = f"py-lmdb {lmdb.__version__} (liblmdb {'.'.join(map(str, lmdb.version()))})"
    except ImportError:
        out["lmdb"] = "missing"
    try:
        import redis  # noqa: PLC0415

        out["redis-py"] = redis.__version__
    except ImportError:
        out["redis-py"] = "missing"
    out["redis-server"] = redis_server_version()
    return out


# -- client processes -----------------------------------------------------------------------------
def _client_process(spec: dict, n: int, seed: int, op: str, index: int, ops: int, barrier, results) -> None:
    """One timed client: open, wait at the barrier, run `ops` single-key operations."""
    client = None
    try:
        client = CLIENTS[spec["store"]](spec)
        data = Data(n, seed)
        picks = data.indices(1000 * (op == "put") + index + 1, ops).tolist()
        keys = [data.keys[i] for i in picks]
        latencies = np.empty(ops, dtype=np.int64)
        clock = time.perf_counter_ns
        missing = 0
        if op == "get":
            get = client.get
            barrier.wait(PHASE_TIMEOUT)
            started = time.perf_counter()
            for j, key in enumerate(keys):
                t = clock()
                value = get(key)
                latencies[j] = clock() - t
                if value is None:
                    missing += 1
        else:
            values = [data.value(i) for i in picks]
            put = client.put
            barrier.wait(PHASE_TIMEOUT)
            started = time.perf_counter()
            for j, key in enumerate(keys):
                t = clock()
                put(key, values[j])
                latencies[j] = clock() - t
        finished = time.perf_counter()
        results.put((index, started, finished, latencies.tobytes(), missing, None))
    except BaseException:  # noqa: BLE001 - reported by the parent
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        results.put((index, None, None, None, None, traceback.format_exc()))
    finally:
        close_quietly(client)


_children: list = []  # live client processes, stopped on any exit


def _stop_children(grace: float = 0.0) -> None:
    deadline = time.monotonic() + grace  # (once they have answered they end by themselves)
    for proc in _children:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in _children:
        if proc.is_alive():
            proc.terminate()
    for proc in _children:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    _children.clear()


def run_clients(spec: dict, n: int, seed: int, op: str, procs: int, ops: int) -> dict:
    """`procs` client processes doing `ops` single-key `op`s each; the phase's figures."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    for index in range(procs):
        proc = ctx.Process(target=_client_process, args=(spec, n, seed, op, index, ops, barrier, results), daemon=True)
        _children.append(proc)
        proc.start()
    try:
        try:
            barrier.wait(PHASE_TIMEOUT)
        except threading.BrokenBarrierError:
            pass  # a client failed to start: its traceback is in the results
        answers = [results.get(timeout=PHASE_TIMEOUT) for _ in range(procs)]
    except BaseException:
        _stop_children()
        raise
    _stop_children(grace=10)
    errors = [a[5] for a in answers if a[5]]
    if errors:
        raise RuntimeError(f"a {op} client failed:\n{errors[0]}")
    latencies = np.concatenate([np.frombuffer(a[3], dtype=np.int64) for a in answers])
    wall = max(a[2] for a in answers) - min(a[1] for a in answers)
    missing = sum(a[4] for a in answers)
    return {
        "ops": int(latencies.size),
        "seconds": wall,
        "ops_per_s": latencies.size / wall,
        "p50_us": float(np.percentile(latencies, 50)) / 1e3,
        "p99_us": float(np.percentile(latencies, 99)) / 1e3,
        "missing": missing,
    }


# -- one store --------------------------------------------------------------------------------------
def median_rate(fn: Callable[[], int], repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def run_store(name: str, data: Data, ops: int, parent: str | None, results: dict, problems: list[str]) -> None:
    directory = tempfile.mkdtemp(prefix=f"shardkv-cluster-bench-{name}-", dir=parent)
    server = Server(name, directory, data.n)
    client = None
    figures: dict = {}
    results[name] = figures
    try:
        server.start()
        client = CLIENTS[name](server.spec)
        started = time.perf_counter()
        client.load(data)
        figures["load_s"] = time.perf_counter() - started
        print(f"  {STORE_LABELS[name]}: loaded {data.n:,} keys in {figures['load_s']:.1f} s", flush=True)
        for op in ("get", "put"):
            for procs in (1, 2):
                check_terminating()
                phase = run_clients(server.spec, data.n, data.seed, op, procs, ops)
                figures[f"{op}_{procs}"] = phase
                if phase["missing"]:
                    problems.append(f"{STORE_LABELS[name]}: {phase['missing']} gets of loaded keys found nothing")
                print(f"  {STORE_LABELS[name]}: {op}, {procs} proc: {phase['ops_per_s']:,.0f} ops/s, p50 {phase['p50_us']:.1f} us, p99 {phase['p99_us']:.1f} us", flush=True)
        rng = np.random.default_rng([data.seed, 99])
        batch_keys = [data.keys[i] for i in rng.permutation(data.n)[: min(data.n, 100 * BATCH)].tolist()]
        batches = [batch_keys[i : i + BATCH] for i in range(0, len(batch_keys), BATCH)]

        def get_many_all() -> int:
            found = 0
            for batch in batches:
                found += sum(v is not None for v in client.get_many(batch))
            if found != len(batch_keys):
                problems.append(f"{STORE_LABELS[name]}: get_many found {found} of {len(batch_keys)} keys")
            return len(batch_keys)

        check_terminating()
        figures["get_many"] = median_rate(get_many_all, REPEAT)
        figures["scan"] = median_rate(client.scan_count, REPEAT)
        print(f"  {STORE_LABELS[name]}: get_many {figures['get_many']:,.0f} keys/s, scan {figures['scan']:,.0f} items/s", flush=True)
        # Untimed checks.
        count = client.count()
        scanned = client.scan_count()
        if count != data.n or scanned != data.n:
            problems.append(f"{STORE_LABELS[name]}: {count} keys counted, {scanned} scanned, {data.n} expected")
        sample = np.random.default_rng([data.seed, 7]).choice(data.n, size=min(CHECK_SAMPLE, data.n), replace=False).tolist()
        wrong = sum(client.get(data.keys[i]) != data.value(i) for i in sample)
        if wrong:
            problems.append(f"{STORE_LABELS[name]}: {wrong} of {len(sample)} sampled gets returned a wrong value")
    except Exception as exc:  # noqa: BLE001 - one store's failure does not end the run
        check_terminating()
        problems.append(f"{STORE_LABELS[name]}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        _stop_children()
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            server.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


# -- the table ------------------------------------------------------------------------------------
def build_rows(results: dict, stores: Sequence[str]) -> tuple[list[list[str]], list[dict]]:
    with_redis = "shardkv" in stores and "redis" in stores and len(stores) > 2
    rows = [["operation", "figure"] + [STORE_LABELS[s] for s in stores] + ["shardkv/best peer"] + (["shardkv/Redis"] if with_redis else [])]
    records = []
    peers = [s for s in stores if s not in SHARDKV_STORES]

    def add(label: str, unit: str, pick: Callable[[dict], float | None], higher_is_better: bool, fmt: Callable[[float], str]) -> None:
        values = {}
        for s in stores:
            try:
                value = pick(results.get(s, {}))
            except (KeyError, TypeError):
                value = None
            if value is not None:
                values[s] = value
        cells = [fmt(values[s]) if s in values else "-" for s in stores]

        def speed_ratio(others: list[float]) -> float | None:
            if "shardkv" not in values or not others:
                return None
            return values["shardkv"] / max(others) if higher_is_better else min(others) / values["shardkv"]

        ratio = speed_ratio([values[p] for p in peers if p in values])
        ratio_redis = speed_ratio([values["redis"]] if "redis" in values else [])
        row = [label, unit] + cells + [f"{ratio:.2f}x" if ratio is not None else ""]
        if with_redis:
            row.append(f"{ratio_redis:.2f}x" if ratio_redis is not None else "")
        rows.append(row)
        records.append({"operation": label, "figure": unit, "values": values, "ratio": ratio, "ratio_redis": ratio_redis})

    for op in ("get", "put"):
        for procs in (1, 2):
            label = f"{op}, {procs} proc{'s' if procs > 1 else ''}"
            key = f"{op}_{procs}"
            add(label, "ops/s", lambda f, k=key: f[k]["ops_per_s"], True, fmt_rate)
            add(label, "p50 us", lambda f, k=key: f[k]["p50_us"], False, lambda x: f"{x:.1f}")
            add(label, "p99 us", lambda f, k=key: f[k]["p99_us"], False, lambda x: f"{x:.1f}")
    add(f"get_many {BATCH}", "keys/s", lambda f: f["get_many"], True, fmt_rate)
    add("scan, full", "items/s", lambda f: f["scan"], True, fmt_rate)
    return rows, records


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description="Benchmark a shardkv cluster beside Redis and LMDB (multi-process).")
    p.add_argument("--keys", type=int, default=None, help=f"number of keys (default {DEFAULT_KEYS:,}; {QUICK_KEYS:,} with --quick)")
    p.add_argument("--ops", type=int, default=None, help=f"single-key operations per client process (default {DEFAULT_OPS:,}; {QUICK_OPS:,} with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller run")
    p.add_argument("--stores", default=",".join(STORE_NAMES), help="comma-separated subset of " + ",".join(STORE_NAMES))
    p.add_argument("--dir", default=None, help="parent of the temporary directories (default: system temp dir)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the keys, values and access orders")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    args.keys = args.keys if args.keys is not None else (QUICK_KEYS if args.quick else DEFAULT_KEYS)
    args.ops = args.ops if args.ops is not None else (QUICK_OPS if args.quick else DEFAULT_OPS)
    if args.keys < 1 or args.ops < 1:
        p.error("--keys and --ops must be at least 1")
    args.stores = [s.strip().lower() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in args.stores if s not in STORE_NAMES]
    if unknown:
        p.error(f"unknown store(s) {unknown}; choose from {', '.join(STORE_NAMES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with sigterm_exits():  # so that every finally block runs
        try:
            return _main(args)
        finally:
            _stop_children()


def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    notes: list[str] = []
    stores = available_stores(args.stores, lambda name: check_available("shardkv" if name in SHARDKV_STORES else name), STORE_LABELS, notes)
    if not stores:
        print("no store available; nothing to do", file=sys.stderr)
        return 1
    data = Data(args.keys, args.seed)
    print(
        f"shardkv cluster benchmark: {args.keys:,} keys of {KEY_SIZE} B x {VALUE_SIZE}-byte values, {args.ops:,} single-key ops per client "
        f"process, shardkv with {SHARDS} shards, {os.cpu_count()} CPUs, stores {', '.join(STORE_LABELS[s] for s in stores)}",
        flush=True,
    )
    results: dict = {}
    problems: list[str] = []
    for name in stores:
        check_terminating()
        t = time.perf_counter()
        run_store(name, data, args.ops, args.dir, results, problems)
        print(f"  {STORE_LABELS[name]} done in {time.perf_counter() - t:.1f} s", flush=True)
    rows, records = build_rows(results, stores)
    info = versions()
    print()
    print(f"Results: {args.keys:,} keys x {VALUE_SIZE} B; single-key rows: {args.ops:,} ops per client process (p50/p99 over all of them)")
    print("No fsync per write anywhere: shardkv durability 'process', LMDB sync=False/metasync=False, Redis no RDB/AOF.")
    print("LMDB: one read txn per get, one write txn per put. Redis: redis-py over a unix socket, scan = SCAN COUNT 1000 + MGET.")
    print("Ratio: shardkv / best peer as a speed ratio (>1x: shardkv faster; latencies: best peer's / shardkv's);")
    print("shardkv/Redis: the same against Redis alone, the other store here that answers from another process.")
    print()
    print(render(rows))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; total {time.perf_counter() - started:.0f} s")
    print_problems(problems, notes=notes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keys": args.keys, "ops": args.ops, "value_size": VALUE_SIZE, "shards": SHARDS, "cpus": os.cpu_count(),
                       "stores": stores, "results": results, "table": records, "versions": info, "notes": notes, "problems": problems}, f, indent=2)  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
