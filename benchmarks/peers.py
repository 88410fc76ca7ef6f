"""The stores of the benchmark suite behind one interface.

`serve(name, directory, fsync)` starts what a store needs (a shardkv cluster, a redis-server;
nothing for the embedded peers) and returns a `Served` whose `spec` (a small dict, picklable)
lets any process open a `Client` on it with `connect(spec)`. Every client has the same
operations: get, put, delete (bound methods, no wrapper in the hot loop where possible),
put_batch, get_batch, delete_batch (batches are atomic where written), items(reverse),
count, compact and close. An operation a store does not have raises `Unsupported`, which the
suite shows as "-" with the reason as a note.

Durability, the same for all on a row: `fsync=False` - nothing is fsynced per write (shardkv
durability "process" on cluster and client, LMDB sync=False + metasync=False, RocksDB and
LevelDB sync=False (their logs on), sqlite3 and diskcache WAL with synchronous=OFF, Redis
without RDB or AOF); `fsync=True` - every acknowledged write or batch is fsynced (shardkv
"fsync", LMDB sync=True, RocksDB/LevelDB sync=True, sqlite3/diskcache synchronous=FULL, Redis
appendfsync always).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable, Iterator, Sequence

from benchmarks.common import RedisServer, StoreUnavailable, disk_bytes, ensure_cluster_stopped

SHARDS = 2  # shardkv shard workers: the CPU count of the machine these figures come from

STORES = ("shardkv", "engine", "lmdb", "rocksdb", "leveldb", "diskcache", "sqlite", "redis")
PEERS = ("lmdb", "rocksdb", "leveldb", "diskcache", "sqlite", "redis")
LABELS = {
    "shardkv": "shardkv",
    "engine": "engine",
    "lmdb": "LMDB",
    "rocksdb": "RocksDB",
    "leveldb": "LevelDB",
    "diskcache": "diskcache",
    "sqlite": "sqlite3",
    "redis": "Redis",
}
_INSTALL = {  # store -> (module to import, how to install it)
    "shardkv": ("shardkv", "pip install -e ."),
    "engine": ("shardkv.shards", "pip install -e ."),
    "lmdb": ("lmdb", "pip install lmdb"),
    "rocksdb": ("rocksdict", "pip install rocksdict"),
    "leveldb": ("plyvel", "pip install plyvel"),
    "diskcache": ("diskcache", "pip install diskcache"),
    "sqlite": ("sqlite3", "a Python built with sqlite3"),
    "redis": ("redis", "pip install redis"),
}

MODULES = {name: module for name, (module, _hint) in _INSTALL.items()}


class Unsupported(Exception):
    """The store has no such operation (or not from more than one process)."""


def check_available(name: str) -> None:
    """Raise StoreUnavailable (with an install hint) if `name` cannot run here."""
    module, hint = _INSTALL[name]
    try:
        __import__(module)
    except ImportError as exc:
        raise StoreUnavailable(f"cannot import {module} ({hint}): {exc}") from None
    if name == "redis" and shutil.which("redis-server") is None:
        raise StoreUnavailable("redis-server is not installed (apt-get install redis-server)")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415
    import platform  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    from benchmarks.common import redis_server_version  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for key, dist in (("shardkv", "shardkv"), ("py-lmdb", "lmdb"), ("rocksdict", "rocksdict"), ("plyvel", "plyvel"),
                      ("diskcache", "diskcache"), ("redis-py", "redis"), ("numpy", "numpy")):  # fmt: skip
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "missing"
    try:
        import lmdb  # noqa: PLC0415

        out["liblmdb"] = ".".join(map(str, lmdb.version()))
    except ImportError:
        pass
    try:
        import plyvel  # noqa: PLC0415

        out["leveldb"] = f"{plyvel.__leveldb_version__}" if hasattr(plyvel, "__leveldb_version__") else "?"
    except ImportError:
        pass
    out["sqlite"] = sqlite3.sqlite_version
    out["redis-server"] = redis_server_version()
    return out


# -- serving ----------------------------------------------------------------------------------
class Served:
    """One store while it is measured: what runs for it, and the spec clients connect with."""

    def __init__(self, name: str, directory: str, fsync: bool, map_size: int, shards: int = SHARDS):
        self.name, self.directory, self.fsync = name, directory, fsync
        self.path = os.path.join(directory, name)
        self.spec = {"store": name, "path": self.path, "fsync": fsync, "map_size": map_size}
        self.redis: RedisServer | None = None
        self.cluster = False
        if name == "shardkv":
            from shardkv.ops.cluster import start_cluster  # noqa: PLC0415

            # A private, non-embedded cluster with the row's durability (an embedded one would
            # run the default "interval", fsyncing in the background once a second).
            self.cluster = True
            start_cluster(self.path, shards, "fsync" if fsync else "process")
        elif name == "redis":
            self.redis = RedisServer(directory, fsync)
            self.spec["socket"] = self.redis.socket
        elif name in ("lmdb", "rocksdb", "leveldb", "diskcache"):
            os.makedirs(self.path, exist_ok=True)

    def disk_bytes(self) -> int | None:
        """Bytes on disk under the store's path (None for Redis: it keeps everything in memory)."""
        if self.name == "redis":
            return None
        if self.name == "sqlite":
            return sum(disk_bytes(p) if os.path.isdir(p) else _file_blocks(p) for p in (self.path, self.path + "-wal", self.path + "-shm"))
        return disk_bytes(self.path)

    def stop(self) -> None:
        """Stop what runs for the store (clients must be closed first). Idempotent."""
        if self.cluster:
            self.cluster = False
            ensure_cluster_stopped(self.path)
        if self.redis is not None:
            redis_server, self.redis = self.redis, None
            redis_server.stop()


