"""Train m2rec: EM-like alternation of the user auto-encoder (b-step) and the item generator (t-step),
training/steps.py.

Model selection: Recall@20 + NDCG@20 on the hybrid validation task (pseudo-cold items and a warm
holdout carved from the training data), under the mixing policy chosen there; never test data.

    python -m training.train --dataset data/citeulike-t --out artifacts/ [--preset NAME] [--flag value ...]

trains the shipped model (the TrainConfig defaults) for production: a validation run, then a refit on
every interaction from its weights (`train_production`), exported as a new artifact version.

    torchrun --nproc_per_node N -m training.train --dataset ... --out ...

runs the same training data parallel over N processes (training/distributed.py): users split in the
b-step, items in the t-step, gradients all-reduced by DDP; rank 0 validates and exports.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from service.model import M2Rec, ModelConfig
from service.model.generator import M2VAEGenerator
from service.model.mixing import RAW, Policy
from training import distributed, machine
from training.baselines import fit_als
from training.collaborative_fit import build, fit_with_blend
from training.dataset import Dataset, fingerprint, load_dataset
from training.export import export_artifact
from training.item_rows import ItemTable, all_item_rows, generated_rows
from training.linear_fit import LinearFit
from training.mixing import Tops, choose_policy
from training.presets import PRESETS
from training.protocol import Task, evaluate_tops, hybrid, tops, tops_many, warm_only
from training.split import ColdStartSplit, production_split, validation_split
from training.steps import GeneratorStep, UserStep, b_step, t_step
from training.train_config import TrainConfig as TrainConfig
from training.train_data import TrainingData, prepare
from training.warm_start import warm_start

log = logging.getLogger("m2rec.train")


@dataclass
class TrainResult:
    model: M2Rec
    data: TrainingData
    config: TrainConfig
    best_epoch: int
    best_val: dict[str, float]
    policy: Policy  # how new items mix with trained ones, chosen on validation
    history: list[dict[str, float]]
    collaborative: dict[str, Any] = field(default_factory=dict)  # what validation chose for the part


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    torch.set_num_threads(distributed.threads_per_process())
    torch.use_deterministic_algorithms(True)
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class Validation:
    score: float  # what early stopping maximises: Recall@20 + NDCG@20 under `policy`
    metrics: dict[str, float]
    policy: Policy


def validate(model: M2Rec, data: TrainingData, split: ColdStartSplit) -> Validation:
    """The hybrid validation task (pseudo-cold items and the warm holdout) under the policy that
    mixes them best; without validation items (a production refit), the warm holdout alone."""
    table = ItemTable(model, data)
    if split.val_items.size == 0:
        task = warm_only(split, validation=True)
        return _validation(tops(table, task), task, RAW)
    task = hybrid(split, validation=True)
    return _validation(tops(table, task), task)


def _validation(t: Tops, task: Task, policy: Policy | None = None) -> Validation:
    """The figures of a validation task's tops under `policy` (default: the best one for them)."""
    if policy is None:
        policy, _ = choose_policy(t)
    metrics = evaluate_tops(t, policy, task.mixed).metrics
    return Validation(metrics.get("recall@20", 0.0) + metrics.get("ndcg@20", 0.0), metrics, policy)


