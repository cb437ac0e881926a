"""The item index: two populations, each answered by FAISS, each query's best k of each.

Rows are x = [v; b] (D+1) and queries q = [h; 1], so q·x = h·v + b: the bias rides along.

- Trained items (rows from the artifact) are one FAISS segment, built once and never written
  again: exact below `ivf_min_rows`, IVF-PQ4 above (`IndexConfig.kind_for`).
- New (registered) items live in three places: the *base* (a FAISS segment of the kind their count
  calls for), *frozen* buffers being merged into it, and the *buffer*, an exact FAISS index that
  takes every add and is searchable when `add` returns. Once the buffer holds `merge_rows` rows a
  background thread freezes it and moves its rows into the base a slice at a time (a search waits
  for one slice at most), so an add never waits for a merge. The base is rebuilt, off the
  locks, when its kind must change, it has grown `retrain_growth` times since its lists were
  trained, or too many of its rows are tombstones.

Removes and upserts leave tombstones: the old internal id goes dead in `Liveness`, which FAISS
consults through an `IDSelector` while it scans, so dead rows never take a place in a top-k. A user's
own items (`exclude`) differ per query: one FAISS call asks each segment for k plus the most any
query of the batch excludes, and they are dropped after (against a call per query with its own
selector: benchmarks/results/serve.md): trained items by position, new items by item id as the
answer is walked, so a request never looks its new items up in the id table.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence, Set
from itertools import chain, repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from service.index.config import Built, IndexConfig
from service.index.ids import CHUNK, IdTable, Liveness, live_pieces
from service.index.segment import Ids, RowStore, Segment, Vectors, bounds, build_segment, empty_exact
from service.index.snapshot import Snapshot, read_snapshot, write_snapshot
from service.memory import mapping_large_blocks, release_memory

log = logging.getLogger(__name__)
Batch = tuple[Sequence[str], npt.ArrayLike]  # item ids, rows (N, D+1)


class Hit(NamedTuple):
    item_id: str
    score: float
    is_cold: bool


_hit = functools.partial(tuple.__new__, Hit)  # a Hit from a tuple without a Python-level __new__
_rank = lambda h: (-h.score, h.item_id)  # noqa: E731  # best first, ties by item id


class Tops(NamedTuple):
    """One query's best k trained items and best k new items, each best first."""

    trained: list[Hit]
    new: list[Hit]

    def merged(self, k: int) -> list[Hit]:
        """The best k of both by raw score h·v + b: the exact top-k over every item."""
        return sorted([*self.trained, *self.new], key=_rank)[:k]


