"""The storage behind `service.index.VectorIndex`; nothing here ever grows by copying everything.

At a million items any structure that grows by reallocation (a FAISS flat index's std::vector, a
Python dict's rehash) stalls its writer, and the readers waiting on it, while it copies. So:

- `DeltaSegment`: recent adds, exact, in fixed-size NumPy chunks. Rows below the published size
  are never written again, so readers scan them without a lock.
- the base (`service.index.base`): FAISS shards keyed by internal int64 ids, never mutated once
  published; merges build new shards off-line.
- `ItemTable` (internal id -> item) in flat lists that grow by copying pointers only, and `IdMap`
  (item id -> internal id) over many small dicts, so neither rehashes the whole catalogue inside an add.

Rows are [v; b] and queries [h; 1], so every score here is h·v + b.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Collection
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any, Literal, NamedTuple

import faiss
import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]  # (N, D+1)
Ids = npt.NDArray[np.int64]  # (N,)
Scores = npt.NDArray[np.float32]


class Found(NamedTuple):
    """One segment's candidates for B queries, in any order within a row: scores and internal ids
    (B, n), and per query the lowest score returned when the segment may hold more rows below it
    (else -inf). Id -1 and score -inf pad rows with fewer candidates."""

    scores: Scores  # (B, n)
    iids: Ids  # (B, n)
    bound: npt.NDArray[np.float32]  # (B,)


class Banned:
    """Each query's excluded internal ids as (query, id) pairs sorted by query then id: segments
    locate them for the whole batch with one binary search."""

    def __init__(self, owner: Ids, ids: Ids, queries: int) -> None:
        keys = (owner << 40) | ids  # ids stay below 2^40
        keys.sort()
        self.keys: Ids = keys  # query·2^40 + id, ascending
        self.owner: Ids = keys >> 40  # (n,) the query of each banned id
        self.ids: Ids = keys & ((1 << 40) - 1)  # (n,)
        self.queries = queries
        self.any = bool(len(keys))

    @classmethod
    def none(cls, queries: int) -> Banned:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), queries)

    @property
    def per_query(self) -> list[Ids]:
        """Each query's banned ids, sorted."""
        return np.split(self.ids, np.searchsorted(self.owner, np.arange(1, self.queries)))

    def subset(self, queries: list[int]) -> Banned:
        """The banned ids of `queries` (ascending), renumbered 0.. in that order."""
        position = np.full(self.queries, -1, np.int64)
        position[queries] = np.arange(len(queries))
        owner = position[self.owner]
        keep = owner >= 0
        return Banned(owner[keep], self.ids[keep], len(queries))


def mask_banned(scores: Scores, iids: Ids, banned: Banned, ascending: bool) -> None:
    """Set to -inf, in place, each query's score (B, n) of the rows whose ids (n,) are in its
    banned ids: one binary search for the whole batch when `iids` is ascending."""
    n = len(iids)
    if not n or not banned.any:
        return
    if ascending:
        at = np.minimum(iids.searchsorted(banned.ids), n - 1)
        hit = iids[at] == banned.ids
        scores[banned.owner[hit], at[hit]] = -np.inf
        return
    for b, ban in enumerate(banned.per_query):
        if len(ban):
            at = np.minimum(ban.searchsorted(iids), len(ban) - 1)
            scores[b, ban[at] == iids] = -np.inf


def take_rows(values: npt.NDArray[Any], columns: Ids) -> npt.NDArray[Any]:
    """values[b, columns[b, j]] (B, m): np.take_along_axis without its Python-level set-up."""
    picked: npt.NDArray[Any] = values[np.arange(len(values))[:, None], columns]
    return picked


PANEL = 16  # rows per panel of service/index/_scoring.c


