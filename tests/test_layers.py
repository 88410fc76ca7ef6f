"""The package's layers (docs/ARCHITECTURE.md, "Layers"): which part may import which.

Read from the source (every import statement, those inside functions included, those under
`if TYPE_CHECKING:` left out), so a new import that breaks a layer fails here before it makes a
circle that only shows up as a half-initialised module at run time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folder in the repository -> package it installs as (pyproject.toml, package-dir).
PACKAGES = {"shardkv": "shardkv", "shards": "shardkv.shards", "coordinator": "shardkv.coordinator", "wal": "shardkv.wal", "ops": "shardkv.ops"}
CLIENT_STACK = ("shardkv.client", "shardkv.aio", "shardkv.backends", "shardkv.cli", "shardkv.requests", "shardkv.api")


def _modules() -> dict[str, str]:
    """Module name -> source path, for every module of the package."""
    found = {}
    for folder, package in PACKAGES.items():
        for here, _dirs, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                relative = os.path.relpath(os.path.join(here, name), os.path.join(ROOT, folder))
                parts = relative[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([package, *parts])] = os.path.join(here, name)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: str, module: str) -> set[str]:
    """Every shardkv module that `module`'s source imports (absolute names)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for child in node.body for n in ast.walk(child)}
    names = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "shardkv" or n.startswith("shardkv.")}


MODULES = _modules()
IMPORTS = {module: _imports(path, module) for module, path in MODULES.items()}


def _breaches(importer_prefix: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for module, imported in sorted(IMPORTS.items()):
        if module != importer_prefix and not module.startswith(importer_prefix + "."):
            continue
        for name in sorted(imported):
            if any(name == f or name.startswith(f + ".") for f in forbidden) and not any(name == a or name.startswith(a + ".") for a in allowed):
                found.append(f"{module} imports {name}")
    return found


def test_the_source_was_found():
    assert {"shardkv.client", "shardkv.shards.engine", "shardkv.coordinator.coordinator", "shardkv.wal.writer", "shardkv.ops.status"} <= set(MODULES)
    assert "shardkv.wal.format" in IMPORTS["shardkv.wal.records"]


def test_the_log_stands_alone():
    """wal/ is the bottom layer: it knows records and segments, nothing of shards or clusters."""
    assert _breaches("shardkv.wal", ("shardkv",), allowed=("shardkv.wal", "shardkv.errors", "shardkv.faults")) == []


def test_the_coordinator_does_not_reach_into_the_shards():
    """The coordinator and supervisor run the cluster above the shards; a worker may read the
    cluster's run files and member rules (shardkv.coordinator.membership), not the reverse:
    the two importing each other was a circle (issue #23)."""
    assert _breaches("shardkv.coordinator", ("shardkv.shards",)) == []


def test_the_ipc_layer_does_not_import_the_shards():
    """shardkv.ipc holds what a worker and its clients share (layouts, messages, the runs of the
    ordered view, shardkv/ipc/sortedruns.py); a worker imports it, never the reverse. The
    clients' ordered reader importing shards.sortedkeys, while the worker's store imported that
    reader, was a circle (issue #23); the worker's publisher is shards/viewpublisher.py now."""
    assert _breaches("shardkv.ipc", ("shardkv.shards",)) == []


def test_the_clients_ordered_reads_load_no_worker_code():
    """Scanning from a client loads the ordered view's layout and runs, not the worker's view."""
    probe = (
        "import sys\n"
        "import shardkv.client, shardkv.aio, shardkv.ipc.sortedview\n"
        "print(sorted(m for m in sys.modules if m.startswith('shardkv.shards')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_no_server_side_module_imports_the_client_stack():
    for layer in ("shardkv.wal", "shardkv.shards", "shardkv.coordinator", "shardkv.ipc"):
        assert _breaches(layer, CLIENT_STACK) == [], layer


def test_a_worker_does_not_load_the_client_stack():
    """`shardkv/__init__` is lazy: importing a server-side module loads no client code, nor the
    clients' ordered reader (the engine's scans share only ipc/bulkread.py with it)."""
    client_side = (*CLIENT_STACK, "shardkv.ipc.sortedview")
    probe = (
        "import sys\n"
        "import shardkv.wal.writer, shardkv.shards.worker, shardkv.coordinator.supervisor, shardkv.coordinator.coordinator\n"
        f"print(sorted(m for m in sys.modules if m.startswith({client_side!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_the_lazy_names_are_the_real_ones():
    import shardkv
    import shardkv.aio
    import shardkv.backends
    import shardkv.client

    assert shardkv.open is shardkv.backends.open and shardkv.aopen is shardkv.backends.aopen
    assert shardkv.Client is shardkv.client.Client and shardkv.AsyncClient is shardkv.aio.AsyncClient
    assert set(shardkv.__all__) <= set(dir(shardkv))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shardkv.nope  # noqa: B018


# -- the clients' transport internals --------------------------------------------------------
# Private attributes of Client and AsyncClient (shardkv/client.py, shardkv/aio.py) that hold
# their transport: rings, semaphores, the control block, the shared-index readers, raw calls.
CLIENT_INTERNALS = frozenset(
    "_index_readers _direct_get _rings _ring_bufs _wake _done _control _control_buf _info _call _call_many _probe "
    "_channels _requester _lease_fd _pending _free _pid".split()
)
# Where they may be named from outside the clients: the tests' one white-box module, and the
# ordered reads' client side (shardkv/ipc/sortedview.py, which the clients call with themselves).
INTERNALS_ALLOWED = ("tests/client_support.py", "shardkv/ipc/sortedview.py")


def _reaches_into_a_client(path: str) -> list[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    return [
        f"{os.path.relpath(path, ROOT)}:{node.lineno} .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in CLIENT_INTERNALS and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]


def test_only_the_clients_and_their_test_support_name_their_transport_internals():
    """Ops tools read a cluster through the public `Client.cluster_view`; white-box tests go
    through tests/client_support.py, so a change inside a client has one place to follow it."""
    found = []
    for folder in ("ops", "shardkv", "shards", "coordinator", "wal", "tests"):
        for here, _dirs, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(here, name)
                relative = os.path.relpath(path, ROOT)
                if name.endswith(".py") and relative not in INTERNALS_ALLOWED and relative not in ("shardkv/client.py", "shardkv/aio.py"):
                    found += _reaches_into_a_client(path)
    assert found == []
