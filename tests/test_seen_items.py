"""A user is never offered an item they already have, however long their history (issue 17, 2): the
fold-in reads the newest M2REC_MAX_HISTORY_LENGTH items, exclusion reads every item seen (up to the
store's seen cap). Through real HTTP, on both stores."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import StoreSpec, TrainedArtifact
from tests.live_server import LiveServer

API_KEY = "seen-key"
HEADERS = {"X-API-Key": API_KEY}
TOUCHED = 5_000
UNTOUCHED = 300
BATCH = 1_000


@pytest.fixture
def live(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> Iterator[LiveServer]:
    env = {"M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": store_spec.location,
           "M2REC_API_KEY": API_KEY, "M2REC_MAX_BATCH_SIZE": str(BATCH), "M2REC_K_MAX": "1000"}
    if store_spec.backend == "redis":
        env["M2REC_REDIS_NAMESPACE"] = store_spec.namespace
    with LiveServer(env) as server:
        yield server


@pytest.mark.slow
def test_a_user_with_5000_interactions_is_never_recommended_an_item_they_have(
    live: LiveServer, trained_artifact: TrainedArtifact
) -> None:
    ds, split = trained_artifact.dataset, trained_artifact.split
    warm = [ds.item_ids[int(j)] for j in split.warm_items]
    attributes = [ds.item_attributes[int(j)] for j in split.cold_items]
    new = [f"new:{n}" for n in range(TOUCHED - len(warm) + UNTOUCHED)]
    with httpx.Client(base_url=live.url, timeout=120.0) as client:
        for s in range(0, len(new), BATCH):
            items = [{"id": i, "attributes": attributes[(s + n) % len(attributes)] or ["genre:Drama"]}
                     for n, i in enumerate(new[s : s + BATCH])]
            r = client.post("/items/batch", json={"items": items}, headers=HEADERS)
            assert r.status_code == 200, r.text
        touched = warm + new[: TOUCHED - len(warm)]  # every trained item and most new ones
        assert len(touched) == TOUCHED
        for s in range(0, TOUCHED, BATCH):  # oldest first: the history keeps the last 500
            events = [{"user": "heavy", "item": i, "timestamp": 1.6e9 + s + n}
                      for n, i in enumerate(touched[s : s + BATCH])]
            r = client.post("/interactions", json={"interactions": events}, headers=HEADERS)
            assert r.status_code == 200, r.text
        for k in (20, UNTOUCHED, 1000):
            got = client.get("/recommend", params={"user": "heavy", "k": k})
            assert got.status_code == 200, got.text
            body = got.json()
            assert body["fallback"] is False
            ids = [i["id"] for i in body["items"]]
            offered_again = set(ids) & set(touched)
            assert not offered_again, f"{len(offered_again)} seen items offered at k={k}: {sorted(offered_again)[:5]}"
            assert len(ids) == min(k, UNTOUCHED)  # everything left is unseen, and all of it is offered
