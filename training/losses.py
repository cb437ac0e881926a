"""Every training loss of m2rec, each a mean over the batch so that no weight depends on batch size.

Conventions: per-example terms are summed over their own dimensions (a log-likelihood or a KL of
a diagonal Gaussian is a sum over dimensions) and then averaged over examples. Every InfoNCE keeps
its positive in the denominator, so it is a proper cross-entropy (>= 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from service.model import ItemInputs
from service.model.generator import Gaussian, GeneratorOutput


def multinomial_nll(logits: torch.Tensor, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Multi-VAE likelihood: mean over users of -Σ_{j in history} log_softmax(logits)_j.

    logits (B, J); (rows, items) (N,) the flat (user-in-batch, item) pairs of the histories.
    """
    logp = torch.log_softmax(logits, dim=1)  # (B, J)
    return -logp[rows, items].sum() / logits.shape[0]


def generated_row_nll(h: torch.Tensor, generated: torch.Tensor, rows: torch.Tensor,
                      items: torch.Tensor, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The Multi-VAE likelihood of the users' items scored the way a cold item is served: by their
    generated rows [ê; b̂] (J, D+1), held fixed (no gradient reaches the generator from here).

    h (B, D) user vectors; (rows, items) (N,) as in `multinomial_nll`. It trains the user side
    for the scores it gives to items it knows only from their content. `log_weight` (J,): as in
    `sampled_logits`, when `generated` holds a sample of the rows.
    """
    fixed = generated.detach()
    logits = h @ fixed[:, :-1].T + fixed[:, -1]  # (B, J)
    return multinomial_nll(logits if log_weight is None else logits + log_weight, rows, items)


def sampled_softmax_weights(positives: np.ndarray, drawn: np.ndarray, n_items: int
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates of a sampled softmax: every item of the batch's histories (`positives`) and
    items drawn uniformly at random (`drawn`). Returns the sorted candidates (C,), each positive's
    place among them, and each candidate's log weight (C,): 0 for a batch item, log((J - P) / S)
    for the S drawn others, so that the softmax's denominator estimates the full one's (the batch
    items exactly, the rest by importance sampling from a uniform proposal)."""
    candidates = np.union1d(positives, drawn)  # (C,) sorted
    places = np.searchsorted(candidates, positives)
    is_batch = np.zeros(candidates.size, dtype=bool)
    is_batch[places] = True
    others = int((~is_batch).sum())
    log_weight = np.zeros(candidates.size, dtype=np.float32)
    if others:
        log_weight[~is_batch] = np.log((n_items - int(is_batch.sum())) / others)
    return candidates, places, log_weight


def kl_standard_normal(g: Gaussian, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, σ²) || N(0, I)), summed over dimensions, mean over the (masked) rows."""
    per_row = 0.5 * (g.mu.pow(2) + g.logvar.exp() - 1.0 - g.logvar).sum(dim=1)  # (B,)
    return _masked_mean(per_row, mask)


def kl_gaussians(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """KL(q || p) for diagonal Gaussians, summed over dimensions, mean over rows."""
    var_ratio = (q.logvar - p.logvar).exp()
    per_row = 0.5 * (var_ratio + (q.mu - p.mu).pow(2) / p.logvar.exp() - 1.0 - (q.logvar - p.logvar))
    return per_row.sum(dim=1).mean()


def pull_to_generated(rows: torch.Tensor, generated: torch.Tensor, weight: float) -> torch.Tensor:
    """λ_v/2 · mean_j ||[V_j; b_j] - Ê_j||² over warm items (Ê fixed during the b-step)."""
    return 0.5 * weight * (rows - generated).pow(2).sum(dim=1).mean()


def reconstruction_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian reconstruction of the item row: squared error summed over D+1, mean over items."""
    return (pred - target).pow(2).sum(dim=1).mean()


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float
             ) -> torch.Tensor:
    """Per-row InfoNCE with cosine similarity; the positive is in the denominator.

    anchor (B, Z), positive (B, Z), negatives (B, N, Z) or (N, Z) shared by every row -> (B,).
    """
    a = F.normalize(anchor, dim=-1)
    pos = (a * F.normalize(positive, dim=-1)).sum(dim=-1, keepdim=True)  # (B, 1)
    n = F.normalize(negatives, dim=-1)
    neg = a @ n.T if n.dim() == 2 else torch.einsum("bz,bnz->bn", a, n)  # (B, N)
    logits = torch.cat([pos, neg], dim=1) / tau  # (B, 1+N)
    return -torch.log_softmax(logits, dim=1)[:, 0]


def disentangle_loss(out: GeneratorOutput, tau: float) -> torch.Tensor:
    """M2VAE eq. 9-10: per unique view v, positive (z_v, proj(raw_v)), negatives (z_v, z_com_j).

    Summed over the views, each a mean over the items that have view v.
    """
    if out.common is None:
        return torch.zeros((), device=out.rows.device)
    z_com = out.common.sample()  # (B, Z)
    total = torch.zeros((), device=z_com.device)
    for v, g in out.views.items():
        mask = out.view_mask[v]
        if not bool(mask.any()):
            continue
        per_row = info_nce(g.sample(), out.raw_projected[v], z_com, tau)  # (B,)
        total = total + _masked_mean(per_row, mask)
    return total


