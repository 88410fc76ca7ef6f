"""shardkv.shards: the engine that serves one shard (log + index) in-process."""

from shardkv.shards.engine import DirectoryLocked, ShardEngine

__all__ = ["DirectoryLocked", "ShardEngine"]
