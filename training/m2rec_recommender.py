"""m2rec and its ablations behind the harness's `Recommender` protocol (training/protocol.py).

fit   trains on split.train and keeps the epoch with the best validation Recall@20 (cold-only)
score folds users in from their split.train history and scores candidates as [h; 1]·[v; b]:
      warm candidates by their trained rows, every other item by its generated row (neutral gate),
      exactly what the service's index does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from training.dataset import Dataset
from training.item_rows import ItemTable
from training.presets import VARIANTS
from training.split import ColdStartSplit
from training.train import TrainConfig, TrainResult, train


class M2RecRecommender:
    def __init__(self, config: TrainConfig | None = None, name: str = "m2rec") -> None:
        self.name = name
        self.config = config if config is not None else TrainConfig(progress=False)
        self.result: TrainResult | None = None
        self._table: ItemTable | None = None

    @classmethod
    def variant(cls, name: str, seed: int = 0, **overrides: Any) -> M2RecRecommender:
        if name not in VARIANTS:
            raise ValueError(f"unknown m2rec variant {name!r}; known: {sorted(VARIANTS)}")
        cfg = TrainConfig(seed=seed, progress=False)
        cfg = dataclasses.replace(cfg, **{**VARIANTS[name], **overrides})
        return cls(cfg, name)

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        self.result = train(dataset, split, self.config)
        self._table = ItemTable(self.result.model, self.result.data)

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        if self._table is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return self._table.score(users, candidates)
