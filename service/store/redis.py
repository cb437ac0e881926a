"""Redis backend on one Redis server: the source of truth in production, shared by all replicas.

Keys (service/store/redis_keys.py, `SingleNodeKeys`): all under one hash tag, `m2rec:{namespace}:`,
so every write and its event are one MULTI/EXEC (holding Lua scripts where a step must read what
it moves) and a reader sees a write whole or not at all.

    item:<id>    hash   attributes (JSON), content / embedding (float32 bytes), model_version, created_at
    items        zset   every item id, score 0: count, and id-ordered paging with ZRANGE BYLEX
    hist:<user>  zset   item -> latest timestamp, the newest max_history; expires history_ttl
                        seconds after the user's last write (when set)
    seen:<user>  zset   the items pushed out of the history (newest max_seen - max_history), same
                        expiry; absent until a user's history overflows. A user's seen items are
                        history ∪ seen (service/store/redis_scripts.py), so stores written before
                        it existed read their histories as seen
    users        zset   user -> time of their last write: sampled for stats; users idle longer than
                        history_ttl are trimmed from it on every write
    events       stream one entry per change, XADD MAXLEN ~ cap
    meta         hash   small key/value (index snapshot id, model version)

Every key is bounded: items by the catalogue (deleted explicitly), histories and seen sets by their
caps and history_ttl, users by history_ttl, events by event_cap.

`RedisClusterStore` (service/store/redis_cluster.py) reuses the reads here on a cluster layout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster

from service.store.protocol import DEFAULT_EVENT_CAP, DEFAULT_MAX_HISTORY, DEFAULT_MAX_SEEN
from service.store.records import Event, EventKind, Interaction, ItemRecord, PutResult, StoreStats, latest_per_user
from service.store.redis_codec import call, event, item_fields, mean, record, unavailable_on_errors
from service.store.redis_keys import ClusterKeys, SingleNodeKeys
from service.store.redis_scripts import add_history_args

# Conditional delete in one round trip: the event is written only if the item existed.
_DELETE_ITEM = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('DEL', KEYS[2])
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*',
                  'kind', ARGV[3], 'item_id', ARGV[1], 'at', ARGV[4])
"""


