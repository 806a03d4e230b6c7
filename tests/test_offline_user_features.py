"""The streamed point-in-time read against Feast's rule written out by hand, on generated snapshot tables.

Feast's rule for entity rows at one timestamp `at` (feast/infra/offline_stores/ibis.py point_in_time_join): per
view, the user's row with the latest event_timestamp <= at and event_timestamp + ttl >= at, ties broken by the
latest created timestamp; no such row: nulls. The tables here have rows at arbitrary times (not only midnights),
users with rows only in the future, only past the TTL or none at all, tied timestamps, and a view without a TTL;
both search strategies (newest-first windows for snapshot tables, one pass for small tables) are exercised.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training import offline_user_features as offline

T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)
USERS = [f"u{k:03d}" for k in range(160)]


def _snapshots(rng: np.random.Generator, created: bool) -> pd.DataFrame:
    rows = []
    for k, user in enumerate(USERS[:140]):  # the last 20 users have no row at all
        n = int(rng.integers(1, 40))
        days = rng.uniform(0, 200, size=n)
        if created and k % 7 == 0:
            days = np.append(days, days[0])  # a tied timestamp: the later created row wins (without created: undefined)
        for j, day in enumerate(days):
            rows.append({
                "user_id": user, "event_timestamp": T0 + timedelta(days=float(day)),
                "score": float(rng.normal()), "items": [f"i{x}" for x in rng.integers(0, 50, size=int(rng.integers(0, 4)))],
                **({"created": T0 + timedelta(days=float(day), seconds=j)} if created else {}),
            })
    frame = pd.DataFrame(rows).sort_values("event_timestamp", kind="stable")  # build-features writes tables sorted by time
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    if created:
        frame["created"] = pd.to_datetime(frame["created"], utc=True)
    return frame.reset_index(drop=True)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=97)  # many row groups
    return path


def _feast_rule(frame: pd.DataFrame, users: list[str], at: datetime, ttl: timedelta | None, created: bool) -> pd.DataFrame:
    valid = frame[frame["event_timestamp"] <= at]
    if ttl:
        valid = valid[valid["event_timestamp"] + ttl >= at]
    order = ["event_timestamp", "created"] if created else ["event_timestamp"]
    latest = valid.sort_values(["user_id", *order]).groupby("user_id").tail(1).set_index("user_id")
    return latest.reindex(users)[["score", "items"]]


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pd.DataFrame, offline.ViewTable]]:
    root = tmp_path_factory.mktemp("offline")
    rng = np.random.default_rng(42)
    out = {}
    for name, ttl, created in (("with_ttl", timedelta(days=30), True), ("no_ttl", None, False)):
        frame = _snapshots(rng, created)
        view = offline.ViewTable(name, _write(frame, root / f"{name}.parquet"), "user_id", "event_timestamp", "created" if created else None,
                                 (("score", f"{name}_score"), ("items", f"{name}_items")), ttl)
        out[name] = (frame, view)
    return out


@pytest.mark.parametrize("rows_per_user", [0, 10_000], ids=["newest-first windows", "one pass"])
@pytest.mark.parametrize("days", [-5.0, 0.3, 17.25, 60.0, 133.7, 199.99, 260.0])
def test_streamed_rows_follow_feasts_point_in_time_rule(tables, monkeypatch: pytest.MonkeyPatch, rows_per_user: int, days: float) -> None:
    monkeypatch.setattr(offline, "_ROWS_PER_USER_FOR_WINDOWS", rows_per_user)
    at = T0 + timedelta(days=days)
    users = USERS[::-1] + ["stranger"]
    con = offline.connect()
    assert offline.set_users(con, users) == len(users)
    batches = list(offline.user_feature_batches(con, [view for _, view in tables.values()], at, rows_per_batch=37))
    got = pa.Table.from_batches(batches).to_pandas().set_index("user_id")
    assert got.index.tolist() == sorted(users)  # every user once, in id order
    assert max(b.num_rows for b in batches) <= 37
    for name, (frame, view) in tables.items():
        expected = _feast_rule(frame, sorted(users), at, view.ttl, view.created is not None)
        np.testing.assert_array_equal(got[f"{name}_score"].to_numpy(), expected["score"].to_numpy(), err_msg=name)
        assert [list(v) if v is not None else None for v in got[f"{name}_items"]] == [
            list(v) if isinstance(v, list) else None for v in expected["items"]
        ], name
    if 15 < days < 190:
        assert got["with_ttl_score"].notna().sum() > 20 and got["with_ttl_score"].isna().sum() > 20  # both cases occur


def test_active_users_from_the_event_log(tmp_path: Path) -> None:
    events = pd.DataFrame({
        "user_id": ["a", "b", "b", "c", "d"],
        "event_time": pd.to_datetime(["2026-05-01", "2026-06-01", "2026-06-09", "2026-06-10", "2026-02-01"], utc=True),
    })
    events.to_parquet(tmp_path / "events.parquet")
    con = offline.connect()
    # Events strictly before `at`, within the history window: b and a; c is at `at` itself, d too old.
    assert offline.set_users(con, events=tmp_path / "events.parquet", at=datetime(2026, 6, 10, tzinfo=timezone.utc), history_days=45) == 2
    assert con.execute("SELECT user_id, _u FROM _users ORDER BY _u").fetchall() == [("a", 1), ("b", 2)]
