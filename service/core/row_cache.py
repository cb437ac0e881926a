"""Rows of registered items under one model version, in memory: a user's history is folded in on
every /recommend, and reading its registered items from the store (and decoding their raw inputs)
cost more than the fold-in and the search together (benchmarks/results/serve.md).

The store stays the source of truth. Every path that changes an item's row on this replica goes
through here: its own writes and deletes, and the event follower applying the writes made through
other replicas. So a cached row is stale at most as long as this replica's index is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

Row = npt.NDArray[np.float32]  # (D+1,)


class RowCache:
    """Bounded, least recently used out. Fills from store reads carry the generation read before
    the store was asked: a write that lands in between wins over the older row being filled."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._rows: OrderedDict[str, Row] = OrderedDict()
        self._generation = 0  # bumped by every write and removal

    @property
    def generation(self) -> int:
        return self._generation

    def get_many(self, item_ids: Iterable[str]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        with self._lock:
            for item_id in item_ids:
                row = self._rows.get(item_id)
                if row is not None:
                    self._rows.move_to_end(item_id)
                    found[item_id] = row
        return found

    def put(self, rows: Mapping[str, Row]) -> None:
        """Rows just written or applied from the event stream: they replace what is cached."""
        with self._lock:
            self._generation += 1
            self._insert(rows)

    def fill(self, rows: Mapping[str, Row], generation: int) -> None:
        """Rows read from the store after `generation` was read; dropped if anything changed since."""
        with self._lock:
            if generation == self._generation:
                self._insert(rows)

    def discard(self, item_ids: Iterable[str]) -> None:
        with self._lock:
            self._generation += 1
            for item_id in item_ids:
                self._rows.pop(item_id, None)

    def __len__(self) -> int:
        return len(self._rows)

    def _insert(self, rows: Mapping[str, Row]) -> None:
        for item_id, row in rows.items():
            self._rows[item_id] = row
            self._rows.move_to_end(item_id)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
