"""Tests for choosing which users' candidates become ranker training rows."""

import numpy as np
import pandas as pd

from propensity.settings import TrainingSettings
from training.datasets import ranker_users


def _rows(buyers_per_cut: int, non_buyers_per_cut: int, cuts: int = 2) -> pd.DataFrame:
    frames = []
    for c in range(cuts):
        n = buyers_per_cut + non_buyers_per_cut
        frames.append(pd.DataFrame({
            "user_id": [f"u{i}" for i in range(n)],
            "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=7 * c),
            "label": [1] * buyers_per_cut + [0] * non_buyers_per_cut,
        }))
    return pd.concat(frames, ignore_index=True)


def test_every_buyer_and_a_share_of_non_buyers_below_the_cap() -> None:
    rows = _rows(30, 1000)
    chosen = ranker_users(rows, TrainingSettings(ranker_non_buyer_share=0.3, ranker_max_users_per_cutoff=10_000))
    assert chosen[rows["label"] == 1].all()
    share = chosen[rows["label"] == 0].mean()
    assert 0.25 < share < 0.35


def test_the_cap_per_cutoff_keeps_buyers_first_and_is_deterministic() -> None:
    rows = _rows(30, 1000)
    settings = TrainingSettings(ranker_non_buyer_share=0.3, ranker_max_users_per_cutoff=50)
    chosen = ranker_users(rows, settings)
    per_cut = pd.Series(chosen).groupby(rows["event_timestamp"]).sum()
    assert per_cut.tolist() == [50, 50]
    assert chosen[rows["label"] == 1].all()  # 30 buyers, then 20 non-buyers per cut-off
    np.testing.assert_array_equal(chosen, ranker_users(rows, settings))
    fewer = ranker_users(rows, TrainingSettings(ranker_non_buyer_share=0.3, ranker_max_users_per_cutoff=10))
    assert pd.Series(fewer).groupby(rows["event_timestamp"]).sum().tolist() == [10, 10]
    assert (rows.loc[fewer, "label"] == 1).all()
