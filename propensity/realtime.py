"""Real-time feature updates: validate a streamed event, and apply events to a user's online feature rows.

The update rule mirrors the batch SQL (training/user_features.py) for the features it maintains,
so that a batch rebuild over the same events lands on the same values: window counts grow by the
events since the last build (expiry waits for the next build), the recent-item list moves the item
to the front with its per-item counts, "in cart" follows cart and purchase events, and a purchase
counts towards the item in the purchase history (an item outside the kept top-N starts again at 1
until the next build). Sessions,
browsing time, spend averages and category shares are left to the batch build.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from propensity.event_log import StreamEvent
from propensity.raw_data import EVENT_TYPES

ACTIVITY_VIEW = "user_activity"
INTERESTS_VIEW = "user_interests"
HISTORY_VIEW = "user_purchase_history"
MAINTAINED_VIEWS = (ACTIVITY_VIEW, INTERESTS_VIEW, HISTORY_VIEW)
DAY_MS = 86_400_000
# Ids (user, item, event, session, model version) are at most this long and carry no control characters.
MAX_ID_LENGTH = 128
# An event may be stamped at most this far ahead of the server's clock (client clock skew); never before 1970.
MAX_FUTURE_MS = DAY_MS
_EPOCH_MS = re.compile(r"^-?\d+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_COUNTED = {"view": "views", "add_to_cart": "carts", "purchase": "purchases"}
# Features the stream keeps exact (compared with a batch rebuild in the tests).
MAINTAINED_ACTIVITY = (
    "views_1d", "views_7d", "views_30d", "carts_1d", "carts_7d", "carts_30d",
    "purchases_1d", "purchases_7d", "purchases_30d", "returns_30d", "purchases_total",
    "spend_30d", "last_event_ts", "last_purchase_ts", "first_event_ts",
)
MAINTAINED_INTERESTS = (
    "recent_item_ids", "recent_item_views_7d", "recent_item_carts_7d",
    "recent_item_purchases_30d", "recent_item_in_cart", "recent_item_last_ts",
)
MAINTAINED_HISTORY = ("bought_item_ids", "bought_item_counts", "bought_item_last_ts")


class InvalidEvent(ValueError):
    """A streamed event that cannot be used; names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def id_problem(value: str) -> str | None:
    """What is wrong with an id (empty, blank, too long, a control character), or None when it is usable."""
    if len(value) <= MAX_ID_LENGTH and value.isprintable() and not value.isspace() and value:
        return None  # the usual case, in three C calls: printable excludes every control character
    if not value:
        return "empty id"
    if not value.strip():
        return "blank id (only whitespace)"
    if len(value) > MAX_ID_LENGTH:
        return f"at most {MAX_ID_LENGTH} characters, got {len(value)}"
    control = _CONTROL.search(value)
    if control:
        return f"control character {control.group()!r} at position {control.start()}"
    return None


