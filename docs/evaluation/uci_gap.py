"""What is left between the UCI Online Retail ranker and issue 9's targets, and which ideas were tried (findings.md).

Three steps, on a work dir that `propensity run` built for UCI (docs/evaluation/reproduce.sh's `pipeline uci`):

    python docs/evaluation/uci_gap.py build --work-dir W --feature-repo R --n-cutoffs 8 --out /tmp/uci_h7.pkl
    python docs/evaluation/uci_gap.py ranker --data /tmp/uci_h7.pkl --events W/prepared/events.parquet [--extra]
    python docs/evaluation/uci_gap.py candidates --data /tmp/uci_h7.pkl --events W/prepared/events.parquet
    python docs/evaluation/uci_gap.py sequence --data /tmp/uci_h7.pkl --events W/prepared/events.parquet [--export D] [--neural D]
    /tmp/torchvenv/bin/python docs/evaluation/uci_gap.py gru --dir D   # a Python with torch: never a project dependency

`build` runs training's own build_training_data with the evaluation's split (last cut-off = test) and keeps the
candidate item of every ranker row. `ranker` fits the ranker both ways as training does (early stopping on the
validation cut-off) and scores the test buyers exactly as `propensity evaluate` does, optionally with ten extra
(user, item) and item features computed from the prepared log (per order: how many of the user's orders hold the
item, how recent the last one is, a TIFU-style decayed membership, the user's order gap, the item's repurchase
rate and trend). `candidates` asks whether richer collaborative signals put more of what test buyers bought into
the 200 candidates: a full cosine item-kNN over order baskets and a TIFU-kNN user-kNN, against today's fitted
linear retrieval score, and a LightGBM retrieval model over all of them (2-fold across test buyers: an upper
bound, since it is fitted on test buyers). `sequence` asks the same of sources that read the order of a buyer's
baskets (a Markov chain basket -> next basket, and optionally `gru`'s next-basket model) or what is rising, new or
seasonal in the catalog, alone, blended into the fitted score with a weight picked on the validation cut-off, and
given a share of the 200 slots; it reports candidate recall of re-buys and first-time purchases apart.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time

import numpy as np
import pandas as pd


def build(args: argparse.Namespace) -> None:
    os.environ.update(
        PROPENSITY_WORK_DIR=args.work_dir, PROPENSITY_FEATURE_REPO=args.feature_repo, PROPENSITY_SERVER__SCORING_BACKEND="lightgbm",
        PROPENSITY_TRAINING__N_CUTOFFS=str(args.n_cutoffs), PROPENSITY_TRAINING__HORIZON_DAYS="7",
    )
    from propensity.settings import Settings
    from training import datasets
    from training.evaluation.run import evaluation_periods
    from training.prepare import load_prepared
    from training.training_data import build_training_data

    settings = Settings()
    generate, seen = datasets.generate_candidates, []

    def recording(user, catalog, *a, **k):  # the candidate item of every ranker row, in assembly order
        found = generate(user, catalog, *a, **k)
        seen.append(np.asarray(catalog.item_ids)[found.item_idx])
        return found

    datasets.generate_candidates = recording
    built = build_training_data(settings, load_prepared(settings.prepared_dir), split=lambda c: evaluation_periods(c, settings.training, 1))
    items = np.concatenate(seen)
    assert len(items) == len(built.data.pairs.labels)
    out = dict(rows=built.rows, periods=built.periods, pairs=built.data.pairs, items=items, user_features=built.user_features,
               catalogs=built.catalogs, retrieval=built.retrieval)
    with open(args.out, "wb") as f:
        pickle.dump(out, f, protocol=5)
    print(f"saved {len(items):,} ranker rows to {args.out}")


EXTRA = ("ui_orders", "ui_min_rank", "ui_qty", "ui_in_last3", "ui_tifu", "ui_order_share", "u_gap", "i_repurchase_rate", "i_trend", "u_orders")


def _purchases(path: str) -> pd.DataFrame:
    ev = pd.read_parquet(path)
    ev = ev[ev.event_type == "purchase"].copy()
    ev["user_id"], ev["item_id"] = ev.user_id.astype(str), ev.item_id.astype(str)
    return ev


def extra_features(d: dict, events: str) -> np.ndarray:
    """The ten EXTRA columns per ranker row, from purchases strictly before the row's cut-off."""
    ev, pairs, items = _purchases(events), d["pairs"], d["items"]
    cut = pd.to_datetime(pairs.cutoffs, utc=True)
    users = d["rows"]["user_id"].astype(str).to_numpy()[pairs.groups]
    out = np.full((len(items), len(EXTRA)), np.nan, dtype=np.float32)
    for c in cut.unique():
        m = np.flatnonzero(cut == c)
        h = ev[ev.event_time < c]
        orders = h.groupby(["user_id", "session_id"]).event_time.min().reset_index().sort_values("event_time")
        orders["order_rank"] = orders.groupby("user_id").cumcount(ascending=False)  # 0 = the user's last order
        n_orders = orders.groupby("user_id").size()
        span = orders.groupby("user_id").event_time.agg(lambda s: (s.max() - s.min()).total_seconds() / 86400)
        hh = h.merge(orders[["user_id", "session_id", "order_rank"]], on=["user_id", "session_id"])
        ui = hh.groupby(["user_id", "item_id"]).agg(ui_orders=("session_id", "nunique"), ui_min_rank=("order_rank", "min"), ui_qty=("quantity", "sum"))
        ui["ui_in_last3"] = hh[hh.order_rank < 3].groupby(["user_id", "item_id"]).session_id.nunique()
        ui["ui_in_last3"] = ui["ui_in_last3"].fillna(0)
        hh["w"] = 0.9 ** hh.order_rank
        per_order = hh.drop_duplicates(["user_id", "session_id", "item_id"])
        user_total = hh.drop_duplicates(["user_id", "session_id"]).groupby("user_id").w.sum()
        ui["ui_tifu"] = per_order.groupby(["user_id", "item_id"]).w.sum() / user_total.reindex(ui.index.get_level_values(0)).to_numpy()
        ui = ui.reset_index()
        ui["ui_order_share"] = ui.ui_orders / n_orders.reindex(ui.user_id).to_numpy()
        ui["u_gap"] = (span / (n_orders - 1).where(n_orders > 1)).reindex(ui.user_id).to_numpy()
        item_buyers = h.groupby(["item_id", "user_id"]).session_id.nunique()
        repurchase = (item_buyers >= 2).groupby(level=0).mean()
        last7 = h[h.event_time >= c - pd.Timedelta(days=7)].groupby("item_id").user_id.nunique()
        last28 = h[h.event_time >= c - pd.Timedelta(days=28)].groupby("item_id").user_id.nunique()
        key = pd.DataFrame({"user_id": users[m], "item_id": items[m].astype(str)})
        joined = key.merge(ui, on=["user_id", "item_id"], how="left")
        joined["i_repurchase_rate"] = repurchase.reindex(key.item_id).to_numpy()
        joined["i_trend"] = (last7.reindex(key.item_id).fillna(0) / (last28.reindex(key.item_id).fillna(0) + 1)).to_numpy()
        joined["u_orders"] = n_orders.reindex(key.user_id).to_numpy()
        out[m] = joined[list(EXTRA)].to_numpy(dtype=np.float32)
        print(f"  extra features at {c.date()}: {len(m):,} rows", flush=True)
    return out


