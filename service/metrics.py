"""Every Prometheus metric of the service, declared once per app in its own registry.

Labels are bounded on purpose: route templates (never raw paths), status codes, a fixed set of
outcomes, the model version. Item and user ids never become labels. Label values known in advance
are created at zero, so `rate()` and dashboard panels have a series before the first event.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.store import Store, StoreUnavailable

__all__ = ["CONTENT_TYPE_LATEST", "INGEST_REJECT_REASONS", "RELOAD_OUTCOMES", "SKIP_REASONS", "STORE_ERROR_SOURCES",
           "Metrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INGEST_REJECT_REASONS = ("invalid_item", "invalid_request", "trained_item", "too_large", "store_unavailable")
STORE_ERROR_SOURCES = ("request", "follower", "readiness", "stats")
RELOAD_OUTCOMES = ("swapped", "failed", "cancelled", "refused")  # service/api/reload.py
SKIP_REASONS = ("non_finite_score",)  # items left out of a /recommend answer (service/core/recommender.py)
STORE_SAMPLE_SECONDS = 30.0  # store.stats() costs ~2·sample round trips: at most this often per replica


class Metrics:
    def __init__(self, store_sample_seconds: float = STORE_SAMPLE_SECONDS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "m2rec_http_requests", "HTTP requests by route template and status", ["route", "method", "status"],
            registry=r)
        self.latency = Histogram(
            "m2rec_http_request_seconds", "HTTP request latency by route template and status",
            ["route", "method", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.items_ingested = Counter(
            "m2rec_items_ingested", "Items written by this replica: inserted or updated", ["outcome"],
            registry=r)
        self.ingest_errors = Counter(
            "m2rec_ingest_errors", "Rejected item writes by reason", ["reason"], registry=r)
        self.items_deleted = Counter("m2rec_items_deleted", "Items deleted through this replica", registry=r)
        self.interactions = Counter(
            "m2rec_interactions", "Interactions accepted by this replica", registry=r)
        self.recommendations = Counter(
            "m2rec_recommendations", "Recommendation responses: personal or fallback (unknown or empty user)",
            ["outcome"], registry=r)
        self.recommended_items = Counter(
            "m2rec_recommended_items", "Items served in recommendations: cold (new), warm (trained), held_out "
            "(registered items the model's own dataset held out of training: not new) "
            "(cold share = cold / all)", ["kind"], registry=r)
        self.recommend_skipped = Counter(
            "m2rec_recommend_skipped_items", "Items left out of /recommend answers, by reason (non_finite_score: "
            "a row that is not finite; it leaves the replica's index)", ["reason"], registry=r)
        self.recommend_batch = Histogram(
            "m2rec_recommend_batch_size", "/recommend requests answered together by one index search",
            buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.index_items = Gauge("m2rec_index_items", "Live items in the index", ["kind"], registry=r)
        self.model_info = Gauge("m2rec_model_info", "1 for the model version being served",
                                ["model_version"], registry=r)
        self.ingest_lag = Histogram(
            "m2rec_ingest_to_servable_seconds",
            "From the store write to the item being searchable on this replica", ["source"],
            buckets=_LAG_BUCKETS, registry=r)
        self.events_applied = Counter(
            "m2rec_events_applied", "Store events applied to the index by the follower", ["kind"], registry=r)
        self.follower_errors = Counter(
            "m2rec_follower_errors", "Event follower iterations that failed", ["reason"], registry=r)
        self.index_rebuilds = Counter(
            "m2rec_index_rebuilds", "Full index rebuilds from the store", ["reason"], registry=r)
        self.store_errors = Counter(
            "m2rec_store_errors", "Store calls that failed because the store did not answer, by caller",
            ["source"], registry=r)
        self.reembed_total = Gauge(
            "m2rec_reembed_total_items", "Stored items the current (or last) model reload re-embeds", registry=r)
        self.reembed_done = Gauge(
            "m2rec_reembed_done_items", "Stored items re-embedded so far by the current (or last) reload",
            registry=r)
        self.reloads = Counter("m2rec_model_reloads", "Model reloads by outcome", ["outcome"], registry=r)
        self.store_items = Gauge("m2rec_store_items", "Registered items in the store (sampled)", registry=r)
        self.store_bytes_per_item = Gauge(
            "m2rec_store_bytes_per_item", "Mean stored bytes of an item (sampled; Redis: MEMORY USAGE)",
            registry=r)
        self.store_bytes_per_user = Gauge(
            "m2rec_store_bytes_per_user", "Mean stored bytes of a user history (sampled; Redis: MEMORY USAGE)",
            registry=r)
        self.store_sample_seconds = store_sample_seconds
        self._store_sampled_at: float | None = None
        self._store_sampling = threading.Lock()

        for reason in INGEST_REJECT_REASONS:
            self.ingest_errors.labels(reason=reason)
        for source in STORE_ERROR_SOURCES:
            self.store_errors.labels(source=source)
        for reason in ("store_unavailable", "error"):
            self.follower_errors.labels(reason=reason)
        for outcome in ("personal", "fallback"):
            self.recommendations.labels(outcome=outcome)
        for kind in ("cold", "warm", "held_out"):
            self.recommended_items.labels(kind=kind)
        for reason in SKIP_REASONS:
            self.recommend_skipped.labels(reason=reason)
        for outcome in ("inserted", "updated"):
            self.items_ingested.labels(outcome=outcome)
        for source in ("local", "stream"):
            self.ingest_lag.labels(source=source)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome=outcome)

    def set_index_size(self, warm: int, cold: int) -> None:
        self.index_items.labels(kind="warm").set(warm)
        self.index_items.labels(kind="cold").set(cold)

    def set_model_version(self, version: str) -> None:
        """Exactly one version series: a reload replaces the old one instead of adding a second."""
        self.model_info.clear()
        self.model_info.labels(model_version=version).set(1)

    def reembed_started(self, total: int) -> None:
        self.reembed_total.set(total)
        self.reembed_done.set(0)

    def reembed_progressed(self, done: int) -> None:
        self.reembed_done.set(done)

    def sample_store(self, store: Store) -> None:
        """Item count and bytes per item/user from store.stats(), at most every store_sample_seconds.
        A failed sample keeps the previous values and counts a store error; a sample with nothing to
        measure yet (no items or no users) is taken again at the next call."""
        if not self._store_sampling.acquire(blocking=False):
            return  # another scrape is sampling right now
        try:
            now = time.monotonic()
            if self._store_sampled_at is not None and now - self._store_sampled_at < self.store_sample_seconds:
                return
            try:
                stats = store.stats()
            except StoreUnavailable as exc:
                self._store_sampled_at = now
                self.store_errors.labels(source="stats").inc()
                log.warning("store stats unavailable: %s", exc)
                return
            if stats.bytes_per_item is not None and stats.bytes_per_user is not None:
                self._store_sampled_at = now
            self.store_items.set(stats.items)
            if stats.bytes_per_item is not None:
                self.store_bytes_per_item.set(stats.bytes_per_item)
            if stats.bytes_per_user is not None:
                self.store_bytes_per_user.set(stats.bytes_per_user)
        finally:
            self._store_sampling.release()

    def render(self) -> bytes:
        return generate_latest(self.registry)
