"""generate_demo_data: the catalog, the shoppers, then the log a day at a time (and the oracle)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from propensity.demo.batch import DAY, EVENT_TYPES, TIMED, concat, empty, take
from propensity.demo.behaviour import advance_day
from propensity.demo.catalog import make_catalog
from propensity.demo.config import DemoDataConfig, DemoDataSummary, resolve_end, validate
from propensity.demo.oracle import run_oracle, write_oracle
from propensity.demo.shoppers import make_shoppers, users_table
from propensity.demo.state import ShopState
from propensity.demo.timeline import place_in_time, returns
from propensity.demo.writer import EventWriter


def generate_demo_data(out_dir: Path, config: DemoDataConfig = DemoDataConfig(),
                       progress: Callable[[str], None] | None = print) -> DemoDataSummary:
    """Write events, items and users files for a synthetic shop into out_dir (and oracle/ if asked)."""
    validate(config)
    say = progress or (lambda _msg: None)
    end = resolve_end(config)
    start = end - timedelta(days=config.n_days)
    start_s = int(start.timestamp())
    # One stream per job, so the oracle's draws never change the log and vice versa.
    catalog_rng, shopper_rng, event_rng, user_rng, oracle_seed = (
        np.random.SeedSequence(config.seed).spawn(5))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = config.behaviour

    catalog, items = make_catalog(np.random.default_rng(catalog_rng), config)
    shoppers = make_shoppers(np.random.default_rng(shopper_rng), config.n_users,
                             config.sessions_per_user_per_day, catalog, b)
    state = ShopState.initial(shoppers)
    rng = np.random.default_rng(event_rng)
    events_path = out_dir / f"events.{config.file_format}"
    writer = EventWriter(events_path, config.n_users, catalog.item_price, start_s, config.file_format == "csv")
    first_session = np.full(config.n_users, (config.n_days + 1) * DAY, np.int64)
    cutoff_day = config.n_days - config.oracle_horizon_days if config.oracle else -1
    at_cutoff: ShopState | None = None
    timed = empty(TIMED)
    report_every = max(1, config.n_days // 10)
    for day in range(config.n_days):
        if day == cutoff_day:
            at_cutoff = state.tiled(1)  # a copy: the log goes on from the original
        log = advance_day(rng, catalog, shoppers, state, b, day)
        np.minimum.at(first_session, log.sess_user, log.sess_start)
        done = place_in_time(rng, log.events, log.sess_start, log.first_session)
        back = returns(rng, done, b.p_return, state.next_session)
        state.next_session += back["sess"].size
        timed = concat(timed, done, back)
        # Returns lie days ahead; hold them back to keep the file sorted by time.
        due = timed["time"] < (day + 1) * DAY
        chunk = take(timed, due)
        writer.write(take(chunk, np.argsort(chunk["time"], kind="stable")))
        timed = take(timed, ~due)
        if (day + 1) % report_every == 0 or day + 1 == config.n_days:
            say(f"demo data: day {day + 1}/{config.n_days}, {writer.n_written:,} events")
    writer.close()

    items_path, users_path = out_dir / "items.parquet", out_dir / "users.parquet"
    pq.write_table(items, items_path)
    pq.write_table(users_table(np.random.default_rng(user_rng), first_session, start_s), users_path)
    counts = dict(zip(EVENT_TYPES, (int(c) for c in writer.counts)))
    say(f"demo data: {writer.n_written:,} events ({', '.join(f'{k}={v:,}' for k, v in counts.items())}) "
        f"for {config.n_users:,} users, {config.n_items:,} items -> {out_dir}")
    if at_cutoff is not None:
        cutoff = end - timedelta(days=config.oracle_horizon_days)
        truth = run_oracle(oracle_seed, catalog, shoppers, at_cutoff, b, cutoff_day,
                           config.oracle_horizon_days, config.oracle_replicates, say)
        write_oracle(out_dir / "oracle", truth, cutoff, config, say)
    return DemoDataSummary(writer.n_written, config.n_users, config.n_items, counts, start, end,
                           [events_path, items_path, users_path])
