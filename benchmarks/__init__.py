"""Benchmarks for shardkv, run from the repository root: `python -m benchmarks [--quick]` for the
whole suite (every seed workload against every peer installed, one table), or
`python -m benchmarks.<name>` for one of the older, focused ones."""
