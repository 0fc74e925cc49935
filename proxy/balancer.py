"""Choosing an endpoint for a new connection.

Two policies, chosen per proxy (``--balancer``):

* ``wrr`` — smooth weighted round robin, as nginx does it
  (``ngx_http_upstream_get_peer``): every pick adds each peer's weight to
  its running ``current``, takes the peer with the largest ``current`` and
  subtracts the total weight from it. Weights 5:1:1 give ``a a b a c a a``,
  not ``a a a a a b c``: the heavy peer's turns are spread out, so a burst
  of new connections never lands on one endpoint.
* ``p2c`` — power of two choices on open connections: two distinct random
  candidates, the one with fewer open connections per unit of weight wins.
  It needs no shared counter, reacts to slow endpoints (their connections
  pile up) and avoids the herd behaviour of always taking the global least.

Both pick from the table's routing set (:meth:`ServiceTable.candidates
<proxy.endpoints.ServiceTable.candidates>`) and skip the endpoints already
tried for this connection (``exclude``), which is how a refused connect is
retried on another endpoint. A weight of 0 or less takes an endpoint out of
rotation, unless every candidate has one (then they count equally).
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from typing import Final, Protocol

from proxy.endpoints import EndpointState

__all__ = ["BALANCERS", "Balancer", "PowerOfTwoChoices", "SmoothWeightedRoundRobin", "make"]

#: Names accepted by :func:`make` (and ``--balancer``).
BALANCERS: Final = ("wrr", "p2c")


class Balancer(Protocol):
    """A policy with its own state, one per service."""

    def pick(
        self, candidates: Sequence[EndpointState], exclude: Container[str] = ()
    ) -> EndpointState | None:
        """An endpoint from ``candidates`` whose id is not in ``exclude``; None if none is."""
        ...


def _weights(candidates: Sequence[EndpointState]) -> list[int]:
    weights = [max(e.weight, 0) for e in candidates]
    if not any(weights):
        return [1] * len(weights)
    return weights


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin; see the module docstring."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        self._seen: Sequence[EndpointState] | None = None

    def pick(
        self, candidates: Sequence[EndpointState], exclude: Container[str] = ()
    ) -> EndpointState | None:
        if candidates is not self._seen:
            # A new routing set: forget the endpoints that left it (the ones
            # that stay keep their place in the rotation).
            ids = {e.id for e in candidates}
            self._current = {k: v for k, v in self._current.items() if k in ids}
            self._seen = candidates
        current = self._current
        best: EndpointState | None = None
        best_current = 0
        total = 0
        for endpoint, weight in zip(candidates, _weights(candidates), strict=True):
            if weight == 0 or endpoint.id in exclude:
                continue
            value = current.get(endpoint.id, 0) + weight
            current[endpoint.id] = value
            total += weight
            if best is None or value > best_current:
                best, best_current = endpoint, value
        if best is not None:
            current[best.id] = best_current - total
        return best


class PowerOfTwoChoices:
    """Two random candidates, the less loaded wins; see the module docstring."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, candidates: Sequence[EndpointState], exclude: Container[str] = ()
    ) -> EndpointState | None:
        pool = [
            (e, w) for e, w in zip(candidates, _weights(candidates), strict=True)
            if w > 0 and e.id not in exclude
        ]  # fmt: skip
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0][0]
        (a, wa), (b, wb) = self._rng.sample(pool, 2)
        # Compare open/weight without division: a wins ties (it is random anyway).
        return a if a.open_connections * wb <= b.open_connections * wa else b


def make(kind: str, rng: random.Random | None = None) -> Balancer:
    """A fresh balancer of ``kind`` (one of :data:`BALANCERS`)."""
    if kind == "wrr":
        return SmoothWeightedRoundRobin()
    if kind == "p2c":
        return PowerOfTwoChoices(rng)
    raise ValueError(f"unknown balancer {kind!r}; expected one of {', '.join(BALANCERS)}")
