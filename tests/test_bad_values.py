"""Content values the service must refuse, and the defences behind the schema: a value beyond float32
range (issue 17, 1), a number sent as a string or boolean (issue 17, 4), a row that is not finite
however it arose. One item must never take /recommend down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.embedder import load_model
from service.model.artifact import load_artifact
from service.model.artifact_export import save_artifact
from service.store import ItemRecord
from tests.conftest import StoreSpec, TrainedArtifact
from tests.live_server import LiveServer
from tests.test_api import API_KEY, HEADERS, _settings


@pytest.fixture(scope="module")
def live(trained_artifact: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("bad-values") / "m2rec.sqlite3"
    env = {"M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_STORE_URL": str(store),
           "M2REC_API_KEY": API_KEY}
    with LiveServer(env) as server:
        yield server


def _content(trained: TrainedArtifact) -> list[float]:
    assert trained.dataset.features is not None
    return [float(v) for v in trained.dataset.features[int(trained.split.cold_items[0])]]


def test_content_beyond_float32_range_is_refused_over_http_and_recommend_still_answers(
    live: LiveServer, trained_artifact: TrainedArtifact
) -> None:
    content = _content(trained_artifact)
    content[7] = 3.5e38  # finite as a float64, inf as a float32
    # the body as a client writes it: 3.5e38 as a JSON number
    body = json.dumps({"id": "movie:too-bright", "attributes": ["genre:Drama"], "content": content})
    with httpx.Client(base_url=live.url, timeout=30.0) as client:
        refused = client.post("/items", content=body, headers={**HEADERS, "content-type": "application/json"})
        assert refused.status_code == 422, refused.text
        message = json.dumps(refused.json())
        assert "content[7]" in message and "3.5e+38" in message and "float32" in message
        assert client.get("/items/movie:too-bright").status_code == 404
        for user in ("somebody-new", "somebody-else"):
            answer = client.get("/recommend", params={"user": user, "k": 5})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["items"]) == 5


def test_the_largest_float32_is_accepted(live: LiveServer, trained_artifact: TrainedArtifact) -> None:
    content = _content(trained_artifact)
    content[0] = float(np.finfo(np.float32).max)
    with httpx.Client(base_url=live.url, timeout=30.0) as client:
        r = client.post("/items", json={"id": "movie:bright", "attributes": ["genre:Drama"], "content": content},
                        headers=HEADERS)
        assert r.status_code == 201, r.text
        assert client.get("/recommend", params={"user": "somebody-new", "k": 50}).status_code == 200
        assert client.delete("/items/movie:bright", headers=HEADERS).status_code == 204


# -- the API's own contract, in process ------------------------------------------------------------


@pytest.fixture
def api(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(trained_artifact, store_spec))) as c:  # the API tests' settings
        yield c


@pytest.mark.parametrize("value", ["0.5", True, False, None, [0.5], {"x": 0.5}])
def test_content_values_of_the_wrong_json_type_are_refused(
    api: TestClient, trained_artifact: TrainedArtifact, value: Any
) -> None:
    content: list[Any] = list(_content(trained_artifact))
    content[3] = value
    r = api.post("/items", json={"id": "movie:typed", "attributes": ["genre:Drama"], "content": content},
                    headers=HEADERS)
    assert r.status_code == 422, r.text
    assert ["body", "content", 3] in [e["loc"] for e in r.json()["detail"]]
    assert api.get("/items/movie:typed").status_code == 404


def test_integer_content_values_are_numbers(api: TestClient, trained_artifact: TrainedArtifact) -> None:
    content: list[Any] = list(_content(trained_artifact))
    content[3] = 0  # JSON has one number type: many encoders write 0.0 as 0
    r = api.post("/items", json={"id": "movie:int", "attributes": ["genre:Drama"], "content": content},
                    headers=HEADERS)
    assert r.status_code == 201, r.text


def test_a_timestamp_sent_as_a_string_is_refused(api: TestClient, trained_artifact: TrainedArtifact) -> None:
    warm = trained_artifact.dataset.item_ids[int(trained_artifact.split.warm_items[0])]
    r = api.post("/interactions", json={"user": "u", "item": warm, "timestamp": "1700000000"}, headers=HEADERS)
    assert r.status_code == 422, r.text


def _artifact_with_an_overflowing_token(trained: TrainedArtifact, root: Path, token: str) -> Path:
    """The trained artifact exported again, through the real export, with one attribute token's embedding
    at 3e38: finite weights that overflow float32 inside the generator, so an item with that token gets a
    non-finite row while its inputs pass every check (a model fault, not a bad request)."""
    artifact = load_artifact(trained.root)
    m = artifact.manifest
    tensors = {name: t.clone() for name, t in load_model(artifact).state_dict().items()}
    tensors["generator.attributes.embedding.weight"][list(m.attribute_vocabulary).index(token) + 1] = 3e38
    save_artifact(root, tensors=tensors, item_ids=list(artifact.item_ids), model_config=m.model_args,
                  attribute_vocabulary=list(m.attribute_vocabulary), content_dim=m.content_dim,
                  embedding_dim=m.embedding_dim, metrics=m.metrics, mixing=m.mixing,
                  data_fingerprint=m.data_fingerprint, dataset=m.dataset, held_out_items=list(m.held_out_items))
    return root


def test_a_non_finite_generated_row_is_refused_at_embedding_and_never_stored(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec, tmp_path: Path
) -> None:
    """Defence in depth: inputs that pass every check but give a non-finite row (a model fault)."""
    broken = _artifact_with_an_overflowing_token(trained_artifact, tmp_path / "artifacts", "genre:War")
    with TestClient(create_app(_settings(trained_artifact, store_spec, artifact_path=broken))) as api:
        before = api.get("/readyz").json()["index_items"]
        items = [{"id": "movie:fine", "attributes": ["genre:Drama"]},
                 {"id": "movie:nan-row", "attributes": ["genre:Drama", "genre:War"]}]
        r = api.post("/items/batch", json={"items": items}, headers=HEADERS)
        assert r.status_code == 422, r.text
        assert "movie:nan-row" in r.json()["detail"] and "non-finite" in r.json()["detail"]
        assert api.get("/items/movie:fine").status_code == 404  # all or nothing
        assert api.get("/items/movie:nan-row").status_code == 404
        assert api.get("/readyz").json()["index_items"] == before
        fine = api.post("/items", json=items[0], headers=HEADERS)  # the same model embeds other items
        assert fine.status_code == 201, fine.text


def _skipped(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('m2rec_recommend_skipped_items_total{reason="non_finite_score"}'):
            return float(line.split()[-1])
    raise AssertionError("m2rec_recommend_skipped_items_total is not exported")


def test_a_stored_item_with_a_non_finite_row_is_skipped_counted_and_logged_once(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last line: a row that reached the store anyway (an older release, another writer) never
    makes /recommend answer 500; the item is left out, counted, and logged once."""
    settings = _settings(trained_artifact, store_spec)
    with TestClient(create_app(settings)) as c:
        good = c.post("/items", json={"id": "movie:good", "attributes": ["genre:Drama"]}, headers=HEADERS)
        assert good.status_code == 201
        version = good.json()["model_version"]
    store = store_spec.open()
    dim = trained_artifact_dim(trained_artifact)
    store.put_items([ItemRecord("movie:nan", ["genre:Drama"], None, np.full(dim, np.nan, np.float32), version,
                                time.time() + 10)])
    store.close()
    with TestClient(create_app(settings)) as c, caplog.at_level("ERROR", logger="service.core.recommender"):
        # the rebuild from the store leaves it out already; the follower's path is the same function
        for user in ("somebody-new", "another-stranger"):
            r = c.get("/recommend", params={"user": user, "k": 5})
            assert r.status_code == 200, r.text
            assert "movie:nan" not in [i["id"] for i in r.json()["items"]]
    # a row that is in the index when it turns out broken: skipped at answer time, quarantined, counted once
    with TestClient(create_app(settings)) as c, caplog.at_level("ERROR", logger="service.core.recommender"):
        recommender = c.app.state.runtime.recommender  # type: ignore[attr-defined]
        # an infinite bias: the row outranks everything (a NaN row FAISS never returns at all)
        broken = np.zeros((1, dim), np.float32)
        broken[0, -1] = np.inf
        recommender.maintainer.index.add(["movie:nan"], broken)
        c.post("/interactions", json={"user": "fan", "item": "movie:good"}, headers=HEADERS)
        before = _skipped(c)
        for user in ("somebody-new", "fan", "somebody-new"):
            r = c.get("/recommend", params={"user": user, "k": 5})
            assert r.status_code == 200, r.text
            assert "movie:nan" not in [i["id"] for i in r.json()["items"]]
            assert len(r.json()["items"]) == 5
        assert _skipped(c) == before + 1  # once: then it has left the index
        logged = [rec for rec in caplog.records if "movie:nan" in rec.getMessage()]
        assert len(logged) == 1


def trained_artifact_dim(trained: TrainedArtifact) -> int:
    from service.model.artifact import load_artifact

    return load_artifact(trained.root).manifest.embedding_dim
