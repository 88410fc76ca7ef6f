"""Encoding of records and batches (layout in docs/FORMAT.md, "Record" and "Batches")."""

from __future__ import annotations

import struct
from operator import add
from typing import NamedTuple, Sequence

import numpy as np
from crc32c import crc32c

from shardkv.wal.format import (
    DELETE,
    MAX_KEY_LEN,
    MAX_VALUE_LEN_FORMAT,
    PUT,
    RECORD_CRC_FROM,
    RECORD_CRCS,
    RECORD_FIELDS,
    RECORD_HEADER,
    RECORD_HEADER_NAMES,
    RECORD_HEADER_SIZE,
    RECORD_TYPES,
)

_pack_fields = RECORD_FIELDS.pack
_unpack_header = RECORD_HEADER.unpack_from
_TXID = struct.Struct("<Q")


def txid_key(txid: int) -> bytes:
    """The key field of a PREPARE, COMMIT or ABORT record: the batch id, u64 little-endian
    (shards log such records for a cross-shard batch, the coordinator's decision log COMMITs)."""
    return _TXID.pack(txid)


def txid_of(key: bytes) -> int:
    """The batch id a PREPARE, COMMIT or ABORT record's key holds."""
    return _TXID.unpack(key)[0]


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
    A batch of more than a few records is encoded column-wise (see `_encode_columns`).
    """
    if len(ops) >= COLUMNS_MIN:
        encoded = _encode_columns(ops, seq)
        if encoded is not None:
            return encoded
    return _encode_each(ops, seq)


def _encode_each(ops: Sequence[tuple[int, bytes, bytes, int]], seq: int) -> tuple[bytes, list[int]]:
    """encode_batch one record at a time (the reference the column-wise encoder must match)."""
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


# -- column-wise batch encoding ---------------------------------------------------------------
# The 40 header bytes of every record of a batch are laid out in one numpy array. A CRC-32C of a
# fixed number of bytes is affine in those bytes: crc(x) = crc(y) ^ XOR over the positions i
# where x and y differ of T_i[x[i]] ^ T_i[y[i]], so header_crc (of header bytes 8..40) and the
# CRC of header bytes 4..40 are computed for the whole batch from the first record's and
# per-position tables, looking only at the byte positions that can differ between records
# (batch_left, and lengths or types that are not the same throughout). The whole-record crc
# then continues from the latter over key + value: one crc32c call per record, the one
# per-record cost the format requires.
COLUMNS_MIN = 64  # below this many records numpy's fixed cost outweighs the per-record loop it saves
# RECORD_HEADER as a numpy record type (the same fields, names and sizes, packed).
_HEADER_DTYPE = np.dtype([(name, "<" + code) for name, code in zip(RECORD_HEADER_NAMES, RECORD_HEADER.format.lstrip("<"))])
assert _HEADER_DTYPE.itemsize == RECORD_HEADER_SIZE
_FIELDS_AT = RECORD_CRCS.size  # header_crc covers header bytes 8..40; crc begins with bytes 4..40 (RECORD_CRC_FROM)
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


def _crc_tables(length: int) -> np.ndarray:
    """T with T[i, b] = crc32c(x) ^ crc32c(y) for two `length`-byte strings that differ only
    at position i, where x holds b and y holds 0 (CRC-32C is affine for a fixed length)."""
    zero = crc32c(bytes(length))
    single = np.empty((length, 8), dtype=np.uint32)  # one bit set
    for i in range(length):
        for bit in range(8):
            buf = bytearray(length)
            buf[i] = 1 << bit
            single[i, bit] = crc32c(buf) ^ zero
    table = np.zeros((length, 256), dtype=np.uint32)
    values = np.arange(256)
    for bit in range(8):
        table ^= np.where(((values >> bit) & 1).astype(bool)[None, :], single[:, bit : bit + 1], np.uint32(0))
    return table


_T_FIELDS = _crc_tables(RECORD_HEADER_SIZE - _FIELDS_AT)
_T_HEADER = _crc_tables(RECORD_HEADER_SIZE - RECORD_CRC_FROM)
# One gather serves both CRCs for a field byte: header_crc's change in the low 32 bits, the
# change to the CRC of bytes 4..40 in the high 32.
_T_BOTH = _T_FIELDS.astype(np.uint64) | (_T_HEADER[_FIELDS_AT - RECORD_CRC_FROM :].astype(np.uint64) << np.uint64(32))


def crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """The CRC-32C of each row of a 2-D uint8 array (every row the same length), as uint32."""
    n, length = rows.shape
    out = np.empty(n, dtype=np.uint32)
    if n == 0:
        return out
    table = _crc_tables(length) if length != RECORD_HEADER_SIZE - RECORD_CRC_FROM else _T_HEADER
    first = rows[0]
    out.fill(crc32c(first.tobytes()))
    for i in np.flatnonzero((rows != first).any(axis=0)).tolist():
        out ^= table[i].take(rows[:, i]) ^ table[i, first[i]]
    return out


def _byte_span(low: int, high: int) -> int:
    """How many low bytes can differ between integers in low..high (the higher bytes agree)."""
    return ((low ^ high).bit_length() + 7) // 8


def _header_crcs(raw: np.ndarray, varying: list[int]) -> tuple[np.ndarray, list[int]]:
    """(header_crc, CRC of header bytes 4..40) of each row of `raw` (n x 40 header bytes, both
    CRC fields still 0), given the header byte positions at or after 8 that may differ."""
    n = len(raw)
    first = raw[0]
    fields_crc = crc32c(first[_FIELDS_AT:].tobytes())
    head_crc = crc32c(first[RECORD_CRC_FROM:].tobytes())  # with header_crc 0
    both = np.full(n, fields_crc | (head_crc << 32), dtype=np.uint64)
    for i in varying:
        j = i - _FIELDS_AT
        both ^= _T_BOTH[j].take(raw[:, i]) ^ _T_BOTH[j, first[i]]
    header_crc = both.astype(np.uint32)  # the low 32 bits
    head = (both >> np.uint64(32)).astype(np.uint32)
    crc_bytes = header_crc.view(np.uint8).reshape(n, 4)
    for j in range(4):
        head ^= _T_HEADER[j].take(crc_bytes[:, j])
    return header_crc, head.tolist()


def _varying(at: int, values, n: int) -> list[int]:
    """Header byte positions of the field at `at` that may differ among `values`."""
    first = values[0]
    if values.count(first) == n:
        return []
    return list(range(at, at + _byte_span(min(values), max(values))))


def _encode_columns(ops: Sequence[tuple[int, bytes, bytes, int]], seq: int) -> tuple[bytes, list[int]] | None:
    """encode_batch for many records: checks what `encode_columns` trusts, None if anything is
    not bytes keys and values and int fields in range (the caller then encodes record by
    record, which raises what it raises)."""
    n = len(ops)
    columns = list(zip(*ops))
    if len(columns) != 4 or len(columns[0]) != n:
        return None
    types, keys, values, expires = columns
    if set(map(type, keys)) != {bytes} or set(map(type, values)) != {bytes}:
        return None
    if set(map(type, types)) != {int} or set(map(type, expires)) != {int} or type(seq) is not int:
        return None
    key_lens = list(map(len, keys))
    value_lens = list(map(len, values))
    if not (0 <= min(types) and max(types) <= 255 and 0 <= min(expires) and max(expires) <= _U64_MAX and 0 <= seq <= _U64_MAX):
        return None
    if max(key_lens) > _U32_MAX or max(value_lens) > _U32_MAX or n > _U32_MAX:
        return None
    return encode_columns(types, keys, values, expires, seq, key_lens, value_lens)


def encode_columns(types, keys, values, expires, seq: int, key_lens=None, value_lens=None) -> tuple[bytes, list[int]]:
    """encode_batch of the records (types[i], keys[i], values[i], expires[i]), given as
    columns (sequences of equal length; key_lens and value_lens: the lengths, if the caller has
    them). The caller has validated everything: bytes keys and values, types 0..255, lengths
    and expiry times that fit their fields (as for encode_record)."""
    n = len(keys)
    if n < COLUMNS_MIN:
        return _encode_each(list(zip(types, keys, values, expires)), seq)
    if key_lens is None:
        key_lens = list(map(len, keys))
    if value_lens is None:
        value_lens = list(map(len, values))
    header = np.zeros(n, dtype=_HEADER_DTYPE)
    varying = _varying(8, types, n)
    header["type"] = types if varying else types[0]
    for name, at, column in (("key_len", 12, key_lens), ("value_len", 16, value_lens), ("expires_at", 32, expires)):
        span = _varying(at, column, n)
        header[name] = column if span else column[0]
        varying += span
    header["batch_left"] = np.arange(n - 1, -1, -1, dtype=np.uint32)
    varying += range(20, 20 + _byte_span(0, n - 1))
    header["seq"] = seq
    raw = header.view(np.uint8).reshape(n, RECORD_HEADER_SIZE)
    header["header_crc"], heads = _header_crcs(raw, varying)
    payloads = list(map(add, keys, values))
    header["crc"] = np.fromiter(map(crc32c, payloads, heads), dtype=np.uint32, count=n)
    parts = [None] * (2 * n)
    parts[0::2] = header.view(f"V{RECORD_HEADER_SIZE}").tolist()
    parts[1::2] = payloads
    sizes = header["key_len"].astype(np.int64)
    sizes += header["value_len"]
    sizes += RECORD_HEADER_SIZE
    offsets = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    return b"".join(parts), offsets.tolist()


def decode_header(buf, offset: int) -> RecordHeader | None:
    """Decode the record header at `offset` of `buf`.

    Returns None when the header is short, its header_crc fails, or a field is out of range:
    such a header is never trusted for its lengths.
    """
    if len(buf) - offset < RECORD_HEADER_SIZE:
        return None
    crc, header_crc, rtype, flags, reserved, key_len, value_len, batch_left, seq, expires_at = _unpack_header(buf, offset)
    if crc32c(buf[offset + _FIELDS_AT : offset + RECORD_HEADER_SIZE]) != header_crc:
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
    return crc32c(buf[offset + RECORD_CRC_FROM : offset + header.size]) == header.crc


__all__ = ["PUT", "DELETE", "RecordHeader", "encode_record", "encode_batch", "encode_columns", "crc32c_rows", "decode_header", "record_crc_ok"]
