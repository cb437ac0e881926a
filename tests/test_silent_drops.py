"""Nothing in the data path is dropped in silence (issue 17, 10): cold_items.txt ids without interactions
are named by count (and an empty cold set is an error), and items the artifact's training data held out
are counted at export, flagged when registered and not counted as new when served."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.model.artifact import load_artifact
from tests.conftest import TrainedArtifact
from training.dataset import Dataset, DatasetError, load_dataset, save_dataset
from training.export import held_out_items
from training.split import cold_start_split


def _dataset(cold: list[str]) -> Dataset:
    users, items = 12, 30
    pairs = np.array([(u, (u * 7 + n) % 20) for u in range(users) for n in range(6)], dtype=np.int64)  # items 0-19
    data = Dataset(name="drops", item_ids=[f"i{j}" for j in range(items)],
                   item_attributes=[[f"genre:g{j % 3}"] for j in range(items)],
                   user_ids=[f"u{u}" for u in range(users)], interactions=np.unique(pairs, axis=0))
    data.cold_items = cold
    return data


def test_cold_items_without_interactions_are_named_by_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_dataset(_dataset(["i1", "i2", "i25", "i26", "i27"]), tmp_path / "d")  # i20..i29: nobody touched them
    with caplog.at_level(logging.WARNING, logger="training.split"):
        split = cold_start_split(load_dataset(tmp_path / "d"), seed=0)
    assert sorted(split.cold_items.tolist()) == [1, 2]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "3 of the 5 items in cold_items.txt have no interaction" in warning


def test_a_cold_items_file_naming_only_untouched_items_is_an_error(tmp_path: Path) -> None:
    save_dataset(_dataset(["i25", "i26"]), tmp_path / "d")
    with pytest.raises(DatasetError, match=r"none of the 2 items in cold_items\.txt has an interaction"):
        cold_start_split(load_dataset(tmp_path / "d"), seed=0)


def test_export_names_the_items_held_out_of_training(caplog: pytest.LogCaptureFixture) -> None:
    data = _dataset(["i1", "i2"])
    split = cold_start_split(data, seed=0)
    with caplog.at_level(logging.WARNING, logger="training.export"):
        held = held_out_items(data, split.warm_items)
    expected = sorted(set(range(20)) - set(split.warm_items.tolist()))
    assert held == [f"i{j}" for j in expected] and {"i1", "i2"} <= set(held)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"{len(held)} of the 20 items with interactions" in warning


@pytest.fixture
def client(trained_artifact: TrainedArtifact, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(artifact_path=trained_artifact.root, store_url=str(tmp_path / "m2rec.sqlite3"))
    with TestClient(create_app(settings)) as c:
        yield c


def _served(client: TestClient, kind: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'm2rec_recommended_items_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no m2rec_recommended_items_total{{kind={kind!r}}}")


def test_a_registered_held_out_item_is_flagged_logged_and_not_counted_as_new(
    client: TestClient, trained_artifact: TrainedArtifact, caplog: pytest.LogCaptureFixture
) -> None:
    held = load_artifact(trained_artifact.root).manifest.held_out_items
    assert len(held) > 100  # the split's test and validation items
    held_out_id = trained_artifact.dataset.item_ids[int(trained_artifact.split.cold_items[0])]
    assert held_out_id in held
    with caplog.at_level(logging.WARNING, logger="service.core.recommender"):
        r = client.post("/items", json=trained_artifact.cold_item(0, held_out_id))
        assert r.status_code == 201, r.text
        new = client.post("/items", json=trained_artifact.cold_item(1, "movie:really-new"))
    assert r.json()["held_out"] is True and r.json()["is_cold"] is True
    assert new.json()["held_out"] is False
    assert client.get(f"/items/{held_out_id}").json()["held_out"] is True
    assert any("registered 1 items that model" in rec.getMessage() for rec in caplog.records)
    before = {kind: _served(client, kind) for kind in ("cold", "warm", "held_out")}
    body = client.get("/recommend", params={"user": "stranger", "k": 10}).json()  # fallback: newest two first
    served = {i["id"] for i in body["items"] if i["is_cold"]}
    assert served == {held_out_id, "movie:really-new"}
    after = {kind: _served(client, kind) for kind in ("cold", "warm", "held_out")}
    assert after["held_out"] - before["held_out"] == 1
    assert after["cold"] - before["cold"] == 1
    assert after["warm"] - before["warm"] == 8
