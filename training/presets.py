"""Named experiments: TrainConfig overrides, one entry each. The TrainConfig defaults ARE the shipped
model (`m2rec`); everything else here is an ablation of one of its components or a peer built from
the same trainer, named by what it changes. In the harness these are m2rec alone; the shipped model
with its collaborative part beside it (what `python -m training.train` exports) is `m2rec+als`
(training/ensemble.py).

    python -m training.evaluate --dataset data/ml-100k --models m2rec,m2rec-no-moe --seeds 3
    python -m training.train --dataset data/ml-100k --out artifacts --preset m2rec-no-moe
"""

from __future__ import annotations

from typing import Any

# each of the shipped model's components switched off (README, "What earns its place")
ABLATIONS: dict[str, dict[str, Any]] = {
    "m2rec-no-common": {"common_view": False},  # M2VAE's Product-of-Experts common view
    "m2rec-no-disentangle": {"disentangle": False},  # M2VAE's disentangled contrastive loss
    "m2rec-no-moe": {"moe": False},  # M2VAE's user-aware two-level Mixture-of-Experts fusion
    "m2rec-no-cooccurrence": {"cooccurrence": False},  # M2VAE's co-occurrence contrastive loss
    "m2rec-no-surrogate": {"surrogate_weight": 0.0},  # MDsym's surrogate ranking of generated rows
    "m2rec-no-ridge": {"linear_path": False},  # the generator's closed-form ridge path (the decoder makes the row)
}

PRESETS: dict[str, dict[str, Any]] = {
    "m2rec": {},
    **ABLATIONS,
    # the MD-CVAE paper's model: the same user auto-encoder with its plain content VAE as the generator
    "mdsym-content-vae": {"generator": "content-vae", "linear_path": False},
}