def ranker(args: argparse.Namespace) -> None:
    import lightgbm as lgb

    from propensity.assembly import RANKER_FEATURES
    from training.boosters import group_sizes
    from training.metrics import ranking_from_hits

    d = pickle.load(open(args.data, "rb"))
    rows, pairs, periods = d["rows"], d["pairs"], d["periods"]
    cut = pd.to_datetime(pairs.cutoffs, utc=True)
    train, valid, test = (cut.isin(pd.to_datetime(p, utc=True)) for p in (periods.train, periods.validation, periods.test))
    names, x = list(RANKER_FEATURES), pairs.features
    if args.extra:
        x, names = np.hstack([x, extra_features(d, args.events)]), names + list(EXTRA)
    stamps = pd.to_datetime(rows.event_timestamp, utc=True)
    buyers = rows.index[stamps.isin(pd.to_datetime(periods.test, utc=True)) & (rows.label == 1)].to_numpy()
    for objective in ("binary", "lambdarank"):
        started = time.time()
        params = dict(objective=objective, learning_rate=0.05, num_leaves=31, min_data_in_leaf=20, feature_fraction=0.9, bagging_fraction=0.9,
                      bagging_freq=1, seed=13, deterministic=True, num_threads=2, verbosity=-1)
        ranking = objective == "lambdarank"
        if ranking:
            params.update(metric="ndcg", eval_at=[10])
        fit = lgb.Dataset(x[train], pairs.labels[train], group=group_sizes(pairs.groups[train]) if ranking else None, feature_name=names)
        stop = lgb.Dataset(x[valid], pairs.labels[valid], reference=fit, group=group_sizes(pairs.groups[valid]) if ranking else None)
        booster = lgb.train(params, fit, 400, valid_sets=[stop], callbacks=[lgb.early_stopping(30, verbose=False)])
        score, groups, labels = booster.predict(x[test]), pairs.groups[test], pairs.labels[test]
        hits = [labels[groups == r][np.argsort(-score[groups == r], kind="stable")] for r in buyers]
        table = ranking_from_hits(hits, [len(rows.at[r, "bought_items"]) for r in buyers], 10).mean()
        print(f"{objective:10s} extra={bool(args.extra)} {len(buyers)} test buyers, {booster.best_iteration} trees: "
              f"Recall@10 {table.iloc[0]:.4f} NDCG@10 {table.iloc[1]:.4f} ({time.time() - started:.0f}s)", flush=True)


