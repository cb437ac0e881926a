"""Honest baselines for the harness: random, content k-NN and ridge-mf.

Each chooses its own hyper-parameters on the validation items only (training/protocol.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from training.dataset import Dataset
from training.protocol import Task, cold_only, evaluate
from training.split import ColdStartSplit


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(norms, 1e-12))


@dataclass(frozen=True)
class Content:
    """Unit-norm item content rows, kept as a dense feature block beside a sparse attribute block.

    Row j = [f_j, w·a_j] / ‖[f_j, w·a_j]‖ with f the L2-normalised dense features and a the
    L2-normalised attribute multi-hot; `w` (attribute_weight) sets the blocks' balance. Keeping the
    blocks apart lets the dense part use BLAS while the sparse part stays sparse.
    """

    dense: np.ndarray  # (I, F) float32, F may be 0
    sparse: sp.csr_matrix  # (I, A)

    def rows(self, index: np.ndarray) -> Content:
        return Content(self.dense[index], self.sparse[index])

    def as_csr(self) -> sp.csr_matrix:
        return sp.csr_matrix(sp.hstack([sp.csr_matrix(self.dense), self.sparse]))


def content_blocks(dataset: Dataset, attribute_weight: float) -> Content:
    n = dataset.n_items
    dense = (_l2_rows(dataset.features.astype(np.float64)) if dataset.features is not None
             else np.zeros((n, 0)))
    attrs = dataset.attribute_matrix().astype(np.float64)
    a_norm = np.sqrt(np.asarray(attrs.multiply(attrs).sum(axis=1))).ravel()
    weight = attribute_weight if dataset.features is not None else 1.0
    attrs = sp.diags(weight / np.maximum(a_norm, 1e-12)) @ attrs
    total = np.sqrt((dense**2).sum(axis=1) + np.asarray(attrs.multiply(attrs).sum(axis=1)).ravel())
    scale = 1.0 / np.maximum(total, 1e-12)
    return Content((dense * scale[:, None]).astype(np.float32),
                   sp.csr_matrix(sp.diags(scale) @ attrs, dtype=np.float32))


class RandomRecommender:
    """Uniform random scores: the floor every model must clear."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.params: dict[str, Any] = {}

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        self.rng = np.random.default_rng(self.seed)

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return self.rng.random((users.size, candidates.size))


class ContentKNN:
    """User profile = mean of the normalised content of their history; cosine to candidates."""

    name = "content-knn"

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        self.train = split.train
        weights = [0.0, 0.5, 1.0, 2.0, 4.0] if dataset.features is not None else [1.0]
        task = cold_only(split, validation=True)
        best = -1.0
        for w in weights:
            self.content = content_blocks(dataset, w)
            value = evaluate(self, task)["recall@20"]
            if value > best:
                best, self.params = value, {"attribute_weight": w, "val_recall@20": value}
        self.content = content_blocks(dataset, self.params["attribute_weight"])

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        history = self.train[users]  # (B, I) binary
        counts = np.maximum(np.asarray(history.sum(axis=1)).ravel(), 1.0)
        mean = sp.diags(1.0 / counts) @ history
        p_dense = np.asarray(mean @ self.content.dense)  # (B, F) mean content, dense block
        p_sparse = np.asarray((mean @ self.content.sparse).todense())  # (B, A) sparse block
        norm = np.sqrt((p_dense**2).sum(axis=1) + (p_sparse**2).sum(axis=1))[:, None]
        cand = self.content.rows(candidates)
        cosine = p_dense @ cand.dense.T + np.asarray((cand.sparse @ p_sparse.T).T)  # (B, C)
        return np.asarray(cosine / np.maximum(norm, 1e-12))


