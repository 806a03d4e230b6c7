"""Import a REES46 (Open CDP) event log as view, add_to_cart and purchase events."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.importers import ImportSummary, write_and_verify
from propensity.importers.source import numbers, read_source
from propensity.importers.source import times as source_times

DEFAULT_SOURCE = (
    Path(__file__).resolve().parents[2].parent / "shared/data/rees46_multicategory_2019oct_sample/sample.csv.gz"
)

_EVENT_TYPES = {"view": "view", "cart": "add_to_cart", "purchase": "purchase"}
_COLUMNS = ("event_time", "event_type", "product_id", "category_id", "brand", "price", "user_id", "user_session")


def import_rees46(
    source: Path = DEFAULT_SOURCE, out_dir: Path = Path("data/raw/rees46"),
    progress: Callable[[str], object] = print,
) -> ImportSummary:
    """Convert a REES46 monthly CSV (or a head of one) into raw-schema Parquet files."""
    started = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    progress(f"rees46: reading {source}")
    chunk, blank_lines = read_source(source, _COLUMNS)
    raw = chunk.frame
    progress(f"rees46: {len(raw)} rows read")

    kind = raw["event_type"].str.strip()
    duplicate = raw.duplicated(keep="first")
    # remove_from_cart has no counterpart in the raw schema; other types would be format drift.
    reasons = {
        "exact duplicate row": duplicate,
        "remove_from_cart (no raw event type)": ~duplicate & kind.eq("remove_from_cart"),
        "other unknown event_type": ~duplicate & ~kind.isin([*_EVENT_TYPES, "remove_from_cart"]),
    }
    dropped = {reason: int(mask.sum()) for reason, mask in reasons.items()}
    keep = ~(reasons["exact duplicate row"] | reasons["remove_from_cart (no raw event type)"]
             | reasons["other unknown event_type"]).to_numpy()

    session = raw["user_session"].str.strip()
    events = pd.DataFrame({
        "event_time": source_times(chunk, "event_time", source, pd.to_datetime(
            raw["event_time"].str.replace(" UTC", "", regex=False), format="%Y-%m-%d %H:%M:%S", utc=True, errors="coerce")),
        "user_id": raw["user_id"].str.strip(),
        "item_id": raw["product_id"].str.strip(),
        "event_type": kind.map(_EVENT_TYPES),
        # Source line number (header is line 1): the log has no event id of its own.
        "event_id": source.name + ":" + pd.Series(chunk.lines).astype(str),
        "session_id": session.where(session.ne(""), None),
        "price": numbers(chunk, "price", source, empty_ok=True),
        "quantity": 1.0,
    })[keep].reset_index(drop=True)
    attributes = pd.DataFrame({
        "item_id": raw["product_id"].str.strip(), "category_id": raw["category_id"].str.strip(),
        "brand": raw["brand"].str.strip(),
    })[keep].reset_index(drop=True)
    attributes["t"] = events["event_time"]
    attributes["price"] = events["price"]
    items = _latest_items(attributes)
    users = pd.DataFrame({"user_id": pd.Series(np.sort(events["user_id"].unique()), dtype=object)})
    users["signup_time"] = pd.Series(pd.NaT, index=users.index, dtype="datetime64[ns, UTC]")
    users["age"] = np.nan
    users["gender"] = pd.Series(np.full(len(users), None, dtype=object))
    users["region"] = pd.Series(np.full(len(users), None, dtype=object))
    if blank_lines:
        dropped["blank line"] = blank_lines
    return write_and_verify("rees46", source, out_dir, len(raw), dropped,
                            (events, items, users), started, progress)


def _latest_items(lines: pd.DataFrame) -> pd.DataFrame:
    """One row per product with its latest price, category and brand (non-empty values only)."""
    lines = lines.sort_values("t", kind="stable")
    items = pd.DataFrame({"item_id": pd.Series(np.sort(lines["item_id"].unique()), dtype=object)})
    for column in ("category_id", "brand"):
        present = lines[lines[column].ne("")]
        latest = present.drop_duplicates("item_id", keep="last").set_index("item_id")[column]
        items[column] = items["item_id"].map(latest).astype(object).where(lambda s: s.notna(), None)
    priced = lines[lines["price"].notna()].drop_duplicates("item_id", keep="last").set_index("item_id")
    items["price"] = items["item_id"].map(priced["price"]).astype("float64")
    items["available"] = True
    items["title"] = pd.Series(np.full(len(items), None, dtype=object))
    return items[["item_id", "category_id", "price", "available", "brand", "title"]]
