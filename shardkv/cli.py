"""The `shardkv` command line.

    shardkv start DIR [--shards N] [--durability process|interval|fsync] [--foreground]
    shardkv stop DIR
    shardkv status DIR [--json]
    shardkv get DIR KEY | put DIR KEY VALUE | delete DIR KEY
    shardkv scan DIR [--start K] [--stop K] [--prefix P] [--limit N] [--reverse]
    shardkv min DIR | max DIR | above DIR KEY | below DIR KEY | len DIR
    shardkv bench [--quick] [--keys N] [--shards N]      # the cluster, in a temporary directory
    shardkv bench --engine [--quick] [--keys N]          # benchmarks/engine.py (source checkout)

Keys and values are UTF-8 text or hex literals (`x'00cafebabe'`, also `X'..'`). Output shows a
value as text when it is printable UTF-8 (and does not itself look like a hex literal), else as a
hex literal; pairs print as `key<TAB>value`.

Exit codes: 0 success; 1 a missing key, a failed start/stop, a degraded cluster; 2 bad input,
a cluster that is down or not running (`status`).
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import shardkv
from shardkv.ops.salvage import salvage_store
from shardkv.ops.status import collect_status, exit_code, render_prometheus, render_table, stale_objects
from shardkv.ops.verify import verify_store
from shardkv.coordinator.runfiles import (
    EXIT_ALREADY_RUNNING,
    EXIT_BAD_CONFIG,
    SUPERVISOR_LOCK,
    lock_is_held,
    read_cluster_file,
    run_dir,
)
from shardkv.ipc.layout import process_start_time

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
START_TIMEOUT = 120.0  # the supervisor itself gives up after 120 s
STOP_TIMEOUT = 30.0
SUPERVISOR_LOG = "supervisor.stderr"
DURABILITY_CHOICES = shardkv.DURABILITY_LEVELS

_HEX_LITERAL = re.compile(r"[xX]'([0-9A-Fa-f]*)'")


class UsageError(Exception):
    """Bad input from the command line: printed as `shardkv: <message>`, exit 2."""


# -- keys and values ---------------------------------------------------------------------------
def parse_bytes(text: str, what: str = "value") -> bytes:
    """`x'00ff'` / `X'00FF'` as hex bytes, anything else as UTF-8 text.

    A word that starts with x' or X' is always taken as a hex literal: a malformed one is a
    UsageError rather than silently stored as text.
    """
    if len(text) >= 2 and text[0] in "xX" and text[1] == "'":
        match = _HEX_LITERAL.fullmatch(text)
        if match is None or len(match.group(1)) % 2:
            raise UsageError(f"invalid hex literal for {what}: {text!r} (expected x'<an even number of hex digits>')")
        return bytes.fromhex(match.group(1))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable command-line bytes
        return os.fsencode(text)


def format_bytes(data: bytes) -> str:
    """Printable UTF-8 as text, anything else (or text that reads as a hex literal) as x'..'."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"x'{data.hex()}'"
    if not text.isprintable() or (len(text) >= 2 and text[0] in "xX" and text[1] == "'"):
        return f"x'{data.hex()}'"
    return text


def format_pair(pair: tuple[bytes, bytes]) -> str:
    return f"{format_bytes(pair[0])}\t{format_bytes(pair[1])}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _shards(text: str) -> int:
    value = _positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"must be at most 1024, not {value}")
    return value


# -- cluster process helpers (also used by benchmarks/cluster.py) ------------------------------
def _realdir(directory) -> str:
    return os.path.realpath(os.fspath(directory))


def _lock_path(directory: str) -> str:
    return os.path.join(run_dir(directory), SUPERVISOR_LOCK)


def is_running(directory) -> bool:
    """True if a supervisor holds the lock of `directory`."""
    return lock_is_held(_lock_path(_realdir(directory)))


def _log_tail(path: str, offset: int = 0) -> str:
    """The last non-empty line written to `path` after `offset` ("" if none)."""
    try:
        with builtins.open(path, "rb") as f:
            f.seek(offset)
            data = f.read()[-8000:]
    except OSError:
        return ""
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _supervisor_pid(directory: str) -> int | None:
    """The pid of the live supervisor of `directory` per cluster.json (None if unknown or stale)."""
    info = read_cluster_file(directory)
    if not info or not info.get("pid"):
        return None
    pid = int(info["pid"])
    start_time = info.get("start_time")
    if start_time and process_start_time(pid) != start_time:
        return None  # the pid was reused: that is not our supervisor
    return pid


