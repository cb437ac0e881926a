"""The immutable base of `service.index.VectorIndex`: shards searched together, never mutated.

Exact kind: each shard is an `IndexIDMap2(IndexFlatIP)` over rows x = [v; b], which holds the rows;
searches read them in place (`Shard.exact_view`) and score them with the other exact segments.

IVF kind: max inner product reduced to nearest neighbour in L2. A row x becomes
x' = [x; sqrt(M² - |x|²)] (M the largest row norm when the lists were trained) and a query q
becomes q' = [q; 0], so |q' - x'|² = |q|² + M² - 2·q·x: the L2 order is the inner-product order,
and L2 k-means lists are ones an inner-product query can probe. Inner-product IVF on the raw rows
put long rows in the wrong lists (benchmarks/results/serve.md). The lift
only chooses lists: every IVF shard holds its rows un-lifted, list by list, in the scan kernel's
panels (`service.index.ivf_lists.ListPanels`), and all shards share one trained coarse quantizer (a FAISS
`IndexFlatL2` over lifted centroids), so a query is assigned to lists once and one kernel call
scans those lists in every shard with exact inner-product scores.
A row longer than M (arrived after training) cannot be lifted: it stays in the base's small exact
`overflow` segment until a full rebuild recomputes M.

Why shards: a merge adds the delta as a new shard and combines small shards like a binary counter
(a shard combines with the next older one while that one is no larger), so a merge copies at most
`shard_rows` rows, never the whole catalogue, and memory never holds two copies of a 1M-row base
except during a full rebuild (IVF retrained when the catalogue has doubled or too many rows
overflowed M). A shard's arrays are allocated at their final size when it is built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from service.index.ivf_lists import ListPanels
from service.index.storage import (
    DeltaSegment,
    DeltaView,
    Ids,
    IndexConfig,
    Vectors,
    to_panels,
)

_BLOCK = 16_384  # rows per lift/assign step: bounds temporaries
Part = tuple[Ids, Vectors]  # internal ids (n,) and rows (n, D+1)


@dataclass(frozen=True)
class Coarse:
    """The trained partition shared by every IVF shard."""

    quantizer: Any  # faiss.IndexFlatL2: nlist centroids over lifted rows (D+2)
    max_sq_norm: float  # M²: rows with |x|² above it are not lifted (they sit in the overflow)
    trained_rows: int

    @property
    def nlist(self) -> int:
        return int(self.quantizer.ntotal)

    @functools.cached_property
    def list_numbers(self) -> Ids:
        return np.arange(self.nlist, dtype=np.int64)

    @functools.cached_property
    def scoring_panels(self) -> Vectors:
        """The centroids c as rows [c; -|c|²/2] (nlist, D+3), in the scoring kernel's panel layout
        (index_storage.to_panels): a lifted query q' as [q'; 1] scores q'·c - |c|²/2 =
        (|q'|² - |q' - c|²) / 2 against them, so the largest scores are the nearest lists. Scored by
        `service.index._scoring` (what FAISS's flat search does one pair at a time)."""
        centroids = self.quantizer.reconstruct_n(0, self.nlist)  # (nlist, D+2)
        rows = np.empty((len(centroids), centroids.shape[1] + 1), np.float32)
        rows[:, :-1] = centroids
        rows[:, -1] = -0.5 * np.square(centroids.astype(np.float64)).sum(axis=1)
        return to_panels(rows)


@dataclass(frozen=True)
class Shard:
    index: Any  # ListPanels (IVF) or IndexIDMap2(IndexFlatIP) (exact)
    iids: Ids  # sorted: counts a shard's tombstones without touching FAISS

    @property
    def size(self) -> int:
        return len(self.iids)

    @functools.cached_property
    def exact_view(self) -> DeltaView:
        """An exact shard's rows and ids in FAISS's own memory (no copy), as one chunk: searches
        score them with the other exact segments (`index_search.exact_found`). FAISS's own flat
        search takes one dot product at a time for small batches, slower per row. Valid while
        the shard lives: shards are never mutated once published."""
        index: Any = self.index
        n, d = self.size, index.d
        rows, ids = np.empty((0, d), np.float32), np.empty(0, np.int64)
        if n:
            flat: Any = faiss.downcast_index(index.index)  # IndexFlatIP
            rows = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
            ids = faiss.rev_swig_ptr(index.id_map.data(), n)
        ascending = bool((np.diff(ids) > 0).all())
        return DeltaView(((rows, ids),), n, max(n, 1), d, ascending)


@dataclass(frozen=True)
class Base:
    dim: int  # D+1
    shards: tuple[Shard, ...] = ()
    coarse: Coarse | None = None  # None: exact shards
    overflow: DeltaView | None = None  # IVF only: exact rows longer than M

    @property
    def ntotal(self) -> int:
        return sum(s.size for s in self.shards) + (self.overflow.size if self.overflow else 0)

    @property
    def is_ivf(self) -> bool:
        return self.coarse is not None

    def exact_views(self) -> list[DeltaView]:
        """The rows searched exactly: every shard of an exact base, else the IVF overflow."""
        if self.coarse is None:
            return [shard.exact_view for shard in self.shards if shard.size]
        return [self.overflow] if self.overflow is not None and self.overflow.size else []

    def iids(self) -> Ids:
        parts = [s.iids for s in self.shards] + ([self.overflow.arrays()[0]] if self.overflow else [])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def parts(self) -> Iterator[Part]:
        """Every row (D+1, un-lifted) with its id, shard by shard."""
        for shard in self.shards:
            iids, rows, _ = shard_contents(shard, self.coarse)
            yield iids, rows
        if self.overflow is not None and self.overflow.size:
            yield self.overflow.arrays()


# -- building ----------------------------------------------------------------------------------


def auto_nlist(rows: int) -> int:
    """About 2·sqrt(N) lists: ~2,000 at 1M (see benchmarks/index_bench.py for the sweep)."""
    return max(1, round(2 * math.sqrt(rows)))


def build_base(parts: list[Part], dim: int, config: IndexConfig) -> Base:
    """A fresh base over `parts`, which it consumes (pops) so each part can be freed once copied."""
    total = sum(len(p[0]) for p in parts)
    if config.kind != "ivf" or total < config.ivf_min_rows:
        return Base(dim, tuple(_exact_shard(iids, rows) for iids, rows in _regroup(parts, config.shard_rows)))
    coarse = train_coarse(parts, total, config)
    shards: list[Shard] = []
    long_iids: list[Ids] = []
    long_rows: list[Vectors] = []
    for iids, rows in _regroup(parts, config.shard_rows):
        long = np.einsum("nd,nd->n", rows, rows, dtype=np.float64) > coarse.max_sq_norm
        if long.any():  # the longest rows, above the M quantile: exact, in the overflow
            long_iids.append(iids[long])
            long_rows.append(rows[long])
            iids, rows = iids[~long], rows[~long]
        if len(iids):
            shards.append(ivf_shard(coarse, iids, rows))
    overflow = DeltaSegment(dim, max(sum(map(len, long_iids)), 1))
    for iids, rows in zip(long_iids, long_rows, strict=True):
        overflow.append(iids, rows)
    return Base(dim, tuple(shards), coarse, overflow.view())


def train_coarse(parts: list[Part], total: int, config: IndexConfig) -> Coarse:
    """k-means lists over a random sample of the lifted rows; M² = the `lift_quantile` of every
    row's squared norm (rows above it are served exactly from the overflow)."""
    dim = parts[0][1].shape[1]
    # (N,), float64 as every norm test against M² is
    sq_norms = np.concatenate([np.einsum("nd,nd->n", rows, rows, dtype=np.float64) for _, rows in parts])
    max_sq = float(np.quantile(sq_norms, config.lift_quantile)) if len(sq_norms) else 0.0
    del sq_norms
    nlist = min(config.nlist or auto_nlist(total), total)
    n_sample = min(total, nlist * config.train_points_per_list)
    picks = np.sort(np.random.default_rng(1234).choice(total, n_sample, replace=False))
    sample = np.empty((n_sample, dim), np.float32)
    start = 0
    for _, rows in parts:
        lo, hi = np.searchsorted(picks, [start, start + len(rows)])
        sample[lo:hi] = rows[picks[lo:hi] - start]
        start += len(rows)
    lifted = lift(sample, max_sq)  # (S, D+2)
    del sample
    quantizer = faiss.IndexFlatL2(dim + 1)
    clustering = faiss.Clustering(dim + 1, nlist)
    clustering.niter = config.train_iterations
    clustering.seed = 1234  # the same catalogue gets the same lists
    clustering.max_points_per_centroid = 1 << 30  # already sampled above
    clustering.train(lifted, quantizer)
    return Coarse(quantizer, max_sq, total)


def lift(rows: Vectors, max_sq_norm: float) -> Vectors:
    """x' = [x; sqrt(M² - |x|²)], (n, D+2)."""
    out = np.empty((len(rows), rows.shape[1] + 1), np.float32)
    out[:, :-1] = rows
    sq = np.einsum("nd,nd->n", rows, rows, dtype=np.float64)
    out[:, -1] = np.sqrt(np.maximum(max_sq_norm - sq, 0.0))
    return out


def ivf_shard(coarse: Coarse, iids: Ids, rows: Vectors) -> Shard:
    """A shard over rows no longer than M (callers route longer ones to the overflow)."""
    assign = np.empty(len(iids), np.int64)
    for s in range(0, len(iids), _BLOCK):
        assign[s : s + _BLOCK] = coarse.quantizer.search(lift(rows[s : s + _BLOCK], coarse.max_sq_norm), 1)[1][:, 0]
    order = np.argsort(assign, kind="stable")
    return _fill_ivf(coarse, iids[order], rows[order], assign[order])


def _fill_ivf(coarse: Coarse, iids: Ids, rows: Vectors, lists: Ids) -> Shard:
    """`iids`, `rows` (n, D+1) and `lists` already grouped by list number."""
    return Shard(ListPanels.build(iids, rows, lists, coarse.nlist), np.sort(iids))


def _exact_shard(iids: Ids, rows: Vectors) -> Shard:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(rows.shape[1]))
    if len(iids):
        index.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), np.ascontiguousarray(iids, np.int64))
    return Shard(index, np.sort(iids))


