"""features.engine = "spark": the same feature tables as DuckDB, row for row and value for value.

Both engines build every table from the same prepared log; each table is sorted by its keys and
compared cell by cell (floats and float lists within 1e-9). The snapshot rules (which boundaries
exist, what each row may see) are part of the tables, so they are compared too. On the demo log
and on the UCI Online Retail log (../shared/data/uci_online_retail, imported through the CLI).
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from propensity.demo import DemoDataConfig, generate_demo_data
from propensity.settings import FeatureSettings
from tests.conftest import BIN, PROJECT_ROOT
from training.feature_build import ITEM_BUILDERS, USER_BUILDERS, build_features
from training.prepare import prepare
from training.spark_engine import to_spark_sql

pytestmark = pytest.mark.slow

TABLES = [name for name, _ in ITEM_BUILDERS + USER_BUILDERS]
KEYS = {name: ["item_id" if name.startswith("item_") else "user_id", "event_timestamp"] for name in TABLES}
UCI = PROJECT_ROOT.parent / "shared" / "data" / "uci_online_retail" / "online_retail.csv.gz"
# Small on purpose: 2 shared cores. Spark in one local JVM with few shuffle partitions.
SPARK = {"spark.sql.shuffle.partitions": "4", "spark.ui.enabled": "false", "spark.driver.memory": "2g"}
UCI_CUSTOMERS = 150  # the UCI sample: these many customers (all their events), so the test stays in minutes


def _quiet(_: str) -> None:
    pass


def _build_both(prepared_dir: Path, root: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    prepared = prepare(prepared_dir.parent / "raw", prepared_dir, progress=_quiet)
    settings = FeatureSettings(retrieval_snapshots=3, als_iterations=5)
    build_features(prepared_dir, root / "duckdb", prepared.as_of, prepared.event_types, settings, progress=_quiet)
    spark = settings.model_copy(update={"engine": "spark", "spark_master": "local[2]", "spark_conf": SPARK})
    build_features(prepared_dir, root / "spark", prepared.as_of, prepared.event_types, spark, progress=_quiet)
    return {name: (pd.read_parquet(root / "duckdb" / f"{name}.parquet"), pd.read_parquet(root / "spark" / f"{name}.parquet")) for name in TABLES}


def _same_value(a: object, b: object) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    if isinstance(a, (list, tuple, np.ndarray)):
        return b is not None and not isinstance(b, float) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (float, np.floating)) or isinstance(b, (float, np.floating)):
        return b is not None and not (isinstance(b, float) and math.isnan(b)) and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, pd.Timestamp) or isinstance(b, pd.Timestamp):
        return pd.Timestamp(a) == pd.Timestamp(b)
    return a == b


def _assert_same_table(name: str, duck: pd.DataFrame, spark: pd.DataFrame) -> None:
    assert list(spark.columns) == list(duck.columns), f"{name}: columns differ"
    assert len(spark) == len(duck), f"{name}: {len(spark)} rows on Spark, {len(duck)} on DuckDB"
    assert len(duck) > 0, f"{name}: empty, so the comparison proves nothing"
    keys = KEYS[name]
    duck = duck.sort_values(keys, kind="stable").reset_index(drop=True)
    spark = spark.sort_values(keys, kind="stable").reset_index(drop=True)
    assert not duck.duplicated(keys).any(), f"{name}: keys {keys} are not unique"
    for column in duck.columns:
        left, right = duck[column].astype(object).tolist(), spark[column].astype(object).tolist()
        bad = [i for i, (a, b) in enumerate(zip(left, right)) if not _same_value(a, b)]
        assert not bad, f"{name}.{column}: {len(bad)} rows differ, first at {duck.loc[bad[0], keys].tolist()}: DuckDB {left[bad[0]]!r} vs Spark {right[bad[0]]!r}"


@pytest.fixture(scope="module")
def demo_tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("spark-demo")
    end = datetime(2011, 12, 10, tzinfo=timezone.utc)
    generate_demo_data(root / "raw", DemoDataConfig(n_users=300, n_items=80, n_categories=6, n_days=40, seed=5, end_time=end), progress=None)
    return _build_both(root / "prepared", root)


@pytest.mark.parametrize("name", TABLES)
def test_demo_log_same_tables(demo_tables, name: str) -> None:
    _assert_same_table(name, *demo_tables[name])


def test_demo_snapshot_rules_hold_on_spark(demo_tables) -> None:
    """Not only equal: the Spark table keeps the snapshot rules (a 1d window is 0 the day after the active day leaves it)."""
    _, spark = demo_tables["user_activity"]
    assert spark["event_timestamp"].dt.tz is not None and (spark["event_timestamp"].dt.hour == 0).all()
    assert (spark["views_1d"] <= spark["views_7d"]).all() and (spark["views_7d"] <= spark["views_30d"]).all()


@pytest.fixture(scope="module")
def uci_tables(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    if not UCI.exists():
        pytest.skip(f"UCI Online Retail log not present at {UCI}")
    root = tmp_path_factory.mktemp("spark-uci")
    result = subprocess.run([str(BIN / "propensity"), "import", "uci-online-retail", "--source", str(UCI), "--out", str(root / "full")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _sample(root / "full", root / "raw", UCI_CUSTOMERS)
    yield _build_both(root / "prepared", root)


def _sample(full: Path, out: Path, n_users: int) -> None:
    """The first n_users customers by id with all their events, and the items they touched."""
    out.mkdir(parents=True)
    events = pd.read_parquet(full / "events.parquet")
    users = sorted(events["user_id"].dropna().unique())[:n_users]
    events = events[events["user_id"].isin(users)]
    events.to_parquet(out / "events.parquet", index=False)
    for extra, key, keep in (("items.parquet", "item_id", events["item_id"]), ("users.parquet", "user_id", users)):
        if (full / extra).exists():
            frame = pd.read_parquet(full / extra)
            frame[frame[key].isin(keep)].to_parquet(out / extra, index=False)


@pytest.mark.parametrize("name", TABLES)
def test_uci_log_same_tables(uci_tables, name: str) -> None:
    _assert_same_table(name, *uci_tables[name])


def test_ordered_lists_keep_order_and_nulls(tmp_path: Path) -> None:
    """list(x ORDER BY k DESC, j) must not become Spark's unordered, NULL-dropping collect_list: same lists as DuckDB."""
    import duckdb

    from training.spark_engine import SparkConnection, spark_session

    rows = [("g", "a", 2, "z"), ("g", None, 3, "y"), ("g", "c", 2, "b"), ("g", "d", None, "a"), ("h", "e", 1, "a")]
    duck = duckdb.connect()
    duck.execute("CREATE TABLE t AS SELECT * FROM (VALUES " + ", ".join(
        "(" + ", ".join("NULL" if v is None else repr(v) for v in r) + ")" for r in rows) + ") v(g, x, k, j)")
    sql = "SELECT g, list(x ORDER BY k DESC, j) AS xs, list(k ORDER BY j) AS ks FROM t GROUP BY g ORDER BY g"
    expected = duck.execute(sql).fetchall()
    assert expected[0][1] == [None, "c", "a", "d"]  # DuckDB: NULL kept, NULL key last

    spark = SparkConnection(spark_session("local[2]", SPARK), tmp_path / "scratch")
    spark.session.createDataFrame(rows, "g string, x string, k long, j string").createOrReplaceTempView("t")
    got = [(g, list(xs), list(ks)) for g, xs, ks in spark.execute(sql).fetchall()]
    assert got == [(g, list(xs), list(ks)) for g, xs, ks in expected]
    assert "COLLECT_LIST(x)" not in to_spark_sql(sql)
