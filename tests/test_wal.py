"""Unit and property tests of shardkv.wal: records, segment headers, the log writer and the reader.

The rules tested are those of docs/FORMAT.md ("Record", "Batches", "Segment file",
"Recovery: torn tails and corruption").
"""

from __future__ import annotations

import itertools
import os
import re
import random
import struct
import threading
import time

import crcmod.predefined
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkv.errors import Closed, CorruptionError
from shardkv.wal import fileio
from shardkv.wal.format import (
    ABORT,
    COMMIT,
    DELETE,
    FORMAT_VERSION,
    KIND_COMPACTED,
    KIND_DECISIONS,
    KIND_LOG,
    MAX_KEY_LEN,
    PREPARE,
    PUT,
    RECORD_FIELDS,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_KINDS,
    SEGMENT_MAGIC,
    segment_name,
)
from shardkv.wal.reader import iter_records, map_file, scan_segment
from shardkv.wal.records import decode_header, encode_batch, encode_record, record_crc_ok
from shardkv.wal.segment import create_segment, decode_segment_header, encode_segment_header, list_segments
from shardkv.wal.writer import DURABILITY_LEVELS, LogWriter, check_durability, cut_tail

pytestmark = pytest.mark.engine

crc = crcmod.predefined.mkCrcFun("crc-32c")  # an implementation independent of the code under test

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW_PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_dirs = itertools.count()


def fresh_dir(tmp_path) -> str:
    """A new empty directory under tmp_path (one per hypothesis example)."""
    path = tmp_path / f"d{next(_dirs)}"
    path.mkdir()
    return str(path)


# -- strategies --------------------------------------------------------------------------------
keys = st.binary(min_size=1, max_size=300)
values = st.binary(max_size=600)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def ops(draw):
    rtype = draw(st.sampled_from([PUT, DELETE]))
    value = draw(values) if rtype == PUT else b""
    return rtype, draw(keys), value, draw(st.sampled_from([0, 1, 2**64 - 1]) | u64)


batches = st.lists(st.lists(ops(), min_size=1, max_size=4), min_size=1, max_size=12)


# -- an independent encoder (the format as the doc states it) ---------------------------------
def reference_record(rtype, key, value, seq, batch_left, expires_at) -> bytes:
    fields = struct.pack("<BBHIIIQQ", rtype, 0, 0, len(key), len(value), batch_left, seq, expires_at)
    header_crc = crc(fields)
    rest = header_crc.to_bytes(4, "little") + fields + key + value
    return crc(rest).to_bytes(4, "little") + rest


def raw_header(rtype=PUT, flags=0, reserved=0, key_len=1, value_len=0, batch_left=0, seq=0, expires_at=0) -> bytes:
    """A 40-byte header with a correct header_crc for arbitrary (possibly invalid) fields."""
    fields = RECORD_FIELDS.pack(rtype, flags, reserved, key_len, value_len, batch_left, seq, expires_at)
    return b"\0\0\0\0" + crc(fields).to_bytes(4, "little") + fields


# -- records -----------------------------------------------------------------------------------
@PROPERTY
@given(
    rtype=st.sampled_from([PUT, DELETE]),
    key=keys,
    value=values,
    seq=u64,
    batch_left=st.integers(0, 2**32 - 1),
    expires_at=u64,
    prefix=st.binary(max_size=50),
)
def test_record_roundtrip(rtype, key, value, seq, batch_left, expires_at, prefix):
    if rtype == DELETE:
        value = b""
    record = encode_record(rtype, key, value, seq, batch_left, expires_at)
    assert record == reference_record(rtype, key, value, seq, batch_left, expires_at)
    assert len(record) == RECORD_HEADER_SIZE + len(key) + len(value)
    buf = prefix + record + b"trailing"
    offset = len(prefix)
    header = decode_header(buf, offset)
    assert header is not None
    assert (header.type, header.key_len, header.value_len, header.batch_left, header.seq, header.expires_at) == (
        rtype,
        len(key),
        len(value),
        batch_left,
        seq,
        expires_at,
    )
    assert header.size == len(record)
    assert header.crc == int.from_bytes(record[:4], "little")
    assert record_crc_ok(buf, offset, header)
    start = offset + RECORD_HEADER_SIZE
    assert buf[start : start + len(key)] == key
    assert buf[start + len(key) : start + len(key) + len(value)] == value


@PROPERTY
@given(key=keys, value=values, seq=u64, position=st.integers(4, RECORD_HEADER_SIZE - 1), mask=st.integers(1, 255))
def test_flipped_header_byte_is_never_trusted(key, value, seq, position, mask):
    record = bytearray(encode_record(PUT, key, value, seq, 0, 0))
    record[position] ^= mask
    assert decode_header(bytes(record), 0) is None


