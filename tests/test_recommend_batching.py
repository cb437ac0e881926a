"""Concurrent /recommend requests through real uvicorn are answered in shared batches
(service/api/recommend_batcher.py), and each answer is exactly the one the request gets alone."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from pathlib import Path
from typing import Any

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


def _counter(metrics: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.M)
    assert found, f"{series} is exported"
    return float(found.group(1))


def _served(metrics: str) -> tuple[float, ...]:
    return tuple(_counter(metrics, s) for s in (
        'm2rec_recommendations_total{outcome="personal"}', 'm2rec_recommendations_total{outcome="fallback"}',
        'm2rec_recommended_items_total{kind="cold"}', 'm2rec_recommended_items_total{kind="warm"}'))


def _batches(metrics: str) -> tuple[float, float]:
    """(batches, requests) answered so far, from the batch-size histogram."""
    count = re.search(r"^m2rec_recommend_batch_size_count (\S+)$", metrics, re.M)
    total = re.search(r"^m2rec_recommend_batch_size_sum (\S+)$", metrics, re.M)
    assert count and total, "the batch-size histogram is exported"
    return float(count.group(1)), float(total.group(1))


async def _all_at_once(url: str, paths: list[str]) -> list[dict[str, Any]]:
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
        before = client.get("/metrics").text
        batches_before, requests_before = _batches(before)

        together = asyncio.run(_all_at_once(server.url, paths))

        after = client.get("/metrics").text
        batches, requests = _batches(after)
    assert requests - requests_before == len(paths)
    assert batches - batches_before < len(paths), "concurrent requests were answered in shared batches"
    assert together == alone
    assert [len(body["items"]) for body in together] == [5 + u % 4 * 10 for u in range(USERS)] + [9]
    cold = sum(item["is_cold"] for body in together for item in body["items"])
    served = sum(len(body["items"]) for body in together)
    counted = [a - b for a, b in zip(_served(after), _served(before), strict=True)]
    assert counted == [USERS, 1, cold, served - cold], "each batch counts what it served"


def test_the_fold_in_and_search_never_run_on_the_event_loop_whatever_the_store(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    """SQLite included: a batch is computed in a worker thread, so the loop keeps accepting requests.
    Which thread runs `Recommender.recommend_many` is observed with a profile hook (sys/threading
    setprofile): the real method runs, nothing of ours is replaced."""
    from prometheus_client import CollectorRegistry, Histogram

    from service.api.recommend_batcher import RecommendBatcher
    from service.core.recommender import Recommender
    from service.model.artifact import load_artifact
    from service.store import Interaction, SqliteStore

    recommender = Recommender(load_artifact(trained_artifact.root), SqliteStore(tmp_path / "s.sqlite3"))
    recommender.maintainer.build_index()
    recommender.store.add_interactions([Interaction("u", recommender.warm_ids[0], 0.0)])
    threads: list[int] = []
    code = Recommender.recommend_many.__code__

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            threads.append(threading.get_ident())

    sizes = Histogram("batch", "batch sizes", registry=CollectorRegistry())

    async def ask() -> list[Any]:
        batcher = RecommendBatcher(sizes, lambda answers: None)
        return await asyncio.gather(*(batcher.recommend(recommender, user, 5) for user in ("u", "u", "nobody")))

    sys.setprofile(watch)
    threading.setprofile(watch)  # the worker threads asyncio.run's fresh executor starts
    try:
        answers = asyncio.run(ask())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)

    assert threads and threading.get_ident() not in threads
    assert [a.fallback for a in answers] == [False, False, True] and answers[0] == answers[1]
    with pytest.raises(ValueError, match="max_batch"):
        RecommendBatcher(sizes, lambda answers: None, max_batch=20)