def _is_live(info: dict | None) -> bool:
    """True if the supervisor named in cluster.json `info` is alive (not a reused pid)."""
    return bool(info and info.get("pid") and process_start_time(int(info["pid"])) == info.get("start_time"))


def start_cluster(directory, shards: int | None = None, durability: str = "interval", timeout: float = START_TIMEOUT) -> tuple[str, dict]:
    """Start a (non-embedded) supervisor on `directory` in a session of its own; wait until its
    cluster is ready.

    Returns ("started" | "running", cluster info). Raises ValueError for a configuration the
    supervisor refused (exit 4) and RuntimeError for any other failure to start; a supervisor
    that did not come up in time is stopped again.
    """
    directory = _realdir(directory)
    if is_running(directory):
        return "running", read_cluster_file(directory) or {}
    logs = os.path.join(directory, "logs")
    os.makedirs(directory, mode=0o700, exist_ok=True)  # makedirs applies `mode` to the last level only
    os.makedirs(logs, mode=0o700, exist_ok=True)
    log_path = os.path.join(logs, SUPERVISOR_LOG)
    os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    lock = _lock_path(directory)
    command = [sys.executable, "-m", "shardkv.coordinator.supervisor", directory, "--durability", durability]
    if shards is not None:
        command += ["--shards", str(shards)]
    with builtins.open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    detached = False  # the supervisor locks the directory, validates, then forks and its parent exits 0
    try:
        while True:
            if not detached and (code := proc.poll()) is not None:
                if code == EXIT_ALREADY_RUNNING:
                    return "running", read_cluster_file(directory) or {}
                if code == EXIT_BAD_CONFIG:
                    message = _log_tail(log_path, offset)
                    raise ValueError(message.removeprefix("shardkv: ") or "the supervisor refused the configuration")
                if code != 0:
                    raise RuntimeError(f"the supervisor failed (exit {code}): {_log_tail(log_path, offset) or 'see ' + log_path}")
                detached = True
            held = lock_is_held(lock)
            info = read_cluster_file(directory)
            if held and info and info.get("ready") and _is_live(info):
                return "started", info
            if detached and not held:
                message = _log_tail(log_path, offset) or "see " + log_path
                raise RuntimeError(f"the supervisor stopped before the cluster was ready: {message}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster on {directory} was not ready within {timeout:g} s (see {log_path})")
            time.sleep(0.02)
    except BaseException:
        # Never leave a half-started cluster behind.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if detached:
            try:
                stop_cluster(directory)
            except TimeoutError:
                pass
        raise
    finally:
        if proc.poll() is None:
            try:
                proc.wait(5)  # the starter exits right after forking
            except subprocess.TimeoutExpired:
                pass


