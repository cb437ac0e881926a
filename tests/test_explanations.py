"""GET /recommend?explain=true: every item says why it is there; a new item's view weights are this
user's (M2VAE's user-aware fusion), so they change with the user; a trained item names the history
items that pulled it up (leave-one-out on the fold-in, checked against folding in without each)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.config import Settings
from service.core.embedder import load_model
from service.core.fold_in import FoldIn
from service.model.artifact import load_artifact
from tests.conftest import TrainedArtifact

API_KEY = "explain-key"
HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def client(trained_artifact: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("explain") / "m2rec.sqlite3"
    settings = Settings(artifact_path=trained_artifact.root, store_url=str(store), api_key=SecretStr(API_KEY),
                        k_max=5000)
    with TestClient(create_app(settings)) as c:
        ds, split = trained_artifact.dataset, trained_artifact.split
        items = [trained_artifact.cold_item(n, f"new:{n}") for n in range(20)]
        assert c.post("/items/batch", json={"items": items}, headers=HEADERS).status_code == 200
        # two users with different tastes: the first and the last trained items, and one new item each
        warm = [ds.item_ids[int(j)] for j in split.warm_items]
        for user, history in (("ann", [*warm[:30], "new:0"]), ("bob", [*warm[-30:], "new:1"])):
            events = [{"user": user, "item": i, "timestamp": 1.7e9 + n} for n, i in enumerate(history)]
            assert c.post("/interactions", json={"interactions": events}, headers=HEADERS).status_code == 200
        yield c


def _explained(client: TestClient, user: str, k: int) -> dict[str, Any]:
    r = client.get("/recommend", params={"user": user, "k": k, "explain": "true"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_explain_answers_for_every_item_in_the_list(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    history = set(client.app.state.runtime.store.get_history("ann"))  # type: ignore[attr-defined]
    attributes = {f"new:{n}": set(trained_artifact.cold_item(n, "x")["attributes"]) for n in range(20)}
    body = _explained(client, "ann", 5000)  # the whole index: the tiny test model ranks new items low
    assert not body["fallback"] and len(body["items"]) > 500
    new = [i for i in body["items"] if i["is_cold"]]
    assert new, "the list should hold some of the 20 new items"
    for item in body["items"]:
        why = item["explanation"]
        assert why["because"], item  # every item of a personal list: the history items behind it
        assert {b["item"] for b in why["because"]} <= history
        contributions = [b["contribution"] for b in why["because"]]
        assert contributions == sorted(contributions, reverse=True) and contributions[-1] > 0
        if item["is_cold"]:
            views = why["views"]
            assert set(views) == {"attributes", "content", "common"}
            assert sum(views.values()) == pytest.approx(1.0, abs=1e-5)
            assert min(views.values()) >= 0
            tokens = [a["token"] for a in why["attributes"]]
            assert tokens and set(tokens) <= attributes[item["id"]]
        else:
            assert why["views"] is None and why["attributes"] == []
    plain = client.get("/recommend", params={"user": "ann", "k": 5000}).json()
    assert [i["id"] for i in plain["items"]] == [i["id"] for i in body["items"]]  # same list, explained
    assert "explanation" not in plain["items"][0]


def test_the_explanation_of_a_new_item_changes_with_the_user(client: TestClient) -> None:
    lists = {user: {i["id"]: i for i in _explained(client, user, 5000)["items"]} for user in ("ann", "bob")}
    shared = [i for i in lists["ann"] if i.startswith("new:") and i in lists["bob"]]
    assert shared
    for item_id in shared:
        ann, bob = (lists[u][item_id]["explanation"]["views"] for u in ("ann", "bob"))
        assert ann != bob, item_id  # the gate is this user's, not the stored neutral one
        # attention is over the item's own tokens and does not depend on the user
        assert lists["ann"][item_id]["explanation"]["attributes"] == lists["bob"][item_id]["explanation"]["attributes"]


def test_a_fallback_list_is_explained_under_the_neutral_gate(client: TestClient) -> None:
    body = _explained(client, "nobody-yet", 20)
    assert body["fallback"]
    for item in body["items"]:
        assert item["explanation"]["because"] == []
        assert (item["explanation"]["views"] is not None) == item["is_cold"]


def test_leave_one_out_fold_in_equals_folding_in_without_each_item(trained_artifact: TrainedArtifact) -> None:
    model = load_model(load_artifact(trained_artifact.root))
    fold_in = FoldIn(model)
    rows = model.item_rows().detach().numpy()[:12]  # (L, D+1)
    without = fold_in.without_each(rows)  # (L, D)
    for left_out in range(len(rows)):
        oracle = fold_in.user_vector(np.delete(rows, left_out, axis=0))  # (1, D)
        np.testing.assert_allclose(without[left_out], oracle[0], rtol=1e-5, atol=1e-6)


def test_leave_one_out_of_several_users_at_once_is_each_users_own(trained_artifact: TrainedArtifact) -> None:
    model = load_model(load_artifact(trained_artifact.root))
    fold_in = FoldIn(model)
    table = model.item_rows().detach().numpy()
    histories = [table[:12], table[40:41], table[100:107]]  # (L_b, D+1) each; one of a single item
    together = fold_in.without_each(np.concatenate(histories), [len(h) for h in histories])
    alone = np.concatenate([fold_in.without_each(h) for h in histories])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_a_batch_of_explained_lists_is_each_list_explained_alone(client: TestClient) -> None:
    """The explainer serves a batch of requests in shared passes: no list may depend on its batch-mates."""
    recommender = client.app.state.runtime.recommender  # type: ignore[attr-defined]
    requests = [("ann", 25), ("nobody-yet", 10), ("bob", 25), ("ann", 7)]
    together = recommender.recommend_many(requests, [True, True, True, False])
    for (user, k), batched, wanted in zip(requests, together, [True, True, True, False], strict=True):
        alone = recommender.recommend(user, k, wanted)
        assert [h.item_id for h in batched.hits] == [h.item_id for h in alone.hits]
        if not wanted:
            assert batched.explanations is None
            continue
        assert len(batched.explanations) == len(alone.explanations) == k
        for a, b in zip(batched.explanations, alone.explanations, strict=True):
            assert [i for i, _ in a.because] == [i for i, _ in b.because]
            np.testing.assert_allclose([c for _, c in a.because], [c for _, c in b.because], rtol=1e-4, atol=1e-6)
            assert (a.views is None) == (b.views is None) and a.attributes == b.attributes
            if a.views is not None and b.views is not None:
                np.testing.assert_allclose([a.views.attributes, a.views.content, a.views.common],
                                           [b.views.attributes, b.views.content, b.views.common], rtol=1e-5)
    assert any(e.views is not None for e in together[2].explanations or [])  # bob's list holds new items


def test_the_openapi_document_names_the_explain_parameter(client: TestClient) -> None:
    parameters = client.get("/openapi.json").json()["paths"]["/recommend"]["get"]["parameters"]
    assert "explain" in {p["name"] for p in parameters}


def test_an_explained_body_is_exactly_the_documented_model(client: TestClient) -> None:
    from service.api.schemas import ExplainedItem, RecommendationsOut

    for user in ("ann", "nobody-yet"):
        body = _explained(client, user, 30)
        parsed = RecommendationsOut.model_validate(body)
        assert all(isinstance(i, ExplainedItem) for i in parsed.items)
        assert parsed.model_dump() == body


@pytest.mark.parametrize("switches", [{}, {"gate_norm": True}, {"moe": False}, {"common_view": False}])
def test_the_numpy_fusion_gate_equals_the_generators_gates(
    trained_artifact: TrainedArtifact, switches: dict[str, Any]
) -> None:
    """The explainer's gate (service/core/fusion_gate.py) against M2Rec.embed_items(inputs, user=h), for
    items with attributes only, content only and both, and several users; untrained weights with each
    switch the gate has, and the trained artifact's."""
    import dataclasses

    import torch

    from service.core.embedder import Embedder
    from service.core.fusion_gate import FusionGate
    from service.core.types import NewItem
    from service.model import M2Rec

    embedder = Embedder(load_artifact(trained_artifact.root))
    if switches:  # the same sizes, other switches, random weights
        torch.manual_seed(0)
        embedder.model = M2Rec(dataclasses.replace(embedder.model.config, **switches)).eval()
    ds, split = trained_artifact.dataset, trained_artifact.split
    assert ds.features is not None
    js = [int(j) for j in split.cold_items[:6]]
    items = [NewItem(f"n{j}", ds.item_attributes[j] if n % 3 != 1 else [],
                     ds.features[j].tolist() if n % 3 != 0 else None) for n, j in enumerate(js)]
    factors = [f for f, _ in embedder.fusion_factors(items, 3)]
    gate = FusionGate(embedder.model.generator)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for _ in range(3):
        h = rng.standard_normal(embedder.model.config.item_dim).astype(np.float32)
        with torch.inference_mode():
            _, gates = embedder.model.embed_items(embedder._inputs(items), torch.from_numpy(h).expand(len(items), -1))
        expected = np.column_stack([gates["attributes"].numpy(), gates["content"].numpy(), gates["common"].numpy()])
        np.testing.assert_allclose(gate.weights(h, factors), expected, rtol=1e-4, atol=1e-6)
