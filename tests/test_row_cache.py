"""RowCache: bounded, and a fill read from the store never overwrites a newer write."""

from __future__ import annotations

import numpy as np

from service.core.row_cache import RowCache


def _row(v: float) -> np.ndarray:
    return np.full(3, v, dtype=np.float32)


def test_least_recently_used_rows_go_first() -> None:
    cache = RowCache(2)
    cache.put({"a": _row(1), "b": _row(2)})
    assert set(cache.get_many(["a"])) == {"a"}  # a is now the most recent
    cache.put({"c": _row(3)})
    assert set(cache.get_many(["a", "b", "c"])) == {"a", "c"} and len(cache) == 2


def test_a_fill_that_raced_a_write_or_a_delete_is_dropped() -> None:
    cache = RowCache(10)
    generation = cache.generation  # a reader starts its store read ...
    cache.put({"a": _row(2)})  # ... a write lands meanwhile ...
    cache.fill({"a": _row(1)}, generation)  # ... and the reader's older row must not win
    np.testing.assert_array_equal(cache.get_many(["a"])["a"], _row(2))
    generation = cache.generation
    cache.discard(["a"])
    cache.fill({"a": _row(1)}, generation)
    assert cache.get_many(["a"]) == {}
    generation = cache.generation
    cache.fill({"b": _row(4)}, generation)  # nothing changed in between: kept
    np.testing.assert_array_equal(cache.get_many(["b"])["b"], _row(4))
