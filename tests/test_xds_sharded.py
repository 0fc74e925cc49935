"""xDS across shards: an Envoy connected to a Dispatcher that does not own a service.

Two or three Dispatchers (in-process gateways with ``[xds]``, as tests/test_sharding.py starts
them) share membership on a real ZooKeeper or a real etcd (every scenario runs on both) and fan
in a registry kept there. An ADS client
(tests/test_xds.py's grpcio client) connects to a Dispatcher that does not own the services it
asks for. What users rely on:

* it gets each service's assignment and every change, as from the owner;
* however many xDS streams want a service, the owner sees one subscription for it, and none
  once no stream wants it any more;
* when the service moves (a shard joins, the owner stops), the stream keeps being served and
  never sees the assignment empty or missing in between.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
from envoy.config.endpoint.v3 import endpoint_pb2

from dispatcher.config import parse_config
from dispatcher.faces.subscription_server import SubscriberConnection
from dispatcher.faces.xds.resources import ENDPOINTS
from dispatcher.gateway import Gateway, run_gateway
from tests.test_sharding import Cluster, cluster, store_of, wiring
from tests.test_xds import AdsClient, ack, endpoints, request, unpack
from tests.waiting import until

TIMEOUT = 30.0
STREAMS = 12


@pytest.fixture(params=["zookeeper", "etcd"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The membership store (and registry) of each scenario."""
    return str(request.param)


async def start(c: Cluster, node: str) -> Gateway:
    """Start shard ``node`` of ``c`` with an xDS server; return it once xDS serves."""
    config = c.config(node)
    config["xds"] = {"listen": "127.0.0.1:0"}
    scope = trio.CancelScope()
    c.scopes[node] = scope

    async def run(*, task_status: Any) -> None:
        with scope:
            await run_gateway(parse_config(config), task_status=task_status)

    gateway: Gateway = await c.nursery.start(run)
    c.gateways[node] = gateway
    await until(lambda: gateway.xds is not None and gateway.xds.port is not None,
                f"{node} serving xDS", TIMEOUT)  # fmt: skip
    return gateway


def xds_port(gateway: Gateway) -> int:
    assert gateway.xds is not None and gateway.xds.port is not None
    return gateway.xds.port


def follower_at(owner: Gateway, node: str) -> list[SubscriberConnection]:
    """The connections of ``node``'s follower at ``owner``'s subscription server."""
    assert owner.subscriptions is not None
    client_id = f"zkgate-follower/{node}"
    return [c for c in owner.subscriptions.connections if c.client_id == client_id]


def followed_at(owner: Gateway, node: str) -> set[str]:
    return {s for c in follower_at(owner, node) for s in c.services}


class EdsStream:
    """One State-of-the-World ADS stream asking for the EDS of ``names``: it ACKs every
    response and records each one as ``{service: ports}`` (each response is the whole
    state of its type)."""

    def __init__(self, port: int, names: Iterable[str]) -> None:
        self.names = sorted(names)
        self.client = AdsClient(port)
        self.responses: list[dict[str, frozenset[int]]] = []
        self.client.send(request(ENDPOINTS, self.names))

    async def run(self) -> None:
        while True:
            try:
                response = await trio.to_thread.run_sync(self.client.recv, 0.2)
            except queue.Empty:
                continue
            self.client.send(ack(response, self.names))
            assignments = unpack(response, endpoint_pb2.ClusterLoadAssignment)
            self.responses.append({a.cluster_name: frozenset(endpoints(a)) for a in assignments})

    def latest(self, service: str) -> frozenset[int]:
        return self.responses[-1].get(service, frozenset()) if self.responses else frozenset()

    def holds(self, expected: dict[str, set[int]]) -> bool:
        return all(self.latest(s) == ports for s, ports in expected.items())

    def gaps(self) -> list[tuple[int, str]]:
        """(response index, service) wherever a service that had endpoints is then
        missing or empty: what Envoy would see as its cluster losing every endpoint."""
        seen: set[str] = set()
        found = []
        for index, response in enumerate(self.responses):
            for service in sorted(seen):
                if not response.get(service):
                    found.append((index, service))
            seen.update(s for s, ports in response.items() if ports)
        return found

    def close(self) -> None:
        self.client.close()


def registered(c: Cluster, service: str) -> set[int]:
    """The port tests/test_sharding.py's cluster registers for ``service``."""
    return {10000 + c.services.index(service)}


