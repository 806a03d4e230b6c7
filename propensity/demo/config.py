"""What to generate (size, window, seed, format, oracle), the behaviour's parameters, and what was written."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class Behaviour:
    """Parameters of the shoppers' generative process; docs/demo_shop.md explains each one."""

    # Sessions.
    activity_sigma: float = 1.3          # lognormal spread of session rates: top 10% ~ half the traffic
    max_sessions_per_day: float = 6.0    # cap on one shopper's rate, so no bot dominates the log
    # Interest threads: an item a shopper starts looking at, followed across sessions.
    new_items_per_session: float = 1.45  # Poisson mean of items first looked at, on top of one
    explore: float = 0.1                 # share of new items picked outside the favourite categories
    n_favourites: int = 3
    engaged_share: float = 0.25          # threads the shopper is really interested in
    view_again: tuple[float, float] = (0.08, 0.5)  # P(another look in the same session): casual, engaged
    # In each later session of the shopper, a dormant thread comes back, is forgotten, or waits.
    resurface: tuple[float, float] = (0.08, 0.4)   # P(comes back): casual, engaged
    forget: tuple[float, float] = (0.3, 0.15)      # P(forgotten): casual, engaged
    resurface_cart: float = 0.2          # P(a cart comes back)
    forget_cart: float = 0.2             # P(a cart is abandoned for good): it stays in the log, never bought
    cart_look: float = 0.7               # P(a cart that comes back is looked at again first)
    # Between sessions, per day: how inactive shoppers lose their threads and carts.
    fade_per_day: float = 0.03
    cart_fade_per_day: float = 0.01
    # Log-odds of carting and of buying (a carted item, once per session it is in view).
    cart_logit: tuple[float, float, float, float] = (-3.5, 0.8, 0.15, 0.6)  # intercept, per extra view, activity, engaged
    buy_logit: tuple[float, float, float] = (-2.3, 0.25, 0.2)  # intercept, per extra view, activity
    # Price sensitivity: both log-odds fall by sensitivity * log(price / reference) above the reference.
    reference_spread: float = 0.4        # sd of a shopper's log reference price around their categories' prices
    sensitivity_shape: float = 2.0       # Gamma shape and mean of the per-shopper sensitivity
    sensitivity_mean: float = 1.2
    # Category drift: one favourite category is replaced by another, at this rate per shopper and day.
    drift_per_day: float = 0.03
    # Repeat buying of consumables.
    consumable_share: float = 0.35       # share of categories whose items are re-bought
    rebuy_interval_days: tuple[float, float] = (14.0, 0.4)  # median and log-sd of an item's re-buy interval
    rebuy_jitter_shape: float = 6.0      # Gamma shape of one run-out time around the item's interval
    rebuy_beta: tuple[float, float] = (2.0, 1.5)  # Beta(a, b) of a shopper's re-buy probability
    rebuy_view_first: float = 0.7        # a re-buy starts with a view; otherwise straight to cart
    intent_fade_per_day: float = 0.02    # P(a decided re-buy is dropped, per day before the next session)
    p_return: float = 0.06               # P(a purchase is returned 2 to 21 days later)


@dataclass(frozen=True)
class DemoDataConfig:
    """Size, time window, seed and output format of the generated demo shop, and its oracle."""

    n_users: int = 2000
    n_items: int = 500
    n_categories: int = 20
    n_days: int = 60
    seed: int = 7
    end_time: datetime | None = None  # tz-aware; None -> now (UTC) floored to the hour
    sessions_per_user_per_day: float = 0.15  # mean across users; heavy-tailed
    file_format: str = "parquet"  # "parquet" or "csv"; applies to the events file only
    oracle: bool = False  # also write <out>/oracle/: true purchase probabilities (Monte Carlo)
    oracle_horizon_days: int = 7  # the oracle's window: [end_time - horizon, end_time)
    oracle_replicates: int = 200  # Monte Carlo continuations from the state at the cut-off
    behaviour: Behaviour = field(default_factory=Behaviour)


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


def validate(config: DemoDataConfig) -> None:
    """Refuse a configuration the generator cannot honour, naming the field."""
    if config.file_format not in ("parquet", "csv"):
        raise ValueError(f"file_format must be 'parquet' or 'csv', not {config.file_format!r}")
    if min(config.n_users, config.n_categories, config.n_days) < 1:
        raise ValueError("n_users, n_categories and n_days must be positive")
    if config.n_items < config.n_categories:
        raise ValueError("n_items must be at least n_categories so every category has an item")
    if config.sessions_per_user_per_day <= 0:
        raise ValueError("sessions_per_user_per_day must be positive")
    if config.oracle:
        if not 1 <= config.oracle_horizon_days < config.n_days:
            raise ValueError(f"oracle_horizon_days must be between 1 and n_days - 1 ({config.n_days - 1}), "
                             f"not {config.oracle_horizon_days}")
        if config.oracle_replicates < 1:
            raise ValueError("oracle_replicates must be positive")


def resolve_end(config: DemoDataConfig) -> datetime:
    """The window's end in UTC; with the oracle on it must be a UTC midnight, so the cut-off is one too."""
    end_time = config.end_time
    if end_time is None:
        end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    elif end_time.tzinfo is None:
        raise ValueError("end_time must be timezone-aware")
    else:
        end = end_time.astimezone(timezone.utc)
    if config.oracle and end != end.replace(hour=0, minute=0, second=0, microsecond=0):
        raise ValueError(f"with the oracle on, end_time must be a UTC midnight (the evaluation's as-of), not {end.isoformat()}")
    return end
