"""The side table of the new items: external string ids <-> internal int64 ids, and which ids are live.

Sized for 10M items in little memory and without a stall. Internal id -> item id: the item id strings
in fixed chunks of NumPy's variable-width strings (16 B an id of up to 15 bytes, where a Python str in a
list costs ~72 B; a read is one array index, no lock). Item id -> internal id: per shard, a
sorted array of the ids' hashes beside their internal ids (16 B an item, where a dict costs ~80 B
with its int objects), plus a small dict of the latest inserts that joins the arrays every
`_RECENT` inserts (a shard is 1/256 of the catalogue: the join copies ~0.3 MB at 10M items, never the
whole table). Hashes are Python's own, so the arrays are rebuilt at load, never saved. Internal ids
are never reused: a removed or replaced id stays dead (a tombstone) in its FAISS segment, skipped via
`Liveness`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from numpy.dtypes import StringDType

_SHARDS = 256
CHUNK = 1 << 16
_RECENT = 1024  # inserts a shard's dict holds before they join its sorted arrays
_NAMES = StringDType(na_object=None)  # an unnamed or dead internal id reads as None


class _Shard:
    __slots__ = ("arrays", "recent")

    def __init__(self) -> None:
        # (hashes, internal ids) sorted by hash, swapped whole so a lock-free reader sees one version;
        # a removed entry keeps its hash with internal id -1 until the next join drops it
        self.arrays: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] = (np.zeros(0, np.int64),
                                                                           np.zeros(0, np.int64))
        self.recent: dict[str, int] = {}


class IdTable:
    def __init__(self, recent: int = _RECENT) -> None:
        self._recent = recent  # a shard's dict joins its arrays at this many entries
        self._shards = [_Shard() for _ in range(_SHARDS)]
        self._items: list[npt.NDArray[Any]] = []  # internal id -> item id, in chunks of _NAMES; None once dead
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def lookup(self, item_ids: Iterable[str]) -> list[int]:
        """The live internal ids of those of `item_ids` that are present."""
        return [iid for iid in map(self._find, item_ids) if iid is not None]

    def _find(self, item_id: str) -> int | None:
        shard = self._shards[hash(item_id) % _SHARDS]
        iid = shard.recent.get(item_id)
        if iid is None:
            keys, iids = shard.arrays  # one version, even if a join swaps in the next meanwhile
            at = self._at(keys, iids, item_id)
            iid = None if at is None else int(iids[at])
        return iid

    def _at(self, keys: npt.NDArray[np.int64], iids: npt.NDArray[np.int64], item_id: str) -> int | None:
        """Where live `item_id` is in a shard's sorted arrays, if it is there."""
        h = hash(item_id)
        at = int(np.searchsorted(keys, h))
        while at < len(keys) and keys[at] == h:  # a hash shared by other ids: compare the ids themselves
            candidate = int(iids[at])
            if candidate >= 0 and self._items[candidate // CHUNK][candidate % CHUNK] == item_id:
                return at
            at += 1
        return None

    def set(self, item_id: str, iid: int) -> int | None:
        """Returns the internal id `iid` replaces (now dead), if any."""
        old = self.pop(item_id)
        self._name(iid, item_id)
        shard = self._shards[hash(item_id) % _SHARDS]
        shard.recent[item_id] = iid
        if len(shard.recent) >= self._recent:
            self._join(shard)
        return old

    def set_many(self, pieces: Iterable[tuple[Sequence[str], npt.NDArray[np.int64]]]) -> None:
        """`set` of many ids that are all absent and distinct (a snapshot's), given a piece (item ids, their
        internal ids) at a time: each piece's strings are stored and its hashes dealt to their shards as it
        comes; each shard's sorted arrays are built once, at the end."""
        dealt: list[list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]] = [[] for _ in range(_SHARDS)]
        for item_ids, iids in pieces:
            part, names = np.asarray(iids, dtype=np.int64), np.array(item_ids, _NAMES)
            for c in np.unique(part // CHUNK).tolist():
                mine = part // CHUNK == c
                self._chunk(c)[part[mine] % CHUNK] = names[mine]
            self._live += len(part)
            hashes = np.fromiter(map(hash, item_ids), np.int64, len(item_ids))
            owner = hashes % _SHARDS
            order = np.argsort(owner, kind="stable")
            bounds = np.searchsorted(owner[order], np.arange(_SHARDS + 1))
            for s in np.flatnonzero(np.diff(bounds)).tolist():
                mine = order[bounds[s] : bounds[s + 1]]
                dealt[s].append((hashes[mine], part[mine]))
        for s, shard in enumerate(self._shards):
            if dealt[s]:
                hashes, values = np.concatenate([h for h, _ in dealt[s]]), np.concatenate([v for _, v in dealt[s]])
                order = np.argsort(hashes, kind="stable")
                shard.arrays = _merged(shard.arrays, hashes[order], values[order])
                dealt[s] = []

    def pop(self, item_id: str) -> int | None:
        shard = self._shards[hash(item_id) % _SHARDS]
        iid = shard.recent.pop(item_id, None)
        if iid is None:
            keys, iids = shard.arrays
            if (at := self._at(keys, iids, item_id)) is None:
                return None
            iid = int(iids[at])
            iids[at] = -1
        self._items[iid // CHUNK][iid % CHUNK] = None
        self._live -= 1
        return iid

    def _name(self, iid: int, item_id: str) -> None:
        self._chunk(iid // CHUNK)[iid % CHUNK] = item_id
        self._live += 1

    def _chunk(self, c: int) -> npt.NDArray[Any]:
        while len(self._items) <= c:
            self._items.append(np.full(CHUNK, None, _NAMES))
        return self._items[c]

    @staticmethod
    def _join(shard: _Shard) -> None:
        hashes = np.fromiter(map(hash, shard.recent), np.int64, len(shard.recent))
        values = np.fromiter(shard.recent.values(), np.int64, len(shard.recent))
        order = np.argsort(hashes, kind="stable")
        shard.arrays = _merged(shard.arrays, hashes[order], values[order])  # readers find them here now
        shard.recent.clear()

    def items_of(self, iids: list[int]) -> list[str | None]:
        """The live items of `iids` (None: dead), read without a lock (a slot is read atomically)."""
        items, chunks = self._items, len(self._items)
        return [items[i // CHUNK][i % CHUNK] if 0 <= i // CHUNK < chunks else None for i in iids]

    def named(self, c: int) -> list[str | None]:
        """A copy of chunk `c`: the item id of each internal id from c·CHUNK on (None: dead or not handed out)."""
        return self._items[c].tolist() if c < len(self._items) else [None] * CHUNK


def _merged(arrays: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]], hashes: npt.NDArray[np.int64],
            iids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The sorted arrays with (hashes, iids) (sorted by hash) inserted and removed entries dropped."""
    keys, values = arrays
    kept = values >= 0
    keys, values = keys[kept], values[kept]
    at = np.searchsorted(keys, hashes)
    return np.insert(keys, at, hashes), np.insert(values, at, iids)


def live_pieces(named: Iterable[list[str | None]], live: Liveness) -> Iterator[tuple[list[str], npt.NDArray[np.int64]]]:
    """`set_many`'s pieces from a snapshot's item id of internal ids 0, 1, ... (None: dead), given a piece at
    a time; each piece's internal ids are marked in `live` as it passes."""
    start = 0
    for piece in named:
        iids = start + np.flatnonzero(np.fromiter((name is not None for name in piece), bool, len(piece)))
        live.set(iids, True)
        yield [name for name in piece if name is not None], iids
        start += len(piece)


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

    def ids(self, upto: int) -> npt.NDArray[np.int64]:
        """The live internal ids below `upto`, ascending."""
        return np.flatnonzero(np.unpackbits(self.bits, bitorder="little")[:upto]).astype(np.int64)

    def of(self, iids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Whether each of `iids` is live; every internal id handed out is within the bitmap (`grow`)."""
        return np.asarray((self.bits[iids >> 3] >> (iids & 7)) & 1, bool)
