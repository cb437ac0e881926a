"""Before/after micro-timings of the request hot-path changes, one thread, same inputs.

    .venv/bin/python -m benchmarks.hotpath --artifact /tmp/m2rec-bench/artifacts

/recommend:
- fold-in: the model's torch fold-in (the previous `Recommender.user_query`) vs service.core.fold_in
- history rows, trained items only: the previous per-row np.stack vs one gather
- history rows with registered items: read from the store on every request (RowCache of size 0,
  the previous behaviour) vs the in-memory RowCache
- response body: pydantic RecommendationsOut built, re-validated and dumped (what FastAPI does with
  a returned model) vs the route's serialiser (`service.api.routes.recommend._body`)
POST /items:
- embed one item: attribute scores of the whole vocabulary recomputed per call (the previous
  AttributePooling) vs kept between calls
- embed a batch of 500: one pass padded to the widest item (the previous `Recommender.embed`)
  vs passes of items sorted by attribute count
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.catalogue import synthetic_batch
from service.api.routes.recommend import _body
from service.api.schemas import RecommendationsOut, RecommendedItem
from service.core.recommender import Recommender
from service.core.row_cache import RowCache
from service.core.types import NewItem
from service.model import M2Rec
from service.model.artifact import load_artifact
from service.store import ItemRecord, SqliteStore
from training.dataset import load_dataset


def per_call_us(fn: Callable[[], object], seconds: float = 1.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return 1e6 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--history", type=int, default=100, help="history length (ml-100k mean is ~106)")
    parser.add_argument("--registered", type=int, default=3, help="registered items in that history")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="m2rec-hotpath-"))
    store = SqliteStore(work / "s.sqlite3")  # a file, as served: reads go through the reader pool
    r = Recommender(load_artifact(args.artifact), store)
    batch = synthetic_batch(load_dataset(args.dataset), 0, 600, 0)
    items = [NewItem(batch.ids[b], batch.attributes[b], batch.content[b].tolist()) for b in range(600)]
    rows = r.embedder.embed(items)
    store.put_items([ItemRecord(i.item_id, i.attributes, i.content, row, r.version, 0.0)
                     for i, row in zip(items, rows, strict=True)])
    history = list(r.warm_ids[: args.history])
    mixed = history[: args.history - args.registered] + [i.item_id for i in items[: args.registered]]
    trained_rows = r.history_rows(history)

    def torch_query() -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(trained_rows)[None]
            h = r.model.fold_in(t, torch.ones(t.shape[:2], dtype=torch.bool))
            return M2Rec.query(h).numpy().astype(np.float32)

    def stacked_rows() -> np.ndarray:
        return np.stack([r.warm_rows[r.embedder.warm_pos[i]] for i in history]).astype(np.float32)

    cached = r.maintainer.rows

    def uncached_mixed_rows() -> np.ndarray:
        r.maintainer.rows = RowCache(0)
        try:
            return r.history_rows(mixed)
        finally:
            r.maintainer.rows = cached

    result = r.recommend("nobody", 20)

    def pydantic_body() -> bytes:
        out = RecommendationsOut(user="u", model_version=r.version, fallback=False, items=[
            RecommendedItem(id=h.item_id, score=h.score, is_cold=h.is_cold, model_version=r.version)
            for h in result.hits])
        return RecommendationsOut.model_validate(out).model_dump_json().encode()

    pooling = r.model.generator.attributes

    def embed_rescoring() -> np.ndarray:
        pooling._scores = None  # type: ignore[union-attr]  # what every call used to do
        return r.embedder.embed(items[:1])

    def embed_one_pass() -> np.ndarray:
        return np.concatenate([r.embedder._embed_chunk(items[:500])])

    print(f"| step (history of {args.history}, {args.registered} registered) | before µs | after µs |")
    print("|---|---|---|")
    print(f"| fold-in | {per_call_us(torch_query):.0f} | {per_call_us(lambda: r.user_query(trained_rows)):.0f} |")
    print(f"| history rows, trained only | {per_call_us(stacked_rows):.0f} "
          f"| {per_call_us(lambda: r.history_rows(history)):.0f} |")
    print(f"| history rows with registered items | {per_call_us(uncached_mixed_rows):.0f} "
          f"| {per_call_us(lambda: r.history_rows(mixed)):.0f} |")
    print(f"| response body (k=20) | {per_call_us(pydantic_body):.0f} "
          f"| {per_call_us(lambda: _body('u', result)):.0f} |")
    print(f"| embed 1 item | {per_call_us(embed_rescoring):.0f} "
          f"| {per_call_us(lambda: r.embedder.embed(items[:1])):.0f} |")
    print(f"| embed 500 items | {per_call_us(embed_one_pass, 3):.0f} "
          f"| {per_call_us(lambda: r.embedder.embed(items[:500]), 3):.0f} |")
    store.close()


if __name__ == "__main__":
    main()
