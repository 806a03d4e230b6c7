"""CSV files read as text in chunks, with exact physical line numbers, set-aside lines and readable errors.

pandas counts records, not lines: a quoted value may span lines, and a line with too many fields
is skipped with a warning naming its record. The line counter maps one to the other, so that
every message names the line a text editor shows. Blank lines and lines with bytes that are not
UTF-8 are set aside (SkippedLines); an unterminated quote, a truncated gzip stream or a file
without a header raise RawDataError naming the file (and line and column where known).
"""

from __future__ import annotations

import csv
import gzip
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from propensity.raw_data.chunk import Chunk, SkippedLines
from propensity.raw_data.errors import RawDataError

# At most this many set-aside lines get their text copied into the quarantine.
MAX_LINE_TEXTS = 10_000


class CsvReader:
    """Reads one CSV (or .csv.gz) file chunk by chunk; `skipped` fills up as it goes."""

    def __init__(self, path: Path, sep: str, skipped: SkippedLines) -> None:
        self.path = path
        self.sep = sep
        self.skipped = skipped

    def chunks(self, chunk_rows: int | None) -> Iterator[Chunk]:
        """The file as chunks of at most chunk_rows rows (None: one chunk); at least one, maybe empty."""
        lines = _LineCounter()
        frames = self._frames(chunk_rows, lines)
        any_rows = False
        for frame in frames:
            any_rows = True
            yield self._csv_chunk(frame.reset_index(drop=True), lines)
        lines.resolve_bad()
        self.skipped.bad.extend(lines.bad)
        if self.skipped.bad:
            self.skipped.texts = _line_texts(self.path, {line for line, *_ in self.skipped.bad[:MAX_LINE_TEXTS]})
        if not any_rows:  # a header-only file still has columns to check
            yield Chunk(pd.read_csv(self.path, nrows=0, dtype=str, sep=self.sep), np.zeros(0, np.int64))

    def _frames(self, chunk_rows: int | None, lines: _LineCounter) -> Iterator[pd.DataFrame]:
        """pandas' chunks, with its warnings about skipped lines turned into set-aside lines and its errors into RawDataError."""
        # Everything as text, nothing turned into NaN: ids keep leading zeros, "NA" stays an id,
        # and every conversion later can point at the line it failed on. Blank lines are kept as
        # rows (then set aside) so that line numbers stay exact; bytes that are not UTF-8 become
        # U+FFFD and their rows are set aside too.
        options = dict(dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False, on_bad_lines="warn",
                       encoding="utf-8", encoding_errors="replace", sep=self.sep)
        source = None
        while True:
            # Warnings are caught around pandas' own reads only, never across a yield.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                try:
                    if source is None:
                        source = iter(pd.read_csv(self.path, chunksize=chunk_rows, **options)) if chunk_rows else iter([pd.read_csv(self.path, **options)])
                    frame = next(source, None)
                except pd.errors.EmptyDataError as error:
                    raise RawDataError(f"{self.path.name}: no header line (only blank lines?): nothing loaded") from error
                except pd.errors.ParserError as error:
                    raise self._parser_error(error, lines) from error
                except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
                    raise RawDataError(
                        f"{self.path.name} after line {lines.last_line}: unreadable ({type(error).__name__}: {error}); "
                        "nothing loaded (a .csv.gz must be one complete gzip stream)"
                    ) from error
            lines.skip_bad_records(_bad_records(caught))
            for other in caught:
                if not _SKIPPED.search(str(other.message)):
                    warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
            if frame is None:
                return
            yield frame

    def _csv_chunk(self, frame: pd.DataFrame, lines: _LineCounter) -> Chunk:
        numbers = lines.assign(frame)
        blank = _blank_rows(frame)
        undecodable = np.zeros(len(frame), dtype=bool)
        for column in frame.columns:
            values = pa.array(frame[column].to_numpy(dtype=object), type=pa.string(), from_pandas=True)
            hit = pc.fill_null(pc.match_substring(values, "\ufffd"), False).to_numpy(zero_copy_only=False) & ~undecodable
            for i in np.flatnonzero(hit):
                self.skipped.bad.append((int(numbers[i]), str(column), "not UTF-8 text", frame[column].iloc[i]))
            undecodable |= hit
        drop = blank | undecodable
        if drop.any():
            self.skipped.blank.extend(numbers[blank].tolist())
            frame, numbers = frame[~drop].reset_index(drop=True), numbers[~drop]
        self.skipped.bad.extend(lines.bad)
        lines.bad.clear()
        return Chunk(frame, numbers)

    def _parser_error(self, error: Exception, lines: _LineCounter) -> RawDataError:
        message = str(error).strip()
        found = re.search(r"EOF inside string starting at row (\d+)", message)
        if found:
            line, column = _unclosed_quote(self.path, int(found.group(1)) + 1, self.sep)
            where = f"line {line}" + (f" column {column}" if column else "")
            return RawDataError(
                f"{self.path.name} {where}: unterminated quote: a quoted value opens here and never closes, so the "
                "rest of the file cannot be split into rows; nothing loaded (fix or remove the stray '\"')"
            )
        return RawDataError(f"{self.path.name} after line {lines.last_line}: CSV cannot be parsed: {message}; nothing loaded")


