"""Everything the shop's future depends on at a midnight, besides the fixed traits.

The behaviour advances this state a day at a time; the oracle copies it at the cut-off and runs
its continuations from the copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propensity.demo.batch import Batch, empty
from propensity.demo.shoppers import Shoppers

# An open interest thread: an item the shopper has looked at and may come back to. A carted
# thread is an item in the cart that is not bought yet; it stays there until bought or forgotten.
# Bought threads are marked closed and dropped at the next midnight.
THREAD = {"user": np.int64, "item": np.int64, "views": np.int64, "carted": np.bool_,
          "engaged": np.bool_, "qty": np.int64, "closed": np.bool_}
# A consumable the shopper will run out of at `due` (seconds from the window's start).
CLOCK = {"user": np.int64, "item": np.int64, "due": np.int64}
# A re-buy the shopper has decided on, made in their next session.
INTENT = {"user": np.int64, "item": np.int64}


@dataclass
class ShopState:
    """Drifting favourites, open threads (carts included), re-buy clocks and decided re-buys."""

    favourites: np.ndarray
    threads: Batch
    clocks: Batch
    intents: Batch
    next_session: int = 0  # the next session id

    @classmethod
    def initial(cls, shoppers: Shoppers) -> ShopState:
        """The state at the window's start: favourites as drawn, nothing open."""
        return cls(shoppers.favourites.copy(), empty(THREAD), empty(CLOCK), empty(INTENT))

    def tiled(self, copies: int) -> ShopState:
        """copies independent copies of this state, for shoppers tiled the same way (Shoppers.tile)."""
        n = self.favourites.shape[0]

        def tile(batch: Batch) -> Batch:
            size = batch["user"].size
            out = {k: np.tile(v, copies) for k, v in batch.items()}
            out["user"] = out["user"] + np.repeat(np.arange(copies, dtype=np.int64) * n, size)
            return out

        return ShopState(np.tile(self.favourites, (copies, 1)), tile(self.threads), tile(self.clocks),
                         tile(self.intents), self.next_session)
