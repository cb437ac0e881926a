"""The store contract, run against real SQLite and real Redis through the same tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from service.store import (
    Event,
    EventKind,
    Interaction,
    ItemRecord,
    Store,
    StoreUnavailable,
    event_order_key,
)
from service.store.redis import RedisStore
from tests.conftest import StoreSpec

ROOT = Path(__file__).resolve().parents[1]


def make_item(item_id: str, seed: int = 0, content: bool = True, version: str = "v1") -> ItemRecord:
    rng = np.random.default_rng(seed)
    return ItemRecord(
        item_id=item_id,
        attributes=[f"cat:{seed % 3}", "brand:ü-1"],
        # float32-representable values: the store keeps content as float32
        content=rng.normal(size=6).astype(np.float32).tolist() if content else None,
        embedding=rng.normal(size=5).astype(np.float32),  # (D+1,)
        model_version=version,
        created_at=1_700_000_000.0 + seed + 0.125,
    )


def all_events(store: Store) -> list[Event]:
    return store.read_events(None, limit=100_000)


# -- items ------------------------------------------------------------------------------------


def test_put_then_get_round_trips_every_field(store: Store) -> None:
    with_content, without_content = make_item("a", 1), make_item("b", 2, content=False)
    store.put_items([with_content, without_content])

    assert store.get_item("a") == with_content
    assert store.get_item("b") == without_content
    assert store.get_item("b").content is None  # type: ignore[union-attr]
    assert store.get_item("a").embedding.dtype == np.float32  # type: ignore[union-attr]
    assert store.get_item("missing") is None


def test_content_is_kept_as_float32(store: Store) -> None:
    item = make_item("a")
    precise = ItemRecord(item.item_id, item.attributes, [0.1, 1 / 3], item.embedding, "v1", 1.0)
    store.put_items([precise])

    stored = store.get_item("a")
    assert stored is not None
    assert stored.content == np.array([0.1, 1 / 3], dtype=np.float32).tolist()


def test_putting_an_id_again_updates_it_instead_of_adding_a_row(store: Store) -> None:
    first = store.put_items([make_item("a", 1)])
    newer = make_item("a", 2, content=False, version="v2")
    second = store.put_items([newer])

    assert (first.inserted, first.updated) == (["a"], [])
    assert (second.inserted, second.updated) == ([], ["a"])
    assert store.count_items() == 1
    assert store.get_item("a") == newer  # content dropped too, not left from the first put


def test_put_reports_inserted_and_updated_within_one_call(store: Store) -> None:
    store.put_items([make_item("old")])
    result = store.put_items([make_item("new"), make_item("old", 3), make_item("new", 4)])

    assert result.inserted == ["new"]
    assert result.updated == ["old", "new"]
    assert store.get_item("new") == make_item("new", 4)
    assert store.count_items() == 2


def test_a_batch_that_fails_half_way_leaves_nothing_behind(store: Store) -> None:
    good = make_item("good")
    broken = ItemRecord("broken", [], None, np.array(["not a number"]), "v1", 0.0)
    with pytest.raises(ValueError, match="could not convert"):
        store.put_items([good, broken])

    assert store.count_items() == 0
    assert store.get_item("good") is None
    assert all_events(store) == []


def test_get_items_returns_only_known_ids(store: Store) -> None:
    store.put_items([make_item("a", 1), make_item("b", 2)])

    found = store.get_items(["b", "zzz", "a", "b"])

    assert sorted(found) == ["a", "b"]
    assert found["b"] == make_item("b", 2)


def test_deleting_an_unknown_item_returns_false_and_writes_no_event(store: Store) -> None:
    assert store.delete_item("ghost") is False
    assert all_events(store) == []


def test_delete_removes_the_item_and_appends_an_event(store: Store) -> None:
    store.put_items([make_item("a"), make_item("b")])

    assert store.delete_item("a") is True

    assert store.get_item("a") is None
    assert store.count_items() == 1
    last = all_events(store)[-1]
    assert (last.kind, last.item_id) == (EventKind.ITEM_DELETE, "a")
    assert store.delete_item("a") is False


def test_iter_items_yields_every_item_once_in_batches(store: Store) -> None:
    ids = [f"item-{i:03d}" for i in range(23)]
    store.put_items([make_item(i, n) for n, i in enumerate(ids)])

    batches = list(store.iter_items(batch_size=5))

    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [r.item_id for b in batches for r in b] == sorted(ids)


# -- histories --------------------------------------------------------------------------------


def test_history_is_ordered_by_time_with_most_recent_last(store: Store) -> None:
    store.add_interactions([Interaction("u", "b", 20.0), Interaction("u", "a", 10.0)])
    store.add_interactions([Interaction("u", "c", 15.0), Interaction("other", "x", 1.0)])

    assert store.get_history("u") == ["a", "c", "b"]
    assert store.get_history("other") == ["x"]


def test_history_keeps_one_entry_per_item_at_its_latest_time(store: Store) -> None:
    store.add_interactions([Interaction("u", "a", 10), Interaction("u", "b", 20), Interaction("u", "a", 30)])
    store.add_interactions([Interaction("u", "b", 5.0)])  # older than what we have: no move

    assert store.get_history("u") == ["b", "a"]


def test_history_is_capped_to_the_most_recent_items(store_spec: StoreSpec) -> None:
    store = store_spec.open(max_history=3)
    store.add_interactions([Interaction("u", f"i{t}", float(t)) for t in range(5)])
    store.add_interactions([Interaction("u", "late", 100.0), Interaction("u", "early", -1.0)])

    assert store.get_history("u") == ["i3", "i4", "late"]
    store.close()


def test_histories_of_many_users_in_one_read_match_one_at_a_time(store: Store) -> None:
    store.add_interactions(
        [Interaction(f"u{u}", f"i{(u * 7 + t) % 11}", float(t % 4)) for u in range(30) for t in range(9)])
    users = ["u3", "nobody", "u0", "u3", *[f"u{u}" for u in range(29, 4, -1)]]

    histories = store.get_histories(users)

    assert list(histories) == list(dict.fromkeys(users))  # each user once, in the order asked
    assert histories["nobody"] == []
    assert all(histories[u] == store.get_history(u) and histories[u] for u in histories if u != "nobody")
    assert store.get_histories([]) == {}


def test_user_exists_only_after_an_interaction(store: Store) -> None:
    assert not store.user_exists("u")
    assert store.get_history("u") == []
    assert store.add_interactions([]) is None

    store.add_interactions([Interaction("u", "a", 1.0)])

    assert store.user_exists("u")
    assert not store.user_exists("v")


# -- events and metadata ----------------------------------------------------------------------


def test_events_increase_and_are_readable_after_any_id(store: Store) -> None:
    put = store.put_items([make_item("a"), make_item("b")])
    interactions_id = store.add_interactions([Interaction("u2", "a", 1.0), Interaction("u1", "b", 2.0)])
    store.delete_item("a")

    events = all_events(store)
    assert [(e.kind, e.item_id) for e in events] == [
        (EventKind.ITEM_UPSERT, "a"),
        (EventKind.ITEM_UPSERT, "b"),
        (EventKind.INTERACTIONS, None),
        (EventKind.ITEM_DELETE, "a"),
    ]
    assert events[2].user_ids == ("u1", "u2")
    assert (events[1].event_id, events[2].event_id) == (put.last_event_id, interactions_id)
    keys = [event_order_key(e.event_id) for e in events]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert store.read_events(events[1].event_id) == events[2:]
    assert store.read_events(events[0].event_id, limit=2) == events[1:3]
    assert store.read_events(events[-1].event_id) == []
    assert (store.first_event_id(), store.last_event_id()) == (events[0].event_id, events[-1].event_id)


def test_event_log_is_trimmed_near_its_cap(store_spec: StoreSpec) -> None:
    store = store_spec.open(event_cap=10)
    for start in range(0, 400, 50):
        store.put_items([make_item(f"i{n}") for n in range(start, start + 50)])

    kept = all_events(store)
    # SQLite trims exactly; Redis' MAXLEN ~ trims whole stream nodes (100 entries by default)
    assert 10 <= len(kept) <= 10 + 100
    assert kept[-1].item_id == "i399"
    assert store.first_event_id() == kept[0].event_id
    store.close()


def test_metadata_round_trips_and_overwrites(store: Store) -> None:
    assert store.get_meta("index_snapshot") is None
    store.set_meta("index_snapshot", "1-0")
    store.set_meta("index_snapshot", "2-0")
    store.set_meta("model_version", "20250101T000000-abcd")

    assert store.get_meta("index_snapshot") == "2-0"
    assert store.get_meta("model_version") == "20250101T000000-abcd"


def test_stats_count_items_and_sample_sizes(store: Store) -> None:
    empty = store.stats()
    store.put_items([make_item(f"i{n}", n) for n in range(5)])
    store.add_interactions([Interaction("u", f"i{n}", float(n)) for n in range(5)])

    stats = store.stats(sample=3)

    assert (empty.items, empty.bytes_per_item) == (0, None)
    assert stats.items == 5
    assert stats.bytes_per_item is not None
    assert stats.bytes_per_item > 5 * 4  # at least the float32 embedding
    assert stats.bytes_per_user is not None
    assert stats.bytes_per_user > 0


# -- concurrency, durability, failure ---------------------------------------------------------


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    def write(worker: int) -> None:
        for n in range(20):
            store.put_items([make_item(f"w{worker}-{n}", n)])
            store.add_interactions([Interaction(f"user{worker}", f"w{worker}-{n}", float(n))])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert store.count_items() == 80
    assert all(len(store.get_history(f"user{w}")) == 20 for w in range(4))
    ids = [e.event_id for e in all_events(store)]
    assert len(ids) == len(set(ids)) == 160


_WRITER = """
import sys, time
import numpy as np
from service.store import Interaction, ItemRecord, SqliteStore
from service.store.redis import RedisStore

backend, location, namespace = sys.argv[1:4]
store = SqliteStore(location) if backend == "sqlite" else RedisStore.from_url(location, namespace=namespace)
emb = np.arange(5, dtype=np.float32)
store.put_items([ItemRecord("durable", ["a"], [1.0, 2.0], emb, "v1", 1.0)])
store.add_interactions([Interaction("u", "durable", 5.0)])
store.set_meta("k", "v")
print("ACK", flush=True)
time.sleep(60)
"""


def test_acknowledged_writes_survive_sigkill_of_the_writer(store_spec: StoreSpec) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", _WRITER, store_spec.backend, store_spec.location, store_spec.namespace]
    writer = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ACK"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL

    reopened = store_spec.open()
    item = reopened.get_item("durable")
    assert item is not None
    assert item.content == [1.0, 2.0]
    assert reopened.get_history("u") == ["durable"]
    assert reopened.get_meta("k") == "v"
    assert [e.kind for e in all_events(reopened)] == [EventKind.ITEM_UPSERT, EventKind.INTERACTIONS]
    reopened.close()


def test_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", namespace="nowhere", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.put_items([make_item("a")])
    with pytest.raises(StoreUnavailable):
        store.get_history("u")
