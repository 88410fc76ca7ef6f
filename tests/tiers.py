"""The test tiers: every test has exactly one of the markers `unit`, `engine`, `cluster` and
`soak` (registered in pyproject.toml; what each means is said there and in README.md, "Tests").

A test that uses a cluster fixture (CLUSTER_FIXTURES) is `cluster` unless it has a tier of its
own; any other test says its tier itself (a module's `pytestmark` or a decorator). Collection
fails if a test has none or more than one, so that a new test cannot forget it. tests/conftest.py
installs the hook; tests/test_tiers.py checks it.
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "engine", "cluster", "soak")
# Fixtures that run a cluster (each module's `cluster`, built on cluster_support.cluster_fixture;
# the Redis Cluster; test_backend_conformance's `backend`, one of the two).
CLUSTER_FIXTURES = ("cluster", "redis_cluster", "backend")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    """Give a test that runs on a cluster fixture the `cluster` tier unless it has a tier, then
    refuse a collection where any test has no tier, or more than one."""
    wrong = []
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        if not tiers and any(name in item.fixturenames for name in CLUSTER_FIXTURES):
            item.add_marker("cluster")
            tiers = {"cluster"}
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {sorted(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError("every test needs exactly one tier marker (" + ", ".join(TIERS) + "; tests/tiers.py):\n  " + "\n  ".join(wrong))

