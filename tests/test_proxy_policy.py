"""Governance policies through the subscription protocol into zkgate's proxy.

The end-to-end tests run, in this process: a real fan-in fed by a scripted upstream (the
registry plays no part here), the real subscription server reading a
:class:`~dispatcher.governance.feed.GovernanceFeed` over the in-memory governance store,
the Meta Server protocol driver of ``tests/test_proxy_control.py``, the real
:class:`~proxy.sidecar.Sidecar`, and real TCP echo servers and clients on loopback. A
policy is written to the store as an operator's ``policy set`` would; the tests then
measure where the proxy sends connections and how it fails them.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from dispatcher import wire
from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.ownership import SoleOwnership
from dispatcher.core.upstream import Listing
from dispatcher.faces.subscription_server import SubscriptionServer
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import Policy
from dispatcher.governance.store_memory import MemoryGovernance, MemoryGovernanceStore
from proxy import cli
from proxy.endpoints import ServiceTable
from proxy.forward import ForwardSettings, ListenAddress, ServiceForwarder
from proxy.outlier import OutlierPolicy
from proxy.policy import Defaults, Route, ServicePolicy
from proxy.sidecar import ENGINES, Sidecar, SidecarConfig
from tests.test_fanin import ScriptedUpstream
from tests.test_proxy import EchoServer, connect, exchange
from tests.test_proxy_control import FAST, TOKEN, MetaDriver
from tests.test_subscription_server import Client
from tests.waiting import until

SERVICE = "echo"
APPLICATION = "web"
TIMEOUT = 10


def instance(
    server: EchoServer | int, *, version: str = "v1", zone: str = "", weight: int = 100,
    health: Health = Health.PASSING,
) -> Instance:  # fmt: skip
    """``server`` (or a bare port) as the registry lists it; the fan-in names it host:port."""
    port = server if isinstance(server, int) else server.port
    return Instance(SERVICE, f"r{port}", "127.0.0.1", port, weight=weight, zone=zone,
                    metadata={"version": version}, health=health,
                    source=Source("a", f"/{SERVICE}/{port}"))  # fmt: skip


def iid(server: EchoServer | int) -> str:
    return f"127.0.0.1:{server if isinstance(server, int) else server.port}"


@attrs.define
class Mesh:
    upstream: ScriptedUpstream
    store: MemoryGovernanceStore
    server: SubscriptionServer
    sidecar: Sidecar
    address: ListenAddress

    @property
    def forwarder(self) -> ServiceForwarder:
        return self.sidecar.forwarders[SERVICE]

    @property
    def table(self) -> ServiceTable:
        return self.sidecar.tables[SERVICE]

    async def publish(self, *instances: Instance) -> None:
        """The registry now lists exactly ``instances``; wait until the proxy has them."""
        await self.upstream.send(Listing(instances))
        wanted = {f"{i.host}:{i.port}" for i in instances}
        await until(lambda: self.table.ready and {e.id for e in self.table} == wanted,
                    "the proxy's table", TIMEOUT)  # fmt: skip

    async def set_policies(self, document: dict[str, Any]) -> int:
        """Write ``document`` as the next version; wait until the proxy applied it."""
        head = await self.store.current()
        revision = await self.store.write(
            json.dumps(document), expected_version=0 if head is None else head.version,
            who="test", why="test",
        )  # fmt: skip
        policy = self.sidecar.policies[SERVICE]
        await until(lambda: policy.version == revision.version, "the policy applied", TIMEOUT)
        return revision.version

    async def set_policy(self, **fields: Any) -> int:
        """The per-service policy of ``echo`` is ``fields`` (none: no policy at all)."""
        return await self.set_policies({"services": {SERVICE: fields}} if fields else {})


@asynccontextmanager
async def mesh(
    *, engine: str = "epoll", zone: str = "", forward: ForwardSettings | None = None,
    outlier: OutlierPolicy | None = None,
) -> AsyncIterator[Mesh]:  # fmt: skip
    fanin = FanIn("node-1", interest="all")
    upstream = ScriptedUpstream("a")
    store = MemoryGovernanceStore(MemoryGovernance(), "policies")
    feed = GovernanceFeed(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        await nursery.start(feed.run)
        with trio.fail_after(TIMEOUT):
            await upstream.running()
        server = SubscriptionServer(fanin, SoleOwnership(wire.Owner("d1", "127.0.0.1:1")),
                                    TOKEN, "d1", policies=feed)  # fmt: skip
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        meta = MetaDriver()
        await meta.start(nursery)
        meta.owners[SERVICE] = wire.Owner("d1", f"127.0.0.1:{port}")
        config = SidecarConfig(
            meta.address, {SERVICE: ListenAddress("127.0.0.1", 0)},
            control=attrs.evolve(FAST, application=APPLICATION), engine=engine, zone=zone,
            forward=forward or ForwardSettings(connect_timeout=1.0, endpoint_wait=2.0),
            outlier=outlier or OutlierPolicy(),
        )  # fmt: skip
        # Seeded: the split's draws and p2c's are what the measured shares depend on.
        sidecar = Sidecar(config, rng=random.Random(20240601))
        listening = await nursery.start(sidecar.run)
        yield Mesh(upstream, store, server, sidecar, listening[SERVICE])
        nursery.cancel_scope.cancel()


async def one_exchange(address: ListenAddress, payload: bytes = b"ping") -> bool:
    """One connection, one request and its echo; False if the proxy failed it."""
    try:
        stream = await connect(address)
    except OSError:
        return False
    try:
        with trio.fail_after(TIMEOUT):
            await exchange(stream, payload)
        return True
    except (trio.BrokenResourceError, OSError):
        return False
    finally:
        await trio.aclose_forcefully(stream)


async def run_connections(address: ListenAddress, count: int, workers: int = 16) -> int:
    """``count`` connections, ``workers`` at a time; how many succeeded."""
    left = count
    ok = 0

    async def worker() -> None:
        nonlocal left, ok
        while left > 0:
            left -= 1
            succeeded = await one_exchange(address)  # before the +=: it reads ``ok`` first
            ok += succeeded

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return ok


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def refusing() -> Iterator[Callable[[], int]]:
    """Ports that refuse connections for the whole test (bound, never listening)."""
    held: list[socket.socket] = []

    def port() -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        held.append(sock)
        return sock.getsockname()[1]

    yield port
    for sock in held:
        sock.close()


# ============================================================================ split, weights


async def test_a_90_10_split_measured_over_2000_connections(nursery: trio.Nursery) -> None:
    """The canary split: 90 % to the instances tagged v1 (two of them), 10 % to v2,
    whatever the number of instances per tag."""
    v1a, v1b, v2 = [await EchoServer(n).start(nursery) for n in ("v1a", "v1b", "v2")]
    async with mesh() as m:
        await m.publish(instance(v1a), instance(v1b), instance(v2, version="v2"))
        await m.set_policy(split={"version=v1": 90, "version=v2": 10})
        assert await run_connections(m.address, 2000) == 2000
    total = v1a.accepted + v1b.accepted + v2.accepted
    assert total == 2000
    share = 100 * v2.accepted / total
    assert abs(share - 10) <= 3, f"v2 got {share:.2f} % of {total}"
    # Within v1, the round robin alternates between its two instances.
    assert abs(v1a.accepted - v1b.accepted) <= 1


async def test_weight_overrides_replace_the_registrys_weights(nursery: trio.Nursery) -> None:
    a, b, c = [await EchoServer(n).start(nursery) for n in "abc"]
    async with mesh() as m:
        await m.publish(instance(a, zone="z1"), instance(b, zone="z1"), instance(c, zone="z2"))
        # a three times b; the whole of zone z2 out of rotation.
        await m.set_policy(weights={"instances": {iid(a): 300}, "zones": {"z2": 0}})
        assert await run_connections(m.address, 400, workers=1) == 400
        assert (a.accepted, b.accepted, c.accepted) == (300, 100, 0)
        # Zone z2 at twice the share of the others.
        await m.set_policy(weights={"zones": {"z2": 200}})
        assert await run_connections(m.address, 400, workers=1) == 400
        assert (a.accepted - 300, b.accepted - 100, c.accepted) == (100, 100, 200)


async def test_ring_hash_keeps_one_client_address_on_one_endpoint(nursery: trio.Nursery) -> None:
    servers = [await EchoServer(n).start(nursery) for n in "abcd"]
    async with mesh() as m:
        await m.publish(*(instance(s) for s in servers))
        await m.set_policy(load_balancing={"policy": "ring_hash", "hash_key": "source_ip"})
        assert await run_connections(m.address, 40) == 40
    # Every connection came from 127.0.0.1: one endpoint took them all.
    assert sorted(s.accepted for s in servers) == [0, 0, 0, 40]


def test_zone_affinity_stays_local_until_too_little_of_the_zone_is_routable() -> None:
    table = ServiceTable(SERVICE)
    endpoints = (
        wire.WireInstance("a", "127.0.0.1", 1, zone="z1", health="passing"),
        wire.WireInstance("b", "127.0.0.1", 2, zone="z1", health="passing"),
        wire.WireInstance("c", "127.0.0.1", 3, zone="z2", health="passing"),
    )
    table.apply_full(wire.Full(SERVICE, 1, endpoints), "d/1")
    policy = Policy.from_mapping({"zone_affinity": {"fallback_threshold": 60}})

    def picks(route: Route) -> set[str]:
        found = {route.pick(table, 0.0, (), "") for _ in range(20)}
        return {e.id for e in found if e is not None} | ({"(none)"} if None in found else set())

    local = Route(1, policy, Defaults(zone="z1"), random.Random(1))
    assert picks(local) == {"a", "b"}
    # b fails: half of z1 is routable, under 60 %: spread over every zone.
    table.apply_deltas(wire.Deltas(SERVICE, 1, 2, (attrs.evolve(endpoints[1], health="failing"),)),
                       "d/1")  # fmt: skip
    assert picks(local) == {"a", "c"}
    # A proxy whose zone is unknown cannot prefer one.
    assert picks(Route(1, policy, Defaults(zone=""), random.Random(1))) == {"a", "c"}


# ============================================================================ timeouts, retries


class SlowEcho:
    """A TCP echo server that answers each message ``delay`` seconds late, counting the
    connections it accepted."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = 0
        self.accepted = 0

    async def start(self, nursery: trio.Nursery) -> SlowEcho:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), self._echo, 0
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _echo(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            while data := await stream.receive_some(65536):
                await trio.sleep(self.delay)
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def timed_exchange(address: ListenAddress, payload: bytes = b"hello") -> tuple[bool, float]:
    started = trio.current_time()
    ok = await one_exchange(address, payload)
    return ok, trio.current_time() - started


async def test_a_request_timeout_shorter_than_the_servers_delay_fails_those_requests(
    nursery: trio.Nursery, engine: str
) -> None:
    slow = await SlowEcho(delay=2.0).start(nursery)
    fast = await EchoServer("fast").start(nursery)
    async with mesh(engine=engine) as m:
        await m.publish(instance(slow.port))
        await m.set_policy(request_timeout=0.2)
        ok, took = await timed_exchange(m.address)
        # Reset after the timeout, long before the server's answer would have come.
        assert not ok and took < 1.5, took
        assert m.forwarder.stats.request_timeouts == 1
        # A server that answers in time is untouched by the timer, a large request too
        # (the client's bytes keep flowing while the proxy waits for the first answer).
        await m.publish(instance(fast))
        assert await one_exchange(m.address, bytes(range(256)) * 8192)
        # Without the policy, the slow server's answer is waited for again.
        await m.publish(instance(slow.port))
        await m.set_policy()
        ok, took = await timed_exchange(m.address)
        assert ok and took >= 2.0
        assert m.forwarder.stats.request_timeouts == 1


async def test_endpoints_that_keep_missing_the_request_timeout_are_ejected(
    nursery: trio.Nursery,
) -> None:
    slow = await SlowEcho(delay=2.0).start(nursery)
    fast = await EchoServer("fast").start(nursery)
    async with mesh() as m:
        await m.publish(instance(slow.port), instance(fast))
        await m.set_policy(
            request_timeout=0.2,
            outlier_ejection={"consecutive_failures": 2, "max_ejection_percent": 100},
        )
        # The round robin alternates: the slow endpoint misses twice, and is out.
        assert await run_connections(m.address, 4, workers=1) == 2
        assert [e.id for e in m.table.candidates(trio.current_time())] == [iid(fast)]
        assert await run_connections(m.address, 10) == 10
        assert m.forwarder.stats.request_timeouts == 2


async def test_a_connect_timeout_shorter_than_a_stalled_accept_fails_the_connect(
    nursery: trio.Nursery,
) -> None:
    # A listener whose accept queue is full: the kernel ignores further SYNs, so a
    # connect neither succeeds nor is refused.
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(0)
    filler = socket.create_connection(stalled.getsockname())
    try:
        async with mesh(forward=ForwardSettings(connect_timeout=20, endpoint_wait=2.0)) as m:
            await m.publish(instance(stalled.getsockname()[1]))
            await m.set_policy(connect_timeout=0.2, retries={"count": 0})
            ok, took = await timed_exchange(m.address)
            # The flags say 20 s: the policy's 0.2 s is what failed it.
            assert not ok and took < 5, took
            assert m.forwarder.stats.connect_failures == 1
    finally:
        filler.close()
        stalled.close()


async def test_retries_follow_the_count_and_the_listed_failures(
    nursery: trio.Nursery, refusing: Callable[[], int]
) -> None:
    alive = await EchoServer("alive").start(nursery)
    dead = refusing()
    # Ejection off, so that every connection meets the dead endpoint in turn.
    async with mesh(outlier=OutlierPolicy(max_ejection_percent=0)) as m:
        await m.publish(instance(alive), instance(dead))
        await m.set_policy(retries={"count": 0})
        assert await run_connections(m.address, 20, workers=1) == 10  # wrr: every other one
        await m.set_policy(retries={"count": 1, "on": ["connect-failure"]})
        assert await run_connections(m.address, 20, workers=1) == 20
        # A refused connect is not a reset: not retried.
        await m.set_policy(retries={"count": 1, "on": ["reset"]})
        assert await run_connections(m.address, 20, workers=1) == 10
        assert m.forwarder.stats.retries == 10


async def test_the_policys_outlier_thresholds_eject_and_report(
    nursery: trio.Nursery, refusing: Callable[[], int]
) -> None:
    alive = await EchoServer("alive").start(nursery)
    dead = refusing()
    reports: list[tuple[str, str, str, str]] = []
    async with mesh() as m:
        m.server.on_report = lambda *report: reports.append(report)
        await m.publish(instance(alive), instance(dead), instance(refusing()))
        await m.set_policy(outlier_ejection={"consecutive_failures": 1,
                                             "max_ejection_percent": 100})  # fmt: skip
        # The flags would need five failures per endpoint; one is enough now.
        assert await run_connections(m.address, 3, workers=1) == 3
        now = trio.current_time()
        assert [e.id for e in m.table.candidates(now)] == [iid(alive)]
        await until(lambda: len(reports) == 2, "both ejections reported", TIMEOUT)


# ============================================================================ circuit breaking


async def expect_refused(address: ListenAddress) -> None:
    """The proxy accepts and closes at once (a reset or an end), echoing nothing."""
    stream = await connect(address)
    try:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"anyone?")
            assert await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def test_circuit_breaking_refuses_connections_beyond_max_connections(
    nursery: trio.Nursery, engine: str
) -> None:
    server = await EchoServer("e").start(nursery)
    async with mesh(engine=engine) as m:
        await m.publish(instance(server))
        await m.set_policy(circuit_breaking={"max_connections": 3})
        held = [await connect(m.address) for _ in range(3)]
        for stream in held:
            await exchange(stream, b"held")
        await expect_refused(m.address)
        assert m.forwarder.stats.refused == 1 and server.accepted == 3
        # One closes: room for one more.
        await held.pop().aclose()
        await until(lambda: m.forwarder.stats.active == 2, "a connection released", TIMEOUT)
        assert await one_exchange(m.address)
        for stream in held:
            await stream.aclose()


