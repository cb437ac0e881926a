"""One list from a query's best trained items and best new items, by an exposure policy.

The policy's arithmetic is `service.model.mixing.merge_order`, the same function the trainer's harness
ranks with, so what the service answers is what the offline evaluation measured. A hit's score is the
one it was ranked by: h·v + b for a trained item, and for a new item under a calibrated policy its
score on the trained items' scale (scale·(h·v̂ + b̂) + offset); under a quota the lists are
interleaved, not compared, and new items keep h·v̂ + b̂.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.index import Hit, Tops
from service.model.mixing import NEW, TRAINED, Calibrated, Policy, merge_order


def merge_many(tops: Sequence[Tops], policies: Sequence[Policy], ks: Sequence[int]) -> list[list[Hit]]:
    """Each request's list of k from its two populations' tops, by its policy. The requests that share a
    policy and a k are merged by one `merge_order` call (a request's list does not depend on the others)."""
    groups: dict[tuple[Policy, int], list[int]] = {}
    for b, key in enumerate(zip(policies, ks, strict=True)):
        groups.setdefault(key, []).append(b)
    out: list[list[Hit]] = [[] for _ in tops]
    for (policy, k), members in groups.items():
        lists = [(tops[b].trained[:k], tops[b].new[:k]) for b in members]
        scores = np.full((len(members), 2, k), -np.inf)  # (G, 2, k)
        for g, pair in enumerate(lists):
            for population in (TRAINED, NEW):
                scores[g, population, : len(pair[population])] = [h.score for h in pair[population]]
        order, filled = merge_order(policy, scores)  # (G, k), (G, k)
        new_scores = policy.new_scores(scores[:, NEW]).tolist() if isinstance(policy, Calibrated) else None  # (G, k)
        for g, b in enumerate(members):
            merged = []
            for position in order[g][filled[g]].tolist():
                population, rank = divmod(position, k)
                hit = lists[g][population][rank]
                if population == NEW and new_scores is not None:
                    hit = Hit(hit.item_id, new_scores[g][rank], hit.is_cold)
                merged.append(hit)
            out[b] = merged
    return out
