"""Online compaction of a shard: copy the live records of every sealed segment into new
segments and swap them in atomically (docs/FORMAT.md, "Compaction commit record").

Readers and writers keep going meanwhile: the store's lock is held only to take the snapshot
and to swap locations (the two calls `Compactor` makes to the store); records are copied
without it. A crash at any step leaves either the old
segments or the new ones live, never a mix: the commit point is the rename of COMPACTION.
"""

from __future__ import annotations

import os
import threading
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


class Compactor:
    """Compacts one store (shards/store.py), one compaction at a time, through two calls:
    `Store.compaction_inputs` (under the store's lock: seal, snapshot) and `Store.swap_compacted`
    (under it again: read the outputs instead). Everything else runs without the store's lock.

    Keeps what lasts between compactions: a committed compaction that could not finish, and
    segments on disk that the store never mapped (outputs of a compaction whose swap failed)."""

    def __init__(self, store, segment_size: int):
        self.store = store
        self.segment_size = segment_size
        self.lock = threading.Lock()  # held for the whole of a compaction (and by close)
        self.unfinished: str | None = None  # "committed"/"swapped" while a failed one awaits cleanup
        self.orphans: list[int] = []  # on disk, never mapped: deleted by the next compaction
        self.progress = (0, 0)  # (records copied, records to copy) of the running one
        self.last: dict | None = None  # the result of the last compaction

    def running(self) -> tuple[bool, int, int]:
        """(whether a compaction runs, records copied, records to copy)."""
        running = self.lock.locked()
        done, total = self.progress if running else (0, 0)
        return running, done, total

    def run(self) -> dict:
        """Compact the store online (the caller holds `lock`); return space and time figures.

        What is live is decided from the log - the record tables of the segments compacted -
        and never from the hash index, whose table may sit in shared memory that other
        processes can write. The index is compared with it; if they disagree, the index is
        rebuilt from the log at the swap (result["index_repair"] says why; None when they agree).
        """
        started = time.perf_counter()
        store = self.store
        directory, shard = store.directory, store.shard_id
        commit_path = os.path.join(directory, COMPACTION_FILE)
        if os.path.exists(commit_path):
            # An earlier compaction committed but could not finish. Finish it on disk. If its
            # swap never happened in memory, the store still reads the old segments (mapped even
            # once unlinked) and never the new ones: those become deletion-only inputs of this
            # compaction, so no older record of theirs outlives a DELETE dropped below.
            with open(commit_path, "rb") as f:
                decoded = decode_commit(f.read())
            if self.unfinished != "swapped" and decoded is not None:
                self.orphans.extend(decoded[1])
            finish_interrupted_compaction(directory)
            self.unfinished = None
        taken = store.compaction_inputs()
        inputs, maps, paths, before = taken.numbers, taken.maps, taken.paths, taken.before
        if not inputs:
            return {"before": before, "after": before, "seconds": time.perf_counter() - started, "inputs": 0, "outputs": 0, "index_repair": None}

        # The log's verdict, read without the lock: sealed segments no longer change. (Imported
        # here: recovery imports this module to finish interrupted compactions.)
        from shardkv.shards.recovery import latest_state, sealed_records  # noqa: PLC0415

        live, _ = latest_state({n: sealed_records(directory, shard, n, maps[n], paths[n], taken.ends[n]) for n in inputs}, taken.now)
        snapshot = taken.snapshot
        taken.snapshot = None
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
        self.progress = (0, len(locations))
        capacity = self.segment_size
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
                    current = _Output(directory, taken.reserve_segment_number(), shard)
                    outputs.append(current)
                offset_out = current.add(record, header.key_len, header.value_len, header.seq, header.expires_at)
                new_locations[i] = (current.number << 32) | offset_out
                if i % 4096 == 0:
                    self.progress = (i, len(locations))
            if current is not None:
                current.finish()
            # Commit point: from here on the new segments are the truth.
            orphans = list(self.orphans)
            fileio.write_file_atomically(directory, COMPACTION_FILE, encode_commit(inputs + orphans, [o.number for o in outputs]))
        except BaseException:
            if os.path.exists(commit_path):
                # The commit record was renamed into place but a later step (the directory
                # fsync) failed: recovery may see it, so the outputs it names must stay. The
                # next compaction, or the next open, finishes this one.
                self.unfinished = "committed"
            else:
                for output in outputs:
                    output.discard()
            raise
        self.unfinished = "committed"
        for output in outputs:
            fileio.rename(directory, os.path.basename(output.tmp_path), segment_name(output.number))
        fileio.fsync_dir(directory)

        swapped = {}
        for o in outputs:
            path = os.path.join(directory, segment_name(o.number))
            swapped[o.number] = (map_file(path), path, o.end, o.table)
        moved, after = store.swap_compacted(inputs, swapped, None if repair is not None else (ids, locations, new_locations), repair)
        if moved is None:
            moved = len(locations)
        self.unfinished = "swapped"
        for number in inputs + orphans:
            fileio.unlink(directory, segment_name(number))
            fileio.unlink(directory, hint_name(number))
        fileio.fsync_dir(directory)
        self.orphans = [n for n in self.orphans if n not in orphans]
        for output in outputs:
            try:
                write_hint(directory, shard, output.number, output.end, output.table, swapped[output.number][0])
            except OSError:
                pass  # optional: open reads the segment instead
        fileio.unlink(directory, COMPACTION_FILE)
        fileio.fsync_dir(directory)
        self.unfinished = None
        return {
            "before": before,
            "after": after,
            "seconds": time.perf_counter() - started,
            "inputs": len(inputs),
            "outputs": len(outputs),
            "records_moved": moved,
            "index_repair": repair,
        }
