"""Finding a raw table's file in a directory and reading it (CSV as text, Parquet as typed) whole or in chunks.

Every chunk comes with the line (CSV, header = line 1) or 1-based row (Parquet) of each of its
rows, so that every later message can point at the place in the file. A file that cannot be
read at all (empty, truncated, unterminated quote, not gzip, not UTF-8) raises RawDataError
naming the file and, where the reader knows it, the line or row and column.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.raw_data.errors import RawDataError
from propensity.raw_data.schema import SUFFIXES


@dataclass(frozen=True)
class TablePaths:
    """The files of the events (required), items and users tables in one directory."""

    directory: Path
    events: Path
    items: Path | None
    users: Path | None

    @classmethod
    def find(cls, directory: Path) -> TablePaths:
        events = _find_table(directory, "events")
        if events is None:
            raise RawDataError(
                f"{directory}: missing required file events ({' / '.join('events' + s for s in SUFFIXES)})"
            )
        return cls(directory, events, _find_table(directory, "items"), _find_table(directory, "users"))


def _find_table(directory: Path, table: str) -> Path | None:
    found = [directory / f"{table}{s}" for s in SUFFIXES if (directory / f"{table}{s}").is_file()]
    if len(found) > 1:
        raise RawDataError(f"{directory}: several files for table {table}: {[p.name for p in found]}")
    return found[0] if found else None


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


def is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def read_table(path: Path, sep: str = ",") -> tuple[Chunk, SkippedLines]:
    """The whole file as one chunk, and the lines that were not rows."""
    reader = TableReader(path, sep)
    chunks = list(reader.chunks(None))
    if len(chunks) == 1:
        return chunks[0], reader.skipped
    return Chunk(pd.concat([c.frame for c in chunks], ignore_index=True), np.concatenate([c.lines for c in chunks])), reader.skipped


def read_chunks(path: Path, chunk_rows: int | None) -> Iterator[Chunk]:
    """The file as chunks of at most chunk_rows rows (None: one chunk); at least one, maybe empty."""
    yield from TableReader(path).chunks(chunk_rows)


class TableReader:
    """Reads one file chunk by chunk; after (or during) reading, `skipped` holds the CSV lines that were not rows."""

    def __init__(self, path: Path, sep: str = ",") -> None:
        self.path = path
        self.sep = sep
        self.skipped = SkippedLines()

    def chunks(self, chunk_rows: int | None) -> Iterator[Chunk]:
        if self.path.stat().st_size == 0:
            raise RawDataError(f"{self.path.name}: empty file (0 bytes): no header and no rows")
        source = self._parquet(chunk_rows) if is_parquet(self.path) else self._csv(chunk_rows)
        for chunk in source:
            chunk.frame.columns = [str(c).strip() for c in chunk.frame.columns]
            yield chunk

    # --- Parquet -------------------------------------------------------------------------

    def _parquet(self, chunk_rows: int | None) -> Iterator[Chunk]:
        name = self.path.name
        try:
            source = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as error:
            raise RawDataError(f"{name}: not a readable Parquet file (truncated or corrupt; nothing loaded): {error}") from error
        _check_parquet_types(source.schema_arrow, name)
        done = 0
        batches = source.iter_batches(batch_size=chunk_rows or max(source.metadata.num_rows, 1))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as error:
                raise RawDataError(f"{name} {_corrupt_part(source)}: unreadable (corrupt data; nothing loaded): {error}") from error
            frame = batch.to_pandas()
            yield Chunk(frame.reset_index(drop=True), np.arange(done + 1, done + 1 + len(frame), dtype=np.int64))
            done += len(frame)
        if done == 0:  # no rows: the columns still have to be checked
            yield Chunk(source.schema_arrow.empty_table().to_pandas(), np.zeros(0, np.int64))

    # --- CSV -----------------------------------------------------------------------------

    def _csv(self, chunk_rows: int | None) -> Iterator[Chunk]:
        # Everything as text, nothing turned into NaN: ids keep leading zeros, "NA" stays an id,
        # and every conversion later can point at the line it failed on. Blank lines are kept as
        # rows here (then set aside) so that line numbers stay exact.
        # Bytes that are not UTF-8 become U+FFFD, and the rows holding them are rejected below.
        options = dict(dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False, on_bad_lines="warn",
                       encoding="utf-8", encoding_errors="replace", sep=self.sep)
        lines = _LineCounter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            try:
                frames = pd.read_csv(self.path, chunksize=chunk_rows or None, **options) if chunk_rows else iter([pd.read_csv(self.path, **options)])
                any_rows = False
                for frame in frames:
                    lines.skip_bad_records(_bad_records(caught))
                    caught.clear()
                    any_rows = True
                    yield self._csv_chunk(frame.reset_index(drop=True), lines)
                lines.skip_bad_records(_bad_records(caught))
                lines.resolve_bad()
                if not any_rows:  # a header-only file still has columns to check
                    yield Chunk(pd.read_csv(self.path, nrows=0, dtype=str, sep=self.sep), np.zeros(0, np.int64))
            except pd.errors.EmptyDataError as error:
                raise RawDataError(f"{self.path.name}: no header line (only blank lines?): nothing loaded") from error
            except pd.errors.ParserError as error:
                raise self._parser_error(error, lines) from error
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
                raise RawDataError(
                    f"{self.path.name} after line {lines.last_line}: unreadable ({type(error).__name__}: {error}); "
                    "nothing loaded (a .csv.gz must be one complete gzip stream)"
                ) from error
        self.skipped.bad.extend(lines.bad)
        lines.bad.clear()
        if self.skipped.bad:
            self.skipped.texts = _line_texts(self.path, {line for line, *_ in self.skipped.bad[:MAX_LINE_TEXTS]})

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


def _bad_records(caught: list[warnings.WarningMessage]) -> list[tuple[int, str]]:
    """(record, what) of the lines pandas skipped for having more fields than the header."""
    found = []
    for warning in caught:
        for record, expected, saw in re.findall(r"Skipping line (\d+): expected (\d+) fields, saw (\d+)", str(warning.message)):
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


MAX_LINE_TEXTS = 10_000


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


def _corrupt_part(source: pq.ParquetFile) -> str:
    """`rows a..b column c`: the first row group and column that cannot be decoded (error path only)."""
    first = 1
    for group in range(source.metadata.num_row_groups):
        rows = source.metadata.row_group(group).num_rows
        for column in source.schema_arrow.names:
            try:
                source.read_row_group(group, columns=[column])
            except (pa.ArrowException, OSError):
                return f"rows {first}..{first + rows - 1} column {column}"
        first += rows
    return "rows ?"


# Arrow types a raw column may have in Parquet; anything else (lists, structs, binary, ...) is refused.
def _usable(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _usable(kind.value_type)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_timestamp(kind)
            or pa.types.is_date(kind) or pa.types.is_null(kind) or pa.types.is_decimal(kind))


def _check_parquet_types(schema: pa.Schema, name: str) -> None:
    from propensity.raw_data.schema import KNOWN_COLUMNS

    for column in schema:
        if column.name.strip() in KNOWN_COLUMNS and not _usable(column.type):
            raise RawDataError(
                f"{name} column {column.name}: Parquet type {column.type} cannot hold this column "
                "(expected text, a number, a boolean or a timestamp); nothing loaded"
            )


def require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    """Raise RawDataError naming the file and the first required column it lacks."""
    for column in columns:
        if column not in frame.columns:
            raise RawDataError(
                f"{path.name}: missing required column '{column}' (found: {', '.join(frame.columns)})"
            )
