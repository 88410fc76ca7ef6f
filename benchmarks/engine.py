"""Single-process engine benchmark: shardkv's ShardEngine against LMDB and RocksDB.

Run from the repository root::

    python -m benchmarks.engine                 # 1M keys, values of 1 KiB then 16 B
    python -m benchmarks.engine --quick         # 1/10 scale: 100k keys
    python -m benchmarks.engine --keys 200000 --value-sizes 16 --stores shardkv,lmdb

Workload, for each value size and each store, every store in a fresh temporary directory that
is deleted right after that store's runs:

* put one by one   - N puts, keys in generation order (random 16-byte keys, fixed seed, the
                     same keys for every store and value size);
* put, batch 1000  - a fresh store loaded with batches of 1000 (shardkv ``apply``, LMDB one
                     write transaction per batch, RocksDB ``WriteBatch``);
* get, random      - all N keys in a fixed random order; LMDB opens one read transaction per
                     get (the figure used for the ratio) and, shown on its own row, all gets
                     inside one long read transaction;
* scan             - every item in key order (LMDB cursor, RocksDB ``items()``);
* reopen           - close, then time open + the first get;
* reopen + scan    - close, then time open + the first item of a scan (shardkv: the ordered view
                     saved at close, or sorted in the background);
* index bytes/key  - shardkv ``stats()["index_bytes"] / N`` after the scans (so the sorted
                     structure, built on the first ordered read, is counted); n/a for peers.

Durability is the same for every store - no fsync per write: shardkv ``durability="process"``,
LMDB ``sync=False, metasync=False``, RocksDB default write options (``sync=False``, WAL on).

Read-only phases (get, scan, reopen) are repeated ``--repeat`` times and the median is
reported; the write phases run once each (they need a fresh store). Rates are N / seconds
measured with ``time.perf_counter``. The ratio column is shardkv / best peer as a speed ratio,
so above 1.0 means shardkv is faster (for reopen: best peer time / shardkv time).

After the timed phases every store is checked (untimed): the scan must return exactly the keys
in sorted order with their values, and a sample of gets must return the value that was put. A
store that fails a check or raises is reported under "Problems" instead of crashing the run.
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
from typing import Iterable, Iterator, Sequence

import numpy as np

from benchmarks.common import disk_bytes, fmt_rate, print_problems, timed

BATCH_SIZE = 1000
VALUE_POOL = 1024  # distinct random values per value size; key i gets pool[i % VALUE_POOL]
CHECK_SAMPLE = 2000  # untimed gets checked for the right value after the timed phases
DEFAULT_KEYS = 1_000_000
QUICK_KEYS = 100_000
DEFAULT_VALUE_SIZES = (1024, 16)
KEY_SIZE = 16
SEED = 20240601

STORE_NAMES = ("shardkv", "lmdb", "rocksdb")
STORE_LABELS = {"shardkv": "shardkv", "lmdb": "LMDB", "rocksdb": "RocksDB"}

# Operations, in table order: (id, label, kind). kind "rate": ops/s, higher is better;
# "time": seconds, lower is better; "figure": a plain number, no ratio.
OPERATIONS = (
    ("put", "put one by one", "rate"),
    ("put_batch", f"put, batch {BATCH_SIZE}", "rate"),
    ("get", "get, random", "rate"),
    ("get_long_txn", "get, random, LMDB one txn", "rate"),
    ("scan", "scan, key order", "rate"),
    ("reopen", "reopen (open + 1st get)", "time"),
    ("reopen_scan", "reopen (open + 1st scan item)", "time"),
    ("index_bytes", "index bytes/key", "figure"),
)

DURABILITY_NOTE = (
    "Durability: no fsync per write for every store - shardkv durability='process' (each write "
    "reaches the OS), LMDB sync=False + metasync=False, RocksDB default WriteOptions (sync=False, "
    "WAL on)."
)


# --------------------------------------------------------------------------------------------
# Stores. Each adapter keeps its hot loops in its own methods, with the same local-binding
# style, so the Python overhead around the store calls is the same for everyone.
# --------------------------------------------------------------------------------------------


class StoreUnavailable(Exception):
    """The store's Python package cannot be imported."""


