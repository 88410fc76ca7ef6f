"""Helpers shared by the ShardEngine tests (test_engine*.py): opening, crashing, inspecting.

Imported as a plain module (pytest puts tests/ on sys.path); not a conftest, so that it cannot
collide with fixtures of other test files.
"""

from __future__ import annotations

import os
import shutil

from shardkv.shards import ShardEngine
from shardkv.shards.recovery import unmap_all
from shardkv.wal.format import HINT_SUFFIX, SEGMENT_SUFFIX, parse_segment_name


def open_engine(directory, **options) -> ShardEngine:
    """Open with the small defaults the tests use (4 KiB segments, durability "process")."""
    options.setdefault("durability", "process")
    options.setdefault("segment_size", 4096)
    return ShardEngine.open(os.fspath(directory), **options)


def crash(engine: ShardEngine) -> None:
    """Drop `engine` as a killed process would: no fsync, no hint, no clean close.

    Everything written with durability "process" has reached the OS (page cache), so a new
    engine opened on the same directory must see it. The object is unusable afterwards.
    """
    writer = log_writer(engine)
    writer._stop.set()  # the "interval" syncer thread dies with the process
    if writer._syncer is not None:
        writer._syncer.join()
    with writer._lock:
        writer._closed = True
        if writer._fd >= 0:
            os.close(writer._fd)
            writer._fd = -1
    engine._closed = True
    engine._store.closed = True
    unmap_all(engine._store.maps)
    os.close(engine._lock_fd)


# The engine's parts, for white-box tests that drive, spy on or damage one of them directly
# (forged records, fsync spies, scribbled index entries, a view caught mid-build): the one place
# tests reach into the engine. What a test can observe through the API it checks there instead
# (ShardEngine.log_position(), segments(), stats()).
def log_writer(engine: ShardEngine):
    """The engine's log writer (wal/writer.py)."""
    return engine._store.writer


def key_index(engine: ShardEngine):
    """The engine's hash index (shards/keyindex.py)."""
    return engine._store.index


def ordered_view(engine: ShardEngine):
    """The engine's ordered view of its keys (shards/sortedkeys.py)."""
    return engine._store.sorted


def index_header(engine: ShardEngine):
    """The engine's seqlock version and published header fields (shards/indexheader.py)."""
    return engine._store.header


def holds_write_lock(engine: ShardEngine) -> bool:
    """Whether a writer holds the engine's lock now (a lock-free read must not need it)."""
    return engine._lock.locked()


def prepared_locks(engine: ShardEngine) -> int:
    """How many keys the engine's prepared batches lock (what its worker publishes)."""
    return len(engine._prepared.locks)


def check_ops(engine: ShardEngine, ops):
    """The engine's check of a batch's operations (shards/batchcheck.py), as `apply` runs it."""
    return engine._check_ops(ops)


def store(engine: ShardEngine):
    """The engine's store (shards/store.py): segments, writer, index and ordered view."""
    return engine._store


def segment_numbers(directory) -> list[int]:
    return sorted(n for n in map(parse_segment_name, os.listdir(directory)) if n is not None)


def segment_path(directory, number: int) -> str:
    return os.path.join(os.fspath(directory), f"{number:016x}{SEGMENT_SUFFIX}")


def hint_path(directory, number: int) -> str:
    return os.path.join(os.fspath(directory), f"{number:016x}{HINT_SUFFIX}")


def remove_hints(directory) -> None:
    for name in os.listdir(directory):
        if name.endswith(HINT_SUFFIX):
            os.unlink(os.path.join(directory, name))


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        assert len(byte) == 1, f"{path} has no byte at offset {offset}"
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def copy_dir(source, destination) -> str:
    """Copy a shard directory (the LOCK file's flock does not travel with it)."""
    shutil.copytree(os.fspath(source), os.fspath(destination))
    return os.fspath(destination)


def contents(engine: ShardEngine) -> dict[bytes, bytes]:
    """Everything the engine holds, as a dict (via a full scan)."""
    return dict(engine.scan())


def assert_matches(engine: ShardEngine, model: dict[bytes, bytes]) -> None:
    """The engine holds exactly `model`: scan, len and every get agree."""
    assert len(engine) == len(model)
    assert list(engine.scan()) == sorted(model.items())
    for key, value in model.items():
        assert engine.get(key) == value, key
