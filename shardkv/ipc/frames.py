"""Moving whole messages through one ring slot in frames (docs/IPC.md, "Ring").

Both sides of every ring use this module: `send` is the requester's half (a client, or the
coordinator talking to a worker), `FrameServer` the server's half (a worker, or the coordinator
serving clients). A server trusts nothing in a slot: see `FrameServer.receive`.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import posix_ipc

from shardkv.ipc import messages as m
from shardkv.ipc.layout import FLAG_MORE, SLOT_FIELDS, SLOT_HEADER_SIZE, SLOT_REQUEST, SLOT_RESPONSE, SLOT_STATE, Ring, read_frame, write_frame

NEXT_FRAME = object()  # receive(): the requester asks for the next frame of a long response

# Spin-then-sleep (docs/IPC.md, "Waking up"). Waking a process blocked on a semaphore costs
# tens of microseconds on this kind of machine (futex wake, then the scheduler and, in a VM, an
# idle vCPU coming out of halt), more than the work of a whole put (a worker handles one in
# about 15 us of Python). So a requester (client, or the coordinator towards a worker) polls its
# slot this long before blocking on its `done` semaphore. It covers a worker that is awake and
# answers a small request in 10-30 us (a put, a get, a small batch); a longer request (a big
# get_many, a scan page, an fsync) blocks after wasting at most this much.
REQUESTER_SPIN = 50e-6
# Servers (workers, the coordinator) do not poll their `wake` semaphore: measured on a 2-core
# machine, a 50 us poll took one client's puts from about 20k to 23k/s but cost 2 client
# processes 10-50% (the polling worker keeps a core from the other worker and the clients), and
# processes outnumbering cores is the common case (docs/IPC.md, "Waking up").
# Reading a payload after seeing its `state` word by polling, with no semaphore operation (a full
# barrier) in between, relies on x86-64 keeping plain stores, and plain loads, in order. Elsewhere
# nobody polls: each side blocks on its semaphore at once, as before. Draining a semaphore needs
# its count, sem_getvalue (not on every system).
_CAN_SPIN = platform.machine().lower() in ("x86_64", "amd64") and posix_ipc.SEMAPHORE_VALUE_SUPPORTED
if not _CAN_SPIN:
    REQUESTER_SPIN = 0.0
# Every poll yields the processor (sched_yield): when processes outnumber cores, a spinner hands
# its core to whoever is runnable (often the very process it waits for); alone on a core, the
# call returns at once.
_yield = os.sched_yield
_clock = time.perf_counter
_unpack_state = SLOT_STATE.unpack_from
_unpack_fields = SLOT_FIELDS.unpack_from
# Spinning that does not pay backs off: after a poll that ran out, the next 1, 2, 4 ... up to
# MAX_SKIP waits of this process block at once (one success resets it). Polls run out when the
# answer takes long (a big get_many, a scan page) or when processes outnumber cores (the one to
# answer is not running); the cost is then one budget per MAX_SKIP waits.
MAX_SKIP = 64
_skip = [0, 0]  # waits left to skip, current penalty


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
    single consumer (a client's `done` semaphore, the coordinator's `donec`) and only before looking at the slots again: a post is made after the slot state it
    announces is written, so every slot whose post is taken here is seen by that look, and the
    next blocking wait is for posts made after it. Keeps the count small when answers are found
    by polling (their posts are never waited for)."""
    if not _CAN_SPIN:
        return  # (nothing polls, so every post is waited for)
    for _ in range(semaphore.value):
        try:
            semaphore.acquire(0)
        except posix_ipc.BusyError:  # (only if someone else consumed it after all)
            return


def send(slot, capacity: int, wake, request_id: int, message: bytes, wait: Callable[[], None]) -> bytes:
    """Send `message` through `slot` (posting `wake` after each frame, calling `wait` until
    the answer to each frame is there) and return the whole response."""
    total = len(message)
    if total <= capacity:  # the common case: one frame
        write_frame(slot, SLOT_REQUEST, 0, request_id, message, total)
        wake.release()
        wait()
        _, flags, _, frame_len, _ = read_frame(slot)
    else:
        view, pos = memoryview(message), 0
        while True:
            chunk = view[pos : pos + capacity]
            pos += len(chunk)
            more = pos < total
            write_frame(slot, SLOT_REQUEST, FLAG_MORE if more else 0, request_id, chunk, total)
            wake.release()
            wait()
            _, flags, _, frame_len, response_total = read_frame(slot)
            if not (more and frame_len == 0 and response_total == 0):
                break  # the final answer (or an error that ended the message early)
    first = bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len])
    if not flags & FLAG_MORE:
        return first
    parts = [first]
    while flags & FLAG_MORE:
        write_frame(slot, SLOT_REQUEST, 0, request_id, b"", 0)
        wake.release()
        wait()
        _, flags, _, frame_len, _ = read_frame(slot)
        parts.append(bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len]))
    return b"".join(parts)


class FrameServer:
    """The serving half of a ring: reassembles requests that span frames and sends long
    responses frame by frame. One per ring; used by a single thread."""

    def __init__(self, ring: Ring, max_message: int):
        self.ring = ring
        self.max_message = max_message
        self.incoming: dict[int, tuple[int, int, bytearray]] = {}
        self.outgoing: dict[int, tuple[int, memoryview, int]] = {}

    def receive(self, slot_index: int):
        """Take the frame in slot `slot_index`: return (request_id, message, reply) where either
        `message` is a whole request to execute (reply None), or `reply` is what to answer at
        once: an error, b"" (acknowledging a frame of a longer request) or NEXT_FRAME."""
        slot = self.ring.slot(slot_index)
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
            self.outgoing.pop(slot_index, None)
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
        """Write `response` (or, for NEXT_FRAME, the next frame of the pending long response)."""
        slot = self.ring.slot(slot_index)
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
