"""Tests for loading and validating the raw event log."""

from pathlib import Path

import pandas as pd
import pytest

from propensity.raw_data import (
    EVENT_TYPES,
    RawDataError,
    load_raw_dataset,
    write_raw_dataset,
)
from propensity.raw_data import events as raw_events

HEADER = "event_time,user_id,item_id,event_type,event_id,session_id,price,quantity\n"
ROWS = [
    "2024-01-02T03:04:05Z,00123,007,view,e1,s1,,\n",
    "2024-01-02T03:05:00+00:00,00123,007,add_to_cart,e2,s1,9.5,2\n",
    "1704164760000,00123,007,purchase,e3,s1,9.5,2\n",  # 2024-01-02T03:06:00Z
    "2024-01-03 10:00:00,42,008,view,e4,,,\n",
]


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def _events_csv(directory: Path, rows: list[str]) -> Path:
    return _write(directory, "events.csv", HEADER + "".join(rows))


def _good_rows(n: int) -> list[str]:
    return [f"2024-01-02T03:04:05Z,u{i},i{i},view,g{i},,,\n" for i in range(n)]


def test_csv_loads_into_the_raw_schema(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS)
    data = load_raw_dataset(tmp_path)
    events = data.events
    assert list(events.columns) == [
        "event_time", "user_id", "item_id", "event_type", "event_id", "session_id", "price", "quantity",
    ]
    assert str(events["event_time"].dtype) == "datetime64[ns, UTC]"
    assert events["event_id"].tolist() == ["e1", "e2", "e3", "e4"]
    assert events["session_id"].tolist() == ["s1", "s1", "s1", None]
    assert events["quantity"].tolist() == [1.0, 2.0, 2.0, 1.0]
    assert events["price"].isna().tolist() == [True, False, False, True]
    assert data.as_of == pd.Timestamp("2024-01-03T10:00:00Z")
    assert data.event_types_present == {"view", "add_to_cart", "purchase"}


def test_parquet_round_trip_keeps_every_value(tmp_path: Path) -> None:
    _events_csv(tmp_path / "csv", ROWS)
    _write(tmp_path / "csv", "items.csv", "item_id,category_id,available\n007,0001,false\n")
    _write(tmp_path / "csv", "users.csv", "user_id,signup_time,age,region\n00123,2023-05-01T00:00:00Z,31,UK\n")
    original = load_raw_dataset(tmp_path / "csv")
    write_raw_dataset(original, tmp_path / "parquet")
    copy = load_raw_dataset(tmp_path / "parquet")
    assert copy.report.files == {"events": "events.parquet", "items": "items.parquet", "users": "users.parquet"}
    pd.testing.assert_frame_equal(copy.events, original.events)
    pd.testing.assert_frame_equal(copy.items, original.items)
    pd.testing.assert_frame_equal(copy.users, original.users)


def test_epoch_ms_and_iso_parse_to_the_same_instant(tmp_path: Path) -> None:
    _events_csv(tmp_path, [
        "2024-01-02T03:04:05Z,u,i,view,a,,,\n",
        "1704164645000,u,i,view,b,,,\n",
        "2024-01-02T04:04:05+01:00,u,i,view,c,,,\n",
        "2024-01-02T03:04:05,u,i,view,d,,,\n",
    ])
    times = load_raw_dataset(tmp_path).events["event_time"]
    assert set(times) == {pd.Timestamp("2024-01-02T03:04:05Z")}


def test_parquet_integer_ids_and_epoch_times_are_converted(tmp_path: Path) -> None:
    pd.DataFrame({
        "event_time": [1704164645000], "user_id": [123], "item_id": [7], "event_type": ["purchase"],
    }).to_parquet(tmp_path / "events.parquet")
    events = load_raw_dataset(tmp_path).events
    assert events.loc[0, "user_id"] == "123" and events.loc[0, "item_id"] == "7"
    assert events.loc[0, "event_time"] == pd.Timestamp("2024-01-02T03:04:05Z")


