"""Raw events -> point-in-time feature tables (Parquet with event_timestamp) for Feast's offline store.

Every table is a set of snapshots: a row at time t describes the entity using only events
strictly before t. Snapshots are taken at day boundaries exactly when a window value can
change (an active day entering or leaving the 1/7/30-day windows) and at the as-of time, so
a point-in-time join at any midnight sees exact window values without a row per entity and day.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from propensity.settings import FeatureSettings

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


@dataclass(frozen=True)
class FeatureBuildSummary:
    """Rows written per feature table and the wall time of the build."""

    rows: dict[str, int]
    files: dict[str, Path]
    seconds: float
    as_of: datetime


def day_index(moment: datetime) -> int:
    """Whole days since the epoch (UTC) of a day boundary."""
    seconds = int(moment.timestamp())
    if seconds % DAY_SECONDS:
        raise ValueError(f"as-of time {moment.isoformat()} is not a UTC day boundary")
    return seconds // DAY_SECONDS


def build_features(
    prepared_dir: Path,
    offline_dir: Path,
    as_of: datetime,
    event_types: frozenset[str],
    settings: FeatureSettings,
    progress: Callable[[str], None] = print,
) -> FeatureBuildSummary:
    """Compute every feature table from the prepared raw events and write them under offline_dir."""
    started = time.perf_counter()
    offline_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    _load_inputs(con, prepared_dir, day_index(as_of), settings)
    builders: list[tuple[str, Callable[[duckdb.DuckDBPyConnection, frozenset[str], FeatureSettings], None]]] = [
        ("user_activity", _user_activity),
        ("user_profile", _user_profile),
        ("user_interests", _user_interests),
        ("item_stats", _item_stats),
        ("item_neighbors", _item_neighbors),
    ]
    rows: dict[str, int] = {}
    files: dict[str, Path] = {}
    for step, (name, build) in enumerate(builders, start=1):
        t0 = time.perf_counter()
        build(con, event_types, settings)
        path = offline_dir / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        con.execute(f"COPY (SELECT * FROM {name} ORDER BY event_timestamp) TO '{tmp}' (FORMAT PARQUET)")
        tmp.replace(path)  # readers never see a half-written table
        rows[name] = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        files[name] = path
        progress(f"  features [{step}/{len(builders)}] {name}: {rows[name]:,} rows in {time.perf_counter() - t0:.1f}s")
    con.close()
    return FeatureBuildSummary(rows=rows, files=files, seconds=time.perf_counter() - started, as_of=as_of)


def _load_inputs(con: duckdb.DuckDBPyConnection, prepared_dir: Path, as_of_day: int, settings: FeatureSettings) -> None:
    gap = settings.session_gap_minutes * 60
    con.execute(f"CREATE TEMP TABLE params AS SELECT {as_of_day}::BIGINT AS as_of_day")
    con.execute(f"CREATE TEMP VIEW raw_events AS SELECT * FROM read_parquet('{prepared_dir / 'events.parquet'}')")
    con.execute(f"CREATE TEMP VIEW items AS SELECT * FROM read_parquet('{prepared_dir / 'items.parquet'}')")
    con.execute(f"CREATE TEMP VIEW users AS SELECT * FROM read_parquet('{prepared_dir / 'users.parquet'}')")
    # Sessions: the shop's session_id where given, else a new session after an inactivity gap.
    con.execute(
        f"""
        CREATE TEMP TABLE ev AS
        WITH base AS (
            SELECT user_id, item_id, event_type, session_id,
                   epoch(event_time)::BIGINT AS ts,
                   (epoch(event_time)::BIGINT // {DAY_SECONDS}) AS day,
                   coalesce(price, 0) * coalesce(quantity, 1) AS amount,
                   CASE WHEN price IS NULL THEN 0 ELSE coalesce(quantity, 1) END AS priced_units
            FROM raw_events
            WHERE epoch(event_time)::BIGINT < {as_of_day} * {DAY_SECONDS}
        ), gaps AS (
            SELECT *, CASE WHEN ts - lag(ts) OVER (PARTITION BY user_id ORDER BY ts) <= {gap} THEN 0 ELSE 1 END AS new_session
            FROM base
        )
        SELECT user_id, item_id, event_type, ts, day, amount, priced_units,
               coalesce(user_id || '#' || session_id,
                        user_id || '~' || sum(new_session) OVER (PARTITION BY user_id ORDER BY ts ROWS UNBOUNDED PRECEDING)) AS session_key
        FROM gaps
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE user_item_day AS
        SELECT user_id, item_id, day,
               count(*) FILTER (WHERE event_type = 'view') AS views,
               count(*) FILTER (WHERE event_type = 'add_to_cart') AS carts,
               count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
               count(*) FILTER (WHERE event_type = 'return') AS returns,
               count(*) AS events,
               sum(amount) FILTER (WHERE event_type = 'purchase') AS spend,
               sum(priced_units) FILTER (WHERE event_type = 'purchase') AS units,
               max(ts) AS last_ts,
               min(ts) AS first_ts,
               max(ts) FILTER (WHERE event_type = 'add_to_cart') AS last_cart_ts,
               max(ts) FILTER (WHERE event_type = 'purchase') AS last_purchase_ts
        FROM ev GROUP BY ALL
        """
    )


def _count_expr(kind: str, event_types: frozenset[str], window: int, column: str | None = None) -> str:
    if _COUNTS[kind] not in event_types:
        return "NULL::BIGINT"
    return f"coalesce(sum({column or kind}) FILTER (WHERE d.day >= s.b - {window}), 0)::BIGINT"


def _snapshot_boundaries(source: str, key: str, offsets: tuple[int, ...], everyone: str) -> str:
    """SQL for (key, b): day boundaries where a window over `source`'s active days changes, plus as-of for everyone."""
    unions = " UNION ".join(f"SELECT {key}, day + {o} AS b FROM {source}" for o in offsets)
    return f"""
        SELECT DISTINCT k.{key}, k.b FROM ({unions}) k, params WHERE k.b < params.as_of_day
        UNION
        SELECT {key}, params.as_of_day AS b FROM ({everyone}), params
    """


def _user_activity(con: duckdb.DuckDBPyConnection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    windows = WINDOW_LENGTHS
    longest = max(windows)
    # An active day d enters every window at boundary d+1 and leaves window w at d+1+w.
    offsets = (1, *(w + 1 for w in windows))
    con.execute(
        f"CREATE TEMP TABLE user_snapshots AS {_snapshot_boundaries('user_item_day', 'user_id', offsets, 'SELECT DISTINCT user_id FROM user_item_day')}"
    )
    con.execute(
        """
        CREATE TEMP TABLE user_day AS
        SELECT user_id, day, sum(views) AS views, sum(carts) AS carts, sum(purchases) AS purchases,
               sum(returns) AS returns, sum(spend) AS spend, sum(units) AS units, max(last_ts) AS last_ts, min(first_ts) AS first_ts,
               max(last_purchase_ts) AS last_purchase_ts
        FROM user_item_day GROUP BY ALL
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE user_running AS
        SELECT user_id, day,
               sum(purchases) OVER w AS purchases_total,
               min(first_ts) OVER w AS first_event_ts,
               max(last_ts) OVER w AS last_event_ts,
               max(last_purchase_ts) OVER w AS last_purchase_ts
        FROM user_day
        WINDOW w AS (PARTITION BY user_id ORDER BY day ROWS UNBOUNDED PRECEDING)
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE session_days AS
        SELECT user_id, session_key, day, min(ts) AS first_ts, max(ts) AS last_ts
        FROM ev GROUP BY ALL
        """
    )
    counts = []
    for kind in ("views", "carts", "purchases"):
        for w in windows:
            counts.append(f"{_count_expr(kind, event_types, w)} AS {kind}_{w}d")
    purchases_ok = "purchase" in event_types
    carts_ok = "add_to_cart" in event_types
    con.execute(
        f"""
        CREATE TEMP TABLE activity AS
        SELECT s.user_id, s.b, {', '.join(counts)},
               {_count_expr('returns', event_types, longest)} AS returns_{longest}d,
               {'coalesce(sum(d.spend) FILTER (WHERE d.day >= s.b - %d), 0)' % longest if purchases_ok else 'NULL'}::DOUBLE AS spend_30d,
               {'sum(d.spend) FILTER (WHERE d.day >= s.b - %d) / nullif(sum(d.units) FILTER (WHERE d.day >= s.b - %d), 0)' % (longest, longest) if purchases_ok else 'NULL'}::DOUBLE AS avg_purchase_price_30d,
               {'sum(d.purchases) FILTER (WHERE d.day >= s.b - %d)::DOUBLE / nullif(sum(d.carts) FILTER (WHERE d.day >= s.b - %d), 0)' % (longest, longest) if purchases_ok and carts_ok else 'NULL'}::DOUBLE AS cart_to_purchase_rate_30d,
               count(DISTINCT d.day) FILTER (WHERE d.day >= s.b - {longest})::BIGINT AS active_days_30d
        FROM user_snapshots s
        LEFT JOIN user_day d ON d.user_id = s.user_id AND d.day < s.b AND d.day >= s.b - {longest}
        GROUP BY s.user_id, s.b
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE activity_items AS
        SELECT s.user_id, s.b, count(DISTINCT d.item_id)::BIGINT AS distinct_items_30d
        FROM user_snapshots s
        LEFT JOIN user_item_day d ON d.user_id = s.user_id AND d.day < s.b AND d.day >= s.b - {longest}
        GROUP BY s.user_id, s.b
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE activity_sessions AS
        -- A session that runs past midnight counts, at that midnight, only the part before it.
        WITH per_session AS (
            SELECT s.user_id, s.b, x.session_key, min(x.day) AS start_day, max(x.last_ts) - min(x.first_ts) AS seconds
            FROM user_snapshots s
            JOIN session_days x ON x.user_id = s.user_id AND x.day < s.b AND x.day >= s.b - {longest}
            GROUP BY s.user_id, s.b, x.session_key
        )
        SELECT s.user_id, s.b,
               count(p.session_key) FILTER (WHERE p.start_day >= s.b - 7)::BIGINT AS sessions_7d,
               count(p.session_key)::BIGINT AS sessions_30d,
               coalesce(sum(p.seconds) FILTER (WHERE p.start_day >= s.b - 7), 0) / 60.0 AS browsing_minutes_7d,
               coalesce(sum(p.seconds), 0) / 60.0 AS browsing_minutes_30d
        FROM user_snapshots s
        LEFT JOIN per_session p ON p.user_id = s.user_id AND p.b = s.b
        GROUP BY s.user_id, s.b
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE user_activity AS
        SELECT a.user_id, to_timestamp(a.b * {DAY_SECONDS}) AS event_timestamp,
               a.* EXCLUDE (user_id, b),
               {'r.purchases_total' if purchases_ok else 'NULL'}::BIGINT AS purchases_total,
               i.distinct_items_30d, x.sessions_7d, x.sessions_30d, x.browsing_minutes_7d, x.browsing_minutes_30d,
               r.last_event_ts, r.last_purchase_ts, r.first_event_ts
        FROM activity a
        JOIN activity_items i USING (user_id, b)
        JOIN activity_sessions x USING (user_id, b)
        ASOF JOIN (SELECT *, day + 1 AS b_from FROM user_running) r ON r.user_id = a.user_id AND a.b >= r.b_from
        """
    )


def _user_profile(con: duckdb.DuckDBPyConnection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    # Profile attributes have no history: one row per user, valid from sign-up (or the log's start).
    con.execute(
        f"""
        CREATE TEMP TABLE user_profile AS
        SELECT u.user_id,
               coalesce(u.signup_time, to_timestamp((SELECT min(day) FROM user_item_day) * {DAY_SECONDS})) AS event_timestamp,
               u.age::DOUBLE AS age, u.gender::VARCHAR AS gender, u.region::VARCHAR AS region,
               epoch(u.signup_time)::BIGINT AS signup_ts
        FROM users u
        """
    )


def _user_interests(con: duckdb.DuckDBPyConnection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    n_items = settings.recent_items_per_user

    def per_item(column: str, event_type: str) -> str:
        # A shop that never records this event type gets a NULL list, not a list of zeros.
        if event_type not in event_types:
            return f"NULL::BIGINT[] AS {column}"
        return f"coalesce(r.{column}, []::BIGINT[]) AS {column}"

    n_categories = settings.top_categories_per_user
    con.execute(
        f"""
        CREATE TEMP TABLE recent AS
        SELECT s.user_id, s.b, d.item_id,
               coalesce(sum(d.views) FILTER (WHERE d.day >= s.b - 7), 0)::BIGINT AS views_7d,
               coalesce(sum(d.carts) FILTER (WHERE d.day >= s.b - 7), 0)::BIGINT AS carts_7d,
               sum(d.purchases)::BIGINT AS purchases_30d,
               (coalesce(max(d.last_cart_ts), 0) > coalesce(max(d.last_purchase_ts), 0))::BIGINT AS in_cart,
               max(d.last_ts) AS last_ts
        FROM user_snapshots s
        JOIN user_item_day d ON d.user_id = s.user_id AND d.day < s.b AND d.day >= s.b - 30
        GROUP BY s.user_id, s.b, d.item_id
        QUALIFY row_number() OVER (PARTITION BY s.user_id, s.b ORDER BY max(d.last_ts) DESC, d.item_id) <= {n_items}
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE favourite AS
        WITH per_cat AS (
            SELECT s.user_id, s.b, i.category_id, sum(d.events) AS n
            FROM user_snapshots s
            JOIN user_item_day d ON d.user_id = s.user_id AND d.day < s.b AND d.day >= s.b - 30
            JOIN items i ON i.item_id = d.item_id
            WHERE i.category_id IS NOT NULL
            GROUP BY ALL
        )
        SELECT user_id, b, category_id, n / sum(n) OVER (PARTITION BY user_id, b) AS share
        FROM per_cat
        QUALIFY row_number() OVER (PARTITION BY user_id, b ORDER BY n DESC, category_id) <= {n_categories}
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE user_interests AS
        WITH r AS (
            SELECT user_id, b,
                   list(item_id ORDER BY last_ts DESC, item_id) AS recent_item_ids,
                   list(views_7d ORDER BY last_ts DESC, item_id) AS recent_item_views_7d,
                   list(carts_7d ORDER BY last_ts DESC, item_id) AS recent_item_carts_7d,
                   list(purchases_30d ORDER BY last_ts DESC, item_id) AS recent_item_purchases_30d,
                   list(in_cart ORDER BY last_ts DESC, item_id) AS recent_item_in_cart,
                   list(last_ts ORDER BY last_ts DESC, item_id) AS recent_item_last_ts
            FROM recent GROUP BY user_id, b
        ), f AS (
            SELECT user_id, b,
                   list(category_id ORDER BY share DESC, category_id) AS top_category_ids,
                   list(share ORDER BY share DESC, category_id) AS top_category_shares
            FROM favourite GROUP BY user_id, b
        )
        SELECT s.user_id, to_timestamp(s.b * {DAY_SECONDS}) AS event_timestamp,
               coalesce(f.top_category_ids, []::VARCHAR[]) AS top_category_ids,
               coalesce(f.top_category_shares, []::DOUBLE[]) AS top_category_shares,
               coalesce(r.recent_item_ids, []::VARCHAR[]) AS recent_item_ids,
               {per_item('recent_item_views_7d', 'view')},
               {per_item('recent_item_carts_7d', 'add_to_cart')},
               coalesce(r.recent_item_purchases_30d, []::BIGINT[]) AS recent_item_purchases_30d,
               {per_item('recent_item_in_cart', 'add_to_cart')},
               coalesce(r.recent_item_last_ts, []::BIGINT[]) AS recent_item_last_ts
        FROM user_snapshots s
        LEFT JOIN r USING (user_id, b)
        LEFT JOIN f USING (user_id, b)
        """
    )


def _item_stats(con: duckdb.DuckDBPyConnection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    con.execute(
        """
        CREATE TEMP TABLE item_day AS
        SELECT item_id, day, sum(views) AS views, sum(carts) AS carts, sum(purchases) AS purchases,
               sum(returns) AS returns, sum(spend) AS spend, sum(units) AS units
        FROM user_item_day GROUP BY ALL
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE item_snapshots AS
        {_snapshot_boundaries('item_day', 'item_id', (1, 8, 31), 'SELECT item_id FROM items UNION SELECT item_id FROM item_day')}
        """
    )
    views_ok = "view" in event_types
    purchases_ok = "purchase" in event_types
    con.execute(
        f"""
        CREATE TEMP TABLE item_counts AS
        SELECT s.item_id, s.b,
               {_count_expr('views', event_types, 7)} AS item_views_7d,
               {_count_expr('views', event_types, 30)} AS item_views_30d,
               {_count_expr('carts', event_types, 7)} AS item_carts_7d,
               {_count_expr('carts', event_types, 30)} AS item_carts_30d,
               {_count_expr('purchases', event_types, 7)} AS item_purchases_7d,
               {_count_expr('purchases', event_types, 30)} AS item_purchases_30d,
               {'sum(d.purchases)::DOUBLE / nullif(sum(d.views), 0)' if views_ok and purchases_ok else 'NULL::DOUBLE'} AS item_conversion_rate_30d,
               {'sum(d.returns)::DOUBLE / nullif(sum(d.purchases), 0)' if purchases_ok and 'return' in event_types else 'NULL::DOUBLE'} AS item_return_rate_30d,
               sum(d.spend) / nullif(sum(d.units), 0) AS paid_price
        FROM item_snapshots s
        LEFT JOIN item_day d ON d.item_id = s.item_id AND d.day < s.b AND d.day >= s.b - 30
        GROUP BY s.item_id, s.b
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE item_buyers AS
        SELECT s.item_id, s.b, count(DISTINCT d.user_id) FILTER (WHERE d.purchases > 0)::BIGINT AS item_buyers_30d
        FROM item_snapshots s
        LEFT JOIN user_item_day d ON d.item_id = s.item_id AND d.day < s.b AND d.day >= s.b - 30
        GROUP BY s.item_id, s.b
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE item_stats AS
        SELECT c.item_id, to_timestamp(c.b * {DAY_SECONDS}) AS event_timestamp,
               i.category_id::VARCHAR AS category_id,
               coalesce(i.price, c.paid_price)::DOUBLE AS item_price,
               coalesce(i.available, TRUE)::BIGINT AS item_available,
               c.item_views_7d, c.item_views_30d, c.item_carts_7d, c.item_carts_30d,
               c.item_purchases_7d, c.item_purchases_30d,
               {'b.item_buyers_30d' if purchases_ok else 'NULL::BIGINT'} AS item_buyers_30d,
               c.item_conversion_rate_30d, c.item_return_rate_30d
        FROM item_counts c
        JOIN item_buyers b USING (item_id, b)
        LEFT JOIN items i USING (item_id)
        """
    )


def _item_neighbors(con: duckdb.DuckDBPyConnection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    # Weekly snapshots ending at as-of, each over the 4 weeks before it: co-visitation moves
    # slowly, and pairs counted per week bucket are summed per snapshot without re-joining days.
    # A point-in-time join at any cut-off picks the latest week before it, never a later one.
    top_n = settings.neighbors_per_item
    con.execute(
        """
        CREATE TEMP TABLE session_items AS
        SELECT session_key, item_id, (params.as_of_day - 1 - min(day)) // 7 AS week
        FROM ev, params GROUP BY session_key, item_id, params.as_of_day
        QUALIFY row_number() OVER (PARTITION BY session_key ORDER BY min(ts) DESC, item_id) <= 30
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE pair_week AS
        SELECT a.item_id AS item_id, b.item_id AS neighbor_id, least(a.week, b.week) AS week, count(*) AS n
        FROM session_items a JOIN session_items b ON a.session_key = b.session_key AND a.item_id <> b.item_id
        GROUP BY ALL
        """
    )
    con.execute(
        f"""
        CREATE TEMP TABLE item_neighbors AS
        WITH snapshots AS (
            SELECT k FROM range(0, 1 + (SELECT coalesce(max(week), 0) FROM pair_week)) t(k)
        ), scored AS (
            SELECT p.item_id, s.k, p.neighbor_id, sum(p.n)::DOUBLE AS score
            FROM snapshots s JOIN pair_week p ON p.week >= s.k AND p.week < s.k + {NEIGHBOR_WEEKS}
            GROUP BY p.item_id, s.k, p.neighbor_id
            QUALIFY row_number() OVER (PARTITION BY p.item_id, s.k ORDER BY sum(p.n) DESC, p.neighbor_id) <= {top_n}
        )
        SELECT item_id, to_timestamp((params.as_of_day - 7 * k) * {DAY_SECONDS}) AS event_timestamp,
               list(neighbor_id ORDER BY score DESC, neighbor_id) AS neighbor_item_ids,
               list(score ORDER BY score DESC, neighbor_id) AS neighbor_scores
        FROM scored, params GROUP BY item_id, k, params.as_of_day
        """
    )