async def test_max_pending_bounds_the_connections_waiting_for_an_endpoint(
    nursery: trio.Nursery,
) -> None:
    server = await EchoServer("late").start(nursery)
    async with mesh(forward=ForwardSettings(endpoint_wait=TIMEOUT)) as m:
        await m.publish()  # the service exists, without instances
        await m.set_policy(circuit_breaking={"max_pending": 1})
        waiting = await connect(m.address)
        await until(lambda: m.forwarder.stats.waiting == 1, "one connection waiting", TIMEOUT)
        await expect_refused(m.address)
        assert m.forwarder.stats.refused == 1
        async with trio.open_nursery() as inner:
            inner.start_soon(exchange, waiting, b"waited")
            await m.publish(instance(server))
        await waiting.aclose()


# ============================================================================ changes


async def test_a_policy_change_applies_without_a_restart_and_its_removal_restores_the_flags(
    nursery: trio.Nursery,
) -> None:
    v1, v2 = await EchoServer("v1").start(nursery), await EchoServer("v2").start(nursery)
    async with mesh() as m:
        await m.publish(instance(v1), instance(v2, version="v2"))
        connection = m.server.connections[0]
        assert await run_connections(m.address, 20, workers=1) == 20
        assert (v1.accepted, v2.accepted) == (10, 10)  # the flags: wrr over both
        # Everything to v2, for this application only, while the proxy runs.
        version = await m.set_policies({"consumers": {APPLICATION: {SERVICE: {
            "split": {"version=v1": 0, "version=v2": 100}}}}})  # fmt: skip
        assert await run_connections(m.address, 20, workers=1) == 20
        assert (v1.accepted, v2.accepted) == (10, 30)
        await until(lambda: connection.policy_acked.get(SERVICE) == version, "acked", TIMEOUT)
        # Another application's policy is not ours: not sent, not applied.
        other = await m.store.write(json.dumps({"consumers": {
            APPLICATION: {SERVICE: {"split": {"version=v1": 0, "version=v2": 100}}},
            "batch": {SERVICE: {"split": {"version=v1": 100}}}}}),
            expected_version=version, who="test", why="test")  # fmt: skip
        feed = m.server.policies
        assert feed is not None
        await feed.wait_version(other.version)
        await trio.testing.wait_all_tasks_blocked()
        assert connection.policy_sent[SERVICE] == version
        assert m.sidecar.policies[SERVICE].version == version
        # The policy removed: back to the flags' round robin.
        await m.set_policies({})
        assert m.sidecar.policies[SERVICE].route is None
        assert await run_connections(m.address, 20, workers=1) == 20
        assert (v1.accepted, v2.accepted) == (20, 40)


