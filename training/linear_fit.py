"""Closed-form ridge fit of the generator's linear path (service/model/linear_path.py) onto [V; b].

The warm items' features never change during training, so the normal equations' Cholesky factors
are built once per run; every t-step then only solves for the current targets (X^T Y and two
triangular solves). One map per modality pattern, each fitted on the warm items that have those
modalities. The intercept is not penalised.

Held-out rows (`held_out`): in the t-step the decoder learns the residual target − linear row. The
in-sample ridge row of a warm item is closer to its target than any new item's row will be, so the
decoder would learn to correct in-sample noise. The leave-one-out ridge prediction is exact in
closed form, ŷ_(−j) = y_j − (y_j − ŷ_j)/(1 − h_jj) with the leverage h_jj = x_jᵀ(XᵀX + Λ)⁻¹x_j,
and the leverages depend on the features only, so they too are computed once.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from service.model.linear_path import ATTRIBUTES, BOTH, CONTENT, NOTHING, LinearPath
from training import distributed
from training.train_data import TrainingData


class LinearFit:
    def __init__(self, data: TrainingData, path: LinearPath, ridge: float, held_out: bool = False) -> None:
        self.path = path
        warm = data.warm
        counts = data.attribute_counts[warm]
        attrs = data.attributes[warm]  # (J, A_max), 0 = padding
        weights = path.token_weights(torch.from_numpy(attrs)).numpy().astype(np.float64)
        J, A1 = warm.size, path.attribute_map.shape[1]
        rows = np.repeat(np.arange(J), attrs.shape[1])
        self.S = sp.csr_matrix((weights.ravel(), (rows, attrs.ravel())), shape=(J, A1))  # (J, A+1)
        self.S.eliminate_zeros()
        has_a = counts > 0
        if data.content is not None:
            c = data.content[torch.from_numpy(warm)].double()
            self.C = torch.nn.functional.normalize(c, dim=1, eps=1e-8).numpy()  # (J, F)
            has_c = np.ones(J, dtype=bool)
        else:
            self.C = np.zeros((J, 0))
            has_c = np.zeros(J, dtype=bool)
        self.members = {ATTRIBUTES: has_a, CONTENT: has_c, BOTH: has_a & has_c}
        self.factors: dict[int, torch.Tensor] = {}
        self.leverage: dict[int, np.ndarray] = {}  # (J,) h_jj per pattern, 0 outside its members
        self.designs: dict[int, sp.csr_matrix] = {}  # (J, P) every warm row's inputs, for the fitted rows
        for pattern, member in self.members.items():
            if member.any():
                gram = self._gram(pattern, member)
                penalty = np.full(gram.shape[0], ridge)
                penalty[-1] = 0.0  # intercept
                gram[np.diag_indices_from(gram)] += penalty
                self.factors[pattern] = torch.linalg.cholesky(torch.from_numpy(gram))
                if held_out:
                    self.leverage[pattern] = self._leverage(pattern, member)
                    self.designs[pattern] = self._design(pattern)  # built once, not every t-step
        self.targets: np.ndarray | None = None
        self.fitted: dict[int, np.ndarray] = {}  # (J, D+1) in-sample ridge rows per pattern

    def _blocks(self, pattern: int) -> tuple[bool, bool]:
        return pattern in (CONTENT, BOTH), pattern in (ATTRIBUTES, BOTH)

    def _gram(self, pattern: int, member: np.ndarray) -> np.ndarray:
        """X^T X of [content?, attributes?, 1] over the member rows, dense."""
        use_c, use_a = self._blocks(pattern)
        C, S = self.C[member], self.S[member]
        ones = np.ones((int(member.sum()), 1))
        dense = np.hstack([C, ones]) if use_c else ones  # (n, F+1) or (n, 1): dense blocks, 1 last
        if not use_a:
            return np.asarray(dense.T @ dense)
        ss = (S.T @ S).toarray()  # (A+1, A+1)
        sd = np.asarray(S.T @ dense)  # (A+1, F+1)
        dd = dense.T @ dense
        return np.block([[ss, sd], [sd.T, dd]])  # order: [attributes, content?, 1]

    def _design(self, pattern: int) -> sp.csr_matrix:
        """[attributes?, content?, 1] of every warm row, sparse, in the gram's column order."""
        use_c, use_a = self._blocks(pattern)
        blocks: list[sp.spmatrix] = [self.S] if use_a else []
        if use_c:
            blocks.append(sp.csr_matrix(self.C))
        blocks.append(sp.csr_matrix(np.ones((self.S.shape[0], 1))))
        return sp.csr_matrix(sp.hstack(blocks))

    def _leverage(self, pattern: int, member: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """h_jj = x_jᵀ (XᵀX + Λ)⁻¹ x_j of each member row. The design's blocks are multiplied apart:
        the sparse attributes as sparse, the dense content by BLAS (as one sparse matrix the dense
        block would go through scipy's single-threaded product)."""
        inverse = torch.cholesky_inverse(self.factors[pattern]).numpy()  # (P, P), order [a?, c?, 1]
        use_c, use_a = self._blocks(pattern)
        A1 = self.S.shape[1] if use_a else 0
        F_dim = self.C.shape[1] if use_c else 0
        rows = np.flatnonzero(member)
        out = np.zeros(member.size)
        for start in range(0, rows.size, chunk):
            r = rows[start : start + chunk]
            xa = self.S[r] if use_a else None  # (n, A+1) sparse
            xc = self.C[r] if use_c else None  # (n, F) dense
            m = np.broadcast_to(inverse[-1], (r.size, inverse.shape[0])).copy()  # the intercept column's part
            if xa is not None:
                m += np.asarray(xa @ inverse[:A1])
            if xc is not None:
                m += xc @ inverse[A1 : A1 + F_dim]
            h = m[:, -1].copy()  # x_j's intercept entry is 1
            if xa is not None:
                h += np.asarray(xa.multiply(m[:, :A1]).sum(axis=1)).ravel()
            if xc is not None:
                h += (xc * m[:, A1 : A1 + F_dim]).sum(axis=1)
            out[r] = h
        return out

    def _rhs(self, pattern: int, member: np.ndarray, Y: np.ndarray) -> np.ndarray:
        use_c, use_a = self._blocks(pattern)
        Ym = Y[member]
        parts = [np.asarray(self.S[member].T @ Ym)] if use_a else []
        if use_c:
            parts.append(self.C[member].T @ Ym)
        parts.append(Ym.sum(axis=0, keepdims=True))
        return np.vstack(parts)

    @torch.no_grad()
    def refit(self, targets: torch.Tensor) -> None:
        """Solve every pattern's map onto targets (J, D+1) = [V; b] and write it into the path."""
        Y = targets.detach().double().numpy()
        p = self.path
        p.content_map.zero_()
        p.attribute_map.zero_()
        p.intercept.zero_()
        p.intercept[NOTHING] = torch.from_numpy(Y.mean(axis=0)).float()
        A1, F_dim = p.attribute_map.shape[1], self.C.shape[1]
        for pattern, factor in self.factors.items():
            member = self.members[pattern]
            W = torch.cholesky_solve(torch.from_numpy(self._rhs(pattern, member, Y)), factor).float()
            use_c, use_a = self._blocks(pattern)
            k = 0
            if use_a:
                p.attribute_map[0 if pattern == ATTRIBUTES else 1] = W[:A1]
                k = A1
            if use_c:
                p.content_map[0 if pattern == CONTENT else 1, :F_dim] = W[k : k + F_dim]
                k += F_dim
            p.intercept[pattern] = W[k]
            if self.leverage:
                self.fitted[pattern] = np.asarray(self.designs[pattern] @ W.double().numpy())
        self.targets = Y

    def refit_shared(self, targets: torch.Tensor) -> None:
        """`refit`, solved once on rank 0 and broadcast: the map written into the path and the
        fitted rows the leave-one-out shifts read (single process: `refit` itself). Every rank
        then holds rank 0's solution bit for bit, whatever its own BLAS would have summed."""
        if not distributed.active():
            self.refit(targets)
            return
        if distributed.is_main():
            self.refit(targets)
        else:
            shape = tuple(targets.shape)
            self.targets = np.empty(shape)
            self.fitted = {pattern: np.empty(shape) for pattern in self.leverage}
        assert self.targets is not None
        p = self.path
        distributed.broadcast_tensors([p.content_map, p.attribute_map, p.intercept, torch.from_numpy(self.targets),
                                       *(torch.from_numpy(self.fitted[k]) for k in sorted(self.fitted))])

    def held_out(self, rows: np.ndarray, patterns: torch.Tensor) -> torch.Tensor:
        """Leave-one-out linear rows (B, D+1) of warm rows (B,) under each row's pattern (B,)."""
        if self.targets is None or not self.leverage:
            raise RuntimeError("held_out needs LinearFit(..., held_out=True) and a refit() first")
        Y = self.targets[rows]  # (B, D+1)
        n = self.targets.shape[0]
        out = (self.targets.sum(axis=0) - Y) / max(n - 1, 1)  # NOTHING: the mean of the other rows
        pattern = patterns.numpy()
        for p, lev in self.leverage.items():
            sel = pattern == p
            # a row outside the pattern's fit (it lacks a modality the map reads) is held out already
            h = np.where(self.members[p][rows[sel]], lev[rows[sel]], 0.0)[:, None]
            out[sel] = Y[sel] - (Y[sel] - self.fitted[p][rows[sel]]) / (1.0 - h)
        return torch.from_numpy(out).float()

    def held_out_shift(self, patterns: torch.Tensor) -> torch.Tensor:
        """(J, D+1): each warm row's leave-one-out linear row minus its in-sample one, under its
        pattern (J,); zeros before the first refit. Added to a generated row, it gives the row the
        generator would produce for the item had it not been trained on it."""
        if self.targets is None or not self.leverage:
            return torch.zeros(len(patterns), self.path.intercept.shape[1])
        rows = np.arange(self.targets.shape[0])
        fitted = np.broadcast_to(self.targets.mean(axis=0), self.targets.shape).copy()  # NOTHING: the mean
        pattern = patterns.numpy()
        for p in self.leverage:
            sel = pattern == p
            fitted[sel] = self.fitted[p][sel]
        return self.held_out(rows, patterns) - torch.from_numpy(fitted).float()
