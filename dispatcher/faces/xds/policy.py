"""A governance policy as Envoy and proxyless gRPC apply it: the xDS fields of each part.

:mod:`~dispatcher.faces.xds.resources` builds the resources; this module says what a
:class:`~dispatcher.governance.policy.Policy` changes in them. The mapping, field by field
(``proxy/policy.py`` documents what each field means; this is its closest xDS spelling):

* ``connect_timeout``: ``Cluster.connect_timeout``.
* ``request_timeout``: the route's ``timeout`` (Envoy) and
  ``max_stream_duration.max_stream_duration`` (proxyless gRPC reads that one, not
  ``timeout``). HTTP and gRPC only: a TCP proxy has no request to time.
* ``retries``: the route's ``retry_policy`` (``num_retries`` = ``count``; ``retry_on`` the
  names of ``on``, ``timeout`` spelled ``deadline-exceeded`` as gRPC names it);
  ``budget`` is the cluster's ``circuit_breakers`` retry budget (``budget_percent``, one
  retry always allowed). For a sidecar's TCP listener, ``count`` more connect attempts
  (``TcpProxy.max_connect_attempts``) when ``on`` includes ``connect-failure`` (or is unset).
* ``load_balancing``: ``lb_policy`` ``ROUND_ROBIN`` (``wrr``), ``LEAST_REQUEST`` with two
  choices (``p2c``), ``RING_HASH`` (``ring_hash``) with the route's ``hash_policy`` on the
  ``hash_key`` (a header, a cookie, a query parameter or the source IP); the TCP listener
  hashes the source IP whatever the key says (a TCP proxy sees no headers).
* ``weights``: each endpoint's ``load_balancing_weight``: an instance's entry (by its id or
  ``host:port``) replaces the registry's weight, a zone's multiplies it by ``weight / 100``.
* ``split``: endpoint weights too (:func:`~dispatcher.governance.weights.instance_weights`),
  not weighted clusters:
  one cluster and one assignment per service keep every client (a TCP listener, an HTTP
  route, proxyless gRPC) on the same resources, a policy change re-encodes one service's
  resources and nothing is added to a wildcard client's cluster list; and the shares are
  exact at every balancer that honours endpoint weights, where weighted clusters would
  need a cluster per tag value, each with its own EDS subset, for the same result.
* ``outlier_ejection``: ``Cluster.outlier_detection``: ``consecutive_failures`` as
  ``consecutive_5xx``, ``consecutive_gateway_failure`` (enforced) and
  ``consecutive_local_origin_failure`` (with Envoy's default, local-origin failures, a TCP
  connect that fails, count as 5xx); ``interval``, ``base_ejection_time``,
  ``max_ejection_percent``.
* ``circuit_breaking``: ``Cluster.circuit_breakers`` thresholds ``max_connections`` and
  ``max_pending`` (``max_pending_requests``).
* ``zone_affinity``: not rendered: Envoy's zone-aware balancing needs the local cluster
  named in its bootstrap, which xDS cannot set.
"""

from __future__ import annotations

import hashlib
import math
from typing import Final

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from dispatcher.governance.policy import Policy

__all__ = [
    "apply_to_cluster",
    "apply_to_route",
    "apply_to_tcp_proxy",
    "policy_tag",
    "tcp_tag",
]

_RETRY_ON: Final = {"timeout": "deadline-exceeded"}
"""Policy ``retries.on`` names whose Envoy/gRPC ``retry_on`` spelling differs."""

