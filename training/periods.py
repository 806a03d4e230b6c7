"""Time-ordered periods of cut-offs: train < validation < test."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from training.datasets import TrainingSet


@dataclass(frozen=True)
class Periods:
    """Cut-offs of each period, oldest first; test is empty when there are too few cut-offs."""

    train: list[datetime]
    validation: list[datetime]
    test: list[datetime]

    @classmethod
    def split(cls, cutoffs: list[datetime], validation_cutoffs: int = 1, test_cutoffs: int = 1) -> Periods:
        """Last cut-off(s) = test, the ones before = validation, the rest = train (no test with fewer than 3 cut-offs)."""
        if len(cutoffs) < validation_cutoffs + test_cutoffs + 1:
            test_cutoffs = 0
        n_test = len(cutoffs) - test_cutoffs
        n_valid = n_test - validation_cutoffs
        if n_valid < 1:
            raise ValueError(f"{len(cutoffs)} cut-offs leave no training period; use more cut-offs")
        return cls(cutoffs[:n_valid], cutoffs[n_valid:n_test], cutoffs[n_test:])

    def masks(self, data: TrainingSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boolean row masks (train, validation, test) of data."""
        cut = naive_utc(data.cutoffs)
        return tuple(np.isin(cut, naive_utc(np.asarray(part))) for part in (self.train, self.validation, self.test))  # type: ignore[return-value]

    def to_json(self) -> dict:
        def window(part: list[datetime]) -> dict | None:
            return {"start": part[0].isoformat(), "end": part[-1].isoformat()} if part else None

        return {"train_window": window(self.train), "validation_window": window(self.validation), "test_window": window(self.test)}


def naive_utc(values: np.ndarray) -> np.ndarray:
    """Times as naive UTC datetime64, so aware and naive cut-offs compare equal."""
    return pd.DatetimeIndex(pd.to_datetime(values, utc=True)).tz_convert(None).to_numpy()
