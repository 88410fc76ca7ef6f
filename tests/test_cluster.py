"""The multi-process cluster through the client API: behaviour against a dict model, argument
checking, attaching, persistence, shutdown, fork and threads.

Every test has its own data directory (so its own shared-memory names) and, through the
`cluster` fixture, leaves no process and no /dev/shm entry behind.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

import shardkv
from shardkv.limits import DEFAULT_MAX_VALUE_SIZE, MAX_KEY_LEN

from cluster_support import SHARDS, alive, cluster_fixture, cluster_pids, nothing_left, shm_entries, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


@pytest.fixture
def db(cluster):
    return cluster.open()


def model_scan(model, start=None, stop=None, reverse=False, prefix=None, limit=None):
    items = sorted((k, v) for k, v in model.items() if (start is None or k >= start) and (stop is None or k < stop) and (prefix is None or k.startswith(prefix)))
    if reverse:
        items.reverse()
    return items if limit is None else items[:limit]


def keys_on_each_shard(db, count_per_shard: int, fmt: bytes = b"key-%05d") -> dict[int, list[bytes]]:
    """`count_per_shard` keys owned by every shard."""
    found: dict[int, list[bytes]] = {s: [] for s in range(db.shards)}
    i = 0
    while any(len(v) < count_per_shard for v in found.values()):
        key = fmt % i
        shard = db.shard_of(key)
        if len(found[shard]) < count_per_shard:
            found[shard].append(key)
        i += 1
    return found


def contents(db) -> dict:
    return dict(db.scan())


# -- the API against a dict ------------------------------------------------------------------------
def test_basic_api_matches_dict(db):
    assert db.shards == SHARDS
    assert len(db) == 0 and list(db) == [] and db.min() is None and db.max() is None
    assert db.above(b"a") is None and db.below(b"a") is None
    assert db.get(b"nope") is None and db.get(b"nope", b"dflt") == b"dflt" and b"nope" not in db

    model = {}
    by_shard = keys_on_each_shard(db, 30)
    assert all(len(v) == 30 for v in by_shard.values())
    for shard_keys in by_shard.values():
        for key in shard_keys:
            value = b"v:" + key
            db.put(key, value)
            model[key] = value
    db[b"apple"] = b"red"
    db[b"apricot"] = b""  # an empty value is a value, not an absence
    db[b"banana"] = b"yellow"
    model.update({b"apple": b"red", b"apricot": b"", b"banana": b"yellow"})

    assert len(db) == len(model)
    assert list(db) == sorted(model)
    assert contents(db) == model
    assert db[b"apricot"] == b"" and b"apricot" in db and db.get(b"apricot", b"dflt") == b""
    for key, value in model.items():
        assert db.get(key) == value and db[key] == value and key in db

    # overwrite, delete, del
    db.put(b"apple", b"green")
    model[b"apple"] = b"green"
    assert db.delete(b"banana") is True and db.delete(b"banana") is False
    del model[b"banana"]
    del db[b"apricot"]
    del model[b"apricot"]
    with pytest.raises(KeyError):
        del db[b"apricot"]
    with pytest.raises(KeyError):
        db[b"apricot"]
    assert b"apricot" not in db and db.get(b"apricot") is None

    # cas: None expected = absent, None new = delete
    assert db.cas(b"c", b"x", b"y") is False and b"c" not in db
    assert db.cas(b"c", None, b"1") is True and db[b"c"] == b"1"
    assert db.cas(b"c", None, b"2") is False and db[b"c"] == b"1"
    assert db.cas(b"c", b"0", b"2") is False and db[b"c"] == b"1"
    assert db.cas(b"c", b"1", b"2") is True and db[b"c"] == b"2"
    assert db.cas(b"c", b"2", b"") is True and db[b"c"] == b""
    assert db.cas(b"c", b"", None) is True and b"c" not in db
    assert db.cas(b"c", b"", None) is False
    assert db.cas(b"c", None, None) is True and b"c" not in db  # absent stays absent
    assert db.cas(b"d", None, b"dv") is True
    model[b"d"] = b"dv"

    # bytes-like keys and values
    db[bytearray(b"ba-key")] = bytearray(b"ba-value")
    db.put(memoryview(b"mv-key"), memoryview(b"mv-value"))
    model[b"ba-key"], model[b"mv-key"] = b"ba-value", b"mv-value"
    assert db.get(memoryview(b"ba-key")) == b"ba-value" and db[bytearray(b"mv-key")] == b"mv-value"
    assert type(db.get(b"ba-key")) is bytes
    assert bytearray(b"mv-key") in db
    assert db.cas(bytearray(b"ba-key"), memoryview(b"ba-value"), bytearray(b"ba-2")) is True
    model[b"ba-key"] = b"ba-2"
    assert db.delete(memoryview(b"mv-key")) is True
    del model[b"mv-key"]

    assert contents(db) == model and len(db) == len(model) and list(db) == sorted(model)

    # get_many across shards, with missing keys and duplicates
    ask = sorted(model)[::3] + [b"missing-1", b"apple", b"missing-2"]
    random.Random(5).shuffle(ask)
    assert db.get_many(ask) == [model.get(k) for k in ask]
    assert db.get_many([]) == []
    assert db.get_many(iter([b"apple"])) == [b"green"]

    # ordered access
    ordered = sorted(model)
    assert db.min() == (ordered[0], model[ordered[0]]) and db.max() == (ordered[-1], model[ordered[-1]])
    probes = ordered[::7] + [b"", b"\x00", b"a", b"key-", b"key-00010\x00", b"zzz", b"\xff" * 4]
    for probe in probes:
        if not probe:
            continue
        above = [k for k in ordered if k > probe]
        below = [k for k in ordered if k < probe]
        assert db.above(probe) == ((above[0], model[above[0]]) if above else None), probe
        assert db.below(probe) == ((below[-1], model[below[-1]]) if below else None), probe
    assert db.above(ordered[-1]) is None and db.below(ordered[0]) is None


def test_scan_matches_sorted_model(db):
    rng = random.Random(11)
    model = {}
    for i in range(600):
        key = rng.choice([b"a", b"ab", b"b", b"key-", b"zz"]) + b"%04d" % rng.randrange(5000)
        model[key] = b"%d" % i
        db.put(key, model[key])
    keys = sorted(model)
    assert len({db.shard_of(k) for k in keys}) == SHARDS
    bounds = [None, b"", b"a", b"ab", b"ab2", keys[10], keys[300], keys[-1], b"b", b"key-1", b"zz9999", b"\xff"]
    prefixes = [None, b"a", b"ab", b"key-", b"key-1", b"zz", b"nothing", b""]
    for _ in range(150):
        start, stop = rng.choice(bounds), rng.choice(bounds)
        prefix, reverse = rng.choice(prefixes), rng.random() < 0.5
        limit = rng.choice([None, None, 0, 1, 5, 100, 2000])
        got = list(db.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit))
        assert got == model_scan(model, start, stop, reverse, prefix, limit), (start, stop, reverse, prefix, limit)
    # more than one page (1000 items) per shard: scan pages through every shard
    for i in range(2500):
        model[b"page-%05d" % i] = b"p"
    for key in sorted(k for k in model if k.startswith(b"page-")):
        db.put(key, b"p")
    assert list(db.scan()) == model_scan(model)
    assert list(db.scan(reverse=True)) == model_scan(model, reverse=True)
    assert list(db.scan(prefix=b"page-", limit=1500)) == model_scan(model, prefix=b"page-", limit=1500)
    assert list(db.scan(start=bytearray(b"b"), stop=memoryview(b"page-01000"))) == model_scan(model, b"b", b"page-01000")
    assert list(db) == sorted(model) and len(db) == len(model)


def test_empty_and_large_values(db):
    rng = random.Random(3)
    empty = b""
    one_mb = rng.randbytes(1_000_000)
    five_mb = rng.randbytes(5 * 1024 * 1024 + 17)  # many ring slots (128 KiB) of frames
    slot_edge = rng.randbytes(128 * 1024 - 64 - 13)  # around one slot's payload with the header
    keys = keys_on_each_shard(db, 2, b"big-%d")
    values = {keys[0][0]: empty, keys[0][1]: one_mb, keys[1][0]: five_mb, keys[1][1]: slot_edge}
    for key, value in values.items():
        db.put(key, value)
    for key, value in values.items():
        assert db.get(key) == value
        assert db[key] == value
    assert db.get_many(list(values) + [b"missing"]) == list(values.values()) + [None]
    assert contents(db) == values
    assert list(db.scan(reverse=True)) == sorted(values.items(), reverse=True)
    assert db.cas(keys[1][0], five_mb, one_mb) is True and db.get(keys[1][0]) == one_mb
    assert db.cas(keys[0][1], one_mb[:-1] + b"x", empty) is False and db.get(keys[0][1]) == one_mb
    big_key = b"k" * MAX_KEY_LEN
    db.put(big_key, five_mb)
    assert db.get(big_key) == five_mb and db.delete(big_key) is True and db.get(big_key) is None
    assert len(db) == 4
    assert db.stats()["keys"] == 4


def test_get_many_with_thousands_of_keys(db):
    rng = random.Random(7)
    keys = [b"many-%06d-" % i + b"x" * 80 for i in range(3000)]  # > one slot of request per shard
    model = {}
    for i, key in enumerate(keys):
        if i % 4 != 3:
            model[key] = rng.randbytes(rng.randrange(50, 150))  # > one slot of response per shard
            db.put(key, model[key])
    asked = keys + [b"absent-%d" % i for i in range(50)]
    rng.shuffle(asked)
    assert len({db.shard_of(k) for k in asked}) == SHARDS
    assert db.get_many(asked) == [model.get(k) for k in asked]
    small = [k[:11] for k in keys]  # short keys: small requests, all missing
    assert db.get_many(small) == [None] * len(small)
    assert len(db) == len(model)


# -- bad input and closed clients -------------------------------------------------------------------
BAD_KEYS = ["str", 5, None, 1.5, [b"a"], object()]


def test_bad_input_raises_and_changes_nothing(db):
    db.put(b"keep", b"value")
    before = contents(db)
    for bad in BAD_KEYS:
        with pytest.raises(TypeError):
            db.put(bad, b"v")
        with pytest.raises(TypeError):
            db.get(bad)
        with pytest.raises(TypeError):
            db.delete(bad)
        with pytest.raises(TypeError):
            db.cas(bad, None, b"v")
        with pytest.raises(TypeError):
            db.put(b"k", bad) if bad is not None else db.put(b"k", 7)
        with pytest.raises(TypeError):
            db.cas(b"keep", bad, b"v") if bad is not None else db.cas(b"keep", 3, b"v")
        with pytest.raises(TypeError):
            db.cas(b"keep", b"value", bad) if bad is not None else db.cas(b"keep", b"value", 3)
        with pytest.raises(TypeError):
            db.get_many([b"keep", bad])
        with pytest.raises(TypeError):
            db[bad] = b"v"
        if bad is not None:
            with pytest.raises(TypeError):
                db.scan(start=bad)
            with pytest.raises(TypeError):
                db.scan(stop=bad)
            with pytest.raises(TypeError):
                db.scan(prefix=bad)
            with pytest.raises(TypeError):
                db.above(bad)
            with pytest.raises(TypeError):
                db.below(bad)
    with pytest.raises(ValueError):
        db.put(b"", b"v")
    with pytest.raises(ValueError):
        db.get(b"")
    with pytest.raises(ValueError):
        db.cas(b"", None, b"v")
    with pytest.raises(ValueError):
        db.put(b"k" * (MAX_KEY_LEN + 1), b"v")
    with pytest.raises(ValueError):
        db.get_many([b"ok", b""])
    with pytest.raises(ValueError):
        db.put(b"k", bytes(DEFAULT_MAX_VALUE_SIZE + 1))
    with pytest.raises(ValueError):
        db.cas(b"keep", b"value", bytes(DEFAULT_MAX_VALUE_SIZE + 1))
    with pytest.raises(ValueError):
        db.scan(limit=-1)
    with pytest.raises(TypeError):
        db.scan(limit=1.5)
    with pytest.raises(TypeError):
        db.scan(limit=True)
    with pytest.raises(TypeError):
        db.put(b"k", "text")
    assert b"k" not in db
    assert contents(db) == before and len(db) == 1
    # the client keeps working after all of that
    db.put(b"after", b"ok")
    assert db.get(b"after") == b"ok" and db.get(b"keep") == b"value"


def test_bad_open_arguments(cluster):
    directory = cluster.directory
    with pytest.raises(TypeError):
        shardkv.open(123)
    with pytest.raises(TypeError):
        shardkv.open(directory, shards="2")
    with pytest.raises(TypeError):
        shardkv.open(directory, shards=2.0)
    with pytest.raises(TypeError):
        shardkv.open(directory, shards=True)
    with pytest.raises(ValueError):
        shardkv.open(directory, shards=0)
    with pytest.raises(ValueError):
        shardkv.open(directory, shards=-1)
    with pytest.raises(ValueError):
        shardkv.open(directory, durability="sometimes")
    assert not cluster_pids(directory) and not shm_entries(directory)  # nothing was started


def test_use_after_close_raises_closed(cluster):
    db = cluster.open()
    db.put(b"k", b"v")
    db.close()
    db.close()  # idempotent
    calls = {
        "get": lambda: db.get(b"k"),
        "put": lambda: db.put(b"k", b"w"),
        "delete": lambda: db.delete(b"k"),
        "cas": lambda: db.cas(b"k", b"v", b"w"),
        "get_many": lambda: db.get_many([b"k", b"other"]),
        "get_many([])": lambda: db.get_many([]),
        "list(scan())": lambda: list(db.scan()),
        "scan()": lambda: db.scan(),
        "min": lambda: db.min(),
        "max": lambda: db.max(),
        "above": lambda: db.above(b"a"),
        "below": lambda: db.below(b"z"),
        "len": lambda: len(db),
        "list(db)": lambda: list(db),
        "in": lambda: b"k" in db,
        "db[k]": lambda: db[b"k"],
        "db[k] = v": lambda: db.__setitem__(b"k", b"w"),
        "del db[k]": lambda: db.__delitem__(b"k"),
        "stats": lambda: db.stats(),
        "health": lambda: db.health(),
        "sync": lambda: db.sync(),
        "compact": lambda: db.compact(),
    }
    wrong = []
    for name, call in calls.items():
        try:
            call()
        except shardkv.Closed:
            continue
        except Exception as exc:  # noqa: BLE001
            wrong.append(f"{name} raised {exc!r}")
        else:
            wrong.append(f"{name} raised nothing")
    assert not wrong, f"after close() these did not raise shardkv.Closed: {wrong}"
    with cluster.open() as other:  # the store is untouched
        assert other.get(b"k") == b"v"
    assert "closed" in repr(db)


# -- attaching --------------------------------------------------------------------------------------
def test_second_open_attaches_to_the_same_cluster(cluster):
    a = cluster.open()
    b = cluster.open()
    c = cluster.open(shards=None)  # None: whatever the store has
    assert a.shards == b.shards == c.shards == SHARDS
    assert a.health()["supervisor"]["pid"] == b.health()["supervisor"]["pid"] == cluster.info()["pid"]
    assert a.lease != b.lease != c.lease != a.lease  # each client has a lease of its own
    a.put(b"from-a", b"1")
    b.put(b"from-b", b"2")
    assert b.get(b"from-a") == b"1" and a.get(b"from-b") == b"2" and c.get_many([b"from-a", b"from-b"]) == [b"1", b"2"]
    assert b.delete(b"from-a") and a.get(b"from-a") is None
    assert a.cas(b"x", None, b"a") and not b.cas(b"x", None, b"b") and c[b"x"] == b"a"
    with pytest.raises(ValueError):
        shardkv.open(cluster.directory, shards=SHARDS + 1)
    with pytest.raises(ValueError):
        shardkv.open(cluster.directory, shards=1)
    a.close()
    assert b.get(b"from-b") == b"2" and len(c) == 2  # closing one client leaves the others working


def test_health_stats_sync_compact_and_durability_levels(cluster):
    clients = {d: cluster.open(durability=d) for d in ("process", "interval", "fsync")}
    model = {}
    for i, (level, db) in enumerate(clients.items()):
        for j in range(200):
            key = b"%s-%03d" % (level.encode(), j)
            db.put(key, b"x" * (j % 50))
            model[key] = b"x" * (j % 50)
        for j in range(0, 200, 2):
            key = b"%s-%03d" % (level.encode(), j)
            assert db.delete(key)
            del model[key]
    db = clients["fsync"]
    for other in clients.values():
        assert contents(other) == model
    info = cluster.info()
    health = db.health()
    assert health["status"] == "healthy"
    assert health["supervisor"]["pid"] == info["pid"] and health["supervisor"]["state"] == "up"
    assert health["coordinator"]["role"] == "coordinator" and health["coordinator"]["state"] == "up"
    assert [s["shard"] for s in health["shards"]] == list(range(SHARDS))
    assert all(s["role"] == "shard" and s["state"] == "up" and s["restarts"] == 0 for s in health["shards"])
    assert sorted([health["coordinator"]["pid"]] + [s["pid"] for s in health["shards"]]) == sorted(pid for pid, _ in info["children"])
    stats = db.stats()
    assert stats["keys"] == len(model) == len(db) and len(stats["shards"]) == SHARDS
    assert sum(s["keys"] for s in stats["shards"]) == stats["keys"]
    assert 0.0 <= stats["garbage_ratio"] <= 1.0
    db.sync()
    results = db.compact()
    assert isinstance(results, list) and len(results) == SHARDS and all(isinstance(r, dict) for r in results)
    assert len(db.compact(shard=1)) == 1
    with pytest.raises(ValueError):
        db.compact(shard=SHARDS)
    with pytest.raises(TypeError):
        db.compact(shard="0")
    for other in clients.values():
        assert contents(other) == model
    assert db.stats()["keys"] == len(model)


def test_all_leases_in_use_is_unavailable(cluster):
    first = cluster.open()
    leases = cluster.info()["leases"]
    more = [cluster.open() for _ in range(leases - 1)]
    assert sorted(c.lease for c in [first, *more]) == list(range(leases))
    with pytest.raises(shardkv.Unavailable):
        shardkv.open(cluster.directory, shards=SHARDS, start_timeout=5)
    victim = more.pop(10)
    freed = victim.lease
    victim.close()
    again = cluster.open()
    assert again.lease == freed
    again.put(b"k", b"v")
    assert first.get(b"k") == b"v" and more[-1].get(b"k") == b"v"


def test_persistence_across_cluster_restart(cluster):
    db = cluster.open()
    rng = random.Random(1)
    model = {b"p-%04d" % i: rng.randbytes(rng.randrange(0, 300)) for i in range(500)}
    model[b"large"] = rng.randbytes(2_000_000)
    for key, value in model.items():
        db.put(key, value)
    for key in list(model)[:100:3]:
        db.delete(key)
        del model[key]
    info = cluster.info()
    db.close()
    wait_until(lambda: not alive(info["pid"], info["start_time"]), 15, message="stop of the idle embedded cluster")
    wait_until(lambda: nothing_left(cluster.directory), 10, message="exit of every cluster process and removal of /dev/shm entries")
    with pytest.raises(ValueError):
        shardkv.open(cluster.directory, shards=SHARDS + 1)  # a stopped store keeps its shard count too
    assert not cluster_pids(cluster.directory)
    db = cluster.open(shards=None)
    assert db.shards == SHARDS and cluster.info()["pid"] != info["pid"]
    assert len(db) == len(model)
    assert contents(db) == model


def test_last_close_stops_the_embedded_cluster(cluster):
    a = cluster.open()
    b = cluster.open()
    a.put(b"k", b"v")
    info = cluster.info()
    pids = [info["pid"], *(pid for pid, _ in info["children"])]
    assert set(cluster_pids(cluster.directory)) == set(pids)
    assert shm_entries(cluster.directory)
    a.close()
    time.sleep(4.5)  # longer than the idle timeout: one client is left, so nothing stops
    assert alive(info["pid"], info["start_time"]) and b.get(b"k") == b"v"
    assert set(cluster_pids(cluster.directory)) == set(pids)
    b.close()
    processes = [[info["pid"], info["start_time"]], *info["children"]]
    took = wait_until(
        lambda: nothing_left(cluster.directory) and not any(alive(pid, start) for pid, start in processes),
        10,
        message="stop of the cluster after its last client closed",
    )
    assert not os.path.exists(os.path.join(cluster.directory, "run", "cluster.json"))
    assert took < 10


def test_short_lived_client_stops_the_cluster(cluster):
    """An embedded cluster stops ~3 s after its last client is gone, however briefly it stayed.

    The supervisor looks at the lease locks every 0.5 s; a client that attaches, writes and
    closes between two looks must still count, or the supervisor waits FIRST_CLIENT_TIMEOUT
    (30 s) instead of IDLE_TIMEOUT (3 s) before it stops.
    """
    with cluster.open() as db:
        db.put(b"k", b"v")
    took = wait_until(lambda: nothing_left(cluster.directory), 10, interval=0.1, message="stop of the embedded cluster after its only (short-lived) client closed")
    assert took < 10
    with cluster.open() as db:  # and the write is there
        assert db.get(b"k") == b"v"


def test_a_stream_of_short_lived_clients_keeps_the_cluster_up(cluster, monkeypatch):
    """Clients that each attach and close between two of the supervisor's looks at the leases
    (the way a shell loop of `shardkv get` runs) keep an embedded cluster up: each one restarts
    the idle time, not only the first one that came."""
    idle = 1.5  # the supervisor looks at the leases every idle / 4 s
    monkeypatch.setenv("SHARDKV_IDLE_TIMEOUT", str(idle))  # inherited by the supervisor open() starts
    cluster.open().close()
    info = cluster.info()
    until = time.monotonic() + 3 * idle
    while time.monotonic() < until:
        time.sleep(idle / 10)
        cluster.open().close()  # holds its lease for a few milliseconds
        assert (cluster.info() or {}).get("pid") == info["pid"], "the cluster stopped while short-lived clients kept coming"
    took = wait_until(lambda: not alive(info["pid"], info["start_time"]), 10 * idle, message="stop of the cluster once the clients stopped coming")
    assert took >= idle / 2, "the idle time did not start again at the last client"


# -- a randomized model test ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_match_dict(db, seed):
    rng = random.Random(seed)
    model: dict[bytes, bytes] = {}
    pool = [b"r%03d" % i for i in range(120)] + [b"s" + bytes([c]) for c in range(1, 40)] + [b"\x00", b"\xff\xff", b"r"]

    def value():
        roll = rng.random()
        if roll < 0.05:
            return b""
        if roll < 0.07:
            return rng.randbytes(rng.randrange(100_000, 400_000))  # spans several ring slots
        return rng.randbytes(rng.randrange(1, 60))

    for step in range(1000):
        op = rng.random()
        key = rng.choice(pool)
        where = (seed, step)
        if op < 0.30:
            v = value()
            db.put(key, v)
            model[key] = v
        elif op < 0.45:
            assert db.get(key) == model.get(key), where
        elif op < 0.55:
            assert db.delete(key) == (key in model), where
            model.pop(key, None)
        elif op < 0.70:
            current = model.get(key)
            expected = rng.choice([current, current, None, b"nope", value()])
            new = rng.choice([value(), value(), None])
            swapped = db.cas(key, expected, new)
            assert swapped == (current == expected), where
            if swapped:
                if new is None:
                    model.pop(key, None)
                else:
                    model[key] = new
        elif op < 0.78:
            ask = rng.sample(pool, rng.randrange(0, 30))
            assert db.get_many(ask) == [model.get(k) for k in ask], where
        elif op < 0.88:
            start = rng.choice([None, rng.choice(pool)])
            stop = rng.choice([None, rng.choice(pool)])
            prefix = rng.choice([None, None, b"r0", b"r1", b"s", b"r"])
            reverse = rng.random() < 0.5
            limit = rng.choice([None, 0, 1, 3, 50])
            got = list(db.scan(start=start, stop=stop, reverse=reverse, prefix=prefix, limit=limit))
            assert got == model_scan(model, start, stop, reverse, prefix, limit), where
        elif op < 0.92:
            assert len(db) == len(model), where
        elif op < 0.94:
            ordered = sorted(model)
            assert db.min() == ((ordered[0], model[ordered[0]]) if ordered else None), where
            assert db.max() == ((ordered[-1], model[ordered[-1]]) if ordered else None), where
        elif op < 0.98:
            above = [k for k in sorted(model) if k > key]
            below = [k for k in sorted(model) if k < key]
            assert db.above(key) == ((above[0], model[above[0]]) if above else None), where
            assert db.below(key) == ((below[-1], model[below[-1]]) if below else None), where
        else:
            assert (key in db) == (key in model), where
    assert contents(db) == model
    assert list(db) == sorted(model)


# -- fork and threads -------------------------------------------------------------------------------
def test_forked_child_uses_the_inherited_client(db):
    db.put(b"parent-before", b"1")
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            ok = db.get(b"parent-before") == b"1"
            db.put(b"from-child", b"hello")
            ok = ok and db.get(b"from-child") == b"hello"
            ok = ok and db.cas(b"counter", None, b"child")
            ok = ok and db.get_many([b"parent-before", b"from-child"]) == [b"1", b"hello"]
            ok = ok and len(db) == 3
            status = 0 if ok else 2
            db.close()
        except BaseException:  # noqa: BLE001
            status = 3
        finally:
            os._exit(status)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish within 30 s")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's client keeps working, with its own lease, and sees the child's writes
    assert db.get(b"from-child") == b"hello" and db.get(b"counter") == b"child"
    db.put(b"parent-after", b"2")
    assert db.get(b"parent-after") == b"2" and len(db) == 4
    assert db.health()["status"] == "healthy"


def test_threads_share_one_client(db):
    errors = []
    written = {}

    def work(t):
        try:
            rng = random.Random(t)
            mine = {}
            for i in range(300):
                key = b"t%d-%04d" % (t, rng.randrange(100))
                if rng.random() < 0.6:
                    value = rng.randbytes(rng.randrange(0, 200)) if i % 50 else rng.randbytes(300_000)
                    db.put(key, value)
                    mine[key] = value
                else:
                    assert db.get(key) == mine.get(key)
                if i % 40 == 0:
                    ask = sorted(mine)[:20]
                    assert db.get_many(ask) == [mine[k] for k in ask]
                    assert dict(db.scan(prefix=b"t%d-" % t)) == mine
            written.update(mine)
        except BaseException as exc:  # noqa: BLE001
            errors.append((t, repr(exc)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors
    assert contents(db) == written and len(db) == len(written)
