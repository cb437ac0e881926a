"""The two halves of a training epoch, each one pass of minibatch updates.

    b-step  Multi-VAE on the training histories; the item table [V; b] is pulled towards the
            generator's current output Ê for the warm items (Ê fixed during the step)
    t-step  the generator learns to produce [V_j; b_j] (fixed) from item j's attributes and content,
            plus M2VAE's own losses (disentangling, co-occurrence, BPR)

Each step's loss is the forward of a small module (`UserStep` over the user auto-encoder,
`GeneratorStep` over the generator): the form DistributedDataParallel wraps, so that under torchrun
its hooks all-reduce exactly the gradients of the submodule the step trains. Single-process, the
modules are called directly. The data side (which users or items, every random draw of NumPy) is
prepared outside the forward, in the order the draws have always been made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from service.model import ItemInputs, M2Rec
from service.model.generator import ContentVAE, Gaussian, M2VAEGenerator
from service.model.user_autoencoder import UserAutoEncoder
from training import distributed, losses
from training.input_dropout import feature_dropout, modality_dropout
from training.item_rows import user_vectors
from training.linear_fit import LinearFit
from training.train_config import TrainConfig
from training.train_data import TrainingData


@dataclass
class Sample:
    """A sampled softmax's candidates for one b-step batch (losses.sampled_softmax_weights)."""

    candidates: torch.Tensor  # (C,) trained rows
    places: torch.Tensor  # (N,) each history item's place among them
    log_weight: torch.Tensor  # (C,)

    @classmethod
    def draw(cls, items: torch.Tensor, n_items: int, size: int, rng: np.random.Generator) -> Sample:
        candidates, places, log_weight = losses.sampled_softmax_weights(
            items.numpy(), rng.integers(0, n_items, size), n_items)
        return cls(torch.from_numpy(candidates), torch.from_numpy(places), torch.from_numpy(log_weight))


class UserStep(nn.Module):
    """The b-step's loss parts for one batch of users."""

    def __init__(self, user: UserAutoEncoder, cfg: TrainConfig) -> None:
        super().__init__()
        self.user = user
        self.cfg = cfg

    def forward(self, items: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor | None,
                beta: float, target: torch.Tensor, as_new: torch.Tensor, sample: Sample | None = None
                ) -> dict[str, torch.Tensor]:
        mu, logvar = self.user.encode_sparse(items, offsets, lengths, keep)
        u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        h = self.user.decode(u)  # (B, D)
        rows_in_batch = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        if sample is None:  # the full softmax over the J trained items
            logits, targets, log_weight = self.user.logits(h), items, None  # (B, J)
        else:  # over C candidates: the batch's items and the drawn ones
            rows = sample.candidates
            logits = h @ self.user.V[rows].T + self.user.b[rows] + sample.log_weight  # (B, C)
            targets, log_weight, as_new = sample.places, sample.log_weight, as_new[rows]
        parts = {
            "nll": losses.multinomial_nll(logits, rows_in_batch, targets),
            "kl_u": beta * losses.kl_standard_normal(Gaussian(mu, logvar)),
            # the whole table on every rank: its gradient, averaged over identical copies, is itself
            "pull": losses.pull_to_generated(self.user.item_rows(), target, self.cfg.lambda_v),
        }
        if self.cfg.generated_likelihood > 0:  # the same items scored as cold items are: by Ê
            parts["nll_gen"] = self.cfg.generated_likelihood * losses.generated_row_nll(
                h, as_new, rows_in_batch, targets, log_weight)
        return parts