def _file_blocks(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def serve(name: str, directory: str, fsync: bool = False, map_size: int = 1 << 30, shards: int = SHARDS) -> Served:
    """Start what store `name` needs in `directory` (`map_size`: LMDB's map, in bytes;
    `shards`: shardkv's shard workers)."""
    return Served(name, directory, fsync, map_size, shards)


# -- clients ----------------------------------------------------------------------------------
class Client:
    """One process's handle on a store (see the module docstring)."""

    name = "?"
    readers_in_other_processes = True  # can other processes read while this store is served?
    writers_in_other_processes = True  # ... and write?
    why_not = ""  # the note shown where a multi-process row is "-"

    def __init__(self, spec: dict, reader: bool = False):
        self.spec, self.fsync, self.reader = spec, spec["fsync"], reader

    def put_batch(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def get_batch(self, keys: Sequence[bytes]) -> list:
        get = self.get
        return [get(k) for k in keys]

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        raise NotImplementedError

    def items(self, reverse: bool = False) -> Iterator:
        """Every (key, value) in key order (descending with `reverse`)."""
        raise Unsupported(f"{LABELS[self.name]} has no ordered iteration")

    def above(self, key: bytes):
        """(key, value) of the smallest key after `key`, or None."""
        raise Unsupported(f"{LABELS[self.name]}: no ordered seek in this benchmark")

    def below(self, key: bytes):
        """(key, value) of the largest key before `key`, or None."""
        raise Unsupported(f"{LABELS[self.name]}: no ordered seek in this benchmark")

    def count(self) -> int:
        raise NotImplementedError

    def compact(self) -> None:
        raise Unsupported(f"{LABELS[self.name]} has no compaction")

    def close(self) -> None:
        pass


def _count(items: Iterable) -> int:
    n = 0
    for _ in items:
        n += 1
    return n


def _in_read_txn(env, reverse: bool) -> Iterator:
    with env.begin() as txn:
        cursor = txn.cursor()
        yield from (cursor.iterprev() if reverse else cursor.iternext())


def _with_values(keys: Iterable, get) -> Iterator:
    for key in keys:
        yield key, get(key)


class _ShardkvBoth(Client):
    """What the cluster client and the engine have alike (self.db)."""

    def items(self, reverse=False):
        return self.db.scan(reverse=reverse)

    def above(self, key):
        return self.db.above(key)

    def below(self, key):
        return self.db.below(key)

    def count(self):
        return len(self.db)

    def compact(self):
        self.db.compact()

    def close(self):
        self.db.close()


class ShardKVClient(_ShardkvBoth):
    name = "shardkv"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        import shardkv  # noqa: PLC0415

        self.db = db = shardkv.open(spec["path"], durability="fsync" if self.fsync else "process")
        self.get, self.put, self.delete, self.shard_of = db.get, db.put, db.delete, db.shard_of
        self.get_batch = db.get_many

    def put_batch(self, pairs):
        self.db.put_many(pairs)

    def delete_batch(self, keys):
        self.db.write([("delete", k) for k in keys])


class EngineClient(_ShardkvBoth):
    name = "engine"
    readers_in_other_processes = writers_in_other_processes = False
    why_not = "the shardkv engine is in-process (one process per shard directory)"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        from shardkv.shards import ShardEngine  # noqa: PLC0415

        self.db = db = ShardEngine.open(spec["path"], durability="fsync" if self.fsync else "process")
        self.get, self.put, self.delete = db.get, db.put, db.delete
        self.get_batch = db.get_many

    def put_batch(self, pairs):
        self.db.apply([("put", k, v) for k, v in pairs])

    def delete_batch(self, keys):
        self.db.apply([("delete", k) for k in keys])


class LmdbClient(Client):
    """py-lmdb: one transaction per operation (what a per-request caller does), one write
    transaction per batch, one read transaction per get_batch."""

    name = "lmdb"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        import lmdb  # noqa: PLC0415

        self._lmdb = lmdb
        self._open()

    def _open(self):
        self.env = env = self._lmdb.open(self.spec["path"], map_size=self.spec["map_size"], sync=self.fsync, metasync=self.fsync, max_readers=256)
        begin = env.begin

        def get(key):
            with begin() as txn:
                return txn.get(key)

        def put(key, value):
            with begin(write=True) as txn:
                txn.put(key, value)

        def delete(key):
            with begin(write=True) as txn:
                return txn.delete(key)

        def above(key):
            with begin() as txn:
                cursor = txn.cursor()
                return cursor.item() if cursor.set_range(key + b"\x00") else None

        def below(key):
            with begin() as txn:
                cursor = txn.cursor()
                if cursor.set_range(key):
                    return cursor.item() if cursor.prev() else None
                return cursor.item() if cursor.last() else None

        self.get, self.put, self.delete, self.above, self.below = get, put, delete, above, below

    def put_batch(self, pairs):
        with self.env.begin(write=True) as txn:
            put = txn.put
            for k, v in pairs:
                put(k, v)

    def get_batch(self, keys):
        with self.env.begin() as txn:
            get = txn.get
            return [get(k) for k in keys]

    def delete_batch(self, keys):
        with self.env.begin(write=True) as txn:
            delete = txn.delete
            for k in keys:
                delete(k)

    def items(self, reverse=False):
        return _in_read_txn(self.env, reverse)

    def count(self):
        return int(self.env.stat()["entries"])

    def compact(self):
        """LMDB never shrinks its file: copy the environment with compact=True (free pages
        left out) and continue on the copy."""
        path = self.spec["path"]
        copy = path + ".compact"
        os.makedirs(copy)
        self.env.copy(copy, compact=True)
        self.env.close()
        shutil.rmtree(path)
        os.rename(copy, path)
        self._open()

    def close(self):
        self.env.close()


class RocksDBClient(Client):
    """rocksdict in raw mode; other processes can only open it read-only (`reader`)."""

    name = "rocksdb"
    writers_in_other_processes = False
    why_not = "RocksDB: one read-write process per database (readers open it read-only)"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions  # noqa: PLC0415

        options = Options(raw_mode=True)
        options.create_if_missing(True)
        access = AccessType.read_only() if reader else AccessType.read_write()
        self.db = db = Rdict(spec["path"], options, access_type=access)
        write_options = WriteOptions()
        write_options.sync = self.fsync  # the WAL is on; synced per write only with fsync
        db.set_write_options(write_options)
        self._write_batch = WriteBatch
        self.get, self.put, self.delete = db.get, db.put, db.delete

    def put_batch(self, pairs):
        wb = self._write_batch(raw_mode=True)
        put = wb.put
        for k, v in pairs:
            put(k, v)
        self.db.write(wb)

    def get_batch(self, keys):
        return self.db[list(keys)]  # multi-get

    def delete_batch(self, keys):
        wb = self._write_batch(raw_mode=True)
        delete = wb.delete
        for k in keys:
            delete(k)
        self.db.write(wb)

    def items(self, reverse=False):
        return self.db.items(backwards=reverse)

    def count(self):
        return _count(self.db.keys())

    def compact(self):
        self.db.flush()
        self.db.compact_range(None, None)

    def close(self):
        self.db.close()


class LevelDBClient(Client):
    """plyvel: one process per database, no read-only open."""

    name = "leveldb"
    readers_in_other_processes = writers_in_other_processes = False
    why_not = "LevelDB (plyvel): one process per database, no read-only open"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        import plyvel  # noqa: PLC0415

        self.db = db = plyvel.DB(spec["path"], create_if_missing=True)
        self.get = db.get
        if self.fsync:
            self.put = lambda k, v: db.put(k, v, sync=True)
            self.delete = lambda k: db.delete(k, sync=True)
        else:
            self.put, self.delete = db.put, db.delete

    def put_batch(self, pairs):
        with self.db.write_batch(transaction=True, sync=self.fsync) as wb:
            put = wb.put
            for k, v in pairs:
                put(k, v)

    def delete_batch(self, keys):
        with self.db.write_batch(transaction=True, sync=self.fsync) as wb:
            delete = wb.delete
            for k in keys:
                delete(k)

    def items(self, reverse=False):
        return self.db.iterator(reverse=reverse)

    def count(self):
        return _count(self.db.iterator(include_value=False))

    def compact(self):
        self.db.compact_range()

    def close(self):
        self.db.close()


class DiskcacheClient(Client):
    """diskcache.Cache (sqlite underneath, WAL), no eviction: every value set stays."""

    name = "diskcache"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        import diskcache  # noqa: PLC0415

        self.cache = cache = diskcache.Cache(spec["path"], eviction_policy="none", size_limit=2**62, cull_limit=0, statistics=0,
                                             tag_index=0, sqlite_synchronous=2 if self.fsync else 0)  # fmt: skip
        self.get, self.put, self.delete = cache.get, cache.set, cache.delete

    def put_batch(self, pairs):
        cache = self.cache
        with cache.transact():
            put = cache.set
            for k, v in pairs:
                put(k, v)

    def delete_batch(self, keys):
        cache = self.cache
        with cache.transact():
            delete = cache.delete
            for k in keys:
                delete(k)

    def items(self, reverse=False):
        # Keys come in database order (iterkeys); each value is one more get.
        return _with_values(self.cache.iterkeys(reverse=reverse), self.cache.get)

    def count(self):
        return len(self.cache)

    def compact(self):
        self.cache.check(fix=True)  # runs VACUUM (pages are also freed as they empty: auto_vacuum)

    def close(self):
        self.cache.close()


class SqliteClient(Client):
    """sqlite3: a table (k BLOB PRIMARY KEY, v BLOB) - a rowid table, as WITHOUT ROWID ones
    write 1 KiB values 7x slower - in WAL mode; every single operation its own transaction
    (autocommit), a batch one BEGIN ... COMMIT."""

    name = "sqlite"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        import sqlite3  # noqa: PLC0415

        self.conn = conn = sqlite3.connect(spec["path"], timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'OFF'}")
        conn.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL)")
        execute = conn.execute

        def get(key):
            row = execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
            return None if row is None else row[0]

        def put(key, value):
            execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

        def delete(key):
            execute("DELETE FROM kv WHERE k = ?", (key,))

        self.get, self.put, self.delete = get, put, delete

    def _in_transaction(self, sql, rows):
        conn = self.conn
        conn.execute("BEGIN")
        try:
            conn.executemany(sql, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def put_batch(self, pairs):
        self._in_transaction("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", pairs)

    def get_batch(self, keys):
        keys = list(keys)
        found = dict(self.conn.execute(f"SELECT k, v FROM kv WHERE k IN ({','.join('?' * len(keys))})", keys).fetchall())
        return [found.get(k) for k in keys]

    def delete_batch(self, keys):
        self._in_transaction("DELETE FROM kv WHERE k = ?", [(k,) for k in keys])

    def items(self, reverse=False):
        return self.conn.execute(f"SELECT k, v FROM kv ORDER BY k {'DESC' if reverse else 'ASC'}")

    def above(self, key):
        return self.conn.execute("SELECT k, v FROM kv WHERE k > ? ORDER BY k LIMIT 1", (key,)).fetchone()

    def below(self, key):
        return self.conn.execute("SELECT k, v FROM kv WHERE k < ? ORDER BY k DESC LIMIT 1", (key,)).fetchone()

    def count(self):
        return int(self.conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0])

    def compact(self):
        execute = self.conn.execute
        execute("PRAGMA wal_checkpoint(TRUNCATE)")
        execute("VACUUM")
        execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self):
        self.conn.close()


