"""shardkv.wal: the append-only, CRC-32C checked log of a shard (format: docs/FORMAT.md)."""

from shardkv.wal.reader import Record, iter_records, scan_segment
from shardkv.wal.records import encode_batch, encode_record
from shardkv.wal.writer import DURABILITY_LEVELS, LogWriter

__all__ = ["DURABILITY_LEVELS", "LogWriter", "Record", "encode_batch", "encode_record", "iter_records", "scan_segment"]
