"""The HTTP contract: request and response bodies. Shape rules live here; model-dependent rules
(content dimension, known attributes) are checked by the recommender and mapped to 4xx in app.py."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    StringConstraints,
    Tag,
    model_validator,
)

ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
MAX_ATTRIBUTES = 1000
MAX_CONTENT_DIM = 65_536
# A store that times out may have applied the write before the answer was lost (Redis ran the
# transaction; the reply never came). Every write is idempotent, so the client's move is to retry.
UNAVAILABLE_WRITE = (
    "store unavailable or too slow: the write may or may not have been applied; retrying is safe (item writes "
    "are upserts of the same record, deletes of a deleted item answer 404, and an interaction is a (user, item) "
    "pair kept once with its latest timestamp, so a retried one never counts twice)")

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
AttributeToken = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# Strict: a JSON string ("0.5") or boolean (true) is a client bug to report, not a number to guess
# at. JSON integers stay numbers (JSON has one number type; many encoders write 0.0 as 0).
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32_content(values: list[float]) -> list[float]:
    """Content is stored and embedded as float32: a value finite as a float64 but not as a float32
    (3.5e38) would become inf in the store and NaN in the item's row."""
    as32 = np.asarray(values, dtype=np.float64).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(as32))
    if bad.size:
        at = int(bad[0])
        raise ValueError(f"content[{at}] = {values[at]!r} is outside the float32 range (|x| <= {FLOAT32_MAX:.8g}); "
                         f"{bad.size} value(s) out of range; scale the vector")
    return values


Content = Annotated[list[FiniteFloat], AfterValidator(_float32_content)]

# No content vector here: its length is the served model's content dimension (GET /readyz names the
# model; ml-100k's is 384), and an example of any fixed length would be refused by most models.
_ITEM_EXAMPLE: dict[str, JsonValue] = {
    "id": "movie:new-space-opera",
    "attributes": ["genre:Action", "genre:Sci-Fi", "genre:Adventure"],
}


