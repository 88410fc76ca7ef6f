"""The Redis Cluster backend beyond the shared API suite (test_backend_conformance.py): the
backend registry, URLs, the ordered index and its switch, non-atomic batches, durability,
health and `shardkv status`, `copy`, and a failover under a writing client.

All but the registry tests need a real cluster (redis_cluster_support.py): the session's
shared one, and a cluster of their own for the tests that kill or stop servers.
"""

from __future__ import annotations

import math

import asyncio
import importlib
import json
import signal
import sys
import threading
import time
import uuid
from importlib.metadata import EntryPoint

import pytest

import shardkv
import shardkv.backends as backends
from clock_support import still_before, wait_past
from cluster_support import cluster_fixture
from redis_cluster_support import LocalRedisCluster, reference_slot, require_redis


def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def url(redis_cluster):
    return redis_cluster.url


@pytest.fixture
def db(url):
    with shardkv.open(url, namespace=namespace()) as store:
        yield store


# -- the registry ------------------------------------------------------------------------------
@pytest.mark.unit
def test_unknown_scheme_is_a_value_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="redis"):
        shardkv.open("nosuch://somewhere")
    with pytest.raises(ValueError, match="redis"):
        shardkv.aopen("nosuch://somewhere")


@pytest.mark.unit
def test_a_path_is_never_taken_for_a_url():
    assert backends.scheme_of("data/") is None
    assert backends.scheme_of("/tmp/x") is None
    assert backends.scheme_of("C:/x") is None
    assert backends.scheme_of("redis://h:1") == "redis" and backends.scheme_of("REDISS://h:1") == "rediss"
    import pathlib  # noqa: PLC0415

    assert backends.scheme_of(pathlib.Path("redis://h:1")) is None  # a PathLike is always a path


@pytest.mark.unit
def test_missing_optional_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    monkeypatch.delitem(sys.modules, "shardkv.backends.redis_cluster", raising=False)
    monkeypatch.setattr(backends, "_LOADED", {})
    with pytest.raises(ImportError, match=r'pip install "shardkv\[redis\]"'):
        shardkv.open("redis://127.0.0.1:1")


