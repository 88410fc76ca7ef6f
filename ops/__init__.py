"""shardkv.ops: (built in a later issue)."""
