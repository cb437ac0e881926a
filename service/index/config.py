"""How the index trades exactness, memory and speed, and which FAISS index a population of a given size gets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["auto", "exact"]
Built = Literal["exact", "ivf_pq4"]  # what a FAISS segment actually is
RowCodes = Literal["float32", "float16", "sq8"]  # how IVF-PQ4 keeps the rows it re-ranks from


@dataclass(frozen=True)
class IndexConfig:
    """auto: exact below `ivf_min_rows`, IVF-PQ4 (re-ranked from the rows) above; exact: exact at every size.
    A loaded snapshot keeps the kinds it was built with until its next rebuild."""

    kind: Kind = "auto"
    nlist: int | None = None  # IVF lists; None: about 2·sqrt(N) at each (re)training
    nprobe: int = 16  # IVF lists scanned per query (recall against latency: benchmarks/results/serve.md)
    ivf_min_rows: int = 50_000  # below this an exact scan is fast enough and needs no training
    rerank: int = 10  # IVF-PQ4: the best rerank·k by the codes are re-scored from the rows
    row_codes: RowCodes = "float32"  # IVF-PQ4's rows: float32 (exact), float16 or sq8 (a quarter: 10M items)
    train_points_per_list: int = 40  # k-means sample per list: bounds training time
    train_iterations: int = 10
    retrain_growth: float = 2.0  # rebuild (and retrain) once a base has grown this much since training
    rebuild_dead_fraction: float = 0.2  # rebuild once this share of a base's rows are tombstones
    merge_rows: int = 8192  # buffer rows that start a background merge
    merge_slice_rows: int = 512  # rows moved into the base per hold of its lock (bounds a search's wait)
    auto_merge: bool = True  # False: merges only when `merge()` is called

    def kind_for(self, rows: int) -> Built:
        return "exact" if self.kind == "exact" or rows < self.ivf_min_rows else "ivf_pq4"

    def nlist_for(self, rows: int) -> int:
        return max(1, min(self.nlist or round(2 * math.sqrt(rows)), rows // 8 or 1))
