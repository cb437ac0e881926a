"""One FAISS index over rows x = [v; b] keyed by int64 ids, searched by max inner product with queries [h; 1].

IVF-PQ4 lists over the inner-product lift: a row is stored as x' = [x; sqrt(M² - |x|²)] (M the longest
row when the lists were trained), so every row has norm M and spherical k-means lists are the ones an
inner-product query should probe (lists over raw rows put long rows, which carry most top-k hits, in
the wrong lists). A query is [q; 0], so a score is exactly q·x. A row longer than M (arrived after
training) has no place in the lift and would be clamped by codes trained on shorter rows: it is kept
in the segment's small exact index (`long`) until the next rebuild trains on it; so is a row beyond
the ranges of SQ8-coded rows.

The lists hold 4-bit fast-scan codes of the lifted row's residual from its list centroid, one per
dimension (FAISS's `IndexIVFPQFastScan`: a scan reads 16-entry tables from SIMD registers); the best
`rerank`·k candidates by the codes are re-scored from the rows (`RowStore`): the order returned is that
of the rows within the shortlist. The rows may be float32 (exact), float16 or SQ8 codes (a quarter of
float32: the memory of a catalogue of 10M). From 50k rows up it matches IVF-Flat's recall at every
nprobe and scans faster (benchmarks/results/ivf-codes.md), so it is the one approximate kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from service.index.config import Built, IndexConfig, RowCodes

Vectors = npt.NDArray[np.float32]  # (N, D+1)
Ids = npt.NDArray[np.int64]  # (N,)
CHUNK_BITS = 20  # rows per RowStore chunk: 2^20, so growing never copies stored rows
_MASK = (1 << CHUNK_BITS) - 1
SLICE = 1 << 16  # rows decoded at a time when a catalogue is read whole (rebuilds, snapshots)
_DTYPE = {"float32": np.float32, "float16": np.float16, "sq8": np.uint8}


class RowStore:
    """Rows by id in fixed chunks: appends never move stored rows (no copy, no stall), reads need no lock.
    A chunk is allocated whole but zeroed lazily by the OS, so only the rows written take memory, and a
    catalogue of up to 2^20 rows is one array: a shortlist's gather is one `np.take`."""

    def __init__(self, dim: int, codes: RowCodes = "float32", sq_trained: Vectors | None = None) -> None:
        self.dim, self.codes = dim, codes
        self.chunks: list[npt.NDArray[Any] | None] = []
        self.used: list[int] = []  # per chunk: 1 + the highest row written
        self.sq: Any = None  # sq8: FAISS's 8-bit scalar quantizer, a range and a byte per dimension
        if sq_trained is not None:
            self.sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
            faiss.copy_array_to_vector(sq_trained, self.sq.trained)

    def chunk(self, c: int) -> npt.NDArray[Any]:
        """Chunk `c`, allocated (lazily zeroed) if it is not yet."""
        while len(self.chunks) <= c:
            self.chunks.append(None)
            self.used.append(0)
        chunk = self.chunks[c]
        if chunk is None:
            chunk = self.chunks[c] = np.zeros((1 << CHUNK_BITS, self.dim), _DTYPE[self.codes])
        return chunk

    def encode_as(self, codes: RowCodes, bounds: Vectors) -> None:
        """Keep the rows as `codes` from now on; chunk by chunk, never held twice.
        `bounds` (2, D+1): the rows' least and greatest value in each dimension, SQ8's ranges."""
        assert self.codes != "sq8", "SQ8 rows are never re-coded: a rebuild codes them afresh"
        if codes == "sq8":
            self.sq = faiss.ScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit)
            self.sq.rangestat_arg = 0.25  # each range widened a quarter: rows a little longer are not clamped
            self.sq.train(bounds)
        old, self.codes = self.chunks, codes
        self.chunks = [None] * len(old)
        for c, chunk in enumerate(old):  # in place: the float32 chunks go as their codes arrive
            if chunk is not None:
                for s in range(0, self.used[c], SLICE):
                    coded = self._encode(chunk[s : min(s + SLICE, self.used[c])])
                    self.chunk(c)[s : s + len(coded)] = coded
                old[c] = None

    def fits(self, rows: Vectors) -> npt.NDArray[np.bool_]:
        """(N,) whether each row is within the codes' ranges (SQ8 clamps the others)."""
        if self.codes != "sq8":
            return np.ones(len(rows), bool)
        low, width = faiss.vector_to_array(self.sq.trained).reshape(2, self.dim)
        return ((rows >= low) & (rows <= low + width)).all(1)  # type: ignore[no-any-return]

    def _encode(self, rows: Vectors) -> npt.NDArray[Any]:
        return self.sq.compute_codes(np.ascontiguousarray(rows)) if self.codes == "sq8" else \
            rows.astype(_DTYPE[self.codes], copy=False)

    def put(self, ids: Ids, rows: Vectors) -> None:
        """Store float32 `rows` (N, D+1) under `ids`, in this store's codes."""
        for c in np.unique(ids >> CHUNK_BITS).tolist():
            mine = (ids >> CHUNK_BITS) == c
            at = ids[mine] & _MASK
            self.chunk(c)[at] = self._encode(rows[mine])
            self.used[c] = max(self.used[c], int(at.max()) + 1)

    def get(self, ids: Ids, raw: bool = False) -> Vectors:
        """Rows of `ids` (any shape S), as (*S, D+1) float32 (`raw`: as stored); ids must have been put."""
        flat = ids.ravel()
        if len(self.chunks) == 1 and (only := self.chunks[0]) is not None:  # up to 2^20 rows: one gather
            out = np.take(only, flat & _MASK, axis=0)
        else:
            out = np.empty((len(flat), self.dim), _DTYPE[self.codes])
            order = np.argsort(flat >> CHUNK_BITS, kind="stable")  # grouped by chunk: one pass, not one per chunk
            chunk_of = flat[order] >> CHUNK_BITS
            starts = np.flatnonzero(np.diff(chunk_of, prepend=-1))
            for c, mine in zip(chunk_of[starts].tolist(), np.split(order, starts[1:]), strict=True):
                chunk = self.chunks[c]
                assert chunk is not None  # every id was put
                out[mine] = np.take(chunk, flat[mine] & _MASK, axis=0)
        if not raw:  # SQ8: one decode for the whole gather
            out = self.sq.decode(out) if self.codes == "sq8" else out.astype(np.float32, copy=False)
        return out.reshape(*ids.shape, out.shape[1])

    def get_chunked(self, ids: Ids) -> Iterator[tuple[Ids, Vectors]]:
        """(ids, their float32 rows) a slice at a time: a catalogue is never decoded whole."""
        for s in range(0, len(ids), SLICE):
            yield ids[s : s + SLICE], self.get(ids[s : s + SLICE])


