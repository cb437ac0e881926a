"""The HTTP contract through httpx (TestClient runs the lifespan) against create_app(Settings(...)),
with a real tiny model and both real stores (SQLite in tmp_path, Redis under a unique namespace)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.api.schemas import RecommendationsOut
from service.config import Settings
from tests.conftest import StoreSpec, TrainedArtifact

API_KEY = "test-key"
HEADERS = {"X-API-Key": API_KEY}


def _settings(trained: TrainedArtifact, spec: StoreSpec, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "artifact_path": trained.root, "store_url": spec.location, "api_key": SecretStr(API_KEY),
        "k_max": 5000, "event_poll_seconds": 0.05, "max_batch_size": 50,
    }
    if spec.backend == "redis":
        values["redis_namespace"] = spec.namespace
    return Settings(**{**values, **overrides})


@pytest.fixture
def client(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(trained_artifact, store_spec))) as c:
        yield c


def _item(trained: TrainedArtifact, n: int, item_id: str | None = None) -> dict[str, Any]:
    j = int(trained.split.cold_items[n])
    ds = trained.dataset
    assert ds.features is not None
    return {"id": item_id or f"new:{ds.item_ids[j]}", "attributes": ds.item_attributes[j],
            "content": ds.features[j].tolist()}


def _warm_ids(trained: TrainedArtifact, n: int) -> list[str]:
    return [trained.dataset.item_ids[int(j)] for j in trained.split.warm_items[:n]]


def _index_size(client: TestClient) -> int:
    size: int = client.get("/readyz").json()["index_items"]
    return size


def _recommend_all(client: TestClient, user: str) -> dict[str, Any]:
    response = client.get("/recommend", params={"user": user, "k": _index_size(client)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_posted_item_is_recommendable_when_post_returns(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    client.post("/interactions", json={"interactions": [
        {"user": "u1", "item": i} for i in _warm_ids(trained_artifact, 5)]}, headers=HEADERS)
    item = _item(trained_artifact, 0)
    response = client.post("/items", json=item, headers=HEADERS)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] is True and body["is_cold"] is True and body["model_version"]
    got = _recommend_all(client, "u1")
    assert not got["fallback"]
    served = {i["id"]: i for i in got["items"]}
    assert served[item["id"]]["is_cold"] is True
    assert served[_warm_ids(trained_artifact, 6)[5]]["is_cold"] is False


def test_recommend_excludes_items_the_user_already_has(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    item = _item(trained_artifact, 1)
    client.post("/items", json=item, headers=HEADERS)
    history = [*_warm_ids(trained_artifact, 4), item["id"]]
    r = client.post("/interactions", json={"interactions": [{"user": "u2", "item": i} for i in history]},
                    headers=HEADERS)
    assert r.status_code == 200 and r.json() == {"accepted": 5, "users": 1}
    got = _recommend_all(client, "u2")
    ids = [i["id"] for i in got["items"]]
    assert not set(history) & set(ids)
    assert len(ids) == _index_size(client) - len(history)
    scores = [i["score"] for i in got["items"]]
    assert scores == sorted(scores, reverse=True)


def test_unknown_user_gets_a_fallback_that_says_so(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    item = _item(trained_artifact, 2)
    client.post("/items", json=item, headers=HEADERS)
    got = client.get("/recommend", params={"user": "stranger", "k": 5}).json()
    assert got["fallback"] is True and len(got["items"]) == 5
    assert [i["id"] for i in got["items"] if i["is_cold"]] == [item["id"]]


def test_post_item_with_wrong_content_dimension_is_rejected_and_changes_nothing(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    before = _index_size(client)
    item = {**_item(trained_artifact, 3), "content": [0.5] * 7}
    response = client.post("/items", json=item, headers=HEADERS)
    assert response.status_code == 422
    assert "has 7 values" in response.json()["detail"] and "content_dim=384" in response.json()["detail"]
    assert client.get(f"/items/{item['id']}").status_code == 404
    assert _index_size(client) == before


@pytest.mark.parametrize(("change", "needle"), [
    ({"content": None, "attributes": []}, "neither"),
    ({"id": "has space"}, "pattern"),
    ({"id": "x" * 129}, "pattern"),
    ({"attributes": ["never-seen-token"], "content": None}, "nothing to embed"),
])
def test_invalid_items_are_rejected_with_a_reason(
    client: TestClient, trained_artifact: TrainedArtifact, change: dict[str, Any], needle: str
) -> None:
    response = client.post("/items", json={**_item(trained_artifact, 4), **change}, headers=HEADERS)
    assert response.status_code == 422
    assert needle in response.text


def test_non_finite_content_is_rejected(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    item = _item(trained_artifact, 4)
    item["content"][0] = float("nan")
    response = client.post("/items", content=_json_allowing_nan(item), headers={
        **HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert client.get(f"/items/{item['id']}").status_code == 404


def _json_allowing_nan(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def test_unknown_attribute_tokens_are_accepted_and_reported(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    item = _item(trained_artifact, 5)
    item["attributes"] = [*item["attributes"], "brand:not-in-training"]
    response = client.post("/items", json=item, headers=HEADERS)
    assert response.status_code == 201
    assert "brand:not-in-training" in response.json()["unknown_attributes"]
    assert "brand:not-in-training" in client.get(f"/items/{item['id']}").json()["unknown_attributes"]


def test_same_id_twice_updates_the_item_instead_of_duplicating_it(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    first = _item(trained_artifact, 6, item_id="dup")
    assert client.post("/items", json=first, headers=HEADERS).status_code == 201
    size = _index_size(client)
    second = {**_item(trained_artifact, 7, item_id="dup")}
    response = client.post("/items", json=second, headers=HEADERS)
    assert response.status_code == 200 and response.json()["created"] is False
    assert _index_size(client) == size
    assert client.get("/items/dup").json()["attributes"] == second["attributes"]
    ids = [i["id"] for i in client.get("/recommend", params={"user": "x", "k": 2000}).json()["items"]]
    assert ids.count("dup") <= 1


def test_batch_registers_all_items_or_none(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    good = [_item(trained_artifact, n) for n in range(10, 13)]
    bad = {**_item(trained_artifact, 13), "content": [1.0]}
    before = _index_size(client)
    assert client.post("/items/batch", json={"items": [*good, bad]}, headers=HEADERS).status_code == 422
    assert _index_size(client) == before
    response = client.post("/items/batch", json={"items": good}, headers=HEADERS)
    assert response.status_code == 200
    assert [i["id"] for i in response.json()["items"]] == [g["id"] for g in good]
    assert _index_size(client) == before + 3


def test_malformed_json_is_a_422_that_changes_nothing(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    before = _index_size(client)
    for body in (b'{"items": [', b"\xff\xfe", b'{"id": "x", "attributes": ["a"]'):
        response = client.post("/items/batch", content=body, headers={**HEADERS, "Content-Type": "application/json"})
        assert response.status_code == 422, (body, response.text)
    big = {"items": [_item(trained_artifact, n) for n in range(20)]}  # ~160 KB: decoded off the event loop
    response = client.post("/items/batch", content=json.dumps(big)[:-2], headers={
        **HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert _index_size(client) == before
    response = client.post("/items/batch", json=big, headers=HEADERS)
    assert response.status_code == 200 and len(response.json()["items"]) == 20


def test_recommend_body_is_exactly_the_documented_model(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    item = _item(trained_artifact, 8, item_id="cold:8")
    client.post("/items", json=item, headers=HEADERS)
    # the body is written by orjson, not by the response model: every form of the answer is checked here
    warm = [trained_artifact.dataset.item_ids[j] for j in trained_artifact.split.warm_items[:3]]
    client.post("/interactions", json={"interactions": [{"user": "schema-user", "item": i} for i in warm]},
                headers=HEADERS)
    forms: list[dict[str, str | int | float]] = [
        {"user": "nobody", "k": 30}, {"user": "nobody", "k": 30, "explain": "true"},
        {"user": "schema-user", "k": 30, "explain": "true", "cold_share": 0.4}, {"user": "schema-user", "k": 5}]
    for params in forms:
        response = client.get("/recommend", params=params)
        assert (response.status_code, response.headers["content-type"]) == (200, "application/json"), response.text
        body = response.json()
        assert RecommendationsOut.model_validate(body).model_dump() == body, params
        assert ("explanation" in body["items"][0]) == ("explain" in params)
        assert params["user"] != "nobody" or "cold:8" in [i["id"] for i in body["items"]]


def test_oversized_batch_is_rejected_with_413(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    items = [_item(trained_artifact, n, item_id=f"b{n}") for n in range(51)]
    response = client.post("/items/batch", json={"items": items}, headers=HEADERS)
    assert response.status_code == 413 and "at most 50" in response.json()["detail"]
    assert client.get("/items/b0").status_code == 404


def test_oversized_body_is_rejected_with_413(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> None:
    with TestClient(create_app(_settings(trained_artifact, store_spec, max_body_bytes=4096))) as c:
        response = c.post("/items", json=_item(trained_artifact, 0), headers=HEADERS)  # ~8 KB of floats
        assert response.status_code == 413
        assert c.get(f"/items/{_item(trained_artifact, 0)['id']}").status_code == 404


def test_delete_removes_the_item_and_unknown_ids_get_404(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    item = _item(trained_artifact, 8)
    client.post("/items", json=item, headers=HEADERS)
    assert client.delete(f"/items/{item['id']}", headers=HEADERS).status_code == 204
    assert client.get(f"/items/{item['id']}").status_code == 404
    assert item["id"] not in {i["id"] for i in _recommend_all(client, "anyone")["items"]}
    assert client.delete(f"/items/{item['id']}", headers=HEADERS).status_code == 404


def test_trained_items_are_readable_but_not_replaceable(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    warm = _warm_ids(trained_artifact, 1)[0]
    body = client.get(f"/items/{warm}").json()
    assert body["is_cold"] is False and body["attributes"] is None
    assert client.post("/items", json=_item(trained_artifact, 0, item_id=warm), headers=HEADERS).status_code == 409
    assert client.delete(f"/items/{warm}", headers=HEADERS).status_code == 409


def test_interactions_naming_an_unknown_item_write_nothing(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    warm = _warm_ids(trained_artifact, 1)[0]
    response = client.post("/interactions", json={"interactions": [
        {"user": "u3", "item": warm}, {"user": "u3", "item": "no-such-item"}]}, headers=HEADERS)
    assert response.status_code == 404 and "no-such-item" in response.json()["detail"]
    assert client.get("/recommend", params={"user": "u3"}).json()["fallback"] is True


def test_single_interaction_form_is_accepted(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    warm = _warm_ids(trained_artifact, 1)[0]
    response = client.post("/interactions", json={"user": "u4", "item": warm, "timestamp": 1.0}, headers=HEADERS)
    assert response.status_code == 200 and response.json()["accepted"] == 1
    assert client.get("/recommend", params={"user": "u4"}).json()["fallback"] is False


def test_writes_need_the_api_key_and_reads_do_not(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    item = _item(trained_artifact, 9)
    assert client.post("/items", json=item).status_code == 401
    assert client.post("/items", json=item, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/interactions", json={"user": "u", "item": item["id"]}).status_code == 401
    assert client.delete(f"/items/{item['id']}").status_code == 401
    assert client.get(f"/items/{item['id']}").status_code == 404
    assert client.get("/recommend", params={"user": "u"}).status_code == 200


def test_k_beyond_k_max_and_malformed_users_are_rejected(trained_artifact: TrainedArtifact,
                                                         store_spec: StoreSpec) -> None:
    with TestClient(create_app(_settings(trained_artifact, store_spec, k_max=10))) as c:
        assert c.get("/recommend", params={"user": "u", "k": 11}).status_code == 422
        assert c.get("/recommend", params={"user": "u", "k": 0}).status_code == 422
        assert c.get("/recommend", params={"user": "bad user"}).status_code == 422
        assert len(c.get("/recommend", params={"user": "u", "k": 10}).json()["items"]) == 10


def test_an_item_registered_on_one_replica_is_served_by_another(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec
) -> None:
    settings = _settings(trained_artifact, store_spec)
    item = _item(trained_artifact, 14)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        assert a.post("/items", json=item, headers=HEADERS).status_code == 201
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            served = {i["id"] for i in _recommend_all(b, "someone")["items"]}
            if item["id"] in served:
                break
            time.sleep(0.05)
        assert item["id"] in served


def test_a_restarted_service_rebuilds_its_index_from_the_store(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec
) -> None:
    settings = _settings(trained_artifact, store_spec)
    item = _item(trained_artifact, 15)
    with TestClient(create_app(settings)) as first:
        first.post("/items", json=item, headers=HEADERS)
        size = _index_size(first)
    with TestClient(create_app(settings)) as second:
        assert _index_size(second) == size
        assert item["id"] in {i["id"] for i in _recommend_all(second, "someone")["items"]}


def test_health_readiness_and_metrics(client: TestClient, trained_artifact: TrainedArtifact) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["index_items"] == len(trained_artifact.split.warm_items)
    item = _item(trained_artifact, 16)
    client.post("/items", json=item, headers=HEADERS)
    client.get(f"/items/{item['id']}")
    client.get("/recommend", params={"user": "nobody", "k": 5})
    client.post("/items", json={**item, "id": "bad", "content": [1.0]}, headers=HEADERS)
    client.post("/items", json={"id": "empty"}, headers=HEADERS)
    text = client.get("/metrics").text
    assert 'm2rec_ingest_errors_total{reason="invalid_item"} 1.0' in text
    assert 'm2rec_ingest_errors_total{reason="invalid_request"} 1.0' in text
    assert 'm2rec_http_requests_total{method="GET",route="/items/{item_id}",status="200"} 1.0' in text
    assert item["id"] not in text
    assert 'm2rec_items_ingested_total{outcome="inserted"} 1.0' in text
    assert 'm2rec_recommendations_total{outcome="fallback"} 1.0' in text
    assert f'm2rec_model_info{{model_version="{ready["model_version"]}"}} 1.0' in text
    assert 'm2rec_index_items{kind="cold"} 1.0' in text


def test_openapi_documents_the_contract(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/items", "/items/batch", "/items/{item_id}", "/interactions", "/recommend", "/healthz",
            "/readyz"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["ItemIn"]["examples"]


def test_a_restart_from_a_snapshot_catches_up_with_later_writes(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec, tmp_path: Path
) -> None:
    settings = _settings(trained_artifact, store_spec, index_snapshot_dir=tmp_path / "snapshots")
    before, after = _item(trained_artifact, 17), _item(trained_artifact, 18)
    with TestClient(create_app(settings)) as first:
        first.post("/items", json=before, headers=HEADERS)
    with TestClient(create_app(_settings(trained_artifact, store_spec))) as other:  # no snapshot use
        other.post("/items", json=after, headers=HEADERS)
    with TestClient(create_app(settings)) as restarted:
        served = {i["id"] for i in _recommend_all(restarted, "someone")["items"]}
        assert {before["id"], after["id"]} <= served
        assert 'm2rec_index_rebuilds_total{reason="startup"}' not in restarted.get("/metrics").text


def test_oversized_streamed_body_without_length_is_rejected_with_413(
    trained_artifact: TrainedArtifact, store_spec: StoreSpec
) -> None:
    body = _json_allowing_nan(_item(trained_artifact, 0)).encode()
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    with TestClient(create_app(_settings(trained_artifact, store_spec, max_body_bytes=4096))) as c:
        response = c.post("/items", content=iter(chunks), headers={**HEADERS, "Content-Type": "application/json"})
        assert response.status_code == 413
        small = json.dumps({"user": "u", "item": _warm_ids(trained_artifact, 1)[0]}).encode()
        response = c.post("/interactions", content=iter([small[:10], small[10:]]),
                          headers={**HEADERS, "Content-Type": "application/json"})
        assert response.status_code == 200, response.text


def test_without_an_api_key_setting_writes_are_open(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> None:
    with TestClient(create_app(_settings(trained_artifact, store_spec, api_key=None))) as c:
        assert c.post("/items", json=_item(trained_artifact, 19)).status_code == 201


def test_approximate_index_serves_the_same_contract(trained_artifact: TrainedArtifact, store_spec: StoreSpec) -> None:
    settings = _settings(trained_artifact, store_spec, index_ivf_min_rows=100, index_nlist=8,
                         index_nprobe=8)
    with TestClient(create_app(settings)) as c:
        item = _item(trained_artifact, 20)
        assert c.post("/items", json=item, headers=HEADERS).status_code == 201
        got = c.get("/recommend", params={"user": "anyone", "k": 50}).json()
        assert len(got["items"]) == 50
        c.post("/interactions", json={"user": "v", "item": item["id"]}, headers=HEADERS)
        personal = c.get("/recommend", params={"user": "v", "k": 50}).json()
        assert personal["fallback"] is False and item["id"] not in {i["id"] for i in personal["items"]}
        assert len(personal["items"]) == 50


def test_an_unreachable_store_answers_503_and_readyz_says_not_ready(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    spec = StoreSpec("sqlite", str(tmp_path / "s.sqlite3"), "")
    with TestClient(create_app(_settings(trained_artifact, spec))) as c:
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        runtime.store.close()  # the backend goes away under a running service
        assert c.get("/recommend", params={"user": "u"}).status_code == 503
        assert c.post("/items", json=_item(trained_artifact, 0), headers=HEADERS).status_code == 503
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "store unreachable" in ready.json()["detail"]
        assert c.get("/healthz").status_code == 200
