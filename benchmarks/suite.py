"""The benchmark suite: every seed workload against shardkv and every peer installed, one run,
one table (`python -m benchmarks`).

    python -m benchmarks --quick                      # 1/10 scale, under 3 minutes on 2 cores
    python -m benchmarks                              # full scale (1M and 10M keys), about 70 minutes
    python -m benchmarks --stores shardkv,lmdb,redis --workloads load,readers
    python -m benchmarks --only-10m --stores shardkv,lmdb --workloads load   # the 10M-key load row alone
    python -m benchmarks --json out.json --chart docs/benchmarks_processes.png --markdown out.md

Stores (columns): shardkv - the cluster users get from `shardkv.open` (2 shard workers, a
private cluster per row); engine - shardkv's single-shard engine in-process
(`shardkv.shards.ShardEngine`), for reference, never in the ratio; the peers LMDB (py-lmdb),
RocksDB (rocksdict), LevelDB (plyvel), diskcache, sqlite3 and Redis (a private redis-server,
redis-py on a unix socket). A peer that is not installed gets a column of "-" and a note. How
each store does each operation: benchmarks/peers.py.

Workloads (rows), every store in a fresh temporary directory per row group, same keys for all
(random 16-byte keys, fixed seed):

* load      (seeds 000 and 001) N keys x V-byte values, for (1M, 1 KiB), (1M, 16 B) and
            (10M, 16 B): insert all N - the first N - S in atomic batches of 1000, the last S
            one by one; look up S random keys one by one and S in batches of 1000; iterate
            all N ascending, then descending (the first ordered read, one item of an
            iteration, timed before them); S above() and below() of random keys (LMDB: a
            cursor's set_range; sqlite3: ORDER BY ... LIMIT 1); remove S random keys one by
            one and the rest in batches of 1000. S = 50,000: the single-key rows time a
            sample, so that the 10M row ends in reasonable time for the stores answering over
            IPC; iterations stop after
            60 s (quick: 1 s), the rate counting the items read by then.
* overwrite (seed 002) K keys x 100 B written one by one, then W - K overwrites of random keys
            (K = 200k, W = 300k), R = 200k random reads; bytes on disk; compaction (shardkv
            compact(), RocksDB flush + compact_range, LevelDB compact_range, sqlite3 and diskcache
            VACUUM, LMDB a compacting copy; Redis keeps everything in memory: "-"); bytes on
            disk again; R random reads again.
* readers   (seed 003) 1M keys x 100 B loaded in batches, then uniform random gets from 1, 2, 4
            and 8 client processes at once, each for a fixed time (5 s). Stores that one process
            must own (LevelDB; RocksDB writes) are opened read-only where the store allows it
            (RocksDB), else "-".
* ycsb      YCSB A (50% reads, 50% updates) and B (95/5) on the readers' data, scrambled zipfian
            keys (theta 0.99), 2 client processes, 5 s each.
* batches   atomic batches of 10, 100 and 1000 puts of fresh keys x 100 B (shardkv: every batch
            spans both shards, so it is a cross-shard two-phase commit; the engine's are
            single-shard), median of 3 repetitions.
* fsync     the "fsync" rows: puts one by one and atomic batches of 100, every write or batch
            fsynced before it is acknowledged.

Durability is the same for every store on a row (the durability column; see peers.py): "no
fsync" rows fsync nothing per write, "fsync" rows fsync every acknowledged write or batch.

--quick: every workload at 1/10 of its keys, operations and seconds, iterations stopping after
1 s (the 10M-key row, whose tenth is the 1M row of the full run, is left out); about 2.5 minutes
on 2 cores. diskcache is left out of the 10M row unless --all-10m (it would take ~17 minutes).
A "shards" workload (only when named in --workloads) measures the cluster's batched-put and get
throughput with 1, 2, 4, 8 and 16 shards, for machines with that many cores: put_many of 1000
fresh keys spread over every shard (two-phase commit) and with each batch's keys on one shard
(picked with shard_of), random gets, all from --shard-clients processes; beside them RocksDB's
WriteBatch and LMDB's write transactions from one process (the one writer each allows) and LMDB's
gets from as many processes.

Figures are ops/s (keys per second for batches and iteration) unless the operation names
another unit. Ratio: shardkv / best peer as a speed ratio - above 1x shardkv is faster (or
smaller, for bytes on disk and compaction time) - with the best peer named. Every process and
server started is stopped before the run ends, also on an error, Ctrl-C or SIGTERM; the
temporary directories are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from benchmarks.common import (
    MemoryWatch,
    available_stores,
    check_terminating,
    fmt_count,
    fmt_rate,
    machine_line,
    markdown_table,
    print_problems,
    render_table,
    sigterm_exits,
    timed,
)
from benchmarks.peers import LABELS, MODULES, PEERS, SHARDS, STORES, Client, Served, Unsupported, check_available, connect, serve, versions
from benchmarks.pool import ClientPool, Keys, Zipfian, run_here, value_pool

SEED = 20261122
BATCH = 1000
CHECK_SAMPLE = 200
WORKLOADS = ("load", "overwrite", "readers", "ycsb", "batches", "fsync")
EXTRA_WORKLOADS = ("shards",)  # not run unless named: shard scaling, for machines with many cores
NO_FSYNC, FSYNC = "no fsync", "fsync"
MIB = 1 << 20
FIRST_ORDERED = "first ordered read after the load, ms"
BIG_ROW = 10_000_000  # load rows this large leave out the stores of SLOW_ON_BIG_ROW (unless --all-10m)
SLOW_ON_BIG_ROW = {"diskcache": "about 20k keys/s for batched inserts and removals: those alone would take it some 17 minutes"}


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    load_rows: tuple[tuple[int, int], ...]  # (keys, value bytes) of the load rows
    sample: int  # single-key operations timed per load row
    overwrite_keys: int
    overwrite_writes: int
    overwrite_reads: int
    reader_keys: int
    reader_value: int
    procs: tuple[int, ...]
    iterate_s: float  # an iteration phase stops after this many seconds
    phase_s: float  # seconds per readers phase
    ycsb_procs: int
    ycsb_s: float
    batch_keys: int  # keys written per batch-size row (3 repetitions)
    batch_sizes: tuple[int, ...]
    fsync_puts: int
    fsync_batches: int  # of 100


FULL = Scale("full", ((1_000_000, 1024), (1_000_000, 16), (10_000_000, 16)), 50_000, 200_000, 300_000, 200_000,
             1_000_000, 100, (1, 2, 4, 8), 60.0, 5.0, 2, 5.0, 150_000, (10, 100, 1000), 2_000, 200)  # fmt: skip
QUICK = Scale("quick", ((100_000, 1024), (100_000, 16)), 5_000, 20_000, 30_000, 20_000,
              100_000, 100, (1, 2, 4, 8), 1.0, 0.5, 2, 0.5, 15_000, (10, 100, 1000), 200, 20)  # fmt: skip


# -- results ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    workload: str
    operation: str
    durability: str
    unit: str = "ops/s"  # "ops/s", "MB", "s" or "ms"
    values: dict = dataclasses.field(default_factory=dict)
    absent: dict = dataclasses.field(default_factory=dict)  # store -> why "-"

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "ops/s"

    def fmt(self, value: float) -> str:
        if self.unit == "ops/s":
            return fmt_rate(value)
        if self.unit == "MB":
            return f"{value:.1f}"
        if self.unit == "ms":
            return f"{value:.3g}"
        return f"{value:.2f}"

    def best_peer(self) -> tuple[str, float] | None:
        peers = [(s, v) for s, v in self.values.items() if s in PEERS]
        if not peers:
            return None
        pick = max if self.higher_is_better else min
        return pick(peers, key=lambda sv: sv[1])

    def ratio(self) -> tuple[float, str] | None:
        """shardkv / best peer as a speed ratio (>1: shardkv faster, or smaller)."""
        best = self.best_peer()
        mine = self.values.get("shardkv")
        if best is None or mine is None or mine <= 0 or best[1] <= 0:
            return None
        return (mine / best[1] if self.higher_is_better else best[1] / mine), best[0]


class Results:
    def __init__(self, stores: Sequence[str]):
        self.stores = list(stores)
        self.rows: list[Row] = []
        self._index: dict[tuple[str, str, str], Row] = {}
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.timings: dict[str, float] = {}
        self.memory: dict[str, int] = {}

    def row(self, workload: str, operation: str, durability: str = NO_FSYNC, unit: str = "ops/s") -> Row:
        key = (workload, operation, durability)
        if key not in self._index:
            self._index[key] = Row(workload, operation, durability, unit)
            self.rows.append(self._index[key])
        return self._index[key]

    def put(self, row: Row, store: str, value: float, echo: str = "") -> None:
        row.values[store] = value
        text = row.fmt(value) + ("" if row.unit == "ops/s" else f" {row.unit}")
        print(f"    {LABELS[store]:<9} {row.workload}: {row.operation} ({row.durability}): {text}{echo}", flush=True)

    def absent(self, row: Row, store: str, why: str) -> None:
        row.absent[store] = why
        self.note(why)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  !! {text}", file=sys.stderr, flush=True)

    def table(self) -> list[list[str]]:
        header = ["workload", "operation", "durability"] + [LABELS[s] for s in self.stores] + ["shardkv/best peer"]
        out = [header]
        for row in self.rows:
            cells = [row.fmt(row.values[s]) if s in row.values else "-" for s in self.stores]
            ratio = row.ratio()
            out.append([row.workload, row.operation, row.durability] + cells + [f"{ratio[0]:.2f}x {LABELS[ratio[1]]}" if ratio else ""])
        return out

    def to_json(self) -> list[dict]:
        return [{"workload": r.workload, "operation": r.operation, "durability": r.durability, "unit": r.unit, "values": r.values,
                 "absent": r.absent, "ratio": (r.ratio() or (None, None))[0], "best_peer": (r.ratio() or (None, None))[1]}
                for r in self.rows]  # fmt: skip


# -- the timed loops (the same for every store) ------------------------------------------------
def put_each(client: Client, pairs: Sequence[tuple[bytes, bytes]]) -> None:
    put = client.put
    for k, v in pairs:
        put(k, v)


def get_each(client: Client, keys: Sequence[bytes]) -> int:
    """Get every key; the number found missing."""
    get = client.get
    missing = 0
    for k in keys:
        if get(k) is None:
            missing += 1
    return missing


def get_batches(client: Client, keys: Sequence[bytes]) -> int:
    """get_batch of BATCH keys at a time; the number found missing."""
    get_batch = client.get_batch
    missing = 0
    for i in range(0, len(keys), BATCH):
        missing += sum(v is None for v in get_batch(keys[i : i + BATCH]))
    return missing


def delete_each(client: Client, keys: Sequence[bytes]) -> None:
    delete = client.delete
    for k in keys:
        delete(k)


def put_batches(client: Client, batches: Iterable[list[tuple[bytes, bytes]]]) -> None:
    """One atomic put_batch per batch (`batches` may build them as it goes)."""
    put_batch = client.put_batch
    for batch in batches:
        put_batch(batch)


def load(client: Client, keys: Keys, pool: list[bytes], stop: int | None = None) -> None:
    """Put keys [0, stop) (default: all) with their values, BATCH at a time."""
    stop = len(keys) if stop is None else stop
    put_batches(client, (keys.pairs(i, min(stop, i + BATCH), pool) for i in range(0, stop, BATCH)))


# -- running stores -------------------------------------------------------------------------------
class Suite:
    def __init__(self, args: argparse.Namespace, stores: list[str], base: str, results: Results):
        self.args, self.scale, self.stores, self.base, self.results = args, args.scale, stores, base, results
        self.seed = args.seed
        self.readers_by_procs: dict[int, Row] = {}
        self.shard_rows: dict[int, tuple[Row, Row, Row]] = {}  # shards -> (puts anywhere, puts one shard per batch, gets)

    @contextlib.contextmanager
    def session(self, name: str, fsync: bool = False, map_size: int = 1 << 30, shards: int = SHARDS) -> Iterator[tuple[Served, Client]]:
        """A store served in a fresh directory with one client in this process; everything is
        closed, stopped and deleted on the way out."""
        directory = tempfile.mkdtemp(prefix=f"{name}-", dir=self.base)
        served = client = None
        try:
            served = serve(name, directory, fsync, map_size, shards)
            client = connect(served.spec)
            yield served, client
        finally:
            try:
                if client is not None:
                    client.close()
            finally:
                try:
                    if served is not None:
                        served.stop()
                finally:
                    shutil.rmtree(directory, ignore_errors=True)

    def guarded(self, label: str, fn: Callable[[], None]) -> None:
        """Run one store's part of a workload; an error becomes a problem, not the end of the run."""
        check_terminating()
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            check_terminating()
            self.results.problem(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        print(f"  {label} done in {time.perf_counter() - started:.1f} s", flush=True)
        gc.collect()

    def measure(self, row: Row, store: str, count: int, fn: Callable, *args) -> object:
        """Time fn(*args) (count operations) into `row`; Unsupported becomes "-" with a note."""
        try:
            seconds, result = timed(fn, *args)
        except Unsupported as exc:
            self.results.absent(row, store, str(exc))
            return None
        self.results.put(row, store, count / seconds, f"  ({count:,} in {seconds:.2f} s)")
        return result

    def iterate(self, row: Row, store: str, client: Client, reverse: bool, n: int) -> None:
        """Time reading the items in key order: all n, or as many as come in iterate_s seconds."""
        try:
            items = client.items(reverse)
        except Unsupported as exc:
            self.results.absent(row, store, str(exc))
            return
        gc.collect()
        clock = time.perf_counter
        started = clock()
        deadline = started + self.scale.iterate_s
        seen = 0
        previous = None
        ordered = True
        for key, _value in items:
            if previous is not None and (key < previous) != reverse:
                ordered = False
            previous = key
            seen += 1
            if not seen & 1023 and clock() > deadline:
                break
        seconds = clock() - started
        self.check(ordered, f"{LABELS[store]} {row.workload}: {row.operation} returned keys out of order")
        self.check(seen == n or seconds >= self.scale.iterate_s, f"{LABELS[store]} {row.workload}: {row.operation} saw {seen} items, not {n}")
        self.results.put(row, store, seen / seconds, f"  ({seen:,} in {seconds:.2f} s{'' if seen == n else ', stopped at the time limit'})")

    def first_ordered(self, row: Row, store: str, client: Client) -> None:
        """Time the first ordered read after the inserts: open an iteration, take one item."""
        gc.collect()
        started = time.perf_counter()
        try:
            first = next(iter(client.items()), None)
        except Unsupported as exc:
            self.results.absent(row, store, str(exc))
            return
        seconds = time.perf_counter() - started
        self.check(first is not None, f"{LABELS[store]} {row.workload}: the first ordered read found nothing")
        self.results.put(row, store, seconds * 1000)

    def measure_seek(self, row: Row, store: str, client: Client, method: str, probes: list[bytes]) -> None:
        """above() or below() of each probe (random keys), against sorted() of a sample."""
        try:
            seek = getattr(client, method)
            seek(probes[0])
        except Unsupported as exc:
            self.results.absent(row, store, str(exc))
            return
        found = self.measure(row, store, len(probes), lambda: [seek(k) for k in probes])
        self.check(found is not None and sum(f is None for f in found) < len(probes) // 100, f"{LABELS[store]} {row.workload}: {method} found nothing for most probes")

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.results.problem(text)

    def check_values(self, label: str, client: Client, keys: list[bytes], expected: list[bytes]) -> None:
        got = client.get_batch(keys)
        wrong = sum(g is None or bytes(g) != e for g, e in zip(got, expected))
        self.check(wrong == 0 and len(got) == len(keys), f"{label}: {wrong} of {len(keys)} sampled keys read back a wrong or no value")

    # -- seeds 000 and 001 --------------------------------------------------------------------------
    def load(self) -> None:
        for n, size in self.scale.load_rows:
            keys = Keys(n, self.seed)
            pool = value_pool(size, self.seed)
            seeds = "000/001" if n <= 1_000_000 else "001"  # (seed 000: 1M keys; seed 001: 1M and 10M)
            workload = f"{seeds} {fmt_count(n)} x {'1 KiB' if size == 1024 else f'{size} B'}"
            sample = min(self.scale.sample, n // 2)
            rng = np.random.default_rng([self.seed, n, size])
            plan = {
                "lookups": rng.integers(0, n, sample),
                "lookups_batch": rng.integers(0, n, sample),
                "removal": rng.permutation(n),
                "probes": [bytes(row) for row in rng.integers(0, 256, (sample, 16), dtype=np.uint8)],  # for above/below
            }
            map_size = n * (size + 16 + 64) * 4 + (256 << 20)
            for name in self.stores:
                if n >= BIG_ROW and name in SLOW_ON_BIG_ROW and not self.args.all_10m:
                    for op in (f"insert, batch {BATCH}", "insert, one by one", "lookup, random", f"lookup, batch {BATCH}", FIRST_ORDERED,
                               "iterate ascending", "iterate descending", "above, random", "below, random", "remove, one by one",
                               f"remove, batch {BATCH}"):  # fmt: skip
                        self.results.absent(self.results.row(workload, op), name, f"{LABELS[name]}: not run on the {fmt_count(n)}-key row ({SLOW_ON_BIG_ROW[name]}; --all-10m runs it)")
                    continue
                self.guarded(f"{LABELS[name]} {workload}", lambda name=name, keys=keys, plan=plan: self._load_one(name, workload, keys, pool, sample, plan, map_size))
            del keys, plan
            gc.collect()

    def _load_one(self, name: str, workload: str, keys: Keys, pool: list[bytes], sample: int, plan: dict, map_size: int) -> None:
        results, n = self.results, len(keys)
        bulk = n - sample

        def delete_batches(indices: np.ndarray):
            delete_batch = client.delete_batch
            for i in range(0, len(indices), BATCH):
                delete_batch(keys.take(indices[i : i + BATCH]))

        with self.session(name, map_size=map_size) as (served, client):
            self.measure(results.row(workload, f"insert, batch {BATCH}"), name, bulk, load, client, keys, pool, bulk)
            singles = keys.pairs(bulk, n, pool)
            self.measure(results.row(workload, "insert, one by one"), name, sample, put_each, client, singles)
            del singles
            check_idx = plan["lookups"][:CHECK_SAMPLE].tolist()
            self.check_values(f"{LABELS[name]} {workload}", client, keys.take(check_idx), [pool[i % len(pool)] for i in check_idx])
            missing = self.measure(results.row(workload, "lookup, random"), name, sample, get_each, client, keys.take(plan["lookups"]))
            self.check(not missing, f"{LABELS[name]} {workload}: {missing} lookups found nothing")
            missing = self.measure(results.row(workload, f"lookup, batch {BATCH}"), name, sample, get_batches, client, keys.take(plan["lookups_batch"]))
            self.check(not missing, f"{LABELS[name]} {workload}: {missing} batched lookups found nothing")
            self.first_ordered(results.row(workload, FIRST_ORDERED, unit="ms"), name, client)
            for reverse, label in ((False, "iterate ascending"), (True, "iterate descending")):
                self.iterate(results.row(workload, label), name, client, reverse, n)
            for label, method in (("above, random", "above"), ("below, random", "below")):
                self.measure_seek(results.row(workload, label), name, client, method, plan["probes"])
            counted = client.count()
            self.check(counted == n, f"{LABELS[name]} {workload}: holds {counted} keys after the inserts, not {n}")
            removal = plan["removal"]
            self.measure(results.row(workload, "remove, one by one"), name, sample, delete_each, client, keys.take(removal[:sample]))
            self.measure(results.row(workload, f"remove, batch {BATCH}"), name, n - sample, delete_batches, removal[sample:])
            left = client.count()
            self.check(left == 0, f"{LABELS[name]} {workload}: {left} keys left after removing all")

    # -- seed 002 ---------------------------------------------------------------------------------
    def overwrite(self) -> None:
        s = self.scale
        k, w, r = s.overwrite_keys, s.overwrite_writes, s.overwrite_reads
        keys = Keys(k, self.seed + 2)
        pool = value_pool(100, self.seed + 2)
        rng = np.random.default_rng([self.seed, 2])
        order = np.concatenate([np.arange(k), rng.integers(0, k, w - k)])
        last = np.empty(k, dtype=np.int64)
        last[order] = np.arange(w)  # the write that sets each key's final value (the last one wins)
        writes = [(key, pool[j % len(pool)]) for j, key in enumerate(keys.take(order))]
        reads = [keys.take(rng.integers(0, k, r)) for _ in range(2)]
        sample = rng.choice(k, size=min(CHECK_SAMPLE, k), replace=False)
        expected = [pool[j % len(pool)] for j in last[sample].tolist()]
        workload = f"002 {fmt_count(k)} keys, {fmt_count(w)} writes"
        for name in self.stores:
            self.guarded(f"{LABELS[name]} {workload}", lambda name=name: self._overwrite_one(name, workload, writes, reads, keys.take(sample), expected))

    def _overwrite_one(self, name, workload, writes, reads, sample_keys, expected) -> None:
        results = self.results

        def size_row(label: str) -> None:
            os.sync()
            size = served.disk_bytes()
            row = results.row(workload, label, unit="MB")
            if size is None:
                results.absent(row, name, f"{LABELS[name]} keeps its data in memory (used_memory {client.used_memory() / MIB:.1f} MB after the writes)")
            else:
                results.put(row, name, size / MIB)

        with self.session(name, map_size=4 << 30) as (served, client):
            self.measure(results.row(workload, "writes, 1/3 overwrites"), name, len(writes), put_each, client, writes)
            self.check_values(f"{LABELS[name]} {workload}", client, sample_keys, expected)
            missing = self.measure(results.row(workload, "reads, random"), name, len(reads[0]), get_each, client, reads[0])
            self.check(not missing, f"{LABELS[name]} {workload}: {missing} reads found nothing")
            size_row("disk MB after the writes")
            row = results.row(workload, "compaction, seconds", unit="s")
            try:
                seconds, _ = timed(client.compact)
                results.put(row, name, seconds)
            except Unsupported as exc:
                results.absent(row, name, str(exc))
            size_row("disk MB after compaction")
            self.check_values(f"{LABELS[name]} {workload} (compacted)", client, sample_keys, expected)
            missing = self.measure(results.row(workload, "reads after compaction"), name, len(reads[1]), get_each, client, reads[1])
            self.check(not missing, f"{LABELS[name]} {workload}: {missing} reads after compaction found nothing")

    # -- seed 003 and YCSB --------------------------------------------------------------------------
    def readers(self, ycsb: bool, readers: bool) -> None:
        s = self.scale
        n = s.reader_keys
        keys = Keys(n, self.seed + 3)
        pool = value_pool(s.reader_value, self.seed + 3)
        zipf = Zipfian(n, self.seed + 3)
        self.results.note(f"YCSB keys: scrambled zipfian (theta 0.99) over {n:,} keys; the hottest 1% of the keys get {zipf.top_share(0.01):.0%} of the operations.")
        stores = [s_ for s_ in self.stores if s_ != "engine"]
        if "engine" in self.stores:
            self.results.note("engine: not in the multi-process rows (readers, YCSB): it is in-process, one process per shard directory.")
        procs = max(s.procs) if readers else s.ycsb_procs
        with ClientPool(procs, preload=[MODULES[s_] for s_ in stores]) as pool_:
            for name in stores:
                self.guarded(f"{LABELS[name]} readers/YCSB", lambda name=name: self._readers_one(name, keys, pool, pool_, procs, ycsb, readers))

    def _readers_one(self, name, keys, pool, clients: ClientPool, procs, ycsb, readers) -> None:
        s, results = self.scale, self.results
        n = len(keys)
        workload_r = f"003 random reads, {fmt_count(n)} keys"
        workload_y = f"YCSB, {fmt_count(n)} keys, zipfian"
        rows_r = [results.row(workload_r, f"{p} process{'es' if p > 1 else ''}") for p in s.procs] if readers else []
        for p, row in zip(s.procs, rows_r):
            self.readers_by_procs[p] = row
        rows_y = [results.row(workload_y, f"{label}, {s.ycsb_procs} processes") for label in ("A: 50% reads, 50% updates", "B: 95% reads, 5% updates")] if ycsb else []
        with self.session(name, map_size=max(1 << 30, n * (s.reader_value + 80) * 4)) as (served, client):
            started = time.perf_counter()
            load(client, keys, pool)
            print(f"    {LABELS[name]:<9} loaded {n:,} keys in {time.perf_counter() - started:.1f} s", flush=True)
            if name == "rocksdb":
                client.db.flush()  # the read-only opens read the SST files (and the WAL)
            if not client.readers_in_other_processes:
                for row in rows_r + rows_y:
                    results.absent(row, name, client.why_not)
                return
            clients.open(served.spec, procs)
            try:
                for p, row in zip(s.procs, rows_r):
                    out = clients.run({"kind": "reads", "n": n, "seed": keys.seed, "stream": p}, p, s.phase_s)
                    self.check(out["missing"] == 0, f"{LABELS[name]}: {out['missing']} of {out['ops']} reads from {p} processes found nothing")
                    results.put(row, name, out["ops_per_s"], f"  ({out['ops']:,} in {out['seconds']:.2f} s)")
                for fraction, row in zip((0.5, 0.95), rows_y):
                    if not client.writers_in_other_processes:
                        results.absent(row, name, client.why_not)
                        continue
                    job = {"kind": "ycsb", "n": n, "seed": keys.seed, "stream": 100 + int(fraction * 100), "read_fraction": fraction, "value_size": s.reader_value}
                    out = clients.run(job, s.ycsb_procs, s.ycsb_s)
                    self.check(out["missing"] == 0, f"{LABELS[name]}: {out['missing']} YCSB reads found nothing")
                    results.put(row, name, out["ops_per_s"], f"  ({out['ops']:,} in {out['seconds']:.2f} s)")
            finally:
                clients.close_clients(procs)

    # -- atomic batches and fsync ---------------------------------------------------------------------
    def batches(self) -> None:
        for name in self.stores:
            self.guarded(f"{LABELS[name]} batches", lambda name=name: self._batches_one(name))

    def _batch_keys(self, client: Client, stream: int, size: int, count: int) -> list[list[bytes]]:
        """`count` batches of `size` fresh keys; for shardkv each batch spans both shards (a
        batch drawn all on one shard gets its last key replaced by one of the other shard)."""
        spare = max(64, count)
        keys = Keys(size * count + spare, self.seed + stream)
        flat = keys.span(0, size * count)
        out = [flat[i : i + size] for i in range(0, len(flat), size)]
        shard_of = getattr(client, "shard_of", None)
        if shard_of is not None and SHARDS > 1:
            extra = iter(keys.span(size * count, size * count + spare))
            for batch in out:
                shards = {shard_of(k) for k in batch}
                while len(shards) == 1:
                    batch[-1] = next(extra)
                    shards = {shard_of(k) for k in batch}
        return out

    def _write_batches(self, client: Client, batches: list[list[bytes]], pool: list[bytes]) -> None:
        put_batches(client, ([(k, pool[j % len(pool)]) for j, k in enumerate(batch)] for batch in batches))

    def _batches_one(self, name: str) -> None:
        s, results = self.scale, self.results
        pool = value_pool(100, self.seed + 5)
        with self.session(name) as (served, client):
            written = 0
            for size in s.batch_sizes:
                per_rep = max(1, s.batch_keys // (3 * size))
                warm = max(1, per_rep // 10)
                batches = self._batch_keys(client, 50 + size, size, warm + 3 * per_rep)
                self._write_batches(client, batches[:warm], pool)
                rates = []
                for rep in range(3):
                    part = batches[warm + rep * per_rep : warm + (rep + 1) * per_rep]
                    seconds, _ = timed(self._write_batches, client, part, pool)
                    rates.append(size * len(part) / seconds)
                written += size * len(batches)
                label = f"put batch of {size}" + (" (2PC)" if name == "shardkv" else "")
                results.put(results.row("atomic batches", f"batch of {size}"), name, statistics.median(rates),
                            f"  ({label}; runs {', '.join(fmt_rate(x) for x in rates)})")  # fmt: skip
            count = client.count()
            self.check(count == written, f"{LABELS[name]} batches: holds {count:,} keys, {written:,} were written")

    def fsync(self) -> None:
        for name in self.stores:
            self.guarded(f"{LABELS[name]} fsync", lambda name=name: self._fsync_one(name))

    def _fsync_one(self, name: str) -> None:
        s, results = self.scale, self.results
        pool = value_pool(100, self.seed + 6)
        with self.session(name, fsync=True) as (served, client):
            singles = Keys(s.fsync_puts, self.seed + 6).pairs(0, s.fsync_puts, pool)
            self.measure(results.row("fsync", "put, one by one", FSYNC), name, len(singles), put_each, client, singles)
            batches = self._batch_keys(client, 60, 100, s.fsync_batches)
            self.measure(results.row("fsync", "atomic batch of 100", FSYNC), name, 100 * len(batches), self._write_batches, client, batches, pool)
            count = client.count()
            self.check(count == len(singles) + 100 * len(batches), f"{LABELS[name]} fsync: holds {count:,} keys")


    # -- shard scaling (for machines with many cores) -------------------------------------------
    def shards(self) -> None:
        """Batched-put and random-get throughput of the cluster with 1, 2, 4, ... shards, from
        a fixed number of client processes (only the shard count varies), beside the peers'
        batched puts from one process (RocksDB and LMDB take one writer at a time) and LMDB's
        gets from the same number of processes."""
        s, args = self.scale, self.args
        clients = args.shard_clients
        keys = Keys(s.reader_keys, self.seed + 7)
        pool = value_pool(s.reader_value, self.seed + 7)
        if "shardkv" not in self.stores:
            return
        self.results.note(f"shard scaling: {clients} client processes on {os.cpu_count()} CPUs; batched puts = put_many of {BATCH} "
                          f"fresh keys x {s.reader_value} B, 'keys anywhere' spanning the shards (two-phase commit from 2 shards on), "
                          f"'one shard per batch' keys picked by shard_of (one log append each); RocksDB WriteBatch and LMDB write "
                          f"transactions from 1 process (their one writer); gets over {s.reader_keys:,} keys x {s.reader_value} B "
                          f"(LMDB: {clients} processes, one read transaction per get).")  # fmt: skip
        with ClientPool(clients, preload=["shardkv", "lmdb"]) as procs:
            peers = {}
            for name in ("rocksdb", "lmdb"):
                if name in self.stores:
                    self.guarded(f"{LABELS[name]} shard-scaling reference", lambda name=name: peers.update({name: self._shards_peer(name, keys, pool, procs, clients)}))
            for count in args.shard_counts:
                self.guarded(f"shardkv {count} shards", lambda count=count: self._shards_one(count, keys, pool, procs, clients, peers))

    @property
    def _batch_job_keys(self) -> int:
        """Fresh keys per process of a batch job: none is written twice below 300k keys/s per
        process (a client's own encoding caps it near 1.5M)."""
        return int(300_000 * self.scale.phase_s) // BATCH * BATCH

    def _batch_job(self, kind: str, seed: int, stream: int, **extra) -> dict:
        """A timed job of atomic batches of BATCH fresh keys (_batch_job_keys per process)."""
        return {"kind": kind, "keys": self._batch_job_keys, "seed": seed, "stream": stream, "batch": BATCH,
                "value_size": self.scale.reader_value, **extra}  # fmt: skip

    def _shards_peer(self, name: str, keys: Keys, pool: list[bytes], procs: ClientPool, clients: int) -> dict:
        """A peer's figures for the shard-scaling rows: batched puts from this process (its one
        writer) and, where other processes may read, gets from `clients` processes."""
        s, n = self.scale, len(keys)
        out = {}
        with self.session(name, map_size=8 << 30) as (served, client):
            load(client, keys, pool)
            if name == "lmdb":  # RocksDB would have to be opened read-only by the readers
                procs.open(served.spec, clients)
                try:
                    got = procs.run({"kind": "reads", "n": n, "seed": keys.seed, "stream": 200}, clients, s.phase_s)
                finally:
                    procs.close_clients(clients)
                self.check(got["missing"] == 0, f"{LABELS[name]} shard scaling: {got['missing']} gets found nothing")
                out["gets"] = got["ops_per_s"]
            put = run_here(client, self._batch_job("put_batches", keys.seed, 300), s.phase_s)
            out["puts"] = put["ops_per_s"]
            print(f"    {LABELS[name]:<9} shard scaling: 1 process, batches of {BATCH}: {fmt_rate(put['ops_per_s'])} keys/s"
                  + (f"; gets from {clients} processes: {fmt_rate(out['gets'])}" if "gets" in out else ""), flush=True)  # fmt: skip
        return out

    def _shards_one(self, count: int, keys: Keys, pool: list[bytes], procs: ClientPool, clients: int, peers: dict) -> None:
        s, results = self.scale, self.results
        n = len(keys)
        workload = f"shard scaling, {clients} procs"
        label = f"{count} shard{'s' if count > 1 else ''}"
        rows = (results.row(workload, f"{label}: put_many {BATCH}, keys anywhere"),
                results.row(workload, f"{label}: put_many {BATCH}, one shard per batch"),
                results.row(workload, f"{label}: random gets"))  # fmt: skip
        self.shard_rows[count] = rows
        for name, figures in peers.items():
            for row in rows[:2]:
                row.values[name] = figures["puts"]
            if "gets" in figures:
                rows[2].values[name] = figures["gets"]
        with self.session("shardkv", shards=count) as (served, client):
            load(client, keys, pool)
            procs.open(served.spec, clients)
            try:
                out = procs.run({"kind": "reads", "n": n, "seed": keys.seed, "stream": 200 + count}, clients, s.phase_s)
                self.check(out["missing"] == 0, f"shardkv {count} shards: {out['missing']} gets found nothing")
                results.put(rows[2], "shardkv", out["ops_per_s"], f"  ({out['ops']:,} in {out['seconds']:.2f} s)")
                written_keys = 0
                for row, kind, stream in ((rows[0], "put_batches", 300), (rows[1], "put_batches_one_shard", 400)):
                    out = procs.run(self._batch_job(kind, keys.seed, stream + count, shards=count), clients, s.phase_s)
                    results.put(row, "shardkv", out["ops_per_s"], f"  ({out['ops']:,} keys in {out['seconds']:.2f} s)")
                    written_keys += out["ops"]
            finally:
                procs.close_clients(clients)
            written, total = client.count() - n, int(written_keys)
            # Every key a batch job writes is fresh unless a process ran out of keys and began again.
            exact = total <= self._batch_job_keys
            self.check(written == total if exact else 0 < written <= total,
                       f"shardkv {count} shards: {written:,} new keys after {total:,} batched puts")  # fmt: skip


# -- the chart ------------------------------------------------------------------------------------
def write_chart(suite: Suite, path: str, title: str) -> bool:
    rows = suite.readers_by_procs
    if not rows:
        return False
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    procs = sorted(rows)
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    markers = iter("osD^v<>px*")
    left_out = []
    for store in suite.results.stores:
        points = [(p, rows[p].values[store]) for p in procs if store in rows[p].values]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=next(markers), linewidth=2.6 if store == "shardkv" else 1.4, label=LABELS[store])
        else:
            left_out.append(LABELS[store])
    ax.set_xscale("log", base=2)
    ax.set_xticks(procs)
    ax.set_xticklabels([str(p) for p in procs])
    ax.set_yscale("log")
    ax.set_xlabel("client processes reading at once")
    ax.set_ylabel("random gets per second (all processes)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if left_out:
        fig.text(0.01, 0.01, f"Not shown (one process per database): {', '.join(left_out)}", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_shards_chart(suite: Suite, path: str, title: str) -> bool:
    rows = suite.shard_rows
    counts = sorted(rows)
    if not counts:
        return False
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    lines = ((0, f"put_many {BATCH}, keys anywhere (keys/s)", "o"), (1, f"put_many {BATCH}, one shard per batch (keys/s)", "D"),
             (2, "random gets (ops/s)", "s"))  # fmt: skip
    for column, label, marker in lines:
        xy = [(c, rows[c][column].values["shardkv"]) for c in counts if "shardkv" in rows[c][column].values]
        if xy:
            ax.plot(*zip(*xy), marker=marker, linewidth=2.4, label=f"shardkv: {label}")
    first = rows[counts[0]]
    for column, what, style in ((0, f"batches of {BATCH}, 1 process", "--"), (2, "gets", ":")):
        for store, value in first[column].values.items():
            if store in PEERS:
                ax.axhline(value, linestyle=style, linewidth=1.2, color="gray" if store == "rocksdb" else "tab:brown", label=f"{LABELS[store]}: {what}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts)
    ax.set_xticklabels([str(c) for c in counts])
    ax.set_yscale("log")
    ax.set_xlabel("shards (worker processes)")
    ax.set_ylabel("throughput, all client processes")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="Every seed workload against shardkv and every peer installed; one table.")
    p.add_argument("--quick", action="store_true", help="1/10 scale (no 10M row): under 3 minutes on 2 cores")
    p.add_argument("--stores", default=",".join(STORES), help="comma-separated subset of " + ",".join(STORES))
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS + EXTRA_WORKLOADS) + " (shards: only when named)")
    p.add_argument("--no-10m", action="store_true", help="full scale without the 10M-key load row")
    p.add_argument("--only-10m", action="store_true", help="full scale, of the load rows only the 10M-key one")
    p.add_argument("--load-rows", default=None, metavar="ROWS", help="comma-separated subset of the load rows as KEYSxVALUE_BYTES, e.g. 1Mx16 (the ordered reads of one row: --workloads load --load-rows 1Mx16)")
    p.add_argument("--all-10m", action="store_true", help="run every store on the 10M-key row (diskcache is left out by default: it takes ~17 min)")
    p.add_argument("--dir", default=None, help="parent of the temporary directories (default: system temp dir)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of keys, values and access orders")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--chart", default=None, metavar="PATH", help="write the throughput-vs-processes chart (PNG) there")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the table as Markdown")
    p.add_argument("--shard-counts", default="1,2,4,8,16", help="shard counts of the 'shards' workload (default 1,2,4,8,16)")
    p.add_argument("--shard-clients", type=int, default=None, help="client processes of the 'shards' workload (default: half the CPUs, at least 2)")
    p.add_argument("--shards-chart", default=None, metavar="PATH", help="write the throughput-vs-shards chart (PNG) there")
    args = p.parse_args(argv)
    args.stores = [x.strip().lower() for x in args.stores.split(",") if x.strip()]
    args.stores = ["sqlite" if x == "sqlite3" else x for x in args.stores]
    bad = [x for x in args.stores if x not in STORES]
    if bad:
        p.error(f"unknown store(s) {bad}; choose from {', '.join(STORES)}")
    args.workloads = [x.strip().lower() for x in args.workloads.split(",") if x.strip()]
    bad = [x for x in args.workloads if x not in WORKLOADS + EXTRA_WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS + EXTRA_WORKLOADS)}")
    try:
        args.shard_counts = [int(x) for x in args.shard_counts.split(",") if x.strip()]
    except ValueError:
        p.error("--shard-counts takes comma-separated integers")
    if args.shard_clients is None:
        args.shard_clients = max(2, (os.cpu_count() or 2) // 2)
    args.scale = QUICK if args.quick else FULL
    if args.no_10m and not args.quick:
        args.scale = dataclasses.replace(FULL, load_rows=tuple(r for r in FULL.load_rows if r[0] < 10_000_000))
    elif args.only_10m and not args.quick:
        args.scale = dataclasses.replace(FULL, load_rows=tuple(r for r in FULL.load_rows if r[0] >= 10_000_000))
    if args.load_rows is not None:
        names = {f"{fmt_count(n)}x{size}": (n, size) for n, size in args.scale.load_rows}
        wanted = [x.strip() for x in args.load_rows.split(",") if x.strip()]
        if not wanted or any(x not in names for x in wanted):
            p.error(f"--load-rows takes a subset of {', '.join(names)} at this scale")
        args.scale = dataclasses.replace(args.scale, load_rows=tuple(names[x] for x in wanted))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with sigterm_exits():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    results = Results(args.stores)
    available = available_stores(args.stores, check_available, LABELS, results.notes, verb="not run")
    if not available:
        print("no store available; nothing to do", file=sys.stderr)
        return 1
    scale = args.scale
    print(f"shardkv benchmark suite ({scale.name} scale): stores {', '.join(LABELS[s] for s in available)}; "
          f"workloads {', '.join(args.workloads)}; shardkv with {SHARDS} shards; {machine_line()}", flush=True)  # fmt: skip
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="shardkv-suite-", dir=args.dir)
    suite = Suite(args, available, base, results)
    memory = MemoryWatch()
    try:
        steps = [("load", suite.load), ("overwrite", suite.overwrite)]
        if "readers" in args.workloads or "ycsb" in args.workloads:
            steps.append(("readers+ycsb", lambda: suite.readers(ycsb="ycsb" in args.workloads, readers="readers" in args.workloads)))
        steps += [("batches", suite.batches), ("fsync", suite.fsync), ("shards", suite.shards)]
        for step, fn in steps:
            if step in args.workloads or step == "readers+ycsb":
                print(f"== {step}", flush=True)
                t = time.perf_counter()
                fn()
                results.timings[step] = time.perf_counter() - t
                print(f"== {step} done in {results.timings[step]:.1f} s", flush=True)
    finally:
        memory.stop()
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.perf_counter() - started
    results.memory = {"start_bytes": memory.start, "peak_bytes": memory.peak}
    report(args, suite, elapsed)
    return 1 if results.problems else 0


def report(args: argparse.Namespace, suite: Suite, elapsed: float) -> None:
    results, scale = suite.results, args.scale
    info = versions()
    table = results.table()
    print()
    print(f"Results ({scale.name} scale). ops/s unless the operation names a unit (MB on disk, seconds); batches and "
          "iteration count keys. Durability per row: 'no fsync' = nothing fsynced per write, 'fsync' = every write or batch "
          "fsynced. Ratio = shardkv / best peer (>1x: shardkv faster or smaller); 'engine' = shardkv's engine in-process, "
          "not in the ratio.")  # fmt: skip
    print()
    print(render_table(table, left=3))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"machine: {machine_line()}")
    print_problems(results.problems, notes=results.notes)
    if results.memory:
        gib = 1 << 30
        print(f"memory in use on the machine (all processes): {results.memory['start_bytes'] / gib:.1f} GiB at the start, "
              f"{results.memory['peak_bytes'] / gib:.1f} GiB at the peak")  # fmt: skip
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in results.timings.items())
    print(f"total time {elapsed:.1f} s ({steps})")
    if args.chart:
        title = f"Random gets of {scale.reader_value}-byte values, {fmt_count(scale.reader_keys)} keys ({machine_line().split(',')[1].strip()})"
        if write_chart(suite, args.chart, title):
            print(f"chart written to {args.chart}")
    if args.shards_chart:
        title = f"shardkv cluster, {args.shard_clients} client processes ({machine_line().split(',')[1].strip()})"
        if write_shards_chart(suite, args.shards_chart, title):
            print(f"chart written to {args.shards_chart}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(table, left=3) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": dataclasses.asdict(scale), "stores": results.stores, "seed": args.seed, "machine": machine_line(),
                       "versions": info, "rows": results.to_json(), "notes": results.notes, "problems": results.problems,
                       "timings_s": results.timings, "memory": results.memory, "elapsed_s": elapsed}, f, indent=2)  # fmt: skip
