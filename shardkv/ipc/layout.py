"""Constants and views of the shared memory described in docs/IPC.md."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
import time

import posix_ipc

import numpy as np
from crc32c import crc32c

from shardkv.ipc.sharedindex import header_name

VERSION = 7  # 7: a run object's `rewrites` (readers trust a run checked whole while it stays); 6: ordered views (index header `view`, SCAN pages carry the batch history); 5: a lease's `reading` is a deadline, not a flag; 4: COORDINATOR_SLOTS slots per worker ring
HASH_SLOTS = 4096
DEFAULT_LEASES = 128
DEFAULT_SLOT_SIZE = 128 * 1024
COORDINATOR_SLOTS = 8  # a worker ring's slots for the coordinator: cross-shard batches run at once

CTL_MAGIC = b"SHKVCTL\n"
CTL_HEADER = struct.Struct("<8sHHHHIIIII4xQQ8x")  # magic, version, shards, leases, hash_slots, state, map_version, slot_size, supervisor_pid, attaches, commits_started, commits_finished
CTL_STATE = struct.Struct("<I")
CTL_STATE_OFFSET = 16
CTL_MAP_VERSION_OFFSET = 20
CTL_ATTACHES_OFFSET = 32
CTL_COMMIT_COUNTER = struct.Struct("<Q")
CTL_COMMITS_STARTED_OFFSET = 40
CTL_COMMITS_FINISHED_OFFSET = 48
STARTING, READY, STOPPING = 0, 1, 2

PROC_DTYPE = np.dtype([("pid", "<u4"), ("state", "<u4"), ("generation", "<u4"), ("restarts", "<u4"), ("started_at", "<f8"), ("requests", "<u8")])
PROC_DOWN, PROC_STARTING, PROC_UP, PROC_RESTARTING, PROC_QUARANTINED = 0, 1, 2, 3, 4
PROC_STATE_NAMES = {0: "down", 1: "starting", 2: "up", 3: "restarting", 4: "quarantined"}
LEASE_DTYPE = np.dtype([("pid", "<u4"), ("reading", "<u4"), ("start_time", "<u8")])
# A lease's `reading` (docs/TRANSACTIONS.md, "Isolation"): 0, or the instant until which the
# client asks commit phases to wait for its multi-key read, in CLOCK_MONOTONIC milliseconds
# modulo 2**32 (one clock for every process of the machine). While it fetches, a read asks for
# READING_HOLD; between the pages of a scan only for READING_GRACE, so that an iterator held
# but not read stalls no writer for longer.
READING_HOLD = 5.0
READING_GRACE = 0.1


def reading_until(seconds: float) -> int:
    """The `reading` word for "wait for me until `seconds` from now" (never 0)."""
    return (time.monotonic_ns() // 1_000_000 + int(seconds * 1000)) & 0xFFFFFFFF or 1


def readers_waited_for(reading: np.ndarray) -> np.ndarray:
    """The mask of leases whose `reading` deadline is still ahead (wrap-around safe). A deadline
    further ahead than a client ever sets (READING_HOLD) is a stray write, not waited for."""
    now = np.uint32(time.monotonic_ns() // 1_000_000 & 0xFFFFFFFF)
    return (reading != 0) & ((reading - now) <= np.uint32(int(READING_HOLD * 1000) + 1000))

SLOT_HEADER_SIZE = 64
SLOT_STATE = struct.Struct("<I")
SLOT_FIELDS = struct.Struct("<IQIIQ")  # at offset 4: flags, request_id, frame_len, reserved, total_len
SLOT_EMPTY, SLOT_REQUEST, SLOT_RESPONSE = 0, 1, 2
FLAG_MORE = 1


def map_shared_memory(name: str, create_size: int | None = None) -> mmap.mmap:
    """Map the shared-memory object `name` read-write; with `create_size`, create it first
    (owner-only, failing if it exists)."""
    if create_size is None:
        shm = posix_ipc.SharedMemory(name)
    else:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=create_size)
    try:
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()


def key_slot(key: bytes) -> int:
    """The hash slot of `key`: the top 12 bits of its CRC-32C (stable across processes)."""
    return crc32c(key) >> 20


def control_size(shards: int, leases: int) -> int:
    """Bytes of the control block for `shards` workers and `leases` leases."""
    return CTL_HEADER.size + 2 * HASH_SLOTS + PROC_DTYPE.itemsize * (shards + 1) + LEASE_DTYPE.itemsize * leases


def names(directory: str, cluster: str, shards: int, leases: int) -> dict:
    """The POSIX names of every shared object of a cluster (see docs/IPC.md, "Names")."""
    prefix = f"{name_prefix(directory)}-{cluster}"
    return {
        "prefix": prefix,
        "control": f"{prefix}-ctl",
        "rings": [f"{prefix}-ring{s}" for s in range(shards)],
        "wake": [f"{prefix}-wake{s}" for s in range(shards)],
        "done": [f"{prefix}-done{lease}" for lease in range(leases)],
        "coord_ring": f"{prefix}-ringc",
        "coord_wake": f"{prefix}-wakec",
        "coord_done": f"{prefix}-donec",
        "index": [header_name(prefix, s) for s in range(shards)],
    }


def default_shard_map(shards: int) -> np.ndarray:
    """The shard map of a cluster of `shards` workers: slot h -> shard h mod `shards` (what the
    coordinator publishes, and the supervisor checks the published map against)."""
    return (np.arange(HASH_SLOTS) % shards).astype("<u2")


def name_prefix(directory: str) -> str:
    """'/shardkv-<dirhash>': the part of every name shared by all clusters of `directory`."""
    digest = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:12]
    return f"/shardkv-{digest}"


class ControlBlock:
    """Views of the control block in `buf` (a shared mmap)."""

    def __init__(self, buf, shards: int, leases: int):
        self.buf = buf
        offset = CTL_HEADER.size
        self.shard_map = np.frombuffer(buf, dtype="<u2", count=HASH_SLOTS, offset=offset)
        offset += 2 * HASH_SLOTS
        self.procs_offset = offset
        self.procs = np.frombuffer(buf, dtype=PROC_DTYPE, count=shards + 1, offset=offset)
        offset += PROC_DTYPE.itemsize * (shards + 1)
        self.leases = np.frombuffer(buf, dtype=LEASE_DTYPE, count=leases, offset=offset)

    @staticmethod
    def write_header(buf, shards: int, leases: int, slot_size: int, supervisor_pid: int) -> None:
        """Initialise the header (state STARTING)."""
        CTL_HEADER.pack_into(buf, 0, CTL_MAGIC, VERSION, shards, leases, HASH_SLOTS, STARTING, 0, slot_size, supervisor_pid, 0, 0, 0)

    @property
    def state(self) -> int:
        return CTL_STATE.unpack_from(self.buf, CTL_STATE_OFFSET)[0]

    @state.setter
    def state(self, value: int) -> None:
        CTL_STATE.pack_into(self.buf, CTL_STATE_OFFSET, value)

    @property
    def attaches(self) -> int:
        """How many clients have attached (a hint: concurrent bumps may merge)."""
        return CTL_STATE.unpack_from(self.buf, CTL_ATTACHES_OFFSET)[0]

    def note_attach(self) -> None:
        """Called by a client when it takes a lease."""
        CTL_STATE.pack_into(self.buf, CTL_ATTACHES_OFFSET, (self.attaches + 1) & 0xFFFFFFFF or 1)

    @property
    def commits_started(self) -> int:
        """Commit phases of cross-shard batches begun (written by the coordinator only)."""
        return CTL_COMMIT_COUNTER.unpack_from(self.buf, CTL_COMMITS_STARTED_OFFSET)[0]

    @commits_started.setter
    def commits_started(self, value: int) -> None:
        CTL_COMMIT_COUNTER.pack_into(self.buf, CTL_COMMITS_STARTED_OFFSET, value)

    @property
    def commits_finished(self) -> int:
        """Commit phases of cross-shard batches completed on every participant."""
        return CTL_COMMIT_COUNTER.unpack_from(self.buf, CTL_COMMITS_FINISHED_OFFSET)[0]

    @commits_finished.setter
    def commits_finished(self, value: int) -> None:
        CTL_COMMIT_COUNTER.pack_into(self.buf, CTL_COMMITS_FINISHED_OFFSET, value)

    @property
    def map_version(self) -> int:
        return CTL_STATE.unpack_from(self.buf, CTL_MAP_VERSION_OFFSET)[0]

    @map_version.setter
    def map_version(self, value: int) -> None:
        CTL_STATE.pack_into(self.buf, CTL_MAP_VERSION_OFFSET, value)


def worker_ring_slots(leases: int) -> int:
    """Slots of a worker's ring: one per lease, then COORDINATOR_SLOTS for the coordinator."""
    return leases + COORDINATOR_SLOTS


