"""Online compaction of a shard: copy the live records of every sealed segment into new
segments and swap them in atomically (docs/FORMAT.md, "Compaction commit record").

Readers and writers keep going meanwhile: the engine's lock is held only to take the snapshot
and to swap locations; records are copied without it. A crash at any step leaves either the old
segments or the new ones live, never a mix: the commit point is the rename of COMPACTION.
"""

from __future__ import annotations

import os
import time

import numpy as np
from crc32c import crc32c

from shardkv.errors import CorruptionError
from shardkv.shards.hints import ActiveRecords, write_hint
from shardkv.wal import fileio
from shardkv.wal.format import (
    COMPACTION_FILE,
    COMPACTION_HEADER,
    COMPACTION_MAGIC,
    COMPACTION_NUMBER,
    FORMAT_VERSION,
    HINT_CRC,
    KIND_COMPACTED,
    PUT,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    TMP_SUFFIX,
    hint_name,
    segment_name,
)
from shardkv.wal.reader import check_record_at, map_file
from shardkv.wal.records import encode_record
from shardkv.wal.segment import create_segment

WRITE_CHUNK = 1 << 20


def encode_commit(inputs: list[int], outputs: list[int]) -> bytes:
    """The bytes of a COMPACTION commit record."""
    body = b"".join(
        [COMPACTION_HEADER.pack(COMPACTION_MAGIC, FORMAT_VERSION, 0, len(inputs), len(outputs), 0)]
        + [COMPACTION_NUMBER.pack(n) for n in inputs + outputs]
    )
    return body + HINT_CRC.pack(crc32c(body))


def decode_commit(data: bytes) -> tuple[list[int], list[int]] | None:
    """(inputs, outputs) of a commit record, or None if it is not a complete, valid one."""
    if len(data) < COMPACTION_HEADER.size + 4 or crc32c(data[:-4]) != HINT_CRC.unpack_from(data, len(data) - 4)[0]:
        return None
    magic, version, _, n_in, n_out, _ = COMPACTION_HEADER.unpack_from(data)
    if magic != COMPACTION_MAGIC or version != FORMAT_VERSION:
        return None
    if len(data) != COMPACTION_HEADER.size + 8 * (n_in + n_out) + 4:
        return None
    numbers = [COMPACTION_NUMBER.unpack_from(data, COMPACTION_HEADER.size + 8 * i)[0] for i in range(n_in + n_out)]
    return numbers[:n_in], numbers[n_in:]


