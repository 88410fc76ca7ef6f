"""Backends: which engine `shardkv.open(target)` and `shardkv.aopen(target)` run on.

A path (a str that is not a URL, or any os.PathLike) opens the local store exactly as before
(`shardkv.client.open`, `shardkv.aio.aopen`). A URL names its backend by its scheme:
`redis://host:port[,host:port...]` and `rediss://` (TLS) open a Redis Cluster
(`shardkv/backends/redis_cluster.py`, docs/BACKENDS.md).

The registry maps a scheme to a module (imported on first use only, so that `import shardkv`
never imports an optional dependency) with two functions: `open(target, *args, **options)`
and `aopen(target, *args, **options)`. Third parties add a scheme with an entry point in the
group `shardkv.backends`, named after the scheme, whose value is such a module (or an object
with those two functions):

    [project.entry-points."shardkv.backends"]
    memkv = "memkv_shardkv.backend"

Every client says what it supports in `db.features` (a `Features`): a program, and the test
suite, can ask instead of failing late.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # shardkv.api imports this module (Features)
    from shardkv.api import AsyncStore, Opening, Store

ENTRY_POINT_GROUP = "shardkv.backends"

# scheme -> module path; the built-in backends (entry points may add more, not replace these).
BUILTIN = {
    "redis": "shardkv.backends.redis_cluster",
    "rediss": "shardkv.backends.redis_cluster",
}
# pip extra that brings each built-in backend's optional dependencies, for the error message.
EXTRAS = {"shardkv.backends.redis_cluster": "redis"}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOADED: dict[str, object] = {}  # scheme -> loaded backend (module or object)


@dataclass(frozen=True)
class Features(Mapping):
    """What a backend keeps of the API's guarantees. Read-only; both `features.cas` and
    `features["cas"]` work (it is a Mapping of its field names).

    backend: its name ("local", "redis-cluster").
    cas: compare-and-swap (`cas`) is atomic.
    ttl: keys can expire (`put(..., ttl=)`, `ttl`, `expire`).
    atomic_batches: `write`/`put_many`/`batch()` are atomic when their keys are together (the
        local store: always; Redis Cluster: keys of one hash slot).
    cross_shard_batches: atomic batches whose keys are anywhere.
    ordered_scans: `scan`, `min`, `max`, `above`, `below` and iteration in key order.
    durability_levels: the `durability=` values that `open` accepts (docs: README.md,
        "Durability levels"); () where nothing can be promised or known.
    asyncio: `shardkv.aopen` gives an asyncio client.
    """

    backend: str
    cas: bool = True
    ttl: bool = True
    atomic_batches: bool = True
    cross_shard_batches: bool = True
    ordered_scans: bool = True
    durability_levels: tuple[str, ...] = ("process", "interval", "fsync")
    asyncio: bool = True

    def __getitem__(self, name: str):
        if not isinstance(name, str) or name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# The local store (shardkv.Client, shardkv.AsyncClient): every feature, every durability level.
LOCAL_FEATURES = Features(backend="local")


def features_of(db) -> Features:
    """`db.features`, or LOCAL_FEATURES for a local client that has no `features` yet."""
    features = getattr(db, "features", None)
    return LOCAL_FEATURES if features is None else features


def scheme_of(target) -> str | None:
    """The URL scheme of `target` in lower case, or None when it is a path (any os.PathLike,
    or a str without "scheme://" at its start)."""
    if not isinstance(target, str):
        return None
    match = _URL.match(target)
    return match.group(1).lower() if match else None


def _entry_points() -> list[EntryPoint]:
    """The installed entry points of the group (read on each lookup of an unknown scheme)."""
    return list(entry_points(group=ENTRY_POINT_GROUP))


def schemes() -> list[str]:
    """Every scheme that a backend is known for: the built-in ones and the entry points'."""
    return sorted(set(BUILTIN) | {point.name.lower() for point in _entry_points()} | set(_LOADED))


