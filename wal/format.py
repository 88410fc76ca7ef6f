"""Constants and struct layouts of the on-disk format (specified in docs/FORMAT.md).

This module is the only place that spells out byte layouts; a test parses docs/FORMAT.md and
checks every table against the structs below.
"""

import struct

FORMAT_VERSION = 1

# Segment file header.
SEGMENT_MAGIC = b"SHKVSEG\n"
SEGMENT_HEADER = struct.Struct("<8sHBBIQI")  # magic, version, kind, reserved, shard, segment, reserved
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4  # + header_crc
KIND_LOG = 1
KIND_COMPACTED = 2
KIND_DECISIONS = 3
SEGMENT_KINDS = (KIND_LOG, KIND_COMPACTED, KIND_DECISIONS)

# Record header: crc, header_crc, then the 32 bytes covered by header_crc.
RECORD_CRCS = struct.Struct("<II")
RECORD_FIELDS = struct.Struct("<BBHIIIQQ")  # type, flags, reserved, key_len, value_len, batch_left, seq, expires_at
RECORD_HEADER = struct.Struct("<IIBBHIIIQQ")
RECORD_HEADER_NAMES = ("crc", "header_crc", "type", "flags", "reserved", "key_len", "value_len", "batch_left", "seq", "expires_at")
RECORD_HEADER_SIZE = RECORD_HEADER.size
# A record's crc covers its bytes from here (header_crc on) to its end.
RECORD_CRC_FROM = RECORD_CRCS.size // 2
# What a reader checks before trusting a record, in one unpack from its start: crc, type and
# expires_at (fields 0, 2 and 9 of RECORD_HEADER; tests/test_probe.py checks they agree).
RECORD_CHECKED = struct.Struct("<I4xB23xQ")

PUT = 1
DELETE = 2
PREPARE = 3
COMMIT = 4
ABORT = 5
RECORD_TYPES = (PUT, DELETE, PREPARE, COMMIT, ABORT)
DATA_RECORD_TYPES = (PUT, DELETE)
# The record types each kind of segment may hold (anything else is corruption).
KIND_RECORD_TYPES = {KIND_LOG: RECORD_TYPES, KIND_COMPACTED: DATA_RECORD_TYPES, KIND_DECISIONS: (COMMIT,)}

MAX_KEY_LEN = 65536
MAX_VALUE_LEN_FORMAT = 2**31 - 1

# PREPARE record value: u32 count, then entries (header, key, value).
PREPARE_COUNT = struct.Struct("<I")
PREPARE_ENTRY = struct.Struct("<BIIQ")  # type, key_len, value_len, expires_at
PREPARE_EXPECT = 3
PREPARE_EXPECT_ABSENT = 4

# SYNCED file: two slots of a watermark (where the fsynced data of the log ends), written in turn.
SYNCED_MAGIC = b"SHKVSYN\n"
SYNCED_SLOT = struct.Struct("<8sHHIQQ")  # magic, version, reserved, counter, segment, end
SYNCED_CRC = struct.Struct("<I")
SYNCED_SLOT_STRIDE = 64
SYNCED_FILE = "SYNCED"

# Hint file.
HINT_MAGIC = b"SHKVHNT\n"
HINT_HEADER = struct.Struct("<8sHHIQQQ")  # magic, version, reserved, shard, segment, segment_length, count
HINT_ENTRY = struct.Struct("<IB3xIIQQ")  # offset, type, reserved, key_len, value_len, seq, expires_at
HINT_CRC = struct.Struct("<I")

# Ordered view file: header, u32 ranks, u64 prefixes, crc.
SORTED_MAGIC = b"SHKVSRT\n"
SORTED_HEADER = struct.Struct("<8sHHIQQII")  # magic, version, reserved, shard, count, max_seq, live_crc, reserved
SORTED_FILE = "SORTED"

# Compaction commit record.
COMPACTION_MAGIC = b"SHKVCMP\n"
COMPACTION_HEADER = struct.Struct("<8sHHIII")  # magic, version, reserved, n_inputs, n_outputs, reserved
COMPACTION_NUMBER = struct.Struct("<Q")

# File names.
SEGMENT_SUFFIX = ".log"
HINT_SUFFIX = ".hint"
TMP_SUFFIX = ".tmp"
COMPACTION_FILE = "COMPACTION"


def segment_name(number: int) -> str:
    """Return the file name of segment `number` (16 hex digits + .log)."""
    return f"{number:016x}{SEGMENT_SUFFIX}"


def hint_name(number: int) -> str:
    """Return the file name of the hint file of segment `number`."""
    return f"{number:016x}{HINT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """Return the segment number a file name denotes, or None if it is not a segment's name."""
    stem, dot, suffix = name.partition(".")
    if "." + suffix != SEGMENT_SUFFIX or len(stem) != 16:
        return None
    try:
        return int(stem, 16)
    except ValueError:
        return None
