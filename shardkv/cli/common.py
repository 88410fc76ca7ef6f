"""What the commands share: keys and values on the command line, argument types, opening a
running store, and the rich consoles for tables and progress bars.

Keys and values are UTF-8 text or hex literals (`x'00cafebabe'`, also `X'..'`). Output shows a
value as text when it is printable UTF-8 (and does not itself look like a hex literal), else as a
hex literal; pairs print as `key<TAB>value`. Data go out through plain print(), never through
rich, whose markup would read `[...]` in a value.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

import shardkv
from shardkv.backends import is_url
from shardkv.ops.cluster import require_running

_HEX_LITERAL = re.compile(r"[xX]'([0-9A-Fa-f]*)'")


class UsageError(Exception):
    """Bad input from the command line: printed as `shardkv: <message>`, exit 4 (USAGE)."""


class CommandFailed(Exception):
    """A command could not do its work (a start or stop that failed): `shardkv: <message>`,
    exit 6 (FAILED)."""


# -- keys and values ---------------------------------------------------------------------------
def parse_bytes(text: str, what: str = "value") -> bytes:
    """`x'00ff'` / `X'00FF'` as hex bytes, anything else as UTF-8 text.

    A word that starts with x' or X' is always taken as a hex literal: a malformed one is a
    UsageError rather than silently stored as text.
    """
    if len(text) >= 2 and text[0] in "xX" and text[1] == "'":
        match = _HEX_LITERAL.fullmatch(text)
        if match is None or len(match.group(1)) % 2:
            raise UsageError(f"invalid hex literal for {what}: {text!r} (expected x'<an even number of hex digits>')")
        return bytes.fromhex(match.group(1))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable command-line bytes
        return os.fsencode(text)


def format_bytes(data: bytes) -> str:
    """Printable UTF-8 as text, anything else (or text that reads as a hex literal) as x'..'."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"x'{data.hex()}'"
    if not text.isprintable() or (len(text) >= 2 and text[0] in "xX" and text[1] == "'"):
        return f"x'{data.hex()}'"
    return text


def format_pair(pair: tuple[bytes, bytes]) -> str:
    """A (key, value) pair as `key<TAB>value`."""
    return f"{format_bytes(pair[0])}\t{format_bytes(pair[1])}"


# -- argument types ----------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def shard_count(text: str) -> int:
    """An argparse type: a shard count, 1 to 1024."""
    value = positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"must be at most 1024, not {value}")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, not {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


# -- stores ------------------------------------------------------------------------------------
def open_store(target: str, durability: str | None = None):
    """A client of the store `target` (a directory, or a backend's URL) for a data command.

    A directory must hold a store (StoreNotFound otherwise) that a cluster serves (NotRunning
    otherwise): a data command never creates a store nor starts a cluster, which would outlive
    the command by a few seconds (README.md, "CLI"). `durability`: that of this client's
    writes (None: the backend's default).
    """
    options = {} if durability is None else {"durability": durability}
    if is_url(target):
        return shardkv.open(target, **options)
    return shardkv.open(require_running(target), create=False, **options)


# -- rich, for tables and progress -------------------------------------------------------------
def console(stderr: bool = False):
    """A rich Console on stdout (or stderr). Off a terminal it is as wide as it needs to be, so
    that a table piped into grep or a file keeps one line per row; colours follow rich's
    rules (none off a terminal, NO_COLOR)."""
    from rich.console import Console  # noqa: PLC0415 (rich costs ~50 ms to import: only the commands that draw)

    stream = sys.stderr if stderr else sys.stdout
    interactive = stream.isatty()
    return Console(file=stream, stderr=stderr, highlight=False, width=None if interactive else max(200, shutil.get_terminal_size().columns))


def progress_bar(transient: bool = True, disable: bool = False):
    """A rich progress bar on stderr (done/total, rate, time left); shown on a terminal only
    (and unless `disable`), so that pipes and logs get the results alone."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn  # noqa: PLC0415

    err = console(stderr=True)
    return Progress(
        TextColumn("  {task.description:<12}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeRemainingColumn(),
        console=err, transient=transient, disable=disable or not err.is_terminal, redirect_stdout=False, redirect_stderr=False,
    )  # fmt: skip
