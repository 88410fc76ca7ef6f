"""`python -m shardkv.backends copy SRC DST [--batch N]`: copy a store into another (for
example a local directory into a Redis Cluster: redis://host:port?namespace=app), every key
with its time to live. `python -m shardkv.backends status URL [--json]`: the nodes of a
cluster, as `shardkv status URL` prints them."""

from __future__ import annotations

import argparse
import sys

import shardkv
from shardkv.backends import _redacted, status_main
from shardkv.backends.copy import copy_store


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 done, 1 a shardkv error, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m shardkv.backends", description="shardkv backends: copy stores, show a cluster's nodes")
    commands = parser.add_subparsers(dest="command", required=True)
    copy = commands.add_parser("copy", help="copy every key (with its ttl) of SRC into DST", description="copy every key (with its ttl) of SRC into DST")
    copy.add_argument("source", metavar="SRC", help="a data directory or a URL (redis://host:port?namespace=...)")
    copy.add_argument("destination", metavar="DST", help="a data directory or a URL")
    copy.add_argument("--batch", type=int, default=1000, help="keys per write (default 1000)")
    copy.add_argument("--quiet", action="store_true", help="no progress on stderr")
    status = commands.add_parser("status", help="the nodes of a cluster (as shardkv status URL)")
    status.add_argument("target", metavar="URL")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            return status_main(args.target, "json" if args.json else "table")
        show = None if args.quiet or not sys.stderr.isatty() else (lambda n: print(f"\rcopied {n:,} keys", end="", file=sys.stderr, flush=True))
        totals = copy_store(args.source, args.destination, batch=args.batch, progress=show)
        if show is not None:
            print(file=sys.stderr)
        print(
            f"copied {totals['keys']:,} keys ({totals['with_ttl']:,} with a ttl) from {_redacted(str(args.source))} to {_redacted(str(args.destination))}"
            f" in {totals['seconds']:.2f} s; {totals['skipped']:,} expired or deleted meanwhile"
        )
        return 0
    except (ValueError, TypeError) as exc:
        print(f"shardkv: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"shardkv: {exc}", file=sys.stderr)
        return 2
    except shardkv.Error as exc:
        print(f"shardkv: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
