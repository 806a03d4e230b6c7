"""Request checks that name the offending field; they run before any feature is read."""

from __future__ import annotations

from collections.abc import Sequence

from propensity.realtime import MAX_ID_LENGTH, id_problem
from propensity.settings import ServerSettings
from server.errors import InvalidArgument

__all__ = ["MAX_ID_LENGTH", "id_list", "model_version", "num_items", "user_id"]


def user_id(value: str, field: str = "user_id") -> str:
    if not value:
        raise InvalidArgument(field, "required, got an empty string")
    problem = id_problem(value)
    if problem:
        raise InvalidArgument(field, problem)
    return value


def model_version(value: str) -> str:
    """Empty (the server decides) or a plausible version id; whether it exists is the model pool's answer (NOT_FOUND)."""
    problem = id_problem(value) if value else None
    if problem:
        raise InvalidArgument("model_version", problem)
    return value


def num_items(value: int, limits: ServerSettings) -> int:
    if value == 0:
        return limits.default_num_items
    if not 1 <= value <= limits.max_num_items:
        raise InvalidArgument("num_items", f"must be between 1 and {limits.max_num_items} (0 means {limits.default_num_items}), got {value}")
    return value


def id_list(values: Sequence[str], field: str, limit: int, required: bool = False) -> tuple[str, ...]:
    """The ids, each checked like a single id; a repeated id is allowed (each RPC documents what it does with one)."""
    if required and not values:
        raise InvalidArgument(field, "at least one id is required")
    if len(values) > limit:
        raise InvalidArgument(field, f"at most {limit} ids per request, got {len(values)}")
    for position, value in enumerate(values):
        problem = id_problem(value)
        if problem:
            raise InvalidArgument(f"{field}[{position}]", problem)
    return tuple(values)