async def test_only_clients_whose_effective_policy_changed_get_an_update() -> None:
    """Over the wire: a client per application, and one that predates policies."""
    fanin = FanIn("node-1", interest="all")
    upstream = ScriptedUpstream("a")
    store = MemoryGovernanceStore(MemoryGovernance(), "policies")
    feed = GovernanceFeed(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        await nursery.start(feed.run)
        server = SubscriptionServer(fanin, SoleOwnership(wire.Owner("d1", "127.0.0.1:1")),
                                    TOKEN, "d1", policies=feed)  # fmt: skip
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        clients: dict[str, Client] = {}
        for name, hello in {
            "web": wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "p-web", True, "web"),
            "batch": wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "p-batch", True, "batch"),
            "old": wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "p-old"),
        }.items():
            client = clients[name] = await Client.tcp(port)
            await client.send(hello)
            await client.expect(wire.Welcome)
            await client.send(wire.Subscribe({SERVICE: None}))

        async def policies_of(name: str) -> list[wire.PolicyUpdate]:
            return [m for m in await clients[name].settle() if isinstance(m, wire.PolicyUpdate)]

        # On subscribe: nothing written yet, so version 0 and no policy.
        assert await policies_of("web") == [wire.PolicyUpdate(SERVICE, 0, {})]
        assert await policies_of("batch") == [wire.PolicyUpdate(SERVICE, 0, {})]
        assert await policies_of("old") == []
        # A per-service policy changes everyone's effective policy.
        await store.write(json.dumps({"services": {SERVICE: {"connect_timeout": 2}}}),
                          expected_version=0, who="t", why="t")  # fmt: skip
        await feed.wait_version(1)
        expected = wire.PolicyUpdate(SERVICE, 1, {"connect_timeout": 2})
        assert await policies_of("web") == [expected]
        assert await policies_of("batch") == [expected]
        # A per-consumer policy of "batch" changes only what "batch" applies.
        await store.write(json.dumps({"services": {SERVICE: {"connect_timeout": 2}},
                                      "consumers": {"batch": {SERVICE: {"connect_timeout": 9}}}}),
                          expected_version=1, who="t", why="t")  # fmt: skip
        await feed.wait_version(2)
        assert await policies_of("web") == []
        assert await policies_of("batch") == [wire.PolicyUpdate(SERVICE, 2, {"connect_timeout": 9})]
        assert await policies_of("old") == []
        await clients["batch"].send(wire.PolicyAck(SERVICE, 2))
        await clients["batch"].settle()
        by_client = {c.client_id: c for c in server.connections}
        assert by_client["p-batch"].policy_acked == {SERVICE: 2}
        assert by_client["p-web"].policy_sent == {SERVICE: 1}
        for client in clients.values():
            await client.aclose()
        nursery.cancel_scope.cancel()


