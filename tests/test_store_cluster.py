"""What only the Redis Cluster store has: its URL, its key layout and slots, the order of a write's
state and event through a real master outage, and the run failing when a required cluster cannot
start. The shared contract runs in tests/test_store.py; here, real 3-master clusters."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import cast

import pytest
import redis
from pydantic import ValidationError
from redis.cluster import RedisCluster

from service.config import Settings
from service.store import EventKind, Interaction, StoreUnavailable
from service.store.cluster_url import ClusterURL, parse_cluster_url
from service.store.redis import RedisStore
from service.store.redis_cluster import RedisClusterStore
from service.store.redis_keys import BUCKETS, SingleNodeKeys
from tests.conftest import redis_namespace, start_cluster
from tests.redis_cluster import RedisClusterProcesses
from tests.test_store import make_item


def test_cluster_urls_name_their_startup_nodes_and_tls() -> None:
    assert parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,redis-3") == ClusterURL(
        [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("redis-3", 6379)], ssl=False, username=None, password=None)
    assert parse_cluster_url("rediss+cluster://app:s%40cret@[::1]:7000/0") == ClusterURL(
        [("::1", 7000)], ssl=True, username="app", password="s@cret")
    assert Settings(store_url="redis+cluster://h:7000").uses_redis_cluster
    assert not Settings(store_url="redis://h:6379/0").uses_redis_cluster


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://h:notaport", "redis+cluster://h:7000/2",
                                 "redis+cluster://h:7000,:7001", "redis+cluster://h:7000?timeout=1"])
def test_a_malformed_cluster_url_fails_the_settings_saying_why(url: str) -> None:
    with pytest.raises(ValidationError, match="Redis Cluster URL"):
        Settings(store_url=url)


def test_a_single_redis_keeps_the_key_names_it_always_had() -> None:
    keys = SingleNodeKeys("ns")
    assert (keys.item("a"), keys.item_set("a"), keys.hist("u"), keys.user_set("u"), keys.events, keys.meta) == (
        "m2rec:{ns}:item:a", "m2rec:{ns}:items", "m2rec:{ns}:hist:u", "m2rec:{ns}:users", "m2rec:{ns}:events",
        "m2rec:{ns}:meta")


def test_a_redis_history_written_before_seen_sets_existed_counts_as_seen() -> None:
    with redis_namespace() as spec:
        store = cast(RedisStore, spec.open())
        store.add_interactions([Interaction("u", "a", 1.0), Interaction("u", "b", 2.0)])
        client = redis.Redis.from_url(spec.location)
        client.delete(store.keys.seen("u"))  # as an older version left it: a history only
        client.close()
        assert store.get_seen(["u"]) == {"u": {"a", "b"}}
        store.close()


def test_an_items_and_a_users_keys_share_one_slot_and_the_buckets_cover_every_master(
    redis_cluster: RedisClusterProcesses,
) -> None:
    with redis_namespace(redis_cluster.url) as spec:
        store = cast(RedisClusterStore, spec.open(max_history=1))  # "a" overflows into the seen set
        keys = store.cluster_keys
        store.put_items([make_item("a")])
        store.add_interactions([Interaction("u", "a", 1.0), Interaction("u", "b", 2.0)])
        store.set_meta("k", "v")
        client = redis_cluster.client()

        def slot(key: str) -> int:  # asked of the server, not computed here
            return int(client.cluster_keyslot(key))

        assert slot(keys.item("a")) == slot(keys.item_set("a")) == slot(keys.tombstone("a"))
        assert slot(keys.hist("u")) == slot(keys.seen("u")) == slot(keys.user_set("u"))
        assert slot(keys.events) == slot(keys.meta)
        written = {cast(bytes, k).decode() for k in client.scan_iter(match=f"m2rec:{{{spec.namespace}[}}/]*")}
        assert written == {keys.item("a"), keys.item_set("a"), keys.hist("u"), keys.seen("u"), keys.user_set("u"),
                           keys.events, keys.meta}
        masters = redis_cluster.slot_masters()
        buckets_per_master = Counter(masters[redis_cluster.slot(k)] for k in keys.item_sets)
        assert set(buckets_per_master) == set(redis_cluster.ports)
        assert min(buckets_per_master.values()) >= 0.8 * BUCKETS / len(redis_cluster.ports)
        client.close()
        store.close()


def test_an_unreachable_cluster_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="redis cluster"):
        RedisClusterStore.from_url("redis+cluster://127.0.0.1:1", namespace="nowhere", timeout=0.2)


@pytest.mark.slow
def test_a_write_cut_between_its_state_and_its_event_is_completed_by_its_retry(tmp_path: Path) -> None:
    """Kill the event stream's master: each write has written its state on a live master and raises
    StoreUnavailable before its event; after the restart each retry appends the event, and the
    state is what one successful write leaves."""
    cluster = start_cluster(tmp_path / "cluster")
    try:
        store = RedisClusterStore.from_url(cluster.url, namespace="cut", timeout=1.0)
        keys = store.cluster_keys
        masters = cluster.slot_masters()
        events_master = masters[cluster.slot(keys.events)]
        live = [i for i in (f"id-{n}" for n in range(100)) if masters[cluster.slot(keys.item(i))] != events_master]
        item, doomed = live[:2]
        user = next(u for u in (f"user-{n}" for n in range(100))
                    if masters[cluster.slot(keys.hist(u))] != events_master)
        store.put_items([make_item(doomed)])
        before = store.last_event_id()

        cluster.kill(events_master)
        with pytest.raises(StoreUnavailable):
            store.put_items([make_item(item, 1)])
        with pytest.raises(StoreUnavailable):
            store.delete_item(doomed)
        with pytest.raises(StoreUnavailable):
            store.add_interactions([Interaction(user, item, 5.0)])
        assert store.get_item(item) == make_item(item, 1)  # state first: written, with no event yet
        assert store.get_item(doomed) is None
        assert store.get_history(user) == [item]

        cluster.restart(events_master)
        assert store.read_events(before) == []  # no event of the three was appended
        assert store.put_items([make_item(item, 1)]).updated == [item]
        assert store.delete_item(doomed) is True  # the tombstone: a retry still deletes, and says so
        assert store.add_interactions([Interaction(user, item, 5.0)]) is not None
        events = store.read_events(before)
        assert [(e.kind, e.item_id) for e in events] == [
            (EventKind.ITEM_UPSERT, item), (EventKind.ITEM_DELETE, doomed), (EventKind.INTERACTIONS, None)]
        assert store.get_item(item) == make_item(item, 1) and store.count_items() == 1
        assert store.get_history(user) == [item] and store.get_seen([user]) == {user: {item}}
        assert store.delete_item(doomed) is False  # its event is written: the id is unknown again
        store.close()
    finally:
        cluster.stop()


def test_a_cluster_that_cannot_start_fails_the_run_when_redis_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    server = shutil.which("redis-server")
    if server is not None:
        os.symlink(server, tools / "redis-server")
    broken_cli = tools / "redis-cli"
    broken_cli.write_text("#!/bin/sh\necho 'cannot create the cluster' >&2\nexit 1\n")
    broken_cli.chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setenv("M2REC_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="did NOT run and M2REC_REQUIRE_REDIS=1"):
        start_cluster(tmp_path / "cluster")
    monkeypatch.delenv("M2REC_REQUIRE_REDIS")
    with pytest.raises(pytest.skip.Exception, match="did NOT run"):
        start_cluster(tmp_path / "cluster-2")


def test_the_session_cluster_is_three_masters_serving_every_slot(redis_cluster: RedisClusterProcesses) -> None:
    client = redis_cluster.client()
    assert client.cluster_info()["cluster_state"] == "ok"
    assert len(set(redis_cluster.slot_masters())) == 3 and 0 not in redis_cluster.slot_masters()
    assert 6379 not in redis_cluster.ports
    assert isinstance(client, RedisCluster)
    client.close()
