"""The ring transport in everyday use: Ctrl-C, signals, close() and fork() from threads, and a
worker that is alive but does not answer (docs/IPC.md, "Request ids").

Each scenario runs in a subprocess of its own, against a cluster the test started, with a hard
timeout: a crash shows as a signal exit (SIGSEGV is -11), a hang as the timeout. The racy ones
repeat enough times to catch a regression.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster_support import cluster_fixture

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")

# Shared by every scenario: open the store, find keys on shard 0, stop and resume a worker.
PRELUDE = textwrap.dedent(
    """
    import asyncio, os, random, signal, sys, threading, time
    import shardkv
    directory = sys.argv[1]

    def keys_on(db, shard, n, prefix=b"k"):
        found, i = [], 0
        while len(found) < n:
            key = prefix + b"-%d" % i
            if db.shard_of(key) == shard:
                found.append(key)
            i += 1
        return found

    def worker_pid(db, shard):
        return db.health()["shards"][shard]["pid"]

    class stopped:
        '''SIGSTOP a process for the duration of a with block (SIGCONT even on failure).'''
        def __init__(self, pid):
            self.pid = pid
        def __enter__(self):
            os.kill(self.pid, signal.SIGSTOP)
            return self
        def __exit__(self, *exc):
            os.kill(self.pid, signal.SIGCONT)

    def check(condition, message):
        if not condition:
            print("FAILED:", message, file=sys.stderr, flush=True)
            os._exit(3)
    """
)


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_fixture(tmp_path / "db")


def run_scenario(cluster, body: str, timeout: float = 90.0) -> str:
    """Run PRELUDE + body in a fresh interpreter against the cluster's directory; fail on a
    crash, a hang or a non-zero exit. Returns its stdout."""
    cluster.open().close()  # the cluster is up before the scenario attaches to it
    script = PRELUDE + textwrap.dedent(body)
    try:
        done = subprocess.run([sys.executable, "-c", script, cluster.directory], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the scenario hung for {timeout} s; output: {exc.stdout!r} {exc.stderr!r}")
    if done.returncode < 0:
        pytest.fail(f"the scenario died of signal {signal.Signals(-done.returncode).name}; stderr: {done.stderr[-3000:]}")
    assert done.returncode == 0, f"exit {done.returncode}; stderr: {done.stderr[-3000:]}"
    return done.stdout


# -- 1. close() from another thread ----------------------------------------------------------
def test_close_while_another_thread_waits_ends_that_call_with_closed(cluster):
    """Was: SIGSEGV (the waiter's semaphore closed under it). Now the waiting call raises
    Closed, promptly, and nothing crashes."""
    run_scenario(
        cluster,
        """
        db = shardkv.open(directory, direct_reads=False)
        key = keys_on(db, 0, 1)[0]
        outcome = []
        def waiter():
            try:
                db.put(key, b"v")
                outcome.append("answered")
            except shardkv.Closed:
                outcome.append("closed")
            except BaseException as exc:
                outcome.append(repr(exc))
        with stopped(worker_pid(db, 0)):
            thread = threading.Thread(target=waiter)
            thread.start()
            time.sleep(0.3)
            started = time.monotonic()
            db.close()
            thread.join(10)
            check(not thread.is_alive(), "the waiting call did not end after close()")
            check(time.monotonic() - started < 5, "close() took too long")
        check(outcome == ["closed"], f"the waiting call ended with {outcome}")
        """,
    )


def test_close_races_with_calls_in_other_threads(cluster):
    """Twenty clients, each closed while four threads hammer it: every call answers or raises
    Closed; no crash, no hang."""
    run_scenario(
        cluster,
        """
        for round in range(20):
            db = shardkv.open(directory, direct_reads=False)
            errors = []
            def hammer(n):
                try:
                    for i in range(100000):
                        key = b"t%d-%d" % (n, i % 50)
                        if i % 3:
                            db.get(key)
                        elif i % 7 == 0:
                            db.get_many([key, b"x", b"y"])
                        else:
                            db.put(key, b"v%d" % i)
                except shardkv.Closed:
                    return
                except BaseException as exc:
                    errors.append(repr(exc))
            threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
            for t in threads:
                t.start()
            time.sleep(random.uniform(0.0, 0.05))
            db.close()
            for t in threads:
                t.join(10)
                check(not t.is_alive(), "a thread hung after close()")
            check(not errors, f"calls failed with {errors[:3]}")
        """,
    )


def test_async_close_ends_pending_calls(cluster):
    """Was: calls pending at a concurrent close() never finished."""
    run_scenario(
        cluster,
        """
        async def main():
            db = await shardkv.aopen(directory, pool=2)
            key = keys_on(db, 0, 1)[0]
            with stopped((await db.health())["shards"][0]["pid"]):
                pending = [asyncio.ensure_future(db.put(key, b"v")) for _ in range(3)]
                await asyncio.sleep(0.3)
                started = time.monotonic()
                await asyncio.wait_for(db.close(), 10)
                results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
                check(time.monotonic() - started < 5, "close() and the pending calls took too long")
            check(all(isinstance(r, shardkv.Closed) for r in results), f"pending calls ended with {results}")
        asyncio.run(main())
        """,
    )


# -- 2. signals during a blocking call -------------------------------------------------------
def test_a_signal_storm_changes_nothing(cluster):
    """Was: posix_ipc.SignalError out of any call interrupted by a signal whose handler returns.
    Now such a wait is resumed (PEP 475): 10k mixed operations under SIGALRM and SIGUSR1 at
    1 kHz each, no error, and the store matches a model at the end."""
    run_scenario(
        cluster,
        """
        db = shardkv.open(directory, direct_reads=False)
        handled = [0]
        def handler(signum, frame):
            handled[0] += 1
        signal.signal(signal.SIGALRM, handler)
        signal.signal(signal.SIGUSR1, handler)
        signal.signal(signal.SIGCHLD, handler)
        stop = threading.Event()
        def storm():
            while not stop.is_set():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.001)
        threading.Thread(target=storm, daemon=True).start()
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        model, rng = {}, random.Random(7)
        try:
            for i in range(10000):
                key = b"s%d" % rng.randrange(300)
                op = rng.random()
                if op < 0.4:
                    value = b"v%d" % i
                    db.put(key, value)
                    model[key] = value
                elif op < 0.5:
                    check(db.delete(key) == (key in model), "delete")
                    model.pop(key, None)
                elif op < 0.55:
                    batch = {b"s%d" % rng.randrange(300): b"b%d" % i for _ in range(5)}
                    db.put_many(batch)
                    model.update(batch)
                elif op < 0.6:
                    keys = [b"s%d" % rng.randrange(300) for _ in range(20)]
                    check(db.get_many(keys) == [model.get(k) for k in keys], "get_many")
                else:
                    check(db.get(key) == model.get(key), "get")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            stop.set()
        check(handled[0] > 1000, f"only {handled[0]} signals were handled")
        check(dict(db.scan()) == model, "the store differs from the model")
        db.close()
        """,
        timeout=180,
    )


# -- 3. Ctrl-C during a request ----------------------------------------------------------------
def test_keyboard_interrupt_leaves_the_slot_usable(cluster):
    """Was: after a KeyboardInterrupt during a slow request, the next request to that shard took
    the late answer of the interrupted one, or hung. Now it answers correctly and promptly."""
    run_scenario(
        cluster,
        """
        db = shardkv.open(directory, direct_reads=False)
        key, other = keys_on(db, 0, 2)
        db.put(key, b"before")
        db.put(other, b"other")
        pid = worker_pid(db, 0)
        with stopped(pid):
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            try:
                db.put(key, b"interrupted")  # its outcome is unknown to the caller
                check(False, "the put was not interrupted")
            except KeyboardInterrupt:
                pass
        started = time.monotonic()
        check(db.get(other) == b"other", "the next request got a wrong answer")
        check(db.get(key) in (b"before", b"interrupted"), "the interrupted key holds garbage")
        db.put(key, b"after")
        check(db.get(key) == b"after", "a later put was lost")
        check(time.monotonic() - started < 5, "the requests after the interrupt were slow")
        """,
    )


def test_interrupts_at_random_points_of_a_large_get_many(cluster):
    """Twenty KeyboardInterrupts at random moments of a get_many big enough to take several
    frames each way; after each one the next calls answer correctly."""
    run_scenario(
        cluster,
        """
        db = shardkv.open(directory, direct_reads=False)
        keys = [b"g%06d" % i for i in range(20000)]
        value = b"x" * 100
        for start in range(0, len(keys), 5000):
            db.put_many({k: value + k for k in keys[start:start + 5000]})
        expected = [value + k for k in keys]
        t0 = time.monotonic(); check(db.get_many(keys) == expected, "get_many before"); took = time.monotonic() - t0
        interrupted = 0
        for round in range(20):
            timer = threading.Timer(random.uniform(0, took), lambda: os.kill(os.getpid(), signal.SIGINT))
            timer.start()
            try:
                try:
                    result = db.get_many(keys)
                    check(result == expected, "an uninterrupted get_many was wrong")
                finally:
                    timer.join()
                    time.sleep(0.02)  # a SIGINT that came after the call returned is taken here
            except KeyboardInterrupt:
                interrupted += 1
            started = time.monotonic()
            probe = random.choice(keys)
            check(db.get(probe) == value + probe, f"round {round}: a get after the interrupt was wrong")
            check(db.get_many(keys[:300]) == expected[:300], f"round {round}: a get_many after the interrupt was wrong")
            check(time.monotonic() - started < 5, f"round {round}: the calls after the interrupt were slow")
        print("interrupted", interrupted)
        """,
        timeout=240,
    )


# -- 4. fork() while another thread is in a request -------------------------------------------
def test_fork_while_another_thread_is_in_a_request(cluster):
    """Was: the child hung forever on the inherited client lock. Twenty forks at random moments
    of another thread's requests: each child works on first use, and so does the parent."""
    run_scenario(
        cluster,
        """
        db = shardkv.open(directory, direct_reads=False)
        db.put(b"shared", b"parent")
        stop = threading.Event()
        errors = []
        def busy():
            i = 0
            while not stop.is_set():
                try:
                    db.put(b"busy-%d" % (i % 20), b"v")
                    db.get_many([b"busy-%d" % j for j in range(20)])
                except BaseException as exc:
                    errors.append(repr(exc))
                    return
                i += 1
        thread = threading.Thread(target=busy)
        thread.start()
        for n in range(20):
            time.sleep(random.uniform(0, 0.01))
            pid = os.fork()
            if pid == 0:
                try:
                    ok = db.get(b"shared") == b"parent"
                    db.put(b"child-%d" % n, b"c")
                    ok = ok and db.get(b"child-%d" % n) == b"c"
                    db.close()
                    os._exit(0 if ok else 4)
                except BaseException as exc:
                    print("child failed:", repr(exc), file=sys.stderr, flush=True)
                    os._exit(5)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    check(False, f"child {n} hung")
                time.sleep(0.005)
            check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child {n} ended with status {status}")
        stop.set()
        thread.join(10)
        check(not errors, f"the parent's thread failed: {errors}")
        check(all(db.get(b"child-%d" % n) == b"c" for n in range(20)), "a child's write is missing")
        db.close()
        """,
        timeout=180,
    )


