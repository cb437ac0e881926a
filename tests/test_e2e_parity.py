"""Offline/online parity on the hybrid protocol (DESIGN.md, "Evaluation protocol"): replaying a hybrid
split of real data through the running service gives the offline harness's figures.

The model is the shipped one (the TrainConfig defaults: the full generator, the validation-chosen
mixing policy and new-item bias weight, the collaborative part beside it), trained for real on
ml-100k's hybrid split (seed 0) with the epochs capped so the test stays a few minutes, and exported in
the one artifact format; and m2rec alone (the same training without the part, as the presets serve).

    offline  training.protocol.evaluate_full(the harness's m2rec scorer, hybrid(split)): every warm
             and test-cold item ranked together for each user, folded in from their history
             (training interactions plus the validation holdout), merged by the artifact's policy
    online   `python -m service` (uvicorn, exact index) on real Redis and on SQLite: POST /items/batch
             the test-cold items (attributes + content), POST /interactions every user's history,
             GET /recommend?k=50, the same metric code on the served lists

Both sides rank the same candidates: the artifact's trained items and the test-cold items; the
validation items are neither registered nor ranked offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.model.artifact import load_artifact
from service.model.mixing import merge_order
from tests.conftest import StoreSpec
from tests.live_server import LiveServer
from tests.shared_data import ml100k
from training.collaborative_fit import Joint, fit_with_blend
from training.dataset import Dataset
from training.export import export_artifact
from training.m2rec_recommender import M2RecRecommender
from training.metrics import list_metrics
from training.protocol import Task, evaluate_full, hybrid
from training.split import ColdStartSplit, cold_start_split
from training.train import TrainConfig, train

K = 50
FIGURES = ("recall@20", "ndcg@20", "recall@50", "cold_recall@20", "warm_recall@20", "cold_share@20")
# Both sides compute the same float32 arithmetic in a different order (torch vs NumPy fold-in, NumPy vs
# FAISS inner products), so scores differ by ~1e-6 and only a near-tie at a cut can swap an item in or
# out of a list; each swap moves a mean by at most 1/(20·users). The acceptance allows 0.005; a real
# divergence (wrong rows, lost history, wrong exclusion, another policy) moves them by far more.
TOLERANCE = 0.005
ITEM_CHUNK = 200  # items per POST /items/batch
INTERACTION_CHUNK = 1000  # the service's default max_batch_size


@dataclass(frozen=True)
class Trained:
    root: Path
    dataset: Dataset
    split: ColdStartSplit
    model: M2RecRecommender | Joint  # the harness's scorer of the exported model, with its policy


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """m2rec trained once, exported alone and with the collaborative part (the shipped model)."""
    dataset = ml100k()
    split = cold_start_split(dataset, seed=0)
    result = train(dataset, split, replace(TrainConfig(progress=False), epochs=12))
    out = {}
    root = tmp_path_factory.mktemp("parity-m2rec")
    export_artifact(result, dataset, "ml-100k:parity", root, {"validation": result.best_val})
    out["m2rec"] = Trained(root, dataset, split, M2RecRecommender.trained(result))
    joint, _ = fit_with_blend(dataset, split, result.model, result.data, seed=0)  # settings chosen on validation
    assert joint.policy is not None
    result.model.attach(joint.part)
    root = tmp_path_factory.mktemp("parity-shipped")
    export_artifact(replace(result, policy=joint.policy), dataset, "ml-100k:parity", root, {})
    out["shipped"] = Trained(root, dataset, split, joint)
    for t in out.values():
        # the artifact's rows are the training rows of exactly these items, in this order, with its policy
        artifact = load_artifact(t.root)
        assert list(artifact.item_ids) == [dataset.item_ids[j] for j in result.data.warm]
        assert artifact.manifest.policy == t.model.policy
    assert load_artifact(out["shipped"].root).manifest.embedding_dim == result.model.config.row_dim
    return out


@pytest.fixture(params=["shipped", "m2rec"])
def trained(request: pytest.FixtureRequest, both: dict[str, Trained]) -> Trained:
    return both[request.param]


def _offline_lists(t: Trained, task: Task) -> dict[int, list[int]]:
    """Each user's top-K item indices offline: both populations ranked by the harness's scorer and
    merged by the artifact's policy (service.model.mixing, as the service does)."""
    policy = t.model.policy
    assert policy is not None
    cand = task.candidates
    out: dict[int, list[int]] = {}
    for start in range(0, task.users.size, 256):
        users = task.users[start : start + 256]
        scores = t.model.score(users, cand, task.history)  # (B, C)
        scores[task.history[users][:, cand].toarray() > 0] = -np.inf
        heads = np.full((users.size, 2, K), -np.inf)
        index = np.zeros((users.size, 2, K), np.int64)
        for population, cols in enumerate((np.flatnonzero(~task.cold), np.flatnonzero(task.cold))):
            order = np.argsort(-scores[:, cols], axis=1, kind="stable")[:, :K]
            heads[:, population, : order.shape[1]] = np.take_along_axis(scores[:, cols], order, axis=1)
            index[:, population, : order.shape[1]] = cand[cols][order]
        order, filled = merge_order(policy, heads)
        flat = index.reshape(users.size, 2 * K)
        for b, u in enumerate(users.tolist()):
            out[u] = flat[b, order[b][filled[b]]].tolist()
    return out


