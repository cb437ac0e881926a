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
MLP pass over L rows (FoldIn.without_each) and one (L, D) x (D, k) product. The co-embedding
similarity v_l·v_j would cost less but ignores the encoder: two history items with the same dot
product can move h very differently.

Fallback lists have no user: new items are explained under the neutral gate (what the index stores)
and nothing is "because" of a history.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from service.core.embedder import Embedder
from service.core.fold_in import FoldIn
from service.core.fusion_gate import FusionGate, ItemFactors
from service.core.types import Explanation, NewItem, Rows, ViewWeights
from service.index import Hit
from service.model.generator import M2VAEGenerator
from service.store import ItemRecord

TOP = 3  # attribute tokens and history items named per item
FACTORS_KEPT = 16_384  # items whose gate factors are kept (~1 KB each at Z = 64)

_Factors = tuple[ItemFactors, list[tuple[str, float]]]


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
            with self._lock:
                for item, factors in zip(items, made, strict=True):
                    found[item.item_id] = self._factors[keys[item.item_id]] = factors
                while len(self._factors) > FACTORS_KEPT:
                    self._factors.popitem(last=False)
        return found

    def explain(self, hits: Sequence[Hit], item_rows: Rows, history: Sequence[str], history_rows: Rows,
                new_rows: Mapping[str, Rows], fetch: Callable[[list[str]], dict[str, ItemRecord]]
                ) -> list[Explanation]:
        """One explanation per hit. `item_rows` (k, D+1) are the hits' rows; `history` the ids of the
        rows `history_rows` (L, D+1) the user was folded in from (empty: a fallback list); `new_rows`
        the rows of the new items among the hits, and `fetch` reads their stored inputs."""
        D = self.fold_in.dim
        because: list[list[tuple[str, float]]] = [[] for _ in hits]
        h: Rows | None = None
        if len(history_rows):
            h = self.fold_in.user_vector(history_rows)  # (1, D)
            drops = (h - self.fold_in.without_each(history_rows)) @ item_rows[:, :D].T  # (L, k)
            order = np.argsort(-drops, axis=0, kind="stable")[: self.top]  # (top, k) history rows, largest first
            best = np.take_along_axis(drops, order, axis=0).T.tolist()  # (k, top)
            for j, (rows_j, drops_j) in enumerate(zip(order.T.tolist(), best, strict=True)):
                because[j] = [(history[r], d) for r, d in zip(rows_j, drops_j, strict=True) if d > 0]
        fused: dict[int, tuple[ViewWeights, list[tuple[str, float]]]] = {}
        if new_rows and self.gate is not None:
            factors = self._factors_of(new_rows, fetch)
            known = [(j, factors[hit.item_id]) for j, hit in enumerate(hits) if hit.item_id in factors]
            if known:
                user = self.neutral if h is None else h[0]
                weights = self.gate.weights(user, [f[0] for _, f in known]).tolist()  # (k', 3): g_a, g_c, α
                for (j, (_, attributes)), (g_a, g_c, alpha) in zip(known, weights, strict=True):
                    fused[j] = (ViewWeights(attributes=(1 - alpha) * g_a, content=(1 - alpha) * g_c, common=alpha),
                                attributes)
        out = []
        for j in range(len(hits)):
            views, attributes = fused.get(j, (None, []))
            out.append(Explanation(views=views, attributes=attributes, because=because[j]))
        return out