# -- 5. a worker that is alive but does not answer --------------------------------------------
def test_a_stopped_worker_is_reported_unresponsive(cluster):
    """Was: every request to a SIGSTOPped worker, health() included, waited up to 600 s. Now
    requests fail with Unavailable after request_timeout and health() answers within a couple
    of seconds, marking the shard unresponsive; once it runs again, everything works."""
    run_scenario(
        cluster,
        """
        db = shardkv.open(directory, direct_reads=False, request_timeout=2.0)
        key, other = keys_on(db, 0, 2)
        db.put(key, b"v0")
        with stopped(worker_pid(db, 0)):
            started = time.monotonic()
            try:
                db.put(key, b"v1")
                check(False, "a put to a stopped worker was answered")
            except shardkv.Unavailable:
                pass
            waited = time.monotonic() - started
            check(1.5 < waited < 6, f"the put failed after {waited:.1f} s, not about request_timeout")
            started = time.monotonic()
            health = db.health()
            check(time.monotonic() - started < 3, "health() took too long")
            check(health["shards"][0]["state"] == "unresponsive", f"shard 0 is {health['shards'][0]['state']}")
            check(health["shards"][1]["state"] == "up", f"shard 1 is {health['shards'][1]['state']}")
            check(health["status"] == "degraded", f"status {health['status']}")
        # Running again: the late answer to the abandoned put is dropped, requests work.
        check(db.get(key) in (b"v0", b"v1"), "wrong value after the worker resumed")
        db.put(other, b"w")
        check(db.get(other) == b"w", "a put after the worker resumed was lost")
        check(db.health()["shards"][0]["state"] == "up", "shard 0 is not up again")
        db.close()
        """,
    )


