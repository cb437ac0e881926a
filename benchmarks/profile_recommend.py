"""In-process `Recommender.recommend_many` at one catalogue size, for profiling the request path.

    .venv/bin/python -m benchmarks.profile_recommend --artifact /tmp/m2rec-bench/artifacts2/current \\
        --size 1000000 --nprobe 4 1 [--spin 45]

Builds the catalogue and the index as benchmarks/serve.py does (synthetic items through the trained
generator into a SQLite store, real ml-100k users with 3 registered items each, nprobe calibrated
on other users), kept in `--work` for the next run, then times batches of 15 users (the batch the
request batcher forms at 16 clients) in one thread and prints the median per user for each nprobe.
`--spin S` keeps answering batches for S more seconds so a sampling profiler can attach
(`py-spy record --native --pid PID`); the PID is printed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.catalogue import fill_store, write_histories
from benchmarks.serve import calibrate, new_bench
from service.core.recommender import Recommender
from service.model.artifact import load_artifact
from service.store import SqliteStore
from training.dataset import load_dataset

BATCH = 15


def per_user_us(recommender: Recommender, users: list[str], seconds: float) -> tuple[float, int]:
    """Median microseconds per user of `recommend_many` over random batches, and the batch count."""
    rng = np.random.default_rng(1)
    per: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = [(users[j], 20) for j in rng.integers(0, len(users), BATCH).tolist()]
        t0 = time.perf_counter()
        recommender.recommend_many(batch)
        per.append((time.perf_counter() - t0) / BATCH)
    return float(np.median(per[5:])) * 1e6, len(per)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/m2rec-bench/profile"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nprobe", type=int, nargs="*", default=[], help="default: the calibrated one")
    parser.add_argument("--spin", type=float, default=0.0)
    args = parser.parse_args()
    args.seed, args.quick = 0, False  # what benchmarks.serve.Bench reads
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.dataset)
    fresh = not (args.work / "store.sqlite3").exists()
    store = SqliteStore(args.work / "store.sqlite3")
    r = Recommender(load_artifact(args.artifact), store)
    n_syn = args.size - len(r.warm_ids)
    bench, users = new_bench(args, dataset, r, store, 10_000)  # users as serve.py's default smallest size
    if fresh:
        rows = fill_store(r, store, dataset, 0, n_syn, args.seed)
        write_histories(store, users)
        np.save(args.work / "rows.npy", rows)
    else:  # the catalogue of the run that wrote it
        rows = np.load(args.work / "rows.npy")
        if len(rows) != n_syn:
            parser.error(f"{args.work} holds a catalogue of {len(rows) + len(r.warm_ids):,} rows, not "
                         f"{args.size:,}: pass another --work")
    bench.ids += [f"syn:{j}" for j in range(n_syn)]
    bench.rows = np.concatenate([bench.rows, rows])
    kind = "ivf" if args.size >= 50_000 else "exact"
    index, nprobe, sweep = calibrate(bench, kind)
    print(f"{kind} index over {len(bench.ids):,} rows; calibration {sweep}", flush=True)
    torch.set_num_threads(1)
    r.maintainer.index = index
    measured = list(bench.bench_users)
    with threadpool_limits(1, user_api="blas"):  # as the server runs
        for n in args.nprobe or [nprobe]:
            index.nprobe = n
            us, batches = per_user_us(r, measured, args.seconds)
            label = f"nprobe {n}" if kind == "ivf" else "exact"
            print(f"{label}: {us:.1f} us per user, median of {batches} batches of {BATCH}", flush=True)
        if args.spin:
            print(f"answering batches for {args.spin} s more; pid {os.getpid()}", flush=True)
            per_user_us(r, measured, args.spin)
    store.close()


if __name__ == "__main__":
    main()
