"""A service's governance policy, as this proxy applies it.

The Dispatcher sends the effective policy of each subscribed service for this proxy's
application (:class:`dispatcher.wire.PolicyUpdate`); :class:`ServicePolicy` parses it into a
:class:`~dispatcher.governance.policy.Policy` and makes a :class:`Route` of it: what the
forwarder (:mod:`proxy.forward`) applies to every new connection of that service. No policy,
or an empty one, makes no route, and the forwarder does exactly what the proxy's flags say;
a field a policy leaves unset keeps the flag's value. A new policy applies to connections
accepted from then on; connections already spliced keep going.

This proxy sees connections and bytes, not requests, so each field means:

* ``connect_timeout``: seconds per connect attempt to one endpoint (``--connect-timeout``).
* ``request_timeout``: time to the first byte of the response. The clock starts when the
  client's first bytes have been passed to the endpoint, and stops at the endpoint's first
  byte back (or its close); past it, both sides are reset, the connection counts as a
  failure of that endpoint for outlier ejection, and it is not retried (the request was
  sent). Later exchanges on the same connection are not timed: where one message ends is
  not visible to a byte splicer. A client that connects and sends nothing is not timed
  either. Setting it costs one step per connection before the splice.
* ``retries``: ``count`` more endpoints after a failed connect (``attempts = count + 1``,
  ``--attempts``), only for the failures listed in ``on``: a refused or failed connect is
  ``connect-failure``, a timed-out connect is both ``connect-failure`` and ``timeout``;
  nothing after the connect is retried (the client's bytes are passed on as they come, so
  there is nothing to send again). ``budget``: a connection starts retrying only while
  fewer than ``budget`` % of the connections held for the service are retrying (at least
  one may always retry, unless the budget is 0).
* ``load_balancing``: ``wrr`` and ``p2c`` as ``--balancer``; ``ring_hash`` hashes the
  client's address (its IP; a Unix socket client has none, so they all share one
  endpoint), whatever ``hash_key`` says: headers, cookies and query strings are not
  visible here.
* ``weights``: ``instances`` replace the registry's weight of an instance (by its id, which
  is ``host:port``, or by ``host:port``); ``zones`` multiply the weight of each instance in
  that zone by ``weight / 100``.
* ``zone_affinity`` (unless ``enabled = false``): with the proxy's own zone known
  (``--zone``), connections go to the endpoints of that zone while at least
  ``fallback_threshold`` % (default :data:`DEFAULT_FALLBACK_THRESHOLD`) of that zone's
  endpoints are routable (healthy and not ejected); below it, or with no zone known, to all.
* ``outlier_ejection``: ``consecutive_failures``, ``base_ejection_time`` and
  ``max_ejection_percent`` as the ``--eject-*`` flags; ``interval`` is how long an
  endpoint stays back in rotation for one past ejection to be forgiven.
* ``circuit_breaking``: ``max_connections`` bounds the client connections held for the
  service at once (being connected or spliced); one more is closed at once with a reset.
  ``max_pending`` bounds the connections waiting for an endpoint to appear (a proxy
  starting up, a service with none); one more is closed likewise (0: none waits).
* ``split``: each connection first draws an instance tag value by the shares (an instance
  whose tag matches no share gets nothing), then the balancer picks among the endpoints
  with that value. A value whose endpoints are all out of rotation gives its share to the
  others rather than failing connections.

A document that does not parse (a newer Dispatcher's field, say) is refused with a log line
and the policy in force stays.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Container, Mapping
from typing import Any, Final

import attrs

from dispatcher.governance.policy import (
    CircuitBreaking,
    OutlierEjection,
    Policy,
    PolicyError,
    Retries,
    Weights,
)
from dispatcher.wire import join_address
from proxy.balancer import Balancer, ConsistentHash, make
from proxy.endpoints import EndpointState, ServiceTable
from proxy.forward import ForwardSettings
from proxy.outlier import OutlierDetector, OutlierPolicy

__all__ = ["DEFAULT_FALLBACK_THRESHOLD", "RETRY_CLASSES", "Defaults", "Route", "ServicePolicy"]

log = logging.getLogger(__name__)

DEFAULT_FALLBACK_THRESHOLD: Final = 50.0
"""Percent of the local zone's endpoints that must be routable to keep traffic in the zone."""

RETRY_CLASSES: Final[Mapping[str, frozenset[str]]] = {
    "connect-refused": frozenset({"connect-failure"}),
    "connect-error": frozenset({"connect-failure"}),
    "resolve-failed": frozenset({"connect-failure"}),
    "connect-timeout": frozenset({"connect-failure", "timeout"}),
}
"""The ``retries.on`` names each connect failure of :mod:`proxy.forward` answers to."""


