"""Redis Cluster backend: the same store spread over the masters of a Redis Cluster.

Keys (service/store/redis_keys.py, `ClusterKeys`): items and users in 1024 hash-tag buckets, so an
item's record and its bucket's id set share a slot, as do a user's history, seen set and their
bucket's users index; the event stream and meta keep one key each under the namespace's tag.

A cluster runs a transaction only within one slot, so a write can no longer be one MULTI/EXEC with
its event. Each write is, in this order:

  1. state: one Lua script per item (record + id set) or per user (history + seen overflow + users
     index, service/store/redis_scripts.py), atomic on its slot like a MULTI/EXEC; the scripts of
     a batch are pipelined, one round trip per master (a cluster pipeline cannot carry several
     MULTI blocks: one transaction per slot would be a round trip each;
     benchmarks/results/store-cluster.md compares the two);
  2. then the event(s), appended to the one stream in one MULTI/EXEC.

Replicas apply *state* on an event (service/recommender.py `apply_events` reads the item as it is
now), so an event must never be readable before the state it announces: state first. A write that
fails after (1) raises StoreUnavailable (503) with some state written and no event; every step is
an upsert or a set-add, so the client's retry writes the same state again and appends the events.
Not retried, such an item is stored (GET /items finds it) but reaches other replicas' indexes only
at their next rebuild. A delete first removes the record and leaves a tombstone for a day, so that a
retry still answers True and appends the event the failed attempt did not (see `delete_item`).

Whole-catalogue reads (count, id-ordered iteration, stats) read the 1024 bucket id sets, pipelined:
no SCAN over every key of every master (histories outnumber items; benchmarks/results/store-cluster.md).
"""

from __future__ import annotations

import heapq
import json
import random
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from service.store.cluster_url import parse_cluster_url
from service.store.protocol import DEFAULT_EVENT_CAP, DEFAULT_MAX_HISTORY, DEFAULT_MAX_SEEN, StoreUnavailable
from service.store.records import EventKind, Interaction, ItemRecord, PutResult, StoreStats, latest_per_user
from service.store.redis import RedisStore
from service.store.redis_codec import call, item_fields, unavailable_on_errors
from service.store.redis_keys import BUCKETS, ClusterKeys
from service.store.redis_scripts import add_history_args

# KEYS: bucket id set, item hash. ARGV: id, then field, value pairs. Returns 1 when the id is new.
_UPSERT_ITEM = """
local added = redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('DEL', KEYS[2])  -- a record without content must not keep the old content
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return added
"""

# KEYS: bucket id set, item hash, tombstone. ARGV: id, tombstone seconds. 1: deleted now, or by an
# earlier attempt whose event may be missing (tombstone); 0: unknown id.
_DELETE_ITEM = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
  return 1
