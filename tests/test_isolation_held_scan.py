"""A scan iterator that is held but not read must not stall writers (issue: one unfinished
`db.scan()` added 5 s to every cross-shard batch, in any process). Its snapshot rules stay:
it never shows part of a batch; one that committed while it was idle makes its next page
raise Unavailable if it had already returned items (docs/TRANSACTIONS.md, "Isolation")."""

from __future__ import annotations

import asyncio
import time

import pytest

import shardkv

from cluster_support import cluster_fixture, keys_by_shard


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def cross_shard_pair(db):
    found = keys_by_shard(db, 1, b"pair-%d")
    return found[0][0], found[1][0]


def test_a_held_scan_iterator_does_not_stall_cross_shard_batches(cluster):
    reader, writer = cluster.open(), cluster.open()
    a, b = cross_shard_pair(writer)
    writer.put_many({b"item-%04d" % i: b"x" for i in range(3000)})  # more than a page per shard
    held = reader.scan()
    assert next(held)[0] == b"item-0000"
    times = []
    for n in range(5):
        started = time.monotonic()
        writer.put_many({a: b"%d" % n, b: b"%d" % n})
        times.append(time.monotonic() - started)
    assert max(times) < 1.0, f"cross-shard batches took {times} s while a scan iterator was held"
    # The batches committed while the iterator was idle: going on would mix two snapshots.
    with pytest.raises(shardkv.Unavailable):
        for _ in held:
            pass
    assert writer.get_many([a, b]) == [b"4", b"4"]


def test_a_held_scan_iterator_does_not_stall_batches_of_the_same_client(cluster):
    """A held iterator of one client does not stall the batches of another thread of the same
    client either (they share one lease)."""
    db = cluster.open()
    a, b = cross_shard_pair(db)
    db.put_many({b"item-%04d" % i: b"x" for i in range(3000)})
    held = db.scan()
    next(held)
    started = time.monotonic()
    for n in range(3):
        db.put_many({a: b"%d" % n, b: b"%d" % n})
    assert time.monotonic() - started < 1.5
    held.close()


def test_a_held_async_scan_does_not_stall_cross_shard_batches(cluster):
    cluster.open().close()

    async def main():
        async with shardkv.aopen(cluster.directory, pool=2) as reader, shardkv.aopen(cluster.directory, pool=1) as writer:
            a, b = cross_shard_pair(writer)
            await writer.put_many({b"item-%04d" % i: b"x" for i in range(3000)})
            held = reader.scan()
            assert (await held.__anext__())[0] == b"item-0000"
            started = time.monotonic()
            for n in range(3):
                await writer.put_many({a: b"%d" % n, b: b"%d" % n})
            took = time.monotonic() - started
            await held.aclose()
            return took

    assert asyncio.run(main()) < 1.5
