"""`shardkv copy SRC DST`: stream every key, with its time to live, from one store into another
(a local directory or a backend's URL on either side; shardkv/backends/copy.py does the work).

A local SRC or DST must be a store that a running cluster serves, as for the data commands:
copy creates no store and starts no cluster (`shardkv start NEWDIR` makes an empty store to
copy into).
"""

from __future__ import annotations

import argparse
import sys

from shardkv.backends import _redacted, is_url
from shardkv.backends.copy import copy_store
from shardkv.cli.common import UsageError, open_store, positive_int, progress_bar
from shardkv.ops.cluster import realdir
from shardkv.ops.exitcodes import OK


def cmd_copy(args: argparse.Namespace) -> int:
    """Copy every key of SRC into DST; print how many (and how many had a ttl)."""
    if not is_url(args.source) and not is_url(args.destination) and realdir(args.source) == realdir(args.destination):
        raise UsageError("SRC and DST are the same store")
    with open_store(args.source) as src, open_store(args.destination) as dst:
        with progress_bar(disable=args.quiet) as bar:
            task = bar.add_task("copying", total=None if bar.disable else len(src))
            totals = copy_store(src, dst, batch=args.batch, progress=lambda copied: bar.update(task, completed=copied))
    print(
        f"copied {totals['keys']:,} keys ({totals['with_ttl']:,} with a ttl) from {_redacted(str(args.source))} to {_redacted(str(args.destination))}"
        f" in {totals['seconds']:.2f} s; {totals['skipped']:,} expired or deleted meanwhile"
    )
    sys.stdout.flush()
    return OK


def register(commands) -> None:
    """Add copy to the `shardkv` parser's subcommands."""
    copy = commands.add_parser(
        "copy", help="copy every key (with its ttl) of the store SRC into the store DST",
        description="Copy every key of SRC into DST in key order, each with the time it had left to live; keys that "
        "expire or are deleted meanwhile are left out. SRC and DST are data directories of running stores "
        "(`shardkv start DIR` first: copy creates no store) or backends' URLs such as redis://host:port?namespace=app. "
        "Copy a store that nobody writes to meanwhile.",
    )  # fmt: skip
    copy.add_argument("source", metavar="SRC", help="a running store's data directory, or a URL")
    copy.add_argument("destination", metavar="DST", help="a running store's data directory, or a URL")
    copy.add_argument("--batch", type=positive_int, default=1000, metavar="N", help="keys per write (default 1000)")
    copy.add_argument("--quiet", action="store_true", help="no progress bar")
    copy.set_defaults(handler=cmd_copy)
