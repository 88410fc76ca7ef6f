"""Process control of a store's cluster, for the `shardkv` command, the benchmarks and the tests:
find a store, start and stop its supervisor, read its health without attaching.

Nothing here imports the client: health is read straight from the control block, so that
`shardkv status` never takes a lease (and never starts a cluster).
"""

from __future__ import annotations

import builtins
import mmap
import os
import signal
import subprocess
import sys
import time

from shardkv.coordinator.manifest import read_manifest, resolve_shards
from shardkv.coordinator.runfiles import (
    EXIT_ALREADY_RUNNING,
    EXIT_BAD_CONFIG,
    SUPERVISOR_LOCK,
    lock_is_held,
    read_cluster_file,
    run_dir,
)
from shardkv.errors import Error, StoreNotFound
from shardkv.ipc.layout import process_start_time

START_TIMEOUT = 120.0  # the supervisor itself gives up after 120 s
STOP_TIMEOUT = 30.0
SUPERVISOR_LOG = "supervisor.stderr"


class NotRunning(Error):
    """No cluster serves the store, and the command does not start one (`shardkv start DIR`)."""


# -- the store --------------------------------------------------------------------------------
def realdir(directory) -> str:
    """`directory` with `~` expanded and links resolved, as every cluster names its directory."""
    return os.path.realpath(os.path.expanduser(os.fspath(directory)))


def find_store(directory, *, damaged: bool = False) -> str:
    """The real path of the store in `directory`; StoreNotFound (a FileNotFoundError) if there
    is none. Creates nothing: a mistyped path is an error, not a new store.

    A store is a directory with a MANIFEST. With `damaged` (verify, salvage), also one whose
    MANIFEST is unreadable or missing but that has shard directories, or a single shard
    directory (segment files); otherwise a damaged MANIFEST raises CorruptionError.
    """
    path = realdir(directory)
    if not os.path.exists(path):
        raise StoreNotFound(f"no shardkv store at {path}: no such directory")
    if not os.path.isdir(path):
        raise StoreNotFound(f"{path} is not a directory (a store is a directory)")
    if not damaged:
        if read_manifest(path) is None:
            raise StoreNotFound(f"no shardkv store in {path} (`shardkv start {path}` creates one)")
        return path
    from shardkv.wal.segment import list_segments  # noqa: PLC0415 (only verify and salvage need it)

    if os.path.exists(os.path.join(path, "MANIFEST")) or list_segments(path):
        return path
    if any(name.startswith("shard-") and os.path.isdir(os.path.join(path, name)) for name in os.listdir(path)):
        return path
    raise StoreNotFound(f"no shardkv store or shard in {path}")


def _lock_path(directory: str) -> str:
    return os.path.join(run_dir(directory), SUPERVISOR_LOCK)


def is_running(directory) -> bool:
    """True if a supervisor holds the lock of `directory` (False for a path that is no directory)."""
    path = realdir(directory)
    return os.path.isdir(path) and lock_is_held(_lock_path(path))


def require_running(directory) -> str:
    """The real path of the store in `directory` if a cluster serves it. StoreNotFound if there
    is no store, NotRunning if no cluster serves it: never starts one."""
    path = find_store(directory)
    if not is_running(path):
        raise NotRunning(f"{path} is not running: start it with `shardkv start {path}`")
    return path


# -- processes --------------------------------------------------------------------------------
def process_running(pid: int, start_time: int) -> bool:
    """True while process `pid` (started at `start_time`) exists and is not a zombie."""
    try:
        with builtins.open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


def supervisor_pid(directory: str) -> int | None:
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


def start_cluster(directory, shards: int | None = None, durability: str = "interval", timeout: float = START_TIMEOUT) -> tuple[str, dict]:
    """Start a (non-embedded) supervisor on `directory` in a session of its own, creating the
    store if there is none; wait until its cluster is ready.

    Returns ("started" | "running", cluster info). Raises ValueError for a configuration the
    supervisor refused (a shard count the store was not created with), CorruptionError for a
    damaged MANIFEST, NotADirectoryError if `directory` is a file, and RuntimeError for any
    other failure to start; a supervisor that did not come up in time is stopped again.
    """
    directory = realdir(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is not a directory (a store is a directory)")
    if is_running(directory):
        return "running", read_cluster_file(directory) or {}
    resolve_shards(directory, shards)  # a clear ValueError (or CorruptionError) before spawning
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
    """SIGTERM the supervisor of `directory` and wait until its lock is released and it has
    exited.

    Returns False if no cluster was running. Raises TimeoutError if it is still up after
    `timeout` seconds.
    """
    directory = realdir(directory)
    if not is_running(directory):
        return False
    lock = _lock_path(directory)
    deadline = time.monotonic() + timeout
    signalled = None  # (pid, start time) of the supervisor sent SIGTERM
    while lock_is_held(lock):
        if signalled is None:
            pid = supervisor_pid(directory)
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
    while signalled is not None and process_running(*signalled) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def read_health(directory) -> dict | None:
    """health() of the cluster running on `directory`, read from its control block without
    taking a client lease (and never starting a cluster); None if no cluster is running."""
    import posix_ipc  # noqa: PLC0415

    from shardkv.ipc.layout import ControlBlock  # noqa: PLC0415
    from shardkv.ops.status import health_from_control  # noqa: PLC0415

    directory = realdir(directory)
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


__all__ = [
    "NotRunning", "STOP_TIMEOUT", "START_TIMEOUT", "find_store", "is_running", "process_running", "read_health",
    "realdir", "require_running", "start_cluster", "stop_cluster", "supervisor_pid",
]  # fmt: skip
