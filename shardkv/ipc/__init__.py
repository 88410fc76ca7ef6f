"""shardkv.ipc: the shared-memory layout and messages between clients and workers (docs/IPC.md)."""
