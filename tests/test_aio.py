"""The asyncio client (shardkv.aopen) against a real cluster."""

import asyncio
import time

import pytest

import shardkv
import client_support as cs
from clock_support import still_before, until_past
from cluster_support import cluster_fixture


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def run(coroutine):
    return asyncio.run(coroutine)


def test_api_matches_a_model(cluster):
    db_sync = cluster.open()  # keeps the cluster's lifetime in the harness's hands

    async def main():
        async with shardkv.aopen(cluster.directory) as db:
            model = {}
            await asyncio.gather(*(db.put(b"k%04d" % i, b"v%d" % i) for i in range(500)))
            model.update({b"k%04d" % i: b"v%d" % i for i in range(500)})
            assert await db.get(b"k0007") == b"v7" and await db.get(b"nope", b"d") == b"d"
            assert await db.delete(b"k0001") and not await db.delete(b"k0001")
            del model[b"k0001"]
            assert await db.cas(b"k0002", b"v2", b"new") and not await db.cas(b"k0002", b"v2", b"x")
            model[b"k0002"] = b"new"
            assert await db.cas(b"fresh", None, b"1")
            model[b"fresh"] = b"1"
            keys = [b"k0003", b"missing", b"k0002", b"fresh"]
            assert await db.get_many(keys) == [model.get(k) for k in keys]
            assert await db.len() == len(model)
            assert [k async for k, _ in db.scan()] == sorted(model)
            assert [k async for k, _ in db.scan(reverse=True, limit=7)] == sorted(model, reverse=True)[:7]
            assert [kv async for kv in db.scan(start=b"k0100", stop=b"k0110")] == sorted((k, v) for k, v in model.items() if b"k0100" <= k < b"k0110")
            assert [k async for k, _ in db.scan(prefix=b"k02", limit=3)] == [b"k0200", b"k0201", b"k0202"]
            big = bytes(range(256)) * 8192  # 2 MiB: carried in frames both ways
            await db.put(b"big", big)
            assert await db.get(b"big") == big
            started = time.monotonic()
            await db.put(b"t", b"x", ttl=0.2)
            written = time.monotonic()
            left = await db.ttl(b"t")
            if still_before(started, 0.2):
                assert 0 < left <= 0.2
            await asyncio.sleep(until_past(written, 0.2))
            assert await db.get(b"t") is None
        assert db_sync.get(b"fresh") == b"1"  # the blocking client sees the same store

    run(main())


def test_bad_input_and_use_after_close(cluster):
    cluster.open()

    async def main():
        db = await shardkv.aopen(cluster.directory, pool=2)
        with pytest.raises(TypeError):
            await db.get("text")
        with pytest.raises(ValueError):
            await db.put(b"", b"v")
        with pytest.raises(TypeError):
            db.scan(start="a")
        await db.close()
        await db.close()
        with pytest.raises(shardkv.Closed):
            await db.get(b"k")
        with pytest.raises(ValueError):
            await shardkv.aopen(cluster.directory, pool=0)

    run(main())


def test_cancelled_requests_never_leave_a_slot_stuck(cluster):
    cluster.open()

    async def main():
        async with shardkv.aopen(cluster.directory, pool=3, direct_reads=False) as db:  # gets through the rings
            await db.put(b"k", b"v")
            for round_ in range(5):
                tasks = [asyncio.create_task(db.get(b"k")) for _ in range(300)]
                await asyncio.sleep(0)
                for task in tasks[round_ % 2 :: 2]:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(r == b"v" or isinstance(r, asyncio.CancelledError) for r in results)
                assert any(isinstance(r, asyncio.CancelledError) for r in results)
            big = b"z" * (3 << 20)
            task = asyncio.create_task(db.put(b"big", big))  # cancelled between frames
            await asyncio.sleep(0.001)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for _ in range(200):  # every slot comes back once its answer arrives
                if cs.idle(db, 3):
                    break
                await asyncio.sleep(0.01)
            assert cs.idle(db, 3)
            assert await db.get(b"k") == b"v"
            await db.put(b"after", b"ok")
            assert await db.get(b"after") == b"ok"

    run(main())


def test_many_coroutines_in_flight(cluster):
    cluster.open()

    async def main():
        async with shardkv.aopen(cluster.directory, pool=4) as db:
            await asyncio.gather(*(db.put(b"c%04d" % i, b"%d" % i) for i in range(200)))
            values = await asyncio.gather(*(db.get(b"c%04d" % (i % 200)) for i in range(1000)))
            assert values == [b"%d" % (i % 200) for i in range(1000)]

    run(main())


def test_atomic_batches_and_snapshot_reads(cluster):
    db_sync = cluster.open()
    keys = []
    i = 0
    while len({db_sync.shard_of(k) for k in keys}) < db_sync.shards or len(keys) < 6:
        keys.append(b"acct-%d" % i)
        i += 1

    async def transfers(db, rounds):
        for r in range(rounds):
            a, b = keys[r % len(keys)], keys[(r + 1) % len(keys)]
            va, vb = await db.get_many([a, b])
            try:
                async with db.batch() as batch:
                    batch.expect(a, va)
                    batch.expect(b, vb)
                    batch.put(a, b"%d" % (int(va) - 1))
                    batch.put(b, b"%d" % (int(vb) + 1))
            except shardkv.Conflict:
                pass

    async def readers(db, rounds):
        for _ in range(rounds):
            assert sum(int(v) for v in await db.get_many(keys)) == 100 * len(keys)
            assert sum([int(v) async for _, v in db.scan(prefix=b"acct-")]) == 100 * len(keys)

    async def main():
        async with shardkv.aopen(cluster.directory) as db:
            await db.put_many({k: b"100" for k in keys})
            await asyncio.gather(transfers(db, 60), transfers(db, 60), readers(db, 60))
            with pytest.raises(shardkv.Conflict):
                await db.write([("put", keys[0], b"0"), ("put", keys[1], b"0"), ("expect", keys[2], b"nope")])
            with pytest.raises(RuntimeError):
                async with db.batch() as batch:
                    batch.put(keys[0], b"0")
                    raise RuntimeError("discard")
            with pytest.raises(TypeError):
                await db.write([("put", keys[0], 5)])
            assert sum(int(v) for v in await db.get_many(keys)) == 100 * len(keys)

    run(main())
    assert sum(int(db_sync.get(k)) for k in keys) == 100 * len(keys)
