"""Offline sources: Parquet feature tables written by `propensity build-features`."""

import os
import sys
from pathlib import Path

import yaml
from feast import FileSource, PushSource

# Absolute paths: Feast's DuckDB offline store resolves relative ones against the working
# directory, not the repository, so `feast materialize` would depend on where it was run from.
OFFLINE_DIR = Path(__file__).resolve().parent / "data" / "offline"


def _offline_store_type() -> str:
    """The offline store of the feature_store.yaml `feast apply` runs with (-f/--feature-store-yaml, else the repo's)."""
    args = sys.argv[1:]
    named = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-f", "--feature-store-yaml")), None)
    named = named or next((a.split("=", 1)[1] for a in args if a.startswith("--feature-store-yaml=")), None)
    path = Path(named or os.environ.get("FEAST_FS_YAML_FILE_PATH") or Path(__file__).resolve().parent / "feature_store.yaml")
    try:
        store = (yaml.safe_load(path.read_text()) or {}).get("offline_store") or {}
    except OSError:
        return "duckdb"
    return str(store.get("type", "duckdb")) if isinstance(store, dict) else str(store)


# The spark profile (profiles/spark.yaml) reads the same Parquet tables through SparkSources; the
# view definitions do not change. PROPENSITY_OFFLINE_SOURCE=spark|file overrides the yaml's choice.
_SPARK = (os.environ.get("PROPENSITY_OFFLINE_SOURCE") or ("spark" if _offline_store_type() == "spark" else "file")) == "spark"


def _source(*, name: str, path: str, timestamp_field: str, description: str, tags: dict[str, str]):
    """A Feast FileSource, or under the spark profile a SparkSource over the same Parquet file."""
    if _SPARK:
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(name=name, path=path, file_format="parquet", timestamp_field=timestamp_field, description=description, tags=tags)
    return FileSource(name=name, path=path, timestamp_field=timestamp_field, description=description, tags=tags)

# One table per feature view; each row is a snapshot valid from event_timestamp on.
user_activity_source = _source(
    name="user_activity_source",
    path=str(OFFLINE_DIR / "user_activity.parquet"),
    timestamp_field="event_timestamp",
    description="Per-user activity aggregates, snapshotted whenever a window changes.",
    tags={"owner": "propensity-team"},
)

user_profile_source = _source(
    name="user_profile_source",
    path=str(OFFLINE_DIR / "user_profile.parquet"),
    timestamp_field="event_timestamp",
    description="User attributes from the users file.",
    tags={"owner": "propensity-team"},
)

user_interests_source = _source(
    name="user_interests_source",
    path=str(OFFLINE_DIR / "user_interests.parquet"),
    timestamp_field="event_timestamp",
    description="A user's favourite categories and recent items with per-item counts.",
    tags={"owner": "propensity-team"},
)

user_purchase_history_source = _source(
    name="user_purchase_history_source",
    path=str(OFFLINE_DIR / "user_purchase_history.parquet"),
    timestamp_field="event_timestamp",
    description="The items a user has bought over the whole log, most bought first.",
    tags={"owner": "propensity-team"},
)

item_stats_source = _source(
    name="item_stats_source",
    path=str(OFFLINE_DIR / "item_stats.parquet"),
    timestamp_field="event_timestamp",
    description="Item attributes, popularity and conversion.",
    tags={"owner": "propensity-team"},
)

item_neighbors_source = _source(
    name="item_neighbors_source",
    path=str(OFFLINE_DIR / "item_neighbors.parquet"),
    timestamp_field="event_timestamp",
    description="Items co-visited with each item in the same sessions (weekly).",
    tags={"owner": "propensity-team"},
)

item_factors_source = _source(
    name="item_factors_source",
    path=str(OFFLINE_DIR / "item_factors.parquet"),
    timestamp_field="event_timestamp",
    description="ALS item factors fitted on the interactions before each weekly snapshot.",
    tags={"owner": "propensity-team"},
)

item_copurchase_source = _source(
    name="item_copurchase_source",
    path=str(OFFLINE_DIR / "item_copurchase.parquet"),
    timestamp_field="event_timestamp",
    description="Items bought or carted by the same shoppers, time-decayed and BM25-weighted (weekly).",
    tags={"owner": "propensity-team"},
)

item_content_source = _source(
    name="item_content_source",
    path=str(OFFLINE_DIR / "item_content.parquet"),
    timestamp_field="event_timestamp",
    description="Most similar items by title words, category, brand and price band.",
    tags={"owner": "propensity-team"},
)

# Streaming: the server pushes real-time updates of these views as events arrive (IngestEvents).
# A push source names its batch source, so history and materialization still read the Parquet tables.
user_activity_push = PushSource(
    name="user_activity_push",
    batch_source=user_activity_source,
    description="Real-time user activity updates from ingested events.",
    tags={"owner": "propensity-team"},
)

user_interests_push = PushSource(
    name="user_interests_push",
    batch_source=user_interests_source,
    description="Real-time recent-item and in-cart updates from ingested events.",
    tags={"owner": "propensity-team"},
)

user_purchase_history_push = PushSource(
    name="user_purchase_history_push",
    batch_source=user_purchase_history_source,
    description="Real-time bought-item updates from ingested purchases.",
    tags={"owner": "propensity-team"},
)
