"""Entities: the keys features hang off."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper, by the shop's own user id.",
    tags={"owner": "propensity-team"},
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalog item, by the shop's own item id.",
    tags={"owner": "propensity-team"},
)
