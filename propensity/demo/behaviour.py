"""The shoppers' event process, advanced one day at a time from a ShopState.

Every decision is drawn when it happens: whether a thread comes back, is carted or bought is
decided in the session where it would happen, never when the thread opens. So the state at a
midnight holds everything that is decided, and a continuation from a copy of it (the oracle)
has the same distribution as the log's own future.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propensity.demo.batch import CART, DAY, PURCHASE, UNTIMED, VIEW, Batch, concat, empty, group_starts, sigmoid, take
from propensity.demo.catalog import Catalog
from propensity.demo.config import Behaviour
from propensity.demo.shoppers import Shoppers, day_sessions
from propensity.demo.state import ShopState

_MAX_STEPS = 30  # in-session steps of one thread; a thread still going is left for later


@dataclass(frozen=True)
class DayLog:
    """One day's sessions (ids first_session, first_session + 1, ...) and their untimed events."""

    first_session: int
    sess_user: np.ndarray
    sess_start: np.ndarray  # seconds from the window's start
    events: Batch


@dataclass(frozen=True)
class _World:
    catalog: Catalog
    shoppers: Shoppers
    b: Behaviour


def advance_day(rng: np.random.Generator, catalog: Catalog, shoppers: Shoppers, state: ShopState,
                b: Behaviour, day: int) -> DayLog:
    """Play one day: drift and forgetting at midnight, then the day's sessions in order; updates state."""
    world = _World(catalog, shoppers, b)
    _drift(rng, state, catalog.n_categories, b)
    _age(rng, world, state, day)
    user, start = day_sessions(rng, shoppers.rate, day)
    first = state.next_session
    sess = first + np.arange(user.size, dtype=np.int64)
    state.next_session += user.size
    starts, sizes = group_starts(user)
    rank = np.arange(user.size) - np.repeat(starts, sizes)
    # Set aside the threads of shoppers without a session today: the rounds then scan only the rest.
    today = np.zeros(shoppers.n, bool)
    today[user] = True
    in_play = today[state.threads["user"]]
    idle, state.threads = take(state.threads, ~in_play), take(state.threads, in_play)
    # A user's second session of the day must see what their first one left behind, so the
    # day runs in rounds: every user's first session, then every second one, ...
    rounds = [_session_round(rng, world, state, user[r], start[r], sess[r])
              for r in (rank == k for k in range(int(rank.max(initial=-1)) + 1))]
    state.threads = concat(idle, state.threads)
    return DayLog(first, user, start, concat(empty(UNTIMED), *rounds))


def _drift(rng: np.random.Generator, state: ShopState, n_categories: int, b: Behaviour) -> None:
    """Some shoppers replace one favourite category with another: old interests fade."""
    movers = np.flatnonzero(rng.random(state.favourites.shape[0]) < b.drift_per_day)
    slot = rng.integers(0, state.favourites.shape[1], movers.size)
    state.favourites[movers, slot] = rng.integers(0, n_categories, movers.size)


def _age(rng: np.random.Generator, world: _World, state: ShopState, day: int) -> None:
    """Midnight: forget some threads and carts, drop some re-buy plans, run out of consumables."""
    b, th = world.b, state.threads
    fade = np.where(th["carted"], b.cart_fade_per_day, b.fade_per_day)
    state.threads = take(th, ~th["closed"] & (rng.random(fade.size) >= fade))
    intents = take(state.intents, rng.random(state.intents["user"].size) >= b.intent_fade_per_day)
    clocks = state.clocks
    due = clocks["due"] < (day + 1) * DAY
    ran_out = take(clocks, due)
    again = rng.random(ran_out["user"].size) < world.shoppers.rebuy_prob[ran_out["user"]]
    state.clocks = take(clocks, ~due)
    state.intents = concat(intents, {"user": ran_out["user"][again], "item": ran_out["item"][again]})


def _session_round(rng: np.random.Generator, world: _World, state: ShopState, user: np.ndarray,
                   start: np.ndarray, sess: np.ndarray) -> Batch:
    """Sessions of distinct users: come-backs to open threads, new items, decided re-buys."""
    slot = np.full(world.shoppers.n, -1, np.int64)
    slot[user] = np.arange(user.size)
    th = state.threads
    own = np.flatnonzero((slot[th["user"]] >= 0) & ~th["closed"])
    b, carted, engaged = world.b, th["carted"][own], th["engaged"][own]
    # Per session, not per day: a shopper with many sessions does not come back to more old items.
    p_back = np.where(carted, b.resurface_cart, np.where(engaged, b.resurface[1], b.resurface[0]))
    p_forget = np.where(carted, b.forget_cart, np.where(engaged, b.forget[1], b.forget[0]))
    u = rng.random(own.size)
    back = own[u < p_back]
    th["closed"][own[(u >= p_back) & (u < p_back + p_forget)]] = True
    new = _open_threads(rng, world, state, user)
    active = np.concatenate([back, new])
    threads = _play_threads(rng, world, state, active, start[slot[state.threads["user"][active]]])
    rebuys = _rebuy(rng, world, state, slot, start)
    events = concat(threads, rebuys)
    events["sess"] = sess[slot[events["user"]]]
    return events


