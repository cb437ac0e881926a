"""Realistic index rows and queries for benchmarks/index_bench.py, cached as .npy files.

Also writes warm.npy, queries.npy, histories.json and cold.path (the cold rows file) into the cache
directory, so the benchmark itself never loads torch or the model.

Rows: the artifact's trained rows [V; b] (warm, pinned in the service) plus synthetic items from
`benchmarks.catalogue` embedded by the trained generator, so the norms and directions are the real
model's. Queries: [h; 1] of real ml-100k users folded in from their histories of trained items.

    .venv/bin/python -m benchmarks.index_data --artifact /tmp/m2rec-idx/artifacts --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from benchmarks.catalogue import benchmark_users, embed_batch, synthetic_batch
from service.core.recommender import Recommender
from service.model.artifact import load_artifact
from service.store import SqliteStore
from training.dataset import load_dataset

Rows = npt.NDArray[np.float32]  # (N, D+1)


@dataclass
class BenchData:
    warm: Rows  # (J, D+1) trained rows
    cold: Rows  # (N, D+1) generated rows, syn:0 .. syn:N-1
    queries: Rows  # (U, D+1)
    histories: list[list[int]]  # per query, the warm row positions the user has (excluded at search)


def load_bench_data(artifact: Path, dataset_dir: Path, n_rows: int, cache: Path, seed: int = 0) -> BenchData:
    """Generated rows are cached per (artifact version, n); a larger cached set is sliced."""
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "s.sqlite3")
        recommender = Recommender(load_artifact(artifact), store)
        dataset = load_dataset(dataset_dir)
        cache.mkdir(parents=True, exist_ok=True)
        have = sorted(cache.glob(f"cold-{recommender.version}-*.npy"), key=lambda p: int(p.stem.split("-")[-1]))
        usable = [p for p in have if int(p.stem.split("-")[-1]) >= n_rows]
        if usable:
            cold = np.load(usable[0], mmap_mode="r")[:n_rows]
        else:
            out = np.lib.format.open_memmap(
                cache / f".cold-{recommender.version}-{n_rows}.npy", "w+", np.float32, (n_rows, recommender.dim))
            for start in range(0, n_rows, 20_000):
                n = min(20_000, n_rows - start)
                out[start : start + n] = embed_batch(recommender, synthetic_batch(dataset, start, n, seed))
                print(f"embedded {start + n:,}/{n_rows:,}", flush=True)
            out.flush()
            del out
            final = cache / f"cold-{recommender.version}-{n_rows}.npy"
            (cache / f".cold-{recommender.version}-{n_rows}.npy").rename(final)
            cold = np.load(final, mmap_mode="r")
        users = benchmark_users(dataset, recommender, 500, 1, 0, seed)
        position = {item_id: j for j, item_id in enumerate(recommender.warm_ids)}
        histories = [[position[i] for i in h] for h in users.values()]
        queries = np.concatenate([recommender.user_query(recommender.warm_rows[h]) for h in histories])
        store.close()
        data = BenchData(recommender.warm_rows.copy(), cold, queries.astype(np.float32), histories)
        np.save(cache / "warm.npy", data.warm)
        np.save(cache / "queries.npy", data.queries)
        (cache / "histories.json").write_text(json.dumps(data.histories))
        (cache / "cold.path").write_text(str(usable[0] if usable else final))
        return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/m2rec-idx/rows"))
    args = parser.parse_args()
    data = load_bench_data(args.artifact, args.dataset, args.rows, args.cache)
    norms = np.linalg.norm(data.cold, axis=1)
    print(f"warm {data.warm.shape} norm median {np.median(np.linalg.norm(data.warm, axis=1)):.3f}; "
          f"cold {data.cold.shape} norm median {np.median(norms):.3f} p99 {np.percentile(norms, 99):.3f} "
          f"max {norms.max():.3f}; queries {data.queries.shape}")


if __name__ == "__main__":
    main()
