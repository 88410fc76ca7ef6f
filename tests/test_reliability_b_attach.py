"""Issue #19, item 7: `open()` must not attach to an embedded cluster that is shutting down.

An embedded cluster stops a few seconds after its last client is gone. Before the fix a client
could read its ready description and take a lease after the supervisor had decided to stop: its
first call then failed with Unavailable (2 in 25 attempts timed around the idle stop). Now the
decision and the attach exclude each other through run/attach.lock (docs/IPC.md, "Leases").
SHARDKV_IDLE_TIMEOUT shortens the idle time so that the tests meet many stops.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time

import posix_ipc
import pytest

import shardkv
from shardkv.ipc.layout import CTL_STATE, CTL_STATE_OFFSET, STOPPING

from cluster_support import SHARDS, alive, cluster_fixture, cluster_pids, wait_until

IDLE = 0.4


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDKV_IDLE_TIMEOUT", str(IDLE))  # inherited by the supervisors open() starts
    yield from cluster_fixture(tmp_path / "db")


def _use(db, tag: bytes) -> None:
    db.put(b"key", tag)
    assert db.get(b"key") == tag
    db.write([("put", b"a-" + tag, tag), ("put", b"b-" + tag, tag)])


def test_open_while_the_idle_cluster_stops_attaches_to_the_next_one(cluster):
    """The test watches the control block of an idle embedded cluster and opens the store the
    moment it says STOPPING: the client must not take a lease there (its first call failed)."""
    for attempt in range(3):
        db = shardkv.open(cluster.directory, shards=SHARDS)
        _use(db, b"first-%d" % attempt)
        info = cluster.info()
        shm = posix_ipc.SharedMemory(info["names"]["control"])
        buf = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)
        shm.close_fd()
        try:
            db.close()
            wait_until(lambda: CTL_STATE.unpack_from(buf, CTL_STATE_OFFSET)[0] == STOPPING, 20, 0.0005, message="the idle stop")
            late = shardkv.open(cluster.directory, shards=SHARDS)
        finally:
            buf.close()
        try:
            with cluster.watchdog(30, "the first calls of a client opened during an idle stop"):
                _use(late, b"late-%d" % attempt)
            assert late.cluster_id != info["cluster"], "attached to the cluster that was stopping"
        finally:
            late.close()
        wait_until(lambda: not alive(info["pid"], info["start_time"]), 20, message="the exit of the stopped supervisor")


def test_an_idle_cluster_does_not_stop_while_a_client_is_attaching(cluster):
    """Holding attach.lock shared (a client between its check and its lease) keeps an idle
    embedded cluster from deciding to stop; letting go lets it stop."""
    db = shardkv.open(cluster.directory, shards=SHARDS)
    _use(db, b"x")
    info = cluster.info()
    fd = os.open(os.path.join(cluster.directory, "run", "attach.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        db.close()
        time.sleep(IDLE + 2.0)
        assert alive(info["pid"], info["start_time"]) and cluster.info()["pid"] == info["pid"], "the cluster stopped while a client was attaching"
    finally:
        os.close(fd)
    wait_until(lambda: not cluster_pids(cluster.directory), 20, message="the idle stop once nobody attaches")
