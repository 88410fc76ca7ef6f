"""The engine's side of its shared index header (shardkv/ipc/sharedindex.py): the one writer
of the fields the engine publishes there - the seqlock version, the active segment and where
its data ends, and the epoch of the segment files.

Without a shared index (an engine used in-process) only the version is kept: scans and
lock-free gets read it too. The worker publishes the other fields (state, locked keys) itself;
the table number is written when the hash index installs a new table (IndexPublisher.install,
inside a change).
"""

from __future__ import annotations


class IndexHeader:
    """The seqlock version and the published segment fields of one engine."""

    def __init__(self, publisher=None):
        self.publisher = publisher  # an IndexPublisher, or None
        # Odd while the index (or the ordered view, or the segment table) is being changed,
        # bumped again after: lock-free readers compare it before and after they read.
        self.version = publisher.start_version if publisher is not None else 0

    def bump(self) -> None:
        """Enter or leave a change (the version turns odd, then even again)."""
        version = self.version + 1
        self.version = version
        if self.publisher is not None:
            self.publisher.set_version(version)

    def invalidate_private(self) -> None:
        """Make in-process scans read again (the engine is closing; clients are told by the
        worker, which marks the shard not serving)."""
        self.version += 1

    def set_active(self, segment: int, end: int) -> None:
        """Publish the active segment and where its data ends (at open). Readers map the active
        segment only below the published end (it shrinks to its end when it is sealed)."""
        if self.publisher is not None:
            self.publisher.set_active(segment, end)

    def new_active(self, segment: int, end: int) -> None:
        """The log rolled over to `segment`: publish it inside a change of its own, before any
        index entry points into it."""
        if self.publisher is not None:
            self.bump()
            self.publisher.set_active(segment, end)
            self.bump()

    def set_active_end(self, end: int) -> None:
        """Publish where the active segment's data ends: after each append, before the index
        points at the record."""
        if self.publisher is not None:
            self.publisher.set_active_end(end)

    def bump_epoch(self) -> None:
        """Segment files are about to be deleted: readers drop their mappings (inside a change)."""
        if self.publisher is not None:
            self.publisher.bump_epoch()
