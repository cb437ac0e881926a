"""Does serving M2VAE's user-aware fusion for new candidates help? Measured on the hybrid protocol.

The index stores one row per new item, generated under the neutral (population-mean) user's gate.
The personalised variant re-scores each user's best `--rescore` new candidates (by their neutral
score) with rows generated under THAT user's gate, [h; 1]·F(a, c | h), and leaves every other score
as it is. Both variants share one trained model per seed; each chooses its own mixing policy on the
hybrid validation task (training/mixing.py), so neither is judged with the other's calibration.

    python -m benchmarks.personalised_fusion --dataset data/ml-100k --seeds 3 --rescore 100

Writes benchmarks/results/personalised-fusion.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from training.dataset import load_dataset
from training.m2rec_recommender import M2RecRecommender
from training.mixing import choose_policy, model_policy
from training.presets import PRESETS
from training.protocol import Task, cold_only, evaluate_tops, hybrid, tops
from training.split import cold_start_split
from training.train import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = "m2rec"
EMBED_BATCH = 4096  # (user, item) pairs per generator pass: (B, A, H) attribute pooling memory
COLUMNS = ("recall@20", "ndcg@20", "cold_recall@20", "cold_ndcg@20", "warm_recall@20", "cold_share@20")


class FusionRecommender(M2RecRecommender):
    """The harness's m2rec whose new candidates may be re-scored under each user's own gate."""

    rescore = 0  # new candidates re-scored per user; 0 = the neutral rows (what the service serves)

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        scores = super().score(users, candidates, history)  # (B, C) neutral rows
        table, result = self._table, self.result
        if self.rescore <= 0 or table is None or result is None:
            return scores
        new = np.flatnonzero(~np.isin(candidates, result.data.warm))  # columns of new candidates
        if new.size == 0:
            return scores
        r = min(self.rescore, new.size)
        history_mask = history[users][:, candidates[new]].toarray() > 0  # never re-rank what is removed
        neutral = np.where(history_mask, -np.inf, scores[:, new])
        best = np.argpartition(-neutral, r - 1, axis=1)[:, :r]  # (B, r) columns into `new`
        h = torch.from_numpy(table.user_vectors(users, history)).float()  # (B, D)
        pair_user = np.repeat(np.arange(users.size), r)  # (B·r,)
        pair_col = new[best.ravel()]  # (B·r,) columns into candidates
        model, data = result.model, result.data
        out = np.empty(pair_col.size)
        with torch.no_grad():
            for s in range(0, pair_col.size, EMBED_BATCH):
                cols, us = pair_col[s : s + EMBED_BATCH], pair_user[s : s + EMBED_BATCH]
                hu = h[torch.from_numpy(us)]  # (P, D)
                rows, _ = model.embed_items(data.inputs(candidates[cols]), user=hu)  # (P, D+1)
                out[s : s + cols.size] = ((hu * rows[:, :-1]).sum(dim=1) + rows[:, -1]).numpy()
        personal = scores.copy()
        personal[pair_user, pair_col] = out
        return personal


def evaluate_both(model: FusionRecommender, split: Any, rescore: int) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of the neutral and the personalised variant; each with its own validation-chosen policy."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    tasks: dict[str, Task] = {"hybrid": hybrid(split), "cold_only": cold_only(split)}
    for variant, r in (("neutral", 0), ("personalised", rescore)):
        model.rescore = r
        model.policy, _ = choose_policy(tops(model, hybrid(split, validation=True)))
        out[variant] = {name: evaluate_tops(tops(model, task), model_policy(model), task.mixed).metrics
                        for name, task in tasks.items()}
        out[variant]["mixer"] = {k: float(v) for k, v in model.policy.to_dict().items()
                                 if isinstance(v, int | float)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rescore", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (smoke runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "personalised-fusion")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset)
    started = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        split = cold_start_split(dataset, seed)
        overrides = {} if args.epochs is None else {"epochs": args.epochs}
        config = dataclasses.replace(TrainConfig(seed=seed, progress=False), **{**PRESETS[PRESET], **overrides})
        model = FusionRecommender(config, PRESET)
        t0 = time.perf_counter()
        model.fit(dataset, split)
        fit = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = evaluate_both(model, split, args.rescore)
        runs.append({"seed": seed, "fit_seconds": round(fit, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
                     **result})
        for variant in ("neutral", "personalised"):
            h = result[variant]["hybrid"]
            print(f"seed {seed} {variant:>12}: hybrid R@20 {h['recall@20']:.4f} N@20 {h['ndcg@20']:.4f} "
                  f"cold R@20 {h.get('cold_recall@20', 0):.4f} | cold-only R@20 "
                  f"{result[variant]['cold_only']['recall@20']:.4f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    report = {"dataset": dataset.name, "preset": PRESET, "rescore": args.rescore, "seeds": args.seeds,
              "command": "python -m benchmarks.personalised_fusion "
              + shlex.join(sys.argv[1:] if argv is None else argv),
              "commit": commit, "wall_seconds": round(time.perf_counter() - started), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _cell(runs: list[dict[str, Any]], variant: str, protocol: str, key: str) -> str:
    values = [r[variant][protocol].get(key) for r in runs]
    if any(v is None for v in values):
        return ""
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def _delta(runs: list[dict[str, Any]], protocol: str, key: str) -> str:
    d = [r["personalised"][protocol][key] - r["neutral"][protocol][key] for r in runs
         if key in r["personalised"][protocol] and key in r["neutral"][protocol]]
    if not d:
        return ""
    return f"{np.mean(d):+.4f} (per seed: {', '.join(f'{x:+.4f}' for x in d)})"


def markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        f"# Personalised fusion for new candidates: {report['dataset']}, `{report['preset']}`, "
        f"{report['seeds']} seeds",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`; wall time {report['wall_seconds']} s (training included).",
        "",
        "**neutral**: every new candidate scored by its stored row (the neutral user's gate; what the service "
        f"serves). **personalised**: each user's best {report['rescore']} new candidates by neutral score "
        "re-scored with rows generated under that user's own gate (M2VAE's user-aware fusion, "
        "`M2Rec.embed_items(inputs, user=h)`); the rest unchanged. One trained model per seed for both; each "
        "variant chooses its own mixing policy on the hybrid validation task. Metrics as in "
        "training/evaluate.py (mean ± std over seeds).",
    ]
    for protocol, title in (("hybrid", "Hybrid"), ("cold_only", "Cold-only")):
        keys = [k for k in COLUMNS if protocol == "hybrid" or not k.startswith(("cold_", "warm_"))]
        lines += ["", f"## {title}", "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for variant in ("neutral", "personalised"):
            lines.append(f"| {variant} | " + " | ".join(_cell(runs, variant, protocol, k) for k in keys) + " |")
        lines += ["", "Δ personalised − neutral: "
                  + "; ".join(f"{k} {_delta(runs, protocol, k)}" for k in ("recall@20", "ndcg@20"))]
    lines += ["", "Mixers chosen on validation: " + "; ".join(
        f"seed {r['seed']} neutral {r['neutral']['mixer']}, personalised {r['personalised']['mixer']}" for r in runs)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
