"""What is left between the UCI Online Retail ranker and issue 9's targets, and which ideas were tried (findings.md).

Three steps, on a work dir that `propensity run` built for UCI (docs/evaluation/reproduce.sh's `pipeline uci`):

    python docs/evaluation/uci_gap.py build --work-dir W --feature-repo R --n-cutoffs 8 --out /tmp/uci_h7.pkl
    python docs/evaluation/uci_gap.py ranker --data /tmp/uci_h7.pkl --events W/prepared/events.parquet [--extra]
    python docs/evaluation/uci_gap.py candidates --data /tmp/uci_h7.pkl --events W/prepared/events.parquet

`build` runs training's own build_training_data with the evaluation's split (last cut-off = test) and keeps the
candidate item of every ranker row. `ranker` fits the ranker both ways as training does (early stopping on the
validation cut-off) and scores the test buyers exactly as `propensity evaluate` does, optionally with ten extra
(user, item) and item features computed from the prepared log (per order: how many of the user's orders hold the
item, how recent the last one is, a TIFU-style decayed membership, the user's order gap, the item's repurchase
rate and trend). `candidates` asks whether richer collaborative signals put more of what test buyers bought into
the 200 candidates: a full cosine item-kNN over order baskets and a TIFU-kNN user-kNN, against today's fitted
linear retrieval score, and a LightGBM retrieval model over all of them (2-fold across test buyers: an upper
bound, since it is fitted on test buyers).
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
    from training.train import build_training_data

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--work-dir", required=True)
    b.add_argument("--feature-repo", required=True)
    b.add_argument("--n-cutoffs", type=int, default=8)
    b.add_argument("--out", required=True)
    for name in ("ranker", "candidates"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--events", required=True)
        if name == "ranker":
            s.add_argument("--extra", action="store_true", help="add the ten per-order and item features")
    args = parser.parse_args()
    {"build": build, "ranker": ranker, "candidates": candidates}[args.step](args)


if __name__ == "__main__":
    main()
