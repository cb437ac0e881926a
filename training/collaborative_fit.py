"""Fitting the served model's collaborative part (service/model/collaborative.py) beside a trained m2rec.

`build` fills the part from an ALS model fitted on the training interactions and the ridge settings
the calibrated blend chose on validation (training/baselines.py, training/ridge.py): the trained items' factors, the
ridge map from content and attributes (only the trained vocabulary's tokens: the inputs a service
has), YᵀY + λI, and the two parts' row covariances over the trained items. `Joint` scores with it
in the harness exactly as the service's index does; `choose_weight` sets w and the mixing policy
on the hybrid validation task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from service.model import M2Rec
from service.model.collaborative import Collaborative
from service.model.mixing import NEW, TRAINED, Policy
from training.baselines import ALSRidge
from training.dataset import Dataset
from training.item_rows import ItemTable, all_item_rows
from training.mixing import Tops, choose_policy, new_figures
from training.protocol import Task, evaluate_tops, hybrid, tops_many
from training.ridge import content_blocks, ridge_map, with_intercept
from training.split import ColdStartSplit
from training.train_data import TrainingData

WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # m2rec's share of the mix
Trace = list[tuple[float, float, float]]  # (w, w_new, validation Recall@20 + NDCG@20) per pair tried


def build(dataset: Dataset, data: TrainingData, m2rec_rows: np.ndarray, als_factors: np.ndarray,
          params: dict[str, Any]) -> Collaborative:
    """The part for the trained items `data.warm`: m2rec_rows (I, D+1) every item's m2rec row,
    als_factors (I, f) ALS's item factors (0 for items without interactions), params the blend's
    regularization, alpha, ridge and attribute_weight. Its weights are left at 0.5."""
    warm = data.warm
    factors = np.asarray(als_factors, dtype=np.float64)
    f = factors.shape[1]
    n_attributes, content_dim = len(data.vocabulary), data.content_dim
    part = Collaborative(warm.size, n_attributes, content_dim, m2rec_rows.shape[1] - 1, f)
    weight = float(params["attribute_weight"]) if dataset.features is not None else 1.0
    content = with_intercept(content_blocks(dataset, weight, data.vocabulary.tokens))  # (I, F'+A+1)
    W = ridge_map(factors, content, warm, float(params["ridge"]))  # (F'+A+1, f)
    F = 0 if dataset.features is None else dataset.features.shape[1]
    # the eigenbasis of YᵀY + λI: there the user step's matrix is diagonal (service/model/collaborative.py)
    lam, Q = np.linalg.eigh(factors[warm].T @ factors[warm] + float(params["regularization"]) * np.eye(f))
    y, W = factors[warm] @ Q, W @ Q  # (J, f), (F'+A+1, f)
    values = {
        "item_factors": y,
        "ridge_content": W[:F] if F else np.zeros((1, f)),
        "ridge_attributes": np.vstack([np.zeros((1, f)), W[F : F + n_attributes]]),
        "ridge_intercept": W[-1],
        "gram": lam,
        "cov_m2rec": np.cov(m2rec_rows[warm].astype(np.float64), rowvar=False, bias=True),
        "cov_factors": np.cov(y, rowvar=False, bias=True),
        "alpha": np.asarray(float(params["alpha"])),
        "weight": np.asarray(0.5),
        "new_weight": np.asarray(0.5),
        "attribute_weight": np.asarray(weight),
    }
    with torch.no_grad():
        for name, value in values.items():
            getattr(part, name).copy_(torch.from_numpy(np.asarray(value, dtype=np.float64)))
    part.refresh()
    return part


def item_factors(part: Collaborative, data: TrainingData) -> np.ndarray:
    """y (I, f) of every dataset item: trained items' factors, the ridge map's for the others."""
    n = data.attributes.shape[0]
    content = None if data.content is None else data.content.numpy()
    rows = part.rows(content, np.full(n, content is not None), data.attributes)
    rows[data.warm] = part.item_factors.numpy()
    return rows


def _stacked(history: sp.csr_matrix, users: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list[int]]:
    H = sp.csr_matrix(history[users])
    return rows[H.indices], np.diff(H.indptr).tolist()


@dataclass
class Joint:
    """m2rec with the collaborative part, scored as the service's index scores: rows [v; b; y],
    queries from `Collaborative.queries`."""

    table: ItemTable
    part: Collaborative
    y: np.ndarray  # (I, f) every item's collaborative row
    new: np.ndarray  # (I,) bool: the item has no trained row (scored with the new items' weight)
    name: str = "m2rec+als"
    policy: Policy | None = None
    trace: Trace = field(default_factory=list)  # validation R@20 + N@20 by (w, w_new)

    def fit(self, dataset: Dataset, split: Any) -> None:  # protocol; built already
        pass

    def parts(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix
              ) -> tuple[np.ndarray, np.ndarray]:
        """(B, C) scores of each half of the query before w: m2rec's over σ_m, ALS's over σ_y."""
        h = self.table.user_vectors(users, history)  # (B, D)
        stacked, lengths = _stacked(history, users, self.y)
        m, y = self.part.parts(h, self.part.user_factors(stacked, lengths))
        return m @ self.table.items[candidates].astype(np.float64).T, y @ self.y[candidates].T

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        m, y = self.parts(users, candidates, history)
        w = np.where(self.new[candidates], float(self.part.new_weight), float(self.part.weight))  # (C,)
        return np.asarray(w * m + (1.0 - w) * y)


def fit_joint(dataset: Dataset, split: ColdStartSplit, model: M2Rec, data: TrainingData, als_factors: np.ndarray,
              params: dict[str, Any], per_population: bool = True) -> Joint:
    """m2rec (`model`, trained on `data` of `split`) with a part built from ALS factors fitted on the
    same split and the blend's settings `params`; w, w_new (`per_population`; else w_new = w) and the
    policy chosen on the hybrid validation task."""
    part = build(dataset, data, all_item_rows(model, data).numpy(), als_factors, params)
    joint = Joint(ItemTable(model, data), part, item_factors(part, data),
                  ~np.isin(np.arange(data.attributes.shape[0]), data.warm))
    choose_weight(joint, hybrid(split, validation=True), per_population)
    return joint


def fit_with_blend(dataset: Dataset, split: ColdStartSplit, model: M2Rec, data: TrainingData, seed: int
                   ) -> tuple[Joint, ALSRidge]:
    """The calibrated blend's search on `split` (training/baselines.py) chooses ALS's and the ridge
    map's settings; the joint model is then fitted with them (`fit_joint`). (joint, the fitted blend)"""
    blend = ALSRidge(seed=seed, calibrate=True, name="blend")
    blend.fit(dataset, split)
    return fit_joint(dataset, split, model, data, blend.als_model.item_factors, blend.params), blend


