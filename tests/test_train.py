"""A tiny real training run: determinism, checkpoint round trip, the harness adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.embedder import load_model
from service.model import M2Rec, item_inputs
from service.model.artifact import load_artifact
from service.model.generator import M2VAEGenerator
from training.dataset import Dataset
from training.m2rec_recommender import M2RecRecommender
from training.presets import PRESETS
from training.protocol import evaluate, hybrid
from training.split import cold_start_split
from training.train import TrainConfig, load_checkpoint, save_checkpoint, train, validate

TINY = {"b_min_steps": 1, "item_dim": 8, "user_latent": 4, "gen_hidden": 8, "gen_latent": 4, "batch_users": 16,
        "batch_items": 16, "epochs": 2, "eval_every": 1, "progress": False, "co_negatives": 4}


def tiny_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 60
    groups = rng.integers(0, 3, n_items)  # items of a group share attributes and content
    centres = rng.normal(size=(3, 5)).astype(np.float32)
    inter = {(u, int(i)) for u in range(n_users)
             for i in rng.choice(np.flatnonzero(groups == u % 3), size=5, replace=False)}
    return Dataset(
        name="tiny",
        item_ids=[f"i{i}" for i in range(n_items)],
        item_attributes=[[f"g:{groups[i]}", f"t:{i % 4}"] for i in range(n_items)],
        user_ids=[f"u{u}" for u in range(n_users)],
        interactions=np.array(sorted(inter), dtype=np.int64),
        features=(centres[groups] + 0.1 * rng.normal(size=(n_items, 5))).astype(np.float32),
    )


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return tiny_dataset()


def test_same_seed_gives_identical_parameters(dataset: Dataset) -> None:
    split = cold_start_split(dataset, seed=0)
    a = train(dataset, split, TrainConfig(seed=3, **TINY)).model.state_dict()  # type: ignore[arg-type]
    b = train(dataset, split, TrainConfig(seed=3, **TINY)).model.state_dict()  # type: ignore[arg-type]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("linear_path", [False, True])
def test_checkpoint_reloads_to_identical_outputs(dataset: Dataset, tmp_path: Path, linear_path: bool) -> None:
    split = cold_start_split(dataset, seed=0)
    result = train(dataset, split, TrainConfig(seed=0, linear_path=linear_path, **TINY))  # type: ignore[arg-type]
    model, meta = load_checkpoint(save_checkpoint(result, dataset, tmp_path / "ck"))
    assert meta["warm_item_ids"] == [dataset.item_ids[j] for j in result.data.warm]
    attrs, unknown = result.data.vocabulary.encode([["g:1", "t:2", "new:x"]])
    assert unknown == [["new:x"]]
    x = item_inputs(attrs, torch.ones(1, 5), content_dim=5)
    with torch.no_grad():
        assert torch.equal(model.embed_items(x)[0], result.model.embed_items(x)[0])
        rows = model.item_rows()[:3][None]
        mask = torch.ones(1, 3, dtype=torch.bool)
        assert torch.equal(model.fold_in(rows, mask), result.model.fold_in(rows, mask))
        assert torch.equal(model.generator.neutral_user, result.model.generator.neutral_user)
        only_content = item_inputs(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 5), content_dim=5)
        only_attributes = item_inputs(attrs, None, content_dim=5)
        for inputs in (only_content, only_attributes):
            assert torch.equal(model.embed_items(inputs)[0], result.model.embed_items(inputs)[0])
            assert torch.isfinite(model.embed_items(inputs)[0]).all()
    if linear_path:  # the fitted map is part of the checkpoint and not left at zero
        assert isinstance(model.generator, M2VAEGenerator) and model.generator.linear is not None
        assert model.generator.linear.intercept.abs().sum() > 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_and_scores_every_candidate_finitely(dataset: Dataset, preset: str) -> None:
    split = cold_start_split(dataset, seed=1)
    rec = M2RecRecommender.preset(preset, **TINY)
    rec.fit(dataset, split)
    task = hybrid(split)
    scores = rec.score(task.users[:5], task.candidates, task.history)
    assert scores.shape == (min(5, task.users.size), task.candidates.size)
    assert np.isfinite(scores).all()
    assert set(evaluate(rec, task)) >= {"recall@20", "ndcg@20", "cold_share@20"}
    assert rec.policy is not None and rec.params["policy"] == rec.policy.to_dict()


def test_the_new_bias_weight_is_chosen_on_validation_and_scales_only_new_items_bias(dataset: Dataset) -> None:
    split = cold_start_split(dataset, seed=0)
    result = train(dataset, split, TrainConfig(seed=0, **{**TINY, "new_bias_weights": (1.0, 4.0)}))  # type: ignore[arg-type]
    weight = float(result.model.new_bias_weight)
    assert weight in (1.0, 4.0) and result.best_val["new_bias_weight"] == weight
    # the choice scores every weight at once; the chosen one's figures are what validating it alone gives
    assert result.best_val == {**validate(result.model, result.data, split).metrics, "new_bias_weight": weight}
    x = item_inputs(result.data.vocabulary.encode([["g:1"]])[0], torch.ones(1, 5), content_dim=5)
    with torch.no_grad():
        row = result.model.embed_items(x)[0]
        result.model.new_bias_weight.fill_(1.0)
        plain = result.model.embed_items(x)[0]
    assert torch.equal(row[:, :-1], plain[:, :-1]) and torch.allclose(row[:, -1], weight * plain[:, -1])


def test_b_passes_give_more_user_updates(dataset: Dataset) -> None:
    """b_passes > 1 trains the item table V further in the same number of epochs (nothing else changes)."""
    split = cold_start_split(dataset, seed=0)
    cfg = {**TINY, "epochs": 1, "lr_gen": 0.0, "lambda_v": 0.0}
    one = train(dataset, split, TrainConfig(seed=0, b_passes=1, **cfg))  # type: ignore[arg-type]
    three = train(dataset, split, TrainConfig(seed=0, b_passes=3, **cfg))  # type: ignore[arg-type]
    torch.manual_seed(0)  # train() seeds torch the same way before building the model
    init = M2Rec(one.model.config).user.V
    moved_one = (one.model.user.V - init).norm()
    moved_three = (three.model.user.V - init).norm()
    assert moved_three > moved_one > 0


def test_train_cli_exports_a_production_model_with_every_item_trained(dataset: Dataset, tmp_path: Path) -> None:
    """`python -m training.train`: a validation run chooses the policy, a refit on every interaction
    gives every item with interactions a trained row; a preset and flags override the defaults."""
    import json

    from training.dataset import save_dataset
    from training.train import main

    data_dir = save_dataset(dataset, tmp_path / "tiny")
    tiny = ["--epochs", "2", "--eval-every", "1", "--refit-epochs", "1", "--gen-hidden", "8", "--gen-latent", "4",
            "--batch-users", "16", "--batch-items", "16", "--co-negatives", "4", "--user-latent", "4",
            "--new-bias-weights", "1,2", "--progress", "false"]
    main(["--dataset", str(data_dir), "--out", str(tmp_path / "a"), "--preset", "m2rec-no-moe", "--item-dim", "8",
          *tiny])
    manifest = json.loads(next((tmp_path / "a").glob("2*/manifest.json")).read_text())
    assert manifest["model_config"]["item_dim"] == 8  # the flag
    assert manifest["model_config"]["moe"] is False  # the preset
    assert manifest["n_warm_items"] == np.unique(dataset.interactions[:, 1]).size  # every item trained
    assert manifest["mixing"] == manifest["metrics"]["validation"]["policy"]
    assert manifest["metrics"]["validation"]["hybrid"]["new_bias_weight"] in (1.0, 2.0)
    # the shipped model serves the collaborative part beside m2rec, its weight chosen on validation
    factors = manifest["model_config"]["collaborative_factors"]
    assert factors > 0 and manifest["embedding_dim"] == 8 + 1 + factors
    assert 0.0 <= manifest["metrics"]["collaborative"]["m2rec_weight"] <= 1.0
    chosen = manifest["metrics"]["collaborative"]
    part = load_model(load_artifact(next((tmp_path / "a").glob("2*")))).collaborative
    assert part is not None  # the served weights are the chosen ones, new items' own included
    assert (float(part.weight), float(part.new_weight)) == (chosen["m2rec_weight"], chosen["m2rec_new_weight"])
    assert manifest["metrics"]["collaborative"]["policy"] == manifest["mixing"]
    with pytest.raises(SystemExit):
        main(["--dataset", str(data_dir), "--out", str(tmp_path / "b"), "--preset", "no-such-preset"])


def test_a_sampled_softmax_trains_and_draws_its_own_candidates(dataset: Dataset) -> None:
    split = cold_start_split(dataset, seed=0)
    full = train(dataset, split, TrainConfig(seed=3, **TINY))  # type: ignore[arg-type]
    sampled = train(dataset, split, TrainConfig(seed=3, sampled_items=8, **TINY))  # type: ignore[arg-type]
    assert all(np.isfinite(row["nll"]) for row in sampled.history)
    V_full, V_sampled = full.model.user.V.detach(), sampled.model.user.V.detach()
    assert torch.isfinite(V_sampled).all() and not torch.equal(V_full, V_sampled)