def candidates(args: argparse.Namespace) -> None:
    import lightgbm as lgb
    import scipy.sparse as sp

    from propensity.retrieval import SIGNALS, RetrievalWeights, known_items, user_signals
    from propensity.user_state import UserState

    d = pickle.load(open(args.data, "rb"))
    rows, periods, catalogs, uf = d["rows"], d["periods"], d["catalogs"], d["user_features"]
    weights = RetrievalWeights.from_json(d["retrieval"]["weights"])
    ev = _purchases(args.events)
    stamps = pd.to_datetime(rows.event_timestamp, utc=True)
    test = np.flatnonzero(stamps.isin(pd.to_datetime(periods.test, utc=True)).to_numpy() & (rows.label.to_numpy() == 1))
    cutoff = pd.Timestamp(periods.test[0])
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff
    catalog = catalogs[pd.Timestamp(periods.test[0])]
    column = pd.Series(np.arange(catalog.size), index=catalog.item_ids.astype(str))
    h = ev[(ev.event_time < cutoff) & ev.item_id.isin(column.index)]
    first = h.groupby(["user_id", "session_id"]).event_time.min().rename("t").reset_index().sort_values("t")
    first["rank"] = first.groupby("user_id").cumcount(ascending=False)
    orders = h.drop_duplicates(["user_id", "session_id", "item_id"]).merge(first, on=["user_id", "session_id"])
    order_idx, order_keys = pd.factorize(orders.user_id + "|" + orders.session_id.astype(str))
    age = (cutoff - orders.t).dt.total_seconds().to_numpy() / 86400
    baskets = sp.csr_matrix((0.5 ** (age / 60.0), (order_idx, column[orders.item_id].to_numpy())), shape=(len(order_keys), catalog.size))
    cosine = (baskets.T @ baskets).toarray()
    np.fill_diagonal(cosine, 0)
    norm = np.sqrt(np.asarray(baskets.multiply(baskets).sum(axis=0)).ravel()) + 1e-9
    cosine /= norm[:, None] * norm[None, :]
    user_idx, user_keys = pd.factorize(orders.user_id)
    profiles = sp.csr_matrix((0.9 ** orders["rank"].to_numpy(), (user_idx, column[orders.item_id].to_numpy())), shape=(len(user_keys), catalog.size)).toarray()
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True) + 1e-9
    position = pd.Series(np.arange(len(user_keys)), index=user_keys)
    xs, ys, n_bought, available = [], [], [], catalog.available
    for i in test:
        record = uf.iloc[i].to_dict()
        user_id = str(record["user_id"])
        values = user_signals(UserState.from_row(user_id, record, catalog), catalog, cutoff.timestamp()).values[: catalog.size]
        item_knn = user_knn = np.zeros(catalog.size)
        if user_id in position.index:
            p = profiles[position[user_id]]
            similarity = profiles @ p
            similarity[position[user_id]] = 0
            nearest = np.argpartition(-similarity, 300)[:300]
            item_knn, user_knn = p @ cosine, similarity[nearest] @ profiles[nearest]
        bought = catalog.lookup(map(str, rows.at[i, "bought_items"]))
        y = np.zeros(catalog.size, dtype=bool)
        y[bought[bought >= 0]] = True
        xs.append(np.column_stack([values, known_items(values), item_knn, user_knn, weights.score(values)]))
        ys.append(y)
        n_bought.append(len(rows.at[i, "bought_items"]))

    def recall(scores: list[np.ndarray], budget: int = 200) -> float:
        covered = sum(int(y[np.argpartition(-np.where(available, s, -np.inf), budget)[:budget]].sum()) for s, y in zip(scores, ys))
        return covered / sum(n_bought)

    ns = len(SIGNALS)
    print(f"{len(test)} test buyers, {sum(n_bought):,} items bought")
    print(f"today's fitted linear retrieval score: candidate recall@200 {recall([x[:, -1] for x in xs]):.4f}")
    print(f"item-kNN alone {recall([x[:, ns + 1] for x in xs]):.4f}; user-kNN alone {recall([x[:, ns + 2] for x in xs]):.4f}")
    fold = np.random.default_rng(0).integers(0, 2, len(xs))
    for label, cols in (("signals", list(range(ns + 1))), ("signals + item-kNN + user-kNN", list(range(ns + 3)))):
        scores: list[np.ndarray] = [np.empty(0)] * len(xs)
        for f in (0, 1):
            fit = [i for i in range(len(xs)) if fold[i] != f]
            x = np.vstack([xs[i][:, cols] for i in fit])
            y = np.concatenate([ys[i] for i in fit])
            keep = y | (np.random.default_rng(f).random(len(y)) < 0.05)
            booster = lgb.train(dict(objective="binary", learning_rate=0.1, num_leaves=15, min_data_in_leaf=50, verbosity=-1, num_threads=2),
                                lgb.Dataset(x[keep], y[keep]), 150)
            for i in np.flatnonzero(fold == f):
                scores[i] = booster.predict(xs[i][:, cols])
        print(f"LightGBM retrieval on {label} (2-fold across test buyers): candidate recall@200 {recall(scores):.4f}", flush=True)


