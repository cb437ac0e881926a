"""Scoring with a trained model as the service does: users folded in from their histories, warm
items by their trained rows [V; b], every other item by its generated row (neutral gate)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from service.model import M2Rec
from training.dataset import Dataset
from training.split import ColdStartSplit
from training.train_data import TrainingData


class ItemTable:
    """Scores every dataset item for users folded in from the history they are given, as the service
    does: warm items by their trained rows [V; b], every other item by its generated row (neutral
    gate), and the history's items enter the fold-in by the same rows."""

    name = "m2rec"

    def __init__(self, model: M2Rec, data: TrainingData) -> None:
        self.model = model
        self.items = all_item_rows(model, data).numpy()  # (I, D+1)

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:  # protocol; built already
        pass

    @torch.no_grad()
    def user_vectors(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        """h (B, D) folded in from each user's history rows (the encoder's mean, decoded)."""
        D = self.model.config.item_dim
        H = sp.csr_matrix(history[users], dtype=np.float32)
        H.data[:] = 1.0
        n = np.maximum(np.asarray(H.sum(axis=1)).ravel(), 1.0)
        first = torch.from_numpy(np.asarray(H @ self.items[:, :D]) / np.sqrt(n)[:, None])  # (B, D) Vᵀr/‖r‖
        mu, _ = self.model.user.latent(first.float())
        return self.model.user.decode(mu).numpy()

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return next(self.scores(users, candidates, history, [self.items[candidates, -1]]))

    def scores(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix, biases: list[np.ndarray]
               ) -> Iterator[np.ndarray]:
        """(B, C) scores [h; 1]·[v; b] under each of `biases`, (C,) bias columns of the candidates, in
        turn: the choice of the new items' bias weight scores every weight with one fold-in and one product."""
        rows = self.items[candidates]  # (C, D+1)
        product = self.user_vectors(users, history) @ rows[:, :-1].T  # (B, C)
        for b in biases:
            yield np.asarray(product + b, dtype=np.float64)


@torch.no_grad()
def user_vectors(model: M2Rec, data: TrainingData, users: np.ndarray | None = None, batch: int = 2048
                 ) -> torch.Tensor:
    """h (len(users), D) of `users` (default: every user), deterministic fold-in (decoder of the
    posterior mean)."""
    every = np.arange(data.history.shape[0]) if users is None else users
    out = []
    for start in range(0, every.size, batch):
        items, offsets, lengths = data.flat_histories(every[start : start + batch])
        mu, _ = model.user.encode_sparse(items, offsets, lengths, None)
        out.append(model.user.decode(mu))
    return torch.cat(out) if out else torch.zeros(0, model.config.item_dim)


@torch.no_grad()
def generated_rows(model: M2Rec, data: TrainingData, items: np.ndarray, batch: int = 4096,
                   slots: int = 4096 * 16) -> torch.Tensor:
    """Serving-path rows (len(items), D+1) of dataset items from attributes and content only."""
    model.eval()
    order = np.argsort(data.attribute_counts[items], kind="stable")
    out = [model.embed_items(data.inputs(items[part]))[0]
           for part in _batches(order, data.attribute_counts[items[order]], batch, slots)]
    model.train()
    if not out:
        return torch.zeros(0, model.config.item_dim + 1)
    rows = torch.empty(items.size, model.config.item_dim + 1)
    rows[torch.from_numpy(order)] = torch.cat(out)
    return rows


def _batches(order: np.ndarray, widths: np.ndarray, batch: int, slots: int) -> list[np.ndarray]:
    """`order` (items by ascending attribute count, `widths`) cut into batches of at most `batch` items
    and at most `slots` padded attribute slots: a batch is padded to its widest item, and a few items
    with a hundred attributes would otherwise pad thousands of narrow ones (citeulike-t: 4,096 items
    × 162 slots in one batch, for a mean of 7.7 attributes)."""
    out, start = [], 0
    while start < order.size:
        n = min(batch, order.size - start)
        padded = np.arange(1, n + 1) * np.maximum(widths[start : start + n], 1)  # (n,) rising: widths are sorted
        n = max(1, int(np.searchsorted(padded, slots, side="right")))
        out.append(order[start : start + n])
        start += n
    return out


@torch.no_grad()
def all_item_rows(model: M2Rec, data: TrainingData) -> torch.Tensor:
    n_items = data.attributes.shape[0]
    rows = generated_rows(model, data, np.arange(n_items))
    rows[torch.from_numpy(data.warm)] = model.item_rows()
    return rows
