"""The collaborative part (service/model/collaborative.py) against its definitions: implicit's user step,
the trainer's ridge map, and the service's rows and queries against the harness's scores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from service.core.embedder import Embedder
from service.core.fold_in import FoldIn
from service.core.types import NewItem
from service.model.artifact import load_artifact
from tests.test_baselines_and_harness import _dataset
from training.baselines import content_blocks, fit_als, ridge_map, with_intercept
from training.collaborative_fit import _stacked, fit_joint, item_factors
from training.export import export_artifact
from training.split import cold_start_split
from training.train import TrainConfig, train
from training.train_data import prepare

PARAMS = {"regularization": 3.0, "alpha": 5.0, "ridge": 1.0, "attribute_weight": 2.0}


def _fitted(seed: int = 0, factors: int = 16):  # type: ignore[no-untyped-def]
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


@pytest.fixture(scope="module")
def joint_artifact(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
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
    from dataclasses import replace

    export_artifact(replace(result, policy=joint.policy), dataset, "ml-100k:joint", root, {})
    return dataset, split, result, joint, root


def test_the_service_scores_items_as_the_harness_does(joint_artifact) -> None:  # type: ignore[no-untyped-def]
    dataset, split, result, joint, root = joint_artifact
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
    for u in users:
        at = np.searchsorted(result.data.warm, history[u].indices)
        rows.append(warm_rows[at])
        lengths.append(len(at))
    queries = fold_in.queries(np.concatenate(rows), lengths)  # (B, D+1+f)
    candidates = np.concatenate([result.data.warm, cold])
    online = queries.astype(np.float64) @ np.vstack([warm_rows, new_rows]).astype(np.float64).T
    offline = joint.score(users, candidates, history)
    assert np.allclose(online, offline, atol=1e-4 * np.abs(offline).max())
