"""The distribution lists every sub-package: a plain (non-editable) install must hold them all.

An editable install finds a sub-package that pyproject.toml forgot, so the test suite alone
would never notice; `pip install .` would then ship a `shardkv` that fails on import."""

import os
import tomllib

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


def test_every_package_folder_is_listed():
    table = _setuptools_table()
    missing = set(_package_folders(table)) - set(table["packages"])
    assert not missing, f"sub-packages missing from [tool.setuptools] packages: {sorted(missing)}"


def test_every_listed_package_has_a_folder():
    table = _setuptools_table()
    unknown = set(table["packages"]) - set(_package_folders(table))
    assert not unknown, f"listed packages with no folder: {sorted(unknown)}"