def shard_contents(shard: Shard, coarse: Coarse | None) -> tuple[Ids, Vectors, Ids | None]:
    """(ids, rows (n, D+1), list numbers): IVF rows come grouped by list."""
    if coarse is None:
        index: Any = shard.index
        ids: Ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        rows: Vectors = index.index.reconstruct_n(0, shard.size) if shard.size else np.empty((0, index.d), np.float32)
        return ids, rows, None
    lists: ListPanels = shard.index  # published shards are never written again: read without a lock
    return lists.contents()


# -- merging -----------------------------------------------------------------------------------


def is_dead(iids: Ids, killed: Ids) -> npt.NDArray[np.bool_]:
    """Mask of `iids` found in `killed` (sorted)."""
    if not len(killed) or not len(iids):
        return np.zeros(len(iids), dtype=bool)
    at = np.minimum(np.searchsorted(killed, iids), len(killed) - 1)
    found: npt.NDArray[np.bool_] = killed[at] == iids
    return found


def dead_count(shard: Shard, killed: Ids) -> int:
    return int(is_dead(killed, shard.iids).sum()) if len(killed) else 0


def merged_base(base: Base, new: Part, killed: Ids, config: IndexConfig) -> Base:
    """`base` plus the rows of `new`, minus `killed` (sorted) rows where it pays to drop them.

    Incremental unless the kind must change or the IVF lists are stale (rows doubled since
    training, or too many rows overflowed M): then everything is rebuilt, the one path that holds
    two copies of the base. Shards with many tombstones are compacted; others keep theirs.
    """
    keep = ~is_dead(new[0], killed)
    new_iids, new_rows = new[0][keep], new[1][keep]
    dead = [dead_count(s, killed) for s in base.shards]
    overflow_iids, overflow_rows = base.overflow.arrays() if base.overflow else (new_iids[:0], new_rows[:0])
    keep = ~is_dead(overflow_iids, killed)
    overflow_iids, overflow_rows = overflow_iids[keep], overflow_rows[keep]
    live = sum(s.size for s in base.shards) - sum(dead) + len(overflow_iids) + len(new_iids)
    want_ivf = config.kind == "ivf" and live >= config.ivf_min_rows
    coarse = base.coarse
    if coarse is not None and len(new_iids):
        long = np.einsum("nd,nd->n", new_rows, new_rows, dtype=np.float64) > coarse.max_sq_norm
        overflow_iids = np.concatenate([overflow_iids, new_iids[long]])
        overflow_rows = np.concatenate([overflow_rows, new_rows[long]])
        new_iids, new_rows = new_iids[~long], new_rows[~long]
    stale = coarse is not None and (
        live > config.retrain_growth * coarse.trained_rows
        or len(overflow_iids) > config.overflow_rows + (1 - config.lift_quantile) * coarse.trained_rows
    )
    if want_ivf != (coarse is not None) or stale:
        parts: list[Part] = []
        for shard in base.shards:
            iids, rows, _ = shard_contents(shard, coarse)
            keep = ~is_dead(iids, killed)
            parts.append((iids[keep], rows[keep]))
            del iids, rows
        parts += [(overflow_iids, overflow_rows), (new_iids, new_rows)]
        return build_base(parts, base.dim, config)
    shards: list[Shard] = []
    for shard, n_dead in zip(base.shards, dead, strict=True):
        if n_dead > config.merge_dead_fraction / 2 * shard.size:
            shard = _combine([shard], coarse, killed)
        if shard.size:
            shards.append(shard)
    if len(new_iids):
        shards.append(ivf_shard(coarse, new_iids, new_rows) if coarse else _exact_shard(new_iids, new_rows))
    while len(shards) >= 2 and shards[-2].size <= shards[-1].size and \
            shards[-2].size + shards[-1].size <= config.shard_rows:
        shards[-2:] = [_combine(shards[-2:], coarse, killed)]
    overflow = None
    if coarse is not None:
        segment = DeltaSegment(base.dim, max(len(overflow_iids), 1))
        segment.append(overflow_iids, overflow_rows)
        overflow = segment.view()
    return Base(base.dim, tuple(shards), coarse, overflow)


