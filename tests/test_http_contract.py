"""The HTTP contract where it talks to people: which error comes first and what it says (issue 17, 6),
and what the OpenAPI document, 405s and /readyz claim (issue 17, 7)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.config import Settings
from tests.conftest import TrainedArtifact
from tests.test_faults import OwnRedis, own_redis  # noqa: F401  # the fixture, by name

API_KEY = "contract-key"
HEADERS = {"X-API-Key": API_KEY}
K_MAX = 150


@pytest.fixture(scope="module")
def client(trained_artifact: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("contract") / "m2rec.sqlite3"
    settings = Settings(artifact_path=trained_artifact.root, store_url=str(store), api_key=SecretStr(API_KEY),
                        k_max=K_MAX)
    with TestClient(create_app(settings)) as c:
        yield c


def _warm(trained: TrainedArtifact) -> str:
    return trained.dataset.item_ids[int(trained.split.warm_items[0])]


# -- 6: errors --------------------------------------------------------------------------------------


def test_a_bad_interaction_batch_reports_only_the_batch_form_errors(
    client: TestClient, trained_artifact: TrainedArtifact
) -> None:
    body = {"interactions": [{"user": "u", "item": _warm(trained_artifact)}, {"user": "u", "itme": "x"}]}
    r = client.post("/interactions", json=body, headers=HEADERS)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert errors, r.text
    # every error is about the batch's second event; none about the single-event form's fields
    assert all(e["loc"][:4] == ["body", "batch", "interactions", 1] for e in errors), errors
    assert {e["loc"][-1] for e in errors} == {"item", "itme"}


def test_a_bad_single_interaction_reports_only_the_single_form_errors(client: TestClient) -> None:
    r = client.post("/interactions", json={"user": "u"}, headers=HEADERS)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "event", "item"]]


def test_an_interactions_body_that_is_no_object_says_which_forms_exist(client: TestClient) -> None:
    r = client.post("/interactions", json=[{"user": "u", "item": "x"}], headers=HEADERS)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert '{"interactions": [event, ...]}' in error["msg"]


def test_invalid_json_is_reported_with_its_line_and_column(client: TestClient) -> None:
    body = b'{"id": "movie:x",\n "attributes": ["genre:Drama",]\n}'
    r = client.post("/items", content=body, headers={**HEADERS, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["type"] == "json_invalid" and error["loc"] == ["body"]
    assert "line 2 column" in error["msg"], error


@pytest.mark.parametrize("path", ["/items", "/items/batch", "/interactions", "/admin/reload"])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_write_without_a_valid_key_is_401_before_its_body_is_read(
    client: TestClient, path: str, key: str | None
) -> None:
    headers = {"content-type": "application/json", **({} if key is None else {"X-API-Key": key})}
    for body in (b"{not json", b'{"valid": "json", "but": "wrong"}'):
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 401, (path, body, r.text)
        assert r.headers["www-authenticate"] == "ApiKey"


# -- 7: what the service says about itself --------------------------------------------------------------


def test_the_openapi_item_example_is_accepted_by_the_served_model(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    (example,) = schema["components"]["schemas"]["ItemIn"]["examples"]
    r = client.post("/items", json=example, headers=HEADERS)
    assert r.status_code in (200, 201), r.text
    (batch_example,) = schema["components"]["schemas"]["ItemBatchIn"]["examples"]
    r = client.post("/items/batch", json=batch_example, headers=HEADERS)
    assert r.status_code == 200, r.text


def test_the_openapi_document_gives_k_its_configured_maximum(client: TestClient) -> None:
    parameters = client.get("/openapi.json").json()["paths"]["/recommend"]["get"]["parameters"]
    (k,) = [p for p in parameters if p["name"] == "k"]
    assert k["schema"]["maximum"] == K_MAX and k["schema"]["minimum"] == 1
    assert client.get("/recommend", params={"user": "u", "k": K_MAX}).status_code == 200
    assert client.get("/recommend", params={"user": "u", "k": K_MAX + 1}).status_code == 422


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/items/movie:x", {"GET", "HEAD", "DELETE"}),
    ("PUT", "/items", {"POST"}),
    ("DELETE", "/recommend", {"GET", "HEAD"}),
    ("GET", "/admin/reload/", None),  # no such path: 404, not 405
    ("POST", "/admin/reload", None),  # allowed: not a 405 (401 without the key)
])
def test_a_405_lists_every_method_the_path_takes(
    client: TestClient, method: str, path: str, allowed: set[str] | None
) -> None:
    r = client.request(method, path)
    if allowed is None:
        assert r.status_code != 405
        return
    assert r.status_code == 405, r.text
    assert set(r.headers["allow"].split(", ")) == allowed
    assert method in r.json()["detail"]


def test_readyz_reports_the_index_it_holds_while_the_store_is_down(
    trained_artifact: TrainedArtifact, own_redis: OwnRedis  # noqa: F811
) -> None:
    settings: dict[str, Any] = {"artifact_path": trained_artifact.root, "store_url": own_redis.url,
                                "redis_namespace": "readyz", "api_key": SecretStr(API_KEY)}
    with TestClient(create_app(Settings(**settings))) as c:
        up = c.get("/readyz")
        assert up.status_code == 200 and up.json()["index_items"] > 0
        own_redis.kill()
        down = c.get("/readyz")
        assert down.status_code == 503
        assert down.json()["ready"] is False and "store unreachable" in down.json()["detail"]
        assert down.json()["index_items"] == up.json()["index_items"]


def test_the_write_docs_say_a_503_may_have_been_applied_and_retrying_is_safe(client: TestClient) -> None:
    """Issue 17, 5: a 503 on a store timeout does not mean nothing was written."""
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in (("/items", "post"), ("/items/batch", "post"), ("/interactions", "post"),
                         ("/items/{item_id}", "delete")):
        text = paths[path][method]["responses"]["503"]["description"]
        assert "may or may not have been applied" in text and "retrying is safe" in text, (path, text)
        assert "nothing was written" not in text



def test_the_benchmarks_http_floor_answers_in_the_recommend_contract() -> None:
    """benchmarks/serve.py divides the service's throughput by this floor's: its routes must answer the
    same shape (RecommendationsOut) as /recommend, or the ratio measures an error page."""
    from fastapi.testclient import TestClient

    from benchmarks.floor_app import create_floor_app
    from service.api.schemas import RecommendationsOut

    with TestClient(create_floor_app()) as client:
        for route in ("/recommend", "/recommend-deps", "/recommend-strings"):
            r = client.get(route, params={"user": "bench:1", "k": 20})
            assert r.status_code == 200, (route, r.text)
            assert len(RecommendationsOut.model_validate(r.json()).items) == 20
