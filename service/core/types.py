"""The values and errors the core exchanges with its callers (routes, reload, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from service.index import Hit
from service.model.mixing import Policy
from service.store import ItemRecord

Rows = npt.NDArray[np.float32]  # (N, D+1): item rows [v; b], or index queries [h; 1]


class InvalidItemError(ValueError):
    """An item this model cannot embed; the message says what to change."""


class UnknownItemsError(LookupError):
    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = list(item_ids)
        super().__init__(f"unknown item ids {self.item_ids[:10]}; register them with POST /items first")


class TrainedItemConflictError(ValueError):
    """The id belongs to an item the model was trained on: its row is learned, not registered."""


@dataclass(frozen=True)
class NewItem:
    item_id: str
    attributes: list[str]
    content: list[float] | None


@dataclass(frozen=True)
class Registration:
    record: ItemRecord
    unknown_attributes: list[str]
    inserted: bool
    held_out: bool = False  # the model's dataset has interactions for it, but it was held out of training


@dataclass(frozen=True)
class ItemView:
    item_id: str
    is_cold: bool
    model_version: str
    record: ItemRecord | None  # None for trained items: the artifact keeps no raw inputs
    unknown_attributes: list[str]
    held_out: bool = False


@dataclass(frozen=True)
class Recommendations:
    hits: list[Hit]
    fallback: bool
    model_version: str
    skipped: int = 0  # items left out because their score was not finite (counted by the caller)
    held_out: int = 0  # hits that are the model's held-out items: registered, but not new (counted apart)
    explanations: list[Explanation] | None = None  # one per hit, when asked for
    policy: Policy | None = None  # how new items were mixed with trained ones in this list

    @property
    def cold_share(self) -> float:
        """The share of new items in the list."""
        return sum(h.is_cold for h in self.hits) / len(self.hits) if self.hits else 0.0


class ViewWeights(NamedTuple):
    """How much each view of a new item's generated row counts for one user (M2VAE's two-level fusion):
    common = α, attributes = (1 - α)·g_a, content = (1 - α)·g_c; they sum to 1."""

    attributes: float
    content: float
    common: float


class Explanation(NamedTuple):
    """Why an item is in a list. New items: `views` for this user and `attributes`, the item's own
    tokens with their attention weights (largest first). Personal lists: `because`, the history items
    whose removal from the fold-in lowers the item's score most, with that drop (largest first).
    (Tuples, not dataclasses: an explained batch makes thousands of them.)"""

    views: ViewWeights | None
    attributes: list[tuple[str, float]]
    because: list[tuple[str, float]]


class Followed(NamedTuple):
    cursor: str | None  # the last event applied
    lags: list[float]  # seconds from each applied item event to its row being searchable
    rebuilt: bool
