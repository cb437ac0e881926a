"""One FAISS index over rows x = [v; b] keyed by int64 ids, searched by max inner product with queries [h; 1].

IVF lists over the inner-product lift: a row is stored as x' = [x; sqrt(M² - |x|²)] (M the longest
row when the lists were trained), so every row has norm M and spherical k-means lists are the ones an
inner-product query should probe (lists over raw rows put long rows, which carry most top-k hits, in
the wrong lists). A query is [q; 0], so a score is exactly q·x; a row longer than M (arrived after
training) gets 0 in the lift column, still scores right and is only filed less well until a rebuild.

IVF-SQ8 keeps a byte a dimension and re-scores its best `rerank`·k candidates from the rows
(`RowStore`): the order it returns is exact within the shortlist. Its codes span the trained rows'
range plus a margin: a row far outside is clamped and may miss the shortlist until a rebuild. With
`rerank` 0 it keeps no rows at all and answers with the codes' scores: the memory of a catalogue whose
rows do not fit (at D = 128, float16 rows alone are 2.6 GB at 10M items); a rebuild then starts from
the decoded codes.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from service.index.config import Built, IndexConfig

Vectors = npt.NDArray[np.float32]  # (N, D+1)
Ids = npt.NDArray[np.int64]  # (N,)
CHUNK_BITS = 16  # rows per RowStore chunk: 2^16, so growing never copies stored rows


class RowStore:
    """Rows by id in fixed chunks: appends never move stored rows (no copy, no stall), reads need no lock."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.chunks: list[npt.NDArray[np.float32 | np.float16] | None] = []
        self.dtype: type[np.float32 | np.float16] = np.float32

    def to_float16(self) -> None:  # half the memory; chunk by chunk, so never held twice
        self.dtype = np.float16
        for j, chunk in enumerate(self.chunks):
            self.chunks[j] = None if chunk is None else chunk.astype(np.float16, copy=False)

    def put(self, ids: Ids, rows: Vectors) -> None:
        for c in np.unique(ids >> CHUNK_BITS).tolist():
            while len(self.chunks) <= c:
                self.chunks.append(None)
            chunk = self.chunks[c]
            if chunk is None:
                chunk = self.chunks[c] = np.zeros((1 << CHUNK_BITS, self.dim), self.dtype)
            mine = (ids >> CHUNK_BITS) == c
            chunk[ids[mine] & ((1 << CHUNK_BITS) - 1)] = rows[mine]

    def get(self, ids: Ids) -> Vectors:
        """Rows of `ids` (any shape S), as (*S, D+1); ids must have been put."""
        flat = ids.ravel()
        out = np.empty((len(flat), self.dim), np.float32)
        chunk_of = flat >> CHUNK_BITS
        for c in np.unique(chunk_of).tolist():
            mine = chunk_of == c
            chunk = self.chunks[c]
            assert chunk is not None  # every id was put
            out[mine] = chunk[flat[mine] & ((1 << CHUNK_BITS) - 1)]
        return out.reshape(*ids.shape, self.dim)


