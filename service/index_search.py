"""How a batch of queries is answered by the index's segments: each segment's candidates
(`Found`), the exclusions dropped, and the best k live items picked per query.

`VectorIndex.search` (service/index.py) drives these; `search_base` is the approximate base alone,
for recall measurements against exact search.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence, Set
from typing import Any, NamedTuple

import faiss
import numpy as np
import numpy.typing as npt

from service.index_base import Base, Coarse, Shard
from service.index_storage import Banned, DeltaView, Found, Ids, ItemTable, Scores, Vectors, top_k


class Hit(NamedTuple):
    item_id: str
    score: float
    is_cold: bool


def search_base(base: Base, queries: Vectors, k: int, nprobe: int) -> tuple[Scores, Ids]:
    """(B, k') scores h·v + b and ids, best first, k' = min(k, ntotal); IVF pads with id -1."""
    found = search_shards(base, queries, k, nprobe)
    if not found:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    return top_k(found, k)


def search_shards(base: Base, queries: Vectors, k: int, nprobe: int) -> list[tuple[Scores, Ids]]:
    """Each non-empty shard's (and the overflow's) top-k, (B, <=k) best first, unmerged: the caller
    merges them with its other segments in one sort."""
    found: list[tuple[Scores, Ids]] = []
    if base.coarse is None:
        for shard in base.shards:
            if shard.size:
                found.append(shard.index.search(queries, min(k, shard.size)))
    elif base.shards:
        found += _search_ivf(base.coarse, base.shards, queries, k, nprobe)
    if base.overflow is not None and base.overflow.size:
        found.append(base.overflow.search(queries, k))
    return found


def base_found(base: Base, queries: Vectors, k: int, banned: Banned, nprobe: int) -> list[Found]:
    """Each shard's and the overflow's best k per query (B, D+1) without its banned ids (sorted, per
    query). FAISS cannot skip ids, so a shard is asked for k more per banned id it holds, and the
    caller drops them; the overflow drops them itself."""
    found: list[Found] = []
    shards = [s for s in base.shards if s.size]
    fetch = [k + _held(shard.iids, banned) for shard in shards]
    if base.coarse is None:
        for shard, kk in zip(shards, fetch, strict=True):
            kk = min(kk, shard.size)
            scores, iids = shard.index.search(queries, kk)  # (B, kk) best first
            bound = scores[:, -1] if kk < shard.size else np.full(len(queries), -np.inf, np.float32)
            found.append(Found(scores, iids, bound))
    elif shards:
        for kk, (scores, iids) in zip(fetch, _search_ivf(base.coarse, shards, queries, fetch, nprobe), strict=True):
            full = (iids[:, -1] >= 0) & (scores.shape[1] == kk)  # kk rows found: more may lie below
            found.append(Found(scores, iids, np.where(full, scores[:, -1], -np.inf).astype(np.float32)))
    if base.overflow is not None and base.overflow.size:
        top = base.overflow.top(queries, k, banned)
        if top is not None:
            found.append(top)
    return found


def _held(sorted_iids: Ids, banned: Banned) -> int:
    """The most banned ids that the shard's sorted ids hold for one query."""
    if not len(sorted_iids) or not banned.any:
        return 0
    at = np.minimum(np.searchsorted(sorted_iids, banned.ids), len(sorted_iids) - 1)
    return int(np.bincount(banned.owner[sorted_iids[at] == banned.ids], minlength=1).max())


