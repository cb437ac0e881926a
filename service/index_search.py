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

from service._scoring import inner_products, inner_products_panels, select_best
from service.index_base import Base, Coarse, Shard
from service.index_storage import (
    PANEL,
    Banned,
    DeltaView,
    Found,
    Ids,
    ItemTable,
    Scores,
    Vectors,
    best_rows,
    mask_banned,
    top_k,
)


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
    """Each IVF shard's best k per query (B, D+1) without its banned ids. FAISS cannot skip ids,
    so a shard is asked for k more per banned id it holds, and the caller drops them. The base's
    exact rows (an exact base's shards, an IVF base's overflow) are scored with the other exact
    segments: `exact_found` over `Base.exact_views`."""
    shards = [s for s in base.shards if s.size]
    if base.coarse is None or not shards:
        return []
    fetch = [k + _held(shard.iids, banned) for shard in shards]
    found: list[Found] = []
    for kk, (scores, iids) in zip(fetch, _search_ivf(base.coarse, shards, queries, fetch, nprobe), strict=True):
        full = (iids[:, -1] >= 0) & (scores.shape[1] == kk)  # kk rows found: more may lie below
        found.append(Found(scores, iids, np.where(full, scores[:, -1], -np.inf).astype(np.float32)))
    return found


class _Part(NamedTuple):
    """Rows of one exact segment scored in one group: in the kernel's panels when the segment
    has them, else as rows; ids ascending or not."""

    rows: Vectors  # (n, D+1)
    panels: Vectors | None  # (ceil(n/16), D+1, 16) or None
    iids: Ids  # (n,)
    ascending: bool


