"""KeyIndex.upsert_many (the indexing of a batch append) against one upsert per key.

Keys are looked up through `key_at`, as in the engine; here a dict from location to key stands
in for the log. Batches mix new keys, keys already indexed, keys repeated inside the batch and
keys whose hashes collide, on tables small enough to be rebuilt and grown during the batch.
"""

import random

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkv.shards import keyindex
from shardkv.shards.keyindex import KeyIndex

pytestmark = pytest.mark.unit


class Log:
    """Locations handed out in order; key_at reads the key back."""

    def __init__(self):
        self.keys = {}
        self.next = 1

    def append(self, key: bytes) -> int:
        location = self.next
        self.next += 1
        self.keys[location] = key
        return location

    def key_at(self, location: int, key_len: int) -> bytes:
        return self.keys[location][:key_len]


def state(index: KeyIndex, log: Log, hash_fn=crc32c) -> dict:
    """key -> (location, value_len, seq) of every indexed key, found through the index."""
    out = {}
    for e in index.live_ids().tolist():
        location, key_len, value_len, seq = index.entry(e)
        key = log.key_at(location, key_len)
        assert index.find(key, hash_fn(key)) == e, "every entry is reachable by a probe"
        out[key] = (location, value_len, seq)
    return out


def hash_of(key: bytes, colliding: bool) -> int:
    return 12345 if colliding and key.endswith(b"!") else crc32c(key)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(1, 400), min_size=1, max_size=6), st.booleans())
def test_upsert_many_equals_one_upsert_per_key(seed, sizes, colliding):
    rng = random.Random(seed)
    log_many, log_one = Log(), Log()
    many, one = KeyIndex(log_many.key_at), KeyIndex(log_one.key_at)
    universe = [b"key-%d" % i + (b"!" if i % 9 == 0 else b"") for i in range(600)]
    for seq, size in enumerate(sizes, start=1):
        batch = [rng.choice(universe) for _ in range(size)]
        value_lens = [rng.randrange(1000) for _ in batch]
        hashes = [hash_of(k, colliding) for k in batch]
        added_one = []
        for key, h, value_len in zip(batch, hashes, value_lens):
            if one.upsert(key, h, log_one.append(key), len(key), value_len, seq):
                added_one.append(key)
        locations = [log_many.append(key) for key in batch]
        added_many = many.upsert_many(batch, hashes, locations, [len(k) for k in batch], value_lens, seq)
        assert sorted(k for k, _ in added_many) == sorted(added_one)
        hash_fn = lambda key: hash_of(key, colliding)  # noqa: E731
        assert state(many, log_many, hash_fn) == state(one, log_one, hash_fn)
        assert many.count == one.count == len(state(one, log_one, hash_fn))


def test_a_big_batch_of_new_keys_then_the_same_keys_again():
    log = Log()
    index = KeyIndex(log.key_at)
    keys = [b"fresh-%d" % i for i in range(5000)]  # several rebuilds and entry growths in one batch
    added = index.upsert_many(keys, [crc32c(k) for k in keys], [log.append(k) for k in keys], [len(k) for k in keys], [7] * len(keys), 1)
    assert sorted(k for k, _ in added) == sorted(keys)
    for key, entry in added:
        assert index.find(key, crc32c(key)) == entry
        assert index.entry(entry)[2:] == (7, 1)
    again = index.upsert_many(keys, [crc32c(k) for k in keys], [log.append(k) for k in keys], [len(k) for k in keys], [9] * len(keys), 2)
    assert again == [] and index.count == len(keys)
    assert all(index.entry(index.find(k, crc32c(k)))[2:] == (9, 2) for k in keys)


@pytest.mark.parametrize("deleted", [0, 100])
def test_upsert_many_reuses_nothing_it_should_not(deleted):
    """Entries freed by deletions may be reused; a batch after deletions still indexes right."""
    log = Log()
    index = KeyIndex(log.key_at)
    keys = [b"k-%d" % i for i in range(300)]
    index.upsert_many(keys, [crc32c(k) for k in keys], [log.append(k) for k in keys], [len(k) for k in keys], [1] * 300, 1)
    for key in keys[:deleted]:
        assert index.remove(key, crc32c(key))
    more = [b"m-%d" % i for i in range(200)] + keys[:50]
    index.upsert_many(more, [crc32c(k) for k in more], [log.append(k) for k in more], [len(k) for k in more], [2] * len(more), 2)
    expected = set(keys[deleted:]) | set(more)
    assert set(state(index, log)) == expected and index.count == len(expected)


@pytest.mark.parametrize("count", [1025, 3000])
def test_one_upsert_at_a_time_through_rebuilds_and_growths(count, monkeypatch):
    """Single upserts across every resize. At a load limit of 0.5 the 1025th key of a fresh
    index needs a bigger slot table and more entries in the same call (growing the entries
    installs a new slot table too: a stale reference to the old one once lost that key)."""
    monkeypatch.setattr(keyindex, "MAX_LOAD", 0.5)
    log = Log()
    index = KeyIndex(log.key_at)
    keys = [b"one-%d" % i for i in range(count)]
    for key in keys:
        assert index.upsert(key, crc32c(key), log.append(key), len(key), 1, 1)
    assert index.count == count
    assert all(index.find(key, crc32c(key)) >= 0 for key in keys)
    assert set(state(index, log)) == set(keys)
