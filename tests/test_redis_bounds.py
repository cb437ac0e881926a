"""Every Redis structure is bounded: histories and seen overflows by length and by an idle TTL refreshed
on write, the users index by the same TTL, the event stream by its cap. Real Redis and a real Redis
Cluster, a namespace per test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from redis.cluster import RedisCluster

from service.store import Interaction
from service.store.cluster_url import parse_cluster_url
from service.store.redis import RedisStore
from service.store.redis_cluster import RedisClusterStore
from tests.conftest import StoreSpec, redis_namespace
from tests.redis_cluster import RedisClusterProcesses


@pytest.fixture(params=["redis", "redis-cluster"])
def spec(request: pytest.FixtureRequest) -> Iterator[StoreSpec]:
    if request.param == "redis-cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        with redis_namespace(cluster.url) as spec:
            yield spec
    else:
        with redis_namespace() as spec:
            yield spec


def _open(spec: StoreSpec, **limits: Any) -> RedisStore:
    if spec.cluster:
        return RedisClusterStore.from_url(spec.location, namespace=spec.namespace, **limits)
    return RedisStore.from_url(spec.location, namespace=spec.namespace, **limits)


def _client(spec: StoreSpec) -> Any:  # redis.Redis or RedisCluster: the same commands used here
    if spec.cluster:
        host, port = parse_cluster_url(spec.location).nodes[0]
        return RedisCluster(host=host, port=port)
    return redis.Redis.from_url(spec.location)


def test_a_history_expires_its_ttl_after_the_last_write_and_each_write_renews_it(spec: StoreSpec) -> None:
    store = _open(spec, history_ttl=100, max_history=1)  # "a" is pushed into the seen overflow by "b"
    store.add_interactions([Interaction("u", "a", 1.0)])
    store.add_interactions([Interaction("u", "b", 2.0)])
    client = _client(spec)
    for key in (store.keys.hist("u"), store.keys.seen("u")):
        client.expire(key, 5)  # as if most of the TTL had passed
    store.add_interactions([Interaction("u", "c", 3.0)])
    assert 95 <= client.ttl(store.keys.hist("u")) <= 100
    assert 95 <= client.ttl(store.keys.seen("u")) <= 100
    store.close()


def test_idle_users_disappear_from_histories_and_from_the_users_index(spec: StoreSpec) -> None:
    store = _open(spec, history_ttl=1, max_history=1)
    # a write trims the users index it writes to: on a cluster, its user's bucket's; so an active
    # user of the idle user's bucket (on one Redis, any user)
    active = next(u for u in (f"active-{n}" for n in range(100_000))
                  if store.keys.user_set(u) == store.keys.user_set("idle"))
    store.add_interactions([Interaction("idle", "a", 1.0), Interaction("idle", "b", 1.5)])  # "a" overflows
    time.sleep(1.2)
    store.add_interactions([Interaction(active, "a", 2.0)])
    assert store.get_history("idle") == [] and not store.user_exists("idle")
    assert store.get_seen(["idle"]) == {"idle": set()}
    assert store.get_history(active) == ["a"]
    members = {m.decode() for m in cast(list[bytes], _client(spec).zrange(store.keys.user_set(active), 0, -1))}
    assert members == {active}
    store.close()


def test_without_a_ttl_histories_are_kept(spec: StoreSpec) -> None:
    store = _open(spec, max_history=1)
    store.add_interactions([Interaction("u", "a", 1.0), Interaction("u", "b", 2.0)])
    client = _client(spec)
    assert client.ttl(store.keys.hist("u")) == -1  # no expiry
    assert client.ttl(store.keys.seen("u")) == -1
    store.close()


def test_after_many_writes_every_key_is_within_its_bound(spec: StoreSpec) -> None:
    store = _open(spec, max_history=5, max_seen=7, event_cap=20, history_ttl=3600)
    users = ["u0", "u1", "u2", "u9"]
    for n in range(300):
        store.add_interactions([Interaction(f"u{n % 3}", f"i{n}", float(n)), Interaction("u9", f"i{n}", float(n))])
    client = _client(spec)
    keys = {cast(bytes, k).decode() for k in client.scan_iter(match=f"m2rec:{{{spec.namespace}[}}/]*")}
    for user in users:
        assert client.zcard(store.keys.hist(user)) == 5 and 0 < client.ttl(store.keys.hist(user)) <= 3600
        # seen items = history ∪ overflow: the overflow holds the newest 7 - 5 pushed out of the history
        assert client.zcard(store.keys.seen(user)) == 2 and 0 < client.ttl(store.keys.seen(user)) <= 3600
        assert len(store.get_seen([user])[user]) == 7
    # XADD MAXLEN ~ trims whole stream nodes (up to 100 entries each), so the bound is cap + a node
    assert client.xlen(store.keys.events) <= 20 + 100
    user_sets = {store.keys.user_set(u) for u in users}
    assert sum(client.zcard(k) for k in user_sets) == 4
    expected = {store.keys.events, *user_sets, *(store.keys.hist(u) for u in users),
                *(store.keys.seen(u) for u in users)}
    assert keys == expected
    store.close()


def test_a_user_within_the_history_window_has_no_seen_key(spec: StoreSpec) -> None:
    store = _open(spec, max_history=3)
    store.add_interactions([Interaction("u", f"i{t}", float(t)) for t in range(3)])
    client = _client(spec)
    assert not client.exists(store.keys.seen("u"))  # the history is its seen items: no second copy
    store.add_interactions([Interaction("u", "i3", 3.0)])
    assert [m.decode() for m in cast(list[bytes], client.zrange(store.keys.seen("u"), 0, -1))] == ["i0"]
    assert store.get_seen(["u"]) == {"u": {"i0", "i1", "i2", "i3"}}
    store.close()
