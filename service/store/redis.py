"""Redis backend: the source of truth in production, shared by all replicas.

Keys (all under one prefix, `m2rec:{namespace}:`; the braces are a Redis Cluster hash tag, so
every key of a namespace lives in one slot and MULTI/Lua may touch several of them):

    item:<id>    hash   attributes (JSON), content / embedding (float32 bytes), model_version, created_at
    items        zset   every item id, score 0: count, and id-ordered paging with ZRANGE BYLEX
    hist:<user>  zset   item -> latest timestamp; capped with ZREMRANGEBYRANK; expires history_ttl
                        seconds after the user's last write (when set)
    users        zset   user -> time of their last write: sampled for stats; users idle longer than
                        history_ttl are trimmed from it on every write
    events       stream one entry per change, XADD MAXLEN ~ cap
    meta         hash   small key/value (index snapshot id, model version)

Every key is bounded: items by the catalogue (deleted explicitly), histories by max_history and
history_ttl, users by history_ttl, events by event_cap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import redis
import redis.exceptions as rexc
from redis.typing import EncodableT, FieldT

from service.store.protocol import DEFAULT_EVENT_CAP, DEFAULT_MAX_HISTORY, StoreUnavailable
from service.store.records import (
    Event,
    EventKind,
    Interaction,
    ItemRecord,
    PutResult,
    StoreStats,
    content_from_bytes,
    embedding_from_bytes,
    latest_per_user,
    vector_to_bytes,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Conditional delete in one round trip: the event is written only if the item existed.
_DELETE_ITEM = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('DEL', KEYS[2])
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*',
                  'kind', ARGV[3], 'item_id', ARGV[1], 'at', ARGV[4])
"""

# Failures meaning "Redis cannot answer now"; other errors (WRONGTYPE, bad arguments) are bugs.
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.ClusterDownError,
                rexc.TryAgainError, rexc.MasterDownError)


