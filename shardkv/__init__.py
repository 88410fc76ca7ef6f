"""shardkv: a persistent, sharded key-value store for Python that uses every core."""

from shardkv.errors import Closed, Conflict, CorruptionError, Error, StorageError, Unavailable

__version__ = "0.1.0"

DURABILITY_LEVELS = ("process", "interval", "fsync")

__all__ = [
    "Closed",
    "Conflict",
    "CorruptionError",
    "DURABILITY_LEVELS",
    "Error",
    "StorageError",
    "Unavailable",
    "__version__",
]
