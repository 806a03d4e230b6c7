"""The demo shop's shoppers: latent traits, the sessions of one day, and the users table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from propensity.demo.batch import DAY
from propensity.demo.catalog import Catalog
from propensity.demo.config import Behaviour
from propensity.demo.ids import ids, width

_HOUR_WEIGHTS = np.array([3, 2, 1.5, 1, 1, 1.5, 3, 6, 8, 9, 10, 10,
                          11, 10, 9, 9, 10, 11, 13, 15, 16, 14, 10, 6], dtype=float)
_MIN_SESSION_GAP = 2 * 3600  # keeps one user's sessions apart, so their history is ordered
_LAST_START = DAY - 10 * 60  # a session starts early enough to end before midnight
_REGIONS = ("north", "south", "east", "west", "central", "coast", "mountain", "islands")
_UTC_US = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Shoppers:
    """Latent traits per shopper, fixed for the whole window (favourite categories drift in the state)."""

    rate: np.ndarray          # mean sessions per day
    activity: np.ndarray      # standardised log session rate
    favourites: np.ndarray    # (n, n_favourites) category indices at the window's start
    fav_cdf: np.ndarray       # (n, n_favourites) cumulative weights of the favourite slots
    log_ref_price: np.ndarray  # log of the price the shopper is used to paying
    sensitivity: np.ndarray   # how fast carting/buying odds fall above the reference price
    rebuy_prob: np.ndarray    # P(re-buying a consumable when it runs out)

    @property
    def n(self) -> int:
        """Number of shoppers."""
        return int(self.rate.size)

    def tile(self, copies: int) -> Shoppers:
        """The same shoppers repeated copies times: shopper k of copy r is row r * n + k."""
        return Shoppers(*(np.tile(a, (copies,) + (1,) * (a.ndim - 1)) for a in (
            self.rate, self.activity, self.favourites, self.fav_cdf, self.log_ref_price,
            self.sensitivity, self.rebuy_prob)))


def make_shoppers(rng: np.random.Generator, n: int, mean_rate: float, catalog: Catalog,
                  b: Behaviour) -> Shoppers:
    """Draw every shopper's traits."""
    z = rng.standard_normal(n)
    # Mean-preserving lognormal, capped so one bot-like user cannot dominate the log.
    s = b.activity_sigma
    rate = np.minimum(mean_rate * np.exp(s * z - s ** 2 / 2), b.max_sessions_per_day)
    # Favourites may repeat a category; that only concentrates the user's taste further.
    favourites = rng.integers(0, catalog.n_categories, (n, b.n_favourites))
    weights = rng.dirichlet(np.full(b.n_favourites, 0.8), n)
    # The reference price is anchored on what the favourite categories cost, then personal.
    anchor = (weights * catalog.cat_log_price[favourites]).sum(axis=1)
    log_ref = anchor + rng.normal(0.0, b.reference_spread, n)
    sensitivity = rng.gamma(b.sensitivity_shape, b.sensitivity_mean / b.sensitivity_shape, n)
    rebuy = rng.beta(*b.rebuy_beta, n)
    return Shoppers(rate, np.clip(z, -2.5, 3.0), favourites, np.cumsum(weights, axis=1),
                    log_ref, sensitivity, rebuy)


def day_sessions(rng: np.random.Generator, rate: np.ndarray, day: int) -> tuple[np.ndarray, np.ndarray]:
    """Owners and start times (seconds from the window's start) of one day's sessions, by user then time.

    Drawn a day at a time, so a continuation from any midnight uses the same process.
    """
    counts = rng.poisson(rate)
    user = np.repeat(np.arange(rate.size, dtype=np.int64), counts)
    start = (rng.choice(24, user.size, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()) * 3600
             + rng.integers(0, 3600, user.size))
    order = np.lexsort((start, user))
    user, start = user[order], start[order]
    # Push each user's sessions at least _MIN_SESSION_GAP apart: a per-user running max of
    # start - rank * gap, kept per user by a large per-user offset.
    rank = np.arange(user.size) - np.repeat(np.cumsum(counts) - counts, counts)
    big = 2 * (DAY + (int(counts.max(initial=0)) + 1) * _MIN_SESSION_GAP)
    shifted = np.maximum.accumulate(start - rank * _MIN_SESSION_GAP + user * big)
    start = shifted - user * big + rank * _MIN_SESSION_GAP
    keep = start < _LAST_START
    return user[keep], day * DAY + start[keep]


def users_table(rng: np.random.Generator, first_session: np.ndarray, start_s: int) -> pa.Table:
    """The users file; signup precedes the first session (first_session: seconds, or a large value)."""
    n = first_session.size
    signup = start_s + first_session - 60 - (rng.exponential(150 * DAY, n)).astype(np.int64)
    age = np.clip(np.round(rng.normal(38, 12, n)), 18, 85).astype(np.int64)
    gender = np.array(["f", "m", "x"])[rng.choice(3, n, p=[0.49, 0.47, 0.04])]
    region = np.array(_REGIONS)[rng.choice(len(_REGIONS), n, p=rng.dirichlet(np.full(8, 4.0)))]
    return pa.table({
        "user_id": ids("u", np.arange(n), width(n, 6)),
        "signup_time": pa.array(signup * 1_000_000, _UTC_US),
        "age": pa.array(age, pa.int64()),
        "gender": pa.array(gender, pa.string()),
        "region": pa.array(region, pa.string()),
    })
