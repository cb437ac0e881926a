"""The service core: embed new items, fold users in, search, drop what they have, fall back.

No HTTP and no Redis here: the store arrives as the `Store` protocol, the index as `VectorIndex`.

Item rows are [v; b] (D+1) and queries [h; 1]. Trained (warm) items use their learned rows from
the artifact; registered (cold) items the generator's row under the user-neutral gate. A user's
history may hold both kinds, and their rows enter the fold-in the same way ("surrogate rows").

A replica uses a stored embedding only when it was computed by the model version it serves;
otherwise it re-embeds the item from its raw inputs, so replicas on two versions never mix rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from service.core.fold_in import FoldIn
from service.core.newest_items import NewestItems
from service.core.row_cache import RowCache
from service.core.types import (
    Followed,
    InvalidItemError,
    ItemView,
    NewItem,
    Recommendations,
    Registration,
    TrainedItemConflictError,
    UnknownItemsError,
)
from service.index import Hit, IndexConfig, VectorIndex
from service.model import AttributeVocabulary, M2Rec, ModelConfig, item_inputs
from service.model.artifact import Artifact, ArtifactError, check_compatible
from service.store import Event, EventKind, Interaction, ItemRecord, Store, event_order_key

log = logging.getLogger(__name__)
Rows = npt.NDArray[np.float32]  # (N, D+1)
EMBED_CHUNK = 128  # items per generator forward pass (sorted by attribute count: little padding)
ROW_CACHE_ITEMS = 65_536  # registered rows kept in memory for fold-ins (~34 MB at D=128)


def load_model(artifact: Artifact) -> M2Rec:
    """The model rebuilt from the artifact's config, weights loaded, in eval mode without gradients."""
    manifest = artifact.manifest
    cfg = ModelConfig(**manifest.model_args)  # type: ignore[arg-type]  # JSON values, checked by the dataclass
    facts = {
        "content_dim": (cfg.content_dim, manifest.content_dim),
        "embedding_dim": (cfg.item_dim + 1, manifest.embedding_dim),
        "n_warm": (cfg.n_warm, len(artifact.item_ids)),
        "n_attributes": (cfg.n_attributes, len(manifest.attribute_vocabulary)),
    }
    for name, (model_value, manifest_value) in facts.items():
        if model_value != manifest_value:
            raise ArtifactError(f"artifact at {artifact.path}: model config gives {name}={model_value} "
                                f"but the manifest says {manifest_value}; re-export the model")
    model = M2Rec(cfg)
    check_compatible(artifact, {name: tuple(t.shape) for name, t in model.state_dict().items()})
    model.load_state_dict(dict(artifact.tensors))
    model.eval()
    model.requires_grad_(False)
    return model


