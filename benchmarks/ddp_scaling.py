"""Epoch time and peak memory of training on one process against several (training/distributed.py).

    python -m benchmarks.ddp_scaling --dataset data/synthetic --epochs 2 --out n1.json
    torchrun --standalone --nproc_per_node 2 -m benchmarks.ddp_scaling --dataset data/synthetic --epochs 2 --out n2.json

Trains the shipped model (TrainConfig defaults, overridable by `--set name=value`) on the dataset's
validation carve-out for `--epochs` epochs, validating only after the last. An epoch's time is the
trainer's own (`history[*]["seconds"]`: the full-table passes, the b-step and the t-step); the
validated last epoch is reported apart, with its validation's own time. `--validation-users N` validates
on N users drawn at random (seeded; the same on every rank), not all: at a million users the hybrid
validation, every user against every item, would take longer than the epochs it judges. Peak RSS
is each process's own (getrusage), gathered to rank 0, which writes the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import resource
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch.distributed as dist

from training import distributed
from training.dataset import load_dataset
from training.split import ColdStartSplit, validation_split
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


def thin_validation(split: ColdStartSplit, users: int, seed: int) -> ColdStartSplit:
    """The split with its validation truth kept for `users` random users only (training data unchanged)."""
    if users >= split.n_users:
        return split
    kept = np.zeros(split.n_users)
    kept[np.random.default_rng(seed).choice(split.n_users, users, replace=False)] = 1.0
    keep = sp.diags(kept).tocsr()
    return replace(split, val_warm_truth=(keep @ split.val_warm_truth).tocsr(),
                   val_truth=(keep @ split.val_truth).tocsr())


def _value(name: str, text: str) -> Any:
    kind = type(getattr(TrainConfig(), name))
    return text.lower() in ("1", "true") if kind is bool else kind(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=0,
                        help="partial epochs: stop each b-step and t-step pass after this many batches of each "
                             "process, and extrapolate the whole epoch from the time per batch (0: whole epochs)")
    parser.add_argument("--validation-users", type=int, default=0, help="validate on this many users (0: all)")
    parser.add_argument("--set", action="append", default=[], help="TrainConfig override, name=value")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    distributed.init_from_env()
    try:
        t0 = time.perf_counter()
        dataset = load_dataset(args.dataset)
        split = validation_split(dataset, args.seed)
        if args.validation_users:
            split = thin_validation(split, args.validation_users, args.seed)
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
        result = train(dataset, split, cfg, batches_per_pass=args.batches or None)
        trainer_log.removeHandler(clock)
        world = distributed.world_size()
        batch_users, batch_items = -(-cfg.batch_users // world), -(-cfg.batch_items // world)
        # this process's batches in a whole epoch (the trainer's own arithmetic, training/train.py)
        b_batches = math.ceil(math.ceil(result.data.train_users.size / world) / batch_users)
        b_batches *= max(cfg.b_passes, math.ceil(cfg.b_min_steps / b_batches))
        t_batches = math.ceil(math.ceil(result.data.trained_rows.size / world) / batch_items) * cfg.t_passes
        mine = {
            "rank": distributed.rank(),
            "threads": distributed.threads_per_process(),
            "epoch_seconds": [round(row["seconds"], 2) for row in result.history[:-1]],
            "last_epoch_with_validation_seconds": round(result.history[-1]["seconds"], 2),
            "validation_seconds": round(result.history[-1]["eval_seconds"], 2),
            # where each epoch's time went: the b-step, the t-step, the rest (the generated rows, the ridge refit)
            "b_step_seconds": [round(row["b_step_seconds"], 2) for row in result.history],
            "t_step_seconds": [round(row["t_step_seconds"], 2) for row in result.history],
            "t_batches_seconds": [round(row["t_batches_seconds"], 2) for row in result.history],
            "train_seconds": round(time.perf_counter() - t1, 1),
            # between two epochs' log lines, unvalidated epochs only (the first also holds the set-up)
            "epoch_cpu_seconds": [round(c, 2) for c in clock.cpu_between()[1 : len(result.history) - 1]],
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if args.batches:  # the last epoch's own figures, extrapolated to a whole epoch
            last = result.history[-1]
            b_per_batch = last["b_step_seconds"] / min(args.batches * cfg.b_passes, b_batches)
            t_per_batch = last["t_batches_seconds"] / min(args.batches * cfg.t_passes, t_batches)
            t_full_table = last["t_step_seconds"] - last["t_batches_seconds"]
            rest = last["seconds"] - last["eval_seconds"] - last["b_step_seconds"] - last["t_step_seconds"]
            mine["partial_epoch"] = {
                "batches_per_pass": args.batches, "b_batches_per_epoch": b_batches, "t_batches_per_epoch": t_batches,
                "b_seconds_per_batch": round(b_per_batch, 4), "t_seconds_per_batch": round(t_per_batch, 4),
                "t_full_table_seconds": round(t_full_table, 2), "generated_rows_seconds": round(rest, 2),
                "epoch_seconds_extrapolated": round(rest + b_per_batch * b_batches + t_full_table
                                                    + t_per_batch * t_batches, 1),
            }
        ranks: list[Any] = [mine]
        if distributed.active():
            ranks = [None] * distributed.world_size()
            dist.all_gather_object(ranks, mine)
        if distributed.is_main():
            report = {
                "dataset": dataset.name, "users": dataset.n_users, "items": dataset.n_items,
                "interactions": len(dataset.interactions), "processes": distributed.world_size(),
                "epochs": args.epochs, "batches_per_pass": args.batches or None, "overrides": overrides,
                "validation_users": args.validation_users or dataset.n_users, "load_seconds": round(load_seconds, 1),
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
