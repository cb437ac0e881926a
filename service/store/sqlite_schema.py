"""The embedded store's tables (service/store/sqlite.py), created at open when missing, and the
one-time fill that brings a store written by an older version up to them."""

import json
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    content BLOB,
    embedding BLOB NOT NULL,
    model_version TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (user_id, item_id)
);
CREATE INDEX IF NOT EXISTS history_by_time ON history (user_id, ts, item_id);
-- each user's history as one JSON array, oldest first: the request path reads one row per user
-- instead of one per item (~5x less read time); rewritten in the transaction that changes history
CREATE TABLE IF NOT EXISTS history_lists (user_id TEXT PRIMARY KEY, items TEXT NOT NULL) WITHOUT ROWID;
-- items pushed out of a user's history (it keeps the newest max_history), the newest
-- max_seen - max_history of them: a user's seen items are history ∪ seen. Written in the transaction
-- that writes history; a store written before this table existed has no overflow, nothing to fill
CREATE TABLE IF NOT EXISTS seen (
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (user_id, item_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_time ON seen (user_id, ts, item_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    item_id TEXT,
    user_ids TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def upgrade(cur: sqlite3.Cursor) -> None:
    """Fill tables added after a store was first written, once (a meta key marks each as done)."""
    if cur.execute("SELECT 1 FROM meta WHERE key = 'sqlite:history_lists'").fetchone() is None:
        for (user_id,) in cur.execute("SELECT DISTINCT user_id FROM history").fetchall():
            write_history_list(cur, user_id)
        cur.execute("INSERT INTO meta (key, value) VALUES ('sqlite:history_lists', '1')")


def write_history_list(cur: sqlite3.Cursor, user_id: str) -> None:
    """history_lists' row for the user, from the history table as it stands in this transaction."""
    items = [item_id for (item_id,) in cur.execute(
        "SELECT item_id FROM history WHERE user_id = ? ORDER BY ts, item_id", (user_id,)).fetchall()]
    if items:
        cur.execute("INSERT OR REPLACE INTO history_lists (user_id, items) VALUES (?, ?)", (user_id, json.dumps(items)))
    else:
        cur.execute("DELETE FROM history_lists WHERE user_id = ?", (user_id,))
