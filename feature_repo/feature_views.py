"""Feature views: what each feature table serves, with its types and time-to-live."""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Float64, Int64, String

from data_sources import (
    item_content_source,
    item_copurchase_source,
    item_factors_source,
    item_neighbors_source,
    item_stats_source,
    user_activity_push,
    user_interests_push,
    user_purchase_history_push,
    user_profile_source,
)
from entities import item, user

OWNER = {"owner": "propensity-team"}

# Counts of event types a shop does not record (a purchase-only shop has no views) are null,
# not zero: an absent signal must not look like "no activity".
user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=timedelta(days=90),
    schema=[
        Field(name="views_1d", dtype=Int64),
        Field(name="views_7d", dtype=Int64),
        Field(name="views_30d", dtype=Int64),
        Field(name="carts_1d", dtype=Int64),
        Field(name="carts_7d", dtype=Int64),
        Field(name="carts_30d", dtype=Int64),
        Field(name="purchases_1d", dtype=Int64),
        Field(name="purchases_7d", dtype=Int64),
        Field(name="purchases_30d", dtype=Int64),
        Field(name="returns_30d", dtype=Int64),
        Field(name="purchases_total", dtype=Int64, description="Purchase events since the log began."),
        Field(name="spend_30d", dtype=Float64, description="Sum of price x quantity over purchases."),
        Field(name="avg_purchase_price_30d", dtype=Float64, description="Average unit price paid (spend / units bought)."),
        Field(name="cart_to_purchase_rate_30d", dtype=Float64, description="Purchases / carts; null without carts."),
        Field(name="distinct_items_30d", dtype=Int64),
        Field(name="active_days_30d", dtype=Int64),
        Field(name="sessions_7d", dtype=Int64),
        Field(name="sessions_30d", dtype=Int64),
        Field(name="browsing_minutes_7d", dtype=Float64, description="Sum of session durations."),
        Field(name="browsing_minutes_30d", dtype=Float64),
        Field(name="last_event_ts", dtype=Int64, description="Epoch seconds of the user's latest event."),
        Field(name="last_purchase_ts", dtype=Int64, description="Epoch seconds of the latest purchase; null if none."),
        Field(name="first_event_ts", dtype=Int64, description="Epoch seconds of the user's first event."),
    ],
    source=user_activity_push,
    online=True,
    description="Windowed activity aggregates per user (1/7/30 days).",
    tags=OWNER,
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="age", dtype=Float64),
        Field(name="gender", dtype=String),
        Field(name="region", dtype=String),
        Field(name="signup_ts", dtype=Int64, description="Epoch seconds of sign-up."),
    ],
    source=user_profile_source,
    online=True,
    description="User attributes from the users file (absent when the shop has none).",
    tags=OWNER,
)

user_interests = FeatureView(
    name="user_interests",
    entities=[user],
    ttl=timedelta(days=90),
    schema=[
        Field(name="top_category_ids", dtype=Array(String), description="Favourite categories, strongest first."),
        Field(name="top_category_shares", dtype=Array(Float64), description="Share of the user's 30-day events per favourite category."),
        Field(name="recent_item_ids", dtype=Array(String), description="Items interacted with in 30 days, most recent first."),
        Field(name="recent_item_views_7d", dtype=Array(Int64)),
        Field(name="recent_item_carts_7d", dtype=Array(Int64)),
        Field(name="recent_item_purchases_30d", dtype=Array(Int64)),
        Field(name="recent_item_in_cart", dtype=Array(Int64), description="1 if carted and not bought since."),
        Field(name="recent_item_last_ts", dtype=Array(Int64), description="Epoch seconds of the last interaction."),
    ],
    source=user_interests_push,
    online=True,
    description="User x category affinity and the user's recent items (per-(user, item) state).",
    tags=OWNER,
)

# Repeat buying (wholesale, groceries): the whole purchase history, not only the last 30 days.
# A year without a purchase lets the row expire: a lapsed customer's old basket is no guide.
user_purchase_history = FeatureView(
    name="user_purchase_history",
    entities=[user],
    ttl=timedelta(days=365),
    schema=[
        Field(name="bought_item_ids", dtype=Array(String), description="Items bought since the log began, most often bought first (ties: most recent)."),
        Field(name="bought_item_counts", dtype=Array(Int64), description="Purchase events per bought item."),
        Field(name="bought_item_last_ts", dtype=Array(Int64), description="Epoch seconds of the latest purchase of each item."),
    ],
    source=user_purchase_history_push,
    online=True,
    description="The user's most bought items over the whole history (buy-again candidates and features).",
    tags=OWNER,
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(days=90),
    schema=[
        Field(name="category_id", dtype=String),
        Field(name="item_price", dtype=Float64),
        Field(name="item_available", dtype=Int64),
        Field(name="item_views_7d", dtype=Int64),
        Field(name="item_views_30d", dtype=Int64),
        Field(name="item_carts_7d", dtype=Int64),
        Field(name="item_carts_30d", dtype=Int64),
        Field(name="item_purchases_7d", dtype=Int64),
        Field(name="item_purchases_30d", dtype=Int64),
        Field(name="item_buyers_30d", dtype=Int64),
        Field(name="item_conversion_rate_30d", dtype=Float64, description="Purchases / views; null without views."),
        Field(name="item_return_rate_30d", dtype=Float64, description="Returns / purchases; null without purchases."),
    ],
    source=item_stats_source,
    online=True,
    description="Item attributes, popularity and conversion (7/30 days).",
    tags=OWNER,
)

item_neighbors = FeatureView(
    name="item_neighbors",
    entities=[item],
    ttl=timedelta(days=90),
    schema=[
        Field(name="neighbor_item_ids", dtype=Array(String), description="Items most often in the same sessions, strongest first."),
        Field(name="neighbor_scores", dtype=Array(Float64), description="Co-visitation counts over the 4 weeks before the snapshot."),
    ],
    source=item_neighbors_source,
    online=True,
    description="Item-to-item co-visitation (a candidate source).",
    tags=OWNER,
)

item_factors = FeatureView(
    name="item_factors",
    entities=[item],
    ttl=timedelta(days=90),
    schema=[
        Field(name="als_factors", dtype=Array(Float64), description="ALS item vector; null for items nobody had touched before the snapshot."),
        Field(name="als_alpha", dtype=Float64, description="The fit's confidence scale (user vectors are folded in with it)."),
        Field(name="als_regularization", dtype=Float64, description="The fit's L2 regularisation (user vectors are folded in with it)."),
    ],
    source=item_factors_source,
    online=True,
    description="Matrix factorisation of user x item interactions (weekly): the ALS candidate source.",
    tags=OWNER,
)

item_copurchase = FeatureView(
    name="item_copurchase",
    entities=[item],
    ttl=timedelta(days=90),
    schema=[
        Field(name="copurchase_item_ids", dtype=Array(String), description="Items bought or carted by the same shoppers, strongest first."),
        Field(name="copurchase_scores", dtype=Array(Float64), description="BM25 item-item similarity of time-decayed interactions."),
    ],
    source=item_copurchase_source,
    online=True,
    description="Item-to-item co-purchase across shoppers, with time decay (a candidate source).",
    tags=OWNER,
)

item_content = FeatureView(
    name="item_content",
    entities=[item],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="content_item_ids", dtype=Array(String), description="Most similar items by content, strongest first."),
        Field(name="content_scores", dtype=Array(Float64), description="TF-IDF cosine of title words, category, brand and price band."),
    ],
    source=item_content_source,
    online=True,
    description="Content similarity for items with little history (a candidate source).",
    tags=OWNER,
)
