"""User feature tables: activity windows, profile, and interests (favourite categories, recent items)."""

from __future__ import annotations


from propensity.settings import FeatureSettings
from training.duck import Connection
from training.feature_sql import DAY_SECONDS, WINDOW_LENGTHS, count_expr, snapshot_boundaries


def user_activity(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    windows = WINDOW_LENGTHS
    longest = max(windows)
    # An active day d enters every window at boundary d+1 and leaves window w at d+1+w.
    offsets = (1, *(w + 1 for w in windows))
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE user_snapshots AS {snapshot_boundaries('user_item_day', 'user_id', offsets, 'SELECT DISTINCT user_id FROM user_item_day')}"
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE user_day AS
        SELECT user_id, day, sum(views) AS views, sum(carts) AS carts, sum(purchases) AS purchases,
               sum(returns) AS returns, sum(spend) AS spend, sum(units) AS units, max(last_ts) AS last_ts, min(first_ts) AS first_ts,
               max(last_purchase_ts) AS last_purchase_ts
        FROM user_item_day GROUP BY ALL
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE user_running AS
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
        CREATE OR REPLACE TEMP TABLE session_days AS
        SELECT user_id, session_key, day, min(ts) AS first_ts, max(ts) AS last_ts
        FROM ev GROUP BY ALL
        """
    )
    counts = []
    for kind in ("views", "carts", "purchases"):
        for w in windows:
            counts.append(f"{count_expr(kind, event_types, w)} AS {kind}_{w}d")
    purchases_ok = "purchase" in event_types
    carts_ok = "add_to_cart" in event_types
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE activity AS
        SELECT s.user_id, s.b, {', '.join(counts)},
               {count_expr('returns', event_types, longest)} AS returns_{longest}d,
               {'coalesce(sum(d.spend) FILTER (WHERE d.day >= s.b - %d), 0)' % longest if purchases_ok else 'NULL'}::DOUBLE AS spend_30d,
               {'sum(d.spend) FILTER (WHERE d.day >= s.b - %d) / nullif(sum(d.units) FILTER (WHERE d.day >= s.b - %d), 0)' % (longest, longest) if purchases_ok else 'NULL'}::DOUBLE AS avg_purchase_price_30d,
               {'sum(d.purchases) FILTER (WHERE d.day >= s.b - %d)::DOUBLE / nullif(sum(d.carts) FILTER (WHERE d.day >= s.b - %d), 0)' % (longest, longest) if purchases_ok and carts_ok else 'NULL'}::DOUBLE AS cart_to_purchase_rate_30d,
               count(DISTINCT d.day) FILTER (WHERE d.day >= s.b - {longest})::BIGINT AS active_days_30d
        FROM user_snapshots s
        LEFT JOIN user_day d ON d.user_id = s.user_id AND d.day < s.b AND d.day >= s.b - {longest}
        GROUP BY s.user_id, s.b
        """
    )
    # Per (snapshot, item) over the 30 days before it: the one large join, shared by user_interests.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE snapshot_items AS
        SELECT s.user_id, s.b, d.item_id,
               coalesce(sum(d.views) FILTER (WHERE d.day >= s.b - 7), 0)::BIGINT AS views_7d,
               coalesce(sum(d.carts) FILTER (WHERE d.day >= s.b - 7), 0)::BIGINT AS carts_7d,
               sum(d.purchases)::BIGINT AS purchases_30d,
               (coalesce(max(d.last_cart_ts), 0) > coalesce(max(d.last_purchase_ts), 0))::BIGINT AS in_cart,
               max(d.last_ts) AS last_ts,
               sum(d.events) AS events
        FROM user_snapshots s
        JOIN user_item_day d ON d.user_id = s.user_id AND d.day < s.b AND d.day >= s.b - {longest}
        GROUP BY s.user_id, s.b, d.item_id
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE activity_items AS
        SELECT s.user_id, s.b, count(i.item_id)::BIGINT AS distinct_items_30d
        FROM user_snapshots s
        LEFT JOIN snapshot_items i ON i.user_id = s.user_id AND i.b = s.b
        GROUP BY s.user_id, s.b
        """
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE activity_sessions AS
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
        CREATE OR REPLACE TEMP TABLE user_activity AS
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


def user_profile(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    # Profile attributes have no history: one row per user, valid from sign-up (or the log's start).
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE user_profile AS
        SELECT u.user_id,
               coalesce(u.signup_time, to_timestamp((SELECT first_day FROM params) * {DAY_SECONDS})) AS event_timestamp,
               u.age::DOUBLE AS age, u.gender::VARCHAR AS gender, u.region::VARCHAR AS region,
               epoch(u.signup_time)::BIGINT AS signup_ts
        FROM users u
        """
    )


def user_interests(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    # Reads snapshot_items, which user_activity builds (USER_BUILDERS runs it first).
    n_items = settings.recent_items_per_user

    def per_item(column: str, event_type: str) -> str:
        # A shop that never records this event type gets a NULL list, not a list of zeros.
        if event_type not in event_types:
            return f"NULL::BIGINT[] AS {column}"
        return f"coalesce(r.{column}, []::BIGINT[]) AS {column}"

    n_categories = settings.top_categories_per_user
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE recent AS
        SELECT user_id, b, item_id, views_7d, carts_7d, purchases_30d, in_cart, last_ts
        FROM snapshot_items
        QUALIFY row_number() OVER (PARTITION BY user_id, b ORDER BY last_ts DESC, item_id) <= {n_items}
        """
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE favourite AS
        WITH per_cat AS (
            SELECT s.user_id, s.b, i.category_id, sum(s.events) AS n
            FROM snapshot_items s
            JOIN items i ON i.item_id = s.item_id
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
        CREATE OR REPLACE TEMP TABLE user_interests AS
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


def user_purchase_history(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    # The history only changes the day after a purchase, so those are the only snapshots it needs.
    n_items = settings.bought_items_per_user
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE bought_days AS
        SELECT user_id, item_id, day, purchases, last_purchase_ts FROM user_item_day WHERE purchases > 0
        """
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE bought AS
        WITH snapshots AS (
            SELECT DISTINCT d.user_id, d.day + 1 AS b FROM bought_days d, params WHERE d.day + 1 <= params.as_of_day
        )
        SELECT s.user_id, s.b, d.item_id, sum(d.purchases)::BIGINT AS n, max(d.last_purchase_ts)::BIGINT AS last_ts
        FROM snapshots s
        JOIN bought_days d ON d.user_id = s.user_id AND d.day < s.b
        GROUP BY s.user_id, s.b, d.item_id
        QUALIFY row_number() OVER (PARTITION BY s.user_id, s.b ORDER BY sum(d.purchases) DESC, max(d.last_purchase_ts) DESC, d.item_id) <= {n_items}
        """
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE user_purchase_history AS
        SELECT user_id, to_timestamp(b * {DAY_SECONDS}) AS event_timestamp,
               list(item_id ORDER BY n DESC, last_ts DESC, item_id) AS bought_item_ids,
               list(n ORDER BY n DESC, last_ts DESC, item_id) AS bought_item_counts,
               list(last_ts ORDER BY n DESC, last_ts DESC, item_id) AS bought_item_last_ts
        FROM bought GROUP BY user_id, b
        """
    )
