"""Load and validate the raw event log (events, items, users) from CSV or Parquet files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENT_TYPES: tuple[str, ...] = ("view", "add_to_cart", "purchase", "return")

_SUFFIXES = (".csv", ".csv.gz", ".parquet")
# Events are validated this many rows at a time: memory stays flat however long the log is.
CHUNK_ROWS = 1_000_000
_MAX_EXAMPLES = 5
_TZ_SUFFIX = r"(?:Z|[+-]\d\d:?\d\d)$"
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n"})
# Extra context shown after the offending value in messages, keyed by reason.
_HINTS = {"unknown event type": f"(expected one of {', '.join(EVENT_TYPES)})"}

_EVENT_COLUMNS = ("event_time", "user_id", "item_id", "event_type")
_ITEM_COLUMNS = ("item_id", "category_id", "price", "available", "brand", "title")
_USER_COLUMNS = ("user_id", "signup_time", "age", "gender", "region")

_SCHEMAS = {
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


class RawDataError(ValueError):
    """The raw input is structurally wrong; the message names the file (and column / row)."""


@dataclass(frozen=True)
class RejectedRows:
    """Rows of one file rejected for one reason; examples are (line or row number, value)."""

    file: str
    column: str
    reason: str
    count: int
    examples: list[tuple[int, str]]


@dataclass
class LoadReport:
    """What was read, loaded and rejected per table."""

    files: dict[str, str]
    rows_read: dict[str, int]
    rows_loaded: dict[str, int]
    rejected: list[RejectedRows]
    duplicates_dropped: int
    items_added_from_events: int = 0

    def summary(self) -> str:
        """Return a human-readable multi-line account of the load."""
        lines = []
        for table, file in self.files.items():
            lines.append(
                f"{table}: {file}: {self.rows_read.get(table, 0)} rows read, "
                f"{self.rows_loaded.get(table, 0)} loaded"
            )
        if self.duplicates_dropped:
            lines.append(f"events: {self.duplicates_dropped} duplicate event_id rows dropped (first kept)")
        if self.items_added_from_events:
            lines.append(
                f"items: {self.items_added_from_events} item_ids seen only in events added "
                "without attributes"
            )
        for r in self.rejected:
            lines.append(f"rejected {r.count} rows of {r.file}, column {r.column}: {r.reason}")
            lines.extend(f"  {_describe(r, row, value)}" for row, value in r.examples)
        return "\n".join(lines)


@dataclass
class RawDataset:
    """Validated events, items and users in the raw schema, plus the load report."""

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    report: LoadReport = field(repr=False)

    @property
    def event_types_present(self) -> frozenset[str]:
        """Event types that occur at least once."""
        return frozenset(self.events["event_type"].unique())

    @property
    def as_of(self) -> pd.Timestamp:
        """Time of the last event."""
        return self.events["event_time"].iloc[-1]


def load_raw_dataset(
    directory: Path, *, strict: bool = False, max_rejected_fraction: float = 0.05
) -> RawDataset:
    """Load and validate the raw tables in `directory` into memory (events de-duplicated and sorted by time)."""
    paths = _TablePaths.find(Path(directory))
    validation = EventValidation(paths.events, strict)
    events = pd.concat(list(validation.chunks()))  # at least one chunk, maybe empty
    duplicated = events["event_id"].duplicated(keep="first")
    events = events[~duplicated].sort_values("event_time", kind="stable").reset_index(drop=True)
    validation.check(int(duplicated.sum()), max_rejected_fraction)
    items, users, report = _finish(paths, validation, events["item_id"], len(events), int(duplicated.sum()), strict)
    return RawDataset(events, items, users, report)


@dataclass(frozen=True)
class StagedDataset:
    """Validated events in a Parquet file (source order, duplicates kept, with each row's position), items and users."""

    events_path: Path
    items: pd.DataFrame
    users: pd.DataFrame
    last_event_time: pd.Timestamp | None  # None when no row survived validation
    report: LoadReport = field(repr=False)


def stage_raw_dataset(
    directory: Path,
    staged_events: Path,
    *,
    strict: bool = False,
    max_rejected_fraction: float = 0.05,
    progress: Callable[[str], None] = print,
) -> StagedDataset:
    """Validate the raw tables like load_raw_dataset, but stream the events chunk by chunk into staged_events.

    Only one chunk of events is ever in memory. De-duplication by event_id (first kept, by the
    `source_row` column) and sorting are left to the caller, who does them out of core.
    """
    paths = _TablePaths.find(Path(directory))
    validation = EventValidation(paths.events, strict)
    schema = _SCHEMAS["events"].append(pa.field("source_row", pa.int64()))
    tmp = staged_events.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for events in validation.chunks():
            table = pa.Table.from_pandas(events.assign(source_row=events.index.to_numpy(np.int64)), schema=schema, preserve_index=False)
            writer.write_table(table)
            progress(f"  validated {validation.rows_read:,} event rows")
    tmp.replace(staged_events)
    con = duckdb.connect()
    try:
        rows, unique, last = con.execute(
            f"SELECT count(*), count(DISTINCT event_id), max(event_time) FROM read_parquet('{staged_events}')"
        ).fetchone()
        validation.check(rows - unique, max_rejected_fraction)
        item_ids = con.execute(f"SELECT DISTINCT item_id FROM read_parquet('{staged_events}')").df()["item_id"]
    finally:
        con.close()
    items, users, report = _finish(paths, validation, item_ids, unique, rows - unique, strict)
    return StagedDataset(staged_events, items, users, pd.Timestamp(last) if last is not None else None, report)


@dataclass(frozen=True)
class _TablePaths:
    directory: Path
    events: Path
    items: Path | None
    users: Path | None

    @classmethod
    def find(cls, directory: Path) -> _TablePaths:
        events = _find_table(directory, "events")
        if events is None:
            raise RawDataError(
                f"{directory}: missing required file events ({' / '.join('events' + s for s in _SUFFIXES)})"
            )
        return cls(directory, events, _find_table(directory, "items"), _find_table(directory, "users"))


class EventValidation:
    """Validates an events file chunk by chunk; rows read and rejections accumulate as the chunks go by."""

    def __init__(self, path: Path, strict: bool, chunk_rows: int | None = None) -> None:
        self.path = path
        self.strict = strict
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.rows_read = 0
        self.rows_valid = 0
        self.rejected: list[RejectedRows] = []

    def chunks(self) -> Iterator[pd.DataFrame]:
        """Valid events per chunk, indexed by their 0-based position in the file; duplicates not yet dropped."""
        for raw in _read_chunks(self.path, self.chunk_rows):
            _require(raw, self.path, _EVENT_COLUMNS)
            events, found = _validate_events(raw, self.path, self.rows_read, self.strict)
            self.rows_read += len(raw)
            self.rows_valid += len(events)
            self.rejected = _merge_rejections(self.rejected + found)
            yield events

    def check(self, duplicates: int, max_rejected_fraction: float) -> None:
        """Refuse a file that is mostly not in the raw schema."""
        n_rejected = self.rows_read - self.rows_valid
        if self.rows_read == 0:
            raise RawDataError(f"{self.path.name}: no event rows")
        if n_rejected / self.rows_read > max_rejected_fraction:
            report = LoadReport({"events": self.path.name}, {"events": self.rows_read},
                                {"events": self.rows_valid - duplicates}, self.rejected, duplicates)
            raise RawDataError(
                f"{self.path.name}: {n_rejected} of {self.rows_read} event rows rejected "
                f"({n_rejected / self.rows_read:.1%} > max_rejected_fraction {max_rejected_fraction:.1%}); "
                f"the input is probably not in the raw schema\n{report.summary()}"
            )


def _finish(
    paths: _TablePaths, validation: EventValidation, event_items: pd.Series, n_events: int, duplicates: int, strict: bool
) -> tuple[pd.DataFrame, pd.DataFrame, LoadReport]:
    """Items (with every item the events mention) and users, and the load report."""
    items, read_items, item_rejects, added = _load_items(paths.items, event_items, strict)
    users, read_users, user_rejects = _load_users(paths.users, strict)
    files = {"events": paths.events.name}
    rows_read = {"events": validation.rows_read}
    if paths.items is not None:
        files["items"] = paths.items.name
        rows_read["items"] = read_items
    if paths.users is not None:
        files["users"] = paths.users.name
        rows_read["users"] = read_users
    report = LoadReport(
        files=files,
        rows_read=rows_read,
        rows_loaded={"events": n_events, "items": len(items), "users": len(users)},
        rejected=validation.rejected + item_rejects + user_rejects,
        duplicates_dropped=duplicates,
        items_added_from_events=added,
    )
    return items, users, report


def write_raw_dataset(dataset: RawDataset, directory: Path) -> None:
    """Write events, items and users as Parquet files in the raw schema."""
    for table in _SCHEMAS:
        write_table(table, getattr(dataset, table), directory)


def raw_schema(table: str) -> pa.Schema:
    """The Arrow schema of a raw table ("events", "items" or "users") as written to Parquet."""
    return _SCHEMAS[table]


def write_table(table: str, frame: pd.DataFrame, directory: Path) -> None:
    """Write one raw table as <directory>/<table>.parquet in the raw schema."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A leftover events.csv next to the new events.parquet would make the directory ambiguous.
    clashes = [directory / f"{table}{s}" for s in _SUFFIXES if s != ".parquet"]
    existing = [p.name for p in clashes if p.exists()]
    if existing:
        raise RawDataError(f"{directory}: {', '.join(existing)} would clash with {table}.parquet")
    schema = _SCHEMAS[table]
    pq.write_table(pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False), directory / f"{table}.parquet")


# --- files -----------------------------------------------------------------------------------

def _find_table(directory: Path, table: str) -> Path | None:
    found = [directory / f"{table}{s}" for s in _SUFFIXES if (directory / f"{table}{s}").is_file()]
    if len(found) > 1:
        raise RawDataError(f"{directory}: several files for table {table}: {[p.name for p in found]}")
    return found[0] if found else None


def _read_table(path: Path) -> pd.DataFrame:
    frames = list(_read_chunks(path, None))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _read_chunks(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """The file as DataFrames of at most chunk_rows rows (None: one frame); at least one, maybe empty."""
    if path.name.endswith(".parquet"):
        source = pq.ParquetFile(path)
        batches = source.iter_batches(batch_size=chunk_rows) if chunk_rows else iter([source.read()])
        frames = (batch.to_pandas() for batch in batches)
        empty = source.schema_arrow.empty_table().to_pandas()
    else:
        # Everything as text, nothing turned into NaN: ids keep leading zeros, "NA" stays an id,
        # and every conversion below can point at the line it failed on.
        options = dict(dtype=str, keep_default_na=False, na_filter=False)
        frames = pd.read_csv(path, chunksize=chunk_rows, **options) if chunk_rows else iter([pd.read_csv(path, **options)])
        empty = None
    any_rows = False
    for frame in frames:
        any_rows = True
        frame.columns = [str(c).strip() for c in frame.columns]
        yield frame.reset_index(drop=True)
    if not any_rows:  # a header-only file still has columns to check
        frame = empty if empty is not None else pd.read_csv(path, nrows=0, dtype=str)
        frame.columns = [str(c).strip() for c in frame.columns]
        yield frame


def _require(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for column in columns:
        if column not in frame.columns:
            raise RawDataError(
                f"{path.name}: missing required column '{column}' (found: {', '.join(frame.columns)})"
            )


def _row_numbers(path: Path, n: int, first: int = 0) -> np.ndarray:
    # CSV: the line in the file (header is line 1), assuming no line breaks inside quoted values.
    # Parquet: the 1-based row index. first: rows of the file before this chunk.
    return np.arange(first, first + n) + (1 if path.name.endswith(".parquet") else 2)


def _merge_rejections(found: list[RejectedRows]) -> list[RejectedRows]:
    """One entry per (file, column, reason) across chunks: counts added, the first examples kept."""
    merged: dict[tuple[str, str, str], RejectedRows] = {}
    for r in found:
        key = (r.file, r.column, r.reason)
        if key in merged:
            old = merged[key]
            r = RejectedRows(r.file, r.column, r.reason, old.count + r.count, (old.examples + r.examples)[:_MAX_EXAMPLES])
        merged[key] = r
    return list(merged.values())


def _describe(rejected: RejectedRows, row: int, value: str) -> str:
    where = "row" if rejected.file.endswith(".parquet") else "line"
    hint = _HINTS.get(rejected.reason)
    text = f"{rejected.file} {where} {row} column {rejected.column}: {rejected.reason} {value!r}"
    return f"{text} {hint}" if hint else text


class _Problems:
    """Collects rejected rows of one file, per column and reason."""

    def __init__(self, path: Path, n: int, first: int = 0) -> None:
        self.file = path.name
        self.rows = _row_numbers(path, n, first)
        self.mask = np.zeros(n, dtype=bool)
        self.found: list[RejectedRows] = []

    def flag(self, mask: pd.Series | np.ndarray, column: str, reason: str, raw: pd.Series) -> None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        positions = np.flatnonzero(mask)
        examples = [(int(self.rows[i]), str(raw.iloc[i])) for i in positions[:_MAX_EXAMPLES]]
        self.found.append(RejectedRows(self.file, column, reason, len(positions), examples))
        self.mask |= mask

    def raise_first(self) -> None:
        if self.found:
            first = min(self.found, key=lambda r: r.examples[0][0])
            raise RawDataError(_describe(first, *first.examples[0]))


# --- value parsing ---------------------------------------------------------------------------

def _to_text(values: pd.Series) -> pd.Series:
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


def _matches(text: pd.Series, pattern: str) -> np.ndarray:
    arr = pa.array(text.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    return pc.fill_null(pc.match_substring_regex(arr, pattern), False).to_numpy(zero_copy_only=False)


def _parse_time(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Return (UTC times, unparsable mask, missing mask) for ISO-8601 text or epoch ms."""
    if pd.api.types.is_datetime64_any_dtype(values):
        times = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        missing = times.isna().to_numpy()
        return times.astype("datetime64[ns, UTC]"), np.zeros(len(values), bool), missing
    if pd.api.types.is_numeric_dtype(values):
        times = pd.to_datetime(values, unit="ms", utc=True, errors="coerce")
        missing = values.isna().to_numpy()
        return times.astype("datetime64[ns, UTC]"), (times.isna() & ~missing).to_numpy(), missing
    text = _to_text(values)
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


def _parse_number(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Return (float64 values, unparsable-or-infinite mask, missing mask)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype("float64")
        missing = numbers.isna().to_numpy()
    else:
        text = _to_text(values)
        missing = text.isna().to_numpy()
        numbers = pd.to_numeric(text, errors="coerce").astype("float64")
    bad = ~missing & ~np.isfinite(numbers.to_numpy())
    return numbers, bad, missing


def _parse_bool(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Return (bool values, unparsable mask, missing mask) for booleans or true/false/1/0/yes/no."""
    if pd.api.types.is_bool_dtype(values):
        missing = values.isna().to_numpy()
        return values.fillna(False).astype(bool), np.zeros(len(values), bool), missing
    text = _to_text(values).str.lower()
    missing = text.isna().to_numpy()
    truthy = text.isin(_TRUE).to_numpy()
    bad = ~missing & ~truthy & ~text.isin(_FALSE).to_numpy()
    return pd.Series(truthy, index=values.index), bad, missing


def _checked_number(raw: pd.DataFrame, column: str, problems: _Problems) -> tuple[pd.Series, np.ndarray]:
    numbers, bad, missing = _parse_number(raw[column])
    problems.flag(bad, column, "not a number", raw[column])
    problems.flag(numbers.to_numpy() < 0, column, "negative", raw[column])
    return numbers, missing


# --- tables ----------------------------------------------------------------------------------

def _validate_events(raw: pd.DataFrame, path: Path, first: int, strict: bool) -> tuple[pd.DataFrame, list[RejectedRows]]:
    """Valid rows of one chunk (first: rows of the file before it) in the raw schema, indexed by file position."""
    n = len(raw)
    raw = raw.set_axis(pd.RangeIndex(first, first + n))
    problems = _Problems(path, n, first)

    times, bad_time, missing_time = _parse_time(raw["event_time"])
    problems.flag(missing_time, "event_time", "missing time", raw["event_time"])
    problems.flag(bad_time, "event_time", "unparsable time", raw["event_time"])
    ids = {}
    for column in ("user_id", "item_id"):
        ids[column] = _to_text(raw[column])
        problems.flag(ids[column].isna(), column, "empty id", raw[column])
    event_type = _to_text(raw["event_type"])
    problems.flag(~event_type.isin(EVENT_TYPES), "event_type", "unknown event type", raw["event_type"])

    price = pd.Series(np.nan, index=raw.index)
    quantity = pd.Series(1.0, index=raw.index)
    if "price" in raw:
        price, _ = _checked_number(raw, "price", problems)
    if "quantity" in raw:
        quantity, missing_quantity = _checked_number(raw, "quantity", problems)
        quantity = quantity.where(~missing_quantity, 1.0)
    if strict:
        problems.raise_first()

    event_id = _to_text(raw["event_id"]) if "event_id" in raw else _nones(raw.index)
    # One sha1 per file, not per row: deterministic, unique within the file, and vectorised.
    prefix = hashlib.sha1(path.name.encode()).hexdigest()[:12] + ":"
    generated = prefix + pd.Series(problems.rows, index=raw.index).astype(str)
    event_id = event_id.where(event_id.notna(), generated)
    session_id = _to_text(raw["session_id"]) if "session_id" in raw else _nones(raw.index)

    events = pd.DataFrame({
        "event_time": times, "user_id": ids["user_id"], "item_id": ids["item_id"],
        "event_type": event_type, "event_id": event_id.astype(object),
        "session_id": session_id, "price": price, "quantity": quantity,
    })[~problems.mask]
    return events, problems.found


def _load_items(
    path: Path | None, event_items: pd.Series, strict: bool
) -> tuple[pd.DataFrame, int, list[RejectedRows], int]:
    found: list[RejectedRows] = []
    n = 0
    items = pd.DataFrame({c: pd.Series(dtype=object) for c in _ITEM_COLUMNS})
    if path is not None:
        raw = _read_table(path)
        _require(raw, path, ("item_id",))
        n = len(raw)
        problems = _Problems(path, n)
        item_id = _to_text(raw["item_id"])
        problems.flag(item_id.isna(), "item_id", "empty id", raw["item_id"])
        price = pd.Series(np.nan, index=raw.index)
        if "price" in raw:
            price, _ = _checked_number(raw, "price", problems)
        available = pd.Series(True, index=raw.index)
        if "available" in raw:
            flags, bad, missing = _parse_bool(raw["available"])
            problems.flag(bad, "available", "not a boolean", raw["available"])
            available = flags.where(~missing, True)
        duplicate = item_id.duplicated(keep="first") & item_id.notna() & ~problems.mask
        problems.flag(duplicate, "item_id", "duplicate item_id (first kept)", raw["item_id"])
        if strict:
            problems.raise_first()
        items = pd.DataFrame({
            "item_id": item_id, "category_id": _optional_text(raw, "category_id"), "price": price,
            "available": available.astype(bool), "brand": _optional_text(raw, "brand"),
            "title": _optional_text(raw, "title"),
        })[~problems.mask]
        found = problems.found
    missing_ids = pd.Index(event_items.unique()).difference(pd.Index(items["item_id"]))
    added = pd.DataFrame({
        "item_id": pd.Series(missing_ids, dtype=object), "category_id": None, "price": np.nan,
        "available": True, "brand": None, "title": None,
    })
    items = pd.concat([items, added], ignore_index=True) if len(items) else added
    items = items.astype({"price": "float64", "available": bool}).reset_index(drop=True)
    return items, n, found, len(added)


def _load_users(path: Path | None, strict: bool) -> tuple[pd.DataFrame, int, list[RejectedRows]]:
    if path is None:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in _USER_COLUMNS})
        return empty.astype({"signup_time": "datetime64[ns, UTC]", "age": "float64"}), 0, []
    raw = _read_table(path)
    _require(raw, path, ("user_id",))
    problems = _Problems(path, len(raw))
    user_id = _to_text(raw["user_id"])
    problems.flag(user_id.isna(), "user_id", "empty id", raw["user_id"])
    signup = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    if "signup_time" in raw:
        signup, bad, _ = _parse_time(raw["signup_time"])
        problems.flag(bad, "signup_time", "unparsable time", raw["signup_time"])
    age = pd.Series(np.nan, index=raw.index)
    if "age" in raw:
        age, _ = _checked_number(raw, "age", problems)
    duplicate = user_id.duplicated(keep="first") & user_id.notna() & ~problems.mask
    problems.flag(duplicate, "user_id", "duplicate user_id (first kept)", raw["user_id"])
    if strict:
        problems.raise_first()
    users = pd.DataFrame({
        "user_id": user_id, "signup_time": signup, "age": age,
        "gender": _optional_text(raw, "gender"), "region": _optional_text(raw, "region"),
    })[~problems.mask].reset_index(drop=True)
    return users, len(raw), problems.found


def _optional_text(raw: pd.DataFrame, column: str) -> pd.Series:
    return _to_text(raw[column]) if column in raw else _nones(raw.index)


def _nones(index: pd.Index) -> pd.Series:
    # pd.Series(None, dtype=object) would hold NaN; missing text is None throughout.
    return pd.Series(np.full(len(index), None, dtype=object), index=index)