_LB: Final = {
    "wrr": cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
    "p2c": cluster_pb2.Cluster.LbPolicy.LEAST_REQUEST,
    "ring_hash": cluster_pb2.Cluster.LbPolicy.RING_HASH,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def policy_tag(policy: Policy) -> str:
    """A short name of ``policy``'s content for resource versions; '' for the empty one."""
    if policy == Policy():
        return ""
    return "p" + hashlib.sha256(policy.to_json().encode()).hexdigest()[:12]


def apply_to_cluster(cluster: cluster_pb2.Cluster, policy: Policy) -> None:
    """Set the Cluster fields ``policy`` says (see the module docstring)."""
    if policy.connect_timeout is not None:
        cluster.connect_timeout.CopyFrom(_duration(policy.connect_timeout))
    balancing = policy.load_balancing
    if balancing is not None:
        cluster.lb_policy = _LB[balancing.policy]
        if balancing.policy == "p2c":
            cluster.least_request_lb_config.choice_count.value = 2
    ejection = policy.outlier_ejection
    if ejection is not None:
        detection = outlier_detection_pb2.OutlierDetection()
        if ejection.consecutive_failures is not None:
            count = wrappers_pb2.UInt32Value(value=ejection.consecutive_failures)
            detection.consecutive_5xx.CopyFrom(count)
            detection.consecutive_gateway_failure.CopyFrom(count)
            detection.enforcing_consecutive_gateway_failure.value = 100
            detection.consecutive_local_origin_failure.CopyFrom(count)
        if ejection.interval is not None:
            detection.interval.CopyFrom(_duration(ejection.interval))
        if ejection.base_ejection_time is not None:
            detection.base_ejection_time.CopyFrom(_duration(ejection.base_ejection_time))
        if ejection.max_ejection_percent is not None:
            detection.max_ejection_percent.value = math.floor(ejection.max_ejection_percent)
        cluster.outlier_detection.CopyFrom(detection)
    breaking = policy.circuit_breaking
    budget = None if policy.retries is None else policy.retries.budget
    if breaking is not None or budget is not None:
        thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds()
        if breaking is not None and breaking.max_connections is not None:
            thresholds.max_connections.value = breaking.max_connections
        if breaking is not None and breaking.max_pending is not None:
            thresholds.max_pending_requests.value = breaking.max_pending
        if budget is not None:
            thresholds.retry_budget.budget_percent.CopyFrom(percent_pb2.Percent(value=budget))
            # The proxy lets one connection retry whatever the budget, unless it is 0.
            thresholds.retry_budget.min_retry_concurrency.value = 0 if budget == 0 else 1
        cluster.circuit_breakers.thresholds.append(thresholds)


def apply_to_route(action: route_components_pb2.RouteAction, policy: Policy) -> None:
    """Set the RouteAction fields ``policy`` says: timeout, retries, ring hash key."""
    if policy.request_timeout is not None:
        timeout = _duration(policy.request_timeout)
        action.timeout.CopyFrom(timeout)
        action.max_stream_duration.max_stream_duration.CopyFrom(timeout)
    retries = policy.retries
    if retries is not None and (retries.count is not None or retries.on is not None):
        retry = route_components_pb2.RetryPolicy()
        if retries.on is not None:
            retry.retry_on = ",".join(_RETRY_ON.get(name, name) for name in retries.on)
        else:
            retry.retry_on = "connect-failure,refused-stream,unavailable"
        if retries.count is not None:
            retry.num_retries.value = retries.count
        action.retry_policy.CopyFrom(retry)
    balancing = policy.load_balancing
    if balancing is not None and balancing.hash_key is not None:
        kind, _, name = balancing.hash_key.partition(":")
        hashing = route_components_pb2.RouteAction.HashPolicy
        if kind == "header":
            entry = hashing(header=hashing.Header(header_name=name))
        elif kind == "cookie":
            entry = hashing(cookie=hashing.Cookie(name=name))
        elif kind == "query":
            entry = hashing(query_parameter=hashing.QueryParameter(name=name))
        else:
            entry = hashing(connection_properties=hashing.ConnectionProperties(source_ip=True))
        action.hash_policy.append(entry)


def _tcp_fields(policy: Policy) -> tuple[int | None, bool]:
    """``(max_connect_attempts or None, hash on the source IP)`` for a TCP listener."""
    retries = policy.retries
    attempts = None
    if (
        retries is not None
        and retries.count is not None
        and (retries.on is None or "connect-failure" in retries.on)
    ):
        attempts = retries.count + 1
    balancing = policy.load_balancing
    return attempts, balancing is not None and balancing.policy == "ring_hash"


def tcp_tag(policy: Policy) -> str:
    """What of ``policy`` a sidecar's TCP listener holds, as a version suffix ('' for none):
    listeners are keyed by it, so a policy change elsewhere never re-sends (and makes Envoy
    drain) a listener."""
    attempts, hashed = _tcp_fields(policy)
    return "".join((f"-a{attempts}" if attempts is not None else "", "-h" if hashed else ""))


def apply_to_tcp_proxy(proxy: tcp_proxy_pb2.TcpProxy, policy: Policy) -> None:
    """Set the TcpProxy fields ``policy`` says: connect attempts, source IP hashing."""
    attempts, hashed = _tcp_fields(policy)
    if attempts is not None:
        proxy.max_connect_attempts.value = attempts
    if hashed:
        proxy.hash_policy.add(source_ip={})
