"""Feature services: the versioned contract between a model and its features.

A live service is never edited: new or changed features mean a new `_vN`, and models name
the service they were trained with.
"""

from feast import FeatureService

from feature_views import item_content, item_copurchase, item_factors, item_neighbors, item_stats, user_activity, user_interests, user_profile, user_purchase_history

propensity_user_v1 = FeatureService(
    name="propensity_user_v1",
    features=[user_activity, user_profile, user_interests],
    description="User features read per request by the server and per cut-off by training.",
    tags={"owner": "propensity-team"},
)

# v2 adds the whole purchase history: buy-again candidates and per-(user, item) purchase counts.
propensity_user_v2 = FeatureService(
    name="propensity_user_v2",
    features=[user_activity, user_profile, user_interests, user_purchase_history],
    description="v1 plus the user's most bought items over the whole history (repeat-buying shops).",
    tags={"owner": "propensity-team"},
)

propensity_item_v1 = FeatureService(
    name="propensity_item_v1",
    features=[item_stats, item_neighbors],
    description="Item features cached by the server and joined per cut-off by training.",
    tags={"owner": "propensity-team"},
)

# v2 adds the retrieval tables: ALS item factors, time-decayed co-purchase and content neighbours.
propensity_item_v2 = FeatureService(
    name="propensity_item_v2",
    features=[item_stats, item_neighbors, item_factors, item_copurchase, item_content],
    description="v1 plus the retrieval tables behind ALS, co-purchase and content candidates (and their ranker features).",
    tags={"owner": "propensity-team"},
)

# v3 is v2 minus the sensitive profile attributes (training.sensitive_attributes: gender, age): a projection of
# user_profile that keeps region and signup_ts. The user model's "age" input is then missing in training and
# serving alike (propensity.assembly reads it as NaN), so no model trained on v3 can use it; v2 stays as it was.
propensity_user_v3 = FeatureService(
    name="propensity_user_v3",
    features=[user_activity, user_profile[["region", "signup_ts"]], user_interests, user_purchase_history],
    description="v2 without the sensitive attributes gender and age (minimisation; issue 12).",
    tags={"owner": "propensity-team"},
)