@attrs.frozen
class Defaults:
    """What the proxy does where a policy says nothing: its flags, and its own zone."""

    forward: ForwardSettings = attrs.field(factory=ForwardSettings)
    balancer: str = "wrr"
    outlier: OutlierPolicy = attrs.field(factory=OutlierPolicy)
    #: The zone this proxy runs in ("" unknown: zone affinity cannot apply).
    zone: str = ""


@attrs.frozen
class _Group:
    """The endpoints of one split share (or all of them), with their effective weights."""

    share: float
    endpoints: tuple[EndpointState, ...]
    weights: tuple[int, ...] | None
    balancer: Balancer


def _outlier_policy(section: OutlierEjection | None, flags: OutlierPolicy) -> OutlierPolicy:
    if section is None:
        return flags
    base = flags.base_ejection if section.base_ejection_time is None else section.base_ejection_time
    percent = flags.max_ejection_percent
    if section.max_ejection_percent is not None:
        percent = math.floor(section.max_ejection_percent)
    return OutlierPolicy(
        consecutive_failures=section.consecutive_failures or flags.consecutive_failures,
        base_ejection=base,
        # The flag's cap, but never below one base ejection.
        max_ejection=max(flags.max_ejection, base),
        max_ejection_percent=percent,
        decay=section.interval if section.interval is not None else flags.decay,
    )


class Route:
    """What the forwarder applies to the connections of one service under one policy.

    Built by :class:`ServicePolicy`; read on the trio thread by :mod:`proxy.forward`. It
    holds the balancers' state (a smooth round robin's position), so it lives as long as
    its policy.
    """

    def __init__(
        self, version: int, policy: Policy, defaults: Defaults, rng: random.Random
    ) -> None:
        self.version = version
        self.policy = policy
        forward = defaults.forward
        retries = policy.retries or Retries()
        #: connect_timeout and attempts as the policy says, the rest as the flags.
        self.settings = attrs.evolve(
            forward,
            connect_timeout=policy.connect_timeout or forward.connect_timeout,
            attempts=forward.attempts if retries.count is None else retries.count + 1,
        )
        #: Seconds from the client's first byte passed on to the endpoint's first byte back.
        self.request_timeout = policy.request_timeout
        self.retry_on = None if retries.on is None else frozenset(retries.on)
        self.retry_budget = retries.budget
        breaking = policy.circuit_breaking or CircuitBreaking()
        self.max_connections = breaking.max_connections
        self.max_pending = breaking.max_pending
        self.outlier = OutlierDetector(_outlier_policy(policy.outlier_ejection, defaults.outlier))
        balancing = policy.load_balancing
        self.kind = defaults.balancer if balancing is None else balancing.policy
        #: Whether :meth:`pick` needs the client's address as its key.
        self.needs_key = self.kind == "ring_hash"
        weights = policy.weights or Weights()
        self._instance_weights = dict(weights.instances)
        self._zone_weights = dict(weights.zones)
        affinity = policy.zone_affinity
        self.zone = defaults.zone if affinity is not None and affinity.enabled is not False else ""
        self.fallback_threshold = (
            DEFAULT_FALLBACK_THRESHOLD
            if affinity is None or affinity.fallback_threshold is None
            else affinity.fallback_threshold
        )
        self.split = policy.split
        self._rng = rng
        self._balancers: dict[str | None, Balancer] = {}
        self._seen: tuple[EndpointState, ...] | None = None
        self._groups: tuple[_Group, ...] = ()

    # ------------------------------------------------------------- admission

    def admit(self, held: int) -> bool:
        """Whether one more connection may be held when ``held`` are (max_connections)."""
        return self.max_connections is None or held < self.max_connections

    def may_wait(self, waiting: int) -> bool:
        """Whether one more connection may wait for an endpoint when ``waiting`` do."""
        return self.max_pending is None or waiting < self.max_pending

    def may_retry(self, reason: str, *, held: int, retrying: int, first: bool) -> bool:
        """Whether a connection whose connect failed with ``reason`` tries another endpoint.

        ``first``: it would be this connection's first retry (only that one is held to the
        budget: a connection retrying already was counted when it started).
        """
        if self.retry_on is not None and not RETRY_CLASSES.get(reason, frozenset()) & self.retry_on:
            return False
        if self.retry_budget is None or not first:
            return True
        if self.retry_budget == 0:
            return False
        return retrying < max(1, math.floor(held * self.retry_budget / 100))

    # ------------------------------------------------------------- picking

    def pick(
        self, table: ServiceTable, now: float, exclude: Container[str], key: str
    ) -> EndpointState | None:
        """An endpoint for a new connection (``key``: the client's address, for ring_hash)."""
        candidates = table.candidates(now)
        if candidates is not self._seen:
            self._groups = self._build(table, candidates)
            self._seen = candidates
        groups = [g for g in self._groups if any(e.id not in exclude for e in g.endpoints)]
        if not groups:
            return None
        group = groups[0]
        if len(groups) > 1:
            draw = self._rng.random() * math.fsum(g.share for g in groups)
            for group in groups:
                draw -= group.share
                if draw < 0:
                    break
        if isinstance(group.balancer, ConsistentHash):
            return group.balancer.pick_for(key, group.endpoints, exclude, group.weights)
        return group.balancer.pick(group.endpoints, exclude, group.weights)

    def _build(
        self, table: ServiceTable, candidates: tuple[EndpointState, ...]
    ) -> tuple[_Group, ...]:
        if self.split is None:
            selections: list[tuple[str | None, float]] = [(None, 100.0)]
        else:
            selections = [(value, share) for value, share in self.split.shares if share > 0]
        groups: list[_Group] = []
        for value, share in selections:
            members = candidates if value is None else tuple(
                e for e in candidates if self._tag(e) == value
            )  # fmt: skip
            members = self._in_zone(table, members, value)
            if not members:
                continue
            weights = None
            if self._instance_weights or self._zone_weights:
                weights = tuple(self._weight(e) for e in members)
            groups.append(_Group(share, members, weights, self._balancer(value)))
        if candidates and not groups and self.split is not None:
            log.warning("no endpoint carries a tag value the split names; refusing connections",
                        extra={"service": table.service, "tag": self.split.tag})  # fmt: skip
        return tuple(groups)

    def _tag(self, endpoint: EndpointState) -> str | None:
        assert self.split is not None
        return endpoint.instance.metadata.get(self.split.tag)

    def _in_zone(
        self, table: ServiceTable, members: tuple[EndpointState, ...], value: str | None
    ) -> tuple[EndpointState, ...]:
        """``members`` in this proxy's zone while enough of that zone is routable."""
        if not self.zone:
            return members
        local = tuple(e for e in members if e.instance.zone == self.zone)
        everyone = [
            e for e in table
            if e.instance.zone == self.zone and (value is None or self._tag(e) == value)
        ]  # fmt: skip
        if local and len(local) * 100 >= self.fallback_threshold * len(everyone):
            return local
        return members

    def _weight(self, endpoint: EndpointState) -> int:
        instance = endpoint.instance
        weight = self._instance_weights.get(endpoint.id)
        if weight is None:
            address = join_address(instance.host, instance.port)
            weight = self._instance_weights.get(address, instance.weight)
        # Scaled by 100 throughout, so a zone's factor stays a whole number.
        return max(weight, 0) * self._zone_weights.get(instance.zone, 100)

    def _balancer(self, value: str | None) -> Balancer:
        found = self._balancers.get(value)
        if found is None:
            found = ConsistentHash() if self.kind == "ring_hash" else make(self.kind, self._rng)
            self._balancers[value] = found
        return found