@dataclass
class Segment:
    kind: Built
    index: Any  # faiss.IndexIDMap(IndexFlatIP) | faiss.IndexIVFPQFastScan
    dim: int  # D+1
    max_sq_norm: float = 0.0  # M² of the lift (IVF-PQ4)
    trained_rows: int = 0  # rows when the IVF lists were trained
    rows: RowStore | None = None  # IVF-PQ4: the rows its shortlist is re-scored from
    long: Segment | None = None  # IVF-PQ4: rows longer than M (or beyond SQ8's ranges), exact until a rebuild

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) + (self.long.ntotal if self.long is not None else 0)

    def search(self, queries: Vectors, k: int, selector: Any, nprobe: int, shortlist: int) -> tuple[Vectors, Ids]:
        """Best k per query (B, D+1): scores and ids (B, k), best first, id -1 past the end; ids the
        `selector` rejects are skipped inside the scan. IVF-PQ4 re-scores its best `shortlist` by the codes."""
        k = max(1, min(k, self.ntotal))
        params: Any = faiss.SearchParameters() if self.kind == "exact" else faiss.SearchParametersIVF()
        params.sel = selector  # None: every id
        if self.kind == "exact":
            scores, ids = self.index.search(queries, k, params=params)
            return scores, ids
        lifted = np.zeros((len(queries), self.dim + 1), np.float32)  # [q; 0]
        lifted[:, :-1] = queries
        params.nprobe = nprobe
        assert self.rows is not None
        shortlist = max(1, min(max(shortlist, k), self.index.ntotal))  # FAISS keeps a heap of this many a query
        _, ids = self.index.search(lifted, shortlist, params=params)  # (B, S) by the codes' scores
        scores = np.einsum("bsd,bd->bs", self.rows.get(np.maximum(ids, 0)), queries)  # (B, S) by the rows
        scores[ids < 0] = -np.inf
        if self.long is not None and self.long.ntotal:
            long_scores, long_ids = self.long.search(queries, k, selector, nprobe, shortlist)
            scores, ids = np.concatenate([scores, long_scores], 1), np.concatenate([ids, long_ids], 1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)

    def add(self, ids: Ids, rows: Vectors, put: bool = True) -> None:
        """Append rows, under the segment's lock (no search meanwhile); `put=False`: the rows are
        already in the segment's RowStore."""
        ids = np.ascontiguousarray(ids, np.int64)
        if self.kind == "exact":
            return self.index.add_with_ids(rows, ids)  # type: ignore[no-any-return]
        long = np.einsum("nd,nd->n", rows, rows, dtype=np.float64) > self.max_sq_norm
        if self.rows is not None:
            long |= ~self.rows.fits(rows)
        if long.any():
            self.long = self.long or empty_exact(self.dim)
            self.long.add(ids[long], rows[long])
            ids, rows = ids[~long], rows[~long]
        if self.rows is not None and put:
            self.rows.put(ids, rows)
        self.index.add_with_ids(lift(rows, self.max_sq_norm), ids)  # list assignment included (fast-scan packs it)

    def ids(self) -> Ids:
        """Every stored id, dead ones included (IVF-PQ4: list by list, then the long rows)."""
        if self.kind == "exact":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = self.index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(j), lists.list_size(j)).copy()
                 for j in range(self.index.nlist) if lists.list_size(j)]
        parts += [self.long.ids()] if self.long is not None else []
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def parts(self) -> Iterator[tuple[Ids, Vectors]]:
        """Every stored id and its row (n, D+1), in `ids()` order, `SLICE` rows at a time."""
        if self.kind == "exact":
            yield self.ids(), self.index.index.reconstruct_n()
            return
        assert self.rows is not None
        ids = self.ids()[: int(self.index.ntotal)]
        yield from self.rows.get_chunked(ids)
        yield from self.long.parts() if self.long is not None else ()

    @staticmethod
    def joined(segments: Iterable[Segment], dim: int) -> tuple[Ids, Vectors]:
        """Every id stored in `segments` and its row (N, D+1), segment after segment, each in `ids()` order."""
        parts = [part for segment in segments for part in segment.parts()]
        return (np.concatenate([np.zeros(0, np.int64), *(ids for ids, _ in parts)]),
                np.concatenate([np.zeros((0, dim), np.float32), *(rows for _, rows in parts)]))