@pytest.mark.engine
def test_third_party_backend_through_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "memkv_backend.py").write_text(
        "FEATURES = None\n"
        "def open(target, *args, **options):\n"
        "    return ('sync', target, args, options)\n"
        "def aopen(target, *args, **options):\n"
        "    return ('async', target, args, options)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint(name="memkv", value="memkv_backend", group=backends.ENTRY_POINT_GROUP)
    monkeypatch.setattr(backends, "_entry_points", lambda: [point])
    monkeypatch.setattr(backends, "_LOADED", {})
    assert shardkv.open("memkv://x", 1, a=2) == ("sync", "memkv://x", (1,), {"a": 2})
    assert shardkv.aopen("memkv://y") == ("async", "memkv://y", (), {})
    assert "memkv" in backends.schemes()


@pytest.mark.unit
def test_url_parsing():
    from shardkv.backends.redis_cluster import parse_url  # noqa: PLC0415

    parsed = parse_url("redis://127.0.0.1:7000,localhost:7001,[::1]:7002,h")
    assert parsed.nodes == [("127.0.0.1", 7000), ("localhost", 7001), ("::1", 7002), ("h", 6379)]
    assert not parsed.ssl and parsed.username is None and parsed.password is None
    secure = parse_url("rediss://bob:s%40cret@h:1?namespace=app&ordered=false&buckets=16")
    assert secure.ssl and secure.username == "bob" and secure.password == "s@cret"
    assert secure.options == {"namespace": "app", "ordered": False, "buckets": 16}
    for bad in ("redis://", "redis://h:notaport", "redis://h:1/2", "redis://h:1?frobnicate=1", "redis://h:70000"):
        with pytest.raises(ValueError):
            parse_url(bad)


# -- the index switch ---------------------------------------------------------------------------
def test_ordered_false_makes_ordered_reads_unsupported(url):
    ns = namespace()
    with shardkv.open(url, namespace=ns, ordered=False) as db:
        assert db.features.ordered_scans is False and db.features["ordered_scans"] is False
        db.put(b"a", b"1")
        db.put(b"b", b"2", ttl=60)
        db.put_many({b"{t}x": b"3", b"{t}y": b"4"})
        assert db.cas(b"a", b"1", b"2") and len(db) == 4
        for call in (db.scan, db.min, db.max, lambda: db.above(b"a"), lambda: db.below(b"b"), lambda: list(db), lambda: db.keys() and list(db.keys())):
            with pytest.raises(shardkv.Unsupported, match="ordered"):
                call()
    with shardkv.open(url, namespace=ns) as again:
        assert again.features.ordered_scans is False  # fixed when the store was created
        assert again.get(b"a") == b"2"
    with pytest.raises(ValueError, match="ordered"):
        shardkv.open(url, namespace=ns, ordered=True)


def test_ordered_false_on_an_ordered_store_keeps_its_index(url):
    ns = namespace()
    with shardkv.open(url, namespace=ns) as ordered, shardkv.open(url, namespace=ns, ordered=False) as plain:
        assert ordered.features.ordered_scans and not plain.features.ordered_scans
        plain.put(b"b", b"2")
        plain.put_many({b"{t}a": b"1", b"{t}c": b"3"})
        plain.put(b"gone", b"x")
        plain.delete(b"gone")
        with pytest.raises(shardkv.Unsupported):
            plain.min()
        assert list(ordered.scan()) == [(b"b", b"2"), (b"{t}a", b"1"), (b"{t}c", b"3")]


def test_buckets_are_fixed_at_creation(url):
    ns = namespace()
    with shardkv.open(url, namespace=ns, buckets=16) as db:
        assert db.buckets == 16
        db.put_many({b"k%d" % i: b"v" for i in range(50)}, atomic=False)
        assert [k for k, _ in db.scan(limit=3)] == [b"k0", b"k1", b"k10"]
    with shardkv.open(url, namespace=ns) as db:
        assert db.buckets == 16 and len(db) == 50
    with pytest.raises(ValueError, match="buckets"):
        shardkv.open(url, namespace=ns, buckets=32)
    for bad in (0, 16385, 2.5):
        with pytest.raises((ValueError, TypeError)):
            shardkv.open(url, namespace=namespace(), buckets=bad)


def test_namespaces_keep_stores_apart(url):
    with shardkv.open(url, namespace=namespace()) as one, shardkv.open(url, namespace=namespace()) as two:
        one.put(b"k", b"1")
        assert two.get(b"k") is None and len(two) == 0 and len(one) == 1
    for bad in ("", "has space", "brace{", "x" * 65):
        with pytest.raises(ValueError):
            shardkv.open(url, namespace=bad)


# -- batches -----------------------------------------------------------------------------------
def test_cross_slot_batch_names_the_slots_and_sends_nothing(db):
    keys = [b"alpha", b"beta", b"gamma"]
    assert len({reference_slot(k) for k in keys}) == 3
    with pytest.raises(shardkv.Unsupported) as info:
        db.write([("put", k, b"v") for k in keys])
    message = str(info.value)
    for key in keys:
        assert str(reference_slot(key)) in message
    assert "{" in message and "atomic=False" in message  # says how to fix it
    assert db.get_many(keys) == [None, None, None]
    assert db.slot_of(b"{user42}:name") == db.slot_of(b"{user42}:email") == reference_slot(b"user42")


def test_non_atomic_put_many_and_write(db):
    items = {b"n%03d" % i: b"v%d" % i for i in range(300)}
    db.put_many(items, atomic=False)
    assert db.get_many(list(items)) == list(items.values())
    db.write([("put", b"alpha", b"1", 60), ("delete", b"n000"), ("put", b"beta", b"2")], atomic=False)
    assert db.get_many([b"alpha", b"beta", b"n000"]) == [b"1", b"2", None]
    assert 59 < db.ttl(b"alpha") <= 60
    with pytest.raises(ValueError, match="expect"):
        db.write([("expect", b"alpha", b"1"), ("put", b"beta", b"3")], atomic=False)
    with pytest.raises(TypeError):
        db.put_many(items, atomic="no")
    assert list(db.scan(prefix=b"n00")) == [(b"n%03d" % i, b"v%d" % i) for i in range(1, 10)]


def test_batch_limits_are_checked_before_sending(url):
    with shardkv.open(url, namespace=namespace(), max_batch_ops=3, max_batch_bytes=100) as db:
        with pytest.raises(ValueError, match="max_batch_ops"):
            db.put_many({b"{t}%d" % i: b"v" for i in range(4)})
        with pytest.raises(ValueError, match="max_batch_bytes"):
            db.put_many({b"{t}a": b"x" * 200})
        assert len(db) == 0


def test_expiry_is_kept_out_of_the_index(db):
    db.put_many({b"{e}%03d" % i: b"v" for i in range(200)})
    started = time.monotonic()
    db.write([("put", b"{e}%03d" % i, b"short", 0.15) for i in range(0, 200, 2)])
    written = time.monotonic()
    db.put(b"{e}long", b"x", ttl=60)
    count = len(db)
    if still_before(started, 0.15):
        assert count == 201
    wait_past(written, 0.15)
    assert len(db) == 101
    assert [k for k, _ in db.scan(limit=3)] == [b"{e}001", b"{e}003", b"{e}005"]
    assert db.max() == (b"{e}long", b"x")
    assert db.expire(b"{e}long", None) and db.ttl(b"{e}long") == math.inf
    assert db.index_stats()["entries"] == 101  # the index has dropped every expired key


# -- durability ---------------------------------------------------------------------------------
def test_durability_is_what_the_cluster_reports(db, url):
    # The session's cluster runs appendonly yes, appendfsync everysec.
    assert db.features.durability_levels == ("interval",) and db.durability == "interval"
    shardkv.open(url, namespace=namespace(), durability="interval").close()
    for level in ("process", "fsync"):
        with pytest.raises(shardkv.Unsupported, match="appendfsync"):
            shardkv.open(url, namespace=namespace(), durability=level)
    with pytest.raises(ValueError):
        shardkv.open(url, durability="sometimes")
    with pytest.raises(shardkv.Unsupported, match="shards"):
        shardkv.open(url, shards=4)


def test_sync_and_compact_are_unsupported(db):
    with pytest.raises(shardkv.Unsupported, match="server"):
        db.sync()
    with pytest.raises(shardkv.Unsupported):
        db.compact()


# -- health and the command line ------------------------------------------------------------------
def test_health_reports_every_node(db, redis_cluster):
    health = db.health()
    assert health["status"] == "healthy" and health["exit_code"] == 0 and health["backend"] == "redis-cluster"
    nodes = health["nodes"]
    assert sorted(n["address"] for n in nodes) == sorted(n.address for n in redis_cluster.nodes)
    masters = [n for n in nodes if n["role"] == "master"]
    replicas = [n for n in nodes if n["role"] == "replica"]
    assert len(masters) == 3 and len(replicas) == 3 and all(n["reachable"] for n in nodes)
    covered = sorted(slot for n in masters for first, last in n["slots"] for slot in range(first, last + 1))
    assert covered == list(range(16384)) and all(n["slots"] == [] for n in replicas)
    assert {n["master"] for n in replicas} == {n["id"] for n in masters}


def test_cli_status_of_a_cluster(redis_cluster, capsys):
    from shardkv.cli import main  # noqa: PLC0415

    assert main(["status", redis_cluster.url]) == 0
    out = capsys.readouterr().out
    for node in redis_cluster.nodes:
        assert node.address in out
    assert "master" in out and "replica" in out and "status: healthy" in out
    assert main(["status", redis_cluster.url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "healthy" and len(status["nodes"]) == 6
    assert main(["status", redis_cluster.url, "--format", "prometheus"]) == 0
    text = capsys.readouterr().out
    for name in ("shardkv_redis_node_up", "shardkv_redis_slots_ok", "shardkv_health"):  # #22 item 7
        assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text


def test_copy_from_a_local_store_keeps_ttls(tmp_path, redis_cluster):
    require_redis()
    gen = cluster_fixture(tmp_path / "db")
    harness = next(gen)
    try:
        src = harness.open()
        src.put_many({b"c%04d" % i: b"v%d" % i for i in range(1500)})
        src.put(b"session", b"s", ttl=120)
        ns = namespace()
        from shardkv.backends.__main__ import main  # noqa: PLC0415

        assert main(["copy", harness.directory, f"{redis_cluster.url}?namespace={ns}"]) == 0
        with shardkv.open(redis_cluster.url, namespace=ns) as dst:
            assert len(dst) == 1501 and dst.get(b"c0042") == b"v42"
            assert 100 < dst.ttl(b"session") <= 120 and dst.ttl(b"c0001") == math.inf
            assert list(dst.scan()) == list(src.scan())
    finally:
        next(gen, None)


# -- asyncio -----------------------------------------------------------------------------------
def test_asyncio_specifics(url):
    ns = namespace()

    async def main():
        db = await shardkv.aopen(url, namespace=ns)
        try:
            assert db.features.asyncio and db.features.ordered_scans
            with pytest.raises(shardkv.Unsupported):
                await db.put_many({b"alpha": b"1", b"beta": b"2"})
            await db.put_many({b"alpha": b"1", b"beta": b"2"}, atomic=False)
            assert await db.min() == (b"alpha", b"1") and await db.max() == (b"beta", b"2")
            assert await db.above(b"alpha") == (b"beta", b"2") and await db.below(b"alpha") is None
            health = await db.health()
            assert health["status"] == "healthy"
        finally:
            await db.close()
        async with shardkv.aopen(url, namespace=ns, ordered=False) as plain:
            with pytest.raises(shardkv.Unsupported):
                await plain.min()
            with pytest.raises(shardkv.Unsupported):
                plain.scan()

    asyncio.run(main())


# -- failures -------------------------------------------------------------------------------------
@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of the test's own, which it may kill parts of; stopped by pid afterwards."""
    require_redis()
    cluster = LocalRedisCluster(tmp_path / "redis", node_timeout_ms=1000)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _keys_on(db, master, count: int, fmt: bytes) -> list[bytes]:
    """`count` keys that the cluster stores on `master` now."""
    slots = _slots_of(db, master)
    found, i = [], 0
    while len(found) < count:
        if db._storage_slot(fmt % i) in slots:
            found.append(fmt % i)
        i += 1
    return found


@pytest.mark.cluster
def test_failover_under_a_writing_client(own_cluster):
    cluster = own_cluster
    db = shardkv.open(cluster.url, namespace="fo", retry_timeout=30, socket_timeout=0.3)
    try:
        victim = cluster.nodes[0]
        probe = _keys_on(db, victim, 1, b"probe-%d")[0]

        # A write whose answer does not come back in time: its outcome is unknown.
        db.put(probe, b"before")  # a connection to the victim is open: the next put is sent
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(shardkv.Unavailable, match="may or may not"):
                db.put(probe, b"maybe")
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while db.get(probe) != b"maybe":  # here it was applied after all, once the server ran again
            assert time.monotonic() < deadline
            time.sleep(0.01)

        acked: list[tuple[int, float]] = []
        unknown: list[int] = []
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                try:
                    db.put(b"w%06d" % i, b"v%d" % i)
                    acked.append((i, time.monotonic()))
                except shardkv.Unavailable:
                    unknown.append(i)
                i += 1

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        while len(acked) < 300:
            time.sleep(0.01)
        # Every write acknowledged before `replicated_at` is on the victim's replica before the kill.
        replicated_at, acked_at_barrier = time.monotonic(), len(acked)
        with victim.client() as r:
            offset = r.info("replication")["master_repl_offset"]
        replica = cluster.replicas_of(victim)[0]
        while True:
            with replica.client() as r:
                if r.info("replication").get("slave_repl_offset", -1) >= offset:
                    break
            time.sleep(0.005)
        victim_slots = _slots_of(db, victim)
        cluster.kill(victim)  # SIGKILL while the writer runs
        killed_at = time.monotonic()

        # A read of a key the dead master served is retried until its replica takes over.
        old = next(b"w%06d" % i for i in range(acked_at_barrier) if db._storage_slot(b"w%06d" % i) in victim_slots)
        assert db.get(old) == b"v%d" % int(old[1:])
        deadline = time.monotonic() + 30
        while cluster.roles().get(replica.port) != "master":
            assert time.monotonic() < deadline, "the replica did not take over"
            time.sleep(0.05)
        promoted_at = time.monotonic()
        # Go on until writes have landed on the new master too.
        while not any(t > promoted_at and db._storage_slot(b"w%06d" % i) in victim_slots for i, t in acked[-100:]):
            assert time.monotonic() < deadline + 30, "no write reached the new master"
            time.sleep(0.05)
        stop.set()
        thread.join(30)

        lost_in_window = []
        with shardkv.open(cluster.url, namespace="fo") as check:
            values = check.get_many([b"w%06d" % i for i, _ in acked])
            for (i, at), value in zip(acked, values):
                if value == b"v%d" % i:
                    continue
                if replicated_at < at <= killed_at:
                    lost_in_window.append(i)  # async replication: documented as possible
                    continue
                raise AssertionError(f"write {i}, acknowledged {'before the kill' if at <= killed_at else 'after failover'}, was lost")
        assert len(acked) > 300 and len(lost_in_window) < 50
        print(f"failover in {promoted_at - killed_at:.1f} s; acked {len(acked)}, unknown {len(unknown)}, lost in the last ms before the kill {len(lost_in_window)}")

        # The whole cluster gone: writes and (after retry_timeout) reads raise Unavailable.
        with shardkv.open(cluster.url, namespace="fo", retry_timeout=1.0) as short:
            for node in cluster.running():
                cluster.kill(node)
            with pytest.raises(shardkv.Unavailable):
                short.put(b"after", b"x")
            started = time.monotonic()
            with pytest.raises(shardkv.Unavailable):
                short.get(b"w000001")
            assert time.monotonic() - started < 10
    finally:
        db.close()


def _slots_of(db, node) -> set[int]:
    for entry in db.health()["nodes"]:
        if entry["address"] == node.address:
            return {s for a, b in entry["slots"] for s in range(a, b + 1)}
    return set()


@pytest.mark.engine
def test_reimport_of_the_backend_module_is_lazy():
    # Importing shardkv does not import redis-py: the backend loads on first use of its scheme.
    code = "import sys, shardkv; print('redis' in sys.modules, 'shardkv.backends.redis_cluster' in sys.modules)"
    import subprocess  # noqa: PLC0415

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    importlib.import_module("shardkv.backends")
