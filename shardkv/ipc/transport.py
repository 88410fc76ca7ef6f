"""The ring transport: the one piece of code that moves messages through ring slots
(docs/IPC.md, "Ring", "Request ids", "Waking up").

Requesting side — a client's lease, an asyncio client's leases, the coordinator towards the
workers:

- `Channel`: one slot of one ring and the semaphore that wakes its server. It remembers the id
  of a request of ours still in flight there (`outstanding`): a call cut short (Ctrl-C, an
  exception from a signal handler, asyncio cancellation, close(), a timeout) leaves it set, and
  the next request on the channel first waits for that request's late answer and drops it,
  instead of taking it for its own answer or overwriting a slot the server may be reading.
- `exchange`: the frames of one request and of its response, as a generator that posts a frame
  and yields until it is answered; `Requester` drives it with blocking waits, the asyncio
  client with futures.
- `Requester`: blocking waits on one `done` semaphore (spin, then sleep), with a deadline, a
  liveness check of the serving side, signals retried (PEP 475) and close() from any thread.

Serving side — shard workers and the coordinator: `RingServer`, which trusts nothing in a
slot, reassembles requests that span frames, sends long answers frame by frame, and posts the
requester's `done` semaphore after each answer.
"""

from __future__ import annotations

import os
import platform
import secrets
import time
from typing import Callable, Iterator

import numpy as np
import posix_ipc

from shardkv.errors import Closed, CorruptionError, Unavailable
from shardkv.ipc import messages as m
from shardkv.ipc.layout import FLAG_MORE, SLOT_FIELDS, SLOT_HEADER_SIZE, SLOT_REQUEST, SLOT_RESPONSE, SLOT_STATE, Ring, read_frame, write_frame

# Spin-then-sleep (docs/IPC.md, "Waking up"). Waking a process blocked on a semaphore costs
# tens of microseconds on this kind of machine (futex wake, then the scheduler and, in a VM, an
# idle vCPU coming out of halt), more than the work of a whole put (a worker handles one in
# about 15 us of Python). So a requester polls its slot this long before blocking on its `done`
# semaphore. It covers a worker that is awake and answers a small request in 10-30 us (a put, a
# get, a small batch); a longer request (a big get_many, a scan page, an fsync) blocks after
# wasting at most this much.
REQUESTER_SPIN = 50e-6
# Servers do not poll their `wake` semaphore: measured on a 2-core machine, a 50 us poll took
# one client's puts from about 20k to 23k/s but cost 2 client processes 10-50% (the polling
# worker keeps a core from the other worker and the clients), and processes outnumbering cores
# is the common case. Reading a payload after seeing its `state` word by polling, with no
# semaphore operation (a full barrier) in between, relies on x86-64 keeping plain stores, and
# plain loads, in order. Elsewhere nobody polls: each side blocks on its semaphore at once.
# Draining a semaphore needs its count, sem_getvalue (not on every system).
_CAN_SPIN = platform.machine().lower() in ("x86_64", "amd64") and posix_ipc.SEMAPHORE_VALUE_SUPPORTED
if not _CAN_SPIN:
    REQUESTER_SPIN = 0.0
# Spinning that does not pay backs off: after a poll that ran out, the next 1, 2, 4 ... up to
# MAX_SKIP waits of this process block at once (one success resets it). Polls run out when the
# answer takes long or when processes outnumber cores (the one to answer is not running).
MAX_SKIP = 64
_skip = [0, 0]  # waits left to skip, current penalty

# A blocked requester wakes at least this often, to see close() and its deadline.
WAIT_SLICE = 0.2
# The first liveness check of the serving side comes this long into a wait, the next ones
# every CHECK_INTERVAL: a process that died or was quarantined is noticed within about a second.
FIRST_CHECK = 0.2
CHECK_INTERVAL = 1.0

NEXT_FRAME = object()  # RingServer.receive(): the requester asks for the next frame of a long response

_yield = os.sched_yield  # every poll yields the processor: a spinner hands its core to whoever is runnable
_clock = time.perf_counter
_monotonic = time.monotonic
_unpack_state = SLOT_STATE.unpack_from
_unpack_fields = SLOT_FIELDS.unpack_from


class Unresponsive(Unavailable):
    """The serving process is alive but did not answer within the deadline (stopped, wedged or
    overloaded); a write may or may not have been applied."""


