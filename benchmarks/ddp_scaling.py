"""Epoch time and peak memory of training on one process against several (training/distributed.py).

    python -m benchmarks.ddp_scaling --dataset data/synthetic --epochs 2 --out n1.json
    torchrun --standalone --nproc_per_node 2 -m benchmarks.ddp_scaling --dataset data/synthetic --epochs 2 --out n2.json

Trains the shipped model (TrainConfig defaults, overridable by `--set name=value`) on the dataset's
validation carve-out for `--epochs` epochs, validating only after the last. An epoch's time is the
trainer's own (`history[*]["seconds"]`: the full-table passes, the b-step and the t-step); the
validated last epoch is reported apart. Peak RSS is each process's own (getrusage), gathered to rank 0,
which writes the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import resource
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from training import distributed
from training.dataset import load_dataset
from training.split import validation_split
from training.train import TrainConfig, train


class EpochClock(logging.Handler):
    """This process's CPU seconds (user + system, every thread) at each of the trainer's epoch log lines."""

    def __init__(self) -> None:
        super().__init__()
        self.marks = [time.process_time()]

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("epoch "):
            self.marks.append(time.process_time())

    def cpu_between(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.marks)]


def _value(name: str, text: str) -> Any:
    kind = type(getattr(TrainConfig(), name))
    return text.lower() in ("1", "true") if kind is bool else kind(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="TrainConfig override, name=value")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    distributed.init_from_env()
    try:
        t0 = time.perf_counter()
        dataset = load_dataset(args.dataset)
        split = validation_split(dataset, args.seed)
        load_seconds = time.perf_counter() - t0
        names = {f.name for f in fields(TrainConfig)}
        overrides = dict(item.split("=", 1) for item in args.set)
        unknown = set(overrides) - names
        if unknown:
            parser.error(f"unknown TrainConfig fields: {sorted(unknown)}")
        cfg = replace(TrainConfig(seed=args.seed, epochs=args.epochs, eval_every=args.epochs, progress=False,
                                  new_bias_weights=(1.0,)),
                      **{k: _value(k, v) for k, v in overrides.items()})
        clock = EpochClock()
        trainer_log = logging.getLogger("m2rec.train")
        trainer_log.setLevel(logging.INFO)
        trainer_log.addHandler(clock)
        t1 = time.perf_counter()
        result = train(dataset, split, cfg)
        trainer_log.removeHandler(clock)
        mine = {
            "rank": distributed.rank(),
            "threads": distributed.threads_per_process(),
            "epoch_seconds": [round(row["seconds"], 2) for row in result.history[:-1]],
            "last_epoch_with_validation_seconds": round(result.history[-1]["seconds"], 2),
            "train_seconds": round(time.perf_counter() - t1, 1),
            # between two epochs' log lines, unvalidated epochs only (the first also holds the set-up)
            "epoch_cpu_seconds": [round(c, 2) for c in clock.cpu_between()[1 : len(result.history) - 1]],
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        ranks: list[Any] = [mine]
        if distributed.active():
            ranks = [None] * distributed.world_size()
            dist.all_gather_object(ranks, mine)
        if distributed.is_main():
            report = {
                "dataset": dataset.name, "users": dataset.n_users, "items": dataset.n_items,
                "interactions": len(dataset.interactions), "processes": distributed.world_size(),
                "epochs": args.epochs, "overrides": overrides, "load_seconds": round(load_seconds, 1),
                "validation": {k: round(result.best_val[k], 4) for k in ("recall@20", "ndcg@20")
                               if k in result.best_val},
                "ranks": ranks,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            print(json.dumps(report))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
