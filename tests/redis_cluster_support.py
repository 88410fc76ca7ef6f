"""A real Redis Cluster on loopback for the tests (and `benchmarks/redis_backend.py`).

`LocalRedisCluster(directory).start()` runs `masters` redis-server masters and
`replicas` replicas of each as child processes of this one, each on its own random free port
of 127.0.0.1 (and a second one for the cluster bus), with its files under `directory`;
it assigns the slots, introduces the nodes to each other, attaches the replicas and waits until
every node reports the cluster ok and every replica is in sync. `stop()` ends every server by
pid (SIGTERM, then SIGKILL) and reports what it had to force. A server also gets SIGKILL from
the kernel if the process that started it dies first (PR_SET_PDEATHSIG), so even a killed test
run leaves no redis-server behind.

Imported as a plain module by the tests (pytest puts tests/ on sys.path) and as
`tests.redis_cluster_support` by the benchmark. `python -m tests.redis_cluster_support` starts
one in the foreground and prints its URL (Ctrl-C stops it).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SLOTS = 16384
PR_SET_PDEATHSIG = 1
READY_TIMEOUT = 30.0


def redis_server_path() -> str | None:
    """The redis-server on the PATH, or None."""
    return shutil.which("redis-server")


def missing_reason() -> str | None:
    """Why a Redis Cluster cannot be started here (None: it can)."""
    if redis_server_path() is None:
        return "redis-server is not on the PATH (Debian: apt-get install redis-server; .ci/run installs it)"
    try:
        import redis  # noqa: F401, PLC0415
    except ImportError:
        return 'redis-py is not installed (pip install -e ".[dev]")'
    return None


def require_redis() -> None:
    """In a test: skip it (fail it under SHARDKV_REQUIRE_REDIS=1, as .ci/run sets) when no Redis
    Cluster can be started here, with the reason in the summary."""
    import pytest  # noqa: PLC0415 - only tests call this

    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("SHARDKV_REQUIRE_REDIS") == "1":
        pytest.fail(f"SHARDKV_REQUIRE_REDIS=1 but {reason}")
    pytest.skip(f"Redis Cluster tests skipped: {reason}")


def reference_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of `key` (hash tags honoured), computed here independently of
    the backend: CRC16/XMODEM of the key, or of the first non-empty {...} in it, mod 16384."""
    from binascii import crc_hqx  # noqa: PLC0415

    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) % 16384


