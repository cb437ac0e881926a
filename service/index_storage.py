"""The storage behind `service.index.VectorIndex`; nothing here ever grows by copying everything.

At a million items any structure that grows by reallocation (a FAISS flat index's std::vector, a
Python dict's rehash) stalls its writer for 0.1-1 s. So:

- `DeltaSegment`: recent adds, exact, in fixed-size NumPy chunks. Rows below the published size
  are never written again, so readers scan them without a lock.
- the base: one FAISS index (exact `IndexIDMap2(IndexFlatIP)` or `IndexIVFFlat`, inner product),
  keyed by internal int64 ids, never mutated once published; merges build a new one off-line.
- `ItemTable` (internal id -> item) in fixed-size chunks and `IdMap` (item id -> internal id)
  over many small dicts, so neither ever rehashes the whole catalogue inside an add.

Rows are [v; b] and queries [h; 1], so every score here is h·v + b.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt
from faiss.contrib.inspect_tools import get_invlist

Vectors = npt.NDArray[np.float32]  # (N, D+1)
Ids = npt.NDArray[np.int64]  # (N,)
Scores = npt.NDArray[np.float32]
AliveMask = Callable[[Ids], npt.NDArray[np.bool_]]  # internal ids -> which are still live


@dataclass(frozen=True)
class IndexConfig:
    """How the index trades exactness, memory and merge cost; saved nowhere, passed at load."""

    kind: Literal["exact", "ivf"] = "exact"
    nlist: int | None = None  # IVF lists; None: about 4·sqrt(N) at each (re)training
    nprobe: int = 32  # IVF lists scanned per query
    ivf_min_rows: int = 50_000  # below this an exact base is fast enough and needs no training
    train_points_per_list: int = 64  # k-means sample per list; bounds training time at 1M rows
    retrain_growth: float = 2.0  # retrain IVF once live rows exceed this multiple of the trained size
    merge_delta_rows: int = 20_000  # delta rows that start a background merge
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

    def _parts(self) -> list[tuple[Vectors, Ids]]:
        parts = []
        for c, (vectors, iids) in enumerate(self.chunks):
            rows = min(self.chunk_rows, self.size - c * self.chunk_rows)
            if rows > 0:
                parts.append((vectors[:rows], iids[:rows]))
        return parts

    def arrays(self) -> tuple[Ids, Vectors]:
        parts = self._parts()
        if not parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[0] for p in parts])

    def search(self, queries: Vectors, k: int) -> tuple[Scores, Ids]:
        """Exact top-k, (B, min(k, size)) scores and ids, best first."""
        parts = self._parts()
        if not parts:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        scores = np.concatenate([queries @ vectors.T for vectors, _ in parts], axis=1)  # (B, N)
        iids = np.concatenate([p[1] for p in parts])  # (N,)
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k) unordered
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        return np.take_along_axis(top_scores, order, axis=1), iids[top]


class DeltaSegment:
    """Append-only; the caller serialises `append` and `view` (the index lock)."""

    def __init__(self, dim: int, chunk_rows: int) -> None:
        self.dim = dim
        self.chunk_rows = chunk_rows
        self._chunks: list[tuple[Vectors, Ids]] = []
        self.size = 0

    def append(self, iids: Ids, vectors: Vectors) -> None:
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
        return DeltaView(tuple(self._chunks), self.size, self.chunk_rows, self.dim)


# -- id tables ---------------------------------------------------------------------------------

Item = tuple[str, bool]  # (item id, is cold)
_CHUNK_BITS = 12
_ID_SHARDS = 256


class ItemTable:
    """Internal id -> item, by position: internal ids are dense and never reused.

    A removed id keeps an empty slot (8 bytes). Reads need no lock: list indexing and slot
    assignment are atomic under the GIL; the caller serialises writes.
    """

    def __init__(self) -> None:
        self._chunks: list[list[Item | None]] = []

    def get(self, iid: int) -> Item | None:
        chunk = iid >> _CHUNK_BITS
        chunks = self._chunks
        return chunks[chunk][iid & ((1 << _CHUNK_BITS) - 1)] if 0 <= chunk < len(chunks) else None

    def set(self, iid: int, item: Item) -> None:
        while iid >> _CHUNK_BITS >= len(self._chunks):
            self._chunks.append([None] * (1 << _CHUNK_BITS))
        self._chunks[iid >> _CHUNK_BITS][iid & ((1 << _CHUNK_BITS) - 1)] = item

    def pop(self, iid: int) -> Item:
        item = self.get(iid)
        if item is None:
            raise KeyError(iid)
        self._chunks[iid >> _CHUNK_BITS][iid & ((1 << _CHUNK_BITS) - 1)] = None
        return item


class IdMap:
    """Item id -> internal id over many small dicts: a resize rehashes 1/256 of the ids."""

    def __init__(self) -> None:
        self._shards: list[dict[str, int]] = [{} for _ in range(_ID_SHARDS)]
        self._size = 0

    def get(self, item_id: str) -> int | None:
        return self._shards[hash(item_id) % _ID_SHARDS].get(item_id)

    def set(self, item_id: str, iid: int) -> None:
        shard = self._shards[hash(item_id) % _ID_SHARDS]
        self._size += item_id not in shard
        shard[item_id] = iid

    def pop(self, item_id: str) -> int | None:
        iid = self._shards[hash(item_id) % _ID_SHARDS].pop(item_id, None)
        self._size -= iid is not None
        return iid

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._shards[hash(item_id) % _ID_SHARDS]

    def __len__(self) -> int:
        return self._size


# -- the base ----------------------------------------------------------------------------------


def empty_base(dim: int) -> Any:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def is_ivf(base: Any) -> bool:
    return isinstance(base, faiss.IndexIVF)


def search_base(base: Any, queries: Vectors, k: int) -> tuple[Scores, Ids]:
    """(B, min(k, ntotal)) best first; IVF pads with id -1 when the probed lists run short."""
    k = min(k, base.ntotal)
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    scores, iids = base.search(queries, k)
    return scores, iids


def _invlist(base: Any, list_no: int) -> tuple[Ids, npt.NDArray[np.uint8]]:
    ids, codes = get_invlist(base.invlists, list_no)  # type: ignore[no-untyped-call]
    return ids, codes


def base_ids(base: Any) -> Ids:
    if is_ivf(base):
        lists = [_invlist(base, i)[0] for i in range(base.nlist)]
        return np.concatenate(lists).astype(np.int64) if lists else np.empty(0, np.int64)
    ids: Ids = faiss.vector_to_array(base.id_map).astype(np.int64)
    return ids


def base_arrays(base: Any) -> tuple[Ids, Vectors]:
    """Every row of the base with its id, in storage order."""
    dim = base.d
    if base.ntotal == 0:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32)
    if is_ivf(base):
        ids, codes = [], []
        for i in range(base.nlist):
            list_ids, list_codes = _invlist(base, i)
            ids.append(list_ids.astype(np.int64))
            codes.append(list_codes.view(np.float32).reshape(-1, dim))  # IVF-Flat codes are raw float32
        return np.concatenate(ids), np.concatenate(codes)
    vectors: Vectors = base.index.reconstruct_n(0, base.ntotal)
    return base_ids(base), vectors


def build_base(iids: Ids, vectors: Vectors, config: IndexConfig) -> Any:
    """A fresh base over the given rows: IVF (trained on them) when configured and large enough."""
    dim = vectors.shape[1]
    base: Any
    if config.kind != "ivf" or len(iids) < config.ivf_min_rows:
        base = empty_base(dim)
    else:
        nlist = config.nlist or max(1, round(4 * math.sqrt(len(iids))))
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.cp.max_points_per_centroid = config.train_points_per_list
        base.cp.seed = 1234  # deterministic lists for a given catalogue
        base.train(vectors)
        base.nprobe = config.nprobe
    if len(iids):
        base.add_with_ids(vectors, iids)
    return base


def merged_base(
    base: Any, alive: AliveMask, new_iids: Ids, new_vectors: Vectors, config: IndexConfig, trained_rows: int
) -> tuple[Any, int]:
    """A new base: `base` minus rows no longer alive, plus the new rows (dead ones dropped).

    `alive(ids) -> bool mask`. Returns the base and the row count its IVF lists were trained on.
    Incremental (copy, remove, add) unless the kind must change or IVF has outgrown its lists.
    """
    keep_new = alive(new_iids)
    new_iids, new_vectors = new_iids[keep_new], new_vectors[keep_new]
    old_iids = base_ids(base)
    dead = old_iids[~alive(old_iids)]
    live_rows = len(old_iids) - len(dead) + len(new_iids)
    want_ivf = config.kind == "ivf" and live_rows >= config.ivf_min_rows
    if want_ivf != is_ivf(base) or (want_ivf and live_rows > config.retrain_growth * trained_rows):
        iids, vectors = base_arrays(base)
        keep = alive(iids)
        iids = np.concatenate([iids[keep], new_iids])
        vectors = np.concatenate([vectors[keep], new_vectors])
        return build_base(iids, vectors, config), (live_rows if want_ivf else 0)
    merged: Any = faiss.clone_index(base)
    if len(dead):
        merged.remove_ids(dead)
    if len(new_iids):
        merged.add_with_ids(new_vectors, new_iids)
    if is_ivf(merged):
        merged.nprobe = config.nprobe
    return merged, trained_rows
