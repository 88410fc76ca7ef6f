"""White-box access to the clients' transport internals (shardkv/client.py, shardkv/aio.py and
the shared-index readers they hold), for the tests that forge ring frames, scribble on shared
memory, count direct reads or send raw messages.

The one module of tests/ that names those private attributes (as tests/engine_support.py is
for the engine's): when a client changes inside, this is the file to change with it. What an
ops tool may read of a cluster goes through the public `Client.cluster_view` instead.

Imported as a plain module (pytest puts tests/ on sys.path); a client subprocess of a test
puts TESTS on its path first (see SUBPROCESS_PATH).
"""

from __future__ import annotations

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
# The first line of a `python -c` script that imports this module.
SUBPROCESS_PATH = f"import sys; sys.path.insert(0, {TESTS!r})\n"


# -- Client --------------------------------------------------------------------------------------
def index_readers(db) -> list | None:
    """Each shard's shared-index reader (shardkv/ipc/sharedindex.py IndexReader), or None when
    the client reads through the rings only (direct_reads=False, unsupported, closed)."""
    return db._index_readers


def call(db, target: int, message: bytes, read: bool) -> tuple:
    """Send a raw `message` to `target` (a shard; `db.shards`: the coordinator) through the
    client's own retries (Client._call); (status, body)."""
    return db._call(target, message, read=read)


def watch_calls(db, monkeypatch, seen) -> None:
    """From now on (until the test ends), call `seen(target, message)` before each request
    `db` sends through its rings (Client._call), then send it as before."""
    original = db._call

    def call(target, message, read, timeout=None):
        seen(target, message)
        return original(target, message, read, timeout)

    monkeypatch.setattr(db, "_call", call)


def ring(db, target: int):
    """`target`'s ring (shardkv/ipc/layout.py Ring; `db.shards`: the coordinator's)."""
    return db._rings[target]


def wake(db, target: int):
    """The semaphore that wakes `target`'s server after a request is written to its ring."""
    return db._wake[target]


def answered(db):
    """The semaphore `db`'s lease is posted on when an answer is written to one of its slots."""
    return db._done


def count_direct_reads(db, counts: dict) -> None:
    """From now on, count each shared-index answer of `db.get` in counts["direct"] and each
    FALLBACK (the read goes to the ring) in counts["fallback"]."""
    from shardkv.ipc.sharedindex import FALLBACK  # noqa: PLC0415

    def counting(get):
        def counted(key, h):
            value = get(key, h)
            counts["fallback" if value is FALLBACK else "direct"] += 1
            return value

        return counted

    db._direct_get = [counting(get) for get in db._direct_get]


def owner_pid(db) -> int:
    """The pid the client's lease was taken for (a forked child takes a lease of its own)."""
    return db._pid


# -- AsyncClient ---------------------------------------------------------------------------------
def idle(adb, pool: int) -> bool:
    """Whether every one of the `pool` leases' slots of every target is free again and no
    request is outstanding (a cancelled caller's slot comes back when its answer arrives)."""
    return all(queue.qsize() == pool for queue in adb._free) and not adb._pending


# -- IndexReader (shardkv/ipc/sharedindex.py) ---------------------------------------------------
def index_header(reader):
    """The reader's mapping of its shard's index header (read-only)."""
    return reader._header


def index_table(reader):
    """The table the reader has mapped: (number, shift, slots, ...) or None."""
    return reader._table


def active_segment(reader) -> tuple:
    """(segment number, mapping, end) of the active segment as the reader mapped it."""
    return reader._active


def sealed_segments(reader) -> dict:
    """Segment number -> the reader's mapping of that sealed segment, cached since the last
    epoch change (or forget_sealed_segments)."""
    return reader._segments[1]


def forget_sealed_segments(reader) -> None:
    """Empty the reader's cache of sealed-segment mappings, so that sealed_segments shows only
    the reads that follow."""
    reader._segments = (-1, {})
