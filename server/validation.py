"""Request checks that name the offending field; they run before any feature is read."""

from __future__ import annotations

from collections.abc import Sequence

from propensity.settings import ServerSettings
from server.errors import InvalidArgument

MAX_ID_LENGTH = 128


def user_id(value: str, field: str = "user_id") -> str:
    if not value:
        raise InvalidArgument(field, "required, got an empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field, f"at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return value


def num_items(value: int, limits: ServerSettings) -> int:
    if value == 0:
        return limits.default_num_items
    if not 1 <= value <= limits.max_num_items:
        raise InvalidArgument("num_items", f"must be between 1 and {limits.max_num_items} (0 means {limits.default_num_items}), got {value}")
    return value


def id_list(values: Sequence[str], field: str, limit: int, required: bool = False) -> tuple[str, ...]:
    if required and not values:
        raise InvalidArgument(field, "at least one id is required")
    if len(values) > limit:
        raise InvalidArgument(field, f"at most {limit} ids per request, got {len(values)}")
    for position, value in enumerate(values):
        if not value:
            raise InvalidArgument(f"{field}[{position}]", "empty id")
        if len(value) > MAX_ID_LENGTH:
            raise InvalidArgument(f"{field}[{position}]", f"at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return tuple(values)