def lift(rows: Vectors, max_sq_norm: float) -> Vectors:
    """x' = [x; sqrt(M² - |x|²)] (N, D+2)."""
    out = np.empty((len(rows), rows.shape[1] + 1), np.float32)
    out[:, :-1] = rows
    out[:, -1] = np.sqrt(np.maximum(max_sq_norm - np.einsum("nd,nd->n", rows, rows, dtype=np.float64), 0.0))
    return out


def bounds(parts: Iterable[Vectors]) -> Vectors:
    """(2, D+1): the least and the greatest value of each dimension over every row of `parts`."""
    low, high = np.inf, -np.inf
    for rows in parts:
        low, high = np.minimum(low, rows.min(0, initial=np.inf)), np.maximum(high, rows.max(0, initial=-np.inf))
    return np.stack(np.broadcast_arrays(low, high)).astype(np.float32)


def empty_exact(dim: int) -> Segment:
    return Segment("exact", faiss.IndexIDMap(faiss.IndexFlatIP(dim)), dim)  # FAISS's wrapper keeps the flat alive


def build_segment(kind: Built, dim: int, ids: Ids, store: RowStore, config: IndexConfig) -> Segment:
    """A segment over the rows of `ids` in `store`, added a slice at a time (the catalogue is never copied whole)."""
    segment = empty_exact(dim) if kind == "exact" else _trained_ivf_pq4(dim, ids, store, config)
    for part, rows in store.get_chunked(ids):
        segment.add(part, rows, put=False)  # IVF-PQ4 re-ranks from `store` itself
    return segment


def _trained_ivf_pq4(dim: int, ids: Ids, store: RowStore, config: IndexConfig) -> Segment:
    max_sq = max(float(np.einsum("nd,nd->n", rows, rows, dtype=np.float64).max(initial=0.0))
                 for _, rows in store.get_chunked(ids))
    nlist = config.nlist_for(len(ids))
    sample = store.get(ids[np.sort(np.random.default_rng(1234).choice(
        len(ids), min(len(ids), nlist * config.train_points_per_list), replace=False))])
    quantizer = faiss.IndexFlatIP(dim + 1)  # a 4-bit sub-quantizer per lifted dimension, on residuals
    index = faiss.IndexIVFPQFastScan(quantizer, dim + 1, nlist, dim + 1, 4, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = True
    if store.codes != config.row_codes:  # a rebuild's SQ8 rows are coded already
        store.encode_as(config.row_codes, bounds(rows for _, rows in store.get_chunked(ids)))
    index.cp.niter = config.train_iterations
    index.cp.seed = 1234  # the same catalogue gets the same lists
    index.cp.max_points_per_centroid = 1 << 30  # already sampled
    index.train(lift(sample, max_sq))  # spherical k-means: the IVF constructor sets it for IP
    return Segment("ivf_pq4", index, dim, max_sq, len(ids), store)  # the quantizer: kept alive by FAISS's wrapper
