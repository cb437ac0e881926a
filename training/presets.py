"""Named experiment presets: TrainConfig overrides. The TrainConfig defaults ARE the shipped model
("m2rec"); every other entry is an experiment or an ablation, named by what it changes."""

from __future__ import annotations

from typing import Any

DENSE_B: dict[str, Any] = {"lr_gen": 1e-3, "feature_dropout": 0.3, "b_passes": 4, "recon_weight": 30.0, "epochs": 20}

# session 5's full model: dense-b + ridge path, D = Ku = 128, and the b-step likelihood of the users'
# items scored by their (leave-one-out) generated rows (benchmarks/results/model-tuning.md, round 5)
GEN_NLL: dict[str, Any] = {**DENSE_B, "linear_path": True, "item_dim": 128, "user_latent": 128,
                           "generated_likelihood": 1.0}

GATED: dict[str, Any] = {**GEN_NLL, "gate_norm": True}

# M2VAE's components, each switched off: (variant name suffix, TrainConfig overrides)
ABLATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("-no-common", {"common_view": False}), ("-no-disentangle", {"disentangle": False}),
    ("-no-cooccurrence", {"cooccurrence": False}), ("-no-moe", {"moe": False}), ("-no-rank", {"rank_weight": 0.0}))

# name -> TrainConfig overrides; "m2rec" is the full model of the TrainConfig defaults
PRESETS: dict[str, dict[str, Any]] = {
    "m2rec": {},
    "m2rec-no-common": {"common_view": False},
    "m2rec-no-disentangle": {"disentangle": False},
    "m2rec-no-cooccurrence": {"cooccurrence": False},
    "m2rec-no-moe": {"moe": False},
    "m2rec-no-rank": {"rank_weight": 0.0},
    "mdsym-content-vae": {"generator": "content-vae"},
    # from the tuning round (benchmarks/results/model-tuning.md): slower, regularised generator; surrogate loss
    # (these earlier rounds' variants are pinned to what they ran: no linear path)
    "m2rec-surrogate": {"surrogate_weight": 1.0, "linear_path": False},
    "m2rec-slow-gen": {"lr_gen": 1e-3, "feature_dropout": 0.3, "linear_path": False},
    "m2rec-slow-gen-surrogate": {"lr_gen": 1e-3, "feature_dropout": 0.3, "surrogate_weight": 1.0, "linear_path": False},
    # issue 3 round: V trained with 4 b-step passes an epoch, the generator regressed onto it (recon-heavy)
    "m2rec-dense-b": {**DENSE_B, "linear_path": False},
    # round 4: a closed-form ridge path inside the generator (+ the decoder as a residual, or the ridge row alone)
    "m2rec-linear": {**DENSE_B, "linear_path": True},
    "m2rec-linear-held-out": {**DENSE_B, "linear_path": True, "linear_held_out": True},
    "m2rec-linear-only": {**DENSE_B, "linear_path": True, "linear_residual": 0.0},
    "m2rec-linear-only-d128": {**DENSE_B, "linear_path": True, "linear_residual": 0.0, "item_dim": 128},
    # session 5: the full model with a wider table and user latent (D = Ku = 128)
    "m2rec-linear-d128": {**DENSE_B, "linear_path": True, "item_dim": 128, "user_latent": 128},
    # + the b-step likelihood of the users' items scored by their generated rows (training/losses.py)
    "m2rec-linear-gen-nll": {**DENSE_B, "linear_path": True, "generated_likelihood": 1.0},
    "m2rec-linear-d128-gen-nll": GEN_NLL,
    # its ablations (m2rec-linear-d128 is the one without the generated-row likelihood)
    "m2rec-gen-nll-no-common": {**GEN_NLL, "common_view": False},
    "m2rec-gen-nll-no-disentangle": {**GEN_NLL, "disentangle": False},
    "m2rec-gen-nll-no-cooccurrence": {**GEN_NLL, "cooccurrence": False},
    "m2rec-gen-nll-no-moe": {**GEN_NLL, "moe": False},
    "m2rec-gen-nll-no-rank": {**GEN_NLL, "rank_weight": 0.0},
    "m2rec-gen-nll-no-linear": {**GEN_NLL, "linear_path": False},
    # the decoder from z alone (F(z) instead of F([z; a; c])): a row reaches the item only through its latent
    "m2rec-gen-nll-z-decoder": {**GEN_NLL, "decoder_features": False},
    "m2rec-gen-nll-z-decoder-no-moe": {**GEN_NLL, "decoder_features": False, "moe": False},
    "m2rec-gen-nll-z-decoder-no-common": {**GEN_NLL, "decoder_features": False, "common_view": False},
    # session 6: the modality gate on RMS-normalised factors (its logits no longer vanish), and its ablations
    # (its no-MoE ablation is m2rec-gen-nll-no-moe: gate_norm acts only inside the MoE)
    "m2rec-gated": GATED,
    **{f"m2rec-gated{suffix}": {**GATED, **switch} for suffix, switch in ABLATIONS if suffix != "-no-moe"},
    "m2rec-gated-z-decoder": {**GATED, "decoder_features": False},
    # session 7: + MDsym's surrogate ranking loss (weight 1, its value since round 2): generated rows ranked
    # among the trained rows of every other warm item, so new items reach an all-items top-k
    "m2rec-gated-surrogate": {**GATED, "surrogate_weight": 1.0},
    **{f"m2rec-gated-surrogate{suffix}": {**GATED, "surrogate_weight": 1.0, **switch} for suffix, switch in ABLATIONS},
    # without the ridge path the M2VAE generator makes the whole row (the paper's setting): its ablations there
    # (and with the decoder from z alone, where every component acts on all the generator makes)
    **{f"m2rec-gated-no-linear{decoder}{ablation}": {**GATED, "linear_path": False, **z, **switch}
       for decoder, z in (("", {}), ("-z-decoder", {"decoder_features": False}))
       for ablation, switch in (("", {}), *ABLATIONS)},
    # the MD-CVAE paper's model (plain content VAE as the generator) with the same training settings
    "mdsym-content-vae-gen-nll": {**GEN_NLL, "generator": "content-vae"},
    # the ablations of m2rec-linear, the best full model (m2rec-dense-b is the one without the ridge path)
    "m2rec-linear-no-common": {**DENSE_B, "linear_path": True, "common_view": False},
    "m2rec-linear-no-disentangle": {**DENSE_B, "linear_path": True, "disentangle": False},
    "m2rec-linear-no-cooccurrence": {**DENSE_B, "linear_path": True, "cooccurrence": False},
    "m2rec-linear-no-moe": {**DENSE_B, "linear_path": True, "moe": False},
    "m2rec-linear-no-rank": {**DENSE_B, "linear_path": True, "rank_weight": 0.0},
}
PRESETS["m2rec-gs-loo"] = {**GATED, "surrogate_weight": 1.0, "leave_out": True}
