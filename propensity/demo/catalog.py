"""The demo shop's catalog: categories, prices, availability, popularity and re-buy intervals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from propensity.demo.config import Behaviour, DemoDataConfig
from propensity.demo.ids import ids, width

_NOUNS = ("Sneakers", "Jacket", "Lamp", "Mug", "Headphones", "Backpack", "Watch", "Blender",
          "Novel", "Puzzle", "Sofa", "Tent", "Scarf", "Kettle", "Monitor", "Pillow", "Camera",
          "Bike Light", "Perfume", "Yoga Mat")


@dataclass(frozen=True)
class Catalog:
    """Numeric view of the items that the behaviour needs."""

    item_cat: np.ndarray
    item_price: np.ndarray
    item_available: np.ndarray
    cat_items: np.ndarray      # item indices grouped by category, most popular first
    cat_cdf: np.ndarray        # category index + cumulative popularity within category
    cat_end: np.ndarray        # exclusive end of each category's run in cat_items
    cat_log_price: np.ndarray  # centre of each category's log prices
    rebuy_days: np.ndarray     # an item's typical re-buy interval in days; 0 = not a consumable

    @property
    def n_categories(self) -> int:
        """Number of categories."""
        return int(self.cat_end.size)

    def pick(self, rng: np.random.Generator, cat: np.ndarray) -> np.ndarray:
        """One item per entry of cat, drawn by popularity within that category."""
        pos = np.searchsorted(self.cat_cdf, cat + rng.random(cat.size), side="right")
        cat_start = np.concatenate([[0], self.cat_end[:-1]])
        # Clip because float round-off can put a cumulative share just past its category edge.
        pos = np.clip(pos, cat_start[cat], self.cat_end[cat] - 1)
        return self.cat_items[pos]


def make_catalog(rng: np.random.Generator, config: DemoDataConfig) -> tuple[Catalog, pa.Table]:
    """The catalog's numbers and its items table (item_id, category_id, price, available, brand, title)."""
    n, n_cat = config.n_items, config.n_categories
    cat_share = rng.dirichlet(np.full(n_cat, 3.0))
    # The first n_cat items seed one per category so no category is empty.
    item_cat = rng.permutation(np.concatenate(
        [np.arange(n_cat), rng.choice(n_cat, n - n_cat, p=cat_share)]))
    cat_mu = rng.normal(np.log(30.0), 0.8, n_cat)
    price = np.round(np.maximum(np.exp(cat_mu[item_cat] + rng.normal(0, 0.45, n)), 0.99), 2)
    available = rng.random(n) < 0.95
    order, cat_cdf, cat_end = _popularity(rng, item_cat, n_cat)
    rebuy_days = _rebuy_days(rng, item_cat, n_cat, config.behaviour)

    n_brands = max(3, n // 25)
    brand_idx = rng.integers(0, n_brands, n)
    brands = [f"Brand{b:03d}" for b in brand_idx]
    titles = [f"{b} {_NOUNS[c % len(_NOUNS)]} {i}" for i, (b, c) in enumerate(zip(brands, item_cat))]
    items = pa.table({
        "item_id": ids("i", np.arange(n), width(n, 5)),
        "category_id": ids("c", item_cat, width(n_cat, 2)),
        "price": pa.array(price, pa.float64()),
        "available": pa.array(available, pa.bool_()),
        "brand": pa.array(brands, pa.string()),
        "title": pa.array(titles, pa.string()),
    })
    return Catalog(item_cat, price, available, order, cat_cdf, cat_end, cat_mu, rebuy_days), items


def _popularity(rng: np.random.Generator, item_cat: np.ndarray, n_cat: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zipf popularity within category: a random rank per item, weight 1 / rank^1.1."""
    n = item_cat.size
    order = np.lexsort((rng.random(n), item_cat))
    cat_sizes = np.bincount(item_cat, minlength=n_cat)
    cat_end = np.cumsum(cat_sizes)
    rank = np.arange(n) - np.repeat(cat_end - cat_sizes, cat_sizes) + 1
    weight = rank.astype(float) ** -1.1
    cum = np.cumsum(weight)
    cat_before = np.repeat(np.concatenate([[0.0], cum[cat_end[:-1] - 1]]), cat_sizes)
    within = (cum - cat_before) / np.repeat(np.add.reduceat(weight, cat_end - cat_sizes), cat_sizes)
    return order, item_cat[order] + within, cat_end


def _rebuy_days(rng: np.random.Generator, item_cat: np.ndarray, n_cat: int, b: Behaviour) -> np.ndarray:
    """Each consumable item's typical interval between purchases (days); 0 for durable items."""
    consumable = np.zeros(n_cat, bool)
    consumable[rng.permutation(n_cat)[:round(b.consumable_share * n_cat)]] = True
    median, spread = b.rebuy_interval_days
    days = np.clip(median * np.exp(rng.normal(0.0, spread, item_cat.size)), 3.0, 60.0)
    return np.where(consumable[item_cat], days, 0.0)