def b_step(step_loss: nn.Module, data: TrainingData, opt: torch.optim.Optimizer, cfg: TrainConfig,
           rng: np.random.Generator, step: int, steps_per_epoch: int, target: torch.Tensor,
           held_out_shift: torch.Tensor | None = None, order: np.ndarray | None = None,
           batch_users: int | None = None) -> tuple[dict[str, float], int]:
    """One pass over the users (`order`: this rank's users in this pass's order; None: all of them,
    shuffled by `rng`); `target` is Ê (J, D+1), the generator's rows, fixed for the step.
    `step_loss` is a UserStep, or the DDP wrapper of one."""
    # the rows the user side is scored by: a trained item's row as if it were new (leave-one-out
    # linear part), else the user side would learn from in-sample fits no cold item gets
    as_new = target + held_out_shift if held_out_shift is not None else target
    users = rng.permutation(data.train_users) if order is None else order
    size = cfg.batch_users if batch_users is None else batch_users
    sums: dict[str, float] = {}
    for start in range(0, users.size, size):
        batch = users[start : start + size]
        items, offsets, lengths = data.flat_histories(batch)
        keep = None
        if cfg.input_dropout > 0:
            keep = torch.from_numpy((rng.random(items.numel()) >= cfg.input_dropout).astype(np.float32))
            keep = keep / (1.0 - cfg.input_dropout)
        beta = min(cfg.beta_cap, cfg.beta_cap * step / max(1.0, cfg.anneal_epochs * steps_per_epoch))
        sample = Sample.draw(items, target.shape[0], cfg.sampled_items, rng) if cfg.sampled_items > 0 else None
        parts: dict[str, torch.Tensor] = step_loss(items, offsets, lengths, keep, beta, target, as_new, sample)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * batch.size / users.size
    return sums, step


@dataclass
class GeneratorBatch:
    """One t-step batch: warm rows r (B,), their corrupted inputs and targets, and the users and
    rows the losses compare them with (drawn before the forward)."""

    rows: torch.Tensor  # (B,) warm rows
    x: ItemInputs
    target: torch.Tensor  # (B, D+1) [V_r; b_r]
    table: torch.Tensor  # (J, D+1) every warm row, detached
    h_pos: torch.Tensor  # (B, D) a user who took each item
    h_neg: torch.Tensor  # (B, D) a random user
    neutral: torch.Tensor  # (B, 1) bool: gated by the neutral user
    id_drop: torch.Tensor  # (B,) bool
    held_out: torch.Tensor | None  # (B, D+1) leave-one-out ridge rows
    co_pos: torch.Tensor  # (B, P) warm rows from the positive user's history
    co_neg: torch.Tensor  # (B, N) random warm rows
    h_rank: torch.Tensor  # (U, D) users who took an item of the batch
    hits: torch.Tensor  # (U, B) 0/1 which batch items each took


class GeneratorStep(nn.Module):
    """The t-step's loss parts for one batch of warm items."""

    def __init__(self, generator: M2VAEGenerator | ContentVAE, cfg: TrainConfig, has_content: bool) -> None:
        super().__init__()
        self.generator = generator
        self.cfg = cfg
        self.has_content = has_content

    def forward(self, b: GeneratorBatch) -> dict[str, torch.Tensor]:
        cfg, x = self.cfg, b.x
        # Serving gates with the neutral user: train that gate too, not only the positive user's.
        gate_user = torch.where(b.neutral, self.generator.neutral_user.expand_as(b.h_pos), b.h_pos)
        out = self.generator.forward_train(x, b.target, gate_user, b.id_drop, b.held_out)
        if cfg.generator == "content-vae":
            parts = losses.content_vae_elbo(out, x.content if self.has_content else None,
                                            x.attributes, b.target, cfg.lambda_v, cfg.gen_kl)
        else:
            parts = losses.m2vae_elbo(out, b.target, cfg.gen_kl)
            parts["recon"] = cfg.recon_weight * parts["recon"]
            if cfg.bpr:
                parts["bpr"] = cfg.bpr_weight * losses.bpr_loss(out.serving_rows, b.h_pos, b.h_neg)
            if cfg.gate_balance > 0 and cfg.moe:
                parts["balance"] = cfg.gate_balance * losses.gate_balance(out.gates["attributes"], x)
            if cfg.disentangle and cfg.common_view:
                parts["dis"] = cfg.alpha_disentangle * losses.disentangle_loss(out, cfg.tau_disentangle)
            if cfg.cooccurrence:
                parts["co"] = cfg.beta_co * losses.cooccurrence_loss(
                    out.serving_rows, b.table[b.co_pos], b.table[b.co_neg], cfg.tau_co)
        if cfg.generator == "m2vae" and b.hits.shape[0] > 0:  # the content VAE stays the paper's model
            # The task itself, for users who took an item of the batch (every softmax has a positive):
            # rank the batch's generated rows against each other (cold-only) and, as MDsym's
            # surrogate rows, against the trained rows of every other warm item (new among warm).
            if cfg.rank_weight > 0:
                parts["rank"] = cfg.rank_weight * losses.in_batch_ranking_loss(out.serving_rows, b.h_rank, b.hits)
            if cfg.surrogate_weight > 0:
                parts["surrogate"] = cfg.surrogate_weight * losses.surrogate_ranking_loss(
                    out.serving_rows, b.rows, b.table, b.h_rank, b.hits)
        return parts


