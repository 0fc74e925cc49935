"""Policies as Envoy and proxyless gRPC receive them over ADS.

In-process: an :class:`XdsServer` on a hub the test publishes to, following a
:class:`GovernanceFeed` on the in-memory governance store; a grpcio ADS client reads the
resources. What a client relies on: the cluster, route and endpoint weights carry the
service's policy; a policy change re-encodes only the services it touches; a node that
names its application gets that application's policy; removing the policy restores the
resources as they were.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import struct_pb2

from dispatcher.faces.xds import XdsConfig, XdsServer
from dispatcher.faces.xds.resources import CLUSTER, ENDPOINTS, ROUTE
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.store_memory import MemoryGovernance, MemoryGovernanceStore
from tests.test_xds import Registry, client, endpoints, inst, recv, request, unpack
from tests.waiting import until

SPLIT = {
    "connect_timeout": 0.25,
    "request_timeout": 0.3,
    "retries": {"count": 2, "on": ["connect-failure", "unavailable"]},
    "load_balancing": {"policy": "p2c"},
    "outlier_ejection": {"consecutive_failures": 3, "base_ejection_time": 10,
                         "max_ejection_percent": 50},
    "circuit_breaking": {"max_connections": 7, "max_pending": 3},
    "split": {"version=v1": 90, "version=v2": 10},
}  # fmt: skip


@asynccontextmanager
async def serving(registry: Registry) -> AsyncIterator[tuple[XdsServer, MemoryGovernanceStore]]:
    store = MemoryGovernanceStore(MemoryGovernance(), "policies", max_history=10,
                                  max_body=1 << 20)  # fmt: skip
    feed = GovernanceFeed(store)
    server = XdsServer(registry.hub, XdsConfig("127.0.0.1:0"), policies=feed)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        await nursery.start(server.serve)
        yield server, store
        nursery.cancel_scope.cancel()


async def write(store: MemoryGovernanceStore, document: dict[str, Any]) -> int:
    current = await store.current()
    expected = 0 if current is None else current.version
    revision = await store.write(json.dumps(document), who="test", why="test",
                                 expected_version=expected)  # fmt: skip
    return revision.version


def node(application: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"zkgate.application": application})
    return base_pb2.Node(id="n", metadata=metadata)


async def fetch(server: XdsServer, type_url: str, message: Any, app: str = "") -> Any:
    with client(server) as ads:
        ads.send(request(type_url, ["cart"], node=node(app) if app else None))
        (resource,) = unpack(await recv(ads), message)
        return resource


async def test_the_service_policy_is_in_the_cluster_route_and_weights_and_rollback_restores(
) -> None:  # fmt: skip
    registry = Registry()
    registry.put(inst("cart", 7001, metadata={"version": "v1"}),
                 inst("cart", 7002, metadata={"version": "v2"}),
                 inst("other", 7003))  # fmt: skip
    async with serving(registry) as (server, store):
        before = await fetch(server, CLUSTER, cluster_pb2.Cluster)
        assert before.connect_timeout.seconds == 5 and not before.HasField("outlier_detection")
        cache = server.cache
        other = cache.get("other")

        version = await write(store, {"services": {"cart": SPLIT}})
        await until(lambda: cache.policy_version == version, "the policy in force")
        cluster = await fetch(server, CLUSTER, cluster_pb2.Cluster)
        assert cluster.connect_timeout.ToMilliseconds() == 250
        assert cluster.lb_policy == cluster_pb2.Cluster.LbPolicy.LEAST_REQUEST
        assert cluster.outlier_detection.consecutive_5xx.value == 3
        assert cluster.outlier_detection.base_ejection_time.seconds == 10
        assert cluster.outlier_detection.max_ejection_percent.value == 50
        (limits,) = cluster.circuit_breakers.thresholds
        assert (limits.max_connections.value, limits.max_pending_requests.value) == (7, 3)
        route = await fetch(server, ROUTE, route_pb2.RouteConfiguration)
        action = route.virtual_hosts[0].routes[0].route
        assert action.timeout.ToMilliseconds() == 300
        assert action.max_stream_duration.max_stream_duration.ToMilliseconds() == 300
        assert (action.retry_policy.num_retries.value, action.retry_policy.retry_on) == (
            2, "connect-failure,unavailable",
        )  # fmt: skip
        assignment = await fetch(server, ENDPOINTS, endpoint_pb2.ClusterLoadAssignment)
        weights = {port: weight for port, (weight, _, _) in endpoints(assignment).items()}
        assert weights == {7001: 9000, 7002: 1000}
        # Only the service the policy names was encoded again.
        assert cache.get("other") is other

        await write(store, {})
        await until(lambda: cache.policy_version == version + 1, "the policy removed")
        assert await fetch(server, CLUSTER, cluster_pb2.Cluster) == before
        assignment = await fetch(server, ENDPOINTS, endpoint_pb2.ClusterLoadAssignment)
        assert {p: w for p, (w, _, _) in endpoints(assignment).items()} == {7001: 100, 7002: 100}


async def test_a_node_naming_its_application_gets_that_applications_policy() -> None:
    registry = Registry()
    registry.put(inst("cart", 7001))
    async with serving(registry) as (server, store):
        document = {
            "services": {"cart": {"request_timeout": 2}},
            "consumers": {"web": {"cart": {"request_timeout": 5}}},
        }
        version = await write(store, document)
        await until(lambda: server.cache.policy_version == version, "the policy in force")
        for app, seconds in (("", 2), ("web", 5), ("batch", 2)):
            route = await fetch(server, ROUTE, route_pb2.RouteConfiguration, app)
            assert route.virtual_hosts[0].routes[0].route.timeout.seconds == seconds, app
