"""Before/after micro-timings of the /recommend hot-path changes, one thread, same inputs.

    .venv/bin/python -m benchmarks.hotpath --artifact /tmp/m2rec-bench/artifacts

- fold-in: the model's torch fold-in (the previous `Recommender.user_query`) vs service.fold_in
- history rows: the previous per-row np.stack vs the one-gather `Recommender.history_rows`
- response: pydantic RecommendationsOut built and dumped (what FastAPI did with the return value)
  vs a dict in a JSONResponse (tried; no measurable gain, so the route keeps the pydantic model)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fastapi.responses import JSONResponse

from service.artifact import load_artifact
from service.model import M2Rec
from service.recommender import Recommender
from service.schemas import RecommendationsOut, RecommendedItem
from service.store import SqliteStore


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
    parser.add_argument("--history", type=int, default=100, help="history length (ml-100k mean is ~106)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = Recommender(load_artifact(args.artifact), SqliteStore(":memory:"))
    history = list(r.warm_ids[: args.history])
    rows = r.history_rows(history)

    def torch_query() -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(rows)[None]
            h = r.model.fold_in(t, torch.ones(t.shape[:2], dtype=torch.bool))
            return M2Rec.query(h).numpy().astype(np.float32)

    def stacked_rows() -> np.ndarray:
        return np.stack([r.warm_rows[r._warm_pos[i]] for i in history]).astype(np.float32)

    hits = [(f"syn:{j}", 1.0 / (j + 1), j % 2 == 0) for j in range(20)]

    def pydantic_body() -> bytes:
        out = RecommendationsOut(user="u", model_version=r.version, fallback=False, items=[
            RecommendedItem(id=i, score=s, is_cold=c, model_version=r.version) for i, s, c in hits])
        return RecommendationsOut.model_validate(out).model_dump_json().encode()

    def dict_body() -> bytes:
        return bytes(JSONResponse({"user": "u", "model_version": r.version, "fallback": False, "items": [
            {"id": i, "score": s, "is_cold": c, "model_version": r.version} for i, s, c in hits]}).body)

    print(f"| step (history of {args.history}) | before µs | after µs |\n|---|---|---|")
    print(f"| fold-in | {per_call_us(torch_query):.0f} | {per_call_us(lambda: r.user_query(rows)):.0f} |")
    print(f"| history rows | {per_call_us(stacked_rows):.0f} | {per_call_us(lambda: r.history_rows(history)):.0f} |")
    print(f"| response body | {per_call_us(pydantic_body):.0f} | {per_call_us(dict_body):.0f} |")


if __name__ == "__main__":
    main()
