"""The tier check of tests/tiers.py, on a sample test file: a test without a tier, or with two,
fails the collection; one that uses a cluster fixture gets `cluster`, which `-m` then selects."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

INI = """[pytest]
addopts = --strict-markers -p no:cacheprovider
markers =
    unit: u
    engine: e
    cluster: c
    soak: s
"""
CONFTEST = """
import pytest
from tiers import pytest_collection_modifyitems  # noqa: F401


@pytest.fixture
def cluster():
    return "a cluster"
"""


def collect(pytester, monkeypatch, source: str, *args: str):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the sample needs no plugin
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=source)
    return pytester.runpytest_inprocess("--collect-only", "-q", *args)


def test_a_test_without_a_tier_fails_the_collection(pytester, monkeypatch):
    result = collect(pytester, monkeypatch, "import pytest\n\n@pytest.mark.unit\ndef test_marked():\n    pass\n\ndef test_forgotten():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*every test needs exactly one tier marker*", "*test_sample.py::test_forgotten: no tier*"])
    assert "test_marked" not in result.stderr.str()


def test_a_test_with_two_tiers_fails_the_collection(pytester, monkeypatch):
    result = collect(pytester, monkeypatch, "import pytest\n\npytestmark = pytest.mark.engine\n\n@pytest.mark.unit\ndef test_both():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "test_sample.py::test_both: ['engine', 'unit']" in result.stderr.str()


def test_a_cluster_fixture_gives_the_cluster_tier(pytester, monkeypatch):
    source = "import pytest\n\ndef test_on_a_cluster(cluster):\n    pass\n\n@pytest.mark.soak\ndef test_long(cluster):\n    pass\n\n@pytest.mark.unit\ndef test_quick():\n    pass\n"
    result = collect(pytester, monkeypatch, source, "-m", "cluster")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["test_sample.py::test_on_a_cluster", "1/3 tests collected (2 deselected)*"])
