"""Point-in-time correctness through the real Feast store: a purchase after a cut-off never reaches it.

A tiny log is prepared (rebased to today), built into a copy of the Feast repository, applied
and materialized into SQLite, then read back the way training and serving read it. Days are
relative to the as-of midnight A (today):

    p1  A-25 10:00 buy i1     A-20 11:00 view i2     A-12 15:00 buy i1     A-1 10:00 view i2
    p2  A-20 09:00 view i2    A-14 00:00 buy i2 (exactly at the first cut-off)
    p3  A-20 12:00 view i1 (never buys)

cutoff_times gives the cut-offs A-14 and A-7 (7-day horizon).
"""

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from propensity.feature_store import open_store
from propensity.settings import FeatureSettings, TrainingSettings
from training.datasets import cutoff_times, entity_rows, historical_user_features
from training.feature_build import build_features
from training.prepare import prepare
from training.publish import publish_features

pytestmark = pytest.mark.slow

UTC = timezone.utc
FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"
SERVICE = "propensity_user_v2"
RAW_AS_OF = datetime(2023, 6, 1, tzinfo=UTC)  # the log's own calendar, before rebasing


def _raw_at(days_before: int, hour: int = 0, minute: int = 0) -> datetime:
    return RAW_AS_OF - timedelta(days=days_before, hours=-hour, minutes=-minute)


EVENTS = [
    (_raw_at(25, 10), "p1", "i1", "purchase", 4.0),
    (_raw_at(20, 11), "p1", "i2", "view", None),
    (_raw_at(12, 15), "p1", "i1", "purchase", 4.0),
    (_raw_at(1, 10), "p1", "i2", "view", None),
    (_raw_at(20, 9), "p2", "i2", "view", None),
    (_raw_at(14), "p2", "i2", "purchase", 8.0),
    (_raw_at(20, 12), "p3", "i1", "view", None),
]


def _quiet(_: str) -> None:
    pass


class World:
    """The prepared log, the published store and the rebased calendar."""

    def __init__(self, repo: Path, prepared_dir: Path, as_of: datetime) -> None:
        self.repo = repo
        self.prepared_dir = prepared_dir
        self.as_of = as_of
        self.store = open_store(repo)

    def at(self, days_before: int, hour: int = 0, minute: int = 0) -> datetime:
        return self.as_of - timedelta(days=days_before, hours=-hour, minutes=-minute)

    def ts(self, days_before: int, hour: int = 0) -> int:
        return int(self.at(days_before, hour).timestamp())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("pit")
    raw = root / "raw"
    raw.mkdir()
    events = pd.DataFrame(EVENTS, columns=["event_time", "user_id", "item_id", "event_type", "price"])
    events["event_time"] = pd.to_datetime(events["event_time"], utc=True)
    events.to_parquet(raw / "events.parquet", index=False)
    pd.DataFrame({"item_id": ["i1", "i2"], "category_id": ["c1", "c2"], "price": [4.0, 8.0]}).to_parquet(
        raw / "items.parquet", index=False
    )
    pd.DataFrame({
        "user_id": ["p1", "p2", "p3"],
        "signup_time": pd.to_datetime(["2023-01-01T00:00:00Z"] * 3, utc=True),
        "age": [30.0, 41.0, 25.0],
    }).to_parquet(raw / "users.parquet", index=False)

    prepared = prepare(raw, root / "prepared", rebase_to=datetime.now(UTC), progress=_quiet)

    repo = root / "feature_repo"
    repo.mkdir()
    for path in [*FEATURE_REPO.glob("*.py"), FEATURE_REPO / "feature_store.yaml", FEATURE_REPO / ".feastignore"]:
        shutil.copy(path, repo / path.name)
    build_features(root / "prepared", repo / "data" / "offline", prepared.as_of, prepared.event_types,
                   FeatureSettings(), progress=_quiet)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEAST_USAGE", "False")
        publish_features(repo, prepared.as_of, progress=_quiet)
    return World(repo, root / "prepared", prepared.as_of)


def _features(world: World, rows: list[tuple[str, datetime]]) -> pd.DataFrame:
    entity = pd.DataFrame(rows, columns=["user_id", "event_timestamp"])
    entity["event_timestamp"] = pd.to_datetime(entity["event_timestamp"], utc=True)
    frame = historical_user_features(world.store, entity, SERVICE)
    # Same order as the entity rows.
    assert frame["user_id"].tolist() == entity["user_id"].tolist()
    assert frame["event_timestamp"].tolist() == entity["event_timestamp"].tolist()
    return frame


def _value(value):
    return None if pd.isna(value) else value


def test_the_log_was_rebased_to_today(world: World) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert world.as_of == today


def test_cutoff_times_end_one_horizon_before_as_of(world: World) -> None:
    first_event = world.at(25, 10)
    assert cutoff_times(world.as_of, first_event, TrainingSettings()) == [world.at(14), world.at(7)]


