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

    def weights(self, h: Array, items: list[ItemFactors]) -> Array:
        """(k, 3) gate weights of k items for one user h (D,): modality gates g_a, g_c (zero for a missing
        modality) and the common view's share α, exactly as `M2VAEGenerator._fuse` reports them."""
        k = len(items)
        up = h.astype(np.float32) @ self.user_proj  # (Z,)
        avail = np.array([it.has for it in items], dtype=bool).reshape(k, 2)  # (k, 2)
        none = ~avail.any(axis=1)  # (k,)
        if self.moe:
            logits = []
            views = (np.stack([it.mu_a for it in items]), np.stack([it.mu_c for it in items]))  # (k, Z) each
            common = np.stack([it.mu_common for it in items if it.mu_common is not None]) if self.common else None
            if self.gate_norm:
                views = (_rms(views[0]), _rms(views[1]))
                common = None if common is None else _rms(common)
            for mu, (weight, bias), w in zip(views, self.self_gate, self.w, strict=True):
                u_v = up * _sigmoid(up @ weight + bias)  # (Z,)
                if self.gate_norm:
                    u_v = _rms(u_v)
                inter = mu * u_v if common is None else mu * u_v * common  # (k, Z)
                logits.append(inter @ w)  # (k,)
            scores = np.stack(logits, axis=1) / self.tau  # (k, 2)
        else:
            scores = np.zeros((k, 2), np.float32)
        scores = np.where(avail, scores, -np.inf)
        scores[none] = 0.0
        scores = scores - scores.max(axis=1, keepdims=True)
        gates = np.exp(scores)
        gates = gates / gates.sum(axis=1, keepdims=True) * avail  # (k, 2)
        if not self.common:
            alpha = np.zeros(k, np.float32)
        else:
            if self.moe:
                w1, b1, w2, b2 = self.view_gate
                alpha_user = float(_sigmoid(np.tanh((up * self.v_com) @ w1 + b1) @ w2 + b2)[0])
            else:
                alpha_user = 0.5
            alpha = np.where(none, 1.0, alpha_user).astype(np.float32)
        return np.column_stack([gates, alpha]).astype(np.float32)  # (k, 3): g_a, g_c, α
