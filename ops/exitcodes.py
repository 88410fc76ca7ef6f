"""The exit codes of the `shardkv` command, in one place (README.md, "CLI", shows this table).

Every command uses the same table, so a script can tell a missing key from a missing store, a
stopped cluster from a corrupt one, and a typo in the command line from all of them:

    0  OK          success; `status`: healthy
    1  NOT_FOUND   the key (or the neighbour asked for) does not exist, the store is empty;
                   `status`: degraded (something restarting, unresponsive or quarantined)
    2  DOWN        the cluster is not running or down (`status`); a data command, `compact` or
                   `copy` on a store that no cluster serves (start it with `shardkv start DIR`)
    3  CORRUPT     `verify` found damage, `salvage` could not save everything, a request met a
                   corrupt (quarantined) shard or a damaged MANIFEST
    4  USAGE       bad command line: unknown option, missing argument, bad hex literal, a key
                   too long, a --shards that the store was not created with
    5  NO_STORE    DIR does not exist, is not a directory, or holds no shardkv store (no command
                   but `start` creates one; `salvage` and `copy` write only into their target)
    6  FAILED      anything else that failed: a cluster that would not start or stop, a request
                   that failed (Unavailable, Busy, Conflict, StorageError), a permission denied,
                   a port already in use; the one-line message says which
  130  INTERRUPTED Ctrl-C

Whatever the error, the command prints one line, `shardkv: <message>`, on stderr; set
SHARDKV_DEBUG=1 for a traceback of an unexpected one.

The cluster's own processes have exit codes of their own, which the user of `shardkv` never
sees: the supervisor's starter (`coordinator/runfiles.py`: already running, bad configuration,
start failed), read by `start_cluster` and `shardkv.open()`, and a worker's (`shards/worker.py`:
corrupt, storage), read by the supervisor.
"""

from __future__ import annotations

OK = 0
NOT_FOUND = 1
DEGRADED = 1  # `status`: the same code as a missing key: "not everything is there"
DOWN = 2
NOT_RUNNING = 2  # `status` of a store no cluster serves: down, as before
CORRUPT = 3
USAGE = 4
NO_STORE = 5
FAILED = 6
INTERRUPTED = 130

# (code, name, meaning) in the order README.md lists them; tests/test_cli_errors.py checks that
# the README's table says the same.
TABLE: tuple[tuple[int, str, str], ...] = (
    (OK, "ok", "success; `status`: healthy"),
    (NOT_FOUND, "not found", "no such key (or neighbour), the store is empty; `status`: degraded"),
    (DOWN, "down", "no cluster serves the store (`status`: not running or down; data commands, `compact`, `copy`: start it first)"),
    (CORRUPT, "corrupt", "`verify` found damage, `salvage` lost something, a request met a corrupt shard"),
    (USAGE, "usage", "bad command line: option, argument, hex literal, key size, `--shards` of an existing store"),
    (NO_STORE, "no store", "DIR does not exist, is not a directory or holds no shardkv store (nothing is created)"),
    (FAILED, "failed", "anything else (a start or stop that failed, Unavailable, Busy, permission denied): the message says what"),
    (INTERRUPTED, "interrupted", "Ctrl-C"),
)


def describe() -> str:
    """The table as the lines `shardkv --help` ends with."""
    return "\n".join(f"  {code:>3}  {name:<11}  {meaning}" for code, name, meaning in TABLE)


__all__ = ["CORRUPT", "DEGRADED", "DOWN", "FAILED", "INTERRUPTED", "NOT_FOUND", "NOT_RUNNING", "NO_STORE", "OK", "TABLE", "USAGE", "describe"]
