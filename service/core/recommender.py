"""Answering requests: fold the user in, search, drop what they have, fall back; and the writes,
which reach the store first and the index at once.

No HTTP and no Redis here: the store arrives as the `Store` protocol, the index as `VectorIndex`.

Item rows are [v; b] (D+1) and queries [h; 1]. Trained (warm) items use their learned rows from
the artifact; registered (cold) items the generator's row under the user-neutral gate. A user's
history may hold both kinds, and their rows enter the fold-in the same way ("surrogate rows").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import chain, repeat

import numpy as np

from service.core.embedder import Embedder
from service.core.fold_in import FoldIn
from service.core.maintainer import ROW_CACHE_ITEMS, IndexMaintainer
from service.core.types import (
    ItemView,
    NewItem,
    Recommendations,
    Registration,
    Rows,
    TrainedItemConflictError,
    UnknownItemsError,
)
from service.index import Hit, IndexConfig, VectorIndex
from service.model.artifact import Artifact
from service.store import Interaction, ItemRecord, Store


class Recommender:
    """One model version serving: its `embedder` (rows of items), its `maintainer` (the index kept
    in step with the store) and the request path."""

    def __init__(
        self, artifact: Artifact, store: Store, index_config: IndexConfig | None = None, *,
        fallback_cold_share: float = 0.2, newest_kept: int = 1000, row_cache_items: int = ROW_CACHE_ITEMS,
    ) -> None:
        self.artifact = artifact
        self.embedder = embedder = Embedder(artifact)
        self.maintainer = IndexMaintainer(embedder, store, index_config, newest_kept=newest_kept,
                                          row_cache_items=row_cache_items)
        self.store = store
        self.version, self.model = embedder.version, embedder.model
        self.content_dim, self.dim = embedder.content_dim, embedder.dim
        self.warm_rows, self.warm_ids = embedder.warm_rows, embedder.warm_ids
        self._fold_in = FoldIn(self.model)  # the request path's fold-in, without torch dispatch
        self._popular = np.argsort(-self.warm_rows[:, -1], kind="stable")  # by trained bias b
        self.fallback_cold_share = fallback_cold_share

    @property
    def index(self) -> VectorIndex:
        """The index being searched (a build or a snapshot load replaces it)."""
        return self.maintainer.index

    def is_trained(self, item_id: str) -> bool:
        return self.embedder.is_trained(item_id)

    # -- writes -------------------------------------------------------------------------------

    def register(self, items: Sequence[NewItem]) -> list[Registration]:
        """Validate, embed, write to the store, add to the index: servable when this returns."""
        trained = [item.item_id for item in items if self.is_trained(item.item_id)]
        if trained:
            raise TrainedItemConflictError(
                f"items {trained[:10]} are trained items of model version {self.version}; their rows are "
                f"learned from interactions and cannot be replaced; register new items under new ids")
        rows = self.embedder.embed(items)
        now = time.time()
        records = [ItemRecord(item.item_id, list(item.attributes), item.content, row, self.version, now)
                   for item, row in zip(items, rows, strict=True)]
        result = self.store.put_items(records)
        self.maintainer.added(records, rows)
        inserted = set(result.inserted)
        unknown = self.embedder.unknown_attributes
        return [Registration(r, unknown(r.attributes), r.item_id in inserted) for r in records]

    def delete(self, item_id: str) -> None:
        if self.is_trained(item_id):
            raise TrainedItemConflictError(f"item {item_id} is a trained item of model version {self.version} "
                                      f"and cannot be deleted; deploy a model trained without it")
        if not self.store.delete_item(item_id):
            raise UnknownItemsError([item_id])
        self.maintainer.removed(item_id)

    def add_interactions(self, interactions: Sequence[Interaction]) -> None:
        """All or nothing: every item must be trained or registered, else UnknownItemsError and no write."""
        named = list(dict.fromkeys(i.item_id for i in interactions))
        registered = [i for i in named if not self.is_trained(i)]
        found = self.store.get_items(registered) if registered else {}
        missing = [i for i in registered if i not in found]
        if missing:
            raise UnknownItemsError(missing)
        self.store.add_interactions(interactions)

    # -- reads --------------------------------------------------------------------------------

    def get(self, item_id: str) -> ItemView | None:
        if self.is_trained(item_id):
            return ItemView(item_id, False, self.version, None, [])
        record = self.store.get_item(item_id)
        if record is None:
            return None
        return ItemView(item_id, True, record.model_version, record,
                        self.embedder.unknown_attributes(record.attributes))

    def history_rows(self, history: Sequence[str]) -> Rows:
        """Rows (L, D+1) of the history items this model can still use, warm and registered alike."""
        return self.histories_rows([history])[0]

    def histories_rows(self, histories: Sequence[Sequence[str]]) -> tuple[Rows, list[int]]:
        """`history_rows` of many users in one gather: their rows stacked (sum L_b, D+1) in user
        order, and how many rows each user kept."""
        flat = list(chain.from_iterable(histories))
        lengths = [len(h) for h in histories]
        positions = list(map(self.embedder.warm_pos.get, flat, repeat(-1)))  # C-level: no Python step per item
        at = np.asarray(positions, dtype=np.int64)
        if -1 not in positions:  # the common case: one gather, no per-row Python
            return self.warm_rows[at] if positions else self._no_rows(), lengths
        places = (at < 0).nonzero()[0].tolist()  # the registered items' places
        registered = list(dict.fromkeys(flat[a] for a in places))
        cache = self.maintainer.rows
        found = cache.get_many(registered)
        missing = [i for i in registered if i not in found]
        if missing:
            generation = cache.generation  # read first: a write racing the store read wins
            fetched = self.embedder.record_rows(list(self.store.get_items(missing).values()))
            cache.fill(fetched, generation)
            found.update(fetched)
        rows = self.warm_rows[np.maximum(at, 0)]  # (sum L, D+1) gathered copy
        got = [found.get(flat[a]) for a in places]  # None: deleted, or not embeddable by this model
        usable = [a for a, row in zip(places, got, strict=True) if row is not None]
        if usable:  # one scatter, not a NumPy call per row (np.array: np.stack sets up every row apart)
            rows[usable] = np.array([row for row in got if row is not None])
        if len(usable) == len(places):
            return rows, lengths
        keep = np.ones(len(flat), dtype=bool)  # the rest are left out of the fold-in
        keep[places] = [row is not None for row in got]
        kept_before = np.concatenate([[0], np.cumsum(keep)])  # rows kept before each place
        ends = np.cumsum(lengths)
        kept = kept_before[ends] - kept_before[ends - np.asarray(lengths)]
        return rows[keep], kept.tolist()

    def _no_rows(self) -> Rows:
        return np.zeros((0, self.dim), np.float32)

    def user_query(self, rows: Rows) -> Rows:
        """Index query [h; 1] (1, D+1) of a user folded in from history rows (L, D+1); equals
        `M2Rec.query(model.fold_in(rows))` (service.core.fold_in runs it in NumPy)."""
        return self._fold_in.query(rows)

    def recommend(self, user_id: str, k: int) -> Recommendations:
        return self.recommend_many([(user_id, k)])[0]

    def recommend_many(self, requests: Sequence[tuple[str, int]]) -> list[Recommendations]:
        """`recommend` for many (user, k) at once: one store read, one fold-in pass and one index
        search for all of them. Each answer is the one `recommend` alone would give."""
        histories = self.store.get_histories([user for user, _ in requests])
        asked = [histories[user] for user, _ in requests]
        rows, lengths = self.histories_rows(asked)  # (sum L, D+1), rows per request
        out: list[Recommendations | None] = [None] * len(requests)
        personal = [at for at, n in enumerate(lengths) if n > 0]
        for at, n in enumerate(lengths):
            if n == 0:
                out[at] = Recommendations(self.fallback(requests[at][1], set(asked[at])), True, self.version)
        if personal:
            k_max = max(requests[at][1] for at in personal)  # a top-k is the first k of the top-k_max
            queries = self._fold_in.queries(rows, [n for n in lengths if n > 0])  # (B', D+1)
            found = self.index.search(queries, k_max, exclude=[set(asked[at]) for at in personal])
            for at, tops in zip(personal, found, strict=True):  # trained and new items ranked by raw score
                out[at] = Recommendations(tops.merged(requests[at][1]), False, self.version)
        answered = [r for r in out if r is not None]
        assert len(answered) == len(requests)  # every request is personal or a fallback
        return answered

    def fallback(self, k: int, exclude: set[str]) -> list[Hit]:
        """Most popular trained items (largest bias b) with the newest registered items mixed in:
        position p is cold when floor((p+1)·share) > floor(p·share)."""
        share = self.fallback_cold_share
        cold = iter(self.maintainer.newest.newest(k, exclude))
        warm = (Hit(self.warm_ids[j], float(self.warm_rows[j, -1]), False)
                for j in self._popular.tolist() if self.warm_ids[j] not in exclude)
        out: list[Hit] = []
        for p in range(k):
            first, second = (cold, warm) if int((p + 1) * share) > int(p * share) else (warm, cold)
            hit = next(first, None) or next(second, None)
            if hit is None:
                break
            out.append(hit)
        return out
