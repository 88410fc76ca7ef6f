"""The files of a running cluster in DIR/run/ (docs/IPC.md, "Names and ownership"), shared
by the supervisor, which writes them, and the clients and the CLI, which read them."""

from __future__ import annotations

import fcntl
import json
import os

RUN_DIR = "run"
CLUSTER_FILE = "cluster.json"
SUPERVISOR_LOCK = "supervisor.lock"
ATTACH_LOCK = "attach.lock"  # shared while a client attaches, exclusive while an idle cluster decides to stop
CONFIG_PREFIX = "config-"  # config-<cluster>.json: what the coordinator and the workers are started with
EXIT_ALREADY_RUNNING = 3
EXIT_BAD_CONFIG = 4
EXIT_START_FAILED = 5  # a detached supervisor's parent: the cluster could not start (the reason on stderr)


def run_dir(directory: str) -> str:
    """The folder of a store's runtime files."""
    return os.path.join(directory, RUN_DIR)


def config_path(directory: str, cluster: str) -> str:
    """The configuration file of cluster `cluster` of a store."""
    return os.path.join(run_dir(directory), f"{CONFIG_PREFIX}{cluster}.json")


def write_config(directory: str, cluster: str, config: dict) -> str:
    """Write the configuration of cluster `cluster` (owner-only, created exclusively); return its path."""
    path = config_path(directory, cluster)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(config).encode())
    return path


def read_config(path: str) -> dict:
    """A configuration written by write_config()."""
    with open(path, "rb") as f:
        return json.loads(f.read())


def attach_lock_path(directory: str) -> str:
    """The lock file that attaching clients and an idle supervisor's stop exclude each other with."""
    return os.path.join(run_dir(directory), ATTACH_LOCK)


def lease_path(directory: str, lease: int) -> str:
    """The lock file of client lease `lease`."""
    return os.path.join(run_dir(directory), f"lease-{lease}.lock")


def lock_is_held(path: str) -> bool:
    """True if some process holds an flock on `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def held_flocks() -> set[tuple[int, int, int]] | None:
    """(major, minor, inode) of every file some process holds an flock on, read from
    /proc/locks without taking any lock; None if /proc/locks cannot be read."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    held = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] != "->":
            try:
                major, minor, inode = fields[5].split(":")
                held.add((int(major, 16), int(minor, 16), int(inode)))
            except ValueError:
                continue
    return held


def count_held(paths: list[str]) -> int:
    """How many of `paths` some process holds an flock on. Reads /proc/locks, so that looking
    never takes a lease a client is trying to take; probes with flock where it is missing."""
    held = held_flocks()
    if held is None:
        return sum(lock_is_held(path) for path in paths)
    count = 0
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        count += (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held
    return count


def read_cluster_file(directory: str) -> dict | None:
    """The description of the cluster last started on `directory`, or None."""
    try:
        with open(os.path.join(run_dir(directory), CLUSTER_FILE), "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