def finish_interrupted_compaction(directory: str) -> None:
    """Complete a committed compaction that a crash interrupted, or forget an uncommitted one."""
    path = os.path.join(directory, COMPACTION_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    decoded = decode_commit(data)
    if decoded is not None:
        inputs, outputs = decoded
        for number in outputs:
            final = segment_name(number)
            if os.path.exists(os.path.join(directory, final + TMP_SUFFIX)):
                fileio.rename(directory, final + TMP_SUFFIX, final)
            elif not os.path.exists(os.path.join(directory, final)):
                raise CorruptionError(f"{path}: committed compaction output {final} is missing at offset 0")
        fileio.fsync_dir(directory)
        for number in inputs:
            fileio.unlink(directory, segment_name(number))
            fileio.unlink(directory, hint_name(number))
        fileio.fsync_dir(directory)
    fileio.unlink(directory, COMPACTION_FILE)
    fileio.fsync_dir(directory)


class _Output:
    """One compaction output segment being written under its temporary name."""

    def __init__(self, directory: str, number: int, shard: int):
        self.number = number
        self.tmp_path = create_segment(directory, number, KIND_COMPACTED, shard, final=False)
        self.fd = fileio.open_rw(self.tmp_path)
        self.end = SEGMENT_HEADER_SIZE
        self.pending = bytearray()
        self.table = ActiveRecords()

    def add(self, record: bytes, key_len: int, value_len: int, seq: int, expires_at: int) -> int:
        offset = self.end
        self.pending += record
        self.end += len(record)
        self.table.add(offset, PUT, key_len, value_len, seq, expires_at)
        if len(self.pending) >= WRITE_CHUNK:
            self.flush()
        return offset

    def flush(self) -> None:
        fileio.pwrite_all(self.fd, self.pending, self.end - len(self.pending))
        self.pending.clear()

    def finish(self) -> None:
        self.flush()
        fileio.sync_file(self.fd)
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        fileio.unlink(os.path.dirname(self.tmp_path), os.path.basename(self.tmp_path))


def compact(engine) -> dict:
    """Compact `engine` (a ShardEngine) online; return space and time figures.

    What is live is decided from the log - the record tables of the segments compacted - and
    never from the hash index, whose table may sit in shared memory that other processes can
    write. The index is compared with it; if they disagree, the index is rebuilt from the log
    at the swap (result["index_repair"] says why; None when they agree).

    Uses the engine's internals: `_lock`, `_index`, `_maps`, `_paths`, `_ends`, `_writer`,
    `_seal_active()` and `_version` (bumped around the swap for lock-free readers).
    """
    started = time.perf_counter()
    directory, shard = engine.directory, engine.shard_id
    commit_path = os.path.join(directory, COMPACTION_FILE)
    if os.path.exists(commit_path):
        # An earlier compaction committed but could not finish. Finish it on disk. If its swap
        # never happened in memory, this engine still reads the old segments (mapped even once
        # unlinked) and never the new ones: those become deletion-only inputs of this
        # compaction, so no older record of theirs outlives a DELETE dropped below.
        with open(commit_path, "rb") as f:
            decoded = decode_commit(f.read())
        if engine._unfinished_compaction != "swapped" and decoded is not None:
            engine._orphan_segments.extend(decoded[1])
        finish_interrupted_compaction(directory)
        engine._unfinished_compaction = None
    with engine._lock:
        engine._check_open()
        now = engine._now_ms()  # one instant for the purge and for the log's verdict below
        if engine._expires:
            engine._purge_expired(now)  # expired keys are not copied
        before = engine._space()
        engine._seal_active()
        if engine._prepared:
            engine._carry_prepared()  # undecided PREPAREs must outlive the segments compacted away
        inputs = sorted(engine._ends)
        # Every key's newest record is in an input now (the new active segment holds at most
        # copies of PREPAREs): the index should describe exactly the inputs' latest state.
        snapshot = engine._index.snapshot()
        maps = {n: engine._maps[n] for n in inputs}
        paths = {n: engine._paths[n] for n in inputs}
        ends = {n: engine._ends[n] for n in inputs}
    if not inputs:
        return {"before": before, "after": before, "seconds": time.perf_counter() - started, "inputs": 0, "outputs": 0, "index_repair": None}

    # The log's verdict, read without the lock: sealed segments no longer change. (Imported
    # here: recovery imports this module to finish interrupted compactions.)
    from shardkv.shards.recovery import latest_state, sealed_records  # noqa: PLC0415

    live, _ = latest_state({n: sealed_records(directory, shard, n, maps[n], paths[n], ends[n]) for n in inputs}, now)
    repair = snapshot.disagreement(live)
    _, locations, key_lens, value_lens, _ = live
    order = np.argsort(locations, kind="stable")
    locations, key_lens, value_lens = locations[order], key_lens[order], value_lens[order]
    if repair is None:
        # The same entries, so their ids are known: the swap moves them (see KeyIndex.relocate).
        ids = snapshot.live_ids()
        ids = ids[np.argsort(snapshot.locations[ids], kind="stable")]
    del snapshot
    outputs: list[_Output] = []
    new_locations = np.zeros(len(locations), dtype=np.uint64)
    engine._compaction_progress = (0, len(locations))
    capacity = engine.segment_size
    try:
        current = None
        for i, (location, key_len, value_len) in enumerate(zip(locations.tolist(), key_lens.tolist(), value_lens.tolist())):
            number, offset = location >> 32, location & 0xFFFFFFFF
            buf = maps[number]
            header = check_record_at(buf, offset, paths[number])
            if header.type != PUT or header.key_len != key_len or header.value_len != value_len:
                raise CorruptionError(f"{paths[number]}: the record does not match its segment's hint at offset {offset}")
            if header.batch_left == 0:
                record = buf[offset : offset + header.size]
            else:
                key_start = offset + RECORD_HEADER_SIZE
                key = buf[key_start : key_start + header.key_len]
                value = buf[key_start + header.key_len : offset + header.size]
                record = encode_record(PUT, key, value, header.seq, 0, header.expires_at)
            if current is None or current.end + len(record) > max(capacity, SEGMENT_HEADER_SIZE + len(record)):
                if current is not None:
                    current.finish()
                current = _Output(directory, engine._writer.reserve_segment_number(), shard)
                outputs.append(current)
            offset_out = current.add(record, header.key_len, header.value_len, header.seq, header.expires_at)
            new_locations[i] = (current.number << 32) | offset_out
            if i % 4096 == 0:
                engine._compaction_progress = (i, len(locations))
        if current is not None:
            current.finish()
        # Commit point: from here on the new segments are the truth.
        orphans = list(engine._orphan_segments)
        fileio.write_file_atomically(directory, COMPACTION_FILE, encode_commit(inputs + orphans, [o.number for o in outputs]))
    except BaseException:
        if os.path.exists(commit_path):
            # The commit record was renamed into place but a later step (the directory fsync)
            # failed: recovery may see it, so the outputs it names must stay. The next
            # compaction, or the next open, finishes this one.
            engine._unfinished_compaction = "committed"
        else:
            for output in outputs:
                output.discard()
        raise
    engine._unfinished_compaction = "committed"
    for output in outputs:
        fileio.rename(directory, os.path.basename(output.tmp_path), segment_name(output.number))
    fileio.fsync_dir(directory)

    new_maps = {o.number: map_file(os.path.join(directory, segment_name(o.number))) for o in outputs}
    with engine._lock:
        engine._version += 1
        try:
            for output in outputs:
                engine._maps[output.number] = new_maps[output.number]
                engine._paths[output.number] = os.path.join(directory, segment_name(output.number))
                engine._ends[output.number] = output.end
            if engine._shared is not None:
                engine._shared.bump_epoch()  # the inputs are deleted next: clients drop their mappings
            for number in inputs:
                del engine._maps[number], engine._paths[number], engine._ends[number]
            if repair is None:
                moved = engine._index.relocate(ids, locations, new_locations)
            else:
                try:
                    engine._rebuild_index_locked(repair, {o.number: o.table for o in outputs})
                except BaseException as exc:
                    engine._index_failure = exc  # no index to trust: writes stop until a reopen rebuilds it
                    raise
                moved = len(locations)
        finally:
            engine._version += 1
        engine._unfinished_compaction = "swapped"
        after = engine._space()
    for number in inputs + orphans:
        fileio.unlink(directory, segment_name(number))
        fileio.unlink(directory, hint_name(number))
    fileio.fsync_dir(directory)
    engine._orphan_segments = [n for n in engine._orphan_segments if n not in orphans]
    for output in outputs:
        try:
            write_hint(directory, shard, output.number, output.end, output.table, new_maps[output.number])
        except OSError:
            pass  # optional: open reads the segment instead
    fileio.unlink(directory, COMPACTION_FILE)
    fileio.fsync_dir(directory)
    engine._unfinished_compaction = None
    return {
        "before": before,
        "after": after,
        "seconds": time.perf_counter() - started,
        "inputs": len(inputs),
        "outputs": len(outputs),
        "records_moved": moved,
        "index_repair": repair,
    }
