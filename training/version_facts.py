"""What a trained version records about its inputs: the feature services and their fingerprints, the sensitive attributes, the data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import duckdb
import pandas as pd
from feast import FeatureStore

from propensity.feature_store import service_fingerprint, service_schema
from propensity.settings import Settings
from propensity.user_state import read_inputs
from training.prepare import PreparedData


def current_services(settings: Settings, store: FeatureStore) -> dict[str, dict[str, str]]:
    return {
        "user": {"name": settings.user_feature_service, "fingerprint": service_fingerprint(store, settings.user_feature_service)},
        "item": {"name": settings.item_feature_service, "fingerprint": service_fingerprint(store, settings.item_feature_service)},
    }


def sensitive_inputs(settings: Settings, store: FeatureStore) -> dict[str, list[str]]:
    """Which of training.sensitive_attributes the user feature service serves, and which of those the models read."""
    served = {feature for _, feature, _ in service_schema(store, settings.user_feature_service)}
    sensitive = settings.training.sensitive_attributes
    return {
        "sensitive_attributes": list(sensitive),
        "served": [a for a in sensitive if a in served],
        "model_inputs": [a for a in sensitive if a in read_inputs(served)],
    }


def minimised_user_service(store: FeatureStore, service: str, sensitive: Sequence[str]) -> str:
    """The user feature service serving exactly what `service` serves without the sensitive attributes (`service` itself if it serves none).

    Leaving an attribute out is a feature-service change, so it is a published `_vN` (propensity_user_v3 is v2 without
    gender and age), never an edit of a live service; without one, this says so.
    """
    schema = service_schema(store, service)
    wanted = sorted(entry for entry in schema if entry[1] not in sensitive)
    if len(wanted) == len(schema):
        return service
    for candidate in sorted(s.name for s in store.list_feature_services()):
        if sorted(service_schema(store, candidate)) == wanted:
            return candidate
    raise ValueError(
        f"no feature service serves {service!r} without {sorted(set(sensitive) & {e[1] for e in schema})}; "
        "publish one as a new _vN in feature_repo/feature_services.py"
    )


def data_fingerprint(prepared: PreparedData) -> dict:
    """Count, time range, per-type counts and an order-independent content hash of the prepared events."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    path = prepared.directory / "events.parquet"
    n, first, last, content = con.execute(
        f"SELECT count(*), min(event_time), max(event_time), sum(hash(user_id, item_id, event_type, epoch_us(event_time)) % 1000000007) "
        f"FROM read_parquet('{path}')"
    ).fetchone()
    by_type = dict(con.execute(f"SELECT event_type, count(*) FROM read_parquet('{path}') GROUP BY 1 ORDER BY 1").fetchall())
    con.close()
    summary = {
        "source": prepared.source,
        "n_events": int(n),
        "min_event_time": pd.Timestamp(first).isoformat() if first is not None else None,
        "max_event_time": pd.Timestamp(last).isoformat() if last is not None else None,
        "events_by_type": {k: int(v) for k, v in by_type.items()},
        "shift_days": prepared.shift_days,
        "content_hash": int(content or 0),
    }
    summary["fingerprint"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]
    return summary