class Ring:
    """Views of one ring in `buf`: `leases` slots of `slot_size` bytes."""

    def __init__(self, buf, leases: int, slot_size: int):
        self.buf = buf
        self.view = memoryview(buf)
        self.leases = leases
        self.slot_size = slot_size
        self.capacity = slot_size - SLOT_HEADER_SIZE
        # The state words of all slots as one strided array: a worker finds ready slots in one step.
        self.states = np.ndarray((leases,), dtype="<u4", buffer=buf, offset=0, strides=(slot_size,))

    def slot(self, lease: int) -> memoryview:
        """The bytes of slot `lease`."""
        start = lease * self.slot_size
        return self.view[start : start + self.slot_size]

    def release(self) -> None:
        """Drop the views so the mapping can be closed."""
        self.states = None
        self.view.release()


def write_frame(slot: memoryview, state: int, flags: int, request_id: int, payload, total_len: int) -> None:
    """Fill a slot: payload and header first, `state` last (the reader polls `state`)."""
    n = len(payload)
    slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + n] = payload
    SLOT_FIELDS.pack_into(slot, 4, flags, request_id, n, 0, total_len)
    SLOT_STATE.pack_into(slot, 0, state)


def read_frame(slot: memoryview) -> tuple[int, int, int, int, int]:
    """(state, flags, request_id, frame_len, total_len) of a slot (not yet validated)."""
    state = SLOT_STATE.unpack_from(slot, 0)[0]
    flags, request_id, frame_len, _, total_len = SLOT_FIELDS.unpack_from(slot, 4)
    return state, flags, request_id, frame_len, total_len


