"""The saved ordered view (docs/FORMAT.md, "Ordered view file"): a clean close writes SORTED, the
next open uses it instead of sorting - only if it describes exactly the keys recovered."""

import os
import random
import shutil

import pytest

import test_format_doc as doc
from engine_support import crash, flip_byte, open_engine, ordered_view
from shardkv.shards import sortedkeys
from shardkv.wal import format as fmt

pytestmark = pytest.mark.engine


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setattr(sortedkeys, "SYNC_BUILD_MAX", 100)  # shards above 100 keys save their view
    monkeypatch.setattr(sortedkeys, "SMALL_CAPACITY", 16)
    monkeypatch.setattr(sortedkeys, "GROWTH", 2)


def test_doc_matches_the_struct():
    table = doc.layout_table("Ordered view file")
    assert not doc.layout_problems(table, fmt.SORTED_HEADER, False)
    assert doc._magic(table) == fmt.SORTED_MAGIC and doc._version(table) == fmt.FORMAT_VERSION
    assert [row["field"] for row in table] == doc._struct_comment_names("SORTED_HEADER")
    assert "| `SORTED` |" in doc.DOC.read_text()


def load(directory, n=1000, seed=0):
    engine = open_engine(directory, segment_size=1 << 14)
    rng = random.Random(seed)
    model = {}
    for i in range(0, n, 50):
        batch = {rng.randbytes(rng.choice((3, 9, 16))): b"%d" % i for _ in range(50)}
        engine.apply([("put", k, v) for k, v in batch.items()])
        model.update(batch)
    return engine, model


def refuse_sorting(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the view was sorted, not loaded")

    monkeypatch.setattr(sortedkeys.SortedView, "build_now", refuse)
    monkeypatch.setattr(sortedkeys.SortedView, "start_build", refuse)


def test_a_clean_close_saves_the_view_and_the_next_open_uses_it(tmp_path, small_limits, monkeypatch):
    engine, model = load(tmp_path)
    engine.close()
    assert os.path.exists(tmp_path / fmt.SORTED_FILE)
    with monkeypatch.context() as patch:
        refuse_sorting(patch)
        engine = open_engine(tmp_path, segment_size=1 << 14)
    assert ordered_view(engine).ready
    assert not os.path.exists(tmp_path / fmt.SORTED_FILE)  # describes one close only
    assert list(engine.scan()) == sorted(model.items())
    engine.put(b"after", b"x")
    model[b"after"] = b"x"
    assert list(engine.scan(reverse=True)) == sorted(model.items(), reverse=True)
    engine.close()


def test_small_shards_write_no_file(tmp_path, small_limits):
    engine = open_engine(tmp_path)
    engine.put(b"k", b"v")
    engine.close()
    assert not os.path.exists(tmp_path / fmt.SORTED_FILE)


def reopen_with(tmp_path, saved, prepare):
    """Close cleanly (saving the view), keep the file aside, `prepare(engine)` on a reopened
    engine, crash it, put the old file back and open: the file must be refused."""
    shutil.copy(tmp_path / fmt.SORTED_FILE, saved)
    engine = open_engine(tmp_path, segment_size=1 << 14)
    prepare(engine)
    crash(engine)
    shutil.copy(saved, tmp_path / fmt.SORTED_FILE)
    engine = open_engine(tmp_path, segment_size=1 << 14)
    assert not os.path.exists(tmp_path / fmt.SORTED_FILE)
    return engine


@pytest.mark.parametrize("change", ["put", "delete", "overwrite", "compact", "flip", "truncate", "other shard"])
def test_a_file_that_does_not_describe_the_keys_is_ignored(tmp_path, small_limits, change):
    engine, model = load(tmp_path)
    engine.close()
    victim = sorted(model)[len(model) // 2]

    def prepare(e):
        if change == "put":
            e.put(b"new key", b"v")
            model[b"new key"] = b"v"
        elif change == "delete":
            e.delete(victim)
            del model[victim]
        elif change == "overwrite":
            e.put(victim, b"changed")
            model[victim] = b"changed"
        elif change == "compact":
            e.compact()  # the same keys and seqs, other locations

    engine = reopen_with(tmp_path, tmp_path.parent / "saved", prepare) if change in ("put", "delete", "overwrite", "compact") else None
    if engine is None:
        path = tmp_path / fmt.SORTED_FILE
        if change == "flip":
            flip_byte(path, os.path.getsize(path) // 2)
        elif change == "truncate":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) - 8)
        else:
            data = bytearray(path.read_bytes())
            data[12:16] = (7).to_bytes(4, "little")  # shard 7 (the crc then fails too)
            path.write_bytes(bytes(data))
        engine = open_engine(tmp_path, segment_size=1 << 14)
    ordered_view(engine).wait_built(30)
    assert list(engine.scan()) == sorted(model.items())
    engine.close()


def test_keys_that_expire_between_close_and_open(tmp_path, small_limits):
    now = [1000.0]
    engine = open_engine(tmp_path, segment_size=1 << 14, clock=lambda: now[0])
    engine.apply([("put", b"%04d" % i, b"v", 5 if i % 3 == 0 else None) if i % 3 == 0 else ("put", b"%04d" % i, b"v") for i in range(300)])
    engine.close()
    now[0] += 10
    engine = open_engine(tmp_path, segment_size=1 << 14, clock=lambda: now[0])
    ordered_view(engine).wait_built(30)
    assert [k for k, _ in engine.scan()] == [b"%04d" % i for i in range(300) if i % 3]
    engine.close()
