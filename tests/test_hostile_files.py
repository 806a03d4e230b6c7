"""Hostile data files through the real prepare stage and importers (docs/reliability/data_files.md).

Every file is real and on disk; prepare is the real one (its Python entry point, or the CLI in a
subprocess). Each hostile input is either accepted by a documented rule or refused with a
RawDataError naming file, line (CSV) or row (Parquet) and column; every row not loaded is in the
quarantine (prepared/quarantine/) with its reason, and summary.json counts them.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.importers.diginetica import import_diginetica
from propensity.importers.rees46 import import_rees46
from propensity.importers.uci_online_retail import import_uci_online_retail
from propensity.raw_data import RawDataError
from propensity.raw_data import events as raw_events
from training.prepare import prepare

HEADER = "event_time,user_id,item_id,event_type,event_id\n"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int, start: int = 0) -> list[str]:
    return [f"2024-01-02T03:04:05Z,u{i},i{i % 7},view,e{i}\n" for i in range(start, start + n)]


def _source(tmp_path: Path, name: str, content: str | bytes) -> Path:
    source = tmp_path / "raw"
    source.mkdir(exist_ok=True)
    (source / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return source


def _prepare(source: Path, tmp_path: Path, **kwargs) -> tuple[Path, str]:
    """Run prepare; (prepared directory, what it printed)."""
    printed: list[str] = []
    prepare(source, tmp_path / "prepared", progress=printed.append, **kwargs)
    return tmp_path / "prepared", "\n".join(printed)


def _quarantined(prepared: Path) -> pd.DataFrame:
    return pd.read_parquet(prepared / "quarantine" / "rejected.parquet")


def _summary(prepared: Path) -> dict:
    return json.loads((prepared / "quarantine" / "summary.json").read_text())


def _events(prepared: Path) -> pd.DataFrame:
    return pd.read_parquet(prepared / "events.parquet")


def _parquet(tmp_path: Path, table: pa.Table, **kwargs) -> Path:
    source = tmp_path / "raw"
    source.mkdir(exist_ok=True)
    pq.write_table(table, source / "events.parquet", **kwargs)
    return source


def _table(n: int, **columns) -> pa.Table:
    base = {
        "event_time": pa.array([pd.Timestamp("2024-01-02T00:00:00Z")] * n, pa.timestamp("us", tz="UTC")),
        "user_id": [f"u{i}" for i in range(n)], "item_id": [f"i{i % 7}" for i in range(n)],
        "event_type": ["view"] * n, "event_id": [f"e{i}" for i in range(n)],
    }
    base.update(columns)
    return pa.table(base)


# --- files that cannot be read: refused, nothing loaded ----------------------------------------

@pytest.mark.parametrize("name", ["events.csv", "events.csv.gz", "events.parquet"])
def test_a_zero_byte_events_file_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    source = _source(tmp_path, name, b"")
    with pytest.raises(RawDataError, match=rf"^{name}: empty file \(0 bytes\)"):
        _prepare(source, tmp_path)
    assert not (tmp_path / "prepared" / "events.parquet").exists()


def test_the_cli_reports_a_refused_file_in_one_line_without_a_traceback(tmp_path: Path, capsys) -> None:
    from propensity_cli.main import main

    source = _source(tmp_path, "events.csv", b"")
    assert main(["prepare", "--data", str(source), "--work-dir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[-1].startswith("propensity prepare: events.csv: empty file (0 bytes)")


def test_a_zero_byte_items_file_is_refused_too(tmp_path: Path) -> None:
    source = _source(tmp_path, "events.csv", HEADER + "".join(_rows(3)))
    (source / "items.csv").write_bytes(b"")
    with pytest.raises(RawDataError, match=r"^items\.csv: empty file \(0 bytes\)"):
        _prepare(source, tmp_path)


def test_a_truncated_parquet_file_is_refused(tmp_path: Path) -> None:
    source = _parquet(tmp_path, _table(1000))
    whole = (source / "events.parquet").read_bytes()
    (source / "events.parquet").write_bytes(whole[: len(whole) // 2])  # the footer is gone
    with pytest.raises(RawDataError, match=r"^events\.parquet: not a readable Parquet file \(truncated or corrupt; nothing loaded\)"):
        _prepare(source, tmp_path)


def test_a_corrupt_parquet_data_page_is_refused_naming_rows_and_column(tmp_path: Path) -> None:
    # The footer is intact, so the file opens; one data page in the middle is garbage.
    source = _parquet(tmp_path, _table(100_000), row_group_size=20_000, compression="none")
    data = bytearray((source / "events.parquet").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = bytes(2000)
    (source / "events.parquet").write_bytes(bytes(data))
    with pytest.raises(RawDataError, match=r"^events\.parquet rows (\d+)\.\.(\d+) column (\w+): unreadable \(corrupt data; nothing loaded\)") as error:
        _prepare(source, tmp_path)
    first, last = (int(x) for x in error.value.args[0].split(" rows ")[1].split(" ")[0].split(".."))
    assert last - first + 1 == 20_000 and first > 1  # one whole row group, not the first


def test_a_truncated_gzip_csv_is_refused(tmp_path: Path) -> None:
    source = _source(tmp_path, "events.csv.gz", gzip.compress((HEADER + "".join(_rows(50))).encode())[:-20])
    with pytest.raises(RawDataError, match=r"^events\.csv\.gz after line \d+: unreadable \(EOFError"):
        _prepare(source, tmp_path)


@pytest.mark.parametrize("chunk_rows", [1_000_000, 5])
def test_a_broken_quote_is_refused_naming_line_and_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int) -> None:
    # Line 1 header, lines 2..41 good, line 42 opens a quote in event_type that never closes.
    monkeypatch.setattr(raw_events, "CHUNK_ROWS", chunk_rows)
    text = HEADER + "".join(_rows(40)) + '2024-01-02T00:00:00Z,u1,i1,"view,e-broken\n' + "".join(_rows(10, 100))
    source = _source(tmp_path, "events.csv", text)
    with pytest.raises(RawDataError, match=r"^events\.csv line 42 column event_type: unterminated quote"):
        _prepare(source, tmp_path)


def test_a_broken_quote_after_a_multi_line_value_names_the_physical_line(tmp_path: Path) -> None:
    # A quoted value may hold a line break (RFC 4180); lines are counted as a text editor shows them.
    text = HEADER + '2024-01-02T00:00:00Z,u1,"i1\nstill i1",view,e1\n' + "".join(_rows(3)) + '2024-01-02T00:00:00Z,"u9,i1,view,e9\n'
    source = _source(tmp_path, "events.csv", text)
    with pytest.raises(RawDataError, match=r"^events\.csv line 7 column user_id: unterminated quote"):
        _prepare(source, tmp_path)


# --- columns -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_missing_required_column_is_refused_naming_file_and_column(tmp_path: Path, suffix: str) -> None:
    if suffix == "csv":
        source = _source(tmp_path, "events.csv", "event_time,user_id,event_type\n2024-01-02T00:00:00Z,u1,view\n")
    else:
        source = _parquet(tmp_path, _table(5).drop_columns(["item_id"]))
    with pytest.raises(RawDataError, match=rf"^events\.{suffix}: missing required column 'item_id'"):
        _prepare(source, tmp_path)


def test_extra_columns_are_ignored_and_reported(tmp_path: Path) -> None:
    text = "event_time,user_id,item_id,event_type,colour,page_url\n" + "2024-01-02T00:00:00Z,u1,i1,view,red,/a\n" * 3
    source = _source(tmp_path, "events.csv", text)
    prepared, printed = _prepare(source, tmp_path)
    assert len(_events(prepared)) == 3
    assert "events: columns not in the raw schema ignored: colour, page_url" in printed
    assert _summary(prepared)["ignored_columns"] == {"events": ["colour", "page_url"]}


def test_a_line_with_too_many_fields_is_quarantined_with_its_text(tmp_path: Path) -> None:
    bad = "2024-01-02T00:00:00Z,u1,i1,view,e-bad,surplus"
    text = HEADER + "".join(_rows(40)) + bad + "\n" + "".join(_rows(40, 40))
    source = _source(tmp_path, "events.csv", text)
    prepared, printed = _prepare(source, tmp_path)
    assert len(_events(prepared)) == 80
    assert "events.csv line 42 column (line): wrong number of fields '6 fields, the header has 5'" in printed
    row = _quarantined(prepared).iloc[0]
    assert (row.line_or_row, row.reason, row.raw) == (42, "wrong number of fields", bad)


def test_a_nested_parquet_column_is_refused_naming_the_column(tmp_path: Path) -> None:
    source = _parquet(tmp_path, _table(5, price=pa.array([[1.0]] * 5)))
    with pytest.raises(RawDataError, match=r"^events\.parquet column price: Parquet type list<element: double> cannot hold this column"):
        _prepare(source, tmp_path)


# --- values: wrong types and nulls are quarantined, row by row ---------------------------------

def test_wrong_types_are_converted_or_quarantined_by_row_and_column(tmp_path: Path) -> None:
    n = 100
    table = _table(
        n,
        user_id=pa.array(range(n), pa.int64()),  # integer ids become text
        event_time=pa.array([1704164645000.0] * n),  # epoch milliseconds as float
        price=pa.array(["abc"] + ["1.5"] * (n - 1)),  # numbers as text; one is not a number
    )
    prepared, printed = _prepare(_parquet(tmp_path, table), tmp_path)
    events = _events(prepared)
    assert len(events) == n - 1
    assert set(events["user_id"]) == {str(i) for i in range(1, n)}
    assert set(events["event_time"]) == {pd.Timestamp("2024-01-02T03:04:05Z")}
    assert "events.parquet row 1 column price: not a number 'abc'" in printed
    row = _quarantined(prepared).iloc[0]
    assert (row.file, row.line_or_row, row.column, row.reason, row.value) == ("events.parquet", 1, "price", "not a number", "abc")


def test_nulls_in_required_fields_are_quarantined_with_reasons_and_counted(tmp_path: Path) -> None:
    n = 200
    times = [pd.Timestamp("2024-01-02T00:00:00Z")] * n
    users, items, kinds = [f"u{i}" for i in range(n)], [f"i{i}" for i in range(n)], ["view"] * n
    times[10], users[20], items[30], kinds[40] = None, None, None, None
    table = _table(n, event_time=pa.array(times, pa.timestamp("us", tz="UTC")), user_id=users, item_id=items, event_type=kinds)
    prepared, _ = _prepare(_parquet(tmp_path, table), tmp_path)
    assert len(_events(prepared)) == n - 4
    quarantined = _quarantined(prepared)
    assert sorted(zip(quarantined["line_or_row"], quarantined["column"], quarantined["reason"])) == [
        (11, "event_time", "missing time"), (21, "user_id", "empty id"),
        (31, "item_id", "empty id"), (41, "event_type", "missing event type"),
    ]
    counts = {(r["column"], r["reason"]): r["count"] for r in _summary(prepared)["rejected"]}
    assert counts == {("event_time", "missing time"): 1, ("user_id", "empty id"): 1,
                      ("item_id", "empty id"): 1, ("event_type", "missing event type"): 1}


def test_bytes_that_are_not_utf8_quarantine_their_row(tmp_path: Path) -> None:
    text = (HEADER + "".join(_rows(40))).encode() + "2024-01-02T00:00:00Z,Müller,i1,view,e-latin\n".encode("latin-1")
    prepared, printed = _prepare(_source(tmp_path, "events.csv", text), tmp_path)
    assert len(_events(prepared)) == 40
    row = _quarantined(prepared).iloc[0]
    assert (row.line_or_row, row.column, row.reason) == (42, "user_id", "not UTF-8 text")


def test_blank_lines_are_skipped_counted_and_line_numbers_stay_exact(tmp_path: Path) -> None:
    text = HEADER + "".join(_rows(40)) + "\n\n" + "2024-01-02T00:00:00Z,u1,i1,click,e-click\n"
    prepared, printed = _prepare(_source(tmp_path, "events.csv", text), tmp_path)
    assert "events: 2 blank lines skipped" in printed
    assert "events.csv line 44 column event_type: unknown event type 'click'" in printed
    quarantined = _quarantined(prepared)
    assert sorted(zip(quarantined["line_or_row"], quarantined["reason"])) == [(42, "blank line"), (43, "blank line"), (44, "unknown event type")]


def test_too_many_rejected_rows_refuse_the_file_but_the_quarantine_is_written(tmp_path: Path) -> None:
    text = HEADER + "".join(_rows(10)) + "2024-01-02T00:00:00Z,u1,i1,click,x\n" * 2  # 2 of 12 > 5 %
    source = _source(tmp_path, "events.csv", text)
    with pytest.raises(RawDataError, match=r"^events\.csv: 2 of 12 event rows rejected"):
        _prepare(source, tmp_path)
    prepared = tmp_path / "prepared"
    assert _summary(prepared)["refused"] is True
    assert list(_quarantined(prepared)["line_or_row"]) == [12, 13]


# --- time ---------------------------------------------------------------------------------------

def test_mixed_time_zones_are_all_converted_to_utc(tmp_path: Path) -> None:
    # One instant written five ways: Z, an offset, a negative offset, naive (UTC by rule), epoch ms.
    times = ["2024-01-02T03:04:05Z", "2024-01-02T08:34:05+05:30", "2024-01-01T22:04:05-05:00", "2024-01-02 03:04:05", "1704164645000"]
    text = HEADER + "".join(f"{t},u{i},i1,view,e{i}\n" for i, t in enumerate(times))
    prepared, _ = _prepare(_source(tmp_path, "events.csv", text), tmp_path)
    assert set(_events(prepared)["event_time"]) == {pd.Timestamp("2024-01-02T03:04:05Z")}


def test_times_before_1970_and_in_the_future_are_quarantined(tmp_path: Path) -> None:
    now = pd.Timestamp.now(tz="UTC")
    soon = (now + pd.Timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")  # within the one day of slack: kept
    later = (now + pd.Timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    bad = ["1969-12-31T23:59:59Z", "-1000", "1600-01-01T00:00:00Z", later, "2999-01-01T00:00:00Z", "99999999999999999"]
    text = HEADER + "".join(_rows(200)) + f"{soon},u,i,view,soon\n" + "".join(f"{t},u,i,view,x{i}\n" for i, t in enumerate(bad))
    prepared, printed = _prepare(_source(tmp_path, "events.csv", text), tmp_path)
    events = _events(prepared)
    assert len(events) == 201 and "soon" in set(events["event_id"])
    quarantined = _quarantined(prepared).sort_values("line_or_row")
    assert list(quarantined["reason"]) == ["before 1970-01-01"] * 3 + ["in the future"] * 3
    assert list(quarantined["line_or_row"]) == list(range(203, 209))
    assert "events.csv line 206 column event_time: in the future" in printed


def test_epoch_seconds_given_for_milliseconds_are_quarantined(tmp_path: Path) -> None:
    # 1704164645 is 2024-01-02 in seconds; read as milliseconds it would be 20 January 1970.
    n = 100
    times = pa.array([1704164645000] * (n - 1) + [1704164645], pa.int64())
    prepared, printed = _prepare(_parquet(tmp_path, _table(n, event_time=times)), tmp_path)
    assert len(_events(prepared)) == n - 1
    assert f"events.parquet row {n} column event_time: epoch seconds, not milliseconds '1704164645'" in printed


def test_hostile_rows_in_items_and_users_files_are_quarantined_too(tmp_path: Path) -> None:
    source = _source(tmp_path, "events.csv", HEADER + "".join(_rows(20)))
    (source / "items.csv").write_bytes(b"item_id,price\ni1,2.5\ni2,-1\ni3,1.0,surplus\n\ni4,3\n")
    (source / "users.csv").write_bytes("user_id,age,region\nu1,30,UK\nu2,31,M\xfcnchen\nu1,40,DE\n".encode("latin-1"))
    prepared, printed = _prepare(source, tmp_path)
    quarantined = _quarantined(prepared)
    assert sorted(zip(quarantined["table"], quarantined["line_or_row"], quarantined["column"], quarantined["reason"])) == [
        ("items", 3, "price", "negative"), ("items", 4, "(line)", "wrong number of fields"), ("items", 5, "(line)", "blank line"),
        ("users", 3, "region", "not UTF-8 text"), ("users", 4, "user_id", "duplicate user_id (first kept)"),
    ]
    assert "items.csv line 4 column (line): wrong number of fields '3 fields, the header has 2'" in printed
    items = pd.read_parquet(prepared / "items.parquet")
    assert {"i1", "i4"} <= set(items["item_id"]) and items.set_index("item_id").loc["i2", "price"] != -1


def test_duplicated_events_keep_the_first_and_the_rest_are_quarantined(tmp_path: Path) -> None:
    text = HEADER + "".join(_rows(5)) + "2024-01-03T00:00:00Z,other,i1,purchase,e1\n" + "2024-01-04T00:00:00Z,third,i1,view,e1\n"
    # Identical rows without an event_id are separate events: ids come from the line.
    text += "".join("2024-01-05T00:00:00Z,same,i1,view,\n" for _ in range(2))
    prepared, printed = _prepare(_source(tmp_path, "events.csv", text), tmp_path)
    events = _events(prepared)
    assert events.set_index("event_id").loc["e1", "user_id"] == "u1"
    assert (events["user_id"] == "same").sum() == 2 and len(events) == 7
    assert "events: 2 duplicate event_id rows dropped (first kept)" in printed
    duplicates = pd.read_parquet(prepared / "quarantine" / "duplicates.parquet")
    assert list(zip(duplicates["line_or_row"], duplicates["first_line_or_row"], duplicates["value"])) == [(7, 3, "e1"), (8, 3, "e1")]
    assert _summary(prepared)["duplicates_dropped"] == 2


# --- importers ----------------------------------------------------------------------------------

UCI_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
UCI_LINE = "536365,85123A,HEART,6,2010-12-01 08:26:00,2.55,17850,United Kingdom\n"


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"^online_retail\.csv: empty file \(0 bytes\)"),
    ((UCI_HEADER + UCI_LINE + '536366,22728,"CLOCK,2,2010-12-01 09:00:00,3.75,17850,United Kingdom\n').encode(),
     r"^online_retail\.csv line 3 column Description: unterminated quote"),
    ((UCI_HEADER + UCI_LINE * 2 + "536366,22728,CLOCK,two,2010-12-01 09:00:00,3.75,17850,UK\n").encode(),
     r"^online_retail\.csv line 4 column Quantity: not a number 'two'"),
    ((UCI_HEADER + UCI_LINE + "536366,22728,CLOCK,2,yesterday,3.75,17850,UK\n").encode(),
     r"^online_retail\.csv line 3 column InvoiceDate: unparsable time 'yesterday'"),
    ((UCI_HEADER + UCI_LINE + "536366,22728,CLOCK,2,2010-12-01 09:00:00,3.75,17850,UK,extra\n").encode(),
     r"^online_retail\.csv line 3 column \(line\): wrong number of fields '9 fields, the header has 8'"),
    (UCI_HEADER.replace(",UnitPrice", "").encode(), r"^online_retail\.csv: missing required column 'UnitPrice'"),
])
def test_uci_importer_refuses_hostile_sources_naming_file_line_and_column(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "online_retail.csv").write_bytes(content)
    with pytest.raises(RawDataError, match=message):
        import_uci_online_retail(tmp_path / "online_retail.csv", tmp_path / "out", progress=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_rees46_importer_names_the_line_of_a_bad_price(tmp_path: Path) -> None:
    header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
    good = "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde\n"
    (tmp_path / "sample.csv").write_text(header + good + good.replace("35.79", "1,2"))
    with pytest.raises(RawDataError, match=r"^sample\.csv line 3 column \(line\): wrong number of fields"):
        import_rees46(tmp_path / "sample.csv", tmp_path / "out", progress=lambda _: None)
    (tmp_path / "sample.csv").write_text(header + good + good.replace("35.79", "abc"))
    with pytest.raises(RawDataError, match=r"^sample\.csv line 3 column price: not a number 'abc'"):
        import_rees46(tmp_path / "sample.csv", tmp_path / "out", progress=lambda _: None)


def test_diginetica_importer_refuses_a_missing_column(tmp_path: Path) -> None:
    (tmp_path / "train-item-views.csv").write_text("sessionId;userId;itemId;eventdate\n1;NA;81766;2016-05-09\n")
    (tmp_path / "train-purchases.csv").write_text("sessionId;userId;timeframe;eventdate;ordernumber;itemId\n")
    (tmp_path / "product-categories.csv").write_text("itemId;categoryId\n81766;1\n")
    with pytest.raises(RawDataError, match=r"^train-item-views\.csv: missing required column 'timeframe'"):
        import_diginetica(tmp_path, tmp_path / "out", progress=lambda _: None)


# --- the operator's view, and a log 10x larger than memory allows --------------------------------

# The child process reports its peak address space on exit.
_PEAK = "import atexit, sys; atexit.register(lambda: sys.stderr.write('\\nVMPEAK ' + next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')) + '\\n'))\n"
_CLI = _PEAK + "import sys; from propensity_cli.main import main; sys.exit(main(sys.argv[1:]))"


def _run(code: str, args: list[str], env: dict[str, str], address_space: int | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Run python code in a child (with an address-space limit); (result, peak address space in bytes)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          preexec_fn=limit if address_space else None, timeout=300)
    peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("VMPEAK ")]
    return done, int(peaks[-1]) * 1024 if peaks else 0


def _env(tmp_path: Path, memory_limit_gb: float = 6.0) -> dict[str, str]:
    return dict(
        os.environ, PROPENSITY_FEATURES__MEMORY_LIMIT_GB=str(memory_limit_gb), PROPENSITY_REBASE_TO_NOW="false",
        # Arenas and Arrow's allocator reserve address space they never use; keep that out of the limit.
        MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="131072", ARROW_DEFAULT_MEMORY_POOL="system",
    )


def test_the_cli_prints_the_file_line_and_column_and_exits_non_zero(tmp_path: Path) -> None:
    source = _source(tmp_path, "events.csv", HEADER + "".join(_rows(40)) + '2024-01-02T00:00:00Z,u1,i1,"view,e\n')
    done, _ = _run(_CLI, ["prepare", "--data", str(source), "--work-dir", str(tmp_path / "var")], _env(tmp_path))
    assert done.returncode == 2
    assert "propensity prepare: events.csv line 42 column event_type: unterminated quote" in done.stderr
    assert "Traceback" not in done.stderr


BIG_ROWS = 2_300_000
MEMORY_LIMIT_GB = 0.1  # features.memory_limit_gb: DuckDB's cap (its sort needs about this much)
HEADROOM = 400 * 2**20  # address space allowed above the interpreter's own (imports, DuckDB's threads)


@pytest.mark.slow
def test_a_log_10x_larger_than_memory_allows_is_prepared_in_chunks(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    # Realistic widths: hex user ids, SKU item ids, UUID event ids, hex session ids. Every 2000th
    # row repeats the event_id of the row 1000 before it, so de-duplication runs at scale too.
    duckdb.sql(f"""
        COPY (SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(i) AS event_time,
                     printf('%016x%016x%08d', hash(i % 50000), hash(i % 50000 + 1), i % 50000) AS user_id,
                     printf('sku-%016x%012d', hash(i * 7 % 20000), i * 7 % 20000) AS item_id,
                     ['view', 'add_to_cart', 'purchase'][1 + i % 3] AS event_type,
                     printf('%016x-%016x', hash(j), hash(j + 1)) AS event_id,
                     printf('%016x%016x', hash(i // 10), hash(i // 10 + 3)) AS session_id,
                     (i % 100)::DOUBLE AS price
              FROM (SELECT i, CASE WHEN i % 2000 = 1999 THEN i - 1000 ELSE i END AS j FROM range({BIG_ROWS}) t(i)))
        TO '{raw / "events.parquet"}' (FORMAT PARQUET)
    """)
    # What the file takes in memory loaded whole (as pandas would hold it), measured on a slice.
    sample = pq.ParquetFile(raw / "events.parquet").iter_batches(batch_size=100_000)
    in_memory = next(sample).to_pandas().memory_usage(deep=True).sum() * BIG_ROWS / 100_000
    assert in_memory >= 10 * MEMORY_LIMIT_GB * 1e9

    env = _env(tmp_path, MEMORY_LIMIT_GB)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    duckdb.sql(f"COPY (SELECT * FROM '{raw / 'events.parquet'}' LIMIT 1000) TO '{tiny / 'events.parquet'}' (FORMAT PARQUET)")
    done, baseline = _run(_CLI, ["prepare", "--data", str(tiny), "--work-dir", str(tmp_path / "tiny-var")], env)
    assert done.returncode == 0, done.stderr[-2000:]
    limit = baseline + HEADROOM

    # The control: loading the file whole under the same limit dies, so the limit really binds.
    whole, _ = _run(_PEAK + f"import pandas as pd; pd.read_parquet({str(raw / 'events.parquet')!r})", [], env, limit)
    assert whole.returncode != 0 and any(word in whole.stderr for word in ("MemoryError", "bad_alloc", "malloc of size"))

    started = time.perf_counter()
    done, peak = _run(_CLI, ["prepare", "--data", str(raw), "--work-dir", str(tmp_path / "var")], env, limit)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert peak <= limit
    prepared = tmp_path / "var" / "prepared"
    duplicates = BIG_ROWS // 2000
    assert pq.ParquetFile(prepared / "events.parquet").metadata.num_rows == BIG_ROWS - duplicates
    assert pq.ParquetFile(prepared / "quarantine" / "duplicates.parquet").metadata.num_rows == duplicates
    summary = _summary(prepared)
    assert (summary["rows_read"]["events"], summary["duplicates_dropped"], summary["rejected"]) == (BIG_ROWS, duplicates, [])
    print(f"{BIG_ROWS:,} rows, {in_memory / 2**30:.2f} GiB in memory, prepared in {seconds:.0f} s "
          f"under memory_limit_gb={MEMORY_LIMIT_GB} with {(peak - baseline) / 2**20:.0f} MiB above the baseline")
