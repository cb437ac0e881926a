"""benchmarks/generator_closeness.py on an exported artifact: the rows it compares are the service's
own (Recommender.embed) and they are the trainer's generated rows for the same items."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.generator_closeness import served_rows
from service.core.embedder import load_model
from service.model.artifact import load_artifact
from tests.conftest import TrainedArtifact
from training.item_rows import generated_rows
from training.train_data import prepare


def test_closeness_of_an_artifact_compares_the_served_rows_with_the_trained_ones(
    trained_artifact: TrainedArtifact,
) -> None:
    generated, trained = served_rows(trained_artifact.root / "current", trained_artifact.dataset)
    model = load_model(load_artifact(trained_artifact.root / "current"))
    data = prepare(trained_artifact.dataset, trained_artifact.split)
    with torch.inference_mode():
        expected = generated_rows(model, data, data.warm).numpy()  # (J, D+1), the trainer's view
        expected_trained = model.item_rows().numpy()
    assert generated.shape == trained.shape == (data.warm.size, model.config.item_dim + 1)
    np.testing.assert_allclose(generated, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trained, expected_trained)
    assert not np.allclose(generated, trained, atol=1e-3)  # two different rows per item, not one read twice
