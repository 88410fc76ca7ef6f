"""Encoding of records and batches (layout in docs/FORMAT.md, "Record" and "Batches")."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from crc32c import crc32c

from shardkv.wal.format import (
    DELETE,
    MAX_KEY_LEN,
    MAX_VALUE_LEN_FORMAT,
    PUT,
    RECORD_FIELDS,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_TYPES,
)

_pack_fields = RECORD_FIELDS.pack
_unpack_header = RECORD_HEADER.unpack_from


class RecordHeader(NamedTuple):
    """A decoded record header whose header_crc has been checked."""

    crc: int
    type: int
    key_len: int
    value_len: int
    batch_left: int
    seq: int
    expires_at: int

    @property
    def size(self) -> int:
        """Total size of the record: header, key and value."""
        return RECORD_HEADER_SIZE + self.key_len + self.value_len


def encode_record(rtype: int, key: bytes, value: bytes, seq: int, batch_left: int = 0, expires_at: int = 0) -> bytes:
    """Return the bytes of one record. The caller has validated key and value."""
    fields = _pack_fields(rtype, 0, 0, len(key), len(value), batch_left, seq, expires_at)
    body = b"".join((crc32c(fields).to_bytes(4, "little"), fields, key, value))
    return crc32c(body).to_bytes(4, "little") + body


def encode_batch(ops: Sequence[tuple[int, bytes, bytes, int]], seq: int) -> tuple[bytes, list[int]]:
    """Encode (type, key, value, expires_at) tuples as one batch sharing `seq`.

    Returns the bytes and the offset of each record relative to the start of the batch.
    """
    parts = []
    offsets = []
    position = 0
    left = len(ops)
    for rtype, key, value, expires_at in ops:
        left -= 1
        fields = _pack_fields(rtype, 0, 0, len(key), len(value), left, seq, expires_at)
        body = b"".join((crc32c(fields).to_bytes(4, "little"), fields, key, value))
        parts.append(crc32c(body).to_bytes(4, "little"))
        parts.append(body)
        offsets.append(position)
        position += 4 + len(body)
    return b"".join(parts), offsets


def decode_header(buf, offset: int) -> RecordHeader | None:
    """Decode the record header at `offset` of `buf`.

    Returns None when the header is short, its header_crc fails, or a field is out of range:
    such a header is never trusted for its lengths.
    """
    if len(buf) - offset < RECORD_HEADER_SIZE:
        return None
    crc, header_crc, rtype, flags, reserved, key_len, value_len, batch_left, seq, expires_at = _unpack_header(buf, offset)
    if crc32c(buf[offset + 8 : offset + RECORD_HEADER_SIZE]) != header_crc:
        return None
    if rtype not in RECORD_TYPES or flags or reserved:
        return None
    if not 1 <= key_len <= MAX_KEY_LEN or value_len > MAX_VALUE_LEN_FORMAT:
        return None
    if rtype == DELETE and value_len:
        return None
    return RecordHeader(crc, rtype, key_len, value_len, batch_left, seq, expires_at)


def record_crc_ok(buf, offset: int, header: RecordHeader) -> bool:
    """Check the whole-record crc of the record at `offset` whose header is already decoded."""
    return crc32c(buf[offset + 4 : offset + header.size]) == header.crc


__all__ = ["PUT", "DELETE", "RecordHeader", "encode_record", "encode_batch", "decode_header", "record_crc_ok"]