class VectorIndex:
    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        self.dim = dim  # D+1: rows [v; b]
        self.config = config or IndexConfig()
        self.nprobe = self.config.nprobe  # may be retuned live
        self._lock = threading.Lock()  # ids, liveness and which segments exist; held briefly
        self._buffer_lock = threading.Lock()  # the buffer's FAISS index: appends vs searches
        self._base_lock = threading.Lock()  # the base: rows moved in by a merge vs searches
        self._merge_lock = threading.Lock()
        self._trained_ids: list[str] = []
        self._trained_pos: dict[str, int] = {}
        self._trained: Segment = empty_exact(dim)
        self._ids = IdTable()
        self._live = Liveness()
        self._next_iid = 0
        self._buffer = empty_exact(dim)
        self._frozen: tuple[Segment, ...] = ()
        self._base: Segment | None = None
        self._base_dead = 0  # tombstones in the base: a rebuild drops them
        self._merged_upto = 0  # every internal id below it is in the base or was dead when merged
        self._merge_thread: threading.Thread | None = None

    @classmethod
    @mapping_large_blocks  # the IVF lists' unwritten tails take no RAM
    def build(cls, dim: int, trained_ids: Sequence[str], trained_rows: npt.ArrayLike,
              new: Iterable[Batch] = (), config: IndexConfig | None = None) -> VectorIndex:
        """Both populations built in the calling thread; `new` is read once, a batch at a time, so a
        caller streaming from a store never holds the catalogue twice."""
        index = cls(dim, config)
        rows = np.ascontiguousarray(trained_rows, dtype=np.float32).reshape(-1, dim)
        index._trained_ids = list(trained_ids)
        index._trained_pos = {item_id: j for j, item_id in enumerate(index._trained_ids)}
        positions = np.arange(len(rows), dtype=np.int64)
        store = RowStore(dim)
        store.put(positions, rows)
        index._trained = build_segment(index.config.kind_for(len(rows)), dim, positions, store, index.config)
        store, cfg = RowStore(dim), index.config
        beyond: list[tuple[Ids, Vectors]] = []  # rows outside SQ8's ranges: kept exact
        coded = cfg.row_codes != "float32" and cfg.kind_for(cfg.ivf_min_rows) == "ivf_pq4"
        for ids, batch in new:
            vectors, iids = index._rows(ids, batch), index._register(ids)
            if not (fits := store.fits(vectors)).all():
                beyond.append((iids[~fits], vectors[~fits]))
                iids, vectors = iids[fits], vectors[fits]
            store.put(iids, vectors)
            if coded and store.codes == "float32" and len(index._ids) >= cfg.ivf_min_rows:
                # the base will be IVF-PQ4 over coded rows (live ids never fall during a build): the rows are
                # coded from here on (SQ8: in ranges from those so far), never staged as float32 whole
                staged = index._live.ids(index._next_iid)
                store.encode_as(cfg.row_codes, bounds(rows for _, rows in store.get_chunked(staged)))
        live = index._live.ids(index._next_iid)
        far = np.concatenate([np.zeros(0, np.int64), *(i for i, _ in beyond)])
        if len(live):
            index._base = build_segment(cfg.kind_for(len(live)), dim, np.setdiff1d(live, far), store, cfg)
            if (alive := index._live.of(far)).any():  # the segment keeps rows beyond its ranges exact
                index._base.add(far[alive], np.concatenate([rows for _, rows in beyond])[alive])
        index._merged_upto = index._next_iid
        del store  # the staging rows: handed back to the OS below
        release_memory()
        return index

    def add(self, ids: Sequence[str], rows: npt.ArrayLike) -> None:
        """Insert or replace new items; searchable when this returns."""
        vectors = self._rows(ids, rows)
        with self._lock:
            iids = self._register(ids)
            with self._buffer_lock:
                self._buffer.add(iids, vectors)
            wants_merge = self.config.auto_merge and self._buffer.ntotal >= self.config.merge_rows
        if wants_merge:
            self._start_background_merge()

    def remove(self, ids: Sequence[str]) -> int:
        """Number of ids that were present."""
        with self._lock:
            dead = [iid for iid in map(self._ids.pop, ids) if iid is not None]
            self._kill(dead)
            wants_rebuild = self.config.auto_merge and self._stale(self._base, len(self._ids))
        if wants_rebuild:
            self._start_background_merge()
        return len(dead)

    def _register(self, ids: Sequence[str]) -> Ids:
        """New internal ids for `ids`, marked live; the ids they replace die (under `_lock` after build)."""
        iids = np.arange(self._next_iid, self._next_iid + len(ids), dtype=np.int64)
        self._next_iid += len(ids)
        self._live.grow(self._next_iid)
        replaced = [self._ids.set(item_id, iid) for item_id, iid in zip(ids, iids.tolist(), strict=True)]
        self._live.set(iids, True)
        self._kill([iid for iid in replaced if iid is not None])
        return iids

    def _kill(self, iids: list[int]) -> None:
        self._live.set(dead := np.asarray(iids, dtype=np.int64), False)
        self._base_dead += int((dead < self._merged_upto).sum())

    def _rows(self, ids: Sequence[str], rows: npt.ArrayLike) -> Vectors:
        if (vectors := np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, self.dim)).shape[0] != len(ids):
            raise ValueError(f"expected {len(ids)} rows of {self.dim}")
        return vectors

    def contains(self, item_id: str) -> bool:
        return item_id in self._trained_pos or bool(self._ids.lookup([item_id]))

    def count(self) -> tuple[int, int]:
        """(trained, new) live items."""
        return len(self._trained_ids), len(self._ids)

    def __len__(self) -> int:
        return len(self._trained_ids) + len(self._ids)

    @property
    def kinds(self) -> tuple[str, str]:
        """The FAISS kinds serving (trained, new) items."""
        return self._trained.kind, self._base.kind if self._base is not None else "exact"

    def search(self, queries: npt.ArrayLike, k: int, exclude: Sequence[Set[str]] | None = None,
               new_queries: npt.ArrayLike | None = None) -> list[Tops]:
        """Per query (B, D+1): its best k trained and best k new items; `exclude[b]` never returned.
        `new_queries` (B, D+1): the new items searched with these instead (a population's own mix)."""
        if k < 1:
            raise ValueError("k must be >= 1")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        q_new = q if new_queries is None else np.ascontiguousarray(np.atleast_2d(new_queries), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim or q_new.shape != q.shape:
            raise ValueError(f"queries must be (B, {self.dim}), got {q.shape} and {q_new.shape}")
        excluded = list(exclude) if exclude is not None else [frozenset()] * len(q)
        if len(excluded) != len(q):
            raise ValueError("one exclusion set per query")
        with self._lock:
            live, base, frozen, buffer = self._live, self._base, self._frozen, self._buffer
            bits, selector = live.bits, live.selector  # held: FAISS reads them during the scans
        pos = self._trained_pos
        trained_banned: list[list[int]] = []  # positions, dropped before the walk
        new_skipped: list[set[str]] = []  # item ids, skipped by the walk (no id table lookups)
        for items in excluded:  # most of a history is trained items: one dict lookup each
            positions = list(map(pos.get, items))
            trained_banned.append([p for p in positions if p is not None])
            new_skipped.append({i for i, p in zip(items, positions, strict=True) if p is None})
        trained = self._top([(self._trained, None)], q, k, trained_banned, [set()] * len(q), None,
                            lambda iids: [self._trained_ids[i] for i in iids], False)
        segments: list[tuple[Segment, threading.Lock | None]] = [(s, None) for s in frozen]
        segments.append((buffer, self._buffer_lock))
        if base is not None:
            segments.append((base, self._base_lock))
        new = self._top(segments, q_new, k, [[]] * len(q), new_skipped, selector, self._ids.items_of, True)
        del bits
        return [Tops(t, n) for t, n in zip(trained, new, strict=True)]

    def _top(self, segments: list[tuple[Segment, threading.Lock | None]], q: Vectors, k: int, banned: list[list[int]],
             skipped: list[set[str]], selector: Any, names_of: Any, is_cold: bool) -> list[list[Hit]]:
        """Each query's best k of `segments`, without its banned ids, its skipped items or the dead
        (`names_of` -> None)."""
        found: list[tuple[Vectors, Ids]] = []
        extra = max(len(b) + len(s) for b, s in zip(banned, skipped, strict=True))
        for segment, lock in segments:
            if segment.ntotal:
                with lock or contextlib.nullcontext():
                    fetch = k + extra  # re-ranked: k·rerank plus the dropped
                    found.append(segment.search(q, fetch, selector, self.nprobe, fetch + k * (self.config.rerank - 1)))
        if not found:
            return [[] for _ in q]
        scores = np.concatenate([f[0] for f in found], axis=1)  # (B, S)
        iids = np.concatenate([f[1] for f in found], axis=1)
        scores[iids < 0] = -np.inf
        if any(banned):  # (query, id) keys, sorted: one binary search for the whole batch
            keys = np.sort((np.repeat(np.arange(len(q), dtype=np.int64), [len(b) for b in banned]) << 40)
                           | np.fromiter(chain.from_iterable(banned), np.int64))
            found_keys = (np.arange(len(q), dtype=np.int64)[:, None] << 40) | np.maximum(iids, 0)  # (B, S)
            scores[keys[np.minimum(np.searchsorted(keys, found_keys), len(keys) - 1)] == found_keys] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        scores, iids = np.take_along_axis(scores, order, 1), np.take_along_axis(iids, order, 1)
        head = min(k + 8 + max(map(len, skipped)), scores.shape[1])  # enough unless rows died or are being merged
        return [self._walk(row_s, row_i, k, names_of, is_cold, skipped[b]) or  # (then the whole row)
                self._walk(scores[b].tolist(), iids[b].tolist(), k, names_of, is_cold, skipped[b], complete=True) or []
                for b, (row_s, row_i) in enumerate(zip(scores[:, :head].tolist(), iids[:, :head].tolist(),
                                                       strict=True))]

    @staticmethod
    def _walk(scores: list[float], iids: list[int], k: int, names_of: Any, is_cold: bool, skipped: set[str],
              complete: bool = False) -> list[Hit] | None:
        """The first k live, distinct, not skipped candidates (sorted best first, dropped ones at -inf), or
        None when these candidates hold fewer than k and more follow (`complete`: none follow)."""
        names = names_of(iids[:k])  # the common case: the first k are live, distinct and wanted
        if len(names) == k and scores[k - 1] != -math.inf and None not in names and len(set(iids[:k])) == k \
                and skipped.isdisjoint(names):
            hits = list(map(_hit, zip(names, scores, repeat(is_cold))))
        else:
            hits, seen = [], set()  # a row being merged is in the base and a frozen buffer at once
            for score, iid, name in zip(scores, iids, names_of(iids), strict=True):
                if name is not None and score != -math.inf and iid not in seen and name not in skipped:  # else
                    seen.add(iid)  # dropped, a duplicate, skipped or removed since the scan
                    hits.append(_hit((name, score, is_cold)))
                    if len(hits) == k:
                        break
            if len(hits) < k and not complete and len(scores) and scores[-1] != -math.inf:
                return None
        if len({h.score for h in hits}) < len(hits):  # ties (rare): by item id
            hits.sort(key=_rank)
        return hits

    def live_vectors(self) -> tuple[list[str], Vectors, list[bool]]:
        """Every live item, its row and whether it is new: for exact oracles."""
        with self._lock:
            segments = [s for s in (self._base, *self._frozen, self._buffer) if s is not None]
        positions, trained_rows = Segment.joined([self._trained], self.dim)
        stored, rows = Segment.joined(segments, self.dim)
        iids, first = np.unique(stored, return_index=True)
        names = self._ids.items_of(iids.tolist())
        keep = [j for j, name in zip(first.tolist(), names, strict=True) if name is not None]
        ids = [self._trained_ids[p] for p in positions.tolist()] + [n for n in names if n is not None]
        return ids, np.concatenate([trained_rows, rows[keep]]), [False] * len(positions) + [True] * len(keep)

    def merge(self) -> None:
        """Move the buffer into the base (rebuilding the base when due), in the calling thread."""
        with self._merge_lock:
            with self._lock:
                if self._buffer.ntotal:
                    self._frozen, self._buffer = (*self._frozen, self._buffer), empty_exact(self.dim)
                frozen, base, upto, live = self._frozen, self._base, self._next_iid, len(self._ids)
            if not frozen and not self._stale(base, live):
                return
            iids, rows = Segment.joined(frozen, self.dim)
            iids, rows = iids[alive := self._live.of(iids)], rows[alive]  # rows removed since are left behind
            kind = self.config.kind_for(live)
            if base is None or base.kind != kind or self._stale(base, live):
                base = self._rebuilt(base, iids, rows, kind)
            else:
                step = self.config.merge_slice_rows
                for s in range(0, len(iids), step):
                    with self._base_lock:
                        base.add(iids[s : s + step], rows[s : s + step])
            dead = int((~self._live.of(base.ids())).sum()) if base is not self._base else None  # outside the lock
            with self._lock:
                self._base_dead = self._base_dead if dead is None else dead
                self._base, self._frozen, self._merged_upto = base, self._frozen[len(frozen):], upto
        release_memory()

    @mapping_large_blocks
    def _rebuilt(self, base: Segment | None, iids: Ids, rows: Vectors, kind: Built) -> Segment:
        """A new base over the base's live rows plus (`iids`, `rows`), built outside every lock; its rows
        are coded afresh (SQ8: over every row's range), read from the old base a chunk at a time."""

        def parts() -> Iterator[tuple[Ids, Vectors]]:
            yield iids, rows
            yield from base.parts() if base is not None else ()

        store = RowStore(self.dim)
        if kind == "ivf_pq4" and self.config.row_codes == "sq8":
            store.encode_as("sq8", bounds(part for _, part in parts()))
        kept = []
        for part_iids, part_rows in parts():
            alive = self._live.of(part_iids)
            store.put(part_iids[alive], part_rows[alive])
            kept.append(part_iids[alive])
        iids = np.concatenate(kept)
        log.info("rebuilding the index base: %d rows, %s", len(iids), kind)
        return build_segment(kind, self.dim, np.unique(iids), store, self.config)  # sorted, once each

    def _stale(self, base: Segment | None, live: int) -> bool:
        if base is None:
            return False
        cfg = self.config
        return (base.kind != "exact" and live > cfg.retrain_growth * base.trained_rows) or \
            self._base_dead > cfg.rebuild_dead_fraction * max(base.ntotal, 1)

    def _start_background_merge(self) -> None:
        with self._lock:
            if self._merge_thread is not None and self._merge_thread.is_alive():
                return
            self._merge_thread = threading.Thread(target=self._merge_logged, name="index-merge", daemon=True)
            self._merge_thread.start()

    def _merge_logged(self) -> None:
        try:
            self.merge()
        except Exception:  # a failed merge leaves its frozen rows searchable; the next add retries
            log.exception("index merge failed")

    def wait_for_merge(self, timeout: float | None = None) -> bool:
        """True when no background merge is running (any more)."""
        if (thread := self._merge_thread) is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def save(self, path: str | Path, event_id: str | None) -> None:
        """A snapshot reflecting at least the store's events up to `event_id` (read it before calling:
        replaying later events on load, idempotent upserts and removes by id, makes it whole)."""
        with self._merge_lock:  # no rows move between segments while they are written
            with self._lock:
                frozen, buffer, base, next_iid = self._frozen, self._buffer, self._base, self._next_iid
            with self._buffer_lock:  # adds go on into the buffer: it is read between two of them
                buffer_iids, buffer_rows = Segment.joined([*frozen, buffer], self.dim)
            kept = buffer_iids < next_iid  # rows added since `next_iid` was read are left out, as their ids are
            with self._base_lock:
                write_snapshot(Path(path), Snapshot(self.dim, self._trained, self._trained_ids, base, buffer_iids[kept],
                                                    buffer_rows[kept], self._named(next_iid), next_iid, event_id))

    def _named(self, upto: int) -> Iterator[list[str | None]]:
        """The item id of each internal id below `upto` (None: dead), a chunk of the id table at a time, each
        copied under `_lock` alone: adds and removes go on meanwhile, never waiting for the whole table. An id
        handed out since `upto` is left out; an item removed or replaced meanwhile may be in or out. Either
        way the store's events after the snapshot's event id bring it in line on load."""
        for c in range(-(-upto // CHUNK)):
            with self._lock:
                named = self._ids.named(c)
            yield named[: upto - c * CHUNK]

    @classmethod
    @mapping_large_blocks
    def load(cls, path: str | Path, config: IndexConfig | None = None) -> tuple[VectorIndex, str | None]:
        """The index and the event id it reflects; apply the store's later events to catch up."""
        snap = read_snapshot(Path(path))
        index = cls(snap.dim, config)
        index._trained, index._trained_ids = snap.trained, snap.trained_ids
        index._trained_pos = {item_id: j for j, item_id in enumerate(snap.trained_ids)}
        index._base, index._next_iid, index._merged_upto = snap.base, snap.next_iid, snap.next_iid
        index._live.grow(snap.next_iid)
        index._ids.set_many(live_pieces(snap.named, index._live))  # a chunk at a time, as the snapshot is read
        alive = index._live.of(snap.buffer_iids)
        if alive.any():
            index._buffer.add(snap.buffer_iids[alive], snap.buffer_rows[alive])
        if snap.base is not None:
            index._base_dead = int((~index._live.of(snap.base.ids())).sum())
        release_memory()
        return index, snap.event_id