def stop_cluster(directory, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM the supervisor of `directory` and wait until its lock is released.

    Returns False if no cluster was running. Raises TimeoutError if it is still up after
    `timeout` seconds.
    """
    directory = _realdir(directory)
    lock = _lock_path(directory)
    if not lock_is_held(lock):
        return False
    deadline = time.monotonic() + timeout
    signalled = None  # (pid, start time) of the supervisor sent SIGTERM
    while lock_is_held(lock):
        if signalled is None:
            pid = _supervisor_pid(directory)
            if pid is not None:  # (None: it is still writing cluster.json; look again)
                signalled = (pid, process_start_time(pid))
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster on {directory} did not stop within {timeout:g} s")
        time.sleep(0.02)
    # It releases the lock as the last step of stopping: wait for the process itself to end too.
    while signalled is not None and _running(*signalled) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def _running(pid: int, start_time: int) -> bool:
    """True while process `pid` (started at `start_time`) exists and is not a zombie."""
    try:
        with builtins.open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


def read_health(directory) -> dict | None:
    """health() of the cluster running on `directory`, read from its control block without
    taking a client lease (and never starting a cluster); None if no cluster is running."""
    import mmap  # noqa: PLC0415

    import posix_ipc  # noqa: PLC0415

    from shardkv.client import health_from_control  # noqa: PLC0415
    from shardkv.ipc.layout import ControlBlock  # noqa: PLC0415

    directory = _realdir(directory)
    deadline = time.monotonic() + 10
    while True:
        if not is_running(directory):
            return None
        info = read_cluster_file(directory)
        if _is_live(info):
            try:
                shm = posix_ipc.SharedMemory(info["names"]["control"])
            except posix_ipc.ExistentialError:
                pass  # a stale cluster.json: the new supervisor has not written its own yet
            else:
                try:
                    buf = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)
                finally:
                    shm.close_fd()
                try:
                    control = ControlBlock(buf, info["shards"], info["leases"])
                    health = health_from_control(control, info)
                    del control
                finally:
                    try:
                        buf.close()
                    except BufferError:
                        pass
                return health
        if time.monotonic() > deadline:
            return {"status": "degraded", "supervisor": {"role": "supervisor", "pid": None, "state": "starting"}, "coordinator": None, "shards": []}
        time.sleep(0.02)


# -- commands: the service --------------------------------------------------------------------
def _cmd_start(args: argparse.Namespace) -> int:
    directory = _realdir(args.directory)
    if args.foreground:
        from shardkv.coordinator import supervisor  # noqa: PLC0415

        argv = [directory, "--durability", args.durability, "--foreground"]
        if args.shards is not None:
            argv += ["--shards", str(args.shards)]
        code = supervisor.main(argv)  # (it says so itself when a cluster is already running)
        if code == EXIT_ALREADY_RUNNING:
            return EXIT_OK
        return EXIT_OK if code == 0 else EXIT_FAIL
    try:
        outcome, info = start_cluster(directory, args.shards, args.durability)
    except ValueError as exc:
        print(f"shardkv: bad configuration: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except RuntimeError as exc:
        print(f"shardkv: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if outcome == "running" and args.shards is not None and info.get("shards") not in (None, args.shards):
        print(f"shardkv: {directory} is running with {info['shards']} shards, not {args.shards}", file=sys.stderr)
        return EXIT_FAIL
    if outcome == "running":
        print(f"already running: {directory} ({info.get('shards', '?')} shards, pid {info.get('pid', '?')})")
    else:
        print(f"started {directory} ({info['shards']} shards, pid {info['pid']})")
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    directory = _realdir(args.directory)
    try:
        stopped = stop_cluster(directory, args.timeout)
    except TimeoutError as exc:
        print(f"shardkv: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if stopped:
        print(f"stopped {directory}")
        return EXIT_OK
    # Not running: a killed cluster may have left shared objects (and processes) behind.
    from shardkv.coordinator.supervisor import reclaim  # noqa: PLC0415

    removed = reclaim(directory) if stale_objects(directory) or read_cluster_file(directory) else []
    objects = [entry for entry in removed or () if not entry.startswith(("pid ", "run/"))]
    print(f"not running: {directory}" + (f" (removed {len(objects)} stale objects)" if objects else ""))
    return EXIT_OK


def _fmt_uptime(seconds) -> str:
    if not seconds:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _health_table(health: dict) -> str:
    rows = [["ROLE", "SHARD", "PID", "STATE", "RESTARTS", "UPTIME"]]
    sup = health.get("supervisor") or {}
    rows.append(["supervisor", "-", str(sup.get("pid") or "-"), sup.get("state", "?"), "-", "-"])
    for proc in ([health["coordinator"]] if health.get("coordinator") else []) + list(health.get("shards") or []):
        shard = "-" if proc.get("shard") is None else str(proc["shard"])
        rows.append([proc["role"], shard, str(proc.get("pid") or "-"), proc["state"], str(proc.get("restarts", 0)), _fmt_uptime(proc.get("uptime"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + [f"status: {health.get('status', '?')}"])


def _cmd_status(args: argparse.Namespace) -> int:
    if shardkv.backends.is_url(args.directory):  # redis://...: the backend's nodes (docs/BACKENDS.md)
        return shardkv.backends.status_main(args.directory, "json" if args.json else args.format, args.watch)
    directory = _realdir(args.directory)
    while True:
        if read_health(directory) is None:
            stale = len(stale_objects(directory))  # a killed cluster's leftovers (`shardkv stop` removes them)
            if args.json:
                output = json.dumps({"status": "not running", "directory": directory, "stale_objects": stale})
            else:
                output = f"not running, {stale} stale objects: {directory} (`shardkv stop` removes them)" if stale else f"not running: {directory}"
            code = EXIT_USAGE
        else:
            with shardkv.open(directory) as db:
                status = collect_status(db, sample_seconds=0.25)
            code = exit_code(status)
            if args.json or args.format == "json":
                output = json.dumps(dict(status, directory=directory), indent=2)
            elif args.format == "prometheus":
                output = render_prometheus(status).rstrip("\n")
            else:
                output = f"{directory}\n{render_table(status)}"
        if not args.watch:
            print(output)
            return code
        sys.stdout.write("\x1b[H\x1b[2J" + output + "\n")  # redraw in place
        sys.stdout.flush()
        time.sleep(args.watch)


def _cmd_compact(args: argparse.Namespace) -> int:
    directory = _realdir(args.directory)
    if read_health(directory) is None:
        print(f"not running: {directory} (start it, or open it, to compact online)", file=sys.stderr)
        return EXIT_USAGE
    with shardkv.open(directory) as db:
        progress = _Progress("compacting", 1)

        def show(done: int, total: int) -> None:
            progress.total = max(1, total)
            progress.update(min(done, total))

        results = db.compact(args.shard, progress=show)
        progress.clear()
    shards = range(len(results)) if args.shard is None else [args.shard]
    for shard, result in zip(shards, results):
        if result is None:
            continue
        before, after = result["before"], result["after"]
        print(
            f"shard {shard}: {before['total_bytes']:,} -> {after['total_bytes']:,} bytes "
            f"(garbage {before['garbage_ratio']:.0%} -> {after['garbage_ratio']:.0%}) in {result['seconds']:.2f} s"
        )
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    report = verify_store(_realdir(args.directory))
    for problem in report["problems"]:
        print(problem)
    for tail in report["torn_tails"]:
        print(f"note: {tail}")
    verdict = "ok" if report["ok"] else f"{len(report['problems'])} corrupt place(s)"
    print(f"{report['segments']} segments, {report['records']:,} records: {verdict}")
    return EXIT_OK if report["ok"] else EXIT_FAIL


def _cmd_salvage(args: argparse.Namespace) -> int:
    source = _realdir(args.directory)
    if read_health(source) is not None:
        print(f"{source} is being served by a running cluster: stop it first", file=sys.stderr)
        return EXIT_USAGE
    report = salvage_store(source, _realdir(args.destination))
    for problem in report["problems"]:
        print(f"not saved: {problem}")
    print(f"saved {report['keys']:,} keys ({report['records_read']:,} records read) into {args.destination}; {report['bytes_lost']:,} bytes could not be read")
    return EXIT_OK if not report["problems"] else EXIT_FAIL


# -- commands: data ---------------------------------------------------------------------------
def _open(args: argparse.Namespace):
    return shardkv.open(args.directory, shards=getattr(args, "shards", None), durability=getattr(args, "durability", "interval"))


def _print_pair(pair) -> int:
    if pair is None:
        print("shardkv: no such key", file=sys.stderr)
        return EXIT_FAIL
    print(format_pair(pair))
    return EXIT_OK


def _cmd_get(args: argparse.Namespace) -> int:
    key = parse_bytes(args.key, "key")
    with _open(args) as db:
        value = db.get(key)
    if value is None:
        print(f"shardkv: key not found: {format_bytes(key)}", file=sys.stderr)
        return EXIT_FAIL
    print(format_bytes(value))
    return EXIT_OK


def _cmd_put(args: argparse.Namespace) -> int:
    key, value = parse_bytes(args.key, "key"), parse_bytes(args.value, "value")
    with _open(args) as db:
        db.put(key, value)
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace) -> int:
    key = parse_bytes(args.key, "key")
    with _open(args) as db:
        deleted = db.delete(key)
    if not deleted:
        print(f"shardkv: key not found: {format_bytes(key)}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _cmd_scan(args: argparse.Namespace) -> int:
    start = None if args.start is None else parse_bytes(args.start, "--start")
    stop = None if args.stop is None else parse_bytes(args.stop, "--stop")
    prefix = None if args.prefix is None else parse_bytes(args.prefix, "--prefix")
    with _open(args) as db:
        out = sys.stdout
        for pair in db.scan(start=start, stop=stop, reverse=args.reverse, prefix=prefix, limit=args.limit):
            out.write(format_pair(pair) + "\n")
    return EXIT_OK


def _cmd_min(args: argparse.Namespace) -> int:
    with _open(args) as db:
        pair = db.min()
    return _print_pair(pair) if pair is not None else _empty()


def _cmd_max(args: argparse.Namespace) -> int:
    with _open(args) as db:
        pair = db.max()
    return _print_pair(pair) if pair is not None else _empty()


def _empty() -> int:
    print("shardkv: the store is empty", file=sys.stderr)
    return EXIT_FAIL


def _cmd_above(args: argparse.Namespace) -> int:
    key = parse_bytes(args.key, "key")
    with _open(args) as db:
        pair = db.above(key)
    if pair is None:
        print(f"shardkv: no key above {format_bytes(key)}", file=sys.stderr)
        return EXIT_FAIL
    return _print_pair(pair)


def _cmd_below(args: argparse.Namespace) -> int:
    key = parse_bytes(args.key, "key")
    with _open(args) as db:
        pair = db.below(key)
    if pair is None:
        print(f"shardkv: no key below {format_bytes(key)}", file=sys.stderr)
        return EXIT_FAIL
    return _print_pair(pair)


def _cmd_len(args: argparse.Namespace) -> int:
    with _open(args) as db:
        print(len(db))
    return EXIT_OK


# -- bench ------------------------------------------------------------------------------------
class _Progress:
    """A one-line progress counter on stderr (carriage return on a terminal, silent otherwise)."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.next_at = 0.0

    def update(self, done: int) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if now >= self.next_at or done == self.total:
            self.next_at = now + 0.1
            width = 30
            filled = width * done // max(1, self.total)
            sys.stderr.write(f"\r  {self.label:<12} [{'#' * filled}{'.' * (width - filled)}] {done:>9,}/{self.total:,}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _phase(label: str, items, fn, total: int) -> tuple[float, int]:
    """Call fn(item) for each item, with a progress line; (seconds, count)."""
    progress = _Progress(label, total)
    count = 0
    started = time.perf_counter()
    for item in items:
        fn(item)
        count += 1
        if not count & 1023:
            progress.update(count)
    elapsed = time.perf_counter() - started
    progress.update(count)
    progress.clear()
    return elapsed, count


def _report(label: str, seconds: float, count: int, extra: str = "") -> None:
    rate = count / seconds if seconds > 0 else float("inf")
    print(f"  {label:<12} {seconds * 1000:>9.0f} ms  {rate:>12,.0f} op/s  n={count:,}{extra}", flush=True)


def cluster_bench(keys: int, shards: int, value_size: int = 100, seed: int = 20240601) -> int:
    """The seed's demo workload against an embedded cluster in a temporary directory: put every
    key, get every key (checked), scan ascending and descending, get_many, delete every key."""
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
        outcome, info = start_cluster(directory, shards, "process")
        print(f"  start        {(time.perf_counter() - started) * 1000:>9.0f} ms  (supervisor pid {info['pid']})", flush=True)
        with shardkv.open(directory, durability="process") as db:
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
    return EXIT_FAIL if problems else EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.engine:
        # benchmarks/ sits beside shardkv/ in a source checkout (the README installs it editable).
        checkout = Path(shardkv.__file__).resolve().parent.parent
        if (checkout / "benchmarks" / "engine.py").exists() and str(checkout) not in sys.path:
            sys.path.insert(0, str(checkout))
        from benchmarks import engine as engine_bench  # noqa: PLC0415

        argv = ["--quick"] if args.quick else []
        if args.keys:
            argv += ["--keys", str(args.keys)]
        return engine_bench.main(argv) or 0
    keys = args.keys or (20_000 if args.quick else 100_000)
    return cluster_bench(keys, args.shards or min(os.cpu_count() or 1, 8))


# -- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `shardkv` command."""
    parser = argparse.ArgumentParser(
        prog="shardkv",
        description="shardkv: a persistent, sharded key-value store.",
        epilog="Keys and values: UTF-8 text or hex literals such as x'00cafebabe'.",
    )
    parser.add_argument("--version", action="version", version=f"shardkv {shardkv.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler, help: str, *, data: bool = False, write: bool = False) -> argparse.ArgumentParser:  # noqa: A002
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("directory", metavar="DIR", help="the data directory")
        if data:
            sub.add_argument("--shards", type=_shards, default=None, help="shard count if this creates the store (default: CPU cores)")
        if write:
            sub.add_argument("--durability", choices=DURABILITY_CHOICES, default="interval", help="durability of this write (default: interval)")
        sub.set_defaults(handler=handler)
        return sub

    start = command("start", _cmd_start, "start a cluster serving DIR (in the background)")
    start.add_argument("--shards", type=_shards, default=None, help="shard count of a new store (default: CPU cores)")
    start.add_argument("--durability", choices=DURABILITY_CHOICES, default="interval", help="default durability (default: interval)")
    start.add_argument("--foreground", action="store_true", help="run the supervisor in this process until SIGTERM/SIGINT")
    stop = command("stop", _cmd_stop, "stop the cluster serving DIR")
    stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT, help=f"seconds to wait (default {STOP_TIMEOUT:g})")
    status = command("status", _cmd_status, "show every process and shard of the cluster serving DIR (exit 0 healthy, 1 degraded, 2 down)")
    status.add_argument("--json", action="store_true", help="print the status (the object db.health() returns) as JSON")
    status.add_argument("--format", choices=("table", "json", "prometheus"), default="table", help="output format (default: table)")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS", help="refresh in place every SECONDS (default 2)")
    compact = command("compact", _cmd_compact, "compact the cluster serving DIR online, with progress")
    compact.add_argument("--shard", type=int, default=None, metavar="N", help="only shard N")
    command("verify", _cmd_verify, "check every record of every segment of DIR without changing anything (exit 1 if corrupt)")
    salvage = command("salvage", _cmd_salvage, "copy every record that can still be read from DIR into a new store NEWDIR")
    salvage.add_argument("destination", metavar="NEWDIR")

    command("get", _cmd_get, "print the value of KEY", data=True).add_argument("key", metavar="KEY")
    put = command("put", _cmd_put, "set KEY to VALUE", data=True, write=True)
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE")
    command("delete", _cmd_delete, "remove KEY", data=True, write=True).add_argument("key", metavar="KEY")
    scan = command("scan", _cmd_scan, "print key<TAB>value pairs in key order", data=True)
    scan.add_argument("--start", metavar="K", help="first key (inclusive)")
    scan.add_argument("--stop", metavar="K", help="last key (exclusive)")
    scan.add_argument("--prefix", metavar="P", help="only keys starting with P")
    scan.add_argument("--limit", metavar="N", type=_count, default=None, help="at most N pairs")
    scan.add_argument("--reverse", action="store_true", help="descending key order")
    command("min", _cmd_min, "print the pair of the smallest key", data=True)
    command("max", _cmd_max, "print the pair of the largest key", data=True)
    command("above", _cmd_above, "print the pair of the smallest key after KEY", data=True).add_argument("key", metavar="KEY")
    command("below", _cmd_below, "print the pair of the largest key before KEY", data=True).add_argument("key", metavar="KEY")
    command("len", _cmd_len, "print the number of keys", data=True)

    bench = commands.add_parser(
        "bench",
        help="benchmark an embedded cluster in a temporary directory (--engine: the engine beside LMDB and RocksDB)",
        description="Without --engine: put/get/get_many/scan/delete rates of a cluster in a temporary directory.",
    )
    bench.add_argument("--engine", action="store_true", help="run benchmarks/engine.py instead (source checkout)")
    bench.add_argument("--quick", action="store_true", help="smaller run (cluster: 20k keys; engine: 100k keys)")
    bench.add_argument("--keys", type=_positive_int, default=None, help="number of keys (cluster default 100,000; engine 1,000,000)")
    bench.add_argument("--shards", type=_shards, default=None, help="cluster shards (default: CPU cores, at most 8)")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shardkv` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"shardkv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError) as exc:  # the library's checks of keys, values, shard counts
        print(f"shardkv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except shardkv.Error as exc:
        print(f"shardkv: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("shardkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `shardkv scan DIR | head`
        try:
            sys.stdout = builtins.open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_OK
    except ModuleNotFoundError as exc:
        if exc.name == "benchmarks":
            print("shardkv bench --engine runs from a source checkout (the benchmarks/ folder is not installed)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
