"""The serving benchmark's oracles: exact top-k lists by brute force, the list the service would answer
from exact searches, recall, and random query directions."""

from __future__ import annotations

import numpy as np

from benchmarks.in_process import K
from service.core.merge import merge_many
from service.core.recommender import Recommender
from service.index import Hit, Tops


def exact_tops(q: np.ndarray, rows: np.ndarray, ids: list[str], seen: list[set[str]], k: int = K) -> list[set[str]]:
    """Exact top-k ids over `rows` (N, D+1) per query (B, D+1), each query's `seen` left out: the recall oracle."""
    return [set(top) for top in exact_ranked(q, rows, ids, seen, k)[0]]


def exact_served(rec: Recommender, q: np.ndarray, q_new: np.ndarray, rows: np.ndarray, ids: list[str],
                 seen: list[set[str]], k: int = K) -> list[set[str]]:
    """The list the service would answer from exact searches: each population's exact top-k (trained
    items by `q`, new items by `q_new`), merged by the artifact's policy (service/core/merge.py), as
    /recommend merges its index's answers."""
    trained = exact_ranked(q, rec.warm_rows, list(rec.warm_ids), seen, k)
    new = exact_ranked(q_new, rows, ids, seen, k)
    tops = [Tops([Hit(i, s, False) for i, s in zip(*t, strict=True)],
                 [Hit(i, s, True) for i, s in zip(*n, strict=True)])
            for t, n in zip(zip(*trained, strict=True), zip(*new, strict=True), strict=True)]
    return [{h.item_id for h in hits} for hits in merge_many(tops, [rec.policy] * len(tops), [k] * len(tops))]


def exact_ranked(q: np.ndarray, rows: np.ndarray, ids: list[str], seen: list[set[str]], k: int = K
                 ) -> tuple[list[list[str]], list[list[float]]]:
    """Exact top-k per query over `rows`, best first: (ids, scores), each query's `seen` left out."""
    best = np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64)
    position = {item_id: j for j, item_id in enumerate(ids)}
    banned = [[position[i] for i in s if i in position] for s in seen]
    for start in range(0, len(rows), 1 << 20):
        scores = q @ rows[start : start + (1 << 20)].T  # (B, n)
        for b, ban in enumerate(banned):
            local = [j - start for j in ban if start <= j < start + scores.shape[1]]
            scores[b, local] = -np.inf
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        cand_s = np.concatenate([best[0], np.take_along_axis(scores, top, 1)], axis=1)
        cand_i = np.concatenate([best[1], top + start], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    finite = np.isfinite(best[0]).tolist()  # -inf: fewer than k rows left after the exclusions
    pairs = [[(ids[j], x) for j, x, f in zip(i_row, s_row, ok, strict=True) if f]
             for i_row, s_row, ok in zip(best[1].tolist(), best[0].tolist(), finite, strict=True)]
    return [[i for i, _ in row] for row in pairs], [[x for _, x in row] for row in pairs]


def recall(truth: list[set[str]], found: list[list[str]]) -> float:
    return round(float(np.mean([len(t & set(f)) / len(t) for t, f in zip(truth, found, strict=True)])), 4)


def random_directions(q: np.ndarray, seed: int) -> np.ndarray:
    """Queries of the same norms as `q` pointing anywhere: the stress test of the IVF lists."""
    g = np.random.default_rng(seed).standard_normal(q[:, :-1].shape).astype(np.float32)
    out = q.copy()
    out[:, :-1] = g / np.linalg.norm(g, axis=1, keepdims=True) * np.linalg.norm(q[:, :-1], axis=1, keepdims=True)
    return out
