"""How fast a Python `get` and `put` of this design can be at best, beside the stores issue #8
compares them with, in one run (docs/BENCHMARKS.md, "Floors").

Run from the repository root::

    python -m benchmarks.floors                     # 100k keys, 5 repetitions
    python -m benchmarks.floors --keys 20000 --repeat 3

get, all in this one process, over the same random sequence of keys:

* LMDB        - py-lmdb, a read transaction and a get per key (as in benchmarks.cluster);
* shardkv     - `db.get` with direct reads (the shard's shared index, read in this process);
* floor       - one Python function reading the very same shared table and segment mapping,
                doing only what every direct read must: hash the key, read the header's
                version, probe, slice the record, compare the key, check the record's CRC-32C,
                read the version again. No routing, no bounds checks, no retries, no state or
                lock checks: a correct implementation of this design in Python does all of
                this and more, so none can be faster than this function;
* bare probe  - hash, one slot, one location, one slice of the value: no compare, no check, no
                second probe (so not even a correct read). Any hashed lookup in Python does
                at least this much.

put, from this one process:

* Redis       - redis-py SET to a private redis-server on a unix socket (no persistence);
* shardkv     - `db.put` at durability "process";
* round trip  - `get` of an absent key on a client with direct reads off: a request through
                the same ring to the same worker that does almost nothing there. Every put
                pays at least this.

Each figure is the median of the repetitions; the ratios are of medians from this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from crc32c import crc32c

from benchmarks.common import RedisServer, StoreUnavailable, machine_line

VALUE_SIZE = 100
SEED = 8


def _rate(function, keys, repeat: int) -> float:
    """Median calls per second of `function` over `keys`, `repeat` times."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        for key in keys:
            function(key)
        rates.append(len(keys) / (time.perf_counter() - start))
    return statistics.median(rates)


def floor_get(reader):
    """(floor, bare probe) of the module docstring, over `reader`'s current table and active
    segment (so made after a real get). `floor` is a deliberately stripped copy of
    `IndexReader._find` (shardkv/ipc/sharedindex.py): keep the two alike when the probe changes."""
    from shardkv.ipc.sharedindex import GOLDEN32, HEADER_FIELDS, VERSION, VERSION_OFFSET  # noqa: PLC0415
    from shardkv.wal.format import RECORD_HEADER_SIZE  # noqa: PLC0415

    header, fields, version_of = reader._header, HEADER_FIELDS.unpack_from, VERSION.unpack_from
    _, shift, slots, locations, hashes, key_lens, value_lens = reader._table
    segment = reader._active[1]
    crc_of = crc32c

    def get(key):
        h = crc_of(key)
        version = fields(header, VERSION_OFFSET)[0]
        key_len = len(key)
        i = ((h * GOLDEN32) & 0xFFFFFFFF) >> shift
        while True:
            s = slots[i]
            if not s:
                return None
            e = s - 1
            if hashes[e] == h and key_lens[e] == key_len:
                start = locations[e] & 0xFFFFFFFF
                record = segment[start : start + RECORD_HEADER_SIZE + key_len + value_lens[e]]
                if record[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + key_len] == key:
                    if crc_of(record[4:]) != int.from_bytes(record[:4], "little"):
                        raise ValueError("damaged record")
                    if version_of(header, VERSION_OFFSET)[0] == version:
                        return record[RECORD_HEADER_SIZE + key_len :]
            i += 1

    def bare(key):
        e = slots[((crc_of(key) * GOLDEN32) & 0xFFFFFFFF) >> shift] - 1
        start = (locations[e] & 0xFFFFFFFF) + RECORD_HEADER_SIZE + len(key)
        return segment[start : start + value_lens[e]]

    return get, bare


