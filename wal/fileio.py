"""The few file operations the log uses, in one place.

Every write-side system call of the store goes through these functions, so that durability rules
(fsync the directory after creating, renaming or deleting a file) are applied in one place and a
test can inject disk faults here without root.
"""

from __future__ import annotations

import os
from typing import Callable

FILE_MODE = 0o600
DIR_MODE = 0o700

# A test may install a function called before every operation below as injector(op, target)
# (op: "create", "open", "write", "fsync", "truncate", "rename", "unlink", "fsync_dir"; target:
# a path or a file descriptor); it raises OSError to inject a fault. None in production.
_injector: Callable[[str, object], None] | None = None


def set_injector(injector: Callable[[str, object], None] | None) -> None:
    """Install (or, with None, remove) the disk-fault injector of this process (tests only)."""
    global _injector
    _injector = injector


def make_dir(path: str) -> None:
    """Create `path` (and parents) owner-only if it does not exist."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)


def fsync_dir(path: str) -> None:
    """fsync a directory so that file creations, renames and deletions in it are durable."""
    if _injector is not None:
        _injector("fsync_dir", path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_exclusive(path: str) -> int:
    """Create a new owner-only file for reading and writing and return its descriptor."""
    if _injector is not None:
        _injector("create", path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def open_rw(path: str) -> int:
    """Open an existing file for reading and writing."""
    if _injector is not None:
        _injector("open", path)
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def open_ro(path: str) -> int:
    """Open an existing file read-only."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset`, looping over short writes."""
    if _injector is not None:
        _injector("write", fd)
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def sync_data(fd: int) -> None:
    """Make the file's data (and the metadata needed to read it) durable."""
    if _injector is not None:
        _injector("fsync", fd)
    os.fdatasync(fd)


def sync_file(fd: int) -> None:
    """Make the file's data and metadata durable (fsync)."""
    if _injector is not None:
        _injector("fsync", fd)
    os.fsync(fd)


def truncate(fd: int, length: int) -> None:
    """Set the file's length."""
    if _injector is not None:
        _injector("truncate", fd)
    os.ftruncate(fd, length)


def write_file_atomically(directory: str, name: str, data: bytes) -> None:
    """Write `name` in `directory` through a fsynced temporary file and a rename."""
    tmp = os.path.join(directory, name + ".tmp")
    if os.path.exists(tmp):
        os.unlink(tmp)
    fd = create_exclusive(tmp)
    try:
        pwrite_all(fd, data, 0)
        sync_file(fd)
    finally:
        os.close(fd)
    if _injector is not None:
        _injector("rename", tmp)
    os.rename(tmp, os.path.join(directory, name))
    fsync_dir(directory)


def rename(directory: str, old: str, new: str) -> None:
    """Rename a file within `directory` (no directory fsync: the caller batches those)."""
    if _injector is not None:
        _injector("rename", os.path.join(directory, old))
    os.rename(os.path.join(directory, old), os.path.join(directory, new))


def unlink(directory: str, name: str, missing_ok: bool = True) -> None:
    """Delete a file within `directory` (no directory fsync: the caller batches those)."""
    if _injector is not None:
        _injector("unlink", os.path.join(directory, name))
    try:
        os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
        if not missing_ok:
            raise
