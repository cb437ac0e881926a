"""Offline/online parity (DESIGN.md, "Evaluation protocol"): replaying the test split through the
running service gives the offline harness's all-items Recall@20.

Both sides use the session's tiny real artifact (trained on ml-100k, cold_start_split seed 0) and
rank the same candidates: the artifact's warm items plus the test-cold items, each user's training
items removed. The validation items are neither registered nor ranked offline.

    offline  training.protocol.evaluate(ItemTable(model from the artifact, prepare(dataset, split)))
    online   `python -m service` (uvicorn, exact index) on real Redis and on SQLite: POST /items/batch
             the test-cold items (attributes + content), POST /interactions every test user's
             training history, GET /recommend?k=20, Recall@20 by training.metrics

Users: test users with at least one training interaction. A test user whose every positive is a
cold or validation item has an empty history, which the service answers with its fallback by
design (DESIGN.md, "Service"); offline would fold in an empty input instead, so they are left out
of both sides (their number is asserted small).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import scipy.sparse as sp

from service.core.embedder import load_model
from service.model.artifact import load_artifact
from tests.conftest import StoreSpec, TrainedArtifact
from tests.live_server import LiveServer
from training.item_rows import ItemTable
from training.metrics import rank_top_k_batch, user_metrics
from training.protocol import Task, all_items, evaluate
from training.train_data import prepare

K = 20
# Absolute tolerance on mean Recall@20. Both sides compute the same float32 arithmetic in a
# different order (EmbeddingBag sum vs masked sum in the fold-in; numpy matmul vs FAISS inner
# product), so scores differ by ~1e-6 and only a near-tie at the 20th place can swap an item in or
# out of one user's list; each such swap moves the mean by at most 1/(20·users) ≈ 6e-5. Exact ties
# (ranked against the truth offline, arbitrarily by FAISS) are the other source. 0.002 allows ~30
# such swaps across ~900 users; a real divergence (wrong rows, lost history, wrong exclusion, a
# different candidate set) moves Recall@20 by far more than that.
TOLERANCE = 0.002
ITEM_CHUNK = 200  # items per POST /items/batch (~8 KB of JSON each with 384-d content)
INTERACTION_CHUNK = 1000  # the service's default max_batch_size
# Users whose whole ranking is fetched for the cold-only comparison: a full list (~1,450 items) costs
# ~30-40 ms per request, so a seeded sample keeps the test well under a minute.
DEEP_USERS = 100


@dataclass(frozen=True)
class Protocol:
    recall: float  # training.protocol.evaluate's Recall@20
    top: dict[int, list[int]]  # user index -> top-20 item indices


@dataclass(frozen=True)
class Offline:
    users: np.ndarray  # test users with a training history
    all_items: Protocol
    cold_only: Protocol
    n_without_history: int


def _offline_protocol(table: ItemTable, task: Task, train: sp.csr_matrix) -> Protocol:
    recall = evaluate(table, task)["recall@20"]
    scores = table.score(task.users, task.candidates)  # (U, C)
    scores[train[task.users][:, task.candidates].toarray() > 0] = -np.inf
    truth = task.truth[task.users][:, task.candidates].toarray() > 0  # (U, C)
    tops = task.candidates[rank_top_k_batch(scores, truth, K)]  # (U, K) item indices
    return Protocol(recall, {int(u): tops[b].tolist() for b, u in enumerate(task.users)})


@pytest.fixture(scope="module")
def offline(trained_artifact: TrainedArtifact) -> Offline:
    dataset, split = trained_artifact.dataset, trained_artifact.split
    artifact = load_artifact(trained_artifact.root)
    data = prepare(dataset, split)
    # the artifact's rows are the training rows of exactly these items, in this order
    assert list(artifact.item_ids) == [dataset.item_ids[j] for j in data.warm]
    table = ItemTable(load_model(artifact), data)
    full = all_items(split)
    has_history = np.asarray(split.train[full.users].getnnz(axis=1)) > 0
    users = full.users[has_history]
    return Offline(
        users,
        _offline_protocol(table, Task(users, full.candidates, full.truth, full.exclude, full.cold), split.train),
        _offline_protocol(table, Task(users, split.cold_items, split.test_truth), split.train),
        int((~has_history).sum()),
    )


def _item_payload(trained: TrainedArtifact, j: int) -> dict[str, Any]:
    ds = trained.dataset
    assert ds.features is not None
    return {"id": ds.item_ids[j], "attributes": ds.item_attributes[j], "content": ds.features[j].tolist()}


def _register_cold_items(client: httpx.Client, trained: TrainedArtifact) -> None:
    cold = trained.split.cold_items.tolist()
    for s in range(0, len(cold), ITEM_CHUNK):
        batch = [_item_payload(trained, j) for j in cold[s : s + ITEM_CHUNK]]
        response = client.post("/items/batch", json={"items": batch})
        assert response.status_code == 200, response.text
        assert all(item["created"] and item["is_cold"] for item in response.json()["items"])


def _post_training_histories(client: httpx.Client, trained: TrainedArtifact, users: np.ndarray) -> int:
    """Every (user, warm item) of the users' training histories, with the dataset's timestamps."""
    ds, split = trained.dataset, trained.split
    assert ds.timestamps is not None
    ts = {(int(u), int(i)): float(t) for (u, i), t in zip(ds.interactions, ds.timestamps, strict=True)}
    events = []
    for u in users.tolist():
        row = split.train[u]
        events += [{"user": ds.user_ids[u], "item": ds.item_ids[i], "timestamp": ts[(u, int(i))]}
                   for i in row.indices[row.data > 0].tolist()]
    for s in range(0, len(events), INTERACTION_CHUNK):
        response = client.post("/interactions", json={"interactions": events[s : s + INTERACTION_CHUNK]})
        assert response.status_code == 200, response.text
    return len(events)


def _online(server: LiveServer, trained: TrainedArtifact, users: np.ndarray, deep_users: np.ndarray
            ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(all-items top-20 per user from /recommend?k=20, cold-only top-20 per deep user read off
    their whole served ranking)."""
    ds, split = trained.dataset, trained.split
    cold = set(split.cold_items.tolist())
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        _register_cold_items(client, trained)
        n_index = client.get("/readyz").json()["index_items"]
        assert n_index == split.warm_items.size + split.cold_items.size
        _post_training_histories(client, trained, users)

        def ranking(u: int, k: int) -> list[tuple[int, bool]]:
            response = client.get("/recommend", params={"user": ds.user_ids[u], "k": k})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["fallback"] is False, f"user {ds.user_ids[u]} has a history but got the fallback"
            ranked = [(ds.item_index(item["id"]), bool(item["is_cold"])) for item in body["items"]]
            assert all(is_cold == (j in cold) for j, is_cold in ranked)
            return ranked

        top = {u: [j for j, _ in ranking(u, K)] for u in users.tolist()}
        cold_top = {}
        for u in deep_users.tolist():
            ranked = ranking(u, n_index)
            # everything but the user's training items: the offline candidate set
            assert len(ranked) == n_index - split.train[u].nnz
            cold_top[u] = [j for j, is_cold in ranked if is_cold][:K]
    return top, cold_top


