"""Seeded synthetic generator of a shop's raw event log, catalog and user table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

EVENT_TYPES = ("view", "add_to_cart", "purchase", "return")
_VIEW, _CART, _PURCHASE, _RETURN = range(4)

_UTC_US = pa.timestamp("us", tz="UTC")
EVENTS_SCHEMA = pa.schema([
    ("event_time", _UTC_US), ("user_id", pa.string()), ("item_id", pa.string()),
    ("event_type", pa.string()), ("event_id", pa.string()), ("session_id", pa.string()),
    ("price", pa.float64()), ("quantity", pa.int64()),
])

_DAY = 86_400
_HOUR_WEIGHTS = np.array([3, 2, 1.5, 1, 1, 1.5, 3, 6, 8, 9, 10, 10,
                          11, 10, 9, 9, 10, 11, 13, 15, 16, 14, 10, 6], dtype=float)
_ACTIVITY_SIGMA = 1.3       # lognormal spread of session rates: top 10% of users ~ half the traffic
_MAX_SESSIONS_PER_DAY = 6.0
_MIN_SESSION_GAP = 2 * 3600  # keeps one user's sessions apart, so their history is ordered
_MAX_SESSION_SPAN = 90 * 60
_BROWSE_MEAN = 1.6           # extra items first looked at per session (Poisson)
_EXPLORE = 0.1               # share of browsing outside the user's favourite categories
_N_FAVOURITES = 3
_P_RETURN = 0.06
_WRITE_ROWS = 262_144        # buffer this many rows per Parquet row group / CSV batch
_NOUNS = ("Sneakers", "Jacket", "Lamp", "Mug", "Headphones", "Backpack", "Watch", "Blender",
          "Novel", "Puzzle", "Sofa", "Tent", "Scarf", "Kettle", "Monitor", "Pillow", "Camera",
          "Bike Light", "Perfume", "Yoga Mat")
_REGIONS = ("north", "south", "east", "west", "central", "coast", "mountain", "islands")


@dataclass(frozen=True)
class DemoDataConfig:
    """Size, time window, seed and output format of the generated demo shop."""

    n_users: int = 2000
    n_items: int = 500
    n_categories: int = 20
    n_days: int = 60
    seed: int = 7
    end_time: datetime | None = None  # tz-aware; None -> now (UTC) floored to the hour
    sessions_per_user_per_day: float = 0.15  # mean across users; heavy-tailed
    file_format: str = "parquet"  # "parquet" or "csv"; applies to the events file only


@dataclass(frozen=True)
class DemoDataSummary:
    """What generate_demo_data wrote."""

    n_events: int
    n_users: int
    n_items: int
    counts_by_type: dict[str, int]
    start_time: datetime
    end_time: datetime
    files: list[Path]


@dataclass(frozen=True)
class _Shop:
    """Numeric catalog and user model shared by every day of generation."""

    item_cat: np.ndarray
    item_price: np.ndarray
    item_available: np.ndarray
    cat_items: np.ndarray   # item indices grouped by category, most popular first
    cat_cdf: np.ndarray     # category index + cumulative popularity within category
    cat_end: np.ndarray     # exclusive end of each category's run in cat_items
    activity: np.ndarray    # standardised log session rate per user
    favourites: np.ndarray  # (n_users, _N_FAVOURITES) category indices
    fav_cdf: np.ndarray     # (n_users, _N_FAVOURITES) cumulative Dirichlet weights


def generate_demo_data(out_dir: Path, config: DemoDataConfig = DemoDataConfig(),
                       progress: Callable[[str], None] | None = print) -> DemoDataSummary:
    """Write events, items and users files for a synthetic shop into out_dir."""
    _validate(config)
    say = progress or (lambda _msg: None)
    end = _resolve_end(config.end_time)
    start = end - timedelta(days=config.n_days)
    start_s = int(start.timestamp())
    rng = np.random.default_rng(config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    shop, items = _make_catalog(rng, config)
    rate, activity = _user_activity(rng, config.n_users, config.sessions_per_user_per_day)
    shop = _with_users(rng, shop, config, activity)
    sess_user, sess_start = _make_sessions(rng, rate, config.n_days)
    users = _make_users(rng, config.n_users, sess_user, sess_start, start_s)

    items_path, users_path = out_dir / "items.parquet", out_dir / "users.parquet"
    pq.write_table(items, items_path)
    pq.write_table(users, users_path)
    events_path = out_dir / f"events.{config.file_format}"
    counts = _write_events(rng, shop, config, sess_user, sess_start, start_s, events_path, say)

    n_events = sum(counts.values())
    say(f"demo data: {n_events:,} events ({', '.join(f'{k}={v:,}' for k, v in counts.items())}) "
        f"for {config.n_users:,} users, {config.n_items:,} items -> {out_dir}")
    return DemoDataSummary(n_events, config.n_users, config.n_items, counts, start, end,
                           [events_path, items_path, users_path])


def _validate(config: DemoDataConfig) -> None:
    if config.file_format not in ("parquet", "csv"):
        raise ValueError(f"file_format must be 'parquet' or 'csv', not {config.file_format!r}")
    if min(config.n_users, config.n_categories, config.n_days) < 1:
        raise ValueError("n_users, n_categories and n_days must be positive")
    if config.n_items < config.n_categories:
        raise ValueError("n_items must be at least n_categories so every category has an item")
    if config.sessions_per_user_per_day <= 0:
        raise ValueError("sessions_per_user_per_day must be positive")


def _resolve_end(end_time: datetime | None) -> datetime:
    if end_time is None:
        return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    if end_time.tzinfo is None:
        raise ValueError("end_time must be timezone-aware")
    return end_time.astimezone(timezone.utc)


def _ids(prefix: str, index: np.ndarray, width: int) -> pa.Array:
    digits = pc.cast(pa.array(index, type=pa.int64()), pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(digits, width=width, padding="0"), "")


def _width(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def _make_catalog(rng: np.random.Generator, config: DemoDataConfig) -> tuple[_Shop, pa.Table]:
    n, n_cat = config.n_items, config.n_categories
    cat_share = rng.dirichlet(np.full(n_cat, 3.0))
    # The first n_cat items seed one per category so no category is empty.
    item_cat = rng.permutation(np.concatenate(
        [np.arange(n_cat), rng.choice(n_cat, n - n_cat, p=cat_share)]))
    cat_mu = rng.normal(np.log(30.0), 0.8, n_cat)
    price = np.round(np.maximum(np.exp(cat_mu[item_cat] + rng.normal(0, 0.45, n)), 0.99), 2)
    available = rng.random(n) < 0.95
    # Zipf popularity within category: a random rank per item, weight 1 / rank^1.1.
    rank_key = rng.random(n)
    order = np.lexsort((rank_key, item_cat))
    cat_sizes = np.bincount(item_cat, minlength=n_cat)
    cat_end = np.cumsum(cat_sizes)
    rank = np.arange(n) - np.repeat(cat_end - cat_sizes, cat_sizes) + 1
    weight = rank.astype(float) ** -1.1
    cum = np.cumsum(weight)
    cat_before = np.repeat(np.concatenate([[0.0], cum[cat_end[:-1] - 1]]), cat_sizes)
    within = (cum - cat_before) / np.repeat(np.add.reduceat(weight, cat_end - cat_sizes), cat_sizes)
    cat_cdf = item_cat[order] + within

    n_brands = max(3, n // 25)
    brand_idx = rng.integers(0, n_brands, n)
    brands = [f"Brand{b:03d}" for b in brand_idx]
    titles = [f"{b} {_NOUNS[c % len(_NOUNS)]} {i}"
              for i, (b, c) in enumerate(zip(brands, item_cat))]
    items = pa.table({
        "item_id": _ids("i", np.arange(n), _width(n, 5)),
        "category_id": _ids("c", item_cat, _width(n_cat, 2)),
        "price": pa.array(price, pa.float64()),
        "available": pa.array(available, pa.bool_()),
        "brand": pa.array(brands, pa.string()),
        "title": pa.array(titles, pa.string()),
    })
    empty = np.empty((0, 0))
    shop = _Shop(item_cat, price, available, order, cat_cdf, cat_end, np.empty(0), empty, empty)
    return shop, items


def _user_activity(rng: np.random.Generator, n_users: int, mean_rate: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    z = rng.standard_normal(n_users)
    # Mean-preserving lognormal, capped so one bot-like user cannot dominate the log.
    rate = np.minimum(mean_rate * np.exp(_ACTIVITY_SIGMA * z - _ACTIVITY_SIGMA ** 2 / 2),
                      _MAX_SESSIONS_PER_DAY)
    return rate, np.clip(z, -2.5, 3.0)


def _with_users(rng: np.random.Generator, shop: _Shop, config: DemoDataConfig,
                activity: np.ndarray) -> _Shop:
    # Favourites may repeat a category; that only concentrates the user's taste further.
    favourites = rng.integers(0, config.n_categories, (config.n_users, _N_FAVOURITES))
    fav_cdf = np.cumsum(rng.dirichlet(np.full(_N_FAVOURITES, 0.8), config.n_users), axis=1)
    return replace(shop, activity=activity, favourites=favourites, fav_cdf=fav_cdf)


def _make_sessions(rng: np.random.Generator, rate: np.ndarray, n_days: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Session owners and start offsets (seconds from window start), sorted by user then time."""
    counts = rng.poisson(rate * n_days)
    user = np.repeat(np.arange(rate.size, dtype=np.int64), counts)
    hour = rng.choice(24, user.size, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    day = rng.integers(0, n_days, user.size)
    start = day * _DAY + hour * 3600 + rng.integers(0, 3600, user.size)
    order = np.lexsort((start, user))
    user, start = user[order], start[order]
    # Push each user's sessions at least _MIN_SESSION_GAP apart: a per-user running max of
    # start - rank * gap, kept per user by a large per-user offset.
    rank = np.arange(user.size) - np.repeat(np.cumsum(counts) - counts, counts)
    big = (n_days + 1) * _DAY * 4
    shifted = np.maximum.accumulate(start - rank * _MIN_SESSION_GAP + user * big)
    start = shifted - user * big + rank * _MIN_SESSION_GAP
    keep = start < n_days * _DAY
    return user[keep], start[keep]


def _make_users(rng: np.random.Generator, n: int, sess_user: np.ndarray, sess_start: np.ndarray,
                start_s: int) -> pa.Table:
    first = np.full(n, sess_start.max(initial=0) + _DAY, dtype=np.int64)
    np.minimum.at(first, sess_user, sess_start)
    signup = start_s + first - 60 - (rng.exponential(150 * _DAY, n)).astype(np.int64)
    age = np.clip(np.round(rng.normal(38, 12, n)), 18, 85).astype(np.int64)
    gender = np.array(["f", "m", "x"])[rng.choice(3, n, p=[0.49, 0.47, 0.04])]
    region = np.array(_REGIONS)[rng.choice(len(_REGIONS), n, p=rng.dirichlet(np.full(8, 4.0)))]
    return pa.table({
        "user_id": _ids("u", np.arange(n), _width(n, 6)),
        "signup_time": pa.array(signup * 1_000_000, _UTC_US),
        "age": pa.array(age, pa.int64()),
        "gender": pa.array(gender, pa.string()),
        "region": pa.array(region, pa.string()),
    })


# Events live as dicts of equally long numpy arrays until they are written. "Pending" events
# belong to a known future session but have no time yet; "timed" events are final.
_PENDING = {"sess": np.int64, "user": np.int64, "item": np.int64, "etype": np.int8,
            "qty": np.int64, "key": np.float64, "step": np.int64}
_TIMED = {"time": np.int64, "sess": np.int64, "user": np.int64, "item": np.int64,
          "etype": np.int8, "qty": np.int64}
_Batch = dict[str, np.ndarray]


def _empty(kinds: dict[str, type]) -> _Batch:
    return {k: np.empty(0, t) for k, t in kinds.items()}


def _concat(*batches: _Batch) -> _Batch:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _take(batch: _Batch, index: np.ndarray) -> _Batch:
    return {k: v[index] for k, v in batch.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _group_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal values."""
    first = np.ones(sorted_keys.size, bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = np.flatnonzero(first)
    return starts, np.diff(np.append(starts, sorted_keys.size))


def _write_events(rng: np.random.Generator, shop: _Shop, config: DemoDataConfig,
                  sess_user: np.ndarray, sess_start: np.ndarray, start_s: int, path: Path,
                  say: Callable[[str], None]) -> dict[str, int]:
    sess_day = sess_start // _DAY
    day_order = np.argsort(sess_day, kind="stable")
    day_bounds = np.searchsorted(sess_day[day_order], np.arange(config.n_days + 1))
    sess_end = np.searchsorted(sess_user, np.arange(config.n_users), side="right")
    pending, timed = _empty(_PENDING), _empty(_TIMED)
    next_return_sess = sess_user.size  # returns get their own session ids after the real ones
    writer = _EventWriter(path, config, shop.item_price, start_s)
    report_every = max(1, config.n_days // 10)
    for day in range(config.n_days):
        sessions = day_order[day_bounds[day]:day_bounds[day + 1]]
        pending = _concat(pending, _start_threads(rng, shop, sessions, sess_user, sess_end))
        today = sess_day[pending["sess"]] == day
        done = _place_in_time(rng, _take(pending, today), sess_start)
        pending = _take(pending, ~today)
        returns = _returns(rng, done, next_return_sess)
        next_return_sess += returns["sess"].size
        timed = _concat(timed, done, returns)
        # Sessions near midnight spill into the next day; hold them back to keep the file sorted.
        due = timed["time"] < (day + 1) * _DAY
        chunk = _take(timed, due)
        writer.write(_take(chunk, np.argsort(chunk["time"], kind="stable")))
        timed = _take(timed, ~due)
        if (day + 1) % report_every == 0 or day + 1 == config.n_days:
            say(f"demo data: day {day + 1}/{config.n_days}, {writer.n_written:,} events")
    writer.close()
    return dict(zip(EVENT_TYPES, (int(c) for c in writer.counts)))


def _pick_items(rng: np.random.Generator, shop: _Shop, user: np.ndarray) -> np.ndarray:
    n = user.size
    slot = (rng.random(n)[:, None] > shop.fav_cdf[user]).sum(axis=1)
    cat = shop.favourites[user, np.minimum(slot, _N_FAVOURITES - 1)]
    explore = rng.random(n) < _EXPLORE
    cat = np.where(explore, rng.integers(0, shop.cat_end.size, n), cat)
    pos = np.searchsorted(shop.cat_cdf, cat + rng.random(n), side="right")
    cat_start = np.concatenate([[0], shop.cat_end[:-1]])
    # Clip because float round-off can put a cumulative share just past its category edge.
    pos = np.clip(pos, cat_start[cat], shop.cat_end[cat] - 1)
    return shop.cat_items[pos]


def _start_threads(rng: np.random.Generator, shop: _Shop, sessions: np.ndarray,
                   sess_user: np.ndarray, sess_end: np.ndarray) -> _Batch:
    """Plan the interest threads opened in these sessions: repeat views, cart, purchase.

    Each item first seen in a session opens a thread; its later steps land in the same or
    the user's following sessions. Cart and purchase odds grow with the number of views and
    with the user's activity, which is the signal the propensity model has to learn.
    """
    t_sess = np.repeat(sessions, 1 + rng.poisson(_BROWSE_MEAN, sessions.size))
    user = sess_user[t_sess]
    item = _pick_items(rng, shop, user)
    n = t_sess.size
    z = shop.activity[user]
    engaged = rng.random(n) < 0.25
    n_views = 1 + engaged * (1 + rng.poisson(2.0, n))
    p_cart = _sigmoid(-3.3 + 1.2 * (n_views - 1) + 0.3 * z) * shop.item_available[item]
    carted = rng.random(n) < p_cart
    bought = carted & (rng.random(n) < _sigmoid(-2.2 + 0.35 * (n_views - 1) + 0.35 * z))
    later = bought & (rng.random(n) < 0.4)  # buys in a later session, after another look
    qty = 1 + (rng.random(n) < 0.1) + (rng.random(n) < 0.02)
    key = rng.random(n)

    thread = np.repeat(np.arange(n), n_views)
    step = np.arange(thread.size) - np.repeat(np.cumsum(n_views) - n_views, n_views)
    view_gap = np.where((step > 0) & (rng.random(thread.size) >= 0.35),
                        rng.geometric(0.6, thread.size), 0)
    c, r, p = np.flatnonzero(carted), np.flatnonzero(later), np.flatnonzero(bought)
    thread = np.concatenate([thread, c, r, p])
    step = np.concatenate([step, n_views[c], n_views[r] + 1, n_views[p] + 2])
    gap = np.concatenate([view_gap, np.zeros(c.size, np.int64), rng.geometric(0.7, r.size),
                          np.zeros(p.size, np.int64)])
    etype = np.repeat(np.array([_VIEW, _CART, _VIEW, _PURCHASE], np.int8),
                      [view_gap.size, c.size, r.size, p.size])
    quantity = np.concatenate([np.ones(view_gap.size, np.int64), qty[c],
                               np.ones(r.size, np.int64), qty[p]])
    order = np.lexsort((step, thread))
    thread, step, etype, quantity = thread[order], step[order], etype[order], quantity[order]
    cum = np.cumsum(gap[order])
    starts, sizes = _group_starts(thread)
    sess = t_sess[thread] + cum - np.repeat(cum[starts], sizes)
    # Steps past the user's last session in the window never happen.
    keep = sess < sess_end[user[thread]]
    return _take({"sess": sess, "user": user[thread], "item": item[thread], "etype": etype,
                  "qty": quantity, "key": key[thread], "step": step}, keep)


def _place_in_time(rng: np.random.Generator, batch: _Batch, sess_start: np.ndarray) -> _Batch:
    """Give each event of these sessions a time a minute or two after the previous one."""
    order = np.lexsort((batch["step"], batch["key"], batch["sess"]))
    b = _take(batch, order)
    n = b["sess"].size
    if n == 0:
        return _empty(_TIMED)
    starts, sizes = _group_starts(b["sess"])
    gap = 10.0 + rng.exponential(75.0, n)
    gap[starts] = 0.0
    cum = np.cumsum(gap)
    offset = cum - np.repeat(cum[starts], sizes)
    span = offset[starts + sizes - 1]
    # Squeeze the rare huge session so it ends before the same user's next one begins.
    offset *= np.repeat(np.minimum(1.0, _MAX_SESSION_SPAN / np.maximum(span, 1.0)), sizes)
    time = sess_start[b["sess"]] + offset.astype(np.int64)
    return {"time": time, "sess": b["sess"], "user": b["user"], "item": b["item"],
            "etype": b["etype"], "qty": b["qty"]}


def _returns(rng: np.random.Generator, done: _Batch, first_sess: int) -> _Batch:
    bought = np.flatnonzero(done["etype"] == _PURCHASE)
    back = bought[rng.random(bought.size) < _P_RETURN]
    ret = _take(done, back)
    ret["time"] = ret["time"] + rng.integers(2 * _DAY, 21 * _DAY, back.size)
    ret["etype"] = np.full(back.size, _RETURN, np.int8)
    ret["sess"] = first_sess + np.arange(back.size, dtype=np.int64)
    return ret


class _EventWriter:
    """Turns sorted numeric event chunks into the string schema and appends them to one file."""

    def __init__(self, path: Path, config: DemoDataConfig, item_price: np.ndarray, start_s: int):
        self._csv = config.file_format == "csv"
        self._user_ids = _ids("u", np.arange(config.n_users), _width(config.n_users, 6))
        self._item_ids = _ids("i", np.arange(config.n_items), _width(config.n_items, 5))
        self._types = pa.array(EVENT_TYPES, pa.string())
        self._price = item_price
        self._start_us = start_s * 1_000_000
        self._buffer: list[_Batch] = []
        self._buffered = 0
        self.n_written = 0
        self.counts = np.zeros(len(EVENT_TYPES), np.int64)
        schema = EVENTS_SCHEMA
        if self._csv:  # CSV carries ISO-8601 text so any reader gets the UTC offset
            schema = schema.set(0, pa.field("event_time", pa.string()))
        self._sink = pacsv.CSVWriter(path, schema) if self._csv else pq.ParquetWriter(path, schema)

    def write(self, batch: _Batch) -> None:
        self._buffer.append(batch)
        self._buffered += batch["time"].size
        self.counts += np.bincount(batch["etype"], minlength=len(EVENT_TYPES))
        self.n_written += batch["time"].size
        if self._buffered >= _WRITE_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._sink.close()

    def _flush(self) -> None:
        if not self._buffered:
            return
        b = _concat(*self._buffer)
        first_id = self.n_written - self._buffered
        self._buffer, self._buffered = [], 0
        event_time = pa.array(self._start_us + b["time"] * 1_000_000, _UTC_US)
        if self._csv:
            event_time = pc.strftime(event_time.cast(pa.timestamp("s", tz="UTC")),
                                     format="%Y-%m-%dT%H:%M:%SZ")
        table = pa.table({
            "event_time": event_time,
            "user_id": self._user_ids.take(pa.array(b["user"])),
            "item_id": self._item_ids.take(pa.array(b["item"])),
            "event_type": self._types.take(pa.array(b["etype"])),
            "event_id": _ids("e", first_id + np.arange(b["time"].size), 10),
            "session_id": _ids("s", b["sess"], 8),
            "price": pa.array(self._price[b["item"]], pa.float64()),
            "quantity": pa.array(b["qty"], pa.int64()),
        })
        self._sink.write_table(table)
