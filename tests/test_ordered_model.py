"""Ordered reads against a model, drawn by hypothesis, on one live cluster: scans (ranges,
reverse, limits), min/max/above/below agree with sorted() of what each example wrote, through
single-key writes, cross-shard and single-shard batches, bulk loads (the shards' indexes double
over the run), compactions and worker restarts, while another thread writes batches across both
shards without pause; no scan ever shows part of one of its batches."""

import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardkv
from cluster_support import keys_by_shard
from shardkv.ipc import sortedview
from shardkv.ipc.sharedindex import SUPPORTED
from test_ordered_cluster import cluster, expected_scan, restart_worker  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.skipif(not SUPPORTED, reason="direct reads are x86-64 only (elsewhere clients always use the ring)"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"),
]

# Keys after the example's 5-byte prefix: "kkk" makes their first 8 bytes equal (the views order
# those by the whole key), the others spread them.
SUFFIX = st.builds(bytes.__add__, st.sampled_from([b"", b"k", b"kkk", b"kkkkkk"]), st.binary(max_size=4))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), SUFFIX, st.binary(max_size=30)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 30)),
        st.tuples(st.just("batch"), st.dictionaries(SUFFIX, st.binary(max_size=20), min_size=2, max_size=40)),
        st.tuples(st.just("one shard"), st.integers(2, 60), st.binary(max_size=8)),
        st.tuples(st.just("bulk"), st.integers(300, 1500)),
        st.just(("compact",)),
        st.just(("restart",)),
        st.tuples(st.just("check"), SUFFIX, SUFFIX, st.booleans(), st.sampled_from([None, 1, 2, 50])),
    ),
    min_size=1,
    max_size=12,
)


class Writer:
    """Rewrites two sets of keys batch after batch: `spread` across both shards (two-phase
    commit) and `single` on one shard (APPLY), each batch giving every key of its set the same
    generation."""

    def __init__(self, directory, db):
        self.spread = [b"w/s%03d" % i for i in range(40)]
        self.single = [b"w/o" + k for k in keys_by_shard(db, 40, b"%03d")[0]]
        self.client = shardkv.open(directory, durability="process")
        self.stop = threading.Event()
        self.batches = 0
        self.errors = []
        self.thread = threading.Thread(target=self.run)

    def run(self):
        generation = 0
        while not self.stop.is_set():
            generation += 1
            try:
                self.client.put_many(dict.fromkeys(self.spread if generation % 2 else self.single, b"%d" % generation))
                self.batches += 1
            except shardkv.Unavailable:
                time.sleep(0.01)  # a worker restarting (the test kills them): asked again
            except Exception as exc:  # noqa: BLE001
                self.errors.append(exc)
                return

    def check(self, db):
        """Each set shows one generation in every scan that completes."""
        items = dict(retried(lambda: list(db.scan(prefix=b"w/"))))
        assert len({items.get(k) for k in self.spread}) == 1, "a cross-shard batch seen in part"
        assert len({items.get(k) for k in self.single}) == 1, "a single-shard batch seen in part"


def retried(read):
    """A multi-key read that a commit meanwhile may make raise Unavailable (docs/TRANSACTIONS.md,
    "Isolation"): read again until one completes."""
    for _ in range(200):
        try:
            return read()
        except shardkv.Unavailable:
            continue
    raise AssertionError("no read completed in 200 tries")


def test_ordered_reads_agree_with_a_model(cluster, monkeypatch):
    db = cluster.open(durability="process")
    writer = Writer(cluster.directory, db)
    writer.thread.start()
    examples = iter(range(1000))
    restarts = []
    seen = set()

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(ops=OPS, eager=st.booleans())
    def run(ops, eager):
        # Each example writes under a prefix of its own ("e007/..."), which scans are bounded
        # to; the keys of earlier examples stay (the shards grow over the run).
        ns = b"e%03d/" % next(examples)
        monkeypatch.setattr(sortedview, "CHECK_AFTER", 1 << 40 if eager else 64)  # runs checked whole after 4 searches
        model = {}
        rng = random.Random(ns)
        for op in ops:
            kind = op[0]
            seen.add(kind)
            if kind == "put":
                db.put(ns + op[1], op[2])
                model[ns + op[1]] = op[2]
            elif kind == "delete" and model:
                key = sorted(model)[op[1] % len(model)]
                assert db.delete(key)
                del model[key]
            elif kind == "batch":
                batch = {ns + k: v for k, v in op[1].items()}
                db.put_many(batch)
                model.update(batch)
            elif kind == "one shard":
                keys = keys_by_shard(db, op[1], ns + op[2].replace(b"%", b"%%") + b"%d")[1]
                gone = [k for k in keys[::3] if k in model]
                db.write([("delete", k) for k in gone] + [("put", k, b"one") for k in keys if k not in gone])
                for k in keys:
                    model.pop(k, None) if k in gone else model.__setitem__(k, b"one")
            elif kind == "bulk":
                stem = rng.choice((b"", b"kkk"))
                batch = {ns + stem + rng.randbytes(4): rng.randbytes(8) for _ in range(op[1])}
                db.put_many(batch)
                model.update(batch)
            elif kind == "compact":
                db.compact()
            elif kind == "restart" and len(restarts) < 2:
                restarts.append(op)
                restart_worker(db, len(restarts) % 2)
            elif kind == "check":
                check(db, model, ns, ns + op[1], ns + op[2], op[3], op[4])
                writer.check(db)
        check(db, model, ns, ns, ns[:-1] + b"0", False, None)  # b"0" follows b"/"
        writer.check(db)

    try:
        run()
    finally:
        writer.stop.set()
        writer.thread.join()
        writer.client.close()
    assert not writer.errors, writer.errors
    assert writer.batches > 50, "the writer should have run all along"
    assert seen >= {"put", "delete", "batch", "one shard", "bulk", "compact", "restart", "check"}, seen
    assert len(db) > 4000, "the shards' indexes should have doubled"


def check(db, model, ns, a, b, reverse, limit):
    """Scans of [a, b) and of the whole prefix, min/max within it, above/below `a`."""
    a, b = min(a, b or a), b if b is None else max(a, b)
    assert retried(lambda: list(db.scan(start=a, stop=b, reverse=reverse, limit=limit))) == expected_scan(model, a, b, reverse, None, limit)
    assert retried(lambda: list(db.scan(prefix=ns, reverse=not reverse))) == expected_scan(model, None, None, not reverse, ns)
    ordered = sorted(model.items())
    after = [kv for kv in ordered if kv[0] > a]
    before = [kv for kv in ordered if kv[0] < a]
    # Past the example's own keys lie other examples' (and the writer's): any of those, or None.
    above, below = db.above(a), db.below(a)
    assert above == after[0] if after else (above is None or not above[0].startswith(ns))
    assert below == before[-1] if before else (below is None or not below[0].startswith(ns))
    first = retried(lambda: next(db.scan(prefix=ns, limit=1), None))
    last = retried(lambda: next(db.scan(prefix=ns, reverse=True, limit=1), None))
    assert (first, last) == ((ordered[0], ordered[-1]) if ordered else (None, None))
