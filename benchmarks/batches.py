"""Atomic-batch benchmark: shardkv multi-key batches (`put_many`) beside RocksDB (rocksdict
WriteBatch), LMDB (one write transaction per batch) and Redis (MULTI/EXEC pipeline), all in one
run, every store in one client process.

Run from the repository root::

    python -m benchmarks.batches                 # ~1 s per repetition for the slowest store
    python -m benchmarks.batches --quick         # 1/5 of the batches
    python -m benchmarks.batches --stores shardkv,rocksdb --no-fsync --json out.json

Workload: batches of 10, 100 and 1000 puts of fresh keys (inserts: 16 random bytes, fixed seed,
never written before), 100-byte values (a pool of 1024 random values; the i-th key of a row gets
pool[i % 1024]). Every batch is atomic, all or nothing:

* shardkv, cross-shard  - `db.put_many(pairs)` on a cluster of 2 shard workers (`shardkv.open`,
                          embedded), keys spread over both shards: the coordinator runs
                          two-phase commit (prepare on each shard, log the decision, commit).
                          A random batch of 10 lands on one shard now and then (2 in 1024); its
                          last key is replaced by one of the other shard, so every batch of these
                          rows really spans the shards;
* shardkv, single-shard - the same call with every key on shard 0 (`db.shard_of`): the batch goes
                          straight to that shard's worker, one log append;
* RocksDB               - rocksdict `WriteBatch` + `Rdict.write` (raw mode);
* LMDB                  - py-lmdb, one write transaction per batch;
* Redis                 - redis-py `pipeline(transaction=True)` of SETs (MULTI ... EXEC) to a
                          private redis-server on a unix socket.

Each row runs a fixed number of batches per repetition (--quick: a fifth of them), after an
untimed warm-up of a tenth of that; the table shows the median of 3 timed repetitions as
batches/s and ops/s (= batches/s x batch size). The ratio column, on shardkv rows, is shardkv /
best peer at the same batch size and durability (above 1.0: shardkv faster); both shardkv rows
are compared with the same peers. Each store runs all its rows in one fresh temporary directory
(deleted right after it), the batch sizes in increasing order, so later rows write into a fuller
store, alike for every store.

Durability, two sections, marked in the table:

* process (no fsync) - shardkv durability "process" (each write reaches the OS), RocksDB
                       WriteOptions sync=False (WAL on, not synced), LMDB sync=False +
                       metasync=False, Redis --save '' --appendonly no;
* FSYNC, batch 100   - shardkv durability "fsync" (a batch is acknowledged once fsynced), RocksDB
                       WriteOptions sync=True, LMDB sync=True (+ metasync), Redis --appendonly yes
                       --appendfsync always.

After the timed rows each store is checked (untimed): it holds exactly the keys written, and a
sample of them reads back the value put (shardkv: `len(db)`, `db.get_many(sample)` and the
per-shard key counts of `db.stats()`). A peer whose module or binary is missing is skipped with a
note. An error raised by a store is printed with its traceback and listed under "Problems".

Every server started here is stopped before the run ends, also on an error, Ctrl-C or SIGTERM:
redis-server is terminated; the embedded shardkv cluster is left to stop by itself after its last
client closed (it does so within a few seconds; a note says if it had to be stopped).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Sequence

import numpy as np

from benchmarks.common import (
    RedisServer,
    available_stores,
    check_terminating,
    ensure_cluster_stopped,
    fmt_rate,
    print_problems,
    redis_server_version,
    sigterm_exits,
)
from benchmarks.peers import check_available

KEY_SIZE = 16
VALUE_SIZE = 100
VALUE_POOL = 1024
SHARDS = 2
SEED = 20240601
REPEAT = 3
BATCH_SIZES = (10, 100, 1000)
FSYNC_BATCH_SIZE = 100
# Batches per timed repetition: about 1-1.5 s for the slowest store on a 2-core machine.
BATCHES = {10: 2000, 100: 400, 1000: 50}
FSYNC_BATCHES = 200
QUICK_DIVISOR = 5
CHECK_SAMPLE = 2000
SELF_STOP_WAIT = 15.0  # seconds the embedded shardkv cluster gets to stop by itself

STORE_NAMES = ("shardkv", "rocksdb", "lmdb", "redis")
PEERS = ("rocksdb", "lmdb", "redis")
STORE_LABELS = {"shardkv": "shardkv", "rocksdb": "RocksDB", "lmdb": "LMDB", "redis": "Redis"}
ROW_LABELS = {
    ("shardkv", "cross"): "shardkv cross-shard (2PC)",
    ("shardkv", "single"): "shardkv single-shard",
    ("rocksdb", "batch"): "RocksDB WriteBatch",
    ("lmdb", "batch"): "LMDB write txn",
    ("redis", "batch"): "Redis MULTI/EXEC",
}
SECTIONS = ("process", "fsync")
SECTION_LABELS = {"process": "process (no fsync)", "fsync": "FSYNC per batch"}


# -- data -------------------------------------------------------------------------------------------
class KeySource:
    """Fresh random 16-byte keys of one stream, drawn in order (the same for every store)."""

    def __init__(self, seed: int, *stream: int):
        self.rng = np.random.default_rng([seed, *stream])
        self.buffer: list[bytes] = []
        self.pos = 0

    def take(self, count: int) -> list[bytes]:
        while len(self.buffer) - self.pos < count:
            raw = self.rng.bytes(KEY_SIZE * max(count, 4096))
            self.buffer = self.buffer[self.pos :] + [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
            self.pos = 0
        out = self.buffer[self.pos : self.pos + count]
        self.pos += count
        return out

    def take_where(self, count: int, keep) -> list[bytes]:
        """The next `count` keys for which keep(key) is true (the others are dropped)."""
        out: list[bytes] = []
        while len(out) < count:
            out.extend(k for k in self.take(2 * (count - len(out)) + 16) if keep(k))
        return out[:count]


def value_pool(seed: int) -> list[bytes]:
    buf = np.random.default_rng(seed + 1).bytes(VALUE_SIZE * VALUE_POOL)
    return [buf[j * VALUE_SIZE : (j + 1) * VALUE_SIZE] for j in range(VALUE_POOL)]


# -- stores -------------------------------------------------------------------------------------------
class Store:
    """One store in one fresh directory; `write_batches` is the timed loop."""

    name = "?"
    variants: tuple[str, ...] = ("batch",)

    def __init__(self, directory: str, fsync: bool, notes: list[str]):
        self.directory, self.fsync, self.notes = directory, fsync, notes

    def open(self) -> None:
        raise NotImplementedError

    def close(self, clean: bool) -> None:
        raise NotImplementedError

    swapped = 0  # cross-shard batches of the last `batches` call whose last key was swapped

    def batches(self, variant: str, source: KeySource, size: int, count: int) -> list[list[bytes]]:
        """`count` batches of `size` fresh keys for a row of `variant`."""
        keys = source.take(size * count)
        return [keys[i : i + size] for i in range(0, len(keys), size)]

    def write_batches(self, batches: Sequence[tuple[list[bytes], list[bytes]]]) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def get_many(self, keys: list[bytes]) -> list:
        raise NotImplementedError

    def extra_check(self, keys: list[bytes], problems: list[str], label: str) -> None:
        pass


class ShardKVStore(Store):
    name = "shardkv"
    variants = ("cross", "single")

    def open(self) -> None:
        import shardkv  # noqa: PLC0415

        self.path = os.path.join(self.directory, "store")  # (set first: close() looks for a cluster there)
        self.db = shardkv.open(self.path, shards=SHARDS, durability="fsync" if self.fsync else "process")

    def close(self, clean: bool) -> None:
        path = getattr(self, "path", None)
        db, self.db = getattr(self, "db", None), None
        if path is None:
            return
        try:
            if db is not None:
                db.close()
        finally:
            # The embedded cluster stops by itself a few seconds after its last client closed;
            # it must be gone before its directory is deleted. After an error: stop it now
            # (also one whose start `open` was interrupted in).
            wait = SELF_STOP_WAIT if clean and db is not None else 0.0
            if ensure_cluster_stopped(path, self_stop_wait=wait) and clean:
                self.notes.append(f"shardkv ({'fsync' if self.fsync else 'process'}): the embedded cluster was still running {SELF_STOP_WAIT:g} s after the last client closed; stopped it")

    def batches(self, variant, source, size, count):
        shard_of = self.db.shard_of
        if variant == "single":
            keys = source.take_where(size * count, lambda k: shard_of(k) == 0)
            return [keys[i : i + size] for i in range(0, len(keys), size)]
        out = []
        self.swapped = 0
        for _ in range(count):
            keys = source.take(size)
            shards = {shard_of(k) for k in keys}
            if len(shards) == 1:  # all on one shard: swap the last key for one of another shard
                (shard,) = shards
                keys[-1] = source.take_where(1, lambda k: shard_of(k) != shard)[0]
                self.swapped += 1
            out.append(keys)
        return out

    def write_batches(self, batches):
        put_many = self.db.put_many
        for keys, values in batches:
            put_many(zip(keys, values))

    def count(self):
        return len(self.db)

    def get_many(self, keys):
        return self.db.get_many(keys)

    def extra_check(self, keys, problems, label):
        expected = [0] * SHARDS
        for k in keys:
            expected[self.db.shard_of(k)] += 1
        got = [int(s["keys"]) for s in self.db.stats()["shards"]]
        if got != expected:
            problems.append(f"{label}: stats() counts {got} keys per shard, {expected} expected")


class RocksDBStore(Store):
    name = "rocksdb"

    def open(self) -> None:
        from rocksdict import Options, Rdict, WriteBatch, WriteOptions  # noqa: PLC0415

        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self.db = Rdict(os.path.join(self.directory, "rocksdb"), options)
        self.write_options = WriteOptions()
        self.write_options.sync = self.fsync  # WAL on; synced only in the fsync section
        self.write_options.disable_wal = False
        self.WriteBatch = WriteBatch

    def close(self, clean: bool) -> None:
        db, self.db = getattr(self, "db", None), None
        if db is not None:
            db.close()

    def write_batches(self, batches):
        write, write_batch, opts = self.db.write, self.WriteBatch, self.write_options
        for keys, values in batches:
            wb = write_batch(raw_mode=True)
            put = wb.put
            for k, v in zip(keys, values):
                put(k, v)
            write(wb, opts)

    def count(self):
        n = 0
        for _ in self.db.keys():
            n += 1
        return n

    def get_many(self, keys):
        get = self.db.get
        return [get(k) for k in keys]


class LmdbStore(Store):
    name = "lmdb"

    def open(self) -> None:
        import lmdb  # noqa: PLC0415

        path = os.path.join(self.directory, "lmdb")
        os.makedirs(path)
        # The map is address space only (no writemap): generous for pages left half full.
        self.env = lmdb.open(path, map_size=4 << 30, sync=self.fsync, metasync=self.fsync)

    def close(self, clean: bool) -> None:
        env, self.env = getattr(self, "env", None), None
        if env is not None:
            env.close()

    def write_batches(self, batches):
        begin = self.env.begin
        for keys, values in batches:
            txn = begin(write=True)
            put = txn.put
            for k, v in zip(keys, values):
                put(k, v)
            txn.commit()

    def count(self):
        return int(self.env.stat()["entries"])

    def get_many(self, keys):
        with self.env.begin() as txn:
            return [txn.get(k) for k in keys]


class RedisStore(Store):
    name = "redis"

    def open(self) -> None:
        import redis  # noqa: PLC0415

        # A session of its own (Ctrl-C reaches only us); with fsync: AOF, appendfsync always.
        self.server = RedisServer(self.directory, self.fsync)
        self.r = redis.Redis(unix_socket_path=self.server.socket)

    def close(self, clean: bool) -> None:
        client, self.r = getattr(self, "r", None), None
        server, self.server = getattr(self, "server", None), None
        try:
            if client is not None:
                client.close()
        finally:
            if server is not None:
                server.stop()  # SIGTERM: a clean shutdown (with AOF: after its last fsync)

    def write_batches(self, batches):
        pipeline = self.r.pipeline
        for keys, values in batches:
            pipe = pipeline(transaction=True)
            set_ = pipe.set
            for k, v in zip(keys, values):
                set_(k, v)
            pipe.execute()

    def count(self):
        return int(self.r.dbsize())

    def get_many(self, keys):
        return self.r.mget(keys)


STORE_CLASSES: dict[str, type[Store]] = {"shardkv": ShardKVStore, "rocksdb": RocksDBStore, "lmdb": LmdbStore, "redis": RedisStore}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for key, dist in (("shardkv", "shardkv"), ("rocksdict", "rocksdict"), ("py-lmdb", "lmdb"), ("redis-py", "redis")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "missing"
    out["redis-server"] = redis_server_version()
    return out


# -- running one store ---------------------------------------------------------------------------------
def run_store(name: str, section: str, sizes: Sequence[int], counts: dict[int, int], args, pool: list[bytes],
              results: list[dict], problems: list[str], notes: list[str]) -> None:  # fmt: skip
    """Every row of one store in one section, in a fresh directory; then the untimed checks."""
    fsync = section == "fsync"
    directory = tempfile.mkdtemp(prefix=f"shardkv-batches-bench-{name}-{section}-", dir=args.dir)
    store = STORE_CLASSES[name](directory, fsync, notes)
    label = f"{STORE_LABELS[name]} ({section})"
    written_keys: list[bytes] = []
    written_values: list[bytes] = []
    clean = False
    row = None
    try:
        store.open()
        for size in sizes:
            count = counts[size]
            warmup = max(1, count // 10)
            for variant in store.variants:
                check_terminating()
                row = {"section": section, "store": name, "variant": variant, "batch": size, "batches_per_rep": count,
                       "warmup_batches": warmup, "repeat": args.repeat, "batches_per_s": None, "runs": []}  # fmt: skip
                results.append(row)
                # Untimed: the keys (a stream per batch size and kind of row) and their values.
                source = KeySource(args.seed, size, 1 if variant == "single" else 0)
                key_batches = store.batches(variant, source, size, warmup + args.repeat * count)
                if variant == "cross":
                    row["swapped_batches"] = store.swapped
                batches = []
                for keys in key_batches:
                    values = [pool[(len(written_keys) + i) % VALUE_POOL] for i in range(len(keys))]
                    written_keys.extend(keys)
                    written_values.extend(values)
                    batches.append((keys, values))
                store.write_batches(batches[:warmup])
                for r in range(args.repeat):
                    part = batches[warmup + r * count : warmup + (r + 1) * count]
                    gc.collect()
                    started = time.perf_counter()
                    store.write_batches(part)
                    row["runs"].append(count / (time.perf_counter() - started))
                row["batches_per_s"] = statistics.median(row["runs"])
                row["ops_per_s"] = row["batches_per_s"] * size
                print(f"  {ROW_LABELS[(name, variant)]:<26} {SECTION_LABELS[section]:<18} batch {size:>4}: "
                      f"{row['batches_per_s']:>9,.0f} batches/s {row['ops_per_s']:>10,.0f} ops/s "
                      f"(runs: {', '.join(f'{x:,.0f}' for x in row['runs'])})", flush=True)  # fmt: skip
        row = None
        # Untimed checks: every key written is there, and a sample reads back its value.
        if len(set(written_keys)) != len(written_keys):
            raise RuntimeError("duplicate keys generated; change the seed")
        count = store.count()
        if count != len(written_keys):
            problems.append(f"{label}: holds {count:,} keys, {len(written_keys):,} were written")
        sample = np.random.default_rng([args.seed, 7]).choice(len(written_keys), size=min(CHECK_SAMPLE, len(written_keys)), replace=False).tolist()
        got = store.get_many([written_keys[i] for i in sample])
        wrong = sum(g is None or bytes(g) != written_values[i] for g, i in zip(got, sample))
        if wrong or len(got) != len(sample):
            problems.append(f"{label}: {wrong} of {len(sample)} sampled keys read back a wrong or no value")
        store.extra_check(written_keys, problems, label)
        print(f"  {label}: checked {count:,} keys, {len(sample):,} sampled values", flush=True)
        clean = True
    except Exception as exc:  # noqa: BLE001 - one store's failure does not end the run
        check_terminating()
        if row is not None:
            row["error"] = f"{type(exc).__name__}: {exc}"
        problems.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        traceback.print_exc()
    finally:
        try:
            store.close(clean)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{label}: close raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            traceback.print_exc()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


# -- the table ---------------------------------------------------------------------------------------
def build_rows(results: list[dict]) -> tuple[list[list[str]], list[int]]:
    """Table rows (header first) and the indices of rows that start a section."""
    rows = [["durability", "store", "batch", "batches/s", "ops/s", "shardkv/best peer"]]
    starts = []
    order = [("shardkv", "cross"), ("shardkv", "single")] + [(p, "batch") for p in PEERS]
    for section in SECTIONS:
        first = True
        for size in sorted({r["batch"] for r in results if r["section"] == section}):
            here = {(r["store"], r["variant"]): r for r in results if r["section"] == section and r["batch"] == size}
            peers = [here[(p, "batch")] for p in PEERS if (p, "batch") in here and here[(p, "batch")]["batches_per_s"]]
            best = max(peers, key=lambda r: r["batches_per_s"]) if peers else None
            for key in order:
                r = here.get(key)
                if r is None:
                    continue
                if first:
                    starts.append(len(rows))
                    first = False
                ratio = ""
                if r["batches_per_s"] is not None and key[0] == "shardkv" and best is not None:
                    r["ratio"] = r["batches_per_s"] / best["batches_per_s"]
                    r["best_peer"] = best["store"]
                    ratio = f"{r['ratio']:.2f}x {STORE_LABELS[best['store']]}"
                if r["batches_per_s"] is None:
                    cells = ["error", "error"]
                else:
                    cells = [fmt_rate(r["batches_per_s"]), fmt_rate(r["ops_per_s"])]
                rows.append([SECTION_LABELS[section], ROW_LABELS[key], str(size), *cells, ratio])
    return rows, starts


def render(rows: list[list[str]], starts: list[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = "  ".join("-" * w for w in widths)
    lines = []
    for j, row in enumerate(rows):
        if j in starts and j > 1:
            lines.append(rule)
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append(rule)
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batches", description="Benchmark shardkv atomic multi-key batches beside RocksDB, LMDB and Redis.")
    p.add_argument("--quick", action="store_true", help=f"1/{QUICK_DIVISOR} of the batches per repetition")
    p.add_argument("--stores", default=",".join(STORE_NAMES), help="comma-separated subset of " + ",".join(STORE_NAMES))
    p.add_argument("--no-fsync", action="store_true", help="skip the fsync section")
    p.add_argument("--repeat", type=int, default=REPEAT, help=f"timed repetitions per row; the median is shown (default {REPEAT})")
    p.add_argument("--dir", default=None, help="parent of the temporary directories (default: system temp dir)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the keys and values")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    args.stores = [s.strip().lower() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in args.stores if s not in STORE_NAMES]
    if unknown:
        p.error(f"unknown store(s) {unknown}; choose from {', '.join(STORE_NAMES)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    divisor = QUICK_DIVISOR if args.quick else 1
    args.counts = {size: max(1, n // divisor) for size, n in BATCHES.items()}
    args.fsync_counts = {FSYNC_BATCH_SIZE: max(1, FSYNC_BATCHES // divisor)}
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with sigterm_exits():  # so that every finally block runs
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    notes: list[str] = []
    problems: list[str] = []
    stores = available_stores(args.stores, check_available, STORE_LABELS, notes)
    if not stores:
        print("no store available; nothing to do", file=sys.stderr)
        return 1
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    pool = value_pool(args.seed)
    print(
        f"shardkv batch benchmark: atomic batches of {', '.join(map(str, BATCH_SIZES))} puts of fresh {KEY_SIZE}-byte keys x "
        f"{VALUE_SIZE}-byte values; batches per repetition {', '.join(f'{n:,} (of {s})' for s, n in args.counts.items())}"
        + ("" if args.no_fsync else f", fsync section {args.fsync_counts[FSYNC_BATCH_SIZE]:,} (of {FSYNC_BATCH_SIZE})")
        + f"; median of {args.repeat}; shardkv with {SHARDS} shards; {os.cpu_count()} CPUs; stores {', '.join(STORE_LABELS[s] for s in stores)}",
        flush=True,
    )
    results: list[dict] = []
    plan = [("process", BATCH_SIZES, args.counts)] + ([] if args.no_fsync else [("fsync", (FSYNC_BATCH_SIZE,), args.fsync_counts)])
    for section, sizes, counts in plan:
        for name in stores:
            check_terminating()
            t = time.perf_counter()
            run_store(name, section, sizes, counts, args, pool, results, problems, notes)
            print(f"  {STORE_LABELS[name]} ({section}) done in {time.perf_counter() - t:.1f} s", flush=True)
    rows, starts = build_rows(results)
    info = versions()
    elapsed = time.perf_counter() - started
    print()
    print(f"Results: atomic batches of fresh keys ({KEY_SIZE} B) x {VALUE_SIZE}-byte values; median of {args.repeat} repetitions, "
          f"each a fixed number of batches; ops/s = batches/s x batch size.")  # fmt: skip
    print("process (no fsync): shardkv durability 'process', RocksDB WriteOptions sync=False (WAL on), LMDB sync=False/metasync=False,")
    print("  Redis no RDB/AOF. FSYNC per batch: shardkv durability 'fsync', RocksDB sync=True, LMDB sync=True, Redis appendfsync always.")
    print(f"shardkv: put_many on {SHARDS} shards; cross-shard = two-phase commit via the coordinator, single-shard = every key on shard 0.")
    print("Ratio: shardkv / best peer at the same batch size and durability (>1x: shardkv faster); the peer named.")
    print()
    print(render(rows, starts))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; total {elapsed:.1f} s")
    print_problems(problems, notes=notes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"key_size": KEY_SIZE, "value_size": VALUE_SIZE, "shards": SHARDS, "seed": args.seed, "quick": args.quick,
                       "repeat": args.repeat, "cpus": os.cpu_count(), "machine": platform.platform(), "stores": stores,
                       "results": results, "versions": info, "elapsed_s": elapsed, "notes": notes, "problems": problems},
                      f, indent=2)  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