def train(dataset: Dataset, split: ColdStartSplit, cfg: TrainConfig, init: TrainResult | None = None,
          batches_per_pass: int | None = None) -> TrainResult:
    """Train with fixed seeds (from `init`'s weights when given: a refit); the process-wide torch
    settings are restored afterwards. `batches_per_pass` stops every b-step and t-step pass after
    that many batches of this process: a partial epoch, to time training at sizes where a whole
    one takes hours (benchmarks/ddp_scaling.py); None trains on everything."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        return _train(dataset, split, cfg, init, batches_per_pass)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _train(dataset: Dataset, split: ColdStartSplit, cfg: TrainConfig, init: TrainResult | None,
           batches_per_pass: int | None) -> TrainResult:
    rng = seed_everything(cfg.seed)
    data = prepare(dataset, split)
    model = M2Rec(cfg.model_config(data.warm.size, len(data.vocabulary), data.content_dim))
    if init is not None:
        warm_start(model, data, init.model, init.data)
    opt_user = torch.optim.Adam(model.user.parameters(), lr=cfg.lr_user, foreach=True)
    opt_gen = torch.optim.AdamW(model.generator.parameters(), lr=cfg.lr_gen, weight_decay=cfg.wd_gen, foreach=True)
    gen = model.generator
    held_out = cfg.linear_held_out or cfg.generated_likelihood > 0
    linear = LinearFit(data, gen.linear, cfg.linear_ridge, held_out) \
        if isinstance(gen, M2VAEGenerator) and gen.linear is not None else None
    patterns = linear.path.patterns(data.inputs(data.warm)) \
        if linear is not None and cfg.generated_likelihood > 0 else None  # (J,) warm items' modality patterns
    user_step: nn.Module = UserStep(model.user, cfg)
    gen_step: nn.Module = GeneratorStep(model.generator, cfg, data.content is not None)
    parallel = distributed.active()
    users_order = items_order = None
    batch_users, batch_items = cfg.batch_users, cfg.batch_items
    if parallel:
        # DDP starts every replica from rank 0's weights and averages each step's gradients. The
        # buffers (the ridge map, the neutral user) are not DDP's to sync: each is computed once
        # per step for every rank (LinearFit.refit_shared, the all-gathered user vectors).
        user_step = DistributedDataParallel(user_step, forward_sync_buffers=False)
        # a batch may leave a generator branch unused on one rank (no ranking user, no content)
        gen_step = DistributedDataParallel(gen_step, forward_sync_buffers=False, find_unused_parameters=True)
        # the configured batches stay the global ones, split over the ranks: the same updates per
        # epoch, each over as many users (items) as one process took
        world = distributed.world_size()
        batch_users, batch_items = -(-cfg.batch_users // world), -(-cfg.batch_items // world)
        users_order = distributed.ShardedOrder(data.train_users, cfg.seed)
        items_order = distributed.ShardedOrder(data.trained_rows, cfg.seed)
        # the model is built alike everywhere (same seed); the noise of each rank's draws is its own
        rng = distributed.rank_rng(cfg.seed)
        torch.manual_seed(cfg.seed + 7919 * distributed.rank())
    shard_users = data.train_users.size if users_order is None else len(users_order)
    batches = -(-shard_users // batch_users)
    b_passes = max(cfg.b_passes, -(-cfg.b_min_steps // batches))
    steps_per_epoch = b_passes * batches
    step, best_epoch, best = 0, -1, None
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc=f"train {dataset.name}", unit="epoch",
               disable=not cfg.progress or not distributed.is_main())
    started = time.perf_counter()
    for epoch in bar:
        t0 = time.perf_counter()
        shift = linear.held_out_shift(patterns) if linear is not None and patterns is not None else None
        # the generator is unchanged until the t-step; every warm row, split over the ranks
        target = distributed.gather_rows(lambda rows: generated_rows(model, data, data.warm[rows]), data.warm.size)
        t_b = time.perf_counter()
        for p in range(b_passes):
            order = users_order(epoch * b_passes + p) if users_order is not None else None
            if batches_per_pass is not None:  # the same draws b_step makes, cut short
                users = rng.permutation(data.train_users) if order is None else order
                order = users[: batches_per_pass * batch_users]
            b_parts, step = b_step(user_step, data, opt_user, cfg, rng, step, steps_per_epoch, target, shift,
                                   order, batch_users)
        t_t = time.perf_counter()
        t_clock: dict[str, float] = {}
        for p in range(cfg.t_passes):
            order = items_order(epoch * cfg.t_passes + p) if items_order is not None else None
            if batches_per_pass is not None:
                rows = rng.permutation(data.trained_rows) if order is None else order
                order = rows[: batches_per_pass * batch_items]
            t_parts = t_step(gen_step, model, data, opt_gen, cfg, rng, linear, order, batch_items, t_clock)
        row: dict[str, float] = {"epoch": epoch, **distributed.mean_over_ranks({**b_parts, **t_parts}),
                                 "b_step_seconds": t_t - t_b, "t_step_seconds": time.perf_counter() - t_t,
                                 "t_batches_seconds": t_clock.get("batches_seconds", 0.0)}
        stop = False
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
            improved = False
            t_val = time.perf_counter()
            if distributed.is_main():  # the others wait for the decision: every rank stops at the same epoch
                val = validate(model, data, split)
                row["val_recall@20"] = val.metrics.get("recall@20", 0.0)
                row["val_ndcg@20"] = val.metrics.get("ndcg@20", 0.0)
                improved = best is None or val.score > best.score
                if improved:
                    best = val
            if distributed.broadcast_object(improved):
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
            stop = epoch - best_epoch >= cfg.patience * cfg.eval_every
            row["eval_seconds"] = time.perf_counter() - t_val
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k.startswith("val") or k == "nll"})
        elapsed = time.perf_counter() - started
        eta = elapsed / (epoch + 1) * (cfg.epochs - epoch - 1)  # logs are read where no bar is drawn
        log.info("epoch %d/%d (%.0f s, eta at most %.0f s) %s", epoch + 1, cfg.epochs, elapsed, eta,
                 json.dumps({k: round(v, 4) for k, v in row.items()}))
        if stop:
            break
    best = distributed.broadcast_object(best)
    assert best is not None  # the last epoch is always validated
    model.load_state_dict(best_state)
    model.eval()
    if split.val_items.size:
        chosen = tune_new_bias(model, data, split, cfg.new_bias_weights) if distributed.is_main() else None
        best = distributed.broadcast_object(chosen)
        assert best is not None
        if parallel:
            model.new_bias_weight.fill_(best.metrics["new_bias_weight"])
    if parallel:
        log.info("model replicas agree across %d ranks (sha256 %s)", distributed.world_size(),
                 distributed.check_same_state(model.state_dict())[:16])
    return TrainResult(model, data, cfg, best_epoch, best.metrics, best.policy, history)


def tune_new_bias(model: M2Rec, data: TrainingData, split: ColdStartSplit, weights: tuple[float, ...]
                  ) -> Validation:
    """Set `M2Rec.new_bias_weight` to the weight whose hybrid validation (with its own best policy) is
    best, and return that validation."""
    biases = []
    for weight in weights:  # the weight scales the generated rows' bias column, nothing else
        model.new_bias_weight.fill_(weight)
        biases.append(all_item_rows(model, data)[:, -1].numpy())
    table, task = ItemTable(model, data), hybrid(split, validation=True)
    every = tops_many(lambda users: table.scores(users, task.candidates, task.history,
                                                 [b[task.candidates] for b in biases]),
                      len(weights), task, table.name)
    results = [(_validation(t, task), weight) for t, weight in zip(every, weights, strict=True)]
    best, weight = max(results, key=lambda r: r[0].score)
    model.new_bias_weight.fill_(weight)
    log.info("new items' bias weight %.2f (validation %s)", weight,
             ", ".join(f"{w}: {v.score:.4f}" for v, w in results))
    return Validation(best.score, {**best.metrics, "new_bias_weight": weight}, best.policy)


def save_checkpoint(result: TrainResult, dataset: Dataset, out: Path) -> Path:
    """config.json (model + training config, warm ids, vocabulary) and model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_config": result.model.config.to_dict(),
        "train_config": asdict(result.config),
        "warm_item_ids": [dataset.item_ids[j] for j in result.data.warm],
        "attribute_vocabulary": result.data.vocabulary.tokens,
        "content_dim": result.data.content_dim,
        "best_epoch": result.best_epoch,
        "validation": result.best_val,
    }
    (out / "config.json").write_text(json.dumps(meta))
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return out


