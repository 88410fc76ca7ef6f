"""ShardEngine as a participant of cross-shard batches (two-phase commit): prepare, commit,
abort, the locks a prepared batch holds, preconditions, and how PREPARE/COMMIT/ABORT records
survive crashes, torn tails and compaction (docs/FORMAT.md, "Record" and "PREPARE value").
"""

from __future__ import annotations

import math

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from shardkv import Busy, Conflict
from shardkv.wal import iter_records
from shardkv.wal.format import ABORT, COMMIT, DELETE, PREPARE, PUT, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE

from clock_support import FakeClock
from engine_support import (
    assert_matches,
    copy_dir,
    crash,
    log_writer,
    open_engine,
    remove_hints,
    segment_numbers,
    segment_path,
)

pytestmark = pytest.mark.engine

MARKERS = (PREPARE, COMMIT, ABORT)


def _records(directory, active: int) -> list:
    """Every record of every segment of the shard (the active one read as active)."""
    out = []
    for number in segment_numbers(directory):
        out.extend(iter_records(segment_path(directory, number), active=number == active))
    return out


def _marker_records(directory, active: int) -> list:
    return [r for r in _records(directory, active) if r.type in MARKERS]


def _seed(e) -> dict:
    e.put(b"a", b"1")
    e.put(b"b", b"2")
    e.put(b"e", b"5")
    return {b"a": b"1", b"b": b"2", b"e": b"5"}


# The batch most tests prepare: writes a, deletes b, creates c; expects e == 5 and d absent.
OPS = [("put", b"a", b"new-a"), ("delete", b"b"), ("put", b"c", b"3")]
EXPECTS = [(b"e", b"5"), (b"d", None)]
LOCKED = [b"a", b"b", b"c", b"d", b"e"]
BEFORE = {b"a": b"1", b"b": b"2", b"e": b"5"}
AFTER = {b"a": b"new-a", b"c": b"3", b"e": b"5"}


def _assert_prepared(e, txids, locked=LOCKED):
    assert sorted(e.prepared()) == sorted(txids)
    for key in locked:
        assert e.locked(key), key
    for key in (b"z", b"unrelated"):
        assert not e.locked(key)


def _assert_unlocked(e, keys=LOCKED):
    for key in keys:
        assert not e.locked(key), key


