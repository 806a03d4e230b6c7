"""The demo shop's oracle: the generator's true purchase probabilities, as the ceiling a model is measured against.

`propensity demo-data --oracle` writes into the raw data dir:
  oracle/oracle.json     {"cutoff": ISO-8601 UTC on the raw log's clock, "horizon_days", "replicates", "seed", "n_users"}
  oracle/users.parquet   user_id, p_buy (true probability the user buys anything in [cutoff, cutoff + horizon))
  oracle/items.parquet   user_id, item_id, p_buy (only pairs with p_buy > 0)
The prepare stage shifts the log by whole days, so the oracle's cut-off matches a test cut-off
only after the same shift.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from training import metrics

ORACLE_DIR = "oracle"


@dataclass(frozen=True)
class Oracle:
    """An oracle directory's contents."""

    directory: Path
    cutoff: pd.Timestamp  # raw clock, UTC
    horizon_days: int
    meta: dict
    users: pd.DataFrame  # user_id, p_buy
    items: pd.DataFrame  # user_id, item_id, p_buy

    def user_probabilities(self, user_ids: Sequence[str]) -> tuple[np.ndarray, int]:
        """p_buy per user id (0 for users the oracle does not list) and how many were not listed."""
        known = pd.Series(self.users["p_buy"].to_numpy(dtype=float), index=self.users["user_id"].astype(str))
        p = known.reindex(pd.Index(list(user_ids), dtype=str)).to_numpy()
        missing = int(np.isnan(p).sum())
        return np.nan_to_num(p, nan=0.0), missing

    def ranked_items(self, user_ids: Sequence[str], k: int) -> list[list[str]]:
        """Per user: the k items of highest p_buy, ties by item id (what a perfect ranker would list)."""
        frame = self.items.assign(user_id=self.items["user_id"].astype(str), item_id=self.items["item_id"].astype(str))
        frame = frame[frame["user_id"].isin(set(user_ids))].sort_values(["user_id", "p_buy", "item_id"], ascending=[True, False, True], kind="stable")
        top = frame.groupby("user_id", sort=False).head(k).groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
        return [top.get(u, []) for u in user_ids]


def load_oracle(directory: Path) -> Oracle:
    """Read oracle.json, users.parquet and items.parquet of one oracle directory."""
    meta = json.loads((directory / "oracle.json").read_text())
    cutoff = pd.Timestamp(meta["cutoff"])
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    return Oracle(
        directory=directory,
        cutoff=cutoff,
        horizon_days=int(meta["horizon_days"]),
        meta=meta,
        users=pd.read_parquet(directory / "users.parquet", columns=["user_id", "p_buy"]),
        items=pd.read_parquet(directory / "items.parquet", columns=["user_id", "item_id", "p_buy"]),
    )


def find_oracle(data_dirs: Sequence[Path]) -> tuple[Oracle | None, str]:
    """The first of data_dirs holding oracle/oracle.json, or None and why not."""
    seen: list[Path] = []
    for data_dir in data_dirs:
        if data_dir in seen:
            continue
        seen.append(data_dir)
        directory = data_dir / ORACLE_DIR
        if (directory / "oracle.json").exists():
            try:
                return load_oracle(directory), ""
            except (OSError, KeyError, ValueError) as exc:
                return None, f"{directory} is unreadable ({exc})"
    return None, "no oracle in the raw data dir (" + ", ".join(str(d / ORACLE_DIR) for d in seen) + "); only `propensity demo-data --oracle` writes one"


def matching_cutoff(oracle: Oracle, shift_days: int, test_cutoffs: Sequence[pd.Timestamp], horizon_days: int) -> tuple[pd.Timestamp | None, str]:
    """The test cut-off equal to the oracle's cut-off after prepare's shift, or None and why not."""
    shifted = oracle.cutoff + timedelta(days=shift_days)
    if oracle.horizon_days != horizon_days:
        return None, f"the oracle's horizon is {oracle.horizon_days} days, the evaluation's {horizon_days}"
    for cutoff in test_cutoffs:
        if pd.Timestamp(cutoff).tz_convert("UTC") == shifted:
            return pd.Timestamp(cutoff).tz_convert("UTC"), ""
    listed = ", ".join(f"{pd.Timestamp(c):%Y-%m-%d %H:%M}" for c in test_cutoffs)
    return None, f"the oracle's cut-off {oracle.cutoff:%Y-%m-%d %H:%M} (+{shift_days} days = {shifted:%Y-%m-%d %H:%M}) is not a test cut-off ({listed})"


def compare_with_oracle(
    oracle: Oracle,
    cutoff: pd.Timestamp,
    buyers: Sequence[str],
    relevant: Sequence[set],
    tables: dict[str, pd.DataFrame],
    user_ids: Sequence[str],
    y: np.ndarray,
    model_scores: np.ndarray,
    k: int = 10,
) -> dict:
    """Oracle Recall@k / NDCG@k on the cut-off's test buyers, every ranking as a fraction of them, and the user AUC gap.

    buyers, relevant and every table's rows are the test buyers at `cutoff` in one order;
    user_ids, y and model_scores are the test rows (users) at `cutoff`.
    """
    ours = metrics.ranking_metrics_per_user(oracle.ranked_items(buyers, k), list(relevant), k)
    keys = (f"recall_at_{k}", f"ndcg_at_{k}")
    ceiling = {key: float(ours[key].mean()) for key in keys}
    values = {name: {key: float(table[key].mean()) for key in keys} for name, table in tables.items()}
    fractions = {name: {key: v[key] / ceiling[key] if ceiling[key] > 0 else float("nan") for key in keys} for name, v in values.items()}
    p_oracle, missing = oracle.user_probabilities(user_ids)
    oracle_auc, model_auc = metrics.fast_roc_auc(y, p_oracle), metrics.fast_roc_auc(y, model_scores)
    return {
        "status": "compared",
        "directory": str(oracle.directory),
        "cutoff": cutoff.isoformat(),
        "horizon_days": oracle.horizon_days,
        "replicates": oracle.meta.get("replicates"),
        "test_buyers": len(buyers),
        "test_rows": len(user_ids),
        "users_not_in_oracle": missing,
        "oracle": ceiling,
        "values": values,
        "fraction_of_oracle": fractions,
        "user_auc": {"oracle": oracle_auc, "model": model_auc, "gap": oracle_auc - model_auc},
    }


def not_compared(reason: str) -> dict:
    """The oracle section when no comparison could be made."""
    return {"status": "not compared", "reason": reason}
