"""A cluster member's life: how a worker or the coordinator process ends.

The rules every process the supervisor starts follows on its way out: the exit codes the
supervisor reads (quarantine a corrupt shard, restart after a storage failure), how a process
that reads STOPPING in the control block tells the supervisor's stop from a stray write, and how
the last process of a cluster whose supervisor was killed removes the cluster's shared objects
and run files. Workers (shards/worker.py) and the coordinator (coordinator/coordinator.py) both
call it; it imports neither.
"""

from __future__ import annotations

import fcntl
import os
import time

from shardkv.coordinator.runfiles import CLUSTER_FILE, SUPERVISOR_LOCK, config_path, read_cluster_file, run_dir
from shardkv.ipc.layout import STOPPING, ControlBlock, leave_orphaned_cluster

EXIT_CORRUPT = 65  # the shard's log is corrupt: the supervisor quarantines it instead of restarting
EXIT_STORAGE = 66  # a write or fsync failed: the supervisor restarts the worker, which recovers
STOP_CONFIRM = 2.0  # how long a process that read STOPPING waits for the SIGTERM that follows it


def stop_confirmed(control: ControlBlock, asked_to_stop, supervisor_pid: int, log) -> bool:
    """Called when a serving loop ended with no failure while the supervisor lives and sent no
    SIGTERM: the control block said STOPPING. The supervisor sends SIGTERM right after it sets
    STOPPING, so STOPPING without it is a stray write, which the supervisor puts back within
    50 ms (docs/IPC.md, "Who writes what"). True: really stop. False: serve on.
    `asked_to_stop()`: whether SIGTERM came."""
    deadline = time.monotonic() + STOP_CONFIRM
    while time.monotonic() < deadline:
        if asked_to_stop() or os.getppid() != supervisor_pid:
            return True
        if control.state != STOPPING:
            log.warning("the control block said stopping, but the supervisor did not stop us; serving on")
            return False
        time.sleep(0.01)
    return True


def leave_cluster(member: int, config: dict, log) -> None:
    """On the way out of a cluster's process (a worker's or the coordinator's): if the
    supervisor is gone (killed: nobody will unlink the cluster's objects), the last of the
    cluster's processes to leave removes them (layout.leave_orphaned_cluster) and the
    cluster's run files. `member`: the descriptor from join_cluster()."""
    if os.getppid() == config["supervisor_pid"]:
        os.close(member)  # the supervisor unlinks everything when it stops
        return
    removed = leave_orphaned_cluster(member, config["names"])
    if removed is None:
        return  # another process of the cluster still runs; it will
    remove_run_files(config)
    log.warning("the supervisor is gone; removed the cluster's shared objects", removed=len(removed))


def remove_run_files(config: dict) -> None:
    """Remove cluster.json and the configuration file of an orphaned cluster, if they are its
    own and no new supervisor holds the directory (then they are that one's business)."""
    directory = config["directory"]
    try:
        fd = os.open(os.path.join(run_dir(directory), SUPERVISOR_LOCK), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    try:
        info = read_cluster_file(directory)
        if info is not None and info.get("cluster") == config.get("cluster"):
            os.unlink(os.path.join(run_dir(directory), CLUSTER_FILE))
        try:
            os.unlink(config_path(directory, config["cluster"]))
        except FileNotFoundError:
            pass
    finally:
        os.close(fd)