# ---- `sequence`: sequence-aware and trend/newness candidate sources (findings.md, last section) ----

SEQUENCE_HALF_LIFE_DAYS = 90.0  # decay of a transition by the age of the basket it leads to
BASKET_DECAY = 0.5  # weight of the user's second- and third-last baskets against the last one
BLEND_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # alpha in: fitted retrieval score + alpha x source / its max
RESERVED_SLOTS = (10, 25, 50, 100)  # or: the source fills this many of the 200 slots, the fitted score the rest


def _orders(ev: pd.DataFrame, cutoff: pd.Timestamp, column: pd.Series) -> pd.DataFrame:
    """Purchases before the cut-off of catalog items, one row per (order, item): the order's time, its position in the
    user's sequence (seq 0 = first order, back 0 = last), and whether it is the user's first purchase of the item."""
    h = ev[(ev.event_time < cutoff) & ev.item_id.isin(column.index)]
    heads = h.groupby(["user_id", "session_id"]).event_time.min().rename("t").reset_index().sort_values(["t", "session_id"])
    heads["seq"] = heads.groupby("user_id").cumcount()
    heads["back"] = heads.groupby("user_id").cumcount(ascending=False)
    heads["row"] = np.arange(len(heads))
    o = h.drop_duplicates(["user_id", "session_id", "item_id"])[["user_id", "session_id", "item_id"]].merge(heads, on=["user_id", "session_id"])
    o["col"] = column[o.item_id].to_numpy()
    o["first"] = o.seq == o.groupby(["user_id", "item_id"]).seq.transform("min")
    return o


def _baskets(o: pd.DataFrame, n_items: int, only_first: bool = False) -> "sp.csr_matrix":
    import scipy.sparse as sp

    keep = o[o["first"]] if only_first else o
    n_rows = int(o.row.max()) + 1
    return sp.csr_matrix((np.ones(len(keep)), (keep.row.to_numpy(), keep.col.to_numpy())), shape=(n_rows, n_items))


def transitions(o: pd.DataFrame, n_items: int, cutoff: pd.Timestamp, only_first: bool) -> np.ndarray:
    """FPMC-style first-order Markov chain over baskets, pooled across users: P(item j in a user's next basket | item i
    in this one), each (basket, next basket) pair weighted by 1/|basket| and decayed by the next basket's age.
    only_first: count only the next basket's items the user buys for the first time there."""
    import scipy.sparse as sp

    heads = o.drop_duplicates("row").set_index(["user_id", "seq"])
    nxt = heads.reindex(pd.MultiIndex.from_arrays([heads.index.get_level_values(0), heads.index.get_level_values(1) + 1]))
    has = nxt.row.notna().to_numpy()
    prev_rows, next_rows = heads.row.to_numpy()[has], nxt.row.to_numpy()[has].astype(np.int64)
    age = (cutoff - pd.to_datetime(nxt.t.to_numpy()[has], utc=True)).total_seconds().to_numpy() / 86400
    b = _baskets(o, n_items)
    size = np.asarray(b.sum(axis=1)).ravel()
    weight = 0.5 ** (age / SEQUENCE_HALF_LIFE_DAYS) / size[prev_rows]
    to = _baskets(o, n_items, only_first)[next_rows]
    counts = (sp.diags(weight) @ b[prev_rows]).T @ to
    counts = np.asarray(counts.todense(), dtype=np.float64)
    return counts / (counts.sum(axis=1, keepdims=True) + 1.0)  # +1: an item seen in one basket pair is not a certainty