class ServicePolicy:
    """The policy in force for one service at this proxy; see the module docstring.

    ``route`` is None while no policy (or an empty one) is in force: the flags apply.
    """

    def __init__(
        self, service: str, defaults: Defaults | None = None, rng: random.Random | None = None
    ) -> None:
        self.service = service
        self.defaults = defaults or Defaults()
        self._rng = rng or random.Random()
        #: The governance version applied last; None before the first.
        self.version: int | None = None
        self.policy: Policy | None = None
        self.route: Route | None = None
        #: Policy documents refused because they did not parse.
        self.refused = 0

    def apply(self, version: int, document: Mapping[str, Any]) -> bool:
        """Apply the policy ``document`` of governance ``version``; False (and the policy in
        force stays) when it does not parse."""
        try:
            policy = Policy.from_mapping(dict(document), f"policy {self.service!r}")
        except PolicyError as exc:
            self.refused += 1
            log.error("refusing a policy that does not parse; the one in force stays", extra={
                "service": self.service, "version": version, "error": str(exc)[:500],
            })  # fmt: skip
            return False
        self.version = version
        if policy == self.policy:
            return True  # the same policy: keep the balancers' state
        self.policy = policy
        self.route = None if policy == Policy() else Route(version, policy, self.defaults,
                                                           self._rng)  # fmt: skip
        log.info("policy applied", extra={
            "service": self.service, "version": version, "policy": policy.to_json()[:1000],
        })  # fmt: skip
        balancing = policy.load_balancing
        if balancing is not None and balancing.hash_key not in (None, "source_ip"):
            log.info("ring_hash hashes the client's address here: a TCP proxy sees no "
                     f"{balancing.hash_key.partition(':')[0]}s",
                     extra={"service": self.service, "hash_key": balancing.hash_key})  # fmt: skip
        affinity = policy.zone_affinity
        if affinity is not None and affinity.enabled is not False and not self.defaults.zone:
            log.warning("zone affinity asked for, but this proxy's zone is unknown (--zone)",
                        extra={"service": self.service})  # fmt: skip
        return True
