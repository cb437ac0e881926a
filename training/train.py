"""Train m2rec: EM-like alternation of the user auto-encoder (b-step) and the item generator (t-step).

    b-step  Multi-VAE on the training histories; the item table [V; b] is pulled towards the
            generator's current output Ê for the warm items (Ê fixed during the step)
    t-step  the generator learns to produce [V_j; b_j] (fixed) from item j's attributes and content,
            plus M2VAE's own losses (disentangling, co-occurrence, BPR)

Model selection: Recall@20 + NDCG@20 on the hybrid validation task (pseudo-cold items and a warm
holdout carved from the training data), under the mixing policy chosen there; never test data.

    python -m training.train --dataset data/citeulike-t --out artifacts/ [--preset NAME] [--flag value ...]

trains the shipped model (the TrainConfig defaults) for production: a validation run, then a refit on
every interaction from its weights (`train_production`), exported as a new artifact version.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from service.model import M2Rec, ModelConfig
from service.model.generator import Gaussian, M2VAEGenerator
from service.model.mixing import RAW, Policy
from training import losses
from training.dataset import Dataset, fingerprint, load_dataset
from training.export import export_artifact
from training.input_dropout import feature_dropout, modality_dropout
from training.item_rows import ItemTable, generated_rows, user_vectors
from training.linear_fit import LinearFit
from training.mixing import choose_policy
from training.presets import PRESETS
from training.protocol import evaluate_tops, hybrid, tops, warm_only
from training.split import ColdStartSplit, production_split, validation_split
from training.train_data import TrainingData, prepare
from training.warm_start import warm_start

log = logging.getLogger("m2rec.train")


@dataclass
class TrainConfig:
    """The defaults ARE the shipped model (training/presets.py names the experiments and ablations)."""

    seed: int = 0
    epochs: int = 30
    eval_every: int = 3
    patience: int = 3  # stop after this many validations without improvement
    # production refit on every interaction, from the validation run's weights (train_production)
    refit_epochs: int = 6
    refit_patience: int = 2
    # weights of a new item's generated bias tried on validation after training (M2Rec.new_bias_weight)
    new_bias_weights: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
    # model sizes and switches (ModelConfig)
    item_dim: int = 128
    user_latent: int = 128
    user_hidden: int = 0
    gen_hidden: int = 128
    gen_latent: int = 64
    generator: str = "m2vae"
    common_view: bool = True
    moe: bool = True
    gate_temperature: float = 1.0
    gate_norm: bool = True  # modality gate on RMS-normalised factors (ModelConfig.gate_norm)
    linear_path: bool = True  # M2VAE: ridge path + decoder residual (service/model/linear_path.py)
    linear_residual: float = 1.0  # scale of the decoder's residual on the linear path (0 = ridge row alone)
    linear_attribute_weight: float = 1.0
    linear_ridge: float = 2.0  # ridge strength of the closed-form fit (chosen on validation, model-tuning.md)
    decoder_features: bool = True  # M2VAE decoder F([z; a; c]); False: F(z)
    linear_held_out: bool = False  # t-step: the decoder's residual is taken on leave-one-out ridge rows
    # b-step (Multi-VAE)
    batch_users: int = 128
    lr_user: float = 3e-3
    b_passes: int = 1  # b-step passes over the users per epoch, at least
    # ...and at least this many b-step updates per epoch: a small user base (ml-100k: 8 batches a pass)
    # otherwise leaves V under-trained against the generator (benchmarks/results/model-tuning.md, round 3)
    b_min_steps: int = 32
    input_dropout: float = 0.5
    beta_cap: float = 0.2
    anneal_epochs: float = 10.0  # β reaches its cap after this many epochs
    lambda_v: float = 10.0
    # b-step: the user's items also scored by their generated rows Ê (the cold-start scoring), weight (0 = off)
    generated_likelihood: float = 1.0
    # t-step (generator)
    batch_items: int = 256
    lr_gen: float = 1e-3
    t_passes: int = 1  # generator passes over the warm items per epoch
    wd_gen: float = 0.0  # decoupled weight decay of the generator (AdamW)
    feature_dropout: float = 0.3  # t-step augmentation: drop attribute tokens and content entries
    gen_kl: float = 0.1
    recon_weight: float = 30.0
    bpr_weight: float = 1.0
    id_dropout: float = 0.5
    modality_dropout: float = 0.15
    rank_weight: float = 1.0  # in-batch user-centric ranking of generated rows (0 = off)
    rank_users: int = 256
    surrogate_weight: float = 1.0  # rank each generated row among every trained warm row (0 = off)
    # the t-step's users folded in without the batch's items, as a user meets a new item (False: leaky)
    leave_out: bool = False
    neutral_gate: float = 0.0  # share of t-step items gated by the neutral user instead of the positive one
    gate_balance: float = 0.0  # weight of the modality gate's balance over a batch (0 = off; losses.gate_balance)
    disentangle: bool = True
    alpha_disentangle: float = 0.1
    tau_disentangle: float = 0.2
    cooccurrence: bool = True
    beta_co: float = 0.5
    tau_co: float = 0.2
    co_positives: int = 5
    co_negatives: int = 40
    bpr: bool = True
    progress: bool = True

    def model_config(self, n_warm: int, n_attributes: int, content_dim: int) -> ModelConfig:
        names = {f.name for f in fields(ModelConfig)}
        shared = {k: v for k, v in asdict(self).items() if k in names}
        shared["linear_path"] = self.linear_path and self.generator == "m2vae"
        return ModelConfig(n_warm=n_warm, n_attributes=n_attributes, content_dim=content_dim, **shared)


@dataclass
class TrainResult:
    model: M2Rec
    data: TrainingData
    config: TrainConfig
    best_epoch: int
    best_val: dict[str, float]
    policy: Policy  # how new items mix with trained ones, chosen on validation
    history: list[dict[str, float]]


def b_step(model: M2Rec, data: TrainingData, opt: torch.optim.Optimizer, cfg: TrainConfig,
           rng: np.random.Generator, step: int, steps_per_epoch: int, target: torch.Tensor,
           held_out_shift: torch.Tensor | None = None) -> tuple[dict[str, float], int]:
    """One pass over the users; `target` is Ê (J, D+1), the generator's rows, fixed for the step."""
    # the rows the user side is scored by: a trained item's row as if it were new (leave-one-out
    # linear part), else the user side would learn from in-sample fits no cold item gets
    as_new = target + held_out_shift if held_out_shift is not None else target
    users = rng.permutation(data.train_users)
    sums: dict[str, float] = {}
    for start in range(0, users.size, cfg.batch_users):
        batch = users[start : start + cfg.batch_users]
        items, offsets, lengths = data.flat_histories(batch)
        keep = None
        if cfg.input_dropout > 0:
            keep = torch.from_numpy((rng.random(items.numel()) >= cfg.input_dropout).astype(np.float32))
            keep = keep / (1.0 - cfg.input_dropout)
        mu, logvar = model.user.encode_sparse(items, offsets, lengths, keep)
        u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        h = model.user.decode(u)  # (B, D)
        logits = model.user.logits(h)  # (B, J)
        rows_in_batch = torch.repeat_interleave(torch.arange(batch.size), lengths)
        beta = min(cfg.beta_cap, cfg.beta_cap * step / max(1.0, cfg.anneal_epochs * steps_per_epoch))
        parts = {
            "nll": losses.multinomial_nll(logits, rows_in_batch, items),
            "kl_u": beta * losses.kl_standard_normal(Gaussian(mu, logvar)),
            "pull": losses.pull_to_generated(model.item_rows(), target, cfg.lambda_v),
        }
        if cfg.generated_likelihood > 0:  # the same items scored as cold items are: by Ê
            parts["nll_gen"] = cfg.generated_likelihood * losses.generated_row_nll(h, as_new, rows_in_batch, items)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * batch.size / users.size
    return sums, step


