"""shardkv.shards: the engine that serves one shard (log + index) in-process.

`ShardEngine` and `DirectoryLocked` are imported on first use: a tool that imports a module of
this package (a test, the benchmarks' engine rows) loads the engine and its logging only if
it uses them. (Clients import nothing of this package: docs/ARCHITECTURE.md, "Layers".)
"""

__all__ = ["DirectoryLocked", "ShardEngine"]


def __getattr__(name: str):
    if name in __all__:
        from shardkv.shards import engine  # noqa: PLC0415

        return getattr(engine, name)
    raise AttributeError(f"module 'shardkv.shards' has no attribute {name!r}")