def measure(n_keys: int, n_ops: int, repeat: int) -> dict:
    """Every figure of the module docstring, in one run."""
    import lmdb  # noqa: PLC0415

    import shardkv  # noqa: PLC0415

    rng = np.random.default_rng(SEED)
    value = rng.bytes(VALUE_SIZE)
    out = {}
    with tempfile.TemporaryDirectory(prefix="shardkv-floors-") as directory:
        db = shardkv.open(os.path.join(directory, "shardkv"), shards=2, durability="process")
        ring = None
        try:
            raw = rng.bytes(16 * 3 * n_keys)
            # Keys of shard 0 only, so that one table and one segment serve the floor function.
            keys = [k for k in (raw[i : i + 16] for i in range(0, len(raw), 16)) if db.shard_of(k) == 0][:n_keys]
            for i in range(0, len(keys), 1000):
                db.put_many([(k, value) for k in keys[i : i + 1000]])
            sample = [keys[i] for i in rng.integers(0, len(keys), n_ops)]
            env = lmdb.open(os.path.join(directory, "lmdb"), map_size=1 << 30, sync=False, metasync=False)
            with env.begin(write=True) as txn:
                for k in keys:
                    txn.put(k, value)

            def lmdb_get(key):
                with env.begin() as txn:
                    return txn.get(key)

            if db.get(keys[0]) != value or db._index_readers[0]._table is None:
                raise RuntimeError("direct reads are off: the floor needs the shared index")
            floor, bare = floor_get(db._index_readers[0])
            if any(floor(k) != value for k in keys):  # (also: every record is in the active segment)
                raise RuntimeError("the floor function reads wrong values")
            for name, function in (("LMDB", lmdb_get), ("shardkv", db.get), ("floor", floor), ("bare probe", bare)) * 2:
                out.setdefault(("get", name), []).append(_rate(function, sample, repeat))
            env.close()

            ring = shardkv.open(os.path.join(directory, "shardkv"), direct_reads=False)
            absent = [b"absent-" + k for k in keys[: n_ops // 10]]
            writes = rng.bytes(16 * (n_ops // 10))
            put_keys = [writes[i : i + 16] for i in range(0, len(writes), 16)]  # each repetition after the first overwrites them
            try:
                server = RedisServer(directory)
            except StoreUnavailable as exc:
                print(f"Redis: {exc}")
                server = None
            try:
                redis_set = None
                if server is not None:
                    import redis  # noqa: PLC0415

                    client = redis.Redis(unix_socket_path=server.socket)
                    redis_set = lambda key: client.set(key, value)  # noqa: E731
                for _ in range(2):
                    if redis_set is not None:
                        out.setdefault(("put", "Redis"), []).append(_rate(redis_set, put_keys, repeat))
                    out.setdefault(("put", "shardkv"), []).append(_rate(lambda key: db.put(key, value), put_keys, repeat))
                    out.setdefault(("put", "round trip"), []).append(_rate(ring.get, absent, repeat))
            finally:
                if server is not None:
                    server.stop()
        finally:
            if ring is not None:
                ring.close()
            db.close()
    return {key: statistics.median(rates) for key, rates in out.items()}


def main(argv=None) -> int:
    """Print the figures and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="keys loaded (all on one shard)")
    parser.add_argument("--ops", type=int, default=200_000, help="gets per repetition (puts: a tenth)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; the median is shown")
    args = parser.parse_args(argv)
    print(machine_line())
    figures = measure(args.keys, args.ops, args.repeat)
    for (op, name), rate in figures.items():
        print(f"{op:4s} {name:11s} {rate / 1000:8.1f}k/s  {1e6 / rate:6.2f} us")
    get = {name: rate for (op, name), rate in figures.items() if op == "get"}
    put = {name: rate for (op, name), rate in figures.items() if op == "put"}
    print(f"get: shardkv {get['shardkv'] / get['LMDB']:.2f}x LMDB, floor {get['floor'] / get['LMDB']:.2f}x LMDB, bare probe {get['bare probe'] / get['LMDB']:.2f}x LMDB")
    if "Redis" in put:
        print(f"put: shardkv {put['shardkv'] / put['Redis']:.2f}x Redis, round trip {put['round trip'] / put['Redis']:.2f}x Redis")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
