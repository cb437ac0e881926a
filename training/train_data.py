"""What the trainer needs from a dataset and a split, as arrays: histories over warm rows, item
inputs for every item, and the samplers of the t-step. Only warm items' training data is read;
validation and test items are embedded from their attributes and content alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from service.model import AttributeVocabulary, ItemInputs
from training.dataset import Dataset
from training.split import ColdStartSplit


@dataclass
class TrainingData:
    warm: np.ndarray  # (J,) dataset item index of each row of V
    history: sp.csr_matrix  # (U, J) binary training histories over warm rows
    item_users: sp.csr_matrix  # (J, U) transpose of history
    train_users: np.ndarray  # users with at least one training interaction
    vocabulary: AttributeVocabulary
    attributes: np.ndarray  # (I, A_max) int64 vocabulary index + 1 of every item, 0-padded
    attribute_counts: np.ndarray  # (I,) known attributes per item
    content: torch.Tensor | None  # (I, F)
    unknown_attributes: int  # attribute tokens of non-warm items outside the vocabulary

    @property
    def trained_rows(self) -> np.ndarray:
        """Warm rows with at least one training interaction."""
        return np.flatnonzero(np.diff(self.item_users.indptr) > 0)

    @property
    def content_dim(self) -> int:
        return 0 if self.content is None else int(self.content.shape[1])

    def inputs(self, items: np.ndarray) -> ItemInputs:
        """Generator inputs for dataset items (B,), attributes padded to the batch's widest item."""
        width = max(1, int(self.attribute_counts[items].max(initial=0)))
        attrs = torch.from_numpy(self.attributes[items, :width])  # (B, A)
        B = items.size
        if self.content is None:
            content = torch.zeros(B, 1)
            has_content = torch.zeros(B, dtype=torch.bool)
        else:
            content = self.content[torch.from_numpy(items)]
            has_content = torch.ones(B, dtype=torch.bool)
        return ItemInputs(attrs, content, attrs.gt(0).any(dim=1), has_content)

    def flat_histories(self, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EmbeddingBag layout of the users' histories: items (N,), offsets (B,), lengths (B,)."""
        ptr = self.history.indptr
        lengths = ptr[users + 1] - ptr[users]
        items = np.concatenate([self.history.indices[ptr[u] : ptr[u + 1]] for u in users]) \
            if users.size else np.empty(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return (torch.from_numpy(items.astype(np.int64)), torch.from_numpy(offsets),
                torch.from_numpy(lengths.astype(np.int64)))

    def sample_users_of(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One user who interacted with each warm row."""
        ptr = self.item_users.indptr
        deg = ptr[rows + 1] - ptr[rows]
        pick = ptr[rows] + (rng.random(rows.size) * deg).astype(np.int64)
        return np.asarray(self.item_users.indices[pick], dtype=np.int64)

    def sample_history_rows(self, users: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """(B, k) warm rows drawn with replacement from each user's history."""
        ptr = self.history.indptr
        deg = ptr[users + 1] - ptr[users]
        pick = ptr[users][:, None] + (rng.random((users.size, k)) * deg[:, None]).astype(np.int64)
        return np.asarray(self.history.indices[pick], dtype=np.int64)


def prepare(dataset: Dataset, split: ColdStartSplit) -> TrainingData:
    warm = np.asarray(split.warm_items, dtype=np.int64)
    history = sp.csr_matrix(split.train[:, warm], dtype=np.float32)
    history.data[:] = 1.0
    history.sort_indices()
    # The vocabulary comes from the warm items only: cold items' tokens are never trained on.
    vocabulary = AttributeVocabulary(sorted({t for j in warm for t in dataset.item_attributes[j]}))
    counts = np.zeros(dataset.n_items, dtype=np.int64)
    encoded: list[list[int]] = []
    unknown = 0
    for toks in dataset.item_attributes:
        ids = sorted({vocabulary.index[t] for t in toks if t in vocabulary.index})
        unknown += sum(1 for t in toks if t not in vocabulary.index)
        encoded.append(ids)
    width = max([1, *(len(e) for e in encoded)])
    attributes = np.zeros((dataset.n_items, width), dtype=np.int64)
    for i, ids in enumerate(encoded):
        attributes[i, : len(ids)] = ids
        counts[i] = len(ids)
    content = None if dataset.features is None else torch.from_numpy(dataset.features.astype(np.float32))
    return TrainingData(
        warm=warm,
        history=history,
        item_users=sp.csr_matrix(history.T),
        train_users=np.flatnonzero(history.getnnz(axis=1) > 0),
        vocabulary=vocabulary,
        attributes=attributes,
        attribute_counts=counts,
        content=content,
        unknown_attributes=unknown,
    )
