"""Where each Redis key lives: one hash tag per namespace (single Redis) or per bucket (Redis Cluster).

A Redis Cluster runs MULTI/EXEC or a Lua script only on keys of one slot, and a slot is chosen by the
key's hash tag (the text between the first `{` and the next `}`). Two layouts:

Single Redis (`SingleNodeKeys`, the layout every existing deployment has; unchanged, no migration):

    m2rec:{ns}:item:<id>      hash    the item record
    m2rec:{ns}:items          zset    every item id (score 0)
    m2rec:{ns}:hist:<user>    zset    item -> latest timestamp, the newest max_history
    m2rec:{ns}:seen:<user>    zset    items pushed out of the history, the newest max_seen - max_history
    m2rec:{ns}:users          zset    user -> time of their last write
    m2rec:{ns}:events         stream  one entry per change
    m2rec:{ns}:meta           hash    small key/value

One tag, one slot: a write and its event are one MULTI/EXEC.

Redis Cluster (`ClusterKeys`): items and users are spread over `BUCKETS` buckets by a CRC-32 of
their id; each bucket is its own hash tag, so one slot holds an item's record *and* the bucket's id
set (or a user's history, seen set *and* the bucket's users index), and a Lua script updates them
atomically. The `/` cannot occur in a namespace (Settings.redis_namespace), so no namespace's tag
can equal another's bucket tag.

    m2rec:{ns/i/<b>}:item:<id>      hash    the item record
    m2rec:{ns/i/<b>}:items          zset    the ids of bucket b
    m2rec:{ns/i/<b>}:deleted:<id>   string  a delete whose event may not be written yet (expires)
    m2rec:{ns/u/<b>}:hist:<user>    zset    as above
    m2rec:{ns/u/<b>}:seen:<user>    zset    as above (absent until the history overflows)
    m2rec:{ns/u/<b>}:users          zset    the users of bucket b
    m2rec:{ns}:events               stream  ONE stream: replicas read every change in one order
    m2rec:{ns}:meta                 hash

The event stream is one key on one slot (one master) by design: it is the order replicas apply
changes in. A master holds about 1/masters of the buckets.
"""

from __future__ import annotations

import zlib

# Fixed for the life of a deployment: changing it moves every key. 1024 buckets spread evenly over
# up to a few dozen masters (each master serves ~1024/masters of them) while a whole-catalogue read
# (count, iteration) stays one pipelined command per bucket.
BUCKETS = 1024


class SingleNodeKeys:
    """Every key of a namespace under one hash tag: `m2rec:{namespace}:`."""

    def __init__(self, namespace: str) -> None:
        self.prefix = f"m2rec:{{{namespace}}}:"
        self.events = self.prefix + "events"
        self.meta = self.prefix + "meta"
        self.item_sets = [self.prefix + "items"]
        self.user_sets = [self.prefix + "users"]

    def item(self, item_id: str) -> str:
        return f"{self.prefix}item:{item_id}"

    def item_set(self, item_id: str) -> str:
        return self.item_sets[0]

    def hist(self, user_id: str) -> str:
        return f"{self.prefix}hist:{user_id}"

    def seen(self, user_id: str) -> str:
        return f"{self.prefix}seen:{user_id}"

    def user_set(self, user_id: str) -> str:
        return self.user_sets[0]


class ClusterKeys:
    """Items and users in `buckets` hash tags; events and meta under the namespace's own tag."""

    def __init__(self, namespace: str, buckets: int = BUCKETS) -> None:
        self.namespace = namespace
        self.buckets = buckets
        self.prefix = f"m2rec:{{{namespace}}}:"
        self.events = self.prefix + "events"
        self.meta = self.prefix + "meta"
        self.item_sets = [f"{self._items_tag(b)}items" for b in range(buckets)]
        self.user_sets = [f"{self._users_tag(b)}users" for b in range(buckets)]

    def bucket(self, id_: str) -> int:
        # CRC-32, not hash(): the same id must map to the same bucket in every process
        return zlib.crc32(id_.encode()) % self.buckets

    def _items_tag(self, bucket: int) -> str:
        return f"m2rec:{{{self.namespace}/i/{bucket}}}:"

    def _users_tag(self, bucket: int) -> str:
        return f"m2rec:{{{self.namespace}/u/{bucket}}}:"

    def item(self, item_id: str) -> str:
        return f"{self._items_tag(self.bucket(item_id))}item:{item_id}"

    def item_set(self, item_id: str) -> str:
        return self.item_sets[self.bucket(item_id)]

    def tombstone(self, item_id: str) -> str:
        return f"{self._items_tag(self.bucket(item_id))}deleted:{item_id}"

    def hist(self, user_id: str) -> str:
        return f"{self._users_tag(self.bucket(user_id))}hist:{user_id}"

    def seen(self, user_id: str) -> str:
        return f"{self._users_tag(self.bucket(user_id))}seen:{user_id}"

    def user_set(self, user_id: str) -> str:
        return self.user_sets[self.bucket(user_id)]
