"""Max-inner-product item index: external string ids, warm/cold flags, exact or IVF, snapshots.

Rows are x_j = [v_j; b_j] and queries q = [h; 1], so q·x = h·v_j + b_j: the bias rides along.

Writes never wait on a rebuild. The index is four kinds of segment: an immutable *base* of shards
(`service.index.base`: exact FAISS shards, or IVF lists chosen through the MIPS->L2 reduction and
scanned by service/index/_ivf_scan.c), zero or more *frozen* deltas
being merged into the next base, the live *delta* that takes every add (`service.index.storage`),
and the exact *pinned* rows. An add appends to the delta's chunks (no reallocation) and is
searchable as soon as it returns. Removes and upserts leave tombstones: internal ids are never
reused, and a row is live only while `_item_of` holds its id, so stale rows are filtered at search
time until a merge, run in a background thread, builds a new base without them and swaps it in
under the lock. Searches hold the lock only to take the segments; the scoring kernels and NumPy then
run without the GIL, so many threads search at once. How a batch of queries is answered from the segments
(exclusions, over-fetching, the best k live items) is `service.index.search`.

`build(..., pin_warm=True)` keeps the trained (warm) rows out of the base in a small exact
*pinned* segment that every search scans. Trained rows [V; b] are few, carry most of a user's
exact top-k, and are much longer than generated rows (benchmarks/results/serve.md): pinned, they are
found exactly whatever lists IVF probes, and they do not set the M of the L2 reduction.

`search` never calls FAISS: every segment is scored by the kernels of `service.index._scoring`.
FAISS works in builds and background merges (IVF k-means, assigning rows to lists), with as many
OpenMP threads as the caller sets (`faiss.omp_set_num_threads`; the service: M2REC_FAISS_THREADS).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence, Set
from itertools import chain
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.index.base import Base, build_base, is_dead, merged_base
from service.index.search import Hit, base_found, collect, exact_found, floors_of, head_hits, prepare_segments
from service.index.snapshot import SNAPSHOT_FORMAT, read_snapshot, write_snapshot
from service.index.storage import (
    Banned,
    DeltaSegment,
    DeltaView,
    IdMap,
    Ids,
    IndexConfig,
    Item,
    ItemTable,
    Vectors,
    release_freed_memory,
    take_rows,
)

__all__ = ["SNAPSHOT_FORMAT", "Hit", "IndexConfig", "VectorIndex"]

_GIL_SLICE = 16_384  # ids per Python-level pass, so other threads get the GIL between passes
log = logging.getLogger(__name__)
Batch = tuple[Sequence[str], npt.ArrayLike, Sequence[bool]]  # ids, rows (N, D+1), cold flags
HEAD_SLACK = 8  # candidates converted past the k-th: room for ties at the k-th score


class VectorIndex:
    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        """`dim` is D+1: the item row with its bias."""
        self.dim = dim
        self.config = config or IndexConfig()
        self.nprobe = self.config.nprobe  # IVF lists scanned per query; may be retuned live
        self._lock = threading.Lock()  # guards every field below; held only for bookkeeping
        self._merge_lock = threading.Lock()  # one merge at a time
        self._base = Base(dim)
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
        """Bulk load, then the base built in the calling thread (IVF trained here when configured).

        `pin_warm`: rows with cold=False go to the exact pinned segment, never into the base.
        """
        return cls.build_from([(ids, vectors, cold)], dim, config, pin_warm=pin_warm)

    @classmethod
    def build_from(
        cls, batches: Iterable[Batch], dim: int, config: IndexConfig | None = None, *, pin_warm: bool = False,
    ) -> VectorIndex:
        """`build` from batches, so a caller streaming from a store never holds the catalogue twice:
        rows are copied into the delta's chunks, and each chunk is freed once the base has it."""
        index = cls(dim, config)
        pinned = DeltaSegment(dim, index.config.delta_chunk_rows)
        for ids, vectors, cold in batches:
            rows = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D+1)
            is_cold = np.asarray(cold, dtype=bool)
            if pin_warm and not is_cold.all():
                warm, rest = np.flatnonzero(~is_cold), np.flatnonzero(is_cold)
                index._append([ids[j] for j in warm.tolist()], rows[warm], [False] * len(warm), pinned)
                index._append([ids[j] for j in rest.tolist()], rows[rest], [True] * len(rest))
            else:
                index._append(ids, rows, cold)
        with index._lock:  # nothing else holds the index yet
            killed = np.sort(np.fromiter(index._killed, np.int64, len(index._killed)))
            parts = [(iids[live], rows[live]) for iids, rows in index._delta.take()
                     for live in [~is_dead(iids, killed)]]
            index._pinned = pinned.view()
            index._base = build_base(parts, dim, index.config)
            prepare_segments(index._base, index._pinned)
            index._killed = set(killed[is_dead(killed, index._pinned.sorted_iids)].tolist())
            index._iid_of.freeze(hot=index._pinned_ids())
        release_freed_memory()  # the delta's chunks and the build's temporaries
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

    def _append(self, ids: Sequence[str], vectors: npt.ArrayLike, cold: Sequence[bool],
                into: DeltaSegment | None = None) -> bool:
        """Append to `into` (default: the current delta, resolved under the lock: a merge may swap
        the delta between the caller's read of it and this append, and rows appended to a delta
        the merge already froze would be in neither the merge nor the new delta)."""
        rows = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D+1)
        if rows.shape != (len(ids), self.dim) or len(cold) != len(ids):
            raise ValueError(f"expected {len(ids)} rows of {self.dim} and {len(ids)} cold flags")
        with self._lock:
            if into is None:
                into = self._delta
            iids = np.arange(self._next_iid, self._next_iid + len(ids), dtype=np.int64)
            self._next_iid += len(ids)
            into.append(iids, rows)
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

    @property
    def is_approximate(self) -> bool:
        return self._base.is_ivf

    def search(
        self, queries: npt.ArrayLike, k: int, exclude: Sequence[Set[str]] | None = None
    ) -> list[list[Hit]]:
        """Top-k live items per query (B, D+1), best first, ties by item id; `exclude[b]` never returned.

        Exact segments score every row and drop the excluded ones before choosing; the IVF scan
        skips them as it goes. Every segment is over-fetched by the tombstones
        and re-asked for more (x4) until each query's k-th kept score is at least every
        non-exhausted segment's last score. Python then walks only the ~k best candidates.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        q = self._queries(queries)  # (B, D+1)
        excluded: list[Set[str]] = list(exclude) if exclude is not None else [frozenset()] * len(q)
        if len(excluded) != len(q):
            raise ValueError("one exclusion set per query")
        with self._lock:
            base = self._base
            exact = [self._pinned, *self._frozen]
            delta = self._delta.view()
            dead = len(self._killed)
        banned = self._banned(excluded)  # may miss a racing upsert: collect re-checks
        nprobe = self.nprobe
        results: list[list[Hit]] = [[] for _ in q]
        todo = list(range(len(q)))
        fetch = k + min(dead, 4 * k)
        while todo:
            ban = banned if len(todo) == len(q) else banned.subset(todo)
            found = exact_found([*exact, *base.exact_views()], q[todo], fetch, ban, once=delta)
            # the exact rows first: their k-th scores spare the IVF scan most of its selection
            found += base_found(base, q[todo], fetch, ban, nprobe, floors_of(found))
            if not found:
                break
            all_scores = np.concatenate([f.scores for f in found], axis=1)  # (B', S): every segment's candidates
            all_iids = np.concatenate([f.iids for f in found], axis=1)
            bound = np.maximum.reduce(np.array([f.bound for f in found]), axis=0).tolist()  # (B',)
            order = (-all_scores).argsort(axis=1, kind="stable")  # (B', S) best first
            all_scores, all_iids = take_rows(all_scores, order), take_rows(all_iids, order)
            head = min(all_scores.shape[1], k + HEAD_SLACK)  # one conversion for the batch
            head_scores, head_iids = all_scores[:, :head].tolist(), all_iids[:, :head].tolist()
            unfinished = []
            for row, b in enumerate(todo):
                hits = head_hits(self._item_of, head_scores[row], head_iids[row], k, excluded[b],
                                 head < all_scores.shape[1])
                if hits is None:
                    hits = collect(self._item_of, all_scores[row], all_iids[row], k, excluded[b])
                results[b] = hits
                if bound[row] > -math.inf and (len(hits) < k or hits[-1].score < bound[row]):
                    unfinished.append(b)
            todo = unfinished
            fetch *= 4
        return results

    def _pinned_ids(self) -> list[str]:
        """Item ids of the live pinned rows."""
        iids = self._pinned.arrays()[0].tolist()
        return [i for i in self._item_of.items_at(iids)[0] if i is not None]

    def _banned(self, excluded: list[Set[str]]) -> Banned:
        """Every query's excluded items that the index holds, as internal ids, in one lookup."""
        flat = list(chain.from_iterable(excluded))
        iids = self._iid_of.lookup(flat)  # (n,), -1 where absent
        owner = np.arange(len(excluded)).repeat([len(e) for e in excluded])
        present = iids >= 0
        return Banned(owner[present], iids[present], len(excluded))

    def _queries(self, queries: npt.ArrayLike) -> Vectors:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {q.shape}")
        return q

    def live_vectors(self) -> tuple[list[str], Vectors, list[bool]]:
        """Every live item with its row: for exact baselines and rebuilding elsewhere."""
        with self._lock:
            base, views = self._base, [self._pinned, *self._frozen, self._delta.view()]
        parts = [*base.parts(), *(view.arrays() for view in views)]
        iids = np.concatenate([p[0] for p in parts])
        keep, items = self._lookup(iids)
        return [i[0] for i in items], np.concatenate([p[1] for p in parts])[keep], [i[1] for i in items]

    def _lookup(self, iids: Ids) -> tuple[npt.NDArray[np.bool_], list[Item]]:
        """Which of `iids` are live, and their (item id, is cold), without holding the lock.

        In slices: one `tolist()` of a million ids would hold the GIL, and stall adds, throughout.
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
                base, frozen, pinned = self._base, self._frozen, self._pinned
                killed = np.sort(np.fromiter(self._killed, np.int64, len(self._killed)))
            # from here on adds go to the new delta; the base and frozen views are read-only
            parts = [view.arrays() for view in frozen]
            new: tuple[Ids, Vectors] = (
                np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64),
                np.concatenate([p[1] for p in parts]) if parts else np.empty((0, self.dim), np.float32),
            )
            new_base = merged_base(base, new, killed, self.config)
            pinned_iids, pinned_rows = pinned.arrays()
            pinned_dead = is_dead(pinned_iids, killed)
            if pinned_dead.any():
                segment = DeltaSegment(self.dim, max(len(pinned_iids), 1))
                segment.append(pinned_iids[~pinned_dead], pinned_rows[~pinned_dead])
                pinned = segment.view()
            # tombstones the new segments still hold stay; the rest are gone for good
            kept = np.zeros(len(killed), dtype=bool)
            for shard in new_base.shards:
                kept |= is_dead(killed, shard.iids)
            if new_base.overflow is not None:
                kept |= is_dead(killed, np.sort(new_base.overflow.arrays()[0]))
            dropped = set(killed[~kept].tolist())
            prepare_segments(new_base, pinned)  # here, in the merge's thread, not in the first search after the swap
            with self._lock:
                self._base, self._pinned = new_base, pinned
                self._frozen = self._frozen[len(frozen) :]
                self._killed -= dropped
            del base, frozen, parts, new, new_base
        release_freed_memory()

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
        with self._lock:
            base, views, pinned = self._base, [*self._frozen, self._delta.view()], self._pinned
            next_iid = self._next_iid
        write_snapshot(Path(path), base=base, pinned=pinned, deltas=views, next_iid=next_iid,
                       event_id=event_id, lookup=self._lookup)

    @classmethod
    def load(cls, path: str | Path, config: IndexConfig | None = None) -> tuple[VectorIndex, str | None]:
        """The index and the event id it reflects; apply the store's later events to catch up."""
        snapshot = read_snapshot(Path(path))
        index = cls(snapshot.dim, config)
        with index._lock:
            index._pinned, index._base = snapshot.pinned, snapshot.base
            prepare_segments(index._base, index._pinned)
            index._next_iid = snapshot.next_iid
            index._delta.append(*snapshot.delta)
            for iid, item_id, is_cold in zip(snapshot.iids, snapshot.item_ids, snapshot.cold, strict=True):
                index._iid_of.set(item_id, iid)
                index._item_of.set(iid, (item_id, is_cold))
                index._cold += is_cold
            stored = np.concatenate([snapshot.base.iids(), snapshot.delta[0], snapshot.pinned.arrays()[0]])
            index._killed = set(np.setdiff1d(stored, np.asarray(snapshot.iids, dtype=np.int64)).tolist())
            index._iid_of.freeze(hot=index._pinned_ids())
        return index, snapshot.event_id
