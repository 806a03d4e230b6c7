"""The feature build's SQL on Apache Spark: DuckDB-dialect statements transpiled (sqlglot) and run on a SparkSession.

The builders in training/ write their SQL once, in DuckDB's dialect, against a connection with
DuckDB's surface (`execute(sql)` returning something with fetchone/fetchall/df, `register`,
`unregister`, `close`). SparkConnection offers that surface on Spark: every statement is parsed
as DuckDB SQL, a few constructs whose DuckDB meaning sqlglot does not carry over are rewritten
(below, each with why), and the result runs as Spark SQL. A `CREATE TEMP TABLE` is materialized
as Parquet under a scratch directory and re-read as a temp view, so each stage's plan starts from
files (like DuckDB's temp tables) instead of growing one lineage over the whole build.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp

# Spark properties every feature build needs, whatever the cluster: UTC like duck.connect, and
# Parquet timestamps as INT64 microseconds (Spark's INT96 default is not what Feast/pyarrow expect).
BASE_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.ui.showConsoleProgress": "false",
    # An implicit cross join with the one-row params table is part of the SQL (FROM ev, params).
    "spark.sql.crossJoin.enabled": "true",
    # Results the driver reads (ALS inputs, fetches) and frames it registers travel as Arrow, not pickled rows.
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def spark_session(master: str, conf: Mapping[str, str] | None = None, app_name: str = "propensity-features") -> Any:
    """A SparkSession on `master` with BASE_CONF plus `conf` (conf wins); getOrCreate reuses a running one."""
    from pyspark.sql import SparkSession

    # Python workers (Arrow conversions, Feast's materialization) run this interpreter unless told otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in {**BASE_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def to_spark_sql(sql: str, star_columns: Any = None) -> str:
    """One DuckDB-dialect query as Spark SQL; star_columns(alias_table) -> column names expands `t.* EXCLUDE (...)`."""
    tree = sqlglot.parse_one(sql, read="duckdb")
    return _spark_tree(tree, star_columns).sql(dialect="spark")


def _spark_tree(tree: exp.Expression, star_columns: Any = None) -> exp.Expression:
    if star_columns is not None:
        tree = _expand_star_excludes(tree, star_columns)
    tree = tree.transform(lambda node: _asof_to_range_join(node) if isinstance(node, exp.Select) else node)
    return tree.transform(_rewrite)


def _asof_to_range_join(select: exp.Select) -> exp.Expression:
    """`A ASOF JOIN R r ON <equalities> AND a.x >= r.y` (Spark has none): the inner range join, keeping per
    (equality keys, a.x) only the right rows with the largest r.y (the smallest for <=).

    DuckDB keeps its ASOF JOIN (faster there than any portable form measured); on Spark the range join
    costs snapshots x earlier active days per user, which is fine for daily snapshots of one entity.
    """
    for join in select.args.get("joins") or []:
        if (join.args.get("method") or "").upper() != "ASOF":
            continue
        alias = join.alias_or_name
        condition = join.args["on"]
        parts = list(condition.flatten()) if isinstance(condition, exp.And) else [condition]
        keys, order = [], None
        for part in parts:
            sides = (part.this, part.expression)
            right = [side for side in sides if isinstance(side, exp.Column) and side.table == alias]
            left = [side for side in sides if side not in right]
            if isinstance(part, exp.EQ) and right and left:
                keys.append(left[0].copy())
            elif isinstance(part, (exp.GTE, exp.GT, exp.LTE, exp.LT)) and right and left:
                latest = isinstance(part, (exp.GTE, exp.GT)) == (part.this is left[0])  # a.x >= r.y: the largest r.y
                order = (left[0].copy(), right[0].copy(), "MAX" if latest else "MIN")
        if order is None:
            raise ValueError(f"ASOF JOIN without an inequality on {alias}: no Spark form in training.spark_engine")
        point, target, pick = order
        keys.append(point)
        names = [projection.alias_or_name for projection in select.expressions]
        join.set("method", None)
        inner = select.copy()
        inner.select(exp.alias_(target, "_asof_y"), copy=False)
        inner.select(f"{pick}({target.sql('spark')}) OVER (PARTITION BY {', '.join(k.sql('spark') for k in keys)}) AS _asof_w",
                     dialect="spark", copy=False)
        return exp.select(*names).from_(inner.subquery("_asof")).where("_asof_y = _asof_w")
    return select


def _rewrite(node: exp.Expression) -> exp.Expression:
    # list(x ORDER BY k) keeps its order and its NULLs in DuckDB; Spark's collect_list has no order and drops NULLs.
    if isinstance(node, exp.ArrayAgg):
        return _ordered_list(node)
    # epoch() is DOUBLE seconds in DuckDB and ::BIGINT rounds half to even; UNIX_TIMESTAMP would truncate.
    if isinstance(node, exp.Cast) and isinstance(node.this, exp.TimeToUnix) and node.to.is_type("bigint"):
        return sqlglot.parse_one(f"CAST(BROUND(UNIX_MICROS({node.this.this.sql('spark')}) / 1000000.0D, 0) AS BIGINT)", read="spark")
    if isinstance(node, exp.TimeToUnix):
        return sqlglot.parse_one(f"(UNIX_MICROS({node.this.sql('spark')}) / 1000000.0D)", read="spark")
    # to_timestamp(seconds): FROM_UNIXTIME goes through a formatted string in the session zone (whole seconds only).
    if isinstance(node, exp.UnixToTime):
        return exp.Anonymous(this="TIMESTAMP_SECONDS", expressions=[node.this])
    # 60.0 is a DECIMAL in both, but DuckDB divides it as DOUBLE and Spark keeps a DECIMAL result.
    if isinstance(node, exp.Literal) and not node.is_string and re.search(r"[.eE]", node.this):
        return exp.cast(node.copy(), exp.DataType.build("double"))
    return node


def _ordered_list(node: exp.ArrayAgg) -> exp.Expression:
    inner = node.this
    if isinstance(inner, exp.Order):
        value, keys = inner.this, list(inner.expressions)
    else:
        value, keys = inner, []
    fields = ", ".join([f"'v', {value.sql('spark')}"] + [f"'k{i}', {k.this.sql('spark')}" for i, k in enumerate(keys)])
    collected = f"COLLECT_LIST(NAMED_STRUCT({fields}))"  # a struct is never NULL, so NULL values are kept
    if keys:
        cases = []
        for i, key in enumerate(keys):
            less, more = ("1", "-1") if key.args.get("desc") else ("-1", "1")
            null, value = ("-1", "1") if key.args.get("nulls_first") else ("1", "-1")  # DuckDB's default: NULLS LAST either way
            cases.append(
                f"WHEN l.k{i} IS NULL AND r.k{i} IS NOT NULL THEN {null} WHEN l.k{i} IS NOT NULL AND r.k{i} IS NULL THEN {value} "
                f"WHEN l.k{i} < r.k{i} THEN {less} WHEN l.k{i} > r.k{i} THEN {more}"
            )
        collected = f"ARRAY_SORT({collected}, (l, r) -> CASE {' '.join(cases)} ELSE 0 END)"
    return sqlglot.parse_one(f"TRANSFORM({collected}, e -> e.v)", read="spark")


def _expand_star_excludes(tree: exp.Expression, star_columns: Any) -> exp.Expression:
    """`a.* EXCLUDE (x, y)` (Spark has no EXCEPT on a star) spelled out from the table's columns in Spark's catalog."""
    for select in list(tree.find_all(exp.Select)):
        aliases = {}
        for table in select.find_all(exp.Table):
            if isinstance(table.this, exp.Identifier):
                aliases[table.alias_or_name] = table.name
        expanded = []
        for projection in select.expressions:
            star = projection.this if isinstance(projection, exp.Column) else projection
            if isinstance(star, exp.Star) and star.args.get("except_"):
                qualifier = projection.table if isinstance(projection, exp.Column) else ""
                excluded = {c.name.lower() for c in star.args["except_"]}
                names = star_columns(aliases.get(qualifier, qualifier))
                expanded += [exp.column(n, table=qualifier or None) for n in names if n.lower() not in excluded]
            else:
                expanded.append(projection)
        select.set("expressions", expanded)
    return tree


class SparkResult:
    """The part of DuckDB's result surface the builders use."""

    def __init__(self, frame: Any) -> None:
        self._frame = frame

    def fetchall(self) -> list[tuple]:
        return [tuple(row) for row in self._frame.collect()] if self._frame is not None else []

    def fetchone(self) -> tuple | None:
        rows = self._frame.take(1) if self._frame is not None else []
        return tuple(rows[0]) if rows else None

    def df(self) -> pd.DataFrame:
        return self._frame.toPandas()


