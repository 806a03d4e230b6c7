"""The oracle: each shopper's true probability of buying in the horizon after the cut-off.

From a copy of the shop's exact state at the cut-off (traits, open threads and carts, drifted
favourites, re-buy clocks and plans), run many independent continuations of the same day-by-day
process and count in how many each shopper buys (each item). Decisions not yet made at the
cut-off are drawn afresh in every continuation, so this is the best any model could predict
given the latent state, not a peek at the log's own future.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.demo.batch import PURCHASE
from propensity.demo.behaviour import advance_day
from propensity.demo.catalog import Catalog
from propensity.demo.config import Behaviour, DemoDataConfig
from propensity.demo.ids import ids, width
from propensity.demo.shoppers import Shoppers
from propensity.demo.state import ShopState

# Continuations run side by side as copies of the shop; this bounds the copies' shoppers in memory.
_MAX_SIMULATED_SHOPPERS = 500_000


@dataclass(frozen=True)
class OracleTruth:
    """P(buy in the horizon) per user, and per (user, item) where it is positive."""

    p_user: np.ndarray  # (n_users,)
    pair_user: np.ndarray
    pair_item: np.ndarray
    p_pair: np.ndarray


def run_oracle(seed: np.random.SeedSequence, catalog: Catalog, shoppers: Shoppers, state: ShopState,
               b: Behaviour, first_day: int, horizon_days: int, replicates: int,
               say: Callable[[str], None]) -> OracleTruth:
    """Monte Carlo over replicates continuations of horizon_days from state (the cut-off's midnight)."""
    n, n_items = shoppers.n, catalog.item_price.size
    per_chunk = max(1, min(replicates, _MAX_SIMULATED_SHOPPERS // n))
    sizes = [min(per_chunk, replicates - s) for s in range(0, replicates, per_chunk)]
    buyers = np.zeros(n, np.int64)
    pair_keys: list[np.ndarray] = []
    n_steps, step = len(sizes) * horizon_days, 0
    report_every = max(1, n_steps // 10)
    for chunk, (copies, chunk_seed) in enumerate(zip(sizes, seed.spawn(len(sizes)))):
        rng = np.random.default_rng(chunk_seed)
        sim_shoppers, sim_state = shoppers.tile(copies), state.tiled(copies)
        bought: list[np.ndarray] = []
        for day in range(first_day, first_day + horizon_days):
            events = advance_day(rng, catalog, sim_shoppers, sim_state, b, day).events
            purchase = events["etype"] == PURCHASE
            bought.append(events["user"][purchase] * n_items + events["item"][purchase])
            step += 1
            if step % report_every == 0 or step == n_steps:
                done = sum(sizes[:chunk]) + copies
                say(f"demo oracle: replicates {done - copies + 1}-{done} of {replicates}, "
                    f"day {day - first_day + 1}/{horizon_days}")
        # A replicate counts a (user, item) once however often it was bought in the horizon.
        keys = np.unique(np.concatenate(bought))
        sim_user = keys // n_items
        buyers += np.bincount(np.unique(sim_user) % n, minlength=n)
        pair_keys.append((sim_user % n) * n_items + keys % n_items)
    pairs, counts = np.unique(np.concatenate(pair_keys), return_counts=True)
    return OracleTruth(buyers / replicates, pairs // n_items, pairs % n_items, counts / replicates)


def write_oracle(directory: Path, truth: OracleTruth, cutoff: datetime, config: DemoDataConfig,
                 say: Callable[[str], None]) -> None:
    """oracle.json, users.parquet (user_id, p_buy) and items.parquet (user_id, item_id, p_buy > 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    user_ids = ids("u", np.arange(config.n_users), width(config.n_users, 6))
    item_ids = ids("i", np.arange(config.n_items), width(config.n_items, 5))
    meta = {"cutoff": cutoff.isoformat(), "horizon_days": config.oracle_horizon_days,
            "replicates": config.oracle_replicates, "seed": config.seed, "n_users": config.n_users}
    (directory / "oracle.json").write_text(json.dumps(meta, indent=2) + "\n")
    pq.write_table(pa.table({"user_id": user_ids, "p_buy": pa.array(truth.p_user, pa.float64())}),
                   directory / "users.parquet")
    pq.write_table(pa.table({"user_id": user_ids.take(pa.array(truth.pair_user)),
                             "item_id": item_ids.take(pa.array(truth.pair_item)),
                             "p_buy": pa.array(truth.p_pair, pa.float64())}), directory / "items.parquet")
    say(f"demo oracle: mean P(buy in {config.oracle_horizon_days} days) {truth.p_user.mean():.4f} over "
        f"{config.n_users:,} users, {truth.p_pair.size:,} (user, item) pairs with P > 0 -> {directory}")
