"""What the Dispatcher's model says to Envoy and to proxyless gRPC, as xDS resources.

Pure functions: a :class:`~dispatcher.core.snapshot.ServiceEntry` in, encoded
resources out. Every resource is encoded once, as the bytes of a
``google.protobuf.Any``, and :class:`Resource` also carries the two framings
the streams send (a State-of-the-World ``resources`` entry and a Delta
``Resource`` message), so a change costs one encoding however many streams
hold the resource: a response is those shared bytes concatenated.

Per service ``S`` (names are the service name itself, so ``xds:///S`` resolves):

* Cluster ``S``: type EDS, endpoints from ADS (resource API V3).
* ClusterLoadAssignment ``S``: one locality per zone (the empty zone is a
  locality without a zone), one ``LbEndpoint`` per instance with its weight
  and a ``health_status``: ``FAILING`` is ``UNHEALTHY`` (listed, not dropped,
  so Envoy's panic threshold sees it); ``PASSING`` and ``UNKNOWN`` are
  ``HEALTHY``, because registration is the liveness signal of the registries
  we front (see :class:`~dispatcher.core.model.Health`). An instance of
  weight 0 is left out: Envoy requires a weight of at least 1, and the
  registries mean 0 as "send it no traffic" (Dubbo's disabled provider),
  which raising it to 1 would contradict. Weights above :data:`MAX_WEIGHT`
  are sent as that. Each locality's weight is the sum of its instances'
  (gRPC drops a locality without one).
* Listener ``S`` for proxyless gRPC: an API listener whose
  ``HttpConnectionManager`` takes RouteConfiguration ``S`` over ADS.
* RouteConfiguration ``S``: every request of any authority to cluster ``S``.

A governance policy (:mod:`~dispatcher.faces.xds.policy`) sets fields of the cluster, the
route, the sidecar listener and the endpoint weights; without one they are as above.
* Listener ``outbound|PORT|S`` for a sidecar Envoy: a TCP listener on
  ``ADDRESS:PORT`` proxying to cluster ``S``. Which services a node gets and
  on which ports is the node's own choice, from its bootstrap metadata
  (:func:`outbound_ports`): ports must be stable across restarts and equal on
  every Dispatcher, and a port guessed from the service name could collide
  with anything else the host runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

import attrs
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, duration_pb2, message, struct_pb2, wrappers_pb2

from dispatcher.core.model import Health, Instance
from dispatcher.core.snapshot import ServiceEntry
from dispatcher.faces.xds.policy import (
    apply_to_cluster,
    apply_to_route,
    apply_to_tcp_proxy,
    policy_tag,
    tcp_tag,
)
from dispatcher.governance.policy import Policy
from dispatcher.governance.weights import instance_weights

__all__ = [
    "APPLICATION_KEY",
    "CLUSTER",
    "ENDPOINTS",
    "KNOWN_TYPES",
    "LISTENER",
    "MAX_WEIGHT",
    "OUTBOUND_ADDRESS_KEY",
    "OUTBOUND_PORTS_KEY",
    "ROUTE",
    "Resource",
    "ServiceResources",
    "encode_outbound_listener",
    "encode_service",
    "outbound_listener_name",
    "outbound_ports",
]

_PREFIX: Final = "type.googleapis.com/"
CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINTS: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
KNOWN_TYPES: Final = (CLUSTER, ENDPOINTS, LISTENER, ROUTE)
"""The types served, in the order an update sends them: clusters before their
endpoints and listeners before their routes, as the xDS protocol advises so a
client never points at something it does not hold yet."""

OUTBOUND_PORTS_KEY: Final = "zkgate.outbound"
"""Node metadata key: a struct ``{service: port}`` of the outbound listeners wanted."""
OUTBOUND_ADDRESS_KEY: Final = "zkgate.outbound_address"
"""Node metadata key: the address the outbound listeners bind; default 127.0.0.1."""
APPLICATION_KEY: Final = "zkgate.application"
"""Node metadata key: the consumer application the node runs, whose policies it gets."""

MAX_WEIGHT: Final = 1_000_000
"""Weights above this are sent as this: Envoy wants a locality's weights to sum
within 32 bits, and no registry we front means more than a million to one."""
_MAX_UINT32: Final = (1 << 32) - 1
_NO_POLICY: Final = Policy()
_DEFAULT_OUTBOUND_ADDRESS: Final = "127.0.0.1"
_CONNECT_TIMEOUT: Final = duration_pb2.Duration(seconds=5)
_OUTBOUND_PREFIX: Final = "outbound|"
_MAX_PORT: Final = 65535
# Envoy's stat prefixes allow only these; anything else in a service name is replaced.
_STAT_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")

# Field numbers of DiscoveryResponse.resources and DeltaDiscoveryResponse.resources,
# and of the Delta Resource message's own fields.
_SOTW_RESOURCES_FIELD: Final = 2
_DELTA_RESOURCES_FIELD: Final = 2
_RESOURCE_VERSION_FIELD: Final = 1
_RESOURCE_BODY_FIELD: Final = 2
_RESOURCE_NAME_FIELD: Final = 3


def _varint(value: int) -> bytes:
    if value < 0x80:
        # Tags, and the lengths of versions and nonces: every stream's
        # response frames three of them.
        return bytes((value,))
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): the framing of an embedded message."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


@attrs.frozen(slots=True)
class Resource:
    """One encoded xDS resource at one version, shared by every stream that sends it.

    ``any`` is the serialized ``google.protobuf.Any``; ``sotw`` is it framed
    as one entry of ``DiscoveryResponse.resources`` and ``delta`` as one
    ``DeltaDiscoveryResponse.resources`` entry (name, version, body), so a
    response is built by concatenation, never by re-encoding.
    """

    type_url: str
    name: str
    version: str
    any: bytes = attrs.field(repr=False)
    sotw: bytes = attrs.field(repr=False, eq=False)
    delta: bytes = attrs.field(repr=False, eq=False)

    @classmethod
    def encode(cls, type_url: str, name: str, version: str, body: message.Message) -> Resource:
        """Encode ``body`` once and frame it for both protocol variants."""
        packed = any_pb2.Any(type_url=type_url, value=body.SerializeToString(deterministic=True))
        encoded = packed.SerializeToString(deterministic=True)
        delta_body = (
            length_delimited(_RESOURCE_VERSION_FIELD, version.encode())
            + length_delimited(_RESOURCE_BODY_FIELD, encoded)
            + length_delimited(_RESOURCE_NAME_FIELD, name.encode())
        )
        return cls(
            type_url,
            name,
            version,
            encoded,
            length_delimited(_SOTW_RESOURCES_FIELD, encoded),
            length_delimited(_DELTA_RESOURCES_FIELD, delta_body),
        )


@attrs.frozen(slots=True)
class ServiceResources:
    """The four per-service resources of one service at one version, under one policy."""

    service: str
    version: str
    cluster: Resource
    assignment: Resource
    api_listener: Resource
    route: Resource
    policy: Policy = _NO_POLICY

    @property
    def encoded_bytes(self) -> int:
        """Bytes of ``Any`` in all four resources."""
        return sum(
            len(r.any) for r in (self.cluster, self.assignment, self.api_listener, self.route)
        )

    def get(self, type_url: str) -> Resource | None:
        """This service's resource of ``type_url`` named after the service, if any."""
        if type_url == CLUSTER:
            return self.cluster
        if type_url == ENDPOINTS:
            return self.assignment
        if type_url == LISTENER:
            return self.api_listener
        if type_url == ROUTE:
            return self.route
        return None


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _any(body: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(body)
    return packed


def _lb_endpoint(instance: Instance, weight: int) -> endpoint_components_pb2.LbEndpoint:
    health = (
        health_check_pb2.HealthStatus.UNHEALTHY
        if instance.health is Health.FAILING
        else health_check_pb2.HealthStatus.HEALTHY
    )
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=instance.host, port_value=instance.port
                )
            )
        ),
        health_status=health,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=min(weight, MAX_WEIGHT)),
    )


