"""The Redis Cluster backend beside plain redis-py on the same cluster, in one run
(docs/BACKENDS.md, "Cost").

Run from the repository root (needs redis-server on the PATH and redis-py)::

    python -m benchmarks.redis_backend                  # 20k keys, 5 rounds
    python -m benchmarks.redis_backend --keys 100000 --rounds 3 --replicas 1

It starts a Redis Cluster of its own (tests/redis_cluster_support.py: 3 masters, `--replicas`
replicas each, loopback, no persistence) and measures, from this one process, each workload
alternately through plain redis-py (`RedisCluster`, the raw commands) and through shardkv
(`shardkv.open("redis://...")`), `--rounds` times, and reports medians:

* get          - redis-py GET of a random key  | db.get (one GET of the stored key)
* put          - redis-py SET                  | db.put on an ordered store (one script: SET
                 and the index's ZADD) and on a store opened with ordered=False (a plain SET)
* get_many     - redis-py mget_nonatomic of 1000 random keys | db.get_many (MGET per bucket,
                 pipelined per node), keys per second
* ordered scan - no ordered scan exists in plain Redis Cluster: the raw row reads every key
                 (SCAN of each master, MGET per slot, sorted in the client), the shardkv rows a
                 full db.scan() and scans of 100 keys from random starts (the index: one script
                 per bucket, merged in the client)
* min          - db.min(): the cheapest ordered read (one script per bucket)

and the index's cost: the memory of the index (MEMORY USAGE of its sorted sets) per key,
and used_memory per key of an ordered and of an unordered store of the same keys.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from benchmarks.common import machine_line, render_table

VALUE_SIZE = 100
SEED = 20
BLOCK = 200  # single-key calls per turn of a contender


def _median_rate(samples: list[float]) -> float:
    return statistics.median(samples)


def _time(fn, count: int) -> float:
    """Operations per second of fn() doing `count` operations."""
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def used_memory(rc) -> int:
    """The sum of used_memory over the cluster's masters."""
    return sum(int(rc.get_redis_connection(node).info("memory")["used_memory"]) for node in rc.get_primaries())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and a Markdown copy with --markdown)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_backend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000, help="keys written and read (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per workload; medians reported (default 5)")
    parser.add_argument("--replicas", type=int, default=0, help="replicas per master (default 0)")
    parser.add_argument("--index-keys", type=int, default=200_000, help="keys of the index-memory measurement (default 200000)")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from redis_cluster_support import LocalRedisCluster, missing_reason  # noqa: PLC0415

    reason = missing_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    import redis  # noqa: PLC0415
    from redis.cluster import ClusterNode, RedisCluster  # noqa: PLC0415

    import shardkv  # noqa: PLC0415

    rng = random.Random(SEED)
    n = args.keys
    keys = [b"key:%08d" % i for i in range(n)]
    value = os.urandom(VALUE_SIZE)
    order = keys[:]
    rng.shuffle(order)
    batches = [rng.sample(keys, 1000) for _ in range(max(1, n // 1000))]
    starts = [rng.choice(keys) for _ in range(200)]

    with tempfile.TemporaryDirectory(prefix="shardkv-redis-bench-") as tmp:
        cluster = LocalRedisCluster(tmp, replicas=args.replicas)
        try:
            cluster.start()
            rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in cluster.nodes[: cluster.masters_count]])
            db = shardkv.open(cluster.url, namespace="bo")  # ordered: the default
            plain = shardkv.open(cluster.url, namespace="bu", ordered=False)
            raw_order = [b"raw:" + k for k in order]
            raw_batches = [[b"raw:" + k for k in batch] for batch in batches]

            results: dict[str, list[float]] = {}

            def sample(name: str, rate: float) -> None:
                """Record one round's rate of a workload."""
                results.setdefault(name, []).append(rate)

            blocks = [range(i, min(n, i + BLOCK)) for i in range(0, n, BLOCK)]
            for _ in range(args.rounds):
                # Single-key calls go block by block, the contenders' turns rotating, so that a
                # change of the machine's load during the round hits each of them alike.
                for label, calls in (
                    ("put", {"raw": lambda i: rc.set(raw_order[i], value), "shardkv": lambda i: db.put(order[i], value), "shardkv unordered": lambda i: plain.put(order[i], value)}),
                    ("get", {"raw": lambda i: rc.get(raw_order[i]), "shardkv": lambda i: db.get(order[i])}),
                ):
                    spent = dict.fromkeys(calls, 0.0)
                    names = list(calls)
                    for b, block in enumerate(blocks):
                        for name in names[b % len(names) :] + names[: b % len(names)]:
                            call = calls[name]
                            started = time.perf_counter()
                            for i in block:
                                call(i)
                            spent[name] += time.perf_counter() - started
                    for name, seconds in spent.items():
                        sample(f"{label} {name}", n / seconds)
                sample("get_many raw", _time(lambda: [rc.mget_nonatomic(b) for b in raw_batches], 1000 * len(batches)))
                sample("get_many shardkv", _time(lambda: [db.get_many(b) for b in batches], 1000 * len(batches)))
                sample("scan raw", _time(lambda: _raw_sorted_read(rc, b"raw:*"), n))
                sample("scan shardkv", _time(lambda: sum(1 for _ in db.scan()), n))
                sample("scan100 shardkv", _time(lambda: [list(db.scan(start=s, limit=100)) for s in starts[:50]], 50))
                sample("min shardkv", _time(lambda: [db.min() for _ in range(50)], 50))
            assert db.get(keys[-1]) == value and len(db) == n and len(plain) == n

            stats = db.index_stats()
            index_per_key = stats["bytes"] / max(1, stats["entries"])
            memory = _index_memory(cluster.url, rc, args.index_keys)
            m = {name: _median_rate(rates) for name, rates in results.items()}
            rows = [["workload", "redis-py", "shardkv", "ratio"]]

            def row(label, raw, ours, unit="/s"):
                """One line of the table: both rates and their ratio."""
                rows.append([label, "-" if raw is None else f"{raw:,.0f}{unit}", f"{ours:,.0f}{unit}", "-" if raw is None else f"{ours / raw:.2f}x"])

            row("get", m["get raw"], m["get shardkv"])
            row("put (ordered store: SET + index in one script)", m["put raw"], m["put shardkv"])
            row("put (store opened ordered=False: plain SET)", m["put raw"], m["put shardkv unordered"])
            row("get_many of 1000, keys", m["get_many raw"], m["get_many shardkv"])
            row("full ordered scan, keys (raw: SCAN+MGET+sort)", m["scan raw"], m["scan shardkv"])
            row("scan of 100 from a random key, scans", None, m["scan100 shardkv"])
            row("min()", None, m["min shardkv"])
            print(machine_line())
            print(f"redis-server {redis_server_version()}, redis-py {redis.__version__}; {n:,} keys of {VALUE_SIZE} B; "
                  f"3 masters x {args.replicas} replicas on loopback; medians of {args.rounds} alternating rounds; {db.buckets} buckets")  # fmt: skip
            print(render_table(rows))
            print(f"write cost of the index: put {m['put shardkv'] / m['put shardkv unordered']:.2f}x the rate of a store without it")
            print(f"index memory, {n:,} keys ({n / db.buckets:.0f} per bucket): {index_per_key:.1f} bytes per key (MEMORY USAGE of the bucket sorted sets)")
            print(memory)
            if args.markdown:
                from benchmarks.common import markdown_table  # noqa: PLC0415

                print()
                print(markdown_table(rows))
            db.close()
            plain.close()
            rc.close()
        finally:
            cluster.stop()
    return 0


def _index_memory(url: str, rc, count: int) -> str:
    """used_memory per key of `count` keys written (put_many(atomic=False), 16-byte keys,
    8-byte values) into a store without and one with the index, and the index's own MEMORY
    USAGE per key: one line."""
    import shardkv  # noqa: PLC0415

    items = [(b"m:%012d" % i, b"%08d" % i) for i in range(count)]
    line = []
    for name, ordered in (("without the index", False), ("with the index", True)):
        before = used_memory(rc)
        with shardkv.open(url, namespace="mem" + ("o" if ordered else "u"), ordered=ordered) as store:
            for i in range(0, count, 5000):
                store.put_many(items[i : i + 5000], atomic=False)
            grown = used_memory(rc) - before
            line.append(f"{name} {grown / count:.0f} B")
            if ordered:
                stats = store.index_stats()
                line.append(f"the index alone {stats['bytes'] / max(1, stats['entries']):.0f} B ({count / store.buckets:.0f} keys per bucket)")
    return f"used_memory per key, {count:,} keys of 14 B with 8 B values: " + ", ".join(line)


def _raw_sorted_read(rc, pattern: bytes) -> int:
    """Every key matching `pattern` with its value, in key order, with plain redis-py: SCAN
    of each master, MGET per slot, then sort (what an ordered read costs without an index)."""
    keys = []
    for node in rc.get_primaries():
        keys += rc.get_redis_connection(node).scan_iter(match=pattern, count=1000)
    values = rc.mget_nonatomic(keys)
    return len(sorted(zip(keys, values)))


def redis_server_version() -> str:
    """redis-server --version's v= field."""
    import subprocess  # noqa: PLC0415

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return "?"


if __name__ == "__main__":
    sys.exit(main())