def free_ports(count: int) -> list[int]:
    """`count` distinct ports of 127.0.0.1 that were free a moment ago (held open together so
    that they differ; another process may still take one before the server binds it, which
    start() survives by trying again)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the process that started it ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Node:
    """One redis-server of the cluster."""

    def __init__(self, index: int, port: int, bus_port: int, directory: str):
        self.index, self.port, self.bus_port, self.directory = index, port, bus_port, directory
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None

    @property
    def address(self) -> str:
        """host:port of the node."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it is running, else None."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def client(self, timeout: float = 2.0):
        """A plain (non-cluster) redis-py client of this node alone."""
        import redis  # noqa: PLC0415

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(os.path.join(self.directory, "redis.log"), "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""


class LocalRedisCluster:
    """A Redis Cluster of child processes on 127.0.0.1; see the module docstring."""

    def __init__(self, directory, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000, appendonly: bool = False):
        self.directory = os.fspath(directory)
        self.masters_count, self.replicas_count = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.nodes: list[Node] = []

    # -- starting --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """redis://host:port,host:port,... naming every master (the startup nodes)."""
        return "redis://" + ",".join(node.address for node in self.nodes[: self.masters_count])

    def start(self, attempts: int = 3) -> "LocalRedisCluster":
        """Start the servers and form the cluster; return self once it is ready. A port taken
        by someone else between choosing and binding it makes it start over on new ports."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except _PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self.stop()
                raise
        return self

    def _start_once(self) -> None:
        server = redis_server_path()
        if server is None:
            raise RuntimeError(missing_reason())
        total = self.masters_count * (1 + self.replicas_count)
        ports = free_ports(2 * total)
        self.nodes = []
        for i in range(total):
            node_dir = os.path.join(self.directory, f"node{i}-{ports[2 * i]}")
            os.makedirs(node_dir, exist_ok=True)
            node = Node(i, ports[2 * i], ports[2 * i + 1], node_dir)
            self.nodes.append(node)
            self._spawn(server, node)
        for node in self.nodes:
            self._wait_for_ping(node)
        self._form()

    def _spawn(self, server: str, node: Node) -> None:
        args = [
            server,
            "--port", str(node.port),
            "--cluster-port", str(node.bus_port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", os.path.join(node.directory, "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica may always take over, however long its link was down (tests kill often).
            "--cluster-replica-validity-factor", "0",
            "--dir", node.directory,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--daemonize", "no",
            "--logfile", os.path.join(node.directory, "redis.log"),
        ]  # fmt: skip
        node.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, preexec_fn=_die_with_parent)

    def _wait_for_ping(self, node: Node) -> None:
        import redis  # noqa: PLC0415

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if node.proc.poll() is not None:
                tail = node.log_tail()
                if "Address already in use" in tail:
                    raise _PortTaken(node.port)
                raise RuntimeError(f"redis-server on port {node.port} exited ({node.proc.returncode}): {tail}")
            try:
                with node.client(0.5) as r:
                    r.ping()
                    node.node_id = r.execute_command("CLUSTER", "MYID").decode()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {node.port} did not answer within {READY_TIMEOUT} s: {node.log_tail()}") from None
                time.sleep(0.02)

    def _form(self) -> None:
        masters = self.nodes[: self.masters_count]
        per = SLOTS // len(masters)
        for i, node in enumerate(masters):
            first, last = i * per, (SLOTS - 1 if i == len(masters) - 1 else (i + 1) * per - 1)
            with node.client() as r:
                r.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for i, node in enumerate(self.nodes):
            with node.client() as r:
                # Distinct epochs from the start: no epoch collision to resolve by gossip.
                r.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as r:
            for node in self.nodes[1:]:
                r.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        self._wait(lambda: all(self._info(n).get("cluster_known_nodes") == str(len(self.nodes)) for n in self.nodes), "every node to know every other")
        for i, node in enumerate(self.nodes[self.masters_count :]):
            master = masters[i % len(masters)]
            with node.client() as r:
                r.execute_command("CLUSTER", "REPLICATE", master.node_id)
        self.wait_ready()

    # -- state -----------------------------------------------------------------------------
    def _info(self, node: Node, section: str = "CLUSTER") -> dict:
        """CLUSTER INFO (or INFO `section`) of one node as a dict ({} if it does not answer)."""
        import redis  # noqa: PLC0415

        try:
            with node.client(0.5) as r:
                if section == "CLUSTER":
                    raw = r.execute_command("CLUSTER", "INFO")
                    raw = raw.decode() if isinstance(raw, bytes) else raw
                    return dict(line.split(":", 1) for line in raw.split("\r\n") if ":" in line)
                return {k: str(v) for k, v in r.info(section).items()}
        except redis.RedisError:
            return {}

    def _wait(self, predicate, what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not get {what} within {timeout} s")
            time.sleep(0.02)

    def running(self) -> list[Node]:
        """The nodes whose server still runs."""
        return [node for node in self.nodes if node.pid is not None]

    def roles(self) -> dict[int, str]:
        """port -> "master" or "slave" of every running node, as it reports itself."""
        return {node.port: self._info(node, "replication").get("role", "?") for node in self.running()}

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every running node says cluster_state:ok with all slots served and every
        running replica's link to its master is up."""

        def ready() -> bool:
            """Whether every running node is ready now."""
            for node in self.running():
                info = self._info(node)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                    return False
                replication = self._info(node, "replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        self._wait(ready, "ready (cluster_state ok, replicas in sync)", timeout)

    def master_for_slot(self, slot: int) -> Node:
        """The running node that serves `slot` as a master, as the cluster says now."""
        for node in self.running():
            try:
                with node.client(0.5) as r:
                    for first, last, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
                        if first <= slot <= last:
                            port = int(primary[1])
                            return next(n for n in self.nodes if n.port == port)
            except Exception:  # noqa: BLE001 - ask the next node
                continue
        raise RuntimeError(f"no node serves slot {slot}")

    def replicas_of(self, master: Node) -> list[Node]:
        """The running nodes replicating `master`."""
        found = []
        for node in self.running():
            replication = self._info(node, "replication")
            if replication.get("role") == "slave" and replication.get("master_port") == str(master.port):
                found.append(node)
        return found

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """Signal one server (SIGKILL by default) and collect it."""
        if node.pid is not None:
            node.proc.send_signal(sig)
            node.proc.wait(10)

    # -- stopping --------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop every server by pid: SIGTERM, then SIGKILL after `timeout`; return what had to be
        forced (empty when all stopped by themselves). Idempotent."""
        problems = []
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"redis-server {node.pid} (port {node.port}) ignored SIGTERM: killed")
                node.proc.kill()
                node.proc.wait(10)
        return problems

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _PortTaken(RuntimeError):
    """A server could not bind the port chosen for it (another process took it meanwhile)."""


def main() -> int:
    """Start a cluster in a temporary directory, print its URL, run until Ctrl-C or SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="shardkv-redis-") as tmp:
        cluster = LocalRedisCluster(tmp, appendonly="--appendonly" in sys.argv)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            cluster.start()
            print(cluster.url, flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