def test_ids_stay_strings_with_leading_zeros(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS)
    data = load_raw_dataset(tmp_path)
    assert data.events["user_id"].iloc[0] == "00123"
    assert data.events["item_id"].iloc[0] == "007"
    assert data.events["user_id"].dtype == object


def test_missing_column_error_names_file_and_column(tmp_path: Path) -> None:
    _write(tmp_path, "events.csv", "event_time,user_id,item_id\n2024-01-01,u,i\n")
    with pytest.raises(RawDataError, match=r"events\.csv: missing required column 'event_type'"):
        load_raw_dataset(tmp_path)


def test_missing_events_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RawDataError, match="events"):
        load_raw_dataset(tmp_path)


def test_unknown_event_type_is_rejected_with_line_and_value(tmp_path: Path) -> None:
    rows = _good_rows(40) + ["2024-01-04T00:00:00Z,u,i,click,bad1,,,\n"]
    _events_csv(tmp_path, rows)
    data = load_raw_dataset(tmp_path, max_rejected_fraction=0.1)
    [rejected] = data.report.rejected
    assert (rejected.file, rejected.column, rejected.reason, rejected.count) == (
        "events.csv", "event_type", "unknown event type", 1,
    )
    assert rejected.examples == [(42, "click")]  # 40 good rows after the header on line 1
    assert "events.csv line 42 column event_type: unknown event type 'click'" in data.report.summary()
    assert len(data.events) == 40
    with pytest.raises(RawDataError, match=r"events\.csv line 42 column event_type: .*'click'"):
        load_raw_dataset(tmp_path, strict=True)


def test_unparsable_time_is_rejected_with_line_and_value(tmp_path: Path) -> None:
    _events_csv(tmp_path, _good_rows(40) + ["yesterday,u,i,view,bad1,,,\n"])
    data = load_raw_dataset(tmp_path, max_rejected_fraction=0.1)
    [rejected] = data.report.rejected
    assert (rejected.column, rejected.reason, rejected.examples) == (
        "event_time", "unparsable time", [(42, "yesterday")],
    )
    with pytest.raises(RawDataError, match=r"events\.csv line 42 column event_time: unparsable time 'yesterday'"):
        load_raw_dataset(tmp_path, strict=True)


def test_parquet_problems_are_reported_by_row(tmp_path: Path) -> None:
    pd.DataFrame({
        "event_time": ["2024-01-01T00:00:00Z"] * 3, "user_id": ["u", "", "u"],
        "item_id": ["i"] * 3, "event_type": ["view"] * 3,
    }).to_parquet(tmp_path / "events.parquet")
    with pytest.raises(RawDataError, match=r"events\.parquet row 2 column user_id: empty id ''"):
        load_raw_dataset(tmp_path, strict=True)


def test_negative_price_and_bad_quantity_are_rejected(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS + ["2024-01-04T00:00:00Z,u,i,view,x,,-1,\n", "2024-01-04T00:00:00Z,u,i,view,y,,,two\n"])
    data = load_raw_dataset(tmp_path, max_rejected_fraction=0.5)
    reasons = {(r.column, r.reason): r.examples for r in data.report.rejected}
    assert reasons == {("price", "negative"): [(6, "-1")], ("quantity", "not a number"): [(7, "two")]}


def test_rejected_fraction_above_threshold_raises(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS + ["2024-01-04T00:00:00Z,u,i,click,x,,,\n"])  # 1 of 5 = 20 %
    with pytest.raises(RawDataError, match=r"1 of 5 event rows rejected"):
        load_raw_dataset(tmp_path)
    assert len(load_raw_dataset(tmp_path, max_rejected_fraction=0.25).events) == 4


def test_purchase_only_shop_without_categories_loads(tmp_path: Path) -> None:
    _write(tmp_path, "events.csv", "event_time,user_id,item_id,event_type\n2024-01-01,u1,i1,purchase\n2024-01-02,u2,i2,purchase\n")
    _write(tmp_path, "items.csv", "item_id,title\ni1,Mug\ni2,Cup\n")
    data = load_raw_dataset(tmp_path)
    assert data.event_types_present == {"purchase"}
    assert data.items["category_id"].isna().all()
    assert data.items["title"].tolist() == ["Mug", "Cup"]
    assert set(EVENT_TYPES) >= data.event_types_present