class RedisStore:
    inline_reads = False  # a network round trip, and up to the socket timeout when Redis is down
    # one Redis reads several users' keys at one instant in MULTI/EXEC; a cluster cannot across slots
    _snapshot_reads = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "default",
        max_history: int = DEFAULT_MAX_HISTORY,
        max_seen: int = DEFAULT_MAX_SEEN,
        event_cap: int = DEFAULT_EVENT_CAP,
        history_ttl: int | None = None,
    ) -> None:
        """`client` must be built with decode_responses=False (vectors are stored as bytes).
        `history_ttl`: seconds a user's history outlives their last interaction; None keeps it forever."""
        self._init(client, SingleNodeKeys(namespace), max_history=max_history, max_seen=max_seen,
                   event_cap=event_cap, history_ttl=history_ttl)
        self._delete_script = client.register_script(_DELETE_ITEM)

    def _init(self, client: redis.Redis | RedisCluster, keys: SingleNodeKeys | ClusterKeys, *, max_history: int,
              max_seen: int, event_cap: int, history_ttl: int | None) -> None:
        self.max_history = max_history
        self.max_seen = max(max_seen, max_history)  # the history's items are seen items too
        self.event_cap = event_cap
        self.history_ttl = history_ttl
        self.keys = keys
        self.prefix = keys.prefix
        self._r = client

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str = "default", timeout: float = 2.0, max_history: int = DEFAULT_MAX_HISTORY,
        max_seen: int = DEFAULT_MAX_SEEN, event_cap: int = DEFAULT_EVENT_CAP, history_ttl: int | None = None,
    ) -> RedisStore:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False
        )
        return cls(client, namespace=namespace, max_history=max_history, max_seen=max_seen, event_cap=event_cap,
                   history_ttl=history_ttl)

    def _xadd(self, pipe: Any, fields: dict[str, str]) -> None:
        pipe.xadd(self.keys.events, fields, maxlen=self.event_cap, approximate=True)

    # -- items --------------------------------------------------------------------------------

    def put_items(self, records: Sequence[ItemRecord]) -> PutResult:
        if not records:
            return PutResult()
        at = repr(time.time())
        keys = self.keys
        with unavailable_on_errors():
            pipe = self._r.pipeline(transaction=True)
            for rec in records:
                pipe.zadd(keys.item_set(rec.item_id), {rec.item_id: 0})
                pipe.delete(keys.item(rec.item_id))  # a None content must not leave the old one
                pipe.hset(keys.item(rec.item_id), mapping=item_fields(rec))
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
        if not ids:
            return {}
        with unavailable_on_errors():
            pipe = self._r.pipeline(transaction=False)
            for item_id in ids:
                pipe.hgetall(self.keys.item(item_id))
            replies = pipe.execute()
        pairs = zip(ids, replies, strict=True)
        return {item_id: record(item_id, fields) for item_id, fields in pairs if fields}

    def delete_item(self, item_id: str) -> bool:
        keys = self.keys
        with unavailable_on_errors():
            event_id = self._delete_script(
                keys=[keys.item_set(item_id), keys.item(item_id), keys.events],
                args=[item_id, self.event_cap, EventKind.ITEM_DELETE.value, repr(time.time())],
            )
        return event_id is not None

    def count_items(self) -> int:
        return int(call(self._r.zcard, self.keys.item_sets[0]))

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        start = b"-"
        while True:
            page: list[bytes] = call(
                self._r.zrange, self.keys.item_sets[0], start, b"+", bylex=True, offset=0, num=batch_size
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
        keys = self.keys
        with unavailable_on_errors():
            # one MULTI/EXEC: every user's script (history, seen overflow, users index) and the event
            pipe = self._r.pipeline(transaction=True)
            for user_id in users:
                pipe.execute_command("EVAL", *add_history_args(
                    (keys.hist(user_id), keys.seen(user_id), keys.user_set(user_id)), user_id, latest[user_id],
                    max_history=self.max_history, max_seen=self.max_seen, history_ttl=self.history_ttl, now=now))
            kind = EventKind.INTERACTIONS.value
            self._xadd(pipe, {"kind": kind, "user_ids": json.dumps(users), "at": repr(time.time())})
            replies = pipe.execute()
        event_id: bytes = replies[-1]
        return event_id.decode()

    def get_history(self, user_id: str) -> list[str]:
        members: list[bytes] = call(self._r.zrange, self.keys.hist(user_id), 0, -1)
        return [m.decode() for m in members]

    def get_histories(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        members = self._per_user(user_ids, lambda pipe, user_id: pipe.zrange(self.keys.hist(user_id), 0, -1))
        return {user_id: [m.decode() for m in found] for user_id, found in members.items()}

    def get_seen(self, user_ids: Sequence[str]) -> dict[str, set[str]]:
        # the history and the items pushed out of it (a user last written before seen sets existed
        # has only a history)
        members = self._per_user(
            user_ids, lambda pipe, user_id: pipe.zunion([self.keys.seen(user_id), self.keys.hist(user_id)]))
        return {user_id: {m.decode() for m in found} for user_id, found in members.items()}

    def _per_user(self, user_ids: Sequence[str], read: Callable[[Any, str], object]) -> dict[str, list[bytes]]:
        """One read per distinct user in one round trip (a pipeline per master on a cluster); on one
        Redis in MULTI/EXEC, so every user is read at the same instant."""
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        pipe = self._r.pipeline(transaction=self._snapshot_reads)
        for user_id in unique:
            read(pipe, user_id)
        replies: list[list[bytes]] = call(pipe.execute)
        return dict(zip(unique, replies, strict=True))

    def user_exists(self, user_id: str) -> bool:
        return bool(call(self._r.exists, self.keys.hist(user_id)))

    # -- events and metadata -------------------------------------------------------------------

    def read_events(self, after_id: str | None = None, limit: int = 1000) -> list[Event]:
        start = "-" if after_id is None else "(" + after_id
        entries = call(self._r.xrange, self.keys.events, start, "+", count=limit)
        return [event(eid, fields) for eid, fields in entries]

    def first_event_id(self) -> str | None:
        entries = call(self._r.xrange, self.keys.events, "-", "+", count=1)
        return entries[0][0].decode() if entries else None

    def last_event_id(self) -> str | None:
        entries = call(self._r.xrevrange, self.keys.events, "+", "-", count=1)
        return entries[0][0].decode() if entries else None

    def get_meta(self, key: str) -> str | None:
        value: bytes | None = call(self._r.hget, self.keys.meta, key)
        return None if value is None else value.decode()

    def set_meta(self, key: str, value: str) -> None:
        call(self._r.hset, self.keys.meta, key, value)

    # -- operations ---------------------------------------------------------------------------

    def stats(self, sample: int = 20) -> StoreStats:
        """MEMORY USAGE of a random sample of item hashes and of users' history + seen overflow."""
        with unavailable_on_errors():
            items = int(self._r.zcard(self.keys.item_sets[0]))
            item_ids: list[bytes] = self._r.zrandmember(self.keys.item_sets[0], sample) or []  # type: ignore[assignment]
            user_ids: list[bytes] = self._r.zrandmember(self.keys.user_sets[0], sample) or []  # type: ignore[assignment]
            return self._sampled_sizes(items, [i.decode() for i in item_ids], [u.decode() for u in user_ids])

    def _sampled_sizes(self, items: int, item_ids: Sequence[str], user_ids: Sequence[str]) -> StoreStats:
        pipe = self._r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.memory_usage(self.keys.item(item_id))
        for user_id in user_ids:
            pipe.memory_usage(self.keys.hist(user_id))
            pipe.memory_usage(self.keys.seen(user_id))
        sizes: list[int | None] = pipe.execute()
        per_user = [(h or 0) + (s or 0) if h is not None else None
                    for h, s in zip(sizes[len(item_ids) :: 2], sizes[len(item_ids) + 1 :: 2], strict=True)]
        return StoreStats(items, mean(sizes[: len(item_ids)]), mean(per_user))

    def ping(self) -> None:
        call(self._r.ping)

    def close(self) -> None:
        self._r.close()
