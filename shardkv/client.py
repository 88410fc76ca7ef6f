"""The client: `shardkv.open(directory)` returns a dict-like store served by a cluster of
shard worker processes (docs/IPC.md). One client object may be used from many threads; a
forked child that uses an inherited client takes a lease of its own on first use.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Callable, Iterator

import numpy as np
import posix_ipc
from crc32c import crc32c

from shardkv.coordinator.manifest import resolve_shards, shard_directory
from shardkv.coordinator.runfiles import (
    EXIT_ALREADY_RUNNING,
    EXIT_BAD_CONFIG,
    EXIT_START_FAILED,
    SUPERVISOR_LOCK,
    attach_lock_path,
    lease_path,
    lock_is_held,
    read_cluster_file,
    run_dir,
)
from shardkv import codecs
from shardkv.backends import LOCAL_FEATURES
from shardkv.batches import MAX_BATCH_BYTES, MAX_BATCH_OPS, Batch
from shardkv.coordinator.manifest import read_manifest
from shardkv.errors import Busy, Closed, CorruptionError, StoreNotFound, Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc.protocol import GET
from shardkv.orderedmapping import ScanMapping, update_pairs
from shardkv.ipc.layout import (
    PROC_QUARANTINED,
    READING_GRACE,
    READING_HOLD,
    SLOT_REQUEST,
    STOPPING,
    ControlBlock,
    Ring,
    map_shared_memory,
    process_start_time,
    reading_until,
    worker_ring_slots,
)
from shardkv.ipc.transport import Channel, Requester, Unresponsive, drain
from shardkv.ipc import sortedview
from shardkv.ipc.sharedindex import FALLBACK, SUPPORTED, IndexReader
from shardkv.limits import MAX_KEY_LEN
from shardkv.requests import BULK_OPS, Fanout, Request, Requests
from shardkv.wal.writer import check_durability

_LIVE_CLIENTS: "weakref.WeakValueDictionary[int, Client]" = weakref.WeakValueDictionary()  # a Mapping is unhashable


def _mark_forked() -> None:
    # A child sees every inherited client as forked: it takes a lease of its own on next use.
    # Its locks are new: another thread of the parent may have held one at the fork, and that
    # thread does not exist here to release it.
    for client in list(_LIVE_CLIENTS.values()):
        client._lock = threading.RLock()
        client._reading_lock = threading.Lock()
        client._closing_lock = threading.Lock()
        client._forked = True


os.register_at_fork(after_in_child=_mark_forked)
_encode_get = GET.encode
DEFAULT_REQUEST_TIMEOUT = 20.0
PROBE_TIMEOUT = 1.0  # health(): a process that does not answer a probe this fast is "unresponsive"
_PROBE_OPS = (m.PING, m.STATS)  # what ClusterView.probe sends
RETRY_TIMEOUT = 30.0
DEFAULT_LOCK_TIMEOUT = 10.0
_UNSET = object()


def open(  # noqa: A001
    directory: str | os.PathLike[str],
    shards: int | None = None,
    durability: str = "interval",
    *,
    create: bool = True,
    key_codec: str | codecs.Codec = "bytes",
    value_codec: str | codecs.Codec = "bytes",
    start_timeout: float = 60.0,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    max_batch_ops: int = MAX_BATCH_OPS,
    max_batch_bytes: int = MAX_BATCH_BYTES,
    direct_reads: bool = True,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> "Client":
    """Attach to the cluster serving `directory` (`~` is expanded), starting one (embedded) if
    none is running.

    create: make a new store if `directory` holds none (the default); False raises
    shardkv.StoreNotFound (a FileNotFoundError) instead, so a mistyped path creates nothing.
    key_codec, value_codec: how keys and values are stored: "bytes" (the default: bytes-like
    in, bytes out), "str" (UTF-8), "pickle", "json", or an object with encode() and decode()
    (see shardkv/codecs.py).
    shards: the number of shard workers of a new store (default: CPU cores); an existing store
    keeps the number it was created with, and asking for another one is a ValueError.
    durability: "process", "interval" (default) or "fsync" for this client's writes.
    lock_timeout: seconds a request waits for keys locked by a cross-shard batch being decided
    before it raises shardkv.Busy (an Unavailable).
    max_batch_ops, max_batch_bytes: the largest atomic batch this client sends (operations;
    bytes of keys and values); a larger one is a ValueError before anything is written.
    direct_reads: answer `get` in this process from the shards' shared indexes and segment
    files when possible (docs/IPC.md, "Shared index"); False sends every get to the worker.
    request_timeout: seconds a request waits for a worker (or the coordinator) that is alive but
    does not answer (stopped, wedged) before it raises shardkv.Unavailable; a write may then
    have been applied or not.
    """
    return Client(
        directory, shards, durability, start_timeout, lock_timeout, max_batch_ops, max_batch_bytes, direct_reads, request_timeout,
        create=create, key_codec=key_codec, value_codec=value_codec,
    )  # fmt: skip


class Client(ScanMapping):
    """A connection to one store; see `shardkv.open`."""

    features = property(lambda self: LOCAL_FEATURES, doc="What this backend supports (shardkv.backends.Features): everything.")

    def __init__(
        self, directory, shards, durability, start_timeout, lock_timeout=DEFAULT_LOCK_TIMEOUT, max_batch_ops=MAX_BATCH_OPS,
        max_batch_bytes=MAX_BATCH_BYTES, direct_reads=True, request_timeout=DEFAULT_REQUEST_TIMEOUT, *, create=True, key_codec="bytes", value_codec="bytes",
    ):  # fmt: skip
        for name, value in (("lock_timeout", lock_timeout), ("max_batch_ops", max_batch_ops), ("max_batch_bytes", max_batch_bytes), ("request_timeout", request_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        self.lock_timeout = float(lock_timeout)
        self.request_timeout = float(request_timeout)
        self.max_batch_ops = int(max_batch_ops)
        self.max_batch_bytes = int(max_batch_bytes)
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, not {type(directory).__name__}")
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)):
            raise TypeError(f"shards must be an int or None, not {type(shards).__name__}")
        if shards is not None and not 1 <= shards <= 1024:
            raise ValueError(f"shards must be between 1 and 1024, not {shards}")
        self.durability = check_durability(durability)
        if not isinstance(direct_reads, bool):
            raise TypeError(f"direct_reads must be True or False, not {type(direct_reads).__name__}")
        if not isinstance(create, bool):
            raise TypeError(f"create must be True or False, not {type(create).__name__}")
        self._key_codec = codecs.resolve(key_codec, "key_codec")
        self._value_codec = codecs.resolve(value_codec, "value_codec")
        self._value_out = None if self._value_codec is None else self._value_codec.decode
        self._direct_reads = direct_reads
        self._index_readers = None
        self._direct_get = None  # each shard's IndexReader.get while direct reads are on and the client open
        self.directory = os.path.realpath(os.path.expanduser(os.fspath(directory)))
        self._requested_shards = shards
        self._flags = m.FLAG_FSYNC if durability == "fsync" else 0
        self._closed = True
        self._closing_lock = threading.Lock()
        self._lease_fd = -1
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"{self.directory} is not a directory (a store is a directory)")
        if not create and read_manifest(self.directory) is None:
            raise StoreNotFound(f"no shardkv store in {self.directory} (open(..., create=True) makes one)")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._attach(start_timeout)

    # -- attaching -------------------------------------------------------------------------
    def _attach(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self._find_or_start(max(0.0, deadline - time.monotonic()))
            try:
                self._map_cluster(info)
                break
            except posix_ipc.ExistentialError:
                # The cluster described stopped (or was killed) after we read its description.
                if time.monotonic() > deadline:
                    raise Unavailable(f"no cluster came up on {self.directory} within {timeout} s") from None
                time.sleep(0.01)
        self._lock = threading.RLock()
        self._reading_lock = threading.Lock()
        self._readers = 0  # multi-key reads in progress (the lease's "reading" flag is set)
        self._pid = os.getpid()
        self._forked = False
        self._closed = False
        _LIVE_CLIENTS[id(self)] = self

    def _map_cluster(self, info: dict) -> None:
        self._info = info
        self.shards = info["shards"]
        names = info["names"]
        self._control_buf = map_shared_memory(names["control"])
        self._control = ControlBlock(self._control_buf, info["shards"], info["leases"])
        self._map = memoryview(self._control.shard_map)
        self._requests = Requests(self._map, self.shards, self._flags, self._key_codec, self._value_codec, self.max_batch_ops, self.max_batch_bytes)
        self._ring_bufs = [map_shared_memory(name) for name in names["rings"]]
        self._rings = [Ring(buf, worker_ring_slots(info["leases"]), info["slot_size"]) for buf in self._ring_bufs]
        self._wake = [posix_ipc.Semaphore(name) for name in names["wake"]]
        # The coordinator's ring is reached as "shard" number N (cross-shard batches go there).
        self._ring_bufs.append(map_shared_memory(names["coord_ring"]))
        self._rings.append(Ring(self._ring_bufs[-1], info["leases"], info["slot_size"]))
        self._wake.append(posix_ipc.Semaphore(names["coord_wake"]))
        self._take_lease(info)
        if self._direct_reads and SUPPORTED and "index" in names:
            self._index_readers = [IndexReader(names["prefix"], s, shard_directory(self.directory, s)) for s in range(self.shards)]
            self._direct_get = [reader.get for reader in self._index_readers]

    def _find_or_start(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        lock = os.path.join(run_dir(self.directory), SUPERVISOR_LOCK)
        stderr_path = os.path.join(self.directory, "logs", "supervisor.stderr")
        spawned = None
        came_and_went = 0  # supervisors started here that reported a ready cluster we then missed
        while True:
            if lock_is_held(lock):
                info = read_cluster_file(self.directory)
                # Trust the description only if the supervisor it names is alive (pid and start
                # time): a killed cluster's file can outlive it until its successor removes it.
                if info is not None and info.get("ready") and process_start_time(info["pid"]) == info["start_time"]:
                    if self._requested_shards is not None and self._requested_shards != info["shards"]:
                        raise ValueError(f"{self.directory} has {info['shards']} shards, not {self._requested_shards}; shards is fixed at creation")
                    if spawned is not None:
                        _reap(spawned)
                    return info
            elif spawned is None or spawned.poll() is not None:
                if spawned is not None:
                    # A detaching supervisor's starter exits once the cluster is ready (0), or
                    # could not start (the reason is the last line of its stderr): a start that
                    # failed is said once, never retried in a loop (docs/IPC.md, "Starting").
                    code = spawned.returncode
                    if code == EXIT_BAD_CONFIG:
                        raise ValueError(_read_tail(stderr_path).removeprefix("shardkv: ") or "the cluster refused to start")
                    if code not in (0, EXIT_ALREADY_RUNNING):
                        reason = _read_tail(stderr_path).removeprefix("shardkv: ") if code == EXIT_START_FAILED else ""
                        raise Unavailable(reason or f"the cluster on {self.directory} failed to start (supervisor exit {code}; see {stderr_path})")
                    if code == 0:
                        came_and_went += 1
                        if came_and_went >= 3:
                            raise Unavailable(f"the cluster on {self.directory} stopped right after each of {came_and_went} starts (see {os.path.dirname(stderr_path)})")
                resolve_shards(self.directory, self._requested_shards)  # a clear ValueError before spawning
                spawned = self._spawn_supervisor()
            if time.monotonic() > deadline:
                raise Unavailable(f"no cluster came up on {self.directory} within {timeout} s")
            time.sleep(0.01)

    def _spawn_supervisor(self) -> subprocess.Popen:
        logs = os.path.join(self.directory, "logs")
        os.makedirs(logs, mode=0o700, exist_ok=True)
        command = [sys.executable, "-m", "shardkv.coordinator.supervisor", self.directory, "--embedded"]
        if self._requested_shards is not None:
            command += ["--shards", str(self._requested_shards)]
        stderr_path = os.path.join(logs, "supervisor.stderr")
        os.close(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        with builtins.open(stderr_path, "ab") as err:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, close_fds=True)

    def _take_lease(self, info: dict) -> None:
        # Attaching and an idle embedded cluster's decision to stop exclude each other: with
        # attach.lock shared, either the lease is taken before the supervisor looks (it stays)
        # or the state says STOPPING and _attach looks for the next cluster (docs/IPC.md, "Leases").
        try:
            attach_fd = os.open(attach_lock_path(self.directory), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            attach_fd = -1
        try:
            if attach_fd >= 0:
                fcntl.flock(attach_fd, fcntl.LOCK_SH)
            if self._control.state == STOPPING:
                raise posix_ipc.ExistentialError(f"the cluster on {self.directory} is stopping")
            for lease in range(info["leases"]):
                fd = os.open(lease_path(self.directory, lease), os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                break
            else:
                raise Unavailable(f"all {info['leases']} client leases of {self.directory} are in use")
        finally:
            if attach_fd >= 0:
                os.close(attach_fd)
        self._lease_fd, self._lease = fd, lease
        entry = self._control.leases[lease]
        entry["pid"], entry["start_time"], entry["reading"] = os.getpid(), process_start_time(os.getpid()), 0
        self._control.note_attach()
        self._done = posix_ipc.Semaphore(info["names"]["done"][lease])
        drain(self._done)  # posts of answers to a previous owner's requests
        # Slot `lease` of every ring; a request a dead previous owner left in flight in one is
        # waited for by the first call through it (transport.Channel).
        self._channels = [Channel(self._rings[s], lease, self._wake[s], s, f"shard {s}") for s in range(self.shards)]
        self._channels.append(Channel(self._rings[self.shards], lease, self._wake[self.shards], self.shards, "the coordinator"))
        self._requester = Requester(self._done, self._check_serving)

    def _check(self) -> None:
        if self._closed:
            raise Closed("the shardkv client is closed")
        if self._forked:
            self._reattach_after_fork()

    def _reattach_after_fork(self) -> None:
        # The inherited lease lock belongs to the parent: closing our copy of the descriptor
        # keeps the parent's lock (flock follows the open file, which the parent still holds).
        os.close(self._lease_fd)
        self._readers = 0
        self._pid = os.getpid()
        self._forked = False
        self._take_lease(self._info)

    # -- one request -----------------------------------------------------------------------
    def _call(self, shard: int, message: bytes, read: bool, timeout: float | None = None):
        """Send `message` to `shard` (N: the coordinator); return (status, body). Reads are
        retried while a worker restarts; anything answered Busy (not applied) until the lock
        timeout. A server that does not answer within `timeout` (default: request_timeout)
        raises transport.Unresponsive, an Unavailable, at once."""
        with self._lock:
            self._check()
            channel, call = self._channels[shard], self._requester.call
            timeout = self.request_timeout if timeout is None else timeout
            now = time.monotonic()
            deadline, busy_deadline, pause = now + RETRY_TIMEOUT, now + self.lock_timeout, 0.0001
            while True:
                try:
                    return m.parse_response(call(channel, message, timeout))
                except Busy:
                    if time.monotonic() > busy_deadline:
                        raise
                    time.sleep(pause)
                    pause = min(pause * 2, 0.01)
                except Unresponsive:
                    raise  # waiting longer is the caller's choice (request_timeout)
                except Unavailable:
                    # Reads are retried while a worker restarts; not once the whole cluster is gone.
                    if not read or time.monotonic() > deadline or not self._cluster_alive():
                        raise
                    time.sleep(0.01)

    def _call_many(self, messages: dict[int, bytes]) -> dict[int, tuple[int, memoryview]]:
        """Send one read message to each of several shards at once; return their answers."""
        if len(messages) == 1:
            shard, message = next(iter(messages.items()))
            return {shard: self._call(shard, message, read=True)}
        with self._lock:
            self._check()
            shards = list(messages)
            results = self._requester.call_many([(self._channels[s], messages[s]) for s in shards], self.request_timeout)
            answers = {}
            for shard, result in zip(shards, results):
                if isinstance(result, (Unresponsive, CorruptionError)):
                    raise result
                if not isinstance(result, Exception):
                    try:
                        answers[shard] = m.parse_response(result)
                        continue
                    except Unavailable:
                        pass
                answers[shard] = self._call(shard, messages[shard], read=True)  # retried on its own
            return answers

    def _cluster_alive(self) -> bool:
        """Whether the supervisor this client attached to still runs (pid and start time)."""
        return process_start_time(self._info["pid"]) == self._info["start_time"]

    def _check_serving(self, channel: Channel) -> None:
        """The liveness check of a wait for `channel`'s server (transport.Requester)."""
        shard = channel.target
        if shard < self.shards and self._control.procs[1 + shard]["state"] == PROC_QUARANTINED:
            raise CorruptionError(f"shard {shard} is quarantined: its log is corrupt (see shardkv status)")
        if shard == self.shards and self._control.procs[0]["state"] == PROC_QUARANTINED:
            raise CorruptionError("the coordinator is quarantined: its decision log is corrupt (see shardkv verify)")
        if not self._cluster_alive():
            raise Unavailable(f"the cluster this client attached to on {self.directory} has stopped; open the store again")

    def _probe(self, shard: int, message: bytes) -> tuple[int, memoryview]:
        """A request for health(): raises Unresponsive unless answered within PROBE_TIMEOUT."""
        return self._call(shard, message, read=True, timeout=min(PROBE_TIMEOUT, self.request_timeout))

    @property
    def lease(self) -> int:
        """The client lease this client holds (0 to the cluster's lease count - 1; docs/IPC.md,
        "Leases"): its slot in every ring. Two open clients never hold the same one; a closed
        client's lease goes to the next client that attaches. Closed once closed."""
        self._check()
        return self._lease

    @property
    def cluster_id(self) -> str:
        """The id of the cluster this client attached to (run/cluster.json's "cluster"): each
        start of a cluster on the directory picks a new one."""
        return self._info["cluster"]

    @property
    def cluster_view(self) -> "ClusterView":
        """What ops tools read of the cluster this client is attached to (shardkv.ops.status:
        `shardkv status`, `health()`; fault harnesses): its process table, ring queues and
        probes. Not for applications: it shows the shared-memory layout of docs/IPC.md."""
        return ClusterView(self)

    def shard_of(self, key) -> int:
        """The shard that owns `key` (through the coordinator's shard map)."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        return self._requests.shard_of(self._requests.key_in(key))

    def _run(self, request: Request | None) -> Any:
        """Send one request built by self._requests and return its result."""
        if request is None:
            return None
        status, body = self._call(request.shard, request.message, request.read)
        return request.finish(status, body)

    def _run_all(self, fanout: Fanout) -> Any:
        """Send a read to several shards at once and return the combined result."""
        return fanout.finish(self._call_many(fanout.messages))

    # -- the API ---------------------------------------------------------------------------
    def get(self, key: Any, default: Any = None) -> Any:
        """The value of `key`, or `default` if it is absent."""
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_LEN or self._key_codec is not None:
            key = self._requests.key_in(key)
        h = crc32c(key)
        direct_get = self._direct_get
        if direct_get is not None:
            # Answered here from the shard's shared index when it can be (docs/IPC.md).
            value = direct_get[self._map[h >> 20]](key, h)
            if value is not FALLBACK:
                if value is None:
                    return default
                return value if self._value_out is None else self._value_out(value)
        # Sent from here rather than built by self._requests: this is the hottest request.
        status, body = self._call(self._map[h >> 20], _encode_get(0, key), True)
        if status == m.NOT_FOUND:
            return default
        return bytes(body) if self._value_out is None else self._value_out(bytes(body))

    def _get_direct(self, key: bytes):
        """`key`'s value (None: absent) from the shard's shared index, or FALLBACK: ask the worker.
        (For the asyncio client; `get` has these lines inline: a call less on its hottest path.)"""
        direct_get = self._direct_get
        if direct_get is None:
            return FALLBACK
        h = crc32c(key)
        return direct_get[self._map[h >> 20]](key, h)

    def put(self, key: Any, value: Any, ttl: float | timedelta | None = None) -> None:
        """Set `key` to `value`; with `ttl` (seconds or a timedelta), the key expires that long from now."""
        self._run(self._requests.put(key, value, ttl))

    def ttl(self, key: Any) -> float | None:
        """Seconds left before `key` expires: None if it is absent, math.inf if it never expires."""
        return self._run(self._requests.ttl(key))

    def expire(self, key: Any, seconds: float | timedelta | None) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if the key is absent."""
        return self._run(self._requests.expire(key, seconds))

    def delete(self, key: Any) -> bool:
        """Remove `key`; True if it was present."""
        return self._run(self._requests.delete(key))

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Set `key` to `new` if its value is `expected` (None: absent); `new=None` deletes."""
        return self._run(self._requests.cas(key, expected, new))

    def get_many(self, keys: Iterable[Any]) -> list[Any]:
        """The values of `keys` (None for a missing one), in order, read at one snapshot: every
        cross-shard batch is seen entirely or not at all."""
        keys = self._requests.keys_in(keys)
        self._check()
        if not keys:
            return []
        requests = self._requests
        hashes, by_shard = requests.get_many_plan(keys)
        readers = self._index_readers
        with self._snapshot() as snapshot:
            while True:
                found, messages = {}, {}
                for shard, idx in by_shard.items():
                    shard_keys = [keys[i] for i in idx]
                    if readers is not None:
                        # Each shard read at one instant here; the snapshot covers the rest.
                        values = readers[shard].get_many(shard_keys, [hashes[i] for i in idx])
                        if values is not FALLBACK:
                            found[shard] = values
                            continue
                    messages[shard] = requests.get_many_message(shard_keys)
                if messages:
                    for shard, (status, body) in self._call_many(messages).items():
                        found[shard] = requests.get_many_result(status, body)
                if snapshot.still_valid():
                    break
                snapshot.restart()
        return requests.get_many_values(len(keys), by_shard, found)

    def scan(self, start: Any = None, stop: Any = None, reverse: bool = False, prefix: Any = None, limit: int | None = None) -> Iterator[tuple[Any, Any]]:
        """(key, value) pairs with start <= key < stop, in key order across all shards (the
        order of the encoded keys: UTF-8 byte order for str keys)."""
        start, stop, prefix = self._requests.scan_args(start, stop, prefix, limit)
        self._check()
        return self._requests.items_out(self._scan(start, stop, bool(reverse), prefix, limit))

    def _scan(self, start, stop, reverse, prefix, limit):
        # Read from the shards' ordered views in shared memory, or page by page through the
        # rings, merged in key order under the snapshot rules (shardkv/ipc/sortedview.py).
        return sortedview.scan(self, start, stop, reverse, prefix, limit)

    def _snapshot(self) -> "_Snapshot":
        """A consistent-read window for a multi-key read (docs/TRANSACTIONS.md, "Isolation")."""
        self._check()
        return _Snapshot(self)

    # -- atomic batches --------------------------------------------------------------------
    def write(self, ops: Iterable[tuple]) -> None:
        """Apply operations atomically, all or nothing: ("put", key, value[, ttl]),
        ("delete", key) and ("expect", key, value) (a precondition; value None: absent).
        Raises shardkv.Conflict, applying nothing, if a precondition does not hold."""
        self._write_checked(self._requests.checked_ops(ops))

    def put_many(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]], atomic: bool = True) -> None:
        """Set every (key, value) of a mapping or iterable of pairs, atomically. (`atomic=False`
        is accepted for code shared with backends that can only do better without it; the local
        store is atomic either way.)"""
        if not isinstance(atomic, bool):
            raise TypeError(f"atomic must be True or False, not {type(atomic).__name__}")
        self._write_checked(self._requests.put_many_ops(items))

    def batch(self) -> Batch:
        """A batch to fill in a `with` block: applied atomically when the block exits normally,
        discarded if it raises (b.put(key, value[, ttl]), b.delete(key), b.expect(key, value))."""
        self._check()
        return self._requests.batch(self._write_checked)

    def _write_checked(self, checked: list) -> None:
        """Send a batch of checked operations: APPLY to its one shard, or TXN to the
        coordinator when it spans shards."""
        self._check()
        self._run(self._requests.write(checked))

    # -- ordered navigation ----------------------------------------------------------------
    def min(self) -> tuple[Any, Any] | None:
        """(key, value) of the smallest key, or None."""
        self._check()
        return self._requests.item_or_none(sortedview.seek(self, None, None, False))

    def max(self) -> tuple[Any, Any] | None:
        """(key, value) of the largest key, or None."""
        self._check()
        return self._requests.item_or_none(sortedview.seek(self, None, None, True))

    def above(self, key: Any) -> tuple[Any, Any] | None:
        """(key, value) of the smallest key strictly after `key`, or None."""
        key = self._requests.key_in(key)
        self._check()
        return self._requests.item_or_none(sortedview.seek(self, key + b"\x00", None, False))

    def below(self, key: Any) -> tuple[Any, Any] | None:
        """(key, value) of the largest key strictly before `key`, or None."""
        key = self._requests.key_in(key)
        self._check()
        return self._requests.item_or_none(sortedview.seek(self, None, key, True))

    # -- the mapping protocol --------------------------------------------------------------
    def __len__(self) -> int:
        return self._run_all(self._requests.len())

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Any) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key: Any) -> bool:
        # A key of the wrong type is the same TypeError as for db[key], not a silent False.
        return self.get(key) is not None

    def __iter__(self) -> Iterator[Any]:
        return (key for key, _ in self.scan())

    def update(self, other: Any = (), /, **kwds: Any) -> None:
        """Set the pairs of `other` (a mapping, an object with keys(), or (key, value) pairs)
        and of `kwds`, as dict.update does, sent as batches of up to 1,000 pairs (not one round
        trip per key). Each batch is atomic, the whole is not: use put_many for that."""
        self._check()
        for batch in self._requests.update_batches(update_pairs(other, kwds)):
            self._write_checked(batch)

    def clear(self) -> None:
        """Remove every key: the keys one ordered scan reads, deleted 1,000 at a time as it
        goes (not one scan per key, as MutableMapping.clear does). Not atomic: a key written
        while it runs may stay."""
        self._check()
        start = None
        while True:
            keys: list[bytes] = []
            try:
                for key, _ in self._scan(start, None, False, None, BULK_OPS):
                    keys.append(key)
            except Unavailable:
                # A batch committed between two windows: the keys read so far are still keys to
                # delete; the next round starts after them. (Raised with nothing read: the scan
                # already started again as often as it does.)
                if not keys:
                    raise
            if not keys:
                return
            for request in self._requests.delete_each(keys):
                self._run(request)
            start = keys[-1] + b"\0"  # the least key after the last one deleted

    # -- operations ------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-shard engine statistics and their totals."""
        return self._run_all(self._requests.stats())

    def health(self) -> dict:
        """The object `shardkv status DIR --json` prints: overall status; supervisor,
        coordinator and every shard worker (role, shard, pid, state, restarts, uptime,
        requests, ops_per_second); for shards also keys, live_bytes, total_bytes,
        garbage_ratio, segments, waiting, last_fsync_age, in_doubt, compacting. A process that
        is alive but does not answer a probe within a second is "unresponsive"."""
        from shardkv.ops.status import collect_status  # noqa: PLC0415

        self._check()
        return collect_status(self, sample_seconds=0.0)

    def sync(self) -> None:
        """fsync every shard's log."""
        self._run_all(self._requests.sync())

    def compact(self, shard: int | None = None, wait: bool = True, progress: Callable[[int, int], Any] | None = None) -> list[dict]:
        """Compact one shard or all of them online (reads and writes go on meanwhile).

        With `wait`, return each shard's result ({"before": ..., "after": ..., "seconds": ...})
        once all are done; `progress(done, total)` is called while waiting.
        """
        targets = self._requests.compact_targets(shard)
        for s in targets:
            self._run(self._requests.compact_start(s))
        if not wait:
            return []
        while True:
            states = self._run_all(self._requests.compaction_state(targets))
            if progress is not None:
                progress(sum(c["done"] for c in states.values()), sum(c["total"] for c in states.values()))
            if not any(c["running"] for c in states.values()):
                return [states[s]["last"] for s in targets]
            time.sleep(0.1)

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Give the lease back. Idempotent, and safe from any thread at any time: a call waiting
        in another thread ends with shardkv.Closed (soon: its wait is woken), and one that
        starts later raises Closed. The shared-memory mappings go with the object, since
        another thread may still be reading through them."""
        with self._closing_lock:
            if self._closed:
                return
            self._closed = True
        self._direct_get = None
        if not self._forked:
            self._requester.close()  # wakes a waiter in another thread, which then raises Closed
        with self._lock:  # no call is in flight past here: the semaphores can go
            readers, self._index_readers = self._index_readers, None
            for reader in readers or ():
                reader.close()
            if not self._forked:
                entry = self._control.leases[self._lease]
                entry["pid"], entry["start_time"], entry["reading"] = 0, 0, 0
                os.close(self._lease_fd)
            self._done.close()
            for sem in self._wake:
                sem.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shardkv.Client {self.directory!r} {'closed' if self._closed else f'{self.shards} shards'}>"


class ClusterView:
    """A read-only look, for ops tools, at the cluster a client is attached to (see
    `Client.cluster_view`). It sends no request but `probe`, and changes nothing."""

    __slots__ = ("_client",)

    def __init__(self, client: Client):
        self._client = client

    @property
    def control(self) -> ControlBlock:
        """The cluster's control block (docs/IPC.md, "Control block"): `procs` (the coordinator,
        then each shard worker: state, pid, restarts, started_at, requests), `state`, the
        shard map and the commit counters. Read it only: the cluster's processes write it."""
        return self._client._control

    @property
    def info(self) -> Mapping[str, Any]:
        """The cluster's description (run/cluster.json) as read when the client attached: the
        supervisor's "pid" and "start_time", "shards", "leases", the shared-memory "names"."""
        return MappingProxyType(self._client._info)

    def waiting(self, target: int) -> int:
        """Requests written to `target`'s ring (a shard; `shards`: the coordinator) and not yet
        taken by its server."""
        return int(np.count_nonzero(self._client._rings[target].states == SLOT_REQUEST))

    def probe(self, target: int, message: bytes) -> tuple[int, memoryview]:
        """Send `message` (a health probe: protocol.PING or STATS) to `target` (a shard;
        `shards`: the coordinator); (status, body), or transport.Unresponsive (an Unavailable)
        unless it is answered within a second (PROBE_TIMEOUT). Any other request is a
        ValueError: this is no way around the client's own methods."""
        if not message or message[0] not in _PROBE_OPS:
            raise ValueError("cluster_view.probe sends health probes only (protocol.PING, protocol.STATS)")
        return self._client._probe(target, message)