def test_items_missing_from_items_file_are_added(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS)  # items 007 and 008
    _write(tmp_path, "items.csv", "item_id,category_id,price\n007,c1,3.5\n999,c2,1\n")
    data = load_raw_dataset(tmp_path)
    items = data.items.set_index("item_id")
    assert sorted(items.index) == ["007", "008", "999"]
    assert items.loc["008", "category_id"] is None and pd.isna(items.loc["008", "price"])
    assert bool(items.loc["008", "available"]) is True
    assert data.report.items_added_from_events == 1
    assert "1 item_ids seen only in events" in data.report.summary()


def test_without_items_file_items_come_from_events(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS)
    data = load_raw_dataset(tmp_path)
    assert sorted(data.items["item_id"]) == ["007", "008"]
    assert list(data.users.columns) == ["user_id", "signup_time", "age", "gender", "region"]
    assert data.users.empty


def test_duplicate_event_ids_keep_first_and_are_counted(tmp_path: Path) -> None:
    _events_csv(tmp_path, ROWS + ["2024-01-05T00:00:00Z,other,007,view,e1,,,\n"])
    data = load_raw_dataset(tmp_path)
    assert data.report.duplicates_dropped == 1
    assert data.events.set_index("event_id").loc["e1", "user_id"] == "00123"
    assert len(data.events) == 4


def test_generated_event_ids_are_deterministic_and_unique(tmp_path: Path) -> None:
    _write(tmp_path, "events.csv", "event_time,user_id,item_id,event_type\n2024-01-01,u,i,view\n2024-01-01,u,i,view\n")
    first = load_raw_dataset(tmp_path).events["event_id"].tolist()
    assert first == load_raw_dataset(tmp_path).events["event_id"].tolist()
    assert len(set(first)) == 2


def test_events_are_sorted_by_time_stably(tmp_path: Path) -> None:
    _events_csv(tmp_path, [
        "2024-01-02T00:00:00Z,u,i,view,late,,,\n",
        "2024-01-01T00:00:00Z,u,i,view,tie1,,,\n",
        "2024-01-01T00:00:00Z,u,i,view,tie2,,,\n",
    ])
    assert load_raw_dataset(tmp_path).events["event_id"].tolist() == ["tie1", "tie2", "late"]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_chunked_validation_numbers_rows_across_chunks_and_merges_rejections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    rows = _good_rows(5) + ["2024-01-04T00:00:00Z,u,i,click,x1,,,\n"] + _good_rows(2) + ["2024-01-04T00:00:00Z,u,i,click,x2,,,\n"]
    _events_csv(tmp_path / "csv", rows)
    if suffix == "parquet":  # the same text columns, as Parquet
        (tmp_path / "parquet").mkdir()
        pd.read_csv(tmp_path / "csv" / "events.csv", dtype=str, keep_default_na=False).to_parquet(tmp_path / "parquet" / "events.parquet", index=False)
    whole = load_raw_dataset(tmp_path / suffix, max_rejected_fraction=0.5)
    monkeypatch.setattr(raw_events, "CHUNK_ROWS", 3)  # the bad rows fall in the second and third chunks
    chunked = load_raw_dataset(tmp_path / suffix, max_rejected_fraction=0.5)
    pd.testing.assert_frame_equal(chunked.events, whole.events)
    first = 2 if suffix == "csv" else 1  # CSV lines count the header; Parquet rows start at 1
    assert [(r.reason, r.count, r.examples) for r in chunked.report.rejected] == [
        ("unknown event type", 2, [(5 + first, "click"), (8 + first, "click")])
    ]
    assert chunked.report.summary() == whole.report.summary()


def test_duplicates_in_different_chunks_keep_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_events, "CHUNK_ROWS", 2)
    _events_csv(tmp_path, ROWS + ["2024-01-05T00:00:00Z,other,007,view,e1,,,\n"])
    data = load_raw_dataset(tmp_path)
    assert data.report.duplicates_dropped == 1
    assert data.events.set_index("event_id").loc["e1", "user_id"] == "00123"