def assignment(
    service: str, instances: Iterable[Instance], policy: Policy | None = None
) -> endpoint_pb2.ClusterLoadAssignment:
    """The EDS resource of ``service``: its routable instances grouped by zone, weighted
    as ``policy`` says (:func:`~dispatcher.governance.weights.instance_weights`).

    Sorted by zone and instance id, so equal input gives equal bytes.
    """
    listed = tuple(instances)
    if policy is None or (policy.weights is None and policy.split is None):
        weights = {i.instance_id: i.weight for i in listed}
    else:
        weights = instance_weights(listed, policy)
    by_zone: dict[str, list[Instance]] = {}
    for instance in listed:
        if weights[instance.instance_id] > 0:
            by_zone.setdefault(instance.zone, []).append(instance)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=service,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=zone),
                lb_endpoints=[
                    _lb_endpoint(i, weights[i.instance_id])
                    for i in sorted(by_zone[zone], key=lambda i: i.instance_id)
                ],
                # gRPC ignores a locality without a weight; Envoy reads it only
                # with locality-weighted balancing. The sum keeps each
                # instance's share of the whole service.
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=min(
                        sum(min(weights[i.instance_id], MAX_WEIGHT) for i in by_zone[zone]),
                        _MAX_UINT32,
                    )
                ),
            )
            for zone in sorted(by_zone)
        ],
    )


