"""Tests for the retrieval item tables: ALS factors, time-decayed co-purchase and content neighbours.

The main log (A is the as-of midnight, A-k is k days earlier; every purchase is one unit):

    u0      A-21 10:00 view x, 10:01 cart x        (the log's first day: no snapshot at A-21)
    u1      A-8  10:00 buy a, 10:05 buy b, 10:10 buy e
    u2, u3  A-8  10:00 buy a, 10:05 buy b
    u4      A-7  00:00 buy c, 00:05 buy d          (on the A-7 snapshot's own day, from its first second)
    u5      A-7  12:00 buy c, 12:05 buy d
    u6      A-7  09:00 buy n                       (nobody touched n before)
    u7      A-1  10:00 view y, 10:05 view z        (z is not in the items table)

Items a..n, x, y carry titles, categories, brands and prices chosen for the content table; f1..f4 are
never touched and have no attributes. Weekly snapshots: A-14, A-7 and A. A second log (HUB_EVENTS) holds
one item bought with four others by 4, 3, 2 and 1 shoppers, and one pair bought recently and long ago.
"""

import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from feast import FeatureStore

from propensity.catalog import Catalog
from propensity.feature_store import copy_definitions, open_store
from propensity.retrieval import fold_in
from propensity.settings import FeatureSettings
from training.feature_build import build_features
from training.item_retrieval import content_documents
from training.prepare import prepare
from training.publish import publish_features

UTC = timezone.utc
RAW_AS_OF = datetime(2024, 3, 1, tzinfo=UTC)  # the log's own calendar; prepare rebases it to today
RETRIEVAL = ("item_factors", "item_copurchase", "item_content")
SERVICE = "propensity_item_v2"
# Non-default hyper-parameters, so a table that ignored the settings would show it.
SETTINGS = FeatureSettings(als_factors=6, als_iterations=4, als_alpha=2.0, als_regularization=0.5, neighbors_per_item=5)


def _raw_at(days_before: int, hour: int = 0, minute: int = 0) -> datetime:
    return RAW_AS_OF - timedelta(days=days_before) + timedelta(hours=hour, minutes=minute)


def _buy(days_before: int, hour: int, minute: int, user: str, item: str) -> tuple:
    return (_raw_at(days_before, hour, minute), user, item, "purchase", None, 10.0, 1.0)


def _view(days_before: int, hour: int, minute: int, user: str, item: str) -> tuple:
    return (_raw_at(days_before, hour, minute), user, item, "view", None, None, None)


