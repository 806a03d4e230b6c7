"""The raw schema: event types, the file suffixes of a table, required columns and the Arrow schema of each table."""

from __future__ import annotations

import pyarrow as pa

EVENT_TYPES: tuple[str, ...] = ("view", "add_to_cart", "purchase", "return")

SUFFIXES = (".csv", ".csv.gz", ".parquet")

EVENT_COLUMNS = ("event_time", "user_id", "item_id", "event_type")
ITEM_COLUMNS = ("item_id", "category_id", "price", "available", "brand", "title")
USER_COLUMNS = ("user_id", "signup_time", "age", "gender", "region")

SCHEMAS = {
    "events": pa.schema([
        ("event_time", pa.timestamp("us", tz="UTC")), ("user_id", pa.string()),
        ("item_id", pa.string()), ("event_type", pa.string()), ("event_id", pa.string()),
        ("session_id", pa.string()), ("price", pa.float64()), ("quantity", pa.float64()),
    ]),
    "items": pa.schema([
        ("item_id", pa.string()), ("category_id", pa.string()), ("price", pa.float64()),
        ("available", pa.bool_()), ("brand", pa.string()), ("title", pa.string()),
    ]),
    "users": pa.schema([
        ("user_id", pa.string()), ("signup_time", pa.timestamp("us", tz="UTC")),
        ("age", pa.float64()), ("gender", pa.string()), ("region", pa.string()),
    ]),
}

# Every column name the raw schema knows; other columns in a file are ignored and reported.
KNOWN_COLUMNS = frozenset(name for schema in SCHEMAS.values() for name in schema.names)

# Event times outside [1970-01-01, now + this] are rejected: before the epoch is a broken clock or
# a zero-filled field, and a log cannot hold what has not happened yet (one day of slack for clocks).
FUTURE_SLACK_DAYS = 1


def raw_schema(table: str) -> pa.Schema:
    """The Arrow schema of a raw table ("events", "items" or "users") as written to Parquet."""
    return SCHEMAS[table]
