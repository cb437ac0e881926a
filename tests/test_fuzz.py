"""Property-based fuzzing from the service's own OpenAPI document (schemathesis): valid and invalid
requests to every operation, with the API key, against a real server on loopback (uvicorn in a
thread, real tiny model, real SQLite). No request may get a 5xx, and 2xx/4xx bodies must match the
documented schemas. Bounded: a fixed number of examples per operation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.api.app import create_app
from service.config import Settings
from tests.conftest import TrainedArtifact

API_KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 50


@pytest.fixture(scope="module")
def live_url(trained_artifact: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("fuzz") / "s.sqlite3"
    app = create_app(Settings(artifact_path=trained_artifact.root, store_url=str(store),
                              api_key=SecretStr(API_KEY), max_batch_size=20, k_max=500))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="fuzz-uvicorn")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_url}/openapi.json")


def test_no_request_from_the_openapi_spec_gets_a_server_error(api_schema: Any, live_url: str) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case: Any) -> None:
            # the generated X-API-Key is random: replace it, so writes reach validation and the store
            case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-api-key"}
            case.headers["X-API-Key"] = API_KEY
            case.call_and_validate(base_url=live_url, timeout=30,
                                   checks=[not_a_server_error, response_schema_conformance])

        no_server_error()


def test_the_fuzzed_operations_cover_reads_writes_and_admin(api_schema: Any) -> None:
    raw = api_schema.raw_schema["paths"]
    covered = {(m.upper(), p) for p, ops in raw.items() for m in ops}
    assert {("POST", "/items"), ("POST", "/items/batch"), ("DELETE", "/items/{item_id}"), ("POST", "/interactions"),
            ("GET", "/recommend"), ("POST", "/admin/reload")} <= covered


