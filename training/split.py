"""Seeded item cold-start split with warm holdouts: the hybrid protocol's data (DESIGN.md).

Items with at least one interaction are divided three ways:

    test cold   `cold_fraction` of them (or exactly the ids in cold_items.txt)
    validation  `val_fraction` of the rest: held out like cold items (pseudo-cold), for model
                selection and calibration only
    warm        everything else

Each user's interactions with warm items are divided three ways too (seeded, per user):

    test warm holdout   `warm_holdout` of them (at least 1 for users with >= 5)
    validation holdout  `val_warm_holdout` of the rest (at least 1 for users with >= 5 left)
    fit                 everything else: the only interactions any model trains on

Validation mirrors test (the same 20% rules applied inside the training data), so that what is chosen
there transfers: a new item's chance of being relevant at a given score, a trained item's chance
(which grows with the share of a history held out), and the share of new items in the truth are all
about the same in both.

Test and validation items are never seen in training (no interactions, and the generator is not
fitted on them). Items nobody interacted with belong to no set and are never candidates.

What a model may use when it is asked about a user: at validation, the `fit` history; at test, the
user's whole training history (`fit` plus the validation holdout), as the service folds a user in
from everything they did. The validation items play no part in the test tasks.

`validation_users` > 0 makes validation an exact mirror of test, at the cost of test users: that share
of the users (seeded) are validation users, whose warm interactions are split fit / validation holdout
in the test's proportions and who take no part in the test tasks; every other user's are split fit /
test holdout, and only they are tested. Without it, a user's validation ranking holds the items of
their test holdout as unlabelled negatives and a smaller warm truth (20% of 80%) than their test
ranking, so trained items look less worth a slot at validation than at test, and a mixing policy
chosen there over-exposes new items (benchmarks/results/validation-mirror.md). The harness
(training/evaluate.py) validates this way by default: HARNESS_VALIDATION_USERS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from training.dataset import Dataset, DatasetError

log = logging.getLogger(__name__)
MIN_HOLDOUT_USER = 5  # users with at least this many warm interactions give at least one to a holdout


# The harness's share of validation users: a fifth of the users validate (an exact mirror of test)
# and are not tested.
# cold_start_split's own default (0.0) keeps the older, every-user validation reproducible.
HARNESS_VALIDATION_USERS = 0.2


@dataclass(frozen=True)
class ColdStartSplit:
    seed: int
    n_users: int
    n_items: int
    warm_items: np.ndarray  # (Iw,) sorted item indices the models train on
    val_items: np.ndarray  # (Iv,) sorted pseudo-cold validation items
    cold_items: np.ndarray  # (Ic,) sorted test-cold items
    train: sp.csr_matrix  # (U, I) binary: the fit interactions, non-zero only in warm columns
    history: sp.csr_matrix  # (U, I) train + the validation warm holdout: a user's history at test
    val_warm_truth: sp.csr_matrix  # (U, I) validation warm holdout
    test_warm_truth: sp.csr_matrix  # (U, I) test warm holdout
    val_truth: sp.csr_matrix  # (U, I) interactions with validation items
    test_truth: sp.csr_matrix  # (U, I) interactions with test-cold items

    @property
    def val_users(self) -> np.ndarray:
        """Users with at least one validation-item interaction (cold-only validation)."""
        return _users_of(self.val_truth)

    @property
    def test_users(self) -> np.ndarray:
        """Users with at least one test-cold interaction (cold-only test)."""
        return _users_of(self.test_truth)

    def summary(self) -> dict[str, int]:
        hybrid_val = _users_of(self.val_warm_truth + self.val_truth)
        hybrid_test = _users_of(self.test_warm_truth + self.test_truth)
        return {
            "warm_items": int(self.warm_items.size),
            "val_items": int(self.val_items.size),
            "cold_items": int(self.cold_items.size),
            "fit_interactions": int(self.train.nnz),
            "val_warm_holdout": int(self.val_warm_truth.nnz),
            "test_warm_holdout": int(self.test_warm_truth.nnz),
            "val_item_interactions": int(self.val_truth.nnz),
            "test_cold_interactions": int(self.test_truth.nnz),
            "cold_only_test_users": int(self.test_users.size),
            "hybrid_val_users": int(hybrid_val.size),
            "hybrid_test_users": int(hybrid_test.size),
            # 0 with validation users; about every user when each validates on their own history
            "hybrid_users_in_both": int(np.intersect1d(hybrid_val, hybrid_test).size),
        }


def _users_of(matrix: sp.csr_matrix) -> np.ndarray:
    return np.flatnonzero(matrix.getnnz(axis=1) > 0)


def _columns(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """`matrix` with every column outside `keep` zeroed, shape unchanged."""
    mask = np.zeros(matrix.shape[1], dtype=np.float32)
    mask[keep] = 1.0
    out = sp.csr_matrix(matrix @ sp.diags(mask))
    out.eliminate_zeros()
    return out


def holdout_count(n: int, fraction: float) -> int:
    """How many of a user's n interactions a holdout of `fraction` takes."""
    if n < MIN_HOLDOUT_USER:
        return int(np.floor(fraction * n))
    return max(1, round(fraction * n))


