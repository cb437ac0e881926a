"""How the index trades exactness, memory and speed, and which FAISS index a population of a given size gets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["auto", "exact", "ivf", "ivf_sq8"]
Built = Literal["exact", "ivf", "ivf_sq8"]  # what a FAISS segment actually is


@dataclass(frozen=True)
class IndexConfig:
    """auto: exact below `ivf_min_rows`, IVF-Flat up to `sq8_min_rows`, IVF-SQ8 with re-ranking above.
    A loaded snapshot keeps the kinds it was built with until its next rebuild."""

    kind: Kind = "auto"
    nlist: int | None = None  # IVF lists; None: about 2·sqrt(N) at each (re)training
    nprobe: int = 16  # IVF lists scanned per query (recall against latency: benchmarks/results/serve.md)
    ivf_min_rows: int = 50_000  # below this an exact scan is fast enough and needs no training
    sq8_min_rows: int = 2_000_000  # auto: from here codes of 1 byte a dimension (4x less to scan)
    rerank: int = 4  # IVF-SQ8: the best rerank·k codes are re-scored from the exact rows; 0: no rows kept
    rerank_float16: bool = False  # IVF-SQ8: keep those rows in float16 (half the memory, scores to ~1e-3)
    train_points_per_list: int = 40  # k-means sample per list: bounds training time
    train_iterations: int = 10
    retrain_growth: float = 2.0  # rebuild (and retrain) once a base has grown this much since training
    rebuild_dead_fraction: float = 0.2  # rebuild once this share of a base's rows are tombstones
    merge_rows: int = 8192  # buffer rows that start a background merge
    merge_slice_rows: int = 2048  # rows moved into the base per hold of its lock (bounds a search's wait)
    auto_merge: bool = True  # False: merges only when `merge()` is called

    def kind_for(self, rows: int) -> Built:
        if self.kind == "exact" or rows < self.ivf_min_rows:
            return "exact"
        if self.kind == "ivf_sq8" or (self.kind == "auto" and rows >= self.sq8_min_rows):
            return "ivf_sq8"
        return "ivf"

    def nlist_for(self, rows: int) -> int:
        return max(1, min(self.nlist or round(2 * math.sqrt(rows)), rows // 8 or 1))