class _Snapshot:
    """The window of one multi-key read. While it fetches, the client's lease says "reading"
    (a deadline: layout.READING_HOLD), so the coordinator holds back the commit phase of
    cross-shard batches for a while; between the pages of a scan only for READING_GRACE, so a
    held iterator stalls no writer. The read is good only if no commit phase began during it:
    `commits_started` unchanged and, at the start, equal to `commits_finished`
    (docs/TRANSACTIONS.md, "Isolation")."""

    def __init__(self, client: Client):
        self.client = client
        self.yielded = False
        self.started = 0

    def __enter__(self) -> "_Snapshot":
        self._set_reading(+1)
        try:
            self.restart()
        except BaseException:
            self._set_reading(-1)
            raise
        return self

    def _set_reading(self, change: int) -> None:
        """Count this read in or out; the lease's `reading` holds while any runs."""
        client = self.client
        if client._closed or client._forked:
            return
        with client._reading_lock:
            client._readers += change
            client._control.leases[client._lease]["reading"] = reading_until(READING_HOLD) if client._readers else 0

    def fetching(self, busy: bool) -> None:
        """A page fetch begins (busy) or ends: ask commit phases to wait for READING_HOLD, or
        only READING_GRACE while the caller consumes the page."""
        client = self.client
        if client._closed or client._forked:
            return
        with client._reading_lock:
            if client._readers:
                client._control.leases[client._lease]["reading"] = reading_until(READING_HOLD if busy else READING_GRACE)

    def restart(self) -> None:
        """Wait until no commit phase is running; take that moment as the snapshot."""
        pause, deadline = 0.00005, None
        while not self.try_take():
            deadline = self.check_deadline(deadline)
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def try_take(self) -> bool:
        """Take the snapshot now if no commit phase is running; False if one is."""
        control = self.client._control
        finished = control.commits_finished  # read before started: see docs/TRANSACTIONS.md
        started = control.commits_started
        if started != finished:
            return False
        self.started = started
        return True

    def check_deadline(self, deadline: float | None) -> float:
        """The deadline of a wait for a snapshot (set on the first call); Busy once it passed."""
        now = time.monotonic()
        if deadline is None:
            return now + self.client.lock_timeout
        if now > deadline:
            raise Busy(f"a cross-shard batch has been committing for over {self.client.lock_timeout} s (lock_timeout)")
        return deadline

    def still_valid(self) -> bool:
        """True if no commit phase began since the snapshot was taken."""
        return self.client._control.commits_started == self.started

    def __exit__(self, *exc) -> None:
        self._set_reading(-1)


def _reap(process: subprocess.Popen) -> None:
    """Collect the supervisor's starter, which exits as soon as the supervisor detaches."""
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _read_tail(path: str) -> str:
    """The last line of a log file ("" if there is none)."""
    try:
        with builtins.open(path, "rb") as f:
            lines = f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""