class RedisStore:
    inline_reads = False  # a network round trip, and up to the socket timeout when Redis is down

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "default",
        max_history: int = DEFAULT_MAX_HISTORY,
        event_cap: int = DEFAULT_EVENT_CAP,
        history_ttl: int | None = None,
    ) -> None:
        """`client` must be built with decode_responses=False (vectors are stored as bytes).
        `history_ttl`: seconds a user's history outlives their last interaction; None keeps it forever."""
        self.max_history = max_history
        self.event_cap = event_cap
        self.history_ttl = history_ttl
        self.prefix = f"m2rec:{{{namespace}}}:"
        self._r = client
        self._items = self.prefix + "items"
        self._users = self.prefix + "users"
        self._events = self.prefix + "events"
        self._meta = self.prefix + "meta"
        self._delete_script = client.register_script(_DELETE_ITEM)

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str = "default", timeout: float = 2.0, max_history: int = DEFAULT_MAX_HISTORY,
        event_cap: int = DEFAULT_EVENT_CAP, history_ttl: int | None = None,
    ) -> RedisStore:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False
        )
        return cls(client, namespace=namespace, max_history=max_history, event_cap=event_cap,
                   history_ttl=history_ttl)

    def _item_key(self, item_id: str) -> str:
        return f"{self.prefix}item:{item_id}"

    def _hist_key(self, user_id: str) -> str:
        return f"{self.prefix}hist:{user_id}"

    def _xadd(self, pipe: Any, fields: dict[str, str]) -> None:
        pipe.xadd(self._events, fields, maxlen=self.event_cap, approximate=True)

    # -- items --------------------------------------------------------------------------------

    def put_items(self, records: Sequence[ItemRecord]) -> PutResult:
        if not records:
            return PutResult()
        at = repr(time.time())
        with _unavailable_on_errors():
            pipe = self._r.pipeline(transaction=True)
            for rec in records:
                pipe.zadd(self._items, {rec.item_id: 0})
                pipe.delete(self._item_key(rec.item_id))  # a None content must not leave the old one
                pipe.hset(self._item_key(rec.item_id), mapping=_item_fields(rec))
                self._xadd(pipe, {"kind": EventKind.ITEM_UPSERT.value, "item_id": rec.item_id, "at": at})
            replies = pipe.execute()
        inserted: list[str] = []
        updated: list[str] = []
        for rec, added in zip(records, replies[0::4], strict=True):
            (inserted if added else updated).append(rec.item_id)
        return PutResult(inserted, updated, replies[-1].decode())

    def get_item(self, item_id: str) -> ItemRecord | None:
        return self.get_items([item_id]).get(item_id)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        ids = list(dict.fromkeys(item_ids))
        with _unavailable_on_errors():
            pipe = self._r.pipeline(transaction=False)
            for item_id in ids:
                pipe.hgetall(self._item_key(item_id))
            replies = pipe.execute()
        pairs = zip(ids, replies, strict=True)
        return {item_id: _record(item_id, fields) for item_id, fields in pairs if fields}

    def delete_item(self, item_id: str) -> bool:
        with _unavailable_on_errors():
            event_id = self._delete_script(
                keys=[self._items, self._item_key(item_id), self._events],
                args=[item_id, self.event_cap, EventKind.ITEM_DELETE.value, repr(time.time())],
            )
        return event_id is not None

    def count_items(self) -> int:
        return int(_call(self._r.zcard, self._items))

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        start = b"-"
        while True:
            page: list[bytes] = _call(
                self._r.zrange, self._items, start, b"+", bylex=True, offset=0, num=batch_size
            )
            if not page:
                return
            found = self.get_items([m.decode() for m in page])
            if found:  # ids deleted between the two reads are skipped
                yield list(found.values())
            start = b"(" + page[-1]

    # -- users --------------------------------------------------------------------------------

    def add_interactions(self, interactions: Sequence[Interaction]) -> str | None:
        latest = latest_per_user(interactions)
        if not latest:
            return None
        users = sorted(latest)
        now = time.time()
        with _unavailable_on_errors():
            pipe = self._r.pipeline(transaction=True)
            for user_id in users:
                key = self._hist_key(user_id)
                pipe.zadd(key, latest[user_id], gt=True)  # GT: an older event never moves an item back
                pipe.zremrangebyrank(key, 0, -(self.max_history + 1))  # keep the newest max_history
                if self.history_ttl is not None:
                    pipe.expire(key, self.history_ttl)  # refreshed on every write: idle users expire
            pipe.zadd(self._users, dict.fromkeys(users, now))
            if self.history_ttl is not None:
                pipe.zremrangebyscore(self._users, "-inf", now - self.history_ttl)
            kind = EventKind.INTERACTIONS.value
            self._xadd(pipe, {"kind": kind, "user_ids": json.dumps(users), "at": repr(time.time())})
            replies = pipe.execute()
        event_id: bytes = replies[-1]
        return event_id.decode()

    def get_history(self, user_id: str) -> list[str]:
        members: list[bytes] = _call(self._r.zrange, self._hist_key(user_id), 0, -1)
        return [m.decode() for m in members]

    def get_histories(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        # MULTI/EXEC: one round trip, and every history read at the same instant
        pipe = self._r.pipeline(transaction=True)
        for user_id in unique:
            pipe.zrange(self._hist_key(user_id), 0, -1)
        replies: list[list[bytes]] = _call(pipe.execute)
        return {user_id: [m.decode() for m in members] for user_id, members in zip(unique, replies, strict=True)}

    def user_exists(self, user_id: str) -> bool:
        return bool(_call(self._r.exists, self._hist_key(user_id)))

    # -- events and metadata -------------------------------------------------------------------

    def read_events(self, after_id: str | None = None, limit: int = 1000) -> list[Event]:
        start = "-" if after_id is None else "(" + after_id
        entries = _call(self._r.xrange, self._events, start, "+", count=limit)
        return [_event(eid, fields) for eid, fields in entries]

    def first_event_id(self) -> str | None:
        entries = _call(self._r.xrange, self._events, "-", "+", count=1)
        return entries[0][0].decode() if entries else None

    def last_event_id(self) -> str | None:
        entries = _call(self._r.xrevrange, self._events, "+", "-", count=1)
        return entries[0][0].decode() if entries else None

    def get_meta(self, key: str) -> str | None:
        value: bytes | None = _call(self._r.hget, self._meta, key)
        return None if value is None else value.decode()

    def set_meta(self, key: str, value: str) -> None:
        _call(self._r.hset, self._meta, key, value)

    # -- operations ---------------------------------------------------------------------------

    def stats(self, sample: int = 20) -> StoreStats:
        """MEMORY USAGE of a random sample of item hashes and history sorted sets."""
        with _unavailable_on_errors():
            items = int(self._r.zcard(self._items))
            item_ids: list[bytes] = self._r.zrandmember(self._items, sample) or []  # type: ignore[assignment]
            user_ids: list[bytes] = self._r.zrandmember(self._users, sample) or []  # type: ignore[assignment]
            pipe = self._r.pipeline(transaction=False)
            for item_id in item_ids:
                pipe.memory_usage(self._item_key(item_id.decode()))
            for user_id in user_ids:
                pipe.memory_usage(self._hist_key(user_id.decode()))
            sizes = pipe.execute()
        return StoreStats(items, _mean(sizes[: len(item_ids)]), _mean(sizes[len(item_ids) :]))

    def ping(self) -> None:
        _call(self._r.ping)

    def close(self) -> None:
        self._r.close()


@contextmanager
def _unavailable_on_errors() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def _call(fn: Callable[_P, Any], *args: _P.args, **kwargs: _P.kwargs) -> Any:
    with _unavailable_on_errors():
        return fn(*args, **kwargs)


def _mean(values: Sequence[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _item_fields(rec: ItemRecord) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {
        "attributes": json.dumps(rec.attributes),
        "embedding": vector_to_bytes(rec.embedding),
        "model_version": rec.model_version,
        "created_at": repr(rec.created_at),  # repr round-trips a float exactly
    }
    if rec.content is not None:
        fields["content"] = vector_to_bytes(rec.content)
    return fields


def _record(item_id: str, fields: dict[bytes, bytes]) -> ItemRecord:
    return ItemRecord(
        item_id=item_id,
        attributes=json.loads(fields[b"attributes"]),
        content=content_from_bytes(fields.get(b"content")),
        embedding=embedding_from_bytes(fields[b"embedding"]),
        model_version=fields[b"model_version"].decode(),
        created_at=float(fields[b"created_at"]),
    )


def _event(event_id: bytes, fields: dict[bytes, bytes]) -> Event:
    item_id = fields.get(b"item_id")
    users = fields.get(b"user_ids")
    return Event(
        event_id=event_id.decode(),
        kind=EventKind(fields[b"kind"].decode()),
        at=float(fields[b"at"]),
        item_id=None if item_id is None else item_id.decode(),
        user_ids=tuple(json.loads(users)) if users else (),
    )
