"""Garbage in a worker's shared index table (issue #19, item 1).

A shard worker's hash index lives in /dev/shm, where clients read it; any process of the same
user can write there. Before the fix, compaction took what to keep from that table: with its
locations overwritten it copied nothing (or the wrong records), reported every key kept, and
deleted the input segments - the data was gone after a restart, and `verify` saw nothing wrong
because every record left on disk was intact.

Now compaction decides what is live from the log (the segments' record tables), compares that
with the table, and on any disagreement rebuilds the published table from the log, logs
`index repaired` and counts it in the shard's stats (`index_repairs`). Covered here:
- garbage of several shapes (random bytes, zeros, half the table, entries pointed at an older
  record, slots cleared) written by another process: compaction keeps every key, the engine and
  a client's direct reads answer right after it, and so does a reopen;
- an intact index is never "repaired" (workloads with overwrites, deletes, batches, expiry,
  cross-shard commits, reopens and repeated compactions);
- a client reading a garbage table never returns bytes that are not the key's stored value
  (the reader checks key and CRC-32C of the record; a garbage table can hide a key from it, as
  it hides it from the worker, until the repair);
- the same through a real cluster: `db.compact()` after the garbage, `health()` shows the repair
  for that shard only, the worker's log has the event, and every key survives a restart.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from crc32c import crc32c

from shardkv.ipc.sharedindex import FALLBACK, HEADER, SUPPORTED, TABLE_HEADER, table_name
from shardkv.ops.metrics import render_prometheus
from shardkv.ops.status import collect_status

import client_support as cs
from cluster_support import cluster_fixture, keys_by_shard, wait_until
from engine_support import key_index
from test_shared_index import Shard

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the shared index is x86-64 only (elsewhere the index is private)")


@pytest.fixture
def shard(tmp_path):
    s = Shard(tmp_path / "shard", segment_size=1 << 16)
    yield s
    s.close()
    assert s.shm_entries() == [], "shared memory left behind"


# -- writing garbage from another process -----------------------------------------------------------
WRITER = r"""
import os, random, sys
path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
size = os.path.getsize(path)
with open(path, "r+b") as f:
    if mode == "random":
        f.seek(64); f.write(rng.randbytes(size - 64))
    elif mode == "zeros":
        f.seek(64); f.write(bytes(size - 64))
    elif mode == "half":
        f.seek(size // 2); f.write(rng.randbytes(size - size // 2))
    else:  # "at OFFSET HEX": these bytes at that offset
        f.seek(int(mode.split()[1])); f.write(bytes.fromhex(mode.split()[2]))
"""


def current_table(prefix: str, shard: int, header) -> str:
    """The /dev/shm path of the table the index header names."""
    number = HEADER.unpack_from(header, 0)[4]
    return "/dev/shm" + table_name(prefix, shard, number)


def scribble(path: str, mode: str, seed: int = 0) -> None:
    """Write garbage into the shared-memory object at `path` from another process."""
    subprocess.run([sys.executable, "-c", WRITER, path, mode, str(seed)], check=True, timeout=30)


def table_layout_of(path: str) -> dict:
    """{array: (offset, itemsize)} of the table at `path`, read from its header."""
    from shardkv.ipc.sharedindex import table_layout

    with open(path, "rb") as f:
        _, _, _, n_slots, n_entries = TABLE_HEADER.unpack(f.read(TABLE_HEADER.size))
    layout, _ = table_layout(n_slots, n_entries)
    return {name: (offset, 8 if dtype == "<u8" else 4) for name, dtype, offset, _ in layout}


def fill(engine, n: int = 2000) -> dict:
    """n keys over several segments, half of them overwritten once (older records stay in the
    log), some with a TTL; returns the model."""
    model = {}
    for i in range(n):
        key, value = b"key-%05d" % i, b"v%d-" % i * 5
        engine.put(key, value)
        model[key] = value
    for i in range(0, n, 2):
        key, value = b"key-%05d" % i, b"w%d-" % i * 3
        engine.put(key, value)
        model[key] = value
    for i in range(0, n, 7):
        key, value = b"key-%05d" % i, b"t%d" % i
        engine.put(key, value, ttl=3600)
        model[key] = value
    return model


def assert_on_disk(shard, model: dict) -> None:
    """A copy of the shard directory, opened by a fresh engine, holds exactly `model`."""
    import tempfile

    from engine_support import copy_dir, open_engine

    shard.engine.sync()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(shard.directory)) as scratch:
        with open_engine(copy_dir(shard.directory, os.path.join(scratch, "copy"))) as copy:
            assert_holds(copy, model)


def assert_holds(engine, model: dict) -> None:
    assert len(engine) == len(model)
    assert engine.get_many(list(model)) == list(model.values())
    assert dict(engine.scan()) == model


# -- in one process ---------------------------------------------------------------------------------
@pytest.mark.engine
@pytest.mark.parametrize("mode", ["random", "zeros", "half"])
def test_garbage_in_the_table_never_makes_compaction_drop_live_data(shard, mode):
    model = fill(shard.engine)
    scribble(current_table(shard.prefix, 0, shard.header), mode, seed=7)
    result = shard.engine.compact()
    assert_on_disk(shard, model)  # what a restart would find
    assert result.get("index_repair"), "the garbage was not noticed"
    assert shard.engine.stats()["index_repairs"] == 1
    assert_holds(shard.engine, model)  # the worker's own answers are right again at once
    for key, value in model.items():
        assert shard.read(key) == value, key  # and so are clients' direct reads (a new table)
    shard.reopen()
    assert_holds(shard.engine, model)  # nothing was lost on disk
    assert shard.engine.stats()["index_repairs"] == 0


@pytest.mark.engine
def test_an_entry_pointed_at_an_older_record_of_its_key_is_repaired(shard):
    """The subtle case: the table still names a valid, intact record of the key, but an
    overwritten one. Compaction must copy the newest record, not the one the table names."""
    model = fill(shard.engine)
    key = b"key-00002"  # overwritten once: its first record is still in the log
    index = key_index(shard.engine)
    e = index.find(key, crc32c(key))
    newest = int(index.locations[e])
    older = next(loc for loc in _locations_of(shard.engine, key) if loc != newest)
    path = current_table(shard.prefix, 0, shard.header)
    layout = table_layout_of(path)
    scribble(path, f"at {layout['value_lens'][0] + e * 4} {len(b'v2-' * 5).to_bytes(4, 'little').hex()}")
    scribble(path, f"at {layout['locations'][0] + e * 8} {older.to_bytes(8, 'little').hex()}")
    assert shard.engine.get(key) == b"v2-" * 5, "the garbage should show before the repair"
    assert shard.read(key) == b"v2-" * 5, "an intact older record: a client cannot tell"
    result = shard.engine.compact()
    assert_on_disk(shard, model)
    assert result.get("index_repair")
    assert shard.engine.get(key) == model[key]
    shard.reopen()
    assert_holds(shard.engine, model)


@pytest.mark.engine
def test_a_key_cleared_from_the_slot_table_is_repaired(shard):
    model = fill(shard.engine)
    key = b"key-01234"
    index = key_index(shard.engine)
    e = index.find(key, crc32c(key))
    slot = next(i for i in range(len(index.slots)) if index.slots[i] == e + 1)
    path = current_table(shard.prefix, 0, shard.header)
    offset, size = table_layout_of(path)["slots"]
    scribble(path, f"at {offset + slot * size} {bytes(size).hex()}")
    assert shard.engine.get(key) is None, "the garbage should hide the key before the repair"
    result = shard.engine.compact()
    assert_on_disk(shard, model)
    assert result.get("index_repair")
    assert_holds(shard.engine, model)
    assert shard.read(key) == model[key]


def _locations_of(engine, key: bytes) -> list[int]:
    """Every location in the log holding a PUT of `key`."""
    from shardkv.wal import iter_records

    found = []
    active = engine.log_position()[0]
    for number, path in sorted(engine.segments().items()):
        for record in iter_records(path, active=number == active):
            if record.key == key and record.type == 1:
                found.append((number << 32) | record.offset)
    return found


@pytest.mark.engine
@pytest.mark.parametrize("seed", range(3))
def test_an_intact_index_is_never_repaired(tmp_path, seed):
    """Overwrites, deletes, batches, keys that expire (some during the run), cross-shard
    commits and aborts, a prepared batch left open across a compaction, reopens and many
    compactions: the log and the table always agree."""
    import time

    rng = random.Random(seed)
    s = Shard(tmp_path / "shard", segment_size=8192)
    try:
        keys = [b"k%03d" % i for i in range(150)]
        txid = 1
        for step in range(1200):
            key = rng.choice(keys)
            action = rng.random()
            if action < 0.45:
                s.engine.put(key, rng.randbytes(rng.randrange(200)), ttl=rng.choice((None, None, 0.02, 3600)))
            elif action < 0.6:
                s.engine.delete(key)
            elif action < 0.72:
                ops = [("put", rng.choice(keys), rng.randbytes(rng.randrange(60))) for _ in range(rng.randrange(1, 80))]
                s.engine.apply(ops + [("delete", rng.choice(keys))])
            elif action < 0.76:
                s.engine.prepare(txid, [("put", rng.choice(keys), b"tx"), ("delete", rng.choice(keys))])
                (s.engine.commit if rng.random() < 0.7 else s.engine.abort)(txid)
                txid += 1
            elif action < 0.78:
                s.engine.expire(key, rng.choice((None, 0.01, 100)))
            elif action < 0.8:
                time.sleep(0.02)
            elif action < 0.83:
                if rng.random() < 0.3:
                    s.engine.prepare(txid, [("put", b"held-%d" % txid, b"x")])  # undecided across the compaction
                result = s.engine.compact()
                assert not result.get("index_repair"), result
                for pending in s.engine.prepared():
                    s.engine.commit(pending)
                txid += 1
            elif action < 0.835:
                s.reopen()
            if step % 100 == 0:
                assert s.engine.index_problem() is None
        assert s.engine.index_problem() is None
        assert s.engine.compact()["index_repair"] is None
        assert s.engine.stats()["index_repairs"] == 0
    finally:
        s.close()


@pytest.mark.engine
@pytest.mark.parametrize("mode", ["random", "zeros"])
def test_the_quick_look_finds_gross_damage(shard, mode):
    fill(shard.engine)
    assert shard.engine.index_problem() is None
    scribble(current_table(shard.prefix, 0, shard.header), mode, seed=5)
    assert shard.engine.index_problem() is not None
    shard.engine.compact()
    assert shard.engine.index_problem() is None


@pytest.mark.engine
@pytest.mark.parametrize("mode", ["random", "zeros", "half"])
def test_a_client_reading_a_garbage_table_never_returns_a_wrong_value(shard, mode):
    """Every answer of a client's direct read over a garbage table is the key's value, absent
    (the garbage hid the key: the worker itself cannot see it either until the repair), or
    FALLBACK (ask the worker): never another key's value, an older value or garbage bytes."""
    model = fill(shard.engine)
    for key, value in model.items():
        assert shard.read(key) == value
    older = {key: b"v%d-" % int(key[4:]) * 5 for key in model}  # the first value of each key
    scribble(current_table(shard.prefix, 0, shard.header), mode, seed=11)
    answers = {"right": 0, "absent": 0, "fallback": 0}
    for key, value in model.items():
        got = shard.read(key)
        if got is FALLBACK:
            answers["fallback"] += 1
        elif got is None:
            answers["absent"] += 1
        else:
            assert got == value, f"{key!r}: a wrong value {bytes(got[:40])!r}" + (" (an older one)" if got == older[key] else "")
            answers["right"] += 1
    for absent in (b"never-written-%d" % i for i in range(500)):
        assert shard.read(absent) in (None, FALLBACK)
    assert shard.engine.compact().get("index_repair")
    for key, value in model.items():
        assert shard.read(key) == value


# -- through a cluster ------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def test_garbage_in_a_workers_table_is_repaired_by_compaction_and_nothing_is_lost(cluster):
    db = cluster.open()
    found = keys_by_shard(db, 1000, b"user-%06d")
    model = {}
    for shard_keys in found.values():
        for i, key in enumerate(shard_keys):
            model[key] = b"first-%d" % i * 4
        db.put_many({key: model[key] for key in shard_keys[:500]})
        for key in shard_keys[500:]:
            db.put(key, model[key])
        for key in shard_keys[::3]:
            model[key] = b"second-" + key
            db.put(key, model[key])
    reader = cs.index_readers(db)[0]
    scribble(current_table(reader.prefix, 0, cs.index_header(reader)), "random", seed=3)
    results = db.compact()
    repairs = [s.get("index_repairs") for s in db.health()["shards"]]
    prometheus = render_prometheus(collect_status(db, sample_seconds=0))
    try:
        served = db.get_many(list(model))  # answered by the repaired table
    except Exception as exc:  # noqa: BLE001 - before the fix, the garbage table could fail reads
        served = exc
    db.close()
    cluster.kill_supervisor()
    db = cluster.open()  # a restart: what is on disk
    assert db.get_many(list(model)) == list(model.values()), "keys lost by the compaction"
    assert len(db) == len(model)
    assert results[0].get("index_repair") and not results[1].get("index_repair")
    assert repairs == [1, 0]
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in prometheus.splitlines() if line.startswith("shardkv_index_repairs_total")}
    assert samples and samples[next(k for k in samples if 'shard="0"' in k)] == 1 and samples[next(k for k in samples if 'shard="1"' in k)] == 0, prometheus
    assert served == list(model.values())
    with open(os.path.join(cluster.directory, "logs", "shard-000.log")) as f:
        events = [json.loads(line) for line in f if "index repaired" in line]
    assert len(events) == 1 and events[0]["level"] == "warning" and events[0]["keys"] == 1000
    assert db.health()["shards"][0]["index_repairs"] == 0  # a new worker, a new count


