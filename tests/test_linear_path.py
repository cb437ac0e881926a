"""The generator's ridge path: the closed-form fit, missing modalities, gradients, old artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.model import M2Rec, ModelConfig
from service.model.generator import M2VAEGenerator
from service.model.inputs import ItemInputs
from service.model.linear_path import ATTRIBUTES, BOTH, CONTENT, NOTHING
from tests.test_train import TINY, tiny_dataset
from training.linear_fit import LinearFit
from training.split import cold_start_split
from training.train_data import TrainingData, prepare

D = 8
RIDGE = 0.5


def fitted(residual: float = 1.0) -> tuple[M2Rec, TrainingData, torch.Tensor]:
    dataset = tiny_dataset()
    data = prepare(dataset, cold_start_split(dataset, seed=0))
    data.attributes[data.warm[0]] = 0  # one warm item without attributes
    data.attribute_counts[data.warm[0]] = 0
    torch.manual_seed(0)
    cfg = ModelConfig(n_warm=data.warm.size, n_attributes=len(data.vocabulary), content_dim=data.content_dim,
                      item_dim=D, user_latent=4, gen_hidden=8, gen_latent=4, linear_path=True,
                      linear_residual=residual, linear_attribute_weight=0.7)
    model = M2Rec(cfg).eval()
    targets = torch.randn(data.warm.size, D + 1)
    gen = model.generator
    assert isinstance(gen, M2VAEGenerator) and gen.linear is not None
    LinearFit(data, gen.linear, RIDGE).refit(targets)
    return model, data, targets


def design(data: TrainingData, items: np.ndarray, use_a: bool, use_c: bool) -> np.ndarray:
    """The features written out by hand: [w·multi-hot/√n, c/‖c‖, 1]."""
    blocks = []
    if use_a:
        hot = np.zeros((items.size, len(data.vocabulary) + 1))
        for r, j in enumerate(items):
            toks = data.attributes[j][data.attributes[j] > 0]
            hot[r, toks] = 0.7 / np.sqrt(max(toks.size, 1))
        blocks.append(hot)
    if use_c:
        assert data.content is not None
        c = data.content[torch.from_numpy(items)].double().numpy()
        blocks.append(c / np.linalg.norm(c, axis=1, keepdims=True))
    blocks.append(np.ones((items.size, 1)))
    return np.hstack(blocks)


@pytest.mark.parametrize(("use_a", "use_c"), [(True, True), (True, False), (False, True)])
def test_each_pattern_is_the_ridge_solution_on_the_items_that_have_its_modalities(use_a: bool, use_c: bool) -> None:
    model, data, targets = fitted(residual=0.0)  # rows = the linear path alone
    has_a = data.attribute_counts[data.warm] > 0
    member = has_a if use_a else np.ones(data.warm.size, dtype=bool)
    X = design(data, data.warm[member], use_a, use_c)
    penalty = np.full(X.shape[1], RIDGE)
    penalty[-1] = 0.0  # the intercept is not shrunk
    W = np.linalg.solve(X.T @ X + np.diag(penalty), X.T @ targets.double().numpy()[member])
    x = data.inputs(data.warm[member])
    x.has_attributes &= use_a
    x.has_content &= use_c
    with torch.no_grad():
        rows, _ = model.embed_items(x)
    assert np.allclose(rows.numpy(), X @ W, atol=1e-4)


def test_missing_modality_uses_its_own_map_and_ignores_the_absent_input() -> None:
    model, data, targets = fitted()
    gen = model.generator
    assert isinstance(gen, M2VAEGenerator) and gen.linear is not None
    x = data.inputs(data.warm[1:5])
    x.has_attributes = torch.tensor([True, True, False, False])
    x.has_content = torch.tensor([True, False, True, False])
    assert gen.linear.patterns(x).tolist() == [BOTH, ATTRIBUTES, CONTENT, NOTHING]
    with torch.no_grad():
        rows, _ = model.embed_items(x)
        x2 = ItemInputs(x.attributes.clone(), x.content.clone(), x.has_attributes, x.has_content)
        x2.attributes[2:] = 0  # items 2, 3 have no attributes: their indices must not matter
        x2.content[[1, 3]] += 5.0  # ... and items 1, 3 no content
        rows2, _ = model.embed_items(x2)
        linear = gen.linear(x)
    assert torch.isfinite(rows).all()
    assert torch.allclose(rows, rows2, atol=1e-6)
    assert torch.allclose(linear[3], targets.mean(dim=0), atol=1e-5)  # nothing known: the mean row
    assert not torch.allclose(linear[0], linear[1])  # the two maps differ


def test_gradients_reach_the_decoder_but_not_the_fitted_map() -> None:
    model, data, targets = fitted()
    gen = model.generator
    assert isinstance(gen, M2VAEGenerator) and gen.linear is not None
    model.train()
    x = data.inputs(data.warm[:6])
    out = gen.forward_train(x, targets[:6], None, torch.tensor([True, False] * 3))
    (out.rows - targets[:6]).pow(2).sum().backward()  # type: ignore[no-untyped-call]
    assert all(not b.requires_grad for b in gen.linear.buffers())
    first = gen.decoder[0]
    assert isinstance(first, torch.nn.Linear)
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert gen.attributes.embedding.weight.grad is not None
    assert torch.isfinite(out.serving_rows).all()


def test_residual_scale_zero_serves_the_ridge_row_alone() -> None:
    model, data, _ = fitted(residual=0.0)
    gen = model.generator
    assert isinstance(gen, M2VAEGenerator) and gen.linear is not None
    x = data.inputs(data.warm[:4])
    with torch.no_grad():
        assert torch.allclose(model.embed_items(x)[0], gen.linear(x))


def test_without_the_flag_the_state_has_no_linear_tensors() -> None:
    """The no-ridge ablation's artifact holds only the decoder: nothing of the ridge is saved or loaded."""
    cfg = ModelConfig(n_warm=5, n_attributes=3, content_dim=2, item_dim=D, linear_path=False)
    state = M2Rec(cfg).state_dict()
    assert not any("linear" in k for k in state)
    M2Rec(ModelConfig(**cfg.to_dict())).load_state_dict(state)  # strict
    shipped = ModelConfig(n_warm=5, n_attributes=3, content_dim=2, item_dim=D)
    assert any("linear" in k for k in M2Rec(shipped).state_dict())


