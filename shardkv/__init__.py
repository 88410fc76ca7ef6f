"""shardkv: a persistent, sharded key-value store for Python that uses every core.

The client stack (`Client`, `AsyncClient`, `open`, `aopen`) is imported on first use, so a
process that needs only a part of the package (a shard worker importing `shardkv.wal`, the
coordinator, the CLI's `--help`) does not load it. The errors are small and always loaded:
`except shardkv.Error` must work before anything was opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardkv.errors import Busy, Closed, Conflict, CorruptionError, Error, StorageError, StoreNotFound, Unavailable, Unsupported

__version__ = "0.1.0"

DURABILITY_LEVELS = ("process", "interval", "fsync")

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports the same names
    from shardkv.aio import AsyncClient
    from shardkv.backends import aopen, open  # noqa: A004
    from shardkv.client import Client

# Each lazy name and the module it lives in. open/aopen dispatch on the target: a path opens
# the local store (shardkv.client.open and shardkv.aio.aopen), a URL the backend its scheme
# names (shardkv/backends).
_LAZY = {
    "AsyncClient": "shardkv.aio",
    "Client": "shardkv.client",
    "aopen": "shardkv.backends",
    "open": "shardkv.backends",
}


def __getattr__(name: str):
    """Import a client-side name on first use and keep it in the module from then on."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'shardkv' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
