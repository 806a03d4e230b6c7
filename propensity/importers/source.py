"""A public dataset's source file, read strictly: any line that is not a clean row is an error naming file, line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data import RawDataError
from propensity.raw_data.readers import Chunk, read_table, require_columns
from propensity.raw_data.rejections import RejectedRows, describe


def read_source(path: Path, columns: tuple[str, ...], sep: str = ",") -> tuple[Chunk, int]:
    """(rows as text with their line numbers, blank lines skipped); RawDataError for anything else malformed.

    The reader refuses empty and truncated files and unterminated quotes; here a line with too
    many fields or bytes that are not UTF-8 is refused too: an importer maps a known format, and
    a malformed line means the file is not that format.
    """
    chunk, skipped = read_table(Path(path), sep)
    require_columns(chunk.frame, Path(path), columns)
    if skipped.bad:
        line, column, reason, value = sorted(skipped.bad)[0]
        raise RawDataError(describe(RejectedRows(Path(path).name, column, reason, 1, []), line, value))
    return chunk, len(skipped.blank)


def numbers(chunk: Chunk, column: str, path: Path, *, empty_ok: bool = False) -> pd.Series:
    """A column as float64; an unparsable value (or an empty one unless empty_ok) is an error naming its line."""
    text = chunk.frame[column].str.strip()
    values = pd.to_numeric(text.where(text.ne(""), np.nan), errors="coerce").astype("float64")
    bad = values.isna() & (text.ne("") | (not empty_ok))
    _refuse(bad, chunk, column, path, "not a number")
    return values


def times(chunk: Chunk, column: str, path: Path, parsed: pd.Series) -> pd.Series:
    """`parsed` (coerced times of the column); a value that did not parse is an error naming its line."""
    _refuse(parsed.isna(), chunk, column, path, "unparsable time")
    return parsed


def _refuse(bad: pd.Series, chunk: Chunk, column: str, path: Path, reason: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise RawDataError(
            f"{Path(path).name} line {chunk.lines[i]} column {column}: {reason} {chunk.frame[column].iloc[i]!r} "
            f"({int(bad.sum())} such rows; nothing imported)"
        )