def to_panels(rows: Vectors) -> Vectors:
    """Rows (n, d) as (ceil(n/16), d, 16) panels, panels[p, j, i] = rows[16p + i, j], zeros past
    the last row: `service.index._scoring.inner_products_panels` then scores them without transposing."""
    n, d = rows.shape
    padded = np.zeros((-(-n // PANEL) * PANEL, d), np.float32)
    padded[:n] = rows
    return np.ascontiguousarray(padded.reshape(-1, PANEL, d).transpose(0, 2, 1))


def best_rows(scores: Scores, iids: Ids, k: int) -> Found:
    """The k best of exact scores (B, n) over rows with ids (n,), per query, unsorted; every row
    tied with a query's k-th score comes too (the caller ranks ties by item id, so which of them
    make the cut must not be left to the partition), and then a few more for the other queries."""
    n = scores.shape[1]
    if n <= k:
        return Found(scores, np.broadcast_to(iids, scores.shape), np.full(len(scores), -np.inf, np.float32))
    top = scores.argpartition(n - k, axis=1)[:, n - k :]  # (B, k): each row's k largest
    best = take_rows(scores, top)
    low = best.min(axis=1)  # (B,) each query's k-th score
    width = int((scores >= low[:, None]).sum(axis=1).max())  # k, unless ties straddle the cut
    if width > k:
        top = scores.argpartition(n - width, axis=1)[:, n - width :]
        best = take_rows(scores, top)
        low = best.min(axis=1)
    return Found(best, iids[top], low)


@dataclass(frozen=True)
class IndexConfig:
    """How the index trades exactness, memory and merge cost; saved nowhere, passed at load."""

    kind: Literal["exact", "ivf"] = "exact"
    nlist: int | None = None  # IVF lists; None: about 2·sqrt(N) at each (re)training
    nprobe: int = 16  # IVF lists scanned per query (recall against latency: benchmarks/index_bench.py)
    ivf_min_rows: int = 50_000  # below this an exact base is fast enough and needs no training
    train_points_per_list: int = 40  # k-means sample per list; bounds training time at 1M rows
    train_iterations: int = 10  # k-means iterations
    retrain_growth: float = 2.0  # retrain IVF once live rows exceed this multiple of the trained size
    lift_quantile: float = 0.999  # M of the MIPS->L2 lift: this quantile of row norms; longer rows stay exact
    overflow_rows: int = 4096  # rows longer than M, beyond the quantile's share, kept exact before retraining
    shard_rows: int = 262_144  # largest shard a merge builds by combining smaller ones
    merge_delta_rows: int = 8192  # delta rows that start a background merge
    merge_dead_fraction: float = 0.1  # tombstones, as a share of live rows, that start a merge
    delta_chunk_rows: int = 4096
    auto_merge: bool = True  # False: merges only when `merge()` is called


@dataclass(frozen=True)
class DeltaView:
    """An immutable window on a delta: the chunks and the row count at one instant."""

    chunks: tuple[tuple[Vectors, Ids], ...]
    size: int
    chunk_rows: int
    dim: int
    ascending: bool = True  # ids in increasing order, as the index's appends make them

    def parts(self) -> list[tuple[Vectors, Ids]]:
        parts = []
        for c, (vectors, iids) in enumerate(self.chunks):
            rows = min(self.chunk_rows, self.size - c * self.chunk_rows)
            if rows > 0:
                parts.append((vectors[:rows], iids[:rows]))
        return parts

    @functools.cached_property
    def panels(self) -> list[Vectors]:
        """Each part's rows in the scoring kernel's layout (`to_panels`), made on first use: for the
        views a search reads again and again (pinned, exact shards, overflow, frozen deltas), never
        for the live delta's view of one search. Rows below `size` never change, so they stay valid."""
        return [to_panels(vectors) for vectors, _ in self.parts()]

    @functools.cached_property
    def sorted_iids(self) -> Ids:
        """Every id of the view, ascending (computed once per view: a search reads the pinned
        segment's on every call)."""
        iids = self.arrays()[0]
        return iids if self.ascending else np.sort(iids)

    def arrays(self) -> tuple[Ids, Vectors]:
        parts = self.parts()
        if not parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[0] for p in parts])

    def search(self, queries: Vectors, k: int) -> tuple[Scores, Ids]:
        """Exact top-k, (B, min(k, size)) scores and ids, best first.

        FAISS's brute force, not `queries @ rows.T`: NumPy's BLAS runs its own threads, and on a
        busy machine a small product waits for them far longer than FAISS takes to scan the rows.
        """
        parts = self.parts()
        if not parts:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        found = []
        for vectors, iids in parts:
            scores, rows = faiss.knn(queries, vectors, min(k, len(iids)), metric=faiss.METRIC_INNER_PRODUCT)
            found.append((scores, iids[rows]))  # (B, k'): a chunk never has fewer rows than k'
        return top_k(found, k)


def top_k(found: list[tuple[Scores, Ids]], k: int) -> tuple[Scores, Ids]:
    """Merge per-segment results (each best first) into the best k per query, best first."""
    if len(found) == 1:
        return found[0][0][:, :k], found[0][1][:, :k]
    scores = np.concatenate([f[0] for f in found], axis=1)  # (B, S)
    iids = np.concatenate([f[1] for f in found], axis=1)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.argsort(-scores, axis=1)
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(iids, top, axis=1)


class DeltaSegment:
    """Append-only; the caller serialises `append` and `view` (the index lock)."""

    def __init__(self, dim: int, chunk_rows: int) -> None:
        self.dim = dim
        self.chunk_rows = chunk_rows
        self._chunks: list[tuple[Vectors, Ids]] = []
        self.size = 0
        self.ascending = True  # every id larger than the one before: searches find ids by bisection
        self._last_iid = -1

    def append(self, iids: Ids, vectors: Vectors) -> None:
        if len(iids):
            if iids[0] <= self._last_iid or (len(iids) > 1 and bool((np.diff(iids) <= 0).any())):
                self.ascending = False
            self._last_iid = int(iids[-1])
        done = 0
        while done < len(iids):
            if self.size == len(self._chunks) * self.chunk_rows:
                # a new chunk instead of growing one: no copy of existing rows, ever
                self._chunks.append(
                    (np.empty((self.chunk_rows, self.dim), np.float32), np.empty(self.chunk_rows, np.int64))
                )
            chunk_vectors, chunk_iids = self._chunks[-1]
            at = self.size % self.chunk_rows
            n = min(self.chunk_rows - at, len(iids) - done)
            chunk_vectors[at : at + n] = vectors[done : done + n]
            chunk_iids[at : at + n] = iids[done : done + n]
            done += n
            self.size += n  # published after the rows are written

    def view(self) -> DeltaView:
        return DeltaView(tuple(self._chunks), self.size, self.chunk_rows, self.dim, self.ascending)

    def take(self) -> list[tuple[Ids, Vectors]]:
        """Hand over every row as (ids, rows) parts and empty the segment: the caller may free them."""
        parts = [(iids, vectors) for vectors, iids in self.view().parts()]
        self._chunks, self.size = [], 0
        self.ascending, self._last_iid = True, -1
        return parts


# -- id tables ---------------------------------------------------------------------------------

Item = tuple[str, bool]  # (item id, is cold)
_ID_SHARDS = 256


class ItemTable:
    """Internal id -> item, by position: internal ids are dense and never reused.

    Two flat lists (item id or None; cold flag), so the ids of a query's candidates are one C-level
    `itemgetter` call rather than a Python step each. Growing a list copies only its pointers (8 MB
    at a million ids), never rehashes like a dict. A removed id keeps an empty
    slot. Reads need no lock: the lists only grow, and list indexing and slot assignment are atomic
    under the GIL; a slot's flag is written before its id; the caller serialises writes.
    """

    def __init__(self) -> None:
        self._ids: list[str | None] = []
        self._cold: list[bool] = []

    def get(self, iid: int) -> Item | None:
        ids = self._ids
        item_id = ids[iid] if 0 <= iid < len(ids) else None
        return None if item_id is None else (item_id, self._cold[iid])

    def get_many(self, iids: list[int]) -> list[Item | None]:
        """`get` of each id (padding ids < 0 give None)."""
        return [self.get(iid) for iid in iids]

    def items_at(self, iids: list[int]) -> tuple[tuple[str | None, ...], tuple[bool, ...]]:
        """(item ids, cold flags) at internal ids that are all >= 0 and were issued: None marks a
        removed item. Two C-level calls however many ids."""
        if len(iids) == 1:
            return (self._ids[iids[0]],), (self._cold[iids[0]],)
        if not iids:
            return (), ()
        pick = itemgetter(*iids)
        return pick(self._ids), pick(self._cold)

    def set(self, iid: int, item: Item) -> None:
        grow = iid + 1 - len(self._ids)
        if grow > 0:  # flags first: a reader that finds a slot finds its flag
            self._cold.extend([False] * grow)
            self._ids.extend([None] * grow)
        self._cold[iid] = item[1]
        self._ids[iid] = item[0]

    def pop(self, iid: int) -> Item:
        item = self.get(iid)
        if item is None:
            raise KeyError(iid)
        self._ids[iid] = None
        return item


class IdMap:
    """Item id -> internal id: dicts for the ids present at the last `freeze` (start-up), read with
    C-level `map` on the request path, and many small dicts for later adds, so a resize rehashes
    1/256 of those instead of the whole catalogue. An id is in exactly one of them.

    Of the frozen ids, the `hot` ones (the pinned trained items, most of any user's history) get a
    dict of their own: a few thousand entries stay in the CPU cache, where lookups in the million-
    entry dict miss it."""

    def __init__(self) -> None:
        self._hot: dict[str, int] = {}  # never grows after `freeze`: only pops
        self._frozen: dict[str, int] = {}  # never grows after `freeze`: only pops
        self._shards: list[dict[str, int]] = [{} for _ in range(_ID_SHARDS)]
        self._size = 0

    def freeze(self, hot: Collection[str] = ()) -> None:
        """Move every id into the frozen dicts (one O(n) copy, before the index serves)."""
        for shard in self._shards:
            self._frozen.update(shard)
            shard.clear()
        frozen = self._frozen
        self._hot.update((item_id, frozen.pop(item_id)) for item_id in hot if item_id in frozen)

    def get(self, item_id: str) -> int | None:
        iid = self._hot.get(item_id)
        if iid is None:
            iid = self._frozen.get(item_id)
        return iid if iid is not None else self._shards[hash(item_id) % _ID_SHARDS].get(item_id)

    def lookup(self, item_ids: list[str]) -> Ids:
        """The internal id of each item id, -1 where absent: one C-level `map` in the common case."""
        out = np.asarray(list(map(self._hot.get, item_ids, repeat(-1))), np.int64)
        misses = (out < 0).nonzero()[0].tolist()  # not hot: the frozen dict, then the shards
        if misses:
            names = [item_ids[at] for at in misses]
            found = list(map(self._frozen.get, names, repeat(-1)))
            if -1 in found:  # added since start-up (or absent)
                shards = self._shards
                found = [iid if iid >= 0 else shards[hash(name) % _ID_SHARDS].get(name, -1)
                         for name, iid in zip(names, found, strict=True)]
            out[misses] = found
        return out

    def set(self, item_id: str, iid: int) -> None:
        if self._hot.pop(item_id, None) is not None or self._frozen.pop(item_id, None) is not None:
            self._size -= 1
        shard = self._shards[hash(item_id) % _ID_SHARDS]
        self._size += item_id not in shard
        shard[item_id] = iid

    def pop(self, item_id: str) -> int | None:
        iid = self._hot.pop(item_id, None)
        if iid is None:
            iid = self._frozen.pop(item_id, None)
        if iid is None:
            iid = self._shards[hash(item_id) % _ID_SHARDS].pop(item_id, None)
        self._size -= iid is not None
        return iid

    def __contains__(self, item_id: str) -> bool:
        return self.get(item_id) is not None

    def __len__(self) -> int:
        return self._size


def release_freed_memory() -> None:
    """Hand freed memory back to the OS after a build or merge: glibc keeps freed blocks in its heap
    (a replaced shard's arrays, a build's temporaries: freeing a large block raises glibc's mmap
    threshold, so later ones of that size come from the heap), and RSS would keep their size.
    ctypes drops the GIL for the call."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