# -- requesting side ---------------------------------------------------------------------------
class Channel:
    """One slot of one ring, as the requester that owns it sees it."""

    __slots__ = ("slot", "capacity", "wake", "target", "name", "outstanding")

    def __init__(self, ring: Ring, index: int, wake, target: int, name: str):
        self.slot = ring.slot(index)
        self.capacity = ring.capacity
        self.wake = wake
        self.target = target  # what the owner calls the server (a shard number), for its checks
        self.name = name  # for messages: "shard 3", "the coordinator"
        # A request a previous owner of the slot left in flight (a killed client, a previous
        # coordinator) is treated as ours: its answer is waited for before the slot is reused.
        state, _, request_id, _, _ = read_frame(self.slot)
        self.outstanding: int | None = request_id if state == SLOT_REQUEST else None

    def post(self, flags: int, request_id: int, payload, total: int) -> None:
        """Write one request frame (state last) and wake the server."""
        self.outstanding = request_id
        write_frame(self.slot, SLOT_REQUEST, flags, request_id, payload, total)
        self.wake.release()

    def answered(self, request_id: int) -> bool:
        """True once the slot holds the server's answer to `request_id`."""
        slot = self.slot
        return _unpack_state(slot, 0)[0] == SLOT_RESPONSE and _unpack_fields(slot, 4)[1] == request_id


def exchange(channel: Channel, request_id: int, message: bytes):
    """One request and its response, frame by frame (docs/IPC.md, "Ring"), as a generator: it
    posts a frame and yields; whoever drives it resumes it once `channel.answered(request_id)`
    and has cleared `channel.outstanding`. It returns (StopIteration.value) the whole response.

    A driver that stops early (an exception while waiting) leaves `outstanding` set: the slot's
    next request then waits for this one's answer first (Requester.settle)."""
    slot, capacity, total = channel.slot, channel.capacity, len(message)
    if total <= capacity:  # the common case: one frame each way
        channel.post(0, request_id, message, total)
        yield
        _, flags, _, frame_len, _ = read_frame(slot)
    else:
        view, pos = memoryview(message), 0
        while True:
            chunk = view[pos : pos + capacity]
            pos += len(chunk)
            more = pos < total
            channel.post(FLAG_MORE if more else 0, request_id, chunk, total)
            yield
            _, flags, _, frame_len, response_total = read_frame(slot)
            if not (more and frame_len == 0 and response_total == 0):
                break  # the final answer (or an error that ended the message early)
    first = bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + min(frame_len, capacity)])
    if not flags & FLAG_MORE:
        return first
    return (yield from rest_of_response(channel, request_id, first))


def rest_of_response(channel: Channel, request_id: int, first: bytes):
    """The frames after `first` of a long response (MORE set), driven like `exchange`."""
    slot, capacity, flags, parts = channel.slot, channel.capacity, FLAG_MORE, [first]
    while flags & FLAG_MORE:
        channel.post(0, request_id, b"", 0)  # an empty frame asks for the next one
        yield
        _, flags, _, frame_len, _ = read_frame(slot)
        parts.append(bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + min(frame_len, capacity)]))
    return b"".join(parts)


def spin_for_response(slot, request_id: int) -> bool:
    """Poll `slot` for at most REQUESTER_SPIN seconds; True once it holds the response to
    `request_id` (the requester then need not block on its `done` semaphore)."""
    if _skip[0]:
        _skip[0] -= 1
        return False
    deadline = _clock() + REQUESTER_SPIN
    while True:
        if _unpack_state(slot, 0)[0] == SLOT_RESPONSE and _unpack_fields(slot, 4)[1] == request_id:
            _skip[1] = 0
            return True
        if _clock() >= deadline:
            _skip[1] = min(2 * _skip[1] or 1, MAX_SKIP)
            _skip[0] = _skip[1]
            return False
        _yield()


def drain(semaphore) -> None:
    """Take every post `semaphore` holds now, without blocking. Only for a semaphore with a
    single consumer (a lease's `done`, the coordinator's `donec`) and only before looking at the
    slots again: a post is made after the slot state it announces is written, so every slot
    whose post is taken here is seen by that look, and the next blocking wait is for posts made
    after it. Keeps the count small when answers are found by polling (their posts are never
    waited for), and drops the posts of late answers to abandoned requests."""
    if not _CAN_SPIN:
        return  # (nothing polls, so every post is waited for)
    for _ in range(semaphore.value):
        try:
            semaphore.acquire(0)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return


