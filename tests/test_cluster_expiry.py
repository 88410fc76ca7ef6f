"""Per-key expiry through a cluster (real time: every expiry here is under a second; what must
hold before a ttl runs out is checked only while it certainly has not: clock_support)."""

import math
import time

import pytest

from clock_support import still_before, wait_past
from cluster_support import cluster_fixture


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def test_ttl_through_the_cluster(cluster):
    db = cluster.open()
    started = time.monotonic()
    db.put(b"short", b"1", ttl=0.3)
    written = time.monotonic()
    db.put(b"long", b"2", ttl=60)
    db.put(b"forever", b"3")
    value, left = db.get(b"short"), db.ttl(b"short")
    if still_before(started, 0.3):
        assert value == b"1" and 0 < left <= 0.3
    assert 50 < db.ttl(b"long") <= 60 and db.ttl(b"forever") == math.inf and db.ttl(b"missing") is None
    wait_past(written, 0.3)
    assert db.get(b"short") is None and b"short" not in db and len(db) == 2
    assert [k for k, _ in db.scan()] == [b"forever", b"long"]
    assert db.get_many([b"short", b"long"]) == [None, b"2"]
    assert db.expire(b"forever", 0.2) is True and db.expire(b"missing", 1) is False
    written = time.monotonic()
    assert db.expire(b"long", None) is True and db.ttl(b"long") == math.inf
    wait_past(written, 0.2)
    assert db.get(b"forever") is None and sorted(db) == [b"long"]


def test_expiry_is_kept_across_a_restart(cluster):
    db = cluster.open()
    db.put(b"k", b"v", ttl=0.5)
    db.put(b"stay", b"v")
    db.close()
    cluster.clients.clear()
    cluster.kill_supervisor()
    time.sleep(0.6)
    db = cluster.open()
    assert db.get(b"k") is None and db.get(b"stay") == b"v" and len(db) == 1


def test_bad_ttl_is_refused_before_sending(cluster):
    db = cluster.open()
    for bad, error in ((0, ValueError), (-2, ValueError), (float("nan"), ValueError), (1e20, ValueError), ("1", TypeError), (True, TypeError)):
        with pytest.raises(error):
            db.put(b"k", b"v", ttl=bad)
        with pytest.raises(error):
            db.expire(b"k", bad)
    assert len(db) == 0
