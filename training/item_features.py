"""Item feature tables: attributes with popularity and conversion, and co-visitation neighbours."""

from __future__ import annotations


from propensity.settings import FeatureSettings
from training.duck import Connection
from training.feature_sql import DAY_SECONDS, NEIGHBOR_WEEKS, count_expr, snapshot_boundaries


def item_stats(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
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
        {snapshot_boundaries('item_day', 'item_id', (1, 8, 31), 'SELECT item_id FROM items UNION SELECT item_id FROM item_day')}
        """
    )
    views_ok = "view" in event_types
    purchases_ok = "purchase" in event_types
    con.execute(
        f"""
        CREATE TEMP TABLE item_counts AS
        SELECT s.item_id, s.b,
               {count_expr('views', event_types, 7)} AS item_views_7d,
               {count_expr('views', event_types, 30)} AS item_views_30d,
               {count_expr('carts', event_types, 7)} AS item_carts_7d,
               {count_expr('carts', event_types, 30)} AS item_carts_30d,
               {count_expr('purchases', event_types, 7)} AS item_purchases_7d,
               {count_expr('purchases', event_types, 30)} AS item_purchases_30d,
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


def item_neighbors(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
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
            SELECT unnest(range(0, 1 + (SELECT coalesce(max(week), 0) FROM pair_week))) AS k  -- a form Spark's EXPLODE takes too
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
