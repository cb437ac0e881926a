"""Why each item is in a user's list (GET /recommend?explain=true).

New (registered) items: M2VAE's user-aware fusion, for THIS user. A new item's index row was generated
under the neutral user's gate; here the gate is evaluated with the user's h and reports how much each
view counts (common α, attributes (1-α)·g_a, content (1-α)·g_c) and the attention over the item's own
attribute tokens (the tokens that shape its attribute view). The gate reads the item only through its
views' means: those come from one generator pass per stored version of an item and are kept, and the
gate itself runs in NumPy (service/core/fusion_gate.py), so an explained list costs about what a
plain one does (benchmarks/results/explain.md).

Every item of a personal list: the history items that pulled it up, by leave-one-out on the fold-in:
the score drop s_j(h) - s_j(h without l) for each history item l. It is exact for this model, not a
linearisation, and cheap: the fold-in's first layer is a sum, so the L leave-one-out users are one
pass over L rows, and without a hidden layer not even an MLP pass (FoldIn.drops). The co-embedding
similarity v_l·v_j would cost less but ignores the encoder: two history items with the same dot
product can move h very differently.

Fallback lists have no user: new items are explained under the neutral gate (what the index stores)
and nothing is "because" of a history.

With the collaborative part (service/model/collaborative.py) the served score also has an ALS half;
"because" explains m2rec's half, s_j = [h; 1]·[v_j; b_j] in m2rec's own units. Leave-one-out on the
ALS half would cost one f×f solve per history item, per request; not done.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.embedder import Embedder
from service.core.fold_in import FoldIn
from service.core.fusion_gate import FusionGate
from service.core.types import Explanation, NewItem, Rows, ViewWeights
from service.index import Hit
from service.model.generator import M2VAEGenerator
from service.store import ItemRecord

TOP = 3  # attribute tokens and history items named per item
FACTORS_KEPT = 16_384  # items whose gate factors are kept (~1 KB each at Z = 64)

# per item: its gate terms (2, Z) and modalities (2,) (FusionGate.terms), and its top attribute tokens
_Factors = tuple[Rows, npt.NDArray[np.bool_], list[tuple[str, float]]]


class Explainer:
    def __init__(self, embedder: Embedder, fold_in: FoldIn, top: int = TOP) -> None:
        self.embedder = embedder
        self.fold_in = fold_in
        self.top = top
        generator = embedder.model.generator
        self.gate = FusionGate(generator) if isinstance(generator, M2VAEGenerator) else None
        self.neutral = generator.neutral_user.detach().numpy().astype(np.float32)  # (D,)
        # (item id, its row's bytes) -> factors: an item registered again with other inputs has another
        # row, so another key (its old entry ages out); no store read when the factors are known
        self._factors: OrderedDict[tuple[str, bytes], _Factors] = OrderedDict()
        self._lock = threading.Lock()

    def _factors_of(self, rows: Mapping[str, Rows], fetch: Callable[[list[str]], dict[str, ItemRecord]]
                    ) -> dict[str, _Factors]:
        keys = {item_id: (item_id, row.tobytes()) for item_id, row in rows.items()}
        with self._lock:
            found = {i: f for i, key in keys.items() if (f := self._factors.get(key)) is not None}
        missing = [i for i in keys if i not in found]
        if missing:
            records = fetch(missing)  # the raw inputs, once per stored version of an item
            items = [NewItem(r.item_id, r.attributes, r.content) for r in records.values()]
            items = [item for item in items if self.embedder.problem(item) is None]
            made = self.embedder.fusion_factors(items, self.top)
            if made and self.gate is not None:
                terms, has = self.gate.terms([factors for factors, _ in made])  # (n, 2, Z), (n, 2)
                with self._lock:
                    for b, (item, (_, attributes)) in enumerate(zip(items, made, strict=True)):
                        found[item.item_id] = self._factors[keys[item.item_id]] = (terms[b], has[b], attributes)
                while len(self._factors) > FACTORS_KEPT:
                    self._factors.popitem(last=False)
        return found

    def explain_many(self, lists: Sequence[Listed], fetch: Callable[[list[str]], dict[str, ItemRecord]]
                     ) -> list[list[Explanation]]:
        """One explanation per hit of each list; `fetch` reads new items' stored inputs. The lists of a
        batch of requests share the passes: the leave-one-out fold-ins of every personal list in one
        (FoldIn.drops), the gate of every (user, new item) pair in one."""
        top = self.top
        because: list[list[list[tuple[str, float]]]] = [[[] for _ in listed.hits] for listed in lists]
        personal = [b for b, listed in enumerate(lists) if len(listed.history_rows)]
        users = np.tile(self.neutral, (len(lists), 1))  # (B, D): fallback lists are gated by the neutral user
        if personal:
            rows = np.concatenate([lists[b].history_rows for b in personal])  # (sum L, D+1)
            lengths = [len(lists[b].history_rows) for b in personal]
            users[personal] = [lists[b].user for b in personal]  # the service's own h
            drops_of = self.fold_in.drops(rows, lengths, users[personal], [lists[b].item_rows for b in personal])
            for b, drops in zip(personal, drops_of, strict=True):  # drops (k, L)
                listed = lists[b]
                order = _top_columns(drops, top)  # (k, top') history rows, largest first
                names = itemgetter(*order.ravel().tolist())(listed.history) if order.size > 1 else \
                    tuple(listed.history[r] for r in order.ravel().tolist())
                best = np.take_along_axis(drops, order, axis=1)  # (k, top')
                named = list(zip(names, best.ravel().tolist(), strict=True))
                width = order.shape[1]
                because[b] = [named[s : s + width] for s in range(0, len(named), width)]
                if not (best > 0).all():  # a history item that does not pull an item up is not named
                    because[b] = [[p for p in why if p[1] > 0] for why in because[b]]
        fused: list[dict[int, tuple[ViewWeights, list[tuple[str, float]]]]] = [{} for _ in lists]
        new_rows = {item_id: row for listed in lists for item_id, row in listed.new_rows.items()}
        if new_rows and self.gate is not None:
            factors = self._factors_of(new_rows, fetch)
            pairs = [(b, j, factors[hit.item_id]) for b, listed in enumerate(lists)
                     for j, hit in enumerate(listed.hits) if hit.item_id in factors]
            if pairs:
                parts, alpha = self.gate.users(users)  # (B, 2, Z), (B,)
                owner = np.fromiter((b for b, _, _ in pairs), np.int64, len(pairs))
                weights = self.gate.pair_weights(np.stack([f[0] for _, _, f in pairs]),
                                                 np.stack([f[1] for _, _, f in pairs]),
                                                 parts[owner], alpha[owner]).tolist()  # (P, 3): g_a, g_c, α
                for (b, j, (_, _, attributes)), (g_a, g_c, a) in zip(pairs, weights, strict=True):
                    fused[b][j] = (ViewWeights((1 - a) * g_a, (1 - a) * g_c, a), attributes)
        no_views: tuple[ViewWeights | None, list[tuple[str, float]]] = (None, [])
        return [[Explanation(views, attributes, why_j)
                 for (views, attributes), why_j in zip([views_of.get(j, no_views) for j in range(len(why))], why,
                                                       strict=True)]
                for why, views_of in zip(because, fused, strict=True)]


@dataclass(frozen=True)
class Listed:
    """One list to explain: its hits and their rows (k, D+1) (zeros: gone since the answer), the ids
    of the history rows (L, D+1) the user was folded in from (none: a fallback list), and the rows of
    the new items among the hits."""

    hits: Sequence[Hit]
    item_rows: Rows
    history: Sequence[str]
    history_rows: Rows
    new_rows: Mapping[str, Rows]
    user: Rows  # (D,) h the list was answered for (ignored for a fallback list)


def _top_columns(x: npt.NDArray[np.floating[Any]], top: int) -> npt.NDArray[np.intp]:
    """Column indices of each row's `top` largest entries (k, min(top, L)), largest first, ties by lower
    column."""
    if x.shape[1] <= top:
        return np.argsort(-x, axis=1, kind="stable")
    near = np.argpartition(-x, top - 1, axis=1)[:, :top]  # (k, top), unordered: a partition, not a sort of L
    near.sort(axis=1)
    by_value = np.argsort(-np.take_along_axis(x, near, axis=1), axis=1, kind="stable")
    return np.take_along_axis(near, by_value, axis=1)