def hold_out(matrix: sp.csr_matrix, fraction: float, rng: np.random.Generator
             ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(kept, held out): per user (row), a seeded `fraction` of their entries held out."""
    matrix = sp.csr_matrix(matrix)
    matrix.sort_indices()
    held = np.zeros(matrix.nnz, dtype=bool)
    for u in range(matrix.shape[0]):
        start, end = matrix.indptr[u], matrix.indptr[u + 1]
        n = holdout_count(end - start, fraction)
        if n > 0:
            held[start + rng.choice(end - start, size=n, replace=False)] = True
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    shape = matrix.shape

    def part(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((matrix.data[mask], (rows[mask], matrix.indices[mask])), shape=shape)

    return part(~held), part(held)


def cold_start_split(
    dataset: Dataset, seed: int, cold_fraction: float = 0.2, val_fraction: float = 0.2,
    warm_holdout: float = 0.2, val_warm_holdout: float = 0.2, validation_users: float = 0.0,
) -> ColdStartSplit:
    for name, value in (("cold_fraction", cold_fraction), ("warm_holdout", warm_holdout)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    for name, value in (("val_fraction", val_fraction), ("val_warm_holdout", val_warm_holdout),
                        ("validation_users", validation_users)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    rng = np.random.default_rng(seed)
    matrix = dataset.interaction_matrix()
    matrix.data[:] = 1.0
    active = np.flatnonzero(np.asarray(matrix.getnnz(axis=0)) > 0)

    if dataset.cold_items is not None:
        named = np.array(sorted({dataset.item_index(c) for c in dataset.cold_items}), dtype=np.int64)
        cold = np.intersect1d(named, active)
        if cold.size < named.size:
            log.warning("%s: %d of the %d items in cold_items.txt have no interaction and are left out of the "
                        "cold set", dataset.name, named.size - cold.size, named.size)
        if cold.size == 0:
            raise DatasetError(f"{dataset.name}: none of the {named.size} items in cold_items.txt has an "
                               f"interaction, so the cold set would be empty; name items that users touched")
    else:
        cold = np.sort(rng.choice(active, size=round(cold_fraction * active.size), replace=False))
    rest = np.setdiff1d(active, cold)
    val = np.sort(rng.choice(rest, size=round(val_fraction * rest.size), replace=False))
    warm = np.setdiff1d(rest, val)

    if validation_users > 0.0:
        train, parts = _by_users(matrix, warm, val, cold, warm_holdout, validation_users, rng)
    else:
        history, test_warm = hold_out(_columns(matrix, warm), warm_holdout, rng)
        train, val_warm = hold_out(history, val_warm_holdout, rng)
        parts = (history, val_warm, test_warm, _columns(matrix, val), _columns(matrix, cold))
    history, val_warm, test_warm, val_truth, test_truth = parts
    return ColdStartSplit(
        seed=seed,
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        warm_items=warm,
        val_items=val,
        cold_items=cold,
        train=train,
        history=history,
        val_warm_truth=val_warm,
        test_warm_truth=test_warm,
        val_truth=val_truth,
        test_truth=test_truth,
    )


def _by_users(matrix: sp.csr_matrix, warm: np.ndarray, val: np.ndarray, cold: np.ndarray, holdout: float,
              validation_users: float, rng: np.random.Generator
              ) -> tuple[sp.csr_matrix, tuple[sp.csr_matrix, ...]]:
    """The split with validation users (`cold_start_split(validation_users=...)`): one holdout of
    `holdout` per user, the validation truth for validation users, the test truth for the others.
    Returns train and (history, validation holdout, test holdout, validation truth, test truth)."""
    picked = np.zeros(matrix.shape[0], dtype=bool)
    picked[rng.choice(matrix.shape[0], size=round(validation_users * matrix.shape[0]), replace=False)] = True
    train, held = hold_out(_columns(matrix, warm), holdout, rng)

    def of(users: np.ndarray, m: sp.csr_matrix) -> sp.csr_matrix:
        out = sp.csr_matrix(sp.diags(users.astype(np.float32)) @ m)
        out.eliminate_zeros()
        return out

    val_warm = of(picked, held)
    # a test user's history is their fit interactions
    return train, (sp.csr_matrix(train + val_warm), val_warm, of(~picked, held),
                   of(picked, _columns(matrix, val)), of(~picked, _columns(matrix, cold)))


def _empty(n_users: int, n_items: int) -> sp.csr_matrix:
    none = np.zeros(0, np.int64)
    return sp.csr_matrix((np.zeros(0, np.float32), (none, none)), shape=(n_users, n_items))


def validation_split(dataset: Dataset, seed: int, val_fraction: float = 0.2, val_warm_holdout: float = 0.2
                     ) -> ColdStartSplit:
    """The validation carve-out of a production run: pseudo-cold items and a per-user warm holdout,
    by the same rules as the harness's validation, and no test items (nothing is measured here)."""
    rng = np.random.default_rng(seed)
    matrix = dataset.interaction_matrix()
    matrix.data[:] = 1.0
    active = np.flatnonzero(np.asarray(matrix.getnnz(axis=0)) > 0)
    val = np.sort(rng.choice(active, size=round(val_fraction * active.size), replace=False))
    warm = np.setdiff1d(active, val)
    history = _columns(matrix, warm)
    train, val_warm = hold_out(history, val_warm_holdout, rng)
    empty = _empty(*matrix.shape)
    return ColdStartSplit(seed=seed, n_users=dataset.n_users, n_items=dataset.n_items, warm_items=warm,
                          val_items=val, cold_items=np.empty(0, np.int64), train=train, history=history,
                          val_warm_truth=val_warm, test_warm_truth=empty, val_truth=_columns(matrix, val),
                          test_truth=empty)


def production_split(dataset: Dataset, seed: int, unseen: sp.csr_matrix, holdout: float = 0.5) -> ColdStartSplit:
    """Every item with interactions is warm (gets a trained row); a seeded per-user `holdout` of
    `unseen` is held out, only to stop training. `unseen` must be interactions the run this one starts
    from never trained on (its validation warm holdout): a slice of what it fitted would score best
    before the refit and fall as the refit goes on, so stopping would always take the first epoch."""
    matrix = dataset.interaction_matrix()
    matrix.data[:] = 1.0
    if unseen.shape != matrix.shape:
        raise ValueError(f"unseen has shape {unseen.shape}, the dataset's interactions {matrix.shape}")
    active = np.flatnonzero(np.asarray(matrix.getnnz(axis=0)) > 0)
    _, held = hold_out(unseen, holdout, np.random.default_rng(seed))
    held.data[:] = 1.0
    train = sp.csr_matrix(matrix - matrix.multiply(held))
    train.eliminate_zeros()
    empty = _empty(*matrix.shape)
    none = np.empty(0, np.int64)
    return ColdStartSplit(seed=seed, n_users=dataset.n_users, n_items=dataset.n_items, warm_items=active,
                          val_items=none, cold_items=none, train=train, history=sp.csr_matrix(matrix),
                          val_warm_truth=held, test_warm_truth=empty, val_truth=empty, test_truth=empty)
