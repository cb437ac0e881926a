"""SQLite backend: the zero-setup default, stdlib only.

WAL with synchronous=FULL: a write is acknowledged only after its transaction's WAL frames are
fsynced, so it survives kill -9 of the process (and power loss). Writes go through one connection
guarded by one lock (one transaction, one fsync per call). Reads use a pool of their own
connections: in WAL mode a reader never waits for a writer, so a read is never stuck behind
another request's fsync (the app answers GET /recommend on the event loop; see `inline_reads`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
from service.store.sqlite_schema import SCHEMA

_ITEM_COLUMNS = "item_id, attributes, content, embedding, model_version, created_at"
_IN_CHUNK = 500  # ids per `IN (...)`, well under SQLite's bound-parameter limit

_ItemRow = tuple[str, str, bytes | None, bytes, str, float]


class SqliteStore:
    # Reads are in-process, take microseconds and never wait for a writer (WAL, own connections):
    # callers may make them on an event loop (Store.inline_reads).
    inline_reads = True

    def __init__(
        self,
        path: str | Path,
        *,
        max_history: int = DEFAULT_MAX_HISTORY,
        event_cap: int = DEFAULT_EVENT_CAP,
        busy_timeout: float = 5.0,
    ) -> None:
        self.max_history = max_history
        self.event_cap = event_cap
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()  # the writer connection, and reads of an in-memory database
        # An in-memory database exists only in its one connection: reads share it (under the lock).
        self._shared_reads = self._path in (":memory:", "")
        self._idle_readers: list[sqlite3.Connection] = []  # LIFO: the most recently used cache stays warm
        self._closed = False
        try:
            # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE) below
            self._conn = self._connect()
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
            self._fill_history_lists()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite {path}: {exc}") from exc

    def _fill_history_lists(self) -> None:
        """A store written before history_lists existed gets them, once, at open."""
        with self._write() as cur:
            if cur.execute("SELECT 1 FROM meta WHERE key = 'sqlite:history_lists'").fetchone() is not None:
                return
            users = [u for (u,) in cur.execute("SELECT DISTINCT user_id FROM history").fetchall()]
            for user_id in users:
                _write_history_list(cur, user_id)
            cur.execute("INSERT INTO meta (key, value) VALUES ('sqlite:history_lists', '1')")

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One IMMEDIATE transaction: the write lock is taken up front, so no upgrade deadlock."""
        with self._lock, _unavailable_on_errors():
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None,
                               check_same_thread=False)

    @contextmanager
    def _read(self, snapshot: bool = False) -> Iterator[sqlite3.Cursor]:
        """A reader's cursor; `snapshot`: the statements see one state (one read transaction),
        for reads made of several statements."""
        if self._shared_reads:
            with self._lock, _unavailable_on_errors():
                yield self._conn.cursor()
            return
        with _unavailable_on_errors():
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            try:
                conn = self._idle_readers.pop()  # list.pop is atomic under the GIL
            except IndexError:
                conn = self._connect()
                conn.execute("PRAGMA query_only=1")
            cur = conn.cursor()
            try:
                if not snapshot:
                    yield cur
                else:
                    cur.execute("BEGIN")
                    try:
                        yield cur
                    finally:
                        cur.execute("COMMIT")
            finally:
                cur.close()
                if self._closed:
                    conn.close()
                else:
                    self._idle_readers.append(conn)

    def _append_event(
        self, cur: sqlite3.Cursor, kind: EventKind, item_id: str | None, user_ids: Sequence[str], at: float
    ) -> str:
        cur.execute(
            "INSERT INTO events (kind, item_id, user_ids, at) VALUES (?, ?, ?, ?)",
            (kind.value, item_id, json.dumps(list(user_ids)) if user_ids else None, at),
        )
        return self._trim_events(cur)

    def _trim_events(self, cur: sqlite3.Cursor) -> str:
        """Drop all but the newest `event_cap` events; returns the id of the last one inserted."""
        (event_id,) = cur.execute("SELECT last_insert_rowid()").fetchone()
        # AUTOINCREMENT never reuses ids, so trimming by id keeps the newest `event_cap` events
        cur.execute("DELETE FROM events WHERE id <= ?", (int(event_id) - self.event_cap,))
        return str(event_id)

    # -- items --------------------------------------------------------------------------------

    def put_items(self, records: Sequence[ItemRecord]) -> PutResult:
        if not records:
            return PutResult()
        inserted: list[str] = []
        updated: list[str] = []
        now = time.time()
        rows = [_item_row(rec) for rec in records]  # encoded before the write lock is taken
        events = [(EventKind.ITEM_UPSERT.value, rec.item_id, None, now) for rec in records]
        with self._write() as cur:
            known = _existing_item_ids(cur, [r.item_id for r in records])
            for rec in records:
                (updated if rec.item_id in known else inserted).append(rec.item_id)
                known.add(rec.item_id)
            # in record order, so an id twice in one call keeps its last record
            cur.executemany(
                f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (item_id) DO UPDATE SET attributes = excluded.attributes, "
                "content = excluded.content, embedding = excluded.embedding, "
                "model_version = excluded.model_version, created_at = excluded.created_at",
                rows,
            )
            cur.executemany("INSERT INTO events (kind, item_id, user_ids, at) VALUES (?, ?, ?, ?)", events)
            event_id = self._trim_events(cur)
        return PutResult(inserted, updated, event_id)

    def get_item(self, item_id: str) -> ItemRecord | None:
        return self.get_items([item_id]).get(item_id)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        found: dict[str, ItemRecord] = {}
        ids = list(dict.fromkeys(item_ids))
        with self._read(snapshot=len(ids) > _IN_CHUNK) as cur:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id IN ({marks})"
                found.update((row[0], _record(row)) for row in cur.execute(query, chunk))
        return found

    def delete_item(self, item_id: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM items WHERE item_id = ?", (item_id,))
            if cur.rowcount == 0:
                return False
            self._append_event(cur, EventKind.ITEM_DELETE, item_id, (), time.time())
        return True

    def count_items(self) -> int:
        with self._read() as cur:
            (count,) = cur.execute("SELECT COUNT(*) FROM items").fetchone()
        return int(count)

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        after = ""
        while True:
            # keyset pagination: each page is its own short read, so writers are never held off
            with self._read() as cur:
                rows = cur.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id > ? ORDER BY item_id LIMIT ?",
                    (after, batch_size),
                ).fetchall()
            if not rows:
                return
            yield [_record(row) for row in rows]
            after = rows[-1][0]

    # -- users --------------------------------------------------------------------------------

    def add_interactions(self, interactions: Sequence[Interaction]) -> str | None:
        latest = latest_per_user(interactions)
        if not latest:
            return None
        with self._write() as cur:
            for user_id, items in latest.items():
                cur.executemany(
                    "INSERT INTO history (user_id, item_id, ts) VALUES (?, ?, ?) "
                    "ON CONFLICT (user_id, item_id) DO UPDATE SET ts = max(ts, excluded.ts)",
                    [(user_id, item_id, ts) for item_id, ts in items.items()],
                )
                # same order as Redis' sorted set (score, then member bytes): keep the newest
                cur.execute(
                    "DELETE FROM history WHERE user_id = ?1 AND rowid IN (SELECT rowid FROM history "
                    "WHERE user_id = ?1 ORDER BY ts DESC, item_id DESC LIMIT -1 OFFSET ?2)",
                    (user_id, self.max_history),
                )
                _write_history_list(cur, user_id)
            return self._append_event(cur, EventKind.INTERACTIONS, None, sorted(latest), time.time())

    def get_history(self, user_id: str) -> list[str]:
        return self.get_histories([user_id])[user_id]

    def get_histories(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        unique = list(dict.fromkeys(user_ids))
        out: dict[str, list[str]] = {user: [] for user in unique}
        with self._read(snapshot=len(unique) > _IN_CHUNK) as cur:
            for s in range(0, len(unique), _IN_CHUNK):
                chunk = unique[s : s + _IN_CHUNK]
                rows = cur.execute(
                    f"SELECT user_id, items FROM history_lists WHERE user_id IN ({','.join('?' * len(chunk))})", chunk,
                ).fetchall()
                for user_id, items in rows:
                    out[user_id] = json.loads(items)
        return out

    def user_exists(self, user_id: str) -> bool:
        with self._read() as cur:
            row = cur.execute("SELECT 1 FROM history WHERE user_id = ? LIMIT 1", (user_id,)).fetchone()
        return row is not None

    # -- events and metadata -------------------------------------------------------------------

    def read_events(self, after_id: str | None = None, limit: int = 1000) -> list[Event]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT id, kind, item_id, user_ids, at FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (int(after_id) if after_id is not None else 0, limit),
            ).fetchall()
        return [
            Event(str(eid), EventKind(kind), at, item_id, tuple(json.loads(users)) if users else ())
            for eid, kind, item_id, users, at in rows
        ]

    def first_event_id(self) -> str | None:
        return self._event_bound("MIN")

    def last_event_id(self) -> str | None:
        return self._event_bound("MAX")

    def _event_bound(self, func: str) -> str | None:
        with self._read() as cur:
            (value,) = cur.execute(f"SELECT {func}(id) FROM events").fetchone()
        return None if value is None else str(value)

    def get_meta(self, key: str) -> str | None:
        with self._read() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- operations ---------------------------------------------------------------------------

    def stats(self, sample: int = 20) -> StoreStats:
        """Payload bytes (not page overhead) of the first `sample` items and users."""
        with self._read(snapshot=True) as cur:
            (items,) = cur.execute("SELECT COUNT(*) FROM items").fetchone()
            (per_item,) = cur.execute(
                "SELECT avg(length(item_id) + length(attributes) + coalesce(length(content), 0) "
                "+ length(embedding) + length(model_version) + 8) FROM (SELECT * FROM items LIMIT ?)",
                (sample,),
            ).fetchone()
            (per_user,) = cur.execute(
                "SELECT avg(b) FROM (SELECT sum(length(user_id) + length(item_id) + 8) AS b FROM history "
                "WHERE user_id IN (SELECT DISTINCT user_id FROM history LIMIT ?) GROUP BY user_id)",
                (sample,),
            ).fetchone()
        return StoreStats(int(items), per_item, per_user)

    def ping(self) -> None:
        with self._read() as cur:
            cur.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._closed = True  # readers in use close themselves when they are returned
        with self._lock:
            self._conn.close()
        while self._idle_readers:
            self._idle_readers.pop().close()


