"""The evaluation harness: every model, both protocols, several seeds, one table.

    python -m training.evaluate --dataset data/citeulike-t --models random,content-knn,ridge-mf --seeds 3

For each seed: a cold-start split (training/split.py); each model fits on the warm interactions,
choosing its hyper-parameters on the validation items; then it is scored on the test-cold items
(cold-only protocol) and on warm + cold items together (all-items protocol, with the share of
cold items in the top-20). Writes benchmarks/results/<dataset>-<name>.{md,json,png}.

Long runs can be split by seed and joined into one table:

    python -m training.evaluate --dataset data/citeulike-t --models m2rec-gated --seed-list 1,2 --name part2
    python -m training.evaluate --merge part1.json part2.json --name gated

(a model and seed found in two reports must have identical metrics: runs are deterministic).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.baselines import ContentKNN, RandomRecommender, RidgeMF
from training.dataset import Dataset, fingerprint, load_dataset
from training.protocol import Recommender, all_items, cold_only, evaluate
from training.split import cold_start_split

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
TABLE_METRICS = ("recall@10", "recall@20", "ndcg@20", "hr@20", "recall@50", "ndcg@50")

ModelFactory = Callable[[int], Recommender]


def model_factories() -> dict[str, ModelFactory]:
    factories: dict[str, ModelFactory] = {
        "random": lambda seed: RandomRecommender(seed),
        "content-knn": lambda seed: ContentKNN(),
        "ridge-mf": lambda seed: RidgeMF(seed=seed),
    }
    try:  # the neural model and its ablations, when the model code is present
        from training.m2rec_recommender import M2RecRecommender
        from training.presets import VARIANTS
    except ImportError:
        return factories
    for name in VARIANTS:
        factories[name] = lambda seed, name=name: M2RecRecommender.variant(name, seed)  # type: ignore[misc]
    return factories


def run(dataset: Dataset, models: list[str], seeds: list[int]) -> dict[str, Any]:
    factories = model_factories()
    unknown = [m for m in models if m not in factories]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(factories)}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    splits = []
    for seed in seeds:
        split = cold_start_split(dataset, seed)
        splits.append({"seed": seed, **split.summary()})
        for name in models:
            model = factories[name](seed)
            start = time.perf_counter()
            model.fit(dataset, split)
            fit_seconds = time.perf_counter() - start
            cold = evaluate(model, cold_only(split))
            every = evaluate(model, all_items(split))
            runs[name].append({
                "seed": seed,
                "fit_seconds": fit_seconds,
                "params": getattr(model, "params", {}),
                "cold_only": cold,
                "all_items": every,
            })
            print(f"seed {seed} {name:>24}: fit {fit_seconds:6.1f}s  cold-only R@20 {cold['recall@20']:.4f} "
                  f"N@20 {cold['ndcg@20']:.4f} | all-items R@20 {every['recall@20']:.4f} "
                  f"cold share {every['cold_share@20']:.3f}", flush=True)
    return {"splits": splits, "runs": runs}


def summarise(runs: list[dict[str, Any]], protocol: str) -> dict[str, tuple[float, float]]:
    keys = runs[0][protocol].keys()
    return {k: (float(np.mean([r[protocol][k] for r in runs])), float(np.std([r[protocol][k] for r in runs])))
            for k in keys}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['dataset']}: cold-start evaluation ({len(report['seeds'])} seeds)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`; data fingerprint `{report['data_fingerprint'][:16]}`; "
        f"wall time {report['wall_seconds']:.0f} s on {report['machine']}.",
        "",
        "Metrics: Recall@K with denominator min(K, |truth|), NDCG@K with binary gains, HR@K; mean ± std "
        "over seeds; ties broken against the truth. Hyper-parameters chosen on validation items only.",
        "",
        "Dataset: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in report["statistics"].items()) + ".  ",
        "Split (seed {seed}): ".format(**report["splits"][0])
        + ", ".join(f"{k} {v}" for k, v in report["splits"][0].items() if k != "seed") + ".",
    ]
    for protocol, title in (("cold_only", "Cold-only (rank the test-cold items)"),
                            ("all_items", "All items (warm + cold, training items removed)")):
        metrics = list(TABLE_METRICS) + (["cold_share@20"] if protocol == "all_items" else [])
        lines += ["", f"## {title}", "", "| model | " + " | ".join(metrics) + " | fit s |",
                  "|---|" + "---|" * (len(metrics) + 1)]
        for name, runs in report["runs"].items():
            s = summarise(runs, protocol)
            fit = np.mean([r["fit_seconds"] for r in runs])
            cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" for m in metrics]
            seeds = "" if len(runs) == len(report["seeds"]) else f" ({len(runs)} seeds)"
            lines.append(f"| {name}{seeds} | " + " | ".join(cells) + f" | {fit:.1f} |")
    lines += ["", "## Chosen hyper-parameters (per seed)", ""]
    for name, runs in report["runs"].items():
        for r in runs:
            params = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["params"].items()}
            lines.append(f"- {name}, seed {r['seed']}: `{json.dumps(params)}`")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, protocol in zip(axes, ("cold_only", "all_items"), strict=True):
        for offset, metric in ((-0.2, "recall@20"), (0.2, "ndcg@20")):
            stats = [summarise(report["runs"][n], protocol)[metric] for n in names]
            ax.bar(np.arange(len(names)) + offset, [m for m, _ in stats], 0.4,
                   yerr=[s for _, s in stats], capsize=3, label=metric)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"{report['dataset']}: {protocol.replace('_', '-')}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several of the same dataset: each model's runs and the splits, by seed."""
    first = reports[0]
    for other in reports[1:]:
        if (other["dataset"], other["data_fingerprint"]) != (first["dataset"], first["data_fingerprint"]):
            raise SystemExit(f"cannot merge {other['dataset']} ({other['data_fingerprint'][:16]}) into "
                             f"{first['dataset']} ({first['data_fingerprint'][:16]}): different data")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for report in reports:
        for name, model_runs in report["runs"].items():
            for r in model_runs:
                seen = runs.setdefault(name, {}).get(r["seed"])
                if seen is not None and (seen["cold_only"], seen["all_items"]) != (r["cold_only"], r["all_items"]):
                    raise SystemExit(f"{name}, seed {r['seed']}: two reports disagree (not the same code?)")
                runs[name].setdefault(r["seed"], r)
    splits = {s["seed"]: s for report in reports for s in report["splits"]}
    return {
        **{k: first[k] for k in ("dataset", "data_fingerprint", "machine", "statistics")},
        "command": " + ".join(r["command"] for r in reports),
        "commit": ", ".join(dict.fromkeys(r["commit"] for r in reports)),
        "seeds": sorted(splits),
        "splits": [splits[seed] for seed in sorted(splits)],
        "runs": {name: [by_seed[seed] for seed in sorted(by_seed)] for name, by_seed in runs.items()},
        "wall_seconds": sum(r["wall_seconds"] for r in reports),
    }


def write(report: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['dataset']}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {stem}.md, .json and .png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="dataset folder (training/dataset.py format)")
    parser.add_argument("--models", default="random,content-knn,ridge-mf")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--seed-list", default=None, help="these seeds instead, e.g. 1,2")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="REPORT.json",
                        help="join these reports into one (no training)")
    parser.add_argument("--name", default="baselines", help="results file suffix")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.merge:
        write(merge([json.loads(path.read_text()) for path in args.merge]), args.out, args.name)
        return
    if args.dataset is None:
        parser.error("--dataset is required (or --merge)")
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))

    start = time.perf_counter()
    dataset = load_dataset(args.dataset)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result = run(dataset, models, seeds)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip() or "unknown"
    report = {
        "dataset": dataset.name,
        "command": "python -m training.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "commit": commit,
        "data_fingerprint": fingerprint(args.dataset),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "statistics": dataset.statistics(),
        "seeds": seeds,
        **result,
        "wall_seconds": time.perf_counter() - start,
    }
    write(report, args.out, args.name)


if __name__ == "__main__":
    main()
