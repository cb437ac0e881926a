"""The evaluation harness: every model, the hybrid and cold-only protocols, several seeds, one report.

    python -m training.evaluate --dataset data/ml-100k --models popularity,als,als-ridge,blend,m2rec --seeds 3

For each seed: a split (training/split.py) with test-cold items, validation items and per-user warm
holdouts; each model fits on the fit interactions, choosing hyper-parameters and calibration on the
validation tasks only; then it is scored on the test tasks:

    hybrid     warm + cold candidates; truth = the warm holdout + the cold interactions (headline)
    cold-only  the test-cold items only

Validation mirrors test exactly by default: a fifth of the users (`--validation-users 0.2`) validate
and are not tested; `--validation-users 0` is the older validation, where every user validates on a
carve-out of their own history (the tables made before 2026-12-06; training/split.py says why it
over-exposes new items).

Writes benchmarks/results/<dataset>-<name>.{md,json,png}; per-user results (for paired differences
with a 95% confidence interval against `--reference`) go to benchmarks/results/per-user/ (not
committed: large). Long runs can be split by seed and joined:

    python -m training.evaluate --dataset data/citeulike-t --models m2rec --seed-list 1,2 --name part2
    python -m training.evaluate --merge part1.json part2.json --name joined
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training import machine
from training.baselines import ALS, ALSRidge, ContentKNN, Popularity, RandomRecommender
from training.dataset import Dataset, fingerprint, load_dataset
from training.ensemble import Ensemble, JointRecommender
from training.m2rec_recommender import M2RecRecommender
from training.mixing import model_policy
from training.presets import PRESETS
from training.protocol import Evaluation, Recommender, Task, cold_only, evaluate_tops, hybrid, tops
from training.split import HARNESS_VALIDATION_USERS, cold_start_split

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
PROTOCOLS = ("hybrid", "cold_only")
HYBRID_COLUMNS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50",
                  "cold_recall@20", "cold_ndcg@20", "warm_recall@20", "warm_ndcg@20", "cold_share@20",
                  "truth_cold_share")
COLD_COLUMNS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50", "hr@20")
PER_USER = ("recall@20", "ndcg@20", "cold_recall@20", "warm_recall@20")  # kept for paired differences
PAIRED = ("recall@20", "ndcg@20")

ModelFactory = Callable[[int], Recommender]


def model_factories() -> dict[str, ModelFactory]:
    factories: dict[str, ModelFactory] = {
        "random": lambda seed: RandomRecommender(seed),
        "popularity": lambda seed: Popularity(),
        "content-knn": lambda seed: ContentKNN(),
        "als": lambda seed: ALS(seed=seed),
        "als-ridge": lambda seed: ALSRidge(seed=seed),
        "blend": lambda seed: ALSRidge(seed=seed, calibrate=True, name="blend"),
        "m2rec+blend": lambda seed: Ensemble(seed=seed),
        "m2rec+als": lambda seed: JointRecommender(seed=seed),
        # the ablation of the new items' own weight: one w for both populations
        "m2rec+als-one-weight": lambda seed: JointRecommender(seed=seed, name="m2rec+als-one-weight",
                                                              per_population=False),
    }
    for name in PRESETS:
        factories[name] = lambda seed, name=name: M2RecRecommender.preset(name, seed)  # type: ignore[misc]
    return factories


def _test_tasks(split: Any) -> dict[str, Task]:
    return {"hybrid": hybrid(split), "cold_only": cold_only(split)}


def run(dataset: Dataset, models: list[str], seeds: list[int], validation_users: float = HARNESS_VALIDATION_USERS
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report runs, per-user results) for every model and seed; `validation_users`: see
    training/split.py."""
    factories = model_factories()
    unknown = [m for m in models if m not in factories]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(factories)}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    per_user: dict[str, dict[str, Any]] = {m: {} for m in models}
    splits = []
    for seed in seeds:
        split = cold_start_split(dataset, seed, validation_users=validation_users)
        splits.append({"seed": seed, **split.summary()})
        tasks = _test_tasks(split)
        # m2rec and the blend, fitted once a seed: the ensembles combine them (name -> (model, fit seconds))
        shared: dict[str, tuple[Any, float]] = {}
        for name in models:
            if name in shared:
                model, fit_seconds = shared[name]
            else:
                model = factories[name](seed)
                if isinstance(model, Ensemble | JointRecommender):
                    model.shared = shared
                start = time.perf_counter()
                model.fit(dataset, split)
                fit_seconds = time.perf_counter() - start
                if name in ("m2rec", "blend"):
                    shared[name] = (model, fit_seconds)
            results: dict[str, Evaluation] = {
                protocol: evaluate_tops(tops(model, task), model_policy(model), task.mixed)
                for protocol, task in tasks.items()}
            runs[name].append({
                "seed": seed,
                "fit_seconds": round(fit_seconds, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "params": getattr(model, "params", {}),
                **{protocol: e.metrics for protocol, e in results.items()},
            })
            per_user[name][str(seed)] = {
                protocol: {"users": e.users.tolist(),
                           **{k: np.round(e.per_user[k], 5).tolist() for k in PER_USER if k in e.per_user}}
                for protocol, e in results.items()}
            h, c = results["hybrid"].metrics, results["cold_only"].metrics
            print(f"seed {seed} {name:>26}: fit {fit_seconds:7.1f}s | hybrid R@20 {h['recall@20']:.4f} "
                  f"N@20 {h['ndcg@20']:.4f} cold {h.get('cold_recall@20', 0):.4f} warm "
                  f"{h.get('warm_recall@20', 0):.4f} share {h.get('cold_share@20', 0):.3f} "
                  f"(truth {h.get('truth_cold_share', 0):.3f}) | cold-only R@20 {c['recall@20']:.4f}", flush=True)
    return {"splits": splits, "runs": runs}, per_user


def summarise(runs: list[dict[str, Any]], protocol: str) -> dict[str, tuple[float, float]]:
    keys = runs[0][protocol].keys()
    return {k: (float(np.mean([r[protocol][k] for r in runs])), float(np.std([r[protocol][k] for r in runs])))
            for k in keys}


def paired(per_user: dict[str, Any], model: str, reference: str, protocol: str, metric: str
           ) -> dict[str, float] | None:
    """Mean per-user difference model - reference over every (seed, user) pair both have, with the
    normal-approximation 95% confidence interval of that mean."""
    diffs = []
    for seed, by_protocol in per_user.get(model, {}).items():
        ref = per_user.get(reference, {}).get(seed)
        if ref is None:
            continue
        a, b = by_protocol[protocol], ref[protocol]
        index = {u: i for i, u in enumerate(b["users"])}
        for i, u in enumerate(a["users"]):
            j = index.get(u)
            x, y = a[metric][i], b[metric][j] if j is not None else None
            if y is not None and x is not None and np.isfinite(x) and np.isfinite(y):
                diffs.append(x - y)
    if len(diffs) < 2:
        return None
    d = np.asarray(diffs)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half), "n": d.size}


