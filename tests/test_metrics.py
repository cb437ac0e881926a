"""Metrics against hand-computed cases (DESIGN.md definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import rank_top_k, rank_top_k_batch, user_metrics


def _metrics(scores: list[float], truth: set[int], ks: tuple[int, ...]) -> dict[str, float]:
    s = np.array(scores, dtype=np.float64)
    t = np.zeros(s.size, dtype=bool)
    t[list(truth)] = True
    top = rank_top_k(s, t, max(ks))
    return user_metrics(top, t, len(truth), ks)


def test_perfect_ranking_scores_one() -> None:
    m = _metrics([0.9, 0.8, 0.1, 0.0], {0, 1}, (2,))
    assert m == {"recall@2": 1.0, "ndcg@2": 1.0, "hr@2": 1.0}


def test_recall_denominator_is_min_of_k_and_truth() -> None:
    # 3 true items, K=2, both top-2 true: recall 2/min(2,3) = 1, not 2/3.
    m = _metrics([5, 4, 3, 2, 1], {0, 1, 2}, (2,))
    assert m["recall@2"] == 1.0
    # one true item at rank 3, K=2: no hit.
    m = _metrics([5, 4, 3], {2}, (2,))
    assert m["recall@2"] == 0.0 and m["hr@2"] == 0.0 and m["ndcg@2"] == 0.0


def test_ndcg_hand_computed_with_fewer_truths_than_k() -> None:
    # ranking: T, F, T over truth of size 2, K=3.
    m = _metrics([0.9, 0.8, 0.7, 0.1], {0, 2}, (3,))
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx(dcg / idcg)
    assert m["recall@3"] == 1.0
    # a single truth at rank 2: NDCG = (1/log2 3) / (1/log2 2)
    m = _metrics([0.9, 0.8, 0.1], {1}, (10,))
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert m["recall@10"] == 1.0 and m["hr@10"] == 1.0


def test_ties_are_broken_against_the_truth() -> None:
    # items 0 and 1 tie; the true item 1 ranks after the false item 0.
    m = _metrics([1.0, 1.0, 0.5], {1}, (1, 2))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0
    assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))
    # a constant scorer gets nothing while false candidates remain.
    m = _metrics([0.0] * 30, {3, 7}, (10, 20))
    assert m["recall@10"] == 0.0 and m["recall@20"] == 0.0


def test_empty_truth_is_skipped_not_scored() -> None:
    with pytest.raises(ValueError, match="empty truth"):
        user_metrics(np.array([0, 1]), np.zeros(2, dtype=bool), 0, (10,))


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        rank_top_k(np.array([0.1, np.nan]), np.zeros(2, dtype=bool), 1)


def test_batch_ranking_matches_row_ranking_with_ties_and_exclusions() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(40, 60)).astype(np.float64)  # many ties
    truth = rng.random((40, 60)) < 0.2
    scores[rng.random((40, 60)) < 0.1] = -np.inf  # excluded candidates
    batch = rank_top_k_batch(scores, truth, 12)
    for b in range(40):
        allowed = np.flatnonzero(np.isfinite(scores[b]))
        expected = allowed[rank_top_k(scores[b, allowed], truth[b, allowed], 12)]
        assert batch[b][batch[b] >= 0].tolist() == expected.tolist()
