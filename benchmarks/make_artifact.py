"""Train a real model on a dataset folder and export it as a service artifact, for the benchmarks.

    python -m benchmarks.make_artifact --dataset data/ml-100k --out /tmp/m2rec-bench/artifacts --epochs 10

Default model sizes (TrainConfig, D=64) are the ones a deployment would serve, so the serving benchmark
measures real fold-in and generator cost, not a toy's.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.dataset import fingerprint, load_dataset
from training.export import export_artifact
from training.split import cold_start_split
from training.train import TrainConfig, train


def make_artifact(dataset_dir: Path, root: Path, epochs: int, seed: int = 0) -> Path:
    dataset = load_dataset(dataset_dir)
    split = cold_start_split(dataset, seed)
    result = train(dataset, split, TrainConfig(seed=seed, epochs=epochs, eval_every=max(1, epochs // 5)))
    return export_artifact(result, dataset, fingerprint(dataset_dir), root,
                           {"validation": result.best_val, "best_epoch": result.best_epoch})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--out", type=Path, required=True, help="artifact root (gets a `current` pointer)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(make_artifact(args.dataset, args.out, args.epochs, args.seed))


if __name__ == "__main__":
    main()