def _recall(tops: dict[int, list[int]], trained: TrainedArtifact) -> float:
    truth = trained.split.test_truth
    per_user = []
    for u, top in tops.items():
        is_truth = truth[u].toarray().ravel() > 0  # (I,)
        per_user.append(user_metrics(np.asarray(top, dtype=np.int64), is_truth, int(is_truth.sum()), (K,))
                        [f"recall@{K}"])
    return float(np.mean(per_user))


@pytest.fixture
def live_service(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> Iterator[LiveServer]:
    env = {
        "M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": store_spec.location,
        "M2REC_INDEX_KIND": "exact",
        # no truncation: the offline fold-in reads the whole training history
        "M2REC_MAX_HISTORY_LENGTH": "100000",
        # whole rankings, so the cold-only ranking can be read off the served one
        "M2REC_K_MAX": "100000",
    }
    if store_spec.backend == "redis":
        env["M2REC_REDIS_NAMESPACE"] = store_spec.namespace
    server = LiveServer(env).start()
    try:
        yield server
    finally:
        server.stop()


def _compare(name: str, online_tops: dict[int, list[int]], offline: Protocol, trained: TrainedArtifact) -> str:
    online = _recall(online_tops, trained)
    # the same metric code on the offline lists reproduces the harness's number, so the two sides
    # differ only in how their lists were produced
    assert _recall(offline.top, trained) == pytest.approx(offline.recall, abs=1e-12)
    n = len(online_tops)
    same_lists = sum(online_tops[u] == offline.top[u] for u in online_tops)
    same_sets = sum(set(online_tops[u]) == set(offline.top[u]) for u in online_tops)
    summary = (f"{name}: offline Recall@20 {offline.recall:.6f}, online {online:.6f} (|diff| "
               f"{abs(online - offline.recall):.1e}); identical top-20 lists {same_lists}/{n}, sets {same_sets}/{n}")
    assert abs(online - offline.recall) <= TOLERANCE, summary
    # a tolerance on the mean could hide compensating errors: users must get the very same items
    assert same_sets >= 0.95 * n, summary
    return summary


def test_replaying_the_test_split_through_the_service_gives_the_offline_recall(
    live_service: LiveServer, trained_artifact: TrainedArtifact, offline: Offline
) -> None:
    users = offline.users
    assert users.size > 500 and offline.n_without_history < 0.05 * (users.size + offline.n_without_history)
    deep = np.sort(np.random.default_rng(0).choice(users, size=DEEP_USERS, replace=False))
    top, cold_top = _online(live_service, trained_artifact, users, deep)
    # all-items, every test user: exactly what /recommend?k=20 serves
    print(_compare("all-items", top, offline.all_items, trained_artifact))
    # cold-only: each served ranking restricted to the registered items (training items are warm,
    # so the exclusion never touches them); compared with the offline cold-only lists of the same users
    cold_offline = Protocol(_recall({u: offline.cold_only.top[u] for u in cold_top}, trained_artifact),
                            {u: offline.cold_only.top[u] for u in cold_top})
    print(_compare(f"cold-only ({DEEP_USERS} users)", cold_top, cold_offline, trained_artifact))
