"""Typed requests and answers of the data plane, independent of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Fallback(Enum):
    """Why an answer is not personalised (values match the protobuf enum)."""

    NONE = 0
    UNKNOWN_USER = 1
    NO_CANDIDATES = 2
    NO_HISTORY = 3
    DEADLINE = 4
    STORE_UNAVAILABLE = 5  # the online store did not answer: popular items from the cached catalog


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    num_items: int
    exclude_item_ids: tuple[str, ...] = ()
    candidate_item_ids: tuple[str, ...] = ()
    model_version: str = ""
    explain: bool = False
    deadline_seconds: float | None = None  # time the client still allows, measured when the call arrived
    request_id: str = ""


@dataclass(frozen=True)
class Contribution:
    """One model input's additive share of an item's raw score."""

    feature: str
    value: float
    contribution: float


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float  # calibrated probability
    known: bool = True
    contributions: tuple[Contribution, ...] = ()
    raw_score: float = 0.0
    base_value: float = 0.0
    candidate_source: str = ""  # which candidate source proposed the item (Recommend only)


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    purchase_propensity: float
    items: list[ScoredItem]
    model_version: str
    user_feature_service: str
    item_feature_service: str
    fallback: Fallback = Fallback.NONE
    request_id: str = ""


@dataclass(frozen=True)
class UserScores:
    user_ids: list[str]
    propensities: list[float]
    unknown: list[bool]
    model_version: str
    feature_service: str


@dataclass(frozen=True)
class ItemScores:
    user_id: str
    items: list[ScoredItem]
    unknown_user: bool
    model_version: str
    feature_service: str


@dataclass(frozen=True)
class ModelDescription:
    name: str
    version: str
    feature_service: str
    feature_names: list[str]
    metrics: dict[str, float]
    horizon_days: int
    train_start: str
    train_end: str
    trained_at: str


@dataclass(frozen=True)
class ViewFreshness:
    feature_view: str
    age_seconds: float
    ttl_seconds: float


@dataclass(frozen=True)
class ModelsInfo:
    models: list[ModelDescription] = field(default_factory=list)
    current_version: str = ""
    available_versions: list[str] = field(default_factory=list)
    data_as_of: str = ""
    freshness: list[ViewFreshness] = field(default_factory=list)
