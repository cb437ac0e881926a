"""One training run with TrainConfig overrides, scored on the hybrid, cold-only and warm-only tasks.

    python -m benchmarks.model_screen --dataset data/ml-100k --seed 0 lambda_v=30 epochs=40
    python -m benchmarks.model_screen --dataset data/ml-100k --preset m2rec-no-moe

Prints one JSON line: the run's time, best epoch, chosen mixing policy and new-item bias weight, the
validation figures at the best epoch (what a choice between variants reads), and the test figures
(Recall@20 / NDCG@20 overall and of each part, the cold share), cold-only and warm-only. The split
has validation users as the harness does (training/split.py). One seed is a screen, not a result: a
difference under ~0.015 Recall@20 on ml-100k is within one split's noise; the harness
(training.evaluate) runs what survives on 3 seeds with paired confidence intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from training.dataset import load_dataset
from training.m2rec_recommender import M2RecRecommender
from training.presets import PRESETS
from training.protocol import cold_only, evaluate, hybrid, warm_only
from training.split import HARNESS_VALIDATION_USERS, cold_start_split
from training.train import TrainConfig

FIGURES = ("recall@20", "ndcg@20", "cold_recall@20", "cold_ndcg@20", "warm_recall@20", "warm_ndcg@20",
           "cold_share@20")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    defaults = TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in names:
            raise SystemExit(f"unknown TrainConfig field {key!r}")
        default = getattr(defaults, key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            out[key] = tuple(float(x) for x in value.split(","))
        else:
            out[key] = type(default)(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="m2rec", choices=sorted(PRESETS))
    parser.add_argument("--validation-users", type=float, default=HARNESS_VALIDATION_USERS,
                        help="share of users that validate and are not tested (training.split)")
    parser.add_argument("overrides", nargs="*", help="TrainConfig field=value")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    dataset = load_dataset(args.dataset)
    split = cold_start_split(dataset, args.seed, validation_users=args.validation_users)
    start = time.perf_counter()
    model = M2RecRecommender.preset(args.preset, args.seed, **overrides)
    model.fit(dataset, split)
    assert model.result is not None
    h, c, w = (evaluate(model, task) for task in (hybrid(split), cold_only(split), warm_only(split)))
    print(json.dumps({
        "dataset": dataset.name, "seed": args.seed, "preset": args.preset, "overrides": overrides,
        "seconds": round(time.perf_counter() - start), "best_epoch": model.result.best_epoch,
        "new_bias_weight": float(model.result.model.new_bias_weight), "policy": model.result.policy.to_dict(),
        "validation": {k: round(v, 4) for k, v in model.result.best_val.items() if k in FIGURES},
        "hybrid": {k: round(h.get(k, 0.0), 4) for k in FIGURES},
        "cold_only": {k: round(c[k], 4) for k in ("recall@20", "ndcg@20")},
        "warm_only": {k: round(w[k], 4) for k in ("recall@20", "ndcg@20")},
    }))


if __name__ == "__main__":
    main()