class _LineCounter:
    """Maps pandas' records (header = record 1) to physical lines across chunks.

    Records and lines differ where a quoted value holds line breaks, and rows and records differ
    where pandas skipped a line with too many fields (it reports those by record number).
    """

    def __init__(self) -> None:
        self.rows = 0  # rows yielded so far
        self.skipped_records: list[int] = []  # sorted
        self.break_records: list[int] = []  # records holding line breaks, sorted
        self.break_totals: list[int] = []  # cumulative line breaks up to and including that record
        self.bad: list[tuple[int, str, str, str]] = []
        self._pending: list[tuple[int, str]] = []
        self.last_line = 1

    def skip_bad_records(self, found: list[tuple[int, str]]) -> None:
        """Note records pandas skipped; their lines are resolved once the rows around them are counted."""
        for record, what in found:
            self.skipped_records.append(record)
            self._pending.append((record, what))
        self.skipped_records.sort()

    def resolve_bad(self) -> None:
        self.bad.extend((self.line_of_record(record), "(line)", "wrong number of fields", what) for record, what in self._pending)
        self._pending.clear()

    def line_of_record(self, record: int) -> int:
        before = np.searchsorted(self.break_records, record, side="left")
        return record + (self.break_totals[before - 1] if before else 0)

    def assign(self, frame: pd.DataFrame) -> np.ndarray:
        n = len(frame)
        nominal = np.arange(self.rows, self.rows + n, dtype=np.int64) + 2
        skipped = np.asarray(self.skipped_records, dtype=np.int64)
        records = nominal + np.searchsorted(skipped - np.arange(len(skipped)), nominal, side="right")
        breaks = _line_breaks(frame)
        lines = records
        if n:
            # line of each record = its record number + line breaks inside all earlier records
            carried = self.line_of_record(int(records[0])) - int(records[0])
            lines = records + carried + np.concatenate([[0], np.cumsum(breaks)[:-1]])
            for r, total in zip(records[breaks > 0], (carried + np.cumsum(breaks))[breaks > 0]):
                self.break_records.append(int(r))
                self.break_totals.append(int(total))
            self.last_line = int(lines[-1] + breaks[-1])
        self.rows += n
        self.resolve_bad()
        return lines


_SKIPPED = re.compile(r"Skipping line (\d+): expected (\d+) fields, saw (\d+)")


def _bad_records(caught: list[warnings.WarningMessage]) -> list[tuple[int, str]]:
    """(record, what) of the lines pandas skipped for having more fields than the header."""
    found = []
    for warning in caught:
        for record, expected, saw in _SKIPPED.findall(str(warning.message)):
            found.append((int(record), f"{saw} fields, the header has {expected}"))
    return found


def _line_breaks(frame: pd.DataFrame) -> np.ndarray:
    total = np.zeros(len(frame), dtype=np.int64)
    for column in frame.columns:
        values = pa.array(frame[column].to_numpy(dtype=object), type=pa.string(), from_pandas=True)
        total += pc.fill_null(pc.count_substring(values, "\n"), 0).to_numpy(zero_copy_only=False)
    return total


def _blank_rows(frame: pd.DataFrame) -> np.ndarray:
    """Rows with no value at all: blank lines (or lines of bare delimiters)."""
    blank = np.ones(len(frame), dtype=bool)
    for column in frame.columns:
        values = pa.array(frame[column].to_numpy(dtype=object), type=pa.string(), from_pandas=True)
        blank &= pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True).to_numpy(zero_copy_only=False)
    return blank


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="")


def _line_texts(path: Path, wanted: set[int]) -> dict[int, str]:
    """The text of some physical lines (one pass, only when lines were skipped)."""
    found = {}
    last = max(wanted)
    with _open_text(path) as handle:
        for number, text in enumerate(handle, start=1):
            if number in wanted:
                found[number] = text.rstrip("\r\n")
            if number >= last:
                break
    return found


def _unclosed_quote(path: Path, record: int, sep: str) -> tuple[int, str | None]:
    """(physical line, column) where record `record` (header = 1) starts and its unterminated quote opens (error path only)."""
    line, column = record, None
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle, delimiter=sep)
            names = next(reader, [])
            for number in range(2, record + 1):
                line = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    break
                if number == record and 0 < len(fields) <= len(names):
                    column = names[len(fields) - 1].strip()  # the quoted field swallowed the rest of the file
    except (OSError, csv.Error):
        pass
    return line, column
