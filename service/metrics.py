"""Every Prometheus metric of the service, declared once per app in its own registry.

Labels are bounded on purpose: route templates (never raw paths), status codes, a fixed set of
outcomes, the model version. Item and user ids never become labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "m2rec_http_requests", "HTTP requests by route template and status", ["route", "method", "status"],
            registry=r)
        self.latency = Histogram(
            "m2rec_http_request_seconds", "HTTP request latency by route template", ["route", "method"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.items_ingested = Counter(
            "m2rec_items_ingested", "Items written by this replica: inserted or updated", ["outcome"],
            registry=r)
        self.ingest_errors = Counter(
            "m2rec_ingest_errors", "Rejected item writes by reason", ["reason"], registry=r)
        self.items_deleted = Counter("m2rec_items_deleted", "Items deleted through this replica", registry=r)
        self.interactions = Counter(
            "m2rec_interactions", "Interactions accepted by this replica", registry=r)
        self.recommendations = Counter(
            "m2rec_recommendations", "Recommendation responses: personal or fallback", ["outcome"],
            registry=r)
        self.recommended_items = Counter(
            "m2rec_recommended_items", "Items served in recommendations, by cold/warm "
            "(cold share = cold / (cold + warm))", ["kind"], registry=r)
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

    def set_index_size(self, warm: int, cold: int) -> None:
        self.index_items.labels(kind="warm").set(warm)
        self.index_items.labels(kind="cold").set(cold)

    def render(self) -> bytes:
        return generate_latest(self.registry)
