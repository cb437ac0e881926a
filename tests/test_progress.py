"""Long work says how far it is (issue 17, 8): title embedding while converting ml-100k, training
epochs (with their total and an ETA, in the bar and in the log), index builds and re-embedding."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from service.core.recommender import Recommender
from service.model.artifact import load_artifact
from service.store import ItemRecord, SqliteStore
from tests.conftest import TrainedArtifact
from tests.live_server import LiveServer
from training.convert_ml100k import embed_titles
from training.dataset import Dataset
from training.split import cold_start_split
from training.train import TrainConfig, train


def _synthetic(n_users: int = 120, n_items: int = 300, per_user: int = 15) -> Dataset:
    rng = np.random.default_rng(0)
    pairs = np.array([(u, j) for u in range(n_users) for j in rng.choice(n_items, per_user, replace=False)],
                     dtype=np.int64)
    return Dataset(name="synthetic", item_ids=[f"i{j}" for j in range(n_items)],
                   item_attributes=[[f"genre:g{j % 7}", f"tag:t{j % 13}"] for j in range(n_items)],
                   user_ids=[f"u{u}" for u in range(n_users)], interactions=pairs,
                   features=rng.standard_normal((n_items, 8)).astype(np.float32))


def test_the_served_process_logs_its_index_build(trained_artifact: TrainedArtifact, tmp_path: Path) -> None:
    env = {"M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": str(tmp_path / "m2rec.sqlite3")}
    with LiveServer(env) as server:
        output = server.output()
    assert "index build, model" in output and "0 of 0 items" in output, output


def test_training_shows_each_epoch_with_its_total_and_an_eta(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = _synthetic()
    cfg = TrainConfig(epochs=3, eval_every=1, item_dim=8, user_latent=4, gen_hidden=8, gen_latent=4,
                      batch_users=64, batch_items=64, progress=True)
    with caplog.at_level(logging.INFO, logger="m2rec.train"):
        train(dataset, cold_start_split(dataset, 0), cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("eta" in line for line in lines)
    bar = capsys.readouterr().err
    assert "train synthetic" in bar and "3/3" in bar and "epoch" in bar


def test_embedding_titles_draws_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    embed_titles(["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)"], batch_size=2)
    err = capsys.readouterr().err
    assert "embedding titles" in err and "3/3" in err


def test_an_index_build_logs_its_progress(
    trained_artifact: TrainedArtifact, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifact = load_artifact(trained_artifact.root)
    store = SqliteStore(tmp_path / "m2rec.sqlite3")
    recommender = Recommender(artifact, store)
    records = [ItemRecord(f"new:{n}", ["genre:Drama"], None, np.zeros(artifact.manifest.embedding_dim, np.float32),
                          "an-older-model", time.time()) for n in range(30)]  # re-embedded by the build
    store.put_items(records)
    with caplog.at_level(logging.INFO, logger="service.core.maintainer"):
        recommender.maintainer.build_index()
    lines = [r.getMessage() for r in caplog.records if "index build" in r.getMessage()]
    assert lines and "30 of 30 items" in lines[-1] and "eta" in lines[-1]
    store.close()
