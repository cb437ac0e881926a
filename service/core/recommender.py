"""Answering requests: fold the user in, search, drop what they have, fall back; and the writes,
which reach the store first and the index at once.

No HTTP and no Redis here: the store arrives as the `Store` protocol, the index as `VectorIndex`.

Item rows are [v; b] (D+1) and queries [h; 1]. Trained (warm) items use their learned rows from
the artifact; registered (cold) items the generator's row under the user-neutral gate. A user's
history may hold both kinds, and their rows enter the fold-in the same way ("surrogate rows").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import accumulate, chain, repeat

import numpy as np

from service.core.embedder import Embedder
from service.core.explainer import Explainer, Listed
from service.core.fold_in import FoldIn
from service.core.maintainer import ROW_CACHE_ITEMS, IndexMaintainer
from service.core.merge import merge_many
from service.core.types import (
    Explanation,
    ItemView,
    NewItem,
    Recommendations,
    Registration,
    Rows,
    TrainedItemConflictError,
    UnknownItemsError,
)
from service.index import IndexConfig, Tops, VectorIndex
from service.model.artifact import Artifact
from service.model.mixing import Policy
from service.store import DEFAULT_MAX_HISTORY, Interaction, ItemRecord, Store

log = logging.getLogger(__name__)
_RESEARCHES = 3  # searches of a query again without items whose score was not finite (there are ~never any)


class Recommender:
    """One model version serving: its `embedder` (rows of items), its `maintainer` (the index kept
    in step with the store) and the request path."""

    def __init__(
        self, artifact: Artifact, store: Store, index_config: IndexConfig | None = None, *,
        row_cache_items: int = ROW_CACHE_ITEMS, max_history: int = DEFAULT_MAX_HISTORY,
    ) -> None:
        """`max_history`: the store's history cap (M2REC_MAX_HISTORY_LENGTH); only users whose history
        is full can have seen more than it holds."""
        self.artifact = artifact
        self.max_history = max_history
        self.embedder = embedder = Embedder(artifact)
        self.maintainer = IndexMaintainer(embedder, store, index_config, row_cache_items=row_cache_items)
        self.store = store
        self.version, self.model = embedder.version, embedder.model
        self.content_dim, self.dim = embedder.content_dim, embedder.dim
        self.warm_rows, self.warm_ids = embedder.warm_rows, embedder.warm_ids
        self._fold_in = FoldIn(self.model)  # the request path's fold-in, without torch dispatch
        self._explainer = Explainer(embedder, self._fold_in)
        self.policy = artifact.manifest.policy  # how new items mix with trained ones, unless a request says
        self._reported: set[str] = set()  # items logged for a non-finite row

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
        held = self.embedder.held_out
        held_out = [r.item_id for r in records if r.item_id in held]
        if held_out:
            log.warning("registered %d items that model %s held out of training (its dataset has interactions for "
                        "them), e.g. %s: served as new items, flagged held_out", len(held_out), self.version,
                        held_out[:5])
        return [Registration(r, unknown(r.attributes), r.item_id in inserted, r.item_id in held) for r in records]

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
                        self.embedder.unknown_attributes(record.attributes), item_id in self.embedder.held_out)

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

    def user_query_pair(self, rows: Rows) -> tuple[Rows, Rows]:
        """(trained items' query, new items' query) (1, D') of a user folded in from history rows: what
        `recommend` searches each population with (the same query unless the model weighs new items apart)."""
        trained, new = self._fold_in.query_pair(rows, [len(rows)])
        return trained, trained if new is None else new

    def recommend(self, user_id: str, k: int, explain: bool = False, policy: Policy | None = None
                  ) -> Recommendations:
        return self.recommend_many([(user_id, k)], [explain], [policy])[0]

    def recommend_many(self, requests: Sequence[tuple[str, int]], explain: Sequence[bool] | None = None,
                       policies: Sequence[Policy | None] | None = None) -> list[Recommendations]:
        """`recommend` for many (user, k) at once: one read of the histories and one of the seen
        items, one fold-in pass and one index search for all of them. Each answer is the one
        `recommend` alone would give.

        Users are folded in from their history (the newest max_history items) but never offered
        anything they have seen, which reaches further back (`Store.get_seen`, read for the users whose
        history is full: nothing has left a shorter one, so it is all they have seen). A user with no
        usable history is folded in from nothing, the encoder's answer for "knows nothing", and gets
        that list (`fallback`). The two populations' best items are merged by `policies[b]` (None: the
        artifact's validation-chosen policy, service/model/mixing.py), the same way for everyone.
        `explain[b]`: add request b's explanations (service/core/explainer.py) from the history read."""
        users = [user for user, _ in requests]
        histories = self.store.get_histories(users)
        full = [user for user in dict.fromkeys(users) if len(histories[user]) >= self.max_history]
        seen = self.store.get_seen(full) if full else {}
        for user in dict.fromkeys(users):
            if user not in seen:
                seen[user] = set(histories[user])
        asked = [histories[user] for user in users]
        rows, lengths = self.histories_rows(asked)  # (sum L, D+1), rows per request
        # (B, D+1[+f]) each; an empty history folds in from nothing
        queries, new_queries = self._fold_in.query_pair(rows, lengths)
        k_max = max(k for _, k in requests)  # a top-k is the first k of the top-k_max
        found, skipped = self._search(queries, new_queries, k_max, [seen[user] for user in users])
        chosen = [self.policy if p is None else p for p in (policies or [None] * len(requests))]
        merged = merge_many(found, chosen, [k for _, k in requests])
        held = self.embedder.held_out
        answered = [Recommendations(hits, n == 0, self.version, n_skipped, policy=policy,
                                    held_out=sum(h.is_cold and h.item_id in held for h in hits) if held else 0)
                    for hits, policy, n, n_skipped in zip(merged, chosen, lengths, skipped, strict=True)]
        if explain is not None and any(explain):
            wanted = [at for at, w in enumerate(explain) if w]
            starts = [0, *accumulate(lengths)]
            made = self._explain([answered[at] for at in wanted], [asked[at] for at in wanted],
                                 [rows[starts[at] : starts[at + 1]] for at in wanted], queries[wanted])
            for at, explanations in zip(wanted, made, strict=True):
                answered[at] = replace(answered[at], explanations=explanations)
        return answered

    def _search(self, queries: Rows, new_queries: Rows | None, k: int, exclude: list[set[str]]
                ) -> tuple[list[Tops], list[int]]:
        """Index search (`new_queries`: for the new items, None: `queries`) whose answers hold finite
        scores only. An item row that is not finite (the store and the embedder refuse them; this is
        the last line) is taken out of the index, logged once, counted per answer, and the query
        searched again without it: one item never makes an answer fail."""
        found = self.index.search(queries, k, exclude=exclude, new_queries=new_queries)
        skipped = [0] * len(found)
        for _ in range(_RESEARCHES):
            broken = {b: [h.item_id for h in chain(*tops) if not math.isfinite(h.score)]
                      for b, tops in enumerate(found)}
            broken = {b: ids for b, ids in broken.items() if ids}
            if not broken:
                break
            self._quarantine({i for ids in broken.values() for i in ids})
            again = list(broken)
            for b in again:
                skipped[b] += len(broken[b])
                exclude[b] = exclude[b] | set(broken[b])
            again_new = None if new_queries is None else new_queries[again]
            for b, tops in zip(again, self.index.search(queries[again], k, exclude=[exclude[b] for b in again],
                                                        new_queries=again_new), strict=True):
                found[b] = tops
        finite = [Tops([h for h in t.trained if math.isfinite(h.score)], [h for h in t.new if math.isfinite(h.score)])
                  for t in found]
        return finite, [n + len(a.trained) + len(a.new) - len(b.trained) - len(b.new)
                        for n, a, b in zip(skipped, found, finite, strict=True)]

    def _quarantine(self, item_ids: set[str]) -> None:
        """Items whose row turned out not finite leave this replica's index (logged once: they are gone
        afterwards). The store keeps them; a re-registration with usable inputs, or a model that embeds
        them finitely, serves them again."""
        registered = sorted(i for i in item_ids if not self.is_trained(i))
        first_time = sorted(item_ids - self._reported)
        if first_time:  # trained rows cannot leave the index: they are skipped at every answer, logged once
            log.error("items %s have non-finite rows under model %s and are skipped; registered ones leave "
                      "this replica's index (m2rec_recommend_skipped_items_total)", first_time[:10], self.version)
            if len(self._reported) > 10_000:
                self._reported.clear()
            self._reported.update(first_time)
        for item_id in registered:
            self.maintainer.removed(item_id)

    def _explain(self, results: Sequence[Recommendations], histories: Sequence[Sequence[str]],
                 history_rows: Sequence[Rows], queries: Rows) -> list[list[Explanation]]:
        """One explanation per item of each result, for the user folded in (queries (B, D+1)) from the
        rows (L'_b, D+1) of its history that the model could use (none: a fallback list), all in one
        pass (service/core/explainer.py). Reads new items' raw inputs only the first time one is
        explained."""
        used: list[Sequence[str]] = []
        for result, history, mine in zip(results, histories, history_rows, strict=True):
            if result.fallback or len(mine) == len(history):
                used.append([] if result.fallback else history)
            else:  # some history items are gone or unusable: which ones, item by item (rare)
                _, each = self.histories_rows([[item_id] for item_id in history])
                used.append([item_id for item_id, n in zip(history, each, strict=True) if n])
        cold = list(dict.fromkeys(hit.item_id for result in results for hit in result.hits
                                  if not self.is_trained(hit.item_id)))
        cache = self.maintainer.rows
        by_id = cache.get_many(cold)  # the row cache, then the store (and the cache keeps what was read)
        missing = [item_id for item_id in cold if item_id not in by_id]
        if missing:
            generation = cache.generation  # read first: a write racing the store read wins
            fetched = self.embedder.record_rows(list(self.store.get_items(missing).values()))
            cache.fill(fetched, generation)
            by_id.update(fetched)
        lists = []
        for result, history, mine, query in zip(results, used, history_rows, queries, strict=True):
            item_rows = np.zeros((len(result.hits), self.dim), np.float32)  # (k, D+1); 0: gone since the answer
            new_rows = {}
            for j, hit in enumerate(result.hits):
                at = self.embedder.warm_pos.get(hit.item_id)
                row = self.warm_rows[at] if at is not None else by_id.get(hit.item_id)
                if row is not None:
                    item_rows[j] = row
                    if at is None:
                        new_rows[hit.item_id] = row
            # m2rec's h: the query is [h; 1] itself, or (the collaborative part) a mix that may weigh it 0
            h = query[: self._fold_in.dim] if self.model.collaborative is None else self._fold_in.user_vector(mine)[0]
            lists.append(Listed(result.hits, item_rows, history, mine, new_rows, h))
        return self._explainer.explain_many(lists, self.store.get_items)