class Requester:
    """Blocking requests over channels that share one `done` semaphore (a lease's, or the
    coordinator's towards the workers). One thread at a time: the owner serialises calls.

    `check(channel)` is the liveness check of the serving side, called about once a second of a
    wait: it raises (CorruptionError for a quarantined shard, Unavailable for a dead cluster)
    to end the wait. `close()` may be called from any thread; a wait in progress then raises
    Closed within WAIT_SLICE."""

    def __init__(self, done, check: Callable[[Channel], None]):
        self.done = done
        self.check = check
        self.closing = False
        self._request_id = secrets.randbits(62)

    def next_id(self) -> int:
        """A request id not used recently on any of this requester's channels."""
        self._request_id = (self._request_id + 1) & 0xFFFFFFFFFFFFFFFF
        return self._request_id

    def call(self, channel: Channel, message: bytes, timeout: float) -> bytes:
        """Send `message` through `channel` and return the whole response; Unresponsive if no
        answer came within `timeout` seconds (the request stays outstanding: see exchange)."""
        if self.closing:
            raise Closed("the shardkv client is closed")
        deadline = _monotonic() + timeout
        if channel.outstanding is not None:
            self.settle(channel, deadline)
        request_id = self.next_id()
        total = len(message)
        if total <= channel.capacity:
            # The common case, written out (no generator): one frame out, then the answer.
            channel.post(0, request_id, message, total)
            self.wait(channel, request_id, deadline)
            slot = channel.slot
            _, flags, _, frame_len, _ = read_frame(slot)
            first = bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + min(frame_len, channel.capacity)])
            if not flags & FLAG_MORE:
                return first
            steps = rest_of_response(channel, request_id, first)
        else:
            steps = exchange(channel, request_id, message)
        try:
            while True:
                next(steps)
                self.wait(channel, request_id, deadline)
        except StopIteration as finished:
            return finished.value

    def call_many(self, calls: list[tuple[Channel, bytes]], timeout: float, after_first_post: Callable[[], None] | None = None) -> list:
        """Send each message through its own channel at once, then wait for every answer: the
        responses (bytes) in order, or for a channel whose server did not answer (or whose
        liveness check failed) the exception. Closed and anything from a signal handler
        propagate. `after_first_post` runs once the first message is out (a fault point)."""
        if self.closing:
            raise Closed("the shardkv client is closed")
        deadline = _monotonic() + timeout
        results: list = [None] * len(calls)
        active: dict[int, tuple[Channel, int, object]] = {}
        for i, (channel, message) in enumerate(calls):
            try:
                if channel.outstanding is not None:
                    self.settle(channel, deadline)
            except (Unavailable, CorruptionError) as exc:
                results[i] = exc
                continue
            request_id = self.next_id()
            steps = exchange(channel, request_id, message)
            next(steps)
            active[i] = (channel, request_id, steps)
            if after_first_post is not None and len(calls) > 1:
                after_first_post()
                after_first_post = None
        while active:
            for i, (channel, request_id, steps) in list(active.items()):
                try:
                    self.wait(channel, request_id, deadline)
                    next(steps)  # a further frame of a long message went out
                except StopIteration as finished:
                    results[i] = finished.value
                    del active[i]
                except (Unavailable, CorruptionError) as exc:
                    results[i] = exc
                    del active[i]
        return results

    def settle(self, channel: Channel, deadline: float) -> None:
        """Wait for the answer to the request left outstanding on `channel` and drop it."""
        self.wait(channel, channel.outstanding, deadline)

    def wait(self, channel: Channel, request_id: int, deadline: float) -> None:
        """Block until `channel` holds the answer to `request_id`: poll for a few tens of
        microseconds, then sleep on `done` in slices, checking close(), the deadline and the
        serving side's liveness. A signal whose handler returns resumes the wait (PEP 475); an
        exception from a handler propagates and leaves the request outstanding."""
        done = self.done
        # Posts of answers found by polling were never waited for: take them now (before the
        # slot is looked at again, see drain) so they neither pile up nor wake the wait below.
        drain(done)
        if spin_for_response(channel.slot, request_id):
            channel.outstanding = None
            return
        next_check = _monotonic() + FIRST_CHECK
        while True:
            if channel.answered(request_id):
                channel.outstanding = None
                return
            if self.closing:
                raise Closed(f"the client was closed while waiting for {channel.name}; the request may or may not have been applied")
            now = _monotonic()
            if now >= deadline:
                raise Unresponsive(f"{channel.name} did not answer in time (request_timeout); the request may or may not have been applied")
            if now >= next_check:
                self.check(channel)
                next_check = now + CHECK_INTERVAL
            try:
                done.acquire(min(WAIT_SLICE, next_check - now, deadline - now))
            except posix_ipc.BusyError:
                pass
            except posix_ipc.SignalError:
                pass  # a handler that returned: wait on (one that raised has raised by now)

    def close(self) -> None:
        """Make a wait in progress in another thread end with Closed (soon: it is woken)."""
        self.closing = True
        try:
            self.done.release()
        except posix_ipc.Error:
            pass


