"""Moving whole messages through one ring slot in frames (docs/IPC.md, "Ring").

Both sides of every ring use this module: `send` is the requester's half (a client, or the
coordinator talking to a worker), `FrameServer` the server's half (a worker, or the coordinator
serving clients). A server trusts nothing in a slot: see `FrameServer.receive`.
"""

from __future__ import annotations

from typing import Callable

from shardkv.ipc import messages as m
from shardkv.ipc.layout import FLAG_MORE, SLOT_HEADER_SIZE, SLOT_REQUEST, SLOT_RESPONSE, Ring, read_frame, write_frame

NEXT_FRAME = object()  # receive(): the requester asks for the next frame of a long response


def send(slot, capacity: int, wake, request_id: int, message: bytes, wait: Callable[[], None]) -> bytes:
    """Send `message` through `slot` (posting `wake` after each frame, calling `wait` until
    the answer to each frame is there) and return the whole response."""
    view, total, pos = memoryview(message), len(message), 0
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
    parts = [bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len])]
    while flags & FLAG_MORE:
        write_frame(slot, SLOT_REQUEST, 0, request_id, b"", 0)
        wake.release()
        wait()
        _, flags, _, frame_len, _ = read_frame(slot)
        parts.append(bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len]))
    return parts[0] if len(parts) == 1 else b"".join(parts)


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
