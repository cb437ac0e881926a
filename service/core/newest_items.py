"""The newest registered items, bounded: the cold half of a fallback list for unknown or empty users."""

from __future__ import annotations

import threading

from service.index import Hit


class NewestItems:
    """Recently registered items and their bias: the cold half of the fallback list (bounded)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, float]] = {}  # id -> (created_at, bias)

    def add(self, item_id: str, created_at: float, bias: float) -> None:
        with self._lock:
            self._items[item_id] = (created_at, bias)
            if len(self._items) > 2 * self.keep:
                newest = sorted(self._items.items(), key=lambda kv: -kv[1][0])[: self.keep]
                self._items = dict(newest)

    def remove(self, item_id: str) -> None:
        with self._lock:
            self._items.pop(item_id, None)

    def dump(self) -> dict[str, tuple[float, float]]:
        with self._lock:
            return dict(self._items)

    def newest(self, n: int, exclude: set[str]) -> list[Hit]:
        with self._lock:
            ordered = sorted(self._items.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [Hit(i, bias, True) for i, (_, bias) in ordered if i not in exclude][:n]
