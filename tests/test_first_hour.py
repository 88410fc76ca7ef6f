"""What a user meets in the first hour with the client API (issue: a user's first hour): paths
and `create`, codecs for Python values, `in` that raises like `[]`, ttl that tells "absent"
from "never expires", the asyncio client with every blocking method, and type annotations
checked by mypy --strict."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import pickle
import shelve
import subprocess
import sys
from collections.abc import MutableMapping
from datetime import timedelta
from pathlib import Path

import pytest

import shardkv
from shardkv.limits import check_value

from cluster_support import cluster_fixture

HERE = Path(__file__).parent


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


# -- paths and create ------------------------------------------------------------------------
def test_open_expands_the_home_directory_and_takes_path_objects(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    db = shardkv.open("~/db", shards=2)
    cluster.clients.append(db)
    assert db.directory == os.path.realpath(tmp_path / "db")
    db.put(b"k", b"v")
    again = shardkv.open(Path(tmp_path) / "db")
    cluster.clients.append(again)
    assert again.get(b"k") == b"v"
    assert not (tmp_path / "~").exists()


@pytest.mark.engine
def test_create_false_refuses_a_directory_without_a_store_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo-dir"
    with pytest.raises(shardkv.StoreNotFound) as raised:
        shardkv.open(missing, create=False)
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, shardkv.Error)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(shardkv.StoreNotFound):
        shardkv.open(empty, create=False)
    assert os.listdir(empty) == []


def test_create_false_opens_an_existing_store(cluster):
    cluster.open().put(b"k", b"v")
    db = shardkv.open(cluster.directory, create=False)
    cluster.clients.append(db)
    assert db.get(b"k") == b"v"


@pytest.mark.engine
def test_a_file_is_not_a_store(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        shardkv.open(path)
    with pytest.raises(TypeError):
        shardkv.open(path, create="yes")


# -- bytes: `in` like `[]` -------------------------------------------------------------------
def test_in_with_a_key_of_the_wrong_type_raises_like_getitem(cluster):
    db = cluster.open()
    db.put(b"a", b"1")
    with pytest.raises(TypeError):
        db["a"]
    with pytest.raises(TypeError):
        "a" in db  # noqa: B015 — was silently False
    assert b"a" in db and b"b" not in db


# -- codecs ----------------------------------------------------------------------------------
def test_str_keys_and_json_values(cluster):
    cluster.open().close()
    db = shardkv.open(cluster.directory, key_codec="str", value_codec="json")
    cluster.clients.append(db)
    db["user:1"] = {"name": "Ada", "langs": ["en", "fr"]}
    db.put("user:2", [1, 2.5, None], ttl=60)
    db.put_many({"user:3": True, "é": "accent", "z": 0})
    assert db["user:1"] == {"name": "Ada", "langs": ["en", "fr"]}
    assert db.get_many(["user:2", "nope", "user:3"]) == [[1, 2.5, None], None, True]
    assert "user:1" in db and "nope" not in db
    # Ordered by the UTF-8 bytes of the keys ("é" is c3 a9, after "z").
    assert [k for k, _ in db.scan()] == ["user:1", "user:2", "user:3", "z", "é"]
    assert list(db.scan(prefix="user:", reverse=True, limit=2)) == [("user:3", True), ("user:2", [1, 2.5, None])]
    assert db.min() == ("user:1", {"name": "Ada", "langs": ["en", "fr"]}) and db.max() == ("é", "accent")
    assert db.above("user:3") == ("z", 0) and db.below("user:2")[0] == "user:1"
    assert db.cas("z", 0, 1) is True and db.cas("z", 0, 2) is False and db["z"] == 1
    with db.batch() as batch:
        batch.put("a", {"x": 1})
        batch.expect("z", 1)
        batch.delete("user:3")
    db.write([("put", "b", 2, 30), ("expect", "a", {"x": 1})])
    assert db.get("a") == {"x": 1} and "user:3" not in db and 29 < db.ttl("b") <= 30
    with pytest.raises(shardkv.Conflict):
        db.write([("put", "c", 3), ("expect", "a", {"x": 2})])
    assert sorted(db) == ["a", "b", "user:1", "user:2", "z", "é"] and len(db) == 6
    with pytest.raises(TypeError):
        db.put(b"bytes-key", 1)  # say which you mean: the codec is str
    with pytest.raises(TypeError):
        db.put("k", {1, 2})  # a set is not JSON
    assert "k" not in db
    # The same store through the bytes codec: what is really stored.
    raw = cluster.open()
    assert raw.get(b"user:1") == b'{"langs":["en","fr"],"name":"Ada"}'


def test_pickle_values_and_a_codec_of_ones_own(cluster):
    class Upper:
        """A codec: any object with encode() and decode()."""

        def encode(self, obj):
            return obj.upper().encode()

        def decode(self, data):
            return data.decode().lower()

    cluster.open().close()
    db = shardkv.open(cluster.directory, key_codec=Upper(), value_codec="pickle")
    cluster.clients.append(db)
    db["key"] = {"when": timedelta(seconds=3), "tuple": (1, 2)}
    assert db["key"] == {"when": timedelta(seconds=3), "tuple": (1, 2)}
    assert cluster.open().get(b"KEY") == pickle.dumps({"when": timedelta(seconds=3), "tuple": (1, 2)}, protocol=5)
    with pytest.raises(TypeError):
        db["lambda"] = lambda: None
    # A bytes key goes through the key codec like any other (no bytes short cut).
    plain = shardkv.open(cluster.directory, key_codec="pickle")
    cluster.clients.append(plain)
    plain[b"raw"] = b"1"
    assert plain[b"raw"] == b"1" and b"raw" in plain
    assert cluster.open().get(pickle.dumps(b"raw", protocol=5)) == b"1" and cluster.open().get(b"raw") is None


@pytest.mark.engine
def test_bad_codecs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="key_codec"):
        shardkv.open(tmp_path / "a", key_codec="utf-16")
    with pytest.raises(TypeError, match="value_codec"):
        shardkv.open(tmp_path / "b", value_codec=42)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_shelve_recipe(cluster):
    """`shelve.Shelf(db)` makes a bytes store a shelf (str keys, pickled values)."""
    with shelve.Shelf(cluster.open()) as shelf:
        shelf["config"] = {"retries": 3}
        assert shelf["config"] == {"retries": 3} and "config" in shelf and list(shelf) == ["config"]


# -- ttl -------------------------------------------------------------------------------------
def test_ttl_tells_absent_from_never_expiring_and_takes_timedelta(cluster):
    db = cluster.open()
    db.put(b"forever", b"1")
    db.put(b"soon", b"2", ttl=timedelta(minutes=1))
    assert db.ttl(b"missing") is None and db.ttl(b"forever") == math.inf
    assert 59 < db.ttl(b"soon") <= 60
    assert db.expire(b"forever", timedelta(hours=1)) is True and 3599 < db.ttl(b"forever") <= 3600
    with pytest.raises(ValueError):
        db.put(b"k", b"v", ttl=timedelta(seconds=-1))


@pytest.mark.unit
def test_error_messages_name_only_options_that_exist():
    with pytest.raises(ValueError) as raised:
        check_value(b"x" * 11, 10)
    assert "max_value_size" not in str(raised.value)


# -- asyncio: the same API -------------------------------------------------------------------
MAPPING_PROTOCOL = set(dir(MutableMapping))


def public_methods(cls) -> set[str]:
    return {name for name, value in inspect.getmembers(cls) if not name.startswith("_") and callable(value) and name not in MAPPING_PROTOCOL}


@pytest.mark.unit
def test_the_asyncio_client_has_every_method_of_the_blocking_one():
    blocking, nonblocking = public_methods(shardkv.Client), public_methods(shardkv.AsyncClient)
    assert blocking - nonblocking == set(), f"AsyncClient lacks {sorted(blocking - nonblocking)}"
    for name in blocking - {"batch", "scan", "shard_of"}:
        assert inspect.iscoroutinefunction(getattr(shardkv.AsyncClient, name)), name
    # The mapping protocol has coroutine stand-ins.
    assert {"len", "contains"} <= nonblocking


def test_the_asyncio_client_answers_like_the_blocking_one(cluster):
    db = cluster.open()
    db.put_many({b"a": b"1", b"b": b"2", b"c": b"3"})
    db.put(b"t", b"4", ttl=30)

    async def main():
        async with shardkv.aopen(cluster.directory, pool=2) as adb:
            assert await adb.min() == db.min() and await adb.max() == db.max()
            assert await adb.above(b"a") == db.above(b"a") == (b"b", b"2")
            assert await adb.below(b"c") == db.below(b"c") == (b"b", b"2")
            assert await adb.ttl(b"a") == math.inf and 29 < await adb.ttl(b"t") <= 30
            assert await adb.expire(b"a", 10) is True
            assert (await adb.stats())["keys"] == db.stats()["keys"] == 4
            assert (await adb.health())["status"] == "healthy"
            await adb.sync()
            assert [r["after"]["keys"] for r in await adb.compact()] == [r["after"]["keys"] for r in db.compact()]
            assert await adb.contains(b"a") and not await adb.contains(b"zz")
            assert adb.shard_of(b"a") == db.shard_of(b"a")

    asyncio.run(main())


# -- types -----------------------------------------------------------------------------------
def _package_tree(root: Path) -> Path:
    """The installed layout of the package (shardkv/ with its sub-packages inside) as links to
    wherever this checkout keeps each part, for mypy to read."""
    import shardkv.coordinator
    import shardkv.ops
    import shardkv.shards
    import shardkv.wal

    package = root / "shardkv"
    package.mkdir(parents=True)
    source = Path(shardkv.__file__).parent
    for entry in source.iterdir():
        (package / entry.name).symlink_to(entry)
    for sub in (shardkv.coordinator, shardkv.ops, shardkv.shards, shardkv.wal):
        name = sub.__name__.split(".")[1]
        if not (package / name).exists():
            (package / name).symlink_to(Path(sub.__file__).parent)
    return root


@pytest.mark.engine
def test_the_public_api_is_typed(tmp_path):
    """py.typed ships, and a program using the API passes mypy --strict."""
    pytest.importorskip("mypy")
    assert (Path(shardkv.__file__).parent / "py.typed").exists()
    tree = _package_tree(tmp_path / "pkg")
    env = dict(os.environ, MYPYPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), str(HERE / "typing_example.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # And it can fail: a wrong call is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("import shardkv\nshardkv.open('/tmp/x').put(b'k')\n")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), str(bad)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and 'Missing positional argument "value"' in done.stdout


# -- the mapping methods a dict user reaches for ---------------------------------------------------
def test_clear_deletes_in_batches_not_a_scan_per_key(cluster, monkeypatch):
    """MutableMapping.clear() pops one item at a time, each starting a scan: 0.6 ms a key, ten
    minutes for a million keys. The store's clear() deletes what one scan reads, in batches."""
    db = cluster.open()
    db.put_many({b"k%05d" % i: b"v" for i in range(25_000)})
    db.put(b"ttl", b"v", ttl=60)

    def one_by_one(*args):
        raise AssertionError("clear() went through popitem()")

    monkeypatch.setattr(db, "popitem", one_by_one)
    db.clear()
    assert len(db) == 0 and db.min() is None and list(db.scan()) == []
    db.clear()  # (an empty store)
    db[b"after"] = b"1"
    assert list(db.items()) == [(b"after", b"1")]