def register(scheme: str, backend) -> None:
    """Use `backend` (a module, or any object with `open` and `aopen`) for URLs of `scheme`
    in this process (what an entry point does for an installed package)."""
    if not isinstance(scheme, str) or not _URL.match(scheme + "://"):
        raise ValueError(f"not a URL scheme: {scheme!r}")
    for name in ("open", "aopen"):
        if not callable(getattr(backend, name, None)):
            raise TypeError(f"a backend needs callable open and aopen; {backend!r} has no {name}")
    _LOADED[scheme.lower()] = backend


def backend_for(scheme: str):
    """The backend of `scheme`, importing it on first use. ValueError for an unknown scheme;
    ImportError naming the pip extra to install when its optional dependency is missing."""
    scheme = scheme.lower()
    loaded = _LOADED.get(scheme)
    if loaded is not None:
        return loaded
    if scheme in BUILTIN:
        backend = _import(BUILTIN[scheme], scheme)
    else:
        point = next((p for p in _entry_points() if p.name.lower() == scheme), None)
        if point is None:
            raise ValueError(f"no shardkv backend for {scheme}:// URLs (known: {', '.join(s + '://' for s in schemes())}); a path opens the local store")
        backend = point.load()
    _LOADED[scheme] = backend
    return backend


def _import(module: str, scheme: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module)
        # Only a missing dependency of the backend gets the hint; a bug inside it stays itself.
        if extra is None or exc.name in (module, None) or exc.name.startswith("shardkv"):
            raise
        raise ModuleNotFoundError(
            f'the {scheme}:// backend needs the optional dependency {exc.name!r}: pip install "shardkv[{extra}]"', name=exc.name
        ) from exc


def open(target: str | os.PathLike[str], *args: Any, **options: Any) -> Store:  # noqa: A001 - the package's open()
    """Open a store: a path (str or os.PathLike) attaches to or starts the local store as
    `shardkv.client.open(directory, shards=None, durability="interval", ...)` always did; a URL
    such as "redis://host:port,host:port" opens the backend of its scheme (docs/BACKENDS.md).
    `args` and `options` go to that backend's `open`."""
    scheme = scheme_of(target)
    if scheme is None:
        from shardkv import client  # noqa: PLC0415 - looked up at each call: the local client is being reworked

        return client.open(target, *args, **options)
    return backend_for(scheme).open(target, *args, **options)


def aopen(target: str | os.PathLike[str], *args: Any, **options: Any) -> Opening[AsyncStore]:
    """The asyncio client of a store, chosen like `open`: `db = await shardkv.aopen(target)` or
    `async with shardkv.aopen(target) as db:`."""
    scheme = scheme_of(target)
    if scheme is None:
        from shardkv import aio  # noqa: PLC0415

        return aio.aopen(target, *args, **options)
    return backend_for(scheme).aopen(target, *args, **options)


def is_url(target) -> bool:
    """True when `target` is a URL (it names a backend), False for a path."""
    return scheme_of(target) is not None


def status_main(target: str, output: str = "table", watch: float | None = None) -> int:
    """`shardkv status URL`: print the backend's health (`output`: "table", "json" or
    "prometheus"), again every `watch` seconds if given; return the exit code (0 healthy,
    1 degraded, 2 down)."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    backend = backend_for(scheme_of(target))
    while True:
        if callable(getattr(backend, "health", None)):
            health = backend.health(target)  # no store opened: status creates nothing
        else:
            with backend.open(target) as db:
                health = db.health()
        if output == "json":
            text = json.dumps(dict(health, target=_redacted(target)), indent=2)
        elif output == "prometheus":
            text = backend.render_prometheus(health).rstrip("\n")
        else:
            text = f"{_redacted(target)}\n{backend.render_table(health)}"
        if not watch:
            print(text)
            return int(health.get("exit_code", 2))
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        sys.stdout.flush()
        time.sleep(watch)


def _redacted(target: str) -> str:
    """`target` without a password (user:password@ becomes user:***@)."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", target)


# Kept out of `from shardkv.backends import *`: open would shadow the builtin.
__all__ = ["ENTRY_POINT_GROUP", "Features", "LOCAL_FEATURES", "backend_for", "features_of", "is_url", "register", "scheme_of", "schemes"]
