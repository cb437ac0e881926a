"""Hot model reload through the HTTP API, with two real tiny models of ml-100k (two seeds), real FAISS
and both real stores: requests keep succeeding while stored items are re-embedded, and after the
swap every item, including those written during the reload, carries the new model's row."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.app import create_app
from service.config import Settings
from service.core.recommender import Recommender
from service.core.types import NewItem
from service.model.artifact import TENSORS_FILE, load_artifact
from service.model.artifact_export import set_current
from service.store import SqliteStore
from tests.conftest import StoreSpec, TrainedArtifact, TwoArtifacts

API_KEY = "reload-key"
HEADERS = {"X-API-Key": API_KEY}


def _settings(root: Path, spec: StoreSpec, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "artifact_path": root, "store_url": spec.location, "api_key": SecretStr(API_KEY), "k_max": 5000,
        "event_poll_seconds": 0.05, "reload_batch_items": 25, "reload_batch_pause_seconds": 0.03,
    }
    if spec.backend == "redis":
        values["redis_namespace"] = spec.namespace
    return Settings(**{**values, **overrides})


def _wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _copy_root(two: TwoArtifacts, tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    for version in (two.old, two.new):
        shutil.copytree(two.root / version, root / version)
    set_current(root, two.old)
    return root


def _rows_under(root: Path, version: str, items: dict[str, dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """The oracle: rows an independently loaded recommender of `version` computes from the raw inputs."""
    oracle = Recommender(load_artifact(root / version), SqliteStore(tmp_path / f"oracle-{version}.sqlite3"))
    ids = sorted(items)
    rows = oracle.embedder.embed([NewItem(i, items[i]["attributes"], items[i]["content"]) for i in ids])
    return dict(zip(ids, rows, strict=True))


class Hammer:
    """Readers and writers running against the app until stopped; every response is kept."""

    def __init__(self, client: TestClient, trained: TrainedArtifact) -> None:
        self.client, self.trained = client, trained
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.reads: list[tuple[float, int, str | None]] = []  # (start, status, model_version)
        self.written: dict[str, dict[str, Any]] = {}
        self.write_statuses: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._read, args=(u,)) for u in ("hammer-user", "nobody")]
        self.threads += [threading.Thread(target=self._write, args=(w,)) for w in range(2)]

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _read(self, user: str) -> None:
        versions: list[str] = []
        while not self.stop.is_set():
            start = time.monotonic()
            r = self.client.get("/recommend", params={"user": user, "k": 10})
            version = r.json().get("model_version") if r.status_code == 200 else None
            with self.lock:
                self.reads.append((start, r.status_code, version))
            if r.status_code != 200:
                self.errors.append(f"GET /recommend {r.status_code}: {r.text}")
            elif versions and version != versions[-1] and version in versions:
                self.errors.append(f"{user} went back from {versions[-1]} to {version}")
            if version is not None:
                versions.append(version)

    def _write(self, writer: int) -> None:
        n = 0
        while not self.stop.is_set():
            item = self.trained.cold_item(200 + 7 * n + writer, f"during:{writer}:{n}")
            r = self.client.post("/items", json=item, headers=HEADERS)
            with self.lock:
                self.write_statuses.append((time.monotonic(), r.status_code))
                if r.status_code == 201:
                    self.written[item["id"]] = item
                else:
                    self.errors.append(f"POST /items {r.status_code}: {r.text}")
            n += 1


@pytest.mark.slow
def test_reload_swaps_the_model_while_reads_and_writes_keep_succeeding(
    two_artifacts: TwoArtifacts, trained_artifact: TrainedArtifact, store_spec: StoreSpec, tmp_path: Path
) -> None:
    two = two_artifacts
    with TestClient(create_app(_settings(two.root, store_spec))) as c:
        before = {f"pre:{n}": trained_artifact.cold_item(n, f"pre:{n}") for n in range(300)}
        batch = list(before.values())
        for s in range(0, len(batch), 100):
            assert c.post("/items/batch", json={"items": batch[s : s + 100]}, headers=HEADERS).status_code == 200
        warm = [trained_artifact.dataset.item_ids[int(j)] for j in trained_artifact.split.warm_items[:5]]
        history = [{"user": "hammer-user", "item": i} for i in [*warm, "pre:0"]]
        assert c.post("/interactions", json={"interactions": history}, headers=HEADERS).status_code == 200
        assert c.get("/readyz").json()["model_version"] == two.old

        with Hammer(c, trained_artifact) as hammer:
            time.sleep(0.2)
            started = c.post("/admin/reload", json={"version": two.new}, headers=HEADERS)
            assert started.status_code == 202, started.text
            assert started.json()["state"] == "embedding" and started.json()["serving_version"] == two.old
            seen_progress: list[tuple[int, int]] = []

            def swapped() -> bool:
                status = c.get("/admin/reload", headers=HEADERS).json()
                seen_progress.append((status["items_done"], status["items_planned"]))
                assert status["state"] in ("embedding", "catching_up", "swapped"), status
                return bool(status["state"] == "swapped")

            assert _wait_for(swapped, 60), c.get("/admin/reload", headers=HEADERS).json()
            swapped_at = time.monotonic()
            time.sleep(0.3)  # writes and reads after the swap go to the new recommender
        assert hammer.errors == []
        statuses = [s for _, s, _ in hammer.reads] + [s for _, s in hammer.write_statuses]
        assert statuses and all(s in (200, 201) for s in statuses)
        assert {v for _, _, v in hammer.reads} == {two.old, two.new}
        assert all(v == two.new for start, _, v in hammer.reads if start > swapped_at)
        assert any(t < swapped_at for t, _ in hammer.write_statuses), "no write raced the rebuild"
        assert any(0 < done < planned for done, planned in seen_progress) or len(seen_progress) < 3
        assert seen_progress[-1][0] >= seen_progress[-1][1] >= len(before)

        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        ids, vectors, cold = runtime.recommender.index.live_vectors()
        served = {i: v for i, v, is_cold in zip(ids, vectors, cold, strict=True) if is_cold}
        everything = {**before, **hammer.written}
        assert set(served) == set(everything)
        new_rows = _rows_under(two.root, two.new, everything, tmp_path)
        old_rows = _rows_under(two.root, two.old, everything, tmp_path)
        for item_id, row in served.items():
            np.testing.assert_allclose(row, new_rows[item_id], rtol=1e-4, atol=1e-5, err_msg=item_id)
            assert not np.allclose(row, old_rows[item_id], atol=1e-3), f"{item_id} kept the old model's row"

        everyone = c.get("/recommend", params={"user": "fresh-user", "k": len(runtime.recommender.index)}).json()
        assert everyone["model_version"] == two.new
        assert set(everything) <= {i["id"] for i in everyone["items"]}
        assert c.get("/recommend", params={"user": "hammer-user"}).json()["fallback"] is False
        metrics = c.get("/metrics").text
        assert f'm2rec_model_info{{model_version="{two.new}"}} 1.0' in metrics and two.old not in metrics
        assert 'm2rec_model_reloads_total{outcome="swapped"} 1.0' in metrics


def test_a_bad_artifact_is_refused_and_the_old_model_keeps_serving(
    two_artifacts: TwoArtifacts, trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    root = _copy_root(two_artifacts, tmp_path)
    tensors = root / two_artifacts.new / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    spec = StoreSpec("sqlite", str(tmp_path / "s.sqlite3"), "")
    with TestClient(create_app(_settings(root, spec))) as c:
        item = trained_artifact.cold_item(0, "kept")
        assert c.post("/items", json=item, headers=HEADERS).status_code == 201
        refused = c.post("/admin/reload", json={"version": two_artifacts.new}, headers=HEADERS)
        assert refused.status_code == 422 and "checksum mismatch" in refused.json()["detail"]
        status = c.get("/admin/reload", headers=HEADERS).json()
        assert status["state"] == "refused" and "checksum mismatch" in status["detail"]
        assert status["serving_version"] == two_artifacts.old

        missing = c.post("/admin/reload", json={"version": "20990101T000000Z-00000000"}, headers=HEADERS)
        assert missing.status_code == 422 and "neither an artifact" in missing.json()["detail"]
        assert c.post("/admin/reload", json={"version": "../etc"}, headers=HEADERS).status_code == 422
        assert c.post("/admin/reload", json={"version": two_artifacts.new}).status_code == 401
        assert c.get("/admin/reload").status_code == 401
        same = c.post("/admin/reload", headers=HEADERS)  # no body: what `current` names, already served
        assert same.status_code == 200 and same.json()["serving_version"] == two_artifacts.old

        got = c.get("/recommend", params={"user": "anyone", "k": 5}).json()
        assert got["model_version"] == two_artifacts.old and "kept" in {i["id"] for i in got["items"]}
        metrics = c.get("/metrics").text
        assert 'm2rec_model_reloads_total{outcome="refused"} 2.0' in metrics


def test_moving_the_current_pointer_reloads_a_polling_service(
    two_artifacts: TwoArtifacts, trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    root = _copy_root(two_artifacts, tmp_path)
    spec = StoreSpec("sqlite", str(tmp_path / "s.sqlite3"), "")
    with TestClient(create_app(_settings(root, spec, artifact_poll_seconds=0.05))) as c:
        item = trained_artifact.cold_item(1, "before-the-move")
        assert c.post("/items", json=item, headers=HEADERS).status_code == 201
        time.sleep(0.2)
        assert c.get("/readyz").json()["model_version"] == two_artifacts.old  # nothing moved: no reload
        set_current(root, two_artifacts.new)
        assert _wait_for(lambda: c.get("/readyz").json()["model_version"] == two_artifacts.new, 20)
        got = c.get("/recommend", params={"user": "anyone", "k": 2000}).json()
        assert got["model_version"] == two_artifacts.new and item["id"] in {i["id"] for i in got["items"]}


def test_shutting_down_during_a_reload_stops_it_promptly(
    two_artifacts: TwoArtifacts, trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    spec = StoreSpec("sqlite", str(tmp_path / "s.sqlite3"), "")
    settings = _settings(two_artifacts.root, spec, reload_batch_items=1, reload_batch_pause_seconds=5.0)
    with TestClient(create_app(settings)) as c:
        items = [trained_artifact.cold_item(n, f"slow:{n}") for n in range(5)]
        assert c.post("/items/batch", json={"items": items}, headers=HEADERS).status_code == 200
        assert c.post("/admin/reload", json={"version": two_artifacts.new}, headers=HEADERS).status_code == 202
        conflict = c.post("/admin/reload", json={"version": two_artifacts.new}, headers=HEADERS)
        assert conflict.status_code == 409 and "running" in conflict.json()["detail"]
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3.0
    with TestClient(create_app(settings)) as c:  # the store is intact and still on the old model
        got = c.get("/recommend", params={"user": "anyone", "k": 2000}).json()
        assert got["model_version"] == two_artifacts.old and {i["id"] for i in items} <= {i["id"] for i in got["items"]}
