"""Persistence for items, user histories, the event stream and metadata.

`RedisStore` lives in `service.store.redis` and is not imported here, so code that only needs the
records or SQLite never imports redis.
"""

from service.store.protocol import DEFAULT_EVENT_CAP, DEFAULT_MAX_HISTORY, Store, StoreUnavailable
from service.store.records import (
    Event,
    EventKind,
    Interaction,
    ItemRecord,
    PutResult,
    StoreStats,
    event_order_key,
)
from service.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_EVENT_CAP",
    "DEFAULT_MAX_HISTORY",
    "Event",
    "EventKind",
    "Interaction",
    "ItemRecord",
    "PutResult",
    "SqliteStore",
    "Store",
    "StoreStats",
    "StoreUnavailable",
    "event_order_key",
]