def _combine(shards: list[Shard], coarse: Coarse | None, killed: Ids) -> Shard:
    """One shard with the live rows of `shards`; IVF rows keep their lists (no re-assignment)."""
    contents = [shard_contents(s, coarse) for s in shards]
    iids = np.concatenate([c[0] for c in contents])
    keep = ~is_dead(iids, killed)
    rows = np.concatenate([c[1] for c in contents])[keep]
    if coarse is None:
        return _exact_shard(iids[keep], rows)
    lists = np.concatenate([c[2] for c in contents if c[2] is not None])[keep]
    order = np.argsort(lists, kind="stable")
    return _fill_ivf(coarse, iids[keep][order], rows[order], lists[order])


def _regroup(parts: list[Part], rows_per_group: int) -> Iterator[Part]:
    """Consecutive groups of up to `rows_per_group` rows, popping parts as they are copied."""
    while parts:
        ids: list[Ids] = []
        vectors: list[Vectors] = []
        n = 0
        while parts and n < rows_per_group:
            iids, rows = parts[0]
            take = min(len(iids), rows_per_group - n)
            ids.append(iids[:take])
            vectors.append(rows[:take])
            n += take
            if take == len(iids):
                parts.pop(0)
            else:
                parts[0] = (iids[take:], rows[take:])
        if n:
            yield np.concatenate(ids), np.concatenate(vectors)