def test_a_policy_that_does_not_parse_leaves_the_one_in_force() -> None:
    policy = ServicePolicy(SERVICE)
    assert policy.apply(3, {"connect_timeout": 0.5})
    route = policy.route
    assert route is not None and route.settings.connect_timeout == 0.5
    assert not policy.apply(4, {"connect_timeout": -1})
    assert not policy.apply(5, {"teleport": True})
    assert policy.route is route and policy.version == 3 and policy.refused == 2
    # An empty policy is no policy: the flags apply (no route at all).
    assert policy.apply(6, {}) and policy.route is None


async def test_a_feed_attached_after_the_server_started_reaches_clients_subscribed_before() -> None:
    """A Dispatcher may open its governance store after building its subscription server:
    setting ``policies`` then still sends every subscribed client its policy."""
    fanin = FanIn("node-1", interest="all")
    upstream = ScriptedUpstream("a")
    store = MemoryGovernanceStore(MemoryGovernance(), "policies")
    await store.write(json.dumps({"services": {SERVICE: {"request_timeout": 3}}}),
                      expected_version=0, who="t", why="t")  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        server = SubscriptionServer(fanin, SoleOwnership(wire.Owner("d1", "127.0.0.1:1")),
                                    TOKEN, "d1")  # fmt: skip
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.tcp(port)
        await client.send(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "p", True, APPLICATION))
        await client.expect(wire.Welcome)
        await client.send(wire.Subscribe({SERVICE: None}))
        assert not [m for m in await client.settle() if isinstance(m, wire.PolicyUpdate)]
        feed = GovernanceFeed(store)
        await nursery.start(feed.run)
        server.policies = feed
        update = await client.expect(wire.PolicyUpdate)
        assert update == wire.PolicyUpdate(SERVICE, 1, {"request_timeout": 3})
        with pytest.raises(ValueError, match="already"):
            server.policies = GovernanceFeed(store)
        await client.aclose()
        nursery.cancel_scope.cancel()


