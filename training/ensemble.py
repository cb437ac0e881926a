"""m2rec combined with the calibrated ALS + ridge blend's parts, two ways; the mixing weight w and
the policy that mixes the two populations chosen on the hybrid validation task for each.

    m2rec+blend  each model's scores standardised per user and per population over the candidates,
                 mixed as w·z(m2rec) + (1 - w)·z(blend). Needs every candidate's score: an index
                 cannot serve it (the experiment that showed the blend knows something m2rec does not).
    m2rec+als    the served form (service/model/collaborative.py, training/collaborative_fit.py): one
                 inner product of rows [v; b; y] and per-user queries, each part's scores on a
                 per-user scale taken from the trained rows' covariance.

Both reuse the m2rec and blend fitted for the same seed (`shared`, training/evaluate.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from service.model.mixing import Policy
from training.baselines import ALSRidge
from training.collaborative_fit import Joint, best_mix, fit_joint
from training.dataset import Dataset
from training.m2rec_recommender import M2RecRecommender
from training.protocol import Recommender, hybrid
from training.split import ColdStartSplit


def standardised(s: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(B, C) scores made z-scores per user within each population (`new` (C,) marks new items)."""
    out = np.empty_like(s)
    for cols in (~new, new):
        if not cols.any():
            continue
        part = s[:, cols]
        finite = np.isfinite(part)
        n = np.maximum(finite.sum(axis=1, keepdims=True), 1)
        mean = np.where(finite, part, 0.0).sum(axis=1, keepdims=True) / n
        var = np.where(finite, (part - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / n
        out[:, cols] = np.where(finite, (part - mean) / np.sqrt(var + 1e-12), -np.inf)
    return out


@dataclass
class Ensemble:
    seed: int = 0
    name: str = "m2rec+blend"
    weight: float = 0.5
    policy: Policy | None = None
    params: dict[str, Any] = field(default_factory=dict)
    new: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (I,) items without a trained row
    parts: tuple[Recommender, Recommender] | None = None
    shared: dict[str, tuple[Any, float]] = field(default_factory=dict)  # name -> (fitted model, fit seconds)

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        m2rec, blend = fitted_parts(self.shared, dataset, split, self.seed)
        self.parts = (m2rec, blend)
        self.new = ~np.isin(np.arange(dataset.n_items), split.warm_items)
        task = hybrid(split, validation=True)
        self.weight, _, self.policy, trace = best_mix(
            lambda users: (self._z(m2rec, users, task.candidates, task.history),
                           self._z(blend, users, task.candidates, task.history)), task)
        self.params = {"m2rec_weight": self.weight, "policy": self.policy.to_dict(), "val_r20_plus_n20": trace,
                       "m2rec": m2rec.params, "blend": blend.params}

    def _z(self, model: Recommender, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix
           ) -> np.ndarray:
        return standardised(np.asarray(model.score(users, candidates, history), dtype=np.float64),
                            self.new[candidates])

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        if self.parts is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        a, b = (self._z(model, users, candidates, history) for model in self.parts)
        return self.weight * a + (1.0 - self.weight) * b


def fitted_parts(shared: dict[str, tuple[Any, float]], dataset: Dataset, split: ColdStartSplit, seed: int
                 ) -> tuple[M2RecRecommender, ALSRidge]:
    """The seed's m2rec and calibrated blend, fitted once (a blend fit is ~15 min on citeulike-t)."""
    makers: dict[str, Callable[[], Any]] = {
        "m2rec": lambda: M2RecRecommender.preset("m2rec", seed),
        "blend": lambda: ALSRidge(seed=seed, calibrate=True, name="blend")}
    for name, make in makers.items():
        if name not in shared:
            start, part = time.perf_counter(), make()
            part.fit(dataset, split)
            shared[name] = (part, time.perf_counter() - start)
    return shared["m2rec"][0], shared["blend"][0]


@dataclass
class JointRecommender:
    """The served combination (m2rec+als) behind the harness's Recommender protocol."""

    seed: int = 0
    name: str = "m2rec+als"
    policy: Policy | None = None
    params: dict[str, Any] = field(default_factory=dict)
    joint: Joint | None = None
    shared: dict[str, tuple[Any, float]] = field(default_factory=dict)
    per_population: bool = True  # new items get a weight of their own (training/collaborative_fit.py)

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        m2rec, blend = fitted_parts(self.shared, dataset, split, self.seed)
        assert m2rec.result is not None and m2rec._table is not None
        data = m2rec.result.data
        self.joint = fit_joint(dataset, split, m2rec.result.model, data, blend.als_model.item_factors, blend.params,
                               self.per_population)
        self.policy = self.joint.policy
        assert self.policy is not None
        self.params = {"m2rec_weight": float(self.joint.part.weight),
                       "m2rec_new_weight": float(self.joint.part.new_weight), "policy": self.policy.to_dict(),
                       "val_r20_plus_n20": self.joint.trace,
                       "m2rec": m2rec.params, "blend": blend.params}

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        if self.joint is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return self.joint.score(users, candidates, history)
