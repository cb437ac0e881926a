"""Item generators: an item's attributes and content vector -> its row [v; b] (D+1) of the item table.

M2VAEGenerator follows the M2VAE paper (papers/000): Gaussian encoders per view (ID, attributes,
content), a Product-of-Experts common view, a user-aware two-level Mixture-of-Experts fusion and a
CVAE decoder. ContentVAE is the MD-CVAE paper's plain item content VAE, kept as the baseline.

At serving time the ID view does not exist: the latent is the feature path's prior mean mu_f and
the row is F([mu_f; a; c]). A missing modality is a masked expert, never a zero vector that the
model would mistake for data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from service.model.config import ModelConfig
from service.model.inputs import ItemInputs
from service.model.linear_path import LinearPath

POE_EPS = 1e-6


@dataclass
class Gaussian:
    mu: torch.Tensor  # (B, Z)
    logvar: torch.Tensor  # (B, Z)

    def sample(self) -> torch.Tensor:
        return self.mu + torch.randn_like(self.mu) * (0.5 * self.logvar).exp()


@dataclass
class GeneratorOutput:
    """Everything the t-step losses need from one forward pass."""

    rows: torch.Tensor  # (B, D+1) generated [v; b] from the training latent (posterior or prior)
    serving_rows: torch.Tensor  # (B, D+1) the serving path's rows (prior mean, no ID view)
    prior: Gaussian  # p(z | a, c): the fused feature path
    posterior: Gaussian | None = None  # q(z | e, a, c), M2VAE only
    views: dict[str, Gaussian] = field(default_factory=dict)  # unique views "a", "c"
    view_mask: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) bool per unique view
    common: Gaussian | None = None
    raw_projected: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, Z) proj of raw view input
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) "attributes", "content", "common"
    # content-VAE only: reconstruction of its input
    content_recon: torch.Tensor | None = None  # (B, F)
    attribute_logits: torch.Tensor | None = None  # (B, A)


def _rms_normalised(x: torch.Tensor) -> torch.Tensor:
    """x (B, Z) scaled to unit root-mean-square entries per row: a product of such rows has O(1)
    entries whatever the latents' scale."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-6)


def normalise_content(content: torch.Tensor) -> torch.Tensor:
    """Unit-length content vectors: only the direction carries meaning (cosine geometry)."""
    return F.normalize(content, dim=1, eps=1e-8)


class AttributePooling(nn.Module):
    """Attention pooling over each item's OWN attributes (softmax per item, padding masked out)."""

    def __init__(self, n_attributes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_attributes + 1, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, 1, bias=False)
        self._scores: tuple[tuple[object, ...], torch.Tensor] | None = None  # (parameter state, scores)

    def vocabulary_scores(self) -> torch.Tensor:
        """The score of every vocabulary entry (A+1,): an attribute's score depends on the attribute alone.

        Without autograd (serving, evaluation) the scores are kept until a parameter changes (an
        optimiser step or load_state_dict bumps its version): registering one item would otherwise
        spend half its time scoring the whole vocabulary. With autograd they are always recomputed.
        """
        if torch.is_grad_enabled():
            return self._score_vocabulary()
        params = (self.embedding.weight, self.key.weight, self.key.bias, self.query.weight)
        state = (torch.is_inference_mode_enabled(), *((p.data_ptr(), p._version) for p in params))
        cached = self._scores
        if cached is not None and cached[0] == state:
            return cached[1]
        scores = self._score_vocabulary()
        self._scores = (state, scores)
        return scores

    def _score_vocabulary(self) -> torch.Tensor:
        scores: torch.Tensor = self.query(torch.tanh(self.key(self.embedding.weight))).squeeze(-1)  # (A+1,)
        return scores

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embedding(idx)  # (B, A, H)
        real = idx > 0  # (B, A)
        # Scored once per vocabulary entry (A+1, not B·A evaluations), then normalised over each
        # item's own attributes.
        score = self.vocabulary_scores()[idx]  # (B, A)
        score = score.masked_fill(~real, float("-inf"))
        # An item with no attributes would be a row of -inf (NaN softmax): give it zero weights.
        any_real = real.any(dim=1, keepdim=True)  # (B, 1)
        weights = torch.softmax(torch.where(any_real, score, torch.zeros_like(score)), dim=1)
        weights = weights * real  # (B, A)
        return (weights[:, :, None] * emb).sum(dim=1), weights  # (B, H), (B, A)


