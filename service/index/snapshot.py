"""The on-disk form of a `service.index.VectorIndex`: one directory per snapshot, swapped by symlink.

    meta.json            format, dim, event id, next internal id, kind, M², trained rows, shard count
    coarse.faiss         IVF only: the shared coarse quantizer
    shard-{i}.faiss      each exact base shard (FAISS); shard-{i}-iids.npy its sorted internal ids
    shard-{i}-{panels,starts,rows,slot_iids}.npy   each IVF shard's lists (service.index.ivf_lists)
    overflow_*.npy       IVF only: exact rows longer than M
    pinned_*.npy, delta_*.npy   the exact segments (delta rows: live ones only)
    items.json           internal id -> item id and cold flag, for live rows

Derived state: a snapshot that fails to load is ignored and the index rebuilt from the store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from service.durable import fsync_path, write_durably
from service.index.base import Base, Coarse, Shard
from service.index.ivf_lists import ListPanels
from service.index.storage import DeltaSegment, DeltaView, Ids, Item, Vectors

SNAPSHOT_FORMAT = "m2rec-index/3"  # 3: IVF shards as ListPanels arrays, not FAISS IVF files
Lookup = Callable[[Ids], tuple[npt.NDArray[np.bool_], list[Item]]]  # internal ids -> live mask, items


@dataclass
class Snapshot:
    dim: int
    base: Base
    pinned: DeltaView
    delta: tuple[Ids, Vectors]
    iids: list[int]
    item_ids: list[str]
    cold: list[bool]
    next_iid: int
    event_id: str | None


def write_snapshot(
    path: Path, *, base: Base, pinned: DeltaView, deltas: list[DeltaView], next_iid: int,
    event_id: str | None, lookup: Lookup,
) -> None:
    """Write to a fresh directory beside `path`, then point the `path` symlink at it (one rename)."""
    if path.exists() and not path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a snapshot link")
    target = path.parent / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    target.mkdir(parents=True)
    files: list[str] = []

    def save_array(name: str, array: npt.NDArray[np.generic]) -> None:
        np.save(target / name, array)
        files.append(name)

    if base.coarse is not None:
        faiss.write_index(base.coarse.quantizer, str(target / "coarse.faiss"))
        files.append("coarse.faiss")
    for i, shard in enumerate(base.shards):
        if isinstance(shard.index, ListPanels):
            files += [path.name for path in shard.index.save(target / f"shard-{i}")]
        else:
            faiss.write_index(shard.index, str(target / f"shard-{i}.faiss"))
            files.append(f"shard-{i}.faiss")
        save_array(f"shard-{i}-iids.npy", shard.iids)
    overflow = base.overflow.arrays() if base.overflow is not None else None
    if overflow is not None:
        save_array("overflow_iids.npy", overflow[0])
        save_array("overflow_vectors.npy", overflow[1])
    parts = [view.arrays() for view in deltas]
    delta_iids = np.concatenate([p[0] for p in parts])
    live, _ = lookup(delta_iids)
    save_array("delta_iids.npy", delta_iids[live])
    save_array("delta_vectors.npy", np.concatenate([p[1] for p in parts])[live])
    pinned_iids, pinned_vectors = pinned.arrays()
    save_array("pinned_iids.npy", pinned_iids)
    save_array("pinned_vectors.npy", pinned_vectors)
    # items of the rows taken above; one changed meanwhile is left out or kept, and replaying the
    # events after `event_id` (idempotent upserts/removes) fixes it
    iids = np.concatenate([pinned_iids, base.iids(), delta_iids[live]])
    live, items = lookup(iids)
    write_durably(target / "items.json", json.dumps({
        "iids": iids[live].tolist(), "ids": [item[0] for item in items], "cold": [item[1] for item in items],
    }))
    write_durably(target / "meta.json", json.dumps({
        "format": SNAPSHOT_FORMAT, "dim": base.dim, "event_id": event_id, "next_iid": next_iid,
        "kind": "ivf" if base.coarse is not None else "exact", "shards": len(base.shards),
        "max_sq_norm": base.coarse.max_sq_norm if base.coarse is not None else None,
        "trained_rows": base.coarse.trained_rows if base.coarse is not None else 0,
        "saved_at": time.time(), "faiss_version": faiss.__version__,
    }))
    for name in files:
        fsync_path(target / name)
    fsync_path(target)
    previous = path.resolve() if path.is_symlink() else None
    link = path.parent / f".{path.name}.{uuid.uuid4().hex}.link"
    os.symlink(target.name, link)
    os.replace(link, path)
    fsync_path(path.parent)
    if previous is not None and previous != target and previous.parent == path.parent:
        shutil.rmtree(previous, ignore_errors=True)


def read_snapshot(path: Path) -> Snapshot:
    root = path.resolve()
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{root}: unknown snapshot format {meta.get('format')!r}")
    dim = int(meta["dim"])
    coarse = None
    if meta["kind"] == "ivf":
        coarse = Coarse(faiss.read_index(str(root / "coarse.faiss")), float(meta["max_sq_norm"]),
                        int(meta["trained_rows"]))
    def shard(i: int) -> Shard:
        stored = ListPanels.load(root / f"shard-{i}") if coarse is not None else \
            faiss.read_index(str(root / f"shard-{i}.faiss"))
        return Shard(stored, np.load(root / f"shard-{i}-iids.npy"))

    shards = tuple(shard(i) for i in range(int(meta["shards"])))
    overflow = None
    if coarse is not None:
        overflow_iids = np.load(root / "overflow_iids.npy")
        segment = DeltaSegment(dim, max(len(overflow_iids), 1))
        segment.append(overflow_iids, np.load(root / "overflow_vectors.npy"))
        overflow = segment.view()
    pinned_iids = np.load(root / "pinned_iids.npy")
    pinned = DeltaSegment(dim, max(len(pinned_iids), 1))
    pinned.append(pinned_iids, np.load(root / "pinned_vectors.npy"))
    items = json.loads((root / "items.json").read_text())
    return Snapshot(
        dim, Base(dim, shards, coarse, overflow), pinned.view(),
        (np.load(root / "delta_iids.npy"), np.load(root / "delta_vectors.npy")),
        items["iids"], items["ids"], items["cold"], int(meta["next_iid"]), meta["event_id"],
    )
