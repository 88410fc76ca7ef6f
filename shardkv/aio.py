"""The asyncio client: `db = await shardkv.aopen(directory)`.

Requests travel through the same rings as the blocking client's. The client holds a few leases
(`pool`, default 4), so several requests per shard are in flight at once. Completions reach the
event loop without a thread per call: one waiter thread per lease blocks on that lease's `done`
semaphore and hands every wake-up to the loop, which resolves the futures of the slots that
were answered.

Cancelling a coroutine never leaves a slot stuck: a slot whose frame is still in flight goes back
to the pool when the worker's answer arrives, not before; a long message cut short by a
cancellation is dropped by the worker when the slot's next request begins.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import timedelta
from typing import Any, Callable

import posix_ipc

from shardkv import codecs
from shardkv.backends import LOCAL_FEATURES
from shardkv.batches import MAX_BATCH_BYTES, MAX_BATCH_OPS, Batch
from shardkv.client import DEFAULT_LOCK_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, PROBE_TIMEOUT, Client, _Snapshot
from shardkv.errors import Busy, Closed, Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc.protocol import GET
from shardkv.ipc import sortedview
from shardkv.ipc.sharedindex import FALLBACK
from shardkv.ipc.transport import Unresponsive, exchange
from shardkv.ops import status
from shardkv.requests import Fanout, Request

RETRY_TIMEOUT = 30.0


def aopen(
    directory: str | os.PathLike[str],
    shards: int | None = None,
    durability: str = "interval",
    *,
    pool: int = 4,
    create: bool = True,
    key_codec: str | codecs.Codec = "bytes",
    value_codec: str | codecs.Codec = "bytes",
    start_timeout: float = 60.0,
    direct_reads: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    max_batch_ops: int = MAX_BATCH_OPS,
    max_batch_bytes: int = MAX_BATCH_BYTES,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> "_Opening":
    """Attach to (or start, like `shardkv.open`) the cluster serving `directory`.

    `db = await shardkv.aopen(dir)` or `async with shardkv.aopen(dir) as db:`. `pool` is the
    number of leases the client holds: how many requests per shard can be in flight at once.
    The other options are `shardkv.open`'s (codecs, create, timeouts, batch limits);
    `direct_reads`: a `get` answered from shared memory never waits.
    """
    options = {
        "lock_timeout": lock_timeout, "max_batch_ops": max_batch_ops, "max_batch_bytes": max_batch_bytes, "request_timeout": request_timeout,
        "create": create, "key_codec": key_codec, "value_codec": value_codec,
    }  # fmt: skip
    return _Opening(_aopen(directory, shards, durability, pool, start_timeout, direct_reads, options))


async def _aopen(directory, shards, durability, pool, start_timeout, direct_reads, options) -> "AsyncClient":
    if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= 16:
        raise ValueError(f"pool must be an int between 1 and 16, not {pool!r}")
    loop = asyncio.get_running_loop()
    first = await loop.run_in_executor(None, lambda: Client(directory, shards, durability, start_timeout, direct_reads=direct_reads, **options))
    clients = [first]
    try:
        for _ in range(pool - 1):
            # Only the first client answers gets from shared memory; the others carry requests.
            clients.append(await loop.run_in_executor(None, lambda: Client(first.directory, None, durability, start_timeout, direct_reads=False, **options)))
    except BaseException:
        for client in clients:
            client.close()
        raise
    return AsyncClient(clients, loop)


class _Opening:
    """Lets `async with shardkv.aopen(...) as db` work as well as `db = await shardkv.aopen(...)`."""

    def __init__(self, coroutine):
        self._coroutine = coroutine
        self._client: AsyncClient | None = None

    def __await__(self):
        return self._coroutine.__await__()

    async def __aenter__(self) -> "AsyncClient":
        self._client = await self._coroutine
        return self._client

    async def __aexit__(self, *exc) -> None:
        await self._client.close()


class AsyncClient:
    """An asyncio connection to one store; see `shardkv.aopen`."""

    features = property(lambda self: LOCAL_FEATURES, doc="What this backend supports (shardkv.backends.Features): everything.")

    def __init__(self, clients: list[Client], loop: asyncio.AbstractEventLoop):
        self._clients = clients
        self._loop = loop
        self.shards = clients[0].shards
        self.directory = clients[0].directory
        self._flags = clients[0]._flags
        self._request_timeout = clients[0].request_timeout
        self._requests = clients[0]._requests
        # One queue of free leases per shard worker, and one (the last) for the coordinator.
        self._free = [asyncio.Queue() for _ in range(self.shards + 1)]
        for queue in self._free:
            for index in range(len(clients)):
                queue.put_nowait(index)
        # (lease index, shard) -> [request id, future (None once its caller gave up), deadline]
        self._pending: dict[tuple[int, int], list] = {}
        self._closed = False
        self._stop = threading.Event()
        self._waiters = [threading.Thread(target=self._wait_for_answers, args=(i,), name=f"shardkv-aio-{i}", daemon=True) for i in range(len(clients))]
        for thread in self._waiters:
            thread.start()

    # -- completions -----------------------------------------------------------------------
    def _wait_for_answers(self, index: int) -> None:
        """Waiter thread of lease `index`: every post of its `done` semaphore wakes the loop;
        without one for half a second, the loop checks deadlines and liveness."""
        done = self._clients[index]._done
        while not self._stop.is_set():
            try:
                done.acquire(0.5)
                callback = self._complete
            except posix_ipc.BusyError:
                callback = self._check_pending
            except posix_ipc.SignalError:
                continue  # a signal handler ran (in the main thread): wait on
            except posix_ipc.ExistentialError:
                return
            try:
                self._loop.call_soon_threadsafe(callback, index)
            except RuntimeError:
                return  # the loop is closed

    def _complete(self, index: int) -> None:
        """In the loop: resolve the futures of lease `index`'s answered slots."""
        channels = self._clients[index]._channels
        for shard in range(self.shards + 1):
            entry = self._pending.get((index, shard))
            if entry is None or not channels[shard].answered(entry[0]):
                continue
            channels[shard].outstanding = None
            del self._pending[(index, shard)]
            future = entry[1]
            if future is None:
                self._free[shard].put_nowait(index)  # its caller gave up: the slot is free now
            elif not future.done():
                future.set_result(None)

    def _check_pending(self, index: int) -> None:
        """In the loop: fail the requests of lease `index` whose server is quarantined or gone,
        or that waited past the request timeout (they stay outstanding: see transport.exchange)."""
        self._complete(index)  # an answer whose post was taken by a drain
        client, now = self._clients[index], time.monotonic()
        for (lease, shard), entry in list(self._pending.items()):
            future = entry[1]
            if lease != index or future is None or future.done():
                continue
            channel = client._channels[shard]
            try:
                client._check_serving(channel)
                if now > entry[2]:
                    raise Unresponsive(f"{channel.name} did not answer in time (request_timeout); the request may or may not have been applied")
            except Exception as exc:  # noqa: BLE001 — CorruptionError (quarantine) or Unavailable
                future.set_exception(exc)

    # -- one request -----------------------------------------------------------------------
    async def _call(self, shard: int, message: bytes, read: bool, timeout: float | None = None):
        """Send `message` to `shard` (N: the coordinator); retries as Client._call does."""
        now = time.monotonic()
        deadline, busy_deadline, pause = now + RETRY_TIMEOUT, now + self._clients[0].lock_timeout, 0.0001
        while True:
            try:
                return m.parse_response(await self._exchange(shard, message, timeout))
            except Busy:  # not applied: a key is locked by a batch being decided
                if time.monotonic() > busy_deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.01)
            except Unresponsive:
                raise
            except Unavailable:
                if not read or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _exchange(self, shard: int, message: bytes, timeout: float | None = None) -> bytes:
        """One request through a free lease's slot for `shard`, driving transport.exchange with
        futures. A caller that gives up (cancelled, timed out, closed) leaves the request
        outstanding: the slot goes back to the pool when its late answer arrives."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        timeout = self._request_timeout if timeout is None else timeout
        try:
            index = await asyncio.wait_for(self._free[shard].get(), timeout)
        except asyncio.TimeoutError:
            raise Unresponsive(f"no slot for shard {shard} came free within the request timeout: earlier requests are still unanswered") from None
        if self._closed:
            self._free[shard].put_nowait(index)  # wakes the next waiter, which sees closed too
            raise Closed("the shardkv client is closed")
        client = self._clients[index]
        channel = client._channels[shard]
        request_id = client._requester.next_id()
        deadline = time.monotonic() + timeout
        steps = exchange(channel, request_id, message)
        try:
            next(steps)  # posts the first frame; its answer is handled after the await below
            while True:
                future = self._loop.create_future()
                self._pending[(index, shard)] = [request_id, future, deadline]
                await future
                next(steps)  # the next frame, or StopIteration with the whole response
        except StopIteration as finished:
            self._free[shard].put_nowait(index)
            return finished.value
        except BaseException:
            entry = self._pending.get((index, shard))
            if entry is not None and entry[0] == request_id:
                entry[1] = None  # outstanding: freed by _complete when its answer arrives
            else:
                self._free[shard].put_nowait(index)
            raise

    def _shard_of(self, key: bytes) -> int:
        if self._closed:
            raise Closed("the shardkv client is closed")
        return self._requests.shard_of(key)

    async def _run(self, request: Request | None) -> Any:
        """Send one request built by self._requests and return its result."""
        if request is None:
            return None
        if self._closed:
            raise Closed("the shardkv client is closed")
        status, body = await self._call(request.shard, request.message, request.read)
        return request.finish(status, body)

    async def _run_all(self, fanout: Fanout) -> Any:
        """Send a read to several shards at once and return the combined result."""
        shards = list(fanout.messages)
        answers = await asyncio.gather(*(self._call(s, fanout.messages[s], read=True) for s in shards))
        return fanout.finish(dict(zip(shards, answers)))

    # -- the API (the blocking client's, as coroutines) ------------------------------------
    def shard_of(self, key: Any) -> int:
        """The shard that owns `key` (through the coordinator's shard map)."""
        return self._shard_of(self._requests.key_in(key))

    async def get(self, key: Any, default: Any = None) -> Any:
        """The value of `key`, or `default` if it is absent."""
        key = self._requests.key_in(key)
        if not self._closed:
            value = self._clients[0]._get_direct(key)  # no waiting: answered from shared memory
            if value is not FALLBACK:
                return default if value is None else self._requests.value_or_none(value)
        value = GET.result(*await self._call(self._shard_of(key), GET.encode(0, key), read=True))
        return default if value is None else self._requests.value_or_none(value)

    async def put(self, key: Any, value: Any, ttl: float | timedelta | None = None) -> None:
        """Set `key` to `value` (with `ttl`: expiring that many seconds, or that timedelta, from now)."""
        await self._run(self._requests.put(key, value, ttl))

    async def delete(self, key: Any) -> bool:
        """Remove `key`; True if it was present."""
        return await self._run(self._requests.delete(key))

    async def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Set `key` to `new` if its value is `expected` (None: absent); `new=None` deletes."""
        return await self._run(self._requests.cas(key, expected, new))

    async def ttl(self, key: Any) -> float | None:
        """Seconds left before `key` expires: None if it is absent, math.inf if it never expires."""
        return await self._run(self._requests.ttl(key))

    async def expire(self, key: Any, seconds: float | timedelta | None) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if it is absent."""
        return await self._run(self._requests.expire(key, seconds))

    async def contains(self, key: Any) -> bool:
        """Whether `key` is present (an `async` stand-in for `key in db`)."""
        return await self.get(key) is not None

    async def get_many(self, keys: Iterable[Any]) -> list[Any]:
        """The values of `keys` (None for a missing one), in order; shards are asked at once."""
        requests = self._requests
        keys = requests.keys_in(keys)
        if self._closed:
            raise Closed("the shardkv client is closed")
        by_shard = requests.get_many_plan(keys)[1]
        shards = list(by_shard)
        async with _AsyncSnapshot(self._clients[0]) as snapshot:
            while True:
                answers = await asyncio.gather(*(self._call(s, requests.get_many_message([keys[i] for i in by_shard[s]]), read=True) for s in shards))
                if snapshot.still_valid():
                    break
                await snapshot.arestart()
        return requests.get_many_values(len(keys), by_shard, {s: requests.get_many_result(*answer) for s, answer in zip(shards, answers)})

    async def write(self, ops: Iterable[tuple]) -> None:
        """Apply operations atomically (see Client.write); Conflict if a precondition fails."""
        await self._write_checked(self._requests.checked_ops(ops))

    async def put_many(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]], atomic: bool = True) -> None:
        """Set every (key, value) of a mapping or iterable of pairs, atomically (see Client.put_many)."""
        if not isinstance(atomic, bool):
            raise TypeError(f"atomic must be True or False, not {type(atomic).__name__}")
        await self._write_checked(self._requests.put_many_ops(items))

    def batch(self) -> "AsyncBatch":
        """`async with db.batch() as b:` - applied atomically when the block exits normally."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        return self._requests.batch(self._write_checked, AsyncBatch)

    async def _write_checked(self, checked: list) -> None:
        request = self._requests.write(checked)
        if self._closed:
            raise Closed("the shardkv client is closed")
        await self._run(request)

    async def len(self) -> int:
        """The number of keys (an `async` stand-in for len(db))."""
        return await self._run_all(self._requests.len())

    async def min(self) -> tuple[Any, Any] | None:
        """(key, value) of the smallest key, or None."""
        return await self._seek(None, None, False)

    async def max(self) -> tuple[Any, Any] | None:
        """(key, value) of the largest key, or None."""
        return await self._seek(None, None, True)

    async def above(self, key: Any) -> tuple[Any, Any] | None:
        """(key, value) of the smallest key strictly after `key`, or None."""
        return await self._seek(self._requests.key_in(key) + b"\x00", None, False)

    async def below(self, key: Any) -> tuple[Any, Any] | None:
        """(key, value) of the largest key strictly before `key`, or None."""
        return await self._seek(None, self._requests.key_in(key), True)

    async def _seek(self, start, stop, reverse):
        # Read directly from the ordered views when possible (no await: shared memory only),
        # else a scan of one item (shardkv/ipc/sortedview.py).
        if self._closed:
            raise Closed("the shardkv client is closed")
        found = sortedview.first_direct(self._clients[0], start, stop, reverse)
        if found is sortedview.FALLBACK:
            found = await self._first(self._scan(start, stop, reverse, None, 1))
        return self._requests.item_or_none(found)

    @staticmethod
    async def _first(items: AsyncIterator) -> Any:
        """The first item of an async iterator (None if empty), closing it."""
        try:
            async for item in items:
                return item
            return None
        finally:
            await items.aclose()

    def scan(self, start: Any = None, stop: Any = None, reverse: bool = False, prefix: Any = None, limit: int | None = None) -> AsyncIterator[tuple[Any, Any]]:
        """An async iterator of (key, value) with start <= key < stop, in key order across shards."""
        start, stop, prefix = self._requests.scan_args(start, stop, prefix, limit)
        if self._closed:
            raise Closed("the shardkv client is closed")
        items = self._scan(start, stop, bool(reverse), prefix, limit)
        if self._requests.key_out is None and self._requests.value_out is None:
            return items
        return self._decoded(items)

    async def _decoded(self, items: AsyncIterator) -> AsyncIterator[tuple[Any, Any]]:
        try:
            async for item in items:
                yield self._requests.item_or_none(item)
        finally:
            await items.aclose()

    async def _scan(self, start, stop, reverse, prefix, limit):
        # As Client._scan (shardkv/ipc/sortedview.py): direct reads where possible, pages
        # through the rings otherwise, merged in key order under the snapshot rules.
        async with _AsyncSnapshot(self._clients[0]) as snapshot:
            async for item in sortedview.ascan(self, start, stop, reverse, prefix, limit, snapshot):
                yield item

    # -- operations ------------------------------------------------------------------------
    async def stats(self) -> dict:
        """Per-shard engine statistics and their totals."""
        return await self._run_all(self._requests.stats())

    async def health(self) -> dict:
        """The object `shardkv status DIR --json` prints (see Client.health); each process is
        probed for a second at most, without blocking the event loop."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        first = self._clients[0]
        health = status.status_from_shared_memory(first)
        targets = status.probes(health, self.shards)
        timeout = min(PROBE_TIMEOUT, self._request_timeout)
        results = await asyncio.gather(*(self._call(t, message, read=True, timeout=timeout) for t, message in targets.items()), return_exceptions=True)
        status.record_probes(health, dict(zip(targets, results)), self.shards)
        for entry in [health["coordinator"], *health["shards"]]:
            entry["ops_per_second"] = round(entry["requests"] / entry["uptime"], 1) if entry["uptime"] else 0.0
        return status.finish_status(health)

    async def sync(self) -> None:
        """fsync every shard's log."""
        await self._run_all(self._requests.sync())

    async def compact(self, shard: int | None = None, wait: bool = True, progress: Callable[[int, int], Any] | None = None) -> list[dict]:
        """Compact one shard or all of them online (see Client.compact)."""
        targets = self._requests.compact_targets(shard)
        for s in targets:
            await self._run(self._requests.compact_start(s))
        if not wait:
            return []
        while True:
            states = await self._run_all(self._requests.compaction_state(targets))
            if progress is not None:
                progress(sum(c["done"] for c in states.values()), sum(c["total"] for c in states.values()))
            if not any(c["running"] for c in states.values()):
                return [states[s]["last"] for s in targets]
            await asyncio.sleep(0.1)

    # -- closing ---------------------------------------------------------------------------
    async def close(self) -> None:
        """End the requests in flight with shardkv.Closed, stop the waiters and give the leases
        back. Idempotent. A request left unanswered stays outstanding in its slot: the lease's
        next owner waits for its answer before reusing the slot (transport.Channel)."""
        if self._closed:
            return
        self._closed = True
        for entry in self._pending.values():
            future = entry[1]
            if future is not None and not future.done():
                future.set_exception(Closed("the client was closed while this request waited; it may or may not have been applied"))
        for queue in self._free:
            queue.put_nowait(0)  # a caller waiting for a free slot wakes, sees closed and passes it on
        self._stop.set()
        for client in self._clients:
            try:
                client._done.release()  # wakes its waiter thread at once
            except posix_ipc.Error:
                pass
        for thread in self._waiters:
            await self._loop.run_in_executor(None, thread.join)
        for client in self._clients:
            client.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<shardkv.AsyncClient {self.directory!r} {'closed' if self._closed else f'{self.shards} shards'}>"


class AsyncBatch(Batch):
    """`async with db.batch() as b:` - the operations of one atomic batch (see Batch)."""

    async def __aenter__(self) -> "AsyncBatch":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._done = True
        if exc_type is None:
            await self._submit(self._ops)


class _AsyncSnapshot(_Snapshot):
    """The consistent-read window of a multi-key read of the asyncio client (waits without
    blocking the event loop)."""

    async def __aenter__(self) -> "_AsyncSnapshot":
        self._set_reading(+1)
        try:
            await self.arestart()
        except BaseException:
            self._set_reading(-1)
            raise
        return self

    async def arestart(self) -> None:
        pause, deadline = 0.00005, None
        while not self.try_take():
            deadline = self.check_deadline(deadline)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.005)

    async def __aexit__(self, *exc) -> None:
        self.__exit__(*exc)


__all__ = ["AsyncClient", "aopen"]
