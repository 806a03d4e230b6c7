"""Tests for the prepare stage: validation, the default as-of time and the whole-day rebase."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from propensity.raw_data import RawDataError
from propensity.raw_data import events as raw_events
from training.prepare import MANIFEST, default_as_of, load_prepared, prepare

UTC = timezone.utc


def _quiet(_: str) -> None:
    pass


def _raw(directory: Path, events: list[tuple], users: list[tuple] | None = None) -> Path:
    """Write events (and users) Parquet files in the raw schema; events are (time, user, item, type, price)."""
    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(events, columns=["event_time", "user_id", "item_id", "event_type", "price"])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame.to_parquet(directory / "events.parquet", index=False)
    pd.DataFrame({"item_id": ["i1", "i2"], "category_id": ["c1", "c2"], "price": [10.0, 5.0]}).to_parquet(
        directory / "items.parquet", index=False
    )
    if users is not None:
        people = pd.DataFrame(users, columns=["user_id", "signup_time", "age", "region"])
        people["signup_time"] = pd.to_datetime(people["signup_time"], utc=True)
        people.to_parquet(directory / "users.parquet", index=False)
    return directory


EVENTS = [
    ("2024-03-01T08:00:00Z", "u1", "i1", "view", None),
    ("2024-03-03T17:30:15Z", "u2", "i2", "purchase", 5.0),
    ("2024-03-02T12:00:00Z", "u1", "i2", "add_to_cart", None),
]
USERS = [("u1", "2023-12-24T06:00:00Z", 30.0, "UK"), ("u2", "2024-01-01T00:00:00Z", 41.0, "DE")]


# --- default_as_of ---------------------------------------------------------------------------

def test_default_as_of_is_the_midnight_after_the_last_event() -> None:
    assert default_as_of(pd.Timestamp("2024-03-03T17:30:15Z")) == datetime(2024, 3, 4, tzinfo=UTC)


def test_default_as_of_of_an_event_exactly_at_midnight_is_the_next_midnight() -> None:
    # The as-of time must be strictly after the last event, or that event would be cut off.
    assert default_as_of(pd.Timestamp("2024-03-03T00:00:00Z")) == datetime(2024, 3, 4, tzinfo=UTC)


def test_default_as_of_converts_other_time_zones_to_utc() -> None:
    # 23:30 at UTC-2 is 01:30 UTC on the next day.
    assert default_as_of(pd.Timestamp("2024-03-03T23:30:00-02:00")) == datetime(2024, 3, 5, tzinfo=UTC)


# --- prepare ---------------------------------------------------------------------------------

def test_prepare_without_rebase_keeps_times_and_uses_the_default_as_of(tmp_path: Path) -> None:
    source = _raw(tmp_path / "raw", EVENTS, USERS)
    prepared = prepare(source, tmp_path / "prepared", progress=_quiet)

    assert prepared.as_of == prepared.original_as_of == datetime(2024, 3, 4, tzinfo=UTC)
    assert prepared.shift_days == 0
    assert prepared.event_types == {"view", "add_to_cart", "purchase"}
    assert (prepared.n_events, prepared.n_users, prepared.n_items) == (3, 2, 2)
    events = pd.read_parquet(tmp_path / "prepared" / "events.parquet")
    # Sorted by time on load, unchanged otherwise.
    assert events["event_time"].tolist() == [
        pd.Timestamp("2024-03-01T08:00:00Z"), pd.Timestamp("2024-03-02T12:00:00Z"), pd.Timestamp("2024-03-03T17:30:15Z"),
    ]


def test_rebase_shifts_every_time_by_whole_days(tmp_path: Path) -> None:
    source = _raw(tmp_path / "raw", EVENTS, USERS)
    # rebase_to's time of day is ignored: its midnight is the target.
    prepared = prepare(source, tmp_path / "prepared", rebase_to=datetime(2026, 11, 28, 15, 45, tzinfo=UTC), progress=_quiet)

    shift = (datetime(2026, 11, 28, tzinfo=UTC) - datetime(2024, 3, 4, tzinfo=UTC)).days
    assert prepared.shift_days == shift == 999
    assert prepared.as_of == datetime(2026, 11, 28, tzinfo=UTC)
    assert prepared.original_as_of == datetime(2024, 3, 4, tzinfo=UTC)

    before = pd.read_parquet(source / "events.parquet").sort_values("event_time")
    after = pd.read_parquet(tmp_path / "prepared" / "events.parquet")
    offsets = (after["event_time"].to_numpy() - before["event_time"].to_numpy())
    assert set(offsets) == {pd.Timedelta(days=shift).to_timedelta64()}
    assert after["user_id"].tolist() == before["user_id"].tolist()
    # Times of day survive the shift.
    assert after["event_time"].dt.time.tolist() == before["event_time"].dt.time.tolist()

    users = pd.read_parquet(tmp_path / "prepared" / "users.parquet").set_index("user_id")
    assert users.loc["u1", "signup_time"] == pd.Timestamp("2023-12-24T06:00:00Z") + pd.Timedelta(days=shift)
    assert users.loc["u2", "signup_time"] == pd.Timestamp("2024-01-01T00:00:00Z") + pd.Timedelta(days=shift)
    assert users.loc["u1", "age"] == 30.0


def test_a_log_that_reaches_past_today_is_cut_at_today_not_shifted(tmp_path: Path) -> None:
    """A current log is never moved into the past: the build stops at today's midnight, later events wait."""
    source = _raw(tmp_path / "raw", EVENTS)
    prepared = prepare(source, tmp_path / "prepared", rebase_to=datetime(2024, 2, 26, tzinfo=UTC), progress=_quiet)
    assert prepared.shift_days == 0
    assert prepared.as_of == datetime(2024, 2, 26, tzinfo=UTC)
    events = pd.read_parquet(tmp_path / "prepared" / "events.parquet")
    assert events["event_time"].max() == pd.Timestamp("2024-03-03T17:30:15Z")  # kept, unshifted, for the next build


