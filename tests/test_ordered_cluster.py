"""Ordered reads in the client's process (shardkv/ipc/sortedview.py, docs/IPC.md "Ordered
view"): scans, min/max/above/below read the workers' ordered views from shared memory and the
records from the segment files; they agree with a sorted() model through writes, batches,
expiry, compaction, index doublings and worker restarts; no scan shows part of a batch; garbage
in shared memory sends them to the ring, never to a crash or a wrong answer."""

import asyncio
import os
import random
import signal
import threading
import time

import numpy as np
import posix_ipc
import pytest

import shardkv
import test_ipc_layout as ipc_doc
from client_support import watch_calls
from cluster_support import cluster_fixture, keys_by_shard, wait_until
from shardkv.ipc import messages, sortedview, viewlayout
from shardkv.ipc.layout import PROC_UP
from shardkv.ipc.sharedindex import SUPPORTED, U32

pytestmark = [
    pytest.mark.skipif(not SUPPORTED, reason="direct reads are x86-64 only (elsewhere clients always use the ring)"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"),
]


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


class PageCounter:
    """Counts the windows answered through the ring (SCAN pages) instead of shared memory."""

    def __init__(self, monkeypatch):
        self.pages = 0
        original = sortedview.OrderedScan._page_request

        def counted(scan, shard):
            self.pages += 1
            return original(scan, shard)

        monkeypatch.setattr(sortedview.OrderedScan, "_page_request", counted)


def expected_scan(model, start=None, stop=None, reverse=False, prefix=None, limit=None):
    items = [kv for kv in sorted(model.items()) if (start is None or kv[0] >= start) and (stop is None or kv[0] < stop) and (prefix is None or kv[0].startswith(prefix))]
    if reverse:
        items.reverse()
    return items if limit is None else items[:limit]


def check_against(db, model, rng, rounds=6):
    assert list(db.scan()) == expected_scan(model)
    assert list(db.scan(reverse=True)) == expected_scan(model, reverse=True)
    ordered = sorted(model.items())
    assert db.min() == (ordered[0] if ordered else None)
    assert db.max() == (ordered[-1] if ordered else None)
    for _ in range(rounds):
        a, b = sorted(rng.randbytes(rng.choice((1, 2, 6))) for _ in range(2))
        limit = rng.choice((None, 1, 3, 200))
        reverse = rng.random() < 0.5
        prefix = rng.choice((None, a[:1]))
        assert list(db.scan(start=a, stop=b, reverse=reverse, limit=limit)) == expected_scan(model, a, b, reverse, None, limit)
        assert list(db.scan(prefix=prefix, reverse=reverse, limit=limit)) == expected_scan(model, None, None, reverse, prefix, limit)
        above = [kv for kv in ordered if kv[0] > a]
        below = [kv for kv in ordered if kv[0] < a]
        assert db.above(a) == (above[0] if above else None)
        assert db.below(a) == (below[-1] if below else None)


def worker_pid(db, shard):
    entry = db.cluster_view.control.procs[1 + shard]
    return int(entry["pid"]), int(entry["state"])


def restart_worker(db, shard):
    old, _ = worker_pid(db, shard)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker_pid(db, shard)[0] not in (0, old) and worker_pid(db, shard)[1] == PROC_UP, 30, message="worker restart")


