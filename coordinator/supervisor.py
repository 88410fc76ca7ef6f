"""The supervisor: creates a cluster's shared memory, starts the coordinator and the shard
workers, restarts any that die (with backoff), and takes everything down again.

`python -m shardkv.coordinator.supervisor DIR [--shards N] [--durability D] [--embedded]`.
One per data directory (flock on run/supervisor.lock). An embedded supervisor (started by
`shardkv.open()`) stops by itself a few seconds after its last client is gone.

Unless --foreground, it detaches once it holds the directory, and the process that started it
exits only when the cluster is ready (0) or could not start (EXIT_START_FAILED, the reason on
stderr), so that whoever started it learns the outcome once (docs/IPC.md, "Starting").
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import re
import secrets
import signal
import subprocess
import sys
import time

import numpy as np
import posix_ipc
import setproctitle

from shardkv import faults
from shardkv.coordinator.manifest import resolve_shards, write_manifest
from shardkv.coordinator.runfiles import (  # noqa: F401 (re-exported for callers of this module)
    CLUSTER_FILE,
    CONFIG_PREFIX,
    EXIT_ALREADY_RUNNING,
    EXIT_BAD_CONFIG,
    EXIT_START_FAILED,
    RUN_DIR,
    SUPERVISOR_LOCK,
    attach_lock_path,
    count_held,
    lease_path,
    read_cluster_file,
    run_dir,
    write_config,
)
from shardkv.errors import CorruptionError
from shardkv.ipc.layout import (
    DEFAULT_LEASES,
    DEFAULT_SLOT_SIZE,
    PROC_DOWN,
    PROC_QUARANTINED,
    PROC_RESTARTING,
    PROC_STARTING,
    PROC_UP,
    CTL_HEADER,
    PROC_DTYPE,
    READY,
    STARTING,
    STOPPING,
    ControlBlock,
    control_size,
    default_shard_map,
    is_own_entry,
    join_cluster,
    map_shared_memory,
    name_prefix,
    names,
    process_start_time,
    shm_entries_with_prefix,
    unlink_entry,
    worker_ring_slots,
)
from shardkv.ipc.sharedindex import HEADER_SIZE, create_header, mark_not_serving, unlink_tables
from shardkv.ipc.viewlayout import unlink_views
from shardkv.coordinator.membership import EXIT_CORRUPT
from shardkv.log import configure_service_logging, get_logger
from shardkv.wal import fileio
from shardkv.wal.writer import check_durability

# An embedded cluster stops this long after its last client is gone (SHARDKV_IDLE_TIMEOUT: for
# tests that need many idle stops).
IDLE_TIMEOUT = float(os.environ.get("SHARDKV_IDLE_TIMEOUT", "3.0"))
FIRST_CLIENT_TIMEOUT = 30.0  # ... or this long after starting if no client ever came
MAX_BACKOFF = 5.0
DEFAULT_MAX_MESSAGE = 512 * 1024 * 1024
CREATE_TRIES = 8  # cluster names tried before a start gives up (a name taken: docs/IPC.md)
REPAIR_LOG_INTERVAL = 5.0  # seconds between two log lines about repaired control-block words
# The process-table fields the supervisor owns and republishes (`state` also changes from
# starting to up by the process itself; `requests` belongs to the process).
OWNED_PROC_FIELDS = ("pid", "state", "generation", "restarts", "started_at")


class StartError(Exception):
    """The cluster cannot start (reported once to whoever started the supervisor)."""


def remove_leftovers(directory: str, old: dict | None) -> tuple[list[str], dict[str, str]]:
    """Kill processes and unlink shared objects left by a killed cluster of `directory`
    (`old`: its cluster.json), and its configuration files. The caller holds the supervisor
    lock, so no live cluster owns them. Only this user's objects are touched: an object of
    another user under the directory's (predictable) prefix is left alone, and an unlink that
    fails is skipped, never fatal. Returns (removed, {entry: why it was left})."""
    removed, left = [], {}
    for pid, start_time in (old or {}).get("children", []):
        if pid and process_start_time(pid) == start_time:
            try:
                os.kill(pid, signal.SIGKILL)
                removed.append(f"pid {pid}")
            except ProcessLookupError:
                pass
    for entry in shm_entries_with_prefix(name_prefix(directory)):
        if re.search(r"-idx\d+$", entry) and is_own_entry(entry):
            _stop_readers("/" + entry)
        why = unlink_entry(entry)
        if why is None:
            removed.append(entry)
        else:
            left[entry] = why
    try:
        configs = [name for name in os.listdir(run_dir(directory)) if name.startswith(CONFIG_PREFIX)]
    except FileNotFoundError:
        configs = []
    for name in configs:
        fileio.unlink(run_dir(directory), name)
        removed.append(os.path.join(RUN_DIR, name))
    return removed, left


def reclaim(directory: str) -> list[str] | None:
    """What `shardkv stop` does on a directory with no cluster: remove a killed cluster's
    leftovers (remove_leftovers) and its cluster.json, holding the supervisor lock so that no
    supervisor starts meanwhile. Returns what was removed, or None if a supervisor holds the
    directory (it removes them itself)."""
    directory = os.path.realpath(directory)
    try:
        fd = os.open(os.path.join(run_dir(directory), SUPERVISOR_LOCK), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
        removed, _ = remove_leftovers(directory, read_cluster_file(directory))
        if os.path.isdir(run_dir(directory)):
            fileio.unlink(run_dir(directory), CLUSTER_FILE)
        return removed
    finally:
        if fd is not None:
            os.close(fd)


def _stop_readers(name: str) -> None:
    """Clients of a killed cluster may still read its shared index: send them to the ring
    (where they learn that the cluster is gone) before the new cluster writes anything."""
    try:
        shm = posix_ipc.SharedMemory(name)
        try:
            if shm.size >= HEADER_SIZE:
                with mmap.mmap(shm.fd, shm.size) as buf:
                    mark_not_serving(buf)
        finally:
            shm.close_fd()
    except (posix_ipc.Error, OSError, ValueError):
        pass


class Supervisor:
    """Runs one cluster; see the module docstring."""

    def __init__(self, directory: str, shards: int | None, durability: str, embedded: bool, leases: int = DEFAULT_LEASES, slot_size: int = DEFAULT_SLOT_SIZE, compaction: dict | None = None):
        self.directory = os.path.realpath(directory)
        self.durability = durability
        self.embedded = embedded
        self.leases = leases
        self.slot_size = slot_size
        self.requested_shards = shards
        self.compaction = compaction or {}
        self.children: list[subprocess.Popen | None] = []
        self.restart_at: list[float] = []
        self.backoff: list[float] = []
        self.stopping = False
        self.objects: list = []
        self.index_headers: list = []  # read-write mappings of the workers' index headers
        self.control: ControlBlock | None = None
        # What this supervisor publishes in the control block, kept here: any process of the
        # owner can write the block, so the published copy is checked against it (_check_control).
        self.state = STARTING
        self.procs = None  # private process table (PROC_DTYPE)
        self.header = b""  # the header as written, for its constant words
        self.shard_map = None
        self.member_fd = -1  # shared flock on the control block (layout.join_cluster)
        self.config_path: str | None = None
        self.repairs = 0  # control-block words repaired since the last log line
        self.repair_logged_at = 0.0
        self.log = get_logger("shardkv.supervisor", directory=self.directory)

    # -- start -----------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the directory's supervisor lock; False if another supervisor holds it."""
        fileio.make_dir(self.directory)
        fileio.make_dir(run_dir(self.directory))
        self.lock_fd = os.open(os.path.join(run_dir(self.directory), SUPERVISOR_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            return False
        # A killed predecessor's description must not lure clients while this cluster starts;
        # its pids and names are kept for remove_leftovers().
        self.previous = read_cluster_file(self.directory)
        fileio.unlink(run_dir(self.directory), CLUSTER_FILE)
        return True

    def start(self) -> None:
        """Create the shared objects and start every process; return when all serve."""
        self.shards, exists = resolve_shards(self.directory, self.requested_shards)
        if not exists:
            write_manifest(self.directory, self.shards)
        removed, left = remove_leftovers(self.directory, self.previous)
        if removed:
            self.log.warning("removed leftovers of a killed cluster", removed=removed)
        if left:
            self.log.warning("left objects under this directory's prefix alone", left=left)
        for path in [lease_path(self.directory, lease) for lease in range(self.leases)] + [attach_lock_path(self.directory)]:
            if not os.path.exists(path):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._create_objects()
        self.member_fd = join_cluster(self.names["control"])
        self.config = {
            "directory": self.directory,
            "cluster": self.cluster,
            "shards": self.shards,
            "leases": self.leases,
            "slot_size": self.slot_size,
            "durability": self.durability,
            "names": self.names,
            "supervisor_pid": os.getpid(),
            "max_message": DEFAULT_MAX_MESSAGE,
            "log_dir": os.path.join(self.directory, "logs"),
            **self.compaction,
        }
        # The configuration goes to the children in an owner-only file, not on their command
        # lines (which every user can read with ps).
        self.config_path = write_config(self.directory, self.cluster, self.config)
        self.children = [None] * (self.shards + 1)
        self.restart_at = [0.0] * (self.shards + 1)
        self.backoff = [0.1] * (self.shards + 1)
        for index in range(self.shards + 1):
            self._spawn(index)
        self._write_cluster_file()
        deadline = time.monotonic() + 120
        while True:
            # Ready once every process serves or is quarantined (a corrupt shard must not keep
            # the others from serving; the coordinator must have published the shard map).
            self._check_control()
            states = self.procs["state"]
            if all((states == PROC_UP) | (states == PROC_QUARANTINED)):
                break
            if self.stopping:
                return  # asked to stop while starting: main() tears down
            self._reap()
            if time.monotonic() > deadline:
                raise StartError("the cluster did not come up within 120 s (see the logs in DIR/logs)")
            time.sleep(0.01)
        self._set_state(READY)
        self._write_cluster_file()
        self.log.info("cluster ready", shards=self.shards, cluster=self.cluster, pid=os.getpid())

    def _create_objects(self) -> None:
        """Create every shared object of a new cluster under a fresh random name. A name that
        exists already (anyone can list /dev/shm and make one) means another name: what was
        created is unlinked and the next try starts over; StartError after CREATE_TRIES."""
        for _ in range(CREATE_TRIES):
            self.cluster = secrets.token_hex(8)
            self.names = names(self.directory, self.cluster, self.shards, self.leases)
            try:
                self._create_named_objects()
                return
            except posix_ipc.ExistentialError as exc:
                self.log.warning("a name of the new cluster exists already; trying another name", cluster=self.cluster, error=str(exc))
                self._unlink_objects()
        raise StartError(f"every one of {CREATE_TRIES} names tried for the cluster's shared memory existed already in /dev/shm")

    def _create_named_objects(self) -> None:
        control = self._create_memory(self.names["control"], control_size(self.shards, self.leases))
        ControlBlock.write_header(control, self.shards, self.leases, self.slot_size, os.getpid())
        self.header = bytes(control[: CTL_HEADER.size])
        self.control = ControlBlock(control, self.shards, self.leases)
        # The coordinator publishes this same map when it starts; written now, clients and the
        # check in _check_control see the right map from the first moment.
        self.shard_map = default_shard_map(self.shards)
        self.control.shard_map[:] = self.shard_map
        self.procs = np.zeros(self.shards + 1, dtype=PROC_DTYPE)
        self.state = STARTING
        for name in self.names["rings"]:
            self._create_memory(name, worker_ring_slots(self.leases) * self.slot_size)
        self._create_memory(self.names["coord_ring"], self.leases * self.slot_size)
        for name in self.names["index"]:
            self.index_headers.append(create_header(name))
            self.objects.append(("shm", name, self.index_headers[-1]))
        for name in self.names["wake"] + self.names["done"] + [self.names["coord_wake"], self.names["coord_done"]]:
            self.objects.append(("sem", name, posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)))

    def _create_memory(self, name: str, size: int):
        buf = map_shared_memory(name, create_size=size)
        self.objects.append(("shm", name, buf))
        return buf

    def _spawn(self, index: int) -> None:
        module = "shardkv.coordinator.coordinator" if index == 0 else "shardkv.shards.worker"
        entry = self.procs[index]
        entry["state"] = PROC_STARTING
        entry["generation"] += 1
        role = "coordinator" if index == 0 else f"shard-{index - 1:03d}"
        env = dict(os.environ, SHARDKV_ROLE=role)
        command = [sys.executable, "-m", module, self.config_path] + ([str(index - 1)] if index else [])
        self.children[index] = subprocess.Popen(command, close_fds=True, env=env, stdin=subprocess.DEVNULL)
        entry["pid"] = self.children[index].pid
        entry["started_at"] = time.time()
        self._publish_proc(index)

    def _publish_proc(self, index: int) -> None:
        """Write this supervisor's fields of process-table entry `index` into the control block."""
        entry, mine = self.control.procs[index], self.procs[index]
        for field in OWNED_PROC_FIELDS:
            entry[field] = mine[field]

    def _set_state(self, state: int) -> None:
        self.state = state
        self.control.state = state

    def _check_control(self) -> None:
        """Put back whatever differs in the control block from what this supervisor published:
        a stray write by any process of the owner must not stop, misroute or hide the cluster
        (docs/IPC.md, "Who writes what"). About 20 microseconds."""
        control = self.control
        buf = control.buf
        repaired = []
        for start, end in ((0, 16), (24, 32)):  # magic ... hash_slots; slot_size, supervisor_pid
            if buf[start:end] != self.header[start:end]:
                buf[start:end] = self.header[start:end]
                repaired.append(f"header[{start}:{end}]")
        if control.state != self.state:
            control.state = self.state
            repaired.append("state")
        if not np.array_equal(control.shard_map, self.shard_map):
            control.shard_map[:] = self.shard_map
            repaired.append("shard map")
        table = control.procs
        for field in OWNED_PROC_FIELDS:
            published, mine = table[field], self.procs[field]
            for index in np.flatnonzero(published != mine).tolist():
                # Entry by entry: a whole column written back could undo a process's own "up".
                if field == "state" and mine[index] == PROC_STARTING:
                    # While a process starts, the word is its own: it writes "up" once it serves.
                    if published[index] == PROC_UP:
                        mine[index] = PROC_UP
                    continue
                published[index] = mine[index]
                repaired.append(f"process {index} {field}")
        if repaired:
            self.repairs += 1
            now = time.monotonic()
            if now - self.repair_logged_at >= REPAIR_LOG_INTERVAL:
                self.log.warning("repaired the control block: something else wrote it", words=repaired, repairs=self.repairs)
                self.repair_logged_at, self.repairs = now, 0

    def _write_cluster_file(self) -> None:
        children = [[p.pid, process_start_time(p.pid)] for p in self.children if p is not None]
        info = {
            "cluster": self.cluster,
            "names": self.names,
            "shards": self.shards,
            "leases": self.leases,
            "slot_size": self.slot_size,
            "durability": self.durability,
            "embedded": self.embedded,
            "pid": os.getpid(),
            "start_time": process_start_time(os.getpid()),
            "children": children,
            "ready": self.state == READY,
        }
        fileio.write_file_atomically(run_dir(self.directory), CLUSTER_FILE, json.dumps(info).encode())

    # -- watching --------------------------------------------------------------------------
    def _reap(self) -> None:
        """Notice children that exited and schedule their restart (or quarantine)."""
        now = time.monotonic()
        changed = False
        for index, child in enumerate(self.children):
            entry = self.procs[index]
            if child is not None:
                code = child.poll()
                if code is None:
                    if entry["state"] == PROC_UP and now - self.restart_at[index] > 30:
                        self.backoff[index] = 0.1  # it has been up a while: forget old failures
                    continue
                self.children[index] = None
                entry["pid"] = 0
                if index > 0:
                    # Clients stop reading the dead worker's index; its tables go (the next
                    # worker publishes fresh ones).
                    mark_not_serving(self.index_headers[index - 1])
                    unlink_tables(self.names["prefix"], index - 1)
                    unlink_views(self.names["prefix"], index - 1)
                if self.stopping:
                    entry["state"] = PROC_DOWN
                    self._publish_proc(index)
                    continue
                reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                if code == EXIT_CORRUPT:
                    entry["state"] = PROC_QUARANTINED
                    self._publish_proc(index)
                    self.log.error("shard quarantined", process=index, reason=reason)
                    continue
                entry["state"] = PROC_RESTARTING
                self._publish_proc(index)
                self.restart_at[index] = now + self.backoff[index]
                self.log.warning("process died; restarting", process=index, reason=reason, backoff=self.backoff[index])
                self.backoff[index] = min(MAX_BACKOFF, self.backoff[index] * 2)
            elif entry["state"] == PROC_RESTARTING and now >= self.restart_at[index] and not self.stopping:
                entry["restarts"] += 1
                self._spawn(index)
                self.restart_at[index] = now
                changed = True
        if changed:
            self._write_cluster_file()

    def live_leases(self) -> int:
        """How many client leases are held right now."""
        return count_held([lease_path(self.directory, lease) for lease in range(self.leases)])

    def run(self) -> None:
        """Watch the children until asked to stop (or, embedded, until idle)."""
        idle_since = time.monotonic()
        next_lease_check = 0.0
        lease_check_interval = min(0.5, IDLE_TIMEOUT / 4)
        seen_client = False
        attaches = 0  # the control block's attach counter at the last check
        while not self.stopping:
            self._reap()
            self._check_control()
            now = time.monotonic()
            if self.embedded and now >= next_lease_check:
                next_lease_check = now + lease_check_interval
                # A client that attached and closed between two checks holds no lease now, but
                # it bumped the counter: it counts as seen at this check, the first client or
                # any later one (a shell loop of short commands keeps the cluster up). Read
                # before the leases, so that a client between the two reads shows in one.
                counted = self.control.attaches
                attached, attaches = counted != attaches, counted
                if attached or self.live_leases():
                    idle_since = now
                    seen_client = True
                elif now - idle_since > (IDLE_TIMEOUT if seen_client else FIRST_CLIENT_TIMEOUT):
                    if self._stop_if_idle():
                        self.log.info("no clients left; stopping")
                        break
                    idle_since, seen_client = now, True  # a client is attaching
            time.sleep(0.05)

    def _stop_if_idle(self) -> bool:
        """Decide to stop, unless a client attaches meanwhile: with run/attach.lock exclusive
        (clients take it shared while they check the state and take a lease), check the leases
        once more, then remove cluster.json and publish STOPPING. A client that attaches after
        this sees STOPPING and goes on to the next cluster (docs/IPC.md, "Leases")."""
        fd = os.open(attach_lock_path(self.directory), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a client is attaching right now
            if self.live_leases():
                return False
            fileio.unlink(run_dir(self.directory), CLUSTER_FILE)
            self._set_state(STOPPING)
            return True
        finally:
            os.close(fd)

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL), unlink every shared object."""
        self.stopping = True
        if self.control is not None:
            self._set_state(STOPPING)
        for kind, name, obj in self.objects:
            if kind == "sem" and "-wake" in name:
                obj.release()
        for child in self.children:
            if child is not None:
                child.terminate()
        deadline = time.monotonic() + 15
        for child in self.children:
            if child is not None:
                try:
                    child.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        self._unlink_objects()
        if self.config_path is not None:
            fileio.unlink(run_dir(self.directory), os.path.basename(self.config_path))
        fileio.unlink(run_dir(self.directory), CLUSTER_FILE)
        if self.member_fd >= 0:
            os.close(self.member_fd)
            self.member_fd = -1
        self.log.info("stopped")
        os.close(self.lock_fd)

    def _unlink_objects(self) -> None:
        """Unlink and unmap every object this supervisor created (and the workers' tables)."""
        self.control = None
        for shard, header in enumerate(self.index_headers):
            mark_not_serving(header)  # a worker killed above could not say so itself
            unlink_tables(self.names["prefix"], shard)
            unlink_views(self.names["prefix"], shard)
        self.index_headers = []
        for kind, name, obj in self.objects:
            try:
                if kind == "shm":
                    posix_ipc.unlink_shared_memory(name)
                    try:
                        obj.close()
                    except BufferError:
                        pass
                else:
                    obj.unlink()
                    obj.close()
            except posix_ipc.ExistentialError:
                pass
        self.objects = []


def _report(fd: int | None, message: str) -> None:
    """Tell the process that started this supervisor how the start went (one line), once."""
    if fd is None:
        return
    try:
        os.write(fd, message.encode("utf-8", "replace")[:4000] + b"\n")
    except OSError:
        pass  # it is gone: nobody to tell
    finally:
        os.close(fd)


def _wait_for_report(fd: int, directory: str) -> int:
    """The parent of a detaching supervisor: wait for the child's report; the exit code."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
    line = b"".join(chunks).decode("utf-8", "replace").strip()
    kind, _, message = line.partition(" ")
    if kind == "ready":
        return 0
    if kind == "bad-config":
        print(f"shardkv: {message}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if kind == "error":
        print(f"shardkv: the cluster on {directory} could not start: {message}", file=sys.stderr)
    else:
        print(f"shardkv: the supervisor of {directory} ended before the cluster was ready (see {os.path.join(directory, 'logs')})", file=sys.stderr)
    return EXIT_START_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the supervisor process."""
    parser = argparse.ArgumentParser(prog="shardkv-supervisor")
    parser.add_argument("directory")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--durability", default="interval")
    parser.add_argument("--embedded", action="store_true", help="stop a few seconds after the last client is gone")
    parser.add_argument("--foreground", action="store_true", help="do not detach (default: detach once the directory is locked)")
    parser.add_argument("--compact-threshold", type=float, default=0.5, help="garbage ratio at which a shard compacts itself")
    parser.add_argument("--compact-min-bytes", type=int, default=64 << 20, help="smallest log worth compacting automatically")
    parser.add_argument("--compact-check-interval", type=float, default=10.0, help="seconds between a worker's garbage checks")
    args = parser.parse_args(argv)
    compaction = {"compact_threshold": args.compact_threshold, "compact_min_bytes": args.compact_min_bytes, "compact_check_interval": args.compact_check_interval}
    supervisor = Supervisor(args.directory, args.shards, args.durability, args.embedded, compaction=compaction)
    if not supervisor.acquire():
        print(f"a cluster is already running on {supervisor.directory}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    try:
        check_durability(args.durability)
        resolve_shards(supervisor.directory, args.shards)
    except (ValueError, CorruptionError) as exc:
        print(f"shardkv: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    report = None
    if not args.foreground:
        # The parent waits for the child's report and exits with it; the child (which keeps the
        # directory lock) is reparented to init, so no caller is left with a zombie to reap.
        read_end, report = os.pipe()
        if os.fork() > 0:
            os.close(report)
            sys.stderr.flush()
            code = _wait_for_report(read_end, supervisor.directory)
            sys.stderr.flush()
            os._exit(code)
        os.close(read_end)
    faults.set_role("supervisor")
    setproctitle.setproctitle(f"shardkv: supervisor of {supervisor.directory}")
    configure_service_logging(os.path.join(supervisor.directory, "logs"), "supervisor", terminal=args.foreground)

    def request_stop(signum, frame):
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    failure = "error the supervisor failed while starting the cluster"  # reported if start() does not return
    try:
        try:
            supervisor.start()
            if supervisor.stopping:
                failure = "error it was asked to stop before the cluster was ready"
                return 0
        except (ValueError, CorruptionError) as exc:
            print(f"shardkv: {exc}", file=sys.stderr)
            failure = f"bad-config {exc}"
            return EXIT_BAD_CONFIG
        except Exception as exc:  # a start that cannot succeed: said once, not retried here
            supervisor.log.error("the cluster could not start", error=repr(exc))
            print(f"shardkv: the cluster could not start: {exc}", file=sys.stderr)
            failure = f"error {exc}"
            return EXIT_START_FAILED
        _report(report, "ready")
        report = None
        supervisor.run()
    finally:
        supervisor.stop()
        # A failure is reported once everything of this start is gone: whoever started it may
        # try again at once.
        _report(report, failure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
