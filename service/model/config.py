"""ModelConfig: the sizes and switches that rebuild the model; saved in the artifact's manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GENERATORS = ("m2vae", "content-vae")


@dataclass(frozen=True)
class ModelConfig:
    n_warm: int  # J, rows of the item table
    n_attributes: int  # A, size of the attribute vocabulary (index 0 is padding, so A+1 rows)
    content_dim: int  # F, 0 = items have no dense content vector
    item_dim: int = 128  # D
    user_latent: int = 128  # Ku
    user_hidden: int = 0  # 0 = no hidden layer between the tied layer and the latent
    gen_hidden: int = 128  # H
    gen_latent: int = 64  # Z
    generator: str = "m2vae"  # or "content-vae"
    common_view: bool = True  # M2VAE: PoE common view
    moe: bool = True  # M2VAE: user-aware two-level MoE (False = plain average of the views)
    gate_temperature: float = 1.0
    # modality gate logits w·(u_v ⊙ z_v ⊙ z_com) on RMS-normalised factors: the raw triple product of
    # latents is tiny and the gate would sit at 0.5 (benchmarks/results/model-tuning.md, round 6)
    gate_norm: bool = True
    logvar_clamp: float = 8.0
    # M2VAE: ridge path from features to the row (service/model/linear_path.py); the decoder adds a residual
    # scaled by linear_residual (0 = the ridge row alone)
    linear_path: bool = True
    linear_residual: float = 1.0
    linear_attribute_weight: float = 1.0  # length of the attribute block beside the unit content block
    # M2VAE's decoder reads [z; a; c] (paper); False: z alone, so a row depends on the item only through
    # the fused latent (where PoE, MoE and the disentangling act)
    decoder_features: bool = True
    # the collaborative part's ALS factors f (service/model/collaborative.py): rows [v; b; y] (D+1+f);
    # 0: m2rec alone, rows [v; b]. The trainer sets it when it attaches the part.
    collaborative_factors: int = 0

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.linear_path and self.generator != "m2vae":
            raise ValueError("linear_path is a component of the m2vae generator")
        if min(self.n_warm, self.n_attributes + 1, self.item_dim, self.user_latent) <= 0:
            raise ValueError("sizes must be positive")
        if self.collaborative_factors < 0:
            raise ValueError("collaborative_factors must be >= 0")

    @property
    def row_dim(self) -> int:
        """Width of an item's row in the index: [v; b] or [v; b; y]."""
        return self.item_dim + 1 + self.collaborative_factors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
