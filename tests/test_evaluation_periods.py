"""Tests for the evaluation's rolling-origin test period: --test-cutoffs pools the last N cut-offs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pandas as pd
import pytest

from propensity.settings import TrainingSettings
from training.datasets import cutoff_times
from training.evaluation.run import evaluation_cutoffs, evaluation_periods
from training.evaluation.ranking import find_test_buyers

AS_OF = datetime(2024, 3, 1, tzinfo=timezone.utc)


def test_more_test_cutoffs_add_cutoffs_so_train_and_validation_keep_theirs() -> None:
    training = TrainingSettings(n_cutoffs=4)  # 2 train, 1 validation, 1 test
    assert evaluation_cutoffs(training, None, 1) == 4
    assert evaluation_cutoffs(training, None, 3) == 6
    assert evaluation_cutoffs(training, 8, 3) == 8  # --n-cutoffs counts them all
    with pytest.raises(ValueError, match="at least 1"):
        evaluation_cutoffs(training, None, 0)


def test_pooled_test_period_is_the_last_n_cutoffs_after_validation_and_train() -> None:
    training = TrainingSettings(n_cutoffs=evaluation_cutoffs(TrainingSettings(n_cutoffs=4), None, 3))
    cutoffs = cutoff_times(AS_OF, AS_OF - timedelta(days=90), training)
    periods = evaluation_periods(cutoffs, training, 3)
    assert periods.test == cutoffs[-3:] and periods.validation == [cutoffs[-4]] and periods.train == cutoffs[:2]
    assert periods.test[-1] == AS_OF - timedelta(days=training.horizon_days)
    assert max(periods.train) < min(periods.validation) < min(periods.test)


def test_too_few_cutoffs_for_the_test_period_is_a_clear_error() -> None:
    cutoffs = [AS_OF - timedelta(days=7 * i) for i in range(4, 0, -1)]
    with pytest.raises(ValueError, match="3 test \\+ 1 validation \\+ at least 1 train need 5"):
        evaluation_periods(cutoffs, TrainingSettings(), 3)


def test_test_buyers_are_pooled_over_test_cutoffs_a_user_counting_once_per_cutoff() -> None:
    cutoffs = [AS_OF - timedelta(days=7 * i) for i in range(4, 0, -1)]
    periods = evaluation_periods(cutoffs, TrainingSettings(), 2)
    rows = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "u2", "u1", "u3"],
            "event_timestamp": pd.to_datetime([cutoffs[i] for i in (0, 1, 2, 2, 3, 3)], utc=True),
            "bought_items": [["a"], ["b"], ["c"], [], ["a", "d"], ["e"]],
            "label": [1, 1, 1, 0, 1, 1],
        }
    )
    built = SimpleNamespace(rows=rows, periods=periods)  # the two parts of TrainingData that pick test buyers
    buyers = find_test_buyers(built)
    assert buyers.row_ids.tolist() == [2, 4, 5]  # u1 twice (two test cut-offs), u2 did not buy, train/validation rows left out
    assert buyers.user_ids == ["u1", "u1", "u3"]
    assert buyers.relevant == [{"c"}, {"a", "d"}, {"e"}]
    assert buyers.at(pd.Timestamp(cutoffs[3])).tolist() == [False, True, True]
