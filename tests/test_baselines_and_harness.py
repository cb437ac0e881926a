"""Baselines against oracles, and the harness end to end on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.shared_data import ml100k
from training import evaluate as harness
from training.baselines import ALS, ALSRidge, ContentKNN, Popularity, UserFactorMemo, fit_als
from training.dataset import Dataset, save_dataset
from training.ensemble import standardised
from training.ridge import RidgeMaps, content_blocks, gram, ridge_map, with_intercept
from training.split import cold_start_split


def _dataset(n_users: int = 30, n_items: int = 40, seed: int = 0, n_pairs: int = 300) -> Dataset:
    rng = np.random.default_rng(seed)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, n_pairs), rng.integers(0, n_items, n_pairs),
                                                strict=True)}
    return Dataset(
        name="synthetic",
        item_ids=[f"i{j}" for j in range(n_items)],
        item_attributes=[[f"cat:{j % 5}", f"brand:{j % 3}"] for j in range(n_items)],
        user_ids=[f"u{u}" for u in range(n_users)],
        interactions=np.array(sorted(pairs), dtype=np.int64),
        features=rng.normal(size=(n_items, 6)).astype(np.float32),
    )


def test_content_knn_matches_a_dense_cosine_oracle() -> None:
    data = _dataset()
    split = cold_start_split(data, seed=0)
    knn = ContentKNN()
    knn.content = content_blocks(data, attribute_weight=1.5)
    dense = np.hstack([knn.content.dense, knn.content.sparse.toarray()])  # (I, F+A) unit rows
    assert np.allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)
    users = np.arange(data.n_users)
    got = knn.score(users, split.cold_items, split.history)
    for u in users:
        history = split.history[int(u)].indices
        profile = dense[history].mean(axis=0) if history.size else np.zeros(dense.shape[1])
        norm = np.linalg.norm(profile)
        expected = dense[split.cold_items] @ (profile / norm if norm > 0 else profile)
        assert np.allclose(got[u], expected, atol=1e-5)


def test_implicit_als_ranks_the_users_own_block_first() -> None:
    # two user groups, each consuming its own half of the items
    rng = np.random.default_rng(0)
    rows, cols = [], []
    for u in range(20):
        block = range(0, 10) if u < 10 else range(10, 20)
        for i in block:
            if rng.random() < 0.7:  # leave some in-block items unseen
                rows.append(u)
                cols.append(i)
    train = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(20, 20))
    model = fit_als(train, factors=2, regularization=0.1, alpha=10.0, iterations=10, seed=0)
    scores = np.asarray(model.recalculate_user(np.arange(20), train.astype(np.float32))) \
        @ np.asarray(model.item_factors).T
    for u in range(20):
        own = slice(0, 10) if u < 10 else slice(10, 20)
        other = slice(10, 20) if u < 10 else slice(0, 10)
        assert scores[u, own].min() > scores[u, other].max()


def test_peers_rank_what_they_can_and_never_show_what_they_cannot() -> None:
    data = _dataset(n_users=60, n_items=50, n_pairs=1200)
    split = cold_start_split(data, seed=0)
    pop = Popularity()
    pop.fit(data, split)
    s = pop.score(np.arange(3), np.union1d(split.warm_items, split.cold_items), split.history)
    cand = np.union1d(split.warm_items, split.cold_items)
    assert np.isneginf(s[:, np.isin(cand, split.cold_items)]).all()
    als = ALS(seed=0, grids={"factors": (4, 8), "regularization": (0.1, 1.0), "alpha": (1.0, 5.0)},
              start={"factors": 4, "regularization": 0.1, "alpha": 1.0}, iterations=3)
    als.fit(data, split)
    s = als.score(np.arange(5), cand, split.history)
    assert np.isneginf(s[:, np.isin(cand, split.cold_items)]).all()
    assert np.isfinite(s[:, np.isin(cand, split.warm_items)]).all()
    blend = ALSRidge(seed=0, calibrate=True, als=als, ridge_grid=(1.0,), attribute_weights=(1.0,), als_candidates=1)
    blend.fit(data, split)
    assert np.isfinite(blend.score(np.arange(5), cand, split.history)).all()
    assert blend.policy is not None and blend.params["policy"] == blend.policy.to_dict()


def test_the_searches_reuse_a_users_factors_only_for_the_same_model_and_history_row() -> None:
    data = _dataset(n_users=60, n_items=50, n_pairs=1200)
    split = cold_start_split(data, seed=0)
    als = ALS(seed=0, grids={"factors": (4,), "regularization": (0.1,), "alpha": (1.0,)},
              start={"factors": 4, "regularization": 0.1, "alpha": 1.0}, iterations=3)
    als.fit(data, split)
    users, cand = np.arange(8), np.union1d(split.warm_items, split.cold_items)
    plain = als.score(users, cand, split.history)
    als.solved = memo = UserFactorMemo()
    assert np.array_equal(als.score(users, cand, split.history), plain)
    assert np.array_equal(als.score(users, cand, split.history), plain)  # from the memo
    # a batch that overlaps the first: its known users from the memo, the others solved, as if alone
    more = np.arange(4, 12)
    assert np.array_equal(als.score(more, cand, split.history), ALS.score(_fresh(als), more, cand, split.history))
    (model, rows), = memo.models.values()
    assert model is als.als_model
    assert len(rows) == len({split.history[u].indices.tobytes() for u in range(12)})
    # the memo is what is read: a user's remembered factors, zeroed, zero their scores
    key = next(k for k in rows if k[1] == split.history[0].indices.tobytes())
    rows[key] = np.zeros_like(rows[key])
    assert not als.score(np.arange(1), cand, split.history)[np.isfinite(plain[:1])].any()
    # another history (the same users, other rows) and another model are solved afresh
    other = sp.csr_matrix(split.history[::-1])
    assert np.array_equal(als.score(users, cand, other), ALS.score(_fresh(als), users, cand, other))
    als.als_model = fit_als(split.train, 4, 1.0, 1.0, 3, seed=1)
    assert np.array_equal(als.score(users, cand, split.history), ALS.score(_fresh(als), users, cand, split.history))
    assert len(memo.models) == 2
    memo.keep([als.als_model])
    assert [m for m, _ in memo.models.values()] == [als.als_model]


def test_every_ridge_map_of_the_search_is_the_direct_solve() -> None:
    """The search's maps come from one eigendecomposition of XᵀX (formed block by block); each must be
    the solve of (XᵀX + γI) W = Xᵀ factors[warm] that production's `ridge_map` makes, for every γ and
    factors, and the rows must keep warm items' factors and map every other item (or only those asked for)."""
    data = _dataset(n_users=60, n_items=80, n_pairs=1500)
    split = cold_start_split(data, seed=0)
    blocks = content_blocks(data, 2.0)
    content = with_intercept(blocks)
    assert blocks.dense.shape[1] > 0 and blocks.sparse.shape[1] > 0
    Xw = content[split.warm_items]
    np.testing.assert_allclose(gram(blocks.rows(split.warm_items)), (Xw.T @ Xw).toarray(), rtol=1e-12, atol=1e-12)
    maps = RidgeMaps(blocks, split.warm_items)
    rng = np.random.default_rng(0)
    for factors in (rng.normal(size=(80, 5)), rng.normal(size=(80, 3))):
        for gamma in (0.1, 1.0, 1000.0):
            direct = ridge_map(factors, content, split.warm_items, gamma)
            np.testing.assert_allclose(maps.map(factors, gamma), direct, rtol=1e-9, atol=1e-12)
            rows = maps.rows(factors, gamma)
            np.testing.assert_array_equal(rows[split.warm_items], factors[split.warm_items])
            mapped = content[split.cold_items] @ direct
            np.testing.assert_allclose(rows[split.cold_items], mapped, rtol=1e-9, atol=1e-12)
            some = split.cold_items[::2]
            partial = maps.rows(factors, gamma, some)
            np.testing.assert_array_equal(partial[some], rows[some])
            assert np.isnan(np.delete(partial, some, axis=0)).all()
    with pytest.raises(ValueError, match="warm items"):
        maps.rows(factors, 1.0, split.warm_items[:2])