def load_checkpoint(path: Path) -> tuple[M2Rec, dict[str, Any]]:
    meta = json.loads((path / "config.json").read_text())
    model = M2Rec(ModelConfig(**meta["model_config"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    return model, meta


def train_production(dataset: Dataset, cfg: TrainConfig) -> tuple[TrainResult, TrainResult]:
    """(validation run, production model). The validation run trains on everything but a carve-out
    (pseudo-cold items and a per-user warm holdout, training/split.py) and chooses the epoch and the
    mixing policy there; the production model then continues from it on every interaction, so that
    every item with interactions gets a trained row, stopping on a slice of interactions that neither
    run trains on. With `cfg.collaborative` the production model gets the collaborative part
    (`attach_collaborative`)."""
    carve = validation_split(dataset, cfg.seed)
    first = train(dataset, carve, cfg)
    log.info("validation run: best epoch %d, %s, policy %s", first.best_epoch, json.dumps(first.best_val),
             first.policy.to_dict())
    refit = replace(cfg, epochs=cfg.refit_epochs, eval_every=1, patience=cfg.refit_patience)
    # stopped on half of the validation run's warm holdout, which neither run trains on
    production = production_split(dataset, cfg.seed, carve.val_warm_truth)
    final = train(dataset, production, refit, init=first)
    final.model.new_bias_weight.copy_(first.model.new_bias_weight)
    final = replace(final, policy=first.policy)
    if cfg.collaborative and distributed.is_main():  # rank 0 alone exports: the part is fitted there
        first, final = attach_collaborative(dataset, carve, first, production, final)
    return first, final


def attach_collaborative(dataset: Dataset, carve: ColdStartSplit, first: TrainResult, production: ColdStartSplit,
                         final: TrainResult) -> tuple[TrainResult, TrainResult]:
    """The collaborative part beside both runs' m2rec. On the validation run's split: the calibrated
    blend's search chooses ALS's and the ridge map's settings, then m2rec's weights (w for trained
    items, w_new for new ones) and the mixing policy are chosen for the combination. The production
    part: ALS refitted with those settings on the production run's interactions, the ridge map onto
    its factors, the weights and the policy from validation."""
    joint, blend = fit_with_blend(dataset, carve, first.model, first.data, first.config.seed)
    assert joint.policy is not None and blend.als is not None
    weight, new_weight, policy = float(joint.part.weight), float(joint.part.new_weight), joint.policy
    log.info("collaborative part: ALS %s; m2rec's weight %.2f (new items %.2f), policy %s "
             "(validation R@20+N@20 by (w, w_new) %s)",
             json.dumps({k: blend.params[k] for k in ("factors", "regularization", "alpha", "ridge",
                                                       "attribute_weight")}),
             weight, new_weight, policy.to_dict(), joint.trace)
    first.model.attach(joint.part)
    p = blend.params
    als = fit_als(production.train, int(p["factors"]), float(p["regularization"]), float(p["alpha"]),
                  blend.als.iterations, first.config.seed)
    served = build(dataset, final.data, all_item_rows(final.model, final.data).numpy(), als.item_factors, p)
    with torch.no_grad():
        served.weight.fill_(weight)
        served.new_weight.fill_(new_weight)
    served.refresh()
    final.model.attach(served)
    chosen = {"m2rec_weight": weight, "m2rec_new_weight": new_weight, "policy": policy.to_dict(), "blend": blend.params,
              "val_r20_plus_n20": joint.trace}
    return replace(first, policy=policy, collaborative=chosen), replace(final, policy=policy, collaborative=chosen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path,
                        help="artifact root: the model is exported as a new version and `current` points at it")
    parser.add_argument("--preset", default=None,
                        help="start from a named experiment's settings (training/presets.py) instead of the "
                             "shipped model's defaults; flags given as well override them")
    chosen = parser.parse_known_args(argv)[0].preset
    if chosen is not None and chosen not in PRESETS:
        parser.error(f"unknown --preset {chosen!r}; known: {', '.join(sorted(PRESETS))}")
    defaults = replace(TrainConfig(), **PRESETS[chosen]) if chosen is not None else TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=lambda s: tuple(float(x) for x in s.split(",")), default=value,
                                help="comma-separated numbers")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    distributed.init_from_env()
    try:
        _main(args, chosen)
    finally:
        distributed.shutdown()


def _main(args: argparse.Namespace, chosen: str | None) -> None:
    # under torchrun every rank trains; rank 0 alone tells the story and writes the artifact
    rank = distributed.rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {f'[rank {rank}] ' if distributed.launched() else ''}%(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    dataset = load_dataset(args.dataset)
    log.info("training on %s", machine.describe())
    t0 = time.perf_counter()
    first, final = train_production(dataset, cfg)
    seconds = time.perf_counter() - t0
    metrics = {
        "dataset": dataset.name,
        "seed": cfg.seed,
        "preset": chosen or "defaults",
        "train_seconds": round(seconds, 1),
        "machine": machine.describe(),  # train_seconds compare only beside the CPU they ran on
        "processes": distributed.world_size(),
        "validation": {"best_epoch": first.best_epoch, "hybrid": first.best_val, "policy": first.policy.to_dict()},
        "refit": {"best_epoch": final.best_epoch, "held_out_slice": final.best_val},
        "collaborative": final.collaborative,
    }
    log.info("trained in %.0f s (validation run, then the refit on every interaction: best epoch %d, held-out "
             "slice %s)", seconds, final.best_epoch, json.dumps(final.best_val))
    if distributed.is_main():
        print(export_artifact(final, dataset, fingerprint(args.dataset), args.out, metrics))


if __name__ == "__main__":
    main()