def cluster(service: str, policy: Policy | None = None) -> cluster_pb2.Cluster:
    """The CDS resource of ``service``: an EDS cluster fed over ADS, as ``policy`` says."""
    body = cluster_pb2.Cluster(
        name=service,
        type=cluster_pb2.Cluster.DiscoveryType.EDS,
        connect_timeout=_CONNECT_TIMEOUT,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source()),
    )
    if policy is not None:
        apply_to_cluster(body, policy)
    return body


def route(service: str, policy: Policy | None = None) -> route_pb2.RouteConfiguration:
    """The RDS resource ``service``: any authority, any path, to cluster ``service``, with
    the timeout, retries and hash key ``policy`` says."""
    action = route_components_pb2.RouteAction(cluster=service)
    if policy is not None:
        apply_to_route(action, policy)
    return route_pb2.RouteConfiguration(
        name=service,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=service,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=""),
                        route=action,
                    )
                ],
            )
        ],
    )


def _stat_prefix(service: str) -> str:
    return _STAT_UNSAFE.sub("_", service)


def api_listener(service: str) -> listener_pb2.Listener:
    """The LDS resource ``service`` that proxyless gRPC asks for when dialing ``xds:///service``."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=_stat_prefix(service),
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=service),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=service, api_listener=api_listener_pb2.ApiListener(api_listener=_any(manager))
    )


def outbound_listener_name(service: str, port: int) -> str:
    """The name of the sidecar listener for ``service`` on ``port``."""
    return f"{_OUTBOUND_PREFIX}{port}|{service}"


def outbound_listener(
    service: str, address: str, port: int, policy: Policy | None = None
) -> listener_pb2.Listener:
    """A TCP listener on ``address:port`` that proxies every connection to cluster ``service``
    (with the connect attempts and hashing ``policy`` says)."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=_stat_prefix(service), cluster=service)
    if policy is not None:
        apply_to_tcp_proxy(proxy, policy)
    return listener_pb2.Listener(
        name=outbound_listener_name(service, port),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.tcp_proxy", typed_config=_any(proxy)
                    )
                ]
            )
        ],
    )


def _weighs(policy: Policy) -> Policy:
    """What of ``policy`` the assignment depends on."""
    return Policy(weights=policy.weights, split=policy.split)


def _shapes(policy: Policy) -> Policy:
    """What of ``policy`` the cluster and the route depend on."""
    return attrs.evolve(policy, weights=None, split=None, zone_affinity=None)


