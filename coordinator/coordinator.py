"""The coordinator process: owns the shard map and publishes it in the control block.

Hash slot h belongs to shard h mod N. (Cross-shard two-phase commit joins it in a later step.)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

from shardkv.ipc.layout import HASH_SLOTS, PROC_UP, STOPPING, ControlBlock, map_shared_memory
from shardkv.log import configure_service_logging, get_logger


def default_shard_map(shards: int) -> np.ndarray:
    """The map of a new cluster: slot h -> shard h mod `shards`."""
    return (np.arange(HASH_SLOTS) % shards).astype("<u2")


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m shardkv.coordinator.coordinator CONFIG_JSON`."""
    config = json.loads((sys.argv[1:] if argv is None else argv)[0])
    configure_service_logging(config["log_dir"], "coordinator")
    log = get_logger("shardkv.coordinator")
    buf = map_shared_memory(config["names"]["control"])
    control = ControlBlock(buf, config["shards"], config["leases"])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control.shard_map[:] = default_shard_map(config["shards"])
    control.map_version = control.map_version + 1
    control.procs[0]["state"] = PROC_UP
    log.info("started", pid=os.getpid(), map_version=control.map_version)
    while not stopping and control.state != STOPPING and os.getppid() == config["supervisor_pid"]:
        time.sleep(0.2)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