_COPY = re.compile(r"^\s*COPY\s*\((?P<query>.*)\)\s*TO\s*'(?P<path>[^']+)'\s*\(\s*FORMAT\s+PARQUET\s*\)\s*$", re.S | re.I)


class SparkConnection:
    """DuckDB's connection surface (execute/register/unregister/close) over a SparkSession; temp tables live in scratch_dir."""

    dialect = "spark"

    def __init__(self, session: Any, scratch_dir: Path) -> None:
        self.session = session
        self.scratch_dir = scratch_dir
        scratch_dir.mkdir(parents=True, exist_ok=True)
        self._views: set[str] = set()

    def execute(self, sql: str) -> SparkResult:
        copy = _COPY.match(sql)
        if copy:
            self._copy(copy["query"], Path(copy["path"]))
            return SparkResult(None)
        tree = sqlglot.parse_one(sql, read="duckdb")
        if isinstance(tree, exp.Create):
            self._create(tree)
            return SparkResult(None)
        if isinstance(tree, exp.Alter) and isinstance(tree.args["actions"][0], exp.AlterRename):
            self._rename(tree.this.name, tree.args["actions"][0].this.name)
            return SparkResult(None)
        return SparkResult(self._query(tree))

    def register(self, name: str, table: pa.Table) -> None:
        """An Arrow table as temp view `name` (the non-SQL steps' results, e.g. ALS factors)."""
        from pyspark.sql.pandas.types import from_arrow_schema

        frame = self.session.createDataFrame(table) if table.num_rows else self.session.createDataFrame([], schema=from_arrow_schema(table.schema))
        frame.createOrReplaceTempView(name)
        self._views.add(name)

    def unregister(self, name: str) -> None:
        self.session.catalog.dropTempView(name)
        self._views.discard(name)

    def close(self) -> None:
        for name in list(self._views):
            self.session.catalog.dropTempView(name)
        self._views.clear()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def _query(self, tree: exp.Expression) -> Any:
        return self.session.sql(_spark_tree(tree, self._columns).sql(dialect="spark"))

    def _columns(self, table: str) -> list[str]:
        return self.session.table(table).columns

    def _create(self, tree: exp.Create) -> None:
        name = tree.this.name
        frame = self._query(tree.expression)
        if tree.args["kind"].upper() == "VIEW":
            frame.createOrReplaceTempView(name)
        else:
            self._materialize(frame, name)
        self._views.add(name)

    def _materialize(self, frame: Any, name: str) -> None:
        # Files, not cache(): a table larger than memory spills to disk like DuckDB's, and the next plan starts here.
        path = self.scratch_dir / f"{name}-{uuid.uuid4().hex[:8]}"
        frame.write.parquet(str(path))
        stored = self.session.read.schema(frame.schema).parquet(str(path))
        stored.createOrReplaceTempView(name)

    def _rename(self, old: str, new: str) -> None:
        self.session.table(old).createOrReplaceTempView(new)
        self.session.catalog.dropTempView(old)
        self._views.discard(old)
        self._views.add(new)

    def _copy(self, query: str, path: Path) -> None:
        """COPY (query) TO 'file' (FORMAT PARQUET): one Parquet file in the query's order, like DuckDB's."""
        frame = self._query(sqlglot.parse_one(query, read="duckdb"))
        staging = path.with_name(path.name + ".spark")
        shutil.rmtree(staging, ignore_errors=True)
        frame.coalesce(1).write.parquet(str(staging))  # coalesce keeps a sorted frame's order
        parts = sorted(staging.glob("part-*.parquet"))
        if parts:
            parts[0].replace(path)
        else:  # an empty table: Spark may write no part file at all
            pq.write_table(_arrow_schema(frame).empty_table(), path)
        shutil.rmtree(staging, ignore_errors=True)


def _arrow_schema(frame: Any) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(frame.schema)
