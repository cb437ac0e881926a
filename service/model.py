"""The one model definition, shared by the trainer and the service.

M2Rec = MDsym-CVAE user auto-encoder (service/user_autoencoder.py) + an item generator
(service/generator.py: M2VAE, or the MD-CVAE paper's content VAE). Item vectors are [v; b] (D+1)
and user queries are [h; 1], so an inner-product index scores h·v + b with the trained bias kept.

Rebuild from a saved config, nanoGPT style: `M2Rec(ModelConfig(**config_dict))`, then load the
state dict. Construction needs only sizes (n_warm, n_attributes, content_dim), never the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from service.generator import ContentVAE, ItemInputs, M2VAEGenerator
from service.user_autoencoder import UserAutoEncoder

GENERATORS = ("m2vae", "content-vae")


@dataclass(frozen=True)
class ModelConfig:
    n_warm: int  # J, rows of the item table
    n_attributes: int  # A, size of the attribute vocabulary (index 0 is padding, so A+1 rows)
    content_dim: int  # F, 0 = items have no dense content vector
    item_dim: int = 128  # D
    user_latent: int = 64  # Ku
    user_hidden: int = 0  # 0 = no hidden layer between the tied layer and the latent
    gen_hidden: int = 128  # H
    gen_latent: int = 64  # Z
    generator: str = "m2vae"  # or "content-vae"
    common_view: bool = True  # M2VAE: PoE common view
    moe: bool = True  # M2VAE: user-aware two-level MoE (False = plain average of the views)
    gate_temperature: float = 1.0
    # modality gate logits w·(u_v ⊙ z_v ⊙ z_com) on RMS-normalised factors: the raw triple product of
    # latents with entries ~0.05-0.8 stays near 0.01 and the gate sits at 0.5 (model-tuning.md round 6).
    # False keeps older artifacts loadable.
    gate_norm: bool = False
    logvar_clamp: float = 8.0
    # M2VAE: ridge path from features to the row (service/linear_path.py); the decoder adds a residual
    # scaled by linear_residual (0 = the ridge row alone). False keeps artifacts without it loadable.
    linear_path: bool = False
    linear_residual: float = 1.0
    linear_attribute_weight: float = 1.0  # length of the attribute block beside the unit content block
    # M2VAE's decoder reads [z; a; c] (paper); False: z alone, so a row depends on the item only through
    # the fused latent (where PoE, MoE and the disentangling act). True keeps older artifacts loadable.
    decoder_features: bool = True

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.linear_path and self.generator != "m2vae":
            raise ValueError("linear_path is a component of the m2vae generator")
        if min(self.n_warm, self.n_attributes + 1, self.item_dim, self.user_latent) <= 0:
            raise ValueError("sizes must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.user = UserAutoEncoder(cfg)
        self.generator: M2VAEGenerator | ContentVAE = (
            M2VAEGenerator(cfg) if cfg.generator == "m2vae" else ContentVAE(cfg)
        )

    def item_rows(self) -> torch.Tensor:
        """[V, b] (J, D+1) of the warm items, in training row order."""
        return self.user.item_rows()

    def embed_items(self, x: ItemInputs, user: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generated rows (B, D+1) of new items and the gate weights that explain them.

        user (B, D) personalises M2VAE's fusion; None uses the neutral (population-mean) user,
        which is the vector an index stores.
        """
        return self.generator.embed(x, user)

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
