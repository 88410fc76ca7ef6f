"""Who may touch a store: owner-only files and shared memory, one cluster per directory, and the
reclaiming of a killed cluster's leftovers.

What the other test files already cover, and is not repeated here:
- test_ops_cluster.py::test_shared_memory_semaphores_and_files_are_owner_only: after one put,
  under the default umask, no entry below the data directory and no /dev/shm object has a
  group or other bit;
- test_cli.py::test_start_status_stop: `shardkv start DIR` on a running cluster answers
  "already running" (and a different --shards is refused);
- test_cluster_faults.py::test_reopen_after_supervisor_killed and its neighbours: open() after
  the supervisor and its children were killed one by one removes the old /dev/shm objects.

Added here: exact modes (directories 0700, files 0600, /dev/shm objects 0600) of the data
directory itself and of everything in it after writes, cross-shard batches, expiring keys,
compactions and a restart, with the most permissive umask (0), for clusters started by
`shardkv.open()` and by `shardkv start`, and for `shardkv salvage` output; an attempt to attach as
another user; a second supervisor (`python -m shardkv.coordinator.supervisor DIR`, in every mode)
on a served directory, and several racing on a fresh one; a `shardkv start`ed cluster killed
with SIGKILL all at once (its whole process group, and a client holding a lease) reclaimed by
the next `shardkv start`, with another directory's cluster running alongside untouched.

Every test has its own tmp_path and, through the `cluster` fixture of cluster_support (or its own
cleanup), leaves no process and no /dev/shm entry behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cluster_support import SHARDS, alive, cluster_fixture, cluster_info, cluster_pids, nothing_left, shm_entries, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")

START = 60  # seconds a command may take
ALREADY_RUNNING = 3  # the supervisor's exit code when another one holds the directory
NOBODY = 65534


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


@pytest.fixture
def bystander(tmp_path):
    """A second directory with a cluster of its own (torn down like `cluster`)."""
    yield from cluster_fixture(tmp_path / "other")


@pytest.fixture
def permissive_umask():
    """umask 0 for the test (and every process it starts): the store must not rely on the
    umask for its modes."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes_below(directory) -> dict[str, int]:
    """{relative path: st_mode} of `directory` ('.') and everything below it (an entry that a
    running cluster removes meanwhile, such as a temporary file renamed into place, is skipped)."""
    found = {".": os.lstat(directory).st_mode}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                found[os.path.relpath(path, directory)] = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
    return found


def assert_owner_only(directory) -> dict[str, int]:
    """Every directory 0700, every file 0600 (symlinks and other kinds are not expected)."""
    wrong = []
    modes = modes_below(directory)
    for rel, st_mode in modes.items():
        if stat.S_ISDIR(st_mode):
            expected = 0o700
        elif stat.S_ISREG(st_mode):
            expected = 0o600
        else:
            wrong.append(f"{rel}: not a regular file or directory ({oct(st_mode)})")
            continue
        if stat.S_IMODE(st_mode) != expected:
            wrong.append(f"{rel}: {oct(stat.S_IMODE(st_mode))}, not {oct(expected)}")
    assert not wrong, f"entries of {directory} that are not owner-only: {wrong}"
    return modes


def assert_shm_owner_only(directory) -> list[str]:
    entries = shm_entries(directory)
    assert any(e.startswith("sem.") for e in entries) and any(not e.startswith("sem.") for e in entries), entries
    wrong = {e: oct(stat.S_IMODE(os.stat(os.path.join("/dev/shm", e)).st_mode)) for e in entries}
    wrong = {e: mode for e, mode in wrong.items() if mode != oct(0o600)}
    assert not wrong, f"/dev/shm objects of {directory} that are not mode 0600: {wrong}"
    owners = {os.stat(os.path.join("/dev/shm", e)).st_uid for e in entries}
    assert owners == {os.getuid()}, owners
    return entries


