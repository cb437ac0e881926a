"""The peers in the harness: random, popularity, content k-NN, ALS, ALS + ridge, the calibrated blend.

Each chooses its own hyper-parameters on the validation tasks of the split only (training/protocol.py),
never on test, and folds users in from whatever history it is given at scoring time (ALS solves a
user's factors against the fixed item factors, as a service would).

    ALS              implicit's AlternatingLeastSquares on the fit interactions; new items are never
                     recommended (-inf). Tuned on the warm-only validation task.
    ALS + ridge      new items get factors from a ridge map (training/ridge.py) of their content and attributes onto
                     the warm items' ALS factors (CB2CF / DropoutNet's floor); raw scores.
    calibrated blend ALS + ridge with the new items' scores calibrated on validation by the same
                     search as m2rec's (training/mixing.py), the strongest simple peer of the
                     hybrid protocol.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from service.model.mixing import Policy
from training.dataset import Dataset
from training.mixing import choose_policy, model_policy
from training.protocol import Task, cold_only, evaluate, evaluate_tops, hybrid, tops, warm_only
from training.ridge import RidgeMaps, content_blocks
from training.split import ColdStartSplit


class RandomRecommender:
    """Uniform random scores: the floor every model must clear."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.params: dict[str, Any] = {}

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        self.rng = np.random.default_rng(self.seed)

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return self.rng.random((users.size, candidates.size))


class Popularity:
    """Warm items by their number of fit interactions; new items have none and are never shown."""

    name = "popularity"

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        counts = np.asarray(split.train.getnnz(axis=0), dtype=np.float64)
        self.counts = np.where(np.isin(np.arange(dataset.n_items), split.warm_items), counts, -np.inf)

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.counts[candidates], (users.size, candidates.size)).copy()


class ContentKNN:
    """User profile = mean of the normalised content of their history; cosine to every candidate."""

    name = "content-knn"

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        weights = [0.0, 0.5, 1.0, 2.0, 4.0] if dataset.features is not None else [1.0]
        task = hybrid(split, validation=True)
        best = -1.0
        for w in weights:
            self.content = content_blocks(dataset, w)
            value = evaluate(self, task).get("recall@20", 0.0)
            if value > best:
                best, self.params = value, {"attribute_weight": w, "val_recall@20": value}
        self.content = content_blocks(dataset, self.params["attribute_weight"])

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        rows = history[users]  # (B, I) binary
        counts = np.maximum(np.asarray(rows.sum(axis=1)).ravel(), 1.0)
        mean = sp.diags(1.0 / counts) @ rows
        p_dense = np.asarray(mean @ self.content.dense)  # (B, F) mean content, dense block
        p_sparse = np.asarray((mean @ self.content.sparse).todense())  # (B, A) sparse block
        norm = np.sqrt((p_dense**2).sum(axis=1) + (p_sparse**2).sum(axis=1))[:, None]
        cand = self.content.rows(candidates)
        cosine = p_dense @ cand.dense.T + np.asarray((cand.sparse @ p_sparse.T).T)  # (B, C)
        return np.asarray(cosine / np.maximum(norm, 1e-12))


def fit_als(train: sp.csr_matrix, factors: int, regularization: float, alpha: float, iterations: int,
            seed: int) -> Any:
    """implicit's AlternatingLeastSquares (Hu, Koren & Volinsky 2008) fitted on binary interactions."""
    from implicit.cpu.als import AlternatingLeastSquares

    with threadpool_limits(1, "blas"):  # implicit parallelises itself; nested BLAS threads only contend
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                        iterations=iterations, random_state=seed)
        model.fit(sp.csr_matrix(train, dtype=np.float32), show_progress=False)
    return model