def m2vae_elbo(out: GeneratorOutput, target: torch.Tensor, kl_weight: float) -> dict[str, torch.Tensor]:
    """-ELBO of the CVAE (eq. 23-26): reconstruction + KL(q||p) + Σ_v KL(q(z_v)||N(0,I))."""
    parts = {"recon": reconstruction_mse(out.rows, target)}
    kl = kl_gaussians(out.posterior, out.prior) if out.posterior is not None else torch.zeros(())
    for v, g in out.views.items():
        kl = kl + kl_standard_normal(g, out.view_mask[v])
    parts["kl"] = kl_weight * kl
    return parts


def content_vae_elbo(
    out: GeneratorOutput, content: torch.Tensor | None, attributes: torch.Tensor, target: torch.Tensor,
    pull_weight: float, kl_weight: float,
) -> dict[str, torch.Tensor]:
    """MD-CVAE t-step: reconstruct the item's content and attributes, KL, and λ_v pull to [V_j; b_j]."""
    parts: dict[str, torch.Tensor] = {}
    if content is not None and out.content_recon is not None:
        parts["content"] = (out.content_recon - F.normalize(content, dim=1)).pow(2).sum(dim=1).mean()
    if out.attribute_logits is not None:
        real = attributes > 0  # (B, A)
        logp = torch.log_softmax(out.attribute_logits, dim=1).gather(1, attributes)  # (B, A)
        parts["attributes"] = -(logp * real).sum() / attributes.shape[0]
    parts["kl"] = kl_weight * kl_standard_normal(out.prior)
    parts["pull"] = pull_to_generated(target, out.rows, pull_weight)
    return parts


def cooccurrence_loss(rows: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float
                      ) -> torch.Tensor:
    """M2VAE eq. 20-22: the generated row against co-interacted (positive) and unrelated rows.

    rows (B, D+1); positives (B, P, D+1), negatives (B, N, D+1), both detached targets [V; b].
    Each of the P positives is one InfoNCE term with the N negatives; mean over B·P.
    """
    a = F.normalize(rows, dim=-1)[:, None, :]  # (B, 1, D+1)
    pos = (a * F.normalize(positives, dim=-1)).sum(dim=-1) / tau  # (B, P)
    neg = (a * F.normalize(negatives, dim=-1)).sum(dim=-1) / tau  # (B, N)
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (B, 1)
    denom = torch.logaddexp(pos, neg_lse)  # (B, P): log(exp(pos) + Σ exp(neg))
    return (denom - pos).mean()


def gate_balance(attribute_gate: torch.Tensor, x: ItemInputs) -> torch.Tensor:
    """KL(Bernoulli(m) || Bernoulli(1/2)) of the batch's mean attribute share m of the modality gate,
    over the items that have both modalities: each item may lean on either view, the batch may not
    drop one (sparse-MoE load balancing). Without it the learned gate collapses onto one view for
    every item (benchmarks/results/model-tuning.md, round 6). Zero when no item has both."""
    both = x.has_attributes & x.has_content  # (B,)
    if not bool(both.any()):
        return attribute_gate.sum() * 0.0
    m = attribute_gate[both].mean().clamp(1e-6, 1 - 1e-6)
    return m * torch.log(2 * m) + (1 - m) * torch.log(2 * (1 - m))


def bpr_loss(rows: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """-log σ(e·[h+; 1] - e·[h-; 1]) for a user who took the item against one who did not; mean."""
    v = rows[:, :-1]  # the bias cancels in the difference
    margin = (v * (h_pos - h_neg)).sum(dim=1)  # (B,)
    return F.softplus(-margin).mean()


def in_batch_ranking_loss(rows: torch.Tensor, h: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """User-centric multinomial likelihood of generated rows: for each user, a softmax over the
    batch's generated items, whose positives are the items of the batch the user took.

    rows (B, D+1) generated [v; b]; h (U, D) user vectors (detached); truth (U, B) 0/1.
    This is the cold-only ranking itself (rank new items against each other for a user), which
    neither the reconstruction nor the item-centric BPR trains directly. Mean over users.
    """
    logits = h @ rows[:, :-1].T + rows[:, -1]  # (U, B) = [h; 1]·[v; b]
    n = truth.sum(dim=1).clamp(min=1.0)  # (U,)
    return (-(F.log_softmax(logits, dim=1) * truth).sum(dim=1) / n).mean()


def surrogate_ranking_loss(rows: torch.Tensor, batch: torch.Tensor, table: torch.Tensor, h: torch.Tensor,
                           truth: torch.Tensor) -> torch.Tensor:
    """Multi-VAE likelihood over the whole warm table with the batch's rows swapped for generated ones.

    rows (B, D+1) generated [v; b] of table rows `batch` (B,); table (J, D+1) trained [V; b],
    detached; h (U, D) user vectors (detached); truth (U, B) 0/1, which batch items each user took.
    This is MDsym's surrogate use of a generated row: it must rank for a user among the trained
    rows of every other item, so generated rows come out on the same scale as trained ones (what
    ranking new items among warm ones needs), not only in the right order among themselves.
    Mean over the users' batch positives.
    """
    # Only the batch's columns carry a gradient: the other J - B are scored without autograd, so the
    # backward pass never forms the (J, D) gradient of the whole table (same values, ~40% less time
    # on citeulike-t's 18k items with two threads)
    with torch.no_grad():
        fixed = h @ table[:, :-1].T + table[:, -1]  # (U, J)
    logits = fixed.index_copy(1, batch, h @ rows[:, :-1].T + rows[:, -1])  # (U, J)
    logp = F.log_softmax(logits, dim=1)[:, batch]  # (U, B)
    n = truth.sum(dim=1).clamp(min=1.0)  # (U,)
    return (-(logp * truth).sum(dim=1) / n).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)
