"""The serving benchmark's store: opened (emptied or kept), the catalogue's rows when an earlier run
stored them, and the environment that points a server at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.catalogue import catalogue_rows, diverse_batch
from service.core.recommender import Recommender
from service.store import SqliteStore, Store
from service.store.redis import RedisStore
from training.dataset import Dataset

INGEST_START = 50_000_000  # ids of items posted over HTTP, never in the catalogue


def open_store(url: str, work: Path, reuse: bool) -> Store:
    """The benchmark's store, emptied unless `reuse` (a catalogue written by an earlier run is kept)."""
    if url.startswith("redis://"):
        store = RedisStore.from_url(url, namespace="bench18")
        keys: list[bytes] = []
        for key in [] if reuse else store._r.scan_iter(match=f"{store.prefix}*", count=10_000):
            keys.append(key)
            if len(keys) == 10_000:
                store._r.unlink(*keys)
                keys = []
        if keys:
            store._r.unlink(*keys)
        if reuse:  # what an earlier run posted over HTTP goes: the catalogue is syn:0.. alone again
            posted: list[Any] = store._r.zrange(store.keys.item_sets[0], b"[syn:5", b"(syn:6", bylex=True)
            for item_id in (m.decode() for m in posted):
                if int(item_id[4:]) >= INGEST_START:
                    store.delete_item(item_id)
        return store
    if not reuse:
        (work / "store.sqlite3").unlink(missing_ok=True)
    return SqliteStore(work / "store.sqlite3")


def stored_rows(store: Store, start: int, stop: int, rec: Recommender, dataset: Dataset, seed: int,
                generate: bool) -> np.ndarray | None:
    """Rows of syn:start..syn:stop-1 when an earlier run stored them all (--reuse-store), else None;
    `generate`: computed again by the generator rather than read back (the store is trusted to hold them)."""
    if generate:  # the last item stored: the run that stored it wrote them in order (COUNT(*) would read 47 GB)
        last = store.get_items([f"syn:{stop - 1}"])
        return catalogue_rows(rec, dataset, start, stop, seed, make=diverse_batch) if last else None
    out = []
    for s in range(start, stop, 10_000):
        wanted = [f"syn:{j}" for j in range(s, min(s + 10_000, stop))]
        found = store.get_items(wanted)
        if len(found) < len(wanted):
            return None
        out.append(np.stack([found[i].embedding for i in wanted]).astype(np.float32))
    return np.concatenate(out) if out else None


def store_env(url: str, work: Path) -> dict[str, str]:
    if url.startswith("redis://"):
        return {"M2REC_STORE_URL": url, "M2REC_REDIS_NAMESPACE": "bench18"}
    return {"M2REC_STORE_URL": str(work / "store.sqlite3")}
