"""Issue #19, item 4: another local user must not be able to keep a store from starting, and a
start that cannot succeed must fail once, clearly, instead of a respawn loop.

Every /dev/shm name of a store starts with `shardkv-<dirhash>`, which anyone who knows the path
can compute. Before the fix, a supervisor removing "leftovers" unlinked every object with that
prefix and died on the PermissionsError of another user's object; `open()` started the next
supervisor, which died the same way (345 crashes in 60 s), until it gave up with a generic
Unavailable. Now objects are created exclusively under a 64-bit random cluster part (a name taken
is retried under another), only one's own objects are removed, and a supervisor that cannot start
says why once (docs/IPC.md, "Names and ownership", "Starting").

The real-user test needs root (to switch users) and skips otherwise; the others simulate the
other user's object (an unlink that fails, an object chowned to another uid) as any user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import posix_ipc
import pytest

import shardkv
from shardkv.coordinator import supervisor as supervisor_module
from shardkv.coordinator.supervisor import CREATE_TRIES, StartError, Supervisor, remove_leftovers
from shardkv.ipc.layout import name_prefix, names

from cluster_support import SHARDS, cluster_fixture, cluster_pids, nothing_left, remove_shm, shm_entries, wait_until

NOBODY = 65534  # the squatter
OWNER = 65533  # the store's owner in the real-user test (any unused uid will do)


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def _squat(prefix: str, uid: int | None = None) -> list[str]:
    """Create, as the current user (then chowned to `uid`), a shared-memory object and a
    semaphore with names a cluster of this prefix could use; return their /dev/shm entries."""
    shm = posix_ipc.SharedMemory(f"{prefix}-squat-ctl", posix_ipc.O_CREX, mode=0o644, size=4096)
    shm.close_fd()
    sem = posix_ipc.Semaphore(f"{prefix}-squat-wake0", posix_ipc.O_CREX, mode=0o644)
    sem.close()
    entries = [f"{prefix[1:]}-squat-ctl", f"sem.{prefix[1:]}-squat-wake0"]
    if uid is not None:
        for entry in entries:
            os.chown(os.path.join("/dev/shm", entry), uid, uid)
    return entries


# -- the leftovers' cleanup -----------------------------------------------------------------------
@pytest.mark.engine
def test_an_object_that_cannot_be_unlinked_does_not_stop_the_cleanup(tmp_path, monkeypatch):
    """What another user's object does to a non-root supervisor: the unlink fails (EPERM in the
    sticky /dev/shm). The cleanup leaves it, says so, and removes the rest."""
    directory = str(tmp_path / "db")
    os.makedirs(os.path.join(directory, "run"))
    prefix = name_prefix(directory)
    squatted = _squat(prefix)
    mine = posix_ipc.SharedMemory(f"{prefix}-0123456789abcdef-ctl", posix_ipc.O_CREX, mode=0o600, size=4096)
    mine.close_fd()
    real_unlink = posix_ipc.unlink_shared_memory
    real_unlink_sem = posix_ipc.unlink_semaphore

    def refuse(real):
        def unlink(name):
            if "-squat-" in name:
                raise posix_ipc.PermissionsError("Permission denied")
            return real(name)

        return unlink

    monkeypatch.setattr(posix_ipc, "unlink_shared_memory", refuse(real_unlink))
    monkeypatch.setattr(posix_ipc, "unlink_semaphore", refuse(real_unlink_sem))
    try:
        removed, left = remove_leftovers(directory, None)
        assert f"{prefix[1:]}-0123456789abcdef-ctl" in removed
        assert sorted(left) == sorted(squatted) and all("unlink failed" in why for why in left.values()), left
    finally:
        monkeypatch.undo()
        remove_shm(squatted + [f"{prefix[1:]}-0123456789abcdef-ctl"])


def test_another_users_object_is_left_alone_and_the_store_starts(cluster):
    """An object of another uid under the store's prefix: the supervisor neither removes it nor
    fails on it (as root the old code removed it; as anyone else it died on it)."""
    prefix = name_prefix(cluster.directory)
    squatted = _squat(prefix, uid=NOBODY if os.getuid() == 0 else None)
    try:
        if os.getuid() != 0:
            pytest.skip("only root can give an object to another user")
        db = cluster.open()
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"
        assert all(os.path.exists(os.path.join("/dev/shm", e)) for e in squatted), "another user's objects were removed"
        db.close()
        cluster.clients.clear()
        wait_until(lambda: not cluster_pids(cluster.directory), 30, message="stop of the idle cluster")
        assert sorted(shm_entries(cluster.directory)) == sorted(squatted)
    finally:
        remove_shm(squatted)


# -- creating under a taken name --------------------------------------------------------------------
@pytest.mark.cluster
def test_a_taken_name_is_retried_under_another(tmp_path, monkeypatch):
    directory = str(tmp_path / "db")
    supervisor = Supervisor(directory, SHARDS, "interval", embedded=False)
    supervisor.shards = SHARDS
    taken = "5eed5eed5eed5eed"
    squat = names(supervisor.directory, taken, SHARDS, supervisor.leases)["rings"][1]  # made after the control block and ring 0
    shm = posix_ipc.SharedMemory(squat, posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.close_fd()
    ids = iter([taken])
    real = supervisor_module.secrets.token_hex
    monkeypatch.setattr(supervisor_module.secrets, "token_hex", lambda n: next(ids, None) or real(n))
    try:
        supervisor._create_objects()
        assert supervisor.cluster != taken
        entries = shm_entries(directory)
        assert [e for e in entries if taken in e] == [squat[1:]], "the objects of the failed try were not removed"
        assert len([e for e in entries if supervisor.cluster in e]) == len(supervisor.objects)
        supervisor._unlink_objects()
        assert shm_entries(directory) == [squat[1:]]

        monkeypatch.setattr(supervisor_module.secrets, "token_hex", lambda n: taken)
        with pytest.raises(StartError, match=f"{CREATE_TRIES} names"):
            supervisor._create_objects()
        assert shm_entries(directory) == [squat[1:]]
    finally:
        remove_shm(shm_entries(directory))


# -- a start that cannot succeed ----------------------------------------------------------------------
def test_a_start_that_cannot_succeed_fails_once_with_its_reason(cluster, monkeypatch):
    """Every rename of the supervisor fails (as a run directory it cannot write would make
    it): open() raises Unavailable with that reason, once and at once, after one supervisor.
    Before, the supervisor died after detaching and open() started the next one until
    start_timeout, then said "no cluster came up"."""
    monkeypatch.setenv("SHARDKV_DISK_FAULTS", "rename:EACCES@1+")  # the supervisor's first rename is the MANIFEST's
    started = time.monotonic()
    with pytest.raises(shardkv.Unavailable) as failure:
        shardkv.open(cluster.directory, shards=SHARDS, start_timeout=20)
    took = time.monotonic() - started
    assert "could not start" in str(failure.value) and "Permission denied" in str(failure.value), failure.value
    assert took < 10, f"open() took {took:.1f} s to give up"
    with open(os.path.join(cluster.directory, "logs", "supervisor.stderr")) as f:
        reports = [line for line in f if "could not start" in line]
    assert len(reports) == 2, reports  # the supervisor's own line and its starter's: one supervisor
    wait_until(lambda: nothing_left(cluster.directory), 5, message="the exit of the failed supervisor")

    result = subprocess.run([sys.executable, "-m", "shardkv.cli", "start", cluster.directory, "--shards", str(SHARDS)], capture_output=True, text=True, timeout=60)
    # Exit 6 (FAILED, shardkv/ops/exitcodes.py), the reason in one line.
    assert result.returncode == 6 and "could not start" in result.stderr and "Permission denied" in result.stderr, result
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    wait_until(lambda: nothing_left(cluster.directory), 5, message="the exit of the failed supervisor")
    monkeypatch.delenv("SHARDKV_DISK_FAULTS")
    db = cluster.open()  # the fault gone, it starts
    db.put(b"k", b"v")


# -- a real second user -------------------------------------------------------------------------------
OPEN_AS_OWNER = r"""
import sys, shardkv
db = shardkv.open(sys.argv[1], shards=2, start_timeout=20)
db.put(b"k", b"v")
print(db.get(b"k").decode(), flush=True)
db.close()
"""


def _as_user(uid: int):
    def switch():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    return switch


def _python_for(uid: int, workdir: str):
    """(interpreter, environment) with which user `uid` runs this checkout's shardkv, or None.
    The venv's interpreter may live under root's home (0700): then a system Python of the
    same version loads the venv's packages through a sitecustomize in `workdir`."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_dirs = [path for path in sys.path if path.endswith("site-packages")]
    with open(os.path.join(workdir, "sitecustomize.py"), "w") as f:
        f.write("import site\n" + "".join(f"site.addsitedir({path!r})\n" for path in site_dirs))
    os.chmod(os.path.join(workdir, "sitecustomize.py"), 0o644)
    env = dict(os.environ, PYTHONPATH=workdir)
    for interpreter in dict.fromkeys([sys.executable, shutil.which(version) or "", f"/usr/bin/{version}"]):
        if not interpreter:
            continue
        try:
            probe = subprocess.run([interpreter, "-c", "import shardkv, numpy, posix_ipc"], preexec_fn=_as_user(uid), capture_output=True, env=env, timeout=60, cwd=workdir)
        except OSError:
            continue
        if probe.returncode == 0:
            return interpreter, env
    return None