# -- serving side ------------------------------------------------------------------------------
class RingServer:
    """The serving half of one ring (a shard worker's, or the coordinator's): finds the slots
    holding requests, reassembles requests that span frames, answers (long answers frame by
    frame) and posts the requester's `done` semaphore. Used by a single thread.

    `done[i]` is the semaphore to post after answering slot i. `live_slots()`, if given, names
    the slots worth looking at first (those of live leases): most wake-ups then cost no scan of
    the whole ring."""

    def __init__(self, ring: Ring, wake, done: list, max_message: int, live_slots: Callable[[], list[int]] | None = None):
        self.ring = ring
        self.wake = wake
        self.done = done
        self.max_message = max_message
        self.live_slots = live_slots
        self.incoming: dict[int, tuple[int, int, bytearray]] = {}
        self.outgoing: dict[int, tuple[int, memoryview, int]] = {}
        self._slots = [ring.slot(i) for i in range(ring.leases)]
        self._active: list[int] = []

    def serve(self, running: Callable[[], bool], timeout: float) -> Iterator[list[int]]:
        """The serve loop of workers and the coordinator: after each wake-up (or `timeout`
        seconds without one) while `running()`, yield the slots holding requests (maybe none,
        so the caller can do its periodic work)."""
        wake = self.wake
        while True:
            try:
                wake.acquire(timeout)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass
            if not running():
                return
            yield self.ready()

    def ready(self) -> list[int]:
        """The slots holding a request now, in slot order."""
        slots = self._slots
        ready = [i for i in self._active if _unpack_state(slots[i], 0)[0] == SLOT_REQUEST]
        if ready:
            return ready
        if self.live_slots is not None:
            self._active = self.live_slots()
        return np.flatnonzero(self.ring.states == SLOT_REQUEST).tolist()

    def abandon_stale(self, error: Exception) -> None:
        """Answer `error` to every request left in the ring by a previous server process (it may
        have executed them already: running them twice is not safe)."""
        for slot in np.flatnonzero(self.ring.states == SLOT_REQUEST).tolist():
            self.answer(slot, read_frame(self._slots[slot])[2], m.error_response(error))

    def receive(self, slot_index: int):
        """Take the frame in slot `slot_index`: return (request_id, message, reply) where either
        `message` is a whole request to execute (reply None), or `reply` is what to answer at
        once: an error, b"" (acknowledging a frame of a longer request) or NEXT_FRAME."""
        slot = self._slots[slot_index]
        _, flags, request_id, frame_len, total_len = read_frame(slot)
        if frame_len > self.ring.capacity or total_len > self.max_message:
            self.incoming.pop(slot_index, None)
            return request_id, None, m.error_response(ValueError(f"frame of {frame_len} bytes (message {total_len}) is over the limits"))
        if frame_len == 0 and total_len == 0:
            pending = self.outgoing.get(slot_index)
            if pending is not None and pending[0] == request_id:
                return request_id, None, NEXT_FRAME
            return request_id, None, m.error_response(ValueError("empty request"))
        if self.outgoing:
            self.outgoing.pop(slot_index, None)  # a new request: the rest of a long answer is dropped
        if not flags & FLAG_MORE and frame_len == total_len and slot_index not in self.incoming:
            return request_id, bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len]), None  # the common case: one frame
        payload = slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len]
        partial = self.incoming.pop(slot_index, None)
        if partial is not None and partial[0] == request_id:
            if partial[1] != total_len:
                return request_id, None, m.error_response(ValueError("frame does not continue the message in progress"))
            buffer = partial[2]
            buffer += payload
        else:
            buffer = bytearray(payload)  # a new message (a partial one of another request is dropped)
        if len(buffer) > total_len or (not flags & FLAG_MORE and len(buffer) != total_len):
            return request_id, None, m.error_response(ValueError(f"frames add up to {len(buffer)} bytes, not {total_len}"))
        if flags & FLAG_MORE:
            self.incoming[slot_index] = (request_id, total_len, buffer)
            return request_id, None, b""  # acknowledge: send the next frame
        return request_id, bytes(buffer), None

    def respond(self, slot_index: int, request_id: int, response) -> None:
        """Write `response` (or, for NEXT_FRAME, the next frame of the pending long response)
        into the slot, without waking the requester (see answer)."""
        slot = self._slots[slot_index]
        capacity = self.ring.capacity
        if response is NEXT_FRAME:
            _, rest, total = self.outgoing.pop(slot_index)
        elif response == b"":
            write_frame(slot, SLOT_RESPONSE, 0, request_id, b"", 0)
            return
        else:
            rest, total = memoryview(response), len(response)
        frame, rest = rest[:capacity], rest[capacity:]
        if len(rest):
            self.outgoing[slot_index] = (request_id, rest, total)
        write_frame(slot, SLOT_RESPONSE, FLAG_MORE if len(rest) else 0, request_id, frame, total)

    def answer(self, slot_index: int, request_id: int, response) -> None:
        """Respond and wake the requester."""
        self.respond(slot_index, request_id, response)
        self.done[slot_index].release()