def test_clear_with_codecs(cluster):
    db = cluster.open(key_codec="str", value_codec="json")
    db.update({f"key-{i}": {"n": i} for i in range(3000)})
    db.clear()
    assert len(db) == 0


def test_update_sends_batches_and_takes_what_dict_update_takes(cluster, monkeypatch):
    """MutableMapping.update() sets one key at a time (15x slower than put_many); the store's
    update() takes the same arguments as dict.update and sends batches."""
    db = cluster.open(key_codec="str", value_codec="json")

    def one_by_one(*args, **kwargs):
        raise AssertionError("update() went through put()")

    monkeypatch.setattr(db, "put", one_by_one)
    db.update({f"m{i}": i for i in range(2500)})
    db.update([("p1", [1]), ("p2", 0)])
    db.update(k1="a", k2={"b": 2})

    class KeysOnly:  # dict.update's "has keys()" rule
        def keys(self):
            return ["ko"]

        def __getitem__(self, key):
            return "from keys()"

    db.update(KeysOnly())
    db.update()
    assert len(db) == 2500 + 2 + 2 + 1
    assert db["m2499"] == 2499 and db["p1"] == [1] and db["p2"] == 0 and db["k2"] == {"b": 2} and db["ko"] == "from keys()"
    with pytest.raises(TypeError):
        db.update([("only-one",)])
    with pytest.raises(TypeError):
        db.update({1: "not a str key"})
    with pytest.raises(TypeError):
        db.update({}, {})
    assert "only-one" not in db and len(db) == 2505


def test_update_of_more_than_one_batch_and_many_bytes(cluster):
    """update() cuts its batches by size too: 80 pairs of 1 MiB with max_batch_bytes 8 MiB
    (one batch of them all is a ValueError naming the limit)."""
    db = cluster.open(max_batch_bytes=8 << 20)
    big = b"x" * (1 << 20)
    with pytest.raises(ValueError, match="max_batch_bytes"):
        db.put_many((b"big-%02d" % i, big) for i in range(80))
    db.update((b"big-%02d" % i, big) for i in range(80))
    db.update({b"small-%05d" % i: b"s" for i in range(12_000)})
    assert len(db) == 12_080 and db[b"big-79"] == big