async def test_a_non_owner_serves_a_service_through_one_subscription_at_its_owner(
    store_kind: str, request: pytest.FixtureRequest, unique_path: str, tmp_path: Path
) -> None:
    server = store_of(request, store_kind)
    async with cluster(store_kind, server, unique_path, tmp_path, 8) as c:
        d1 = await start(c, "d1")
        d2 = await start(c, "d2")
        await c.wait(lambda: c.settled(2), "two shards settled")
        service = next(s for s in c.services if wiring(d2).ownership.owns(s))
        expected = {service: registered(c, service)}
        streams = [EdsStream(xds_port(d1), [service]) for _ in range(STREAMS)]
        try:
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(stream.run)
                await until(lambda: all(s.holds(expected) for s in streams),
                            "each stream on the non-owner has the assignment", TIMEOUT)  # fmt: skip
                # One subscription at the owner for the twelve streams, and the non-owner
                # does not load the service from its own upstreams (once it stops lingering
                # there from before the second shard took it).
                assert len(follower_at(d2, "d1")) == 1
                assert followed_at(d2, "d1") == {service}
                await until(lambda: service not in d1.fanin.snapshot, "not loaded on d1", TIMEOUT)

                await trio.to_thread.run_sync(c.registry.put, service, 20000)
                expected[service] |= {20000}
                await until(lambda: all(s.holds(expected) for s in streams),
                            "every stream has the change", TIMEOUT)  # fmt: skip
                assert followed_at(d2, "d1") == {service}
                assert all(not s.gaps() for s in streams)
                nursery.cancel_scope.cancel()
        finally:
            for stream in streams:
                stream.close()
        # No stream wants it any more: unsubscribed at the owner, forgotten here.
        await until(lambda: not followed_at(d2, "d1"), "unsubscribed at the owner", TIMEOUT)
        assert d1.follower is not None
        await until(lambda: not d1.follower.followed, "nothing followed", TIMEOUT)


async def test_a_followed_service_moves_without_an_empty_assignment(
    store_kind: str, request: pytest.FixtureRequest, unique_path: str, tmp_path: Path
) -> None:
    server = store_of(request, store_kind)
    async with cluster(store_kind, server, unique_path, tmp_path, 16) as c:
        d1 = await start(c, "d1")
        d2 = await start(c, "d2")
        await c.wait(lambda: c.settled(2), "two shards settled")
        followed = [s for s in c.services if wiring(d2).ownership.owns(s)]
        expected = {s: registered(c, s) for s in followed}
        stream = EdsStream(xds_port(d1), followed)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.run)
                await until(lambda: stream.holds(expected), "the stream has every service",
                            TIMEOUT)  # fmt: skip
                assert followed_at(d2, "d1") == set(followed)

                # A third shard joins and takes some of them: followed at their new owner.
                d3 = await start(c, "d3")
                await c.wait(lambda: c.settled(3), "three shards settled")
                moved = {s for s in followed if wiring(d3).ownership.owns(s)}
                assert moved, "the join moved none of d2's services (deterministic hashing)"
                # (bounded loads may also hand d1 some: those are served locally now)
                local = {s for s in followed if wiring(d1).ownership.owns(s)}
                await until(lambda: followed_at(d3, "d1") == moved, "followed at d3", TIMEOUT)
                await until(lambda: followed_at(d2, "d1") == set(followed) - moved - local,
                            "d2 keeps the rest", TIMEOUT)  # fmt: skip
                for port, service in enumerate(sorted(moved), 21000):
                    await trio.to_thread.run_sync(c.registry.put, service, port)
                    expected[service] |= {port}
                await until(lambda: stream.holds(expected), "changes after the join", TIMEOUT)

                # The owner of the rest stops: they go to d1 itself or to d3.
                c.stop("d2")
                await c.wait(lambda: c.settled(2), "two shards settled again")
                for port, service in enumerate(followed, 22000):
                    await trio.to_thread.run_sync(c.registry.put, service, port)
                    expected[service] |= {port}
                await until(lambda: stream.holds(expected), "changes after the stop", TIMEOUT)
                local = {s for s in followed if wiring(d1).ownership.owns(s)}
                assert local, "d2's stop gave d1 none of the followed services"
                await until(lambda: followed_at(d3, "d1") == set(followed) - local,
                            "the rest followed at d3", TIMEOUT)  # fmt: skip
                assert all(s in d1.fanin.snapshot for s in local)
                nursery.cancel_scope.cancel()
        finally:
            stream.close()
        assert stream.gaps() == []
