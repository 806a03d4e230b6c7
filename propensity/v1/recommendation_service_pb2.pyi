from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_REASON_UNSPECIFIED: _ClassVar[FallbackReason]
    FALLBACK_REASON_UNKNOWN_USER: _ClassVar[FallbackReason]
    FALLBACK_REASON_NO_CANDIDATES: _ClassVar[FallbackReason]
    FALLBACK_REASON_NO_HISTORY: _ClassVar[FallbackReason]
    FALLBACK_REASON_DEADLINE: _ClassVar[FallbackReason]
    FALLBACK_REASON_STORE_UNAVAILABLE: _ClassVar[FallbackReason]
FALLBACK_REASON_UNSPECIFIED: FallbackReason
FALLBACK_REASON_UNKNOWN_USER: FallbackReason
FALLBACK_REASON_NO_CANDIDATES: FallbackReason
FALLBACK_REASON_NO_HISTORY: FallbackReason
FALLBACK_REASON_DEADLINE: FallbackReason
FALLBACK_REASON_STORE_UNAVAILABLE: FallbackReason

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "num_items", "exclude_item_ids", "candidate_item_ids", "model_version", "explain")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    num_items: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    explain: bool
    def __init__(self, user_id: _Optional[str] = ..., num_items: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., explain: _Optional[bool] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("feature", "value", "contribution")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    feature: str
    value: float
    contribution: float
    def __init__(self, feature: _Optional[str] = ..., value: _Optional[float] = ..., contribution: _Optional[float] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "rank", "contributions", "raw_score", "base_value", "candidate_source")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    BASE_VALUE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    contributions: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    raw_score: float
    base_value: float
    candidate_source: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., contributions: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ..., raw_score: _Optional[float] = ..., base_value: _Optional[float] = ..., candidate_source: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("user_id", "purchase_propensity", "items", "model_version", "feature_service", "fallback_used", "fallback_reason", "item_feature_service", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    ITEM_FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    purchase_propensity: float
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    model_version: str
    feature_service: str
    fallback_used: bool
    fallback_reason: FallbackReason
    item_feature_service: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., purchase_propensity: _Optional[float] = ..., items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., feature_service: _Optional[str] = ..., fallback_used: _Optional[bool] = ..., fallback_reason: _Optional[_Union[FallbackReason, str]] = ..., item_feature_service: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreUsersRequest(_message.Message):
    __slots__ = ("user_ids", "model_version")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class UserScore(_message.Message):
    __slots__ = ("user_id", "purchase_propensity", "unknown_user")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_USER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    purchase_propensity: float
    unknown_user: bool
    def __init__(self, user_id: _Optional[str] = ..., purchase_propensity: _Optional[float] = ..., unknown_user: _Optional[bool] = ...) -> None: ...

class ScoreUsersResponse(_message.Message):
    __slots__ = ("scores", "model_version", "feature_service")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[UserScore]
    model_version: str
    feature_service: str
    def __init__(self, scores: _Optional[_Iterable[_Union[UserScore, _Mapping]]] = ..., model_version: _Optional[str] = ..., feature_service: _Optional[str] = ...) -> None: ...

class ScoreItemsRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "model_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ItemScore(_message.Message):
    __slots__ = ("item_id", "score", "known_item")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_ITEM_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    known_item: bool
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., known_item: _Optional[bool] = ...) -> None: ...

class ScoreItemsResponse(_message.Message):
    __slots__ = ("user_id", "scores", "model_version", "feature_service", "unknown_user")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_USER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    scores: _containers.RepeatedCompositeFieldContainer[ItemScore]
    model_version: str
    feature_service: str
    unknown_user: bool
    def __init__(self, user_id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[ItemScore, _Mapping]]] = ..., model_version: _Optional[str] = ..., feature_service: _Optional[str] = ..., unknown_user: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricValue(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "feature_service", "feature_names", "metrics", "horizon_days", "train_start", "train_end", "trained_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HORIZON_DAYS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_START_FIELD_NUMBER: _ClassVar[int]
    TRAIN_END_FIELD_NUMBER: _ClassVar[int]
    TRAINED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    feature_service: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricValue]
    horizon_days: int
    train_start: str
    train_end: str
    trained_at: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., feature_service: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Iterable[_Union[MetricValue, _Mapping]]] = ..., horizon_days: _Optional[int] = ..., train_start: _Optional[str] = ..., train_end: _Optional[str] = ..., trained_at: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("models", "current_version", "available_versions", "data_as_of", "feature_freshness")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_AS_OF_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    current_version: str
    available_versions: _containers.RepeatedScalarFieldContainer[str]
    data_as_of: str
    feature_freshness: _containers.RepeatedCompositeFieldContainer[FeatureViewFreshness]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., current_version: _Optional[str] = ..., available_versions: _Optional[_Iterable[str]] = ..., data_as_of: _Optional[str] = ..., feature_freshness: _Optional[_Iterable[_Union[FeatureViewFreshness, _Mapping]]] = ...) -> None: ...

class FeatureViewFreshness(_message.Message):
    __slots__ = ("feature_view", "age_seconds", "ttl_seconds")
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    feature_view: str
    age_seconds: float
    ttl_seconds: float
    def __init__(self, feature_view: _Optional[str] = ..., age_seconds: _Optional[float] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "event_time", "user_id", "item_id", "event_type", "session_id", "price", "quantity")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_time: str
    user_id: str
    item_id: str
    event_type: str
    session_id: str
    price: float
    quantity: float
    def __init__(self, event_id: _Optional[str] = ..., event_time: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., event_type: _Optional[str] = ..., session_id: _Optional[str] = ..., price: _Optional[float] = ..., quantity: _Optional[float] = ...) -> None: ...

class IngestEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RejectedEvent(_message.Message):
    __slots__ = ("index", "event_id", "field", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    event_id: str
    field: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., event_id: _Optional[str] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class IngestEventsResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "rejected", "rejections", "pushes_pending")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_PENDING_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[RejectedEvent]
    pushes_pending: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[RejectedEvent, _Mapping]]] = ..., pushes_pending: _Optional[int] = ...) -> None: ...

class ForgetUsersRequest(_message.Message):
    __slots__ = ("user_ids",)
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ForgetUsersResponse(_message.Message):
    __slots__ = ("users", "event_log_events", "online_rows", "files_rewritten", "file_rows")
    USERS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ROWS_FIELD_NUMBER: _ClassVar[int]
    FILES_REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    FILE_ROWS_FIELD_NUMBER: _ClassVar[int]
    users: int
    event_log_events: int
    online_rows: int
    files_rewritten: int
    file_rows: int
    def __init__(self, users: _Optional[int] = ..., event_log_events: _Optional[int] = ..., online_rows: _Optional[int] = ..., files_rewritten: _Optional[int] = ..., file_rows: _Optional[int] = ...) -> None: ...
