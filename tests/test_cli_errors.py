"""Errors of the real `shardkv` console script: one line on stderr, never a traceback, and the
exit code of the table in shardkv/ops/exitcodes.py (which README.md shows); no command but
`start` creates a store. No test here starts a cluster (those are in test_cli_status.py).

Each test uses its own tmp_path and checks that nothing was created there that it did not make.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from shardkv.ops import exitcodes

from cli_support import ROOT, assert_one_line_error, shardkv

pytestmark = pytest.mark.engine

@pytest.fixture
def places(tmp_path):
    """A file, a missing path, and an existing directory that holds no store."""
    (tmp_path / "FILE").write_text("not a store\n")
    (tmp_path / "empty").mkdir()
    return {"file": tmp_path / "FILE", "typo": tmp_path / "typo-dir", "empty": tmp_path / "empty", "root": tmp_path}


# The commands that need a store, with the other arguments each takes.
NEEDS_A_STORE = [
    ("get", "k"), ("put", "k", "v"), ("delete", "k"), ("scan",), ("min",), ("max",), ("above", "k"), ("below", "k"),
    ("len",), ("status",), ("stop",), ("compact",), ("verify",),
]  # fmt: skip


@pytest.mark.parametrize("place", ["typo", "file", "empty"])
def test_no_command_but_start_creates_a_store(places, place):
    """#22 items 1 and 2: `get /typo-dir k` used to create a full store and say "key not found";
    `status FILE` raised NotADirectoryError, `get FILE k` FileExistsError, `verify /nonexistent`
    exited 1 (the code for "corrupt") with a traceback."""
    target = places[place]
    before = sorted(os.listdir(places["root"]))
    for command, *rest in NEEDS_A_STORE:
        done = shardkv(command, target, *rest)
        assert_one_line_error(done, exitcodes.NO_STORE, str(target))
    assert sorted(os.listdir(places["root"])) == before  # nothing created, not even the typo
    assert os.listdir(places["empty"]) == []


def test_salvage_of_nothing_leaves_no_new_directory(places):
    """#22 item 1: `salvage /nonexistent NEWDIR` crashed and left an empty NEWDIR."""
    for source in (places["typo"], places["file"], places["empty"]):
        done = shardkv("salvage", source, places["root"] / "new")
        assert_one_line_error(done, exitcodes.NO_STORE)
        assert not (places["root"] / "new").exists()


def test_copy_and_start_on_a_file(places):
    assert_one_line_error(shardkv("copy", places["typo"], places["empty"]), exitcodes.NO_STORE, str(places["typo"]))
    assert_one_line_error(shardkv("start", places["file"]), exitcodes.NO_STORE, "not a directory")
    assert sorted(os.listdir(places["root"])) == ["FILE", "empty"]


def test_usage_errors_exit_4(places):
    d = places["empty"]
    for args in (
        ["get", d],  # a missing argument
        ["get", d, "k", "extra"],
        ["frobnicate", d],  # no such command
        ["scan", d, "--limit", "-1"],
        ["status", d, "--serve", "80000"],
        ["status", d, "--serve", "0", "--watch"],
        ["status", d, "--json", "--format", "prometheus"],
        ["bench", "--engine"],  # moved to benchmarks/: it says where
        ["start", d, "--shards", "0"],
    ):
        assert_one_line_error(shardkv(*args), exitcodes.USAGE)
    # Bad input is found before the store is looked for.
    assert_one_line_error(shardkv("get", places["typo"], "x'0g'"), exitcodes.USAGE, "hex literal")
    assert os.listdir(d) == [] and not places["typo"].exists()


