"""m2rec and its ablations behind the harness's `Recommender` protocol (training/protocol.py).

fit   trains on split.train and keeps the epoch with the best validation score, then chooses how
      new items mix with trained ones (training/mixing.py) on the hybrid validation task
score folds users in from the history it is given and scores candidates as [h; 1]·[v; b]:
      warm candidates by their trained rows, every other item by its generated row (neutral gate),
      exactly what the service's index does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.sparse as sp

from service.model.mixing import Policy
from training.dataset import Dataset
from training.item_rows import ItemTable
from training.presets import PRESETS
from training.split import ColdStartSplit
from training.train import TrainConfig, TrainResult, train


class M2RecRecommender:
    def __init__(self, config: TrainConfig | None = None, name: str = "m2rec") -> None:
        self.name = name
        self.config = config if config is not None else TrainConfig(progress=False)
        self.result: TrainResult | None = None
        self._table: ItemTable | None = None
        self.policy: Policy | None = None
        self.params: dict[str, Any] = {}

    @classmethod
    def preset(cls, name: str, seed: int = 0, **overrides: Any) -> M2RecRecommender:
        if name not in PRESETS:
            raise ValueError(f"unknown m2rec preset {name!r}; known: {sorted(PRESETS)}")
        cfg = TrainConfig(seed=seed, progress=False)
        cfg = dataclasses.replace(cfg, **{**PRESETS[name], **overrides})
        return cls(cfg, name)

    @classmethod
    def trained(cls, result: TrainResult, name: str = "m2rec") -> M2RecRecommender:
        """The harness's view of a model trained already."""
        model = cls(result.config, name)
        model._use(result)
        return model

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None:
        self._use(train(dataset, split, self.config))

    def _use(self, result: TrainResult) -> None:
        self.result = result
        self._table = ItemTable(result.model, result.data)
        self.policy = result.policy
        self.params = {"best_epoch": result.best_epoch, "new_bias_weight": float(result.model.new_bias_weight),
                       "policy": result.policy.to_dict()}

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        if self._table is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return self._table.score(users, candidates, history)
