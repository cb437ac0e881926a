"""What both Redis stores share: records <-> hash fields, stream entries -> events, and which
client errors mean "Redis cannot answer now" (StoreUnavailable, a 503)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec

import redis.exceptions as rexc
from redis.typing import EncodableT, FieldT

from service.store.protocol import StoreUnavailable
from service.store.records import (
    Event,
    EventKind,
    ItemRecord,
    content_from_bytes,
    embedding_from_bytes,
    vector_to_bytes,
)

_P = ParamSpec("_P")

# Failures meaning "Redis cannot answer now": unreachable, read-only replica, cluster slots down or
# moving, or out of memory under `maxmemory-policy noeviction` (writes refused, nothing evicted).
# Other errors (WRONGTYPE, bad arguments, CROSSSLOT) are bugs and propagate.
UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.ClusterError,
               rexc.TryAgainError, rexc.OutOfMemoryError, rexc.SlotNotCoveredError,
               rexc.RedisClusterUnreachableError)


@contextmanager
def unavailable_on_errors() -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def call(fn: Callable[_P, Any], *args: _P.args, **kwargs: _P.kwargs) -> Any:
    with unavailable_on_errors():
        return fn(*args, **kwargs)


def mean(values: Sequence[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def item_fields(rec: ItemRecord) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {
        "attributes": json.dumps(rec.attributes),
        "embedding": vector_to_bytes(rec.embedding),
        "model_version": rec.model_version,
        "created_at": repr(rec.created_at),  # repr round-trips a float exactly
    }
    if rec.content is not None:
        fields["content"] = vector_to_bytes(rec.content)
    return fields


def record(item_id: str, fields: dict[bytes, bytes]) -> ItemRecord:
    return ItemRecord(
        item_id=item_id,
        attributes=json.loads(fields[b"attributes"]),
        content=content_from_bytes(fields.get(b"content")),
        embedding=embedding_from_bytes(fields[b"embedding"]),
        model_version=fields[b"model_version"].decode(),
        created_at=float(fields[b"created_at"]),
    )


def event(event_id: bytes, fields: dict[bytes, bytes]) -> Event:
    item_id = fields.get(b"item_id")
    users = fields.get(b"user_ids")
    return Event(
        event_id=event_id.decode(),
        kind=EventKind(fields[b"kind"].decode()),
        at=float(fields[b"at"]),
        item_id=None if item_id is None else item_id.decode(),
        user_ids=tuple(json.loads(users)) if users else (),
    )
