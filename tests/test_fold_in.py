"""The NumPy fold-in of the request path against the model's own torch fold-in (the oracle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.fold_in import FoldIn
from service.model import M2Rec, ModelConfig
from tests.conftest import TrainedArtifact


def _torch_query(model: M2Rec, rows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        r = torch.from_numpy(rows)[None]  # (1, L, D+1)
        h = model.fold_in(r, torch.ones(r.shape[:2], dtype=torch.bool))  # (1, D)
        return M2Rec.query(h).numpy()


@pytest.mark.parametrize("user_hidden", [0, 24])
@pytest.mark.parametrize("length", [0, 1, 7, 500])
def test_numpy_fold_in_equals_the_model_fold_in(user_hidden: int, length: int) -> None:
    torch.manual_seed(user_hidden + length)
    model = M2Rec(ModelConfig(n_warm=600, n_attributes=5, content_dim=3, item_dim=16, user_latent=8,
                              user_hidden=user_hidden)).eval()
    with torch.no_grad():  # non-zero biases, so a dropped bias would show
        for p in model.user.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rows = model.item_rows().detach().numpy()[:length].astype(np.float32)  # (L, D+1)
    np.testing.assert_allclose(FoldIn(model).query(rows), _torch_query(model, rows), rtol=1e-5, atol=1e-6)


def test_numpy_fold_in_equals_the_trained_model_on_generated_rows(trained_artifact: TrainedArtifact) -> None:
    from service.core.embedder import load_model
    from service.model.artifact import load_artifact

    model = load_model(load_artifact(trained_artifact.root))
    rng = np.random.default_rng(0)
    warm = model.item_rows().detach().numpy()
    generated = warm[rng.integers(0, len(warm), 5)] + rng.normal(0, 0.1, (5, warm.shape[1]))  # surrogate rows
    rows = np.concatenate([warm[rng.integers(0, len(warm), 40)], generated]).astype(np.float32)
    q = FoldIn(model).query(rows)
    assert q.dtype == np.float32 and q[0, -1] == 1.0
    np.testing.assert_allclose(q, _torch_query(model, rows), rtol=1e-5, atol=1e-6)


# -- GET /recommend serialises the RecommendationsOut contract without pydantic models --------


def test_recommend_response_is_the_declared_contract_and_equals_the_recommender(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.schemas import RecommendationsOut
    from service.config import Settings

    settings = Settings(artifact_path=trained_artifact.root, store_url=str(tmp_path / "s.sqlite3"))
    warm = [trained_artifact.dataset.item_ids[int(j)] for j in trained_artifact.split.warm_items[:5]]
    with TestClient(create_app(settings)) as client:
        assert client.post("/interactions", json={"interactions": [{"user": "u", "item": i} for i in warm]}
                           ).status_code == 200
        body = client.get("/recommend", params={"user": "u", "k": 7}).json()
        recommender = client.app.state.runtime.recommender  # type: ignore[attr-defined]
        expected = recommender.recommend("u", 7)
    parsed = RecommendationsOut.model_validate(body)  # the shape and types the OpenAPI schema declares
    assert set(body) == set(RecommendationsOut.model_fields) and not parsed.fallback
    assert [(i.id, i.score, i.is_cold) for i in parsed.items] == [tuple(h) for h in expected.hits]
    assert all(i.model_version == expected.model_version for i in parsed.items)


@pytest.mark.parametrize("user_hidden", [0, 24])
def test_score_drops_equal_the_scores_of_folding_in_without_each_history_row(user_hidden: int) -> None:
    """FoldIn.drops: without a hidden layer the affine shortcut (no MLP pass over the L variants), with
    one the MLP path; both against folding each user in again without each row."""
    torch.manual_seed(3)
    model = M2Rec(ModelConfig(n_warm=600, n_attributes=5, content_dim=3, item_dim=16, user_latent=8,
                              user_hidden=user_hidden)).eval()
    fold_in = FoldIn(model)
    assert (fold_in.linear is None) == (user_hidden > 0)
    table = model.item_rows().detach().numpy().astype(np.float32)
    histories = [table[:9], table[50:51], table[200:230]]  # (L_b, D+1)
    targets = [table[300:305], table[310:311], table[320:340]]  # (k_b, D+1)
    users = np.concatenate([fold_in.user_vector(h) for h in histories])  # (B, D)
    drops = fold_in.drops(np.concatenate(histories), [len(h) for h in histories], users, targets)
    for h, target, user, got in zip(histories, targets, users, drops, strict=True):
        oracle = np.stack([target[:, :16] @ (user - fold_in.user_vector(np.delete(h, left_out, axis=0))[0])
                           for left_out in range(len(h))], axis=1)  # (k, L)
        np.testing.assert_allclose(got, oracle, rtol=1e-4, atol=1e-5)
