"""Client processes for the multi-process workloads of the suite, and the data they share.

`Keys(n, seed)` are n random 16-byte keys that every process regenerates identically;
`Zipfian` draws key indices with YCSB's scrambled-zipfian distribution (theta 0.99, ranks
spread over the key space by a fixed permutation). A `ClientPool` holds up to P spawned
processes that live for a whole workload: each opens a client on a store (`benchmarks.peers
.connect`), then runs timed jobs - uniform random gets, or a YCSB mix of gets and updates -
or atomic batches of fresh keys - that all processes start at the same instant and end after
the same duration. Throughput is
all operations / (last process's end - the common start).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Sequence

import numpy as np

from benchmarks.common import close_quietly

KEY_SIZE = 16
VALUE_POOL = 1024
JOB_KEYS = 1 << 18  # operations drawn ahead per process and job, then used round and round
CHECK_EVERY = 256  # operations between two looks at the clock
START_DELAY = 0.1  # seconds between sending "go" and the common start
REPLY_TIMEOUT = 600.0


class Keys:
    """n random 16-byte keys, the same in every process for (n, seed): key i is raw[16i:16i+16]."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.raw = np.random.default_rng([seed, n, 1]).bytes(KEY_SIZE * n)

    def __len__(self) -> int:
        return self.n

    def take(self, indices: Sequence[int] | np.ndarray) -> list[bytes]:
        raw = self.raw
        return [raw[KEY_SIZE * i : KEY_SIZE * i + KEY_SIZE] for i in (indices.tolist() if isinstance(indices, np.ndarray) else indices)]

    def span(self, start: int, stop: int) -> list[bytes]:
        return self.take(range(start, stop))

    def pairs(self, start: int, stop: int, pool: list[bytes]) -> list[tuple[bytes, bytes]]:
        """(key i, pool[i % len(pool)]) for i in [start, stop)."""
        return [(k, pool[i % len(pool)]) for i, k in zip(range(start, stop), self.span(start, stop))]


def value_pool(size: int, seed: int) -> list[bytes]:
    """VALUE_POOL random values of `size` bytes (key i of a row gets pool[i % VALUE_POOL])."""
    buf = np.random.default_rng([seed, size, 2]).bytes(size * VALUE_POOL)
    return [buf[j * size : (j + 1) * size] for j in range(VALUE_POOL)]


class Zipfian:
    """YCSB's scrambled zipfian over [0, n): rank r is drawn with probability proportional to
    1 / (r + 1) ** theta, then mapped through a fixed random permutation, so the hot keys are
    spread over the key space (and the shards)."""

    def __init__(self, n: int, seed: int, theta: float = 0.99):
        weights = np.arange(1, n + 1, dtype=np.float64) ** -theta
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.permutation = np.random.default_rng([seed, n, 3]).permutation(n)

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(count)), len(self.cdf) - 1)
        return self.permutation[ranks]

    def top_share(self, fraction: float) -> float:
        """The share of draws that land on the hottest `fraction` of the keys."""
        return float(self.cdf[max(0, int(len(self.cdf) * fraction) - 1)])


# -- the worker process -------------------------------------------------------------------------
_cache: dict = {}  # (class, n, seed) -> Keys or Zipfian, kept across the jobs of a process


def _cached(cls, n: int, seed: int):
    if (cls, n, seed) not in _cache:
        _cache.clear()  # (one data set at a time)
        _cache[(cls, n, seed)] = cls(n, seed)
    return _cache[(cls, n, seed)]


def _prepare(job: dict, index: int, client=None) -> tuple[list[bytes], list[bool] | None, list[bytes]]:
    """The operations of one process for `job`: keys, read-or-update flags, update values.

    Batch jobs ("put_batches": keys anywhere; "put_batches_one_shard": every batch's keys on one
    shard, by `client.shard_of`, the process's batches going round the shards from its own
    index on) draw `job["keys"]` fresh random keys, written once each unless the timed phase
    outruns them (then round and round again, as overwrites)."""
    rng = np.random.default_rng([job["seed"], job["stream"], index])
    if job["kind"] in ("put_batches", "put_batches_one_shard"):
        count = job.get("keys", JOB_KEYS)
        raw = rng.bytes(KEY_SIZE * count)
        fresh = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
        pool = value_pool(job["value_size"], job["seed"] + 1)
        pairs = [(k, pool[j % VALUE_POOL]) for j, k in enumerate(fresh)]
        batch = job["batch"]
        if job["kind"] == "put_batches":
            return [pairs[i : i + batch] for i in range(0, count, batch)], "batches", []
        return _one_shard_batches(pairs, batch, client.shard_of, job["shards"], index), "batches", []
    keys = _cached(Keys, job["n"], job["seed"])
    count = min(JOB_KEYS, max(CHECK_EVERY, job["n"]))
    if job["kind"] == "reads":
        return keys.take(rng.integers(0, job["n"], size=count)), None, []
    indices = _cached(Zipfian, job["n"], job["seed"]).draw(rng, count)
    reads = (rng.random(count) < job["read_fraction"]).tolist()
    return keys.take(indices), reads, value_pool(job["value_size"], job["seed"] + 1)


