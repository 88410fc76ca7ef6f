"""Checks of keys and values shared by the engine and the client: a clear error, nothing written."""

from __future__ import annotations

import math
from datetime import timedelta

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


def check_value(value, max_size: int = DEFAULT_MAX_VALUE_SIZE, option: str = "") -> bytes:
    """Return `value` as bytes, or raise TypeError (not bytes-like) / ValueError (over
    `max_size`; the message names `option`, the setting that chose the limit, if there is one)."""
    if type(value) is not bytes:
        if not isinstance(value, (bytearray, memoryview)):
            raise TypeError(f"values must be bytes-like (bytes, bytearray, memoryview), not {type(value).__name__}")
        value = bytes(value)
    if len(value) > max_size:
        raise ValueError(f"value of {len(value)} bytes is over the limit of {max_size} bytes" + (f" ({option})" if option else ""))
    return value


class Milliseconds(int):
    """A ttl already in whole milliseconds, the unit of the wire and the log: a worker hands
    the engine a request's ttl as one, and ttl_milliseconds takes it as it is (no trip through
    float seconds, which can come back a millisecond longer)."""

    __slots__ = ()


def ttl_milliseconds(ttl) -> int:
    """A ttl in seconds (or a timedelta, or Milliseconds) as whole milliseconds (at least 1);
    TypeError or ValueError if it is not a positive, finite duration small enough for the
    record's 64-bit expiry field."""
    if type(ttl) is Milliseconds:
        if not 0 < ttl < 2**53:
            raise ValueError(f"ttl must be between 1 and 2**53 - 1 ms, not {int(ttl)}")
        return int(ttl)
    if isinstance(ttl, timedelta):
        ttl = ttl.total_seconds()
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds, a timedelta or None, not {type(ttl).__name__}")
    # The bound is checked before isfinite(): an int too large for a float must be a ValueError.
    if not ttl > 0 or ttl * 1000 >= 2**53 or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a positive, finite number of seconds (under 2**53 ms), not {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def check_bound(name: str, value) -> bytes:
    """A scan bound or prefix as bytes, or TypeError."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes-like or None, not {type(value).__name__}")


def check_scan_args(start, stop, prefix, limit) -> tuple:
    """(start, stop, prefix) as bytes or None; TypeError/ValueError for a bad bound or limit."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    return tuple(None if value is None else check_bound(name, value) for name, value in (("start", start), ("stop", stop), ("prefix", prefix)))
