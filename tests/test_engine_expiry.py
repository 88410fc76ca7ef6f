"""Per-key expiry in the engine, with a controllable clock (no test sleeps for real expiry)."""

import math

import pytest

from shardkv.shards import ShardEngine

from clock_support import FakeClock

pytestmark = pytest.mark.engine


@pytest.fixture
def clock():
    return FakeClock()


def open_engine(path, clock, **options):
    return ShardEngine.open(path, clock=clock, segment_size=4096, durability="process", **options)


def test_expired_key_is_invisible_to_every_read(tmp_path, clock):
    with open_engine(tmp_path, clock) as e:
        e.put(b"short", b"1", ttl=5)
        e.put(b"long", b"2", ttl=50)
        e.put(b"forever", b"3")
        assert e.ttl(b"short") == 5 and e.ttl(b"forever") == math.inf and e.ttl(b"missing") is None
        clock.advance(4.999)
        assert e.get(b"short") == b"1" and b"short" in e and len(e) == 3
        clock.advance(0.001)
        assert e.get(b"short") is None and e.get(b"short", b"d") == b"d"
        assert b"short" not in e and len(e) == 2
        assert [k for k, _ in e.scan()] == [b"forever", b"long"]
        assert e.min()[0] == b"forever" and e.get_many([b"short", b"long"]) == [None, b"2"]
        assert e.ttl(b"short") is None and e.delete(b"short") is False
        assert e.cas(b"short", None, b"new") is True and e.ttl(b"short") == math.inf


def test_overwrite_without_ttl_clears_expiry_and_expire_changes_it(tmp_path, clock):
    with open_engine(tmp_path, clock) as e:
        e.put(b"k", b"v1", ttl=1)
        e.put(b"k", b"v2")
        clock.advance(2)
        assert e.get(b"k") == b"v2" and e.ttl(b"k") == math.inf
        assert e.expire(b"k", 3) is True and e.ttl(b"k") == 3
        assert e.expire(b"missing", 3) is False
        clock.advance(1)
        assert e.expire(b"k", None) is True
        clock.advance(10)
        assert e.get(b"k") == b"v2"
        e.apply([("put", b"b1", b"x", 2), ("put", b"b2", b"y"), ("delete", b"k")])
        clock.advance(2)
        assert e.get(b"b1") is None and e.get(b"b2") == b"y" and len(e) == 1


def test_expiry_survives_reopen_and_compaction(tmp_path, clock):
    with open_engine(tmp_path, clock) as e:
        for i in range(200):
            e.put(b"t%03d" % i, b"v" * 50, ttl=10 if i % 2 else 100)
        e.put(b"old", b"no-ttl")
        e.put(b"old", b"ttl", ttl=10)  # the newest record expires: the older one must not come back
    clock.advance(11)
    with open_engine(tmp_path, clock) as e:
        assert len(e) == 100 and e.get(b"t001") is None and e.get(b"t000") == b"v" * 50
        assert e.get(b"old") is None
        assert 88 < e.ttl(b"t000") <= 89
        result = e.compact()
        assert result["after"]["keys"] == 100 and result["after"]["total_bytes"] < result["before"]["total_bytes"]
    clock.advance(100)
    with open_engine(tmp_path, clock) as e:
        assert len(e) == 0 and list(e.scan()) == [] and e.get(b"old") is None


def test_bad_ttl(tmp_path, clock):
    with open_engine(tmp_path, clock) as e:
        for bad in (0, -1, float("inf"), float("nan"), 1e20):  # 1e20 s would overflow the 64-bit expiry field
            with pytest.raises(ValueError):
                e.put(b"k", b"v", ttl=bad)
        for bad in ("5", b"5", True, [5]):
            with pytest.raises(TypeError):
                e.put(b"k", b"v", ttl=bad)
        assert len(e) == 0


def test_clock_jumping_back_keeps_keys_alive_longer(tmp_path, clock):
    """Expiry times are absolute wall-clock instants (docs: what happens when the clock jumps)."""
    with open_engine(tmp_path, clock) as e:
        e.put(b"k", b"v", ttl=10)
        clock.advance(-100)
        assert e.ttl(b"k") == 110
        clock.advance(105)
        assert e.get(b"k") == b"v"
        clock.advance(5)
        assert e.get(b"k") is None
