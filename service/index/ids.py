"""The side table of the new items: external string ids <-> internal int64 ids, and which ids are live.

Sized for 10M items without a stall: nothing here grows by copying the whole catalogue inside an add
(a dict of 10M keys rehashes ~300 MB at once; 256 small dicts each 1/256 of it). Internal ids are never
reused: a removed or replaced id stays dead (a tombstone) in its FAISS segment, skipped via `Liveness`.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

_SHARDS = 256
_CHUNK = 1 << 16


class IdTable:
    def __init__(self) -> None:
        self._iid_of: list[dict[str, int]] = [{} for _ in range(_SHARDS)]
        self._items: list[list[str | None]] = []  # internal id -> item id, in chunks; None once dead
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def lookup(self, item_ids: Iterable[str]) -> list[int]:
        shards = self._iid_of
        return [i for i in (shards[hash(x) % _SHARDS].get(x) for x in item_ids) if i is not None]

    def set(self, item_id: str, iid: int) -> int | None:
        """Returns the internal id `iid` replaces (now dead), if any."""
        old = self.pop(item_id)
        self._iid_of[hash(item_id) % _SHARDS][item_id] = iid
        while len(self._items) <= iid // _CHUNK:
            self._items.append([None] * _CHUNK)
        self._items[iid // _CHUNK][iid % _CHUNK] = item_id
        self._live += 1
        return old

    def pop(self, item_id: str) -> int | None:
        iid = self._iid_of[hash(item_id) % _SHARDS].pop(item_id, None)
        if iid is not None:
            self._items[iid // _CHUNK][iid % _CHUNK] = None
            self._live -= 1
        return iid

    def items_of(self, iids: list[int]) -> list[str | None]:
        """The live items of `iids` (None: dead), read without a lock (a slot is read atomically)."""
        items, chunks = self._items, len(self._items)
        return [items[i // _CHUNK][i % _CHUNK] if 0 <= i // _CHUNK < chunks else None for i in iids]

    def items(self) -> tuple[list[int], list[str]]:
        """Every live (internal id, item id), ascending by internal id."""
        flat = list(chain.from_iterable(self._items))  # references only: no tuple per item, no sort
        iids = [iid for iid, item in enumerate(flat) if item is not None]
        return iids, [flat[iid] for iid in iids]  # type: ignore[misc]


class Liveness:
    """A bit per internal id, set while live; FAISS reads it through `selector` during a scan."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.bits = np.zeros(capacity // 8, np.uint8)
        self.selector: Any = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))

    def grow(self, ids: int) -> None:
        """Room for `ids` internal ids; a search that took the old bitmap keeps it (and its selector)."""
        if ids > 8 * len(self.bits):
            bits = np.zeros(max(2 * len(self.bits), ids // 8 + 1), np.uint8)
            bits[: len(self.bits)] = self.bits
            self.bits, self.selector = bits, faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))

    def set(self, iids: npt.NDArray[np.int64], live: bool) -> None:
        masks = (1 << (iids & 7)).astype(np.uint8)
        (np.bitwise_or if live else np.bitwise_and).at(self.bits, iids >> 3, masks if live else ~masks)

    def of(self, iids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        inside = (iids >> 3) < len(self.bits)
        out = np.zeros(len(iids), bool)
        out[inside] = (self.bits[iids[inside] >> 3] >> (iids[inside] & 7)) & 1 == 1
        return out
