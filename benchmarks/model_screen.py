"""One quick training run with TrainConfig overrides: the screens of results/model-tuning.md.

    python -m benchmarks.model_screen --dataset data/ml-100k --seed 0 lr_gen=1e-3 feature_dropout=0.3 epochs=12

Prints one JSON line: best epoch, validation and test Recall@20 / NDCG@20 (cold-only), all-items
Recall@20 and cold share, and how close the generator's rows for warm items come to their trained
rows (mean cosine, mean norm ratio). One seed is a screen, not a result: the harness
(training.evaluate) runs what survives on 3 seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from training.dataset import load_dataset
from training.protocol import all_items, cold_only, evaluate
from training.split import cold_start_split
from training.train import ItemTable, TrainConfig, generated_rows, train


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    defaults = TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in names:
            raise SystemExit(f"unknown TrainConfig field {key!r}")
        default = getattr(defaults, key)
        out[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="TrainConfig field=value")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    dataset = load_dataset(args.dataset)
    split = cold_start_split(dataset, args.seed)
    cfg = dataclasses.replace(TrainConfig(seed=args.seed, progress=False), **overrides)
    start = time.perf_counter()
    result = train(dataset, split, cfg)
    table = ItemTable(result.model, result.data)
    cold, every = evaluate(table, cold_only(split)), evaluate(table, all_items(split))
    generated = generated_rows(result.model, result.data, result.data.warm)  # (J, D+1)
    trained = result.model.item_rows().detach()  # (J, D+1)
    print(json.dumps({
        "dataset": dataset.name, "seed": args.seed, "overrides": overrides,
        "seconds": round(time.perf_counter() - start), "best_epoch": result.best_epoch,
        "val_recall@20": round(result.best_val.get("recall@20", 0.0), 4),
        "cold_only_recall@20": round(cold["recall@20"], 4), "cold_only_ndcg@20": round(cold["ndcg@20"], 4),
        "all_items_recall@20": round(every["recall@20"], 4),
        "cold_share@20": round(every.get("cold_share@20", 0.0), 3),
        "cosine_generated_trained": round(torch.cosine_similarity(generated, trained, dim=1).mean().item(), 3),
        "norm_ratio": round((generated.norm(dim=1).mean() / trained.norm(dim=1).mean()).item(), 3),
    }))


if __name__ == "__main__":
    main()
