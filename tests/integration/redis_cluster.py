"""A real Redis Cluster on loopback ports, for the conformance suite and the failover test.

:class:`LocalRedisCluster` starts ``masters * (1 + replicas)`` ``redis-server
--cluster-enabled yes`` processes on free ports of 127.0.0.1 in a temporary
directory, every one with ``--appendonly yes --appendfsync always --save ''``,
joins them with ``redis-cli --cluster create ... --cluster-replicas N
--cluster-yes``, and waits (with a deadline) until every node reports
``cluster_state:ok``, knows every other node, and every replica's link to its
master is up. :meth:`stop` kills them and removes the directory.

A node listens on its port and on port + 10000 (the cluster bus), so ports are
picked at or below 55535 with both free. Servers get SIGTERM when the thread
that started them dies (Linux), so a killed test run leaves none behind.

Usage::

    with LocalRedisCluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        cluster.url                         # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...
        node = cluster.master_of("{prefix}:all")
        cluster.kill(node)                  # SIGKILL; its replica takes over
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.falkordb_server import _die_with_parent

__all__ = ["LocalRedisCluster", "ClusterNode", "cluster_unavailable", "free_cluster_port"]

#: Highest port whose cluster bus port (port + 10000) is still a valid port.
_MAX_PORT = 65535 - 10000


def cluster_unavailable() -> str | None:
    """None when a local cluster can be started, else why not."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'celery-persist[redis]')"
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (apt-get install redis-server, or redis-tools for redis-cli)"
    return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A port at or below 55535 that is free, with its bus port (+10000) free too."""
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port > _MAX_PORT or port in taken or port + 10000 in taken:
            continue
        if _bindable(port + 10000):
            return port
    raise RuntimeError("no free TCP port pair (port, port + 10000) at or below 55535")


@dataclass(eq=False)
class ClusterNode:
    """One ``redis-server`` of the cluster."""

    port: int
    dir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def client(self, timeout: float = 2.0) -> Any:
        """A plain (non-cluster) client of this node alone."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def call(self, *args: Any, timeout: float = 2.0) -> Any:
        client = self.client(timeout)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: nothing is flushed beyond what ``appendfsync always`` already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process stops reading and writing; the kernel still buffers what peers send it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.resume()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join((self.dir / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalRedisCluster:
    """A Redis Cluster of ``masters`` shards with ``replicas`` replicas each, on loopback.

    Args:
        masters: Number of shards (``redis-cli --cluster create`` needs at least 3).
        replicas: Replicas per master (``--cluster-replicas``).
        node_timeout_ms: ``cluster-node-timeout``: how long a master may be
            unreachable before its replica fails it over.
        workdir: Where nodes run; a fresh temp dir by default (removed on stop).
        startup_timeout: Seconds to wait for the cluster to become ``ok``.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        node_timeout_ms: int = 5000,
        workdir: str | Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout = startup_timeout
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="celery-persist-redis-cluster-"))
        self.nodes: list[ClusterNode] = []
        self._owner_pid = os.getpid()
        self.startup_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> LocalRedisCluster:
        """Start the nodes, create the cluster, wait until it is ok everywhere.

        Raises:
            RuntimeError: A node died or the cluster did not become ok in time
                (the message carries the tail of the logs).
        """
        started = time.monotonic()
        server = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError(cluster_unavailable() or "redis-server / redis-cli not found")
        taken: set[int] = set()
        try:
            for i in range(self.masters * (1 + self.replicas)):
                port = free_cluster_port(taken)
                taken |= {port, port + 10000}
                node_dir = self.workdir / f"node-{port}"
                node_dir.mkdir(parents=True, exist_ok=True)
                # fmt: off
                args = [
                    server,
                    "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                    "--protected-mode", "no", "--logfile", "",
                ]
                # fmt: on
                node = ClusterNode(port, node_dir, args)
                node.extra["index"] = i
                self.nodes.append(node)
                node.start()
            self._wait(lambda: all(self._pings(n) for n in self.nodes), "every node to answer PING")
            create = [cli, "--cluster", "create", *(n.address for n in self.nodes)]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True, timeout=self.startup_timeout, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove the temp dir. A forked child does nothing."""
        if os.getpid() != self._owner_pid:
            return
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what clients use --------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (any reachable one is enough to connect)."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    @property
    def seed_url(self) -> str:
        """``redis://`` of the first node, for ``open_store(url, cluster=True)``."""
        return f"redis://{self.nodes[0].address}"

    # -- topology ----------------------------------------------------------------------

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def topology(self, via: ClusterNode | None = None) -> dict[int, dict[str, Any]]:
        """``CLUSTER NODES`` as seen by ``via`` (default: any live node): port -> role, master port, flags."""
        seen = [via] if via is not None else [n for n in self.nodes if n.alive()]
        for node in seen:
            try:
                raw = node.call("CLUSTER NODES")  # parsed by redis-py: "host:port" -> fields
            except Exception:  # noqa: BLE001 - try the next node
                continue
            port_of = {fields["node_id"]: int(addr.split("@")[0].rsplit(":", 1)[1]) for addr, fields in raw.items()}
            out: dict[int, dict[str, Any]] = {}
            for fields in raw.values():
                flags = set(fields["flags"].split(","))
                out[port_of[fields["node_id"]]] = {
                    "id": fields["node_id"],
                    "role": "master" if "master" in flags else "replica",
                    "master": port_of.get(fields["master_id"]),
                    "flags": flags,
                    "slots": fields["slots"],
                }
            return out
        raise RuntimeError("no cluster node answers CLUSTER NODES")

    def master_of(self, key: str) -> ClusterNode:
        """The node serving ``key``'s slot now (asks a live node with ``CLUSTER SLOTS``)."""
        for node in [n for n in self.nodes if n.alive()]:
            try:
                slot = int(node.call("CLUSTER KEYSLOT", key))
                for start, end, master, *_ in node.call("CLUSTER SLOTS"):
                    if int(start) <= slot <= int(end):
                        return self.node(int(master[1]))
            except Exception:  # noqa: BLE001 - try the next node
                continue
        raise RuntimeError(f"no live node knows who serves {key!r}")

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        topo = self.topology()
        return [self.node(p) for p, info in topo.items() if info["role"] == "replica" and info["master"] == master.port]

    def failover(self, replica: ClusterNode, *, timeout: float = 30.0) -> None:
        """``CLUSTER FAILOVER`` on ``replica`` (coordinated: the master stops writes until the replica has caught up)."""
        replica.call("CLUSTER FAILOVER")
        self._wait(lambda: self._role(replica) == "master", f"{replica.address} to become master", timeout)
        self.wait_ok(timeout)

    def kill(self, node: ClusterNode) -> None:
        node.kill()

    def wait_master(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Until ``node`` reports itself master and the live nodes say ``cluster_state:ok``."""
        self._wait(lambda: self._role(node) == "master", f"{node.address} to become master", timeout)
        self.wait_ok(timeout)

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its port and files; it rejoins (as a replica when it was failed over)."""
        node.start()
        self._wait(lambda: self._pings(node), f"{node.address} to answer PING")

    def wait_ok(self, timeout: float | None = None) -> None:
        """Until every live node says ``cluster_state:ok``, knows every node, and live replicas are in sync."""
        self._wait(self._settled, "cluster_state:ok on every node", timeout or self.startup_timeout)

    # -- helpers -----------------------------------------------------------------------

    def _settled(self) -> bool:
        live = [n for n in self.nodes if n.alive()]
        for node in live:
            try:
                with contextlib.closing(node.client()) as client:
                    info = client.cluster("info")
                    repl = client.info("replication")
            except Exception:  # noqa: BLE001 - not ready yet
                return False
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
            if int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        return True

    def _role(self, node: ClusterNode) -> str:
        try:
            with contextlib.closing(node.client()) as client:
                return str(client.info("replication").get("role"))
        except Exception:  # noqa: BLE001 - not answering (yet)
            return "?"

    @staticmethod
    def _pings(node: ClusterNode) -> bool:
        if not node.alive():
            raise RuntimeError(f"redis-server on {node.address} exited:\n{node.log_tail()}")
        try:
            return bool(node.call("PING", timeout=1.0))
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def _wait(self, predicate: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        logs = "\n".join(f"--- {n.address} ---\n{n.log_tail()}" for n in self.nodes)
        raise RuntimeError(f"timed out after {timeout or self.startup_timeout}s waiting for {what}\n{logs}")