def test_ingested_events_join_after_the_shift_and_duplicates_are_dropped(tmp_path: Path) -> None:
    source = _raw(tmp_path / "raw", EVENTS)
    ingested = pd.DataFrame({
        "event_time": pd.to_datetime(["2024-03-14T09:00:00Z"], utc=True).astype("datetime64[ns, UTC]"),
        "user_id": ["u1"], "item_id": ["i9"], "event_type": ["add_to_cart"], "event_id": ["stream-1"],
        "session_id": [None], "price": [float("nan")], "quantity": [1.0],
    })
    twice = pd.concat([ingested, ingested], ignore_index=True)
    prepared = prepare(source, tmp_path / "prepared", rebase_to=datetime(2024, 3, 14, tzinfo=UTC), extra_events=twice, progress=_quiet)
    events = pd.read_parquet(tmp_path / "prepared" / "events.parquet")
    assert (events["event_id"] == "stream-1").sum() == 1
    assert events.loc[events["event_id"] == "stream-1", "event_time"].iloc[0] == pd.Timestamp("2024-03-14T09:00:00Z")  # not shifted
    assert prepared.shift_days > 0 and prepared.n_events == len(events)


def test_the_log_is_streamed_in_chunks_with_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ties in time and a repeated event_id in a later chunk: order and "first kept" must not depend on chunking.
    events = pd.DataFrame({
        "event_time": pd.to_datetime(["2024-03-02T00:00:00Z", "2024-03-01T00:00:00Z", "2024-03-01T00:00:00Z", "2024-03-01T00:00:00Z"], utc=True),
        "user_id": ["u1", "u1", "u2", "u3"], "item_id": ["i1", "i2", "i1", "i2"], "event_type": ["view"] * 4,
        "event_id": ["a", "b", "c", "a"],
    })
    source = tmp_path / "raw"
    source.mkdir()
    events.to_parquet(source / "events.parquet", index=False)
    whole = prepare(source, tmp_path / "whole", progress=_quiet)
    monkeypatch.setattr(raw_events, "CHUNK_ROWS", 1)
    chunked = prepare(source, tmp_path / "chunked", progress=_quiet)
    expected = pd.read_parquet(tmp_path / "whole" / "events.parquet")
    assert expected["event_id"].tolist() == ["b", "c", "a"] and expected["user_id"].tolist() == ["u1", "u2", "u1"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "chunked" / "events.parquet"), expected)
    assert (whole.n_events, whole.n_users) == (chunked.n_events, chunked.n_users) == (3, 2)
    # The repeated event_id is quarantined (docs/reliability/data_files.md); nothing else is left behind.
    assert sorted(p.name for p in (tmp_path / "chunked").iterdir()) == ["events.parquet", "items.parquet", MANIFEST, "quarantine", "users.parquet"]


