"""Does the mixing policy chosen on validation transfer to test? (a diagnostic of the harness)

For each model and seed, with the harness's validation (every user validates on a holdout of their fit
interactions) and with validation users (training/split.py, `validation_users`): the policy the model
chose on validation, what it gives on test, and the best policy for test found by the same search on
the test lists themselves. That last one is a diagnostic only: nothing is chosen with it; the gap
between the two says how much a validation that does not mirror test costs.

    python -m benchmarks.policy_transfer --dataset data/ml-100k --models m2rec,blend --seeds 3

Writes benchmarks/results/validation-mirror.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.dataset import load_dataset
from training.evaluate import REPO_ROOT, RESULTS, model_factories
from training.mixing import choose_policy, model_policy
from training.protocol import evaluate_tops, hybrid, tops
from training.split import cold_start_split

SHOWN = ("recall@20", "ndcg@20", "cold_recall@20", "warm_recall@20", "cold_share@20", "truth_cold_share")


def _metrics(t: Any, policy: Any) -> dict[str, float]:
    m = evaluate_tops(t, policy, True).metrics
    return {k: round(m[k], 4) for k in SHOWN}


def run(dataset_dir: Path, models: list[str], seeds: list[int], validation_users: float) -> list[dict[str, Any]]:
    dataset = load_dataset(dataset_dir)
    factories = model_factories()
    rows = []
    for seed in seeds:
        for variant, share in (("every user validates", 0.0), (f"validation users ({validation_users:g})",
                                                                 validation_users)):
            split = cold_start_split(dataset, seed, validation_users=share)
            for name in models:
                model = factories[name](seed)
                model.fit(dataset, split)
                chosen = model_policy(model)
                val, test = tops(model, hybrid(split, validation=True)), tops(model, hybrid(split))
                best, _ = choose_policy(test)
                test_metrics, with_best = _metrics(test, chosen), _metrics(test, best)
                row: dict[str, Any] = {"seed": seed, "validation": variant, "model": name, "chosen": chosen.to_dict(),
                       "validation_metrics": _metrics(val, chosen), "test": test_metrics,
                       "best_for_test": best.to_dict(), "test_with_best": with_best}
                rows.append(row)
                print(f"seed {seed} {variant:>24} {name:>8}: test R@20 {test_metrics['recall@20']:.4f} "
                      f"(share {test_metrics['cold_share@20']:.2f}) | best for test {with_best['recall@20']:.4f} "
                      f"(share {with_best['cold_share@20']:.2f})", flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Does the policy chosen on validation transfer to test? ({report['dataset']})", "",
        f"Command: `{report['command']}`  ",
        f"Commit `{report['commit']}`; run {report['run_at']}; wall time {report['wall_seconds']:.0f} s.", "",
        "Per model, seed and kind of validation: the mixing policy chosen on validation and its hybrid test "
        "figures, beside the best policy for test found by the same search on the test lists (a diagnostic, "
        "never used to choose anything). Recall@20 / NDCG@20 / cold share of the top-20. With validation "
        "users the test users are the other 80%, so the two kinds are not scored on the same users.", "",
        "| seed | validation | model | chosen policy | cold share at validation | test R@20 | test N@20 "
        "| test cold share | best for test: R@20 | N@20 | cold share | truth cold share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def policy(p: dict[str, Any]) -> str:
        return (f"quota {p['cold_share']:g}" if p["policy"] == "quota"
                else f"calibrated ×{p['scale']:g} {p['offset']:+.3f}")

    for r in report["rows"]:
        t, b = r["test"], r["test_with_best"]
        lines.append(f"| {r['seed']} | {r['validation']} | {r['model']} | {policy(r['chosen'])} | "
                     f"{r['validation_metrics']['cold_share@20']:.2f} | {t['recall@20']:.4f} | {t['ndcg@20']:.4f} | "
                     f"{t['cold_share@20']:.2f} | {b['recall@20']:.4f} | {b['ndcg@20']:.4f} | "
                     f"{b['cold_share@20']:.2f} | {t['truth_cold_share']:.2f} |")
    lines += ["", "Mean over seeds: test Recall@20 with the chosen policy, and its shortfall from the best policy "
              "for test:", "", "| validation | model | test R@20 | test N@20 | shortfall R@20 | shortfall N@20 |",
              "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["rows"]:
        groups.setdefault((r["validation"], r["model"]), []).append(r)
    for (variant, model), rs in groups.items():
        def mean(part: str, key: str, rs: list[dict[str, Any]] = rs) -> float:
            return float(np.mean([r[part][key] for r in rs]))
        lines.append(f"| {variant} | {model} | {mean('test', 'recall@20'):.4f} | {mean('test', 'ndcg@20'):.4f} | "
                     f"{mean('test_with_best', 'recall@20') - mean('test', 'recall@20'):.4f} | "
                     f"{mean('test_with_best', 'ndcg@20') - mean('test', 'ndcg@20'):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--models", default="m2rec,blend")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--validation-users", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=RESULTS / "validation-mirror")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.dataset, [m.strip() for m in args.models.split(",")], list(range(args.seeds)),
               args.validation_users)
    report = {
        "dataset": args.dataset.name,
        "command": "python -m benchmarks.policy_transfer " + shlex.join(sys.argv[1:] if argv is None else argv),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO_ROOT).stdout.strip() or "unknown",
        "run_at": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": time.perf_counter() - start, "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
