"""Tests for request validation: every rejection names the offending field."""

import pytest

from propensity.settings import ServerSettings
from server import validation
from server.errors import InvalidArgument, RecommendationError

LIMITS = ServerSettings(default_num_items=10, max_num_items=100, max_request_ids=3)


def _reject(call, *args, **kwargs) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as error:
        call(*args, **kwargs)
    assert isinstance(error.value, RecommendationError)
    return error.value


def test_user_id_accepted_up_to_128_characters() -> None:
    assert validation.user_id("u1") == "u1"
    assert validation.user_id("x" * 128) == "x" * 128


def test_empty_user_id() -> None:
    error = _reject(validation.user_id, "")
    assert error.field == "user_id"
    assert str(error) == "user_id: required, got an empty string"


def test_too_long_user_id() -> None:
    error = _reject(validation.user_id, "x" * 129)
    assert str(error) == "user_id: at most 128 characters, got 129"


def test_user_id_reports_the_field_it_was_given() -> None:
    assert str(_reject(validation.user_id, "", field="owner_id")).startswith("owner_id: ")


def test_num_items_zero_means_the_default() -> None:
    assert validation.num_items(0, LIMITS) == 10
    assert validation.num_items(1, LIMITS) == 1
    assert validation.num_items(100, LIMITS) == 100


@pytest.mark.parametrize("value", [-1, 101])
def test_num_items_out_of_range(value: int) -> None:
    error = _reject(validation.num_items, value, LIMITS)
    assert error.field == "num_items"
    assert str(error) == f"num_items: must be between 1 and 100 (0 means 10), got {value}"


def test_id_list_accepts_up_to_the_limit() -> None:
    assert validation.id_list(["a", "b", "c"], "item_ids", 3) == ("a", "b", "c")
    assert validation.id_list([], "exclude_item_ids", 3) == ()


def test_required_id_list_must_not_be_empty() -> None:
    error = _reject(validation.id_list, [], "user_ids", 3, required=True)
    assert str(error) == "user_ids: at least one id is required"


def test_id_list_over_the_limit() -> None:
    error = _reject(validation.id_list, ["a", "b", "c", "d"], "exclude_item_ids", 3)
    assert str(error) == "exclude_item_ids: at most 3 ids per request, got 4"


def test_empty_id_in_a_list_names_its_position() -> None:
    error = _reject(validation.id_list, ["a", "b", ""], "user_ids", 3)
    assert error.field == "user_ids[2]"
    assert str(error) == "user_ids[2]: empty id"


def test_too_long_id_in_a_list_names_its_position() -> None:
    error = _reject(validation.id_list, ["x" * 129], "candidate_item_ids", 3)
    assert str(error) == "candidate_item_ids[0]: at most 128 characters, got 129"
