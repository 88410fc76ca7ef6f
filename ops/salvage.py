"""`shardkv salvage SRC DST`: copy every record that can still be read into a new, clean store.

For each shard, every whole batch that verify can read is taken, in every segment (damaged
places are stepped over, not stopped at), and for each key the record with the highest seq wins,
as on open. A key whose winning record has expired is left out (an older record of it does not
come back), and every copied record keeps its expiry instant, to the millisecond. The result is
written as a fresh store with the same shard count; the report says what could not be saved.
"""

from __future__ import annotations

import os

from shardkv.coordinator.manifest import read_manifest, write_manifest
from shardkv.ops.verify import Problem, shard_directories, active_segment, walk_segment
from shardkv.shards.engine import ShardEngine
from shardkv.wal.format import DELETE, PUT, RECORD_HEADER_SIZE, segment_name
from shardkv.wal.reader import map_file
from shardkv.wal.segment import list_segments
from shardkv.coordinator.manifest import shard_directory

BATCH = 1000


def salvage_store(source: str, destination: str) -> dict:
    """Copy what can be read of the store (or shard) in `source` into a new store at `destination`.

    Returns {"keys": n, "records_read": n, "problems": [str, ...], "bytes_lost": n}.
    """
    if os.path.exists(destination) and os.listdir(destination):
        raise ValueError(f"{destination} is not empty: salvage writes a new store")
    os.makedirs(destination, mode=0o700, exist_ok=True)
    shard_dirs = shard_directories(source)
    is_store = shard_dirs != [source]
    if is_store:
        manifest = None
        try:
            manifest = read_manifest(source)
        except Exception:  # noqa: BLE001 — a damaged manifest must not stop a salvage
            pass
        write_manifest(destination, manifest["shards"] if manifest else len(shard_dirs))
    report = {"keys": 0, "records_read": 0, "problems": [], "bytes_lost": 0}
    for index, shard_dir in enumerate(shard_dirs):
        target = shard_directory(destination, index) if is_store else destination
        _salvage_shard(shard_dir, target, index, report)
    return report


def _salvage_shard(shard_dir: str, target: str, shard_id: int, report: dict) -> None:
    newest: dict[bytes, tuple[int, int, int, int, int, int]] = {}  # key -> (seq, type, segment, value offset, value_len, expires_at)
    maps = {}
    numbers = list_segments(shard_dir)
    active = active_segment(shard_dir, numbers)
    try:
        for number in numbers:
            path = os.path.join(shard_dir, segment_name(number))
            try:
                buf = map_file(path)
                items = list(walk_segment(buf, path, number == active))
            except Exception as exc:  # noqa: BLE001 — a segment that cannot be read at all is reported
                report["problems"].append(f"{path}: cannot be read ({exc})")
                continue
            maps[number] = buf
            for item in items:
                if isinstance(item, Problem):
                    report["problems"].append(str(item))
                    report["bytes_lost"] += item.end - item.offset
                    continue
                offset, header = item
                report["records_read"] += 1
                if header.type not in (PUT, DELETE):
                    continue  # batch markers: salvage keeps applied data only (docs/TRANSACTIONS.md)
                key_start = offset + RECORD_HEADER_SIZE
                key = bytes(buf[key_start : key_start + header.key_len])
                seen = newest.get(key)
                if seen is None or header.seq >= seen[0]:
                    newest[key] = (header.seq, header.type, number, key_start + header.key_len, header.value_len, header.expires_at)
        with ShardEngine.open(target, shard_id=shard_id, durability="process") as engine:
            batch = []
            for key, (_, rtype, number, value_start, value_len, expires_at) in newest.items():
                if rtype != PUT:
                    continue
                # put_records skips what has expired and keeps the others' expiry instants.
                batch.append((key, bytes(maps[number][value_start : value_start + value_len]), expires_at))
                if len(batch) >= BATCH:
                    engine.put_records(batch)
                    batch = []
            if batch:
                engine.put_records(batch)
            report["keys"] += len(engine)
            engine.sync()
    finally:
        for buf in maps.values():
            buf.close()
