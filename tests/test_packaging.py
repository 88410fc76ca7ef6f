"""The distribution lists every sub-package: a plain (non-editable) install must hold them all.

An editable install finds a sub-package that pyproject.toml forgot, so the test suite alone
would never notice; `pip install .` would then ship a `shardkv` that fails on import. Also: the
extras (#22 item 9) and the license in a built wheel."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools_table() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_folders(table: dict) -> dict[str, str]:
    """Every folder with an __init__.py under a mapped folder, by the package name it installs as."""
    found = {}
    for package, folder in table["package-dir"].items():
        base = os.path.join(ROOT, folder)
        for dirpath, _dirs, files in os.walk(base):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                relative = os.path.relpath(dirpath, base)
                found[package if relative == "." else package + "." + relative.replace(os.sep, ".")] = dirpath
    return found


@pytest.mark.unit
def test_every_package_folder_is_listed():
    table = _setuptools_table()
    missing = set(_package_folders(table)) - set(table["packages"])
    assert not missing, f"sub-packages missing from [tool.setuptools] packages: {sorted(missing)}"


@pytest.mark.unit
def test_every_listed_package_has_a_folder():
    table = _setuptools_table()
    unknown = set(table["packages"]) - set(_package_folders(table))
    assert not unknown, f"listed packages with no folder: {sorted(unknown)}"


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


@pytest.mark.unit
def test_the_main_job_installs_no_peer_store():
    """#22 item 9: `pip install ".[bench]"` installed matplotlib and five peer stores that
    `shardkv bench` does not use; they are the `peers` extra of benchmarks/ now."""
    extras = _project()["optional-dependencies"]
    peers = {"lmdb", "rocksdict", "redis", "plyvel", "diskcache", "matplotlib"}
    names = lambda requirements: {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in requirements}  # noqa: E731
    assert not names(extras["bench"]) & peers
    assert names(extras["peers"]) >= peers
    assert {"rich", "prometheus_client"} <= names(_project()["dependencies"])


@pytest.mark.engine
def test_license_is_spdx_and_ships_in_the_wheel(tmp_path):
    """An SPDX license string, and LICENSE in the wheel (a built one: what `pip install` gets),
    with the CLI package and every dependency the console script needs."""
    project = _project()
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert os.path.exists(os.path.join(ROOT, "LICENSE"))
    # Build from a copy: pip builds in the source folder, which the other tests use meanwhile.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests", "docs", "benchmarks"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("shardkv-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "shardkv/cli/__init__.py" in names and "shardkv/ops/exitcodes.py" in names
    assert "License-Expression: MIT" in metadata.splitlines()
    for requirement in ("rich", "prometheus_client"):
        assert any(line.startswith(f"Requires-Dist: {requirement}") for line in metadata.splitlines())
