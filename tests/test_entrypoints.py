"""The process entry points: settings from M2REC_* environment variables, `python -m service`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.config import Settings
from tests.conftest import TrainedArtifact


def test_settings_come_from_m2rec_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M2REC_STORE_URL", "redis://10.0.0.1:6379/2")
    monkeypatch.setenv("M2REC_API_KEY", "s3cret")
    monkeypatch.setenv("M2REC_INDEX_KIND", "exact")
    monkeypatch.setenv("M2REC_K_MAX", "50")
    settings = Settings()
    assert settings.uses_redis and settings.index_kind == "exact" and settings.k_max == 50
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    monkeypatch.delenv("M2REC_STORE_URL")
    assert not Settings().uses_redis  # no Redis URL: the embedded SQLite store
    monkeypatch.setenv("M2REC_INDEX_KIND", "hnsw")
    with pytest.raises(ValidationError):
        Settings()


def test_python_dash_m_service_serves_the_app(trained_artifact: TrainedArtifact, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "M2REC_ARTIFACT_PATH": str(trained_artifact.root), "M2REC_PORT": str(port),
           "M2REC_STORE_URL": str(tmp_path / "s.sqlite3")}
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=Path(__file__).resolve().parents[1],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            time.sleep(0.2)
        assert ready.json()["ready"] is True
        got = httpx.get(f"http://127.0.0.1:{port}/recommend", params={"user": "u", "k": 3}).json()
        assert got["fallback"] is True and len(got["items"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=10)