def test_status_cli_marks_a_stopped_worker_unresponsive(cluster):
    """`shardkv status DIR --json` answers within seconds while a worker is stopped."""
    db = cluster.open(direct_reads=False)
    pid = db.health()["shards"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "shardkv.cli", "status", cluster.directory, "--json"], capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert took < 10, f"status took {took:.1f} s"
    assert '"unresponsive"' in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1  # degraded


def test_async_client_times_out_on_a_stopped_worker_and_recovers(cluster):
    """The asyncio client: a request to a stopped worker fails with Unavailable after
    request_timeout, a cancelled one leaves its slot usable, and once the worker runs again
    every call answers correctly (the late answers are dropped)."""
    run_scenario(
        cluster,
        """
        async def main():
            db = await shardkv.aopen(directory, pool=1, direct_reads=False, request_timeout=1.5)
            key, other = keys_on(db, 0, 2)
            await db.put(key, b"v0")
            with stopped((await db.health())["shards"][0]["pid"]):
                started = time.monotonic()
                try:
                    await db.put(key, b"v1")
                    check(False, "a put to a stopped worker was answered")
                except shardkv.Unavailable:
                    pass
                waited = time.monotonic() - started
                check(1.0 < waited < 5, f"the put failed after {waited:.1f} s")
                cancelled = asyncio.ensure_future(db.get(other))
                await asyncio.sleep(0.1)
                cancelled.cancel()
            await db.put(other, b"w")
            check(await db.get(other) == b"w", "wrong answer after the worker resumed")
            check(await db.get(key) in (b"v0", b"v1"), "wrong value for the abandoned put's key")
            await db.close()
        asyncio.run(main())
        """,
    )