def t_step(step_loss: nn.Module, model: M2Rec, data: TrainingData, opt: torch.optim.Optimizer, cfg: TrainConfig,
           rng: np.random.Generator, linear: LinearFit | None = None, order: np.ndarray | None = None,
           batch_items: int | None = None, clock: dict[str, float] | None = None) -> dict[str, float]:
    """One pass over the warm items (`order`: this rank's rows in this pass's order; None: every
    trained row, shuffled by `rng`). `step_loss` is a GeneratorStep over `model.generator`, or the
    DDP wrapper of one. `clock["batches_seconds"]` gets the time of the batches alone (the pass
    also holds full-table work: the ridge refit, every user's vector)."""
    targets = model.item_rows().detach()  # (J, D+1): [V_j; b_j] fixed for the step
    if linear is not None:  # the ridge path follows V in closed form; the decoder learns the residual
        linear.refit_shared(targets)
        if cfg.linear_residual == 0:  # the row is the ridge row alone: nothing of the generator is served
            return {}
    # (U, D) detached user vectors for gating and BPR: a full-table pass, split over the ranks
    h_all = distributed.gather_rows(lambda users: user_vectors(model, data, users), data.history.shape[0])
    model.set_neutral_user(h_all[torch.from_numpy(data.train_users)].mean(dim=0))
    # rows whose every interaction was held out have no user to learn from (their row follows Ê)
    rows = rng.permutation(data.trained_rows) if order is None else order
    size = cfg.batch_items if batch_items is None else batch_items
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for start in range(0, rows.size, size):
        r = rows[start : start + size]
        x = data.inputs(data.warm[r])
        modality_dropout(x, cfg.modality_dropout, rng)
        feature_dropout(x, cfg.feature_dropout, rng)
        pos_users = data.sample_users_of(r, rng)
        neg_users = rng.choice(data.train_users, size=r.size)
        id_drop = torch.from_numpy(rng.random(r.size) < cfg.id_dropout)
        neutral = torch.from_numpy(rng.random(r.size) < cfg.neutral_gate)[:, None]
        h_pos = (leave_out_vectors(model, data, pos_users, r) if cfg.leave_out
                 else h_all[torch.from_numpy(pos_users)])  # (B, D)
        held_out = None
        if linear is not None and cfg.linear_held_out:
            assert isinstance(model.generator, M2VAEGenerator) and model.generator.linear is not None
            held_out = linear.held_out(r, model.generator.linear.patterns(x))
        co_pos = co_neg = torch.zeros(r.size, 0, dtype=torch.long)
        if cfg.generator != "content-vae" and cfg.cooccurrence:
            co_pos = torch.from_numpy(data.sample_history_rows(pos_users, cfg.co_positives, rng))  # (B, P)
            co_neg = torch.from_numpy(rng.integers(0, data.warm.size, size=(r.size, cfg.co_negatives)))  # (B, N)
        h_rank, hits = torch.zeros(0, h_all.shape[1]), torch.zeros(0, r.size)
        if cfg.generator == "m2vae" and (cfg.rank_weight > 0 or cfg.surrogate_weight > 0):
            users = np.unique(pos_users)[: cfg.rank_users]
            hits = torch.from_numpy(data.history[users][:, r].toarray())  # (U, B)
            keep = hits.sum(dim=1) > 0
            h_rank = (leave_out_vectors(model, data, users, r) if cfg.leave_out
                      else h_all[torch.from_numpy(users)])[keep]
            hits = hits[keep]
        batch = GeneratorBatch(torch.from_numpy(r), x, targets[torch.from_numpy(r)], targets, h_pos,
                               h_all[torch.from_numpy(neg_users)], neutral, id_drop, held_out, co_pos, co_neg,
                               h_rank, hits)
        parts: dict[str, torch.Tensor] = step_loss(batch)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * r.size / rows.size
    if clock is not None:
        clock["batches_seconds"] = clock.get("batches_seconds", 0.0) + time.perf_counter() - started
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