@PROPERTY
@given(key=keys, value=values, seq=u64, position=st.integers(0, 3), mask=st.integers(1, 255))
def test_flipped_crc_byte_fails_the_record_crc(key, value, seq, position, mask):
    record = bytearray(encode_record(PUT, key, value, seq, 0, 0))
    record[position] ^= mask
    header = decode_header(bytes(record), 0)
    assert header is not None  # the crc field is not covered by header_crc ...
    assert not record_crc_ok(bytes(record), 0, header)  # ... but the record does not check out


@PROPERTY
@given(key=keys, value=values, seq=u64, data=st.data(), mask=st.integers(1, 255))
def test_flipped_payload_byte_fails_the_record_crc(key, value, seq, data, mask):
    record = bytearray(encode_record(PUT, key, value, seq, 0, 0))
    position = data.draw(st.integers(RECORD_HEADER_SIZE, len(record) - 1))
    record[position] ^= mask
    header = decode_header(bytes(record), 0)
    assert header is not None and header.size == len(record)
    assert not record_crc_ok(bytes(record), 0, header)


def test_decode_header_short_buffer():
    record = encode_record(PUT, b"k", b"v", 1)
    for length in range(RECORD_HEADER_SIZE):
        assert decode_header(record[:length], 0) is None
    assert decode_header(record, 1) is None
    assert decode_header(record[:RECORD_HEADER_SIZE], 0) is not None  # the header alone decodes


@pytest.mark.parametrize(
    "fields",
    [
        dict(rtype=0),
        dict(rtype=6),
        dict(rtype=255),
        dict(flags=1),
        dict(reserved=1),
        dict(key_len=0),
        dict(key_len=MAX_KEY_LEN + 1),
        dict(value_len=2**31),
        dict(value_len=2**32 - 1),
        dict(rtype=DELETE, value_len=1),
    ],
)
def test_decode_header_rejects_fields_out_of_range(fields):
    assert decode_header(raw_header(**fields), 0) is None


@pytest.mark.parametrize(
    "fields",
    [dict(), dict(rtype=DELETE), dict(key_len=MAX_KEY_LEN), dict(value_len=2**31 - 1), dict(rtype=PREPARE), dict(rtype=ABORT)],
)
def test_decode_header_accepts_fields_in_range(fields):
    assert decode_header(raw_header(**fields), 0) is not None


@PROPERTY
@given(st.lists(ops(), min_size=1, max_size=6), u64)
def test_encode_batch(batch, seq):
    data, offsets = encode_batch(batch, seq)
    expected = [reference_record(t, k, v, seq, len(batch) - 1 - i, e) for i, (t, k, v, e) in enumerate(batch)]
    assert data == b"".join(expected)
    assert offsets == [sum(map(len, expected[:i])) for i in range(len(batch))]
    for i, offset in enumerate(offsets):
        header = decode_header(data, offset)
        assert header.batch_left == len(batch) - 1 - i and header.seq == seq


# -- segment headers ---------------------------------------------------------------------------
@PROPERTY
@given(kind=st.sampled_from(SEGMENT_KINDS), shard=st.integers(0, 2**32 - 1), segment=u64)
def test_segment_header_roundtrip(kind, shard, segment):
    header = encode_segment_header(kind, shard, segment)
    assert len(header) == SEGMENT_HEADER_SIZE == 32
    body = struct.pack("<8sHBBIQI", b"SHKVSEG\n", 1, kind, 0, shard, segment, 0)
    assert header == body + crc(body).to_bytes(4, "little")
    decoded = decode_segment_header(header + b"records...", "some/file.log")
    assert (decoded.kind, decoded.shard, decoded.segment) == (kind, shard, segment)


def _header_with(**changes) -> bytes:
    fields = dict(magic=SEGMENT_MAGIC, version=FORMAT_VERSION, kind=KIND_LOG, r1=0, shard=3, segment=9, r2=0)
    fields.update(changes)
    body = SEGMENT_HEADER.pack(*fields.values())
    return body + crc(body).to_bytes(4, "little")


@pytest.mark.parametrize(
    "header, message",
    [
        (_header_with(magic=b"SHKVHNT\n"), "magic"),
        (_header_with(magic=b"\0" * 8), "magic"),
        (_header_with(version=2), "unsupported format version"),
        (_header_with(version=0), "unsupported format version"),
        (_header_with(kind=0), "kind"),
        (_header_with(kind=4), "kind"),
        (_header_with()[:31], "short"),
        (b"", "short"),
    ],
)
def test_segment_header_rejected(tmp_path, header, message):
    path = str(tmp_path / segment_name(9))
    with pytest.raises(CorruptionError, match=message) as info:
        decode_segment_header(header, path)
    assert path in str(info.value)


