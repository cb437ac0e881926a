"""The user fold-in of `M2Rec.fold_in` for one user, in NumPy: the request hot path.

A torch call pays a fixed dispatch cost per op whatever the size; one user's fold-in is about ten
ops on vectors of D=128, so torch spends far more time dispatching than computing. The same weights
in NumPy (float32, same op order) give the same h to float rounding (tests compare against
`M2Rec.fold_in`). Only the posterior mean's half of the encoder's last layer is kept: the
deterministic fold-in never reads the log-variance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import numpy.typing as npt
from torch import nn

from service.model import M2Rec

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _Layer:
    weight: Array  # (in, out), transposed from torch's (out, in)
    bias: Array  # (out,)
    tanh_after: bool


def _layers(mlp: nn.Sequential, keep_out: int | None = None) -> list[_Layer]:
    """Linear layers with the Tanh that follows each; `keep_out` trims the last layer's outputs."""
    modules = list(mlp)
    layers: list[_Layer] = []
    for k, module in enumerate(modules):
        if isinstance(module, nn.Tanh):
            continue
        if not isinstance(module, nn.Linear) or module.bias is None:
            raise TypeError(f"fold-in MLPs are Linear(bias=True) and Tanh only, not {type(module).__name__}")
        weight = module.weight.detach().numpy().T  # (in, out)
        bias = module.bias.detach().numpy()
        last = all(not isinstance(m, nn.Linear) for m in modules[k + 1 :])
        if last and keep_out is not None:
            weight, bias = weight[:, :keep_out], bias[:keep_out]
        tanh_after = k + 1 < len(modules) and isinstance(modules[k + 1], nn.Tanh)
        layers.append(_Layer(np.ascontiguousarray(weight, np.float32), bias.astype(np.float32), tanh_after))
    return layers


def _run(layers: list[_Layer], x: Array) -> Array:
    """x (B, 1, in) -> (B, 1, out), or (B, in) -> (B, out). A stacked matmul runs one BLAS product per user, (1, in) x
    (in, out), so each user's result is bit-identical to their own call, whatever B; one
    (B, in) x (in, out) product would round each row differently with B."""
    for layer in layers:
        x = np.matmul(x, layer.weight) + layer.bias
        if layer.tanh_after:
            x = np.tanh(x)
    return x


