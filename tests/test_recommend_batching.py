"""Concurrent /recommend requests through real uvicorn are answered in shared batches
(service/recommend_batcher.py), and each answer is exactly the one the request gets alone."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import StoreSpec, TrainedArtifact
from tests.live_server import LiveServer

USERS = 48


@pytest.fixture
def service_env(trained_artifact: TrainedArtifact, store_spec: StoreSpec, tmp_path: Path) -> dict[str, str]:
    env = {"M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": store_spec.location,
           "M2REC_K_MAX": "1000"}
    if store_spec.backend == "redis":
        env["M2REC_REDIS_NAMESPACE"] = store_spec.namespace
    return env


def _batches(metrics: str) -> tuple[float, float]:
    """(batches, requests) answered so far, from the batch-size histogram."""
    count = re.search(r"^m2rec_recommend_batch_size_count (\S+)$", metrics, re.M)
    total = re.search(r"^m2rec_recommend_batch_size_sum (\S+)$", metrics, re.M)
    assert count and total, "the batch-size histogram is exported"
    return float(count.group(1)), float(total.group(1))


async def _all_at_once(url: str, paths: list[str]) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=url, timeout=30.0,
                                 limits=httpx.Limits(max_connections=len(paths))) as client:
        responses = await asyncio.gather(*(client.get(p) for p in paths))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


def test_concurrent_requests_share_batches_and_get_what_each_gets_alone(
    service_env: dict[str, str], trained_artifact: TrainedArtifact
) -> None:
    ds, split = trained_artifact.dataset, trained_artifact.split
    assert ds.features is not None
    warm = [ds.item_ids[j] for j in split.warm_items.tolist()]
    cold = split.cold_items[:USERS].tolist()
    items = [{"id": f"new:{ds.item_ids[j]}", "attributes": ds.item_attributes[j], "content": ds.features[j].tolist()}
             for j in cold]
    histories = {f"user{u}": [warm[(u * 17 + t) % len(warm)] for t in range(2 + u % 9)] + [items[u]["id"]]
                 for u in range(USERS)}
    paths = [f"/recommend?user=user{u}&k={5 + u % 4 * 10}" for u in range(USERS)] + ["/recommend?user=nobody&k=9"]
    with LiveServer(service_env) as server, httpx.Client(base_url=server.url, timeout=30.0) as client:
        assert client.post("/items/batch", json={"items": items}).status_code == 200
        assert client.post("/interactions", json={"interactions": [
            {"user": u, "item": i} for u, h in histories.items() for i in h]}).status_code == 200
        alone = [client.get(p).json() for p in paths]
        batches_before, requests_before = _batches(client.get("/metrics").text)

        together = asyncio.run(_all_at_once(server.url, paths))

        batches, requests = _batches(client.get("/metrics").text)
    assert requests - requests_before == len(paths)
    assert batches - batches_before < len(paths), "concurrent requests were answered in shared batches"
    assert together == alone
    assert [len(body["items"]) for body in together] == [5 + u % 4 * 10 for u in range(USERS)] + [9]  # type: ignore[arg-type]
