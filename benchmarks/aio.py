"""1000 concurrent coroutines doing gets (`python -m benchmarks.aio`): the asyncio client beside
the blocking client from 1 and from 8 threads, and redis-py's asyncio client against Redis."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import threading
import time

import shardkv
from benchmarks.common import RedisServer, StoreUnavailable, ensure_cluster_stopped


def blocking_gets(db, keys: list[bytes], threads: int) -> float:
    """ops/s of gets spread over `threads` threads sharing one client."""
    chunks = [keys[i::threads] for i in range(threads)]

    def work(chunk):
        for key in chunk:
            db.get(key)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return len(keys) / (time.perf_counter() - started)


async def coroutine_gets(get, keys: list[bytes], concurrency: int) -> float:
    """ops/s of gets from `concurrency` coroutines sharing one client."""
    queue = list(keys)

    async def worker():
        while queue:
            await get(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(keys) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aio")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--coroutines", type=int, default=1000)
    args = parser.parse_args(argv)
    rng = random.Random(7)
    keys = [b"key%08d" % i for i in range(args.keys)]
    reads = [rng.choice(keys) for _ in range(args.ops)]
    folder = tempfile.mkdtemp(prefix="shardkv-aio-bench-")
    rows = []
    try:
        db = shardkv.open(os.path.join(folder, "db"), shards=2, durability="process")
        for key in keys:
            db.put(key, b"v" * 100)
        rows.append(("shardkv, blocking, 1 thread", blocking_gets(db, reads, 1)))
        rows.append(("shardkv, blocking, 8 threads", blocking_gets(db, reads, 8)))

        async def shardkv_async():
            async with shardkv.aopen(db.directory, pool=4) as adb:
                return await coroutine_gets(adb.get, reads, args.coroutines)

        rows.append((f"shardkv, asyncio, {args.coroutines} coroutines", asyncio.run(shardkv_async())))
        db.close()
        try:
            server = RedisServer(folder)
        except StoreUnavailable as exc:
            print(f"{exc}: Redis row skipped")
        else:
            sock = server.socket
            try:
                import redis.asyncio as aredis  # noqa: PLC0415

                async def redis_async():
                    pool = aredis.BlockingConnectionPool(connection_class=aredis.UnixDomainSocketConnection, path=sock, max_connections=64)
                    client = aredis.Redis(connection_pool=pool)
                    await client.mset({key: b"v" * 100 for key in keys})
                    rate = await coroutine_gets(client.get, reads, args.coroutines)
                    await client.aclose()
                    return rate

                rows.append((f"Redis, redis-py asyncio, {args.coroutines} coroutines", asyncio.run(redis_async())))
            except ImportError:
                print("redis-py not installed: Redis row skipped")
            finally:
                server.stop()
    finally:
        # The embedded cluster stops by itself after its last client closed: let it (or stop it).
        ensure_cluster_stopped(os.path.join(folder, "db"), self_stop_wait=10.0)
        shutil.rmtree(folder, ignore_errors=True)
    width = max(len(name) for name, _ in rows)
    print(f"{args.ops:,} random gets of 100-byte values ({args.keys:,} keys, 2 shards)")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>10,.0f} ops/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