def shown(value: str, limit: int = 40) -> str:
    """A client's value quoted for an error message, cut short: a hostile megabyte is not echoed back."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def parse_event(event_id: str, event_time: str, user_id: str, item_id: str, event_type: str,
                session_id: str = "", price: float | None = None, quantity: float | None = None,
                now_ms: int | None = None) -> StreamEvent:
    """Check one event against the raw schema (same rules as the file loader) and normalise it.

    Streamed events also need a time between 1970 and MAX_FUTURE_MS past `now_ms` (default: the clock).
    """
    for field, value in (("event_id", event_id), ("user_id", user_id), ("item_id", item_id)):
        problem = id_problem(value)
        if problem:
            raise InvalidEvent(field, problem)
    if session_id:
        problem = id_problem(session_id) if session_id.strip() else None  # blank means "no session"
        if problem:
            raise InvalidEvent("session_id", problem)
    if event_type not in EVENT_TYPES:
        raise InvalidEvent("event_type", f"unknown event type {shown(event_type)} (expected one of {', '.join(EVENT_TYPES)})")
    if price is not None and not (math.isfinite(price) and price >= 0):
        raise InvalidEvent("price", f"must be a finite number >= 0, got {price!r}")
    if quantity is not None and not (math.isfinite(quantity) and quantity > 0):
        raise InvalidEvent("quantity", f"must be a finite number > 0, got {quantity!r}")
    return StreamEvent(
        event_id=event_id.strip(), event_time_ms=_parse_time_ms(event_time, now_ms), user_id=user_id.strip(),
        item_id=item_id.strip(), event_type=event_type, session_id=session_id.strip() or None,
        price=price, quantity=1.0 if quantity is None else quantity,
    )


def _parse_time_ms(text: str, now_ms: int | None = None) -> int:
    text = (text or "").strip()
    if not text:
        raise InvalidEvent("event_time", "missing time")
    if _EPOCH_MS.match(text):
        if len(text) > 20:  # beyond any 64-bit millisecond count
            raise InvalidEvent("event_time", f"epoch milliseconds out of range: {shown(text)}")
        moment_ms = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEvent("event_time", f"unparsable time {shown(text)} (ISO-8601 or epoch milliseconds)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)  # naive means UTC, as in the file loader
        try:
            moment_ms = int(moment.timestamp() * 1000)
        except (OverflowError, ValueError):  # an offset pushing year 1 or 9999 outside the calendar
            raise InvalidEvent("event_time", f"out of range: {shown(text)}") from None
    if moment_ms < 0:
        raise InvalidEvent("event_time", f"before 1970-01-01T00:00:00Z: {shown(text)}")
    limit_ms = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) + MAX_FUTURE_MS
    if moment_ms > limit_ms:
        raise InvalidEvent("event_time", f"more than {MAX_FUTURE_MS // 3_600_000} hours in the future: {shown(text)}")
    return moment_ms


def apply_events(
    rows: Mapping[str, Mapping[str, object]],
    events: Sequence[StreamEvent],
    recent_items: int,
    bought_items: int,
    recorded_types: frozenset[str] = frozenset(EVENT_TYPES),
) -> dict[str, dict]:
    """New rows of the maintained views (MAINTAINED_VIEWS) the user's events changed, from the current online rows.

    Every event changes user_activity and user_interests; only a purchase changes user_purchase_history.
    rows maps each view to its row as Feast returned it (every feature of the view, None where absent);
    features the stream does not maintain pass through unchanged and unread, so a caller may hand them over in any
    form (the ingestion's SQLite path passes a marker for a stored value it did not decode). recorded_types are the event types the
    shop records: their counts start at 0 for a new user, as in the batch build; counts of types it does
    not record stay null until such an event arrives.
    """
    activity = dict(rows[ACTIVITY_VIEW])
    for kind, columns in _COUNT_COLUMNS.items():
        if kind in recorded_types:
            for column in columns:
                if activity.get(column) is None:
                    activity[column] = 0
    # Every interests and history feature is a list: a missing one becomes empty, a maintained one is copied to be
    # changed here, any other is passed on as given (the caller's lists are never changed in place: it may share them).
    interests = {name: [] if value is None else value for name, value in rows[INTERESTS_VIEW].items()}
    history = {name: [] if value is None else value for name, value in rows[HISTORY_VIEW].items()}
    for lists, maintained in ((interests, MAINTAINED_INTERESTS), (history, MAINTAINED_HISTORY)):
        for name in maintained:
            lists[name] = list(lists.get(name) or [])
    bought = False
    for event in sorted(events, key=_event_time) if len(events) > 1 else events:
        ts = event.event_time_ms // 1000
        event_type = event.event_type
        for column in _WINDOW_COLUMNS.get(event_type, ()):
            activity[column] = (activity.get(column) or 0) + 1
        if event_type == "return":
            _add(activity, "returns_30d", 1)
        elif event_type == "purchase":
            _add(activity, "purchases_total", 1)
            _add(activity, "spend_30d", (event.price or 0.0) * event.quantity)
            activity["last_purchase_ts"] = max(activity.get("last_purchase_ts") or ts, ts)
            _count_purchase(history, event.item_id, ts, bought_items)
            bought = True
        activity["last_event_ts"] = max(activity.get("last_event_ts") or ts, ts)
        activity["first_event_ts"] = min(activity.get("first_event_ts") or ts, ts)
        _touch_item(interests, event, ts, recent_items)
    updated = {ACTIVITY_VIEW: activity, INTERESTS_VIEW: interests}
    return {**updated, HISTORY_VIEW: history} if bought else updated


def _event_time(event: StreamEvent) -> int:
    return event.event_time_ms


def _count_purchase(history: dict, item_id: str, ts: int, cap: int) -> None:
    counts = dict(zip(history["bought_item_ids"], zip(history["bought_item_counts"], history["bought_item_last_ts"])))
    count, last = counts.get(item_id, (0, ts))
    counts[item_id] = (count + 1, max(last, ts))
    # The batch build's order: most bought first, then most recently bought, then item id.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:cap]
    history["bought_item_ids"] = [item for item, _ in ranked]
    history["bought_item_counts"] = [count for _, (count, _) in ranked]
    history["bought_item_last_ts"] = [last for _, (_, last) in ranked]


def _add(row: dict, name: str, amount: float) -> None:
    row[name] = (row.get(name) or 0) + amount


def _touch_item(lists: dict, event: StreamEvent, ts: int, cap: int) -> None:
    ids, views, carts, purchases, in_cart, last = (lists[name] for name in MAINTAINED_INTERESTS)
    columns = (ids, views, carts, purchases, in_cart, last)
    if event.item_id in ids:
        position = ids.index(event.item_id)
        entry = [column.pop(position) if position < len(column) else 0 for column in columns]
    else:
        entry = [event.item_id, 0, 0, 0, 0, 0]
    # entry follows MAINTAINED_INTERESTS: item, views 7d, carts 7d, purchases 30d, in cart, last time
    if event.event_type == "view":
        entry[1] = (entry[1] or 0) + 1
    elif event.event_type == "add_to_cart":
        entry[2] = (entry[2] or 0) + 1
        entry[4] = 1
    elif event.event_type == "purchase":
        entry[3] = (entry[3] or 0) + 1
        entry[4] = 0
    entry[5] = ts
    for column, value in zip(columns, entry):  # most recent first, as the batch build orders them
        column.insert(0, value)
        del column[cap:]


_WINDOW_COLUMNS = {kind: tuple(f"{name}_{window}" for window in ("1d", "7d", "30d")) for kind, name in _COUNTED.items()}
_COUNT_COLUMNS = {
    "view": ("views_1d", "views_7d", "views_30d"),
    "add_to_cart": ("carts_1d", "carts_7d", "carts_30d"),
    "purchase": ("purchases_1d", "purchases_7d", "purchases_30d", "purchases_total"),
    "return": ("returns_30d",),
}