class GaussianHead(nn.Module):
    def __init__(self, d_in: int, d_z: int, clamp: float, hidden: int = 0) -> None:
        super().__init__()
        self.clamp = clamp
        self.net: nn.Module = (
            nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 2 * d_z))
            if hidden > 0
            else nn.Linear(d_in, 2 * d_z)
        )

    def forward(self, x: torch.Tensor) -> Gaussian:
        mu, logvar = self.net(x).chunk(2, dim=1)  # (B, Z), (B, Z)
        return Gaussian(mu, logvar.clamp(-self.clamp, self.clamp))


def product_of_experts(views: list[Gaussian], masks: list[torch.Tensor]) -> Gaussian:
    """Precision-weighted PoE (paper eq. 6-7) over the available experts only.

    An item with no available expert gets the standard-normal prior, so the result stays finite.
    """
    precision = torch.zeros_like(views[0].mu)  # (B, Z)
    weighted = torch.zeros_like(views[0].mu)  # (B, Z)
    for g, m in zip(views, masks, strict=True):
        t = m[:, None].to(g.mu.dtype) / (g.logvar.exp() + POE_EPS)
        precision = precision + t
        weighted = weighted + t * g.mu
    none = (~torch.stack(masks, dim=1).any(dim=1)).to(precision.dtype)[:, None]  # (B, 1)
    precision = precision + none  # prior expert N(0, I) only where nothing else speaks
    return Gaussian(weighted / precision, (-precision.log()))