def markdown(report: dict[str, Any]) -> str:
    ref = report.get("reference")
    lines = [
        f"# {report['dataset']}: hybrid and cold-only evaluation ({len(report['seeds'])} seeds)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['commit']}`; data fingerprint `{report['data_fingerprint'][:16]}`; "
        f"wall time {report['wall_seconds']:.0f} s on {report['machine']}.",
        "",
        "Metrics: Recall@K with denominator min(K, |truth|), NDCG@K with binary gains, HR@K; mean ± std over "
        "seeds; ties broken against the truth. `cold_`/`warm_` columns: the same list scored against the cold "
        "or the warm part of the truth only (users with truth in that part). `cold_share@20`: new items in the "
        "top-20; `truth_cold_share`: new items in the truth. Hyper-parameters and calibration chosen on "
        "validation (pseudo-cold items and a warm holdout carved from the training data) only; "
        + ("validation users: a share of the users validate and are not tested (`hybrid_val_users`), the rest "
           "are tested (`hybrid_test_users`)." if report["splits"][0].get("hybrid_users_in_both") == 0 else
           "every user validates on a carve-out of their own history (`--validation-users 0`)."),
        "",
        "Dataset: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in report["statistics"].items()) + ".  ",
        "Split (seed {seed}): ".format(**report["splits"][0])
        + ", ".join(f"{k} {v}" for k, v in report["splits"][0].items() if k != "seed") + ".",
    ]
    for protocol, title, columns in (
            ("hybrid", "Hybrid (warm and new items ranked together; the headline)", HYBRID_COLUMNS),
            ("cold_only", "Cold-only (rank the test-cold items)", COLD_COLUMNS)):
        lines += ["", f"## {title}", "", "| model | " + " | ".join(columns) + " | fit s |",
                  "|---|" + "---|" * (len(columns) + 1)]
        for name, runs in report["runs"].items():
            s = summarise(runs, protocol)
            cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" if m in s else "" for m in columns]
            seeds = "" if len(runs) == len(report["seeds"]) else f" ({len(runs)} seeds)"
            lines.append(f"| {name}{seeds} | " + " | ".join(cells)
                         + f" | {np.mean([r['fit_seconds'] for r in runs]):.0f} |")
        diffs = report.get("paired", {}).get(protocol, {})
        if ref and diffs:
            lines += ["", f"Paired per-user differences to **{ref}** (other − {ref}; mean and 95% CI over every "
                      "seed's users):", "", "| model | " + " | ".join(f"Δ {m}" for m in PAIRED) + " |",
                      "|---|" + "---|" * len(PAIRED)]
            for name, by_metric in diffs.items():
                cells = [f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else ""
                         for d in (by_metric.get(m) for m in PAIRED)]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Chosen hyper-parameters and mixing (per seed)", ""]
    for name, runs in report["runs"].items():
        for r in runs:
            lines.append(f"- {name}, seed {r['seed']}: `{json.dumps(r['params'], default=_round)}`")
    return "\n".join(lines) + "\n"


