"""Replay an events file into a running server through IngestEvents, at a chosen rate (demos and load).

`replay` keeps several client streams open at once, each carrying a bounded number of messages, so a server's
answers (and any refusal) come back while the replay runs, the server can overlap one message's log commit with
another's feature update, and the progress line counts what the server acknowledged, not only what was sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from propensity.v1 import recommendation_service_pb2 as pb

DEFAULT_STREAMS = 4
DEFAULT_MESSAGES_PER_STREAM = 20
PROGRESS_SECONDS = 2.0


def read_events(path: Path) -> pd.DataFrame:
    """An events file (CSV, CSV.gz or Parquet) in the raw schema, ids and times as text."""
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    if pd.api.types.is_datetime64_any_dtype(frame["event_time"]):
        frame["event_time"] = frame["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f%z")
    return frame


def _column(frame: pd.DataFrame, name: str) -> list:
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)


def _number(value: object) -> float | None:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return None
    return float(value)  # type: ignore[arg-type]


def messages(frame: pd.DataFrame, rate: float, batch: int = 50, retime: bool = True, limit: int | None = None) -> Iterator[pb.IngestEventsRequest]:
    """IngestEventsRequest messages paced at `rate` events per second (0: unpaced); retime stamps events with the send time."""
    rows = frame.head(limit) if limit else frame
    # Columns as Python lists once: building an event is then a few list lookups (a pandas row each is ~10x slower).
    ids, times, users, items, kinds = (_column(rows, c) for c in ("event_id", "event_time", "user_id", "item_id", "event_type"))
    sessions, prices, quantities = (_column(rows, c) for c in ("session_id", "price", "quantity"))
    started = time.monotonic()
    sent = 0
    for start in range(0, len(rows), batch):
        now_ms = str(int(time.time() * 1000))
        events = []
        for k in range(start, min(start + batch, len(rows))):
            event = pb.Event(
                event_id=str(ids[k] or f"replay-{start}-{k - start}"), event_time=now_ms if retime else str(times[k]),
                user_id=str(users[k]), item_id=str(items[k]), event_type=str(kinds[k]), session_id=str(sessions[k] or ""),
            )
            price, quantity = _number(prices[k]), _number(quantities[k])
            if price is not None:
                event.price = price
            if quantity is not None:
                event.quantity = quantity
            events.append(event)
        sent += len(events)
        yield pb.IngestEventsRequest(events=events)
        if rate > 0:  # pace: the n-th event leaves no earlier than n / rate seconds after the start
            delay = sent / rate - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)


@dataclass
class ReplayProgress:
    """Running totals of a replay (events), as shown on its progress line."""

    total: int
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    pushes_pending: int = 0
    seconds: float = 0.0
    rejections: list[pb.RejectedEvent] = field(default_factory=list)

    @property
    def acknowledged(self) -> int:
        return self.accepted + self.duplicates + self.rejected

    def line(self, interval_rate: float | None = None) -> str:
        rate = f", {interval_rate:,.0f} events/s now" if interval_rate is not None else ""
        return (f"{self.sent:,}/{self.total:,} sent, {self.acknowledged:,} acknowledged (accepted {self.accepted:,}, duplicates "
                f"{self.duplicates:,}, rejected {self.rejected:,}) in {self.seconds:.1f}s: {self.acknowledged / max(self.seconds, 1e-9):,.0f} "
                f"events/s overall{rate}")


Send = Callable[[Iterator[pb.IngestEventsRequest]], pb.IngestEventsResponse]


def replay(source: Iterator[pb.IngestEventsRequest], total: int, send: Send, streams: int = DEFAULT_STREAMS,
           messages_per_stream: int = DEFAULT_MESSAGES_PER_STREAM, on_progress: Callable[[ReplayProgress, float], None] | None = None,
           every_seconds: float = PROGRESS_SECONDS) -> ReplayProgress:
    """Send `source`'s messages (paced by the source) over `streams` concurrent client streams of at most
    `messages_per_stream` messages each; `send` makes one IngestEvents call (a gRPC error propagates: the replay
    stops, and what the server acknowledged so far is in the error's trailing metadata). on_progress gets the
    totals and the rate since its previous call, every `every_seconds`."""
    progress = ReplayProgress(total)
    lock = threading.Lock()
    exhausted = False
    failure: list[BaseException] = []
    started = time.monotonic()

    def take() -> pb.IngestEventsRequest | None:
        nonlocal exhausted
        with lock:  # one paced source shared by every stream: the pace is the replay's, not each stream's
            if exhausted or failure:
                return None
            message = next(source, None)
            if message is None:
                exhausted = True
                return None
            progress.sent += len(message.events)
            return message

    def one_stream(first: pb.IngestEventsRequest) -> Iterator[pb.IngestEventsRequest]:
        yield first
        for _ in range(messages_per_stream - 1):
            message = take()
            if message is None:
                return
            yield message

    def worker() -> None:
        try:
            while (first := take()) is not None:
                reply = send(one_stream(first))
                with lock:
                    progress.accepted += reply.accepted
                    progress.duplicates += reply.duplicates
                    progress.rejected += reply.rejected
                    progress.pushes_pending += reply.pushes_pending
                    progress.rejections.extend(reply.rejections[: max(0, 100 - len(progress.rejections))])
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            with lock:
                failure.append(error)

    threads = [threading.Thread(target=worker, name=f"replay-{i}", daemon=True) for i in range(max(1, streams))]
    for thread in threads:
        thread.start()
    last_time, last_acknowledged = started, 0
    while alive := [thread for thread in threads if thread.is_alive()]:
        alive[0].join(timeout=0.2)
        now = time.monotonic()
        if on_progress is not None and now - last_time >= every_seconds:
            with lock:
                progress.seconds = now - started
                acknowledged = progress.acknowledged
            on_progress(progress, (acknowledged - last_acknowledged) / (now - last_time))
            last_time, last_acknowledged = now, acknowledged
    progress.seconds = time.monotonic() - started
    if failure:
        raise failure[0]
    return progress
