"""Replay an events file into a running server through IngestEvents, at a chosen rate (demos and load)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from propensity.v1 import recommendation_service_pb2 as pb


def read_events(path: Path) -> pd.DataFrame:
    """An events file (CSV, CSV.gz or Parquet) in the raw schema, ids and times as text."""
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    if pd.api.types.is_datetime64_any_dtype(frame["event_time"]):
        frame["event_time"] = frame["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f%z")
    return frame


def messages(frame: pd.DataFrame, rate: float, batch: int = 50, retime: bool = True, limit: int | None = None) -> Iterator[pb.IngestEventsRequest]:
    """IngestEventsRequest messages paced at `rate` events per second; retime stamps events with the send time."""
    rows = frame.head(limit) if limit else frame
    started = time.monotonic()
    sent = 0
    for start in range(0, len(rows), batch):
        chunk = rows.iloc[start : start + batch]
        now_ms = str(int(time.time() * 1000))
        events = []
        for row in chunk.itertuples(index=False):
            fields = row._asdict()
            event = pb.Event(
                event_id=str(fields.get("event_id") or f"replay-{start}-{len(events)}"),
                event_time=now_ms if retime else str(fields["event_time"]),
                user_id=str(fields["user_id"]), item_id=str(fields["item_id"]), event_type=str(fields["event_type"]),
                session_id=str(fields.get("session_id") or ""),
            )
            for name in ("price", "quantity"):
                value = fields.get(name)
                if value not in (None, "") and not (isinstance(value, float) and value != value):
                    setattr(event, name, float(value))
            events.append(event)
        sent += len(events)
        yield pb.IngestEventsRequest(events=events)
        if rate > 0:  # pace: the n-th event leaves no earlier than n / rate seconds after the start
            delay = sent / rate - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
