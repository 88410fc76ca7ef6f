"""shardkv: a persistent, sharded key-value store for Python that uses every core."""

from shardkv.errors import Busy, Closed, Conflict, CorruptionError, Error, StorageError, StoreNotFound, Unavailable, Unsupported

__version__ = "0.1.0"

from shardkv.client import Client  # noqa: E402
from shardkv.aio import AsyncClient  # noqa: E402

# open/aopen dispatch on the target: a path opens the local store (shardkv.client.open and
# shardkv.aio.aopen, unchanged), a URL the backend its scheme names (shardkv/backends).
from shardkv.backends import aopen, open  # noqa: E402,A004

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
    "Unsupported",
    "__version__",
    "aopen",
    "open",
]
