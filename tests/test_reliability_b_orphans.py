"""Issue #19, item 3: a killed supervisor must not leave its cluster's shared memory behind.

`shardkv start DIR`, then SIGKILL to the supervisor alone: the coordinator and the workers notice
that their parent is gone and exit, and the last of them unlinks every object of the cluster
(docs/IPC.md, "Orphans"); before the fix about 138 /dev/shm entries stayed until someone started
and stopped the directory again. When nobody is left to do it (the whole process group killed at
once), `shardkv status DIR` says "not running, N stale objects" and `shardkv stop DIR` removes
them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from cluster_support import SHARDS, alive, cluster_fixture, cluster_pids, nothing_left, shm_entries, wait_until

CLI_TIMEOUT = 60


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardkv.cli", *map(str, args)], capture_output=True, text=True, timeout=CLI_TIMEOUT)


def start(directory) -> dict:
    started = cli("start", directory, "--shards", SHARDS)
    assert started.returncode == 0 and started.stdout.startswith("started"), started
    for i in range(20):
        assert cli("put", directory, f"key-{i}", f"value-{i}").returncode == 0
    with open(os.path.join(directory, "run", "cluster.json")) as f:
        return json.load(f)


def test_the_last_process_of_a_cluster_whose_supervisor_was_killed_removes_its_objects(cluster):
    directory = cluster.directory
    info = start(directory)
    entries = shm_entries(directory)
    assert len(entries) > 100, entries  # 128 done semaphores, rings, index headers and tables
    children = [tuple(child) for child in info["children"]]

    os.kill(info["pid"], signal.SIGKILL)
    took = wait_until(lambda: not any(alive(pid, start_time) for pid, start_time in children), 15, message="exit of the orphaned workers")
    wait_until(lambda: not shm_entries(directory), 5, message=f"removal of the orphaned cluster's objects ({len(shm_entries(directory))} left)")
    run = sorted(os.listdir(os.path.join(directory, "run")))
    assert "cluster.json" not in run and not [name for name in run if name.startswith("config-")], run
    assert took < 10, f"the workers took {took:.1f} s to notice"

    status = cli("status", directory)
    assert status.returncode == 2 and status.stdout.strip() == f"not running: {os.path.realpath(directory)}", status
    db = cluster.open()  # the next cluster starts cleanly, with the data
    assert [db.get(b"key-%d" % i) for i in range(20)] == [b"value-%d" % i for i in range(20)]


def test_no_object_is_removed_while_a_process_of_the_cluster_still_runs(cluster):
    """The coordinator is stopped (SIGSTOP) when the supervisor is killed: the workers exit, but
    the objects stay while the coordinator lives (it may still use them); once it runs again,
    it notices, and, as the last one, removes them."""
    directory = cluster.directory
    info = start(directory)
    coordinator, workers = tuple(info["children"][0]), [tuple(child) for child in info["children"][1:]]
    entries = shm_entries(directory)
    os.kill(coordinator[0], signal.SIGSTOP)
    try:
        os.kill(info["pid"], signal.SIGKILL)
        wait_until(lambda: not any(alive(pid, start_time) for pid, start_time in workers), 15, message="exit of the orphaned workers")
        # No wait: a worker decides whether it is the last one (and unlinks) before it exits.
        assert shm_entries(directory) == [e for e in entries if e in shm_entries(directory)] and len(shm_entries(directory)) > 100, "objects were removed while the coordinator still lived"
        assert alive(*coordinator)
    finally:
        os.kill(coordinator[0], signal.SIGCONT)
    wait_until(lambda: not alive(*coordinator), 10, message="exit of the orphaned coordinator")
    wait_until(lambda: not shm_entries(directory), 5, message="removal of the objects by the last process")


def test_status_shows_and_stop_removes_the_objects_of_a_cluster_killed_at_once(cluster):
    directory = cluster.directory
    info = start(directory)
    os.killpg(os.getpgid(info["pid"]), signal.SIGKILL)  # everyone at once: nobody is left to clean up
    wait_until(lambda: not cluster_pids(directory), 10, message="death of the killed cluster")
    stale = shm_entries(directory)
    assert len(stale) > 100

    realpath = os.path.realpath(directory)
    status = cli("status", directory)
    assert status.returncode == 2, status
    assert status.stdout.startswith(f"not running, {len(stale)} stale objects: {realpath}"), status.stdout
    as_json = json.loads(cli("status", directory, "--json").stdout)
    assert as_json["status"] == "not running" and as_json["stale_objects"] == len(stale), as_json

    stopped = cli("stop", directory)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"not running: {realpath} (removed {len(stale)} stale objects)", stopped
    assert nothing_left(directory)
    assert "cluster.json" not in os.listdir(os.path.join(directory, "run"))
    status = cli("status", directory)
    assert status.returncode == 2 and status.stdout.strip() == f"not running: {realpath}", status
    again = cli("stop", directory)
    assert again.returncode == 0 and again.stdout.strip() == f"not running: {realpath}", again
