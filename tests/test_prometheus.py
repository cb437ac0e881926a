"""Metrics end to end: the real service (the container's command) scraped by a real Prometheus
(Debian's `prometheus`), and every PromQL expression of the Grafana dashboard evaluated through
Prometheus's HTTP API must return data. Plus the Metrics helpers against hand-computed cases.

No prometheus binary skips the end-to-end test loudly, or fails it when M2REC_REQUIRE_PROMETHEUS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.metrics import Metrics
from service.store import ItemRecord, SqliteStore
from tests.conftest import TrainedArtifact
from tests.live_server import stop_process, wait_until_ready
from tests.test_packaging import DEPLOY, free_port, running_service

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "m2rec.json"
WINDOW = "1m"  # stands in for Grafana's $__rate_interval; the test's Prometheus scrapes every second
BATCH_LIMIT = 20


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana variables made concrete."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in (("$__rate_interval", WINDOW), ("$__interval", WINDOW), ("$instance", ".*")):
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unhandled Grafana variable in {panel['title']!r}: {expr}"
            found.append((panel["title"], expr))
    return found


def declared_metric_names() -> set[str]:
    return {family.name for family in Metrics().registry.collect()}


# -- static: the dashboard and the service agree -------------------------------------------------


def test_every_metric_the_service_declares_is_on_the_dashboard_and_no_panel_reads_an_unknown_one() -> None:
    declared = declared_metric_names()
    text = " ".join(expr for _, expr in dashboard_queries())
    read = {re.sub(r"_(bucket|total|count|sum)$", "", m) for m in re.findall(r"\bm2rec_[a-z0-9_]+", text)}
    assert declared - read == set(), "metrics no panel shows"
    assert read - declared == set(), "panels read metrics the service does not declare"


def test_panels_have_unique_ids_titles_and_a_grid_position() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["title"] and {"h", "w", "x", "y"} <= set(p["gridPos"]) for p in panels)


# -- the Metrics helpers ------------------------------------------------------------------------


def _sample_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_store_sample_sets_bytes_per_item_and_user_and_waits_for_its_interval(tmp_path: Path) -> None:
    import numpy as np

    from service.store import Interaction

    store = SqliteStore(str(tmp_path / "s.sqlite3"))
    metrics = Metrics(store_sample_seconds=3600)
    metrics.sample_store(store)  # nothing to measure yet: sampled again at the next call
    assert _sample_value(metrics, "m2rec_store_items") == 0
    emb = np.zeros(4, np.float32)
    store.put_items([ItemRecord("a", ["x"], None, emb, "v1", 1.0), ItemRecord("bb", ["x"], None, emb, "v1", 1.0)])
    store.add_interactions([Interaction("u", "a", 1.0)])
    expected = store.stats()
    metrics.sample_store(store)
    assert _sample_value(metrics, "m2rec_store_items") == 2
    assert _sample_value(metrics, "m2rec_store_bytes_per_item") == expected.bytes_per_item
    assert _sample_value(metrics, "m2rec_store_bytes_per_user") == expected.bytes_per_user
    store.put_items([ItemRecord("c", ["x"], None, emb, "v1", 1.0)])
    metrics.sample_store(store)  # within the interval: not sampled again
    assert _sample_value(metrics, "m2rec_store_items") == 2
    store.close()
    metrics.store_sample_seconds = 0.0
    metrics.sample_store(store)  # a closed store cannot answer: counted, previous values kept
    assert _sample_value(metrics, "m2rec_store_errors_total", {"source": "stats"}) == 1
    assert _sample_value(metrics, "m2rec_store_items") == 2


def test_model_version_info_has_exactly_one_series_after_a_reload() -> None:
    metrics = Metrics()
    metrics.set_model_version("v1")
    metrics.set_model_version("v2")
    assert _sample_value(metrics, "m2rec_model_info", {"model_version": "v2"}) == 1
    assert _sample_value(metrics, "m2rec_model_info", {"model_version": "v1"}) is None


def test_reject_reasons_and_store_error_sources_exist_at_zero_before_any_event() -> None:
    metrics = Metrics()
    assert _sample_value(metrics, "m2rec_ingest_errors_total", {"reason": "invalid_item"}) == 0
    assert _sample_value(metrics, "m2rec_store_errors_total", {"source": "request"}) == 0
    metrics.reembed_started(10)
    metrics.reembed_progressed(4)
    assert _sample_value(metrics, "m2rec_reembed_done_items") == 4
    assert _sample_value(metrics, "m2rec_reembed_total_items") == 10


# -- end to end: real service, real Prometheus ----------------------------------------------------


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = ("PROMETHEUS NOT INSTALLED (apt-get install -y prometheus): the dashboard queries were NOT "
                  "evaluated")
        if os.environ.get("M2REC_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(reason + " and M2REC_REQUIRE_PROMETHEUS=1")
        pytest.skip(reason)
    return binary


@contextmanager
def _running_prometheus(binary: str, target: str, workdir: Path) -> Iterator[str]:
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: m2rec\n    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, f"{url}/-/ready", 30, lambda: (workdir / "prometheus.log").read_text())
        yield url
    finally:
        stop_process(process)
        log.close()


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10.0)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _scalar(prometheus: str, expr: str) -> float:
    result = _query(prometheus, expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


def _wait_for(prometheus: str, expr: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not _query(prometheus, expr):
        assert time.monotonic() < deadline, f"no data for {expr} within {timeout} s"
        time.sleep(0.25)


def _drive_traffic(url: str, trained: TrainedArtifact) -> None:
    """Every kind of request the dashboard shows: ingest (and every reject reason), interactions,
    personal and fallback recommendations, reads, deletes."""
    ds, split = trained.dataset, trained.split
    assert ds.features is not None
    warm = [ds.item_ids[int(j)] for j in split.warm_items[:10]]

    def item(n: int) -> dict[str, Any]:
        j = int(split.cold_items[n])
        assert ds.features is not None
        return {"id": f"new:{ds.item_ids[j]}", "attributes": ds.item_attributes[j], "content": ds.features[j].tolist()}

    with httpx.Client(base_url=url, timeout=30.0) as c:
        assert c.post("/items", json=item(0)).status_code == 201
        assert c.post("/items/batch", json={"items": [item(n) for n in range(1, 6)]}).status_code == 200
        assert c.post("/items", json=item(0)).status_code == 200  # update
        assert c.post("/items", json={**item(6), "content": [1.0]}).status_code == 422  # invalid_item
        assert c.post("/items", json={"id": "no content"}).status_code == 422  # invalid_request
        assert c.post("/items", json={**item(7), "id": warm[0]}).status_code == 409  # trained_item
        too_many = {"items": [{**item(8), "id": f"extra:{n}"} for n in range(BATCH_LIMIT + 1)]}
        assert c.post("/items/batch", json=too_many).status_code == 413  # too_large
        history = [{"user": "u1", "item": i} for i in [*warm, item(0)["id"]]]
        assert c.post("/interactions", json={"interactions": history}).status_code == 200
        assert c.post("/interactions", json={"user": "u2", "item": "never-registered"}).status_code == 404
        for _ in range(3):
            personal = c.get("/recommend", params={"user": "u1", "k": 50}).json()
            assert personal["fallback"] is False
            assert c.get("/recommend", params={"user": "stranger", "k": 10}).json()["fallback"] is True
        assert c.get(f"/items/{item(1)['id']}").status_code == 200
        assert c.delete(f"/items/{item(5)['id']}").status_code == 204
        assert c.get("/readyz").status_code == 200


def test_every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_service(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    binary = _prometheus_binary()
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    with running_service(trained_artifact.root, str(tmp_path / "s.sqlite3"),
                         M2REC_MAX_BATCH_SIZE=str(BATCH_LIMIT)) as url:
        target = url.removeprefix("http://")
        with _running_prometheus(binary, target, workdir) as prometheus:
            _wait_for(prometheus, 'up{job="m2rec"} == 1')
            _drive_traffic(url, trained_artifact)
            # two scrapes after the traffic, so every rate() has samples on both sides of it
            _wait_for(prometheus, "m2rec_items_deleted_total > 0")
            time.sleep(2.5)

            empty = [(title, expr) for title, expr in dashboard_queries() if not _query(prometheus, expr)]
            assert empty == [], "dashboard queries without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
            instances = httpx.get(f"{prometheus}/api/v1/label/instance/values",
                                  params={"match[]": "m2rec_model_info"}).json()["data"]
            assert instances == [target]  # the dashboard's replica variable

            # oracles for what the traffic did
            assert _scalar(prometheus, 'sum(m2rec_ingest_errors_total{reason="invalid_item"})') == 1
            assert _scalar(prometheus, 'sum(m2rec_ingest_errors_total{reason="too_large"})') == 1
            assert _scalar(prometheus, 'sum(m2rec_items_ingested_total{outcome="inserted"})') == 6
            assert _scalar(prometheus, 'm2rec_index_items{kind="cold"}') == 5
            assert _scalar(prometheus, 'sum(m2rec_recommendations_total{outcome="fallback"})') == 3
            assert _scalar(prometheus, "m2rec_store_bytes_per_item") > 4 * 17  # at least an embedding
            assert _scalar(prometheus, "m2rec_store_bytes_per_user") > 0
            fallback_share = _scalar(prometheus, next(e for t, e in dashboard_queries() if t == "Fallback rate"))
            assert 0 < fallback_share < 1


def test_an_unreachable_store_is_counted_by_caller_and_as_an_ingest_reject(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings

    settings = Settings(artifact_path=trained_artifact.root, store_url=str(tmp_path / "s.sqlite3"))
    with TestClient(create_app(settings)) as c:
        c.app.state.runtime.store.close()  # type: ignore[attr-defined]  # the backend goes away
        assert c.get("/recommend", params={"user": "u"}).status_code == 503
        j = int(trained_artifact.split.cold_items[0])
        item = {"id": "x", "attributes": trained_artifact.dataset.item_attributes[j]}
        assert c.post("/items", json=item).status_code == 503
        assert c.get("/readyz").status_code == 503
        metrics = c.app.state.runtime.metrics  # type: ignore[attr-defined]
        assert c.get("/metrics").status_code == 200  # the store sample fails, the scrape does not
    assert _sample_value(metrics, "m2rec_store_errors_total", {"source": "request"}) == 2
    assert _sample_value(metrics, "m2rec_store_errors_total", {"source": "readiness"}) == 1
    assert _sample_value(metrics, "m2rec_store_errors_total", {"source": "stats"}) == 1
    assert _sample_value(metrics, "m2rec_ingest_errors_total", {"reason": "store_unavailable"}) == 1
