"""`shardkv salvage` keeps every record's expiry and drops what has expired (issue #19, item 2).

Before the fix, salvage copied each key's newest value with no TTL: a key that had expired in
the source was readable again in the copy, and a key with a TTL lived for ever. Covered here:
- the issue's sequence through a real cluster and the CLI (`put(short, ttl=1)`,
  `put(long, ttl=3600)`, 1.5 s, `shardkv stop`, `shardkv salvage SRC DST`);
- in one shard: the expiry instant of every copied record is the source's, to the
  millisecond; a key whose newest record has expired stays gone even when an older record of it
  never expires; `expire(k, None)` (permanent again) and a TTL inside a batch are kept.
"""

from __future__ import annotations

import math

import os
import subprocess
import sys
import time

import pytest

import shardkv
from shardkv.coordinator.manifest import shard_directory
from shardkv.ops.salvage import salvage_store
from shardkv.ops.verify import verify_store
from shardkv.shards import ShardEngine
from shardkv.wal import iter_records
from shardkv.wal.format import PUT

from clock_support import FakeClock
from cluster_support import cluster_fixture

CLI_TIMEOUT = 60


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardkv.cli", *map(str, args)], capture_output=True, text=True, timeout=CLI_TIMEOUT)


def newest_expiry(directory: str) -> dict[bytes, int]:
    """key -> expires_at (ms, 0: never) of each key's newest PUT record in a shard directory."""
    newest: dict[bytes, tuple[int, int]] = {}
    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".log"))
    for path in paths:
        for record in iter_records(path, active=True):
            if record.type == PUT and (record.key not in newest or record.seq >= newest[record.key][0]):
                newest[record.key] = (record.seq, record.expires_at)
    return {key: at for key, (_, at) in newest.items()}


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def test_salvage_after_stop_drops_expired_keys_and_keeps_ttls(cluster, tmp_path):
    """The issue's sequence, word for word."""
    started = cli("start", cluster.directory, "--shards", "2")
    assert started.returncode == 0, started.stderr
    with shardkv.open(cluster.directory) as db:
        db.put(b"short", b"s", ttl=1)
        db.put(b"long", b"l", ttl=3600)
        db.put(b"plain", b"p")
        shards = db.shards
        put_at = time.time()
    time.sleep(1.5)
    stopped = cli("stop", cluster.directory)
    assert stopped.returncode == 0, stopped.stderr
    destination = tmp_path / "salvaged"
    salvaged = cli("salvage", cluster.directory, destination)
    assert salvaged.returncode == 0, salvaged.stdout + salvaged.stderr
    assert "saved 2 keys" in salvaged.stdout, salvaged.stdout
    assert verify_store(str(destination))["ok"]
    found = {}
    for shard in range(shards):
        with ShardEngine.open(shard_directory(str(destination), shard), shard_id=shard) as engine:
            for key in (b"short", b"long", b"plain"):
                if engine.get(key) is not None:
                    found[key] = (engine.get(key), engine.ttl(key))
    assert b"short" not in found, "an expired key came back"
    assert found[b"plain"] == (b"p", math.inf)
    value, left = found[b"long"]
    assert value == b"l" and left is not None, "the TTL was dropped"
    assert 3600 - (time.time() - put_at) - 1 <= left <= 3600


@pytest.mark.engine
def test_salvage_copies_each_expiry_instant_exactly(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    with ShardEngine.open(source, segment_size=4096, durability="process") as engine:
        for i in range(300):
            engine.put(b"k%03d" % i, b"v%d" % i * 20, ttl=None if i % 3 == 0 else 1000 + i)
        engine.apply([("put", b"batch-ttl", b"b", 77), ("put", b"batch-plain", b"c")])
        engine.put(b"made-permanent", b"m", ttl=50)
        engine.expire(b"made-permanent", None)
        engine.put(b"made-expiring", b"e")
        engine.expire(b"made-expiring", 500)
    expected = newest_expiry(str(source))
    report = salvage_store(str(source), str(destination))
    assert report["keys"] == 304 and report["problems"] == []
    assert newest_expiry(str(destination)) == expected
    with ShardEngine.open(destination) as engine:
        assert engine.ttl(b"made-permanent") == math.inf and engine.get(b"made-permanent") == b"m"
        assert 499 < engine.ttl(b"made-expiring") <= 500
        assert 76 < engine.ttl(b"batch-ttl") <= 77 and engine.ttl(b"batch-plain") == math.inf


@pytest.mark.engine
def test_a_key_whose_newest_record_expired_stays_gone(tmp_path):
    """Its older, permanent record is still in the log: salvage must not fall back to it."""
    source, destination = tmp_path / "src", tmp_path / "dst"
    # Written a minute ago by the engine's clock: expired by the real one that salvage reads.
    clock = FakeClock(time.time() - 60)
    with ShardEngine.open(source, segment_size=4096, durability="process", clock=clock) as engine:
        engine.put(b"was-permanent", b"old")
        engine.put(b"was-permanent", b"new", ttl=0.3)
        engine.put(b"stays", b"s", ttl=0.3)
        engine.put(b"stays", b"s2")  # the newest record never expires
        clock.advance(0.3)
        assert engine.get(b"was-permanent") is None
    salvage_store(str(source), str(destination))
    with ShardEngine.open(destination) as engine:
        assert engine.get(b"was-permanent") is None
        assert engine.get(b"stays") == b"s2" and engine.ttl(b"stays") == math.inf
        assert len(engine) == 1


@pytest.mark.engine
def test_put_records_keeps_instants_skips_the_expired_and_checks_its_arguments(tmp_path):
    with ShardEngine.open(tmp_path, durability="process") as engine:
        now = int(time.time() * 1000)
        assert engine.put_records([(b"a", b"1", 0), (b"b", b"2", now + 60_000), (b"gone", b"3", now - 1)]) == 2
        assert engine.get(b"gone") is None and engine.ttl(b"a") == math.inf and 59 < engine.ttl(b"b") <= 60
        with pytest.raises(TypeError):
            engine.put_records([(b"c", b"1", "soon")])
        with pytest.raises(ValueError):
            engine.put_records([(b"c", b"1", -5)])
        with pytest.raises(ValueError):
            engine.put_records([(b"", b"1", 0)])
        assert engine.get(b"c") is None and len(engine) == 2
    assert newest_expiry(str(tmp_path)) == {b"a": 0, b"b": now + 60_000}
