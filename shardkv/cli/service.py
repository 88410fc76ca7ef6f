"""`shardkv start` and `shardkv stop`: the cluster as a service (process control lives in
shardkv/ops/cluster.py)."""

from __future__ import annotations

import argparse
import os

import shardkv
from shardkv.cli.common import CommandFailed, UsageError, seconds, shard_count
from shardkv.coordinator.runfiles import EXIT_ALREADY_RUNNING, EXIT_BAD_CONFIG, read_cluster_file
from shardkv.errors import CorruptionError
from shardkv.ops.cluster import STOP_TIMEOUT, find_store, is_running, realdir, start_cluster, stop_cluster
from shardkv.ops.exitcodes import FAILED, OK, USAGE
from shardkv.ops.status import stale_objects


def cmd_start(args: argparse.Namespace) -> int:
    """Start a cluster on DIR (creating the store if DIR holds none); exit 0 if one runs already."""
    directory = realdir(args.directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        find_store(directory)  # raises StoreNotFound: "... is not a directory"
    if args.foreground:
        from shardkv.coordinator import supervisor  # noqa: PLC0415

        argv = [directory, "--durability", args.durability, "--foreground"]
        if args.shards is not None:
            argv += ["--shards", str(args.shards)]
        code = supervisor.main(argv)  # (it says so itself when a cluster is already running)
        if code in (0, EXIT_ALREADY_RUNNING):
            return OK
        return USAGE if code == EXIT_BAD_CONFIG else FAILED
    try:
        outcome, info = start_cluster(directory, args.shards, args.durability)
    except ValueError as exc:
        raise UsageError(f"bad configuration: {exc}") from None
    except RuntimeError as exc:
        raise CommandFailed(str(exc)) from None
    if outcome == "running" and args.shards is not None and info.get("shards") not in (None, args.shards):
        raise UsageError(f"{directory} is running with {info['shards']} shards, not {args.shards} (shards is fixed at creation)")
    if outcome == "running":
        print(f"already running: {directory} ({info.get('shards', '?')} shards, pid {info.get('pid', '?')})")
    else:
        print(f"started {directory} ({info['shards']} shards, pid {info['pid']})")
    return OK


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the cluster on DIR; exit 0 if none runs (after removing a killed one's leftovers)."""
    directory = realdir(args.directory)
    if is_running(directory):
        try:
            stop_cluster(directory, args.timeout)
        except TimeoutError as exc:
            raise CommandFailed(str(exc)) from None
        print(f"stopped {directory}")
        return OK
    # Not running: a killed cluster may have left shared objects (and processes) behind; those
    # are removed even if the directory itself is gone. Otherwise a path with no store is a typo.
    stale = stale_objects(directory)
    if not stale:
        try:
            find_store(directory)
        except CorruptionError:
            pass  # a store all the same: nothing runs on it
    from shardkv.coordinator.supervisor import reclaim  # noqa: PLC0415

    removed = reclaim(directory) if stale or (os.path.isdir(directory) and read_cluster_file(directory)) else []
    objects = [entry for entry in removed or () if not entry.startswith(("pid ", "run/"))]
    print(f"not running: {directory}" + (f" (removed {len(objects)} stale objects)" if objects else ""))
    return OK


def register(commands) -> None:
    """Add start and stop to the `shardkv` parser's subcommands."""
    start = commands.add_parser(
        "start", help="start a cluster serving DIR in the background (creates the store if DIR holds none)",
        description="Start a cluster serving DIR in the background; it runs until `shardkv stop DIR`. "
        "The one command that creates a store (besides `salvage`, which writes a new one). Exit 0 also if one runs already.",
    )  # fmt: skip
    start.add_argument("directory", metavar="DIR", help="the data directory")
    start.add_argument("--shards", type=shard_count, default=None, help="shard count of a new store (default: CPU cores); fixed at creation")
    start.add_argument("--durability", choices=shardkv.DURABILITY_LEVELS, default="interval", help="default durability (default: interval)")
    start.add_argument("--foreground", action="store_true", help="run the supervisor in this process until SIGTERM/SIGINT")
    start.set_defaults(handler=cmd_start)
    stop = commands.add_parser(
        "stop", help="stop the cluster serving DIR",
        description="Stop the cluster serving DIR and wait until it is gone; exit 0 if none runs (a killed one's leftovers are removed).",
    )  # fmt: skip
    stop.add_argument("directory", metavar="DIR", help="the data directory")
    stop.add_argument("--timeout", type=seconds, default=STOP_TIMEOUT, help=f"seconds to wait (default {STOP_TIMEOUT:g})")
    stop.set_defaults(handler=cmd_stop)