EVENTS = [
    _view(21, 10, 0, "u0", "x"),
    (_raw_at(21, 10, 1), "u0", "x", "add_to_cart", None, None, None),
    _buy(8, 10, 0, "u1", "a"), _buy(8, 10, 5, "u1", "b"), _buy(8, 10, 10, "u1", "e"),
    _buy(8, 10, 0, "u2", "a"), _buy(8, 10, 5, "u2", "b"),
    _buy(8, 10, 0, "u3", "a"), _buy(8, 10, 5, "u3", "b"),
    _buy(7, 0, 0, "u4", "c"), _buy(7, 0, 5, "u4", "d"),
    _buy(7, 12, 0, "u5", "c"), _buy(7, 12, 5, "u5", "d"),
    _buy(7, 9, 0, "u6", "n"),
    _view(1, 10, 0, "u7", "y"), _view(1, 10, 5, "u7", "z"),
]
# Events on and after the A-7 snapshot's day: they may change snapshot A, never.
LATER_EVENTS = [
    _buy(7, 0, 0, "u1", "c"),  # exactly at the A-7 midnight
    _view(7, 23, 59, "u2", "n"),
    _buy(3, 10, 0, "u8", "a"), _buy(3, 10, 5, "u8", "d"),
]
ITEMS = pd.DataFrame({
    "item_id": ["a", "b", "c", "d", "e", "n", "x", "y", "f1", "f2", "f3", "f4"],
    "title": ["Trail Running Shoe", "Trail Running Shoe Pro", "Canvas Tote Bag", "Canvas Tote Bag Large", "Wool Socks",
              "Rain Jacket", "Water Bottle", None, None, None, None, None],
    "category_id": ["shoes", "shoes", "bags", "bags", "socks", "jackets", None, None, None, None, None, None],
    "brand": ["Peak", "Peak", "Urban", "Urban", "Knit", "North", None, None, None, None, None, None],
    "price": [80.0, 95.0, 30.0, 35.0, 9.0, 150.0, None, None, None, None, None, None],
})
CATALOG = sorted([*ITEMS["item_id"], "z"])
TOUCHED_BY = {  # snapshot (days before A) -> items with an interaction before it
    14: {"x"},
    7: {"x", "a", "b", "e"},
    0: {"x", "a", "b", "e", "c", "d", "n", "y", "z"},
}


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class World:
    """A built log: the Feast repository holding its offline tables, and the rebased calendar."""

    repo: Path
    as_of: datetime

    def at(self, days_before: int) -> datetime:
        return self.as_of - timedelta(days=days_before)

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.repo / "data" / "offline" / f"{name}.parquet")

    def row(self, name: str, item: str, days_before: int) -> pd.Series:
        table = self.table(name)
        match = table[(table["item_id"] == item) & (table["event_timestamp"] == pd.Timestamp(self.at(days_before)))]
        assert len(match) == 1, f"expected one {name} row for {item} at A-{days_before}, found {len(match)}"
        return match.iloc[0]

    def snapshots(self, name: str) -> set[int]:
        """Snapshot times of a table, as days before A."""
        return {(self.as_of - t.to_pydatetime()).days for t in self.table(name)["event_timestamp"].unique()}


def _build(root: Path, events: list[tuple], items: pd.DataFrame, settings: FeatureSettings) -> World:
    raw = root / "raw"
    raw.mkdir(parents=True)
    frame = pd.DataFrame(events, columns=["event_time", "user_id", "item_id", "event_type", "session_id", "price", "quantity"])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame.to_parquet(raw / "events.parquet", index=False)
    items.to_parquet(raw / "items.parquet", index=False)
    prepared = prepare(raw, root / "prepared", rebase_to=datetime.now(UTC), progress=_quiet)
    repo = copy_definitions(root / "feature_repo")
    build_features(root / "prepared", repo / "data" / "offline", prepared.as_of, prepared.event_types, settings, progress=_quiet)
    return World(repo, prepared.as_of)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _build(tmp_path_factory.mktemp("retrieval"), EVENTS, ITEMS, SETTINGS)


