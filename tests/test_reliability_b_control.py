"""Issue #19, item 1: one stray 4-byte write to the control block (docs/IPC.md, "Control block")
must not take the cluster down.

Each case writes one word that the supervisor, the workers or the coordinator read (or that they
publish for clients), as any process of the owner could, and checks that within a second the
word is repaired, every shard and the coordinator serve (single-key, multi-key and cross-shard),
health is "healthy", and nothing restarts in a loop. Before the fix, `state` = STOPPING made every
worker and the coordinator exit and be restarted into the same word, over and over; a corrupted
process-table state kept a dead worker from ever being restarted or made clients fail with
CorruptionError; a corrupted shard-map entry sent keys to the wrong shard (or past the last one).

The commit counters, which only the coordinator writes, are put back by its sweep. The lease
table, which each client writes for itself, is not repaired; a stray `reading` deadline is
bounded instead (test_a_stray_reading_deadline_does_not_hold_batches_back).
"""

from __future__ import annotations

import mmap
import struct
import time

import posix_ipc
import pytest
from crc32c import crc32c

from shardkv.ipc.layout import CTL_HEADER, HASH_SLOTS, PROC_DTYPE, PROC_QUARANTINED, PROC_RESTARTING, STOPPING

from cluster_support import SHARDS, cluster_fixture, keys_by_shard, wait_until

MAP_OFFSET = CTL_HEADER.size
PROCS_OFFSET = MAP_OFFSET + 2 * HASH_SLOTS
_U32 = struct.Struct("<I")


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def _proc_field(index: int, field: str) -> int:
    return PROCS_OFFSET + index * PROC_DTYPE.itemsize + PROC_DTYPE.fields[field][1]


def _slot_key(slot: int) -> bytes:
    """A key whose hash slot is `slot`."""
    i = 0
    while crc32c(b"slot-%d" % i) >> 20 != slot:
        i += 1
    return b"slot-%d" % i


# (offset, the 4 bytes written): every word of the header, entries of the shard map, and the
# pid, state and generation of a process-table entry (the coordinator's and a shard's).
WORDS = {
    "magic": (0, b"XXXX"),
    "version and shards": (8, struct.pack("<HH", 99, 77)),
    "leases and hash_slots": (12, struct.pack("<HH", 1, 1)),
    "state = stopping": (16, _U32.pack(STOPPING)),
    "state = starting": (16, _U32.pack(0)),
    "state = garbage": (16, _U32.pack(0xDEADBEEF)),
    "map_version": (20, _U32.pack(0xFFFFFFFF)),
    "slot_size": (24, _U32.pack(1)),
    "supervisor_pid": (28, _U32.pack(1)),
    "shard map, out of range": (MAP_OFFSET, struct.pack("<HH", 999, 999)),
    "shard map, wrong shard": (MAP_OFFSET + 2 * 7, struct.pack("<HH", 7 % SHARDS ^ 1, 8 % SHARDS ^ 1)),
    "coordinator pid": (_proc_field(0, "pid"), _U32.pack(1)),
    "coordinator state = quarantined": (_proc_field(0, "state"), _U32.pack(PROC_QUARANTINED)),
    "shard pid": (_proc_field(1, "pid"), _U32.pack(1)),
    "shard state = quarantined": (_proc_field(1, "state"), _U32.pack(PROC_QUARANTINED)),
    "shard state = restarting": (_proc_field(2, "state"), _U32.pack(PROC_RESTARTING)),
    "shard state = down": (_proc_field(1, "state"), _U32.pack(0)),
    "shard generation": (_proc_field(1, "generation"), _U32.pack(12345)),
    "commits_started": (40, _U32.pack(12345)),
    "commits_finished": (48, _U32.pack(12345)),
}


# Words nobody acts on, which are not put back (docs/IPC.md, "Who writes what"): the cluster
# must only go on serving.
NOT_REPAIRED = {"map_version"}


def _serves(db, keys: list[bytes], tag: bytes, prefix: bytes = b"probe-") -> None:
    """Every kind of request works: puts and gets on every shard, get_many, a scan, a
    cross-shard batch."""
    for key in keys:
        db.put(key, tag)
    for key in keys:
        assert db.get(key) == tag, key
    assert db.get_many(keys) == [tag] * len(keys)
    db.write([("put", key, tag + b"-batch") for key in keys])
    assert dict(db.scan(prefix=prefix)) == {key: tag + b"-batch" for key in keys}


@pytest.mark.parametrize("word", list(WORDS))
def test_a_stray_write_to_the_control_block_is_repaired(cluster, word):
    offset, bad = WORDS[word]
    db = cluster.open()
    keys = [k for ks in keys_by_shard(db, 3, b"probe-%d").values() for k in ks]
    _serves(db, keys, b"before")
    info = cluster.info()
    shm = posix_ipc.SharedMemory(info["names"]["control"])
    buf = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    try:
        good = bytes(buf[offset : offset + 4])
        assert good != bad, "the test must change the word"
        restarts = [p["restarts"] for p in [db.health()["coordinator"], *db.health()["shards"]]]
        buf[offset : offset + 4] = bad

        # Repaired, and serving, within a few seconds (requests meanwhile may fail or wait).
        if word not in NOT_REPAIRED:
            try:
                wait_until(lambda: bytes(buf[offset : offset + 4]) == good, 3.0, 0.01, message=f"repair of {word}")
            finally:
                repaired = bytes(buf[offset : offset + 4])
            assert repaired == good, f"{word}: still {repaired.hex()} (was {good.hex()})"

        def healthy() -> bool:
            health = db.health()
            return health["status"] == "healthy"

        wait_until(healthy, 5.0, message=f"a healthy cluster after the write to {word}")
        if offset >= MAP_OFFSET and offset < PROCS_OFFSET:
            _serves(db, [_slot_key((offset - MAP_OFFSET) // 2), _slot_key((offset - MAP_OFFSET) // 2 + 1)], b"mapped", b"slot-")
        _serves(db, keys, b"after")
        # No restart loop: whatever restarted (nothing should) restarted once, and stays up.
        time.sleep(1.5)
        health = db.health()
        now = [p["restarts"] for p in [health["coordinator"], *health["shards"]]]
        assert now == restarts, f"{word}: processes restarted ({restarts} -> {now})"
        assert health["status"] == "healthy", health
        _serves(db, keys, b"later")
    finally:
        buf.close()


def test_a_stray_reading_deadline_does_not_hold_batches_back(cluster):
    """A lease's `reading` word (docs/TRANSACTIONS.md, "Isolation") set far ahead by a stray
    write on a live client's lease: the coordinator waits for no deadline further ahead than a
    client ever sets, so cross-shard batches do not wait 5 s each."""
    reader, writer = cluster.open(), cluster.open()
    a, b = (ks[0] for ks in keys_by_shard(writer, 1, b"pair-%d").values())
    info = cluster.info()
    shm = posix_ipc.SharedMemory(info["names"]["control"])
    buf = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    try:
        leases_offset = PROCS_OFFSET + (SHARDS + 1) * PROC_DTYPE.itemsize
        reading = leases_offset + reader.lease * 16 + 4
        now_ms = time.monotonic_ns() // 1_000_000
        buf[reading : reading + 4] = _U32.pack((now_ms + 3_600_000) & 0xFFFFFFFF)  # an hour ahead
        started = time.monotonic()
        for n in range(3):
            writer.put_many({a: b"%d" % n, b: b"%d" % n})
        took = time.monotonic() - started
    finally:
        buf.close()
    assert took < 2.0, f"3 cross-shard batches took {took:.1f} s behind a stray reading deadline"
