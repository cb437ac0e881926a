"""How one list mixes trained and new items: the exposure policy, shared by the service and the trainer.

A request is answered from two ranked lists, the user's best trained items and best new items (each
best first, scores [h; 1]·[v; b]). A policy merges them:

    Calibrated(scale, offset)  a new item's score s becomes scale·s + offset, then one list by score.
                               With scale > 0 the order inside each population is kept, so the
                               merged top-k is made of the two lists' heads.
    Quota(share)               a target share of new items: slot p (0-based) holds a new item when
                               floor((p+1)·share) > floor(p·share); when one population runs out, the
                               other fills the rest. This is `GET /recommend?cold_share=`.

The trainer chooses the policy on validation and stores it in the artifact's manifest; the service
serves it by default. Both sides call `merge_order`, so offline evaluation and the service rank the
same lists the same way. Arrays, no torch, no HTTP: the trainer's harness merges thousands of users
at once, the service a batch of requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

TRAINED, NEW = 0, 1
Scores = npt.NDArray[np.float64]  # (B, 2, K): [trained, new] lists, best first, -inf pads
Order = npt.NDArray[np.int64]  # (B, K): positions in the flattened (2K) lists, population·K + rank


@dataclass(frozen=True)
class Calibrated:
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and self.scale > 0 and np.isfinite(self.offset)):
            raise ValueError(f"calibration needs a finite scale > 0 and a finite offset, got {self}")

    def new_scores(self, scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """New items' scores on the trained items' scale."""
        out: npt.NDArray[np.float64] = self.scale * scores + self.offset
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"policy": "calibrated", "scale": self.scale, "offset": self.offset}


@dataclass(frozen=True)
class Quota:
    share: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"cold_share must be in [0, 1], got {self.share}")

    def to_dict(self) -> dict[str, Any]:
        return {"policy": "quota", "cold_share": self.share}


Policy = Calibrated | Quota
RAW = Calibrated()  # both populations by their raw scores


def policy_from_dict(d: dict[str, Any]) -> Policy:
    kind = d.get("policy")
    if kind == "quota":
        return Quota(float(d["cold_share"]))
    if kind == "calibrated":
        return Calibrated(float(d["scale"]), float(d["offset"]))
    raise ValueError(f"unknown mixing policy {d!r}: expected policy 'calibrated' or 'quota'")


def merge_order(policy: Policy, scores: Scores, tiebreak: npt.NDArray[np.bool_] | None = None
                ) -> tuple[Order, npt.NDArray[np.bool_]]:
    """(order (B, K), filled (B, K)): which entry of the two lists takes each slot of the merged list.

    `tiebreak` (B, 2, K), calibrated policy only: among equal merged scores, entries marked True go
    last (the harness marks the truth, so a tie never flatters a model); otherwise trained first.
    """
    if isinstance(policy, Quota):
        return _quota_order(policy.share, scores)
    K = scores.shape[2]
    merged = np.concatenate([scores[:, TRAINED], policy.new_scores(scores[:, NEW])], axis=1)  # (B, 2K)
    keys = [np.broadcast_to(np.arange(2 * K), merged.shape), -merged]  # lexsort: last key first
    if tiebreak is not None:
        keys.insert(1, np.concatenate([tiebreak[:, TRAINED], tiebreak[:, NEW]], axis=1))
    order = np.lexsort(keys, axis=-1)[:, :K]
    return order.astype(np.int64), np.isfinite(np.take_along_axis(merged, order, axis=1))


def _quota_order(share: float, scores: Scores) -> tuple[Order, npt.NDArray[np.bool_]]:
    B, _, K = scores.shape
    n = np.isfinite(scores).sum(axis=2)  # (B, 2) entries available per population
    slots = np.arange(1, K + 1)[None, :]  # p + 1
    wanted = np.floor(slots * share + 1e-9).astype(np.int64)  # new items wanted in the first p+1 slots
    # clipped so that a population that runs out hands its slots to the other
    new_count = np.minimum(np.maximum(wanted, slots - n[:, TRAINED:TRAINED + 1]), n[:, NEW:NEW + 1])  # (B, K)
    previous = np.concatenate([np.zeros((B, 1), np.int64), new_count[:, :-1]], axis=1)
    is_new = new_count > previous
    rank = np.where(is_new, new_count - 1, slots - new_count - 1)  # position inside its own list
    order = np.where(is_new, K, 0) + np.clip(rank, 0, K - 1)
    return order.astype(np.int64), slots <= n.sum(axis=1, keepdims=True)
