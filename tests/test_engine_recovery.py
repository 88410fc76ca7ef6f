"""Opening a damaged shard: torn tails are cut back to a batch boundary, anything else raises
CorruptionError naming the file and offset (docs/FORMAT.md, "Recovery: torn tails and corruption").
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from crc32c import crc32c

from shardkv import CorruptionError
from shardkv.wal import iter_records
from shardkv.wal.format import PREPARE, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from shardkv.wal.records import encode_record

from engine_support import (
    assert_matches,
    copy_dir,
    crash,
    flip_byte,
    hint_path,
    log_writer,
    open_engine,
    segment_numbers,
    segment_path,
)

pytestmark = pytest.mark.engine


def _nonzero(rng: random.Random, n: int) -> bytes:
    """Bytes without a zero, so that zeroing any byte of a record changes it."""
    return bytes(rng.randrange(1, 256) for _ in range(n))


# -- torn tails --------------------------------------------------------------------------------
def test_torn_tail_is_repaired_on_open(tmp_path):
    """BUG (minimal): any torn tail makes open() raise ValueError("mmap closed or invalid").

    shards/recovery.py `_read_segment` closes the active segment's mapping and then calls
    `cut_tail(path, scan.end, len(buf))`, where `buf` is that closed mapping.
    """
    e = open_engine(tmp_path)
    e.put(b"a", b"1")
    e.put(b"b", b"2")
    active, end = e.log_position()
    crash(e)
    with open(segment_path(tmp_path, active), "r+b") as f:
        f.seek(end - 3)  # the last write reached the disk only partly
        f.write(bytes(3))
    with open_engine(tmp_path) as e:
        assert_matches(e, {b"a": b"1"})
        assert e.recovery["torn_bytes"] > 0


def _build_torn_tail_shard(directory, stale_hint: bool):
    """A shard with sealed segments and an active one whose last batches are the test subject.

    Returns (history, tail_start, data_end, active) where history lists, per acknowledged
    write, (end offset in the active segment or None, model after it).
    """
    rng = random.Random(7)
    model: dict[bytes, bytes] = {}
    e = open_engine(directory, segment_size=4096)
    for i in range(60):  # several sealed segments (with hints) first
        key, value = b"seed%02d" % (i % 40), _nonzero(rng, rng.randrange(1, 60))
        e.put(key, value)
        model[key] = value
    writer = log_writer(e)
    while writer._capacity - writer.position[1] < 2500:  # the tail must fit in one segment
        e.put(b"filler", b"f" * 100)
        model[b"filler"] = b"f" * 100
    if stale_hint:  # a clean close writes a hint for the active segment; later writes go past it
        e.put(b"before-close", b"x")
        model[b"before-close"] = b"x"
        e.close()
        e = open_engine(directory, segment_size=4096)
        writer = log_writer(e)
    active, tail_start = writer.position
    history = [(tail_start, dict(model))]

    def done():
        segment, end = writer.position
        assert segment == active
        history.append((end, dict(model)))

    def put(key, value):
        e.put(key, value)
        model[key] = value
        done()

    def apply(ops):
        e.apply(ops)
        for op in ops:
            if op[0] == "put":
                model[op[1]] = op[2]
            else:
                model.pop(op[1], None)
        done()

    put(b"t1", _nonzero(rng, 9))
    apply([("put", b"b1", _nonzero(rng, 5)), ("put", b"seed01", _nonzero(rng, 7)), ("put", b"b1", _nonzero(rng, 3))])
    put(b"seed02", _nonzero(rng, 1))
    assert e.delete(b"seed03")
    model.pop(b"seed03")
    done()
    apply([("delete", b"seed04"), ("put", b"b2", _nonzero(rng, 11)), ("delete", b"t1")])
    put(b"t2", b"")  # an empty value: its record ends with the key
    apply([("put", b"b3", _nonzero(rng, 4)), ("put", b"b4", _nonzero(rng, 4))])
    crash(e)
    data_end = history[-1][0]
    return history, tail_start, data_end, active


@pytest.mark.parametrize("stale_hint", [False, True], ids=["no-hint", "stale-hint"])
@pytest.mark.parametrize("damage", ["zero", "truncate"])
def test_torn_tail_recovers_a_prefix_of_whole_batches(tmp_path, damage, stale_hint):
    source = tmp_path / "source"
    history, tail_start, data_end, active = _build_torn_tail_shard(source, stale_hint)
    assert os.path.exists(hint_path(source, active)) == stale_hint
    with open(segment_path(source, active), "rb") as f:
        original = f.read()
    assert any(original[tail_start:data_end]) and not any(original[data_end:])

    for n, offset in enumerate(range(tail_start, data_end + 1)):
        directory = copy_dir(source, tmp_path / f"{damage}-{offset}")
        path = segment_path(directory, active)
        with open(path, "r+b") as f:
            if damage == "zero":  # the write reached the file only up to `offset`
                f.seek(offset)
                f.write(bytes(data_end - offset))
            else:  # the file was extended only up to `offset`
                f.truncate(offset)
        kept_end, expected = max((h for h in history if h[0] <= offset), key=lambda h: h[0])
        nonzero = [i for i in range(kept_end, offset) if original[i]]
        expected_torn = nonzero[-1] + 1 - kept_end if nonzero else 0

        e = open_engine(directory, segment_size=4096)
        try:
            assert_matches(e, expected)
            assert e.recovery["torn_bytes"] == expected_torn, offset
            with open(path, "rb") as f:
                repaired = f.read()
            assert repaired[:kept_end] == original[:kept_end]
            assert not any(repaired[kept_end:]), "the torn bytes must be zeroed"
            if n % 5 == 0:  # the repaired log takes new writes and survives another crash
                e.put(b"after-repair", b"ok")
                e.apply([("put", b"after-repair-2", b"ok2"), ("delete", b"b2")])
                expected = dict(expected)
                expected.update({b"after-repair": b"ok", b"after-repair-2": b"ok2"})
                expected.pop(b"b2", None)
                crash(e)
                e = open_engine(directory, segment_size=4096)
                assert e.recovery["torn_bytes"] == 0
                assert_matches(e, expected)
        finally:
            e.close()


def test_unfinished_batch_is_dropped_whole(tmp_path):
    """A batch whose last record is missing is dropped even though its first records are intact."""
    e = open_engine(tmp_path, segment_size=1 << 16)
    e.put(b"a", b"1")
    active, start = e.log_position()
    e.apply([("put", b"x", b"1"), ("put", b"y", b"2"), ("put", b"z", b"3")])
    crash(e)
    records = list(iter_records(segment_path(tmp_path, active), active=True))
    last = records[-1]
    assert last.key == b"z" and last.batch_left == 0
    cut = last.offset + RECORD_HEADER_SIZE  # inside the last record: its header, not its key
    with open(segment_path(tmp_path, active), "r+b") as f:
        data = f.read(cut)
        f.truncate(cut)
    with open_engine(tmp_path, segment_size=1 << 16) as e:
        assert_matches(e, {b"a": b"1"})
        # from the batch's start to the last non-zero byte that was left
        assert e.recovery["torn_bytes"] == len(data.rstrip(b"\0")) - start > 2 * RECORD_HEADER_SIZE


# -- corruption in sealed segments ---------------------------------------------------------------
def _sealed_shard(directory):
    """A cleanly closed shard with several sealed segments; returns (model, records of seg 1)."""
    rng = random.Random(3)
    model = {}
    with open_engine(directory, segment_size=4096) as e:
        for i in range(150):
            key, value = b"key%03d" % i, _nonzero(rng, rng.randrange(10, 60))
            e.put(key, value)
            model[key] = value
        e.apply([("put", b"batch-a", b"A"), ("put", b"batch-b", b"B")])
        model.update({b"batch-a": b"A", b"batch-b": b"B"})
    numbers = segment_numbers(directory)
    assert len(numbers) >= 3
    records = list(iter_records(segment_path(directory, numbers[0])))
    assert len(records) >= 5
    return model, records


def _positions(records):
    """(label, record offset, byte offset to flip) at interesting places of seg 1's records."""
    middle, last = records[len(records) // 2], records[-1]
    out = []
    for label, rec in (("middle", middle), ("last", last)):
        out += [
            (f"{label}-crc", rec.offset, rec.offset + 1),
            (f"{label}-header_crc", rec.offset, rec.offset + 6),
            (f"{label}-type", rec.offset, rec.offset + 8),
            (f"{label}-key_len", rec.offset, rec.offset + 12),
            (f"{label}-value_len", rec.offset, rec.offset + 16),
            (f"{label}-seq", rec.offset, rec.offset + 24),
            (f"{label}-key", rec.offset, rec.offset + RECORD_HEADER_SIZE),
            (f"{label}-value", rec.offset, rec.offset + RECORD_HEADER_SIZE + len(rec.key) + len(rec.value) - 1),
        ]
    return out


def test_flipped_byte_in_sealed_segment_fails_open(tmp_path):
    source = tmp_path / "source"
    model, records = _sealed_shard(source)
    first = segment_numbers(source)[0]
    for label, record_offset, flip_at in _positions(records):
        directory = copy_dir(source, tmp_path / label)
        flip_byte(segment_path(directory, first), flip_at)
        os.unlink(hint_path(directory, first))  # so that open must read the segment
        with pytest.raises(CorruptionError) as info:
            open_engine(directory)
        message = str(info.value)
        assert segment_path(directory, first) in message, label
        assert f"at offset {record_offset}" in message, (label, message)
        # the failed open released the directory and changed nothing: fixing the byte fixes it
        flip_byte(segment_path(directory, first), flip_at)
        with open_engine(directory) as e:
            assert_matches(e, model)


@pytest.mark.parametrize("with_hint", [True, False], ids=["hint", "no-hint"])
def test_damaged_segment_header_fails_open(tmp_path, with_hint):
    model, _ = _sealed_shard(tmp_path)
    first = segment_numbers(tmp_path)[0]
    if not with_hint:
        os.unlink(hint_path(tmp_path, first))
    flip_byte(segment_path(tmp_path, first), 17)  # the segment number
    with pytest.raises(CorruptionError, match=r"0000000000000001\.log.*offset 0"):
        open_engine(tmp_path)


def test_unsupported_segment_version_fails_open(tmp_path):
    _sealed_shard(tmp_path)
    path = segment_path(tmp_path, segment_numbers(tmp_path)[0])
    with open(path, "r+b") as f:
        header = bytearray(f.read(SEGMENT_HEADER_SIZE))
        header[8:10] = struct.pack("<H", 2)
        header[28:32] = struct.pack("<I", crc32c(bytes(header[:28])))
        f.seek(0)
        f.write(header)
    with pytest.raises(CorruptionError, match="unsupported format version"):
        open_engine(tmp_path)


@pytest.mark.parametrize("with_hint", [True, False], ids=["hint", "no-hint"])
def test_truncated_sealed_segment_fails_open(tmp_path, with_hint):
    _, records = _sealed_shard(tmp_path)
    first = segment_numbers(tmp_path)[0]
    if not with_hint:
        os.unlink(hint_path(tmp_path, first))
    with open(segment_path(tmp_path, first), "r+b") as f:
        f.truncate(records[-1].offset + 10)
    with pytest.raises(CorruptionError) as info:
        open_engine(tmp_path)
    assert segment_path(tmp_path, first) in str(info.value)
    assert f"offset {records[-1].offset}" in str(info.value)


def test_flipped_value_byte_under_valid_hint_is_caught_on_read(tmp_path):
    model, records = _sealed_shard(tmp_path)
    first = segment_numbers(tmp_path)[0]
    victim = records[len(records) // 2]
    assert os.path.exists(hint_path(tmp_path, first))
    flip_byte(segment_path(tmp_path, first), victim.offset + RECORD_HEADER_SIZE + len(victim.key) + 2)
    with open_engine(tmp_path) as e:  # the hint is trusted: open does not read the values
        for key, value in model.items():
            if key != victim.key:
                assert e.get(key) == value
        with pytest.raises(CorruptionError) as info:
            e.get(victim.key)
        assert segment_path(tmp_path, first) in str(info.value)
        assert f"offset {victim.offset}" in str(info.value)
        with pytest.raises(CorruptionError):
            list(e.scan())
        with pytest.raises(CorruptionError):
            e.compact()  # never copies a damaged record
        # the failed compaction left the engine and its files usable
        assert e.get(b"batch-a") == b"A"
        e.put(b"new", b"1")
        assert e.get(b"new") == b"1"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n == "COMPACTION"]
    with open_engine(tmp_path, verify_checksums=False) as e:
        damaged = e.get(victim.key)
        assert damaged is not None and damaged != victim.value  # the opt-out returns what is there


def test_flipped_header_byte_under_valid_hint_is_caught_on_read(tmp_path):
    _, records = _sealed_shard(tmp_path)
    first = segment_numbers(tmp_path)[0]
    victim = records[len(records) // 2]
    flip_byte(segment_path(tmp_path, first), victim.offset + 24)  # seq
    with open_engine(tmp_path) as e:
        with pytest.raises(CorruptionError, match=f"offset {victim.offset}"):
            e.get(victim.key)


def test_flipped_key_byte_under_valid_hint_is_not_silently_lost(tmp_path):
    """BUG: with a valid hint, a record whose key bytes are damaged makes get() return None.

    The index keeps no keys: it confirms a candidate by reading the key from the log, so a
    damaged key just fails to match and the key silently disappears (while len() still counts
    it, and scan() skips it). docs/FORMAT.md: "Nothing is ever skipped silently"; with
    verify_checksums=True the read should raise CorruptionError naming file and offset.
    """
    model, records = _sealed_shard(tmp_path)
    first = segment_numbers(tmp_path)[0]
    victim = records[len(records) // 2]
    flip_byte(segment_path(tmp_path, first), victim.offset + RECORD_HEADER_SIZE + 1)
    with open_engine(tmp_path) as e:
        with pytest.raises(CorruptionError, match=f"offset {victim.offset}"):
            e.get(victim.key)


def test_bad_hint_is_ignored_and_rewritten(tmp_path):
    model, _ = _sealed_shard(tmp_path)
    numbers = segment_numbers(tmp_path)
    with open(hint_path(tmp_path, numbers[2]), "wb") as f:  # a valid hint of another segment
        with open(hint_path(tmp_path, numbers[0]), "rb") as other:
            f.write(other.read())
    flip_byte(hint_path(tmp_path, numbers[0]), 50)  # fails its checksum
    with open(hint_path(tmp_path, numbers[1]), "r+b") as f:  # a short hint
        f.truncate(30)
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
    for number in numbers[:3]:  # rewritten valid: a later open trusts them
        with open(hint_path(tmp_path, number), "rb") as f:
            data = f.read()
        assert crc32c(data[:-4]) == int.from_bytes(data[-4:], "little")
        assert int.from_bytes(data[16:24], "little") == number
    with open_engine(tmp_path) as e:
        assert_matches(e, model)


# -- corruption in the active segment -------------------------------------------------------------
def _crashed_active(directory, synced: bool = True):
    """A crashed shard (no hint for the active segment) whose active segment holds 20 records,
    fsynced and vouched for by the SYNCED watermark (or, `synced=False`, never fsynced)."""
    rng = random.Random(5)
    model = {}
    e = open_engine(directory, segment_size=1 << 16)
    for i in range(20):
        key, value = b"act%02d" % i, _nonzero(rng, 30)
        e.put(key, value)
        model[key] = value
    active = e.log_position()[0]
    if synced:
        log_writer(e).sync_and_publish()
    crash(e)
    assert not os.path.exists(hint_path(directory, active))
    return model, active, list(iter_records(segment_path(directory, active), active=True))


@pytest.mark.parametrize("where", ["crc", "header", "key", "value"])
def test_damage_in_the_middle_of_the_active_segment_is_corruption(tmp_path, where):
    _, active, records = _crashed_active(tmp_path)
    victim = records[10]
    shift = {"crc": 0, "header": 20, "key": RECORD_HEADER_SIZE, "value": RECORD_HEADER_SIZE + len(victim.key) + 5}[where]
    flip_byte(segment_path(tmp_path, active), victim.offset + shift)
    with pytest.raises(CorruptionError) as info:
        open_engine(tmp_path, segment_size=1 << 16)
    message = str(info.value)
    assert segment_path(tmp_path, active) in message and f"offset {victim.offset}" in message
    with open(segment_path(tmp_path, active), "rb") as f:  # not "repaired" by truncation
        data = f.read()
    assert any(data[records[-1].offset :])


def test_zeroed_record_in_the_middle_of_the_active_segment_is_corruption(tmp_path):
    _, active, records = _crashed_active(tmp_path)
    victim = records[5]
    with open(segment_path(tmp_path, active), "r+b") as f:
        f.seek(victim.offset)
        f.write(bytes(RECORD_HEADER_SIZE + len(victim.key) + len(victim.value)))
    with pytest.raises(CorruptionError, match=f"offset {victim.offset}"):
        open_engine(tmp_path, segment_size=1 << 16)


@pytest.mark.parametrize("where", ["crc", "zeroed"])
def test_damage_in_never_fsynced_records_is_a_torn_tail_even_with_intact_records_after(tmp_path, where):
    """Past the SYNCED watermark the writes were never fsynced: a power failure may have put
    later sectors on the disk and lost earlier ones, so the damage is a torn tail (cut from the
    damaged batch on, intact records after it included), not corruption."""
    model, active, records = _crashed_active(tmp_path, synced=False)
    victim = records[10]
    path = segment_path(tmp_path, active)
    if where == "crc":
        flip_byte(path, victim.offset)
    else:
        with open(path, "r+b") as f:
            f.seek(victim.offset)
            f.write(bytes(RECORD_HEADER_SIZE + len(victim.key) + len(victim.value)))
    with open_engine(tmp_path, segment_size=1 << 16) as e:
        assert e.recovery["unsynced_records_dropped"] is True
        assert e.recovery["torn_bytes"] == records[-1].offset + RECORD_HEADER_SIZE + len(records[-1].key) + len(records[-1].value) - victim.offset
        assert_matches(e, {k: v for k, v in model.items() if k < victim.key})


def test_damage_in_the_last_record_of_the_active_segment_is_a_torn_tail(tmp_path):
    model, active, records = _crashed_active(tmp_path)
    last = records[-1]
    flip_byte(segment_path(tmp_path, active), last.offset + RECORD_HEADER_SIZE + len(last.key) + 3)
    with open_engine(tmp_path, segment_size=1 << 16) as e:
        del model[last.key]
        assert_matches(e, model)
        assert e.recovery["torn_bytes"] == RECORD_HEADER_SIZE + len(last.key) + len(last.value)


def test_batch_record_with_a_malformed_id_fails_open(tmp_path):
    e = open_engine(tmp_path, segment_size=1 << 16)
    e.put(b"a", b"1")
    log_writer(e).append(encode_record(PREPARE, b"tx1", b"payload", e.stats()["seq"] + 1))
    e.put(b"b", b"2")
    active = e.log_position()[0]
    crash(e)
    with pytest.raises(CorruptionError, match="3-byte id") as info:
        open_engine(tmp_path, segment_size=1 << 16)
    assert segment_path(tmp_path, active) in str(info.value)


def test_prepare_record_with_a_malformed_value_fails_open(tmp_path):
    e = open_engine(tmp_path, segment_size=1 << 16)
    log_writer(e).append(encode_record(PREPARE, b"12345678", b"\x05\x00\x00\x00garbage", e.stats()["seq"] + 1))
    active = e.log_position()[0]
    crash(e)
    with pytest.raises(CorruptionError, match="PREPARE") as info:
        open_engine(tmp_path, segment_size=1 << 16)
    assert segment_path(tmp_path, active) in str(info.value)


def test_leftover_tmp_files_and_uncommitted_compaction_are_removed(tmp_path):
    with open_engine(tmp_path) as e:
        for i in range(50):
            e.put(b"%02d" % i, b"v" * 100)
        model = dict(e.scan())
    names_before = set(os.listdir(tmp_path))
    for name in ("00000000000000ff.log.tmp", "COMPACTION.tmp", "x.hint.tmp"):
        with open(tmp_path / name, "wb") as f:
            f.write(b"junk")
    with open(tmp_path / "COMPACTION", "wb") as f:  # fails its checksum: never committed
        f.write(b"SHKVCMP\n" + bytes(20))
    with open_engine(tmp_path) as e:
        assert_matches(e, model)
    assert set(os.listdir(tmp_path)) == names_before


# -- a real crash ------------------------------------------------------------------------------------
CHILD_WRITER = """
import sys
from shardkv.shards import ShardEngine
e = ShardEngine.open(sys.argv[1], durability="process", segment_size=8192)
i = 0
while True:
    e.apply([("put", b"b%06d-%d" % (i, j), b"%d" % i * (i % 40)) for j in range(3)])
    if i % 7 == 0:
        e.delete(b"b%06d-1" % i)
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
    i += 1
"""


def test_sigkill_keeps_every_acknowledged_write(tmp_path):
    """kill -9 a process that is writing: every acknowledged batch is there after reopen, and
    the batches present are a prefix of those written, each one whole."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    try:
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= 400:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait()
    lines = [int(x) for x in rest.split()]
    acknowledged = max([acknowledged] + lines)
    assert acknowledged >= 400

    with open_engine(tmp_path, segment_size=8192) as e:
        present = dict(e.scan())
        assert e.stats()["segments"] > 3
    batches = {}
    for key, value in present.items():
        i = int(key[1:7])
        batches.setdefault(i, {})[key] = value
    last = max(batches)
    assert last >= acknowledged
    assert sorted(batches) == list(range(last + 1)), "the batches present are not a prefix"
    for i, got in batches.items():
        full = {b"b%06d-%d" % (i, j): b"%d" % i * (i % 40) for j in range(3)}
        without = {k: v for k, v in full.items() if k != b"b%06d-1" % i}
        if i % 7:
            assert got == full, i
        elif i < last or i <= acknowledged:  # its delete was acknowledged, or a later batch is there
            assert got == without, i
        else:  # the delete right after the last batch may or may not have landed
            assert got in (full, without), i
