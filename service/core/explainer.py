"""Why each item is in a user's list (GET /recommend?explain=true).

New (registered) items: M2VAE's user-aware fusion, run again for THIS user. A new item's index row
was generated under the neutral user's gate; here the generator takes the item's raw inputs and the
user's h and reports how much each view counts (common α, attributes (1-α)·g_a, content (1-α)·g_c)
and the attention over the item's own attribute tokens (the tokens that shape its attribute view).

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

from collections.abc import Sequence

import numpy as np

from service.core.embedder import Embedder
from service.core.fold_in import FoldIn
from service.core.types import Explanation, NewItem, Rows
from service.index import Hit
from service.store import ItemRecord

TOP = 3  # attribute tokens and history items named per item


class Explainer:
    def __init__(self, embedder: Embedder, fold_in: FoldIn, top: int = TOP) -> None:
        self.embedder = embedder
        self.fold_in = fold_in
        self.top = top

    def explain(self, hits: Sequence[Hit], item_rows: Rows, history: Sequence[str], history_rows: Rows,
                records: dict[str, ItemRecord]) -> list[Explanation]:
        """One explanation per hit. `item_rows` (k, D+1) are the hits' rows; `history` the ids of the
        rows `history_rows` (L, D+1) the user was folded in from (empty: a fallback list); `records`
        the stored inputs of the new items among the hits."""
        D = self.fold_in.dim
        because: list[list[tuple[str, float]]] = [[] for _ in hits]
        h: Rows | None = None
        if len(history_rows):
            h = self.fold_in.user_vector(history_rows)  # (1, D)
            drops = (h - self.fold_in.without_each(history_rows)) @ item_rows[:, :D].T  # (L, k)
            for j in range(len(hits)):
                order = np.argsort(-drops[:, j], kind="stable")[: self.top].tolist()
                because[j] = [(history[r], float(drops[r, j])) for r in order if drops[r, j] > 0]
        new = [j for j, hit in enumerate(hits) if hit.item_id in records]
        items = [NewItem(r.item_id, r.attributes, r.content) for r in (records[hits[j].item_id] for j in new)]
        usable = [n for n, item in enumerate(items) if self.embedder.problem(item) is None]
        fused = dict(zip((new[n] for n in usable), self.embedder.fusion([items[n] for n in usable], h, self.top),
                         strict=True))
        out = []
        for j in range(len(hits)):
            views, attributes = fused.get(j, (None, []))
            out.append(Explanation(views=views, attributes=attributes, because=because[j]))
        return out
