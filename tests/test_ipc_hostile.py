"""Hostile and malformed bytes written straight into a worker's ring: the worker answers with an
error and keeps serving everyone (docs/IPC.md: "The worker trusts nothing in a slot")."""

import os
import random
import signal
import time

import posix_ipc
import pytest

import shardkv
from shardkv.coordinator.runfiles import read_cluster_file
from shardkv.ipc import messages as m
from shardkv.ipc.layout import (
    FLAG_MORE,
    SLOT_HEADER_SIZE,
    SLOT_REQUEST,
    SLOT_RESPONSE,
    SLOT_STATE,
    name_prefix,
    read_frame,
    write_frame,
)

import client_support as cs

pytestmark = pytest.mark.cluster


@pytest.fixture
def db(tmp_path):
    client = shardkv.open(tmp_path / "store", shards=1)
    info = read_cluster_file(client.directory)
    try:
        yield client
    finally:
        client.close()
        os.kill(info["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        prefix = name_prefix(client.directory)[1:]
        assert not [e for e in os.listdir("/dev/shm") if e.startswith(prefix) or e.startswith("sem." + prefix)]


def raw_exchange(db, frame_state, flags, request_id, payload, total_len, write_payload=True):
    """Write one frame as a hostile client would (bypassing the client's own encoding)."""
    slot = cs.ring(db, 0).slot(db.lease)
    if write_payload:
        write_frame(slot, frame_state, flags, request_id, payload, total_len)
    cs.wake(db, 0).release()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            cs.answered(db).acquire(0.1)
        except posix_ipc.BusyError:
            pass
        state, _, rid, frame_len, _ = read_frame(slot)
        if state == SLOT_RESPONSE and rid == request_id:
            return bytes(slot[SLOT_HEADER_SIZE : SLOT_HEADER_SIZE + frame_len])
    raise AssertionError("the worker did not answer")


def expect_error(response):
    with pytest.raises((ValueError, TypeError)):
        m.parse_response(response)


def test_malformed_messages_get_errors_and_the_worker_keeps_serving(db):
    db.put(b"alive", b"yes")
    cases = [
        bytes([m.GET, 0]),  # no key field
        bytes([m.GET, 0]) + (1000).to_bytes(4, "little") + b"short",  # length past the end
        bytes([m.GET, 0]) + (0).to_bytes(4, "little"),  # empty key
        bytes([m.PUT, 0]) + (3).to_bytes(4, "little") + b"abc",  # value missing
        bytes([m.APPLY, 0]) + (2**31).to_bytes(4, "little"),  # absurd list length
        bytes([m.CAS, 0]) + m.blob(b"k") + b"\x07",  # bad presence byte
        bytes([m.SCAN, 0]) + b"\x02",
        bytes([250, 0]),  # unknown op
        bytes([m.GET]),  # one byte
        bytes([m.LEN, 0]) + b"trailing",
        bytes([m.GET_MANY, 0]) + (10**6).to_bytes(4, "little"),  # more items than bytes
        bytes([m.GET_MANY, 0]) + (1).to_bytes(4, "little") + (50).to_bytes(4, "little") + b"abc",  # item past the end
        bytes([m.GET_MANY, 0]) + (1).to_bytes(4, "little") + m.blob(b"k") + b"x",  # trailing byte
        bytes([m.GET_MANY, 0]) + (1).to_bytes(4, "little") + m.blob(b""),  # empty key
    ]
    for i, payload in enumerate(cases):
        expect_error(raw_exchange(db, SLOT_REQUEST, 0, 1000 + i, payload, len(payload)))
        assert db.get(b"alive") == b"yes", f"worker stopped serving after case {i}"


def test_bad_frame_headers(db):
    capacity = cs.ring(db, 0).capacity
    slot = cs.ring(db, 0).slot(db.lease)
    # frame_len larger than the slot: forge the header directly
    write_frame(slot, SLOT_REQUEST, 0, 1, b"x", 1)
    slot[16:20] = (capacity + 1).to_bytes(4, "little")
    expect_error(raw_exchange(db, SLOT_REQUEST, 0, 1, b"", 0, write_payload=False))
    # total_len over the message limit
    expect_error(raw_exchange(db, SLOT_REQUEST, FLAG_MORE, 2, b"x" * 10, 2**40))
    # frames that add up to more than total_len
    raw = raw_exchange(db, SLOT_REQUEST, FLAG_MORE, 3, b"y" * 10, 12)
    assert raw == b""  # acknowledged: send the next frame
    expect_error(raw_exchange(db, SLOT_REQUEST, 0, 3, b"z" * 10, 12))
    # an empty request that continues nothing
    expect_error(raw_exchange(db, SLOT_REQUEST, 0, 4, b"", 0))
    db.put(b"k", b"v")
    assert db.get(b"k") == b"v"


def test_random_garbage_never_stops_the_worker(db):
    rng = random.Random(7)
    for i in range(300):
        payload = rng.randbytes(rng.randrange(0, 64))
        if payload and payload[0] in (m.PUT, m.DELETE, m.CAS, m.APPLY, m.COMPACT):
            payload = bytes([m.GET]) + payload[1:]  # garbage reads only: keep the store's content known
        total = len(payload) if rng.random() < 0.8 else rng.randrange(0, 1 << 20)
        flags = FLAG_MORE if rng.random() < 0.1 else 0
        response = raw_exchange(db, SLOT_REQUEST, flags, 5000 + i, payload, total)
        if flags and response == b"":
            raw_exchange(db, SLOT_REQUEST, 0, 5000 + i, b"", 0)  # end the message one way or another
    db.put(b"still", b"serving")
    assert db.get(b"still") == b"serving"
    assert SLOT_STATE.unpack_from(cs.ring(db, 0).slot(db.lease), 0)[0] == SLOT_RESPONSE
