"""shardkv verify and salvage on damaged stores (ops/verify.py, ops/salvage.py)."""

import hashlib
import os

import pytest

from shardkv.ops.salvage import salvage_store
from shardkv.ops.verify import verify_store
from shardkv.shards import ShardEngine
from shardkv.coordinator.manifest import shard_directory
from shardkv.coordinator.manifest import read_manifest, write_manifest

pytestmark = pytest.mark.engine


def fill(path, n=200, shard_id=0):
    with ShardEngine.open(path, shard_id=shard_id, segment_size=4096, durability="process") as engine:
        for i in range(n):
            engine.put(b"k%03d" % i, b"v%03d" % i * 10)
        engine.apply([("put", b"batch-a", b"1"), ("put", b"batch-b", b"2")])


def segments(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".log"))


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_clean_store_verifies(tmp_path):
    fill(tmp_path)
    report = verify_store(str(tmp_path))
    assert report["ok"] and report["problems"] == []
    assert report["records"] == 202


def test_verify_finds_every_flipped_byte_by_file_and_offset_and_changes_nothing(tmp_path):
    fill(tmp_path)
    first, second = segments(tmp_path)[1], segments(tmp_path)[3]
    flip(first, 100)
    flip(second, 32 + 50)
    before = digest(tmp_path)
    report = verify_store(str(tmp_path))
    assert digest(tmp_path) == before
    assert not report["ok"]
    assert len(report["problems"]) == 2
    assert any(first in p and "offset 32" in p for p in report["problems"])
    assert any(second in p and "offset 32" in p for p in report["problems"])
    assert report["records"] == 200  # every other record is still read


def test_salvage_saves_everything_readable(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    fill(source)
    flip(segments(source)[2], 40)
    report = salvage_store(str(source), str(destination))
    assert report["keys"] == 201 and len(report["problems"]) == 1 and report["bytes_lost"] > 0
    assert verify_store(str(destination))["ok"]
    with ShardEngine.open(destination) as engine:
        assert len(engine) == 201
        assert engine.get(b"batch-a") == b"1" and engine.get(b"batch-b") == b"2"
        missing = [i for i in range(200) if engine.get(b"k%03d" % i) is None]
        assert len(missing) == 1
        assert all(engine.get(b"k%03d" % i) == b"v%03d" % i * 10 for i in range(200) if i not in missing)


def test_salvage_keeps_newest_version_and_deletions(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    with ShardEngine.open(source, segment_size=4096) as engine:
        for round_ in range(5):
            for i in range(50):
                engine.put(b"k%02d" % i, b"round%d" % round_ * 5)
        for i in range(10):
            engine.delete(b"k%02d" % i)
    salvage_store(str(source), str(destination))
    with ShardEngine.open(destination) as engine:
        assert len(engine) == 40
        assert engine.get(b"k05") is None and engine.get(b"k20") == b"round4" * 5


def test_salvage_of_a_store_keeps_its_shards(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    os.makedirs(source)
    write_manifest(str(source), 2)
    for shard in range(2):
        fill(shard_directory(str(source), shard), n=30, shard_id=shard)
    report = salvage_store(str(source), str(destination))
    assert report["problems"] == [] and report["keys"] == 2 * 32
    assert read_manifest(str(destination))["shards"] == 2
    assert verify_store(str(destination))["ok"]


def test_salvage_refuses_a_non_empty_destination(tmp_path):
    fill(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_bytes(b"")
    with pytest.raises(ValueError):
        salvage_store(str(tmp_path / "src"), str(tmp_path / "dst"))
