"""Validate a raw event log and rebase its clock, so that every later stage sees one consistent time.

Feast materializes relative to the wall clock (`materialize-incremental` starts at now - TTL),
so a log that ended in 2011 would materialize nothing. Instead of bending TTLs, the whole log is
shifted by whole days so that its as-of time becomes today's midnight (UTC). Gaps, times of
day, windows and labels are unchanged; only the calendar moves. The shift
is recorded in the manifest so reports can map dates back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from propensity.raw_data import RawDataset, load_raw_dataset, write_raw_dataset

DAY = timedelta(days=1)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PreparedData:
    """What the prepare stage produced: where, the (rebased) as-of time and the shift applied."""

    directory: Path
    source: str
    as_of: datetime
    original_as_of: datetime
    shift_days: int
    event_types: frozenset[str]
    n_events: int
    n_users: int
    n_items: int

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(
            directory=str(self.directory),
            as_of=self.as_of.isoformat(),
            original_as_of=self.original_as_of.isoformat(),
            event_types=sorted(self.event_types),
        )
        return data


def default_as_of(last_event: pd.Timestamp) -> datetime:
    """The first UTC midnight strictly after the last event, so the last day is complete and included."""
    moment = last_event.to_pydatetime().astimezone(timezone.utc)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + DAY


def floor_day(moment: datetime) -> datetime:
    """Midnight UTC at or before moment."""
    moment = moment.astimezone(timezone.utc)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def prepare(
    source_dir: Path,
    prepared_dir: Path,
    *,
    as_of: datetime | None = None,
    rebase_to: datetime | None = None,
    extra_events: pd.DataFrame | None = None,
    progress: Callable[[str], None] = print,
) -> PreparedData:
    """Load and validate source_dir, shift it so as_of lands on rebase_to's day, write prepared_dir.

    extra_events are events ingested by the server (already on the serving clock, so never shifted);
    they join the log after the shift, duplicates by event_id dropped.
    """
    dataset = load_raw_dataset(source_dir)
    progress(dataset.report.summary())
    if dataset.events.empty:
        raise ValueError(f"{source_dir}: no usable events")
    original_as_of = floor_day(as_of) if as_of is not None else default_as_of(dataset.events["event_time"].max())
    shift_days = 0
    if rebase_to is not None:
        today = floor_day(rebase_to)
        if as_of is None and original_as_of > today:
            original_as_of = today  # a current log: build up to today's midnight, later events wait for the next build
        shift_days = max(0, (today - original_as_of).days)  # only historical logs move
    shifted = _shift(dataset, timedelta(days=shift_days))
    if extra_events is not None and len(extra_events):
        events = pd.concat([shifted.events, extra_events[shifted.events.columns]], ignore_index=True)
        events = events.drop_duplicates("event_id", keep="first").sort_values("event_time", kind="stable").reset_index(drop=True)
        progress(f"added {len(events) - len(shifted.events):,} ingested events from the event log")
        shifted = RawDataset(events=events, items=shifted.items, users=shifted.users, report=shifted.report)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    write_raw_dataset(shifted, prepared_dir)
    prepared = PreparedData(
        directory=prepared_dir,
        source=str(source_dir),
        as_of=original_as_of + timedelta(days=shift_days),
        original_as_of=original_as_of,
        shift_days=shift_days,
        event_types=frozenset(shifted.events["event_type"].unique()),
        n_events=len(shifted.events),
        n_users=shifted.events["user_id"].nunique(),
        n_items=len(dataset.items),
    )
    (prepared_dir / MANIFEST).write_text(json.dumps(prepared.to_json(), indent=2))
    progress(
        f"prepared {prepared.n_events:,} events, {prepared.n_users:,} users, {prepared.n_items:,} items; "
        f"as-of {original_as_of:%Y-%m-%d} shifted by {shift_days:+d} days to {prepared.as_of:%Y-%m-%d}"
    )
    return prepared


def load_prepared(prepared_dir: Path) -> PreparedData:
    """Read the manifest the prepare stage wrote."""
    path = prepared_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no prepared data; run `propensity prepare` first")
    data = json.loads(path.read_text())
    return PreparedData(
        directory=Path(data["directory"]),
        source=data["source"],
        as_of=datetime.fromisoformat(data["as_of"]),
        original_as_of=datetime.fromisoformat(data["original_as_of"]),
        shift_days=int(data["shift_days"]),
        event_types=frozenset(data["event_types"]),
        n_events=int(data["n_events"]),
        n_users=int(data["n_users"]),
        n_items=int(data["n_items"]),
    )


def _shift(dataset: RawDataset, offset: timedelta) -> RawDataset:
    if not offset:
        return dataset
    events = dataset.events.assign(event_time=dataset.events["event_time"] + offset)
    users = dataset.users.copy()
    if "signup_time" in users:
        users["signup_time"] = users["signup_time"] + offset
    return RawDataset(events=events, items=dataset.items, users=users, report=dataset.report)
