"""A 503 from a Redis that stopped answering mid-write: the write may have been applied (Redis ran the
transaction, only its reply was lost), the answer says so, and retrying leaves exactly the state one
successful write leaves (issue 17, 5). A Redis of the test's own is paused with SIGSTOP; the shared
Redis is never touched."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.config import Settings
from tests.conftest import TrainedArtifact
from tests.test_faults import OwnRedis, own_redis  # noqa: F401  # the fixture, by name

API_KEY = "retry-key"
HEADERS = {"X-API-Key": API_KEY}
NAMESPACE = "retries"


class Paused:
    """SIGSTOP the Redis for the duration; SIGCONT however the block ends."""

    def __init__(self, server: OwnRedis) -> None:
        assert server.process is not None
        self.pid = server.process.pid

    def __enter__(self) -> Paused:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def client(trained_artifact: TrainedArtifact, own_redis: OwnRedis) -> Iterator[TestClient]:  # noqa: F811
    settings = Settings(artifact_path=trained_artifact.root, store_url=own_redis.url, redis_namespace=NAMESPACE,
                        api_key=SecretStr(API_KEY), event_poll_seconds=0.05)
    with TestClient(create_app(settings)) as c:
        yield c


def _until(check: Any, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = check()
        except (httpx.HTTPError, redis.RedisError):
            got = None
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _post_until_answered(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    """The client's loop: retry on 503 until the write is acknowledged."""
    for _ in range(100):
        r = client.post(path, json=body, headers=HEADERS)
        if r.status_code != 503:
            return r
        time.sleep(0.1)
    raise AssertionError(f"{path} still 503 after 100 tries")


@pytest.mark.slow
def test_a_write_that_timed_out_may_be_applied_and_a_retry_leaves_it_once(
    client: TestClient, trained_artifact: TrainedArtifact, own_redis: OwnRedis  # noqa: F811
) -> None:
    raw = redis.Redis.from_url(own_redis.url)
    prefix = f"m2rec:{{{NAMESPACE}}}:"
    warm = [trained_artifact.dataset.item_ids[int(j)] for j in trained_artifact.split.warm_items[:3]]
    item = trained_artifact.cold_item(0, "movie:retried")
    events = {"interactions": [{"user": "retrier", "item": i, "timestamp": 1.7e9 + n} for n, i in enumerate(warm)]
              + [{"user": "retrier", "item": "movie:retried", "timestamp": 1.7e9 + 9}]}

    with Paused(own_redis):  # the request reaches Redis's socket; the reply never comes in time
        lost = client.post("/items", json=item, headers=HEADERS)
    assert lost.status_code == 503, lost.text
    assert "may or may not have been applied" in lost.json()["detail"]
    assert "retrying is safe" in lost.json()["detail"]
    applied = _until(lambda: raw.exists(prefix + "item:movie:retried"), 3.0)  # Redis ran it after SIGCONT?
    retried = _post_until_answered(client, "/items", item)
    assert retried.status_code == (200 if applied else 201), retried.text
    assert raw.zcard(prefix + "items") == 1
    assert client.get("/items/movie:retried").json()["attributes"] == item["attributes"]

    with Paused(own_redis):
        lost = client.post("/interactions", json=events, headers=HEADERS)
    assert lost.status_code == 503 and "retrying is safe" in lost.json()["detail"], lost.text
    for _ in range(2):  # a retry, and a client that retries once too often
        assert _post_until_answered(client, "/interactions", events).status_code == 200
    history = [m.decode() for m in cast(list[bytes], raw.zrange(prefix + "hist:retrier", 0, -1))]
    assert history == [*warm, "movie:retried"]  # each once, in timestamp order: nothing counted twice

    # the replica's index has the item once, whichever write put it there
    got = _until(lambda: client.get("/recommend", params={"user": "someone-else", "k": 200}).json()["items"])
    assert [i["id"] for i in got].count("movie:retried") == 1
    with Paused(own_redis):
        lost = client.delete("/items/movie:retried", headers=HEADERS)
    assert lost.status_code == 503 and "retrying is safe" in lost.json()["detail"], lost.text
    again = client.delete("/items/movie:retried", headers=HEADERS)
    while again.status_code == 503:
        again = client.delete("/items/movie:retried", headers=HEADERS)
    assert again.status_code in (204, 404)  # 404: the first delete was applied after all
    assert raw.zcard(prefix + "items") == 0
    raw.close()