class FoldIn:
    """h (D,) and the index query [h; 1] (1, D+1) of one user from their history rows (L, D+1); with
    the collaborative part, the query [w·h/σ_m; w/σ_m; (1-w)·p/σ_y] (1, D+1+f) from rows (L, D+1+f)
    (service/model/collaborative.py): the explanations read h back as query[:D] / query[D]."""

    def __init__(self, model: M2Rec) -> None:
        user = model.user
        self.dim = model.config.item_dim  # D
        self.collaborative = model.collaborative
        self.enc_bias = user.enc_bias.detach().numpy().astype(np.float32)  # (D,)
        self.encoder = _layers(user.encoder, keep_out=model.config.user_latent)  # -> mu (Ku,)
        self.decoder = _layers(user.decoder)  # (Ku,) -> (D,)
        # without a hidden layer, everything after the first layer's tanh is affine: h = t·M + c
        layers = self.encoder + self.decoder
        self.linear: Array | None = None if any(layer.tanh_after for layer in layers) else \
            functools.reduce(np.matmul, [layer.weight for layer in layers])  # (D, D)

    def user_vector(self, rows: Array) -> Array:
        """h (1, D); rows (L, D+1) or (L, D), warm and generated alike; L = 0 folds in "knows nothing"."""
        return self._m2rec_queries(rows, [len(rows)])[:, : self.dim]

    def query(self, rows: Array) -> Array:
        return self.queries(rows, [len(rows)])

    def without_each(self, rows: Array, lengths: list[int] | None = None) -> Array:
        """h (L, D) of one user folded in from their history rows (L, D+1) without row l, for each l:
        the first layer is a sum, so each leave-one-out input is (S - v_l) / sqrt(L-1), and the L
        variants cost one MLP pass over L rows instead of L fold-ins. With `lengths`, `rows` stacks
        the histories of several users (as in `queries`), all passed through the MLPs at once."""
        lengths = [len(rows)] if lengths is None else lengths
        _, without = self._first_layers(rows, lengths)
        # one (sum L, in) x (in, out) product a layer: explanations need no batch-independent rounding
        return _run(self.decoder, _run(self.encoder, without))

    def drops(self, rows: Array, lengths: list[int], users: Array, targets: list[Array]) -> list[Array]:
        """How much each history row pulls each target up: for user b (history rows stacked in `rows` as
        in `queries`, h = users[b] (D,)) and its targets[b] (k_b, D+1), the (k_b, L_b) score drops
        v_j·(h - h without row l). Without a hidden layer h - h_l = (t - t_l)·M, so the L variants need
        no MLP pass at all; otherwise `without_each`."""
        D = self.dim
        starts = [0, *accumulate(lengths)]
        if self.linear is None:
            without = self.without_each(rows, lengths)  # (sum L, D)
            return [target[:, :D] @ (users[b] - without[starts[b] : starts[b + 1]]).T
                    for b, target in enumerate(targets)]
        t, t_without = self._first_layers(rows, lengths)
        delta = np.repeat(t, lengths, axis=0) - t_without  # (sum L, D)
        pulled = np.concatenate(targets)[:, :D] @ self.linear.T  # (sum k, D): v_j·M^T
        at = [0, *accumulate(len(target) for target in targets)]
        return [pulled[at[b] : at[b + 1]] @ delta[starts[b] : starts[b + 1]].T for b in range(len(targets))]

    def _first_layers(self, rows: Array, lengths: list[int]) -> tuple[Array, Array]:
        """The first layer's outputs t (after its tanh): each user's (B, D), and each user's without
        each of its rows (sum L, D). Every length >= 1."""
        starts = np.fromiter(accumulate(lengths[:-1], initial=0), np.int64, len(lengths))
        totals = np.add.reduceat(rows[:, : self.dim], starts, axis=0)  # (B, D)
        sizes = np.asarray(lengths)
        owner = np.repeat(np.arange(len(lengths)), sizes)  # (sum L,)
        scale = (1 / np.sqrt(np.maximum(sizes - 1, 1))).astype(np.float32)  # (B,)
        without = np.tanh((totals[owner] - rows[:, : self.dim]) * scale[owner, None] + self.enc_bias)  # (sum L, D)
        users = np.tanh(totals / np.sqrt(sizes).astype(np.float32)[:, None] + self.enc_bias)  # (B, D)
        return users, without

    def queries(self, rows: Array, lengths: list[int]) -> Array:
        """[h; 1] (B, D+1) of B users whose history rows are stacked in `rows` (sum L_b, D+1), user b
        owning the next lengths[b] of them; with the collaborative part, its query (B, D+1+f)."""
        return self.query_pair(rows, lengths)[0]

    def query_pair(self, rows: Array, lengths: list[int]) -> tuple[Array, Array | None]:
        """`queries` for trained items, and for new items when the collaborative part weighs them
        apart (None: the same queries)."""
        out = self._m2rec_queries(rows, lengths)
        part = self.collaborative
        if part is None:
            return out, None
        p = part.user_factors(rows[:, self.dim + 1 :], lengths)  # (B, f)
        trained, new = part.query_pair(out[:, : self.dim], p)  # (B, D+1+f) each
        return trained.astype(np.float32), None if new is None else new.astype(np.float32)

    def _m2rec_queries(self, rows: Array, lengths: list[int]) -> Array:
        """[h; 1] (B, D+1). The first layer's sums for every user in one `reduceat`; the MLPs as one
        product per user (`_run`), on purpose: a user's scores never depend on which requests shared
        the batch."""
        sums = np.zeros((len(lengths), self.dim), np.float32)  # (B, D)
        starts = np.fromiter(accumulate(lengths[:-1], initial=0), np.int64, len(lengths))
        filled = np.asarray(lengths) > 0
        if len(rows):
            sums[filled] = np.add.reduceat(rows[:, : self.dim], starts[filled], axis=0)
        first = sums / np.sqrt(np.maximum(lengths, 1)).astype(np.float32)[:, None] + self.enc_bias  # (B, D)
        out = np.ones((len(lengths), self.dim + 1), np.float32)  # (B, D+1): the last column stays 1
        out[:, : self.dim] = _run(self.decoder, _run(self.encoder, np.tanh(first)[:, None, :]))[:, 0]
        return out
