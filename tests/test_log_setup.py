"""Tests for the server's log formats and the idempotence of configure_logging."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from server.interceptors import request_id_var
from server.log_setup import configure_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_line_carries_request_id_pid_and_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("propensity.test").info("scored %d items", 3, extra={"user_id": "u1", "n_items": 3})
    finally:
        request_id_var.reset(token)
    (line,) = _lines(stream)
    entry = json.loads(line)
    assert entry["message"] == "scored 3 items"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "propensity.test"
    assert entry["request_id"] == "req-7"
    assert entry["pid"] == os.getpid()
    assert (entry["user_id"], entry["n_items"]) == ("u1", 3)
    stamp = datetime.fromisoformat(entry["time"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs((datetime.now(stamp.tzinfo) - stamp).total_seconds()) < 60


def test_json_without_request_id_and_with_exception() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        raise ValueError("bad row")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"path": datetime(2024, 1, 1)})
    entry = json.loads(_lines(stream)[0])
    assert "request_id" not in entry
    assert "ValueError: bad row" in entry["exception"]
    assert entry["path"] == "2024-01-01 00:00:00"  # not JSON-native: stringified, never a crash


def test_text_format_shows_request_id() -> None:
    stream = io.StringIO()
    configure_logging("text", stream=stream)
    token = request_id_var.set("req-9")
    try:
        logging.getLogger("propensity.test").warning("slow")
    finally:
        request_id_var.reset(token)
    logging.getLogger("propensity.test").warning("idle")
    inside, outside = _lines(stream)
    assert "req req-9]" in inside and inside.endswith("WARNING propensity.test [pid %d req req-9] slow" % os.getpid())
    assert "req -]" in outside


def test_configure_twice_does_not_duplicate_and_replaces_basic_config() -> None:
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler(io.StringIO()))  # what logging.basicConfig installs
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", stream=first)
    configure_logging("json", level="DEBUG", stream=second)
    logging.getLogger("y").debug("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in _lines(second)] == ["once"]
    assert sum(type(h) is logging.StreamHandler for h in root.handlers) == 1
    assert root.level == logging.DEBUG


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("xml")


def test_feast_registry_refresh_chatter_is_quiet_at_info_and_back_at_debug() -> None:
    from feast.infra.registry import registry as feast_registry  # the logger Feast itself writes its refresh line to

    stream = io.StringIO()
    configure_logging("text", stream=stream)
    feast_registry.logger.info("Registry cache expired, so refreshing")
    feast_registry.logger.warning("registry unreadable")
    logging.getLogger("propensity.test").info("served")
    lines = _lines(stream)
    assert not any("cache expired" in line for line in lines), lines
    assert any("registry unreadable" in line for line in lines) and any("served" in line for line in lines)

    configure_logging("text", level="DEBUG", stream=stream)
    feast_registry.logger.info("Registry cache expired, so refreshing")
    assert "cache expired" in _lines(stream)[-1]
    configure_logging("text", stream=stream)
