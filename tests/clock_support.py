"""Time in the expiry tests: a clock the test moves, and real-time windows where none reaches.

In one process, the engine (`ShardEngine.open(clock=...)`), the shared-index reader
(`IndexReader(clock=...)`) and the worker (`Worker(config, clock=...)`) take a `FakeClock`: a
key's expiry is then an exact instant the test steps over, with no sleep.

A cluster's workers run in other processes, on the real clock. There a check of what must hold
*before* a ttl runs out (the key is there, its ttl is under the one given) is asserted only while
`still_before(started, ttl)`, with `started` taken just before the write: a slow machine makes
the check moot instead of failing it. A check of what must hold *after* waits with
`wait_past(written, ttl)`, `written` taken once the write returned.

Imported as a plain module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import time

# Slack for the rounding of expiry instants to whole milliseconds (on both sides).
ROUNDING = 0.01


class FakeClock:
    """Wall-clock seconds that move only when the test says so (`advance`)."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock by `seconds` (negative: a clock stepped back)."""
        self.now += seconds


def still_before(started: float, ttl: float) -> bool:
    """Whether a check that ended now certainly ran before a ttl of `ttl` seconds, given by a
    write that began at `started` (time.monotonic()), ran out."""
    return time.monotonic() - started < ttl - ROUNDING


def until_past(written: float, ttl: float) -> float:
    """Seconds until a ttl of `ttl` seconds, given by a write that returned at `written`
    (time.monotonic()), has certainly run out (0 if it has)."""
    return max(0.0, written + ttl + ROUNDING - time.monotonic())


def wait_past(written: float, ttl: float) -> None:
    """Sleep until_past(written, ttl)."""
    time.sleep(until_past(written, ttl))