@pytest.mark.cluster
@pytest.mark.skipif(os.getuid() != 0, reason="only root can switch users; the tests above simulate the other user")
def test_another_user_cannot_keep_a_store_from_starting():
    """User `nobody` creates objects under the store's (predictable) prefix; the store's owner,
    another unprivileged user, opens it: it starts and serves, and nobody's objects stay."""
    base = tempfile.mkdtemp(prefix="shardkv-relb-")  # not under pytest's root-only folders
    try:
        os.chmod(base, 0o755)
        found = _python_for(OWNER, base)
        if found is None:
            pytest.skip(f"no Python here that uid {OWNER} can run with this checkout's packages")
        interpreter, env = found
        directory = os.path.join(base, "db")
        os.mkdir(directory, 0o700)
        os.chown(directory, OWNER, OWNER)
        prefix = name_prefix(directory)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the squatter
            try:
                os.close(read_end)
                _as_user(NOBODY)()
                _squat(prefix)
                os.write(write_end, b"ok")
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            assert pipe.read() == b"ok", "the squatter could not create its objects"
        os.waitpid(pid, 0)
        squatted = [e for e in shm_entries(directory) if "-squat-" in e]
        assert len(squatted) == 2 and all(os.stat(os.path.join("/dev/shm", e)).st_uid == NOBODY for e in squatted)
        result = subprocess.run([interpreter, "-c", OPEN_AS_OWNER, directory], preexec_fn=_as_user(OWNER), capture_output=True, text=True, timeout=60, cwd=base, env=env)
        assert result.returncode == 0 and result.stdout.strip() == "v", result
        with open(os.path.join(directory, "logs", "supervisor.stderr")) as f:
            errors = f.read()
        assert "Error" not in errors, errors[-2000:]
        wait_until(lambda: not cluster_pids(directory), 30, message="stop of the idle cluster")
        assert sorted(shm_entries(directory)) == sorted(squatted), "the cluster left objects, or removed nobody's"
    finally:
        directory = os.path.join(base, "db")
        for pid in cluster_pids(directory):
            os.kill(pid, 9)
        remove_shm(shm_entries(directory))
        shutil.rmtree(base, ignore_errors=True)
