"""A real 3-master Redis Cluster of loopback `redis-server` processes, started and stopped here.

Each node runs with an append-only file fsynced on every write, so a node killed with SIGKILL and
started again on the same port and directory keeps every write it acknowledged and rejoins with its
own node id and slots (nodes-<port>.conf). `cluster-require-full-coverage no`: with one master
down the others keep answering for their slots, which is what the outage tests check and what
docs/OPERATIONS.md recommends. Used by the test fixtures (tests/conftest.py) and by
benchmarks/store_cluster.py.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.live_server import wait_for

BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message says which step failed."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(n: int) -> list[int]:
    """`n` free ports (never 6379) whose bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + BUS_OFFSET < 65536 and port != 6379 and port not in ports and _port_free(port + BUS_OFFSET):
            ports.append(port)
    return ports


class RedisClusterProcesses:
    """Masters on free loopback ports under `directory`; `url` is the store URL the service takes."""

    def __init__(self, directory: Path, masters: int = 3, appendfsync: str = "always") -> None:
        """`appendfsync`: "always" (tests: every acknowledged write survives kill -9) or "everysec"
        (docker-compose's setting, for benchmarks)."""
        self.directory = directory
        self.appendfsync = appendfsync
        self.ports = free_cluster_ports(masters)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 60.0) -> RedisClusterProcesses:
        for port in self.ports:
            self.start_node(port)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False)
        if created.returncode != 0:
            self.stop()
            raise ClusterStartError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        if not wait_for(self.state_ok, timeout):
            self.stop()
            raise ClusterStartError(f"cluster_state did not become ok within {timeout} s")
        return self

    def start_node(self, port: int, timeout: float = 20.0) -> None:
        """Start (or restart, after kill) the node on `port` with its own directory and AOF."""
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for(lambda: self._pings(port), timeout):
            raise ClusterStartError(f"redis-server on port {port} did not answer within {timeout} s")

    def _pings(self, port: int) -> bool:
        process = self.processes.get(port)
        if process is None or process.poll() is not None:
            return False
        client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def state_ok(self) -> bool:
        """Every live node reports cluster_state:ok (all 16384 slots served)."""
        for port in self.processes:
            client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
            try:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.ports[0], decode_responses=False)

    def slot_masters(self) -> list[int]:
        """The port of the master serving each of the 16384 slots (read while every node is up)."""
        owner = [0] * 16384
        client = redis.Redis(port=self.ports[0], socket_timeout=5)
        try:
            slots = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            for start, end, master, *_replicas in slots:
                owner[int(start) : int(end) + 1] = [int(master[1])] * (int(end) - int(start) + 1)
        finally:
            client.close()
        return owner

    @staticmethod
    def slot(key: str) -> int:
        return key_slot(key.encode())

    def kill(self, port: int) -> None:
        process = self.processes.get(port)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again (same port, same AOF and nodes file) and wait for the cluster."""
        self.start_node(port)
        if not wait_for(self.state_ok, timeout):
            raise ClusterStartError(f"cluster_state did not become ok within {timeout} s of restarting {port}")

    def stop(self) -> None:
        for port, process in self.processes.items():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(port)