@pytest.fixture(scope="module")
def later_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The same log plus LATER_EVENTS, built with two snapshots only."""
    return _build(tmp_path_factory.mktemp("later"), EVENTS + LATER_EVENTS, ITEMS, SETTINGS.model_copy(update={"retrieval_snapshots": 2}))


def _ids(value) -> list | None:
    return None if value is None else list(value)


# --- snapshots and point-in-time -------------------------------------------------------------

def test_snapshots_are_weekly_back_from_as_of_and_after_the_first_day(world: World, later_world: World) -> None:
    # The first event is on A-21: a snapshot there would see nothing, so A-14 is the oldest.
    for name in ("item_factors", "item_copurchase"):
        assert world.snapshots(name) == {0, 7, 14}, name
        assert later_world.snapshots(name) == {0, 7}, name  # retrieval_snapshots=2
        stamps = world.table(name)["event_timestamp"]
        assert str(stamps.dt.tz) == "UTC" and (stamps == stamps.dt.floor("D")).all(), name
    # Content has one snapshot, at the log's first day.
    assert world.snapshots("item_content") == {21}


def test_co_purchases_reach_only_snapshots_after_their_day(world: World) -> None:
    # a and b were bought together on A-8: in the A-7 snapshot, not in A-14.
    assert world.row("item_copurchase", "a", 14).copurchase_item_ids is None
    assert _ids(world.row("item_copurchase", "a", 7).copurchase_item_ids) == ["b", "e"]
    # c and d were bought together on A-7 itself (one pair from its first second): only A sees them.
    for days in (14, 7):
        assert world.row("item_copurchase", "c", days).copurchase_item_ids is None
        assert world.row("item_copurchase", "d", days).copurchase_item_ids is None
    assert _ids(world.row("item_copurchase", "c", 0).copurchase_item_ids) == ["d"]
    assert _ids(world.row("item_copurchase", "d", 0).copurchase_item_ids) == ["c"]


def test_als_factors_only_for_items_touched_before_the_snapshot(world: World) -> None:
    factors = world.table("item_factors")
    for days, touched in TOUCHED_BY.items():
        snapshot = factors[factors["event_timestamp"] == pd.Timestamp(world.at(days))]
        with_vector = set(snapshot.loc[snapshot["als_factors"].notna(), "item_id"])
        assert with_vector == touched, f"A-{days}"
    # n was bought on A-7 (09:00), the only event it ever had.
    assert world.row("item_factors", "n", 7).als_factors is None
    assert len(world.row("item_factors", "n", 0).als_factors) == SETTINGS.als_factors


def _snapshot(world: World, name: str, days: int, columns: list[str]) -> dict[str, list]:
    table = world.table(name)
    rows = table[table["event_timestamp"] == pd.Timestamp(world.at(days))]
    return {item: [_ids(rows.iloc[k][c]) for c in columns] for k, item in enumerate(rows["item_id"])}


def _same(old: list | None, new: list | None) -> bool:
    if old is None or new is None:
        return old is None and new is None
    if old and isinstance(old[0], str):
        return old == new
    return len(old) == len(new) and np.allclose(new, old, rtol=1e-6, atol=0)


def test_events_on_or_after_a_snapshot_day_leave_that_snapshot_unchanged(world: World, later_world: World) -> None:
    assert later_world.as_of == world.as_of
    for name, columns in (("item_factors", ["als_factors"]), ("item_copurchase", ["copurchase_item_ids", "copurchase_scores"])):
        before, after = _snapshot(world, name, 7, columns), _snapshot(later_world, name, 7, columns)
        assert sorted(before) == sorted(after) == CATALOG, name
        for item in CATALOG:
            assert all(_same(old, new) for old, new in zip(before[item], after[item])), (name, item)
        # The later events do reach snapshot A (else the comparison above could not fail).
        before, after = _snapshot(world, name, 0, columns), _snapshot(later_world, name, 0, columns)
        assert not all(_same(old, new) for item in CATALOG for old, new in zip(before[item], after[item])), name


# --- item_factors ----------------------------------------------------------------------------

def test_every_catalog_item_has_one_factor_row_per_snapshot(world: World) -> None:
    factors = world.table("item_factors")
    # The catalog: the items table plus z, seen only in events.
    for days in (14, 7, 0):
        snapshot = factors[factors["event_timestamp"] == pd.Timestamp(world.at(days))]
        assert sorted(snapshot["item_id"]) == CATALOG, f"A-{days}"
    vectors = factors["als_factors"].dropna()
    assert len(vectors) == sum(len(t) for t in TOUCHED_BY.values())
    assert {len(v) for v in vectors} == {SETTINGS.als_factors}
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in vectors)
    assert (factors["als_alpha"] == SETTINGS.als_alpha).all()
    assert (factors["als_regularization"] == SETTINGS.als_regularization).all()


def test_factors_are_implicits_fit_of_the_decayed_interactions_before_the_snapshot(world: World) -> None:
    from implicit.als import AlternatingLeastSquares

    # Before A-7: u1 bought a, b, e, u2 and u3 bought a, b on A-8 (weight 5 each), u0 viewed and carted x
    # on A-21 (1 + 3); each day decayed by its age at A-7 (half-life 60 days).
    decay = lambda age: 0.5 ** (age / SETTINGS.retrieval_half_life_days)  # noqa: E731
    weights = {
        ("u0", "x"): 4.0 * decay(14),
        **{(u, i): 5.0 * decay(1) for u in ("u1", "u2", "u3") for i in ("a", "b")},
        ("u1", "e"): 5.0 * decay(1),
    }
    users = sorted({u for u, _ in weights})
    matrix = sp.csr_matrix(
        ([w for w in weights.values()], ([users.index(u) for u, _ in weights], [CATALOG.index(i) for _, i in weights])),
        shape=(len(users), len(CATALOG)),
    )
    # Users in id order and random_state=0, as the build fits them (so the same input gives the same factors).
    with warnings.catch_warnings():  # implicit warns about OpenBLAS threads when it is constructed
        warnings.simplefilter("ignore", RuntimeWarning)
        model = AlternatingLeastSquares(factors=SETTINGS.als_factors, regularization=SETTINGS.als_regularization,
                                        alpha=SETTINGS.als_alpha, iterations=SETTINGS.als_iterations, random_state=0)
    model.fit(matrix, show_progress=False)
    for item in TOUCHED_BY[7]:
        np.testing.assert_allclose(world.row("item_factors", item, 7).als_factors, model.item_factors[CATALOG.index(item)], atol=1e-5, err_msg=item)


# --- item_copurchase -------------------------------------------------------------------------

def test_items_bought_by_the_same_shoppers_are_top_neighbours(world: World) -> None:
    a = world.row("item_copurchase", "a", 0)
    # Three shoppers bought a with b, one also bought e; c's buyers never bought a.
    assert _ids(a.copurchase_item_ids) == ["b", "e"]
    assert a.copurchase_scores[0] > a.copurchase_scores[1] > 0
    assert _ids(world.row("item_copurchase", "b", 0).copurchase_item_ids)[0] == "a"
    assert _ids(world.row("item_copurchase", "e", 0).copurchase_item_ids) == ["a", "b"]
    # Items bought alone, only viewed, or never touched have no co-purchases.
    for item in ("n", "y", "z", "f1"):
        assert world.row("item_copurchase", item, 0).copurchase_item_ids is None, item


def test_neighbour_lists_exclude_the_item_are_sorted_and_aligned(world: World) -> None:
    for name, ids_column, scores_column in (("item_copurchase", "copurchase_item_ids", "copurchase_scores"),
                                            ("item_content", "content_item_ids", "content_scores")):
        table = world.table(name)
        assert table[ids_column].notna().any(), name
        for r in table.itertuples():
            ids, scores = getattr(r, ids_column), getattr(r, scores_column)
            assert (ids is None) == (scores is None), (name, r.item_id)
            if ids is None:
                continue
            assert r.item_id not in list(ids), (name, r.item_id)
            assert len(ids) == len(scores) == len(set(ids)) <= SETTINGS.neighbors_per_item, (name, r.item_id)
            assert list(scores) == sorted(scores, reverse=True) and min(scores) > 0, (name, r.item_id)
            assert set(ids) <= set(CATALOG), (name, r.item_id)


HUB_EVENTS = [
    # Shoppers who bought h: four also bought p1, three p2, two p3, one p4 (all on A-2).
    *[_buy(2, 10, k, f"h{p}-{k}", "h") for p, n in ((1, 4), (2, 3), (3, 2), (4, 1)) for k in range(n)],
    *[_buy(2, 11, k, f"h{p}-{k}", f"p{p}") for p, n in ((1, 4), (2, 3), (3, 2), (4, 1)) for k in range(n)],
    # The same pair bought by two shoppers recently and by two others long ago.
    _buy(2, 12, 0, "v1", "r1"), _buy(2, 12, 1, "v1", "r2"), _buy(2, 12, 2, "v2", "r1"), _buy(2, 12, 3, "v2", "r2"),
    _buy(40, 12, 0, "w1", "o1"), _buy(40, 12, 1, "w1", "o2"), _buy(40, 12, 2, "w2", "o1"), _buy(40, 12, 3, "w2", "o2"),
    _view(1, 9, 0, "v1", "q"),  # so as-of is A; views are not co-purchases
]
HUB_ITEMS = pd.DataFrame({
    "item_id": ["h", "p1", "p2", "p3", "p4", "r1", "r2", "o1", "o2", "q", "g1", "g2"],
    # For content: g1 and g2 are the same shirt, q shares two of its words, h one.
    "title": ["Blue", None, None, None, None, None, None, None, None, "Blue Cotton", "Blue Cotton Shirt", "Blue Cotton Shirt"],
})
HUB_SETTINGS = FeatureSettings(als_factors=2, als_iterations=1, neighbors_per_item=2, retrieval_half_life_days=14.0)


@pytest.fixture(scope="module")
def hub_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _build(tmp_path_factory.mktemp("hub"), HUB_EVENTS, HUB_ITEMS, HUB_SETTINGS)


def test_neighbour_lists_keep_the_strongest_up_to_the_cap(hub_world: World) -> None:
    h = hub_world.row("item_copurchase", "h", 0)
    assert _ids(h.copurchase_item_ids) == ["p1", "p2"]  # p3 and p4 are weaker and over the cap of 2
    assert h.copurchase_scores[0] > h.copurchase_scores[1]
    for p in ("p1", "p2", "p3", "p4"):
        assert _ids(hub_world.row("item_copurchase", p, 0).copurchase_item_ids) == ["h"], p


def test_content_lists_keep_the_most_similar_up_to_the_cap(hub_world: World) -> None:
    # One content snapshot, at the log's first day.
    g1 = hub_world.row("item_content", "g1", 40)
    assert _ids(g1.content_item_ids) == ["g2", "q"]  # h, sharing only "blue", is third: over the cap of 2
    assert g1.content_scores[0] == pytest.approx(1.0)
    # For h, g1 and g2 tie behind q: the tie goes to the smaller id, as in item_neighbors.
    assert _ids(hub_world.row("item_content", "h", 40).content_item_ids) == ["q", "g1"]


def test_a_pair_bought_long_ago_scores_lower_than_the_same_pair_bought_recently(hub_world: World) -> None:
    from implicit.nearest_neighbours import BM25Recommender

    recent = hub_world.row("item_copurchase", "r1", 0)
    old = hub_world.row("item_copurchase", "o1", 0)
    assert (_ids(recent.copurchase_item_ids), _ids(old.copurchase_item_ids)) == (["r2"], ["o2"])
    assert old.copurchase_scores[0] < recent.copurchase_scores[0]
    # Exactly BM25 of the decayed matrix: a purchase weighs 5, halved every 14 days of age at A.
    catalog = sorted(HUB_ITEMS["item_id"])
    cells = {}
    for when, user, item, *_ in HUB_EVENTS[:-1]:
        age = (RAW_AS_OF - when).days + 1  # bought on day A-k: k days old at A
        cells[(user, item)] = 5.0 * 0.5 ** (age / HUB_SETTINGS.retrieval_half_life_days)
    users = sorted({u for u, _ in cells})
    matrix = sp.csr_matrix(
        (list(cells.values()), ([users.index(u) for u, _ in cells], [catalog.index(i) for _, i in cells])), shape=(len(users), len(catalog))
    )
    model = BM25Recommender()
    with warnings.catch_warnings():  # implicit's own BM25 weighting hands its fit COO input, and says so
        warnings.simplefilter("ignore")
        model.fit(matrix, show_progress=False)
    similarity = model.similarity.toarray()
    assert recent.copurchase_scores[0] == pytest.approx(similarity[catalog.index("r1"), catalog.index("r2")], rel=1e-9)
    assert old.copurchase_scores[0] == pytest.approx(similarity[catalog.index("o1"), catalog.index("o2")], rel=1e-9)


# --- item_content ----------------------------------------------------------------------------

def test_items_sharing_brand_category_and_title_words_are_top_content_neighbours(world: World) -> None:
    content = world.table("item_content").set_index("item_id")
    assert sorted(content.index) == CATALOG  # prepare adds z, seen only in events, to the items table
    assert _ids(content.loc["a", "content_item_ids"]) == ["b"]
    assert _ids(content.loc["b", "content_item_ids"]) == ["a"]
    assert _ids(content.loc["c", "content_item_ids"]) == ["d"]
    assert _ids(content.loc["d", "content_item_ids"]) == ["c"]
    assert 0 < content.loc["a", "content_scores"][0] <= 1 + 1e-9
    # Nothing in common with any other item, or no attributes at all: no neighbours.
    for item in ("e", "n", "x", "y", "f1"):
        assert content.loc[item, "content_item_ids"] is None, item


def test_content_documents_make_the_documented_tokens() -> None:
    items = pd.DataFrame({
        "item_id": ["a", "b", "c", "d", "e", "f"],
        "title": ["Trail-Running SHOE, 2x!", None, "", "Mug", None, None],
        "category_id": ["c1", "c2", None, None, None, None],
        "brand": ["PEAK", None, "Urban", None, None, None],
        "price": [80.0, 64.0, 63.99, 0.75, 0.0, None],
    })
    documents = [d.split() for d in content_documents(items)]
    assert documents == [
        ["trail", "running", "shoe", "2x", "cat:c1", "brand:peak", "price:6"],  # log2(80) = 6.3
        ["cat:c2", "price:6"],  # 64 = 2 ** 6 opens band 6
        ["brand:urban", "price:5"],
        ["mug", "price:-1"],
        [],  # a zero price has no band
        [],
    ]
    # Missing columns give no tokens either.
    assert content_documents(pd.DataFrame({"item_id": ["a"], "price": [8.0]})).tolist() == ["price:3"]



def test_a_multi_word_brand_or_category_is_one_token() -> None:
    items = pd.DataFrame({"item_id": ["a", "b"], "title": ["Shirt", "Garden Hose"], "brand": ["Hugo Boss", "Hugo Sport"],
                          "category_id": ["Home Garden", "Home Office"]})
    a, b = (d.split() for d in content_documents(items))
    assert len([t for t in a if t.startswith("brand:")]) == 1 and len([t for t in a if t.startswith("cat:")]) == 1
    # Different brands, categories and title words: nothing in common.
    assert not set(a) & set(b)



def test_title_words_keep_letters_outside_ascii() -> None:
    items = pd.DataFrame({"item_id": ["a", "b"], "title": ["Crème Brûlée", "Кроссовки Nike"]})
    assert [d.split() for d in content_documents(items)] == [["crème", "brûlée"], ["кроссовки", "nike"]]


# --- through Feast ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(world: World) -> FeatureStore:
    """The built tables after `feast apply` and materialization into the online store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEAST_USAGE", "False")
        publish_features(world.repo, world.as_of, progress=_quiet)
    return open_store(world.repo)


