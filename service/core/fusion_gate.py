"""M2VAE's user-aware fusion gate (service/model/generator.py, `M2VAEGenerator._fuse`) in NumPy, for
explanations: the gate weights of k new items for one user, without running the generator.

The gate depends on the user only through u = user_proj(h), and on the item only through its views'
means (attributes, content, common) and which modalities it has. Those item factors come from one
generator pass per item, kept (`ItemFactors`, cached by the explainer per stored version of the item);
a request then costs a few products of size k x Z instead of a torch pass over the generator (whose
op dispatch alone costs milliseconds: benchmarks/results/explain.md). Tests compare it with
`M2Rec.embed_items(inputs, user=h)`'s gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from service.model.generator import M2VAEGenerator

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ItemFactors:
    """What the gate reads of one item: its views' means and which modalities it has."""

    mu_a: Array  # (Z,) attribute view mean
    mu_c: Array  # (Z,) content view mean
    mu_common: Array | None  # (Z,) the PoE common view's mean; None without a common view
    has: tuple[bool, bool]  # (attributes, content) available


def _np(t: torch.Tensor) -> Array:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


def _rms(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Rows scaled to unit root-mean-square entries (generator._rms_normalised)."""
    out: npt.NDArray[Any] = x / np.sqrt(np.square(x).mean(axis=-1, keepdims=True) + np.float32(1e-6))
    return out


def _sigmoid(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    out: npt.NDArray[Any] = 1.0 / (1.0 + np.exp(-x))
    return out


class FusionGate:
    def __init__(self, generator: M2VAEGenerator) -> None:
        g = generator
        self.moe, self.tau, self.gate_norm, self.common = g.moe, float(g.tau), g.gate_norm, g.common_view
        self.user_proj = _np(g.user_proj.weight).T  # (D, Z)
        self.self_gate = [(_np(lin.weight).T, _np(lin.bias)) for lin in (g.self_gate_a, g.self_gate_c)]  # (Z, Z), (Z,)
        self.w = [_np(g.w_a), _np(g.w_c)]  # (Z,) each
        self.v_com = _np(g.v_com)  # (Z,)
        first, last = g.view_gate[0], g.view_gate[2]
        assert isinstance(first, torch.nn.Linear) and isinstance(last, torch.nn.Linear)
        self.view_gate = (_np(first.weight).T, _np(first.bias), _np(last.weight).T, _np(last.bias))

    def terms(self, items: list[ItemFactors]) -> tuple[Array, npt.NDArray[np.bool_]]:
        """What the gate needs of k items, computed once per item (the explainer keeps it): T (k, 2, Z)
        with view v's logit = T[:, v] · u_v, and which modalities each has (k, 2). The logit of view v
        is Σ_z μ_v,z · u_v,z · common_z · w_v,z (M2VAE's gated interaction), linear in u_v."""
        k = len(items)
        has = np.array([it.has for it in items], dtype=bool).reshape(k, 2)  # (k, 2)
        if not self.moe:
            return np.zeros((k, 2, 0), np.float32), has
        views = [np.stack([it.mu_a for it in items]), np.stack([it.mu_c for it in items])]  # (k, Z) each
        common = np.stack([it.mu_common for it in items if it.mu_common is not None]) if self.common else None
        if self.gate_norm:
            views = [_rms(v) for v in views]
            common = None if common is None else _rms(common)
        if common is not None:
            views = [v * common for v in views]
        return np.stack([v * w for v, w in zip(views, self.w, strict=True)], axis=1).astype(np.float32), has

    def weights(self, h: Array, items: list[ItemFactors]) -> Array:
        """(k, 3) gate weights of k items for one user h (D,): modality gates g_a, g_c (zero for a missing
        modality) and the common view's share α, exactly as `M2VAEGenerator._fuse` reports them."""
        terms, has = self.terms(items)
        users, alpha = self.users(h[None, :])
        owner = np.zeros(len(items), np.int64)
        return self.pair_weights(terms, has, users[owner], alpha[owner])

    def users(self, h: Array) -> tuple[Array, Array]:
        """What the gate needs of B users h (B, D): u_v per view (B, 2, Z), as `terms` multiplies them,
        and the common view's share α (B,)."""
        up = h.astype(np.float32) @ self.user_proj  # (B, Z)
        if self.moe:
            views = []
            for weight, bias in self.self_gate:
                u_v = up * _sigmoid(up @ weight + bias)  # (B, Z)
                views.append(_rms(u_v) if self.gate_norm else u_v)
            users = np.stack(views, axis=1)  # (B, 2, Z)
        else:
            users = np.zeros((len(h), 2, 0), np.float32)
        if not self.common:
            alpha = np.zeros(len(h), np.float32)
        elif self.moe:
            w1, b1, w2, b2 = self.view_gate
            alpha = _sigmoid(np.tanh((up * self.v_com) @ w1 + b1) @ w2 + b2)[:, 0].astype(np.float32)  # (B,)
        else:
            alpha = np.full(len(h), 0.5, np.float32)
        return users, alpha

    def pair_weights(self, terms: Array, has: npt.NDArray[np.bool_], users: Array, alpha: Array) -> Array:
        """(P, 3) gate weights g_a, g_c, α of P (item, user) pairs: the items' `terms` (P, 2, Z) and
        modalities (P, 2), their users' `users` parts (P, 2, Z) and α (P,)."""
        scores = (terms * users).sum(axis=2) / self.tau  # (P, 2); without the MoE Z = 0: all zero
        none = ~has.any(axis=1)  # (P,)
        scores = np.where(has, scores, -np.inf)
        scores[none] = 0.0
        scores = scores - scores.max(axis=1, keepdims=True)
        gates = np.exp(scores)
        gates = gates / gates.sum(axis=1, keepdims=True) * has  # (P, 2)
        if self.common:
            alpha = np.where(none, np.float32(1.0), alpha)
        return np.column_stack([gates, alpha]).astype(np.float32)  # (P, 3): g_a, g_c, α
