"""The on-disk form of a `VectorIndex`: one directory per snapshot, swapped in by a symlink rename:
meta.json (format, dim, event id, next internal id, each segment's kind and lift), trained.faiss and
base.faiss (`faiss.write_index`), {trained,base}_long.faiss (rows longer than the lift's M),
{trained,base}_rows_{chunk}.npy (IVF-PQ4's rows as stored, the written part of a `RowStore` chunk each)
and _sq.npy (their SQ8 ranges), buffer_{iids,rows}.npy (rows not merged yet), trained.json (trained ids)
and new.jsonl (the item id of each internal id, null where dead: a line, a JSON list, per chunk of the id
table, written and read a chunk at a time).

Derived state: a snapshot that fails to load, or of another format, is refused and the index rebuilt
from the store (service/core/maintainer.py).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.durable import fsync_directory, point_link, write_durably
from service.index.segment import Ids, RowStore, Segment, Vectors

SNAPSHOT_FORMAT = "m2rec-index/9"  # 9: new.jsonl (8: new.json; 7: items.json, iids.npy; 6: chunks of 2^16 rows; ...)


@dataclass
class Snapshot:
    dim: int
    trained: Segment
    trained_ids: list[str]
    base: Segment | None
    buffer_iids: Ids
    buffer_rows: Vectors
    named: Iterable[list[str | None]]  # the item id of internal ids 0.. next_iid - 1 (None: dead), in pieces
    next_iid: int
    event_id: str | None


def write_snapshot(path: Path, snap: Snapshot) -> None:
    """Write to a fresh directory beside `path`, then point the `path` symlink at it (one rename)."""
    if path.exists() and not path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a snapshot link")
    target = path.parent / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    target.mkdir(parents=True)
    meta: dict[str, Any] = {"format": SNAPSHOT_FORMAT, "dim": snap.dim, "event_id": snap.event_id,
                            "next_iid": snap.next_iid, "saved_at": time.time(), "faiss_version": faiss.__version__}
    for name, segment in (("trained", snap.trained), ("base", snap.base)):
        if segment is None:
            continue
        faiss.write_index(segment.index, str(target / f"{name}.faiss"))
        meta[name] = {"kind": segment.kind, "max_sq_norm": segment.max_sq_norm, "trained_rows": segment.trained_rows,
                      "row_codes": segment.rows.codes if segment.rows is not None else None}
        if segment.long is not None:
            faiss.write_index(segment.long.index, str(target / f"{name}_long.faiss"))
        if (rows := segment.rows) is not None:  # as stored, a file per chunk: never the rows twice in memory
            meta[name]["row_chunks"] = len(rows.chunks)
            if rows.sq is not None:
                np.save(target / f"{name}_sq.npy", faiss.vector_to_array(rows.sq.trained))
            for c, chunk in enumerate(rows.chunks):
                if chunk is not None:  # the rows written: the rest of a chunk is untouched zeros
                    np.save(target / f"{name}_rows_{c}.npy", chunk[: rows.used[c]])
    np.save(target / "buffer_iids.npy", snap.buffer_iids)
    np.save(target / "buffer_rows.npy", snap.buffer_rows)
    write_durably(target / "trained.json", json.dumps(snap.trained_ids))
    write_durably(target / "new.jsonl", (json.dumps(piece) + "\n" for piece in snap.named if piece))
    write_durably(target / "meta.json", json.dumps(meta))
    fsync_directory(target)
    previous = path.resolve() if path.is_symlink() else None
    point_link(path, target.name)
    if previous is not None and previous != target and previous.parent == path.parent:
        shutil.rmtree(previous, ignore_errors=True)


def read_snapshot(path: Path) -> Snapshot:
    root = path.resolve()
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{root}: snapshot format {meta.get('format')!r} is not {SNAPSHOT_FORMAT!r}")
    dim = int(meta["dim"])
    return Snapshot(dim, _segment(root, "trained", meta, dim), json.loads((root / "trained.json").read_text()),
                    _segment(root, "base", meta, dim) if "base" in meta else None,
                    np.load(root / "buffer_iids.npy"), np.load(root / "buffer_rows.npy"),
                    _lines(root / "new.jsonl"), int(meta["next_iid"]), meta["event_id"])


def _lines(file: Path) -> Iterator[list[str | None]]:
    """new.jsonl's chunks, parsed one at a time as the load takes them: the 10M ids of a large catalogue are
    never Python strings all at once (~0.8 GB over the loaded index)."""
    with file.open(encoding="utf-8") as f:
        yield from map(json.loads, f)


def _segment(root: Path, name: str, meta: dict[str, Any], dim: int) -> Segment:
    about = meta[name]
    index = faiss.read_index(str(root / f"{name}.faiss"))
    rows = long = None
    if (root / f"{name}_long.faiss").exists():
        long = Segment("exact", faiss.read_index(str(root / f"{name}_long.faiss")), dim)
    if about["row_codes"] is not None:  # read into each chunk in place: mapped pages would count as RSS
        sq = root / f"{name}_sq.npy"
        rows = RowStore(dim, about["row_codes"], np.load(sq) if sq.exists() else None)
        for c in range(about["row_chunks"]):
            if (file := root / f"{name}_rows_{c}.npy").exists():
                with file.open("rb") as f:
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f) \
                        if np.lib.format.read_magic(f) == (1, 0) else np.lib.format.read_array_header_2_0(f)
                    into = rows.chunk(c)[: shape[0]]
                    if fortran or dtype != into.dtype or shape != into.shape or f.readinto(into.data) != into.nbytes:
                        raise ValueError(f"{file}: not the {into.shape} {into.dtype} rows the snapshot records")
                    rows.used[c] = shape[0]
    return Segment(about["kind"], index, dim, float(about["max_sq_norm"]), int(about["trained_rows"]), rows, long)