# -- 1. prepare, commit, abort ---------------------------------------------------------------------
def test_prepare_then_commit(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        assert e.prepared() == []
        assert e.prepare(7, OPS, EXPECTS) is None
        _assert_prepared(e, [7])
        # prepared writes are invisible: reads return the last committed values
        assert_matches(e, BEFORE)
        assert e.get(b"c") is None and e.get(b"b") == b"2"
        assert e.get_many([b"a", b"b", b"c"]) == [b"1", b"2", None]
        assert b"c" not in e
        assert e.commit(7) is True
        assert_matches(e, AFTER)
        assert e.prepared() == []
        _assert_unlocked(e)
        assert e.commit(7) is False  # settled already
        assert e.abort(7) is False
        assert_matches(e, AFTER)
        # the keys take ordinary writes again
        e.put(b"a", b"again")
        assert e.delete(b"c") is True
        assert e.cas(b"d", None, b"4") is True
        assert e.expire(b"e", None) is True
        assert_matches(e, {b"a": b"again", b"d": b"4", b"e": b"5"})


def test_prepare_then_abort(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(7, OPS, EXPECTS)
        assert e.abort(7) is True
        assert e.prepared() == []
        _assert_unlocked(e)
        assert_matches(e, BEFORE)
        assert e.abort(7) is False
        assert e.commit(7) is False
        assert_matches(e, BEFORE)
        e.put(b"d", b"free")
        assert e.get(b"d") == b"free"


def test_unknown_txid(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        assert e.commit(1) is False
        assert e.abort(1) is False
        e.prepare(2, [("put", b"x", b"1")])
        assert e.commit(3) is False and e.abort(3) is False
        assert e.prepared() == [2] and e.locked(b"x")
        assert_matches(e, BEFORE)


def test_double_prepare_is_a_no_op(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(7, OPS, EXPECTS)
        seq, position = e.stats()["seq"], e.log_position()
        # the same batch again, or even another batch under the same id: nothing changes
        assert e.prepare(7, OPS, EXPECTS) is None
        assert e.prepare(7, [("put", b"other", b"x")], [(b"a", b"wrong")]) is None
        assert e.stats()["seq"] == seq and e.log_position() == position
        assert e.prepared() == [7]
        assert not e.locked(b"other")
        assert e.commit(7) is True
        assert_matches(e, AFTER)  # the first batch's writes, once
        assert e.commit(7) is False


def test_several_batches_on_disjoint_keys(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(1, [("put", b"x", b"1")])
        e.prepare(2, [("put", b"y", b"2")], [(b"a", b"1")])
        e.prepare(3, [("delete", b"b")])
        _assert_prepared(e, [1, 2, 3], locked=[b"x", b"y", b"a", b"b"])
        assert e.commit(2) is True
        assert e.abort(3) is True
        _assert_prepared(e, [1], locked=[b"x"])
        _assert_unlocked(e, [b"y", b"a", b"b"])
        assert_matches(e, {**BEFORE, b"y": b"2"})
        assert e.commit(1) is True
        assert_matches(e, {**BEFORE, b"x": b"1", b"y": b"2"})


def test_batch_with_only_expects_or_nothing(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(1, [], [(b"a", b"1")])
        _assert_prepared(e, [1], locked=[b"a"])
        with pytest.raises(Busy):
            e.put(b"a", b"x")
        e.prepare(2, [])
        assert sorted(e.prepared()) == [1, 2]
        assert e.commit(1) is True and e.commit(2) is True
        assert_matches(e, BEFORE)
        assert not e.locked(b"a")


def test_commit_applies_writes_in_order(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(5, [("put", b"k", b"first"), ("delete", b"k"), ("put", b"k", b"last"), ("delete", b"a"), ("put", b"a", b"back")])
        assert e.commit(5) is True
        assert_matches(e, {**BEFORE, b"k": b"last", b"a": b"back"})
        crash(e)
    with open_engine(tmp_path) as e:
        assert_matches(e, {**BEFORE, b"k": b"last", b"a": b"back"})


def test_commit_is_one_log_batch(tmp_path):
    """The COMMIT record heads one batch with the writes (one seq, batch_left counting down)."""
    e = open_engine(tmp_path, segment_size=1 << 16)
    _seed(e)
    active, start = e.log_position()
    e.prepare(7, OPS, EXPECTS)
    _, prepare_end = e.log_position()
    assert e.commit(7) is True
    crash(e)
    records = [r for r in iter_records(segment_path(tmp_path, active), active=True) if r.offset >= start]
    assert [r.type for r in records] == [PREPARE, COMMIT, PUT, DELETE, PUT]
    prepare, commit, *writes = records
    assert prepare.key == commit.key == (7).to_bytes(8, "little")
    assert prepare.batch_left == 0 and commit.offset == prepare_end and commit.value == b""
    assert {r.seq for r in writes} == {commit.seq} and commit.seq == prepare.seq + 1
    assert [r.batch_left for r in [commit, *writes]] == [3, 2, 1, 0]
    assert [r.key for r in writes] == [b"a", b"b", b"c"]


def test_bad_arguments_change_nothing(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        for txid in (-1, 2**64, "7", 1.0, True):
            with pytest.raises((TypeError, ValueError)):
                e.prepare(txid, OPS)
        with pytest.raises((TypeError, ValueError)):
            e.prepare(1, [("frobnicate", b"a")])
        with pytest.raises((TypeError, ValueError)):
            e.prepare(1, [("put", b"a", b"1")], [(b"a",)])
        with pytest.raises((TypeError, ValueError)):
            e.prepare(1, [("put", b"", b"1")])
        assert e.prepared() == []
        _assert_unlocked(e, [b"a"])
        assert_matches(e, BEFORE)


# -- 2. Busy on locked keys --------------------------------------------------------------------------
@pytest.mark.parametrize("key", LOCKED, ids=lambda k: k.decode())
def test_writes_to_a_locked_key_are_busy(tmp_path, key):
    """Every key the batch names is locked: written (a, c), deleted (b), expected present (e)
    or expected absent (d). Nothing is written by a refused request."""
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(7, OPS, EXPECTS)
        seq = e.stats()["seq"]
        current = BEFORE.get(key)
        attempts = [
            lambda: e.put(key, b"x"),
            lambda: e.put(key, b"x", ttl=5),
            lambda: e.delete(key),
            lambda: e.cas(key, current, b"x"),
            lambda: e.cas(key, current, None),
            lambda: e.expire(key, 10),
            lambda: e.expire(key, None),
            lambda: e.apply([("put", key, b"x")]),
            lambda: e.apply([("put", b"free", b"x"), ("delete", key)]),
            lambda: e.apply([("put", b"free", b"x")], [(key, current)]),
            lambda: e.apply([], [(key, current)]),
            lambda: e.prepare(8, [("put", key, b"x")]),
            lambda: e.prepare(8, [("put", b"free", b"x")], [(key, current)]),
            lambda: e.prepare(8, [("delete", key)]),
        ]
        for i, attempt in enumerate(attempts):
            with pytest.raises(Busy):
                attempt()
            assert e.stats()["seq"] == seq, i  # nothing logged
            assert e.prepared() == [7], i
            assert not e.locked(b"free")
            assert len(e) == len(BEFORE), i
            assert_matches(e, BEFORE)
            assert e.ttl(key) == (None if current is None else math.inf)  # no expiry was set
        # Busy, not Conflict, even when the precondition would fail as well
        with pytest.raises(Busy):
            e.apply([("put", b"free", b"x")], [(key, b"certainly not")])
        with pytest.raises(Busy):
            e.prepare(8, [], [(key, b"certainly not")])
        assert e.abort(7) is True
        e.put(key, b"x")  # free again
        assert e.get(key) == b"x"


def test_unlocked_keys_are_not_busy(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.prepare(7, [("put", b"a", b"new")], [(b"e", b"5")])
        e.put(b"b", b"22")
        e.apply([("put", b"x", b"1"), ("delete", b"b")], [(b"x", None)])
        e.prepare(8, [("put", b"y", b"1")])
        assert sorted(e.prepared()) == [7, 8]
        assert_matches(e, {b"a": b"1", b"e": b"5", b"x": b"1"})


# -- 3. Conflict ---------------------------------------------------------------------------------
def _conflicting_expectations():
    return [
        ("value mismatch", [(b"a", b"not-1")]),
        ("expected absent, present", [(b"a", None)]),
        ("expected a value, absent", [(b"nope", b"1")]),
        ("one of several fails", [(b"a", b"1"), (b"b", b"2"), (b"e", b"6")]),
        ("empty value is not absent", [(b"empty", None)]),
        ("absent is not an empty value", [(b"nope", b"")]),
    ]


@pytest.mark.parametrize("label,expects", _conflicting_expectations(), ids=[c[0] for c in _conflicting_expectations()])
def test_failed_preconditions_raise_conflict(tmp_path, label, expects):
    with open_engine(tmp_path) as e:
        model = _seed(e)
        e.put(b"empty", b"")
        model[b"empty"] = b""
        seq = e.stats()["seq"]
        ops = [("put", b"a", b"x"), ("delete", b"b"), ("put", b"n", b"new")]
        with pytest.raises(Conflict):
            e.prepare(7, ops, expects)
        with pytest.raises(Conflict):
            e.apply(ops, expects)
        with pytest.raises(Conflict):
            e.apply([], expects)
        assert e.stats()["seq"] == seq
        assert e.prepared() == []
        for key in [b"a", b"b", b"n"] + [k for k, _ in expects]:
            assert not e.locked(key), key
        assert_matches(e, model)
        assert e.commit(7) is False
        # a failed prepare left nothing behind: the same id prepares fine afterwards
        e.prepare(7, ops)
        assert e.commit(7) is True
        model.update({b"a": b"x", b"n": b"new"})
        del model[b"b"]
        assert_matches(e, model)


def test_matching_preconditions_succeed(tmp_path):
    with open_engine(tmp_path) as e:
        _seed(e)
        e.put(b"empty", b"")
        expects = [(b"a", b"1"), (b"nope", None), (b"empty", b""), (b"e", bytearray(b"5"))]
        e.apply([("put", b"x", b"1")], expects)
        e.prepare(3, [("put", b"y", b"2")], [(b"a", b"1"), (b"x", b"1"), (b"y", None)])
        assert e.commit(3) is True
        assert_matches(e, {**BEFORE, b"empty": b"", b"x": b"1", b"y": b"2"})


def test_expired_key_counts_as_absent(tmp_path):
    clock = FakeClock()
    with open_engine(tmp_path, clock=clock) as e:
        e.put(b"t", b"v", ttl=1)
        e.put(b"keep", b"k")
        assert e.get(b"t") == b"v"
        e.prepare(1, [], [(b"t", b"v")])  # still alive: matches
        assert e.abort(1)
        clock.now += 2
        seq = e.stats()["seq"]
        with pytest.raises(Conflict):
            e.prepare(2, [("put", b"x", b"1")], [(b"t", b"v")])
        with pytest.raises(Conflict):
            e.apply([("put", b"x", b"1")], [(b"t", b"v")])
        assert e.stats()["seq"] == seq and e.prepared() == [] and not e.locked(b"t")
        assert_matches(e, {b"keep": b"k"})
        e.prepare(3, [("put", b"t", b"reborn")], [(b"t", None)])
        assert e.locked(b"t")
        e.apply([("put", b"y", b"1")], [(b"keep", b"k")])
        assert e.commit(3)
        assert_matches(e, {b"keep": b"k", b"t": b"reborn", b"y": b"1"})
        assert e.ttl(b"t") == math.inf  # the committed put carries no ttl


def test_prepared_ttl_is_counted_from_prepare_and_survives_a_crash(tmp_path):
    clock = FakeClock()
    e = open_engine(tmp_path, clock=clock)
    e.prepare(1, [("put", b"t", b"v", 10)])
    clock.now += 4
    crash(e)
    e = open_engine(tmp_path, clock=clock)
    assert e.prepared() == [1] and e.locked(b"t")
    assert e.commit(1) is True
    assert e.get(b"t") == b"v"
    assert e.ttl(b"t") == pytest.approx(6, abs=0.01)
    crash(e)
    e = open_engine(tmp_path, clock=clock)
    assert e.get(b"t") == b"v" and e.ttl(b"t") == pytest.approx(6, abs=0.01)
    clock.now += 6
    assert e.get(b"t") is None and len(e) == 0
    e.close()


def test_commit_after_the_prepared_ttl_ran_out(tmp_path):
    """A put prepared with a ttl that has run out by the commit still replaces the old value:
    the key is absent, in memory and after a crash (an older record never comes back)."""
    clock = FakeClock()
    e = open_engine(tmp_path, clock=clock)
    e.put(b"t", b"old")
    e.prepare(1, [("put", b"t", b"v", 1), ("put", b"u", b"w")])
    clock.now += 5
    assert e.get(b"t") == b"old"
    assert e.commit(1) is True
    assert_matches(e, {b"u": b"w"})
    crash(e)
    with open_engine(tmp_path, clock=clock) as e:
        assert_matches(e, {b"u": b"w"})


# -- 4. crash recovery ---------------------------------------------------------------------------
@pytest.mark.parametrize("reopen", ["crash", "close", "crash-no-hints"])
@pytest.mark.parametrize("decision", ["commit", "abort"])
def test_undecided_batch_survives_reopen(tmp_path, reopen, decision):
    e = open_engine(tmp_path)
    _seed(e)
    e.prepare(7, OPS, EXPECTS)
    e.prepare(2**64 - 1, [("put", b"big-id", b"1")])
    if reopen == "close":
        e.close()
    else:
        crash(e)
        if reopen == "crash-no-hints":
            remove_hints(tmp_path)
    e = open_engine(tmp_path)
    _assert_prepared(e, [7, 2**64 - 1], locked=LOCKED + [b"big-id"])
    assert_matches(e, BEFORE)
    with pytest.raises(Busy):
        e.put(b"d", b"x")
    with pytest.raises(Busy):
        e.prepare(8, [], [(b"e", b"5")])
    assert e.prepare(7, OPS, EXPECTS) is None  # still a no-op after reopen
    assert sorted(e.prepared()) == [7, 2**64 - 1]
    expected = AFTER if decision == "commit" else BEFORE
    assert getattr(e, decision)(7) is True
    assert e.prepared() == [2**64 - 1]
    _assert_unlocked(e)
    assert_matches(e, expected)
    crash(e)
    e = open_engine(tmp_path)
    assert e.prepared() == [2**64 - 1]
    _assert_unlocked(e)
    assert_matches(e, expected)
    assert e.commit(7) is False and e.abort(7) is False
    assert e.commit(2**64 - 1) is True
    e.close()
    with open_engine(tmp_path) as e:
        assert e.prepared() == []
        assert_matches(e, {**expected, b"big-id": b"1"})


def test_committed_and_aborted_batches_stay_settled_after_a_crash(tmp_path):
    e = open_engine(tmp_path)
    _seed(e)
    e.prepare(1, [("put", b"x", b"1"), ("delete", b"a")])
    e.prepare(2, [("put", b"y", b"2"), ("delete", b"b")])
    e.prepare(3, [("put", b"z", b"3")], [(b"e", b"5")])
    assert e.commit(1) is True
    assert e.abort(2) is True
    crash(e)
    e = open_engine(tmp_path)
    assert e.prepared() == [3]
    assert e.locked(b"z") and e.locked(b"e")
    _assert_unlocked(e, [b"x", b"a", b"y", b"b"])
    model = {b"b": b"2", b"e": b"5", b"x": b"1"}
    assert_matches(e, model)  # 1's writes are there, 2's are not
    assert e.commit(1) is False and e.abort(2) is False and e.commit(2) is False
    e.put(b"y", b"mine")
    model[b"y"] = b"mine"
    crash(e)
    with open_engine(tmp_path) as e:
        assert e.prepared() == [3]
        assert_matches(e, model)


def test_commit_logged_but_not_indexed_is_applied_on_reopen(tmp_path, monkeypatch):
    """A crash right after the COMMIT batch reached the log (fault point shard.commit_logged),
    before the index saw it: the log holds COMMIT and the data, so reopen applies it."""
    from shardkv import faults

    class Died(Exception):
        pass

    def point(name):
        if name == "shard.commit_logged":
            raise Died(name)

    e = open_engine(tmp_path)
    _seed(e)
    e.prepare(7, OPS, EXPECTS)
    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(Died):
        e.commit(7)
    monkeypatch.undo()
    crash(e)  # the process "died" at the fault point
    with open_engine(tmp_path) as e:
        assert e.prepared() == []
        _assert_unlocked(e)
        assert_matches(e, AFTER)


def test_prepare_is_durable_with_fsync(tmp_path):
    e = open_engine(tmp_path, durability="fsync")
    _seed(e)
    e.prepare(7, OPS, EXPECTS)
    crash(e)
    with open_engine(tmp_path, durability="fsync") as e:
        _assert_prepared(e, [7])
        assert e.commit(7)
        assert_matches(e, AFTER)


# -- 5. torn tails -------------------------------------------------------------------------------
TX = 0x1122334455667788  # no zero byte: zeroing any byte of a record with this id changes it


def _cut_points(start: int, end: int) -> list[int]:
    """Offsets inside the byte range [start, end) of the records under test."""
    header = start + RECORD_HEADER_SIZE
    points = {start + 1, start + 4, start + 8, start + 20, header - 1, header, header + 8, (start + end) // 2, end - 1}
    return sorted(p for p in points if start < p < end)


def _tear(path: str, offset: int, end: int, damage: str) -> None:
    with open(path, "r+b") as f:
        if damage == "zero":  # the write reached the file only up to `offset`
            f.seek(offset)
            f.write(bytes(end - offset))
        else:  # the file was extended only up to `offset`
            f.truncate(offset)


def _record_ends(directory, active: int, start: int) -> list[int]:
    """Where each record at or after `start` in the active segment ends."""
    return [
        r.offset + RECORD_HEADER_SIZE + len(r.key) + len(r.value)
        for r in iter_records(segment_path(directory, active), active=True)
        if r.offset >= start
    ]


def _expected_torn(original: bytes, start: int, offset: int, record_ends: list[int]) -> int:
    """The torn bytes open reports when the batch starting at `start` survives up to `offset`:
    from the batch's start to the first record that cannot be read or, if further, to the last
    non-zero byte left (wal/reader.py)."""
    whole = max([end for end in record_ends if end <= offset], default=start)
    nonzero = [i for i in range(start, offset) if original[i]]
    last = nonzero[-1] + 1 if nonzero else start
    return max(whole, last) - start


@pytest.mark.parametrize("stale_hint", [False, True], ids=["no-hint", "stale-hint"])
@pytest.mark.parametrize("damage", ["zero", "truncate"])
def test_torn_prepare_is_dropped(tmp_path, damage, stale_hint):
    source = tmp_path / "source"
    e = open_engine(source, segment_size=1 << 16)
    _seed(e)
    if stale_hint:  # a clean close writes the active segment's hint; the tail goes past it
        e.close()
        e = open_engine(source, segment_size=1 << 16)
    active, start = e.log_position()
    e.prepare(TX, OPS, EXPECTS)
    segment, end = e.log_position()
    assert segment == active
    crash(e)
    with open(segment_path(source, active), "rb") as f:
        original = f.read()
    assert any(original[start:end]) and not any(original[end:])
    record_ends = _record_ends(source, active, start)
    assert record_ends == [end]

    points = _cut_points(start, end)
    assert len(points) >= 6
    assert all(any(original[p:end]) for p in points)  # zeroing from any cut point damages the record
    for offset in points + [end]:
        directory = copy_dir(source, tmp_path / f"cut-{offset}")
        _tear(segment_path(directory, active), offset, end, damage)
        with open_engine(directory, segment_size=1 << 16) as e:
            assert_matches(e, BEFORE)
            if offset == end:  # the whole record is there: the batch is prepared
                _assert_prepared(e, [TX])
                assert e.recovery["torn_bytes"] == 0
                continue
            assert e.prepared() == [], offset
            _assert_unlocked(e)
            assert e.recovery["torn_bytes"] == _expected_torn(original, start, offset, record_ends), offset
            assert e.commit(TX) is False
            e.put(b"d", b"free")  # no lock left behind
            e.prepare(TX, [("put", b"c", b"again")])
        with open_engine(directory, segment_size=1 << 16) as e:  # the repaired log stays good
            assert e.recovery["torn_bytes"] == 0
            assert e.prepared() == [TX] and e.locked(b"c") and not e.locked(b"a")
            assert e.commit(TX)
            assert_matches(e, {**BEFORE, b"d": b"free", b"c": b"again"})


@pytest.mark.parametrize("stale_hint", [False, True], ids=["no-hint", "stale-hint"])
@pytest.mark.parametrize("damage", ["zero", "truncate"])
@pytest.mark.parametrize("decision", ["commit", "abort"])
def test_torn_decision_leaves_the_batch_undecided(tmp_path, damage, decision, stale_hint):
    source = tmp_path / "source"
    e = open_engine(source, segment_size=1 << 16)
    _seed(e)
    e.prepare(TX, OPS, EXPECTS)
    if stale_hint:  # the PREPARE is covered by the active segment's hint, the decision is not
        e.close()
        e = open_engine(source, segment_size=1 << 16)
    active, start = e.log_position()
    assert getattr(e, decision)(TX) is True
    segment, end = e.log_position()
    assert segment == active
    crash(e)
    with open(segment_path(source, active), "rb") as f:
        original = f.read()
    record_ends = _record_ends(source, active, start)
    assert record_ends[-1] == end and len(record_ends) == (4 if decision == "commit" else 1)
    points = _cut_points(start, end)
    if decision == "commit":
        # the COMMIT record whole (and the batch's first write whole) but the batch unfinished
        first_write = start + RECORD_HEADER_SIZE + 8
        points = sorted(set(points) | {first_write, first_write + RECORD_HEADER_SIZE + 1 + len(b"new-a")})
        assert len(points) >= 8
    assert all(any(original[p:end]) for p in points)  # zeroing from any cut point damages the batch
    expected_after = AFTER if decision == "commit" else BEFORE
    for offset in points + [end]:
        directory = copy_dir(source, tmp_path / f"cut-{offset}")
        _tear(segment_path(directory, active), offset, end, damage)
        e = open_engine(directory, segment_size=1 << 16)
        try:
            if offset == end:
                assert e.prepared() == []
                _assert_unlocked(e)
                assert_matches(e, expected_after)
                continue
            assert e.recovery["torn_bytes"] == _expected_torn(original, start, offset, record_ends), offset
            _assert_prepared(e, [TX])
            assert_matches(e, BEFORE)  # not a single write of a torn COMMIT batch is applied
            with pytest.raises(Busy):
                e.put(b"c", b"x")
            assert getattr(e, decision)(TX) is True
            assert_matches(e, expected_after)
            crash(e)
            e = open_engine(directory, segment_size=1 << 16)
            assert e.recovery["torn_bytes"] == 0
            assert e.prepared() == []
            _assert_unlocked(e)
            assert_matches(e, expected_after)
        finally:
            e.close()


# -- 6. compaction -------------------------------------------------------------------------------
def _fill(e, model: dict, n: int, tag: bytes = b"fill") -> None:
    for i in range(n):
        key = tag + b"%03d" % (i % 40)
        value = b"%d-" % i + b"x" * 60
        e.put(key, value)
        model[key] = value


@pytest.mark.parametrize("reopen", ["crash", "close"])
def test_compaction_keeps_an_undecided_batch(tmp_path, reopen):
    e = open_engine(tmp_path)
    model = _seed(e)
    e.prepare(7, OPS, EXPECTS)
    first = e.log_position()[0]
    _fill(e, model, 200)
    assert e.log_position()[0] >= first + 3  # several segments rolled since the PREPARE
    result = e.compact()
    assert result["inputs"] >= 3
    assert first not in segment_numbers(tmp_path)  # the PREPARE's own segment is gone
    _assert_prepared(e, [7])
    assert_matches(e, model)
    crash(e) if reopen == "crash" else e.close()

    e = open_engine(tmp_path)
    _assert_prepared(e, [7])
    assert_matches(e, model)
    # compact again (the carried PREPARE is carried once more), more writes, crash
    _fill(e, model, 60, b"more")
    e.compact()
    _fill(e, model, 10, b"late")
    crash(e)
    e = open_engine(tmp_path)
    _assert_prepared(e, [7])
    assert_matches(e, model)
    markers = _marker_records(tmp_path, e.log_position()[0])
    assert [r.type for r in markers] == [PREPARE]  # one live copy, nothing else
    assert e.commit(7) is True
    model.update({b"a": b"new-a", b"c": b"3"})
    del model[b"b"]
    assert_matches(e, model)
    crash(e)
    e = open_engine(tmp_path)
    assert e.prepared() == []
    _assert_unlocked(e)
    assert_matches(e, model)
    e.compact()
    assert _marker_records(tmp_path, e.log_position()[0]) == []
    crash(e)
    with open_engine(tmp_path) as e:
        assert e.prepared() == []
        assert_matches(e, model)


def test_compaction_after_the_decision_drops_the_markers_and_keeps_the_data(tmp_path):
    e = open_engine(tmp_path)
    model = _seed(e)
    e.prepare(1, [("put", b"x", b"1"), ("delete", b"a")])
    e.prepare(2, [("put", b"y", b"2"), ("delete", b"b")])
    _fill(e, model, 120)
    assert e.commit(1) and e.abort(2)
    model[b"x"] = b"1"
    del model[b"a"]
    assert {r.type for r in _marker_records(tmp_path, e.log_position()[0])} == {PREPARE, COMMIT, ABORT}
    e.compact()
    assert _marker_records(tmp_path, e.log_position()[0]) == []
    assert e.prepared() == []
    assert_matches(e, model)
    crash(e)
    e = open_engine(tmp_path)
    assert e.prepared() == []
    _assert_unlocked(e, [b"x", b"a", b"y", b"b"])
    assert_matches(e, model)
    e.close()
    with open_engine(tmp_path) as e:
        assert_matches(e, model)


def test_compaction_of_undecided_and_decided_batches_together(tmp_path):
    e = open_engine(tmp_path)
    model = _seed(e)
    e.prepare(1, [("put", b"x", b"1")])
    e.prepare(2, [("put", b"y", b"2")], [(b"a", b"1")])
    e.prepare(3, [("delete", b"b")])
    _fill(e, model, 100)
    assert e.commit(1) and e.abort(3)
    model[b"x"] = b"1"
    e.compact()
    markers = _marker_records(tmp_path, e.log_position()[0])
    assert [(r.type, r.key) for r in markers] == [(PREPARE, (2).to_bytes(8, "little"))]
    crash(e)
    e = open_engine(tmp_path)
    assert e.prepared() == [2]
    assert e.locked(b"y") and e.locked(b"a") and not e.locked(b"b") and not e.locked(b"x")
    assert_matches(e, model)
    assert e.commit(2)
    model[b"y"] = b"2"
    crash(e)
    with open_engine(tmp_path) as e:
        assert e.prepared() == []
        assert_matches(e, model)


def test_abort_after_a_compaction_stays_aborted(tmp_path):
    """Abort after a compaction carried the PREPARE: the ABORT and the carried PREPARE sit in
    the active segment; a crash and another compaction keep the batch aborted."""
    e = open_engine(tmp_path)
    model = _seed(e)
    e.prepare(7, OPS, EXPECTS)
    _fill(e, model, 80)
    e.compact()
    assert e.abort(7) is True
    crash(e)
    e = open_engine(tmp_path)
    assert e.prepared() == []
    _assert_unlocked(e)
    assert_matches(e, model)
    e.compact()
    crash(e)
    with open_engine(tmp_path) as e:
        assert e.prepared() == []
        assert_matches(e, model)


def _power_loss(directory, engine) -> None:
    """Crash `engine` and drop what an OS crash would: every byte of the active segment that
    was not fsynced (sealed segments, hints, compaction output and COMPACTION are fsynced
    before they count)."""
    active, end = engine.log_position()
    synced_segment, synced_end = log_writer(engine)._synced
    keep = synced_end if synced_segment == active else SEGMENT_HEADER_SIZE
    crash(engine)
    path = segment_path(directory, active)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(keep)
        f.write(bytes(size - keep))


def test_power_loss_after_acknowledged_writes_keeps_them_with_fsync(tmp_path):
    """The power-loss simulation itself: with durability "fsync" everything acknowledged is
    synced, so dropping the unsynced bytes loses nothing (a control for the test below)."""
    e = open_engine(tmp_path, durability="fsync")
    model = _seed(e)
    e.prepare(TX, OPS, EXPECTS)
    _fill(e, model, 80)
    _power_loss(tmp_path, e)
    with open_engine(tmp_path, durability="fsync") as e:
        _assert_prepared(e, [TX])
        assert_matches(e, model)


@pytest.mark.parametrize("durability", ["fsync", "process"])
def test_compaction_keeps_an_undecided_batch_durable(tmp_path, monkeypatch, durability):
    """A compaction must not make an undecided PREPARE less durable than it was.

    compact() seals the active segment (fsynced), re-logs each undecided PREPARE into the new
    active segment, commits (COMPACTION, fsynced) and deletes the input segments that held the
    durable copy. If the copy is not fsynced before the commit, an OS crash or power loss right
    after compact() leaves no PREPARE at all: the batch is no longer prepared, its locks are
    gone and the coordinator's COMMIT returns False ("already settled"), so this shard silently
    drops its part of a committed cross-shard batch. (Found failing while this file was being
    written: `_carry_prepared` did not sync; the engine now calls `sync_upto` there.)
    """
    from shardkv.wal import fileio
    from shardkv.wal.format import COMPACTION_FILE

    e = open_engine(tmp_path, durability=durability)
    model = _seed(e)
    e.prepare(TX, OPS, EXPECTS)
    _fill(e, model, 80)  # rolls segments: the PREPARE's segment is sealed, so fsynced
    e.sync()
    at_commit = []
    original = fileio.write_file_atomically

    def spy(directory, name, data):
        if name == COMPACTION_FILE:
            at_commit.append((log_writer(e)._synced, e.log_position()))
        return original(directory, name, data)

    monkeypatch.setattr(fileio, "write_file_atomically", spy)
    e.compact()
    monkeypatch.undo()
    assert len(at_commit) == 1
    _power_loss(tmp_path, e)  # right after compact() returned
    with open_engine(tmp_path, durability=durability) as e:
        assert e.prepared() == [TX], "the undecided batch was lost"
        _assert_prepared(e, [TX])
        assert_matches(e, model)
    synced, position = at_commit[0]
    assert synced >= position, "the carried PREPARE was not fsynced when the compaction committed"


# -- 7. a state machine ------------------------------------------------------------------------------
KEYS = [b"a", b"b", b"c", b"d"]
keys = st.sampled_from(KEYS)
small_values = st.sampled_from([b"", b"0", b"1", b"22", b"x" * 50])
ops_strategy = st.lists(
    st.one_of(st.tuples(st.just("put"), keys, small_values), st.tuples(st.just("delete"), keys)),
    max_size=3,
)
# how an expectation is formed from the model when the rule runs
expect_specs = st.lists(st.tuples(keys, st.sampled_from(["current", "absent", "other"]), small_values), max_size=2)


class TransactionMachine(RuleBasedStateMachine):
    def __init__(self, base: str):
        super().__init__()
        self.directory = tempfile.mkdtemp(dir=base)
        self.engine = open_engine(self.directory, segment_size=4096)
        self.model: dict[bytes, bytes] = {}
        self.batches: dict[int, tuple[list, list]] = {}  # txid -> (ops, expects)
        self.settled: set[int] = set()
        self.next_txid = 1

    def teardown(self):
        self.engine.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- the model -----------------------------------------------------------------------------
    def locks(self) -> set[bytes]:
        held = set()
        for ops, expects in self.batches.values():
            held.update(op[1] for op in ops)
            held.update(key for key, _ in expects)
        return held

    def expects_from(self, specs) -> list:
        out = []
        for key, mode, other in specs:
            if mode == "current":
                out.append((key, self.model.get(key)))
            elif mode == "absent":
                out.append((key, None))
            else:
                out.append((key, other))
        return out

    def outcome(self, keys_named, expects):
        """The exception the engine must raise, or None."""
        if set(keys_named) & self.locks():
            return Busy
        if any(self.model.get(key) != value for key, value in expects):
            return Conflict
        return None

    def apply_model(self, ops) -> None:
        for op in ops:
            if op[0] == "put":
                self.model[op[1]] = op[2]
            else:
                self.model.pop(op[1], None)

    def expect_raise(self, error, call):
        if error is None:
            return call()
        with pytest.raises(error):
            call()
        return None

    # -- rules ---------------------------------------------------------------------------------
    @rule(key=keys, value=small_values)
    def put(self, key, value):
        error = Busy if key in self.locks() else None
        self.expect_raise(error, lambda: self.engine.put(key, value))
        if error is None:
            self.model[key] = value

    @rule(key=keys)
    def delete(self, key):
        if key in self.locks():
            self.expect_raise(Busy, lambda: self.engine.delete(key))
        else:
            assert self.engine.delete(key) == (key in self.model)
            self.model.pop(key, None)

    @rule(key=keys, value=small_values, current=st.booleans())
    def cas(self, key, value, current):
        expected = self.model.get(key) if current else None
        if key in self.locks():
            self.expect_raise(Busy, lambda: self.engine.cas(key, expected, value))
            return
        should = self.model.get(key) == expected
        assert self.engine.cas(key, expected, value) is should
        if should:
            self.model[key] = value

    @rule(key=keys)
    def expire_never(self, key):
        if key in self.locks():
            self.expect_raise(Busy, lambda: self.engine.expire(key, None))
        else:
            assert self.engine.expire(key, None) == (key in self.model)

    @rule(ops=ops_strategy, specs=expect_specs)
    def apply(self, ops, specs):
        expects = self.expects_from(specs)
        named = [op[1] for op in ops] + [key for key, _ in expects]
        error = self.outcome(named, expects)
        self.expect_raise(error, lambda: self.engine.apply(ops, expects))
        if error is None:
            self.apply_model(ops)

    @rule(ops=ops_strategy, specs=expect_specs)
    def prepare(self, ops, specs):
        expects = self.expects_from(specs)
        txid = self.next_txid
        self.next_txid += 1
        named = [op[1] for op in ops] + [key for key, _ in expects]
        error = self.outcome(named, expects)
        self.expect_raise(error, lambda: self.engine.prepare(txid, ops, expects))
        if error is None:
            self.batches[txid] = (ops, expects)

    @precondition(lambda self: self.batches)
    @rule(data=st.data(), ops=ops_strategy)
    def prepare_again(self, data, ops):
        txid = data.draw(st.sampled_from(sorted(self.batches)))
        assert self.engine.prepare(txid, ops, [(b"a", b"never")]) is None  # a no-op

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def commit(self, data):
        txid = data.draw(st.sampled_from(sorted(self.batches)))
        assert self.engine.commit(txid) is True
        ops, _ = self.batches.pop(txid)
        self.apply_model(ops)
        self.settled.add(txid)

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def abort(self, data):
        txid = data.draw(st.sampled_from(sorted(self.batches)))
        assert self.engine.abort(txid) is True
        self.batches.pop(txid)
        self.settled.add(txid)

    @rule(data=st.data(), decision=st.sampled_from(["commit", "abort"]))
    def settle_unknown(self, data, decision):
        choices = sorted(self.settled) + [self.next_txid + 100]
        txid = data.draw(st.sampled_from(choices))
        assert getattr(self.engine, decision)(txid) is False

    @rule()
    def crash_and_reopen(self):
        crash(self.engine)
        self.engine = open_engine(self.directory, segment_size=4096)
        assert self.engine.recovery["torn_bytes"] == 0

    @rule()
    def close_and_reopen(self):
        self.engine.close()
        self.engine = open_engine(self.directory, segment_size=4096)

    @rule()
    def compact(self):
        self.engine.compact()

    @rule(n=st.integers(5, 40))
    def roll_segments(self, n):
        """Unrelated writes, so that PREPAREs end up in sealed segments."""
        for i in range(n):
            key = b"zz%02d" % (i % 7)
            self.engine.put(key, b"v" * 90)
            self.model[key] = b"v" * 90

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def same_contents(self):
        assert len(self.engine) == len(self.model)
        assert list(self.engine.scan()) == sorted(self.model.items())
        for key in KEYS:
            assert self.engine.get(key) == self.model.get(key)

    @invariant()
    def same_batches_and_locks(self):
        assert sorted(self.engine.prepared()) == sorted(self.batches)
        held = self.locks()
        for key in KEYS:
            assert self.engine.locked(key) == (key in held), key


def test_transactions_match_model(tmp_path):
    run_state_machine_as_test(
        lambda: TransactionMachine(str(tmp_path)),
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