def _last_baskets(o: pd.DataFrame, users: list[str], n_items: int, depth: int) -> np.ndarray:
    """Per user (rows in `users` order): the decayed, size-normalised sum of their last `depth` baskets."""
    import scipy.sparse as sp

    position = pd.Series(np.arange(len(users)), index=users)
    last = o[(o.back < depth) & o.user_id.isin(position.index)]
    size = last.groupby("row").col.transform("size").to_numpy()
    w = BASKET_DECAY ** last.back.to_numpy() / size
    return sp.csr_matrix((w, (position[last.user_id].to_numpy(), last.col.to_numpy())), shape=(len(users), n_items))


def trend_sources(ev: pd.DataFrame, cutoff: pd.Timestamp, column: pd.Series, n_items: int) -> dict[str, np.ndarray]:
    """Non-personal: items whose distinct buyers rise in the last 7 (14) days against the 3 (4) weeks before, items first
    sold in the last 28 days, and what sold in the coming week a year ago (UCI is seasonal: Christmas stock arrives in autumn)."""
    h = ev[(ev.event_time < cutoff) & ev.item_id.isin(column.index)]
    days = (cutoff - h.event_time).dt.total_seconds() / 86400

    def buyers(lo: float, hi: float) -> np.ndarray:
        counts = h[(days >= lo) & (days < hi)].groupby("item_id").user_id.nunique()
        out = np.zeros(n_items)
        out[column[counts.index].to_numpy()] = counts.to_numpy()
        return out

    last7, before = buyers(0, 7), buyers(7, 28) / 3.0
    last14, before14 = buyers(0, 14), buyers(14, 42) / 2.0
    first_sold = h.groupby("item_id").event_time.min()
    new = np.zeros(n_items, dtype=bool)
    new[column[first_sold.index[(cutoff - first_sold).dt.days < 28]].to_numpy()] = True
    return {
        "rising_7d": np.maximum(last7 - before, 0.0),
        "rising_14d": np.maximum(last14 - before14, 0.0),
        "new_28d": np.where(new, np.log1p(buyers(0, 28)), 0.0),
        # the 7 days after this date 52 weeks ago (zero where the log does not reach back that far)
        "same_week_last_year": buyers(357, 364),
    }


def _price_fit(ev: pd.DataFrame, cutoff: pd.Timestamp, column: pd.Series, users: list[str], n_items: int) -> np.ndarray:
    """exp(-|log item price - log the user's median paid price|): 1 at the user's own price level."""
    h = ev[(ev.event_time < cutoff) & ev.item_id.isin(column.index) & (ev.price > 0)]
    item_price = np.full(n_items, np.nan)
    p = h.groupby("item_id").price.median()
    item_price[column[p.index].to_numpy()] = p.to_numpy()
    user_price = h.groupby("user_id").price.median().reindex(users).to_numpy()
    out = np.exp(-np.abs(np.log(item_price)[None, :] - np.log(user_price)[:, None]))
    return np.nan_to_num(out, nan=0.5)


