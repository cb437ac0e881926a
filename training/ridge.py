"""The ridge map from items' content and attributes onto collaborative factors (CB2CF, DropoutNet's
floor): new items get factors from what they are, fitted on the warm items' factors.

`Content` keeps the unit-norm content rows as a dense block beside a sparse attribute block;
`ridge_map` is the direct solve production uses for the chosen setting; `RidgeMaps` gives the
search's many maps from one eigendecomposition of XᵀX, formed block by block (`gram`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from training.dataset import Dataset


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


def content_blocks(dataset: Dataset, attribute_weight: float, vocabulary: list[str] | None = None) -> Content:
    """`vocabulary`: the attribute tokens to read (default: every token of the dataset)."""
    n = dataset.n_items
    dense = (_l2_rows(dataset.features.astype(np.float64)) if dataset.features is not None
             else np.zeros((n, 0)))
    attrs = dataset.attribute_matrix(vocabulary).astype(np.float64)
    a_norm = np.sqrt(np.asarray(attrs.multiply(attrs).sum(axis=1))).ravel()
    weight = attribute_weight if dataset.features is not None else 1.0
    attrs = sp.diags(weight / np.maximum(a_norm, 1e-12)) @ attrs
    total = np.sqrt((dense**2).sum(axis=1) + np.asarray(attrs.multiply(attrs).sum(axis=1)).ravel())
    scale = 1.0 / np.maximum(total, 1e-12)
    return Content((dense * scale[:, None]).astype(np.float32),
                   sp.csr_matrix(sp.diags(scale) @ attrs, dtype=np.float32))


def ridge_map(factors: np.ndarray, content: sp.csr_matrix, warm: np.ndarray, gamma: float) -> np.ndarray:
    """W (F+A+1, d): the ridge map from the warm items' content rows onto their factors,
    W = (XᵀX + γI)⁻¹ Xᵀ factors[warm]."""
    Xw = content[warm]
    gram = (Xw.T @ Xw).toarray()  # (F+A+1, F+A+1)
    gram.flat[:: gram.shape[0] + 1] += gamma
    return np.asarray(np.linalg.solve(gram, np.asarray(Xw.T @ factors[warm])))


class RidgeMaps:
    """`ridge_map` for many factors and γ over the same content rows: the search tries 7 γ for each of
    3 ALS settings. XᵀX = Q diag(λ) Qᵀ is decomposed once, so every map is
    W = Q diag(1/(λ + γ)) Qᵀ Xᵀ factors[warm], a product instead of a solve of (F+A+1)² (thousands of
    tokens square on citeulike-t); Qᵀ Xᵀ factors[warm] is formed once per factors, and only the items
    the map serves are mapped."""

    def __init__(self, content: Content, warm: np.ndarray) -> None:
        self.warm = warm
        X = with_intercept(content)  # (I, F+A+1)
        self.Xw = X[warm]
        self.eigenvalues, self.eigenvectors = scipy.linalg.eigh(gram(content.rows(warm)), overwrite_a=True,
                                                                check_finite=False, driver="evd")
        self.others = np.setdiff1d(np.arange(X.shape[0]), warm)  # sorted
        self.X_others = X[self.others]
        self._target: tuple[np.ndarray, np.ndarray] | None = None  # (factors, Qᵀ Xᵀ factors[warm])

    def map(self, factors: np.ndarray, gamma: float) -> np.ndarray:
        if self._target is None or self._target[0] is not factors:
            self._target = factors, self.eigenvectors.T @ np.asarray(self.Xw.T @ factors[self.warm])
        return np.asarray(self.eigenvectors @ (self._target[1] / (self.eigenvalues + gamma)[:, None]))

    def rows(self, factors: np.ndarray, gamma: float, items: np.ndarray | None = None) -> np.ndarray:
        """(I, d): warm items keep their factors; every other item gets content @ W. With `items` (none
        of them warm) only those are mapped and every other row is NaN: for a search that scores them alone."""
        if items is not None:
            if not np.isin(items, self.others).all():
                raise ValueError("warm items keep their factors: they are not mapped")
            rows = np.full_like(factors, np.nan)
            rows[items] = np.asarray(self.X_others[np.searchsorted(self.others, items)] @ self.map(factors, gamma))
            return rows
        rows = np.empty_like(factors)
        rows[self.warm] = factors[self.warm]
        rows[self.others] = np.asarray(self.X_others @ self.map(factors, gamma))
        return rows


def gram(content: Content) -> np.ndarray:
    """XᵀX (F+A+1, F+A+1) of `with_intercept(content)`'s rows, its blocks apart: the dense block (with the
    intercept) by BLAS, the sparse one sparse (as one sparse matrix, the dense block would go through
    scipy's single-threaded product)."""
    dense = np.hstack([content.dense.astype(np.float64), np.ones((content.dense.shape[0], 1))])  # (n, F+1)
    sparse = content.sparse.astype(np.float64)  # (n, A)
    F, A = content.dense.shape[1], sparse.shape[1]
    d = np.r_[0:F, F + A]  # the dense block's columns of X: the content, then the intercept, last
    out = np.empty((F + A + 1, F + A + 1))
    out[np.ix_(d, d)] = dense.T @ dense
    out[F : F + A, d] = side = np.asarray(sparse.T @ dense)  # (A, F+1)
    out[d, F : F + A] = side.T
    out[F : F + A, F : F + A] = (sparse.T @ sparse).toarray()
    return out


def with_intercept(content: Content) -> sp.csr_matrix:
    """[content, 1] (I, F+A+1): the ridge map's input rows."""
    return sp.csr_matrix(sp.hstack([content.as_csr(), sp.csr_matrix(np.ones((content.dense.shape[0], 1)))]))
