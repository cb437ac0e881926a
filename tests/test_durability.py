"""A 2xx means durable: after kill -9 and a restart on the same store, every acknowledged item and
interaction is there and servable.

The real service runs as a subprocess (`python -m service`) on SQLite (a file in tmp_path), on real
Redis and on a real 3-master Redis Cluster (a unique namespace each). It first takes a few writes
and stops gracefully, leaving an index snapshot, so the restart after the crash takes the
snapshot-plus-events path, the one most able to lose a write. Then two writer threads stream
POST /items and POST /interactions, the server is SIGKILLed mid-stream, and a fresh process on the
same store must serve every acknowledged write.
Requests without a 2xx may or may not have landed; nothing is asserted about them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import StoreSpec, TrainedArtifact
from tests.live_server import LiveServer

WRITERS = 2
MAX_WRITES_PER_WRITER = 300  # bound on the stream if the kill came late
KILL_AFTER_ACKED_ITEMS = 30
STREAM_DEADLINE = 30.0  # seconds


@dataclass
class Acked:
    """What the service acknowledged with a 2xx; filled by the writer threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    items: dict[str, list[str]] = field(default_factory=dict)  # id -> attributes sent
    histories: dict[str, list[str]] = field(default_factory=dict)  # user -> items
    interrupted: int = 0  # writers stopped by a failed request (the kill)
    errors: list[str] = field(default_factory=list)  # non-2xx answers: bugs, not the kill


class Payloads:
    def __init__(self, trained: TrainedArtifact) -> None:
        ds, split = trained.dataset, trained.split
        assert ds.features is not None
        self.features = ds.features
        self.cold = split.cold_items.tolist()
        self.attributes = ds.item_attributes
        self.warm_ids = [ds.item_ids[j] for j in split.warm_items[:50].tolist()]

    def item(self, item_id: str, n: int) -> dict[str, Any]:
        j = self.cold[n % len(self.cold)]
        return {"id": item_id, "attributes": self.attributes[j], "content": self.features[j].tolist()}


def _write_stream(url: str, writer: int, payloads: Payloads, acked: Acked, stop: threading.Event) -> None:
    """Item n, then user n's interactions with it and a trained item; stops at the first failure."""
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for n in range(MAX_WRITES_PER_WRITER):
            if stop.is_set():
                return
            item_id, user = f"crash:{writer}:{n}", f"crash-user:{writer}:{n}"
            history = [item_id, payloads.warm_ids[n % len(payloads.warm_ids)]]
            item = payloads.item(item_id, writer * MAX_WRITES_PER_WRITER + n)
            try:
                response = client.post("/items", json=item)
                if response.status_code == 201:
                    with acked.lock:
                        acked.items[item_id] = item["attributes"]
                else:
                    acked.errors.append(f"POST /items {item_id}: {response.status_code} {response.text}")
                    return
                response = client.post("/interactions",
                                       json={"interactions": [{"user": user, "item": i} for i in history]})
                if response.status_code == 200:
                    with acked.lock:
                        acked.histories[user] = history
                else:
                    acked.errors.append(f"POST /interactions {user}: {response.status_code} {response.text}")
                    return
            except httpx.TransportError:
                with acked.lock:
                    acked.interrupted += 1
                return


def _stream_until_killed(server: LiveServer, payloads: Payloads) -> Acked:
    acked, stop = Acked(), threading.Event()
    threads = [threading.Thread(target=_write_stream, args=(server.url, w, payloads, acked, stop), daemon=True)
               for w in range(WRITERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + STREAM_DEADLINE
    while len(acked.items) < KILL_AFTER_ACKED_ITEMS and time.monotonic() < deadline and not acked.errors:
        time.sleep(0.005)
    server.kill()  # SIGKILL while both writers have requests in flight or about to be
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not acked.errors, acked.errors
    assert len(acked.items) >= KILL_AFTER_ACKED_ITEMS, f"only {len(acked.items)} items acknowledged in time"
    # the kill must have cut the stream, or this test checks an orderly shutdown instead
    assert acked.interrupted >= 1
    return acked


def _check_served(url: str, acked: Acked) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for item_id, attributes in acked.items.items():
            response = client.get(f"/items/{item_id}")
            assert response.status_code == 200, f"acknowledged item {item_id} lost: {response.text}"
            body = response.json()
            assert body["is_cold"] is True and body["attributes"] == attributes and body["has_content"] is True
        n_index = client.get("/readyz").json()["index_items"]
        # a user who has seen nothing of ours gets the whole index: every acknowledged item is searchable
        probe_history = [next(iter(acked.histories.values()))[1]]
        response = client.post("/interactions", json={"interactions": [{"user": "probe", "item": probe_history[0]}]})
        assert response.status_code == 200, response.text
        served = {i["id"]: i for i in _recommend(client, "probe", n_index)}
        assert len(served) == n_index - 1
        missing = [i for i in acked.items if i not in served]
        assert not missing, f"acknowledged items stored but not searchable: {missing}"
        assert all(served[i]["is_cold"] for i in acked.items)
        # every acknowledged history is folded in (personal, not the fallback) and excluded from the list
        for user, history in acked.histories.items():
            items = _recommend(client, user, n_index)
            assert len(items) == n_index - len(history), f"{user}: history {history} not all recorded"
            assert not {i["id"] for i in items} & set(history)


def _recommend(client: httpx.Client, user: str, k: int) -> list[dict[str, Any]]:
    response = client.get("/recommend", params={"user": user, "k": k})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] is False, f"{user} has acknowledged interactions but got the fallback"
    items: list[dict[str, Any]] = body["items"]
    return items


@pytest.fixture
def service_env(trained_artifact: TrainedArtifact, store_spec: StoreSpec, tmp_path: Path) -> dict[str, str]:
    env = {
        "M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": store_spec.location,
        "M2REC_INDEX_KIND": "exact", "M2REC_K_MAX": "100000",
        "M2REC_INDEX_SNAPSHOT_DIR": str(tmp_path / "snapshots"), "M2REC_EVENT_POLL_SECONDS": "0.05",
    }
    if store_spec.backend == "redis":
        env["M2REC_REDIS_NAMESPACE"] = store_spec.namespace
    return env


def test_every_acknowledged_write_survives_kill_9_and_is_served_after_restart(
    service_env: dict[str, str], trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    payloads = Payloads(trained_artifact)
    before = Acked()
    with LiveServer(service_env) as server, httpx.Client(base_url=server.url, timeout=10.0) as client:
        for n in range(5):
            item = payloads.item(f"before:{n}", 1000 + n)
            assert client.post("/items", json=item).status_code == 201
            before.items[item["id"]] = item["attributes"]
        history = ["before:0", payloads.warm_ids[0]]
        assert client.post("/interactions", json={"interactions": [
            {"user": "before-user", "item": i} for i in history]}).status_code == 200
        before.histories["before-user"] = history
    assert any((tmp_path / "snapshots").iterdir()), "a graceful stop leaves an index snapshot"

    crashed = LiveServer(service_env).start()
    try:
        acked = _stream_until_killed(crashed, payloads)
    finally:
        crashed.kill()

    with LiveServer(service_env) as server:
        _check_served(server.url, before)
        _check_served(server.url, acked)
