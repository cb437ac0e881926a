"""Keeps one model version's index in step with the store: a full build, snapshots, the store's
event stream (writes made through any replica) and this replica's own writes.

The index is derived state, and so is the row cache (registered rows for fold-ins) that moves with
it: rebuilt from the store, or loaded from a snapshot and brought up to date by the events after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from service.core.embedder import Embedder
from service.core.progress import ProgressLog
from service.core.row_cache import RowCache
from service.core.types import Followed, Rows
from service.index import IndexConfig, VectorIndex
from service.store import Event, EventKind, ItemRecord, Store, event_order_key

log = logging.getLogger(__name__)
ROW_CACHE_ITEMS = 65_536  # registered rows kept in memory for fold-ins (~34 MB at D=128)


class IndexMaintainer:
    def __init__(
        self, embedder: Embedder, store: Store, index_config: IndexConfig | None = None, *,
        row_cache_items: int = ROW_CACHE_ITEMS,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.index_config = index_config or IndexConfig()
        self.index = VectorIndex(embedder.dim, self.index_config)  # empty until build_index
        self.rows = RowCache(row_cache_items)  # registered items' rows for history fold-ins
        # id -> (created_at, index) of this replica's own writes: the follower skips re-adding them
        self._own_writes: dict[str, tuple[float, VectorIndex]] = {}

    def build_index(self) -> str | None:
        """A fresh index from the artifact's rows and every stored item; returns the event id to
        follow from (taken before reading, so events racing the build are applied again)."""
        cursor = self.store.last_event_id()
        embedder = self.embedder
        progress = ProgressLog(log, f"index build, model {embedder.version}: stored items embedded",
                               self.store.count_items())
        self.index = VectorIndex.build(embedder.dim, list(embedder.warm_ids), embedder.warm_rows,
                                       self._index_batches(progress), self.index_config)
        progress.finish()
        self._own_writes.clear()
        return cursor

    def _index_batches(self, progress: ProgressLog) -> Iterator[tuple[list[str], Rows]]:
        """Stored items a batch at a time: the index copies each batch into its own storage, so the
        catalogue is never held twice (nor as one small array per item)."""
        embedder = self.embedder
        for batch in self.store.iter_items():
            batch = [r for r in batch if not embedder.is_trained(r.item_id)]
            rows = embedder.record_rows(batch)
            ids = [r.item_id for r in batch if r.item_id in rows]
            if ids:
                yield ids, np.stack([rows[i] for i in ids]).astype(np.float32)
            progress.advance(len(batch))

    def save_snapshot(self, directory: Path, cursor: str | None) -> None:
        """The index files, for a restart that skips re-embedding."""
        directory.mkdir(parents=True, exist_ok=True)
        self.index.save(directory / f"index-{self.embedder.version}", cursor)

    def load_snapshot(self, directory: Path) -> tuple[bool, str | None]:
        """(loaded, event id it reflects); snapshots are per model version, others are ignored."""
        version = self.embedder.version
        link = directory / f"index-{version}"
        if not link.exists():
            return False, None
        self.index, cursor = VectorIndex.load(link, self.index_config)
        return True, cursor

    def follow(self, cursor: str | None, batch: int = 1000) -> Followed:
        """Apply the store's events after `cursor` to the index. Rebuilds instead when events were
        trimmed from the stream before this replica read them."""
        first = self.store.first_event_id()
        if cursor is not None and first is not None and event_order_key(first) > event_order_key(cursor):
            log.warning("events after %s were trimmed before they were applied; rebuilding the index", cursor)
            return Followed(self.build_index(), [], rebuilt=True)
        lags: list[float] = []
        while events := self.store.read_events(cursor, batch):
            lags += self.apply_events(events)
            cursor = events[-1].event_id
            if len(events) < batch:
                break
        return Followed(cursor, lags, rebuilt=False)

    def apply_events(self, events: Sequence[Event]) -> list[float]:
        """Bring the index in line with the store for every item the events name (state, not replay)."""
        at = {e.item_id: e.at for e in events if e.item_id is not None and e.kind is not EventKind.INTERACTIONS}
        ids = [i for i in at if not self.embedder.is_trained(i)]
        if not ids:
            return []
        records = self.store.get_items(ids)
        gone = [i for i in ids if i not in records]
        self.rows.discard(ids)  # before the index changes: a fold-in never mixes old and new rows
        if gone:
            self.index.remove(gone)
        fresh = []
        for record in records.values():
            own = self._own_writes.pop(record.item_id, None)
            if own is None or own != (record.created_at, self.index):
                fresh.append(record)
        rows = self.embedder.record_rows(fresh)
        if rows:
            self.index.add(list(rows), np.stack(list(rows.values())))
            self.rows.put(rows)
        now = time.time()
        return [now - at[i] for i in rows]

    def added(self, records: Sequence[ItemRecord], rows: Rows) -> None:
        """Items this replica has just written to the store: searchable now, and not added again
        when their events come back through the stream."""
        index = self.index
        index.add([r.item_id for r in records], rows)
        self.rows.put({r.item_id: row for r, row in zip(records, rows, strict=True)})
        if len(self._own_writes) > 100_000:  # the follower is not draining them: stop remembering
            self._own_writes.clear()
        for record in records:
            self._own_writes[record.item_id] = (record.created_at, index)

    def removed(self, item_id: str) -> None:
        """An item this replica has just deleted from the store."""
        self.rows.discard([item_id])
        self.index.remove([item_id])
