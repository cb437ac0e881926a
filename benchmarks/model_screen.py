"""One quick training run with TrainConfig overrides: the screens of results/model-tuning.md.

    python -m benchmarks.model_screen --dataset data/ml-100k --seed 0 lr_gen=1e-3 feature_dropout=0.3 epochs=12
    python -m benchmarks.model_screen --dataset data/ml-100k --variant m2rec-linear-d128-gen-nll gate_norm=true

Prints one JSON line: best epoch, validation and test Recall@20 / NDCG@20 (cold-only), all-items
Recall@20 and cold share, and how close the generator's rows for warm items come to their trained
rows (mean cosine, mean norm ratio), and `ridge_on_v`: the cold-only score of the trained user vectors
with a ridge map from content to the trained rows [V; b] (ridge-mf's regression on our V instead of
ALS factors), which tells a poor V apart from a generator that fails to reproduce a good one.
One seed is a screen, not a result: the harness (training.evaluate) runs what survives on 3 seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from training.baselines import content_blocks
from training.dataset import Dataset, load_dataset
from training.item_rows import ItemTable, generated_rows, user_vectors
from training.presets import PRESETS
from training.protocol import all_items, cold_only, evaluate
from training.split import ColdStartSplit, cold_start_split
from training.train import TrainConfig, TrainResult, train


def ridge_on_v(result: TrainResult, dataset: Dataset, split: ColdStartSplit) -> dict[str, float]:
    """Cold-only metrics of a ridge map content -> [V; b], ridge strength chosen on validation."""
    table = ItemTable(result.model, result.data)
    trained = result.model.item_rows().detach().numpy().astype(np.float64)  # (J, D+1)
    content = sp.csr_matrix(sp.hstack([content_blocks(dataset, 1.0).as_csr(),
                                       sp.csr_matrix(np.ones((dataset.n_items, 1)))]))
    xw = content[result.data.warm]
    best: tuple[float, dict[str, float]] = (-1.0, {})
    for gamma in (1.0, 10.0, 100.0):
        gram = (xw.T @ xw).toarray() + gamma * np.eye(content.shape[1])
        table.items = np.asarray(content @ np.linalg.solve(gram, np.asarray(xw.T @ trained)))
        val = evaluate(table, cold_only(split, validation=True))["recall@20"]
        if val > best[0]:
            test = evaluate(table, cold_only(split))
            best = (val, {"gamma": gamma, "val_recall@20": round(val, 4),
                          "recall@20": round(test["recall@20"], 4), "ndcg@20": round(test["ndcg@20"], 4)})
    return best[1]


def surrogate_fold_in(result: TrainResult, split: ColdStartSplit) -> dict[str, float]:
    """Cold-only Recall@20 with users folded in from a mix of trained and generated rows of their
    history, (1 - a)·V_i + a·ê_i (a = 0: what is served): how much of V that content cannot
    predict helps or hurts the ranking of cold items. A diagnostic, never served."""
    model = result.model
    table = ItemTable(model, result.data)
    trained = model.user.V.detach().clone()  # (J, D)
    generated = generated_rows(model, result.data, result.data.warm)[:, :-1]  # (J, D)
    out: dict[str, float] = {}
    try:
        for a in (0.5, 1.0):
            model.user.V.data.copy_((1.0 - a) * trained + a * generated)
            table.users = user_vectors(model, result.data).numpy()
            out[f"a={a}"] = round(evaluate(table, cold_only(split))["recall@20"], 4)
    finally:
        model.user.V.data.copy_(trained)
    return out


def score_parts(result: TrainResult, split: ColdStartSplit) -> dict[str, float]:
    """Cold-only Recall@20 of the served scores with one part taken out of the cold rows: the
    predicted bias b̂ (h·v̂ alone) or the rows' length (h·v̂/‖v̂‖): whether the content-predicted
    popularity and norm help the ranking. A diagnostic, never served (dropping b is a known fault)."""
    table = ItemTable(result.model, result.data)
    rows = table.items.copy()  # (I, D+1)
    out: dict[str, float] = {}
    table.items = np.concatenate([rows[:, :-1], np.zeros((len(rows), 1), rows.dtype)], axis=1)
    out["no_bias"] = round(evaluate(table, cold_only(split))["recall@20"], 4)
    unit = rows[:, :-1] / np.maximum(np.linalg.norm(rows[:, :-1], axis=1, keepdims=True), 1e-12)
    table.items = np.concatenate([unit, np.zeros((len(rows), 1), rows.dtype)], axis=1)
    out["cosine"] = round(evaluate(table, cold_only(split))["recall@20"], 4)
    return out


def gate_spread(result: TrainResult, split: ColdStartSplit, n_users: int = 256) -> dict[str, float]:
    """The modality-level gate (share of the attribute view) over the test-cold items: its spread
    across items under the neutral user (what the index stores) and across the first `n_users` users
    for each of 64 items (the personalised gate): a gate stuck at 0.5 everywhere does nothing."""
    model, data = result.model, result.data
    items = split.cold_items
    with torch.no_grad():
        x = data.inputs(items)
        neutral = model.embed_items(x)[1]["attributes"]  # (n,)
        users = user_vectors(model, data)[:n_users]  # (U, D)
        few = data.inputs(items[:64])
        per_user = torch.stack([model.embed_items(few, user.expand(len(few.attributes), -1))[1]["attributes"]
                                for user in users[:, None]])  # (U, 64)
    return {"neutral_mean": round(neutral.mean().item(), 4), "neutral_std_items": round(neutral.std().item(), 4),
            "user_std_per_item": round(per_user.std(dim=0).mean().item(), 4)}


class PersonalisedTable(ItemTable):
    """The served scores, then each user's best `top` non-warm candidates re-scored with rows from
    the generator under that user's own gate (M2VAE's personalised MoE) instead of the neutral one:
    the re-ranking DESIGN.md offers on top of the index."""

    def __init__(self, result: TrainResult, top: int = 50, personal: bool = True) -> None:
        super().__init__(result.model, result.data)
        self.model, self.data, self.top, self.personal = result.model, result.data, top, personal
        self.warm = np.zeros(len(self.items), dtype=bool)
        self.warm[result.data.warm] = True

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        scores = super().score(users, candidates)  # (B, C)
        new = candidates[~self.warm[candidates]]
        if not len(new):
            return scores
        col = {int(c): j for j, c in enumerate(candidates.tolist())}
        floor = scores.min() - 1.0
        with torch.no_grad():
            for b, u in enumerate(users.tolist()):
                top = new[np.argsort(-scores[b, [col[int(c)] for c in new]], kind="stable")[: self.top]]
                h = torch.from_numpy(self.users[u])  # (D,)
                gate_user = h.expand(len(top), -1) if self.personal else None  # None: the neutral gate
                rows = self.model.embed_items(self.data.inputs(top), gate_user)[0].numpy()
                personal = rows[:, :-1] @ self.users[u] + rows[:, -1]  # (top,)
                cols = [col[int(c)] for c in top]
                others = np.ones(len(candidates), dtype=bool)
                others[cols] = False
                others &= ~self.warm[candidates]
                scores[b, others] = floor  # below every re-ranked one
                scores[b, cols] = personal - personal.min() + floor + 1.0
        return scores


def diagnostics(result: TrainResult, dataset: Dataset, split: ColdStartSplit) -> dict[str, Any]:
    return {
        "ridge_on_v": ridge_on_v(result, dataset, split),
        "surrogate_fold_in": surrogate_fold_in(result, split),
        "score_parts": score_parts(result, split),
        # the neutral re-rank must reproduce the cold-only figures (same rows): a check of the re-ranker
        **{f"rerank_top50_{kind}": {
            key: round(value, 4) for key, value in evaluate(PersonalisedTable(result, personal=kind == "personal"),
                                                            cold_only(split)).items()
            if key in ("recall@20", "ndcg@20")} for kind in ("neutral", "personal")},
    }


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    defaults = TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in names:
            raise SystemExit(f"unknown TrainConfig field {key!r}")
        default = getattr(defaults, key)
        out[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default=None, help="start from a harness variant (training/presets.py)")
    parser.add_argument("--quick", action="store_true", help="only the metrics and the gate's spread")
    parser.add_argument("overrides", nargs="*", help="TrainConfig field=value")
    args = parser.parse_args(argv)
    if args.variant is not None and args.variant not in PRESETS:
        raise SystemExit(f"unknown --variant {args.variant!r}; known: {', '.join(sorted(PRESETS))}")
    overrides = {**(PRESETS[args.variant] if args.variant else {}), **parse_overrides(args.overrides)}
    dataset = load_dataset(args.dataset)
    split = cold_start_split(dataset, args.seed)
    cfg = dataclasses.replace(TrainConfig(seed=args.seed, progress=False), **overrides)
    start = time.perf_counter()
    result = train(dataset, split, cfg)
    table = ItemTable(result.model, result.data)
    cold, every = evaluate(table, cold_only(split)), evaluate(table, all_items(split))
    generated = generated_rows(result.model, result.data, result.data.warm)  # (J, D+1)
    trained = result.model.item_rows().detach()  # (J, D+1)
    print(json.dumps({
        "dataset": dataset.name, "seed": args.seed, "overrides": overrides,
        "seconds": round(time.perf_counter() - start), "best_epoch": result.best_epoch,
        "val_recall@20": round(result.best_val.get("recall@20", 0.0), 4),
        "cold_only_recall@20": round(cold["recall@20"], 4), "cold_only_ndcg@20": round(cold["ndcg@20"], 4),
        "all_items_recall@20": round(every["recall@20"], 4),
        "cold_share@20": round(every.get("cold_share@20", 0.0), 3),
        "cosine_generated_trained": round(torch.cosine_similarity(generated, trained, dim=1).mean().item(), 3),
        "norm_ratio": round((generated.norm(dim=1).mean() / trained.norm(dim=1).mean()).item(), 3),
        "modality_gate": gate_spread(result, split),
        **({} if args.quick else diagnostics(result, dataset, split)),
        "val_curve": [round(h["val_recall@20"], 3) for h in result.history if "val_recall@20" in h],
    }))


if __name__ == "__main__":
    main()
