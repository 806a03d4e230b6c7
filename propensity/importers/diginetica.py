"""Import DIGINETICA (CIKM Cup 2016) item views and purchases as view and purchase events."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.importers import ImportSummary, write_and_verify
from propensity.importers.source import read_source
from propensity.raw_data.readers import require_columns

# A folder: views, purchases and categories are three files.
DEFAULT_SOURCE = Path(__file__).resolve().parents[2].parent / "shared/data/diginetica_cikm2016"

_VIEW_FILES = ("train-item-views.csv", "train-item-views.csv.gz",
               "sample_train-item-views.csv", "sample_train-item-views.csv.gz")
# The SR-GNN sample uses snake_case headers; the challenge file uses camelCase.
_VIEW_COLUMNS = {"session_id": "sessionId", "user_id": "userId", "item_id": "itemId"}
_DAY = pd.Timedelta(days=1)
_LINE_COLUMNS = ("sessionId", "userId", "itemId", "timeframe", "eventdate")


def import_diginetica(
    source: Path = DEFAULT_SOURCE, out_dir: Path = Path("data/raw/diginetica"),
    progress: Callable[[str], object] = print,
) -> ImportSummary:
    """Convert the DIGINETICA views, purchases and categories in folder `source` to raw Parquet."""
    started = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    views_path = next((source / n for n in _VIEW_FILES if (source / n).is_file()), None)
    if views_path is None:
        raise FileNotFoundError(f"{source}: no item-views file (looked for {', '.join(_VIEW_FILES)})")
    progress(f"diginetica: reading {views_path.name}, train-purchases and product-categories in {source}")
    views = _read(views_path, rename=_VIEW_COLUMNS)
    purchases = _read(_first(source, "train-purchases"))
    categories = _read(_first(source, "product-categories"), ("itemId", "categoryId"))
    progress(f"diginetica: {len(views)} views, {len(purchases)} purchase lines, {len(categories)} categorised items")

    frames = []
    for kind, frame, path in (("view", views, views_path), ("purchase", purchases, None)):
        name = path.name if path else "train-purchases"
        frames.append(pd.DataFrame({
            "session_id": frame["sessionId"].str.strip(), "user": frame["userId"].str.strip(),
            "item_id": frame["itemId"].str.strip(), "event_type": kind,
            "date": pd.to_datetime(frame["eventdate"], format="%Y-%m-%d", utc=True),
            "offset": pd.to_timedelta(pd.to_numeric(frame["timeframe"]), unit="ms"),
            "event_id": name + ":" + pd.Series(np.arange(len(frame)) + 2).astype(str),
        }))
    lines = pd.concat(frames, ignore_index=True)

    # timeframe is ms since the session's first event and eventdate is the event's own day, so
    # the session start S satisfies date <= S + timeframe < date + 1 day for every event. The
    # latest lower bound is a start consistent with all of them (it exists for every session).
    bound = lines["date"] - lines["offset"]
    start = bound.groupby(lines["session_id"]).transform("max")
    lines["event_time"] = start + lines["offset"]

    # A session with a user id on any line belongs to that user; the rest are anonymous.
    registered = lines["user"].where(lines["user"].ne("NA") & lines["user"].ne(""))
    session_user = registered.groupby(lines["session_id"]).transform("first")
    lines["user_id"] = session_user.fillna("anon-session-" + lines["session_id"])

    events = pd.DataFrame({
        "event_time": lines["event_time"], "user_id": lines["user_id"].astype(object),
        "item_id": lines["item_id"], "event_type": lines["event_type"], "event_id": lines["event_id"],
        "session_id": lines["session_id"], "price": np.nan, "quantity": 1.0,
    })
    category = categories.assign(itemId=categories["itemId"].str.strip()).drop_duplicates("itemId")
    category = category.set_index("itemId")["categoryId"].str.strip()
    items = pd.DataFrame({"item_id": pd.Series(np.sort(events["item_id"].unique()), dtype=object)})
    items["category_id"] = items["item_id"].map(category).astype(object).where(lambda s: s.notna(), None)
    items["price"] = np.nan  # products.csv (prices) is not available here
    items["available"] = True
    items["brand"] = pd.Series(np.full(len(items), None, dtype=object))
    items["title"] = pd.Series(np.full(len(items), None, dtype=object))
    users = pd.DataFrame({"user_id": pd.Series(np.sort(events["user_id"].unique()), dtype=object)})
    users["signup_time"] = pd.Series(pd.NaT, index=users.index, dtype="datetime64[ns, UTC]")
    users["age"] = np.nan
    for column in ("gender", "region"):
        users[column] = pd.Series(np.full(len(users), None, dtype=object))
    dropped: dict[str, int] = {}  # nothing is dropped; anonymous sessions get their own user
    return write_and_verify("diginetica", source, out_dir, len(lines), dropped,
                            (events, items, users), started, progress)


def _first(folder: Path, stem: str) -> Path:
    for suffix in (".csv", ".csv.gz"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"{folder}: missing {stem}.csv or {stem}.csv.gz")


def _read(path: Path, columns: tuple[str, ...] = _LINE_COLUMNS, rename: dict[str, str] | None = None) -> pd.DataFrame:
    # Everything as text: "NA" user ids stay a marker instead of turning the column into floats.
    # A malformed file (empty, truncated, broken quote, stray field) is an error naming file and line.
    frame = read_source(path, (), sep=";")[0].frame.rename(columns=rename or {})
    require_columns(frame, path, columns)
    return frame
