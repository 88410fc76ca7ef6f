"""`shardkv bench`: the seed's workload (put, get, get_many, ascending and descending scans,
delete) against a private cluster in a temporary directory, with progress bars and rates.

It needs nothing beyond shardkv itself. The comparisons with other stores (LMDB, RocksDB, Redis,
...) are the benchmarks/ folder of a source checkout (`pip install -e ".[peers]"`, then
`python -m benchmarks`, `python -m benchmarks.engine`).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

import shardkv
from shardkv.cli.common import UsageError, positive_int, progress_bar, shard_count
from shardkv.ops.cluster import start_cluster, stop_cluster
from shardkv.ops.exitcodes import FAILED, OK


def _phase(label: str, items, fn, total: int) -> tuple[float, int]:
    """Call fn(item) for each item, with a progress bar that is gone when it returns (the
    phase's line is printed after it); (seconds, count)."""
    count = 0
    with progress_bar() as bar:
        task = bar.add_task(label, total=total)
        started = time.perf_counter()
        for item in items:
            fn(item)
            count += 1
            if not count & 1023:  # every call would cost more than a get: update now and then
                bar.update(task, completed=count)
        elapsed = time.perf_counter() - started
    return elapsed, count


def _report(label: str, seconds: float, count: int, extra: str = "") -> None:
    rate = count / seconds if seconds > 0 else float("inf")
    print(f"  {label:<12} {seconds * 1000:>9.0f} ms  {rate:>12,.0f} op/s  n={count:,}{extra}", flush=True)


def cluster_bench(keys: int, shards: int, value_size: int = 100, seed: int = 20240601) -> int:
    """The seed's demo workload against a private cluster in a temporary directory: put every
    key, get every key (checked), get_many, scan ascending and descending, delete every key.
    Returns the exit code: 0, or 6 (FAILED) if a check failed (each printed as PROBLEM)."""
    rng = random.Random(seed)
    pool = [rng.randbytes(value_size) for _ in range(1024)]
    all_keys = list(dict.fromkeys(rng.randbytes(16) for _ in range(keys)))
    values = {k: pool[i % len(pool)] for i, k in enumerate(all_keys)}
    order = all_keys[:]
    rng.shuffle(order)
    tmp = tempfile.mkdtemp(prefix="shardkv-bench-")
    directory = os.path.join(tmp, "store")
    problems = []
    print(f"shardkv {shardkv.__version__} cluster benchmark: {len(all_keys):,} keys of 16 bytes, {value_size}-byte values, {shards} shards, {os.cpu_count()} CPUs")
    print(f"  directory    {directory} (a private cluster, durability 'process')")
    try:
        started = time.perf_counter()
        _, info = start_cluster(directory, shards, "process")
        print(f"  start        {(time.perf_counter() - started) * 1000:>9.0f} ms  (supervisor pid {info['pid']})", flush=True)
        with shardkv.open(directory, durability="process", create=False) as db:
            seconds, n = _phase("put", all_keys, lambda k: db.put(k, values[k]), len(all_keys))
            _report("put", seconds, n)

            def check_get(k):
                if db.get(k) != values[k]:
                    problems.append(f"get {k.hex()}: wrong value")

            seconds, n = _phase("get", order, check_get, len(order))
            _report("get", seconds, n)
            batches = [order[i : i + 1000] for i in range(0, len(order), 1000)]
            got = []
            seconds, _ = _phase("get_many", batches, lambda b: got.append(sum(v is not None for v in db.get_many(b))), len(batches))
            _report("get_many", seconds, sum(got), " (batches of 1000)")
            scanned = []
            seconds, n = _phase("scan asc", db.scan(), scanned.append, len(all_keys))
            if [k for k, _ in scanned] != sorted(all_keys):
                problems.append("scan: keys not all present in ascending order")
            mn, mx = (scanned[0][0].hex(), scanned[-1][0].hex()) if scanned else ("-", "-")
            _report("scan asc", seconds, n, f"  min={mn} max={mx}")
            scanned = []
            seconds, n = _phase("scan desc", db.scan(reverse=True), scanned.append, len(all_keys))
            if [k for k, _ in scanned] != sorted(all_keys, reverse=True):
                problems.append("scan desc: keys not all present in descending order")
            _report("scan desc", seconds, n)
            seconds, n = _phase("delete", order, db.delete, len(order))
            _report("delete", seconds, n)
            if len(db):
                problems.append(f"{len(db)} keys left after deleting every key")
    finally:
        try:
            stop_cluster(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for problem in problems[:20]:
        print(f"PROBLEM: {problem}")
    return FAILED if problems else OK


def cmd_bench(args: argparse.Namespace) -> int:
    """`shardkv bench [--quick] [--keys N] [--shards N]`."""
    if args.engine:  # it moved with the other comparisons: they need the peer stores
        raise UsageError("the engine benchmark is `python -m benchmarks.engine` in a source checkout (pip install -e \".[peers]\")")
    keys = args.keys or (20_000 if args.quick else 100_000)
    return cluster_bench(keys, args.shards or min(os.cpu_count() or 1, 8))


def register(commands) -> None:
    """Add bench to the `shardkv` parser's subcommands."""
    bench = commands.add_parser(
        "bench", help="benchmark a private cluster in a temporary directory",
        description="Put, get, get_many, scan (both ways) and delete rates of a private cluster in a temporary "
        "directory, removed afterwards. Comparisons with other stores: `python -m benchmarks` in a source checkout.",
    )  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="20,000 keys instead of 100,000")
    bench.add_argument("--keys", type=positive_int, default=None, help="number of keys (default 100,000)")
    bench.add_argument("--shards", type=shard_count, default=None, help="shards (default: CPU cores, at most 8)")
    bench.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # moved: says where to
    bench.set_defaults(handler=cmd_bench)
