"""The served model's collaborative part: ALS beside m2rec, in one inner product an index answers.

m2rec alone trails a calibrated ALS + ridge blend on the hybrid protocol; the two combined lead it
(benchmarks/results/*-ensemble.md). This part carries what the combination needs:

    trained item j    y_j, its implicit-ALS factors (f)
    any other item    y = W·x, a ridge map from its content and attributes onto the trained items'
                      factors: x = [c/‖c‖, w_a·a/‖a‖] / ‖[c/‖c‖, w_a·a/‖a‖]‖ and an intercept, where
                      c is the content vector and a the multi-hot of its known attributes (CB2CF)
    a user            p, the exact ALS user step against the fixed factors (implicit's
                      `recalculate_user`): (YᵀY + λI + (α-1)·Σ y_l y_lᵀ) p = α·Σ y_l over the
                      history's rows, new items' mapped rows included

The factors live in the eigenbasis of YᵀY + λI (an orthogonal change of basis the trainer applies to
every y and the ridge map alike: inner products and spreads are unchanged), so that the user step is
a low-rank update of a diagonal matrix, cheap per request whatever f.

Item rows are [v; b; y] (D+1+f) and a user's query is [w·h/σ_m; w/σ_m; (1-w)·p/σ_y], where
σ_m = sqrt([h; 1]ᵀ C_m [h; 1]) and σ_y = sqrt(pᵀ C_y p) are the spreads of the user's two scores over
the trained items (C the covariance of their rows): each part's scores are put on a per-user scale
before they are mixed by w, chosen on validation with the mixing policy (training/ensemble.py,
form "served"). New items get a query of their own, w_new in place of w (`query_pair`): a generated
row and a mapped row are not as trustworthy as a trained row and a fitted factor, each in its own
way, and the index searches the two populations apart anyway, so each gets the mix that ranks it
best on validation (training/collaborative_fit.py). NumPy, float64 inside: the service calls it per
request, the trainer's harness for thousands of users, the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

Array = npt.NDArray[np.float64]


def _np(t: torch.Tensor) -> Array:
    return t.detach().numpy().astype(np.float64)


def _spread(queries: Array, cov: Array) -> Array:
    """(B, 1) the standard deviation of each query's scores over rows of covariance `cov`; 1 where it
    is 0 (a user a part knows nothing about scores every item alike)."""
    sd = np.sqrt(np.maximum(((queries @ cov) * queries).sum(axis=1), 0.0))
    return np.where(sd > 1e-12, sd, 1.0)[:, None]


def _solve(a: Array, b: Array) -> Array:
    """Batched solve (n, m, m) x = (n, m, 1). With α < 1 a history of new items (whose rows are not in
    YᵀY) can make a system singular: those users get the least-squares solution instead of an error."""
    try:
        return np.asarray(np.linalg.solve(a, b), dtype=np.float64)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(m, v, rcond=None)[0] for m, v in zip(a, b, strict=True)]).astype(np.float64)


class Collaborative(nn.Module):
    item_factors: torch.Tensor  # (J, f) trained items, in the item table's row order
    ridge_content: torch.Tensor  # (max(F, 1), f)
    ridge_attributes: torch.Tensor  # (A+1, f); row 0 (padding) stays 0
    ridge_intercept: torch.Tensor  # (f,)
    gram: torch.Tensor  # (f,) Λ: YᵀY + λI over the trained items' factors, diagonal in their (rotated) basis
    cov_m2rec: torch.Tensor  # (D+1, D+1) covariance of the trained rows [v; b]
    cov_factors: torch.Tensor  # (f, f) covariance of the trained items' factors
    alpha: torch.Tensor  # () an interaction's confidence (implicit's alpha)
    weight: torch.Tensor  # () w, m2rec's share of the mix for trained items
    new_weight: torch.Tensor  # () w_new, m2rec's share for new items (artifacts without it: w)
    attribute_weight: torch.Tensor  # () w_a, the attribute block's length beside the content block

    def __init__(self, n_warm: int, n_attributes: int, content_dim: int, item_dim: int, factors: int) -> None:
        super().__init__()
        self.factors, self.item_dim, self.has_content = factors, item_dim, content_dim > 0
        shapes = {"item_factors": (n_warm, factors), "ridge_content": (max(content_dim, 1), factors),
                  "ridge_attributes": (n_attributes + 1, factors), "ridge_intercept": (factors,),
                  "gram": (factors,), "cov_m2rec": (item_dim + 1, item_dim + 1),
                  "cov_factors": (factors, factors), "alpha": (), "weight": (), "new_weight": (),
                  "attribute_weight": ()}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))
        self.refresh()

    def refresh(self) -> None:
        """Cache the buffers as float64 arrays: call after loading or setting them."""
        self._ridge_content, self._ridge_attributes = _np(self.ridge_content), _np(self.ridge_attributes)
        self._intercept, self._gram = _np(self.ridge_intercept), _np(self.gram)
        self._cov_m, self._cov_y = _np(self.cov_m2rec), _np(self.cov_factors)
        self._alpha, self._weight, self._new_weight = float(self.alpha), float(self.weight), float(self.new_weight)
        self._attribute_weight = float(self.attribute_weight) if self.has_content else 1.0

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        # an artifact from before w_new scored new items with w: it still does
        if prefix + "new_weight" not in state_dict and prefix + "weight" in state_dict:
            state_dict[prefix + "new_weight"] = state_dict[prefix + "weight"]
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.refresh()

    def rows(self, content: npt.NDArray[np.float32] | None, has_content: npt.NDArray[np.bool_],
             attributes: npt.NDArray[np.int64], chunk: int = 1024) -> Array:
        """y (B, f) of items from their content (B, F) (rows without content: any values) and their
        known attributes (B, A') as vocabulary index + 1, 0-padded, each token at most once."""
        out = np.empty((attributes.shape[0], self.factors))
        for s in range(0, attributes.shape[0], chunk):  # (chunk, A', f) of token rows at a time
            part = slice(s, s + chunk)
            out[part] = self._rows(None if content is None else content[part], has_content[part], attributes[part])
        return out

    def _rows(self, content: npt.NDArray[np.float32] | None, has_content: npt.NDArray[np.bool_],
              attributes: npt.NDArray[np.int64]) -> Array:
        B = attributes.shape[0]
        dense = np.zeros((B, self._ridge_content.shape[0]))
        if content is not None and self.has_content:
            c = content.astype(np.float64)
            norm = np.linalg.norm(c, axis=1, keepdims=True)
            dense = np.where(has_content[:, None] & (norm > 0), c / np.maximum(norm, 1e-12), 0.0)
        count = (attributes > 0).sum(axis=1)  # (B,)
        tokens = self._ridge_attributes[attributes].sum(axis=1)  # (B, f); row 0 is the padding's zero
        a_scale = self._attribute_weight / np.sqrt(np.maximum(count, 1))  # (B,)
        total = np.sqrt((dense**2).sum(axis=1) + np.where(count > 0, self._attribute_weight**2, 0.0))
        scale = 1.0 / np.maximum(total, 1e-12)  # (B,)
        out: Array = scale[:, None] * (dense @ self._ridge_content + a_scale[:, None] * tokens) + self._intercept
        return out

    def user_factors(self, rows: npt.NDArray[np.floating], lengths: list[int], chunk: int = 64) -> Array:
        """p (B, f) of B users whose history rows y are stacked in `rows` (sum L_b, f), user b owning the
        next lengths[b]; an empty history gives p = 0.

        The factors are stored in the eigenbasis of YᵀY + λI (the trainer rotates them; inner products
        are unchanged), so that matrix is the diagonal Λ and a user's system Λ + c·Y_LᵀY_L (c = α-1)
        is solved by Woodbury's identity in O(L²f) instead of O(Lf² + f³) when that is cheaper (short
        histories, large f): p = Λ⁻¹b - Zᵀ(I/c + Z·Y_Lᵀ)⁻¹Z·b with Z = Y_L·Λ⁻¹ and b = α·Y_Lᵀ1.
        Users of similar history lengths go `chunk` at a time as one batched LAPACK call, their
        histories padded with zero rows (which add nothing to either side)."""
        y = rows.astype(np.float64)
        sizes = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        lam, c = self._gram, self._alpha - 1.0  # (f,) Λ, and an interaction's extra confidence
        f = self.factors
        p = np.zeros((len(lengths), f))
        # users of similar history lengths together (lengths within a factor 2): padding stays small
        bucket = np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64)
        for level in np.unique(bucket[sizes > 0]).tolist():
            mine = np.flatnonzero((bucket == level) & (sizes > 0))
            for s in range(0, mine.size, chunk):
                users = mine[s : s + chunk]
                n, first = sizes[users], starts[users]
                width = int(n.max())
                padded = np.zeros((n.size, width, f))  # (b, Lmax, f)
                at = np.arange(width)
                mask = at[None, :] < n[:, None]
                padded[mask] = y[(first[:, None] + at[None, :])[mask]]
                b = self._alpha * padded.sum(axis=1)  # (b, f)
                if c == 0.0:
                    p[users] = b / lam
                elif 2 * (width**2 * f + width**3 / 3) < width * f**2 + f**3 / 3:  # Woodbury's flops < the f×f's
                    z = padded / lam  # (b, Lmax, f) Y_L·Λ⁻¹
                    k = np.eye(width) / c + np.matmul(z, padded.transpose(0, 2, 1))  # (b, Lmax, Lmax)
                    x = _solve(k, np.matmul(z, b[..., None]))  # (b, Lmax, 1)
                    p[users] = b / lam - np.matmul(z.transpose(0, 2, 1), x)[..., 0]
                else:
                    a = c * np.matmul(padded.transpose(0, 2, 1), padded)  # (b, f, f)
                    a[:, np.arange(f), np.arange(f)] += lam
                    p[users] = _solve(a, b[..., None])[..., 0]
        return p

    def parts(self, h: npt.NDArray[np.floating], p: Array) -> tuple[Array, Array]:
        """The two halves of each user's query before w: ([h; 1]/σ_m (B, D+1), p/σ_y (B, f))."""
        q = np.hstack([h.astype(np.float64), np.ones((h.shape[0], 1))])
        return q / _spread(q, self._cov_m), p / _spread(p, self._cov_y)

    @property
    def separate_new(self) -> bool:
        """Whether new items have a weight of their own (a query of their own to search with)."""
        return self._new_weight != self._weight

    def query_pair(self, h: npt.NDArray[np.floating], p: Array) -> tuple[Array, Array | None]:
        """[w·h/σ_m; w/σ_m; (1-w)·p/σ_y] (B, D+1+f) for trained items, and the same with w_new for new
        items when `separate_new` (None: the same queries)."""
        m, y = self.parts(h, p)
        trained = np.hstack([self._weight * m, (1.0 - self._weight) * y])
        if not self.separate_new:
            return trained, None
        return trained, np.hstack([self._new_weight * m, (1.0 - self._new_weight) * y])
