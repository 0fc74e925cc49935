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

A third, :class:`ConsistentHash`, is chosen by a policy only (``ring_hash``,
see :mod:`proxy.policy`): the same key always lands on the same endpoint
while the set is unchanged, and a change moves only the keys of the
endpoints that came or went (weighted rendezvous hashing, which gives the
ring's guarantees without building a ring).

Every policy picks from the table's routing set (:meth:`ServiceTable.candidates
<proxy.endpoints.ServiceTable.candidates>`) and skip the endpoints already
tried for this connection (``exclude``), which is how a refused connect is
retried on another endpoint. A weight of 0 or less takes an endpoint out of
rotation, unless every candidate has one (then they count equally). ``weights``,
when given, replaces the endpoints' own weights one for one (a policy's
overrides, see :mod:`proxy.policy`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Container, Sequence
from typing import Final, Protocol

from proxy.endpoints import EndpointState

__all__ = [
    "BALANCERS",
    "Balancer",
    "ConsistentHash",
    "PowerOfTwoChoices",
    "SmoothWeightedRoundRobin",
    "make",
]

#: Names accepted by :func:`make` (and ``--balancer``).
BALANCERS: Final = ("wrr", "p2c")


class Balancer(Protocol):
    """A policy with its own state, one per service."""

    def pick(
        self,
        candidates: Sequence[EndpointState],
        exclude: Container[str] = (),
        weights: Sequence[int] | None = None,
    ) -> EndpointState | None:
        """An endpoint from ``candidates`` whose id is not in ``exclude``; None if none is.
        ``weights`` (one per candidate) replaces the endpoints' own weights."""
        ...


def _weights(candidates: Sequence[EndpointState], given: Sequence[int] | None = None) -> list[int]:
    weights = [max(w, 0) for w in given] if given is not None else [
        max(e.weight, 0) for e in candidates
    ]  # fmt: skip
    if not any(weights):
        return [1] * len(weights)
    return weights


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin; see the module docstring."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        self._seen: Sequence[EndpointState] | None = None

    def pick(
        self,
        candidates: Sequence[EndpointState],
        exclude: Container[str] = (),
        weights: Sequence[int] | None = None,
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
        for endpoint, weight in zip(candidates, _weights(candidates, weights), strict=True):
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
        self,
        candidates: Sequence[EndpointState],
        exclude: Container[str] = (),
        weights: Sequence[int] | None = None,
    ) -> EndpointState | None:
        pool = [
            (e, w) for e, w in zip(candidates, _weights(candidates, weights), strict=True)
            if w > 0 and e.id not in exclude
        ]  # fmt: skip
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0][0]
        (a, wa), (b, wb) = self._rng.sample(pool, 2)
        # Compare open/weight without division: a wins ties (it is random anyway).
        return a if a.open_connections * wb <= b.open_connections * wa else b


class ConsistentHash:
    """Weighted rendezvous hashing on a key; see the module docstring.

    Each endpoint scores ``-ln(u) / weight``, ``u`` a uniform draw in (0, 1) derived from
    the hash of ``(key, endpoint id)``; the lowest score wins. So an endpoint's share of
    the keys is proportional to its weight, and removing one endpoint moves only the
    keys it had. It keeps no state: ``key`` is given per pick (:meth:`pick_for`).
    """

    def pick(
        self,
        candidates: Sequence[EndpointState],
        exclude: Container[str] = (),
        weights: Sequence[int] | None = None,
    ) -> EndpointState | None:
        """The endpoint of the empty key (a connection with no key of its own)."""
        return self.pick_for("", candidates, exclude, weights)

    def pick_for(
        self,
        key: str,
        candidates: Sequence[EndpointState],
        exclude: Container[str] = (),
        weights: Sequence[int] | None = None,
    ) -> EndpointState | None:
        best: EndpointState | None = None
        best_score = math.inf
        for endpoint, weight in zip(candidates, _weights(candidates, weights), strict=True):
            if weight == 0 or endpoint.id in exclude:
                continue
            digest = hashlib.blake2b(f"{key}\0{endpoint.id}".encode(), digest_size=8).digest()
            draw = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
            score = -math.log(draw) / weight
            if score < best_score:
                best, best_score = endpoint, score
        return best


def make(kind: str, rng: random.Random | None = None) -> Balancer:
    """A fresh balancer of ``kind`` (one of :data:`BALANCERS`)."""
    if kind == "wrr":
        return SmoothWeightedRoundRobin()
    if kind == "p2c":
        return PowerOfTwoChoices(rng)
    raise ValueError(f"unknown balancer {kind!r}; expected one of {', '.join(BALANCERS)}")
