"""MDsym-CVAE user auto-encoder: a Multi-VAE whose first and last layers are the same item table.

The table holds one row per warm item, V (J, D), and a bias b (J,). A user is encoded from the rows
of the items they touched (the L2-normalised binary history times V is the sum of those rows over
sqrt(L)); the decoder maps the user latent to h (D) and scores item j as h·V_j + b_j. Because the
encoder only ever sees rows, a new item's generated row ("surrogate weight") can stand in for a
missing row of V in both places, which is what lets the service fold in histories with new items.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from service.model.config import ModelConfig


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with tanh between them (none after the last): Multi-VAE's choice."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class UserAutoEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Ku = cfg.item_dim, cfg.user_latent
        hidden = [cfg.user_hidden] if cfg.user_hidden > 0 else []
        self.logvar_clamp = cfg.logvar_clamp
        self.V = nn.Parameter(torch.randn(cfg.n_warm, D) * (1.0 / math.sqrt(D)))  # (J, D)
        self.b = nn.Parameter(torch.zeros(cfg.n_warm))  # (J,)
        self.enc_bias = nn.Parameter(torch.zeros(D))  # bias of the tied first layer
        self.encoder = _mlp([D, *hidden, 2 * Ku])
        self.decoder = _mlp([Ku, *hidden, D])

    def item_rows(self) -> torch.Tensor:
        """[V, b] for every warm item: the vectors the index stores."""
        return torch.cat([self.V, self.b[:, None]], dim=1)  # (J, D+1)

    def latent(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(torch.tanh(first + self.enc_bias))  # (B, 2Ku)
        mu, logvar = out.chunk(2, dim=1)  # (B, Ku), (B, Ku)
        return mu, logvar.clamp(-self.logvar_clamp, self.logvar_clamp)

    def encode_rows(self, rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of users given the rows (warm or surrogate) of their history items.

        rows (B, L, D), mask (B, L) true for real entries. An empty history encodes the all-zero
        input: finite, the encoder's answer for "knows nothing".
        """
        m = mask.to(rows.dtype)  # (B, L)
        n = m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
        first = (rows * m[:, :, None]).sum(dim=1) / n.sqrt()  # (B, D) = V^T r / ||r||
        return self.latent(first)

    def encode_sparse(
        self, items: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time encoder over flat histories (EmbeddingBag layout, no padding).

        items (N,) warm row indices, offsets (B,) start of each user, lengths (B,) history sizes,
        keep (N,) optional 0/1 input-dropout mask already scaled by 1/(1-p) as in Multi-VAE.
        """
        norm = lengths.to(self.V.dtype).clamp(min=1.0).rsqrt()  # (B,)
        weights = torch.repeat_interleave(norm, lengths)  # (N,)
        if keep is not None:
            weights = weights * keep
        first = F.embedding_bag(items, self.V, offsets, mode="sum", per_sample_weights=weights)  # (B, D)
        return self.latent(first)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.decoder(u)  # (B, Ku) -> (B, D)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.V.T + self.b  # (B, J)

    def fold_in(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Deterministic user vector h (B, D) from history rows (B, L, D): decoder(mu)."""
        mu, _ = self.encode_rows(rows, mask)
        return self.decode(mu)
