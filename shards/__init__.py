"""shardkv.shards: the engine that serves one shard (log + index) in-process.

`ShardEngine` and `DirectoryLocked` are imported on first use: a client that needs only the
probe's definition (`shards/probe.py`) or the batch types (`shards/uniform.py`) does not
load the engine and its logging.
"""

__all__ = ["DirectoryLocked", "ShardEngine"]


def __getattr__(name: str):
    if name in __all__:
        from shardkv.shards import engine  # noqa: PLC0415

        return getattr(engine, name)
    raise AttributeError(f"module 'shardkv.shards' has no attribute {name!r}")