def write_everything(db, round_: int) -> dict:
    """Writes that create every kind of file: segments, hints, the coordinator's decision log."""
    model = {}
    for i in range(1500):
        key = b"k%05d" % i
        db.put(key, b"%d" % round_ * 100)
        model[key] = b"%d" % round_ * 100
    for i in range(0, 1500, 2):
        db.delete(b"k%05d" % i)
        del model[b"k%05d" % i]
    keys = [b"x-%d" % i for i in range(8)]
    assert len({db.shard_of(k) for k in keys}) == SHARDS
    db.write([("put", k, b"batch") for k in keys])  # cross-shard: through the coordinator
    model.update({k: b"batch" for k in keys})
    db.put(b"expiring", b"v", ttl=0.001)
    db.put(b"lasting", b"v", ttl=3600)
    model[b"lasting"] = b"v"
    db.sync()
    results = db.compact()
    assert all(r["after"]["total_bytes"] < r["before"]["total_bytes"] for r in results), results
    return model


# -- modes --------------------------------------------------------------------------------------------
def test_a_store_and_its_shared_memory_are_owner_only_whatever_the_umask(cluster, permissive_umask):
    db = cluster.open()
    model = write_everything(db, 1)
    assert_shm_owner_only(cluster.directory)
    first = assert_owner_only(cluster.directory)

    # A restart recovers from the files and creates new ones (segments, logs, run/ files).
    info = cluster.info()
    db.close()
    wait_until(lambda: not alive(info["pid"], info["start_time"]) and nothing_left(cluster.directory), 20, message="stop of the idle embedded cluster")
    db = cluster.open()
    assert dict(db.scan()) == model
    model = write_everything(db, 2)
    assert dict(db.scan()) == model
    assert_shm_owner_only(cluster.directory)
    second = assert_owner_only(cluster.directory)

    seen = set(first) | set(second)
    expected = ["MANIFEST", "run", "run/supervisor.lock", "run/cluster.json", "run/lease-0.lock", "logs", "logs/supervisor.log",
                "logs/coordinator.log", "logs/shard-000.log", "shard-000", "shard-001", "coordinator"]
    assert not [p for p in expected if p not in seen], f"files the test expected to check are missing: {sorted(seen)}"
    for shard in range(SHARDS):
        names = [p for p in seen if p.startswith(f"shard-{shard:03d}/")]
        assert any(p.endswith(".log") for p in names) and any(p.endswith(".hint") for p in names), names
    assert any(p.startswith("coordinator/") and p.endswith(".log") for p in seen), sorted(seen)


@pytest.mark.cluster
def test_shardkv_start_and_salvage_create_owner_only_trees(tmp_path):
    """`shardkv start` (which creates the directory and its logs itself) and `shardkv salvage`,
    run under umask 0."""
    directory, salvaged = tmp_path / "db", tmp_path / "salvaged"

    def cli(*args) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "shardkv.cli", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=START, preexec_fn=lambda: os.umask(0))

    try:
        started = cli("start", directory, "--shards", "2")
        assert started.returncode == 0, started.stderr
        for i in range(3):
            assert cli("put", directory, f"key-{i}", "value").returncode == 0
        assert cli("compact", directory).returncode == 0
        assert_shm_owner_only(directory)
        assert_owner_only(directory)
        assert cli("stop", directory).returncode == 0
        salvage = cli("salvage", directory, salvaged)
        assert salvage.returncode == 0, salvage.stdout + salvage.stderr
        assert "saved 3 keys" in salvage.stdout
        assert_owner_only(directory)
        assert_owner_only(salvaged)
    finally:
        subprocess.run([sys.executable, "-m", "shardkv.cli", "stop", str(directory)], capture_output=True, timeout=START)
        left = shm_entries(directory)
        assert not left and not cluster_pids(directory), f"left behind: {left} {cluster_pids(directory)}"