@pytest.fixture(scope="module")
def served(store: FeatureStore) -> dict[str, list]:
    """The whole catalog read online with the v2 item service, as the server loads it."""
    return store.get_online_features(features=store.get_feature_service(SERVICE), entity_rows=[{"item_id": i} for i in CATALOG]).to_dict()


def test_a_point_in_time_join_reads_the_latest_snapshot_before_the_cutoff(world: World, store: FeatureStore) -> None:
    cutoffs = [("a", 8), ("a", 7), ("n", 7), ("n", 3), ("c", 3)]
    entity = pd.DataFrame({"item_id": [i for i, _ in cutoffs], "event_timestamp": [world.at(d) for _, d in cutoffs]})
    frame = store.get_historical_features(entity_df=entity, features=store.get_feature_service(SERVICE)).to_df()
    got = {(r.item_id, (world.as_of - r.event_timestamp.to_pydatetime()).days): r for r in frame.itertuples()}
    # At A-8 (the day a was bought) the A-14 snapshot holds; from A-7 on, the A-7 one.
    assert got[("a", 8)].copurchase_item_ids is None and got[("a", 8)].als_factors is None
    assert _ids(got[("a", 7)].copurchase_item_ids) == ["b", "e"]
    np.testing.assert_array_equal(got[("a", 7)].als_factors, world.row("item_factors", "a", 7).als_factors)
    # n, bought on A-7, and c, bought with d on A-7, are unknown to every snapshot before A.
    assert got[("n", 7)].als_factors is None and got[("n", 3)].als_factors is None
    assert got[("c", 3)].copurchase_item_ids is None
    # Content does not depend on events: the one snapshot holds at every cut-off.
    assert _ids(got[("c", 3)].content_item_ids) == ["d"]