def _fresh(als: ALS) -> ALS:
    copy = ALS(seed=0)
    copy.als_model, copy.item_rows, copy.rankable = als.als_model, als.item_rows, als.rankable
    return copy


def test_harness_writes_tables_and_content_beats_random_on_real_data(tmp_path: Path) -> None:
    data = ml100k()
    save_dataset(data, tmp_path / "ml-100k")
    harness.main(["--dataset", str(tmp_path / "ml-100k"), "--models", "random,content-knn",
                  "--seeds", "1", "--name", "t", "--reference", "content-knn", "--out", str(tmp_path / "results")])
    report = json.loads((tmp_path / "results" / "ml-100k-t.json").read_text())
    assert (tmp_path / "results" / "ml-100k-t.md").read_text().startswith("# ml-100k")
    assert (tmp_path / "results" / "ml-100k-t.png").stat().st_size > 0
    runs = report["runs"]
    knn, rnd = runs["content-knn"][0], runs["random"][0]
    assert knn["cold_only"]["recall@20"] > 2 * rnd["cold_only"]["recall@20"]
    assert knn["hybrid"]["recall@20"] > 2 * rnd["hybrid"]["recall@20"]
    assert 0.0 <= knn["hybrid"]["cold_share@20"] <= 1.0 and 0.0 < knn["hybrid"]["truth_cold_share"] < 1.0
    # paired differences to the reference: random is worse, and the interval says so
    diff = report["paired"]["hybrid"]["random"]["recall@20"]
    assert diff["high"] < 0 and diff["n"] > 500  # ml-100k: ~750 tested users with hybrid truth
    # by default a fifth of the users validate and are not tested (an exact mirror of test)
    split = report["splits"][0]
    assert split["hybrid_users_in_both"] == 0
    assert 0.15 < split["hybrid_val_users"] / (split["hybrid_val_users"] + split["hybrid_test_users"]) < 0.25
    assert "validation users:" in (tmp_path / "results" / "ml-100k-t.md").read_text()
    assert report["splits"][0]["cold_items"] == cold_start_split(data, 0).cold_items.size

    # a run split by seed joins into one table; a model and seed found twice must agree
    harness.main(["--dataset", str(tmp_path / "ml-100k"), "--models", "content-knn", "--seed-list", "1",
                  "--name", "t1", "--out", str(tmp_path / "results")])
    parts = [str(tmp_path / "results" / f"ml-100k-{n}.json") for n in ("t", "t1", "t")]
    harness.main(["--merge", *parts, "--name", "joined", "--out", str(tmp_path / "results")])
    joined = json.loads((tmp_path / "results" / "ml-100k-joined.json").read_text())
    assert joined["seeds"] == [0, 1] and [s["seed"] for s in joined["splits"]] == [0, 1]
    assert [r["seed"] for r in joined["runs"]["content-knn"]] == [0, 1]
    assert [r["seed"] for r in joined["runs"]["random"]] == [0]
    assert "| random (1 seeds) |" in (tmp_path / "results" / "ml-100k-joined.md").read_text()
    report["runs"]["content-knn"][0]["hybrid"]["recall@20"] += 0.01
    with pytest.raises(SystemExit, match="disagree"):
        harness.merge([json.loads(Path(parts[0]).read_text()), report])


def test_ensemble_standardises_each_population_of_each_user_apart() -> None:
    s = np.array([[1.0, 3.0, 100.0, 300.0, -np.inf],
                  [5.0, 5.0, -1.0, 1.0, 0.0]])
    new = np.array([False, False, True, True, True])
    z = standardised(s, new)
    assert np.allclose(z[0, :4], [-1, 1, -1, 1]) and z[0, 4] == -np.inf  # a non-finite score stays out
    assert np.allclose(z[1, :2], 0.0) and np.allclose(z[1, 2:], np.array([-1, 1, 0]) / np.sqrt(2 / 3))
