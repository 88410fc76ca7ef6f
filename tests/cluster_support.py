"""Helpers shared by the multi-process cluster tests (test_cluster*.py).

Imported as a plain module (pytest puts tests/ on sys.path). Every test gets its own data
directory; the `Cluster` harness tracks what a test opened or spawned and, on teardown, leaves
nothing behind: clients closed, client subprocesses killed, the supervisor stopped (SIGTERM,
then SIGKILL of whatever is left), every /dev/shm entry of the directory removed. Anything the
harness had to clean up by force is reported as a test failure.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import posix_ipc

import shardkv
from shardkv.ipc.layout import name_prefix, process_start_time

SHARDS = 2
# How a cluster process shows in /proc/<pid>/cmdline: its module until it names itself, then its
# title (setproctitle; docs/IPC.md, "Processes").
CLUSTER_MODULES = (
    "shardkv.coordinator.supervisor",
    "shardkv.coordinator.coordinator",
    "shardkv.shards.worker",
    "shardkv: supervisor of ",
    "shardkv: coordinator of ",
    "shardkv: shard ",
)


# -- processes ---------------------------------------------------------------------------------
def _proc_state(pid: int) -> str | None:
    """The state letter of `pid` ("R", "S", "Z", ...) or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def reap(pid: int) -> None:
    """Collect `pid` if it is an exited child of this process (a zombie otherwise lingers)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def alive(pid: int, start_time: int | None = None) -> bool:
    """True if `pid` runs (a zombie counts as dead) and, if given, started at `start_time`."""
    if not pid:
        return False
    state = _proc_state(pid)
    if state is None:
        return False
    if state in ("Z", "X"):
        reap(pid)
        return False
    return start_time is None or process_start_time(pid) == start_time


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def pids_mentioning(directory) -> list[int]:
    """Live processes (other than this one) whose command line names `directory`."""
    needle = os.path.realpath(os.fspath(directory))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if any(needle in arg for arg in _cmdline(int(entry))):
            found.append(int(entry))
    return found


def cluster_pids(directory) -> list[int]:
    """Live supervisor, coordinator and shard worker processes of `directory`."""
    return [pid for pid in pids_mentioning(directory) if any(m in arg for arg in _cmdline(pid) for m in CLUSTER_MODULES)]


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition") -> float:
    """Poll `predicate` until it is true; return the seconds it took. AssertionError on timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{message} did not happen within {timeout} s")
        time.sleep(interval)


# -- files and shared memory -----------------------------------------------------------------------
def cluster_info(directory) -> dict | None:
    """run/cluster.json of `directory`, or None."""
    try:
        with open(os.path.join(os.fspath(directory), "run", "cluster.json"), "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def supervisor_alive(directory, info: dict | None = None) -> bool:
    info = info if info is not None else cluster_info(directory)
    return info is not None and alive(info["pid"], info.get("start_time"))


def shm_prefix(directory) -> str:
    """'shardkv-<dirhash>': how every /dev/shm entry of `directory` starts (after 'sem.')."""
    return name_prefix(os.fspath(directory))[1:]


def shm_entries(directory) -> list[str]:
    """The /dev/shm entries (shared memory and semaphores) of any cluster of `directory`."""
    prefix = shm_prefix(directory)
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(prefix) or e.startswith("sem." + prefix))


def remove_shm(entries) -> None:
    """Unlink `entries` whoever owns them: not layout.unlink_entry, which leaves another user's
    objects alone, and tests chown some to another uid to play that user."""
    for entry in entries:
        try:
            if entry.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + entry[4:])
            else:
                posix_ipc.unlink_shared_memory("/" + entry)
        except posix_ipc.ExistentialError:
            pass


def nothing_left(directory) -> bool:
    return not cluster_pids(directory) and not shm_entries(directory)


def keys_by_shard(db, per_shard: int, fmt: bytes = b"key-%d") -> dict[int, list[bytes]]:
    """`per_shard` keys (made from `fmt` % i) owned by each shard of `db`."""
    found: dict[int, list[bytes]] = {s: [] for s in range(db.shards)}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        key = fmt % i
        if len(found[db.shard_of(key)]) < per_shard:
            found[db.shard_of(key)].append(key)
        i += 1
    return found