def _as_nobody(attempts: list[tuple]) -> list[str]:
    """In a forked child running as user and group `nobody`, try each (description, function);
    return the descriptions of those that did NOT fail with EACCES/EPERM."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls, then _exit
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            allowed = []
            for description, attempt in attempts:
                try:
                    fd = attempt()
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EPERM):
                        allowed.append(f"{description}: {exc!r}")
                    continue
                os.close(fd)
                allowed.append(description)
            os.write(write_fd, json.dumps(allowed).encode())
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001
            os.write(write_fd, json.dumps([f"the child failed: {exc!r}"]).encode())
            os._exit(1)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(output)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can switch to another user; the modes are checked by the tests above")
def test_another_user_can_open_no_shared_object_and_no_file(cluster, tmp_path):
    """As root, the test can switch to `nobody` in a forked child and try to attach: open each
    /dev/shm object of the cluster read-write and read-only (what shm_open and sem_open do),
    and the store's directory and files. (Root itself bypasses file modes, so "another user
    cannot attach" is only testable from root towards an unprivileged user; as a non-root user
    the test is skipped and the modes checked by the tests above stand for it.)"""
    db = cluster.open()
    db.put(b"secret", b"value")
    entries = shm_entries(cluster.directory)
    assert entries
    parent_fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)  # so that the pytest folders above need no search permission
    try:
        attempts = []
        for entry in entries:
            path = os.path.join("/dev/shm", entry)
            attempts.append((f"{path} read-write", lambda path=path: os.open(path, os.O_RDWR)))
            attempts.append((f"{path} read-only", lambda path=path: os.open(path, os.O_RDONLY)))
        for rel in ("db", "db/MANIFEST", "db/run/supervisor.lock", "db/run/lease-0.lock", "db/run/cluster.json", "db/shard-000"):
            attempts.append((rel, lambda rel=rel: os.open(rel, os.O_RDONLY, dir_fd=parent_fd)))
        allowed = _as_nobody(attempts)
    finally:
        os.close(parent_fd)
    assert not allowed, f"user nobody could open: {allowed}"
    assert db.get(b"secret") == b"value"


# -- one cluster per directory ----------------------------------------------------------------------
def _snapshot(cluster) -> dict:
    info = cluster.info()
    return {"info": {k: info[k] for k in ("cluster", "pid", "start_time", "children", "ready")}, "shm": shm_entries(cluster.directory)}


def _assert_unharmed(cluster, db, before: dict, model: dict, after: str) -> None:
    now = _snapshot(cluster)
    assert now == before, f"after {after}, the running cluster changed: {before} -> {now}"
    health = db.health()
    assert health["status"] == "healthy", (after, health)
    assert health["coordinator"]["restarts"] == 0 and all(s["restarts"] == 0 for s in health["shards"]), (after, health)
    assert dict(db.scan()) == model, after
    db.put(b"after", after.encode())
    model[b"after"] = after.encode()
    assert db.get(b"after") == after.encode()


def test_a_second_supervisor_on_a_served_directory_is_refused(cluster):
    db = cluster.open()
    model = {b"k%d" % i: b"v%d" % i for i in range(50)}
    db.put_many(model)
    before = _snapshot(cluster)
    realpath = os.path.realpath(cluster.directory)
    for mode in (["--foreground"], [], ["--embedded"], ["--foreground", "--shards", "2"], ["--foreground", "--shards", "3"]):
        command = [sys.executable, "-m", "shardkv.coordinator.supervisor", cluster.directory, *mode]
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=START)
        took = time.monotonic() - started
        assert result.returncode == ALREADY_RUNNING, (mode, result.returncode, result.stdout, result.stderr)
        assert "already running" in result.stderr and realpath in result.stderr, (mode, result.stderr)
        assert took < 20, f"the refusal took {took:.1f} s"
        _assert_unharmed(cluster, db, before, model, f"supervisor {' '.join(mode) or '(detached)'}")
    # `shardkv start` does not start a second cluster either (its exit code is covered by test_cli.py).
    for extra in ([], ["--foreground"]):
        result = subprocess.run([sys.executable, "-m", "shardkv.cli", "start", cluster.directory, *extra], capture_output=True, text=True, timeout=START)
        assert "already running" in result.stdout + result.stderr, (extra, result)
        _assert_unharmed(cluster, db, before, model, f"shardkv start {' '.join(extra)}")


def test_racing_supervisors_on_a_fresh_directory_start_one_cluster(cluster):
    directory = cluster.directory
    command = [sys.executable, "-m", "shardkv.coordinator.supervisor", directory, "--foreground", "--shards", str(SHARDS)]
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        wait_until(lambda: (cluster_info(directory) or {}).get("ready"), START, message="a ready cluster")
        wait_until(lambda: sum(p.poll() is None for p in racers) <= 1, 30, message="the exit of every losing supervisor")
        running = [p for p in racers if p.poll() is None]
        assert len(running) == 1, [p.returncode for p in racers]
        assert cluster.info()["pid"] == running[0].pid
        for loser in racers:
            if loser is not running[0]:
                _, err = loser.communicate(timeout=10)
                assert loser.returncode == ALREADY_RUNNING and "already running" in err, (loser.returncode, err)
        db = cluster.open()
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"
        info = cluster.info()
        assert sorted(cluster_pids(directory)) == sorted([info["pid"], *(pid for pid, _ in info["children"])]), "processes of a second cluster are running"
        assert len(info["children"]) == SHARDS + 1
        assert all(info["cluster"] in e for e in shm_entries(directory)), "shared objects of a second cluster exist"
        db.close()
        running[0].send_signal(signal.SIGTERM)
        assert running[0].wait(START) == 0
        assert nothing_left(directory)
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
            racer.wait(START)
            racer.stdout.close()
            racer.stderr.close()


# -- leftovers of a killed cluster --------------------------------------------------------------------
HOLDER = r"""
import sys, shardkv
db = shardkv.open(sys.argv[1])
db.put(b"from-the-holder", b"1")
print("ready", db.lease, flush=True)
sys.stdin.readline()
"""


def test_a_cluster_killed_at_once_is_reclaimed_by_the_next_shardkv_start(cluster, bystander):
    """`shardkv start`, a client holding a lease, then SIGKILL to the supervisor's whole process
    group (the supervisor, the coordinator and the workers at the same instant) and to the
    client. The next `shardkv start` must start a new cluster (not answer "already running"),
    the old /dev/shm objects must be gone, the data intact, and the cluster of another
    directory, running meanwhile, untouched."""
    directory = cluster.directory
    other = bystander.open()
    other.put(b"other", b"still here")
    other_before = _snapshot(bystander)

    def start() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shardkv.cli", "start", directory, "--shards", str(SHARDS)], capture_output=True, text=True, timeout=START)

    first = start()
    assert first.returncode == 0 and first.stdout.startswith("started"), first
    db = cluster.open()
    model = {b"k%04d" % i: b"v" * (i % 300) for i in range(400)}
    db.put_many(model)
    holder = cluster.spawn(HOLDER, directory)
    held_lease = int(holder.expect("ready", START))
    model[b"from-the-holder"] = b"1"
    db.close()
    cluster.clients.clear()

    old = cluster.info()
    old_pids = [(old["pid"], old["start_time"]), *map(tuple, old["children"])]
    old_shm = shm_entries(directory)
    assert old_shm and all(old["cluster"] in e for e in old_shm)
    group = os.getpgid(old["pid"])  # `shardkv start` runs the supervisor in a session of its own
    assert group != os.getpgid(0) and all(os.getpgid(pid) == group for pid, _ in old["children"])
    os.killpg(group, signal.SIGKILL)
    holder.kill()
    wait_until(lambda: not any(alive(pid, start_time) for pid, start_time in old_pids), 10, message="death of the killed cluster")
    assert shm_entries(directory) == old_shm, "nobody is left to remove the killed cluster's shared objects"
    assert cluster.info()["pid"] == old["pid"], "the killed cluster's run/cluster.json is left behind"

    second = start()
    assert second.returncode == 0 and second.stdout.startswith("started"), f"the next `shardkv start` did not start a cluster: {second}"
    new = cluster.info()
    assert new["cluster"] != old["cluster"] and new["pid"] != old["pid"]
    left = [e for e in shm_entries(directory) if old["cluster"] in e]
    assert not left, f"shared objects of the killed cluster were not removed: {left[:5]}"
    assert all(new["cluster"] in e for e in shm_entries(directory))
    assert not [pid for pid, start_time in old_pids if alive(pid, start_time)]
    assert_shm_owner_only(directory)
    assert_owner_only(directory)

    db = cluster.open()
    assert db.health()["status"] == "healthy"
    assert dict(db.scan()) == model
    leases = {cluster.open().lease for _ in range(3)}
    assert db.lease not in leases
    assert held_lease in leases | {db.lease}, "the lease of the killed client was not reclaimed"

    _assert_unharmed(bystander, other, other_before, {b"other": b"still here"}, "the other directory's cluster was killed and restarted")
    stopped = subprocess.run([sys.executable, "-m", "shardkv.cli", "stop", directory], capture_output=True, text=True, timeout=START)
    assert stopped.returncode == 0, stopped
    wait_until(lambda: nothing_left(directory), 10, message="stop of the restarted cluster")
