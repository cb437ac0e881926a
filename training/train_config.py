"""The trainer's settings: the defaults ARE the shipped model (training/presets.py names the experiments).
One file of its own so that the steps (training/steps.py) and the loop (training/train.py) share it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from service.model import ModelConfig


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
    # serve m2rec with the collaborative part beside it (service/model/collaborative.py): ALS factors for
    # trained items, a ridge map for new ones, mixed per user; its settings and weight chosen on validation
    collaborative: bool = True
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
    # b-step softmaxes over the batch's own items plus this many items drawn at random (0: over every
    # trained item, the shipped model): for catalogues whose full softmax dominates an epoch
    # (benchmarks/results/distributed.md)
    sampled_items: int = 0
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
