"""How long does a request wait while its shard compacts? (`python -m benchmarks.compaction_stall`)

Builds a 1-shard store holding about `--gib` GiB of live 1 KiB values plus as much garbage,
serves it with a cluster, and while `shardkv compact` runs, a client does gets and puts in a
loop and records every request's latency: the longest wait is the figure the ops issue asks for.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time

import shardkv
from shardkv.coordinator.manifest import write_manifest
from shardkv.shards import ShardEngine
from shardkv.coordinator.manifest import shard_directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compaction_stall")
    parser.add_argument("--gib", type=float, default=1.0, help="live data in GiB (default 1)")
    parser.add_argument("--dir", default=None, help="parent folder of the temporary store")
    args = parser.parse_args(argv)
    keys = int(args.gib * (1 << 30) / 1024)
    root = tempfile.mkdtemp(prefix="shardkv-stall-", dir=args.dir)
    directory = os.path.join(root, "db")
    try:
        os.makedirs(directory, mode=0o700)
        write_manifest(directory, 1)
        value = os.urandom(1024)
        started = time.perf_counter()
        with ShardEngine.open(shard_directory(directory, 0), durability="process") as engine:
            for round_ in range(2):  # the first round becomes garbage
                for i in range(0, keys, 1000):
                    engine.apply([("put", b"key%09d" % j, value) for j in range(i, min(keys, i + 1000))])
            space = engine.stats()
        print(f"built {keys:,} keys, {space['total_bytes'] / 2**30:.2f} GiB of log, garbage {space['garbage_ratio']:.0%} in {time.perf_counter() - started:.0f} s")
        with shardkv.open(directory) as db:
            latencies: list[float] = []
            stop = threading.Event()

            def load() -> None:
                rng = random.Random(1)
                with shardkv.open(directory) as client:
                    while not stop.is_set():
                        key = b"key%09d" % rng.randrange(keys)
                        t = time.perf_counter()
                        if rng.random() < 0.5:
                            client.get(key)
                        else:
                            client.put(key, value)
                        latencies.append(time.perf_counter() - t)

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(1.0)
            before = len(latencies)
            started = time.perf_counter()
            result = db.compact()[0]
            seconds = time.perf_counter() - started
            stop.set()
            thread.join()
            during = sorted(latencies[before:])
            print(f"compaction: {result['before']['total_bytes'] / 2**30:.2f} GiB -> {result['after']['total_bytes'] / 2**30:.2f} GiB in {seconds:.1f} s")
            if during:
                print(
                    f"requests during compaction: {len(during):,}; p50 {during[len(during) // 2] * 1e6:.0f} us, "
                    f"p99 {during[int(len(during) * 0.99)] * 1e6:.0f} us, longest wait {during[-1] * 1e3:.1f} ms"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
