"""Power loss, simulated in the file layer (wal/fileio.py's injector), no root needed.

`PowerLoss(directory)` records, while installed, what the disk would really hold: the content
of each file as of its last fsync, and each directory's entries as of its last directory fsync.
`crash(mode)` then rewrites the directory as a power failure could have left it:

- files created or renamed after the last directory fsync vanish; files deleted after it come
  back (with their last fsynced content);
- in each file, the sectors written since its last fsync are, by `mode`:
  "drop"     - all lost (the file is as of its last fsync);
  "prefix"   - kept up to a random point in file order, lost after it (a cut in the middle of
               a write: a torn tail);
  "reorder"  - a random subset of them kept (sectors reaching the disk out of order);
  "scramble" - as "prefix", and the bytes the first lost sector's write changed filled with
               garbage instead of their old value (a sector the disk half wrote).
"""

from __future__ import annotations

import os
import random

from shardkv.wal import fileio

SECTOR = 512


class PowerLoss:
    """Install with `with PowerLoss(directory) as power:`; call `power.crash(mode)` after the
    store's processes (or engine objects) are gone."""

    def __init__(self, directory, seed: int = 0):
        self.directory = os.fspath(directory)
        self.rng = random.Random(seed)
        self.synced: dict[int, bytes] = {}  # inode -> content as of its last fsync
        self.entries: dict[str, dict[str, int]] = {}  # directory -> {name: inode} as of its last fsync

    def __enter__(self) -> "PowerLoss":
        for root, _, names in os.walk(self.directory):
            self._sync_dir(root)
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    self.synced[os.fstat(f.fileno()).st_ino] = f.read()
        fileio.set_injector(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        fileio.set_injector(None)

    def _observe(self, op: str, target) -> None:
        if op == "fsync":
            size = os.fstat(target).st_size
            self.synced[os.fstat(target).st_ino] = os.pread(target, size, 0)
        elif op == "fsync_dir":
            self._sync_dir(target)
        elif op == "create":
            self._sync_dir(os.path.dirname(target), only_new_dirs=True)

    def _sync_dir(self, path: str, only_new_dirs: bool = False) -> None:
        path = os.path.abspath(path)
        if only_new_dirs and path in self.entries:
            return
        self.entries[path] = {} if only_new_dirs else {name: os.stat(os.path.join(path, name)).st_ino for name in os.listdir(path) if os.path.isfile(os.path.join(path, name))}

    def crash(self, mode: str = "drop") -> None:
        """Rewrite every recorded directory as the power failure left it."""
        fileio.set_injector(None)
        for directory, entries in self.entries.items():
            if not os.path.isdir(directory):
                continue
            current = {}
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        current[os.fstat(f.fileno()).st_ino] = f.read()
                    os.unlink(path)
            for name, inode in entries.items():
                durable = self.synced.get(inode, b"")
                content = self._after_crash(durable, current.get(inode, durable), mode)
                fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, content)
                finally:
                    os.close(fd)

    def _after_crash(self, durable: bytes, written: bytes, mode: str) -> bytes:
        if mode == "drop" or durable == written:
            return durable
        size = max(len(durable), len(written))
        old, new = durable.ljust(size, b"\0"), written.ljust(size, b"\0")
        changed = [s for s in range(0, size, SECTOR) if old[s : s + SECTOR] != new[s : s + SECTOR]]
        keep = self.rng.randint(0, len(changed))
        result = bytearray(old)
        persisted = changed[:keep] if mode != "reorder" else sorted(self.rng.sample(changed, keep))
        for s in persisted:
            result[s : s + SECTOR] = new[s : s + SECTOR]
        if mode == "scramble" and keep < len(changed):
            # Garbage where the lost write was going: the bytes of that sector that the write
            # changed (what was durable before it, like a segment's header, stays).
            s = changed[keep]
            for i in range(s, min(s + SECTOR, size)):
                if old[i] != new[i]:
                    result[i] = self.rng.getrandbits(8)
        # The file's length is as written only if everything reached the disk; otherwise as of
        # its last fsync (data past it, kept or not, is cut: still a prefix of the writes).
        length = len(written) if keep == len(changed) else len(durable)
        return bytes(result[:length])
