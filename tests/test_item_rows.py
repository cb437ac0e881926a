"""The trainer's generated rows: batched by padded attribute slots, in the caller's order."""

from __future__ import annotations

import numpy as np
import torch

from service.core.embedder import load_model
from service.model.artifact import load_artifact
from tests.conftest import TrainedArtifact
from training.item_rows import _batches, generated_rows
from training.train_data import prepare


def test_batches_cover_the_order_once_within_both_bounds() -> None:
    rng = np.random.default_rng(0)
    widths = np.sort(np.concatenate([rng.integers(0, 10, 5000), rng.integers(40, 163, 60)]))  # a long tail
    order = rng.permutation(widths.size)  # any item indices, listed by ascending width
    batches = _batches(order, widths, batch=512, slots=2048)
    np.testing.assert_array_equal(np.concatenate(batches), order)
    at = 0
    for part in batches:
        n, width = part.size, max(1, int(widths[at + part.size - 1]))
        assert n <= 512
        assert n * width <= 2048 or n == 1
        if at + n < widths.size:  # each batch is as long as the bounds allow: one more item would break one
            assert n == 512 or (n + 1) * max(1, int(widths[at + n])) > 2048
        at += n
    assert batches[0].size == 512  # narrow items: the item bound
    assert len(batches) > 5060 // 512 + 1  # the 60 wide ones: at most 2048 // 40 = 51, down to 2048 // 162 = 12


def test_narrow_catalogues_keep_whole_batches() -> None:
    widths = np.sort(np.random.default_rng(1).integers(0, 6, 10_000))
    assert [p.size for p in _batches(np.arange(10_000), widths, batch=4096, slots=4096 * 16)] == [4096, 4096, 1808]


def test_generated_rows_do_not_depend_on_how_the_items_are_batched(trained_artifact: TrainedArtifact) -> None:
    model = load_model(load_artifact(trained_artifact.root / "current"))
    data = prepare(trained_artifact.dataset, trained_artifact.split)
    items = np.random.default_rng(2).permutation(data.attributes.shape[0])[:700]
    with torch.inference_mode():
        whole = generated_rows(model, data, items, batch=10_000, slots=10**9).numpy()  # one batch
        small = generated_rows(model, data, items, batch=64, slots=300).numpy()
        alone = torch.cat([model.embed_items(data.inputs(items[j : j + 1]))[0] for j in range(20)]).numpy()
    assert whole.shape == (700, model.config.item_dim + 1)
    # the same rows up to the float rounding of a sum over a different padding width
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone, whole[:20], rtol=1e-5, atol=1e-6)
