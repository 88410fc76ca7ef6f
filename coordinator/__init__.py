"""shardkv.coordinator: the cluster's processes above the shards: the supervisor (starts,
restarts and stops the others), the coordinator (shard map, two-phase commit, decision log),
the store's MANIFEST and the run files of a running cluster (docs/ARCHITECTURE.md)."""
