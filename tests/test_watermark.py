"""The SYNCED watermark (wal/watermark.py, docs/FORMAT.md "SYNCED file")."""

from __future__ import annotations

import os

import pytest

from shardkv.shards.recovery import synced_end
from shardkv.wal.format import SEGMENT_HEADER_SIZE, SYNCED_FILE, SYNCED_SLOT_STRIDE
from shardkv.wal.watermark import Watermark, read_watermark

from engine_support import crash, open_engine

pytestmark = pytest.mark.engine


def test_missing_file_means_no_watermark(tmp_path):
    assert read_watermark(str(tmp_path)) is None
    assert synced_end(str(tmp_path), 3) is None


def test_the_newest_valid_slot_wins_and_a_spoiled_one_falls_back(tmp_path):
    w = Watermark(str(tmp_path))
    w.publish(2, 100)
    w.publish(2, 500)
    assert read_watermark(str(tmp_path)) == (2, 500)
    path = os.path.join(tmp_path, SYNCED_FILE)
    with open(path, "r+b") as f:  # spoil the slot written last (a torn write of it)
        f.seek((w.counter % 2) * SYNCED_SLOT_STRIDE + 20)
        f.write(b"\xff")
    assert read_watermark(str(tmp_path)) == (2, 100)
    with open(path, "r+b") as f:
        f.write(b"\x00" * 2 * SYNCED_SLOT_STRIDE)
    assert read_watermark(str(tmp_path)) is None
    w.close()


def test_a_reopened_watermark_goes_on_numbering(tmp_path):
    w = Watermark(str(tmp_path))
    for end in (100, 200, 300):
        w.publish(1, end)
    w.close()
    again = Watermark(str(tmp_path))
    again.publish(1, 50)  # later, even if smaller (a new active segment would say so)
    assert read_watermark(str(tmp_path)) == (1, 50)
    again.close()


def test_watermark_for_the_active_segment(tmp_path):
    w = Watermark(str(tmp_path))
    w.publish(4, 900)
    assert synced_end(str(tmp_path), 4) == 900
    assert synced_end(str(tmp_path), 5) == SEGMENT_HEADER_SIZE  # nothing of a newer segment is vouched for
    assert synced_end(str(tmp_path), 3) is None  # names a newer segment than the active one: ignored
    w.close()


def test_the_engine_publishes_on_open_on_fsync_and_on_close(tmp_path):
    e = open_engine(tmp_path, durability="fsync")
    opened = read_watermark(str(tmp_path))
    assert opened == e.log_position()
    e.put(b"a", b"1")
    assert read_watermark(str(tmp_path)) in (opened, e.log_position())  # at most once a second
    e.close()
    with open_engine(tmp_path, durability="process") as e:
        assert read_watermark(str(tmp_path)) == e.log_position()
        for i in range(200):  # roll a few segments at durability "process" (no fsync per write)
            e.put(b"k%03d" % i, b"v" * 50)
        segment, _ = read_watermark(str(tmp_path))
        assert segment < e.log_position()[0] or read_watermark(str(tmp_path)) <= e.log_position()
        crash(e)
    assert read_watermark(str(tmp_path)) is not None