class Recommender:
    def __init__(
        self, artifact: Artifact, store: Store, index_config: IndexConfig | None = None, *,
        fallback_cold_share: float = 0.2, newest_kept: int = 1000, row_cache_items: int = ROW_CACHE_ITEMS,
    ) -> None:
        self.artifact = artifact
        self.version = artifact.version
        self.model = load_model(artifact)
        self._fold_in = FoldIn(self.model)  # the request path's fold-in, without torch dispatch
        self.vocabulary = AttributeVocabulary(artifact.manifest.attribute_vocabulary)
        self.content_dim = artifact.manifest.content_dim
        self.dim = artifact.manifest.embedding_dim
        with torch.inference_mode():
            self.warm_rows: Rows = self.model.item_rows().numpy().astype(np.float32)  # (J, D+1)
        self.warm_ids = artifact.item_ids
        self._warm_pos = {item_id: j for j, item_id in enumerate(self.warm_ids)}
        self._popular = np.argsort(-self.warm_rows[:, -1], kind="stable")  # by trained bias b
        self.store = store
        self.index_config = index_config or IndexConfig()
        self.index = VectorIndex(self.dim, self.index_config)  # empty until build_index
        self.fallback_cold_share = fallback_cold_share
        self.newest = NewestItems(newest_kept)
        self._rows = RowCache(row_cache_items)  # registered items' rows for history fold-ins
        # id -> (created_at, index) of this replica's own writes: the follower skips re-adding them
        self._own_writes: dict[str, tuple[float, VectorIndex]] = {}

    def is_trained(self, item_id: str) -> bool:
        return item_id in self._warm_pos

    # -- embedding ----------------------------------------------------------------------------

    def problem(self, item: NewItem) -> str | None:
        """Why this model cannot embed the item, or None."""
        if item.content is not None:
            if self.content_dim == 0:
                return (f"item {item.item_id}: model version {self.version} takes no content vector; "
                        f"omit content")
            if len(item.content) != self.content_dim:
                return (f"item {item.item_id}: content has {len(item.content)} values but model version "
                        f"{self.version} expects content_dim={self.content_dim}")
            if not np.isfinite(np.asarray(item.content, dtype=np.float64)).all():
                return f"item {item.item_id}: content contains NaN or infinite values"
        elif not any(t in self.vocabulary.index for t in item.attributes):
            return (f"item {item.item_id}: none of its attributes is known to model version {self.version} "
                    f"and it has no content, so there is nothing to embed it from; add content or known "
                    f"attributes")
        return None

    def unknown_attributes(self, attributes: Iterable[str]) -> list[str]:
        return [t for t in attributes if t not in self.vocabulary.index]

    def embed(self, items: Sequence[NewItem]) -> Rows:
        """Generated rows (B, D+1), neutral gate; InvalidItemError (naming every bad item) before any work."""
        problems = [p for p in map(self.problem, items) if p is not None]
        if problems:
            raise InvalidItemError("; ".join(problems[:20]))
        # Attribute pooling pads every item of a pass to the widest one's attribute count (B, A, H):
        # passes of items of similar width (sorted by it) keep that padding small.
        index = self.vocabulary.index
        widths = [len({t for t in item.attributes if t in index}) for item in items]
        order = sorted(range(len(items)), key=widths.__getitem__)
        out = np.empty((len(items), self.dim), np.float32)  # (B, D+1)
        for s in range(0, len(order), EMBED_CHUNK):
            chunk = order[s : s + EMBED_CHUNK]
            out[chunk] = self._embed_chunk([items[j] for j in chunk])
        return out

    def _embed_chunk(self, items: Sequence[NewItem]) -> Rows:
        attributes, _ = self.vocabulary.encode([item.attributes for item in items])  # (B, A)
        content = np.zeros((len(items), max(self.content_dim, 1)), np.float32)  # (B, F)
        has_content = np.zeros(len(items), dtype=bool)  # (B,)
        for b, item in enumerate(items):
            if item.content is not None:
                content[b] = item.content
                has_content[b] = True
        # inference_mode is per thread, and requests arrive on pool threads: entered per call
        with torch.inference_mode():
            inputs = item_inputs(attributes, torch.from_numpy(content), self.content_dim,
                                 torch.from_numpy(has_content))
            rows, _ = self.model.embed_items(inputs)
        return rows.numpy().astype(np.float32)  # (B, D+1)

    def record_rows(self, records: Sequence[ItemRecord]) -> dict[str, npt.NDArray[np.float32]]:
        """Rows of stored items under this model; items it cannot embed are left out (and logged)."""
        rows = {r.item_id: r.embedding for r in records if r.model_version == self.version}
        stale = [NewItem(r.item_id, r.attributes, r.content) for r in records if r.model_version != self.version]
        usable = [item for item in stale if self.problem(item) is None]
        if len(usable) < len(stale):
            log.warning("%d stored items cannot be embedded by model %s and are not served",
                        len(stale) - len(usable), self.version)
        if usable:
            rows.update(zip((i.item_id for i in usable), self.embed(usable), strict=True))
        return rows

    # -- index --------------------------------------------------------------------------------

    def build_index(self) -> str | None:
        """A fresh index from the artifact's rows and every stored item; returns the event id to
        follow from (taken before reading, so events racing the build are applied again)."""
        cursor = self.store.last_event_id()
        self.index = VectorIndex.build_from(self._index_batches(), self.dim, self.index_config, pin_warm=True)
        self._own_writes.clear()
        return cursor

    def _index_batches(self) -> Iterator[tuple[list[str], Rows, list[bool]]]:
        """The trained rows, then stored items a batch at a time: the index copies each batch into
        its own storage, so the catalogue is never held twice (nor as one small array per item)."""
        yield list(self.warm_ids), self.warm_rows, [False] * len(self.warm_ids)
        for batch in self.store.iter_items():
            batch = [r for r in batch if not self.is_trained(r.item_id)]
            rows = self.record_rows(batch)
            ids = [r.item_id for r in batch if r.item_id in rows]
            for record in batch:
                if record.item_id in rows:
                    self.newest.add(record.item_id, record.created_at, float(rows[record.item_id][-1]))
            if ids:
                yield ids, np.stack([rows[i] for i in ids]).astype(np.float32), [True] * len(ids)

    def save_snapshot(self, directory: Path, cursor: str | None) -> None:
        """Index files plus the fallback's newest items, for a restart that skips re-embedding."""
        directory.mkdir(parents=True, exist_ok=True)
        self.index.save(directory / f"index-{self.version}", cursor)
        newest = directory / f"newest-{self.version}.json"
        tmp = newest.with_name(f".{newest.name}.tmp")
        tmp.write_text(json.dumps(self.newest.dump()))
        os.replace(tmp, newest)

    def load_snapshot(self, directory: Path) -> tuple[bool, str | None]:
        """(loaded, event id it reflects); snapshots are per model version, others are ignored."""
        link = directory / f"index-{self.version}"
        if not link.exists():
            return False, None
        self.index, cursor = VectorIndex.load(link, self.index_config)
        newest = directory / f"newest-{self.version}.json"
        if newest.is_file():
            for item_id, (created_at, bias) in json.loads(newest.read_text()).items():
                self.newest.add(item_id, created_at, bias)
        return True, cursor

    def follow(self, cursor: str | None, batch: int = 1000) -> Followed:
        """Apply the store's events after `cursor` to the index. Rebuilds instead when events were
        trimmed from the stream before this replica read them."""
        first = self.store.first_event_id()
        if cursor is not None and first is not None and event_order_key(first) > event_order_key(cursor):
            log.warning("events after %s were trimmed before they were applied; rebuilding the index", cursor)
            return Followed(self.build_index(), [], rebuilt=True)
        lags: list[float] = []
        while events := self.store.read_events(cursor, batch):
            lags += self.apply_events(events)
            cursor = events[-1].event_id
            if len(events) < batch:
                break
        return Followed(cursor, lags, rebuilt=False)

    def apply_events(self, events: Sequence[Event]) -> list[float]:
        """Bring the index in line with the store for every item the events name (state, not replay)."""
        at = {e.item_id: e.at for e in events if e.item_id is not None and e.kind is not EventKind.INTERACTIONS}
        ids = [i for i in at if not self.is_trained(i)]
        if not ids:
            return []
        records = self.store.get_items(ids)
        gone = [i for i in ids if i not in records]
        self._rows.discard(ids)  # before the index changes: a fold-in never mixes old and new rows
        if gone:
            self.index.remove(gone)
            for item_id in gone:
                self.newest.remove(item_id)
        fresh = []
        for record in records.values():
            own = self._own_writes.pop(record.item_id, None)
            if own is None or own != (record.created_at, self.index):
                fresh.append(record)
        rows = self.record_rows(fresh)
        if rows:
            self.index.add(list(rows), np.stack(list(rows.values())), [True] * len(rows))
            self._rows.put(rows)
        now = time.time()
        for item_id, row in rows.items():
            self.newest.add(item_id, records[item_id].created_at, float(row[-1]))
        return [now - at[i] for i in rows]

    # -- writes -------------------------------------------------------------------------------

    def register(self, items: Sequence[NewItem]) -> list[Registration]:
        """Validate, embed, write to the store, add to the index: servable when this returns."""
        trained = [item.item_id for item in items if self.is_trained(item.item_id)]
        if trained:
            raise TrainedItemConflictError(
                f"items {trained[:10]} are trained items of model version {self.version}; their rows are "
                f"learned from interactions and cannot be replaced; register new items under new ids")
        rows = self.embed(items)
        now = time.time()
        records = [ItemRecord(item.item_id, list(item.attributes), item.content, row, self.version, now)
                   for item, row in zip(items, rows, strict=True)]
        result = self.store.put_items(records)
        index = self.index
        index.add([r.item_id for r in records], rows, [True] * len(records))
        self._rows.put({r.item_id: row for r, row in zip(records, rows, strict=True)})
        inserted = set(result.inserted)
        if len(self._own_writes) > 100_000:  # the follower is not draining them: stop remembering
            self._own_writes.clear()
        for record, row in zip(records, rows, strict=True):
            self._own_writes[record.item_id] = (now, index)
            self.newest.add(record.item_id, now, float(row[-1]))
        return [Registration(r, self.unknown_attributes(r.attributes), r.item_id in inserted) for r in records]

    def delete(self, item_id: str) -> None:
        if self.is_trained(item_id):
            raise TrainedItemConflictError(f"item {item_id} is a trained item of model version {self.version} "
                                      f"and cannot be deleted; deploy a model trained without it")
        if not self.store.delete_item(item_id):
            raise UnknownItemsError([item_id])
        self._rows.discard([item_id])
        self.index.remove([item_id])
        self.newest.remove(item_id)

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
        return ItemView(item_id, True, record.model_version, record, self.unknown_attributes(record.attributes))

    def history_rows(self, history: Sequence[str]) -> Rows:
        """Rows (L, D+1) of the history items this model can still use, warm and registered alike."""
        return self.histories_rows([history])[0]

    def histories_rows(self, histories: Sequence[Sequence[str]]) -> tuple[Rows, list[int]]:
        """`history_rows` of many users in one gather: their rows stacked (sum L_b, D+1) in user
        order, and how many rows each user kept."""
        flat = list(chain.from_iterable(histories))
        lengths = [len(h) for h in histories]
        positions = list(map(self._warm_pos.get, flat, repeat(-1)))  # C-level: no Python step per item
        at = np.asarray(positions, dtype=np.int64)
        if -1 not in positions:  # the common case: one gather, no per-row Python
            return self.warm_rows[at] if positions else self._no_rows(), lengths
        places = (at < 0).nonzero()[0].tolist()  # the registered items' places
        registered = list(dict.fromkeys(flat[a] for a in places))
        found = self._rows.get_many(registered)
        missing = [i for i in registered if i not in found]
        if missing:
            generation = self._rows.generation  # read first: a write racing the store read wins
            fetched = self.record_rows(list(self.store.get_items(missing).values()))
            self._rows.fill(fetched, generation)
            found.update(fetched)
        rows = self.warm_rows[np.maximum(at, 0)]  # (sum L, D+1) gathered copy
        got = [found.get(flat[a]) for a in places]  # None: deleted, or not embeddable by this model
        usable = [a for a, row in zip(places, got, strict=True) if row is not None]
        if usable:  # one scatter, not a NumPy call per row (np.array: np.stack's per-row set-up costs 2x)
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
            for at, hits in zip(personal, found, strict=True):
                out[at] = Recommendations(hits[: requests[at][1]], False, self.version)
        answered = [r for r in out if r is not None]
        assert len(answered) == len(requests)  # every request is personal or a fallback
        return answered

    def fallback(self, k: int, exclude: set[str]) -> list[Hit]:
        """Most popular trained items (largest bias b) with the newest registered items mixed in:
        position p is cold when floor((p+1)·share) > floor(p·share)."""
        share = self.fallback_cold_share
        cold = iter(self.newest.newest(k, exclude))
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