def _open_threads(rng: np.random.Generator, world: _World, state: ShopState, user: np.ndarray) -> np.ndarray:
    """Items first looked at in these sessions become new threads; returns their thread indices."""
    b = world.b
    owner = np.repeat(user, 1 + rng.poisson(b.new_items_per_session, user.size))
    n = owner.size
    slot = (rng.random(n)[:, None] > world.shoppers.fav_cdf[owner]).sum(axis=1)
    cat = state.favourites[owner, np.minimum(slot, b.n_favourites - 1)]
    cat = np.where(rng.random(n) < b.explore, rng.integers(0, world.catalog.n_categories, n), cat)
    first = state.threads["user"].size
    state.threads = concat(state.threads, {
        "user": owner, "item": world.catalog.pick(rng, cat), "views": np.zeros(n, np.int64),
        "carted": np.zeros(n, bool), "engaged": rng.random(n) < b.engaged_share,
        "qty": 1 + (rng.random(n) < 0.1) + (rng.random(n) < 0.02), "closed": np.zeros(n, bool)})
    return first + np.arange(n)


def _play_threads(rng: np.random.Generator, world: _World, state: ShopState, active: np.ndarray,
                  now: np.ndarray) -> Batch:
    """Run these threads through one session each: look, maybe look again, cart, buy or leave."""
    b, cat, sh, th = world.b, world.catalog, world.shoppers, state.threads
    user, item = th["user"][active], th["item"][active]
    n = active.size
    views, carted = th["views"][active].copy(), th["carted"][active].copy()
    engaged = th["engaged"][active]
    z = sh.activity[user]
    # Odds fall with the price above the shopper's reference, at the shopper's own rate.
    price_gap = sh.sensitivity[user] * np.maximum(0.0, np.log(cat.item_price[item]) - sh.log_ref_price[user])
    idx, kinds, steps = [], [], []

    def emit(who: np.ndarray, kind: int, step: int) -> None:
        idx.append(who)
        kinds.append(np.full(who.size, kind, np.int8))
        steps.append(np.full(who.size, step, np.int64))

    look = np.flatnonzero(~carted | (rng.random(n) < b.cart_look))
    emit(look, VIEW, 0)
    views[look] += 1
    live, bought = np.ones(n, bool), np.zeros(n, bool)
    for step in range(1, _MAX_STEPS):
        i = np.flatnonzero(live)
        if i.size == 0:
            break
        u, u2 = rng.random(i.size), rng.random(i.size)
        shop_for = i[carted[i]]  # in the cart since an earlier step or session: buy or leave it
        c0, c1, c2 = b.buy_logit
        p_buy = sigmoid(c0 + c1 * (views[shop_for] - 1) + c2 * z[shop_for] - price_gap[shop_for])
        buy = shop_for[u[carted[i]] < p_buy]
        emit(buy, PURCHASE, step)
        bought[buy] = True
        live[shop_for] = False
        browsing = i[~carted[i]]
        c0, c1, c2, c3 = b.cart_logit
        p_cart = sigmoid(c0 + c1 * (views[browsing] - 1) + c2 * z[browsing] + c3 * engaged[browsing]
                         - price_gap[browsing]) * cat.item_available[item[browsing]]
        to_cart = u[~carted[i]] < p_cart
        again = ~to_cart & (u2[~carted[i]] < np.where(engaged[browsing], b.view_again[1], b.view_again[0]))
        emit(browsing[to_cart], CART, step)
        carted[browsing[to_cart]] = True
        emit(browsing[again], VIEW, step)
        views[browsing[again]] += 1
        live[browsing[~to_cart & ~again]] = False
    th["views"][active], th["carted"][active], th["closed"][active] = views, carted, bought
    _start_clocks(rng, world, state, user[bought], item[bought], now[bought])
    who = np.concatenate(idx)
    kind = np.concatenate(kinds)
    key = rng.random(n)
    return {"sess": np.zeros(who.size, np.int64), "user": user[who], "item": item[who], "etype": kind,
            "qty": np.where(kind == VIEW, 1, th["qty"][active][who]), "key": key[who],
            "step": np.concatenate(steps)}


def _rebuy(rng: np.random.Generator, world: _World, state: ShopState, slot: np.ndarray,
           start: np.ndarray) -> Batch:
    """Decided re-buys of these sessions' users: a look (usually), the cart, the purchase."""
    mine = slot[state.intents["user"]] >= 0
    go = take(state.intents, mine)
    state.intents = take(state.intents, ~mine)
    n = go["user"].size
    look = rng.random(n) < world.b.rebuy_view_first
    qty = 1 + (rng.random(n) < 0.1) + (rng.random(n) < 0.02)
    key = rng.random(n)
    _start_clocks(rng, world, state, go["user"], go["item"], start[slot[go["user"]]])
    pick = np.concatenate([np.flatnonzero(look), np.arange(n), np.arange(n)])
    kind = np.repeat(np.array([VIEW, CART, PURCHASE], np.int8), [look.sum(), n, n])
    return {"sess": np.zeros(pick.size, np.int64), "user": go["user"][pick], "item": go["item"][pick],
            "etype": kind, "qty": np.where(kind == VIEW, 1, qty[pick]), "key": key[pick],
            "step": kind.astype(np.int64)}


def _start_clocks(rng: np.random.Generator, world: _World, state: ShopState, user: np.ndarray,
                  item: np.ndarray, now: np.ndarray) -> None:
    """A consumable bought now runs out after about its item's interval, give or take."""
    days = world.catalog.rebuy_days[item]
    keep = days > 0
    shape = world.b.rebuy_jitter_shape
    due = now[keep] + (days[keep] * rng.gamma(shape, 1.0 / shape, int(keep.sum())) * DAY).astype(np.int64)
    state.clocks = concat(state.clocks, {"user": user[keep], "item": item[keep], "due": due})