@contextmanager
def _unavailable_on_errors() -> Iterator[None]:
    # OperationalError is SQLite's "cannot do it now" (locked, I/O, closed file); ProgrammingError
    # covers use after close(). Integrity or interface errors are bugs and propagate as they are.
    try:
        yield
    except (sqlite3.OperationalError, sqlite3.ProgrammingError) as exc:
        raise StoreUnavailable(f"sqlite: {exc}") from exc


def _existing_item_ids(cur: sqlite3.Cursor, ids: Sequence[str]) -> set[str]:
    distinct = list(dict.fromkeys(ids))
    found: set[str] = set()
    for start in range(0, len(distinct), _IN_CHUNK):
        chunk = distinct[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT item_id FROM items WHERE item_id IN ({marks})"
        found.update(row[0] for row in cur.execute(query, chunk))
    return found


def _item_row(rec: ItemRecord) -> _ItemRow:
    content = None if rec.content is None else vector_to_bytes(rec.content)
    return (
        rec.item_id,
        json.dumps(rec.attributes),
        content,
        vector_to_bytes(rec.embedding),
        rec.model_version,
        rec.created_at,
    )


def _record(row: _ItemRow) -> ItemRecord:
    item_id, attributes, content, embedding, model_version, created_at = row
    return ItemRecord(
        item_id, json.loads(attributes), content_from_bytes(content), embedding_from_bytes(embedding),
        model_version, created_at,
    )


def _write_history_list(cur: sqlite3.Cursor, user_id: str) -> None:
    """history_lists' row for the user, from the history table as it stands in this transaction."""
    items = [item_id for (item_id,) in cur.execute(
        "SELECT item_id FROM history WHERE user_id = ? ORDER BY ts, item_id", (user_id,)).fetchall()]
    if items:
        cur.execute("INSERT OR REPLACE INTO history_lists (user_id, items) VALUES (?, ?)", (user_id, json.dumps(items)))
    else:
        cur.execute("DELETE FROM history_lists WHERE user_id = ?", (user_id,))
