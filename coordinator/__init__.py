"""shardkv.coordinator: (built in a later issue)."""