def implicit_als(train: sp.csr_matrix, factors: int, reg: float, alpha: float, iterations: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hu, Koren & Volinsky (2008) implicit ALS: confidence 1 + alpha on observed pairs.

    Solves exactly for each user/item: x_u = (YᵀY + alpha·Y_uᵀY_u + reg·I)⁻¹ (1 + alpha)·Y_uᵀ1.
    """
    rng = np.random.default_rng(seed)
    n_users, n_items = train.shape
    X = rng.normal(0, 0.01, (n_users, factors))
    Y = rng.normal(0, 0.01, (n_items, factors))
    R, Rt = train.tocsr(), train.T.tocsr()
    eye = reg * np.eye(factors)

    def solve(target: np.ndarray, other: np.ndarray, m: sp.csr_matrix) -> None:
        gram = other.T @ other + eye
        for u in range(m.shape[0]):
            idx = m.indices[m.indptr[u] : m.indptr[u + 1]]
            if idx.size == 0:
                target[u] = 0.0
                continue
            Yu = other[idx]  # (n_u, d)
            target[u] = np.linalg.solve(gram + alpha * Yu.T @ Yu, (1.0 + alpha) * Yu.sum(axis=0))

    for _ in range(iterations):
        solve(X, Y, R)
        solve(Y, X, Rt)
    return X, Y


@dataclass
class RidgeMF:
    """Implicit ALS on the warm interactions plus a ridge map from item content to item factors.

    Warm items keep their ALS factors; every other item gets content @ W (DropoutNet/CB2CF floor).
    """

    seed: int = 0
    name: str = "ridge-mf"
    params: dict[str, Any] = field(default_factory=dict)
    als_grid: tuple[dict[str, float], ...] = (
        {"factors": 64, "reg": 10.0, "alpha": 10.0},
        {"factors": 64, "reg": 10.0, "alpha": 40.0},
    )
    ridge_grid: tuple[float, ...] = (1.0, 10.0, 100.0)
    attribute_weights: tuple[float, ...] = (0.5, 1.0)
    iterations: int = 10

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        task: Task = cold_only(split, validation=True)
        weights = self.attribute_weights if dataset.features is not None else (1.0,)
        ones = sp.csr_matrix(np.ones((dataset.n_items, 1)))  # intercept column
        contents: dict[float, sp.csr_matrix] = {
            w: sp.csr_matrix(sp.hstack([content_blocks(dataset, w).as_csr(), ones])) for w in weights}
        best = -1.0
        grid = list(itertools.product(self.als_grid, weights, self.ridge_grid))
        factors_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for als, w, gamma in tqdm(grid, desc="ridge-mf grid", leave=False):
            key = id(als)
            if key not in factors_cache:
                factors_cache[key] = implicit_als(split.train, int(als["factors"]), als["reg"],
                                                  als["alpha"], self.iterations, self.seed)
            users, items = factors_cache[key]
            self._set(users, items, contents[w], split.warm_items, gamma)
            value = evaluate(self, task)["recall@20"]
            if value > best:
                best = value
                self.params = {**als, "attribute_weight": w, "ridge": gamma, "val_recall@20": value}
        chosen = next(a for a in self.als_grid if all(self.params[k] == v for k, v in a.items()))
        users, items = factors_cache[id(chosen)]
        self._set(users, items, contents[self.params["attribute_weight"]], split.warm_items,
                  self.params["ridge"])

    def _set(self, users: np.ndarray, items: np.ndarray, content: sp.csr_matrix, warm: np.ndarray,
             gamma: float) -> None:
        Xw = content[warm]
        gram = (Xw.T @ Xw).toarray() + gamma * np.eye(content.shape[1])
        W = np.linalg.solve(gram, np.asarray(Xw.T @ items[warm]))  # (F+A+1, d)
        self.item_factors = np.asarray(content @ W)  # (I, d) content-generated rows
        self.item_factors[warm] = items[warm]
        self.user_factors = users

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.asarray(self.user_factors[users] @ self.item_factors[candidates].T)  # (B, C)


def timed_fit(model: Any, dataset: Dataset, split: ColdStartSplit) -> float:
    start = time.perf_counter()
    model.fit(dataset, split)
    return time.perf_counter() - start
