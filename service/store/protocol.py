"""The storage contract both backends keep; one test suite runs against each.

The API is synchronous: the app calls it from a thread pool. Every backend failure that means
"the store cannot answer now" (connection refused, timeout, database locked) is raised as
`StoreUnavailable`, so the HTTP layer has one thing to map to 503.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from service.store.records import Event, Interaction, ItemRecord, PutResult, StoreStats

DEFAULT_MAX_HISTORY = 500
DEFAULT_EVENT_CAP = 100_000


class StoreUnavailable(RuntimeError):  # noqa: N818 -- the name the app contract uses
    """The backend did not answer (refused, timed out, locked); retrying later may succeed."""


class Store(Protocol):
    # True when reads are answered in-process in microseconds and never wait for a writer or the
    # network, so an event loop may make them itself instead of handing them to a thread.
    inline_reads: bool

    def put_items(self, records: Sequence[ItemRecord]) -> PutResult:
        """Upsert all records atomically and append one ITEM_UPSERT event per record."""
        ...

    def get_item(self, item_id: str) -> ItemRecord | None: ...

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        """Known ids only; unknown ids are absent from the result."""
        ...

    def delete_item(self, item_id: str) -> bool:
        """False when the id is unknown (and then no event is written)."""
        ...

    def count_items(self) -> int: ...

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[ItemRecord]]:
        """All items in id order, a batch at a time; not a snapshot (concurrent writes may show)."""
        ...

    def add_interactions(self, interactions: Sequence[Interaction]) -> str | None:
        """Record a batch atomically, append one INTERACTIONS event; returns its id (None if empty)."""
        ...

    def get_history(self, user_id: str) -> list[str]:
        """Distinct items by latest timestamp, oldest first, at most `max_history` (the most recent)."""
        ...

    def get_histories(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """`get_history` of each user in one read (one consistent snapshot); unknown users map to []."""
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