# -- client subprocesses -------------------------------------------------------------------------
class ClientProcess:
    """A Python subprocess running `script` (argv[1:] = args), talking line by line."""

    def __init__(self, script: str, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, put) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def readline(self, timeout: float = 30.0) -> str:
        """The next line of its stdout; AssertionError on timeout or end of output."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"client process {self.pid} wrote nothing within {timeout} s; stderr: {''.join(self.stderr)[-2000:]}") from None
        if line is None:
            self.lines.put(None)
            self.proc.wait(10)
            raise AssertionError(f"client process {self.pid} ended (exit {self.proc.returncode}); stderr: {''.join(self.stderr)[-3000:]}")
        return line

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """Read lines until one starts with `prefix`; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def drain(self) -> list[str]:
        """Every line written so far (after the process ended: all of them)."""
        out = []
        while True:
            try:
                line = self.lines.get(timeout=5 if self.proc.poll() is not None else 0)
            except queue.Empty:
                return out
            if line is None:
                self.lines.put(None)
                return out
            out.append(line)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


# -- the harness -------------------------------------------------------------------------------
class Cluster:
    """One data directory and everything a test opened on it."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.clients: list = []
        self.processes: list[ClientProcess] = []

    def open(self, shards: int | None = SHARDS, **options):
        db = shardkv.open(self.directory, shards=shards, **options)
        self.clients.append(db)
        return db

    def spawn(self, script: str, *args) -> ClientProcess:
        proc = ClientProcess(script, *args)
        self.processes.append(proc)
        return proc

    def info(self) -> dict | None:
        return cluster_info(self.directory)

    def kill_supervisor(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal the running supervisor (if any) and wait for it to exit."""
        info = self.info()
        if supervisor_alive(self.directory, info):
            os.kill(info["pid"], sig)
            wait_until(lambda: not alive(info["pid"], info["start_time"]), timeout, message=f"exit of supervisor {info['pid']}")

    def kill_everything(self) -> None:
        """SIGKILL every process of the directory: a client blocked on it then fails (Unavailable)."""
        for proc in self.processes:
            if proc.proc.poll() is None:
                proc.proc.kill()
        pids = pids_mentioning(self.directory)
        supervisors = [pid for pid in pids if any("supervisor" in arg for arg in _cmdline(pid))]
        for pid in supervisors + [pid for pid in pids if pid not in supervisors]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def watchdog(self, seconds: float, what: str) -> "Watchdog":
        """`with cluster.watchdog(s, "what"):` fails (instead of hanging) if the block takes longer."""
        return Watchdog(self, seconds, what)

    def teardown(self) -> list[str]:
        """Leave nothing behind; return what had to be cleaned up by force."""
        problems = []
        for db in self.clients:
            try:
                db.close()
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                problems.append(f"close() raised {exc!r}")
        for proc in self.processes:
            proc.kill()
        try:
            self.kill_supervisor(signal.SIGTERM, 20.0)
        except AssertionError as exc:
            problems.append(str(exc))
        try:
            wait_until(lambda: not cluster_pids(self.directory), 10.0)
        except AssertionError:
            pass
        for pid in pids_mentioning(self.directory):
            problems.append(f"process {pid} left running: {' '.join(_cmdline(pid))[:200]}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        info = self.info()
        if info is not None:
            reap(info["pid"])
        leftovers = shm_entries(self.directory)
        if leftovers:
            problems.append(f"/dev/shm entries left: {leftovers}")
            remove_shm(leftovers)
        return problems


class Watchdog:
    """Kills the cluster (so that blocked clients raise) if a block runs past its time."""

    def __init__(self, cluster: Cluster, seconds: float, what: str):
        self.cluster, self.seconds, self.what = cluster, seconds, what
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self.cluster.kill_everything()

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.timer.cancel()
        if self.fired:
            raise AssertionError(f"{self.what} did not finish within {self.seconds} s (hung; the watchdog killed the cluster)") from exc


TEST_TIME_LIMIT = 120.0


def cluster_fixture(directory):
    """The body of the `cluster` fixture of the test modules: a Cluster on `directory`, torn
    down afterwards (even if the test failed), with a watchdog against hung tests."""
    harness = Cluster(directory)
    guard = Watchdog(harness, TEST_TIME_LIMIT, "the test")
    guard.timer.start()
    try:
        yield harness
    finally:
        guard.timer.cancel()
        problems = harness.teardown()
    assert not guard.fired, f"the test hung for {TEST_TIME_LIMIT} s: the watchdog killed its cluster"
    assert not problems, f"the test left things behind: {problems}"