@pytest.mark.parametrize("position", range(SEGMENT_HEADER_SIZE))
def test_segment_header_bad_crc(tmp_path, position):
    path = str(tmp_path / segment_name(9))
    header = bytearray(_header_with())
    header[position] ^= 0x10
    with pytest.raises(CorruptionError) as info:
        decode_segment_header(bytes(header), path)
    assert path in str(info.value) and re.search(r"offset \d+", str(info.value))


@pytest.mark.parametrize("active", [True, False])
def test_scan_of_a_file_with_a_bad_header_names_the_file(tmp_path, active):
    path = create_segment(str(tmp_path), 1, KIND_LOG, 0, 4096)
    with open(path, "r+b") as f:
        f.write(b"SHKVSEX\n")
    with pytest.raises(CorruptionError) as info:
        list(iter_records(path, active=active))
    assert path in str(info.value)


def test_create_segment(tmp_path):
    directory = str(tmp_path)
    path = create_segment(directory, 7, KIND_LOG, 5, 8192)
    assert path == os.path.join(directory, segment_name(7))
    assert os.path.getsize(path) == 8192
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path, "rb") as f:
        data = f.read()
    assert data[:SEGMENT_HEADER_SIZE] == encode_segment_header(KIND_LOG, 5, 7)
    assert not any(data[SEGMENT_HEADER_SIZE:])
    assert sorted(os.listdir(directory)) == [segment_name(7)]  # no temporary file left behind
    scan = scan_segment(data, path, True)
    assert (scan.header.kind, scan.header.shard, scan.header.segment) == (KIND_LOG, 5, 7)
    assert scan.end == SEGMENT_HEADER_SIZE and scan.offsets == [] and scan.torn_bytes == 0

    tmp = create_segment(directory, 8, KIND_COMPACTED, 5, final=False)
    assert tmp.endswith(".log.tmp") and os.path.getsize(tmp) == SEGMENT_HEADER_SIZE
    create_segment(directory, 2, KIND_LOG, 5)
    (tmp_path / "notes.txt").write_text("x")
    assert list_segments(directory) == [2, 7]


# -- helpers for log files ---------------------------------------------------------------------
def write_log(directory, batch_list, *, capacity=1 << 16, first_seq=1, **writer_args):
    """Write `batch_list` through a LogWriter; return one dict per batch with where it went."""
    create_segment(directory, 1, KIND_LOG, 0, capacity)
    writer_args.setdefault("durability", "process")
    writer = LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, segment_size=capacity, **writer_args)
    written = []
    try:
        for i, batch in enumerate(batch_list):
            seq = first_seq + i
            data, offsets = encode_batch(batch, seq)
            segment, offset = writer.append(data)
            written.append(dict(ops=batch, seq=seq, segment=segment, start=offset, end=offset + len(data), offsets=offsets))
    finally:
        writer.close()
    return written


def expected_records(written):
    """(segment, offset, type, key, value, seq, expires_at, batch_left) of every record written."""
    result = []
    for batch in written:
        n = len(batch["ops"])
        for i, ((rtype, key, value, expires_at), rel) in enumerate(zip(batch["ops"], batch["offsets"])):
            result.append((batch["segment"], batch["start"] + rel, rtype, key, value, batch["seq"], expires_at, n - 1 - i))
    return result


def read_log(directory):
    """Every record of every segment of `directory`, the newest segment read as the active one."""
    numbers = list_segments(directory)
    records = []
    for number in numbers:
        path = os.path.join(directory, segment_name(number))
        records.extend(tuple(r) for r in iter_records(path, active=number == numbers[-1]))
    return records


def scan_file(path, active):
    buf = map_file(path)
    try:
        return scan_segment(buf, path, active)
    finally:
        buf.close()


# -- the writer --------------------------------------------------------------------------------
BATCHES = [
    [(PUT, b"alpha", b"1" * 10, 0)],
    [(PUT, b"beta", b"two", 5), (DELETE, b"alpha", b"", 0), (PUT, b"gamma", b"", 0)],
    [(PUT, b"k" * 300, bytes(range(256)) * 3, 2**64 - 1)],
    [(DELETE, b"beta", b"", 0), (PUT, b"delta", b"x" * 100 + b"\0" * 20, 0)],
]


@pytest.mark.parametrize("durability", DURABILITY_LEVELS)
def test_write_and_read_back(tmp_path, durability):
    directory = str(tmp_path)
    written = write_log(directory, BATCHES, durability=durability, sync_interval=0.01)
    assert read_log(directory) == expected_records(written)
    path = os.path.join(directory, segment_name(1))
    assert os.path.getsize(path) == 1 << 16  # the active segment keeps its capacity
    scan = scan_file(path, True)
    assert scan.end == written[-1]["end"] and scan.torn_bytes == 0
    assert scan.offsets == [r[1] for r in expected_records(written)]
    assert scan.keys == [r[3] for r in expected_records(written)]
    assert scan.seqs == [r[5] for r in expected_records(written)]
    assert scan.types == [r[2] for r in expected_records(written)]
    assert scan.value_lens == [len(r[4]) for r in expected_records(written)]
    assert scan.expires == [r[6] for r in expected_records(written)]
    # the active segment, read as sealed, is corrupt: zeros follow the records
    with pytest.raises(CorruptionError, match=re.escape(f"offset {written[-1]['end']}")):
        scan_file(path, False)


