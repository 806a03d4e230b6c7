"""The users table (optional), validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data.parsing import checked_number, optional_text, parse_time, to_text
from propensity.raw_data.readers import read_table, require_columns
from propensity.raw_data.quarantine import Quarantine
from propensity.raw_data.rejections import Problems, RejectedRows, skipped_as_rejections
from propensity.raw_data.schema import USER_COLUMNS


def load_users(path: Path | None, strict: bool, quarantine: Quarantine) -> tuple[pd.DataFrame, int, list[RejectedRows]]:
    """(users, rows read, rejections); an empty table in the raw schema when there is no users file."""
    if path is None:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in USER_COLUMNS})
        return empty.astype({"signup_time": "datetime64[ns, UTC]", "age": "float64"}), 0, []
    chunk, skipped = read_table(path)
    raw = chunk.frame
    require_columns(raw, path, ("user_id",))
    problems = Problems(path, len(raw), lines=chunk.lines)
    user_id = to_text(raw["user_id"])
    problems.flag(user_id.isna(), "user_id", "empty id", raw["user_id"])
    signup = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    if "signup_time" in raw:
        signup, bad, _ = parse_time(raw["signup_time"])
        problems.flag(bad, "signup_time", "unparsable time", raw["signup_time"])
    age = pd.Series(np.nan, index=raw.index)
    if "age" in raw:
        age, _ = checked_number(raw, "age", problems)
    duplicate = user_id.duplicated(keep="first") & user_id.notna() & ~problems.mask
    problems.flag(duplicate, "user_id", "duplicate user_id (first kept)", raw["user_id"])
    if strict:
        problems.raise_first()
    found = problems.found + skipped_as_rejections(path, skipped, strict)
    quarantine.add(problems.quarantined("users", raw))
    quarantine.add_skipped("users", path.name, skipped)
    quarantine.note_columns("users", list(raw.columns))
    users = pd.DataFrame({
        "user_id": user_id, "signup_time": signup, "age": age,
        "gender": optional_text(raw, "gender"), "region": optional_text(raw, "region"),
    })[~problems.mask].reset_index(drop=True)
    return users, len(raw) + len(skipped.bad), found