def _search_ivf(
    coarse: Coarse, shards: Sequence[Shard], queries: Vectors, k: int | Sequence[int], nprobe: int
) -> list[tuple[Scores, Ids]]:
    """Each shard's top-k (B, k_s) best first, k per shard or one for all; empty shards skipped."""
    n = len(queries)
    lifted = np.zeros((n, queries.shape[1] + 1), np.float32)  # (B, D+2): q' = [q; 0]
    lifted[:, :-1] = queries
    nprobe = min(nprobe, coarse.nlist)
    coarse_dist = np.empty((n, nprobe), np.float32)
    lists = np.empty((n, nprobe), np.int64)  # (B, nprobe): assigned once for all shards
    coarse.quantizer.search_c(n, faiss.swig_ptr(lifted), nprobe, faiss.swig_ptr(coarse_dist), faiss.swig_ptr(lists))
    params = _ivf_params(nprobe)
    # |q' - x'|² = |q|² + M² - 2 q·x, so q·x = (|q|² + M² - distance) / 2
    q64 = queries.astype(np.float64)
    offset = np.square(q64).sum(axis=1, keepdims=True) + coarse.max_sq_norm  # (B, 1)
    out = []
    for s, shard in enumerate(shards):
        kk = min(k if isinstance(k, int) else k[s], shard.size)
        if kk == 0:
            continue
        dist = np.empty((n, kk), np.float32)
        iids = np.empty((n, kk), np.int64)
        shard.index.search_preassigned_c(
            n, faiss.swig_ptr(lifted), kk, faiss.swig_ptr(lists), faiss.swig_ptr(coarse_dist),
            faiss.swig_ptr(dist), faiss.swig_ptr(iids), False, params,
        )
        scores = ((offset - dist) * 0.5).astype(np.float32)
        if (iids[:, -1] < 0).any():  # fewer than kk rows in the probed lists: FAISS pads the tail
            scores[iids < 0] = -np.inf
        out.append((scores, iids))
    return out


@functools.lru_cache(maxsize=64)
def _ivf_params(nprobe: int) -> Any:
    """Read-only search parameters, shared by concurrent searches (building one costs ~5 µs)."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    return params


def segment_found(segment: Any, queries: Vectors, k: int, banned: Banned, nprobe: int) -> list[Found]:
    if isinstance(segment, DeltaView):
        top = segment.top(queries, k, banned)
        return [] if top is None else [top]
    return base_found(segment, queries, k, banned, nprobe)


def banned_mask(iids: Ids, banned: Banned) -> npt.NDArray[np.bool_]:
    """(B, S): whether candidate iids[b, s] is among query b's banned ids, for all queries in one
    binary search: keys (b, iid) as b·2^40 + iid (ids stay below 2^40), sorted by query then id."""
    if not banned.any:
        return np.zeros(iids.shape, dtype=bool)
    keys = (banned.owner << 40) + banned.ids
    wanted = (np.arange(len(iids), dtype=np.int64)[:, None] << 40) + iids  # (B, S)
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found: npt.NDArray[np.bool_] = (keys[at] == wanted) & (iids >= 0)
    return found


def collect(item_of: ItemTable, scores: Scores, iids: Ids, k: int, excluded: Set[str]) -> list[Hit]:
    """The best k live, allowed hits among one query's candidates (sorted best first; dropped
    candidates carry -inf).

    `item_of` is read without a lock (one slot is read atomically). Stops at the first candidate
    below the k-th hit: Python touches about k + skipped rows, not every candidate of every
    segment (it converts a few more than k at a time).
    """
    hits: list[Hit] = []
    step = k + 8
    for start in range(0, len(iids), step):
        chunk_iids = iids[start : start + step].tolist()
        for score, iid, item in zip(scores[start : start + step].tolist(), chunk_iids,
                                    item_of.get_many(chunk_iids), strict=True):
            if iid < 0 or score == -math.inf or (len(hits) >= k and score < hits[-1].score):
                return ranked(hits, k)
            if item is not None and item[0] not in excluded:
                hits.append(Hit(item[0], score, item[1]))
    return ranked(hits, k)


def ranked(hits: list[Hit], k: int) -> list[Hit]:
    """Hits in descending score order, ties by item id, the first k."""
    if len({h.score for h in hits}) < len(hits):  # ties (rare): order them by id
        hits.sort(key=lambda h: (-h.score, h.item_id))
    return hits[:k]