def encode_service(
    entry: ServiceEntry,
    version: str,
    previous: ServiceResources | None = None,
    policy: Policy = _NO_POLICY,
) -> ServiceResources:
    """Every per-service resource of ``entry`` under ``policy``, the assignment at ``version``.

    Only what changed is encoded again; the rest is taken from ``previous`` (so clients
    are not sent it again). The assignment depends on the instances and the policy's
    weights and split; the cluster and the route on the rest of the policy, so an instance
    change re-encodes only the assignment and a policy change only what it touches. The
    API listener depends on neither. Versions name the content: the assignment's is
    ``version`` (with the tag of its part of the policy when there is one), the cluster's
    and route's ``<version they were encoded at>-<their part's tag, or "static">``.
    """
    service = entry.service
    weighs = _weighs(policy)
    if previous is not None and previous.version == version and _weighs(previous.policy) == weighs:
        endpoints = previous.assignment
    else:
        tag = policy_tag(weighs)
        endpoints = Resource.encode(
            ENDPOINTS,
            service,
            f"{version}-{tag}" if tag else version,
            assignment(service, entry.instances.values(), policy),
        )
    shapes = _shapes(policy)
    if previous is not None and _shapes(previous.policy) == shapes:
        return attrs.evolve(previous, version=version, assignment=endpoints, policy=policy)
    fixed = f"{version}-{policy_tag(shapes) or 'static'}"
    return ServiceResources(
        service,
        version,
        Resource.encode(CLUSTER, service, fixed, cluster(service, policy)),
        endpoints,
        previous.api_listener
        if previous is not None
        else Resource.encode(LISTENER, service, fixed, api_listener(service)),
        Resource.encode(ROUTE, service, fixed, route(service, policy)),
        policy,
    )


def encode_outbound_listener(
    service: str, address: str, port: int, policy: Policy = _NO_POLICY
) -> Resource:
    """The sidecar listener of ``service``; it depends only on what of ``policy`` a TCP
    proxy applies (:func:`~dispatcher.faces.xds.policy.tcp_tag`), so its version is that
    and a client that holds it is sent it again only when that changes."""
    return Resource.encode(
        LISTENER,
        outbound_listener_name(service, port),
        "1" + tcp_tag(policy),
        outbound_listener(service, address, port, policy),
    )


def outbound_ports(metadata: struct_pb2.Struct, limit: int) -> tuple[str, dict[str, int]]:
    """The outbound listeners a node asks for in its metadata: ``(address, {service: port})``.

    The node's bootstrap sets ``node.metadata["zkgate.outbound"]`` to a struct
    of service name to port, and optionally ``"zkgate.outbound_address"``.
    Raises ``ValueError`` with the offending entry when a port is not an
    integer in 1..65535, a value has the wrong type, or more than ``limit``
    services are named.
    """
    fields: Mapping[str, struct_pb2.Value] = metadata.fields
    address = _DEFAULT_OUTBOUND_ADDRESS
    if OUTBOUND_ADDRESS_KEY in fields:
        value = fields[OUTBOUND_ADDRESS_KEY]
        if value.WhichOneof("kind") != "string_value" or not value.string_value:
            raise ValueError(f"node metadata {OUTBOUND_ADDRESS_KEY}: expected an address string")
        address = value.string_value
    if OUTBOUND_PORTS_KEY not in fields:
        return address, {}
    wanted = fields[OUTBOUND_PORTS_KEY]
    if wanted.WhichOneof("kind") != "struct_value":
        raise ValueError(f"node metadata {OUTBOUND_PORTS_KEY}: expected a struct service -> port")
    entries = wanted.struct_value.fields
    if len(entries) > limit:
        raise ValueError(
            f"node metadata {OUTBOUND_PORTS_KEY}: {len(entries)} services, at most {limit}"
        )
    ports: dict[str, int] = {}
    for service, value in entries.items():
        number = value.number_value
        if (
            value.WhichOneof("kind") != "number_value"
            or number != int(number)
            or not 1 <= number <= _MAX_PORT
            or not service
        ):
            raise ValueError(
                f"node metadata {OUTBOUND_PORTS_KEY}.{service}: expected a port in 1..{_MAX_PORT}"
            )
        ports[service] = int(number)
    return address, ports
