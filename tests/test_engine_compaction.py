"""Compaction: space is reclaimed, data survives, concurrent use is safe, and a crash (or a
failure) at any step leaves either the old segments or the new ones live, never a mix.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from shardkv.wal import fileio, iter_records
from shardkv.wal.format import COMPACTION_FILE, KIND_COMPACTED, PUT
from shardkv.wal.segment import decode_segment_header

from engine_support import (
    assert_matches,
    copy_dir,
    crash,
    open_engine,
    remove_hints,
    segment_numbers,
    segment_path,
)

pytestmark = pytest.mark.engine


def _leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp") or n == COMPACTION_FILE]


def _churn(engine, rounds: int = 15, n_keys: int = 40, seed: int = 1) -> dict[bytes, bytes]:
    """Overwrite and delete keys many times (single puts and batches); return the model."""
    rng = random.Random(seed)
    model: dict[bytes, bytes] = {}
    for r in range(rounds):
        for i in range(n_keys):
            key = b"key%03d" % i
            value = b"%d:%d:" % (r, i) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            if rng.random() < 0.15:
                engine.delete(key)
                model.pop(key, None)
            elif rng.random() < 0.2:
                engine.apply([("put", key, value), ("delete", b"gone%d" % i), ("put", b"batch%d" % (i % 7), value)])
                model[key] = value
                model.pop(b"gone%d" % i, None)
                model[b"batch%d" % (i % 7)] = value
            else:
                engine.put(key, value)
                model[key] = value
        engine.put(b"gone%d" % r, b"soon deleted")
        model[b"gone%d" % r] = b"soon deleted"
    return model


def test_compaction_reclaims_space_and_keeps_data(tmp_path):
    with open_engine(tmp_path) as e:
        model = _churn(e)
        before = e.stats()
        assert before["garbage_ratio"] > 0.5 and before["segments"] > 5
        result = e.compact()
        after = e.stats()
        assert result["before"]["total_bytes"] == before["total_bytes"]
        assert result["after"]["total_bytes"] == after["total_bytes"] < before["total_bytes"] / 2
        assert after["garbage_ratio"] == 0.0 < before["garbage_ratio"]
        assert after["live_bytes"] == before["live_bytes"] == after["total_bytes"]
        assert after["keys"] == len(model)
        assert after["segments"] < before["segments"]
        assert result["inputs"] >= 5 and result["outputs"] >= 1
        assert_matches(e, model)
        assert not _leftovers(tmp_path)
        assert len(segment_numbers(tmp_path)) == after["segments"]  # inputs are gone from disk
        active = e.log_position()[0]
        for number in segment_numbers(tmp_path):
            if number == active:
                continue
            path = segment_path(tmp_path, number)
            with open(path, "rb") as f:
                assert decode_segment_header(f.read(32), path).kind == KIND_COMPACTED
            for record in iter_records(path):
                assert record.type == PUT and record.batch_left == 0
                assert model[record.key] == record.value
        # keeps working: writes after compaction, a second compaction
        e.put(b"key000", b"after")
        model[b"key000"] = b"after"
        assert e.delete(b"key001") == (b"key001" in model)
        model.pop(b"key001", None)
        e.compact()
        assert_matches(e, model)
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
    remove_hints(tmp_path)  # the compacted segments themselves are readable
    with open_engine(tmp_path) as e:
        assert_matches(e, model)


def test_compact_empty_shard_and_repeated_compaction(tmp_path):
    with open_engine(tmp_path) as e:
        result = e.compact()
        assert result["inputs"] == 0
        e.put(b"a", b"1")
        e.compact()
        e.compact()  # the previous output is the input now
        e.compact()
        assert_matches(e, {b"a": b"1"})
        assert e.delete(b"a")
        e.compact()  # everything deleted: nothing to write
        assert_matches(e, {})
        assert e.stats()["total_bytes"] == 0
    with open_engine(tmp_path) as e:
        assert_matches(e, {})


def test_seq_not_segment_number_decides_after_compaction(tmp_path):
    """Compaction output gets segment numbers above the active log's; newer writes in the
    (lower-numbered) log must still win after reopen, deletes included."""
    with open_engine(tmp_path) as e:
        for i in range(30):
            e.put(b"k%02d" % i, b"old" * 30)
        e.compact()
        e.put(b"k01", b"new")
        e.delete(b"k02")
        e.apply([("put", b"k03", b"newer"), ("delete", b"k04")])
        model = dict(e.scan())
        assert model[b"k01"] == b"new" and b"k02" not in model
    for hints in (True, False):
        if not hints:
            remove_hints(tmp_path)
        with open_engine(tmp_path) as e:
            assert_matches(e, model)
        crash_engine = open_engine(tmp_path)
        crash_engine.put(b"k05", b"crash-new")
        model[b"k05"] = b"crash-new"
        crash(crash_engine)
        with open_engine(tmp_path) as e:
            assert_matches(e, model)


def test_compaction_with_concurrent_writers_and_readers(tmp_path):
    stop = threading.Event()
    errors: list[BaseException] = []
    model: dict[bytes, bytes] = {}  # maintained by the writer thread only
    keys = [b"ck%03d" % i for i in range(60)]

    e = open_engine(tmp_path, segment_size=8192)
    for k in keys:
        e.put(k, k + b"=0")
        model[k] = k + b"=0"

    def writer():
        rng = random.Random(11)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                k = rng.choice(keys)
                roll = rng.random()
                if roll < 0.6:
                    v = k + b"=%d" % n + b"." * rng.randrange(100)
                    e.put(k, v)
                    model[k] = v
                elif roll < 0.75:
                    e.delete(k)
                    model.pop(k, None)
                elif roll < 0.9:
                    k2 = rng.choice(keys)
                    v = k + b"=%d" % n
                    e.apply([("put", k, v), ("delete", k2), ("put", k2, k2 + b"=%d" % n)])
                    model[k] = v
                    model[k2] = k2 + b"=%d" % n
                else:
                    current = model.get(k)
                    v = k + b"=cas%d" % n
                    assert e.cas(k, current, v) is True
                    model[k] = v
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader():
        rng = random.Random()
        try:
            while not stop.is_set():
                k = rng.choice(keys)
                v = e.get(k)
                assert v is None or v.startswith(k + b"="), (k, v)
                for key, value in e.scan(start=k, limit=5):
                    assert value.startswith(key + b"="), (key, value)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    compactions = 0
    try:
        deadline = threading.Event()
        timer = threading.Timer(1.5, deadline.set)
        timer.start()
        while not deadline.is_set() and not errors:
            result = e.compact()
            compactions += 1
            assert result["after"]["total_bytes"] >= result["after"]["live_bytes"]
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, repr(errors[0])
    assert compactions >= 3
    assert_matches(e, model)
    e.close()
    assert not _leftovers(tmp_path)
    with open_engine(tmp_path, segment_size=8192) as e:
        assert_matches(e, model)
        e.compact()
        assert_matches(e, model)
    remove_hints(tmp_path)
    with open_engine(tmp_path, segment_size=8192) as e:
        assert_matches(e, model)


# -- crash safety --------------------------------------------------------------------------------
STEPS = ("create_exclusive", "write_file_atomically", "rename", "unlink", "fsync_dir")


def _snapshot_every_step(monkeypatch, source, target_dir) -> list[tuple[str, str]]:
    """Patch fileio so that the directory is copied (as a crash would leave it) before each
    file operation; returns the list that fills with (step, copy)."""
    snapshots: list[tuple[str, str]] = []

    def snapshot(step: str) -> None:
        target = target_dir / f"crash-{len(snapshots):03d}"
        copy_dir(source, target)
        snapshots.append((step, str(target)))

    for name in STEPS:
        real = getattr(fileio, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            snapshot(f"before {_name}{args[1:]!r}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(fileio, name, wrapped)
    return snapshots


def _inject(monkeypatch, failure: str) -> None:
    """Make one step of the next compaction fail: its commit, an output rename, an input unlink."""
    if failure == "commit":
        real_write = fileio.write_file_atomically

        def write_file_atomically(directory, name, data):
            if name == COMPACTION_FILE:
                raise OSError(28, "No space left on device (injected)")
            return real_write(directory, name, data)

        monkeypatch.setattr(fileio, "write_file_atomically", write_file_atomically)
    elif failure == "rename":
        real_rename = fileio.rename

        def rename(directory, old, new):
            if old.endswith(".log.tmp") and os.path.exists(os.path.join(directory, COMPACTION_FILE)):
                raise OSError(5, "Input/output error (injected)")  # an output, after the commit
            return real_rename(directory, old, new)

        monkeypatch.setattr(fileio, "rename", rename)
    else:
        real_unlink = fileio.unlink

        def unlink(directory, name, missing_ok=True):
            if name.endswith(".log"):
                raise OSError(5, "Input/output error (injected)")
            return real_unlink(directory, name, missing_ok)

        monkeypatch.setattr(fileio, "unlink", unlink)


def test_crash_at_every_step_of_compaction(tmp_path, monkeypatch):
    """Copy the directory as a crash would leave it before every file operation compaction
    makes (and at the end); every copy must open with exactly the same contents."""
    source = tmp_path / "shard"
    e = open_engine(source)
    model = _churn(e, rounds=8, n_keys=30, seed=2)
    inputs = set(segment_numbers(source))  # the active segment is sealed and compacted too
    snapshots = _snapshot_every_step(monkeypatch, source, tmp_path)
    e.compact()
    monkeypatch.undo()
    snapshots.append(("after compaction", copy_dir(source, tmp_path / "crash-after")))
    new_active = e.log_position()[0]
    outputs = set(segment_numbers(source)) - {new_active}
    assert outputs and not outputs & inputs
    crash(e)

    steps = [step for step, _ in snapshots]
    assert any("COMPACTION" in s for s in steps) and any(s.startswith("before unlink") for s in steps)
    assert len(snapshots) > 10
    for step, directory in snapshots:
        with open_engine(directory) as reopened:
            assert_matches(reopened, model)
            assert not _leftovers(directory), step
            live = set(segment_numbers(directory)) - {new_active}
            assert live == inputs or live == outputs, f"{step}: a mix of old and new segments: {sorted(live)}"
        with open_engine(directory) as reopened:  # and recovery left it consistent
            assert_matches(reopened, model)


@pytest.mark.parametrize("failure", ["commit", "rename", "unlink"])
def test_crash_at_every_step_of_the_compaction_after_a_failed_one(tmp_path, monkeypatch, failure):
    """A compaction fails at `failure`; the engine goes on (deletes, overwrites, new keys, segment
    rolls), then compacts again. A crash before any file operation of that second compaction
    must leave a directory that opens with exactly the acknowledged data: no deleted key back."""
    source = tmp_path / "shard"
    e = open_engine(source)
    model = _churn(e, rounds=6, n_keys=30, seed=6)
    _inject(monkeypatch, failure)
    with pytest.raises(OSError):
        e.compact()
    monkeypatch.undo()
    assert_matches(e, model)
    for i in range(30):
        key = b"key%03d" % i
        if i % 3 == 0:
            e.delete(key)
            model.pop(key, None)
        elif i % 3 == 1:
            e.put(key, b"after-failure" * 5)
            model[key] = b"after-failure" * 5
    e.apply([("delete", b"batch1"), ("put", b"fresh", b"1")])
    model.pop(b"batch1", None)
    model[b"fresh"] = b"1"

    snapshots = _snapshot_every_step(monkeypatch, source, tmp_path)
    e.compact()
    monkeypatch.undo()
    assert_matches(e, model)
    e.put(b"after-second", b"2")
    model[b"after-second"] = b"2"
    e.close()
    assert len(snapshots) > 10
    with open_engine(source) as reopened:
        assert_matches(reopened, model)
    del model[b"after-second"]
    for step, directory in snapshots:
        with open_engine(directory) as reopened:
            assert reopened.get(b"key000") is None, f"{step}: a deleted key came back"
            assert_matches(reopened, model)
            assert not _leftovers(directory), step
        with open_engine(directory) as reopened:
            assert_matches(reopened, model)


def test_failed_commit_keeps_old_state(tmp_path, monkeypatch):
    e = open_engine(tmp_path)
    model = _churn(e, rounds=6, n_keys=30, seed=3)
    real = fileio.write_file_atomically
    inputs_before = segment_numbers(tmp_path)

    def failing(directory, name, data):
        if name == COMPACTION_FILE:
            raise OSError(28, "No space left on device (injected)")
        return real(directory, name, data)

    monkeypatch.setattr(fileio, "write_file_atomically", failing)
    with pytest.raises(OSError):
        e.compact()
    monkeypatch.undo()
    assert not _leftovers(tmp_path)  # the outputs were removed
    assert set(inputs_before) <= set(segment_numbers(tmp_path))  # the inputs are all still there
    assert_matches(e, model)  # the engine still serves the old segments
    e.put(b"after-failure", b"1")
    model[b"after-failure"] = b"1"
    assert_matches(e, model)
    e.close()
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
        e.compact()  # a later compaction works
        assert_matches(e, model)
        assert e.stats()["garbage_ratio"] == 0.0
    with open_engine(tmp_path) as e:
        assert_matches(e, model)


@pytest.mark.parametrize("then", ["crash", "close"])
def test_failed_input_unlink_after_commit_is_finished_on_open(tmp_path, monkeypatch, then):
    e = open_engine(tmp_path)
    model = _churn(e, rounds=6, n_keys=30, seed=4)
    real = fileio.unlink
    inputs = segment_numbers(tmp_path)

    def failing(directory, name, missing_ok=True):
        if name.endswith(".log"):
            raise PermissionError(1, "Operation not permitted (injected)")
        return real(directory, name, missing_ok)

    monkeypatch.setattr(fileio, "unlink", failing)
    with pytest.raises(OSError):
        e.compact()
    monkeypatch.undo()
    assert COMPACTION_FILE in os.listdir(tmp_path)  # committed, not finished
    assert_matches(e, model)  # the engine already serves the new segments
    e.put(b"after-failure", b"1")
    model[b"after-failure"] = b"1"
    crash(e) if then == "crash" else e.close()
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
    assert not _leftovers(tmp_path)
    assert not set(inputs) & set(segment_numbers(tmp_path))  # the inputs (the active one was sealed) are gone
    with open_engine(tmp_path) as e:
        assert_matches(e, model)


def test_failed_input_unlink_then_second_compaction_does_not_resurrect_deleted_keys(tmp_path, monkeypatch):
    """BUG: compact() fails after its commit (an input segment cannot be deleted), the engine
    goes on, and a second compact() succeeds: it overwrites COMPACTION with its own commit and
    removes it, so the first compaction's inputs are never deleted. On the next open they are
    live again and keys deleted meanwhile come back (docs/FORMAT.md: "Either the old segments
    or the new ones are ever live, never a mix")."""
    e = open_engine(tmp_path)
    for i in range(100):
        e.put(b"k%03d" % i, b"v" * 50)
    real = fileio.unlink

    def failing(directory, name, missing_ok=True):
        if name.endswith(".log"):
            raise OSError(5, "Input/output error (injected)")
        return real(directory, name, missing_ok)

    monkeypatch.setattr(fileio, "unlink", failing)
    with pytest.raises(OSError):
        e.compact()
    monkeypatch.undo()
    assert e.delete(b"k007")
    e.compact()
    model = {b"k%03d" % i: b"v" * 50 for i in range(100) if i != 7}
    assert_matches(e, model)
    e.close()
    with open_engine(tmp_path) as e:
        assert e.get(b"k007") is None, "a deleted key came back"
        assert_matches(e, model)


@pytest.mark.parametrize("then", ["crash", "close", "compact-again"])
def test_failed_output_rename_after_commit(tmp_path, monkeypatch, then):
    e = open_engine(tmp_path)
    model = _churn(e, rounds=6, n_keys=30, seed=5)
    real = fileio.rename

    def failing(directory, old, new):
        # Compaction outputs are renamed after the commit record exists (a new active
        # segment is renamed into place too, but never while COMPACTION exists here).
        if old.endswith(".log.tmp") and os.path.exists(os.path.join(directory, COMPACTION_FILE)):
            raise OSError(5, "Input/output error (injected)")
        return real(directory, old, new)

    monkeypatch.setattr(fileio, "rename", failing)
    with pytest.raises(OSError):
        e.compact()
    monkeypatch.undo()
    assert COMPACTION_FILE in os.listdir(tmp_path)
    assert_matches(e, model)  # still served from the old segments
    e.put(b"after-failure", b"1")
    e.delete(b"key005")
    model[b"after-failure"] = b"1"
    model.pop(b"key005", None)
    if then == "compact-again":
        e.compact()
        assert_matches(e, model)
        e.close()
    elif then == "close":
        e.close()
    else:
        crash(e)
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
    assert not _leftovers(tmp_path)
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
