"""Trained model → artifact directory (service/model/artifact.py), the one format the service loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.model.artifact_export import save_artifact
from training.dataset import Dataset

log = logging.getLogger(__name__)


def held_out_items(dataset: Dataset, warm: np.ndarray) -> list[str]:
    """Ids of the dataset's items that have interactions but no trained row (`warm`: the trained
    items' indices): the split's evaluation items. Logged with their count, never dropped in silence:
    a deployment that registers them serves them as new items."""
    active = np.unique(dataset.interactions[:, 1])
    held = np.setdiff1d(active, warm)
    if held.size:
        log.warning("%d of the %d items with interactions in %s are held out of training (the split's test and "
                    "validation items) and get no trained row: registered through POST /items they are served "
                    "as new items and flagged held_out", held.size, active.size, dataset.name)
    return [dataset.item_ids[j] for j in held.tolist()]


def export_artifact(
    result: Any,  # training.train.TrainResult (typed loosely: train.py imports this module)
    dataset: Dataset,
    data_fingerprint: str,
    root: Path,
    metrics: dict[str, Any],
    activate: bool = True,
) -> Path:
    """Write the model, its config, vocabulary and warm ids as a new version under `root`.

    The tensors are the whole state dict: generator, user encoder/decoder, the warm rows of V
    with their biases, the neutral user vector used for the index's user-neutral gate and the new
    items' bias weight; the manifest carries the validation-chosen mixing policy (`result.policy`).
    `activate=False` exports a candidate without moving `current`.
    """
    model = result.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_artifact(
        root,
        tensors=state,
        item_ids=[dataset.item_ids[j] for j in result.data.warm],
        model_config=model.config.to_dict(),
        attribute_vocabulary=list(result.data.vocabulary.tokens),
        content_dim=int(result.data.content_dim),
        embedding_dim=int(model.config.row_dim),
        metrics=metrics,
        mixing=result.policy.to_dict(),
        data_fingerprint=data_fingerprint,
        dataset=dataset.name,
        held_out_items=held_out_items(dataset, result.data.warm),
        activate=activate,
    )
