"""The log's clock: when each event of a day happens, and returns days after a purchase."""

from __future__ import annotations

import numpy as np

from propensity.demo.batch import DAY, PURCHASE, RETURN, TIMED, Batch, empty, group_starts, take

_MAX_SESSION_SPAN = 90 * 60


def place_in_time(rng: np.random.Generator, events: Batch, sess_start: np.ndarray, first_session: int) -> Batch:
    """Give each event a time a minute or two after the previous one of its session.

    sess_start holds the start of sessions first_session, first_session + 1, ... Sessions end
    before midnight, so a day's events stay in that day and any midnight is a clean cut.
    """
    order = np.lexsort((events["step"], events["key"], events["sess"]))
    b = take(events, order)
    n = b["sess"].size
    if n == 0:
        return empty(TIMED)
    starts, sizes = group_starts(b["sess"])
    gap = 10.0 + rng.exponential(75.0, n)
    gap[starts] = 0.0
    cum = np.cumsum(gap)
    offset = cum - np.repeat(cum[starts], sizes)
    span = offset[starts + sizes - 1]
    begin = sess_start[b["sess"][starts] - first_session]
    room = np.minimum(_MAX_SESSION_SPAN, (begin // DAY + 1) * DAY - 1 - begin)
    # Squeeze the rare long session so it ends in time (before midnight, before the next one).
    offset *= np.repeat(np.minimum(1.0, room / np.maximum(span, 1.0)), sizes)
    time = np.repeat(begin, sizes) + offset.astype(np.int64)
    return {"time": time, "sess": b["sess"], "user": b["user"], "item": b["item"],
            "etype": b["etype"], "qty": b["qty"]}


def returns(rng: np.random.Generator, done: Batch, p_return: float, first_session: int) -> Batch:
    """Some purchases come back 2 to 21 days later, each in a session of its own."""
    bought = np.flatnonzero(done["etype"] == PURCHASE)
    back = bought[rng.random(bought.size) < p_return]
    ret = take(done, back)
    ret["time"] = ret["time"] + rng.integers(2 * DAY, 21 * DAY, back.size)
    ret["etype"] = np.full(back.size, RETURN, np.int8)
    ret["sess"] = first_session + np.arange(back.size, dtype=np.int64)
    return ret
