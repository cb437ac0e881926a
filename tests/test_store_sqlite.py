"""SQLite-only behaviour of the embedded store: durability settings, reads that never wait for a
writer, failures at open, and the tables an older store gets at open (history rows, seen items);
the shared contract is tests/test_store.py."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from service.store import Interaction, SqliteStore, StoreUnavailable
from tests.test_store import make_item


def test_sqlite_commits_through_a_fully_synced_wal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.close()
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    # journal_mode is persistent in the file; synchronous is per connection, so read it via the store
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    reopened = SqliteStore(tmp_path / "s.sqlite3")
    assert reopened._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # 2 = FULL
    reopened.close()


def test_unopenable_sqlite_file_raises_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        SqliteStore(tmp_path / "no-such-dir" / "s.sqlite3")


def test_closed_sqlite_store_raises_store_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.close()
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_sqlite_reads_do_not_wait_for_a_write_in_progress(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.put_items([make_item("before")])
    store.add_interactions([Interaction("u", "before", 1.0)])
    in_write, release = threading.Event(), threading.Event()

    def slow_write() -> None:
        with store._write() as cur:  # holds the writer's lock, as a commit waiting on its fsync does
            cur.execute("DELETE FROM history")
            cur.execute("DELETE FROM history_lists")
            in_write.set()
            release.wait(10)

    writer = threading.Thread(target=slow_write)
    writer.start()
    try:
        assert in_write.wait(10)
        done = threading.Event()
        seen: list[list[str]] = []

        def read() -> None:
            seen.append(store.get_history("u"))
            done.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert done.wait(5), "a read waited for the writer"
        assert seen == [["before"]]  # the last committed state, not the write in progress
    finally:
        release.set()
        writer.join()
    assert store.get_history("u") == []  # and the write is visible once committed
    store.close()
    with pytest.raises(StoreUnavailable):
        store.get_history("u")


def test_in_memory_sqlite_reads_see_their_own_database() -> None:
    store = SqliteStore(":memory:")
    store.put_items([make_item("a")])
    assert store.get_item("a") == make_item("a") and store.count_items() == 1
    store.close()


def test_a_store_written_before_history_lists_gets_them_at_open(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.add_interactions([Interaction("u", "b", 2.0), Interaction("u", "a", 1.0), Interaction("v", "c", 1.0)])
    with store._write() as cur:  # as an older version left it: history rows only
        cur.execute("DELETE FROM history_lists")
        cur.execute("DELETE FROM meta WHERE key = 'sqlite:history_lists'")
    store.close()

    reopened = SqliteStore(tmp_path / "s.sqlite3")

    assert reopened.get_histories(["u", "v", "w"]) == {"u": ["a", "b"], "v": ["c"], "w": []}
    reopened.close()


def test_a_store_written_before_the_seen_table_reads_its_histories_as_seen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.add_interactions([Interaction("u", "b", 2.0), Interaction("u", "a", 1.0), Interaction("v", "c", 1.0)])
    with store._write() as cur:  # as an older version left it: no seen table
        cur.execute("DROP TABLE seen")
    store.close()

    reopened = SqliteStore(tmp_path / "s.sqlite3")

    assert reopened.get_seen(["u", "v", "w"]) == {"u": {"a", "b"}, "v": {"c"}, "w": set()}
    reopened.add_interactions([Interaction("u", "d", 3.0)])
    assert reopened.get_seen(["u"]) == {"u": {"a", "b", "d"}}
    reopened.close()


def test_only_items_pushed_out_of_the_history_are_stored_as_seen_rows(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3", max_history=3)
    store.add_interactions([Interaction("u", f"i{t}", float(t)) for t in range(5)])
    store.add_interactions([Interaction("small", "x", 1.0)])
    with store._read() as cur:
        rows = cur.execute("SELECT user_id, item_id FROM seen ORDER BY item_id").fetchall()
    assert rows == [("u", "i0"), ("u", "i1")]  # the history holds i2..i4; no second copy of it
    assert store.get_seen(["u", "small"]) == {"u": {f"i{t}" for t in range(5)}, "small": {"x"}}
    store.close()