def process_start_time(pid: int) -> int:
    """The start time of process `pid` in clock ticks since boot (0 if it does not exist or has
    exited: a zombie nobody reaped still has a /proc entry, but it serves nobody)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces, so split after its ')': then the state is
    # field 3 and the start time field 22.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return 0
    return int(fields[19])


# -- the objects of a cluster in /dev/shm ------------------------------------------------------
SHM_DIR = "/dev/shm"


def shm_entries_with_prefix(prefix: str) -> list[str]:
    """The /dev/shm entries (shared memory, and semaphores as 'sem.<name>') whose POSIX name
    starts with `prefix` ('/shardkv-...')."""
    stem = prefix[1:]
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if e.startswith(stem) or e.startswith("sem." + stem))


def is_own_entry(entry: str) -> bool:
    """True if /dev/shm entry `entry` exists and belongs to this process's user."""
    try:
        return os.stat(os.path.join(SHM_DIR, entry)).st_uid == os.geteuid()
    except OSError:
        return False


def unlink_entry(entry: str) -> str | None:
    """Unlink /dev/shm entry `entry` if this user owns it. Returns None if it is gone now, or
    why it was left: another user's object (whose name anyone can predict: never ours to remove,
    and never a reason to fail), or an unlink that failed."""
    if not is_own_entry(entry):
        return None if not os.path.lexists(os.path.join(SHM_DIR, entry)) else "owned by another user"
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
    except posix_ipc.ExistentialError:
        pass
    except (posix_ipc.Error, OSError) as exc:
        return f"unlink failed: {exc}"
    return None


def cluster_entries(names: dict) -> list[str]:
    """The /dev/shm entries of the cluster named by `names` (see names()) that exist now: its
    fixed objects and its workers' index tables."""
    wanted = set()
    for key, value in names.items():
        if key == "prefix":
            continue
        for name in value if isinstance(value, list) else [value]:
            wanted.add(name[1:])
            wanted.add("sem." + name[1:])
    tables = names["prefix"][1:] + "-idx"
    found = []
    for entry in shm_entries_with_prefix(names["prefix"]):
        if entry in wanted or entry.startswith(tables):
            found.append(entry)
    return found


def unlink_cluster(names: dict) -> tuple[list[str], dict[str, str]]:
    """Unlink every object of the cluster named by `names` that this user owns. Returns
    (removed, {entry: why it was left})."""
    removed, left = [], {}
    for entry in cluster_entries(names):
        why = unlink_entry(entry)
        if why is None:
            removed.append(entry)
        else:
            left[entry] = why
    return removed, left


def join_cluster(control_name: str) -> int:
    """Open the control block `control_name` and hold a shared flock on it for the life of this
    process (the supervisor, the coordinator, each worker): the kernel drops it however the
    process ends, so the last one of an orphaned cluster can tell that it is the last
    (leave_orphaned_cluster). Returns the descriptor (close-on-exec)."""
    shm = posix_ipc.SharedMemory(control_name)
    try:
        fd = os.dup(shm.fd)  # os.dup makes it non-inheritable
    finally:
        shm.close_fd()
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def leave_orphaned_cluster(fd: int, names: dict) -> list[str] | None:
    """Called by a process of a cluster whose supervisor is gone, when it is done with the
    cluster's objects: drop the shared flock taken by join_cluster() and try, once, for the
    exclusive one. Only the last process to drop its shared lock can get it (one that tried
    earlier failed and holds nothing, so it cannot be in the way), and it unlinks the
    cluster's objects; the others just exit. Returns what was removed, or None if another
    process of the cluster still holds on (that one removes everything when it leaves)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise
        return unlink_cluster(names)[0]
    finally:
        os.close(fd)  # the lock goes with it