end
return redis.call('EXISTS', KEYS[3])
"""

TOMBSTONE_SECONDS = 86_400  # how long a delete can be retried after failing before its event
_PAGE = 256  # ids read per bucket at a time while iterating (memory: buckets × _PAGE ids at most)


class RedisClusterStore(RedisStore):
    """The Store on Redis Cluster; reads shared with RedisStore, writes and catalogue scans its own."""

    _snapshot_reads = False

    def __init__(
        self,
        client: RedisCluster,
        *,
        namespace: str = "default",
        max_history: int = DEFAULT_MAX_HISTORY,
        max_seen: int = DEFAULT_MAX_SEEN,
        event_cap: int = DEFAULT_EVENT_CAP,
        history_ttl: int | None = None,
        buckets: int = BUCKETS,
    ) -> None:
        """`client` must be built with decode_responses=False (vectors are stored as bytes)."""
        self.cluster_keys = ClusterKeys(namespace, buckets)
        self._init(client, self.cluster_keys, max_history=max_history, max_seen=max_seen, event_cap=event_cap,
                   history_ttl=history_ttl)
        self._c = client

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str = "default", timeout: float = 2.0, max_history: int = DEFAULT_MAX_HISTORY,
        max_seen: int = DEFAULT_MAX_SEEN, event_cap: int = DEFAULT_EVENT_CAP, history_ttl: int | None = None,
    ) -> RedisClusterStore:
        """Connects at once (a cluster client reads the slot map when built): StoreUnavailable if no
        startup node answers."""
        parsed = parse_cluster_url(url)
        try:
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],  # type: ignore[no-untyped-call]
                ssl=parsed.ssl, username=parsed.username, password=parsed.password,
                socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=False,
                # serve the slots that are up when a master is down (its slots answer 503)
                require_full_coverage=False,
                # a request to a dead master gives up after ~0.3 s instead of hanging the request
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            )
        except (RedisError, RedisClusterException) as exc:
            raise StoreUnavailable(f"redis cluster {parsed.nodes}: {exc}") from exc
        return cls(client, namespace=namespace, max_history=max_history, max_seen=max_seen, event_cap=event_cap,
                   history_ttl=history_ttl)

    def _pipeline(self, transaction: bool) -> Any:
        """Non-transactional: commands grouped per master, one round trip each. Transactional: one slot."""
        return self._c.pipeline(transaction=transaction)  # type: ignore[no-untyped-call]

    def _append_events(self, entries: Sequence[dict[str, str]]) -> str:
        """Step 2 of every write: the events, in one MULTI/EXEC on the stream's slot; the last id."""
        with unavailable_on_errors():
            pipe = self._pipeline(transaction=True)
            for fields in entries:
                self._xadd(pipe, fields)
            replies: list[bytes] = pipe.execute()
        return replies[-1].decode()

    # -- items --------------------------------------------------------------------------------

    def put_items(self, records: Sequence[ItemRecord]) -> PutResult:
        if not records:
            return PutResult()
        keys = self.cluster_keys
        encoded = [item_fields(rec) for rec in records]  # a record that cannot be encoded writes nothing
        with unavailable_on_errors():
            pipe = self._pipeline(transaction=False)
            for rec, fields in zip(records, encoded, strict=True):
                pipe.execute_command("EVAL", _UPSERT_ITEM, 2, keys.item_set(rec.item_id), keys.item(rec.item_id),
                                     rec.item_id, *chain.from_iterable(fields.items()))
            added: list[int] = pipe.execute()
        at = repr(time.time())
        last = self._append_events(
            [{"kind": EventKind.ITEM_UPSERT.value, "item_id": rec.item_id, "at": at} for rec in records])
        inserted: list[str] = []
        updated: list[str] = []
        for rec, new in zip(records, added, strict=True):
            (inserted if new else updated).append(rec.item_id)
        return PutResult(inserted, updated, last)

    def delete_item(self, item_id: str) -> bool:
        keys = self.cluster_keys
        found = call(self._c.eval, _DELETE_ITEM, 3, keys.item_set(item_id), keys.item(item_id),
                     keys.tombstone(item_id), item_id, TOMBSTONE_SECONDS)
        if not found:
            return False
        self._append_events([{"kind": EventKind.ITEM_DELETE.value, "item_id": item_id, "at": repr(time.time())}])
        # the event is written, so no retry needs the tombstone; a delete of the id now answers False
        call(self._c.delete, keys.tombstone(item_id))
        return True

    def count_items(self) -> int:
        with unavailable_on_errors():
            pipe = self._pipeline(transaction=False)
            for key in self.cluster_keys.item_sets:
                pipe.zcard(key)
            counts: list[int] = pipe.execute()
        return sum(counts)

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        """Ids merged in order from every bucket, each paged by ZRANGE BYLEX; records fetched a
        batch at a time (ids deleted between the two reads are skipped)."""
        sets = self.cluster_keys.item_sets
        with unavailable_on_errors():
            pipe = self._pipeline(transaction=False)
            for key in sets:
                pipe.zrange(key, b"-", b"+", bylex=True, offset=0, num=_PAGE)
            first_pages: list[list[bytes]] = pipe.execute()
        ids = heapq.merge(*(self._bucket_ids(key, page) for key, page in zip(sets, first_pages, strict=True)))
        batch: list[str] = []
        for item_id in ids:
            batch.append(item_id.decode())
            if len(batch) == batch_size:
                if found := self.get_items(batch):
                    yield list(found.values())
                batch = []
        if batch and (found := self.get_items(batch)):
            yield list(found.values())

    def _bucket_ids(self, key: str, page: list[bytes]) -> Iterator[bytes]:
        while page:
            yield from page
            if len(page) < _PAGE:
                return
            page = call(self._c.zrange, key, b"(" + page[-1], b"+", bylex=True, offset=0, num=_PAGE)

    # -- users --------------------------------------------------------------------------------

    def add_interactions(self, interactions: Sequence[Interaction]) -> str | None:
        latest = latest_per_user(interactions)
        if not latest:
            return None
        users = sorted(latest)
        keys = self.cluster_keys
        now = time.time()
        with unavailable_on_errors():
            pipe = self._pipeline(transaction=False)
            for user_id in users:
                pipe.execute_command("EVAL", *add_history_args(
                    (keys.hist(user_id), keys.seen(user_id), keys.user_set(user_id)), user_id, latest[user_id],
                    max_history=self.max_history, max_seen=self.max_seen, history_ttl=self.history_ttl, now=now))
            pipe.execute()
        return self._append_events(
            [{"kind": EventKind.INTERACTIONS.value, "user_ids": json.dumps(users), "at": repr(time.time())}])

    # -- operations ---------------------------------------------------------------------------

    def stats(self, sample: int = 20) -> StoreStats:
        """Item count from every bucket; MEMORY USAGE of items and users drawn from random buckets."""
        keys = self.cluster_keys
        with unavailable_on_errors():
            pipe = self._pipeline(transaction=False)
            for key in keys.item_sets:
                pipe.zcard(key)
            for key in (*keys.item_sets, *keys.user_sets):
                pipe.zrandmember(key)
            replies: list[int | bytes | None] = pipe.execute()
            n = keys.buckets
            items = sum(int(c or 0) for c in replies[:n])
            item_ids = [r.decode() for r in replies[n : 2 * n] if isinstance(r, bytes)]
            user_ids = [r.decode() for r in replies[2 * n :] if isinstance(r, bytes)]
            return self._sampled_sizes(items, random.sample(item_ids, min(sample, len(item_ids))),
                                       random.sample(user_ids, min(sample, len(user_ids))))

    def ping(self) -> None:
        """PING the master of the event stream: every write and every replica's follower needs it.
        Another master down makes its own slots answer 503, not the whole service unready."""
        node = self._c.get_node_from_key(self.cluster_keys.events)  # type: ignore[no-untyped-call]
        call(self._c.ping, target_nodes=node)

    def close(self) -> None:
        self._c.close()
