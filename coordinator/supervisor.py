"""The supervisor: creates a cluster's shared memory, starts the coordinator and the shard
workers, restarts any that die (with backoff), and takes everything down again.

`python -m shardkv.coordinator.supervisor DIR [--shards N] [--durability D] [--embedded]`.
One per data directory (flock on run/supervisor.lock). An embedded supervisor (started by
`shardkv.open()`) stops by itself a few seconds after its last client is gone.
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

import posix_ipc

from shardkv.coordinator.manifest import resolve_shards, write_manifest
from shardkv.coordinator.runfiles import (  # noqa: F401 (re-exported for callers of this module)
    CLUSTER_FILE,
    EXIT_ALREADY_RUNNING,
    EXIT_BAD_CONFIG,
    RUN_DIR,
    SUPERVISOR_LOCK,
    count_held,
    lease_path,
    lock_is_held,
    read_cluster_file,
    run_dir,
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
    READY,
    STOPPING,
    ControlBlock,
    control_size,
    map_shared_memory,
    name_prefix,
    names,
    process_start_time,
    worker_ring_slots,
)
from shardkv.ipc.sharedindex import HEADER_SIZE, create_header, mark_not_serving, unlink_tables
from shardkv.ipc.sortedview import unlink_views
from shardkv.log import configure_service_logging, get_logger
from shardkv.wal import fileio
from shardkv.wal.writer import check_durability

EXIT_CORRUPT = 65
IDLE_TIMEOUT = 3.0  # an embedded cluster stops this long after its last client is gone
FIRST_CLIENT_TIMEOUT = 30.0  # ... or this long after starting if no client ever came
MAX_BACKOFF = 5.0
DEFAULT_MAX_MESSAGE = 512 * 1024 * 1024


def remove_leftovers(directory: str, old: dict | None) -> list[str]:
    """Kill processes and unlink shared objects left by a killed cluster of `directory`
    (`old`: its cluster.json). The caller holds the supervisor lock, so no live cluster owns them.
    """
    removed = []
    for pid, start_time in (old or {}).get("children", []):
        if pid and process_start_time(pid) == start_time:
            try:
                os.kill(pid, signal.SIGKILL)
                removed.append(f"pid {pid}")
            except ProcessLookupError:
                pass
    prefix = name_prefix(directory)[1:]
    for entry in os.listdir("/dev/shm"):
        try:
            if entry.startswith(prefix):
                if re.search(r"-idx\d+$", entry):
                    _stop_readers("/" + entry)
                posix_ipc.unlink_shared_memory("/" + entry)
                removed.append(entry)
            elif entry.startswith("sem." + prefix):
                posix_ipc.unlink_semaphore("/" + entry[4:])
                removed.append(entry)
        except posix_ipc.ExistentialError:
            pass
    return removed


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
        leftovers = remove_leftovers(self.directory, self.previous)
        if leftovers:
            self.log.warning("removed leftovers of a killed cluster", removed=leftovers)
        for lease in range(self.leases):
            path = lease_path(self.directory, lease)
            if not os.path.exists(path):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self.cluster = secrets.token_hex(4)
        self.names = names(self.directory, self.cluster, self.shards, self.leases)
        control = self._create_memory(self.names["control"], control_size(self.shards, self.leases))
        ControlBlock.write_header(control, self.shards, self.leases, self.slot_size, os.getpid())
        self.control = ControlBlock(control, self.shards, self.leases)
        for name in self.names["rings"]:
            self._create_memory(name, worker_ring_slots(self.leases) * self.slot_size)
        self._create_memory(self.names["coord_ring"], self.leases * self.slot_size)
        for name in self.names["index"]:
            self.index_headers.append(create_header(name))
            self.objects.append(("shm", name, self.index_headers[-1]))
        for name in self.names["wake"] + self.names["done"] + [self.names["coord_wake"], self.names["coord_done"]]:
            self.objects.append(("sem", name, posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)))
        self.config = {
            "directory": self.directory,
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
            states = self.control.procs["state"]
            if all((states == PROC_UP) | (states == PROC_QUARANTINED)):
                break
            if self.stopping:
                return  # asked to stop while starting: main() tears down
            self._reap()
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not come up within 120 s")
            time.sleep(0.01)
        self.control.state = READY
        self._write_cluster_file()
        self.log.info("cluster ready", shards=self.shards, cluster=self.cluster, pid=os.getpid())

    def _create_memory(self, name: str, size: int):
        buf = map_shared_memory(name, create_size=size)
        self.objects.append(("shm", name, buf))
        return buf

    def _spawn(self, index: int) -> None:
        module = "shardkv.coordinator.coordinator" if index == 0 else "shardkv.shards.worker"
        config = dict(self.config, shard=index - 1)
        entry = self.control.procs[index]
        entry["state"] = PROC_STARTING
        entry["generation"] += 1
        role = "coordinator" if index == 0 else f"shard-{index - 1:03d}"
        env = dict(os.environ, SHARDKV_ROLE=role)
        self.children[index] = subprocess.Popen([sys.executable, "-m", module, json.dumps(config)], close_fds=True, env=env, stdin=subprocess.DEVNULL)
        entry["pid"] = self.children[index].pid
        entry["started_at"] = time.time()

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
            "ready": self.control.state == READY,
        }
        fileio.write_file_atomically(run_dir(self.directory), CLUSTER_FILE, json.dumps(info).encode())

    # -- watching --------------------------------------------------------------------------
    def _reap(self) -> None:
        """Notice children that exited and schedule their restart (or quarantine)."""
        now = time.monotonic()
        changed = False
        for index, child in enumerate(self.children):
            entry = self.control.procs[index]
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
                    continue
                reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                if code == EXIT_CORRUPT:
                    entry["state"] = PROC_QUARANTINED
                    self.log.error("shard quarantined", process=index, reason=reason)
                    continue
                entry["state"] = PROC_RESTARTING
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
        seen_client = False
        while not self.stopping:
            self._reap()
            now = time.monotonic()
            if self.embedded and now >= next_lease_check:
                next_lease_check = now + 0.5
                if self.live_leases():
                    idle_since = now
                    seen_client = True
                elif not seen_client and self.control.attaches:
                    seen_client = True  # a client came and went between two checks
                    idle_since = now
                elif now - idle_since > (IDLE_TIMEOUT if seen_client else FIRST_CLIENT_TIMEOUT):
                    self.log.info("no clients left; stopping")
                    break
            time.sleep(0.05)

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL), unlink every shared object."""
        self.stopping = True
        if hasattr(self, "control"):
            self.control.state = STOPPING
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
        fileio.unlink(run_dir(self.directory), CLUSTER_FILE)
        self.log.info("stopped")
        os.close(self.lock_fd)


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
    if not args.foreground and os.fork() > 0:
        # The parent reports success to whoever started it and exits; the child (which keeps the
        # directory lock) is reparented to init, so no caller is left with a zombie to reap.
        os._exit(0)
    configure_service_logging(os.path.join(supervisor.directory, "logs"), "supervisor", terminal=args.foreground)

    def request_stop(signum, frame):
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        try:
            supervisor.start()
            if supervisor.stopping:
                return 0
        except (ValueError, CorruptionError) as exc:
            print(f"shardkv: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        supervisor.run()
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
