"""shardkv.ops: running and looking after a store from outside its processes.

cluster (find a store, start and stop its supervisor, read its health without attaching),
status (what `health()` and `shardkv status` show), metrics (the Prometheus exposition),
verify and salvage (offline checks and rescue of damaged logs), exitcodes (the exit codes of the
`shardkv` command). The library side (status) imports neither client nor any CLI library.
"""
