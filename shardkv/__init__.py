"""shardkv: a persistent, sharded key-value store for Python that uses every core."""

from shardkv.errors import Busy, Closed, Conflict, CorruptionError, Error, StorageError, StoreNotFound, Unavailable

__version__ = "0.1.0"

from shardkv.client import Client, open  # noqa: E402,A004
from shardkv.aio import AsyncClient, aopen  # noqa: E402

DURABILITY_LEVELS = ("process", "interval", "fsync")

__all__ = [
    "AsyncClient",
    "Busy",
    "Client",
    "Closed",
    "Conflict",
    "CorruptionError",
    "DURABILITY_LEVELS",
    "Error",
    "StorageError",
    "StoreNotFound",
    "Unavailable",
    "__version__",
    "aopen",
    "open",
]