class RedisClient(Client):
    """redis-py on the server's unix socket; batches are MSET, MGET and DEL of many keys (each
    one atomic command)."""

    name = "redis"

    def __init__(self, spec, reader=False):
        super().__init__(spec, reader)
        import redis  # noqa: PLC0415

        self.r = r = redis.Redis(unix_socket_path=spec["socket"])
        self.get, self.put, self.delete = r.get, r.set, r.delete

    def put_batch(self, pairs):
        self.r.mset(dict(pairs))

    def get_batch(self, keys):
        return self.r.mget(keys)

    def delete_batch(self, keys):
        self.r.delete(*keys)

    def count(self):
        return int(self.r.dbsize())

    def used_memory(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def close(self):
        self.r.close()


CLIENTS: dict[str, type[Client]] = {
    "shardkv": ShardKVClient,
    "engine": EngineClient,
    "lmdb": LmdbClient,
    "rocksdb": RocksDBClient,
    "leveldb": LevelDBClient,
    "diskcache": DiskcacheClient,
    "sqlite": SqliteClient,
    "redis": RedisClient,
}


def connect(spec: dict, reader: bool = False) -> Client:
    """A client on the store `spec` describes; `reader`: a second process that only reads
    (RocksDB opens read-only then)."""
    return CLIENTS[spec["store"]](spec, reader)
