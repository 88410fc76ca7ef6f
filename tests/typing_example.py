"""How a typed program uses shardkv; checked by mypy --strict."""
from __future__ import annotations

import asyncio
import math
from datetime import timedelta

import shardkv


def blocking(path: str) -> None:
    with shardkv.open(path, shards=2, durability="fsync", key_codec="str", value_codec="json") as db:
        db.put("k", {"a": 1}, ttl=timedelta(seconds=5))
        value = db.get("k")
        left: float | None = db.ttl("k")
        assert left is None or left <= 5 or left == math.inf
        deleted: bool = db.delete("k")
        swapped: bool = db.cas("k", None, [1, 2])
        values: list[object] = db.get_many(["k", "j"])
        for key, item in db.scan(start="a", limit=10):
            print(key, item)
        pairs: list[tuple[object, object]] = list(db.items())
        every: list[object] = list(db.values())
        last_first: list[object] = list(reversed(db))
        db.update({"y": 2}, z=3)
        print(pairs, every, last_first, list(db.keys()))
        first = db.min()
        if first is not None:
            print(first[0])
        with db.batch() as batch:
            batch.put("a", 1)
            batch.expect("b", None)
        db.write([("put", "c", 3), ("delete", "a")])
        db.put_many({"x": 1})
        stats: dict[str, object] = db.stats()
        health: dict[str, object] = db.health()
        db.sync()
        results: list[dict[str, object]] = db.compact(wait=True)
        print(value, deleted, swapped, values, stats, health, results, len(db), "k" in db)


async def nonblocking(path: str) -> None:
    async with shardkv.aopen(path, pool=2) as db:
        await db.put(b"k", b"v")
        value = await db.get(b"k")
        print(value, await db.min(), await db.ttl(b"k"), await db.len())
        async for key, item in db.scan(prefix=b"k"):
            print(key, item)
        async with db.batch() as batch:
            batch.put(b"a", b"1")


