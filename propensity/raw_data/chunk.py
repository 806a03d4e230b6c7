"""What a reader yields: rows with their line or row numbers, and the CSV lines that were not rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Chunk:
    """Rows of a file as text (CSV) or typed (Parquet) columns, with the line or row number of each."""

    frame: pd.DataFrame
    lines: np.ndarray  # int64, one per row of frame


@dataclass
class SkippedLines:
    """CSV lines that are not rows: lines with more fields than the header or bytes that are not UTF-8 (rejected), blank lines."""

    bad: list[tuple[int, str, str, str]] = field(default_factory=list)  # (line, column, reason, value)
    blank: list[int] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)  # the text of the first bad lines, for the quarantine
