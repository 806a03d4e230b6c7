"""SQL pieces shared by the feature tables: null-aware window counts and snapshot boundaries."""

from __future__ import annotations

DAY_SECONDS = 86_400
WINDOW_LENGTHS = (1, 7, 30)  # the feature names in feature_repo/feature_views.py spell these out
NEIGHBOR_WEEKS = 4  # co-visitation window, in whole weeks

# Which feature is computed from which event type: absent types give NULL, never a fake 0.
_COUNTS = {
    "views": "view",
    "carts": "add_to_cart",
    "purchases": "purchase",
    "returns": "return",
}


def count_expr(kind: str, event_types: frozenset[str], window: int) -> str:
    """Sum of a per-day count over the window ending at snapshot s.b; NULL when the shop never records it."""
    if _COUNTS[kind] not in event_types:
        return "NULL::BIGINT"
    return f"coalesce(sum({kind}) FILTER (WHERE d.day >= s.b - {window}), 0)::BIGINT"


def snapshot_boundaries(source: str, key: str, offsets: tuple[int, ...], everyone: str) -> str:
    """SQL for (key, b): day boundaries where a window over `source`'s active days changes, plus as-of for everyone."""
    unions = " UNION ".join(f"SELECT {key}, day + {o} AS b FROM {source}" for o in offsets)
    return f"""
        SELECT DISTINCT k.{key}, k.b FROM ({unions}) k, params WHERE k.b < params.as_of_day
        UNION
        SELECT {key}, params.as_of_day AS b FROM ({everyone}), params
    """