class Store:
    name = "?"

    def __init__(self, path: str, n_keys: int, value_size: int):
        self.path = path
        self.n_keys = n_keys
        self.value_size = value_size

    # lifecycle
    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # timed loops
    def put_each(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        raise NotImplementedError

    def put_batches(self, keys: Sequence[bytes], values: Sequence[bytes], batch: int) -> None:
        raise NotImplementedError

    def get_each(self, keys: Sequence[bytes]) -> int:
        """Get every key; return how many were missing."""
        raise NotImplementedError

    def get_each_long_txn(self, keys: Sequence[bytes]) -> int | None:
        """As get_each inside one read transaction; None where the store has no such thing."""
        return None

    def scan_count(self) -> int:
        raise NotImplementedError

    # untimed helpers
    def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        raise NotImplementedError

    def index_bytes(self) -> int | None:
        return None

    def extra_stats(self) -> dict | None:
        return None


class ShardKVStore(Store):
    name = "shardkv"

    def __init__(self, path: str, n_keys: int, value_size: int):
        super().__init__(path, n_keys, value_size)
        try:
            from shardkv.shards import ShardEngine
        except ImportError as exc:
            raise StoreUnavailable(f"cannot import shardkv.shards.ShardEngine: {exc}") from exc
        self._engine_cls = ShardEngine
        self.db = None

    def open(self) -> None:
        self.db = self._engine_cls.open(self.path, durability="process")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def put_each(self, keys, values):
        put = self.db.put
        for k, v in zip(keys, values):
            put(k, v)

    def put_batches(self, keys, values, batch):
        apply = self.db.apply
        for i in range(0, len(keys), batch):
            apply([("put", k, v) for k, v in zip(keys[i : i + batch], values[i : i + batch])])

    def get_each(self, keys):
        get = self.db.get
        missing = 0
        for k in keys:
            if get(k) is None:
                missing += 1
        return missing

    def scan_count(self):
        n = 0
        for _k, _v in self.db.scan():
            n += 1
        return n

    def get(self, key):
        return self.db.get(key)

    def items(self):
        return iter(self.db.scan())

    def index_bytes(self):
        return int(self.db.stats()["index_bytes"])

    def extra_stats(self):
        stats = dict(self.db.stats())
        stats["len"] = len(self.db)
        return stats


class LMDBStore(Store):
    name = "lmdb"

    def __init__(self, path: str, n_keys: int, value_size: int):
        super().__init__(path, n_keys, value_size)
        try:
            import lmdb
        except ImportError as exc:
            raise StoreUnavailable(f"cannot import lmdb: {exc}") from exc
        self._lmdb = lmdb
        # Generous map: B+tree pages after random inserts are far from full. The file is not
        # preallocated (no writemap), so an oversized map costs only address space.
        self.map_size = n_keys * (value_size + KEY_SIZE + 64) * 4 + (64 << 20)
        self.env = None

    def open(self) -> None:
        self.env = self._lmdb.open(
            self.path, map_size=self.map_size, subdir=True, sync=False, metasync=False, max_dbs=0
        )

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def put_each(self, keys, values):
        begin = self.env.begin
        for k, v in zip(keys, values):
            txn = begin(write=True)
            txn.put(k, v)
            txn.commit()

    def put_batches(self, keys, values, batch):
        begin = self.env.begin
        for i in range(0, len(keys), batch):
            txn = begin(write=True)
            put = txn.put
            for k, v in zip(keys[i : i + batch], values[i : i + batch]):
                put(k, v)
            txn.commit()

    def get_each(self, keys):
        begin = self.env.begin
        missing = 0
        for k in keys:
            txn = begin()
            if txn.get(k) is None:
                missing += 1
            txn.abort()
        return missing

    def get_each_long_txn(self, keys):
        missing = 0
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                if get(k) is None:
                    missing += 1
        return missing

    def scan_count(self):
        n = 0
        with self.env.begin() as txn:
            for _k, _v in txn.cursor():
                n += 1
        return n

    def get(self, key):
        with self.env.begin() as txn:
            return txn.get(key)

    def items(self):
        with self.env.begin() as txn:
            yield from txn.cursor()


class RocksDBStore(Store):
    name = "rocksdb"

    def __init__(self, path: str, n_keys: int, value_size: int):
        super().__init__(path, n_keys, value_size)
        try:
            import rocksdict
        except ImportError as exc:
            raise StoreUnavailable(f"cannot import rocksdict: {exc}") from exc
        self._rocksdict = rocksdict
        self.db = None

    def open(self) -> None:
        rd = self._rocksdict
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        self.db = rd.Rdict(self.path, opts)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def put_each(self, keys, values):
        put = self.db.put
        for k, v in zip(keys, values):
            put(k, v)

    def put_batches(self, keys, values, batch):
        write = self.db.write
        write_batch = self._rocksdict.WriteBatch
        for i in range(0, len(keys), batch):
            wb = write_batch(raw_mode=True)
            put = wb.put
            for k, v in zip(keys[i : i + batch], values[i : i + batch]):
                put(k, v)
            write(wb)

    def get_each(self, keys):
        get = self.db.get
        missing = 0
        for k in keys:
            if get(k) is None:
                missing += 1
        return missing

    def scan_count(self):
        n = 0
        for _k, _v in self.db.items():
            n += 1
        return n

    def get(self, key):
        return self.db.get(key)

    def items(self):
        return iter(self.db.items())


STORE_CLASSES: dict[str, type[Store]] = {
    "shardkv": ShardKVStore,
    "lmdb": LMDBStore,
    "rocksdb": RocksDBStore,
}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import lmdb

        out["lmdb"] = f"py-lmdb {lmdb.__version__} (liblmdb {'.'.join(map(str, lmdb.version()))})"
    except ImportError:
        out["lmdb"] = "missing"
    try:
        from importlib.metadata import version

        out["rocksdb"] = f"rocksdict {version('rocksdict')}"
    except Exception:
        out["rocksdb"] = "missing"
    try:
        import shardkv

        out["shardkv"] = f"shardkv {shardkv.__version__}"
    except ImportError:
        out["shardkv"] = "missing"
    return out


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Data:
    """The keys (shared by every store and value size) and the random get order."""

    def __init__(self, n_keys: int, seed: int = SEED):
        rng = np.random.default_rng(seed)
        raw = rng.bytes(KEY_SIZE * n_keys)
        self.keys = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
        if len(set(self.keys)) != n_keys:  # 128 random bits: never, but never silently
            raise RuntimeError("duplicate keys generated; change the seed")
        del raw
        perm = rng.permutation(n_keys).tolist()
        self.get_keys = [self.keys[i] for i in perm]
        self.order = sorted(range(n_keys), key=self.keys.__getitem__)  # sorted key -> index
        self.sorted_keys = [self.keys[i] for i in self.order]
        self.check_indices = rng.choice(n_keys, size=min(CHECK_SAMPLE, n_keys), replace=False).tolist()
        self.seed = seed
        self.n = n_keys

    def values(self, value_size: int) -> tuple[list[bytes], list[bytes]]:
        """(pool, values) for one value size: values[i] is pool[i % len(pool)], no copies."""
        rng = np.random.default_rng(self.seed + value_size)
        buf = rng.bytes(value_size * VALUE_POOL)
        pool = [buf[j * value_size : (j + 1) * value_size] for j in range(VALUE_POOL)]
        return pool, [pool[i % VALUE_POOL] for i in range(self.n)]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        # (value_size, op) -> store -> list of measurements (seconds, or a figure)
        self.samples: dict[tuple[int, str], dict[str, list[float]]] = {}
        self.errors: dict[tuple[int, str], dict[str, str]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def add(self, value_size: int, op: str, store: str, value: float) -> None:
        self.samples.setdefault((value_size, op), {}).setdefault(store, []).append(value)

    def error(self, value_size: int, op: str, store: str, text: str = "error") -> None:
        self.errors.setdefault((value_size, op), {})[store] = text

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  !! {text}", file=sys.stderr, flush=True)


def check_store(store: Store, data: Data, values: Sequence[bytes], label: str, rec: Recorder) -> None:
    """Untimed correctness checks: sampled gets, and a full scan against the sorted keys."""
    bad_gets = []
    for i in data.check_indices:
        got = store.get(data.keys[i])
        if got is None or bytes(got) != values[i]:
            bad_gets.append((data.keys[i], None if got is None else len(got)))
    if bad_gets:
        k, got_len = bad_gets[0]
        rec.problem(
            f"{label}: {len(bad_gets)}/{len(data.check_indices)} sampled gets returned a wrong value "
            f"(first: key {k.hex()} -> {'None' if got_len is None else f'{got_len} bytes'})"
        )
    n = 0
    first_bad = None
    for k, v in store.items():
        if first_bad is None:
            if n >= data.n:
                first_bad = (n, bytes(k), b"<end of keys>")
            elif bytes(k) != data.sorted_keys[n] or bytes(v) != values[data.order[n]]:
                first_bad = (n, bytes(k), data.sorted_keys[n])
        n += 1
    total = n
    if first_bad is not None:
        pos, got_k, want_k = first_bad
        rec.problem(f"{label}: scan item {pos} is key {got_k.hex()}, expected {want_k.hex()} (or its value differs)")
    if total != data.n:
        rec.problem(f"{label}: scan returned {total} items, expected {data.n}")


def run_store(
    name: str, value_size: int, data: Data, values: list[bytes], base_dir: str | None, repeat: int, rec: Recorder
) -> None:
    cls = STORE_CLASSES[name]
    label = f"{STORE_LABELS[name]} {value_size} B"
    n = data.n

    def fresh() -> tuple[Store, str]:
        tmp = tempfile.mkdtemp(prefix=f"shardkv-bench-{name}-{value_size}-", dir=base_dir)
        return cls(tmp, n, value_size), tmp

    # Phase 1: one-by-one load, then the read phases on that store.
    store, tmp = fresh()
    op = "put"
    try:
        store.open()
        secs, _ = timed(store.put_each, data.keys, values)
        rec.add(value_size, "put", name, secs)
        print(f"  {label}: put one by one {n / secs:,.0f} ops/s ({secs:.2f} s)", flush=True)

        op = "stats"
        idx_after_load = store.index_bytes()
        extra = store.extra_stats()
        if extra is not None:
            rec.notes.append(f"{label} stats after load: {extra}")

        op = "get"
        for _ in range(repeat):
            secs, missing = timed(store.get_each, data.get_keys)
            rec.add(value_size, "get", name, secs)
            if missing:
                rec.problem(f"{label}: {missing} of {n} gets returned None after loading all keys")
        print(f"  {label}: get random {n / statistics.median(rec.samples[(value_size, 'get')][name]):,.0f} ops/s", flush=True)

        op = "get_long_txn"
        for _ in range(repeat):
            secs, missing = timed(store.get_each_long_txn, data.get_keys)
            if missing is None:
                break
            rec.add(value_size, "get_long_txn", name, secs)
            if missing:
                rec.problem(f"{label}: {missing} of {n} gets (one txn) returned None")

        op = "scan"
        for _ in range(repeat):
            secs, count = timed(store.scan_count)
            rec.add(value_size, "scan", name, secs)
            if count != n:
                rec.problem(f"{label}: scan returned {count} items, expected {n}")
        print(f"  {label}: scan {n / statistics.median(rec.samples[(value_size, 'scan')][name]):,.0f} ops/s", flush=True)

        # Measured after the scans: shardkv builds its sorted structure on the first ordered
        # read, and index_bytes is meant to cover the hash table plus the sorted structure.
        op = "index_bytes"
        idx = store.index_bytes()
        if idx is not None:
            rec.add(value_size, "index_bytes", name, idx / n)
            if idx_after_load != idx:
                rec.notes.append(
                    f"{label}: index_bytes {idx_after_load:,} ({idx_after_load / n:.1f}/key) right after the load, "
                    f"{idx:,} ({idx / n:.1f}/key) after the scans (reported)"
                )

        op = "reopen"
        first_key = data.get_keys[0]
        for _ in range(repeat):
            store.close()
            gc.collect()
            t0 = time.perf_counter()
            store.open()
            got = store.get(first_key)
            secs = time.perf_counter() - t0
            rec.add(value_size, "reopen", name, secs)
            if got is None:
                rec.problem(f"{label}: first get after reopen returned None")
        print(f"  {label}: reopen {statistics.median(rec.samples[(value_size, 'reopen')][name]) * 1e3:,.1f} ms", flush=True)
        op = "reopen_scan"
        for _ in range(repeat):
            store.close()
            gc.collect()
            t0 = time.perf_counter()
            store.open()
            got = next(iter(store.items()), None)
            secs = time.perf_counter() - t0
            rec.add(value_size, "reopen_scan", name, secs)
            if got is None:
                rec.problem(f"{label}: first scan item after reopen was None")
        print(f"  {label}: reopen + first scan item {statistics.median(rec.samples[(value_size, 'reopen_scan')][name]) * 1e3:,.1f} ms", flush=True)
        if name == "shardkv":
            idx2 = store.index_bytes()
            if idx is not None and idx2 != idx:
                rec.notes.append(f"{label}: index_bytes {idx:,} after the scans, {idx2:,} after reopen + one get")

        op = "check"
        check_store(store, data, values, label, rec)
        rec.notes.append(f"{label}: {disk_bytes(tmp) / n:,.0f} disk bytes/key after one-by-one load and reopen")
    except Exception as exc:
        rec.error(value_size, op, name)
        rec.problem(f"{label}: {op} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        try:
            store.close()
        except Exception as exc:
            rec.problem(f"{label}: close raised {type(exc).__name__}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)
        del store
        gc.collect()

    # Phase 2: batched load into a fresh store.
    store, tmp = fresh()
    try:
        store.open()
        secs, _ = timed(store.put_batches, data.keys, values, BATCH_SIZE)
        rec.add(value_size, "put_batch", name, secs)
        print(f"  {label}: put batch {BATCH_SIZE} {n / secs:,.0f} ops/s ({secs:.2f} s)", flush=True)
        check_store(store, data, values, label + " (batched)", rec)
    except Exception as exc:
        rec.error(value_size, "put_batch", name)
        rec.problem(f"{label}: batched load raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        try:
            store.close()
        except Exception as exc:
            rec.problem(f"{label} (batched): close raised {type(exc).__name__}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)
        del store
        gc.collect()


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def build_table(rec: Recorder, n: int, value_sizes: Sequence[int], stores: Sequence[str]) -> tuple[list[list[str]], list[dict]]:
    header = ["value", "operation"] + [STORE_LABELS[s] for s in stores] + ["shardkv/best peer"]
    rows = [header]
    records = []
    peers = [s for s in stores if s != "shardkv"]
    for vs in value_sizes:
        for op, label, kind in OPERATIONS:
            samples = rec.samples.get((vs, op), {})
            errors = rec.errors.get((vs, op), {})
            if op == "get_long_txn" and "lmdb" not in stores:
                continue
            cells = []
            med: dict[str, float] = {}
            for s in stores:
                if s in samples:
                    med[s] = statistics.median(samples[s])
                if s in errors:
                    cells.append(errors[s])
                elif s not in samples:
                    cells.append("n/a" if op in ("index_bytes", "get_long_txn") else "-")
                elif kind == "rate":
                    cells.append(fmt_rate(n / med[s]))
                elif kind == "time":
                    cells.append(fmt_time(med[s]))
                else:
                    cells.append(f"{med[s]:.1f}")
            ratio = ""
            if kind != "figure" and op != "get_long_txn" and "shardkv" in med:
                peer_meds = [med[p] for p in peers if p in med]
                if peer_meds:
                    # speed ratio for both kinds: best peer time / shardkv time
                    ratio = f"{min(peer_meds) / med['shardkv']:.3g}x"
            rows.append([f"{vs} B", label] + cells + [ratio])
            records.append(
                {
                    "value_size": vs,
                    "operation": op,
                    "kind": kind,
                    "median": med,
                    "samples": {s: samples[s] for s in samples},
                    "rate": {s: n / m for s, m in med.items()} if kind == "rate" else None,
                    "ratio": ratio or None,
                }
            )
    return rows, records


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine",
        description="Benchmark shardkv's ShardEngine against LMDB and RocksDB (single process).",
    )
    p.add_argument("--keys", type=int, default=None, help=f"number of keys (default {DEFAULT_KEYS:,}; {QUICK_KEYS:,} with --quick)")
    p.add_argument(
        "--value-sizes",
        default=",".join(map(str, DEFAULT_VALUE_SIZES)),
        help="comma-separated value sizes in bytes (default 1024,16)",
    )
    p.add_argument("--quick", action="store_true", help=f"1/10 scale: {QUICK_KEYS:,} keys")
    p.add_argument("--dir", default=None, help="parent of the temporary store directories (default: system temp dir)")
    p.add_argument("--stores", default=",".join(STORE_NAMES), help="comma-separated subset of " + ",".join(STORE_NAMES))
    p.add_argument("--repeat", type=int, default=3, help="repetitions of the read phases; the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the keys and values")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.keys is None:
        args.keys = QUICK_KEYS if args.quick else DEFAULT_KEYS
    if args.keys < 1:
        p.error("--keys must be at least 1")
    try:
        args.value_sizes = [int(x) for x in args.value_sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--value-sizes must be comma-separated integers")
    if not args.value_sizes or min(args.value_sizes) < 0:
        p.error("--value-sizes needs at least one size >= 0")
    args.stores = [s.strip().lower() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in args.stores if s not in STORE_CLASSES]
    if unknown:
        p.error(f"unknown store(s) {unknown}; choose from {', '.join(STORE_NAMES)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def available_stores(names: Iterable[str], rec: Recorder) -> list[str]:
    out = []
    for name in names:
        try:
            STORE_CLASSES[name]("/nonexistent", 1, 1)  # constructors only import; they touch no files
        except StoreUnavailable as exc:
            rec.notes.append(f"{STORE_LABELS[name]} skipped: {exc}")
            print(f"note: {STORE_LABELS[name]} skipped: {exc}", file=sys.stderr, flush=True)
            continue
        out.append(name)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rec = Recorder()
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    base_dir = args.dir if args.dir is not None else tempfile.gettempdir()

    stores = available_stores(args.stores, rec)
    n = args.keys
    print(
        f"shardkv engine benchmark: {n:,} keys of {KEY_SIZE} B, values {', '.join(f'{v} B' for v in args.value_sizes)}, "
        f"stores {', '.join(STORE_LABELS[s] for s in stores) or 'none'}, repeat {args.repeat}, dir {base_dir}",
        flush=True,
    )
    if not stores:
        print("no store available; nothing to do", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    data = Data(n, args.seed)
    print(f"generated keys in {time.perf_counter() - t0:.1f} s", flush=True)

    for vs in args.value_sizes:
        pool, values = data.values(vs)
        for name in stores:
            t_store = time.perf_counter()
            run_store(name, vs, data, values, args.dir, args.repeat, rec)
            print(f"  {STORE_LABELS[name]} {vs} B done in {time.perf_counter() - t_store:.1f} s", flush=True)
        del pool, values
        gc.collect()

    elapsed = time.perf_counter() - started
    rows, records = build_table(rec, n, args.value_sizes, stores)
    versions = library_versions()
    print()
    print(f"Results: {n:,} keys of {KEY_SIZE} B; ops/s = {n:,} / seconds (median of {args.repeat} for get, scan, reopen; one run for puts)")
    print(DURABILITY_NOTE)
    print("Ratio = shardkv / best peer as a speed ratio (>1x: shardkv faster; for reopen: best peer time / shardkv time).")
    print("LMDB 'get, random' opens one read txn per get (the fair figure, used in the ratio); the one-txn row is for reference.")
    print()
    print(render(rows))
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
        + "; ".join(f"{k} {v}" for k, v in versions.items() if k != "python")
        + f"; Python {versions['python']}"
    )
    print(f"total time {elapsed:.1f} s")
    if rec.notes:
        print("\nNotes:")
        for note in rec.notes:
            print(f"  - {note}")
    print_problems(rec.problems, "\nProblems:")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "keys": n,
                    "key_size": KEY_SIZE,
                    "value_sizes": args.value_sizes,
                    "stores": stores,
                    "repeat": args.repeat,
                    "seed": args.seed,
                    "durability": DURABILITY_NOTE,
                    "versions": versions,
                    "elapsed_s": elapsed,
                    "results": records,
                    "notes": rec.notes,
                    "problems": rec.problems,
                },
                f,
                indent=2,
            )
    return 2 if rec.problems else 0


if __name__ == "__main__":
    sys.exit(main())
