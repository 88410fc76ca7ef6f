"""Copy every key of one store into another, with its time to live: `copy_store(SRC, DST)`,
or from the shell `python -m shardkv.backends copy SRC DST`. SRC and DST are what
`shardkv.open` takes (a directory, or a URL such as redis://host:port?namespace=app).

The source is read in key order (it needs ordered scans: a local store always has them), the
destination written in batches of `batch` keys: atomic batches where the destination has
them across shards (a local store), otherwise `write(..., atomic=False)` (Redis Cluster: each
hash slot's part atomic). A key keeps the time it had left when it was read; a key that
expires (or is deleted) while it is being copied is left out. Copy a store nobody writes to
meanwhile: a key written during the copy may be copied before or after the write.
"""

from __future__ import annotations

import math
import os
import time

import shardkv
from shardkv.backends import features_of


def copy_store(source, destination, batch: int = 1000, progress=None) -> dict:
    """Copy every key of `source` into `destination` (targets for shardkv.open, or open
    clients). `progress(copied)` is called after each batch. Returns {"keys", "with_ttl",
    "skipped", "seconds"}; skipped counts keys gone between being read and being written."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, not {batch!r}")
    opened = []
    try:
        src = _open(source, opened)
        dst = _open(destination, opened)
        if not features_of(src).ordered_scans:
            raise shardkv.Unsupported("the source has no ordered scans (a Redis Cluster store created with ordered=False): it cannot be read key by key")
        atomic = {} if features_of(dst).cross_shard_batches else {"atomic": False}
        started = time.monotonic()
        totals = {"keys": 0, "with_ttl": 0, "skipped": 0}
        pending: list[tuple[bytes, bytes, float | None]] = []

        def flush() -> None:
            """Write the pending keys to the destination."""
            # ttl(): math.inf "never expires", None "absent" (the local store); a backend that
            # still answers None for both is asked which, with get_many.
            unsure = [key for key, _, ttl in pending if ttl is None]
            present = dict(zip(unsure, src.get_many(unsure))) if unsure else {}
            ops = []
            for key, value, ttl in pending:
                if ttl is None and present.get(key) is None:
                    totals["skipped"] += 1
                    continue
                expires = ttl is not None and ttl != math.inf
                ops.append(("put", key, value, ttl) if expires else ("put", key, value))
                totals["with_ttl"] += expires
            if ops:
                dst.write(ops, **atomic)
            totals["keys"] += len(ops)
            pending.clear()
            if progress is not None:
                progress(totals["keys"])

        for key, value in src.scan():
            pending.append((key, value, src.ttl(key)))
            if len(pending) >= batch:
                flush()
        flush()
        totals["seconds"] = round(time.monotonic() - started, 3)
        return totals
    finally:
        for db in reversed(opened):
            db.close()


def _open(target, opened: list):
    if isinstance(target, (str, os.PathLike)):
        db = shardkv.open(target)
        opened.append(db)
        return db
    return target
