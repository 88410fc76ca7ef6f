"""The `crc32c` package (used by the log) computes the CRC-32C that docs/FORMAT.md specifies.

crcmod's predefined 'crc-32c' is the independent reference.
"""

from __future__ import annotations

import random

import crcmod.predefined
import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

reference = crcmod.predefined.mkCrcFun("crc-32c")

SETTINGS = settings(max_examples=200, deadline=None)


def test_check_value():
    # The catalogue check value of CRC-32C (Castagnoli), and the empty string.
    assert crc32c(b"123456789") == 0xE3069283 == reference(b"123456789")
    assert crc32c(b"") == 0 == reference(b"")


def test_not_plain_crc32():
    import zlib

    assert crc32c(b"123456789") != zlib.crc32(b"123456789")


@SETTINGS
@given(st.binary(max_size=4096))
def test_matches_crcmod(data):
    assert crc32c(data) == reference(data)


@SETTINGS
@given(st.binary(max_size=4096), st.binary(max_size=4096))
def test_incremental(a, b):
    whole = reference(a + b)
    assert crc32c(b, crc32c(a)) == whole
    assert reference(b, reference(a)) == whole


@SETTINGS
@given(st.lists(st.binary(max_size=600), max_size=8))
def test_incremental_many_parts(parts):
    crc = 0
    for part in parts:
        crc = crc32c(part, crc)
    assert crc == reference(b"".join(parts))


@SETTINGS
@given(st.binary(min_size=1, max_size=2048), st.data())
def test_bytes_like_inputs(data, draw):
    """The log computes CRCs of bytes, bytearrays, memoryviews and mmap slices."""
    start = draw.draw(st.integers(0, len(data)))
    stop = draw.draw(st.integers(start, len(data)))
    expected = reference(data[start:stop])
    assert crc32c(memoryview(data)[start:stop]) == expected
    assert crc32c(bytearray(data[start:stop])) == expected


@pytest.mark.parametrize("size", [1 << 16, (1 << 20) + 3, (16 << 20) + 7])
def test_large_buffers(size):
    rng = random.Random(size)
    data = rng.randbytes(size)
    assert crc32c(data) == reference(data)
    for cut in (1, 7, size // 3, size - 1):
        assert crc32c(data[cut:], crc32c(data[:cut])) == reference(data)


def test_single_bit_flips_change_the_crc():
    rng = random.Random(1)
    data = bytearray(rng.randbytes(4096))
    crc = crc32c(data)
    for position in range(0, len(data), 97):
        for bit in range(8):
            data[position] ^= 1 << bit
            assert crc32c(data) != crc
            data[position] ^= 1 << bit
    assert crc32c(data) == crc