@dataclass
class UserFactorMemo:
    """Users' ALS factors by model and history row. A user's factors are the ALS user step for their own
    row against the model's item factors, each user solved apart from the others, so a row solved for
    one task or batch serves every other: the searches score the same validation users in three tasks
    (warm-only, cold-only, hybrid) and under many ridge maps. Holds the models it remembers."""

    models: dict[int, tuple[Any, dict[tuple[int, bytes, bytes], np.ndarray]]] = field(default_factory=dict)

    def factors(self, model: Any, history: sp.csr_matrix, users: np.ndarray,
                solve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """(B, f) the factors of `users` from their rows of `history`; `solve(users)` solves those not met yet."""
        entry = self.models.get(id(model))
        if entry is None or entry[0] is not model:
            entry = self.models[id(model)] = (model, {})
        known = entry[1]
        rows = sp.csr_matrix(history[users])
        keys = [(b - a, rows.indices[a:b].tobytes(), rows.data[a:b].tobytes())
                for a, b in itertools.pairwise(rows.indptr.tolist())]
        missing = [i for i, key in enumerate(keys) if key not in known]
        if missing:
            for i, factors in zip(missing, solve(np.asarray(users)[missing]), strict=True):
                known[keys[i]] = factors
        return np.stack([known[key] for key in keys]) if keys else solve(np.asarray(users))

    def keep(self, models: Iterable[Any]) -> None:
        """Forget every model but `models`."""
        ids = {id(model) for model in models}
        self.models = {k: v for k, v in self.models.items() if k in ids}


class _ALSScorer:
    """Scores [users' factors]·[item rows]; users are solved by implicit against the fitted ALS item
    factors from the history they are given (`recalculate_user`: the exact ALS user step), through the
    memo `solved` while it is set (a Cholesky solve of f × f per user, the searches' largest cost at
    f = 512 after the fits)."""

    als_model: Any
    item_rows: np.ndarray  # (I, d) the rows candidates are scored by
    rankable: np.ndarray  # (I,) bool: items the model can rank at all
    solved: UserFactorMemo | None = None

    def user_factors(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        if self.solved is None:
            return self._solve(users, history)
        return self.solved.factors(self.als_model, history, users, lambda some: self._solve(some, history))

    def _solve(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        with threadpool_limits(1, "blas"):
            X = self.als_model.recalculate_user(users, sp.csr_matrix(history[users], dtype=np.float32))
        return np.asarray(X, dtype=np.float64)

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        s: np.ndarray = self.user_factors(users, history) @ self.item_rows[candidates].T  # (B, C)
        s[:, ~self.rankable[candidates]] = -np.inf
        return s


@dataclass
class ALS(_ALSScorer):
    """implicit's ALS on warm items only, tuned on the warm-only validation task by coordinate ascent
    over log-spaced grids (a setting at the edge of a fixed grid would leave ALS under-tuned)."""

    seed: int = 0
    name: str = "als"
    params: dict[str, Any] = field(default_factory=dict)
    grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "factors": (32, 64, 128, 256, 512),
        "regularization": (0.01, 0.1, 1.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0),
        "alpha": (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0),
    })
    start: dict[str, float] = field(default_factory=lambda: {"factors": 128, "regularization": 10.0, "alpha": 10.0})
    iterations: int = 15
    trace: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    keep: int = 3  # the fitted models of the best `keep` settings are kept (`fitted`): the blend's search reuses them
    fitted: dict[tuple[float, ...], Any] = field(default_factory=dict)

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        task = warm_only(split, validation=True)
        self.rankable = np.isin(np.arange(dataset.n_items), split.warm_items)
        values: dict[tuple[float, ...], float] = {}

        def value(point: dict[str, float]) -> float:
            key = self.key(point)
            if key not in values:
                self._set(split, int(point["factors"]), point["regularization"], point["alpha"])
                values[key] = evaluate(self, task).get("recall@20", 0.0)
                self.trace.append((dict(point), values[key]))
                self.fitted[key] = self.als_model
                kept = {self.key(p) for p in self.best_configs(self.keep)}
                self.fitted = {k: m for k, m in self.fitted.items() if k in kept}
                if self.solved is not None:
                    self.solved.keep(self.fitted.values())
            return values[key]

        self.trace, self.fitted = [], {}
        point, best = dict(self.start), value(self.start)
        with tqdm(desc="als search", leave=False) as bar:
            improved = True
            while improved:
                improved = False
                for name, grid in self.grids.items():
                    at = grid.index(point[name])
                    for step in (-1, 1):
                        while 0 <= at + step < len(grid):
                            trial = {**point, name: grid[at + step]}
                            v = value(trial)
                            bar.update()
                            if v <= best:
                                break
                            point, best, at, improved = trial, v, at + step, True
        self.params = {**point, "factors": int(point["factors"]), "iterations": self.iterations,
                       "val_warm_recall@20": best}
        self._set(split, int(point["factors"]), point["regularization"], point["alpha"])

    def key(self, point: dict[str, Any]) -> tuple[float, ...]:
        return tuple(point[k] for k in self.grids)

    def model(self, split: ColdStartSplit, point: dict[str, Any]) -> Any:
        """implicit's model for a setting, on `split` (the one `fit` searched on): kept, or fitted now.
        Fitting is deterministic (fixed seed, each user's and item's solve on its own), so a kept model
        is the one a new fit would give."""
        kept = self.fitted.get(self.key(point))
        return kept if kept is not None else fit_als(split.train, int(point["factors"]), float(point["regularization"]),
                                                     float(point["alpha"]), self.iterations, self.seed)

    def _set(self, split: ColdStartSplit, factors: int, reg: float, alpha: float) -> None:
        self.als_model = self.model(split, {"factors": factors, "regularization": reg, "alpha": alpha})
        self.item_rows = np.asarray(self.als_model.item_factors, dtype=np.float64)

    def best_configs(self, n: int) -> list[dict[str, Any]]:
        ranked = sorted(self.trace, key=lambda pv: -pv[1])[:n]
        return [{**p, "factors": int(p["factors"])} for p, _ in ranked]


@dataclass
class ALSRidge(_ALSScorer):
    """ALS item factors for warm items, a ridge map from content to factors for every other item.

    `calibrate`: choose a mixing policy for the new items' scores on the hybrid validation task (the
    calibrated blend); otherwise raw scores. The ALS settings are the best few of the ALS grid
    (warm-only validation); the ridge settings are chosen on the cold-only validation task; with
    `calibrate` the ALS setting is the one whose calibrated blend is best on hybrid validation.
    """

    seed: int = 0
    calibrate: bool = False
    name: str = "als-ridge"
    params: dict[str, Any] = field(default_factory=dict)
    ridge_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0)
    attribute_weights: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    als_candidates: int = 3
    als: ALS | None = None
    policy: Policy | None = None

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        self.solved = UserFactorMemo()
        if self.als is None:
            self.als = ALS(seed=self.seed)
            self.als.solved = self.solved  # the users its search solves, for the kept models, serve ours
            self.als.fit(dataset, split)
        self.rankable = np.ones(dataset.n_items, dtype=bool)
        weights = self.attribute_weights if dataset.features is not None else (1.0,)
        contents = {w: RidgeMaps(content_blocks(dataset, w), split.warm_items) for w in weights}
        configs = self.als.best_configs(self.als_candidates if self.calibrate else 1)
        cold_task, hybrid_task = cold_only(split, validation=True), hybrid(split, validation=True)
        try:
            self._search(split, configs, weights, contents, cold_task, hybrid_task)
        finally:
            self.solved = self.als.solved = None

    def _search(self, split: ColdStartSplit, configs: list[dict[str, Any]], weights: tuple[float, ...],
                contents: dict[float, RidgeMaps], cold_task: Task, hybrid_task: Task) -> None:
        assert self.als is not None
        best: tuple[float, dict[str, Any], Any, np.ndarray, Policy | None] | None = None
        for als in tqdm(configs, desc=f"{self.name} grid", leave=False):
            self.als_model = self.als.model(split, als)
            factors = np.asarray(self.als_model.item_factors, dtype=np.float64)
            chosen: tuple[float, dict[str, Any]] | None = None
            for w, gamma in itertools.product(weights, self.ridge_grid):
                self.item_rows = contents[w].rows(factors, gamma, cold_task.candidates)  # the task's rows alone
                value = evaluate(self, cold_task).get("recall@20", 0.0)
                if chosen is None or value > chosen[0]:
                    chosen = (value, {**als, "attribute_weight": w, "ridge": gamma, "val_cold_recall@20": value})
            assert chosen is not None
            params = chosen[1]
            self.item_rows, self.policy = contents[params["attribute_weight"]].rows(factors, params["ridge"]), None
            ranked = tops(self, hybrid_task)
            if self.calibrate:
                self.policy, _ = choose_policy(ranked)
                params = {**params, "policy": self.policy.to_dict()}
            value = evaluate_tops(ranked, model_policy(self), hybrid_task.mixed).metrics.get("recall@20", 0.0)
            if best is None or value > best[0]:
                best = (value, {**params, "val_hybrid_recall@20": value}, self.als_model, self.item_rows, self.policy)
        assert best is not None
        _, self.params, self.als_model, self.item_rows, self.policy = best
