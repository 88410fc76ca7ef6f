"""The files of a running cluster in DIR/run/ (docs/IPC.md, "Names and ownership"), shared
by the supervisor, which writes them, and the clients and the CLI, which read them."""

from __future__ import annotations

import fcntl
import json
import os

RUN_DIR = "run"
CLUSTER_FILE = "cluster.json"
SUPERVISOR_LOCK = "supervisor.lock"
EXIT_ALREADY_RUNNING = 3
EXIT_BAD_CONFIG = 4


def run_dir(directory: str) -> str:
    """The folder of a store's runtime files."""
    return os.path.join(directory, RUN_DIR)


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


def read_cluster_file(directory: str) -> dict | None:
    """The description of the cluster last started on `directory`, or None."""
    try:
        with open(os.path.join(run_dir(directory), CLUSTER_FILE), "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
