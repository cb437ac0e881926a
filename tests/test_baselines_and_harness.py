"""Baselines against oracles, and the harness end to end on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.shared_data import shared_data
from training import evaluate as harness
from training.baselines import ContentKNN, content_blocks, implicit_als
from training.convert import build_citeulike
from training.dataset import Dataset, save_dataset
from training.split import cold_start_split


def _dataset(n_users: int = 30, n_items: int = 40, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 300), rng.integers(0, n_items, 300),
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
    knn.train = split.train
    knn.content = content_blocks(data, attribute_weight=1.5)
    dense = np.hstack([knn.content.dense, knn.content.sparse.toarray()])  # (I, F+A) unit rows
    assert np.allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)
    users = np.arange(data.n_users)
    got = knn.score(users, split.cold_items)
    for u in users:
        history = split.train[int(u)].indices
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
    X, Y = implicit_als(train, factors=2, reg=0.1, alpha=10.0, iterations=10, seed=0)
    scores = X @ Y.T
    for u in range(20):
        own = slice(0, 10) if u < 10 else slice(10, 20)
        other = slice(10, 20) if u < 10 else slice(0, 10)
        assert scores[u, own].min() > scores[u, other].max()


def test_harness_writes_tables_and_content_beats_random_on_real_data(tmp_path: Path) -> None:
    data = build_citeulike(shared_data())
    save_dataset(data, tmp_path / "citeulike-t")
    harness.main(["--dataset", str(tmp_path / "citeulike-t"), "--models", "random,content-knn",
                  "--seeds", "1", "--name", "t", "--out", str(tmp_path / "results")])
    report = json.loads((tmp_path / "results" / "citeulike-t-t.json").read_text())
    assert (tmp_path / "results" / "citeulike-t-t.md").read_text().startswith("# citeulike-t")
    assert (tmp_path / "results" / "citeulike-t-t.png").stat().st_size > 0
    runs = report["runs"]
    knn, rnd = runs["content-knn"][0], runs["random"][0]
    assert knn["cold_only"]["recall@20"] > 5 * rnd["cold_only"]["recall@20"]
    assert 0.0 <= knn["all_items"]["cold_share@20"] <= 1.0
    assert report["splits"][0]["cold_items"] == cold_start_split(data, 0).cold_items.size

    # a run split by seed joins into one table; a model and seed found twice must agree
    harness.main(["--dataset", str(tmp_path / "citeulike-t"), "--models", "content-knn", "--seed-list", "1",
                  "--name", "t1", "--out", str(tmp_path / "results")])
    parts = [str(tmp_path / "results" / f"citeulike-t-{n}.json") for n in ("t", "t1", "t")]
    harness.main(["--merge", *parts, "--name", "joined", "--out", str(tmp_path / "results")])
    joined = json.loads((tmp_path / "results" / "citeulike-t-joined.json").read_text())
    assert joined["seeds"] == [0, 1] and [s["seed"] for s in joined["splits"]] == [0, 1]
    assert [r["seed"] for r in joined["runs"]["content-knn"]] == [0, 1]
    assert [r["seed"] for r in joined["runs"]["random"]] == [0]
    assert "| random (1 seeds) |" in (tmp_path / "results" / "citeulike-t-joined.md").read_text()
    report["runs"]["content-knn"][0]["cold_only"]["recall@20"] += 0.01
    with pytest.raises(SystemExit, match="disagree"):
        harness.merge([json.loads(Path(parts[0]).read_text()), report])
