"""The exceptions shardkv raises. Bad arguments raise TypeError or ValueError instead."""


class Error(Exception):
    """Base class of every shardkv-specific error."""


class CorruptionError(Error):
    """Stored data failed a check (checksum, structure); the message names the file and offset."""


class Closed(Error):
    """The store (or engine) was used after close()."""


class Unavailable(Error):
    """The part of the store that owns the request cannot serve it right now."""


class Conflict(Error):
    """A precondition of an atomic batch or compare-and-swap did not hold."""


class StorageError(Error):
    """An operating-system error (disk full, I/O error) stopped a write; nothing was acknowledged."""


class Busy(Unavailable):
    """A request was not applied because a key it needs is locked by a cross-shard batch that is
    being decided (or a shard the batch needs is restarting); the same request succeeds later.
    The client retries by itself and raises this only once its lock timeout has passed."""


class StoreNotFound(Error, FileNotFoundError):
    """`open(..., create=False)` (or a command that never creates a store) found no store in
    the directory."""


class Unsupported(Error):
    """The backend cannot do what was asked with the same guarantees (a batch across Redis
    Cluster hash slots, an ordered read of a store without its ordered index, a durability
    level the server is not set to); nothing was sent. `db.features` tells in advance."""
