"""Column values from text or typed files: ids and text, times (ISO-8601 or epoch ms), numbers and booleans.

Each parser returns the values with masks of what could not be parsed and what was missing, so the
caller decides what is a rejected row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from propensity.raw_data.rejections import Problems

_TZ_SUFFIX = r"(?:Z|[+-]\d\d:?\d\d)$"
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n"})


def to_text(values: pd.Series) -> pd.Series:
    """Strings (object dtype) with None for missing; integral numbers keep no '.0'."""
    if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
        values = values.astype("Int64")
    present = values.notna().to_numpy()
    if values.dtype != object:
        values = values.astype(str)
    # Arrow compute instead of pandas .str: the latter loops in Python, per element.
    try:
        arr = pa.array(values.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        arr = pa.array(values.astype(str).to_numpy(dtype=object), type=pa.string())
    arr = pc.utf8_trim_whitespace(arr)
    empty = pc.fill_null(pc.equal(arr, ""), True).to_numpy(zero_copy_only=False)
    text = arr.to_numpy(zero_copy_only=False).astype(object)
    text[~present | empty] = None
    return pd.Series(text, index=values.index, dtype=object)


def optional_text(raw: pd.DataFrame, column: str) -> pd.Series:
    """The column as text, or all None when the file has no such column."""
    return to_text(raw[column]) if column in raw else nones(raw.index)


def nones(index: pd.Index) -> pd.Series:
    """Missing text for every row."""
    # pd.Series(None, dtype=object) would hold NaN; missing text is None throughout.
    return pd.Series(np.full(len(index), None, dtype=object), index=index)


def _matches(text: pd.Series, pattern: str) -> np.ndarray:
    arr = pa.array(text.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    return pc.fill_null(pc.match_substring_regex(arr, pattern), False).to_numpy(zero_copy_only=False)


def parse_time(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Return (UTC times, unparsable mask, missing mask) for ISO-8601 text or epoch ms."""
    if pd.api.types.is_datetime64_any_dtype(values):
        times = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        missing = times.isna().to_numpy()
        # Parquet keeps microseconds (years 1 .. 9999); nanoseconds cover 1677 .. 2262 only.
        out = ((times < pd.Timestamp.min.tz_localize("UTC")) | (times > pd.Timestamp.max.tz_localize("UTC"))).to_numpy()
        if out.any():
            times = times.where(~out)
        return times.astype("datetime64[ns, UTC]"), out, missing
    if pd.api.types.is_bool_dtype(values):  # True is not a time
        missing = values.isna().to_numpy()
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]"), ~missing, missing
    if pd.api.types.is_numeric_dtype(values):
        times = pd.to_datetime(values, unit="ms", utc=True, errors="coerce")
        missing = values.isna().to_numpy()
        return times.astype("datetime64[ns, UTC]"), (times.isna() & ~missing).to_numpy(), missing
    text = to_text(values)
    missing = text.isna().to_numpy()
    times = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    epoch = _matches(text, r"^-?\d+$")
    aware = _matches(text, _TZ_SUFFIX) & ~epoch
    naive = ~missing & ~epoch & ~aware
    if epoch.any():
        millis = pd.to_numeric(text[epoch], errors="coerce")
        times[epoch] = pd.to_datetime(millis, unit="ms", utc=True, errors="coerce")
    # Offsets and naive strings are parsed apart: in one call pandas applies the offset of an
    # earlier string to later naive ones instead of treating them as UTC.
    if aware.any():
        times[aware] = pd.to_datetime(text[aware], utc=True, format="ISO8601", errors="coerce")
    if naive.any():
        parsed = pd.to_datetime(text[naive], format="ISO8601", errors="coerce")
        times[naive] = parsed.dt.tz_localize("UTC")
    return times, (times.isna().to_numpy() & ~missing), missing


def out_of_range(values: pd.Series, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(too early, too late) among the unparsable times: valid-looking times outside what nanoseconds hold (1677 .. 2262).

    ISO text is judged by its year, epoch milliseconds by their sign; anything else stays unparsable.
    """
    early = np.zeros(len(values), dtype=bool)
    late = np.zeros(len(values), dtype=bool)
    if not bad.any():
        return early, late
    if pd.api.types.is_datetime64_any_dtype(values):
        times = values[bad]
        late[bad] = (times > pd.Timestamp.max.tz_localize(times.dt.tz)).to_numpy() if times.dt.tz else (times > pd.Timestamp.max).to_numpy()
        early[bad] = ~late[bad]
        return early, late
    text = to_text(values[bad]) if not pd.api.types.is_numeric_dtype(values) else values[bad].astype(str)
    year = pd.to_numeric(text.str.extract(r"^\s*(\d{4})-\d\d-\d\d", expand=False), errors="coerce")
    epoch = pd.to_numeric(text.where(text.str.fullmatch(r"\s*-?\d+(?:\.0)?\s*").fillna(False)), errors="coerce")
    late[bad] = ((year > 2262) | (epoch > 0)).fillna(False).to_numpy()
    early[bad] = ((year < 1678) | (epoch < 0)).fillna(False).to_numpy()
    return early, late


# Epoch milliseconds below this are before 1973-03-03: almost surely epoch seconds (2024 in seconds
# is 1.7e9, which as milliseconds is 20 January 1970).
_SECONDS_NOT_MILLIS = 100_000_000_000


def epoch_seconds(values: pd.Series, times: pd.Series) -> np.ndarray:
    """Rows whose epoch number, read as milliseconds, lands in 1970 .. 1973-03-03: seconds given for milliseconds."""
    if pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_bool_dtype(values):
        return np.zeros(len(values), dtype=bool)
    if pd.api.types.is_numeric_dtype(values):
        epoch = values.notna().to_numpy()
    else:
        epoch = _matches(to_text(values), r"^\d+$")
    early = (times < pd.Timestamp(_SECONDS_NOT_MILLIS, unit="ms", tz="UTC")).to_numpy() & times.notna().to_numpy()
    return epoch & early & (times >= pd.Timestamp(0, tz="UTC")).to_numpy()


def parse_number(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Return (float64 values, unparsable-or-infinite mask, missing mask)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype("float64")
        missing = numbers.isna().to_numpy()
    else:
        text = to_text(values)
        missing = text.isna().to_numpy()
        numbers = pd.to_numeric(text, errors="coerce").astype("float64")
    bad = ~missing & ~np.isfinite(numbers.to_numpy())
    return numbers, bad, missing


def parse_bool(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Return (bool values, unparsable mask, missing mask) for booleans or true/false/1/0/yes/no."""
    if pd.api.types.is_bool_dtype(values):
        missing = values.isna().to_numpy()
        return values.fillna(False).astype(bool), np.zeros(len(values), bool), missing
    text = to_text(values).str.lower()
    missing = text.isna().to_numpy()
    truthy = text.isin(_TRUE).to_numpy()
    bad = ~missing & ~truthy & ~text.isin(_FALSE).to_numpy()
    return pd.Series(truthy, index=values.index), bad, missing


def checked_number(raw: pd.DataFrame, column: str, problems: Problems) -> tuple[pd.Series, np.ndarray]:
    """(numbers, missing mask) of a column; unparsable and negative values are flagged in problems."""
    numbers, bad, missing = parse_number(raw[column])
    problems.flag(bad, column, "not a number", raw[column])
    problems.flag(numbers.to_numpy() < 0, column, "negative", raw[column])
    return numbers, missing
