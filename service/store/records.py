"""What the store holds and returns: items, interactions, events, results.

Every backend returns these same types, so the app, the index follower and the tests never see a
Redis hash or an SQLite row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

# Ranges of event ids are read in this order; both backends' ids map onto (major, minor).
EventOrderKey = tuple[int, int]


@dataclass(frozen=True, slots=True, eq=False)
class ItemRecord:
    """One item as registered: its raw inputs (to re-embed under a new model) and its index row.

    `content` is persisted as float32 (the model computes in float32; float64 would double the
    store's memory), so a round trip returns float32-rounded values.
    """

    item_id: str
    attributes: list[str]
    content: list[float] | None  # (F,) raw dense vector, or None when the item had none
    embedding: npt.NDArray[np.float32]  # (D+1,) the model's row [v; b]
    model_version: str
    created_at: float  # unix seconds

    def __eq__(self, other: object) -> bool:
        # dataclass equality would compare arrays with `==` and fail on their truth value
        if not isinstance(other, ItemRecord):
            return NotImplemented
        return (
            self.item_id == other.item_id
            and self.attributes == other.attributes
            and self.content == other.content
            and np.array_equal(self.embedding, other.embedding)
            and self.model_version == other.model_version
            and self.created_at == other.created_at
        )

    __hash__ = None  # type: ignore[assignment]


class Interaction(NamedTuple):
    user_id: str
    item_id: str
    timestamp: float  # unix seconds; orders the user's history


class EventKind(StrEnum):
    ITEM_UPSERT = "item_upsert"
    ITEM_DELETE = "item_delete"
    INTERACTIONS = "interactions"


@dataclass(frozen=True, slots=True)
class Event:
    """A change, small on purpose: consumers fetch the item record from the store.

    `event_id` is opaque (Redis stream id "1700000000000-0", SQLite "42"); pass it back to
    `read_events(after_id=...)` and order ids with `event_order_key`.
    """

    event_id: str
    kind: EventKind
    at: float  # unix seconds when the event was written; ingest-to-servable lag starts here
    item_id: str | None = None  # ITEM_UPSERT, ITEM_DELETE
    user_ids: tuple[str, ...] = ()  # INTERACTIONS: distinct users touched by the batch


@dataclass(frozen=True, slots=True)
class PutResult:
    """Split relative to the state before the call (an id twice in one call: inserted, then updated)."""

    inserted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    last_event_id: str | None = None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Approximate sizes from a small sample; None when there is nothing to sample."""

    items: int
    bytes_per_item: float | None
    bytes_per_user: float | None


def event_order_key(event_id: str) -> EventOrderKey:
    """Total order over event ids of one store: "42" -> (42, 0), "1700000000000-3" -> (1700000000000, 3)."""
    major, _, minor = event_id.partition("-")
    return int(major), int(minor or 0)


# Both backends store vectors as little-endian float32 bytes.
def vector_to_bytes(values: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def embedding_from_bytes(blob: bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)  # (D+1,) owned, writable copy


def content_from_bytes(blob: bytes | None) -> list[float] | None:
    if blob is None:
        return None
    values: list[float] = np.frombuffer(blob, dtype="<f4").tolist()
    return values


def latest_per_user(interactions: Sequence[Interaction]) -> dict[str, dict[str, float]]:
    """user -> item -> latest timestamp in this batch (a history keeps one entry per item)."""
    latest: dict[str, dict[str, float]] = {}
    for user_id, item_id, ts in interactions:
        items = latest.setdefault(user_id, {})
        items[item_id] = max(ts, items.get(item_id, ts))
    return latest