def test_data_is_readable_before_close(tmp_path):
    """durability "process": an append has reached the OS when it returns (survives a killed process)."""
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    writer = LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, durability="process", segment_size=4096)
    try:
        data, _ = encode_batch([(PUT, b"a", b"b", 0), (PUT, b"c", b"d", 0)], 42)
        assert writer.append(data) == (1, SEGMENT_HEADER_SIZE)
        assert writer.position == (1, SEGMENT_HEADER_SIZE + len(data))
        records = list(iter_records(os.path.join(directory, segment_name(1)), active=True))
        assert [(r.key, r.value, r.seq, r.batch_left) for r in records] == [(b"a", b"b", 42, 1), (b"c", b"d", 42, 0)]
    finally:
        writer.close()


def test_unknown_durability(tmp_path):
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    with pytest.raises(ValueError, match="durability"):
        LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, durability="sometimes")
    with pytest.raises(ValueError):
        check_durability("FSYNC")
    for level in ("process", "interval", "fsync"):
        assert check_durability(level) == level


def test_append_after_close(tmp_path):
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    writer = LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, durability="fsync")
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(Closed):
        writer.append(encode_record(PUT, b"k", b"v", 1))


def test_interval_durability_syncs_in_the_background(tmp_path, monkeypatch):
    calls = []
    real_sync = fileio.sync_data
    monkeypatch.setattr(fileio, "sync_data", lambda fd: (calls.append(fd), real_sync(fd)))
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    writer = LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, durability="interval", sync_interval=0.01)
    try:
        writer.append(encode_record(PUT, b"k", b"v", 1))
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls, "the interval syncer never fsynced"
    finally:
        writer.close()


def test_the_first_sync_after_open_fsyncs_what_was_found(tmp_path, monkeypatch):
    """What a writer finds in its segment at open may be in the page cache only (the process
    before it may have died after a failed fsync): its first sync fsyncs it, rather than take
    it as durable."""
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    before = LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, durability="process", segment_size=4096)
    before.append(encode_record(PUT, b"k", b"v", 1))  # never fsynced: that process "died"
    calls = []
    real_sync = fileio.sync_data
    monkeypatch.setattr(fileio, "sync_data", lambda fd: (calls.append(fd), real_sync(fd)))
    after = LogWriter(directory, 0, 1, before.position[1], durability="process", segment_size=4096)
    try:
        after.sync()
        assert len(calls) == 1
        after.sync()  # nothing new since: no second fsync
        assert len(calls) == 1
    finally:
        after.close()
        before.close()


def test_fsync_durability_group_commit_single_thread(tmp_path, monkeypatch):
    calls = []
    real_sync = fileio.sync_data
    monkeypatch.setattr(fileio, "sync_data", lambda fd: (calls.append(fd), real_sync(fd)))
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    writer = LogWriter(directory, 0, 1, SEGMENT_HEADER_SIZE, durability="fsync", segment_size=4096)
    try:
        first = encode_record(PUT, b"a", b"1", 1)
        second = encode_record(PUT, b"b", b"2", 2)
        seg1, off1 = writer.append(first)
        seg2, off2 = writer.append(second)
        writer.sync_upto(seg2, off2 + len(second))
        assert len(calls) == 1
        writer.sync_upto(seg1, off1 + len(first))  # covered by the sync above: no second fsync
        writer.sync_upto(seg2, off2 + len(second))
        assert len(calls) == 1
    finally:
        writer.close()


