"""Max-inner-product item index: external string ids, warm/cold flags, exact or IVF, snapshots.

Rows are x_j = [v_j; b_j] and queries q = [h; 1], so q·x = h·v_j + b_j: the bias rides along.

Writes never wait on FAISS storage growth. The index is three kinds of segment (see
`service.index_storage`): an immutable FAISS *base*, zero or more *frozen* deltas being merged
into the next base, and the live *delta* that takes every add. An add appends to the delta's
chunks (no reallocation) and is searchable as soon as it returns. Removes and upserts leave
tombstones: internal ids are never reused, and a row is live only while `_item_of` holds its id,
so stale rows are filtered at search time until a merge, run in a background thread, builds a
new base without them and swaps it in under the lock. Searches hold the lock only to take the
segments; FAISS and NumPy then run without the GIL, so many threads search at once.

`build(..., pin_warm=True)` keeps the trained (warm) rows out of the base in a small exact
*pinned* segment that every search scans. Trained rows [V; b] are few and, for a real model, of a
different norm than generated rows (about 4x at ml-100k, benchmarks/results/serve.md), so
inner-product IVF lists sort them badly: without pinning, IVF recall@20 at 100k items was 0.1 at
nprobe=128, because almost all of a user's exact top-20 are trained items.

OpenMP threads are the caller's choice: with many concurrent request threads, call
`faiss.omp_set_num_threads(1)` so searches do not oversubscribe the cores; for a few large batches
(or a fast merge) leave FAISS its default.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence, Set
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import numpy.typing as npt

from service.durable import fsync_path, write_durably
from service.index_storage import (
    DeltaSegment,
    DeltaView,
    IdMap,
    Ids,
    IndexConfig,
    Item,
    ItemTable,
    Scores,
    Vectors,
    base_arrays,
    base_ids,
    empty_base,
    is_ivf,
    merged_base,
    search_base,
)

__all__ = ["Hit", "IndexConfig", "VectorIndex", "recall_at_k"]

SNAPSHOT_FORMAT = "m2rec-index/1"
_GIL_SLICE = 16_384  # ids per Python-level pass, so other threads get the GIL between passes
log = logging.getLogger(__name__)


class Hit(NamedTuple):
    item_id: str
    score: float
    is_cold: bool


class VectorIndex:
    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        """`dim` is D+1: the item row with its bias."""
        self.dim = dim
        self.config = config or IndexConfig()
        self._lock = threading.Lock()  # guards every field below; held only for bookkeeping
        self._merge_lock = threading.Lock()  # one merge at a time
        self._base: Any = empty_base(dim)
        self._trained_rows = 0
        self._frozen: tuple[DeltaView, ...] = ()
        self._delta = DeltaSegment(dim, self.config.delta_chunk_rows)
        self._pinned = DeltaSegment(dim, 1).view()  # exact, set once by build(pin_warm=True)
        self._iid_of = IdMap()  # item id -> its live internal id
        self._item_of = ItemTable()  # live internal id -> (item id, is cold)
        self._next_iid = 0
        self._cold = 0
        # tombstones: killed internal ids whose rows still sit in some segment (a merge drops them)
        self._killed: set[int] = set()
        self._merge_thread: threading.Thread | None = None

    @classmethod
    def build(
        cls, dim: int, ids: Sequence[str], vectors: npt.ArrayLike, cold: Sequence[bool],
        config: IndexConfig | None = None, *, pin_warm: bool = False,
    ) -> VectorIndex:
        """Bulk load, then one merge in the calling thread (IVF trained here when configured).

        `pin_warm`: rows with cold=False go to the exact pinned segment, never into the base.
        """
        index = cls(dim, config)
        rows = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D+1)
        is_cold = np.asarray(cold, dtype=bool)
        if pin_warm and len(ids) and not is_cold.all():
            warm = np.flatnonzero(~is_cold)
            index._append([ids[j] for j in warm.tolist()], rows[warm], [False] * len(warm))
            with index._lock:  # nothing else holds the index yet: the delta becomes the pinned segment
                index._pinned = index._delta.view()
                index._delta = DeltaSegment(dim, index.config.delta_chunk_rows)
            rest = np.flatnonzero(is_cold)
            index._append([ids[j] for j in rest.tolist()], rows[rest], [True] * len(rest))
        else:
            index._append(ids, rows, cold)
        index.merge()
        return index

    # -- writes -------------------------------------------------------------------------------

    def add(self, ids: Sequence[str], vectors: npt.ArrayLike, cold: Sequence[bool]) -> None:
        """Insert or replace; searchable when this returns. `vectors` is (N, D+1)."""
        if self._append(ids, vectors, cold):
            self._start_background_merge()

    def remove(self, ids: Sequence[str]) -> int:
        """Number of ids that were present."""
        removed = 0
        with self._lock:
            for item_id in ids:
                iid = self._iid_of.pop(item_id)
                if iid is not None:
                    self._kill(iid)
                    removed += 1
            wants_merge = self._wants_merge()
        if wants_merge:
            self._start_background_merge()
        return removed

    def _append(self, ids: Sequence[str], vectors: npt.ArrayLike, cold: Sequence[bool]) -> bool:
        rows = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D+1)
        if rows.shape != (len(ids), self.dim) or len(cold) != len(ids):
            raise ValueError(f"expected {len(ids)} rows of {self.dim} and {len(ids)} cold flags")
        with self._lock:
            iids = np.arange(self._next_iid, self._next_iid + len(ids), dtype=np.int64)
            self._next_iid += len(ids)
            self._delta.append(iids, rows)
            for item_id, iid, is_cold in zip(ids, iids.tolist(), cold, strict=True):
                old = self._iid_of.get(item_id)
                if old is not None:
                    self._kill(old)  # an upsert: the old row becomes a tombstone
                self._iid_of.set(item_id, iid)
                self._item_of.set(iid, (item_id, bool(is_cold)))
                self._cold += bool(is_cold)
            return self._wants_merge()

    def _kill(self, iid: int) -> None:
        _, was_cold = self._item_of.pop(iid)
        self._cold -= was_cold
        self._killed.add(iid)

    def _wants_merge(self) -> bool:
        cfg = self.config
        return cfg.auto_merge and (
            self._delta.size >= cfg.merge_delta_rows
            or len(self._killed) > cfg.merge_dead_fraction * max(len(self._iid_of), 1)
        )

    # -- reads --------------------------------------------------------------------------------

    def contains(self, item_id: str) -> bool:
        return item_id in self._iid_of

    def count(self) -> tuple[int, int]:
        """(warm, cold) live items."""
        with self._lock:
            return len(self._iid_of) - self._cold, self._cold

    def __len__(self) -> int:
        return len(self._iid_of)

    def search(
        self, queries: npt.ArrayLike, k: int, exclude: Sequence[Set[str]] | None = None
    ) -> list[list[Hit]]:
        """Top-k live items per query (B, D+1), best first, ties by item id; `exclude[b]` never returned.

        Each segment is over-fetched by the exclusions and tombstones, and re-asked for more
        (k' x4) until the k-th kept score is at least every non-exhausted segment's last score.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        q = self._queries(queries)  # (B, D+1)
        excluded: list[Set[str]] = list(exclude) if exclude is not None else [frozenset()] * len(q)
        if len(excluded) != len(q):
            raise ValueError("one exclusion set per query")
        with self._lock:
            segments = [self._pinned, self._base, *self._frozen, self._delta.view()]
            dead = len(self._killed)
        results: list[list[Hit]] = [[] for _ in q]
        todo = np.arange(len(q))
        fetch = k + max((len(e) for e in excluded), default=0) + min(dead, 4 * k)
        while len(todo):
            found = [_search_segment(seg, q[todo], fetch) for seg in segments]
            unfinished = []
            for row, b in enumerate(todo.tolist()):
                hits, bound = self._collect(found, row, fetch, excluded[b])
                results[b] = hits[:k]
                if bound is not None and (len(hits) < k or hits[k - 1].score < bound):
                    unfinished.append(b)
            todo = np.asarray(unfinished, dtype=np.int64)
            fetch *= 4
        return results

    def _queries(self, queries: npt.ArrayLike) -> Vectors:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {q.shape}")
        return q

    def _collect(
        self, found: list[tuple[Scores, Ids]], row: int, fetch: int, excluded: Set[str]
    ) -> tuple[list[Hit], float | None]:
        """Live, allowed hits of one query, sorted; and the best score a deeper fetch could add."""
        hits: list[Hit] = []
        bound: float | None = None
        item_of = self._item_of  # one slot is read atomically: no lock needed
        for scores, iids in found:
            got = 0
            for score, iid in zip(scores[row].tolist(), iids[row].tolist(), strict=True):
                if iid < 0:
                    break
                got += 1
                item = item_of.get(iid)
                if item is not None and item[0] not in excluded:
                    hits.append(Hit(item[0], score, item[1]))
            if got == fetch:  # this segment may hold more rows below its last score
                last = float(scores[row, got - 1])
                bound = last if bound is None else max(bound, last)
        hits.sort(key=lambda h: (-h.score, h.item_id))
        return hits, bound

    def live_vectors(self) -> tuple[list[str], Vectors, list[bool]]:
        """Every live item with its row: for exact baselines and rebuilding elsewhere."""
        with self._lock:
            segments = [self._pinned, self._base, *self._frozen, self._delta.view()]
        parts = [base_arrays(seg) if not isinstance(seg, DeltaView) else seg.arrays() for seg in segments]
        iids = np.concatenate([p[0] for p in parts])
        keep, items = self._lookup(iids)
        return [i[0] for i in items], np.concatenate([p[1] for p in parts])[keep], [i[1] for i in items]

    def _lookup(self, iids: Ids) -> tuple[npt.NDArray[np.bool_], list[Item]]:
        """Which of `iids` are live, and their (item id, is cold), without holding the lock.

        In slices: one `tolist()` of a million ids would hold the GIL (and stall adds) for ~0.1 s.
        """
        keep = np.zeros(len(iids), dtype=bool)
        items: list[Item] = []
        item_of = self._item_of
        for start in range(0, len(iids), _GIL_SLICE):
            for offset, iid in enumerate(iids[start : start + _GIL_SLICE].tolist()):
                item = item_of.get(iid)
                if item is not None:
                    keep[start + offset] = True
                    items.append(item)
        return keep, items

    # -- merging ------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold the delta and tombstones into a new base, in the calling thread."""
        with self._merge_lock:
            with self._lock:
                if self._delta.size == 0 and not self._killed and not self._frozen:
                    return
                if self._delta.size:
                    self._frozen = (*self._frozen, self._delta.view())
                    self._delta = DeltaSegment(self.dim, self.config.delta_chunk_rows)
                base, frozen, trained = self._base, self._frozen, self._trained_rows
                killed = frozenset(self._killed)
            # from here on adds go to the new delta; the base and frozen views are read-only
            parts = [view.arrays() for view in frozen]
            new_iids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
            no_vectors = np.empty((0, self.dim), np.float32)
            new_vectors = np.concatenate([p[1] for p in parts]) if parts else no_vectors
            # vectorised against the small tombstone set: no per-row Python holding the GIL
            killed_ids = np.fromiter(killed, dtype=np.int64, count=len(killed))

            def alive(iids: Ids) -> npt.NDArray[np.bool_]:
                return ~np.isin(iids, killed_ids)

            new_base, trained = merged_base(base, alive, new_iids, new_vectors, self.config, trained)
            with self._lock:
                self._base, self._trained_rows = new_base, trained
                self._frozen = self._frozen[len(frozen) :]
                # rows killed after the freeze may sit in the new base: they stay tombstones
                self._killed -= killed

    def _start_background_merge(self) -> None:
        with self._lock:
            if self._merge_thread is not None and self._merge_thread.is_alive():
                return
            self._merge_thread = threading.Thread(target=self._merge_logged, name="index-merge", daemon=True)
            self._merge_thread.start()

    def _merge_logged(self) -> None:
        try:
            self.merge()
        except Exception:  # a failed merge keeps its frozen rows searchable and is retried later
            log.exception("index merge failed")

    def wait_for_merge(self, timeout: float | None = None) -> bool:
        """True when no background merge is running (any more)."""
        thread = self._merge_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def merging(self) -> bool:
        return self._merge_lock.locked()

    # -- snapshots ----------------------------------------------------------------------------

    def save(self, path: str | Path, event_id: str | None) -> None:
        """Write a snapshot that reflects at least the store's events up to `event_id`.

        Read `event_id` from the store before calling: changes applied while the snapshot is
        written may be partly in it, and replaying the events after `event_id` on load (upserts
        and removes by item id are idempotent) makes the loaded index whole.

        The files go to a fresh versioned directory beside `path`; `path` is a symlink swapped
        to it with one rename, so readers see the old snapshot or the new one, never half of one.
        """
        path = Path(path)
        if path.exists() and not path.is_symlink():
            raise FileExistsError(f"{path} exists and is not a snapshot link")
        with self._lock:
            base, views, pinned = self._base, [*self._frozen, self._delta.view()], self._pinned
            next_iid, trained = self._next_iid, self._trained_rows
        target = path.parent / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        target.mkdir(parents=True)
        faiss.write_index(base, str(target / "base.faiss"))
        parts = [view.arrays() for view in views]
        delta_iids = np.concatenate([p[0] for p in parts])
        keep, _ = self._lookup(delta_iids)
        np.save(target / "delta_iids.npy", delta_iids[keep])
        np.save(target / "delta_vectors.npy", np.concatenate([p[1] for p in parts])[keep])
        pinned_iids, pinned_vectors = pinned.arrays()
        np.save(target / "pinned_iids.npy", pinned_iids)
        np.save(target / "pinned_vectors.npy", pinned_vectors)
        # live rows of the base and delta taken above; an item changed meanwhile is left out or
        # kept, and replaying the events after `event_id` (idempotent upserts/removes) fixes it
        iids = np.concatenate([pinned_iids, base_ids(base), delta_iids[keep]])
        keep, items = self._lookup(iids)
        write_durably(target / "items.json", json.dumps({
            "iids": iids[keep].tolist(),
            "ids": [item[0] for item in items],
            "cold": [item[1] for item in items],
        }))
        write_durably(target / "meta.json", json.dumps({
            "format": SNAPSHOT_FORMAT, "dim": self.dim, "event_id": event_id, "next_iid": next_iid,
            "trained_rows": trained, "saved_at": time.time(), "faiss_version": faiss.__version__,
        }))
        for name in ("base.faiss", "delta_iids.npy", "delta_vectors.npy", "pinned_iids.npy", "pinned_vectors.npy"):
            fsync_path(target / name)
        fsync_path(target)
        previous = path.resolve() if path.is_symlink() else None
        link = path.parent / f".{path.name}.{uuid.uuid4().hex}.link"
        os.symlink(target.name, link)
        os.replace(link, path)
        fsync_path(path.parent)
        if previous is not None and previous != target and previous.parent == path.parent:
            shutil.rmtree(previous, ignore_errors=True)

    @classmethod
    def load(cls, path: str | Path, config: IndexConfig | None = None) -> tuple[VectorIndex, str | None]:
        """The index and the event id it reflects; apply the store's later events to catch up."""
        root = Path(path).resolve()
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{root}: unknown snapshot format {meta.get('format')!r}")
        index = cls(int(meta["dim"]), config)
        base: Any = faiss.read_index(str(root / "base.faiss"))
        if is_ivf(base):
            base.nprobe = index.config.nprobe
        items = json.loads((root / "items.json").read_text())
        delta_iids = np.load(root / "delta_iids.npy")
        pinned_iids = np.load(root / "pinned_iids.npy") if (root / "pinned_iids.npy").is_file() else None
        with index._lock:
            if pinned_iids is not None and len(pinned_iids):
                pinned = DeltaSegment(index.dim, len(pinned_iids))
                pinned.append(pinned_iids, np.load(root / "pinned_vectors.npy"))
                index._pinned = pinned.view()
            index._base, index._trained_rows = base, int(meta["trained_rows"])
            index._next_iid = int(meta["next_iid"])
            index._delta.append(delta_iids, np.load(root / "delta_vectors.npy"))
            for iid, item_id, is_cold in zip(items["iids"], items["ids"], items["cold"], strict=True):
                index._iid_of.set(item_id, iid)
                index._item_of.set(iid, (item_id, is_cold))
                index._cold += is_cold
            stored = np.concatenate([base_ids(base), delta_iids, *([] if pinned_iids is None else [pinned_iids])])
            index._killed = set(np.setdiff1d(stored, np.asarray(items["iids"], dtype=np.int64)).tolist())
        return index, meta["event_id"]


def recall_at_k(index: VectorIndex, queries: npt.ArrayLike, k: int) -> float:
    """Mean share of the exact top-k (brute force over the live rows) that `index.search` returns."""
    q = index._queries(queries)  # (B, D+1)
    ids, vectors, _ = index.live_vectors()
    if not ids:
        return 1.0
    exact = faiss.IndexFlatIP(index.dim)
    exact.add(vectors)
    _, rows = exact.search(q, min(k, len(ids)))  # (B, k)
    found = index.search(q, k)
    pairs = zip(rows, found, strict=True)
    overlap = [len({ids[r] for r in truth} & {hit.item_id for hit in got}) for truth, got in pairs]
    return float(np.mean(overlap)) / min(k, len(ids))


def _search_segment(segment: Any, queries: Vectors, k: int) -> tuple[Scores, Ids]:
    if isinstance(segment, DeltaView):
        return segment.search(queries, k)
    return search_base(segment, queries, k)
