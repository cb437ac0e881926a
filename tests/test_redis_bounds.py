"""Every Redis structure is bounded: histories by length and by an idle TTL refreshed on write, the
users index by the same TTL, the event stream by its cap. Real Redis, a namespace per test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from service.store import Interaction
from service.store.redis import RedisStore
from tests.conftest import REDIS_URL, StoreSpec, redis_namespace


@pytest.fixture
def spec() -> Iterator[StoreSpec]:
    with redis_namespace() as spec:
        yield spec


def _client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def test_a_history_expires_its_ttl_after_the_last_write_and_each_write_renews_it(spec: StoreSpec) -> None:
    store = RedisStore.from_url(spec.location, namespace=spec.namespace, history_ttl=100)
    store.add_interactions([Interaction("u", "a", 1.0)])
    key = f"{store.prefix}hist:u"
    client = _client()
    client.expire(key, 5)  # as if most of the TTL had passed
    store.add_interactions([Interaction("u", "b", 2.0)])
    assert 95 <= client.ttl(key) <= 100
    store.close()


def test_idle_users_disappear_from_histories_and_from_the_users_index(spec: StoreSpec) -> None:
    store = RedisStore.from_url(spec.location, namespace=spec.namespace, history_ttl=1)
    store.add_interactions([Interaction("idle", "a", 1.0)])
    time.sleep(1.2)
    store.add_interactions([Interaction("active", "a", 2.0)])
    assert store.get_history("idle") == [] and not store.user_exists("idle")
    assert store.get_history("active") == ["a"]
    members = {m.decode() for m in cast(list[bytes], _client().zrange(f"{store.prefix}users", 0, -1))}
    assert members == {"active"}
    store.close()


def test_without_a_ttl_histories_are_kept(spec: StoreSpec) -> None:
    store = RedisStore.from_url(spec.location, namespace=spec.namespace)
    store.add_interactions([Interaction("u", "a", 1.0)])
    assert _client().ttl(f"{store.prefix}hist:u") == -1  # no expiry
    store.close()


def test_after_many_writes_every_key_is_within_its_bound(spec: StoreSpec) -> None:
    store = RedisStore.from_url(spec.location, namespace=spec.namespace, max_history=5, event_cap=20,
                                history_ttl=3600)
    for n in range(300):
        store.add_interactions([Interaction(f"u{n % 3}", f"i{n}", float(n)), Interaction("u9", f"i{n}", float(n))])
    client = _client()
    keys = {cast(bytes, k).decode() for k in client.scan_iter(match=f"{store.prefix}*")}
    histories = [k for k in keys if k.startswith(f"{store.prefix}hist:")]
    assert len(histories) == 4
    for key in histories:
        assert client.zcard(key) <= 5 and 0 < client.ttl(key) <= 3600
    # XADD MAXLEN ~ trims whole stream nodes (up to 100 entries each), so the bound is cap + a node
    assert client.xlen(f"{store.prefix}events") <= 20 + 100
    assert client.zcard(f"{store.prefix}users") == 4
    assert keys == set(histories) | {f"{store.prefix}events", f"{store.prefix}users"}
    store.close()
