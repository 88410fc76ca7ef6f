"""The data commands: get, put, delete, scan, min, max, above, below, len.

Each attaches to the cluster that serves DIR and detaches again. On a store that no cluster
serves it exits 2 (DOWN) with "start it with `shardkv start DIR`"; on a path that holds no store
it exits 5 (NO_STORE). It never creates a store nor starts a cluster: a mistyped path must not
become a new store, and a cluster started for one command would linger after it.
"""

from __future__ import annotations

import argparse
import sys

import shardkv
from shardkv.cli.common import count, format_bytes, format_pair, open_store, parse_bytes, seconds
from shardkv.ops.exitcodes import NOT_FOUND, OK

TARGET_HELP = "the data directory of a running store (or a backend's URL, e.g. redis://host:port)"
ON_A_STOPPED_STORE = (
    "DIR must be served by a running cluster (`shardkv start DIR`): a data command never creates a "
    "store nor starts a cluster (exit 2 if none runs, 5 if DIR holds no store)."
)


def _missing(message: str) -> int:
    print(f"shardkv: {message}", file=sys.stderr)
    return NOT_FOUND


def _print_pair(pair, missing: str) -> int:
    if pair is None:
        return _missing(missing)
    print(format_pair(pair))
    return OK


def cmd_get(args: argparse.Namespace) -> int:
    """`shardkv get DIR KEY`: print the value; exit 1 if there is none."""
    key = parse_bytes(args.key, "key")
    with open_store(args.directory) as db:
        value = db.get(key)
    if value is None:
        return _missing(f"key not found: {format_bytes(key)}")
    print(format_bytes(value))
    return OK


def cmd_put(args: argparse.Namespace) -> int:
    """`shardkv put DIR KEY VALUE [--ttl SECONDS]`."""
    key, value = parse_bytes(args.key, "key"), parse_bytes(args.value, "value")
    with open_store(args.directory, args.durability) as db:
        db.put(key, value, ttl=args.ttl)
    return OK


def cmd_delete(args: argparse.Namespace) -> int:
    """`shardkv delete DIR KEY`: exit 1 if the key was not there."""
    key = parse_bytes(args.key, "key")
    with open_store(args.directory, args.durability) as db:
        deleted = db.delete(key)
    return OK if deleted else _missing(f"key not found: {format_bytes(key)}")


def cmd_scan(args: argparse.Namespace) -> int:
    """`shardkv scan DIR [...]`: key<TAB>value lines in key order."""
    start = None if args.start is None else parse_bytes(args.start, "--start")
    stop = None if args.stop is None else parse_bytes(args.stop, "--stop")
    prefix = None if args.prefix is None else parse_bytes(args.prefix, "--prefix")
    with open_store(args.directory) as db:
        out = sys.stdout
        for pair in db.scan(start=start, stop=stop, reverse=args.reverse, prefix=prefix, limit=args.limit):
            out.write(format_pair(pair) + "\n")
    return OK


def cmd_min(args: argparse.Namespace) -> int:
    """`shardkv min DIR`: the pair of the smallest key; exit 1 if the store is empty."""
    with open_store(args.directory) as db:
        pair = db.min()
    return _print_pair(pair, "the store is empty")


def cmd_max(args: argparse.Namespace) -> int:
    """`shardkv max DIR`: the pair of the largest key; exit 1 if the store is empty."""
    with open_store(args.directory) as db:
        pair = db.max()
    return _print_pair(pair, "the store is empty")


def cmd_above(args: argparse.Namespace) -> int:
    """`shardkv above DIR KEY`: the pair of the smallest key after KEY; exit 1 if none."""
    key = parse_bytes(args.key, "key")
    with open_store(args.directory) as db:
        pair = db.above(key)
    return _print_pair(pair, f"no key above {format_bytes(key)}")


def cmd_below(args: argparse.Namespace) -> int:
    """`shardkv below DIR KEY`: the pair of the largest key before KEY; exit 1 if none."""
    key = parse_bytes(args.key, "key")
    with open_store(args.directory) as db:
        pair = db.below(key)
    return _print_pair(pair, f"no key below {format_bytes(key)}")


def cmd_len(args: argparse.Namespace) -> int:
    """`shardkv len DIR`: the number of keys."""
    with open_store(args.directory) as db:
        print(len(db))
    return OK


def register(commands) -> None:
    """Add the data commands to the `shardkv` parser's subcommands."""

    def command(name: str, handler, help: str, *, key: bool = False, write: bool = False) -> argparse.ArgumentParser:  # noqa: A002
        sub = commands.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}. {ON_A_STOPPED_STORE}")
        sub.add_argument("directory", metavar="DIR", help=TARGET_HELP)
        if key:
            sub.add_argument("key", metavar="KEY", help="UTF-8 text or a hex literal (x'00ff')")
        if write:
            sub.add_argument("--durability", choices=shardkv.DURABILITY_LEVELS, default=None, help="durability of this write (default: interval)")
        sub.set_defaults(handler=handler)
        return sub

    command("get", cmd_get, "print the value of KEY (exit 1 if there is none)", key=True)
    put = command("put", cmd_put, "set KEY to VALUE", key=True, write=True)
    put.add_argument("value", metavar="VALUE", help="UTF-8 text or a hex literal (x'00ff')")
    put.add_argument("--ttl", type=seconds, default=None, metavar="SECONDS", help="expire the key after SECONDS")
    command("delete", cmd_delete, "remove KEY (exit 1 if it was not there)", key=True, write=True)
    scan = command("scan", cmd_scan, "print key<TAB>value lines in key order")
    scan.add_argument("--start", metavar="K", help="first key (inclusive)")
    scan.add_argument("--stop", metavar="K", help="last key (exclusive)")
    scan.add_argument("--prefix", metavar="P", help="only keys starting with P")
    scan.add_argument("--limit", metavar="N", type=count, default=None, help="at most N pairs")
    scan.add_argument("--reverse", action="store_true", help="descending key order")
    command("min", cmd_min, "print the pair of the smallest key (exit 1 if the store is empty)")
    command("max", cmd_max, "print the pair of the largest key (exit 1 if the store is empty)")
    command("above", cmd_above, "print the pair of the smallest key after KEY (exit 1 if none)", key=True)
    command("below", cmd_below, "print the pair of the largest key before KEY (exit 1 if none)", key=True)
    command("len", cmd_len, "print the number of keys")
