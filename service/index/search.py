"""How a batch of queries is answered by the index's segments: each segment's candidates
(`Found`), the exclusions dropped, and the best k live items picked per query.

`VectorIndex.search` (vector_index.py) drives these; `search_base` is the approximate base alone,
for recall measurements against exact search.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence, Set
from typing import NamedTuple

import numpy as np

from service.index._scoring import inner_products, inner_products_panels, ivf_search, select_best
from service.index.base import Base, Coarse
from service.index.storage import (
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
    """The shards' top-k (one for all IVF shards, one per exact shard) and the overflow's, (B, <=k)
    best first, unmerged: the caller merges them with its other segments in one sort."""
    found: list[tuple[Scores, Ids]] = []
    if base.coarse is None:
        for shard in base.shards:
            if shard.size:
                found.append(shard.index.search(queries, min(k, shard.size)))
    else:
        found += [(f.scores, f.iids) for f in base_found(base, queries, k, Banned.none(len(queries)), nprobe)]
    if base.overflow is not None and base.overflow.size:
        found.append(base.overflow.search(queries, k))
    return found


def base_found(base: Base, queries: Vectors, k: int, banned: Banned, nprobe: int,
               floors: Scores | None = None) -> list[Found]:
    """The IVF shards' best k per query (B, D+1) without its banned ids, in one `ivf_search` over
    every shard; nothing for an exact base. The base's exact rows (an exact base's shards, an IVF
    base's overflow) are scored with the other exact segments: `exact_found` over
    `Base.exact_views`.

    `floors` (B,): a score each query's answer already has k candidates at or above (`floors_of`
    the exact segments' results); rows below it cannot make the cut and are passed over, most of
    the selection's work when the exact segments hold the best rows."""
    if base.coarse is None:
        return []
    shards = [s.index.kernel_args for s in base.shards if s.size]
    if not shards:
        return []
    lists = _nearest_lists(base.coarse, queries, min(nprobe, base.coarse.nlist))  # once for all shards
    n, room = len(queries), k + TIE_ROOM
    floors = np.full(n, -np.inf, np.float32) if floors is None else floors
    while True:
        scores, iids = np.empty((n, room), np.float32), np.empty((n, room), np.int64)
        count, bound = np.empty(n, np.int64), np.empty(n, np.float32)
        ivf_search(queries, lists, shards, banned.keys, k, floors, scores, iids, count, bound)
        width = int(count.max(initial=0))
        if width <= room:
            break
        room = width  # more rows tied with a k-th score than TIE_ROOM (degenerate): again, with room for all
    width = max(width, 1)
    return [Found(scores[:, :width], iids[:, :width], bound)]


def floors_of(found: Sequence[Found]) -> Scores | None:
    """(B,) per query, the highest of the segments' bounds (None without segments): each is a k-th
    score with k candidates at or above it, so no row below it can be among the best k (ties at it
    can)."""
    if not found:
        return None
    floors: Scores = np.max([f.bound for f in found], axis=0).astype(np.float32)
    return floors


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
    """`best_rows` by the C selection (`select_best`: block maxima bound the k-th score, then only
    the blocks reaching it are read); the few queries with more ties at the k-th score than
    TIE_ROOM fall back to `best_rows`."""
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


def _nearest_lists(coarse: Coarse, queries: Vectors, nprobe: int) -> Ids:
    """Each query's `nprobe` nearest lists (B, nprobe), nearest first, from one exact scoring of
    every centroid (Coarse.scoring_panels) against the lifted queries [q'; 1] = [q; 0; 1]."""
    n, dim = queries.shape
    scored = np.zeros((n, dim + 2), np.float32)  # (B, D+3)
    scored[:, :dim] = queries
    scored[:, -1] = 1.0
    nlist = coarse.nlist
    scores = np.empty((n, nlist), np.float32)  # (B, nlist): (|q'|² - |q' - c|²) / 2
    inner_products_panels(scored, coarse.scoring_panels, nlist, scores)
    best, lists = np.empty((n, nprobe + TIE_ROOM), np.float32), np.empty((n, nprobe + TIE_ROOM), np.int64)
    count = np.empty(n, np.int64)
    # best first, ties by list number; a NaN query gets none, padded with list -1, which the scan skips
    select_best(scores, coarse.list_numbers, nprobe, best, lists, count, np.empty(n, np.float32))
    for b in (count < 0).nonzero()[0].tolist():  # more lists tied at the nprobe-th than the room (degenerate)
        lists[b, :nprobe] = (-scores[b]).argsort(kind="stable")[:nprobe]
    return np.ascontiguousarray(lists[:, :nprobe])


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