def _frame(d: dict, ev: pd.DataFrame, period: str, export: str | None = None, neural: str | None = None) -> dict:
    """One cut-off's buyers: the fitted retrieval score (today's candidates), what they bought, and every new source."""
    from propensity.retrieval import RetrievalWeights, user_signals
    from propensity.user_state import UserState

    rows, uf, periods = d["rows"], d["user_features"], d["periods"]
    stamp = getattr(periods, period)[0]
    weights = RetrievalWeights.from_json(d["retrieval"]["weights"])
    stamps = pd.to_datetime(rows.event_timestamp, utc=True)
    picked = np.flatnonzero(stamps.isin(pd.to_datetime([stamp], utc=True)).to_numpy() & (rows.label.to_numpy() == 1))
    cutoff = pd.Timestamp(stamp)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff
    catalog = d["catalogs"][pd.Timestamp(stamp)]
    n = catalog.size
    column = pd.Series(np.arange(n), index=catalog.item_ids.astype(str))
    before = ev[ev.event_time < cutoff].groupby("user_id").item_id.agg(set)
    users, signals, base, ys, old, n_bought, n_rebuy = [], [], [], [], [], [], []
    for i in picked:
        record = uf.iloc[i].to_dict()
        user_id = str(record["user_id"])
        values = user_signals(UserState.from_row(user_id, record, catalog), catalog, cutoff.timestamp()).values[:n]
        bought = [str(b) for b in rows.at[i, "bought_items"]]
        history = before.get(user_id, set())
        idx = catalog.lookup(bought)
        y = np.zeros(n, dtype=bool)
        y[idx[idx >= 0]] = True
        had = np.zeros(n, dtype=bool)
        known = column.reindex(list(history)).dropna().to_numpy(dtype=np.int64)
        had[known] = True
        users.append(user_id), signals.append(values), base.append(weights.score(values)), ys.append(y), old.append(had)
        n_bought.append(len(bought)), n_rebuy.append(sum(b in history for b in bought))
    o = _orders(ev, cutoff, column)
    sources: dict[str, np.ndarray] = {}
    started = time.time()
    for only_first in (False, True):
        chain = transitions(o, n, cutoff, only_first)
        for depth in (1, 3):
            name = f"markov_{'first' if only_first else 'all'}_last{depth}"
            sources[name] = np.asarray(_last_baskets(o, users, n, depth) @ chain)
    trend = trend_sources(ev, cutoff, column, n)
    fit = _price_fit(ev, cutoff, column, users, n)
    for name, s in trend.items():
        sources[name] = np.broadcast_to(s, (len(users), n)).copy()
        sources[f"{name}_x_price"] = s[None, :] * fit
    if neural:
        sources["gru_first"] = np.load(os.path.join(neural, f"{period}_scores.npy"))
    print(f"  {period} {cutoff.date()}: {len(users)} buyers, sources built in {time.time() - started:.0f}s", flush=True)
    frame = dict(users=users, signals=signals, base=np.array(base), y=np.array(ys), old=np.array(old), sources=sources,
                 available=catalog.available, n_bought=np.array(n_bought), n_rebuy=np.array(n_rebuy))
    if export:
        os.makedirs(export, exist_ok=True)
        export_sequences(frame, o, n, os.path.join(export, f"{period}.npz"))
    return frame


def coverage(f: dict, score: np.ndarray, budget: int = 200) -> tuple[float, float, float]:
    """Candidate recall at `budget` of a (buyers x items) score: overall, of re-buys, of first-time purchases."""
    s = np.where(f["available"][None, :], score, -np.inf)
    top = np.argpartition(-s, budget, axis=1)[:, :budget]
    picked = np.zeros_like(f["y"])
    np.put_along_axis(picked, top, True, axis=1)
    hit = picked & f["y"]
    rebuy, first = (hit & f["old"]).sum(), (hit & ~f["old"]).sum()
    n_rebuy, n_all = f["n_rebuy"].sum(), f["n_bought"].sum()
    return (rebuy + first) / n_all, rebuy / n_rebuy, first / (n_all - n_rebuy)


def union_first_time(f: dict, a: np.ndarray, b: np.ndarray, budget: int = 200) -> float:
    """Share of first-time purchases in a's top `budget` or b's (up to 2 x budget items): how much b finds that a misses."""
    picked = np.zeros_like(f["y"])
    for s in (a, b):
        s = np.where(f["available"][None, :], s, -np.inf)
        np.put_along_axis(picked, np.argpartition(-s, budget, axis=1)[:, :budget], True, axis=1)
    return (picked & f["y"] & ~f["old"]).sum() / (f["n_bought"].sum() - f["n_rebuy"].sum())


def reserved(f: dict, base: np.ndarray, source: np.ndarray, slots: int, budget: int = 200) -> np.ndarray:
    """A score whose top `budget` are base's best budget - slots items, then the source's best items not yet taken."""
    base = np.where(f["available"][None, :], base, -np.inf)
    source = np.where(f["available"][None, :], source, -np.inf)
    out = np.full(base.shape, -np.inf)
    kept = np.argpartition(-base, budget - slots, axis=1)[:, : budget - slots]
    np.put_along_axis(out, kept, 2.0, axis=1)
    tie = base.argsort(axis=1).argsort(axis=1) / base.shape[1]  # where the source is silent (no history), base's next best
    rest = np.where(np.isfinite(out) | ~f["available"][None, :], -np.inf, _scaled(np.where(np.isfinite(source), source, 0.0)) + 1e-3 * tie)
    extra = np.argpartition(-rest, slots, axis=1)[:, :slots]
    np.put_along_axis(out, extra, 1.0, axis=1)
    return out


def _scaled(s: np.ndarray) -> np.ndarray:
    top = s.max(axis=1, keepdims=True)
    return np.divide(s, top, out=np.zeros_like(s), where=top > 0)