def t_step(model: M2Rec, data: TrainingData, opt: torch.optim.Optimizer, cfg: TrainConfig,
           rng: np.random.Generator, linear: LinearFit | None = None) -> dict[str, float]:
    targets = model.item_rows().detach()  # (J, D+1): [V_j; b_j] fixed for the step
    if linear is not None:  # the ridge path follows V in closed form; the decoder learns the residual
        linear.refit(targets)
        if cfg.linear_residual == 0:  # the row is the ridge row alone: nothing of the generator is served
            return {}
    h_all = user_vectors(model, data)  # (U, D) detached user vectors for gating and BPR
    model.set_neutral_user(h_all[torch.from_numpy(data.train_users)].mean(dim=0))
    # rows whose every interaction was held out have no user to learn from (their row follows Ê)
    rows = rng.permutation(data.trained_rows)
    sums: dict[str, float] = {}
    for start in range(0, rows.size, cfg.batch_items):
        r = rows[start : start + cfg.batch_items]
        x = data.inputs(data.warm[r])
        modality_dropout(x, cfg.modality_dropout, rng)
        feature_dropout(x, cfg.feature_dropout, rng)
        target = targets[torch.from_numpy(r)]  # (B, D+1)
        pos_users = data.sample_users_of(r, rng)
        neg_users = rng.choice(data.train_users, size=r.size)
        id_drop = torch.from_numpy(rng.random(r.size) < cfg.id_dropout)
        h_pos = (leave_out_vectors(model, data, pos_users, r) if cfg.leave_out
                 else h_all[torch.from_numpy(pos_users)])  # (B, D)
        # Serving gates with the neutral user: train that gate too, not only the positive user's.
        neutral = torch.from_numpy(rng.random(r.size) < cfg.neutral_gate)[:, None]
        gate_user = torch.where(neutral, model.generator.neutral_user.expand_as(h_pos), h_pos)
        held_out = None
        if linear is not None and cfg.linear_held_out:
            assert isinstance(model.generator, M2VAEGenerator) and model.generator.linear is not None
            held_out = linear.held_out(r, model.generator.linear.patterns(x))
        out = model.generator.forward_train(x, target, gate_user, id_drop, held_out)
        if cfg.generator == "content-vae":
            parts = losses.content_vae_elbo(out, x.content if data.content is not None else None,
                                            x.attributes, target, cfg.lambda_v, cfg.gen_kl)
        else:
            parts = losses.m2vae_elbo(out, target, cfg.gen_kl)
            parts["recon"] = cfg.recon_weight * parts["recon"]
            if cfg.bpr:
                h_neg = h_all[torch.from_numpy(neg_users)]
                parts["bpr"] = cfg.bpr_weight * losses.bpr_loss(out.serving_rows, h_pos, h_neg)
            if cfg.gate_balance > 0 and cfg.moe:
                parts["balance"] = cfg.gate_balance * losses.gate_balance(out.gates["attributes"], x)
            if cfg.disentangle and cfg.common_view:
                parts["dis"] = cfg.alpha_disentangle * losses.disentangle_loss(out, cfg.tau_disentangle)
            if cfg.cooccurrence:
                pos = data.sample_history_rows(pos_users, cfg.co_positives, rng)  # (B, P)
                neg = rng.integers(0, data.warm.size, size=(r.size, cfg.co_negatives))  # (B, N)
                parts["co"] = cfg.beta_co * losses.cooccurrence_loss(
                    out.serving_rows, targets[torch.from_numpy(pos)], targets[torch.from_numpy(neg)], cfg.tau_co)
        ranking = cfg.generator == "m2vae" and (cfg.rank_weight > 0 or cfg.surrogate_weight > 0)
        if ranking:  # the content VAE stays the paper's model
            # The task itself, for users who took an item of the batch (every softmax has a positive):
            # rank the batch's generated rows against each other (cold-only) and, as MDsym's
            # surrogate rows, against the trained rows of every other warm item (new among warm).
            users = np.unique(pos_users)[: cfg.rank_users]
            hits = torch.from_numpy(data.history[users][:, r].toarray())  # (U, B)
            keep = hits.sum(dim=1) > 0
            h_rank = (leave_out_vectors(model, data, users, r) if cfg.leave_out
                      else h_all[torch.from_numpy(users)])[keep]
            if keep.any() and cfg.rank_weight > 0:
                parts["rank"] = cfg.rank_weight * losses.in_batch_ranking_loss(
                    out.serving_rows, h_rank, hits[keep])
            if keep.any() and cfg.surrogate_weight > 0:
                parts["surrogate"] = cfg.surrogate_weight * losses.surrogate_ranking_loss(
                    out.serving_rows, torch.from_numpy(r), targets, h_rank, hits[keep])
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * r.size / rows.size
    return sums


