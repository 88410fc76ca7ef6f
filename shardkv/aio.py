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
import threading
import time

import posix_ipc

from shardkv.batches import Batch, check_limits, check_ops, encode_txn, put_many_ops, route_ops
from shardkv.batches import MAX_BATCH_BYTES, MAX_BATCH_OPS
from shardkv.client import DEFAULT_LOCK_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Client, _Snapshot
from shardkv.errors import Busy, Closed, Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc import sortedview
from shardkv.ipc.transport import Unresponsive, exchange
from shardkv.ipc.sharedindex import FALLBACK
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, check_key, check_scan_args, check_value, ttl_milliseconds

RETRY_TIMEOUT = 30.0


def aopen(
    directory,
    shards: int | None = None,
    durability: str = "interval",
    *,
    pool: int = 4,
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
    The other options are `shardkv.open`'s; `direct_reads`: a `get` answered from shared
    memory never waits.
    """
    options = {"lock_timeout": lock_timeout, "max_batch_ops": max_batch_ops, "max_batch_bytes": max_batch_bytes, "request_timeout": request_timeout}
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

    def __init__(self, clients: list[Client], loop: asyncio.AbstractEventLoop):
        self._clients = clients
        self._loop = loop
        self.shards = clients[0].shards
        self.directory = clients[0].directory
        self._flags = clients[0]._flags
        self._request_timeout = clients[0].request_timeout
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
    async def _call(self, shard: int, message: bytes, read: bool):
        now = time.monotonic()
        deadline, busy_deadline, pause = now + RETRY_TIMEOUT, now + self._clients[0].lock_timeout, 0.0001
        while True:
            try:
                return m.parse_response(await self._exchange(shard, message))
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

    async def _exchange(self, shard: int, message: bytes) -> bytes:
        """One request through a free lease's slot for `shard`, driving transport.exchange with
        futures. A caller that gives up (cancelled, timed out, closed) leaves the request
        outstanding: the slot goes back to the pool when its late answer arrives."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        try:
            index = await asyncio.wait_for(self._free[shard].get(), self._request_timeout)
        except asyncio.TimeoutError:
            raise Unresponsive(f"no slot for shard {shard} came free within the request timeout: earlier requests are still unanswered") from None
        if self._closed:
            self._free[shard].put_nowait(index)  # wakes the next waiter, which sees closed too
            raise Closed("the shardkv client is closed")
        client = self._clients[index]
        channel = client._channels[shard]
        request_id = client._requester.next_id()
        deadline = time.monotonic() + self._request_timeout
        steps = exchange(channel, request_id, message)
        try:
            while True:
                future = self._loop.create_future()
                self._pending[(index, shard)] = [request_id, future, deadline]
                next(steps)  # posts a frame
                await future
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
        return self._clients[0].shard_of(key)

    # -- the API (the blocking client's, as coroutines) ------------------------------------
    async def get(self, key, default=None):
        """The value of `key`, or `default` if it is absent."""
        key = check_key(key)
        if not self._closed:
            value = self._clients[0]._get_direct(key)  # no waiting: answered from shared memory
            if value is not FALLBACK:
                return default if value is None else value
        status, body = await self._call(self._shard_of(key), m.request(m.GET, 0, m.blob(key)), read=True)
        return default if status == m.NOT_FOUND else bytes(body)

    async def put(self, key, value, ttl=None) -> None:
        """Set `key` to `value` (with `ttl`: expiring that many seconds from now)."""
        key, value = check_key(key), check_value(value, DEFAULT_MAX_VALUE_SIZE)
        if ttl is None:
            message = m.request(m.PUT, self._flags, m.blob(key), m.blob(value))
        else:
            message = m.request(m.PUT_TTL, self._flags, m.blob(key), m.blob(value), m.u64(ttl_milliseconds(ttl)))
        await self._call(self._shard_of(key), message, read=False)

    async def delete(self, key) -> bool:
        """Remove `key`; True if it was present."""
        key = check_key(key)
        _, body = await self._call(self._shard_of(key), m.request(m.DELETE, self._flags, m.blob(key)), read=False)
        return body[0] == 1

    async def cas(self, key, expected, new) -> bool:
        """Set `key` to `new` if its value is `expected` (None: absent); `new=None` deletes."""
        key = check_key(key)
        expected = None if expected is None else check_value(expected, 2**31 - 1)
        new = None if new is None else check_value(new, DEFAULT_MAX_VALUE_SIZE)
        message = m.request(m.CAS, self._flags, m.blob(key), m.optional(expected), m.optional(new))
        _, body = await self._call(self._shard_of(key), message, read=False)
        return body[0] == 1

    async def get_many(self, keys) -> list:
        """The values of `keys` (None for a missing one), in order; shards are asked at once."""
        keys = [check_key(k) for k in keys]
        by_shard: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_shard.setdefault(self._shard_of(key), []).append(i)
        shards = list(by_shard)
        async with _AsyncSnapshot(self._clients[0]) as snapshot:
            while True:
                answers = await asyncio.gather(
                    *(self._call(s, m.request(m.GET_MANY, 0, m.blob_list([keys[i] for i in by_shard[s]])), read=True) for s in shards)
                )
                if snapshot.still_valid():
                    break
                await snapshot.arestart()
        values = [None] * len(keys)
        for shard, (_, body) in zip(shards, answers):
            for i, value in zip(by_shard[shard], m.decode_optionals(body)):
                values[i] = value
        return values

    async def write(self, ops) -> None:
        """Apply operations atomically (see Client.write); Conflict if a precondition fails."""
        first = self._clients[0]
        await self._write_checked(check_ops(ops, first.max_batch_ops, first.max_batch_bytes))

    async def put_many(self, items) -> None:
        """Set every (key, value) of a mapping or iterable of pairs, atomically."""
        await self.write(put_many_ops(items, self._clients[0].max_batch_ops))

    def batch(self) -> "AsyncBatch":
        """`async with db.batch() as b:` - applied atomically when the block exits normally."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        return AsyncBatch(self._write_checked)

    async def _write_checked(self, checked: list) -> None:
        first = self._clients[0]
        check_limits(checked, first.max_batch_ops, first.max_batch_bytes)
        if self._closed:
            raise Closed("the shardkv client is closed")
        by_shard = route_ops(checked, first._map)
        if len(by_shard) == 1:
            shard, items = next(iter(by_shard.items()))
            await self._call(shard, m.encode_apply(items, self._flags), read=False)
        elif by_shard:
            await self._call(self.shards, encode_txn(by_shard, self._flags), read=False)

    async def ttl(self, key):
        """Seconds left before `key` expires, or None."""
        key = check_key(key)
        status, body = await self._call(self._shard_of(key), m.request(m.TTL, 0, m.blob(key)), read=True)
        return None if status == m.NOT_FOUND else int.from_bytes(body, "little") / 1000

    async def expire(self, key, seconds) -> bool:
        """Make `key` expire `seconds` from now (None: never); False if it is absent."""
        key = check_key(key)
        ttl_ms = 0 if seconds is None else ttl_milliseconds(seconds)
        _, body = await self._call(self._shard_of(key), m.request(m.EXPIRE, self._flags, m.blob(key), m.u64(ttl_ms)), read=False)
        return body[0] == 1

    async def len(self) -> int:
        """The number of keys (an `async` stand-in for len(db))."""
        answers = await asyncio.gather(*(self._call(s, m.request(m.LEN), read=True) for s in range(self.shards)))
        return sum(int.from_bytes(body, "little") for _, body in answers)

    def scan(self, start=None, stop=None, reverse=False, prefix=None, limit=None):
        """An async iterator of (key, value) with start <= key < stop, in key order across shards."""
        start, stop, prefix = check_scan_args(start, stop, prefix, limit)
        if self._closed:
            raise Closed("the shardkv client is closed")
        return self._scan(start, stop, bool(reverse), prefix, limit)

    async def _scan(self, start, stop, reverse, prefix, limit):
        # As Client._scan (shardkv/ipc/sortedview.py): direct reads where possible, pages
        # through the rings otherwise, merged in key order under the snapshot rules.
        async with _AsyncSnapshot(self._clients[0]) as snapshot:
            async for item in sortedview.ascan(self, start, stop, reverse, prefix, limit, snapshot):
                yield item

    def health(self) -> dict:
        """The status object of `shardkv status --json` (read from shared memory, no request)."""
        if self._closed:
            raise Closed("the shardkv client is closed")
        return self._clients[0].health()

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