def _one_shard_batches(pairs: list, batch: int, shard_of, shards: int, first: int) -> list[list]:
    """Full batches of `batch` pairs whose keys share a shard, taking the shards in turn from
    `first` on (so that processes start on different shards)."""
    by_shard: list[list] = [[] for _ in range(shards)]
    for pair in pairs:
        by_shard[shard_of(pair[0])].append(pair)
    per_shard = [[bucket[i : i + batch] for i in range(0, len(bucket) - batch + 1, batch)] for bucket in by_shard]
    order = [per_shard[(first + j) % shards] for j in range(shards)]
    return [lists[i] for i in range(max(map(len, order))) for lists in order if i < len(lists)]


def run_here(client, job: dict, duration: float, index: int = 0) -> dict:
    """Run `job` in this process on `client` (a store that only one process may write, such as
    RocksDB): the same loop as a pool process's, timed alike."""
    ops = _prepare(job, index, client)
    start_at = time.monotonic() + START_DELAY
    out = _run(client, ops, start_at, duration)
    seconds = out["end"] - start_at
    return {"ops": out["ops"], "seconds": seconds, "ops_per_s": out["ops"] / seconds, "missing": out["missing"]}


def _run(client, ops: tuple, start_at: float, duration: float) -> dict:
    keys, reads, values = ops
    get, put = client.get, client.put
    clock = time.monotonic
    while clock() < start_at:
        time.sleep(0.0005)
    deadline = start_at + duration
    if reads == "batches":  # keys: a list of batches of (key, value); ops counts keys written
        done = 0
        put_batch = client.put_batch
        while clock() < deadline:
            for batch in keys:
                put_batch(batch)
                done += len(batch)
                if clock() >= deadline:
                    break
        return {"ops": done, "end": clock(), "missing": 0}
    total = len(keys)
    done = missing = 0
    pos = 0
    while True:
        stop = pos + CHECK_EVERY
        chunk = keys[pos:stop]
        if reads is None:
            for key in chunk:
                if get(key) is None:
                    missing += 1
        else:
            flags = reads[pos:stop]
            for j, key in enumerate(chunk):
                if flags[j]:
                    if get(key) is None:
                        missing += 1
                else:
                    put(key, values[(done + j) % VALUE_POOL])
        done += len(chunk)
        pos = stop if stop < total else 0
        if clock() >= deadline:
            break
    return {"ops": done, "end": clock(), "missing": missing}


def _worker(conn, index: int, preload: Sequence[str]) -> None:
    from benchmarks.peers import connect  # noqa: PLC0415

    for module in preload:  # imported now, while the parent loads data, not in a timed phase
        try:
            __import__(module)
        except ImportError:
            pass
    client = None
    ops = None
    try:
        while True:
            command, arg = conn.recv()
            try:
                if command == "exit":
                    break
                if command == "open":
                    client = connect(arg, reader=True)
                    answer = None
                elif command == "prepare":
                    ops = _prepare(arg, index, client)
                    answer = None
                elif command == "go":
                    answer = _run(client, ops, arg["start_at"], arg["duration"])
                elif command == "close":
                    if client is not None:
                        client.close()
                    client, answer = None, None
                else:
                    raise ValueError(f"unknown command {command!r}")
                conn.send(("ok", answer))
            except Exception:  # noqa: BLE001 - reported by the parent
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        close_quietly(client)


class ClientPool:
    """`size` spawned client processes, stopped by `close()` (also on errors: use `with`)."""

    def __init__(self, size: int, preload: Sequence[str] = ()):
        ctx = mp.get_context("spawn")
        self.procs: list = []
        self.conns: list = []
        try:
            for index in range(size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, index, tuple(preload)), daemon=True, name=f"bench-client-{index}")
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ask(self, procs: int, command: str, arg=None) -> list:
        for conn in self.conns[:procs]:
            conn.send((command, arg))
        answers, errors = [], []
        for conn in self.conns[:procs]:
            if not conn.poll(REPLY_TIMEOUT):
                raise TimeoutError(f"a client process did not answer {command!r} within {REPLY_TIMEOUT:g} s")
            status, answer = conn.recv()
            (errors if status == "error" else answers).append(answer)
        if errors:
            raise RuntimeError(f"a client process failed ({command}):\n{errors[0]}")
        return answers

    def open(self, spec: dict, procs: int) -> None:
        self._ask(procs, "open", spec)

    def close_clients(self, procs: int) -> None:
        self._ask(procs, "close")

    def run(self, job: dict, procs: int, duration: float) -> dict:
        """Run `job` in the first `procs` processes for `duration` seconds: ops/s and counts."""
        self._ask(procs, "prepare", job)
        start_at = time.monotonic() + START_DELAY
        answers = self._ask(procs, "go", {"start_at": start_at, "duration": duration})
        ops = sum(a["ops"] for a in answers)
        seconds = max(a["end"] for a in answers) - start_at
        return {"ops": ops, "seconds": seconds, "ops_per_s": ops / seconds, "missing": sum(a["missing"] for a in answers)}

    def close(self) -> None:
        """Ask every process to exit; terminate the ones that do not. Idempotent."""
        for conn in self.conns:
            try:
                conn.send(("exit", None))
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