@dataclass
class Segment:
    kind: Built
    index: Any  # faiss.IndexIDMap(IndexFlatIP) | faiss.IndexIVFFlat | faiss.IndexIVFScalarQuantizer
    dim: int  # D+1
    max_sq_norm: float = 0.0  # M² of the lift (IVF kinds)
    trained_rows: int = 0  # rows when the IVF lists were trained
    rows: RowStore | None = None  # IVF-SQ8: the exact rows for re-ranking
    keep: list[Any] = field(default_factory=list)  # FAISS objects the index points to, kept alive

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Vectors, k: int, selector: Any, nprobe: int, rerank: int) -> tuple[Vectors, Ids]:
        """Best k per query (B, D+1): scores and ids (B, k), best first, id -1 past the end; ids the
        `selector` rejects are skipped inside the scan."""
        k = max(1, min(k, self.ntotal))
        params: Any = faiss.SearchParameters() if self.kind == "exact" else faiss.SearchParametersIVF()
        if selector is not None:
            params.sel = selector
        if self.kind == "exact":
            scores, ids = self.index.search(queries, k, params=params if selector is not None else None)
            return scores, ids
        lifted = np.zeros((len(queries), self.dim + 1), np.float32)  # [q; 0]
        lifted[:, :-1] = queries
        params.nprobe = nprobe
        if self.kind == "ivf":
            scores, ids = self.index.search(lifted, k, params=params)
            return scores, ids
        if self.rows is None:  # IVF-SQ8 without re-ranking: the codes' scores
            scores, ids = self.index.search(lifted, k, params=params)
            return scores, ids
        _, short = self.index.search(lifted, min(k * max(rerank, 1), self.ntotal), params=params)  # (B, S) by SQ8 score
        exact = np.einsum("bsd,bd->bs", self.rows.get(np.maximum(short, 0)), queries)  # (B, S) exact scores
        exact[short < 0] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, best, 1), np.take_along_axis(short, best, 1)

    def add(self, ids: Ids, rows: Vectors, assigned: tuple[Vectors, Ids] | None = None, put: bool = True) -> None:
        """Append rows, under the segment's lock (no search meanwhile). IVF: pass `assign(rows)`,
        computed outside the lock; `put=False`: the rows are already in the segment's RowStore."""
        if self.kind == "exact":
            return self.index.add_with_ids(rows, ids)  # type: ignore[no-any-return]
        lifted, lists = assigned or self.assign(rows)
        if self.rows is not None and put:
            self.rows.put(ids, rows)
        ids = np.ascontiguousarray(ids, np.int64)
        self.index.add_core(len(ids), faiss.swig_ptr(lifted), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def assign(self, rows: Vectors) -> tuple[Vectors, Ids]:
        """(lifted rows, list of each): the costly half of an IVF add, safe beside searches."""
        lifted = lift(rows, self.max_sq_norm)
        _, lists = self.index.quantizer.search(lifted, 1)
        return lifted, np.ascontiguousarray(lists[:, 0])

    def ids(self) -> Ids:
        """Every stored id, dead ones included (IVF: list by list)."""
        if self.kind == "exact":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = self.index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(j), lists.list_size(j)).copy()
                 for j in range(self.index.nlist) if lists.list_size(j)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def contents(self) -> tuple[Ids, Vectors]:
        """Every stored id and its row (N, D+1), in `ids()` order."""
        ids = self.ids()
        if self.kind == "exact":
            n = self.ntotal
            return ids, self.index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), np.float32)
        if self.rows is not None:
            return ids, self.rows.get(ids)
        lists = self.index.invlists
        codes = [faiss.rev_swig_ptr(lists.get_codes(j), lists.list_size(j) * self.index.code_size)
                 for j in range(self.index.nlist) if lists.list_size(j)]
        if self.kind == "ivf":
            rows = [c.view(np.float32).reshape(-1, self.dim + 1)[:, :-1] for c in codes]
        else:  # IVF-SQ8 without rows: decoded codes (residuals from their list's centroid)
            rows = [self._decoded(j, c) for j, c in zip(
                [j for j in range(self.index.nlist) if lists.list_size(j)], codes, strict=True)]
        return ids, np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def _decoded(self, j: int, codes: npt.NDArray[np.uint8]) -> Vectors:
        lifted = self.index.sq.decode(codes.reshape(-1, self.index.code_size))  # (n, D+2)
        if self.index.by_residual:
            lifted += self.index.quantizer.reconstruct(j)
        return np.ascontiguousarray(lifted[:, :-1], np.float32)


def lift(rows: Vectors, max_sq_norm: float) -> Vectors:
    """x' = [x; sqrt(M² - |x|²)] (N, D+2); 0 for rows longer than M."""
    out = np.empty((len(rows), rows.shape[1] + 1), np.float32)
    out[:, :-1] = rows
    out[:, -1] = np.sqrt(np.maximum(max_sq_norm - np.einsum("nd,nd->n", rows, rows, dtype=np.float64), 0.0))
    return out


def empty_exact(dim: int) -> Segment:
    flat = faiss.IndexFlatIP(dim)
    return Segment("exact", faiss.IndexIDMap(flat), dim, keep=[flat])


def build_segment(kind: Built, dim: int, ids: Ids, store: RowStore, config: IndexConfig) -> Segment:
    """A segment over the rows of `ids` in `store`, added a chunk at a time (the catalogue is never copied whole)."""
    segment = empty_exact(dim) if kind == "exact" else _trained_ivf(kind, dim, ids, store, config)
    for start in range(0, len(ids), 1 << CHUNK_BITS):
        part = ids[start : start + (1 << CHUNK_BITS)]
        segment.add(part, store.get(part), put=False)  # IVF-SQ8 re-ranks from `store` itself
    return segment


def _trained_ivf(kind: Built, dim: int, ids: Ids, store: RowStore, config: IndexConfig) -> Segment:
    max_sq = max(float(np.einsum("nd,nd->n", rows, rows, dtype=np.float64).max(initial=0.0))
                 for rows in (store.get(ids[s : s + (1 << CHUNK_BITS)]) for s in range(0, len(ids), 1 << CHUNK_BITS)))
    nlist = config.nlist_for(len(ids))
    sample = np.sort(np.random.default_rng(1234).choice(len(ids), min(len(ids), nlist * config.train_points_per_list),
                                                        replace=False))
    quantizer, ip = faiss.IndexFlatIP(dim + 1), faiss.METRIC_INNER_PRODUCT
    index: Any = faiss.IndexIVFFlat(quantizer, dim + 1, nlist, ip) if kind == "ivf" else \
        faiss.IndexIVFScalarQuantizer(quantizer, dim + 1, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    if kind == "ivf_sq8":
        # each dimension's code range: the sample's, widened by a quarter each way, so rows a little
        # longer than any trained one are not clamped (much longer ones are, until the next rebuild)
        index.sq.rangestat_arg = 0.25
        if config.rerank_float16 and config.rerank:
            store.to_float16()
    index.cp.niter = config.train_iterations
    index.cp.seed = 1234  # the same catalogue gets the same lists
    index.cp.max_points_per_centroid = 1 << 30  # already sampled
    index.train(lift(store.get(ids[sample]), max_sq))  # spherical k-means: the IVF constructor sets it for IP
    rows = store if kind == "ivf_sq8" and config.rerank else None
    return Segment(kind, index, dim, max_sq, len(ids), rows, [quantizer])


def release_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps a build's large temporaries (a third of the RSS at 1M)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