def test_the_item_service_serves_the_retrieval_tables_as_of(world: World, served: dict) -> None:
    assert served["item_id"] == CATALOG
    for name in RETRIEVAL:
        table = world.table(name)
        latest = table[table["event_timestamp"] == table["event_timestamp"].max()].set_index("item_id")
        for column in table.columns.drop(["item_id", "event_timestamp"]):
            assert column in served, column
            for item, value in zip(served["item_id"], served[column]):
                expected = latest.loc[item, column] if item in latest.index else None
                if expected is None or (np.isscalar(expected) and pd.isna(expected)):
                    assert value is None, (column, item)
                elif np.isscalar(expected):
                    assert value == expected, (column, item)
                else:
                    assert list(value) == list(expected), (column, item)
    a = CATALOG.index("a")
    assert served["copurchase_item_ids"][a] == ["b", "e"]
    assert served["content_item_ids"][a] == ["b"]
    assert len(served["als_factors"][a]) == SETTINGS.als_factors


def test_catalog_from_served_rows_holds_the_factors_and_their_regularized_gram(world: World, served: dict) -> None:
    catalog = Catalog.from_frame(pd.DataFrame(served))
    touched = TOUCHED_BY[0]
    assert catalog.has_factors.tolist() == [i in touched for i in catalog.item_ids] + [False]
    offline = world.table("item_factors")
    offline = offline[offline["event_timestamp"] == pd.Timestamp(world.as_of)].set_index("item_id")
    y = np.array([offline.loc[i, "als_factors"] for i in sorted(touched)])
    regularized = y.T @ y + SETTINGS.als_regularization * np.eye(SETTINGS.als_factors)
    np.testing.assert_allclose(catalog.regularized_gram, regularized, rtol=1e-12, atol=1e-12)
    for item in CATALOG:
        expected = offline.loc[item, "als_factors"] if item in touched else np.zeros(SETTINGS.als_factors)
        np.testing.assert_array_equal(catalog.item_factors[catalog.index[item]], expected)
    assert (catalog.als_alpha, catalog.als_regularization) == (SETTINGS.als_alpha, SETTINGS.als_regularization)
    assert [catalog.item_ids[j] for j in catalog.neighbours("copurchase", catalog.index["a"])[0]] == ["b", "e"]


def test_fold_in_equals_implicits_user_update(served: dict) -> None:
    from implicit.als import AlternatingLeastSquares

    catalog = Catalog.from_frame(pd.DataFrame(served))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = AlternatingLeastSquares(factors=SETTINGS.als_factors, regularization=catalog.als_regularization, alpha=catalog.als_alpha)
    model.item_factors = catalog.item_factors[: catalog.size].astype(np.float32)
    # A user who bought a, carted c twice, viewed n and an item without a vector (f1).
    items, weights = catalog.lookup(["a", "c", "n", "f1"]), np.array([5.0, 6.0, 1.0, 2.0])
    row = sp.csr_matrix((weights, (np.zeros(len(items), dtype=int), items)), shape=(1, catalog.size))
    expected = model.recalculate_user(0, row)
    vector = fold_in(catalog, items, weights)
    assert vector is not None and np.abs(expected).max() > 1e-2  # a real vector, not a trivial zero
    np.testing.assert_allclose(vector.astype(np.float32), expected, rtol=0, atol=1e-4)
    # Without any item that has a vector there is nothing to fold in.
    assert fold_in(catalog, catalog.lookup(["f1", "f2"]), np.array([1.0, 1.0])) is None
