"""The collaborative part (service/model/collaborative.py) against its definitions: implicit's user step,
the trainer's ridge map, and the service's rows and queries against the harness's scores."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from benchmarks.exact import exact_served
from benchmarks.in_process import user_queries
from service.core.embedder import Embedder
from service.core.fold_in import FoldIn
from service.core.recommender import Recommender
from service.core.types import NewItem
from service.model.artifact import load_artifact
from service.store import Interaction
from service.store.sqlite import SqliteStore
from tests.conftest import TrainedArtifact
from tests.test_baselines_and_harness import _dataset
from training.baselines import fit_als
from training.collaborative_fit import Joint, _stacked, fit_joint, item_factors
from training.dataset import Dataset
from training.export import export_artifact
from training.ridge import content_blocks, ridge_map, with_intercept
from training.split import ColdStartSplit, cold_start_split
from training.train import TrainConfig, TrainResult, train
from training.train_data import prepare

PARAMS = {"regularization": 3.0, "alpha": 5.0, "ridge": 1.0, "attribute_weight": 2.0}


def _fitted(seed: int = 0, factors: int = 16) -> tuple[Dataset, ColdStartSplit, Any]:
    dataset = _dataset(n_users=60, n_items=50, seed=seed, n_pairs=700)
    split = cold_start_split(dataset, seed=0)
    als = fit_als(split.train, factors, PARAMS["regularization"], PARAMS["alpha"], 10, seed)
    return dataset, split, als


def test_the_user_step_is_implicits_recalculate_user() -> None:
    from training.collaborative_fit import build

    dataset, split, als = _fitted()
    data = prepare(dataset, split)
    part = build(dataset, data, np.zeros((dataset.n_items, 5)), als.item_factors, PARAMS)
    users = np.arange(dataset.n_users)
    emptied = sp.lil_matrix(split.history[users], dtype=np.float32)
    emptied[0] = 0  # a user with no history: p = 0
    history = sp.csr_matrix(emptied)
    history.eliminate_zeros()
    # scores, not factors: the part keeps the factors in another (orthonormal) basis
    expected = als.recalculate_user(users, history) @ als.item_factors[data.warm].T  # (U, J), float32 in implicit
    assert np.abs(als.item_factors[np.setdiff1d(np.arange(dataset.n_items), data.warm)]).max() == 0.0
    rows = item_factors(part, data)  # every other item's ALS factors are 0 after fitting: none in a history
    stacked, lengths = _stacked(history, users, rows)
    assert min(lengths) == 0 < max(lengths)  # users with and without a history
    got = part.user_factors(stacked, lengths) @ part.item_factors.numpy().T
    assert np.allclose(got, expected, atol=2e-4 * np.abs(expected).max())
    # short histories take Woodbury's identity, long ones the f×f system: both solve the same system
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, als.factors // 2, als.factors, 3 * als.factors):
        history_rows = rows[rng.choice(data.warm, n)]
        ref = np.linalg.solve(np.diag(part.gram.numpy()) + (PARAMS["alpha"] - 1) * history_rows.T @ history_rows,
                              PARAMS["alpha"] * history_rows.sum(axis=0))
        assert np.allclose(part.user_factors(history_rows, [n])[0], ref, rtol=1e-6, atol=1e-9), n


def test_new_items_rows_are_the_trainers_ridge_map_of_their_inputs() -> None:
    from training.collaborative_fit import build

    dataset, split, als = _fitted()
    data = prepare(dataset, split)
    part = build(dataset, data, np.zeros((dataset.n_items, 5)), als.item_factors, PARAMS)
    content = with_intercept(content_blocks(dataset, PARAMS["attribute_weight"], data.vocabulary.tokens))
    factors = np.asarray(als.item_factors, dtype=np.float64)
    expected = np.asarray(content @ ridge_map(factors, content, data.warm, PARAMS["ridge"]))  # (I, f)
    got = item_factors(part, data)
    others = np.setdiff1d(np.arange(dataset.n_items), data.warm)
    # against every trained item's factors: the part keeps them in another (orthonormal) basis
    trained, rotated = factors[data.warm], part.item_factors.numpy()
    assert np.allclose(got[others] @ rotated.T, expected[others] @ trained.T, atol=1e-5)
    assert np.allclose(got[data.warm] @ rotated.T, trained @ trained.T, atol=1e-6)
    # the service's path: an item's raw attributes (unknown tokens dropped) and content, no content at all
    j = int(others[0])
    tokens = torch.tensor([sorted(data.vocabulary.index[t] for t in dataset.item_attributes[j]
                                  if t in data.vocabulary.index)])
    assert dataset.features is not None
    with_content = part.rows(dataset.features[j : j + 1], np.array([True]), tokens.numpy())
    assert np.allclose(with_content, got[j], atol=1e-6)
    without = part.rows(None, np.array([False]), tokens.numpy())
    assert np.isfinite(without).all() and not np.allclose(without, with_content)


@dataclass(frozen=True)
class JointArtifact:
    dataset: Dataset
    split: ColdStartSplit
    result: TrainResult
    joint: Joint
    root: Path


@pytest.fixture(scope="module")
def joint_artifact(tmp_path_factory: pytest.TempPathFactory) -> JointArtifact:
    from tests.shared_data import ml100k

    dataset = ml100k()
    split = cold_start_split(dataset, seed=0)
    cfg = TrainConfig(seed=0, epochs=1, eval_every=1, item_dim=16, user_latent=8, gen_hidden=16, gen_latent=8,
                      batch_users=128, batch_items=256, new_bias_weights=(1.0,), b_min_steps=1, progress=False)
    result = train(dataset, split, cfg)
    als = fit_als(split.train, 16, 10.0, 5.0, 5, 0)
    joint = fit_joint(dataset, split, result.model, result.data, als.item_factors, PARAMS)
    result.model.attach(joint.part)
    assert joint.policy is not None
    root = tmp_path_factory.mktemp("joint")
    export_artifact(replace(result, policy=joint.policy), dataset, "ml-100k:joint", root, {})
    return JointArtifact(dataset, split, result, joint, root)


def test_the_service_scores_items_as_the_harness_does(joint_artifact: JointArtifact) -> None:
    dataset, split, result, joint, root = (joint_artifact.dataset, joint_artifact.split, joint_artifact.result,
                                           joint_artifact.joint, joint_artifact.root)
    artifact = load_artifact(root)
    assert artifact.manifest.embedding_dim == 16 + 1 + 16
    assert artifact.manifest.policy == joint.policy
    embedder = Embedder(artifact)
    fold_in = FoldIn(embedder.model)
    cold = split.cold_items[:40]
    assert dataset.features is not None
    new_rows = embedder.embed([NewItem(dataset.item_ids[j], dataset.item_attributes[j],
                                       dataset.features[j].tolist()) for j in cold])  # (C, D+1+f)
    warm_rows = embedder.warm_rows  # (J, D+1+f)
    users = np.arange(30)
    history = split.history
    rows, lengths = [], []
    for u in users.tolist():
        at = np.searchsorted(result.data.warm, history[u].indices)
        rows.append(warm_rows[at])
        lengths.append(len(at))
    candidates = np.concatenate([result.data.warm, cold])
    served = embedder.model.collaborative
    assert served is not None
    # as trained, and with new items weighed apart from trained ones (w_new != w), on both sides
    for new_weight in (float(joint.part.new_weight), 1.0 - float(joint.part.weight)):
        part = copy.deepcopy(joint.part)
        for weighed in (part, served):
            with torch.no_grad():
                weighed.new_weight.fill_(new_weight)
            weighed.refresh()
        queries, new_queries = fold_in.query_pair(np.concatenate(rows), lengths)  # (B, D+1+f) each
        assert (new_queries is None) == (new_weight == float(joint.part.weight))
        online = np.hstack([queries.astype(np.float64) @ warm_rows.astype(np.float64).T,
                            (queries if new_queries is None else new_queries).astype(np.float64)
                            @ new_rows.astype(np.float64).T])
        offline = replace(joint, part=part).score(users, candidates, history)
        assert np.allclose(online, offline, atol=1e-4 * np.abs(offline).max())


def test_new_items_weight_is_shared_or_the_best_for_ranking_them_alone_on_validation(
        joint_artifact: JointArtifact) -> None:
    """The candidates for w_new: w itself, or the weight that ranks new items alone best on the cold-only
    validation task (checked here against that task itself); the pair with the best hybrid validation
    figure wins, a shared one on ties."""
    from training.collaborative_fit import WEIGHTS
    from training.protocol import cold_only, evaluate

    joint, split = joint_artifact.joint, joint_artifact.split
    task = cold_only(split, validation=True)
    figures = []
    for w in WEIGHTS:
        part = copy.deepcopy(joint.part)
        with torch.no_grad():
            part.new_weight.fill_(float(w))
        part.refresh()
        metrics = evaluate(replace(joint, part=part, policy=None), task)
        figures.append(metrics["recall@20"] + metrics["ndcg@20"])
    assert len(set(np.round(figures, 6))) > 1  # the weight matters on this task
    star = float(WEIGHTS[int(np.argmax(figures))])
    tried = {(w, w_new) for w, w_new, _ in joint.trace}
    assert tried == {(float(w), float(w)) for w in WEIGHTS} | {(float(w), star) for w in WEIGHTS}
    value = {(w, w_new): v for w, w_new, v in joint.trace}  # rounded to 4 places in the trace
    assert value[float(joint.part.weight), float(joint.part.new_weight)] == max(value.values())


def test_an_artifact_from_before_the_new_items_weight_scores_them_with_w() -> None:
    from service.model.collaborative import Collaborative

    part = Collaborative(n_warm=4, n_attributes=2, content_dim=0, item_dim=3, factors=4)
    state = {name: value for name, value in part.state_dict().items() if name != "new_weight"}
    state["weight"] = torch.tensor(0.3, dtype=torch.float64)
    part.load_state_dict(state)
    assert float(part.new_weight) == 0.3 and not part.separate_new


def test_a_hot_reload_moves_from_m2rec_alone_to_the_wider_shipped_model(
        joint_artifact: JointArtifact, trained_artifact: TrainedArtifact, tmp_path: Path) -> None:
    """The upgrade a deployment makes: rows [v; b] (D+1) to [v; b; y] (D+1+f), stored items re-embedded,
    the index rebuilt at the new width, answers from the new model."""
    import shutil
    import time

    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from service.api.app import create_app
    from service.config import Settings
    from service.model.artifact import resolve_current
    from service.model.artifact_export import set_current

    dataset, split, joint_root = joint_artifact.dataset, joint_artifact.split, joint_artifact.root
    old, new = resolve_current(trained_artifact.root), resolve_current(joint_root)
    root = tmp_path / "artifacts"
    for version in (old, new):
        shutil.copytree(version, root / version.name)
    set_current(root, old.name)
    settings = Settings(artifact_path=root, store_url=str(tmp_path / "m2rec.sqlite3"), api_key=SecretStr("k"))
    headers = {"X-API-Key": "k"}
    j = int(split.cold_items[0])
    assert dataset.features is not None
    with TestClient(create_app(settings)) as client:
        posted = client.post("/items", headers=headers, json={
            "id": "new:1", "attributes": dataset.item_attributes[j], "content": dataset.features[j].tolist()})
        assert posted.status_code == 201, posted.text
        trained = list(load_artifact(root / old.name).item_ids[:3])
        liked = client.post("/interactions", headers=headers,
                            json={"interactions": [{"user": "u", "item": i} for i in [*trained, "new:1"]]})
        assert liked.status_code == 200, liked.text
        started = client.post("/admin/reload", headers=headers, json={"version": new.name})
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 60
        while client.get("/admin/reload", headers=headers).json()["state"] != "swapped":
            assert time.monotonic() < deadline, client.get("/admin/reload", headers=headers).json()
            time.sleep(0.05)
        answer = client.get("/recommend", headers=headers, params={"user": "u", "k": 10, "explain": "true"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == new.name and not body["fallback"] and len(body["items"]) == 10
        assert body["policy"] == load_artifact(root / new.name).manifest.mixing


def test_a_singular_user_system_gets_a_finite_answer_not_an_error() -> None:
    """α < 1 and a history of items outside YᵀY can make the user's system singular; the service must
    still answer (least squares), never fail the request."""
    from service.model.collaborative import Collaborative

    part = Collaborative(n_warm=4, n_attributes=2, content_dim=0, item_dim=3, factors=4)
    with torch.no_grad():
        part.gram.fill_(1.0)  # Λ = I
        part.alpha.fill_(0.0)  # c = α - 1 = -1: Λ + c·y yᵀ = I - e1 e1ᵀ, singular
    part.refresh()
    y = np.eye(4)[:1]  # (1, f)
    for rows, lengths in ((y, [1]), (np.repeat(y, 8, axis=0), [8])):  # Woodbury's path, the f×f path
        p = part.user_factors(rows, lengths)
        assert p.shape == (1, 4) and np.isfinite(p).all()


def test_the_serving_benchmarks_exact_oracle_is_what_the_service_answers(
        joint_artifact: JointArtifact, tmp_path: Path) -> None:
    """benchmarks/serve.py measures the served lists' recall against `exact_served` fed by `user_queries`.
    With new items weighed apart from trained ones (w_new != w) the two populations are searched by two
    queries; an oracle that searched both by one scored the real service at a recall of ~0.5."""
    dataset, split, result, joint = (joint_artifact.dataset, joint_artifact.split, joint_artifact.result,
                                     joint_artifact.joint)
    model, part = copy.deepcopy(result.model), copy.deepcopy(joint.part)
    with torch.no_grad():
        part.new_weight.fill_(1.0 - float(part.weight))  # new items weighed apart
    part.refresh()
    model.attach(part)
    root = tmp_path / "artifact"
    assert joint.policy is not None
    export_artifact(replace(result, model=model, policy=joint.policy), dataset, "ml-100k:joint-apart", root, {})
    rec = Recommender(load_artifact(root), SqliteStore(tmp_path / "s.sqlite3"))
    rec.maintainer.build_index()
    assert dataset.features is not None
    cold = split.cold_items[:200].tolist()
    rec.register([NewItem(dataset.item_ids[j], dataset.item_attributes[j], dataset.features[j].tolist())
                  for j in cold])
    new_ids, new_rows, is_cold = rec.index.live_vectors()
    new_ids = [i for i, c in zip(new_ids, is_cold, strict=True) if c]
    new_rows = new_rows[np.asarray(is_cold)]
    users: dict[str, list[str]] = {}
    for u in range(40):  # trained items and a few new ones, as the benchmark's users
        history = [dataset.item_ids[j] for j in split.history[u].indices[:30].tolist()]
        trained = [i for i in history if rec.is_trained(i)]
        users[f"u{u}"] = trained + [dataset.item_ids[j] for j in cold[u : u + 3]]
    rec.add_interactions([Interaction(user, item, 1e9 + t) for user, items in users.items()
                          for t, item in enumerate(items)])
    q, q_new = user_queries(rec, users)
    assert not np.array_equal(q, q_new)
    truth = exact_served(rec, q, q_new, new_rows, new_ids, [set(h) for h in users.values()], k=20)
    served = [{h.item_id for h in r.hits} for r in rec.recommend_many([(user, 20) for user in users])]
    assert np.mean([len(t & s) / len(t) for t, s in zip(truth, served, strict=True)]) >= 0.99