class ItemIn(BaseModel):
    """A new or updated item. At least one of attributes and content is required."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_ITEM_EXAMPLE]})

    id: Id = Field(description="1-128 characters of A-Z a-z 0-9 _ . : -")
    attributes: list[AttributeToken] = Field(
        default_factory=list, max_length=MAX_ATTRIBUTES,
        description="categorical tokens such as genre:Drama; tokens the model never saw are reported back",
    )
    content: Content | None = Field(
        None, max_length=MAX_CONTENT_DIM,
        description="dense content vector (e.g. image features) of exactly the served model's content dimension "
        "(ml-100k: 384); JSON numbers within the float32 range, never strings or booleans",
    )

    @model_validator(mode="after")
    def _not_empty(self) -> ItemIn:
        if not self.attributes and self.content is None:
            raise ValueError("an item needs attributes, content, or both; this one has neither")
        return self


class ItemBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"items": [_ITEM_EXAMPLE]}]})

    items: list[ItemIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_ids(self) -> ItemBatchIn:
        twice = sorted(i for i, n in Counter(item.id for item in self.items).items() if n > 1)
        if twice:
            raise ValueError(f"item ids must be distinct within a batch; repeated: {twice[:10]}")
        return self


class ItemOut(BaseModel):
    id: str
    is_cold: bool = Field(description="false for items the model was trained on, true for registered items")
    model_version: str = Field(
        description="the model version that computed the stored row; a replica serving another version "
        "re-embeds the item from its raw inputs")
    attributes: list[str] | None = Field(None, description="as registered; null for trained items")
    unknown_attributes: list[str] = Field(
        default_factory=list, description="registered tokens the model does not know; they were ignored"
    )
    has_content: bool | None = None
    created: bool | None = Field(None, description="on writes: true if new, false if an existing id was updated")
    created_at: float | None = Field(None, description="unix seconds of the last registration")
    held_out: bool = Field(
        False, description="true: the served model's training data had interactions for this id but held it out "
        "(an evaluation item); it is served from its generated row like a new item, but not counted as new")


class ItemBatchOut(BaseModel):
    items: list[ItemOut]


class InteractionIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user": "user:42", "item": "movie:1683", "timestamp": 1.7e9}]},
    )

    user: Id
    item: Id
    timestamp: FiniteFloat | None = Field(None, ge=0, description="unix seconds; default: now")


class InteractionBatchIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"interactions": [{"user": "user:42", "item": "movie:1683"}]}]},
    )

    interactions: list[InteractionIn] = Field(min_length=1)


def _interaction_form(body: Any) -> str | None:
    """Which form a body is: a batch has "interactions"; anything else is read as one event. Only that
    form's errors are reported (a plain union would list the other form's, irrelevant, first)."""
    if isinstance(body, dict):
        return "batch" if "interactions" in body else "event"
    if isinstance(body, InteractionBatchIn | InteractionIn):
        return "batch" if isinstance(body, InteractionBatchIn) else "event"
    return None


InteractionsBody = Annotated[
    Annotated[InteractionIn, Tag("event")] | Annotated[InteractionBatchIn, Tag("batch")],
    Discriminator(_interaction_form, custom_error_type="interactions_body",
                  custom_error_message='send one event {"user", "item"[, "timestamp"]} or '
                  '{"interactions": [event, ...]} (a JSON object)'),
]


class InteractionsOut(BaseModel):
    accepted: int
    users: int


class ViewWeightsOut(BaseModel):
    attributes: float
    content: float
    common: float


class WeightedToken(BaseModel):
    token: str
    weight: float


class HistoryContribution(BaseModel):
    item: str
    contribution: float = Field(description="how much the item's score drops when this history item is left "
                                "out of the user's fold-in")


class ExplanationOut(BaseModel):
    views: ViewWeightsOut | None = Field(
        None, description="new items: the weight of each view of the item's generated row for THIS user "
        "(M2VAE's user-aware fusion: common α, attributes (1-α)·g_a, content (1-α)·g_c; they sum to 1); "
        "fallback lists use the neutral user the index row was made with")
    attributes: list[WeightedToken] = Field(
        default_factory=list, description="new items: their most influential attribute tokens (attention weight)")
    because: list[HistoryContribution] = Field(
        default_factory=list, description="personal lists: the history items that pulled this item up most")


class RecommendedItem(BaseModel):
    id: str
    score: float = Field(description="what the item was ranked by: h·v + b; a new item's on the trained items' "
                         "scale under a calibrated policy (scale·(h·v + b) + offset)")
    is_cold: bool
    model_version: str


class ExplainedItem(RecommendedItem):
    """An item of a list asked for with explain=true."""

    explanation: ExplanationOut


class CalibratedPolicyOut(BaseModel):
    policy: Literal["calibrated"]
    scale: float
    offset: float


class QuotaPolicyOut(BaseModel):
    policy: Literal["quota"]
    cold_share: float


class RecommendationsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user": "user:42", "model_version": "20260101T000000Z-0123abcd", "fallback": False,
        "policy": {"policy": "calibrated", "scale": 1.0, "offset": 1.24}, "cold_share": 1.0,
        "items": [{"id": "movie:1683", "score": 3.2, "is_cold": True,
                   "model_version": "20260101T000000Z-0123abcd"}],
    }]})

    user: str
    model_version: str
    fallback: bool = Field(
        description="true when the user has no usable history: the list of a user folded in from nothing "
        "(popular trained items and the new items most people would take), under the same policy"
    )
    policy: CalibratedPolicyOut | QuotaPolicyOut = Field(
        description="how new items were mixed with trained ones: `calibrated` (the model's validation-chosen "
        "calibration of new items' scores, one list by score) or `quota` (the share asked for with cold_share)")
    cold_share: float = Field(ge=0.0, le=1.0, description="the share of new items in this list")
    items: list[RecommendedItem | ExplainedItem] = Field(description="ExplainedItem with explain=true")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
    store: str
    index_items: int = 0
    detail: str | None = None


class ErrorOut(BaseModel):
    detail: str