def test_every_command_has_help():
    top = shardkv("--help")
    assert top.returncode == 0 and top.stderr == ""
    commands = re.findall(r"^    ([a-z]+)\s", top.stdout, re.M)
    expected = {"start", "stop", "status", "compact", "verify", "salvage", "get", "put", "delete", "scan", "min", "max", "above", "below", "len", "copy", "bench"}
    assert set(commands) == expected
    for code, name, _ in exitcodes.TABLE:  # --help ends with the exit codes
        assert re.search(rf"^\s+{code}\s+{name}\s", top.stdout, re.M), name
    for command in sorted(expected):
        done = shardkv(command, "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: shardkv {command}") and done.stderr == "", command
    assert shardkv("--version").stdout.startswith("shardkv ")


def test_a_damaged_manifest_is_corrupt(places):
    """A store whose MANIFEST is damaged: exit 3 (CORRUPT) whatever the command."""
    store = places["root"] / "store"
    store.mkdir()
    (store / "MANIFEST").write_text("{not json")
    assert_one_line_error(shardkv("get", store, "k"), exitcodes.CORRUPT, "MANIFEST")
    assert_one_line_error(shardkv("start", store), exitcodes.CORRUPT, "MANIFEST")
    verified = shardkv("verify", store)  # its report, on stdout, names the damaged file
    assert verified.returncode == exitcodes.CORRUPT and "MANIFEST" in verified.stdout and verified.stderr == ""
    assert sorted(os.listdir(store)) == ["MANIFEST"]


def test_an_os_error_is_one_line(places):
    """An OSError (here: a directory that cannot be read) is one line and exit 6 (FAILED)."""
    os.chmod(places["empty"], 0)
    try:
        if os.access(places["empty"], os.R_OK):
            pytest.skip("running as root: permissions do not stop reads")
        assert_one_line_error(shardkv("verify", places["empty"]), exitcodes.FAILED, "Permission denied")
    finally:
        os.chmod(places["empty"], 0o700)


def test_readme_shows_the_exit_codes():
    """README.md's CLI section has the table of shardkv/ops/exitcodes.py, row for row."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## CLI") :]
    section = section[: section.index("\n## ", 1)]
    for code, name, meaning in exitcodes.TABLE:
        assert f"| {code} | {name} | {meaning} |" in section, f"README.md, CLI: no row for exit code {code}"


def test_import_shardkv_stays_free_of_the_cli_libraries():
    """rich and prometheus_client are the command line's: the library never imports them (nor
    the CLI, nor the benchmarks), and the client and ops.status no longer import each other."""
    code = (
        "import sys, shardkv, shardkv.client, shardkv.aio, shardkv.ops.status, shardkv.ops.cluster\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'prometheus_client', 'benchmarks') or m == 'shardkv.cli' or m.startswith('shardkv.cli.'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    # The old circles, read from the sources (importing shardkv imports the client anyway):
    # client <-> ops.status and cli <-> benchmarks.
    assert not imports_of(os.path.join(ROOT, "ops", "status.py")) & {"shardkv.client", "shardkv.aio", "shardkv.cli"}
    cli_imports = set().union(*(imports_of(path) for path in python_files(os.path.join(ROOT, "shardkv", "cli"))))
    assert not {name for name in cli_imports if name.split(".")[0] == "benchmarks"}
    bench_imports = set().union(*(imports_of(path) for path in python_files(os.path.join(ROOT, "benchmarks"))))
    assert not {name for name in bench_imports if name == "shardkv.cli" or name.startswith("shardkv.cli.")}
    # And no product code edits sys.path to find something.
    for folder in ("shardkv", "ops", "coordinator", "shards", "wal"):
        for path in python_files(os.path.join(ROOT, folder)):
            with open(path, encoding="utf-8") as f:
                assert "sys.path.insert" not in f.read(), path


def python_files(folder: str) -> list[str]:
    """Every .py file under `folder`."""
    return [os.path.join(dirpath, name) for dirpath, _, files in os.walk(folder) for name in files if name.endswith(".py")]


def imports_of(path: str) -> set[str]:
    """The modules a source file imports, anywhere in it (also inside functions)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found
