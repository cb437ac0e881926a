"""The hybrid protocol against oracles: holdouts, per-population lists, mixing policies, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from service.model.mixing import RAW, Calibrated, Policy, Quota, merge_order, policy_from_dict
from training.dataset import Dataset, DatasetError
from training.evaluate import paired
from training.metrics import list_metrics, user_metrics
from training.mixing import Placer, Tops, choose_policy, merge, policy_figures
from training.protocol import cold_only, evaluate_tops, hybrid, tops, warm_only
from training.split import ColdStartSplit, cold_start_split, hold_out, holdout_count, production_split, validation_split


def _dataset(n_users: int = 60, n_items: int = 80, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 1500), rng.integers(0, n_items, 1500),
                                                strict=True)}
    return Dataset(
        name="synthetic",
        item_ids=[f"i{j}" for j in range(n_items)],
        item_attributes=[[f"cat:{j % 5}"] for j in range(n_items)],
        user_ids=[f"u{u}" for u in range(n_users)],
        interactions=np.array(sorted(pairs), dtype=np.int64),
    )


def test_holdout_takes_a_fifth_and_at_least_one_from_users_with_five() -> None:
    assert [holdout_count(n, 0.2) for n in (0, 1, 4, 5, 7, 10, 12, 100)] == [0, 0, 0, 1, 1, 2, 2, 20]
    m = sp.csr_matrix(np.ones((3, 12)))
    m[1, 5:] = 0
    m.eliminate_zeros()
    kept, held = hold_out(m, 0.2, np.random.default_rng(0))
    assert (kept + held - m).nnz == 0 and kept.multiply(held).nnz == 0
    assert held.getnnz(axis=1).tolist() == [2, 1, 2]


def test_split_partitions_every_interaction_and_keeps_new_items_out_of_training() -> None:
    data = _dataset()
    s = cold_start_split(data, seed=3)
    full = data.interaction_matrix()
    parts = [s.train, s.val_warm_truth, s.test_warm_truth, s.val_truth, s.test_truth]
    assert sum(p.nnz for p in parts) == full.nnz
    assert (sum(parts[1:], parts[0]) - full).nnz == 0  # disjoint and complete
    for p in (s.train, s.history, s.val_warm_truth, s.test_warm_truth):
        assert p[:, s.cold_items].nnz == 0 and p[:, s.val_items].nnz == 0
    assert (s.history - s.train - s.val_warm_truth).nnz == 0
    assert not set(s.cold_items) & set(s.val_items)
    again = cold_start_split(data, seed=3)
    assert (again.test_warm_truth - s.test_warm_truth).nnz == 0  # seeded


def test_hybrid_tasks_fold_in_from_the_right_history_and_rank_the_right_candidates() -> None:
    s = cold_start_split(_dataset(), seed=0)
    test, val = hybrid(s), hybrid(s, validation=True)
    assert set(test.candidates) == set(s.warm_items) | set(s.cold_items)
    assert set(val.candidates) == set(s.warm_items) | set(s.val_items)
    assert (test.history - s.history).nnz == 0 and (val.history - s.train).nnz == 0
    assert set(test.candidates[test.cold]) == set(s.cold_items)
    assert (test.truth - s.test_warm_truth - s.test_truth).nnz == 0
    assert test.mixed and not cold_only(s).mixed and not warm_only(s).mixed


def test_a_cold_items_file_naming_no_touched_item_is_an_error() -> None:
    data = _dataset()
    data.item_ids.append("never")
    data.item_attributes.append([])
    data.__post_init__()
    data.cold_items = ["never"]
    with pytest.raises(DatasetError, match=r"none of the 1 items in cold_items\.txt has an interaction"):
        cold_start_split(data, seed=0)


def test_production_splits_keep_every_item_warm_or_validation() -> None:
    data = _dataset()
    v = validation_split(data, seed=0)
    assert v.cold_items.size == 0 and v.test_truth.nnz == 0
    assert set(v.warm_items) | set(v.val_items) == set(np.unique(data.interactions[:, 1]))
    p = production_split(data, seed=0, unseen=v.val_warm_truth)
    assert set(p.warm_items) == set(np.unique(data.interactions[:, 1])) and p.val_items.size == 0
    assert p.train.nnz + p.val_warm_truth.nnz == len(data.interactions)
    # the stopping slice is part of what the validation run never trained on, and the refit skips it
    assert p.val_warm_truth.nnz > 0 and p.val_warm_truth.multiply(v.train).nnz == 0
    assert p.val_warm_truth.multiply(v.val_warm_truth).nnz == p.val_warm_truth.nnz
    assert p.train.multiply(p.val_warm_truth).nnz == 0


class _Fixed:
    """A recommender with a fixed score table (U, I)."""

    name = "fixed"

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        pass

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(self.table[np.ix_(users, candidates)])


def _brute_force(table: np.ndarray, task: object, policy: Calibrated) -> list[dict[str, float]]:
    """Per user: rank every candidate by (calibrated) score; among ties the non-truth first, then trained
    before new (the merge's rule), then candidate order; then the metrics."""
    out = []
    for u in task.users:  # type: ignore[attr-defined]
        cand = task.candidates  # type: ignore[attr-defined]
        scores = table[u, cand].astype(np.float64)
        cold = task.cold  # type: ignore[attr-defined]
        scores = np.where(cold, policy.new_scores(scores), scores)
        scores[task.history[u][:, cand].toarray()[0] > 0] = -np.inf  # type: ignore[attr-defined]
        truth = task.truth[u][:, cand].toarray()[0] > 0  # type: ignore[attr-defined]
        ranked = np.lexsort((np.arange(cand.size), cold, truth, -scores))
        top = ranked[np.isfinite(scores[ranked])][:20]
        m = user_metrics(top, truth, int(truth.sum()), (20,))
        m["cold_share@20"] = float(cold[top].mean())
        out.append(m)
    return out


@pytest.mark.parametrize("policy", [Calibrated(), Calibrated(2.0, -0.3), Calibrated(0.5, 0.4)])
def test_merged_population_lists_equal_ranking_every_candidate(policy: Calibrated) -> None:
    s = cold_start_split(_dataset(), seed=1)
    rng = np.random.default_rng(0)
    table = np.round(rng.normal(size=(s.n_users, s.n_items)), 1)  # ties on purpose
    task = hybrid(s)
    got = evaluate_tops(tops(_Fixed(table), task), policy, mixed=True)
    expected = _brute_force(table, task, policy)
    for key in ("recall@20", "ndcg@20", "cold_share@20"):
        assert got.per_user[key] == pytest.approx([m[key] for m in expected]), key


def test_quota_places_new_items_in_the_promised_slots_and_fills_when_one_side_runs_out() -> None:
    scores = np.full((2, 2, 5), -np.inf)
    scores[0, 0] = [9, 8, 7, 6, 5]
    scores[0, 1] = [1, 1, 1, 1, 1]
    scores[1, 0, :2] = [9, 8]  # only two trained items
    scores[1, 1] = [3, 2, 1, 0, -1]
    order, filled = merge_order(Quota(0.4), scores)
    assert filled.all()
    # share 0.4: floor((p+1)·0.4) steps up at p = 2 and 4 (0-based), so those slots are new
    assert (order[0] >= 5).tolist() == [False, False, True, False, True]
    assert order[0].tolist() == [0, 1, 5, 2, 6]
    # user 1: the two trained items first as the pattern asks, then new items fill the rest in order
    assert order[1].tolist() == [0, 1, 5, 6, 7]


def test_calibrated_policy_prefers_trained_items_and_then_non_truth_on_ties() -> None:
    scores = np.array([[[1.0, 0.5], [1.0, 0.5]]])
    truth = np.array([[[False, True], [True, False]]])
    order, _ = merge_order(Calibrated(), scores, truth)
    assert order[0].tolist() == [0, 2]  # tie at 1.0: the non-truth (trained) first
    order, _ = merge_order(Calibrated(), scores)
    assert order[0].tolist() == [0, 2]  # no truth given: trained first


def test_policies_round_trip_and_bad_ones_are_refused() -> None:
    for p in (Calibrated(1.4, -0.2), Quota(0.25)):
        assert policy_from_dict(p.to_dict()) == p
    for bad in ({"policy": "quota", "cold_share": -0.1}, {"policy": "calibrated", "scale": 0.0, "offset": 0.0},
                {"policy": "other"}):
        with pytest.raises(ValueError, match=r"cold_share|scale|unknown mixing policy"):
            policy_from_dict(bad)


def test_list_metrics_equal_the_single_user_definitions() -> None:
    rng = np.random.default_rng(1)
    hit = rng.random((30, 50)) < 0.2
    n_truth = np.stack([rng.integers(0, 8, 30), rng.integers(1, 8, 30)], axis=1)
    hit[:, 40:] &= False
    is_cold = rng.random((30, 50)) < 0.5
    got = list_metrics(hit, is_cold, np.ones_like(hit), n_truth)
    for u in range(30):
        order = np.arange(50)
        expected = user_metrics(order, hit[u], int(n_truth[u].sum()))
        for key, value in expected.items():
            assert got[key][u] == pytest.approx(value), key
    # the cold part: the same list scored against the cold truth alone
    u = int(np.flatnonzero(n_truth[:, 1] > 0)[0])
    cold_hits = (hit[u] & is_cold[u])[:20]
    ideal = sum(1 / math.log2(i + 2) for i in range(min(20, int(n_truth[u, 1]))))
    assert got["cold_ndcg@20"][u] == pytest.approx(sum(cold_hits / np.log2(np.arange(2, 22))) / ideal)


def test_choose_policy_finds_the_offset_that_moves_new_items_in() -> None:
    # new items are the relevant ones but score 1 lower: a good policy lifts them above the trained
    U, K = 50, 20
    scores = np.zeros((U, 2, K))
    scores[:, 0] = np.linspace(5, 4, K)
    scores[:, 1] = np.linspace(4, 3, K)
    truth = np.zeros((U, 2, K), dtype=bool)
    truth[:, 1, :10] = True
    t = Tops(np.arange(U), scores, truth, np.tile([0, 10], (U, 1)))
    policy, trace = choose_policy(t)
    hit, _, _ = merge(t, policy)
    assert hit[:, :10].all() and len(trace) > 100


def _best_first(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each list as the harness keeps it: score descending, the truth last among ties."""
    for u, q in np.ndindex(*scores.shape[:2]):
        order = np.lexsort((truth[u, q], -scores[u, q]))
        scores[u, q], truth[u, q] = scores[u, q][order], truth[u, q][order]
    return scores, truth


@pytest.mark.parametrize("ties", [True, False])
def test_the_policy_search_places_true_entries_exactly_where_the_full_merge_does(ties: bool) -> None:
    # Placer counts the entries ahead of each true one instead of merging the lists; on lists full
    # of ties (scores in quarters), short lists (-inf pads) and both policy families it must give
    # the figures of the merge itself, to the last bit
    rng = np.random.default_rng(3)
    U, K = 300, 20
    raw = rng.integers(0, 6, size=(U, 2, K)) / 4 if ties else rng.normal(size=(U, 2, K))
    scores, truth = _best_first(raw.astype(np.float64), rng.random((U, 2, K)) < 0.2)
    for u, q in zip(*np.nonzero(rng.random((U, 2)) < 0.1), strict=True):
        cut = rng.integers(0, K)
        scores[u, q, cut:], truth[u, q, cut:] = -np.inf, False
    t = Tops(np.arange(U), scores, truth, truth.sum(axis=2) + rng.integers(0, 3, size=(U, 2)))
    placer = Placer(t)
    policies: list[Policy] = [Calibrated(scale, float(offset)) for scale in (0.35, 1.0, 2.8)
                              for offset in np.linspace(-2, 2, 17)]
    for policy in [*policies, Quota(0.0), Quota(0.35), Quota(1.0)]:
        assert placer.value(policy) == policy_figures(t, policy), policy


def test_the_policy_search_merges_in_full_where_rounding_ties_a_true_new_entry_with_the_next() -> None:
    # 0.5 and the next float below it become one float after + 1000: the merge then puts the false
    # entry first (truth last among ties), and so must the search
    scores = np.tile(-np.arange(20, dtype=np.float64), (2, 2, 1))
    scores[:, 1, :5] += 10.0
    scores[:, 1, 5], scores[:, 1, 6] = 0.5, np.nextafter(0.5, 0.0)
    truth = np.zeros((2, 2, 20), dtype=bool)
    truth[:, 1, 5] = True
    t = Tops(np.arange(2), scores, truth, truth.sum(axis=2))
    policy = Calibrated(1.0, 1000.0)
    assert policy.new_scores(scores[0, 1, 5]) == policy.new_scores(scores[0, 1, 6])
    assert Placer(t).value(policy) == policy_figures(t, policy) != policy_figures(t, Calibrated(1.0, 0.0))
    # lists that are not best first are merged in full too
    scores[0, 0] = scores[0, 0][::-1].copy()
    assert Placer(t).unordered.tolist() == [True, False]
    assert Placer(t).value(RAW) == policy_figures(t, RAW)


def test_paired_differences_give_a_confidence_interval_that_excludes_zero_for_a_real_gap() -> None:
    users = list(range(200))
    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = a - 0.05 + 0.01 * rng.normal(size=200)
    per_user = {"ours": {"0": {"hybrid": {"users": users, "recall@20": a.tolist()}}},
                "peer": {"0": {"hybrid": {"users": users, "recall@20": b.tolist()}}}}
    d = paired(per_user, "peer", "ours", "hybrid", "recall@20")
    assert d is not None and d["high"] < 0 and d["low"] < d["mean"] < d["high"] and d["n"] == 200