def test_group_commit_threads(tmp_path, monkeypatch):
    calls = []
    real_sync = fileio.sync_data
    monkeypatch.setattr(fileio, "sync_data", lambda fd: (calls.append(fd), real_sync(fd)))
    directory = str(tmp_path)
    create_segment(directory, 1, KIND_LOG, 0, 4096)
    seals = []
    writer = LogWriter(
        directory, 0, 1, SEGMENT_HEADER_SIZE, durability="fsync", segment_size=4096, on_seal=lambda s, e: seals.append((s, e))
    )
    threads_n, per_thread = 8, 40
    barrier = threading.Barrier(threads_n)
    results: dict[bytes, tuple] = {}
    errors = []

    def work(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                key = f"t{t}-{i}".encode()
                value = bytes([t]) * (50 + i)
                data, _ = encode_batch([(PUT, key, value, 0), (DELETE, key + b"-old", b"", 0)], t * 1000 + i)
                segment, offset = writer.append(data)
                writer.sync_upto(segment, offset + len(data))
                results[key] = (segment, offset, value, t * 1000 + i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert not errors, errors
    assert len(results) == threads_n * per_thread
    assert 1 <= len(calls) <= threads_n * per_thread
    assert seals and [s for s, _ in seals] == list_segments(directory)[:-1]

    records = read_log(directory)
    assert len(records) == 2 * threads_n * per_thread
    by_key = {r[3]: r for r in records}
    for key, (segment, offset, value, seq) in results.items():
        record = by_key[key]
        assert (record[0], record[1], record[2], record[4], record[5], record[7]) == (segment, offset, PUT, value, seq, 1)
        assert by_key[key + b"-old"][5] == seq
    for name in os.listdir(directory):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600, name


def test_roll_over(tmp_path):
    directory = str(tmp_path)
    seals = []
    rng = random.Random(7)
    batch_list = [
        [(PUT, f"key{i}-{j}".encode(), rng.randbytes(rng.randrange(0, 700)), 0) for j in range(rng.randrange(1, 4))]
        for i in range(60)
    ]
    written = write_log(directory, batch_list, capacity=4096, on_seal=lambda s, e: seals.append((s, e)))
    numbers = list_segments(directory)
    assert len(numbers) > 3 and numbers == list(range(1, len(numbers) + 1))
    assert seals == [(n, os.path.getsize(os.path.join(directory, segment_name(n)))) for n in numbers[:-1]]
    assert os.path.getsize(os.path.join(directory, segment_name(numbers[-1]))) == 4096
    for number, end in seals:
        last = [b for b in written if b["segment"] == number][-1]
        assert end == last["end"]  # sealed = truncated to the end of its last record
        assert scan_file(os.path.join(directory, segment_name(number)), False).end == end
    for before, after in zip(written, written[1:]):
        if after["segment"] != before["segment"]:
            assert after["segment"] == before["segment"] + 1
            assert after["start"] == SEGMENT_HEADER_SIZE
            assert before["end"] + (after["end"] - after["start"]) > 4096  # rolled only when needed
        else:
            assert after["start"] == before["end"]
    assert read_log(directory) == expected_records(written)
    for name in os.listdir(directory):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600, name
        assert not name.endswith(".tmp")


def test_batch_filling_the_segment_exactly(tmp_path):
    directory = str(tmp_path)
    key = b"k"
    value = b"v" * (4096 - SEGMENT_HEADER_SIZE - RECORD_HEADER_SIZE - len(key))
    seals = []
    written = write_log(directory, [[(PUT, key, value, 0)], [(PUT, b"x", b"y", 0)]], capacity=4096, on_seal=lambda s, e: seals.append((s, e)))
    assert [(b["segment"], b["start"]) for b in written] == [(1, SEGMENT_HEADER_SIZE), (2, SEGMENT_HEADER_SIZE)]
    assert seals == [(1, 4096)]
    assert read_log(directory) == expected_records(written)


def test_record_bigger_than_segment_size(tmp_path):
    directory = str(tmp_path)
    seals = []
    big = [(PUT, b"big", bytes(range(256)) * 40, 0)]  # 10 KiB value, segment_size 4 KiB
    written = write_log(
        directory,
        [[(PUT, b"a", b"1", 0)], big, [(PUT, b"b", b"2", 0)], [(PUT, b"c", b"3", 0)]],
        capacity=4096,
        on_seal=lambda s, e: seals.append((s, e)),
    )
    assert [b["segment"] for b in written] == [1, 2, 3, 3]
    big_size = SEGMENT_HEADER_SIZE + written[1]["end"] - written[1]["start"]
    assert written[1]["start"] == SEGMENT_HEADER_SIZE
    assert seals == [(1, written[0]["end"]), (2, big_size)]
    assert os.path.getsize(os.path.join(directory, segment_name(2))) == big_size
    assert os.path.getsize(os.path.join(directory, segment_name(3))) == 4096
    assert read_log(directory) == expected_records(written)


@SLOW_PROPERTY
@given(batch_list=batches, segment_size=st.sampled_from([512, 1024, 4096]), durability=st.sampled_from(DURABILITY_LEVELS))
def test_writer_property(tmp_path, batch_list, segment_size, durability):
    directory = fresh_dir(tmp_path)
    seals = []
    written = write_log(
        directory, batch_list, capacity=segment_size, durability=durability, on_seal=lambda s, e: seals.append((s, e))
    )
    assert read_log(directory) == expected_records(written)
    numbers = list_segments(directory)
    assert [s for s, _ in seals] == numbers[:-1]
    for number, end in seals:
        assert os.path.getsize(os.path.join(directory, segment_name(number))) == end
    for batch in written:  # no segment holds more than its capacity
        assert batch["end"] <= max(segment_size, SEGMENT_HEADER_SIZE + batch["end"] - batch["start"])


# -- torn tails --------------------------------------------------------------------------------
TORN_BATCHES = [
    [(PUT, b"a", b"first", 0)],
    [(PUT, b"b", b"B" * 30, 0), (DELETE, b"a", b"", 0), (PUT, b"c", b"C" * 7, 99)],
    [(PUT, b"d" * 20, b"D" * 40 + b"\0" * 12, 0), (PUT, b"e", b"E", 0)],  # a value ending in zeros
    [(DELETE, b"b", b"", 0)],
    [(PUT, b"f", b"F" * 25, 0), (PUT, b"g", b"\0" * 16, 0), (PUT, b"h", b"H" * 9, 7)],
]
TORN_CAPACITY = 8192


def _message_offset(error: CorruptionError) -> int:
    return int(re.search(r"at offset (\d+)", str(error)).group(1))


def first_damaged_record(pristine: bytes, damaged: bytes, written, data_end: int) -> int:
    """Offset of the first record that is not intact in `damaged` (data_end if all are)."""
    for batch in written:
        bounds = batch["offsets"][1:] + [batch["end"] - batch["start"]]
        for rel, rel_end in zip(batch["offsets"], bounds):
            start, end = batch["start"] + rel, batch["start"] + rel_end
            if end > len(damaged) or damaged[start:end] != pristine[start:end]:
                return start
    return data_end


def check_damage(path, pristine: bytes, damaged: bytes, written, k: int, mode: str) -> list[str]:
    """Scan `damaged` (the pristine file cut at k) as active and as sealed; return what is wrong."""
    problems = []
    with open(path, "wb") as f:
        f.write(damaged)
    data_end = written[-1]["end"]
    # A batch survives if its bytes are all still there, unchanged.
    survivors = []
    for batch in written:
        if batch["end"] <= len(damaged) and damaged[batch["start"] : batch["end"]] == pristine[batch["start"] : batch["end"]]:
            survivors.append(batch)
        else:
            break
    good_end = survivors[-1]["end"] if survivors else SEGMENT_HEADER_SIZE
    want = expected_records(survivors)

    # active: a torn tail, cut back to the last whole batch
    try:
        got = [tuple(r) for r in iter_records(path, active=True)]
        scan = scan_file(path, True)
    except CorruptionError as exc:
        return [f"{mode} at {k}: active scan raised {exc}"]
    if got != want:
        problems.append(f"{mode} at {k}: active read {len(got)} records, expected {len(want)}")
    if scan.end != good_end:
        problems.append(f"{mode} at {k}: active scan.end = {scan.end}, expected {good_end} (end of the last whole batch)")
    leftover = damaged[good_end:data_end]
    if any(leftover):
        if not 0 < scan.torn_bytes <= data_end - good_end:
            problems.append(f"{mode} at {k}: torn_bytes = {scan.torn_bytes}, expected 1..{data_end - good_end}")
    elif scan.torn_bytes != 0:
        problems.append(f"{mode} at {k}: torn_bytes = {scan.torn_bytes} with nothing torn")

    # sealed: the same damage is corruption, unless the file simply ends after a whole batch
    clean_end = len(damaged) == good_end
    try:
        sealed = [tuple(r) for r in iter_records(path, active=False)]
    except CorruptionError as exc:
        if clean_end:
            problems.append(f"{mode} at {k}: sealed scan raised on a clean end: {exc}")
        elif path not in str(exc):
            problems.append(f"{mode} at {k}: the error does not name the file: {exc}")
        else:
            expected_offset = first_damaged_record(pristine, damaged, written, data_end)
            if _message_offset(exc) != expected_offset:
                problems.append(f"{mode} at {k}: sealed error at offset {_message_offset(exc)}, expected {expected_offset}: {exc}")
    else:
        if not clean_end:
            problems.append(f"{mode} at {k}: sealed scan accepted a damaged file")
        elif sealed != want:
            problems.append(f"{mode} at {k}: sealed read {len(sealed)} records, expected {len(want)}")
    return problems


def _damage_everywhere(tmp_path, batch_list, last_batches):
    directory = str(tmp_path)
    written = write_log(directory, batch_list, capacity=TORN_CAPACITY)
    path = os.path.join(directory, segment_name(1))
    with open(path, "rb") as f:
        pristine = f.read()
    assert len(pristine) == TORN_CAPACITY
    data_end = written[-1]["end"]
    problems = []
    for k in range(written[-last_batches]["start"], data_end + 1):
        zeroed = pristine[:k] + bytes(data_end - k) + pristine[data_end:]  # a partial write: zeros from k on
        problems += check_damage(path, pristine, zeroed, written, k, "zeroed")
        problems += check_damage(path, pristine, pristine[:k], written, k, "truncated")
    return problems


def test_torn_tail_at_every_offset(tmp_path):
    problems = _damage_everywhere(tmp_path, TORN_BATCHES, 3)
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:12])


