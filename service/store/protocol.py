"""The storage contract every backend keeps; one test suite runs against each.

The API is synchronous: the app calls it from a thread pool. Every backend failure that means
"the store cannot answer now" (connection refused, timeout, database locked) is raised as
`StoreUnavailable`, so the HTTP layer has one thing to map to 503.

Writes: a write that returns is durable. One that raises `StoreUnavailable` may or may not have
been applied, wholly or (Redis Cluster: record by record, user by user) in part, and is safe to
retry: every write is an upsert or a set-add, and its events are appended after its state, so a
retry that succeeds leaves the state and the events as if the first attempt had.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from service.store.records import Event, Interaction, ItemRecord, PutResult, StoreStats

DEFAULT_MAX_HISTORY = 500
DEFAULT_MAX_SEEN = 10_000
DEFAULT_EVENT_CAP = 100_000


class StoreUnavailable(RuntimeError):  # noqa: N818 -- the name the app contract uses
    """The backend did not answer (refused, timed out, locked); retrying later may succeed."""


class Store(Protocol):
    # True when reads are answered in-process in microseconds and never wait for a writer or the
    # network, so an event loop may make them itself instead of handing them to a thread.
    inline_reads: bool

    def put_items(self, records: Sequence[ItemRecord]) -> PutResult:
        """Upsert the records, then append one ITEM_UPSERT event per record. SQLite and a single
        Redis: all or nothing in one transaction; Redis Cluster: each record atomically, the events
        once every record is written."""
        ...

    def get_item(self, item_id: str) -> ItemRecord | None: ...

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        """Known ids only; unknown ids are absent from the result."""
        ...

    def delete_item(self, item_id: str) -> bool:
        """False when the id is unknown (and then no event is written). The ITEM_DELETE event is
        appended after the item is gone; a retry of a delete that failed between the two still
        answers True and appends the event (Redis Cluster keeps a short-lived tombstone for that)."""
        ...

    def count_items(self) -> int: ...

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        """All items in id order, a batch at a time; not a snapshot (concurrent writes may show)."""
        ...

    def add_interactions(self, interactions: Sequence[Interaction]) -> str | None:
        """Record a batch (histories and seen sets), then append one INTERACTIONS event; returns its
        id (None if empty). SQLite and a single Redis: one transaction; Redis Cluster: each user
        atomically (history, seen set and users index share the user's slot), then the event."""
        ...

    def get_history(self, user_id: str) -> list[str]:
        """Distinct items by latest timestamp, oldest first, at most `max_history` (the most recent)."""
        ...

    def get_histories(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """`get_history` of each user in one read; unknown users map to []. Each user's history is read
        atomically; SQLite and a single Redis read all of them at one instant, Redis Cluster users on
        different slots at slightly different instants."""
        ...

    def get_seen(self, user_ids: Sequence[str]) -> dict[str, set[str]]:
        """Every item each user interacted with, beyond the history window: the history plus the items
        pushed out of it, at most `max_seen` per user (the most recent; never fewer than the history
        holds), written in the same atomic write as the history. Unknown users map to an empty set.
        Deleting an item does not remove it here."""
        ...

    def user_exists(self, user_id: str) -> bool: ...

    def read_events(self, after_id: str | None = None, limit: int = 1000) -> list[Event]:
        """Events strictly after `after_id` (from the oldest kept when None), oldest first."""
        ...

    def first_event_id(self) -> str | None:
        """Oldest event still kept; a follower whose cursor is older has missed trimmed events."""
        ...

    def last_event_id(self) -> str | None: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def stats(self, sample: int = 20) -> StoreStats: ...

    def ping(self) -> None:
        """Raise StoreUnavailable unless the backend answers."""
        ...

    def close(self) -> None: ...
