"""Issue #22, item 6: readable processes. Each worker's command line used to carry about 6 KB of
JSON (`ps aux` printed 19 KB for a 2-shard cluster); the configuration now travels in an
owner-only file in the run directory and each process names itself (docs/IPC.md, "Processes")."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cluster_support import SHARDS, cluster_fixture


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def test_each_process_is_named_and_its_command_line_is_short(cluster):
    db = cluster.open()
    db.put(b"k", b"v")
    info = cluster.info()
    directory = os.path.realpath(cluster.directory)
    expected = {info["pid"]: f"shardkv: supervisor of {directory}", info["children"][0][0]: f"shardkv: coordinator of {directory}"}
    expected.update({pid: f"shardkv: shard {shard} of {directory}" for shard, (pid, _) in enumerate(info["children"][1:])})
    assert len(expected) == SHARDS + 2
    total = 0
    for pid, title in expected.items():
        cmdline = _cmdline(pid)
        shown = cmdline.replace(b"\0", b" ").strip().decode()
        assert shown == title, (pid, shown)
        assert b"{" not in cmdline and len(cmdline) < len(title) + 256, cmdline
        total += len(cmdline)
    assert total < 2048, f"the cluster's command lines take {total} bytes"

    config = os.path.join(cluster.directory, "run", f"config-{info['cluster']}.json")
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    with open(config) as f:
        assert json.load(f)["names"] == info["names"]