@SLOW_PROPERTY
@given(batch_list=st.lists(st.lists(ops(), min_size=1, max_size=3), min_size=1, max_size=6), data=st.data())
def test_torn_tail_property(tmp_path, batch_list, data):
    directory = fresh_dir(tmp_path)
    written = write_log(directory, batch_list, capacity=TORN_CAPACITY)
    path = os.path.join(directory, segment_name(1))
    with open(path, "rb") as f:
        pristine = f.read()
    data_end = written[-1]["end"]
    k = data.draw(st.integers(SEGMENT_HEADER_SIZE, data_end), label="k")
    zeroed = pristine[:k] + bytes(data_end - k) + pristine[data_end:]
    problems = check_damage(path, pristine, zeroed, written, k, "zeroed")
    problems += check_damage(path, pristine, pristine[:k], written, k, "truncated")
    assert not problems, problems


def test_torn_first_record_after_a_whole_batch_keeps_that_batch(tmp_path):
    """A torn write of a new batch must not cost the whole batch before it.

    Three 2-record batches are written; the third is torn 5 bytes into its first record. The
    reader must keep batches 1 and 2 and report the end of batch 2 as the good end; repairing
    the file there (cut_tail) must keep both batches.
    """
    directory = str(tmp_path)
    batch_list = [[(PUT, b"k%d" % i, b"v" * 10, 0), (PUT, b"x", b"y", 0)] for i in range(3)]
    written = write_log(directory, batch_list, capacity=4096)
    path = os.path.join(directory, segment_name(1))
    assert [(b["start"], b["end"]) for b in written] == [(32, 126), (126, 220), (220, 314)]
    with open(path, "r+b") as f:  # the third batch got only its first 5 bytes to disk
        f.seek(225)
        f.write(bytes(314 - 225))
    scan = scan_file(path, True)
    assert scan.offsets == [32, 84, 126, 178]
    assert scan.torn_bytes == 5, scan.torn_bytes
    assert scan.end == 220, scan.end
    cut_tail(path, scan.end, 4096)
    assert [r.seq for r in iter_records(path, active=True)] == [1, 1, 2, 2]


