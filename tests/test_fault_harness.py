"""A bounded round of the fault harness (tests/faults/): about 20 s of workload from three
client processes while workers, the coordinator, the supervisor and clients are killed with
SIGKILL (some workers in the middle of their recovery) and named fault points fire; then
every acknowledged operation is checked against the oracle. `python -m tests.faults
--minutes N` runs the same for longer."""

from __future__ import annotations

import pytest

from cluster_support import nothing_left, shm_entries, wait_until
from faults.harness import Harness

pytestmark = pytest.mark.soak


def test_a_round_of_kills_loses_nothing_acknowledged(tmp_path):
    directory = str(tmp_path / "db")
    report = Harness(directory, seconds=20, clients=3, seed=20261122, say=lambda *a: None).run()
    assert report["anomalies"] == [], report
    assert report["kills_total"] >= 6, report
    assert report["kills"].get("supervisor", 0) + report["kills"].get("coordinator", 0) >= 1, report
    assert report["fault_points_fired"], report
    # The workload really ran between the kills (how much depends on the restart backoff the
    # kills cause and on the machine's load): every kind of operation was acknowledged.
    assert report["operations_verified"] >= 50, report
    for kind in ("put ok", "incr ok", "transfer ok", "append ok", "read ok"):
        assert report["acknowledged"].get(kind, 0) > 0, (kind, report)
    wait_until(lambda: nothing_left(directory), 20, message="every process of the harness gone")
    assert not shm_entries(directory)