@pytest.mark.parametrize("mode", ["random", "zeros"])
def test_a_worker_notices_a_damaged_table_by_itself_and_rebuilds_it(cluster, mode):
    """No compaction asked for and little garbage: the worker's periodic check sees the damage
    and runs the compaction that rebuilds the table."""
    command = [sys.executable, "-m", "shardkv.coordinator.supervisor", cluster.directory, "--shards", "2", "--compact-check-interval", "0.2"]
    assert subprocess.run(command, timeout=60).returncode == 0  # detaches once the directory is locked
    db = cluster.open()
    model = {b"k%05d" % i: b"v%d" % i * 10 for i in range(3000)}
    db.put_many(model)
    assert len(db) == len(model)  # a request to each worker: the batch is indexed (it may be answered before)
    reader = cs.index_readers(db)[1]
    scribble(current_table(reader.prefix, 1, cs.index_header(reader)), mode, seed=2)
    wait_until(lambda: db.health()["shards"][1]["index_repairs"] == 1, 30, message="the repair")
    assert db.get_many(list(model)) == list(model.values())
    assert all(db.get(key) == value for key, value in list(model.items())[::7])
    assert db.health()["shards"][0]["index_repairs"] == 0
    with open(os.path.join(cluster.directory, "logs", "shard-001.log")) as f:
        assert "index damaged; compacting to rebuild it from the log" in f.read()
