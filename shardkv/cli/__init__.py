"""The `shardkv` command line, one module per group of commands:

    service      start, stop
    status       status (table, JSON, Prometheus; --watch, --serve)
    maintenance  compact, verify, salvage
    data         get, put, delete, scan, min, max, above, below, len
    copy         copy
    bench        bench

Process control is shardkv/ops/cluster.py, the exit codes shardkv/ops/exitcodes.py. Every error
is one line on stderr, `shardkv: <message>`, and an exit code of that table (`shardkv --help`
ends with it); SHARDKV_DEBUG=1 shows the traceback of an unexpected one. rich (tables, progress
bars, live redraw) and prometheus_client are imported here and in the commands only: never by
`import shardkv`.
"""

from __future__ import annotations

import argparse
import builtins
import os
import sys

import shardkv
from shardkv.cli import bench, copy, data, maintenance, service, status
from shardkv.cli.common import CommandFailed, UsageError
from shardkv.ops import exitcodes
from shardkv.ops.cluster import NotRunning


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line and exit 4 (USAGE) rather than its usage block
    and exit 2, which `status` uses for "down"."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `shardkv` command."""
    parser = _Parser(
        prog="shardkv",
        description="shardkv: a persistent, sharded key-value store. `shardkv COMMAND --help` tells more.",
        epilog="Keys and values: UTF-8 text or hex literals such as x'00cafebabe'.\n\nExit codes:\n" + exitcodes.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardkv {shardkv.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (service, status, maintenance, data, copy, bench):
        module.register(commands)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and message of an error a command raised."""
    if isinstance(exc, UsageError):
        return exitcodes.USAGE, str(exc)
    if isinstance(exc, CommandFailed):
        return exitcodes.FAILED, str(exc)
    if isinstance(exc, NotRunning):
        return exitcodes.NOT_RUNNING, str(exc)
    if isinstance(exc, (shardkv.StoreNotFound, NotADirectoryError)):
        return exitcodes.NO_STORE, str(exc)
    if isinstance(exc, shardkv.CorruptionError):
        return exitcodes.CORRUPT, f"corrupt: {exc}"
    if isinstance(exc, shardkv.Error):
        return exitcodes.FAILED, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (ValueError, TypeError)):  # the library's checks of keys, values, shard counts
        return exitcodes.USAGE, str(exc)
    if isinstance(exc, ImportError):  # a backend's optional dependency (the message names the extra)
        return exitcodes.FAILED, str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return exitcodes.FAILED, f"{exc.strerror or exc}{where}"
    return exitcodes.FAILED, f"unexpected {type(exc).__name__}: {exc} (SHARDKV_DEBUG=1 shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shardkv` console script; returns the exit code (shardkv.ops.exitcodes)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"shardkv: {_one_line(str(exc))}", file=sys.stderr)
        return exitcodes.USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else exitcodes.OK
    if not getattr(args, "handler", None):
        parser.print_help()
        return exitcodes.OK
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("shardkv: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except BrokenPipeError:  # `shardkv scan DIR | head`: the reader has all it wanted
        try:
            sys.stdout = builtins.open(os.devnull, "w")  # noqa: SIM115 — no second error at exit
        except OSError:
            pass
        return exitcodes.OK
    except Exception as exc:  # noqa: BLE001 — every error is one line and a documented code
        if os.environ.get("SHARDKV_DEBUG"):
            raise
        code, message = _failure(exc)
        print(f"shardkv: {_one_line(message)}", file=sys.stderr)
        return code


__all__ = ["build_parser", "main"]
