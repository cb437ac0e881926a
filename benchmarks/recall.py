"""Recall of an index's approximate base against an exact scan of the same rows."""

from __future__ import annotations

import numpy as np

from service.index.base import Base
from service.index.search import search_base


def base_recall(base: Base, queries: np.ndarray, k: int, nprobe: int) -> float:
    """Mean recall@k over queries (B, D+1) of the base's search at `nprobe`, the exact top-k of the
    base's own rows (no exclusions) being the truth."""
    parts = list(base.parts())
    iids = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])  # (N_base, D+1)
    _, found = search_base(base, queries, k, nprobe)
    hits: list[float] = []
    for s in range(0, len(queries), 64):
        scores = queries[s : s + 64] @ rows.T  # (B, N_base)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        hits += [len(set(iids[t].tolist()) & set(f.tolist())) / k for t, f in zip(top, found[s : s + 64], strict=True)]
    return float(np.mean(hits))
