"""Train a real model on a dataset folder and export it as a service artifact, for the benchmarks.

    python -m benchmarks.make_artifact --dataset data/ml-100k --out /tmp/m2rec-bench/artifacts --epochs 10

Default model sizes (TrainConfig, D=64) are the ones a deployment would serve, so the serving benchmark
measures real fold-in and generator cost, not a toy's.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.collaborative_fit import fit_with_blend
from training.dataset import fingerprint, load_dataset
from training.export import export_artifact
from training.split import cold_start_split
from training.train import TrainConfig, train


def make_artifact(dataset_dir: Path, root: Path, epochs: int, seed: int = 0, collaborative: bool = True) -> Path:
    dataset = load_dataset(dataset_dir)
    split = cold_start_split(dataset, seed)
    cfg = TrainConfig(seed=seed, epochs=epochs, eval_every=max(1, epochs // 5), collaborative=collaborative)
    result = train(dataset, split, cfg)
    metrics: dict[str, Any] = {"validation": result.best_val, "best_epoch": result.best_epoch}
    if cfg.collaborative:  # the shipped model: the collaborative part beside m2rec, fitted on the same split
        joint, blend = fit_with_blend(dataset, split, result.model, result.data, seed)
        assert joint.policy is not None
        result.model.attach(joint.part)
        result = replace(result, policy=joint.policy)
        metrics["collaborative"] = {"m2rec_weight": float(joint.part.weight),
                                      "m2rec_new_weight": float(joint.part.new_weight), "blend": blend.params}
    return export_artifact(result, dataset, fingerprint(dataset_dir), root, metrics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--out", type=Path, required=True, help="artifact root (gets a `current` pointer)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--m2rec-alone", action="store_true", help="without the collaborative part (rows [v; b])")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(make_artifact(args.dataset, args.out, args.epochs, args.seed, not args.m2rec_alone))


if __name__ == "__main__":
    main()
