"""The `shardkv` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import shardkv


def _bench(args: argparse.Namespace) -> int:
    # benchmarks/ sits beside shardkv/ in a source checkout (the README installs it editable).
    checkout = Path(shardkv.__file__).resolve().parent.parent
    if (checkout / "benchmarks" / "engine.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks import engine as engine_bench  # noqa: PLC0415

    argv = ["--quick"] if args.quick else []
    if args.keys:
        argv += ["--keys", str(args.keys)]
    return engine_bench.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `shardkv` command."""
    parser = argparse.ArgumentParser(prog="shardkv", description="shardkv: a persistent, sharded key-value store.")
    parser.add_argument("--version", action="version", version=f"shardkv {shardkv.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="run the engine benchmark beside LMDB and RocksDB (from a source checkout)")
    bench.add_argument("--quick", action="store_true", help="1/10 scale (100k keys)")
    bench.add_argument("--keys", type=int, default=None, help="number of keys (default 1,000,000)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shardkv` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except ModuleNotFoundError as exc:
        if exc.name == "benchmarks":
            print("shardkv bench runs from a source checkout (the benchmarks/ folder is not installed)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
