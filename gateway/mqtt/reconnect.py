"""Which broker node to connect to next, and how long to wait before trying.

The nodes of one broker (a single host, or the nodes of a cluster) are tried in turn: the first first, the next
one when a connection attempt fails or an established connection drops. Once every node has failed in a row,
each further round waits longer: capped exponential backoff with full jitter (a uniformly random wait up to
the ceiling), so a fleet of gateways does not reconnect in lockstep after a broker restart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["Endpoint", "Reconnect"]

Endpoint = tuple[str, int]


class Reconnect:
    def __init__(
        self,
        nodes: Sequence[Endpoint],
        *,
        initial: float,
        maximum: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not nodes:
            raise ValueError("at least one broker node is needed")
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.nodes = tuple(nodes)
        self._initial = initial
        self._maximum = maximum
        self._rand = rand
        self._index = 0
        self._failures = 0  # consecutive, since the last connection that held

    @property
    def current(self) -> Endpoint:
        """The node to try next."""
        return self.nodes[self._index]

    def ceiling(self) -> float:
        """The longest wait before the next attempt: `initial` through the first round of failures, doubling
        with each further round of every node."""
        rounds = max(0, self._failures - 1) // len(self.nodes)
        return min(self._maximum, self._initial * 2.0 ** min(rounds, 32))

    def delay(self) -> float:
        """Seconds to wait before trying `current` (full jitter)."""
        if self._failures == 0:
            return 0.0
        return self._rand() * self.ceiling()

    def failed(self) -> None:
        """The attempt on `current` failed, or its connection dropped: move on to the next node."""
        self._failures += 1
        self._index = (self._index + 1) % len(self.nodes)

    def held(self) -> None:
        """The connection to `current` is fully up (subscribed, announced): the next failure starts afresh."""
        self._failures = 0
