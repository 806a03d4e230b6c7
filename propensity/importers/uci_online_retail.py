"""Import UCI Online Retail invoice lines as purchase and return events (see docs/importers.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.importers import ImportSummary, write_and_verify
from propensity.importers.source import numbers, read_source
from propensity.importers.source import times as source_times

DEFAULT_SOURCE = Path(__file__).resolve().parents[2].parent / "shared/data/uci_online_retail/online_retail.csv.gz"

# Products have 5-digit codes, optionally with a letter suffix (85123A). Everything else is
# postage, fees, manual entries, samples, vouchers: POST, DOT, M, D, C2, S, B, BANK CHARGES,
# AMAZONFEE, CRUK, PADS, DCGS..., gift_0001_... There are no exceptions to the rule.
_PRODUCT_CODE = r"^\d{5}"
_LONDON = "Europe/London"
_COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country")


def import_uci_online_retail(
    source: Path = DEFAULT_SOURCE, out_dir: Path = Path("data/raw/uci-online-retail"),
    progress: Callable[[str], object] = print,
) -> ImportSummary:
    """Convert the UCI Online Retail CSV into raw-schema Parquet files in `out_dir`."""
    started = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    progress(f"uci-online-retail: reading {source}")
    chunk, blank_lines = read_source(source, _COLUMNS)
    raw = chunk.frame
    progress(f"uci-online-retail: {len(raw)} invoice lines read")

    invoice = raw["InvoiceNo"].str.strip()
    # Lower-case suffixes (85123a) are the same product as upper-case ones (85123A).
    code = raw["StockCode"].str.strip().str.upper()
    customer = raw["CustomerID"].str.strip()
    quantity = numbers(chunk, "Quantity", source)
    price = numbers(chunk, "UnitPrice", source)
    cancelled = invoice.str.startswith("C")
    # Line number within its invoice, counted before any filtering so ids never shift.
    line = invoice.groupby(invoice, sort=False).cumcount() + 1

    # Each row is counted under the first reason that applies, in this order.
    reasons = {
        "adjustment invoice (A prefix, bad debt)": invoice.str.startswith("A"),
        "non-product stock code": ~code.str.contains(_PRODUCT_CODE),
        "missing CustomerID": customer.eq(""),
        "UnitPrice <= 0": price.le(0),
        "Quantity <= 0 on a non-cancellation invoice": ~cancelled & quantity.le(0),
        "Quantity >= 0 on a cancellation invoice": cancelled & quantity.ge(0),
    }
    dropped, remaining = {}, pd.Series(True, index=raw.index)
    for reason, mask in reasons.items():
        hit = remaining & mask
        dropped[reason] = int(hit.sum())
        remaining &= ~hit
    keep = remaining.to_numpy()

    times = _london_to_utc(raw["InvoiceDate"])
    source_times(chunk, "InvoiceDate", source, times)
    events = pd.DataFrame({
        "event_time": times,
        "user_id": customer,
        "item_id": code,
        "event_type": np.where(cancelled, "return", "purchase"),
        "event_id": invoice + ":" + line.astype(str),
        "session_id": invoice,
        "price": price,
        "quantity": quantity.abs(),
    })[keep].reset_index(drop=True)
    progress(f"uci-online-retail: {len(events)} events kept")

    catalogue = (
        ~reasons["adjustment invoice (A prefix, bad debt)"] & ~reasons["non-product stock code"]
        & price.gt(0) & ~cancelled & quantity.gt(0)
    )
    items = _items(code, raw["Description"], price, catalogue.to_numpy(), events["item_id"])
    users = _users(events, raw["Country"].str.strip()[keep].reset_index(drop=True))
    if blank_lines:
        dropped["blank line"] = blank_lines
    return write_and_verify("uci-online-retail", source, out_dir, len(raw), dropped,
                            (events, items, users), started, progress)


def _london_to_utc(local: pd.Series) -> pd.Series:
    naive = pd.to_datetime(local.str.strip(), format="%Y-%m-%d %H:%M:%S", errors="coerce")
    # No invoice falls in a DST gap or overlap (shop hours); if one did, it is read as summer time.
    aware = naive.dt.tz_localize(_LONDON, ambiguous=np.ones(len(naive), dtype=bool),
                                 nonexistent="shift_forward")
    return aware.dt.tz_convert("UTC")


def _items(
    code: pd.Series, description: pd.Series, price: pd.Series, catalogue: np.ndarray,
    event_items: pd.Series,
) -> pd.DataFrame:
    """One row per product: most frequent description as title, median unit price."""
    # Sales to customers without a CustomerID still prove the product exists, so they count here.
    lines = pd.DataFrame({"item_id": code, "title": description.str.strip(), "price": price})[catalogue]
    median_price = lines.groupby("item_id")["price"].median()
    titled = lines[lines["title"].ne("")]
    counts = titled.groupby(["item_id", "title"]).size().rename("n").reset_index()
    # Ties between descriptions go to the alphabetically first, so the choice is reproducible.
    counts = counts.sort_values(["item_id", "n", "title"], ascending=[True, False, True])
    title = counts.drop_duplicates("item_id").set_index("item_id")["title"]
    ids = pd.Index(median_price.index).union(pd.Index(event_items.unique()))
    items = pd.DataFrame({"item_id": pd.Series(ids, dtype=object)})
    items["category_id"] = pd.Series(np.full(len(items), None, dtype=object))  # no categories in this data
    items["price"] = items["item_id"].map(median_price).astype("float64")
    items["available"] = True
    items["brand"] = pd.Series(np.full(len(items), None, dtype=object))
    items["title"] = items["item_id"].map(title).astype(object).where(lambda s: s.notna(), None)
    return items


def _users(events: pd.DataFrame, country: pd.Series) -> pd.DataFrame:
    """One row per customer; region is their most frequent country (latest wins ties)."""
    lines = pd.DataFrame({"user_id": events["user_id"], "region": country, "t": events["event_time"]})
    lines = lines[lines["region"].ne("") & lines["region"].ne("Unspecified")]
    per = lines.groupby(["user_id", "region"]).agg(n=("t", "size"), last=("t", "max")).reset_index()
    per = per.sort_values(["user_id", "n", "last"], ascending=[True, False, False])
    region = per.drop_duplicates("user_id").set_index("user_id")["region"]
    users = pd.DataFrame({"user_id": pd.Series(np.sort(events["user_id"].unique()), dtype=object)})
    users["signup_time"] = pd.Series(pd.NaT, index=users.index, dtype="datetime64[ns, UTC]")
    users["age"] = np.nan
    users["gender"] = pd.Series(np.full(len(users), None, dtype=object))
    users["region"] = users["user_id"].map(region).astype(object).where(lambda s: s.notna(), None)
    return users
