"""Fixtures shared by several test modules, and the test tiers (tests/tiers.py: every test has
exactly one of the markers unit, engine, cluster, soak; collection fails otherwise).

`redis_cluster`: one real Redis Cluster (3 masters, 3 replicas, see redis_cluster_support.py)
per test session (per xdist worker), started on first use and stopped by pid at the end. Where
redis-server or redis-py is missing the tests that use it are skipped with the reason shown in
the summary (`-ra`), unless SHARDKV_REQUIRE_REDIS=1 (set by .ci/run): then they fail, so that
CI cannot pass without running them.
"""

from __future__ import annotations

import pytest

from redis_cluster_support import LocalRedisCluster, require_redis
from tiers import pytest_collection_modifyitems  # noqa: F401 (the tier check, as this directory's hook)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A running LocalRedisCluster shared by the session's tests (AOF on, appendfsync everysec:
    the durability shardkv calls "interval"). Tests keep apart by namespace, not by flushing."""
    require_redis()
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), appendonly=True)
    try:
        cluster.start()
        yield cluster
    finally:
        problems = cluster.stop()
    assert not problems, f"the session's Redis Cluster had to be killed: {problems}"