# -- corruption in the middle ------------------------------------------------------------------
MIDDLE_BATCHES = [
    [(PUT, b"one", b"1" * 20, 0)],
    [(PUT, b"two", b"2" * 5, 0), (DELETE, b"one", b"", 0), (PUT, b"three", b"3", 3)],
    [(PUT, b"four", b"4" * 30, 0)],
    [(PUT, b"five", b"5", 0), (PUT, b"six", b"6" * 6, 0)],
]


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_corruption_in_the_middle_is_not_a_torn_tail(tmp_path, mask):
    directory = str(tmp_path)
    written = write_log(directory, MIDDLE_BATCHES, capacity=TORN_CAPACITY)
    path = os.path.join(directory, segment_name(1))
    with open(path, "rb") as f:
        pristine = f.read()
    records = expected_records(written)
    last_start = records[-1][1]
    problems = []
    for record, following in zip(records, records[1:]):
        start, end = record[1], following[1]
        for position in range(start, end):
            damaged = bytearray(pristine)
            damaged[position] ^= mask
            with open(path, "wb") as f:
                f.write(damaged)
            for active in (True, False):
                try:
                    scan_file(path, active)
                except CorruptionError as exc:
                    if path not in str(exc) or _message_offset(exc) != start:
                        problems.append(f"flip at {position}, active={active}: {exc} (record starts at {start})")
                else:
                    problems.append(f"flip at {position} (record at {start}, last record at {last_start}), active={active}: no error")
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:12])


def test_flipped_byte_in_a_sealed_segment(tmp_path):
    directory = str(tmp_path)
    written = write_log(directory, MIDDLE_BATCHES, capacity=TORN_CAPACITY)
    path = os.path.join(directory, segment_name(1))
    with open(path, "r+b") as f:
        f.truncate(written[-1]["end"])  # as sealed
    assert [tuple(r) for r in iter_records(path)] == expected_records(written)
    last = expected_records(written)[-1][1]
    with open(path, "r+b") as f:
        f.seek(written[-1]["end"] - 1)
        f.write(b"\0")  # the last byte of the last record
    with pytest.raises(CorruptionError) as info:
        list(iter_records(path))
    assert path in str(info.value) and _message_offset(info.value) == last


# -- batch numbering ---------------------------------------------------------------------------
def _log_with_tail(tmp_path, tail: bytes, capacity=TORN_CAPACITY):
    """An active segment holding one whole batch, followed by raw `tail` bytes."""
    directory = str(tmp_path)
    written = write_log(directory, [[(PUT, b"whole", b"batch", 0), (PUT, b"w2", b"", 0)]], capacity=capacity, first_seq=10)
    path = os.path.join(directory, segment_name(1))
    with open(path, "r+b") as f:
        f.seek(written[-1]["end"])
        f.write(tail)
    return path, written