def test_manifest_records_the_shift_and_round_trips(tmp_path: Path) -> None:
    source = _raw(tmp_path / "raw", EVENTS, USERS)
    prepared = prepare(source, tmp_path / "prepared", rebase_to=datetime(2024, 3, 14, tzinfo=UTC), progress=_quiet)

    manifest = json.loads((tmp_path / "prepared" / MANIFEST).read_text())
    assert manifest == {
        "directory": str(tmp_path / "prepared"),
        "source": str(source),
        "as_of": "2024-03-14T00:00:00+00:00",
        "original_as_of": "2024-03-04T00:00:00+00:00",
        "shift_days": 10,
        "event_types": ["add_to_cart", "purchase", "view"],
        "n_events": 3,
        "n_users": 2,
        "n_items": 2,
    }
    assert load_prepared(tmp_path / "prepared") == prepared


def test_explicit_as_of_is_floored_to_its_midnight(tmp_path: Path) -> None:
    source = _raw(tmp_path / "raw", EVENTS)
    prepared = prepare(
        source, tmp_path / "prepared", as_of=datetime(2024, 3, 10, 13, 0, tzinfo=UTC),
        rebase_to=datetime(2024, 3, 20, tzinfo=UTC), progress=_quiet,
    )
    assert prepared.original_as_of == datetime(2024, 3, 10, tzinfo=UTC)
    assert prepared.shift_days == 10
    assert prepared.as_of == datetime(2024, 3, 20, tzinfo=UTC)
    events = pd.read_parquet(tmp_path / "prepared" / "events.parquet")
    assert events["event_time"].min() == pd.Timestamp("2024-03-11T08:00:00Z")


def test_explicit_as_of_in_another_time_zone_uses_the_utc_day(tmp_path: Path) -> None:
    source = _raw(tmp_path / "raw", EVENTS)
    # 2024-03-10 01:00 at UTC+3 is 2024-03-09 22:00 UTC.
    moment = datetime(2024, 3, 10, 1, 0, tzinfo=timezone(timedelta(hours=3)))
    prepared = prepare(source, tmp_path / "prepared", as_of=moment, progress=_quiet)
    assert prepared.as_of == datetime(2024, 3, 9, tzinfo=UTC)


def test_load_prepared_without_manifest_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="propensity prepare"):
        load_prepared(tmp_path)


def test_missing_column_surfaces_the_loader_error_naming_file_and_column(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "events.csv").write_text("event_time,user_id,event_type\n2024-03-01T08:00:00Z,u1,view\n")
    with pytest.raises(RawDataError, match=r"events\.csv: missing required column 'item_id'"):
        prepare(raw, tmp_path / "prepared", progress=_quiet)
    assert not (tmp_path / "prepared" / MANIFEST).exists()


def test_mostly_bad_rows_surface_the_loader_error_naming_file_and_value(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "events.csv").write_text(
        "event_time,user_id,item_id,event_type\n"
        "2024-03-01T08:00:00Z,u1,i1,view\n"
        "2024-03-01T09:00:00Z,u1,i1,click\n"
    )
    with pytest.raises(RawDataError) as caught:
        prepare(raw, tmp_path / "prepared", progress=_quiet)
    message = str(caught.value)
    assert "events.csv" in message
    assert "events.csv line 3 column event_type: unknown event type 'click'" in message


def test_missing_events_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(RawDataError, match="missing required file events"):
        prepare(tmp_path / "raw", tmp_path / "prepared", progress=_quiet)
