"""Root logging for the server: JSON lines for machines or text for people, both carrying the request id."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TextIO

from opentelemetry import trace

from server.interceptors import current_request_id

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d req %(request_id)s] %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra={...}`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}
# Third-party loggers that say something routine at INFO on a timer: Feast's registry logs "Registry cache expired,
# so refreshing" on every refresh (twice every 15 s in a serving process), which buries the server's own lines.
# They keep WARNING and above, and everything when the server runs at DEBUG.
ROUTINE_INFO_LOGGERS = ("feast.infra.registry.registry",)


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the RPC that logged it ("-" outside an RPC)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, trace_id and span_id, pid, extra fields, exception.

    trace_id and span_id (lower-case hex, as trace backends show them) are there while a recording span is
    current, i.e. inside a traced RPC (server/tracing.py); with tracing off they are absent.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process if record.process is not None else os.getpid(),
        }
        request_id = current_request_id()
        if request_id:
            entry["request_id"] = request_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = trace.format_trace_id(span.trace_id)
            entry["span_id"] = trace.format_span_id(span.span_id)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(fmt: str, level: str | int = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Install the server's handler on the root logger (stderr by default) and return it.

    Idempotent: a handler installed by an earlier call is replaced, and so is a plain StreamHandler
    from `logging.basicConfig` (the CLI sets one up), so no line is written twice. Other handlers,
    such as pytest's capture, are left alone.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log_format must be one of {FORMATS}, got {fmt!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_propensity", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._propensity = True  # type: ignore[attr-defined]
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    routine_level = logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
    for name in ROUTINE_INFO_LOGGERS:
        logging.getLogger(name).setLevel(routine_level)
    return handler
