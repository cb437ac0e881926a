"""The container files, checked as far as this machine allows (no Docker daemon here): the
Dockerfile's CMD and HEALTHCHECK run as written against a tiny real artifact, its ENV and compose's
environment name real settings, and docker-compose.yml / prometheus.yml / Grafana provisioning agree.

`running_service` is also how tests/test_prometheus.py starts the service: the container's command.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.conftest import TrainedArtifact
from tests.live_server import stop_process, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "service" / "deploy"
# PyYAML comes with uvicorn[standard]; imported by name because the project installs no stubs for it
yaml: Any = importlib.import_module("yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_exec(instruction: str) -> list[str]:
    """The exec-form (JSON array) command of CMD, or of HEALTHCHECK after its options."""
    args = next(a for i, a in dockerfile_instructions() if i == instruction)
    if instruction == "HEALTHCHECK":
        args = args[args.index("CMD ") + len("CMD "):]
    command = json.loads(args)
    assert isinstance(command, list) and all(isinstance(c, str) for c in command)
    return command


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def local(command: list[str]) -> list[str]:
    """The image's `python` is this venv's interpreter here."""
    return [sys.executable if c == "python" else c for c in command]


@contextmanager
def running_service(artifact_root: Path, store_url: str, **env: str) -> Iterator[str]:
    """The Dockerfile's CMD with the Dockerfile's ENV, paths pointed at local files; yields its base URL
    once /readyz says ready. Extra M2REC_* settings come as keyword arguments."""
    port = free_port()
    values = {**os.environ, **dockerfile_env(), "M2REC_HOST": "127.0.0.1", "M2REC_PORT": str(port),
              "M2REC_ARTIFACT_PATH": str(artifact_root), "M2REC_STORE_URL": store_url, **env}
    server = subprocess.Popen(local(dockerfile_exec("CMD")), cwd=ROOT, env=values,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, f"{url}/readyz", 60,
                         lambda: server.stderr.read().decode() if server.stderr else "exited")
        yield url
    finally:
        stop_process(server)


def healthcheck(port: int) -> int:
    env = {**os.environ, "M2REC_PORT": str(port)}
    return subprocess.run(local(dockerfile_exec("HEALTHCHECK")), env=env, capture_output=True,
                          timeout=30).returncode


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_dockerfile_cmd_serves_and_its_healthcheck_tells_up_from_down(
    trained_artifact: TrainedArtifact, tmp_path: Path
) -> None:
    with running_service(trained_artifact.root, str(tmp_path / "s.sqlite3")) as url:
        port = int(url.rsplit(":", 1)[1])
        got = httpx.get(f"{url}/recommend", params={"user": "u", "k": 3}).json()
        assert got["fallback"] is True and len(got["items"]) == 3
        assert healthcheck(port) == 0
    assert healthcheck(port) != 0  # nothing listens any more


def test_dockerfile_is_slim_non_root_and_installs_cpu_torch_at_the_pinned_version() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in {"root", "0"}
    runs = " ".join(a for i, a in steps if i == "RUN")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    copied = [a.split()[0] for i, a in steps if i == "COPY"]
    assert "training" not in copied and "." not in copied  # the serving image has no training code or data


def test_dockerfile_and_compose_environment_name_real_settings() -> None:
    fields = set(Settings.model_fields)
    names = set(dockerfile_env())
    for service in compose()["services"].values():
        names |= set(service.get("environment", {}))
    settings = {n for n in names if n.startswith("M2REC_")}
    assert settings, "no M2REC_ settings found"
    unknown = {n for n in settings if n.removeprefix("M2REC_").lower() not in fields}
    assert not unknown, f"not settings of service.config.Settings: {unknown}"
    Settings.model_validate({n.removeprefix("M2REC_").lower(): v for n, v in dockerfile_env().items() if n in settings})


def test_compose_runs_redis_durably_two_replicas_prometheus_and_grafana() -> None:
    services = compose()["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    replicas = {name: s for name, s in services.items() if s.get("build") == "."}
    assert sorted(replicas) == ["m2rec-1", "m2rec-2"]
    for replica in replicas.values():
        assert replica["environment"]["M2REC_STORE_URL"] == "redis://redis:6379/0"
        assert any(v.endswith(":/artifacts:ro") for v in replica["volumes"])
        # a replica writes its index snapshot on SIGTERM: Docker's default 10 s would kill a large one
        assert int(replica["stop_grace_period"].removesuffix("s")) >= 30
    artifact_mounts = {next(v for v in r["volumes"] if v.endswith(":/artifacts:ro")) for r in replicas.values()}
    assert len(artifact_mounts) == 1  # one shared artifact directory
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    m2rec_job = next(j for j in scraped["scrape_configs"] if j["job_name"] == "m2rec")
    targets = {t for group in m2rec_job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:8000" for name in replicas}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name} mounts missing {host}"


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/m2rec.yml").read_text())["providers"]
    assert mounts["./service/deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    assert mounts["./service/deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/m2rec.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def test_docker_compose_parses_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("DOCKER-COMPOSE NOT INSTALLED (apt-get install -y docker-compose): compose file not parsed")
    done = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