def sequence(args: argparse.Namespace) -> None:
    import lightgbm as lgb

    d = pickle.load(open(args.data, "rb"))
    ev = _purchases(args.events)
    valid, test = (_frame(d, ev, period, args.export, args.neural) for period in ("validation", "test"))
    fmt = lambda r: f"{r[0]:.4f} (re-buys {r[1]:.3f}, first-time {r[2]:.3f})"  # noqa: E731
    print(f"test: {len(test['users'])} buyers, {test['n_bought'].sum():,} items bought, {test['n_rebuy'].sum():,} re-buys")
    print(f"{'today: fitted linear retrieval score':48s} {fmt(coverage(test, test['base']))}   [validation {coverage(valid, valid['base'])[0]:.4f}; "
          f"its top 400 on test: {fmt(coverage(test, test['base'], 400))}]")
    for name in test["sources"]:
        alone = coverage(test, test["sources"][name])
        gains = [coverage(valid, valid["base"] + a * _scaled(valid["sources"][name]))[0] for a in BLEND_GRID]
        alpha = BLEND_GRID[int(np.argmax(gains))]
        blended = coverage(test, test["base"] + alpha * _scaled(test["sources"][name]))
        best_test = max(coverage(test, test["base"] + a * _scaled(test["sources"][name]))[0] for a in BLEND_GRID)
        gains = [coverage(valid, reserved(valid, valid["base"], valid["sources"][name], k))[0] for k in RESERVED_SLOTS]
        slots = RESERVED_SLOTS[int(np.argmax(gains))]
        reserve = coverage(test, reserved(test, test["base"], test["sources"][name], slots))
        print(f"{name:22s} alone {alone[0]:.4f} (first-time {alone[2]:.3f}) | blended, alpha {alpha:>5} from validation: "
              f"{fmt(blended)} | best alpha on test {best_test:.4f} | {slots} reserved slots: {reserve[0]:.4f} "
              f"(first-time {reserve[2]:.3f}) | first-time in either top 200: {union_first_time(test, test['base'], test['sources'][name]):.3f}",
              flush=True)
    # All new sources at once: a LightGBM retrieval model fitted on the validation cut-off's buyers, scored on test.
    names = list(test["sources"])

    def design(f: dict) -> np.ndarray:
        per_user = [np.column_stack([f["signals"][u], f["base"][u]] + [f["sources"][k][u] for k in names]) for u in range(len(f["users"]))]
        return np.stack(per_user).astype(np.float32)

    xv, xt = design(valid), design(test)
    for label, cols in (("signals", list(range(xv.shape[2] - len(names)))), ("signals + sequence + trend", list(range(xv.shape[2])))):
        x, y = xv[:, :, cols].reshape(-1, len(cols)), valid["y"].reshape(-1)
        keep = y | (np.random.default_rng(0).random(len(y)) < 0.05)
        booster = lgb.train(dict(objective="binary", learning_rate=0.1, num_leaves=15, min_data_in_leaf=50, verbosity=-1, num_threads=2),
                            lgb.Dataset(x[keep], y[keep]), 150)
        score = booster.predict(xt[:, :, cols].reshape(-1, len(cols))).reshape(xt.shape[:2])
        print(f"LightGBM retrieval on {label} (fitted on validation buyers): {fmt(coverage(test, score))}", flush=True)


# ---- `gru`: a small neural next-basket model (runs in a separate venv with torch; never a project dependency) ----

def export_sequences(f: dict, o: pd.DataFrame, n_items: int, path: str) -> None:
    """The baskets before one cut-off (user code, position, item column, first-time flag) and the buyers to score, for `gru`."""
    codes, uniques = pd.factorize(o.user_id)
    lookup = pd.Series(np.arange(len(uniques)), index=uniques)
    np.savez_compressed(path, user=codes, seq=o.seq.to_numpy(), col=o.col.to_numpy(), first=o["first"].to_numpy(), n_items=n_items,
                        buyers=lookup.reindex(f["users"]).fillna(-1).to_numpy(dtype=np.int64), y=f["y"], old=f["old"])