def _metrics(lists: dict[int, list[int]], task: Task, cold_items: np.ndarray) -> dict[str, float]:
    """The harness's metric code on given lists."""
    users = np.array(sorted(lists))
    truth = task.truth[users].toarray() > 0  # (U, I)
    is_cold_item = np.zeros(truth.shape[1], dtype=bool)
    is_cold_item[cold_items] = True
    hit = np.zeros((users.size, K), bool)
    cold = np.zeros((users.size, K), bool)
    filled = np.zeros((users.size, K), bool)
    for b, u in enumerate(users.tolist()):
        top = np.asarray(lists[u][:K], dtype=np.int64)
        hit[b, : top.size], cold[b, : top.size], filled[b, : top.size] = truth[b, top], is_cold_item[top], True
    n_truth = np.stack([(truth & ~is_cold_item).sum(axis=1), (truth & is_cold_item).sum(axis=1)], axis=1)
    per_user = list_metrics(hit, cold, filled, n_truth)
    return {key: float(np.nanmean(per_user[key])) for key in FIGURES}


def _item_payload(ds: Dataset, j: int) -> dict[str, Any]:
    assert ds.features is not None
    return {"id": ds.item_ids[j], "attributes": ds.item_attributes[j], "content": ds.features[j].tolist()}


def _online_lists(server: LiveServer, t: Trained, task: Task) -> dict[int, list[int]]:
    ds, split = t.dataset, t.split
    cold = set(split.cold_items.tolist())
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        items = split.cold_items.tolist()
        for s in range(0, len(items), ITEM_CHUNK):
            batch = [_item_payload(ds, j) for j in items[s : s + ITEM_CHUNK]]
            response = client.post("/items/batch", json={"items": batch})
            assert response.status_code == 200, response.text
        assert client.get("/readyz").json()["index_items"] == split.warm_items.size + split.cold_items.size
        events = []
        for u in task.users.tolist():
            row = task.history[u]
            events += [{"user": ds.user_ids[u], "item": ds.item_ids[i], "timestamp": float(n)}
                       for n, i in enumerate(row.indices.tolist())]
        for s in range(0, len(events), INTERACTION_CHUNK):
            response = client.post("/interactions", json={"interactions": events[s : s + INTERACTION_CHUNK]})
            assert response.status_code == 200, response.text
        out: dict[int, list[int]] = {}
        for u in task.users.tolist():
            response = client.get("/recommend", params={"user": ds.user_ids[u], "k": K})
            assert response.status_code == 200, response.text
            body = response.json()
            assert t.model.policy is not None and body["policy"] == t.model.policy.to_dict()
            ranked = [ds.item_index(item["id"]) for item in body["items"]]
            assert all(item["is_cold"] == (j in cold) for j, item in zip(ranked, body["items"], strict=True))
            out[u] = ranked
    return out


@pytest.fixture
def live_service(trained: Trained, store_spec: StoreSpec) -> Iterator[LiveServer]:
    env = {
        "M2REC_ARTIFACT_PATH": str(trained.root), "M2REC_STORE_URL": store_spec.location,
        "M2REC_INDEX_KIND": "exact",
        "M2REC_MAX_HISTORY_LENGTH": "100000",  # no truncation: the offline fold-in reads the whole history
    }
    if store_spec.backend == "redis":
        env["M2REC_REDIS_NAMESPACE"] = store_spec.namespace
    server = LiveServer(env).start()
    try:
        yield server
    finally:
        server.stop()


def test_replaying_a_hybrid_split_through_the_service_gives_the_offline_figures(
    live_service: LiveServer, trained: Trained
) -> None:
    task = hybrid(trained.split)
    harness = evaluate_full(trained.model, task).metrics
    offline_lists = _offline_lists(trained, task)
    offline = _metrics(offline_lists, task, trained.split.cold_items)
    # the metric code on these lists reproduces the harness's own figures (ties aside: the harness
    # breaks them against the truth), so the two sides differ only in how their lists were made
    for key in FIGURES:
        assert offline[key] == pytest.approx(harness[key], abs=2e-3), key
    online_lists = _online_lists(live_service, trained, task)
    online = _metrics(online_lists, task, trained.split.cold_items)
    same = sum(set(online_lists[u][:20]) == set(offline_lists[u][:20]) for u in offline_lists)
    summary = ", ".join(f"{k} offline {offline[k]:.4f} online {online[k]:.4f}" for k in FIGURES)
    print(f"{task.users.size} users; identical top-20 sets {same}; {summary}")
    for key in FIGURES:
        assert abs(online[key] - offline[key]) <= TOLERANCE, summary
    assert same >= 0.95 * len(offline_lists), summary  # a mean could hide compensating errors
