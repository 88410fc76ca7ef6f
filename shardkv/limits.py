"""Checks of keys and values shared by the engine and the client: a clear error, nothing written."""

from __future__ import annotations

MAX_KEY_LEN = 65536
DEFAULT_MAX_VALUE_SIZE = 64 * 1024 * 1024


def check_key(key) -> bytes:
    """Return `key` as bytes, or raise TypeError (not bytes-like) / ValueError (length)."""
    if type(key) is not bytes:
        if not isinstance(key, (bytearray, memoryview)):
            raise TypeError(f"keys must be bytes-like (bytes, bytearray, memoryview), not {type(key).__name__}")
        key = bytes(key)
    if not 0 < len(key) <= MAX_KEY_LEN:
        raise ValueError(f"key length must be between 1 and {MAX_KEY_LEN} bytes, not {len(key)}")
    return key


def check_value(value, max_size: int = DEFAULT_MAX_VALUE_SIZE) -> bytes:
    """Return `value` as bytes, or raise TypeError (not bytes-like) / ValueError (over `max_size`)."""
    if type(value) is not bytes:
        if not isinstance(value, (bytearray, memoryview)):
            raise TypeError(f"values must be bytes-like (bytes, bytearray, memoryview), not {type(value).__name__}")
        value = bytes(value)
    if len(value) > max_size:
        raise ValueError(f"value of {len(value)} bytes is over the limit of {max_size} bytes (max_value_size)")
    return value