def gru(args: argparse.Namespace) -> None:
    """Train on every user's baskets before the cut-off to predict the items first bought in their next basket (softmax over the
    catalog, multi-hot target), then score the buyers from their whole sequence. Writes <period>_scores.npy beside the export."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    for period in ("validation", "test"):
        z = np.load(os.path.join(args.dir, f"{period}.npz"))
        n, dim, hidden = int(z["n_items"]), 64, 128
        frame = pd.DataFrame({"user": z["user"], "seq": z["seq"], "col": z["col"], "first": z["first"]})
        per_user = {u: g for u, g in frame.groupby("user")}
        sequences = {u: [g.col.to_numpy()[g.seq.to_numpy() == s] for s in np.unique(g.seq)][-args.max_baskets:] for u, g in per_user.items()}
        targets = {u: [g.col.to_numpy()[(g.seq.to_numpy() == s) & g["first"].to_numpy()] for s in np.unique(g.seq)][-args.max_baskets:]
                   for u, g in per_user.items()}
        train_users = [u for u, s in sequences.items() if len(s) > 1]

        class NextBasket(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.items = torch.nn.EmbeddingBag(n, dim, mode="mean")
                self.gru = torch.nn.GRU(dim, hidden, batch_first=True)
                self.out = torch.nn.Linear(hidden, n)
                self.drop = torch.nn.Dropout(0.3)

            def forward(self, users: list) -> torch.Tensor:
                steps = max(len(sequences[u]) for u in users)
                flat = [b for u in users for b in sequences[u]]
                offsets = torch.tensor(np.cumsum([0] + [len(b) for b in flat[:-1]]))
                vectors = self.items(torch.from_numpy(np.concatenate(flat)), offsets)
                padded = torch.zeros(len(users), steps, dim)
                k = 0
                for r, u in enumerate(users):
                    m = len(sequences[u])
                    padded[r, :m] = vectors[k:k + m]
                    k += m
                states, _ = self.gru(self.drop(padded))
                return self.drop(states)  # (batch, steps, hidden): the state after each basket

        model = NextBasket()
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-6)
        rng = np.random.default_rng(0)
        started = time.time()
        for epoch in range(args.epochs):
            model.train()
            order, total = rng.permutation(len(train_users)), 0.0
            for b in range(0, len(order), 64):
                users = [train_users[i] for i in order[b:b + 64]]
                # every (user, step) whose next basket holds first-time items: one softmax over the catalog, the target
                # items sharing the mass equally (multi-hot cross-entropy)
                where = [(r, step, t) for r, u in enumerate(users) for step, t in enumerate(targets[u][1:]) if len(t)]
                if not where:
                    continue
                states = model(users)
                rows = torch.tensor([r for r, _, _ in where]), torch.tensor([step for _, step, _ in where])
                logits = torch.log_softmax(model.out(states[rows]), dim=-1)
                position = torch.from_numpy(np.concatenate([np.full(len(t), k) for k, (_, _, t) in enumerate(where)]))
                item = torch.from_numpy(np.concatenate([t for _, _, t in where]))
                share = torch.from_numpy(np.concatenate([np.full(len(t), 1.0 / len(t), dtype=np.float32) for _, _, t in where]))
                loss = -(logits[position, item] * share).sum() / len(where)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(where)
            model.eval()
            with torch.no_grad():
                buyers = [int(u) for u in z["buyers"]]
                known = [u for u in buyers if u in sequences]
                scores = np.full((len(buyers), n), -1e9, dtype=np.float32)  # exp -> 0 for buyers without baskets
                for b in range(0, len(known), 64):
                    users = known[b:b + 64]
                    states = model(users)
                    final = states[torch.arange(len(users)), torch.tensor([len(sequences[u]) - 1 for u in users])]
                    last = torch.log_softmax(model.out(final), dim=-1)
                    for r, u in enumerate(users):
                        scores[buyers.index(u)] = last[r].numpy()
            top = np.argpartition(-scores, 200, axis=1)[:, :200]
            hit = np.zeros_like(z["y"])
            np.put_along_axis(hit, top, True, axis=1)
            first = (hit & z["y"] & ~z["old"]).sum() / max((z["y"] & ~z["old"]).sum(), 1)
            print(f"  {period} epoch {epoch + 1}: loss {total:.0f}, first-time purchases (in the catalog) in its top 200: {first:.3f} "
                  f"({time.time() - started:.0f}s)", flush=True)
        np.save(os.path.join(args.dir, f"{period}_scores.npy"), np.exp(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--work-dir", required=True)
    b.add_argument("--feature-repo", required=True)
    b.add_argument("--n-cutoffs", type=int, default=8)
    b.add_argument("--out", required=True)
    for name in ("ranker", "candidates", "sequence"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--events", required=True)
        if name == "ranker":
            s.add_argument("--extra", action="store_true", help="add the ten per-order and item features")
        if name == "sequence":
            s.add_argument("--export", help="write each cut-off's baskets and buyers here, for `gru`")
            s.add_argument("--neural", help="a directory with `gru`'s <period>_scores.npy: add them as a source")
    n = sub.add_parser("gru", help="run with a Python that has torch (not a project dependency)")
    n.add_argument("--dir", required=True)
    n.add_argument("--epochs", type=int, default=8)
    n.add_argument("--max-baskets", type=int, default=50)
    args = parser.parse_args()
    {"build": build, "ranker": ranker, "candidates": candidates, "sequence": sequence, "gru": gru}[args.step](args)


if __name__ == "__main__":
    main()