def _round(value: Any) -> Any:
    return round(float(value), 4)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    panels = (("hybrid", ("recall@20", "ndcg@20"), "hybrid overall"),
              ("hybrid", ("cold_recall@20", "warm_recall@20"), "hybrid: cold and warm parts"),
              ("hybrid", ("cold_share@20", "truth_cold_share"), "new items in top-20 / in truth"),
              ("cold_only", ("recall@20", "ndcg@20"), "cold-only"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (protocol, metrics, title) in zip(axes, panels, strict=True):
        for offset, metric in zip((-0.2, 0.2), metrics, strict=True):
            stats = [summarise(report["runs"][n], protocol).get(metric, (0.0, 0.0)) for n in names]
            ax.bar(np.arange(len(names)) + offset, [m for m, _ in stats], 0.4,
                   yerr=[s for _, s in stats], capsize=3, label=metric)
        ax.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{report['dataset']}: {title}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_user_path(out: Path, dataset: str, name: str) -> Path:
    return out / "per-user" / f"{dataset}-{name}.json.gz"


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
                if seen is not None and any(seen[p] != r[p] for p in PROTOCOLS):
                    raise SystemExit(f"{name}, seed {r['seed']}: two reports disagree (not the same code?)")
                runs[name].setdefault(r["seed"], r)
    splits = {s["seed"]: s for report in reports for s in report["splits"]}
    return {
        **{k: first[k] for k in ("dataset", "data_fingerprint", "machine", "statistics")},
        "reference": next((r["reference"] for r in reports if r.get("reference")), None),
        "command": " + ".join(r["command"] for r in reports),
        "commit": ", ".join(dict.fromkeys(r["commit"] for r in reports)),
        "seeds": sorted(splits),
        "splits": [splits[seed] for seed in sorted(splits)],
        "runs": {name: [by_seed[seed] for seed in sorted(by_seed)] for name, by_seed in runs.items()},
        "wall_seconds": sum(r["wall_seconds"] for r in reports),
    }


def add_paired(report: dict[str, Any], per_user: dict[str, Any]) -> None:
    ref = report.get("reference")
    if not ref or ref not in per_user:
        return
    report["paired"] = {protocol: {name: {m: paired(per_user, name, ref, protocol, m) for m in PAIRED}
                                   for name in report["runs"] if name != ref}
                        for protocol in PROTOCOLS}


def write(report: dict[str, Any], per_user: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    add_paired(report, per_user)
    stem = out / f"{report['dataset']}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=_round) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    users_file = per_user_path(out, report["dataset"], name)
    users_file.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(users_file, "wt") as f:
        json.dump(per_user, f)
    print(markdown(report))
    print(f"wrote {stem}.md, .json and .png; per-user results in {users_file}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="dataset folder (training/dataset.py format)")
    parser.add_argument("--models", default="popularity,content-knn,als,als-ridge,blend")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--seed-list", default=None, help="these seeds instead, e.g. 1,2")
    parser.add_argument("--reference", default=None, help="paired differences against this model")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="REPORT.json",
                        help="join these reports (and their per-user results) into one (no training)")
    parser.add_argument("--validation-users", type=float, default=HARNESS_VALIDATION_USERS, metavar="SHARE",
                        help="validate on this share of the users only, an exact mirror of test; 0: every "
                             "user validates on a carve-out of their own history (training/split.py)")
    parser.add_argument("--name", default="baselines", help="results file suffix")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.merge:
        reports = [json.loads(path.read_text()) for path in args.merge]
        report = merge(reports)
        if args.reference:
            report["reference"] = args.reference
        users: dict[str, Any] = {}
        for path, r in zip(args.merge, reports, strict=True):
            stem_name = path.stem.removeprefix(f"{r['dataset']}-")
            with gzip.open(per_user_path(path.parent, r["dataset"], stem_name), "rt") as f:
                for model, by_seed in json.load(f).items():
                    users.setdefault(model, {}).update(by_seed)
        write(report, users, args.out, args.name)
        return
    if args.dataset is None:
        parser.error("--dataset is required (or --merge)")
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))

    start = time.perf_counter()
    dataset = load_dataset(args.dataset)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result, per_user = run(dataset, models, seeds, args.validation_users)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip() or "unknown"
    report = {
        "dataset": dataset.name,
        "reference": args.reference,
        "command": "python -m training.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "commit": commit,
        "data_fingerprint": fingerprint(args.dataset),
        "machine": machine.describe(),
        "statistics": dataset.statistics(),
        "seeds": seeds,
        **result,
        "wall_seconds": time.perf_counter() - start,
    }
    write(report, per_user, args.out, args.name)


if __name__ == "__main__":
    main()
