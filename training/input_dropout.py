"""The t-step's corruption of a warm item's inputs, so the generator learns what serves new items:
an item with one modality missing, and inputs that are never exactly a warm item's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def modality_dropout(x: Any, p: float, rng: np.random.Generator) -> None:
    """Drop attributes or content (never both) of items that have both, p each."""
    if p <= 0:
        return
    both = (x.has_attributes & x.has_content).numpy()
    r = rng.random(both.size)
    drop_a = torch.from_numpy(both & (r < p))
    drop_c = torch.from_numpy(both & (r >= p) & (r < 2 * p))
    x.has_attributes = x.has_attributes & ~drop_a
    x.has_content = x.has_content & ~drop_c


def feature_dropout(x: Any, p: float, rng: np.random.Generator) -> None:
    """Drop each attribute token and each content entry with probability p (a new item's inputs are
    never exactly a warm item's: without this the generator memorises the warm items)."""
    if p <= 0:
        return
    drop = torch.from_numpy(rng.random(tuple(x.attributes.shape)) < p)
    x.attributes = x.attributes.masked_fill(drop, 0)
    x.has_attributes = x.has_attributes & x.attributes.gt(0).any(dim=1)
    keep = torch.from_numpy(rng.random(tuple(x.content.shape)) >= p).to(x.content.dtype)
    x.content = x.content * keep
