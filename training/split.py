"""Seeded item cold-start split.

Items with at least one interaction are divided three ways:

    test cold   `cold_fraction` of them (or exactly the ids in cold_items.txt)
    validation  `val_fraction` of the rest: held out like cold items, used only for model selection
    warm        everything else: the only interactions any model trains on

Test and validation items are never seen in training (no interactions, and the generator is
not fitted on them). Items nobody interacted with belong to no set and are never candidates.
Test users are the users with at least one test-cold interaction; validation users likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from training.dataset import Dataset


@dataclass(frozen=True)
class ColdStartSplit:
    seed: int
    n_users: int
    n_items: int
    warm_items: np.ndarray  # (Iw,) sorted item indices the models train on
    val_items: np.ndarray  # (Iv,) sorted
    cold_items: np.ndarray  # (Ic,) sorted test-cold items
    train: sp.csr_matrix  # (U, I) binary; non-zero only in warm columns
    val_truth: sp.csr_matrix  # (U, I) interactions with validation items
    test_truth: sp.csr_matrix  # (U, I) interactions with test-cold items
    val_users: np.ndarray  # users with >= 1 validation interaction
    test_users: np.ndarray  # users with >= 1 test-cold interaction

    def summary(self) -> dict[str, int]:
        return {
            "warm_items": int(self.warm_items.size),
            "val_items": int(self.val_items.size),
            "cold_items": int(self.cold_items.size),
            "train_interactions": int(self.train.nnz),
            "val_interactions": int(self.val_truth.nnz),
            "test_interactions": int(self.test_truth.nnz),
            "val_users": int(self.val_users.size),
            "test_users": int(self.test_users.size),
        }


def _columns(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """`matrix` with every column outside `keep` zeroed, shape unchanged."""
    mask = np.zeros(matrix.shape[1], dtype=np.float32)
    mask[keep] = 1.0
    out = sp.csr_matrix(matrix @ sp.diags(mask))
    out.eliminate_zeros()
    return out


def cold_start_split(
    dataset: Dataset, seed: int, cold_fraction: float = 0.2, val_fraction: float = 0.1
) -> ColdStartSplit:
    if not 0.0 < cold_fraction < 1.0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError("cold_fraction must be in (0, 1) and val_fraction in [0, 1)")
    rng = np.random.default_rng(seed)
    matrix = dataset.interaction_matrix()
    matrix.data[:] = 1.0
    active = np.flatnonzero(np.asarray(matrix.getnnz(axis=0)) > 0)

    if dataset.cold_items is not None:
        cold = np.array(sorted({dataset.item_index(c) for c in dataset.cold_items}), dtype=np.int64)
        cold = np.intersect1d(cold, active)
    else:
        n_cold = round(cold_fraction * active.size)
        cold = np.sort(rng.choice(active, size=n_cold, replace=False))
    rest = np.setdiff1d(active, cold)
    n_val = round(val_fraction * rest.size)
    val = np.sort(rng.choice(rest, size=n_val, replace=False))
    warm = np.setdiff1d(rest, val)

    train = _columns(matrix, warm)
    val_truth = _columns(matrix, val)
    test_truth = _columns(matrix, cold)
    return ColdStartSplit(
        seed=seed,
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        warm_items=warm,
        val_items=val,
        cold_items=cold,
        train=train,
        val_truth=val_truth,
        test_truth=test_truth,
        val_users=np.flatnonzero(val_truth.getnnz(axis=1) > 0),
        test_users=np.flatnonzero(test_truth.getnnz(axis=1) > 0),
    )