def test_purchase_after_a_cutoff_never_reaches_that_cutoffs_row(world: World) -> None:
    frame = _features(world, [("p1", world.at(14)), ("p1", world.at(7))])
    early, late = frame.iloc[0], frame.iloc[1]
    # At A-14 p1 has bought once; the A-12 purchase is in the future.
    assert (early.purchases_7d, early.purchases_30d, early.purchases_total) == (0, 1, 1)
    assert early.last_purchase_ts == world.ts(25, 10)
    assert early.spend_30d == 4.0
    # At A-7 it has happened.
    assert (late.purchases_7d, late.purchases_30d, late.purchases_total) == (1, 2, 2)
    assert late.last_purchase_ts == world.ts(12, 15)
    assert late.last_event_ts == world.ts(12, 15)
    # The whole purchase history follows the same rule.
    assert (list(early.bought_item_ids), list(early.bought_item_counts)) == (["i1"], [1])
    assert (list(late.bought_item_ids), list(late.bought_item_counts)) == (["i1"], [2])


def test_purchase_exactly_at_the_cutoff_belongs_to_the_future(world: World) -> None:
    frame = _features(world, [("p2", world.at(14)), ("p2", world.at(7))])
    at_cutoff, later = frame.iloc[0], frame.iloc[1]
    assert (at_cutoff.purchases_1d, at_cutoff.purchases_7d, at_cutoff.purchases_total) == (0, 0, 0)
    assert _value(at_cutoff.last_purchase_ts) is None
    assert at_cutoff.last_event_ts == world.ts(20, 9)
    assert (later.purchases_7d, later.purchases_total) == (1, 1)
    assert later.last_purchase_ts == world.ts(14)


def test_cutoffs_between_snapshots_see_exact_values(world: World) -> None:
    # p1 has no snapshot at A-13: Feast joins the A-17 row, which is still exact at A-13.
    # At A-12 the purchase made later that day (15:00) is not yet known; at A-11 it is.
    frame = _features(world, [("p1", world.at(13)), ("p1", world.at(12)), ("p1", world.at(11))])
    assert frame["purchases_total"].tolist() == [1, 1, 2]
    assert frame["purchases_1d"].tolist() == [0, 0, 1]
    assert frame["views_7d"].tolist() == [1, 0, 0]  # the A-20 view leaves the 7 days at A-12
    assert frame["last_purchase_ts"].tolist() == [world.ts(25, 10), world.ts(25, 10), world.ts(12, 15)]


def test_user_without_history_at_a_cutoff_gets_nulls_not_later_values(world: World) -> None:
    # Before p3's first event there is no row at all; Feast must not borrow a later one.
    frame = _features(world, [("p3", world.at(21)), ("p3", world.at(14))])
    assert _value(frame.iloc[0].views_30d) is None
    assert _value(frame.iloc[0].last_event_ts) is None
    assert frame.iloc[1].views_30d == 1


def test_entity_rows_label_the_horizon_containing_the_purchase(world: World) -> None:
    rows = entity_rows(world.prepared_dir, [world.at(14), world.at(7)], TrainingSettings())
    labels = {
        (r.user_id, r.event_timestamp.to_pydatetime()): (int(r.label), list(r.bought_items))
        for r in rows.itertuples()
    }
    assert labels == {
        ("p1", world.at(14)): (1, ["i1"]),  # bought A-12, inside
        ("p2", world.at(14)): (1, ["i2"]),  # bought exactly at A-14: the horizon includes its start
        ("p3", world.at(14)): (0, []),
        ("p1", world.at(7)): (0, []),
        ("p2", world.at(7)): (0, []),
        ("p3", world.at(7)): (0, []),
    }


def test_training_rows_and_labels_never_share_an_event(world: World) -> None:
    rows = entity_rows(world.prepared_dir, [world.at(14), world.at(7)], TrainingSettings())
    frame = historical_user_features(world.store, rows, SERVICE)
    for feature, label in zip(frame.itertuples(), rows.itertuples()):
        if label.label:
            # Every purchase that makes the label is at or after the cut-off, so not in the features.
            assert _value(feature.last_purchase_ts) is None or feature.last_purchase_ts < feature.event_timestamp.timestamp()


def test_online_store_serves_the_as_of_snapshot(world: World) -> None:
    service = world.store.get_feature_service(SERVICE)
    online = world.store.get_online_features(
        features=service, entity_rows=[{"user_id": "p1"}, {"user_id": "p2"}, {"user_id": "nobody"}]
    ).to_dict()
    assert online["user_id"] == ["p1", "p2", "nobody"]
    assert online["purchases_total"] == [2, 1, None]
    assert online["purchases_7d"] == [0, 0, None]
    assert online["purchases_30d"] == [2, 1, None]
    assert online["bought_item_ids"] == [["i1"], ["i2"], None]
    assert online["bought_item_counts"] == [[2], [1], None]
    assert online["views_1d"] == [1, 0, None]
    assert online["last_purchase_ts"] == [world.ts(12, 15), world.ts(14), None]
    assert online["last_event_ts"] == [world.ts(1, 10), world.ts(14), None]
    assert online["age"] == [30.0, 41.0, None]
    assert online["recent_item_ids"][0] == ["i2", "i1"]


def test_online_values_equal_the_offline_row_at_as_of(world: World) -> None:
    service = world.store.get_feature_service(SERVICE)
    online = world.store.get_online_features(features=service, entity_rows=[{"user_id": "p1"}]).to_dict()
    offline = _features(world, [("p1", world.as_of)]).iloc[0]
    for name in ("views_7d", "views_30d", "purchases_30d", "spend_30d", "sessions_30d", "last_event_ts", "first_event_ts"):
        assert online[name][0] == _value(offline[name]), name