class M2VAEGenerator(nn.Module):
    neutral_user: torch.Tensor  # (D,) buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, Z, D = cfg.gen_hidden, cfg.gen_latent, cfg.item_dim
        c = cfg.logvar_clamp
        self.common_view, self.moe, self.tau = cfg.common_view, cfg.moe, cfg.gate_temperature
        self.gate_norm = cfg.gate_norm
        self.has_content_input = cfg.content_dim > 0
        self.attributes = AttributePooling(cfg.n_attributes, H)
        self.content_proj = nn.Sequential(nn.Linear(max(cfg.content_dim, 1), H), nn.Tanh())
        self.enc_id = GaussianHead(D + 1, Z, c, hidden=H)
        self.enc_a = GaussianHead(H, Z, c)
        self.enc_c = GaussianHead(H, Z, c)
        # raw view -> latent space, for the disentangling positive pair (z_v, proj(raw_v))
        self.raw_proj_a = nn.Linear(H, Z)
        self.raw_proj_c = nn.Linear(H, Z)
        # user-aware MoE (eq. 11-16); the user vector h lives in D, the views in Z
        self.user_proj = nn.Linear(D, Z, bias=False)
        self.self_gate_a = nn.Linear(Z, Z)
        self.self_gate_c = nn.Linear(Z, Z)
        self.w_a = nn.Parameter(torch.randn(Z) * Z**-0.5)
        self.w_c = nn.Parameter(torch.randn(Z) * Z**-0.5)
        self.v_com = nn.Parameter(torch.randn(Z) * Z**-0.5)
        self.view_gate = nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, 1))
        self.decoder_features = cfg.decoder_features
        self.decoder = nn.Sequential(nn.Linear(Z + 2 * H if cfg.decoder_features else Z, H), nn.Tanh(),
                                     nn.Linear(H, D + 1))
        # user-neutral gate input: population mean of training users' h, set by the trainer
        self.register_buffer("neutral_user", torch.zeros(D))
        # optional ridge path (fitted in closed form by the trainer); the decoder then adds a residual
        self.linear = LinearPath(cfg) if cfg.linear_path else None
        self.residual_scale = cfg.linear_residual if cfg.linear_path else 1.0

    def _features(self, x: ItemInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled, attn = self.attributes(x.attributes)  # (B, H), (B, A)
        proj = (self.content_proj(normalise_content(x.content)) if self.has_content_input
                else torch.zeros_like(pooled))  # (B, H)
        a = pooled * x.has_attributes[:, None]
        c = proj * (x.has_content & self.has_content_input)[:, None]
        return a, c, attn

    def _fuse(
        self, views: dict[str, Gaussian], masks: dict[str, torch.Tensor], common: Gaussian | None,
        user: torch.Tensor,
    ) -> tuple[Gaussian, dict[str, torch.Tensor]]:
        """Two-level MoE: modalities -> unique view, then unique vs common -> fused prior p(z|a,c)."""
        names = ["a", "c"]
        avail = torch.stack([masks[n] for n in names], dim=1)  # (B, 2)
        none = ~avail.any(dim=1, keepdim=True)  # (B, 1)
        up = self.user_proj(user)  # (B, Z)
        if self.moe:
            logits = []
            for n, gate, w in (("a", self.self_gate_a, self.w_a), ("c", self.self_gate_c, self.w_c)):
                u_v = up * torch.sigmoid(gate(up))  # (B, Z)
                factors = [u_v, views[n].mu] + ([common.mu] if common is not None else [])
                if self.gate_norm:
                    factors = [_rms_normalised(f) for f in factors]
                inter = functools.reduce(torch.mul, factors)  # (B, Z)
                logits.append(inter @ w)  # (B,)
            scores = torch.stack(logits, dim=1) / self.tau  # (B, 2)
        else:
            scores = torch.zeros_like(avail, dtype=up.dtype)  # plain average of the available views
        scores = scores.masked_fill(~avail, float("-inf")).masked_fill(none, 0.0)
        gates = torch.softmax(scores, dim=1) * avail  # (B, 2); zero for unavailable modalities
        mu_u = sum(gates[:, k, None] * views[n].mu for k, n in enumerate(names))
        lv_u = sum(gates[:, k, None] * views[n].logvar for k, n in enumerate(names))
        assert isinstance(mu_u, torch.Tensor) and isinstance(lv_u, torch.Tensor)
        if common is None:
            alpha = torch.zeros_like(none, dtype=up.dtype)
        elif self.moe:
            alpha = torch.sigmoid(self.view_gate(up * self.v_com))  # (B, 1)
        else:
            alpha = torch.full_like(none, 0.5, dtype=up.dtype)
        if common is not None:
            alpha = torch.where(none, torch.ones_like(alpha), alpha)  # no modality: the prior expert
            mu_f = alpha * common.mu + (1 - alpha) * mu_u
            lv_f = alpha * common.logvar + (1 - alpha) * lv_u
        else:
            mu_f = torch.where(none, torch.zeros_like(mu_u), mu_u)
            lv_f = torch.where(none, torch.zeros_like(lv_u), lv_u)
        report = {"attributes": gates[:, 0], "content": gates[:, 1], "common": alpha[:, 0]}
        return Gaussian(mu_f, lv_f), report

    def _encode(
        self, x: ItemInputs, user: torch.Tensor | None
    ) -> tuple[GeneratorOutput, torch.Tensor, torch.Tensor]:
        a, c, attn = self._features(x)
        views = {"a": self.enc_a(a), "c": self.enc_c(c)}
        masks = {"a": x.has_attributes, "c": x.has_content & self.has_content_input}
        common = product_of_experts([views["a"], views["c"]], [masks["a"], masks["c"]]) \
            if self.common_view else None
        u = user if user is not None else self.neutral_user.expand(a.shape[0], -1)
        prior, gates = self._fuse(views, masks, common, u)
        gates["attention"] = attn
        out = GeneratorOutput(
            rows=torch.empty(0), serving_rows=torch.empty(0), prior=prior, views=views, view_mask=masks,
            common=common,
            raw_projected={"a": self.raw_proj_a(a), "c": self.raw_proj_c(c)}, gates=gates,
        )
        return out, a, c

    def decode(self, z: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        rows: torch.Tensor = self.decoder(torch.cat([z, a, c], dim=1) if self.decoder_features else z)  # (B, D+1)
        return rows

    def _rows(self, linear: torch.Tensor | None, z: torch.Tensor, a: torch.Tensor, c: torch.Tensor
              ) -> torch.Tensor:
        """The decoder's row, added as a residual to the linear path's row when there is one."""
        if linear is None:
            return self.decode(z, a, c)
        return linear + self.residual_scale * self.decode(z, a, c)

    def forward_train(
        self, x: ItemInputs, target: torch.Tensor, user: torch.Tensor | None, id_drop: torch.Tensor,
        linear: torch.Tensor | None = None,
    ) -> GeneratorOutput:
        """target (B, D+1) = [V_j; b_j] detached; id_drop (B,) bool rows that use the serving path;
        linear (B, D+1) replaces the linear path's rows (the trainer's held-out ridge rows)."""
        out, a, c = self._encode(x, user)
        ident = self.enc_id(target)
        # Posterior q(z|e,a,c), paper eq. 17 read as a residual: the ID view corrects the feature
        # path's mean (mu_f + mu_e) and states its own uncertainty; KL(q||p) then charges the ID
        # view for every bit it adds beyond what attributes and content already say.
        out.posterior = Gaussian(out.prior.mu + ident.mu, ident.logvar)
        z = torch.where(id_drop[:, None], out.prior.mu, out.posterior.sample())  # (B, Z)
        if linear is None and self.linear is not None:
            linear = self.linear(x)  # (B, D+1), no gradient
        out.rows = self._rows(linear, z, a, c)
        out.serving_rows = torch.where(id_drop[:, None], out.rows, self._rows(linear, out.prior.mu, a, c))
        return out

    def embed(self, x: ItemInputs, user: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Serving path: rows (B, D+1) = F([mu_f; a; c]); user None = the neutral gate."""
        out, a, c = self._encode(x, user)
        linear = self.linear(x) if self.linear is not None else None
        return self._rows(linear, out.prior.mu, a, c), out.gates


class ContentVAE(nn.Module):
    """MD-CVAE's item content VAE: q(z_t | x) on [content; attributes], p(x | z_t); row = [mu_t; bias]."""

    neutral_user: torch.Tensor  # (D,) buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, D = cfg.gen_hidden, cfg.item_dim
        self.has_content_input = cfg.content_dim > 0
        self.content_in = nn.Linear(max(cfg.content_dim, 1), H)
        # first layer over the attribute multi-hot, as an embedding sum
        self.attribute_in = nn.Embedding(cfg.n_attributes + 1, H, padding_idx=0)
        self.enc = GaussianHead(H, D, cfg.logvar_clamp, hidden=H)
        self.bias_head = nn.Linear(D, 1)
        self.dec = nn.Sequential(nn.Linear(D, H), nn.Tanh())
        self.content_out = nn.Linear(H, max(cfg.content_dim, 1))
        self.attribute_out = nn.Linear(H, cfg.n_attributes + 1)
        self.register_buffer("neutral_user", torch.zeros(D))  # unused; same state layout as M2VAE

    def _posterior(self, x: ItemInputs) -> Gaussian:
        real = (x.attributes > 0) & x.has_attributes[:, None]  # (B, A)
        n = real.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        first = (self.attribute_in(x.attributes) * real[:, :, None]).sum(dim=1) / n.sqrt()  # (B, H)
        if self.has_content_input:
            first = first + self.content_in(normalise_content(x.content)) * x.has_content[:, None]
        q: Gaussian = self.enc(torch.tanh(first))
        return q

    def _row(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, self.bias_head(z)], dim=1)  # (B, D+1)

    def forward_train(
        self, x: ItemInputs, target: torch.Tensor, user: torch.Tensor | None, id_drop: torch.Tensor,
        linear: torch.Tensor | None = None,
    ) -> GeneratorOutput:
        q = self._posterior(x)
        z = q.sample()
        hidden = self.dec(z)  # (B, H)
        return GeneratorOutput(
            rows=self._row(z), serving_rows=self._row(q.mu), prior=q,
            content_recon=self.content_out(hidden),
            attribute_logits=self.attribute_out(hidden),
        )

    def embed(self, x: ItemInputs, user: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = self._posterior(x)
        return self._row(q.mu), {}
