"""Users rotating through the load: every h2load process takes the next user of one list.

h2load posts the same body on every request, so one h2load process can only ever ask for one
user. The bench therefore runs each concurrency level as slots of side-by-side processes, each
slot replacing its process by one for the next user of the list many times per level,
continuing across levels and phases: the whole sweep walks through the sampled users instead of
repeating a few. A user counts as touched once one of its requests was answered with a message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


class UserRotation:
    """The next users of a fixed list, wrapping around; remembers who the load actually reached."""

    def __init__(self, users: Sequence[str]) -> None:
        if not users:
            raise ValueError("no users to rotate over")
        self.users = list(users)
        self._next = 0
        self._touched: set[str] = set()

    def take(self, n: int) -> list[str]:
        """The next n users (distinct as long as n <= len(users)); the following call continues after them."""
        out = [self.users[(self._next + i) % len(self.users)] for i in range(n)]
        self._next = (self._next + n) % len(self.users)
        return out

    def record(self, answered: Iterable[tuple[str, int]]) -> None:
        """(user, requests answered with a message) pairs of a finished round."""
        self._touched.update(user for user, count in answered if count > 0)

    @property
    def touched(self) -> set[str]:
        return set(self._touched)


def split(concurrency: int, max_procs: int, max_clients: int = 4) -> tuple[int, int, int]:
    """(processes, connections per process, streams per connection) for a total concurrency.

    One user per process, so more processes side by side mean more users per level.
    """
    procs = max(1, min(concurrency, max_procs))
    per_proc = max(1, concurrency // procs)
    clients = min(per_proc, max_clients)
    return procs, clients, max(1, per_proc // clients)


def segments_per_slot(levels: Sequence[int], seconds: float, n_users: int, max_procs: int,
                      min_segment_seconds: float, at_least: int = 1) -> int:
    """How many h2load processes (users) each slot runs per level so that one sweep over `levels` reaches n_users.

    A slot of a level lasting `seconds` runs about that many processes of seconds / segments each,
    never shorter than min_segment_seconds (each one opens its own connections). Returns at least `at_least`.
    """
    per_sweep = sum(split(c, max_procs)[0] for c in levels)
    needed = math.ceil(n_users / per_sweep) if per_sweep else 1
    longest = max(1, math.floor(seconds / min_segment_seconds + 1e-9))
    return max(at_least, min(needed, longest))