def test_the_proxy_command_takes_its_application_and_zone() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--meta", "127.0.0.1:7000", "--service", "echo=127.0.0.1:9001", "--token", "t"]
    config = cli.config_from_args(parser.parse_args([*base, "--application", "web",
                                                     "--zone", "z1"]))  # fmt: skip
    assert (config.control.application, config.zone) == ("web", "z1")
    # The Dispatchers would refuse it in every Hello: refused before the start instead.
    with pytest.raises(ValueError, match="application name is longer than 256"):
        cli.config_from_args(parser.parse_args([*base, "--application", "a" * 257]))


def test_the_retry_budget_bounds_the_connections_that_start_retrying() -> None:
    def route(**retries: Any) -> Route:
        policy = Policy.from_mapping({"retries": retries})
        return Route(1, policy, Defaults(), random.Random(1))

    half = route(count=3, budget=50)
    # 8 connections held: at most 4 may be retrying at once.
    assert half.may_retry("connect-refused", held=8, retrying=3, first=True)
    assert not half.may_retry("connect-refused", held=8, retrying=4, first=True)
    # One already retrying goes on within its count: it was counted when it started.
    assert half.may_retry("connect-refused", held=8, retrying=4, first=False)
    # However few connections, one may retry; a budget of 0 allows none.
    assert half.may_retry("connect-timeout", held=1, retrying=0, first=True)
    assert not route(count=3, budget=0).may_retry("connect-refused", held=8, retrying=0,
                                                  first=True)  # fmt: skip
    # A timed-out connect is a "timeout"; a refused one is not.
    only_timeouts = route(count=1, on=["timeout"])
    assert only_timeouts.may_retry("connect-timeout", held=1, retrying=0, first=True)
    assert not only_timeouts.may_retry("connect-refused", held=1, retrying=0, first=True)
    assert half.settings.attempts == 4