@torch.no_grad()
def leave_out_vectors(model: M2Rec, data: TrainingData, users: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """h (U, D) of `users` folded in from their training histories without the warm `rows`: how a
    user stands towards an item they have not met yet (a new item is never in the history)."""
    items, offsets, lengths = data.flat_histories(users)
    keep = ~np.isin(items.numpy(), rows)
    owner = np.repeat(np.arange(users.size), lengths.numpy())[keep]
    lengths = torch.from_numpy(np.bincount(owner, minlength=users.size).astype(np.int64))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    mu, _ = model.user.encode_sparse(items[torch.from_numpy(keep)], offsets, lengths, None)
    return model.user.decode(mu)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    if "OMP_NUM_THREADS" not in os.environ:  # the environment decides (one per process when they share cores)
        torch.set_num_threads(2)
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
    policy: Policy
    if split.val_items.size == 0:
        task, policy = warm_only(split, validation=True), RAW
        t = tops(table, task)
    else:
        task = hybrid(split, validation=True)
        t = tops(table, task)
        policy, _ = choose_policy(t)
    metrics = evaluate_tops(t, policy, task.mixed).metrics
    return Validation(metrics.get("recall@20", 0.0) + metrics.get("ndcg@20", 0.0), metrics, policy)


def train(dataset: Dataset, split: ColdStartSplit, cfg: TrainConfig, init: TrainResult | None = None
          ) -> TrainResult:
    """Train with fixed seeds (from `init`'s weights when given: a refit); the process-wide torch
    settings are restored afterwards."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        return _train(dataset, split, cfg, init)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _train(dataset: Dataset, split: ColdStartSplit, cfg: TrainConfig, init: TrainResult | None) -> TrainResult:
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
    batches = -(-data.train_users.size // cfg.batch_users)
    b_passes = max(cfg.b_passes, -(-cfg.b_min_steps // batches))
    steps_per_epoch = b_passes * batches
    step, best_epoch, best = 0, -1, None
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.epochs), desc=f"train {dataset.name}", unit="epoch", disable=not cfg.progress)
    started = time.perf_counter()
    for epoch in bar:
        t0 = time.perf_counter()
        shift = linear.held_out_shift(patterns) if linear is not None and patterns is not None else None
        target = generated_rows(model, data, data.warm)  # the generator is unchanged until the t-step
        for _ in range(b_passes):
            b_parts, step = b_step(model, data, opt_user, cfg, rng, step, steps_per_epoch, target, shift)
        for _ in range(cfg.t_passes):
            t_parts = t_step(model, data, opt_gen, cfg, rng, linear)
        row: dict[str, float] = {"epoch": epoch, **b_parts, **t_parts}
        stop = False
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
            val = validate(model, data, split)
            row["val_recall@20"] = val.metrics.get("recall@20", 0.0)
            row["val_ndcg@20"] = val.metrics.get("ndcg@20", 0.0)
            if best is None or val.score > best.score:
                best, best_epoch = val, epoch
                best_state = copy.deepcopy(model.state_dict())
            stop = epoch - best_epoch >= cfg.patience * cfg.eval_every
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k.startswith("val") or k == "nll"})
        elapsed = time.perf_counter() - started
        eta = elapsed / (epoch + 1) * (cfg.epochs - epoch - 1)  # logs are read where no bar is drawn
        log.info("epoch %d/%d (%.0f s, eta at most %.0f s) %s", epoch + 1, cfg.epochs, elapsed, eta,
                 json.dumps({k: round(v, 4) for k, v in row.items()}))
        if stop:
            break
    assert best is not None  # the last epoch is always validated
    model.load_state_dict(best_state)
    model.eval()
    if split.val_items.size:
        best = tune_new_bias(model, data, split, cfg.new_bias_weights)
    return TrainResult(model, data, cfg, best_epoch, best.metrics, best.policy, history)


def tune_new_bias(model: M2Rec, data: TrainingData, split: ColdStartSplit, weights: tuple[float, ...]
                  ) -> Validation:
    """Set `M2Rec.new_bias_weight` to the weight whose hybrid validation (with its own best policy) is
    best, and return that validation."""
    results = []
    for weight in weights:
        model.new_bias_weight.fill_(weight)
        results.append((validate(model, data, split), weight))
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
    run trains on."""
    carve = validation_split(dataset, cfg.seed)
    first = train(dataset, carve, cfg)
    log.info("validation run: best epoch %d, %s, policy %s", first.best_epoch, json.dumps(first.best_val),
             first.policy.to_dict())
    refit = replace(cfg, epochs=cfg.refit_epochs, eval_every=1, patience=cfg.refit_patience)
    # stopped on half of the validation run's warm holdout, which neither run trains on
    final = train(dataset, production_split(dataset, cfg.seed, carve.val_warm_truth), refit, init=first)
    final.model.new_bias_weight.copy_(first.model.new_bias_weight)
    return first, replace(final, policy=first.policy)


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    dataset = load_dataset(args.dataset)
    t0 = time.perf_counter()
    first, final = train_production(dataset, cfg)
    seconds = time.perf_counter() - t0
    metrics = {
        "dataset": dataset.name,
        "seed": cfg.seed,
        "preset": chosen or "defaults",
        "train_seconds": round(seconds, 1),
        "validation": {"best_epoch": first.best_epoch, "hybrid": first.best_val, "policy": first.policy.to_dict()},
        "refit": {"best_epoch": final.best_epoch, "held_out_slice": final.best_val},
    }
    log.info("trained in %.0f s (validation run, then the refit on every interaction: best epoch %d, held-out "
             "slice %s)", seconds, final.best_epoch, json.dumps(final.best_val))
    print(export_artifact(final, dataset, fingerprint(args.dataset), args.out, metrics))


if __name__ == "__main__":
    main()