@pytest.mark.parametrize("seed, eager", [(1, False), (2, False), (3, True)])
def test_direct_scans_agree_with_a_model(cluster, monkeypatch, seed, eager):
    """`eager`: min/max/above/below check each run whole after 4 searches of it (instead of
    n / 64 + 4), and from then on trust it until its `rewrites` changes."""
    counter = PageCounter(monkeypatch)
    if eager:
        monkeypatch.setattr(sortedview, "CHECK_AFTER", 1 << 40)
    db = cluster.open(durability="process")
    rng = random.Random(seed)
    model = {}
    by_shard = keys_by_shard(db, 400, b"s%05d")
    for step in range(240):
        action = rng.random()
        if action < 0.3:
            key, value = rng.randbytes(rng.choice((1, 3, 8, 16))), rng.randbytes(rng.randrange(40))
            db.put(key, value)
            model[key] = value
        elif action < 0.4 and model:
            key = rng.choice(sorted(model))
            assert db.delete(key)
            del model[key]
        elif action < 0.55:
            batch = {rng.randbytes(rng.choice((4, 16))): rng.randbytes(16) for _ in range(rng.choice((5, 80, 300)))}
            db.put_many(batch)  # spans both shards: two-phase commit
            model.update(batch)
        elif action < 0.7:
            keys = rng.sample(by_shard[rng.randrange(2)], rng.choice((2, 70)))
            gone = [k for k in keys[: len(keys) // 3] if k in model]
            db.write([("delete", k) for k in gone] + [("put", k, b"one shard") for k in keys[len(keys) // 3 :]])
            for k in gone:
                del model[k]
            model.update(dict.fromkeys(keys[len(keys) // 3 :], b"one shard"))
        elif action < 0.73:
            key = rng.randbytes(5)
            db.put(key, b"short-lived", ttl=0.2)  # gone by the next check (and never in the model)
        elif action < 0.75:
            db.compact()
        elif action < 0.76:
            restart_worker(db, rng.randrange(2))
        if step % 30 == 29:
            time.sleep(0.25)  # the ttl keys expire
            check_against(db, model, rng)
    len(db)  # a LEN to every worker: each has indexed the last batch (see the asyncio test)
    direct_before = counter.pages
    check_against(db, model, rng)
    assert counter.pages == direct_before, "a quiet cluster answered scans through the ring"
    assert len(model) > 3000, "the test should double the shards' indexes a few times"
    if eager:
        assert all(reader._checked for reader in sortedview.view_readers(db)), "no run was checked whole"


def test_a_view_built_after_a_restart(cluster, monkeypatch):
    """A worker restarted on a big shard sorts its view in the background (or loads it); scans
    go through the ring until it is ready, then read it directly."""
    from shardkv.shards import sortedkeys

    db = cluster.open(durability="process")
    model = {os.urandom(8): b"v" for _ in range(150000)}
    items = list(model.items())
    for i in range(0, len(items), 10000):
        db.put_many(items[i : i + 10000])
    assert sortedkeys.SYNC_BUILD_MAX < len(model) // 2  # each shard's view is built in a thread
    restart_worker(db, 0)
    assert list(db.scan()) == sorted(model.items())
    wait_until(lambda: sortedview.view_readers(db)[0].state() is not None, 30, message="the restarted worker's view")
    counter = PageCounter(monkeypatch)
    assert list(db.scan(reverse=True)) == sorted(model.items(), reverse=True)
    assert counter.pages == 0


def test_a_worker_sorting_its_view_goes_on_serving(cluster, monkeypatch, tmp_path):
    """After a crash a big shard sorts its view in the background (held here by a hold point
    until the test lets it go). A scan that reaches the worker through its ring meanwhile is
    answered Busy and sent again by the client, so the worker goes on answering gets and puts
    through its ring at once; the scan completes once the view is sorted. (Before, the SCAN
    held the worker's request loop until the sort was done.)"""
    hold = tmp_path / "hold-sort"
    monkeypatch.setenv("SHARDKV_HOLDS", f"sortedkeys.background_sort:{hold}")
    db = cluster.open(durability="process")
    scanner = cluster.open(direct_reads=False, lock_timeout=60.0)  # its scans wait for the sort
    other = cluster.open(direct_reads=False, request_timeout=5.0)
    model = {os.urandom(8): b"v" for _ in range(150000)}
    items = list(model.items())
    for i in range(0, len(items), 10000):
        db.put_many(items[i : i + 10000])
    key = keys_by_shard(db, 1, b"probe-%d")[0][0]
    hold.touch()
    restart_worker(db, 0)
    sent = threading.Event()

    def seen(shard, message):
        if shard == 0 and message[0] == messages.SCAN:
            sent.set()

    watch_calls(scanner, monkeypatch, seen)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("items", list(scanner.scan())))
    thread.start()
    try:
        assert sent.wait(30)
        time.sleep(0.3)  # the SCAN reaches the worker first (without this the test could pass wrongly, never fail)
        started = time.monotonic()
        other.put(key, b"during the sort")
        assert other.get(key) == b"during the sort"
        assert time.monotonic() - started < 2.0, "the worker's request loop waited for the sort"
        assert thread.is_alive(), "the scan should wait for the view"
    finally:
        hold.unlink()
        thread.join(60)
    model[key] = b"during the sort"
    assert result["items"] == sorted(model.items())


def test_no_scan_shows_part_of_a_batch(cluster):
    """Writers replace a set of keys batch after batch (one shard, and both shards); every scan
    that completes sees one generation of each set; the others raise Unavailable."""
    db = cluster.open(durability="process")
    one_shard = keys_by_shard(db, 1500, b"one-%04d")[0]  # single-shard batches (APPLY), over a page of the ring
    spread = [b"both-%04d" % i for i in range(300)]  # cross-shard batches (two-phase commit)
    db.put_many(dict.fromkeys(one_shard, b"0"))
    db.put_many(dict.fromkeys(spread, b"0"))
    stop = threading.Event()
    errors = []

    def writer(keys):
        with shardkv.open(cluster.directory, durability="process") as w:
            generation = 0
            while not stop.is_set():
                generation += 1
                try:
                    w.put_many(dict.fromkeys(keys, b"%d" % generation))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=writer, args=(keys,)) for keys in (one_shard, spread)]
    for thread in threads:
        thread.start()
    complete = failed = 0
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline or complete < 5:
            for reverse in (False, True):
                try:
                    items = dict(db.scan(reverse=reverse))
                except shardkv.Unavailable:
                    failed += 1
                    continue
                complete += 1
                assert len({items[k] for k in one_shard}) == 1, "a single-shard batch seen in part"
                assert len({items[k] for k in spread}) == 1, "a cross-shard batch seen in part"
            assert time.monotonic() < deadline + 30, "no scan completed"
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert complete >= 5


def test_garbage_in_shared_memory_sends_scans_to_the_ring(cluster, monkeypatch):
    """Another process scribbles over the view object or the header's `view` field (which the
    worker only writes), or a client maps runs full of garbage: scans, min and above still give
    exactly the model's answers (through the ring), and never crash. (A run's entries are the
    worker's own data, like the hash table: garbage written there reaches the worker too, so
    that case is played on the client's side only.)"""
    import mmap

    counter = PageCounter(monkeypatch)
    db = cluster.open(durability="process")
    model = {b"g%05d" % i: b"v%d" % i for i in range(6000)}
    db.put_many(model)
    for key in list(model)[:4000:3]:  # keys in two levels
        db.put(key + b"x", b"w")
        model[key + b"x"] = b"w"
    prefix = db.cluster_view.info["names"]["prefix"]
    reader = sortedview.view_readers(db)[0]

    def writable(name):
        shm = posix_ipc.SharedMemory(name)
        buf = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        return buf

    header = writable(f"{prefix}-idx0")
    view = writable(viewlayout.view_name(prefix, 0, U32.unpack_from(header, viewlayout.VIEW_FIELD)[0]))
    levels = [viewlayout.LEVEL_ENTRY.unpack_from(view, viewlayout.LEVELS_AT + 16 * level) for level in range(viewlayout.LEVELS)]
    level, (number, count, _, capacity) = max(enumerate(levels), key=lambda lv: lv[1][1])
    assert count > 1000
    rng = np.random.default_rng(5)
    original_run = sortedview.ViewReader._run

    def garbage_run(kind):
        def run(self, epoch, run_number, run_capacity):
            found = original_run(self, epoch, run_number, run_capacity)
            if found is None or run_number != number:
                return found
            eids = np.frombuffer(found[2], dtype="<u4").copy()
            prefixes = np.frombuffer(found[3], dtype="<u8").copy()
            if kind == "entry ids":
                eids[:count] = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
            elif kind == "entry ids shuffled":
                eids[:count] = rng.permutation(eids[:count])
            elif kind == "prefixes":
                prefixes[:count] = rng.integers(0, 2**63, count, dtype=np.int64).astype(np.uint64)
            else:
                prefixes[:count] = 0
            return found[0], found[1], memoryview(eids).cast("B").cast("I"), memoryview(prefixes).cast("B").cast("Q")

        return run

    shared = {
        "counts": (view, viewlayout.LEVELS_AT, rng.integers(0, 256, 16 * viewlayout.LEVELS, dtype=np.uint8).tobytes()),
        "count past capacity": (view, viewlayout.LEVELS_AT + 16 * level + 4, (capacity + 1).to_bytes(4, "little")),
        "level number": (view, viewlayout.LEVELS_AT + 16 * level, (999).to_bytes(4, "little")),
        "view object magic": (view, 0, b"garbage!"),
        "view number": (header, viewlayout.VIEW_FIELD, (12345).to_bytes(4, "little")),
    }
    cases = list(shared) + ["entry ids", "entry ids shuffled", "prefixes", "prefixes zero"]
    # A run searched 4 times is checked whole (ViewReader.check_run): garbage must fail that too.
    monkeypatch.setattr(sortedview, "CHECK_AFTER", 1 << 40)
    for name in cases:
        # As a client that maps them now (and has checked nothing yet).
        reader._runs, reader._view, reader._state, reader._checked, reader._searches = {}, (None, 0, None), None, set(), {}
        if name in shared:
            buf, offset, garbage = shared[name]
            saved = buf[offset : offset + len(garbage)]
            buf[offset : offset + len(garbage)] = garbage
        else:
            monkeypatch.setattr(sortedview.ViewReader, "_run", garbage_run(name))
        try:
            pages = counter.pages
            assert list(db.scan()) == sorted(model.items()), name
            assert list(db.scan(reverse=True, start=b"g01", stop=b"g04")) == expected_scan(model, b"g01", b"g04", True), name
            assert db.min() == min(model.items()) and db.above(b"g02000") == min(kv for kv in model.items() if kv[0] > b"g02000"), name
            assert db.below(b"g03000") == max(kv for kv in model.items() if kv[0] < b"g03000"), name
            for probe in (b"g00500", b"g02000", b"g04500") * 3:
                assert db.above(probe) == min(kv for kv in model.items() if kv[0] > probe), name
                assert db.below(probe) == max(kv for kv in model.items() if kv[0] < probe), name
            assert counter.pages > pages, f"{name}: the garbage went unnoticed"
        finally:
            if name in shared:
                buf[offset : offset + len(garbage)] = saved
            else:
                monkeypatch.setattr(sortedview.ViewReader, "_run", original_run)
    reader._runs, reader._view, reader._state, reader._checked, reader._searches = {}, (None, 0, None), None, set(), {}
    pages = counter.pages
    assert list(db.scan()) == sorted(model.items())
    assert counter.pages == pages, "restored: read directly again"
    view.close()
    header.close()


@pytest.mark.parametrize("segment", [0xFFFF_FFF0, 70_000])
def test_a_location_in_a_far_segment_sends_the_scan_to_the_ring(cluster, monkeypatch, segment):
    """A table entry (shared memory, untrusted) naming a segment number far past any real one:
    the window goes to the ring, at once. (The reader counted its windows' segments with
    np.bincount, which for segment 2**32 - 16 made a 32 GB array of counts.)"""
    counter = PageCounter(monkeypatch)
    db = cluster.open(durability="process")
    model = {b"f%05d" % i: b"v%d" % i for i in range(3000)}
    db.put_many(model)
    original_state = sortedview.ViewReader.state
    forged_states: list = []  # kept alive, so that no new state can be taken for a forged one

    def forging_state(self):
        found = original_state(self)
        if found is None or any(found is forged for forged in forged_states):
            return found
        locations = found.locations.copy()
        live = np.flatnonzero(locations)
        locations[live[: len(live) // 2]] |= np.uint64(segment << 32)
        found.locations = locations
        forged_states.append(found)
        return found

    monkeypatch.setattr(sortedview.ViewReader, "state", forging_state)
    assert list(db.scan()) == sorted(model.items())
    assert list(db.scan(reverse=True)) == sorted(model.items(), reverse=True)
    assert counter.pages > 0, "the forged locations went unnoticed"


def test_the_asyncio_client_scans_directly(cluster, monkeypatch):
    counter = PageCounter(monkeypatch)
    db = cluster.open(durability="process")
    model = {os.urandom(10): os.urandom(20) for _ in range(3000)}
    db.put_many(model)
    # A big batch is answered before it is indexed (docs/IPC.md, "Shared index"): until then a
    # direct read finds the version odd and asks the ring. A LEN waits for the indexing.
    assert len(db) == len(model)
    probes = [os.urandom(10) for _ in range(50)]

    async def main():
        async with shardkv.aopen(cluster.directory) as adb:
            forward = [item async for item in adb.scan()]
            backward = [item async for item in adb.scan(reverse=True, limit=100)]
            seeks = [await adb.min(), await adb.max()] + [(await adb.above(k), await adb.below(k)) for k in probes]
            return forward, backward, seeks

    forward, backward, seeks = asyncio.run(main())
    ordered = sorted(model.items())
    assert forward == ordered
    assert backward == ordered[::-1][:100]
    assert seeks[:2] == [ordered[0], ordered[-1]]
    for k, (above, below) in zip(probes, seeks[2:]):
        assert above == min((kv for kv in ordered if kv[0] > k), default=None)
        assert below == max((kv for kv in ordered if kv[0] < k), default=None)
    assert counter.pages == 0


def test_without_direct_reads_every_window_is_a_page(cluster, monkeypatch):
    counter = PageCounter(monkeypatch)
    db = cluster.open(durability="process")
    model = {os.urandom(10): os.urandom(20) for _ in range(2500)}
    db.put_many(model)
    ring = cluster.open(direct_reads=False)
    assert list(ring.scan()) == sorted(model.items())
    assert list(ring.scan(reverse=True, limit=7)) == sorted(model.items(), reverse=True)[:7]
    assert counter.pages > 0


@pytest.mark.unit
def test_doc_tables_match_the_layout():
    rows = ipc_doc.table_after("**View object**")
    assert ipc_doc.contiguous_total(rows) == viewlayout.HEADER_BYTES
    assert [int(r[1]) for r in rows[:4]] == [8, 4, 4, 8] and viewlayout.VIEW_HEADER.size == 24
    assert rows[0][3] == "`SHKVORD\\n`" and viewlayout.VIEW_MAGIC == b"SHKVORD\n"
    assert viewlayout.LEVEL_ENTRY.size == 16 and viewlayout.BATCH_ENTRY.size == 24 and viewlayout.BATCH_RING == 8
    assert "level entries of 16 bytes" in ipc_doc.DOC and "8 batch entries of 24 bytes" in ipc_doc.DOC
    assert viewlayout.VIEW_BYTES == 64 + 16 * viewlayout.LEVELS + 24 * 8 == 352 and "(352 bytes used)" in ipc_doc.DOC
    header = {r[2]: (int(r[0]), int(r[1])) for r in ipc_doc.table_after("**Header** (`<prefix>-idx<S>`")}
    assert header["view"] == (viewlayout.VIEW_FIELD, 4)
    assert "`magic` `SHKVRUN\\n`" in ipc_doc.DOC and viewlayout.RUN_MAGIC == b"SHKVRUN\n"
