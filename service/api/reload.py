"""Hot model reload: a new artifact's recommender is built beside the serving one, then swapped in.

1. Load and verify the artifact and build its model. A bad artifact is refused here, with the
   loader's message, and the old model keeps serving.
2. In a worker thread: take the store's event cursor, re-embed every stored item from its raw
   inputs (attributes + content) in batches, build the new index.
3. Catch up with the events written meanwhile, through any replica, by following from that cursor.
4. Under the swap gate (no write in flight, new writes wait): one last catch-up, then the routes'
   recommender, the follower's cursor and the model version metric change together. A write
   acknowledged by the old recommender is therefore already in the store and its event applied.

Stored rows keep the version that computed them: rewriting them would race item updates and
flood every replica's follower with events; the new recommender re-embeds stale rows itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from service.api.runtime import Runtime
from service.core.recommender import Recommender
from service.model.artifact import (
    CURRENT_POINTER,
    MANIFEST_FILE,
    VERSION_PATTERN,
    Artifact,
    ArtifactError,
    load_artifact,
    resolve_current,
)
from service.store import ItemRecord, Store

log = logging.getLogger("m2rec.reload")
CATCH_UP_PASSES = 3  # unlocked passes before the locked one, so the locked one has little to apply
CLOSE_TIMEOUT = 10.0  # seconds shutdown waits for a cancelled reload to stop touching the store


class ReloadState(StrEnum):
    IDLE = "idle"
    EMBEDDING = "embedding"
    CATCHING_UP = "catching_up"
    SWAPPED = "swapped"
    REFUSED = "refused"
    FAILED = "failed"
    CANCELLED = "cancelled"


RUNNING = frozenset({ReloadState.EMBEDDING, ReloadState.CATCHING_UP})


@dataclass(frozen=True)
class ReloadStatus:
    state: ReloadState
    serving_version: str | None
    target_version: str | None = None
    items_done: int = 0
    items_planned: int = 0
    started_at: float | None = None  # unix seconds
    finished_at: float | None = None
    detail: str | None = None


class ReloadInProgressError(RuntimeError):
    """A reload is already running; its status is at GET /admin/reload."""


class ReloadCancelledError(Exception):
    """The service is shutting down; the half-built recommender is dropped."""


class _BatchedStore:
    """The store as the new recommender's build sees it: items in reload-sized batches, progress
    reported, a pause between batches, and an exit when the reload is cancelled."""

    def __init__(self, store: Store, batch_items: int, pause: float, cancelled: threading.Event,
                 on_batch: Callable[[int], None]) -> None:
        self._store = store
        self._batch_items = batch_items
        self._pause = pause
        self._cancelled = cancelled
        self._on_batch = on_batch

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        for batch in self._store.iter_items(self._batch_items):
            if self._cancelled.is_set():
                raise ReloadCancelledError
            yield batch
            self._on_batch(len(batch))  # the consumer asks for the next batch once this one is embedded
            if self._pause and self._cancelled.wait(self._pause):
                raise ReloadCancelledError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Reloader:
    """One reload at a time for one app; `build` makes an unindexed recommender from an artifact."""

    def __init__(self, runtime: Runtime, build: Callable[[Artifact], Recommender]) -> None:
        self.runtime = runtime
        self._build = build
        self._cancelled = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._status = ReloadStatus(ReloadState.IDLE, None)

    def status(self) -> ReloadStatus:
        serving = self.runtime.recommender
        return dataclasses.replace(self._status, serving_version=None if serving is None else serving.version)

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def location(self, version: str | None) -> Path:
        """The artifact to load: `version` under the configured root, else what the settings point at."""
        configured = self.runtime.settings.artifact_path
        if version is None:
            return configured
        if not re.fullmatch(VERSION_PATTERN, version):
            raise ArtifactError(f"{version!r} is not an artifact version (UTC timestamp and hash, "
                                f"e.g. 20260101T000000Z-0123abcd)")
        root = configured.parent if (configured / MANIFEST_FILE).is_file() else configured
        return root / version

    def pointer_target(self) -> str | None:
        """The version the root's `current` pointer names; None when the settings name a version."""
        root = self.runtime.settings.artifact_path
        if not (root / CURRENT_POINTER).is_symlink():
            return None
        return resolve_current(root).name

    async def start(self, version: str | None = None) -> ReloadStatus:
        """Verify the artifact now (ArtifactError: refused, nothing changes) and rebuild in the
        background; the status says whether a reload started or the version is already served."""
        if self.running():
            raise ReloadInProgressError(
                f"a reload to {self._status.target_version} is running ({self._status.items_done}/"
                f"{self._status.items_planned} items re-embedded); wait for it to finish")
        path = self.location(version)
        try:
            new = await asyncio.to_thread(self._prepare, path)
        except ArtifactError as exc:
            self.runtime.metrics.reloads.labels(outcome="refused").inc()
            self._status = ReloadStatus(ReloadState.REFUSED, None, version, finished_at=time.time(),
                                        detail=str(exc))
            log.warning("reload refused: %s", exc)
            raise
        if new is None:
            return self.status()
        self._cancelled.clear()
        self._status = ReloadStatus(ReloadState.EMBEDDING, None, new.version, started_at=time.time())
        self._task = asyncio.create_task(self._run(new), name=f"m2rec-reload-{new.version}")
        return self.status()

    def _prepare(self, path: Path) -> Recommender | None:
        serving = self.runtime.recommender
        if serving is None:
            raise ArtifactError("the service is still starting; reload once /readyz answers")
        artifact = load_artifact(path)
        if artifact.version == serving.version:
            return None
        if artifact.manifest.content_dim != serving.content_dim:
            raise ArtifactError(
                f"artifact at {artifact.path} expects content_dim={artifact.manifest.content_dim} but stored items "
                f"carry content for model {serving.version} (content_dim={serving.content_dim}); they could not be "
                f"re-embedded; deploy a model with the same content encoder")
        return self._build(artifact)

    async def _run(self, new: Recommender) -> None:
        runtime, metrics = self.runtime, self.runtime.metrics
        try:
            cursor = await asyncio.to_thread(self._rebuild, new)
            self._status = dataclasses.replace(self._status, state=ReloadState.CATCHING_UP)
            for _ in range(CATCH_UP_PASSES):
                followed = await asyncio.to_thread(new.maintainer.follow, cursor)
                if followed.cursor == cursor:
                    break
                cursor = followed.cursor
            async with runtime.gate.exclusive():
                cursor = (await asyncio.to_thread(new.maintainer.follow, cursor)).cursor
                old = runtime.recommender
                runtime.recommender, runtime.cursor = new, cursor
        except ReloadCancelledError:
            metrics.reloads.labels(outcome="cancelled").inc()
            self._finish(ReloadState.CANCELLED, "the service shut down during the reload")
            return
        except asyncio.CancelledError:
            metrics.reloads.labels(outcome="cancelled").inc()
            self._finish(ReloadState.CANCELLED, "the service shut down during the reload")
            raise
        except Exception as exc:  # the old model keeps serving; the operator reads why
            log.exception("reload to %s failed; still serving the old model", new.version)
            metrics.reloads.labels(outcome="failed").inc()
            self._finish(ReloadState.FAILED, f"{type(exc).__name__}: {exc}")
            return
        metrics.reloads.labels(outcome="swapped").inc()
        metrics.index_rebuilds.labels(reason="reload").inc()
        metrics.set_model_version(new.version)
        metrics.set_index_size(*new.index.count())
        self._finish(ReloadState.SWAPPED, None)
        log.info("reloaded: serving model %s (was %s) with %d items indexed",
                 new.version, None if old is None else old.version, len(new.index))

    def _rebuild(self, new: Recommender) -> str | None:
        """Worker thread: every stored item re-embedded by the new model; returns the cursor to follow from."""
        settings, metrics, maintainer = self.runtime.settings, self.runtime.metrics, new.maintainer
        store = maintainer.store
        planned = store.count_items()
        self._status = dataclasses.replace(self._status, items_planned=planned)
        metrics.reembed_started(planned)

        def on_batch(n: int) -> None:
            done = self._status.items_done + n
            self._status = dataclasses.replace(self._status, items_done=done)
            metrics.reembed_progressed(done)

        maintainer.store = _BatchedStore(store, settings.reload_batch_items, settings.reload_batch_pause_seconds,
                                         self._cancelled, on_batch)
        try:
            return maintainer.build_index()
        finally:
            maintainer.store = store

    def _finish(self, state: ReloadState, detail: str | None) -> None:
        self._status = dataclasses.replace(self._status, state=state, finished_at=time.time(), detail=detail)

    async def follow_pointer(self, interval: float) -> None:
        """Reload whenever the root's `current` pointer moves to another version (not when it merely
        differs from the served one: an operator may have reloaded another version on purpose)."""
        seen = await asyncio.to_thread(self._pointer_or_none)
        while True:
            await asyncio.sleep(interval)
            target = await asyncio.to_thread(self._pointer_or_none)
            if target is None or target == seen or self.running():
                continue  # a running reload: look again next time
            seen = target
            try:
                await self.start(target)
            except ArtifactError:
                continue  # refused and counted; not retried until the pointer moves again

    def _pointer_or_none(self) -> str | None:
        try:
            return self.pointer_target()
        except (OSError, ArtifactError) as exc:
            log.warning("cannot read the artifact pointer: %s", exc)
            return None

    async def close(self) -> None:
        """Stop a running reload (at its next batch) and wait until it no longer touches the store."""
        self._cancelled.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("a reload did not stop within %.0f s of shutdown", CLOSE_TIMEOUT)
            self._task.cancel()