def best_mix(parts: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], task: Task, per_population: bool = False
             ) -> tuple[float, float, Policy, Trace]:
    """The weight w of w·a + (1 - w)·b (`parts(users)`: (B, C) scores a and b of a batch of `task`'s users,
    a validation task) whose mix, under its own best policy, has the best Recall@20 + NDCG@20;
    (w, w_new, policy, the search's trace). Scored a batch of users at a time, never as (users × items)
    matrices for every weight (benchmarks/results/production-training.md).

    `per_population`: new items may get a weight of their own. The candidate for it is w_new*, the
    weight that ranks the new items alone best (the cold-only validation task, read off the new half
    of each weight's tops); the pairs (w, w_new*) compete with the shared pairs (w, w), each under its
    own best policy, and a shared pair wins ties. Both halves of a pair come from the same scorings: a
    population's top-k does not depend on the other population's scores. Without it w_new = w."""
    def mixes(users: np.ndarray) -> Iterator[np.ndarray]:
        a, b = parts(users)
        mix, other = np.empty_like(a), np.empty_like(a)  # two (B, C) buffers for every weight, not 3 × 11
        for w in WEIGHTS:
            np.multiply(w, a, out=mix)  # w·a + (1 - w)·b, the same floating-point steps
            np.multiply(1.0 - w, b, out=other)
            yield np.add(mix, other, out=mix)

    every = tops_many(mixes, len(WEIGHTS), task, "mix")
    pairs = [(float(w), float(w)) for w in WEIGHTS]
    if per_population and task.mixed:
        star = int(np.argmax([sum(new_figures(t)) for t in every]))  # the first of equals: the smaller weight
        apart = [j for j in range(len(WEIGHTS)) if j != star]  # (w_new*, w_new*) is a shared pair already
        pairs += [(float(WEIGHTS[j]), float(WEIGHTS[star])) for j in apart]
        every += [Tops(every[j].users, np.stack([every[j].scores[:, TRAINED], every[star].scores[:, NEW]], axis=1),
                       np.stack([every[j].truth[:, TRAINED], every[star].truth[:, NEW]], axis=1), every[j].n_truth)
                  for j in apart]
    # Each pair's policy search is independent, and numpy releases the GIL in its sorts: two threads
    # share the searches.
    with ThreadPoolExecutor(2) as pool:
        policies = list(pool.map(lambda t: choose_policy(t)[0], every))
    trace: Trace = []
    best: tuple[float, tuple[float, float], Policy] | None = None
    for pair, t, policy in zip(pairs, every, policies, strict=True):
        metrics = evaluate_tops(t, policy, task.mixed).metrics
        value = metrics.get("recall@20", 0.0) + metrics.get("ndcg@20", 0.0)
        trace.append((*pair, round(value, 4)))
        if best is None or value > best[0]:
            best = (value, pair, policy)
    assert best is not None
    _, (weight, new_weight), policy = best
    return weight, new_weight, policy, trace


def choose_weight(joint: Joint, task: Task, per_population: bool = True
                  ) -> tuple[float, float, Policy, Trace]:
    """Set the part's weights w and w_new and the joint's policy by `best_mix` on `task` (a validation task)."""
    weight, new_weight, policy, trace = best_mix(lambda users: joint.parts(users, task.candidates, task.history),
                                                 task, per_population)
    with torch.no_grad():
        joint.part.weight.fill_(weight)
        joint.part.new_weight.fill_(new_weight)
    joint.part.refresh()
    joint.policy, joint.trace = policy, trace
    return weight, new_weight, policy, trace
