"""Faults and abuse, loopback only: a Redis of the test's own killed and restarted under load, one
master of a Redis Cluster of the test's own killed and restarted under load, a replica killed with
SIGKILL during ingest, propagation between replicas timed, writes without the API key. The shared
Redis at 6379 and the session's cluster are never stopped: these tests start their own servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.config import Settings
from service.store.redis_keys import ClusterKeys
from tests.conftest import StoreSpec, TrainedArtifact, start_cluster
from tests.live_server import LiveServer, stop_process
from tests.live_server import wait_for as _wait_for
from tests.redis_cluster import RedisClusterProcesses

API_KEY = "fault-key"
HEADERS = {"X-API-Key": API_KEY}
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class OwnRedis:
    """A redis-server of this test (append-only file, so a restart on the same directory keeps every
    acknowledged write); killed and restarted on the same port without touching any other Redis."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        assert _wait_for(lambda: self._pings(client), 10), "own redis-server did not start"
        client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        reason = "redis-server binary NOT FOUND: the Redis fault tests did NOT run"
        if os.environ.get("M2REC_REQUIRE_REDIS") == "1":
            pytest.fail(reason + " and M2REC_REQUIRE_REDIS=1")
        pytest.skip(reason)
    server = OwnRedis(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _settings(trained: TrainedArtifact, store_url: str, namespace: str = "faults", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "artifact_path": trained.root, "store_url": store_url, "redis_namespace": namespace,
        "api_key": SecretStr(API_KEY), "k_max": 5000, "event_poll_seconds": 0.05,
    }
    return Settings(**{**values, **overrides})


def _warm(trained: TrainedArtifact, n: int) -> list[str]:
    return [trained.dataset.item_ids[int(j)] for j in trained.split.warm_items[:n]]


def _served(get: Callable[..., Any], user: str) -> set[str]:
    """Every item the index would recommend to `user` (k beyond the index size)."""
    body = get("/recommend", params={"user": user, "k": 5000}).json()
    return {i["id"] for i in body["items"]}


class Writer:
    """Posts items in a loop until stopped; keeps the acknowledged ids and every status seen."""

    def __init__(self, post: Callable[..., Any], trained: TrainedArtifact, prefix: str) -> None:
        self.post, self.trained, self.prefix = post, trained, prefix
        self.acknowledged: list[str] = []
        self.statuses: list[int] = []
        self.answers: list[tuple[str, int]] = []  # (item id, status) in order
        self.details: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            item = self.trained.cold_item(n, f"{self.prefix}:{n}")
            n += 1
            try:
                r = self.post("/items", json=item, headers=HEADERS)
            except httpx.TransportError:  # the replica died mid-request: not acknowledged
                self.statuses.append(-1)
                time.sleep(0.01)
                continue
            self.statuses.append(r.status_code)
            self.answers.append((item["id"], r.status_code))
            if r.status_code == 201:
                self.acknowledged.append(item["id"])
            else:
                self.details.append(r.text)
                time.sleep(0.01)


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load_gives_503s_then_recovers_without_losing_writes(
    trained_artifact: TrainedArtifact, own_redis: OwnRedis
) -> None:
    settings = _settings(trained_artifact, own_redis.url)
    warm = _warm(trained_artifact, 3)
    with TestClient(create_app(settings)) as c, TestClient(create_app(settings)) as peer:
        assert c.post("/interactions", json={"interactions": [{"user": "known", "item": i} for i in warm]},
                      headers=HEADERS).status_code == 200
        with Writer(c.post, trained_artifact, "load") as writer:
            assert _wait_for(lambda: len(writer.acknowledged) >= 5, 10)
            own_redis.kill()
            down_at = time.monotonic()
            assert _wait_for(lambda: writer.statuses[-1] == 503, 5)
            refused = c.post("/items", json=trained_artifact.cold_item(0, "while-down"), headers=HEADERS)
            assert refused.status_code == 503 and "redis" in refused.json()["detail"]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "store unreachable" in ready.json()["detail"]
            assert c.get("/healthz").status_code == 200
            for path in ("/recommend?user=known", "/recommend?user=stranger", "/items/load:0", "/metrics"):
                assert c.get(path).status_code in (200, 503), path
            assert time.monotonic() - down_at < 10, "requests against a dead Redis must fail fast"
            time.sleep(0.3)  # the followers poll a dead store meanwhile

            own_redis.start()  # same port, same append-only file
            assert _wait_for(lambda: c.get("/readyz").status_code == 200, 10)
            acked_before = len(writer.acknowledged)
            assert _wait_for(lambda: len(writer.acknowledged) > acked_before + 3, 10), writer.details[-3:]
        assert set(writer.statuses) <= {201, 503}, writer.details[-3:]
        assert c.get("/items/while-down").status_code == 404

        # nothing acknowledged is lost, on this replica and on the peer, whose follower survived the outage
        for item_id in writer.acknowledged:
            assert c.get(f"/items/{item_id}").status_code == 200, item_id
        assert set(writer.acknowledged) <= _served(c.get, "someone")
        assert _wait_for(lambda: set(writer.acknowledged) <= _served(peer.get, "someone"), 5)
        assert c.get("/recommend", params={"user": "known"}).json()["fallback"] is False
        after = trained_artifact.cold_item(1, "after-recovery")
        assert peer.post("/items", json=after, headers=HEADERS).status_code == 201
        assert _wait_for(lambda: after["id"] in _served(c.get, "someone"), 2)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    cluster = start_cluster(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_killed_cluster_master_fails_only_its_own_slots_with_503_and_loses_nothing_after_restart(
    trained_artifact: TrainedArtifact, own_cluster: RedisClusterProcesses
) -> None:
    namespace = "cluster-faults"
    keys = ClusterKeys(namespace)
    masters = own_cluster.slot_masters()  # read once, while every master is up

    def master_of(key: str) -> int:
        return masters[own_cluster.slot(key)]

    def on_victim(item_id: str) -> bool:
        return master_of(keys.item(item_id)) == victim

    # the victim is a master without the event stream (every write appends to it: see OPERATIONS.md)
    victim = next(port for port in own_cluster.ports if port != master_of(keys.events))
    warm = _warm(trained_artifact, 3)
    users = [f"user-{n}" for n in range(200)]
    down_user = next(u for u in users if master_of(keys.hist(u)) == victim)
    up_user = next(u for u in users if master_of(keys.hist(u)) != victim)
    probes = [f"probe:{n}" for n in range(200)]
    down_item = next(i for i in probes if on_victim(i))
    up_item = next(i for i in probes if not on_victim(i))

    env = {"M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": own_cluster.url,
           "M2REC_REDIS_NAMESPACE": namespace, "M2REC_API_KEY": API_KEY, "M2REC_K_MAX": "5000",
           "M2REC_EVENT_POLL_SECONDS": "0.05"}
    with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=10.0) as c, \
            TestClient(create_app(_settings(trained_artifact, own_cluster.url, namespace))) as peer:
        for user in (down_user, up_user):
            body = {"interactions": [{"user": user, "item": i} for i in warm]}
            assert c.post("/interactions", json=body, headers=HEADERS).status_code == 200
        with Writer(c.post, trained_artifact, "load") as writer:
            assert _wait_for(lambda: len(writer.acknowledged) >= 10, 30)
            own_cluster.kill(victim)
            killed_at = len(writer.answers)
            # writes on the dead master's slots answer 503; the others keep being acknowledged
            assert _wait_for(lambda: any(s == 503 for _, s in writer.answers[killed_at:]), 10)
            assert _wait_for(lambda: sum(s == 201 for _, s in writer.answers[killed_at:]) >= 5, 10)
            refused = c.post("/items", json=trained_artifact.cold_item(0, down_item), headers=HEADERS)
            assert refused.status_code == 503 and "redis" in refused.json()["detail"], refused.text
            assert c.post("/items", json=trained_artifact.cold_item(1, up_item), headers=HEADERS).status_code == 201
            for user, expected in ((down_user, 503), (up_user, 200)):
                body = {"interactions": [{"user": user, "item": up_item}]}
                assert c.post("/interactions", json=body, headers=HEADERS).status_code == expected, user
                assert c.get("/recommend", params={"user": user}).status_code == expected, user
            assert c.get("/readyz").status_code == 200  # the event stream's master answers
            assert c.get(f"/items/{up_item}").status_code == 200

            own_cluster.restart(victim)  # same port, same append-only file and nodes file
            restarted_at = len(writer.answers)
            assert _wait_for(lambda: any(s == 201 and on_victim(i) for i, s in writer.answers[restarted_at:]), 20)
        assert set(writer.statuses) <= {201, 503}, writer.details[-3:]
        assert all(on_victim(i) for i, s in writer.answers if s == 503), "a write to a live master failed"
        assert c.get(f"/items/{down_item}").status_code == 404  # refused, so never written

        # nothing acknowledged is lost, on this replica and on the peer, whose follower waited out the outage
        acknowledged = {*writer.acknowledged, up_item}
        assert any(on_victim(i) for i in writer.acknowledged)  # some acknowledged writes were on the victim
        for item_id in acknowledged:
            assert c.get(f"/items/{item_id}").status_code == 200, item_id
        assert acknowledged <= _served(c.get, "someone")
        assert _wait_for(lambda: acknowledged <= _served(peer.get, "someone"), 10)
        for user in (down_user, up_user):
            assert c.get("/recommend", params={"user": user}).json()["fallback"] is False


class Replica:
    """`python -m service` as a subprocess on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **env, "M2REC_HOST": "127.0.0.1", "M2REC_PORT": str(self.port)})
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def wait_ready(self, seconds: float = 90) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, Path(self.log.name).read_text()
            try:
                return self.http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        assert _wait_for(ready, seconds, every=0.1)

    def close(self) -> None:
        stop_process(self.process)
        self.http.close()
        self.log.close()


@pytest.mark.slow
def test_a_replica_killed_during_ingest_loses_no_acknowledged_write(
    trained_artifact: TrainedArtifact, own_redis: OwnRedis, tmp_path: Path
) -> None:
    env = {"M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": own_redis.url,
           "M2REC_API_KEY": API_KEY, "M2REC_K_MAX": "5000", "M2REC_REDIS_NAMESPACE": "replicas"}
    victim, survivor = Replica(env, tmp_path / "victim.log"), Replica(env, tmp_path / "survivor.log")
    try:
        victim.wait_ready()
        survivor.wait_ready()
        with Writer(victim.http.post, trained_artifact, "victim") as to_victim, \
                Writer(survivor.http.post, trained_artifact, "survivor") as to_survivor:
            assert _wait_for(lambda: len(to_victim.acknowledged) >= 10 and len(to_survivor.acknowledged) >= 10, 30)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            killed_with = len(to_survivor.acknowledged)
            assert _wait_for(lambda: len(to_survivor.acknowledged) >= killed_with + 10, 10)
        assert set(to_survivor.statuses) == {201}
        assert set(to_victim.statuses) <= {201, -1}
        acknowledged = set(to_victim.acknowledged) | set(to_survivor.acknowledged)
        assert survivor.http.get("/readyz").status_code == 200
        for item_id in acknowledged:
            assert survivor.http.get(f"/items/{item_id}").status_code == 200, item_id
        assert _wait_for(lambda: acknowledged <= _served(survivor.http.get, "someone"), 2)
    finally:
        victim.close()
        survivor.close()


@pytest.mark.parametrize("poll_seconds", [Settings().event_poll_seconds])  # the shipped default
def test_an_item_registered_on_one_replica_is_recommendable_on_another_within_a_second(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec, poll_seconds: float
) -> None:
    settings = _settings(trained_artifact, store_spec.location, store_spec.namespace or "x",
                         event_poll_seconds=poll_seconds)
    warm = _warm(trained_artifact, 3)
    lags: list[float] = []
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        a.post("/interactions", json={"interactions": [{"user": "reader", "item": i} for i in warm]}, headers=HEADERS)
        for n in range(4):
            item = trained_artifact.cold_item(n, f"spread:{uuid.uuid4().hex[:8]}")
            source, target = (a, b) if n % 2 == 0 else (b, a)
            assert source.post("/items", json=item, headers=HEADERS).status_code == 201
            written = time.monotonic()
            assert _wait_for(lambda: item["id"] in _served(target.get, "reader"), 3, every=0.01)  # noqa: B023
            lags.append(time.monotonic() - written)
    assert max(lags) <= 1.0, f"propagation lags {lags}"


def test_every_write_operation_needs_the_api_key_and_reads_do_not(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    spec = StoreSpec("sqlite", str(tmp_path / "s.sqlite3"), "")
    with TestClient(create_app(_settings(trained_artifact, spec.location))) as c:
        paths = c.get("/openapi.json").json()["paths"]
        writes = [(method.upper(), path) for path, ops in paths.items() for method in ops
                  if method in ("post", "put", "patch", "delete")]
        assert {("POST", "/items"), ("POST", "/admin/reload"), ("DELETE", "/items/{item_id}")} <= set(writes)
        item = trained_artifact.cold_item(0, "guarded")
        assert c.post("/items", json=item, headers=HEADERS).status_code == 201
        body = {"/items": item, "/items/batch": {"items": [item]}, "/interactions": {"user": "u", "item": "guarded"},
                "/admin/reload": {}}
        for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": API_KEY.upper()},
                        {"X-API-Key": API_KEY + " "}, {"Authorization": f"Bearer {API_KEY}"}):
            for method, path in writes:
                url = path.replace("{item_id}", "guarded")
                r = c.request(method, url, json=body.get(path), headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["WWW-Authenticate"] == "ApiKey"
        assert c.get("/items/guarded").json()["created_at"] is not None  # still there, untouched
        for path in ("/items/guarded", "/recommend?user=u", "/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert c.get(path).status_code == 200, path