@pytest.mark.parametrize("truncate", [False, True])
def test_batch_missing_its_last_record_is_dropped_whole(tmp_path, truncate):
    data, offsets = encode_batch([(PUT, b"p", b"1", 0), (PUT, b"q", b"2", 0), (PUT, b"r", b"3", 0)], 11)
    partial = data[: offsets[2]]  # records with batch_left 2 and 1; batch_left 0 is missing
    path, written = _log_with_tail(tmp_path, partial)
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(written[-1]["end"] + len(partial))
    assert [r.key for r in iter_records(path, active=True)] == [b"whole", b"w2"]
    scan = scan_file(path, True)
    assert scan.end == written[-1]["end"]
    assert scan.torn_bytes == len(partial)
    assert scan.keys == [b"whole", b"w2"]
    with pytest.raises(CorruptionError) as info:
        scan_file(path, False)
    assert path in str(info.value) and _message_offset(info.value) == written[-1]["end"] + len(partial)


def test_broken_batch_numbering_followed_by_data_is_corruption(tmp_path):
    first, _ = encode_batch([(PUT, b"p", b"1", 0), (PUT, b"q", b"2", 0), (PUT, b"r", b"3", 0)], 11)
    rec_p = first[: RECORD_HEADER_SIZE + 2]
    rec_q = encode_record(PUT, b"q", b"2", 11, 1)
    rec_s = encode_record(PUT, b"s", b"4", 12, 0)  # a new batch where batch_left 0 of seq 11 belongs
    path, written = _log_with_tail(tmp_path, rec_p + rec_q + rec_s + encode_record(PUT, b"t", b"5", 13, 0))
    for active in (True, False):
        with pytest.raises(CorruptionError, match="batch") as info:
            scan_file(path, active)
        assert path in str(info.value)
        assert _message_offset(info.value) == written[-1]["end"] + len(rec_p) + len(rec_q)


def test_batch_with_a_foreign_seq_is_corruption(tmp_path):
    tail = encode_record(PUT, b"p", b"1", 11, 1) + encode_record(PUT, b"q", b"2", 12, 0) + encode_record(PUT, b"z", b"", 13)
    path, written = _log_with_tail(tmp_path, tail)
    with pytest.raises(CorruptionError, match="batch") as info:
        scan_file(path, True)
    assert _message_offset(info.value) == written[-1]["end"] + RECORD_HEADER_SIZE + 2


@pytest.mark.parametrize("rtype", [PREPARE, COMMIT, ABORT])
def test_transaction_records_are_read_in_a_shard_log(tmp_path, rtype):
    path, written = _log_with_tail(tmp_path, encode_record(rtype, b"12345678", b"" if rtype != PREPARE else b"payload", 11))
    scan = scan_file(path, True)
    assert scan.types[-1] == rtype and scan.offsets[-1] == written[-1]["end"]


@pytest.mark.parametrize("kind, rtype", [(KIND_DECISIONS, PUT), (KIND_DECISIONS, PREPARE), (KIND_COMPACTED, PREPARE), (KIND_COMPACTED, COMMIT)])
def test_record_types_a_segment_kind_does_not_hold_are_corruption(tmp_path, kind, rtype):
    directory = str(tmp_path)
    path = create_segment(directory, 1, kind, 0)
    with open(path, "ab") as f:
        f.write(encode_record(rtype, b"12345678", b"", 1))
    with pytest.raises(CorruptionError, match="not allowed") as info:
        list(iter_records(path))
    assert path in str(info.value) and "offset 32" in str(info.value)


def test_commit_records_are_allowed_in_a_decisions_segment(tmp_path):
    directory = str(tmp_path)
    path = create_segment(directory, 1, KIND_DECISIONS, 0)
    with open(path, "ab") as f:
        f.write(encode_record(COMMIT, b"tx000001", b"\x00\x00", 1) + encode_record(COMMIT, b"tx000002", b"", 2))
    assert [(r.type, r.seq) for r in iter_records(path)] == [(COMMIT, 1), (COMMIT, 2)]


def test_scan_from_a_batch_boundary(tmp_path):
    """`start` (the end of what a hint covers) skips the records before it."""
    directory = str(tmp_path)
    written = write_log(directory, BATCHES, capacity=TORN_CAPACITY)
    path = os.path.join(directory, segment_name(1))
    buf = map_file(path)
    try:
        for i, batch in enumerate(written):
            scan = scan_segment(buf, path, True, start=batch["start"])
            assert scan.offsets == [r[1] for r in expected_records(written[i:])]
            assert scan.end == written[-1]["end"] and scan.torn_bytes == 0
        scan = scan_segment(buf, path, True, start=written[-1]["end"])
        assert scan.offsets == [] and scan.end == written[-1]["end"]
    finally:
        buf.close()
