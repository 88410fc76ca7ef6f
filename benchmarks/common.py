"""Helpers shared by the benchmark modules: number formatting, plain-text tables, disk usage,
SIGTERM handling, a private redis-server, and stopping a shardkv cluster for good."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

REDIS_START_TIMEOUT = 20.0
PROCESS_STOP_TIMEOUT = 10.0


class StoreUnavailable(Exception):
    """A store that cannot run here (its module or binary is missing); reported as a note."""


# -- formatting -------------------------------------------------------------------------------
def fmt_rate(x: float) -> str:
    """1234567 -> '1.23M', 12345 -> '12.3k', 123 -> '123'."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_count(n: int) -> str:
    """10_000_000 -> '10M', 100_000 -> '100k', 1500 -> '1500'."""
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            text = f"{n / div:.1f}".removesuffix(".0")
            return text + suffix
    return str(n)


def render_table(rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table: header row first, the first `left` columns left-aligned, the others
    right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """The same table in Markdown (pipes in cells escaped)."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = ["---" if i < left else "---:" for i in range(len(rows[0]))]
    return "\n".join([line(rows[0]), line(rule)] + [line(r) for r in rows[1:]])


# -- disk -------------------------------------------------------------------------------------
def disk_bytes(path: str) -> int:
    """Bytes allocated on disk under `path` (st_blocks, so sparse files count what they use)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


# -- SIGTERM ----------------------------------------------------------------------------------
_terminating: list[int] = []  # the signal that asked us to stop (checked between phases too)


def _raise_exit(signum, frame):
    _terminating.append(signum)
    raise SystemExit(128 + signum)


def check_terminating() -> None:
    """Raise SystemExit if SIGTERM arrived (in case its exception was swallowed somewhere)."""
    if _terminating:
        raise SystemExit(128 + _terminating[0])


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while inside, so that every `finally` block runs."""
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- stores and reports ----------------------------------------------------------------------
def available_stores(names: Sequence[str], check: Callable[[str], None], labels: dict, notes: list[str], verb: str = "skipped") -> list[str]:
    """The names whose check(name) passes; a note (also on stderr) for each that raises
    StoreUnavailable."""
    out = []
    for name in names:
        try:
            check(name)
        except StoreUnavailable as exc:
            text = f"{labels[name]} {verb}: {exc}"
            notes.append(text)
            print(f"note: {text}", file=sys.stderr, flush=True)
        else:
            out.append(name)
    return out


def print_problems(problems: Sequence[str], heading: str = "Problems:", notes: Sequence[str] = ()) -> None:
    """A run's notes ("note: ..." lines), then its problems, one indented item each
    (continuation lines indented more)."""
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(heading)
        for problem in problems:
            print("  - " + problem.rstrip().replace("\n", "\n    "))


def close_quietly(thing) -> None:
    """thing.close(), ignoring any error (for clean-up paths)."""
    if thing is not None:
        try:
            thing.close()
        except Exception:  # noqa: BLE001
            pass


# -- processes --------------------------------------------------------------------------------
def stop_process(proc: subprocess.Popen | None, timeout: float = PROCESS_STOP_TIMEOUT) -> None:
    """SIGTERM `proc` and wait for it; SIGKILL it if it is still there after `timeout`."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def processes_naming(path: str) -> list[int]:
    """Pids of the processes whose command line names `path` (a private temporary directory)."""
    needle = os.path.realpath(path).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def ensure_cluster_stopped(path: str, self_stop_wait: float = 0.0, timeout: float = 60.0) -> bool:
    """Make sure no shardkv cluster process of `path` is left: give an embedded cluster
    `self_stop_wait` seconds to stop by itself after its last client closed, then stop it
    (also one whose start was interrupted). True if it had to be stopped."""
    from shardkv.ops.cluster import is_running, stop_cluster  # noqa: PLC0415

    deadline = time.monotonic() + self_stop_wait
    while is_running(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_running(path):
            stop_cluster(path)
            stopped = True
        elif not processes_naming(path):
            return stopped
        time.sleep(0.05)
    raise RuntimeError(f"processes of the shardkv cluster on {path} still running: {processes_naming(path)}")


# -- Redis ------------------------------------------------------------------------------------
class RedisServer:
    """A private redis-server on a unix socket in `directory` (no TCP port), in a session of its
    own so that Ctrl-C reaches only us; `fsync`: AOF with appendfsync always, else no
    persistence at all."""

    def __init__(self, directory: str, fsync: bool = False):
        server = shutil.which("redis-server")
        if server is None:
            raise StoreUnavailable("redis-server is not installed (apt-get install redis-server)")
        import redis  # noqa: PLC0415

        self.socket = os.path.join(directory, "redis.sock")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if fsync else ["--appendonly", "no"]
        command = [server, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700", "--save", "", *persistence,
                   "--dir", directory, "--daemonize", "no", "--logfile", os.path.join(directory, "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode} (see {directory}/redis.log)")
                if os.path.exists(self.socket):
                    try:
                        with redis.Redis(unix_socket_path=self.socket) as client:
                            if client.ping():
                                got = client.config_get("appendfsync").get("appendfsync")
                                if fsync and got not in ("always", b"always"):
                                    raise RuntimeError(f"redis-server runs with appendfsync {got!r}, not always")
                                return
                    except redis.exceptions.ConnectionError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {REDIS_START_TIMEOUT:g} s")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (with AOF: after its last fsync). Idempotent."""
        proc, self.proc = self.proc, None
        stop_process(proc)


def redis_server_version() -> str:
    server = shutil.which("redis-server")
    if not server:
        return "missing"
    try:
        text = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((w[2:] for w in text.split() if w.startswith("v=")), text.strip())


def memory_in_use() -> int:
    """Bytes of memory in use on the machine (MemTotal - MemAvailable), all processes."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class MemoryWatch:
    """Samples memory_in_use() every `interval` seconds in a daemon thread: `start` and `peak`."""

    def __init__(self, interval: float = 0.5):
        import threading  # noqa: PLC0415

        self.start = self.peak = memory_in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name="memory-watch")
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, memory_in_use())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def machine_line() -> str:
    """'x86_64, 2 CPUs, 23.4 GiB, Linux-6.18...; Python 3.11.7'."""
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
        mem = f", {mem_kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{mem}, {platform.platform()}; Python {platform.python_version()}"


# -- timing -----------------------------------------------------------------------------------
def timed(fn: Callable, *args) -> tuple[float, object]:
    """(seconds, result) of fn(*args), after a garbage collection."""
    gc.collect()
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result
