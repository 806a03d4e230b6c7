"""The items table (optional): validated attributes, plus every item the events mention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data.parsing import checked_number, optional_text, parse_bool, to_text
from propensity.raw_data.readers import read_table, require_columns
from propensity.raw_data.quarantine import Quarantine
from propensity.raw_data.rejections import Problems, RejectedRows, skipped_as_rejections
from propensity.raw_data.schema import ITEM_COLUMNS


def load_items(
    path: Path | None, event_items: pd.Series, strict: bool, quarantine: Quarantine
) -> tuple[pd.DataFrame, int, list[RejectedRows], int]:
    """(items, rows read, rejections, items added from events); items seen only in events get no attributes."""
    found: list[RejectedRows] = []
    n = 0
    items = pd.DataFrame({c: pd.Series(dtype=object) for c in ITEM_COLUMNS})
    if path is not None:
        chunk, skipped = read_table(path)
        raw = chunk.frame
        require_columns(raw, path, ("item_id",))
        n = len(raw)
        problems = Problems(path, n, lines=chunk.lines)
        item_id = to_text(raw["item_id"])
        problems.flag(item_id.isna(), "item_id", "empty id", raw["item_id"])
        price = pd.Series(np.nan, index=raw.index)
        if "price" in raw:
            price, _ = checked_number(raw, "price", problems)
        available = pd.Series(True, index=raw.index)
        if "available" in raw:
            flags, bad, missing = parse_bool(raw["available"])
            problems.flag(bad, "available", "not a boolean", raw["available"])
            available = flags.where(~missing, True)
        duplicate = item_id.duplicated(keep="first") & item_id.notna() & ~problems.mask
        problems.flag(duplicate, "item_id", "duplicate item_id (first kept)", raw["item_id"])
        if strict:
            problems.raise_first()
        items = pd.DataFrame({
            "item_id": item_id, "category_id": optional_text(raw, "category_id"), "price": price,
            "available": available.astype(bool), "brand": optional_text(raw, "brand"),
            "title": optional_text(raw, "title"),
        })[~problems.mask]
        found = problems.found + skipped_as_rejections(path, skipped, strict)
        n += len(skipped.bad)
        quarantine.add(problems.quarantined("items", raw))
        quarantine.add_skipped("items", path.name, skipped)
        quarantine.note_columns("items", list(raw.columns))
    missing_ids = pd.Index(event_items.unique()).difference(pd.Index(items["item_id"]))
    added = pd.DataFrame({
        "item_id": pd.Series(missing_ids, dtype=object), "category_id": None, "price": np.nan,
        "available": True, "brand": None, "title": None,
    })
    items = pd.concat([items, added], ignore_index=True) if len(items) else added
    items = items.astype({"price": "float64", "available": bool}).reset_index(drop=True)
    return items, n, found, len(added)