def exact_found(views: Sequence[DeltaView], queries: Vectors, k: int, banned: Banned,
                group_rows: int | None = None, *, once: DeltaView | None = None) -> list[Found]:
    """The best k per query (B, D+1) of every exact row (pinned, exact shards or overflow, frozen
    and live delta), banned ids left out. Rows are scored in groups of up to EXACT_GROUP, each one
    score matrix and one selection: a small catalogue is one group, where each segment on its own
    paid its own masking and selection; a large one never holds a (B, N) matrix.

    `views` are scored from their cached panels (`DeltaView.panels`); `once`, a view of this search
    alone (the live delta), from its rows."""
    size = group_rows or EXACT_GROUP
    parts = []
    for view in views if once is None else [*views, once]:
        panels: Sequence[Vectors | None] = view.panels if view is not once else [None] * len(view.chunks)
        for (vectors, iids), panel in zip(view.parts(), panels, strict=False):
            for at in range(0, len(iids), size):
                rows = vectors[at : at + size]
                # a slice that starts a panel is scored from the panels it spans (the last may reach past it)
                sliced = panel[at // PANEL : at // PANEL - (-len(rows) // PANEL)] \
                    if panel is not None and at % PANEL == 0 else None
                parts.append(_Part(rows, sliced, iids[at : at + size], view.ascending))
    groups: list[list[_Part]] = []
    filled = size
    for part in parts:
        if filled + len(part.iids) > size:  # the part opens a new group
            groups.append([])
            filled = 0
        groups[-1].append(part)
        filled += len(part.iids)
    return [_exact_group(group, queries, k, banned) for group in groups]


EXACT_GROUP = 65_536  # rows per score matrix: (16, 65,536) float32 is 4 MB


def _exact_group(parts: list[_Part], queries: Vectors, k: int, banned: Banned) -> Found:
    n = sum(len(part.iids) for part in parts)
    scores = np.empty((len(queries), n), np.float32)  # (B, n)
    at = 0
    for part in parts:  # every query in one pass over the rows
        if part.panels is not None:
            inner_products_panels(queries, part.panels, len(part.iids), scores[:, at : at + len(part.iids)])
        else:
            inner_products(queries, part.rows, scores[:, at : at + len(part.iids)])
        at += len(part.iids)
    at = 0
    for part in parts:
        mask_banned(scores[:, at : at + len(part.iids)], part.iids, banned, part.ascending)
        at += len(part.iids)
    iids = np.concatenate([part.iids for part in parts]) if len(parts) > 1 else parts[0].iids
    return _best(scores, iids, k)


TIE_ROOM = 64  # candidates beyond k that `select_best` keeps for scores tied with the k-th


def _best(scores: Scores, iids: Ids, k: int) -> Found:
    """`best_rows` by the C selection (one pass, ~4x faster than NumPy's partition at 10k rows); the
    few queries with more ties at the k-th score than TIE_ROOM fall back to `best_rows`."""
    n = len(scores)
    out_scores, out_iids = np.empty((n, k + TIE_ROOM), np.float32), np.empty((n, k + TIE_ROOM), np.int64)
    count, bound = np.empty(n, np.int64), np.empty(n, np.float32)
    select_best(scores, iids, k, out_scores, out_iids, count, bound)
    if (count < 0).any():
        return best_rows(scores, iids, k)
    width = max(int(count.max()), 1)
    return Found(out_scores[:, :width], out_iids[:, :width], bound)


def prepare_segments(base: Base, pinned: DeltaView) -> None:
    """Lay out the rows a search scores exactly, and the IVF centroids, in the scoring kernel's panels
    now (they are cached on their segments) rather than inside the first search that reads them:
    called when an index is built, merged or loaded."""
    for view in (pinned, *base.exact_views()):
        _ = view.panels
    if base.coarse is not None:
        _ = base.coarse.scoring_panels


def _held(sorted_iids: Ids, banned: Banned) -> int:
    """The most banned ids that the shard's sorted ids hold for one query."""
    if not len(sorted_iids) or not banned.any:
        return 0
    at = np.minimum(sorted_iids.searchsorted(banned.ids), len(sorted_iids) - 1)
    return int(np.bincount(banned.owner[sorted_iids[at] == banned.ids], minlength=1).max())


def _search_ivf(
    coarse: Coarse, shards: Sequence[Shard], queries: Vectors, k: int | Sequence[int], nprobe: int
) -> list[tuple[Scores, Ids]]:
    """Each shard's top-k (B, k_s) best first, k per shard or one for all; empty shards skipped."""
    n, dim = queries.shape
    scored = np.zeros((n, dim + 2), np.float32)  # (B, D+3): [q'; 1] with q' = [q; 0]
    scored[:, :dim] = queries
    scored[:, -1] = 1.0
    lifted = scored[:, :-1].copy()  # (B, D+2): contiguous, as FAISS reads it
    q_sq = np.square(queries.astype(np.float64)).sum(axis=1, keepdims=True)  # (B, 1): |q|² = |q'|²
    lists, coarse_dist = _nearest_lists(coarse, scored, q_sq, min(nprobe, coarse.nlist))  # once for all shards
    params = _ivf_params(lists.shape[1])
    # |q' - x'|² = |q|² + M² - 2 q·x, so q·x = (|q|² + M² - distance) / 2
    offset = q_sq + coarse.max_sq_norm  # (B, 1)
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


def _nearest_lists(coarse: Coarse, scored: Vectors, q_sq: npt.NDArray[np.float64], nprobe: int) -> tuple[Ids, Scores]:
    """Each query's `nprobe` nearest lists (B, nprobe), nearest first, and their squared L2
    distances, from one exact scoring of every centroid (Coarse.scoring_panels); `scored` holds the
    queries as [q'; 1] (B, D+3), `q_sq` their |q'|² (B, 1)."""
    n, nlist = len(scored), coarse.nlist
    scores = np.empty((n, nlist), np.float32)  # (B, nlist): (|q'|² - |q' - c|²) / 2
    inner_products_panels(scored, coarse.scoring_panels, nlist, scores)
    best, lists = np.empty((n, nprobe + TIE_ROOM), np.float32), np.empty((n, nprobe + TIE_ROOM), np.int64)
    count = np.empty(n, np.int64)
    # best first, ties by list number; a NaN query gets none, padded with list -1, which FAISS skips
    select_best(scores, coarse.list_numbers, nprobe, best, lists, count, np.empty(n, np.float32))
    for b in (count < 0).nonzero()[0].tolist():  # more lists tied at the nprobe-th than the room (degenerate)
        lists[b, :nprobe] = (-scores[b]).argsort(kind="stable")[:nprobe]
        best[b, :nprobe] = scores[b, lists[b, :nprobe]]
    dist = np.ascontiguousarray(q_sq - 2.0 * best[:, :nprobe], dtype=np.float32)
    return np.ascontiguousarray(lists[:, :nprobe]), dist


@functools.lru_cache(maxsize=64)
def _ivf_params(nprobe: int) -> Any:
    """Read-only search parameters, shared by concurrent searches (building one costs ~5 µs)."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    return params


def banned_mask(iids: Ids, banned: Banned) -> npt.NDArray[np.bool_]:
    """(B, S): whether candidate iids[b, s] is among query b's banned ids, for all queries in one
    binary search: keys (b, iid) as b·2^40 + iid (ids stay below 2^40), sorted by query then id."""
    if not banned.any:
        return np.zeros(iids.shape, dtype=bool)
    keys = banned.keys
    wanted = (np.arange(len(iids), dtype=np.int64)[:, None] << 40) + iids  # (B, S)
    at = np.minimum(keys.searchsorted(wanted), len(keys) - 1)
    found: npt.NDArray[np.bool_] = (keys[at] == wanted) & (iids >= 0)
    return found


def head_hits(item_of: ItemTable, scores: list[float], iids: list[int], k: int, excluded: Set[str],
              more: bool) -> list[Hit] | None:
    """The best k of one query's first candidates (sorted best first; `more`: further candidates
    follow these) when the first k are all live and allowed, the common case, in a few C-level
    calls; None otherwise (`collect` decides). Candidates tied with the k-th score are taken too,
    and ranked by id."""
    valid = len(scores) - scores.count(-math.inf)  # -inf (dropped or padding) only at the tail
    if valid < k:
        return None
    end = k
    while end < valid and scores[end] == scores[k - 1]:
        end += 1
    if end == len(scores) and more:  # the ties may go on past these candidates
        return None
    ids, cold = item_of.items_at(iids[:end])
    if None in ids or not excluded.isdisjoint(ids):  # a tombstone, or an upsert racing the exclusion
        return None
    hits = list(map(_new_hit, zip(ids, scores[:end], cold, strict=True)))
    if len(set(scores[:end])) < end:  # ties (rare): order them by id
        hits.sort(key=lambda h: (-h.score, h.item_id))
    return hits[:k]


_new_hit = functools.partial(tuple.__new__, Hit)  # Hit from a tuple without a Python-level call


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
