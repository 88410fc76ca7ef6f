"""Named fault points: places where a test can make a process kill itself (`kill -9`).

Off unless the environment variable SHARDKV_FAULTS is set when the process starts, and then
the cost of a point that is not armed is one set lookup. The variable lists points as
`name@N` separated by commas: the process SIGKILLs itself the Nth time it reaches `name`
(N defaults to 1). With SHARDKV_FAULTS_STATE set to a directory, each point fires only once
across restarts (a marker file remembers it), so a restarted process recovers undisturbed.

Hold points keep a background step of a process waiting for as long as a test needs:
SHARDKV_HOLDS lists `name:PATH` items, and the process waits at point `name` while the file PATH
exists (`hold`).

Disk faults work the same way through SHARDKV_DISK_FAULTS, a list of `op:ERRNO@N`: the Nth
file operation `op` of the process (see wal/fileio.py: write, fsync, create, rename, ...) fails
with OSError(ERRNO) (ENOSPC, EIO, ...) instead of running; `@N+` makes it fail from the Nth on.
`role/op:ERRNO@N` counts and fails only in the processes of that role (`coordinator`, `worker`:
each names itself with set_role when it starts). `op:ERRNO@while=PATH` fails every `op` while
the file PATH exists: a full disk that a test frees by deleting PATH (no comma in PATH).

The points (docs/TRANSACTIONS.md, "Crash cases"):
  coordinator.prepare_sent   - PREPARE sent to some participants, not to all
  coordinator.decision_logged - the COMMIT decision is logged, no COMMIT sent yet
  coordinator.commit_sent    - COMMIT delivered to some participants, not to all
  worker.prepare_logged      - a participant logged PREPARE and has not voted
  worker.voted               - a participant voted (its answer is in the ring)
  shard.commit_logged        - a participant logged COMMIT and has not applied it to its index
  worker.answered_unindexed  - a worker answered a big batch (APPLY or COMMIT) it has logged and
                               not indexed yet

The hold points:
  sortedkeys.background_sort - a shard's background sort of its ordered view, before it sorts
"""

from __future__ import annotations

import errno
import os
import signal
import time

_ARMED: dict[str, int] = {}
_HITS: dict[str, int] = {}
_STATE_DIR = os.environ.get("SHARDKV_FAULTS_STATE")
_role: str | None = None  # this process's role, for disk faults of one role (set_role)

for _item in filter(None, os.environ.get("SHARDKV_FAULTS", "").split(",")):
    _name, _, _count = _item.strip().partition("@")
    _ARMED[_name] = int(_count or 1)
_HOLDS = {name.strip(): path for name, _, path in (item.partition(":") for item in filter(None, os.environ.get("SHARDKV_HOLDS", "").split(",")))}


def _disk_faults(spec: str):
    """The fileio injector described by SHARDKV_DISK_FAULTS."""
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, rest = item.partition(":")
        role, _, op = head.rpartition("/")
        code, _, count = rest.partition("@")
        if count.startswith("while="):
            rules.append((role or None, op, getattr(errno, code), count[len("while=") :], False))
            continue
        persistent = count.endswith("+")
        rules.append((role or None, op, getattr(errno, code), int(count.rstrip("+") or 1), persistent))
    seen: dict[str, int] = {}

    def inject(op: str, target) -> None:
        for role, rule_op, code, nth, persistent in rules:
            if rule_op != op or (role is not None and role != _role):
                continue
            if type(nth) is str:  # while=PATH
                if os.path.exists(nth):
                    raise OSError(code, f"{os.strerror(code)} (injected at {op} while {nth} exists)")
                continue
            seen[op] = hits = seen.get(op, 0) + 1
            if hits == nth or (persistent and hits > nth):
                if _STATE_DIR is not None and not persistent:
                    marker = os.path.join(_STATE_DIR, f"disk-{op}.fired")
                    try:
                        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    except FileExistsError:
                        return
                raise OSError(code, f"{os.strerror(code)} (injected at {op} #{hits})")

    return inject


if os.environ.get("SHARDKV_DISK_FAULTS"):
    from shardkv.wal import fileio

    fileio.set_injector(_disk_faults(os.environ["SHARDKV_DISK_FAULTS"]))


def point(name: str) -> None:
    """A fault point: kill this process here if `name` is armed and its count is reached."""
    if not _ARMED or name not in _ARMED:
        return
    hits = _HITS.get(name, 0) + 1
    _HITS[name] = hits
    if hits != _ARMED[name]:
        return
    if _STATE_DIR is not None:
        marker = os.path.join(_STATE_DIR, f"{name}.fired")
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def hold(name: str) -> None:
    """A hold point: wait here while the file SHARDKV_HOLDS names for `name` exists."""
    path = _HOLDS.get(name) if _HOLDS else None
    while path is not None and os.path.exists(path):
        time.sleep(0.01)


def set_role(role: str) -> None:
    """Name this process's role ("coordinator", "worker") for role-scoped disk faults."""
    global _role
    _role = role


def armed() -> bool:
    """Whether any fault point is armed in this process."""
    return bool(_ARMED)