def test_linear_path_is_refused_for_the_content_vae() -> None:
    with pytest.raises(ValueError, match="linear_path"):
        ModelConfig(n_warm=3, n_attributes=2, content_dim=0, generator="content-vae", linear_path=True)


def test_exported_artifact_serves_identical_rows_for_every_modality_pattern(tmp_path: Path) -> None:
    from service.core.embedder import load_model
    from service.model.artifact import load_artifact
    from training.export import export_artifact
    from training.train import TrainConfig, train

    dataset = tiny_dataset()
    cfg = TrainConfig(seed=0, linear_path=True, **TINY)  # type: ignore[arg-type]
    result = train(dataset, cold_start_split(dataset, seed=0), cfg)
    served = load_model(load_artifact(export_artifact(result, dataset, "tiny", tmp_path, {})))
    x = result.data.inputs(np.arange(dataset.n_items))
    for has_a, has_c in ((True, True), (True, False), (False, True)):
        x.has_attributes = x.has_attributes & has_a
        x.has_content = x.has_content & has_c
        with torch.no_grad():
            assert torch.equal(served.embed_items(x)[0], result.model.embed_items(x)[0])


def held_out_fit() -> tuple[TrainingData, ModelConfig, M2VAEGenerator, LinearFit]:
    """A linear path on the tiny data with leverages (held-out rows), not yet fitted."""
    dataset = tiny_dataset()
    data = prepare(dataset, cold_start_split(dataset, seed=0))
    cfg = ModelConfig(n_warm=data.warm.size, n_attributes=len(data.vocabulary), content_dim=data.content_dim,
                      item_dim=D, linear_path=True, linear_attribute_weight=0.7)
    gen = M2Rec(cfg).generator
    assert isinstance(gen, M2VAEGenerator) and gen.linear is not None
    return data, cfg, gen, LinearFit(data, gen.linear, RIDGE, held_out=True)


def test_held_out_rows_are_the_leave_one_out_ridge_predictions() -> None:
    data, _, _, fit = held_out_fit()
    targets = torch.randn(data.warm.size, D + 1, generator=torch.Generator().manual_seed(2))
    fit.refit(targets)
    rows = np.array([0, 3, 7])
    for pattern, (use_a, use_c) in ((BOTH, (True, True)), (CONTENT, (False, True))):
        got = fit.held_out(rows, torch.full((3,), pattern)).double().numpy()
        X, Y = design(data, data.warm, use_a, use_c), targets.double().numpy()
        penalty = np.full(X.shape[1], RIDGE)
        penalty[-1] = 0.0
        for k, j in enumerate(rows):
            keep = np.arange(X.shape[0]) != j  # refit without row j
            W = np.linalg.solve(X[keep].T @ X[keep] + np.diag(penalty), X[keep].T @ Y[keep])
            assert np.allclose(got[k], X[j] @ W, atol=1e-4)


def test_held_out_shift_turns_served_rows_into_leave_one_out_rows() -> None:
    """The b-step's generated-row likelihood scores warm items by their served linear row plus
    `held_out_shift`: that sum is the row a refit without the item serves for it."""
    data, cfg, gen, fit = held_out_fit()
    assert gen.linear is not None
    x = data.inputs(data.warm)
    patterns = gen.linear.patterns(x)
    assert not fit.held_out_shift(patterns).any()  # nothing fitted yet: no shift
    targets = torch.randn(data.warm.size, D + 1, generator=torch.Generator().manual_seed(3))
    fit.refit(targets)
    with torch.no_grad():
        served = gen.linear(x) + fit.held_out_shift(patterns)  # (J, D+1)
    for j in (0, 5):
        keep = np.arange(data.warm.size) != j
        alone = M2Rec(cfg).generator
        assert isinstance(alone, M2VAEGenerator) and alone.linear is not None
        without_j = TrainingData(**{**vars(data), "warm": data.warm[keep]})
        LinearFit(without_j, alone.linear, RIDGE).refit(targets[torch.from_numpy(keep)])
        with torch.no_grad():
            expected = alone.linear(data.inputs(data.warm[[j]]))[0]
        assert torch.allclose(served[j], expected, atol=1e-5)
