"""Helpers of the command-line tests (test_cli_errors.py, test_cli_status.py): run the real
`shardkv` console script, check a one-line error, stop what a test started.

Imported as a plain module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from cluster_support import cluster_pids, shm_entries
from shardkv.ops.cluster import stop_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60  # seconds one command may take
# The console script installed beside this interpreter (pip install -e . puts it in bin/).
SHARDKV = shutil.which("shardkv", path=os.path.dirname(sys.executable)) or shutil.which("shardkv")


def shardkv(*args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run the installed `shardkv` console script with `args`; its exit code and output."""
    assert SHARDKV, "the shardkv console script is not installed (pip install -e .)"
    return subprocess.run([SHARDKV, *map(str, args)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit `code`, nothing on stdout, one line `shardkv: ...` on stderr holding `words`."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardkv: "), done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def stop_and_check(directory) -> None:
    """Stop the cluster of `directory` if one runs; then no process and no /dev/shm entry of it
    may be left."""
    stop_cluster(directory)
    assert not cluster_pids(directory), cluster_pids(directory)
    assert shm_entries(directory) == []
