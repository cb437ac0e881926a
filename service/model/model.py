"""The one model definition, shared by the trainer and the service.

M2Rec = MDsym-CVAE user auto-encoder (user_autoencoder.py) + an item generator
(generator.py: M2VAE, or the MD-CVAE paper's content VAE). Item vectors are [v; b] (D+1)
and user queries are [h; 1], so an inner-product index scores h·v + b with the trained bias kept.

Rebuild from a saved config, nanoGPT style: `M2Rec(ModelConfig(**config_dict))`, then load the
state dict. Construction needs only sizes (n_warm, n_attributes, content_dim), never the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from service.model.collaborative import Collaborative
from service.model.config import ModelConfig
from service.model.generator import ContentVAE, M2VAEGenerator
from service.model.inputs import ItemInputs
from service.model.user_autoencoder import UserAutoEncoder


class AttributeVocabulary:
    """Attribute token -> generator index (1-based; 0 is padding). Unknown tokens are reported."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self.index = {t: k + 1 for k, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("duplicate attribute tokens in the vocabulary")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, items: Sequence[Sequence[str]]) -> tuple[torch.Tensor, list[list[str]]]:
        """Padded (B, A) index tensor (A >= 1) and, per item, the tokens that were dropped."""
        known: list[list[int]] = []
        unknown: list[list[str]] = []
        for toks in items:
            ids = sorted({self.index[t] for t in toks if t in self.index})
            known.append(ids)
            unknown.append([t for t in toks if t not in self.index])
        width = max([1, *(len(k) for k in known)])
        out = torch.zeros(len(known), width, dtype=torch.long)
        for b, ids in enumerate(known):
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, unknown


def item_inputs(
    attributes: torch.Tensor, content: torch.Tensor | None, content_dim: int,
    has_content: torch.Tensor | None = None,
) -> ItemInputs:
    """ItemInputs from padded attribute indices and optional content (None = no content at all)."""
    B = attributes.shape[0]
    if content is None:
        content = torch.zeros(B, max(content_dim, 1))
        has_content = torch.zeros(B, dtype=torch.bool)
    elif has_content is None:
        has_content = torch.ones(B, dtype=torch.bool)
    return ItemInputs(attributes, content, (attributes > 0).any(dim=1), has_content & (content_dim > 0))


class M2Rec(nn.Module):
    new_bias_weight: torch.Tensor  # () buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.user = UserAutoEncoder(cfg)
        self.generator: M2VAEGenerator | ContentVAE = (
            M2VAEGenerator(cfg) if cfg.generator == "m2vae" else ContentVAE(cfg)
        )
        # A new item's generated bias b̂ is its popularity predicted from content, shrunk towards the
        # mean; how much of it to trust when new items meet trained ones is chosen on validation by
        # the trainer (1 while training). The fold-in never reads the bias column.
        self.register_buffer("new_bias_weight", torch.ones(()))
        self.collaborative: Collaborative | None = None
        if cfg.collaborative_factors:
            self.collaborative = Collaborative(cfg.n_warm, cfg.n_attributes, cfg.content_dim, cfg.item_dim,
                                               cfg.collaborative_factors)

    def attach(self, part: Collaborative) -> None:
        """Serve with `part` beside m2rec (its config then records the part's size)."""
        self.config = replace(self.config, collaborative_factors=part.factors)
        self.collaborative = part

    def item_rows(self) -> torch.Tensor:
        """[V, b] (J, D+1) of the warm items, in training row order."""
        return self.user.item_rows()

    def index_rows(self) -> torch.Tensor:
        """The warm items' rows as the index holds them: [V, b] (J, D+1), or [V, b, Y] (J, D+1+f) with
        the collaborative part."""
        rows = self.item_rows()
        if self.collaborative is None:
            return rows
        return torch.cat([rows, self.collaborative.item_factors.to(rows.dtype)], dim=1)

    def embed_items(self, x: ItemInputs, user: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generated rows (B, D+1) of new items and the gate weights that explain them.

        user (B, D) personalises M2VAE's fusion; None uses the neutral (population-mean) user,
        which is the vector an index stores.
        """
        rows, gates = self.generator.embed(x, user)
        return torch.cat([rows[:, :-1], rows[:, -1:] * self.new_bias_weight], dim=1), gates

    def fold_in(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User vectors h (B, D) from history rows (B, L, D+1 or D) and mask (B, L).

        Rows may be warm rows of V or generated rows of new items: they are used identically.
        """
        D = self.config.item_dim
        return self.user.fold_in(rows[..., :D], mask)

    @staticmethod
    def query(h: torch.Tensor) -> torch.Tensor:
        """Index query [h; 1] (B, D+1): the inner product with [v; b] keeps the trained bias."""
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def set_neutral_user(self, h_mean: torch.Tensor) -> None:
        self.generator.neutral_user.copy_(h_mean.detach())
