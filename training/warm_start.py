"""Start a production refit from the model trained on the validation carve-out.

The refit (training/train.py, `main`) trains on every interaction: the items that were pseudo-cold in
the validation run now get trained rows, and the vocabulary may grow by their attribute tokens. Every
weight whose shape is unchanged is copied; rows of the item table are copied by item, and an item new
to the table starts at its generated row (what the validation run served for it); attribute
embeddings are copied by token, a new token starts at zero (no opinion). The ridge path is refitted
in closed form at the first t-step, so it is left as built. Starting here rather than from scratch
keeps the refit short and the validation-chosen mixing policy meaningful for the refitted model.
"""

from __future__ import annotations

import numpy as np
import torch

from service.model import M2Rec
from service.model.generator import M2VAEGenerator
from training.item_rows import generated_rows
from training.train_data import TrainingData

ITEM_ROWS = ("user.V", "user.b")
TOKEN_ROWS = ("generator.attributes.embedding.weight",)
REFITTED = ("generator.linear.",)  # solved in closed form at every t-step
CHOSEN_AFTER = ("new_bias_weight",)  # 1 while training; the validation run's choice is set after the refit


@torch.no_grad()
def warm_start(model: M2Rec, data: TrainingData, init_model: M2Rec, init_data: TrainingData) -> None:
    """Copy `init_model` (trained on `init_data`) into `model`, a fresh model of the refit's `data`."""
    if not isinstance(model.generator, M2VAEGenerator):
        raise ValueError("a warm-started refit needs the m2vae generator")
    old = init_model.state_dict()
    state = model.state_dict()
    for name, tensor in state.items():
        if name in ITEM_ROWS or name in TOKEN_ROWS or name in CHOSEN_AFTER or name.startswith(REFITTED):
            continue
        if old[name].shape != tensor.shape:
            raise ValueError(f"warm start: {name} is {tuple(old[name].shape)} in the validation run and "
                             f"{tuple(tensor.shape)} here; the two runs must share the model config")
        tensor.copy_(old[name])
    # item rows: by item; an item the validation run held out starts at its generated row
    at = {int(item): r for r, item in enumerate(init_data.warm)}
    known = np.array([at.get(int(item), -1) for item in data.warm])
    rows = torch.empty(data.warm.size, model.config.item_dim + 1)
    trained = init_model.item_rows()
    rows[torch.from_numpy(known >= 0)] = trained[torch.from_numpy(known[known >= 0])]
    new = np.flatnonzero(known < 0)
    if new.size:
        rows[torch.from_numpy(new)] = generated_rows(init_model, init_data, data.warm[new])
    state["user.V"].copy_(rows[:, :-1])
    state["user.b"].copy_(rows[:, -1])
    # attribute embeddings: by token (index 0 is padding in both vocabularies)
    old_index = init_data.vocabulary.index
    for name in TOKEN_ROWS:
        table = state[name]
        table.zero_()
        for token, k in data.vocabulary.index.items():
            if token in old_index:
                table[k] = old[name][old_index[token]]
    model.load_state_dict(state)
