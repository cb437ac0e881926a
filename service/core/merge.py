"""One list from a query's best trained items and best new items, by an exposure policy.

The policy's arithmetic is `service.model.mixing.merge_order`, the same function the trainer's harness
ranks with, so what the service answers is what the offline evaluation measured. A hit's score is the
one it was ranked by: h·v + b for a trained item, and for a new item under a calibrated policy its
score on the trained items' scale (scale·(h·v̂ + b̂) + offset); under a quota the lists are
interleaved, not compared, and new items keep h·v̂ + b̂.
"""

from __future__ import annotations

import numpy as np

from service.index import Hit, Tops
from service.model.mixing import NEW, TRAINED, Calibrated, Policy, merge_order


def merge_hits(tops: Tops, policy: Policy, k: int) -> list[Hit]:
    lists = (tops.trained[:k], tops.new[:k])
    scores = np.full((1, 2, k), -np.inf)
    for population, hits in ((TRAINED, lists[0]), (NEW, lists[1])):
        scores[0, population, : len(hits)] = [h.score for h in hits]
    order, filled = merge_order(policy, scores)
    out = []
    for position in order[0][filled[0]].tolist():
        population, rank = divmod(position, k)
        hit = lists[population][rank]
        if population == NEW and isinstance(policy, Calibrated):
            hit = hit._replace(score=float(policy.new_scores(np.asarray([hit.score]))[0]))
        out.append(hit)
    return out
