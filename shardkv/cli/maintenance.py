"""`shardkv compact` (online, through the running cluster), `shardkv verify` and `shardkv salvage`
(offline: they read the segment files themselves)."""

from __future__ import annotations

import argparse
import os
import shutil

from shardkv.cli.common import CommandFailed, UsageError, open_store, progress_bar
from shardkv.coordinator.manifest import read_manifest
from shardkv.errors import CorruptionError
from shardkv.ops.cluster import find_store, is_running, realdir
from shardkv.ops.exitcodes import CORRUPT, OK
from shardkv.ops.salvage import salvage_store
from shardkv.ops.verify import verify_store


def cmd_compact(args: argparse.Namespace) -> int:
    """Compact every shard (or one) of the running cluster, with a progress bar."""
    from rich.filesize import decimal  # noqa: PLC0415

    with open_store(args.directory) as db:
        if args.shard is not None and not 0 <= args.shard < db.shards:
            raise UsageError(f"--shard {args.shard}: the store has shards 0 to {db.shards - 1}")
        with progress_bar() as bar:
            task = bar.add_task("compacting", total=None)
            results = db.compact(args.shard, progress=lambda done, total: bar.update(task, completed=min(done, total), total=max(1, total)))
    shards = range(len(results)) if args.shard is None else [args.shard]
    for shard, result in zip(shards, results):
        if result is None:
            continue
        before, after = result["before"], result["after"]
        print(
            f"shard {shard}: {decimal(before['total_bytes'])} -> {decimal(after['total_bytes'])} "
            f"(garbage {before['garbage_ratio']:.0%} -> {after['garbage_ratio']:.0%}) in {result['seconds']:.2f} s"
        )
    return OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every record of every segment; exit 3 (CORRUPT) if anything is damaged."""
    directory = find_store(args.directory, damaged=True)
    report = verify_store(directory)
    try:
        read_manifest(directory)
    except CorruptionError as exc:  # verify_store reads logs only: the MANIFEST is checked here
        report["problems"].insert(0, str(exc))
        report["ok"] = False
    for problem in report["problems"]:
        print(problem)
    for tail in report["torn_tails"]:
        print(f"note: {tail}")
    verdict = "ok" if report["ok"] else f"{len(report['problems'])} corrupt place(s)"
    print(f"{report['segments']} segments, {report['records']:,} records: {verdict}")
    return OK if report["ok"] else CORRUPT


def cmd_salvage(args: argparse.Namespace) -> int:
    """Copy every readable record of DIR into a new store NEWDIR; exit 3 if something was lost."""
    source = find_store(args.directory, damaged=True)
    destination = realdir(args.destination)
    if is_running(source):
        raise CommandFailed(f"{source} is being served by a running cluster: stop it first (`shardkv stop {source}`)")
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise UsageError(f"{destination} is not an empty directory: salvage writes a new store")
    if destination == source:
        raise UsageError("NEWDIR must be another directory than DIR")
    created = not os.path.exists(destination)
    try:
        report = salvage_store(source, destination)
    except BaseException:
        if created:  # a half-written store is worse than none: the command said it failed
            shutil.rmtree(destination, ignore_errors=True)
        raise
    for problem in report["problems"]:
        print(f"not saved: {problem}")
    print(f"saved {report['keys']:,} keys ({report['records_read']:,} records read) into {destination}; {report['bytes_lost']:,} bytes could not be read")
    return OK if not report["problems"] else CORRUPT


def register(commands) -> None:
    """Add compact, verify and salvage to the `shardkv` parser's subcommands."""
    compact = commands.add_parser(
        "compact", help="compact the cluster serving DIR online, with a progress bar",
        description="Compact the logs of the running cluster serving DIR (reads and writes go on meanwhile) and print "
        "each shard's size before and after. Exit 2 if no cluster serves DIR.",
    )  # fmt: skip
    compact.add_argument("directory", metavar="DIR", help="the data directory of a running store")
    compact.add_argument("--shard", type=int, default=None, metavar="N", help="only shard N")
    compact.set_defaults(handler=cmd_compact)
    verify = commands.add_parser(
        "verify", help="check every record of DIR without changing anything (exit 3 if corrupt)",
        description="Check the MANIFEST and every record of every segment of the store (or shard directory) DIR, "
        "running or not, changing nothing; print each damaged place by file and offset. Exit 3 if any.",
    )  # fmt: skip
    verify.add_argument("directory", metavar="DIR", help="a store's data directory, or one shard's")
    verify.set_defaults(handler=cmd_verify)
    salvage = commands.add_parser(
        "salvage", help="copy every record that can still be read from DIR into a new store NEWDIR",
        description="Copy every record that can still be read from the stopped store DIR into a new store NEWDIR "
        "(which must not exist or be empty); exit 3 if something could not be saved.",
    )  # fmt: skip
    salvage.add_argument("directory", metavar="DIR", help="the damaged store (not running)")
    salvage.add_argument("destination", metavar="NEWDIR", help="where to write the new store")
    salvage.set_defaults(handler=cmd_salvage)
