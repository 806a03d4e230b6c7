"""DuckDB connections for the offline stages: UTC, a memory cap, and spilling to disk beyond it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import duckdb


def connect(memory_limit_gb: float, spill_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that keeps under memory_limit_gb by spilling to spill_dir (a log of any size fits)."""
    spill_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET memory_limit = '{memory_limit_gb:g}GB'")
    con.execute(f"SET temp_directory = '{spill_dir}'")
    # Every query that needs an order says so (ORDER BY); without this DuckDB buffers to keep file order.
    con.execute("SET preserve_insertion_order = false")
    return con


class Connection(Protocol):
    """What the feature builders use of a connection: DuckDB's own, or training.spark_engine.SparkConnection."""

    def execute(self, sql: str) -> Any: ...

    def register(self, name: str, table: Any) -> Any: ...

    def unregister(self, name: str) -> Any: ...

    def close(self) -> None: ...
