"""In-process request cost of one or more artifacts on the same real users: the fold-in alone and
`Recommender.recommend_many` (read histories and seen items from SQLite, fold in, search, merge) per
batch of 16 requests, thread CPU time, median. No HTTP: what a model adds to a request, side by side.

    python -m benchmarks.make_artifact --out /tmp/b/joint                  # the shipped model
    python -m benchmarks.make_artifact --out /tmp/b/alone --m2rec-alone    # m2rec alone, same split
    python -m benchmarks.request_cost /tmp/b/alone/current /tmp/b/joint/current --dataset data/ml-100k

Every artifact must have been trained on the dataset's split `--seed` (make_artifact's): its test-cold
items are registered as new items and the first `--users` users' training histories recorded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.core.recommender import Recommender
from service.core.types import NewItem
from service.index import IndexConfig
from service.model.artifact import load_artifact
from service.store.records import Interaction
from service.store.sqlite import SqliteStore
from training.dataset import load_dataset
from training.split import cold_start_split

BATCH = 16


def measure(artifact_path: Path, dataset_dir: Path, users: int, repeats: int, seed: int) -> dict[str, float]:
    dataset = load_dataset(dataset_dir)
    split = cold_start_split(dataset, seed)
    assert dataset.features is not None
    artifact = load_artifact(artifact_path)
    with tempfile.TemporaryDirectory() as work:
        store = SqliteStore(Path(work) / "store.sqlite3")
        rec = Recommender(artifact, store, IndexConfig(kind="exact"))
        rec.maintainer.build_index()
        rec.register([NewItem(dataset.item_ids[j], dataset.item_attributes[j], dataset.features[j].tolist())
                      for j in split.cold_items])
        chosen = np.arange(min(users, dataset.n_users))
        rec.add_interactions([Interaction(dataset.user_ids[u], dataset.item_ids[i], float(n))
                              for u in chosen.tolist() for n, i in enumerate(split.history[u].indices)])
        requests = [(dataset.user_ids[u], 20) for u in chosen.tolist()]
        batches = [requests[s : s + BATCH] for s in range(0, len(requests), BATCH)]
        per_batch, per_fold_in, lengths_seen = [], [], []
        for _ in tqdm(range(repeats), desc=artifact.version, leave=False):
            for batch in batches:
                histories = store.get_histories([user for user, _ in batch])
                rows, lengths = rec.histories_rows([histories[user] for user, _ in batch])
                t = time.thread_time()
                rec._fold_in.queries(rows, lengths)
                per_fold_in.append(time.thread_time() - t)
                t = time.thread_time()
                rec.recommend_many(batch)
                per_batch.append(time.thread_time() - t)
                lengths_seen += lengths
        store.close()
    return {"columns": artifact.manifest.embedding_dim,
            "fold_in_ms": statistics.median(per_fold_in) * 1e3,
            "recommend_many_ms": statistics.median(per_batch) * 1e3,
            "mean_history": float(np.mean(lengths_seen))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--users", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"| artifact | columns | fold-in ms per {BATCH} | recommend_many ms per {BATCH} | mean history |")
    print("|---|---|---|---|---|")
    for path in args.artifacts:
        m = measure(path, args.dataset, args.users, args.repeats, args.seed)
        print(f"| {load_artifact(path).version} | {m['columns']} | {m['fold_in_ms']:.3f} | "
              f"{m['recommend_many_ms']:.3f} | {m['mean_history']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
