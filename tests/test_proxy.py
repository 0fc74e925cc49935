"""The sidecar proxy: balancing, outlier ejection, and forwarding to real echo servers.

The data-plane tests run real TCP echo servers (trio, in the test) behind
the proxy and real clients in front of it, over TCP and Unix sockets; the
end-to-end ones run the whole :class:`~proxy.sidecar.Sidecar` against the
protocol drivers of ``tests/test_proxy_control.py`` (a Meta Server and
Dispatchers speaking :mod:`dispatcher.wire`), and one runs the real
``zkgate proxy`` command.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import socket
import struct
import sys
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from dispatcher import wire
from proxy import balancer
from proxy.endpoints import EndpointState, ServiceTable
from proxy.forward import ForwardSettings, ListenAddress, ServiceForwarder
from proxy.outlier import OutlierDetector, OutlierPolicy
from proxy.sidecar import ENGINES, Sidecar, SidecarConfig
from proxy.splicer import EpollSplicer
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer
from tests.test_proxy_control import FAST, TOKEN, DispatcherDriver, MetaDriver
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent


def inst(name: str, port: int = 1, weight: int = 100, health: str = "passing") -> wire.WireInstance:
    return wire.WireInstance(name, "127.0.0.1", port, weight=weight, health=health)


def table_of(*instances: wire.WireInstance, service: str = "echo") -> ServiceTable:
    table = ServiceTable(service)
    table.apply_full(wire.Full(service, 1, instances), "d/1")
    return table


def endpoint_in(table: ServiceTable, endpoint_id: str) -> EndpointState:
    """The table's endpoint ``endpoint_id``, which the test knows is there."""
    endpoint = table.get(endpoint_id)
    assert endpoint is not None, endpoint_id
    return endpoint


def picked(
    chooser: balancer.Balancer, candidates: Sequence[EndpointState], exclude: Container[str] = ()
) -> str:
    """The id of the endpoint ``chooser`` picks, which the test knows it finds."""
    endpoint = chooser.pick(candidates, exclude)
    assert endpoint is not None
    return endpoint.id


# ============================================================================ endpoint table


def test_table_applies_full_and_chained_deltas_and_refuses_a_gap() -> None:
    table = table_of(inst("a"), inst("b"))
    a = table.get("a")
    assert a is not None
    a.open_connections = 3
    assert table.apply_deltas(wire.Deltas("echo", 1, 2, (inst("a", weight=7), inst("c")), ("b",)),
                              "d/1")  # fmt: skip
    assert {e.id for e in table} == {"a", "c"} and table.version == 2
    # The same endpoint object, updated: its open connections survive.
    assert table.get("a") is a and a.weight == 7 and a.open_connections == 3
    assert not table.apply_deltas(wire.Deltas("echo", 5, 6, (inst("z"),)), "d/1")
    assert not table.apply_deltas(wire.Deltas("echo", 2, 3, (inst("z"),)), "other/1")
    assert table.get("z") is None and table.version == 2
    # A new address behind the same id is a new endpoint.
    table.apply_full(wire.Full("echo", 9, (inst("a", port=2),)), "d/2")
    assert table.get("a") is not a and table.source == "d/2"


def test_candidates_skip_failing_and_ejected_then_panic() -> None:
    table = table_of(inst("a"), inst("b", health="failing"), inst("c", health="unknown"))
    assert {e.id for e in table.candidates(0.0)} == {"a", "c"}
    table.eject(endpoint_in(table, "a"), until=10.0)
    assert {e.id for e in table.candidates(5.0)} == {"c"}
    assert table.candidates(5.0) is table.candidates(6.0)  # cached while nothing changes
    assert {e.id for e in table.candidates(10.0)} == {"a", "c"}  # the ejection ended
    table.eject(endpoint_in(table, "c"), until=20.0)
    table.eject(endpoint_in(table, "a"), until=20.0)
    # Nothing healthy and un-ejected: route to what is not ejected, even failing.
    assert {e.id for e in table.candidates(11.0)} == {"b"}


# ============================================================================ balancers


def test_smooth_wrr_spreads_the_heavy_endpoint_as_nginx_does() -> None:
    table = table_of(inst("a", weight=5), inst("b", weight=1), inst("c", weight=1))
    wrr = balancer.make("wrr")
    picks = "".join(picked(wrr, table.candidates(0)) for _ in range(14))
    assert picks == "aabacaa" * 2


def test_wrr_skips_excluded_and_zero_weight() -> None:
    table = table_of(inst("a", weight=0), inst("b"), inst("c"))
    wrr = balancer.SmoothWeightedRoundRobin()
    counts = collections.Counter(picked(wrr, table.candidates(0), {"c"}) for _ in range(10))
    assert counts == {"b": 10}
    assert wrr.pick(table.candidates(0), {"b", "c"}) is None
    # All weights zero: they count equally rather than none being picked.
    zero = table_of(inst("x", weight=0), inst("y", weight=0))
    assert {picked(wrr, zero.candidates(0)) for _ in range(4)} == {"x", "y"}


def test_p2c_prefers_fewer_open_connections() -> None:
    table = table_of(*(inst(f"e{i}") for i in range(4)))
    busy = table.get("e0")
    assert busy is not None
    busy.open_connections = 50
    p2c = balancer.make("p2c", random.Random(7))
    counts = collections.Counter(picked(p2c, table.candidates(0)) for _ in range(3000))
    # e0 loses every comparison it is drawn into.
    assert counts["e0"] == 0
    assert all(counts[f"e{i}"] > 800 for i in (1, 2, 3))
    assert p2c.pick(table.candidates(0), {"e1", "e2", "e3"}) is busy


def test_unknown_balancer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown balancer"):
        balancer.make("random")


# ============================================================================ outlier detection


def test_consecutive_failures_eject_for_growing_then_capped_times() -> None:
    policy = OutlierPolicy(consecutive_failures=3, base_ejection=10, max_ejection=25)
    detector = OutlierDetector(policy)
    table = table_of(inst("a"), inst("b"), inst("c"), inst("d"))
    a = table.get("a")
    assert a is not None
    assert not detector.failure(table, a, 0) and not detector.failure(table, a, 0)
    detector.success(table, a)  # a success resets the count
    assert not detector.failure(table, a, 0) and not detector.failure(table, a, 0)
    assert detector.failure(table, a, 0)
    assert a.ejected_until == 10 and a not in table.candidates(5)
    # Back at 10; failing again at once: twice as long.
    for _ in range(3):
        ejected = detector.failure(table, a, 11)
    assert ejected and a.ejected_until == 11 + 20
    for _ in range(3):
        ejected = detector.failure(table, a, 40)
    assert ejected and a.ejected_until == 40 + 25  # capped
    # After a long good spell the count decays: a base ejection again.
    for _ in range(3):
        ejected = detector.failure(table, a, 65 + 1000)
    assert ejected and a.ejected_until == 1065 + 10


def test_never_eject_more_than_the_max_percent_nor_the_last_one() -> None:
    detector = OutlierDetector(OutlierPolicy(consecutive_failures=1, max_ejection_percent=50))
    table = table_of(*(inst(f"e{i}") for i in range(4)))
    results = [detector.failure(table, e, 0) for e in list(table)]
    assert results == [True, True, False, False]
    single = table_of(inst("only"))
    assert not detector.failure(single, endpoint_in(single, "only"), 0)
    off = OutlierDetector(OutlierPolicy(consecutive_failures=1, max_ejection_percent=0))
    assert not off.failure(table_of(inst("a"), inst("b")), EndpointState(inst("a")), 0)


# ============================================================================ echo servers


class EchoServer:
    """A real TCP echo server on 127.0.0.1 that can be killed and revived on its port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.accepted = 0
        self.open = 0
        self._scope: trio.CancelScope | None = None

    def instance(self, **kw: Any) -> wire.WireInstance:
        return wire.WireInstance(self.name, "127.0.0.1", self.port, **kw)

    async def start(self, nursery: trio.Nursery) -> EchoServer:
        await nursery.start(self._serve)
        return self

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._echo, listeners, handler_nursery=nursery)

    async def _echo(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.open -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def kill(self) -> None:
        """Close the listener and every connection, as a dying process would."""
        assert self._scope is not None
        self._scope.cancel()


async def exchange(stream: trio.abc.Stream, payload: bytes) -> None:
    await stream.send_all(payload)
    got = bytearray()
    while len(got) < len(payload):
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("closed mid-reply")
        got += data
    assert bytes(got) == payload


async def connect(address: ListenAddress) -> trio.SocketStream:
    if address.is_unix:
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.host, address.port)


@attrs.define
class Traffic:
    """Clients sending request/response traffic until stopped, counting what fails."""

    address: ListenAddress
    #: Requests per connection before a client opens a new one (0: never).
    per_connection: int = 5
    ok: int = 0
    failed: list[str] = attrs.field(factory=list)
    connections: int = 0
    stop: trio.Event = attrs.field(factory=trio.Event)

    async def client(self, n: int) -> None:
        payload = f"client {n} says hello ".encode() * 20
        while not self.stop.is_set():
            try:
                stream = await connect(self.address)
            except OSError as exc:
                self.failed.append(f"connect: {exc}")
                await trio.sleep(0.01)
                continue
            self.connections += 1
            try:
                sent = 0
                while not self.stop.is_set() and (not self.per_connection
                                                  or sent < self.per_connection):  # fmt: skip
                    await exchange(stream, payload)
                    self.ok += 1
                    sent += 1
                    await trio.sleep(0.002)
            except (trio.BrokenResourceError, OSError) as exc:
                self.failed.append(f"exchange: {exc!r}")
            finally:
                await trio.aclose_forcefully(stream)

    async def run_until(self, nursery: trio.Nursery, clients: int) -> None:
        for n in range(clients):
            nursery.start_soon(self.client, n)

    async def more(self, requests: int, timeout: float = 10) -> None:
        """Wait until ``requests`` more requests have succeeded."""
        target = self.ok + requests
        await until(lambda: self.ok >= target, f"{requests} more requests", timeout)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each data-plane test runs on both engines: trio tasks and the epoll thread."""
    return str(request.param)


async def forwarder_for(
    nursery: trio.Nursery,
    table: ServiceTable,
    listen: ListenAddress | None = None,
    kind: str = "wrr",
    policy: OutlierPolicy | None = None,
    on_eject: Callable[[str, str, str], None] | None = None,
    engine: str = "trio",
    **settings: Any,
) -> tuple[ServiceForwarder, ListenAddress]:
    splicer = None
    if engine == "epoll":
        splicer = EpollSplicer()
        await nursery.start(splicer.run)
    forwarder = ServiceForwarder(
        # A seeded rng: p2c's picks among idle endpoints are random, and a
        # spread asserted over 30 of them must not depend on the draw.
        table, balancer.make(kind, random.Random(1)), OutlierDetector(policy),
        ForwardSettings(**{"connect_timeout": 1.0, "endpoint_wait": 2.0, **settings}),
        on_eject=on_eject, splicer=splicer,
    )  # fmt: skip
    bound = await nursery.start(forwarder.serve, listen or ListenAddress("127.0.0.1", 0))
    return forwarder, bound


@pytest.fixture
def refusing() -> Iterator[Callable[[], int]]:
    """Ports that refuse connections for the whole test: bound, never listening, held,
    so that nothing else can take them meanwhile (a port merely free a moment ago may
    be taken by then, or even be picked as a connection's own port: a self-connect
    that echoes)."""
    held: list[socket.socket] = []

    def port() -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        held.append(sock)
        return sock.getsockname()[1]

    yield port
    for sock in held:
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================ forwarding


@pytest.mark.parametrize("kind", balancer.BALANCERS)
async def test_connections_are_spread_over_the_endpoints(
    nursery: trio.Nursery, kind: str, engine: str
) -> None:
    servers = [await EchoServer(f"e{i}").start(nursery) for i in range(3)]
    table = table_of(*(s.instance() for s in servers))
    forwarder, address = await forwarder_for(nursery, table, kind=kind, engine=engine)
    for _ in range(30):
        stream = await connect(address)
        await exchange(stream, b"ping")
        await stream.aclose()
    assert sum(s.accepted for s in servers) == 30
    assert all(s.accepted >= 5 for s in servers), [s.accepted for s in servers]
    assert forwarder.stats.forwarded == 30 and forwarder.stats.connect_failures == 0
    # Every connection was settled: none open, every endpoint's count back to 0.
    await until(lambda: forwarder.stats.active == 0)
    assert all(e.open_connections == 0 for e in table)


async def test_large_transfer_and_half_close_pass_through(
    nursery: trio.Nursery, engine: str
) -> None:
    server = await EchoServer("e").start(nursery)
    _, address = await forwarder_for(nursery, table_of(server.instance()), engine=engine)
    stream = await connect(address)
    payload = os.urandom(8 * 1024 * 1024)
    received = bytearray()

    async def read_all() -> None:
        while data := await stream.receive_some(1 << 20):
            received.extend(data)

    async with trio.open_nursery() as inner:
        inner.start_soon(read_all)
        await stream.send_all(payload)
        # Our half-close reaches the echo server, which then closes its side:
        # the reader sees the end of the stream only after every byte.
        await stream.send_eof()
    assert bytes(received) == payload
    await stream.aclose()


async def test_an_upstream_reset_reaches_the_client_as_a_reset(
    nursery: trio.Nursery, engine: str
) -> None:
    async def reset_after_first_message(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    listeners = await nursery.start(trio.serve_tcp, reset_after_first_message, 0)
    port = listeners[0].socket.getsockname()[1]
    table = table_of(wire.WireInstance("rude", "127.0.0.1", port))
    forwarder, address = await forwarder_for(nursery, table, engine=engine)
    stream = await connect(address)
    await stream.send_all(b"hello")
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await stream.receive_some(100)  # a reset, not a clean end of stream
    await until(lambda: forwarder.stats.aborted == 1 and forwarder.stats.active == 0)


async def test_stopping_the_proxy_closes_its_connections(engine: str) -> None:
    async with trio.open_nursery() as outer:
        server = await EchoServer("e").start(outer)
        async with trio.open_nursery() as proxy:
            _, address = await forwarder_for(proxy, table_of(server.instance()), engine=engine)
            stream = await connect(address)
            await exchange(stream, b"before")
            proxy.cancel_scope.cancel()
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""  # closed, not left hanging
        await until(lambda: server.open == 0)
        outer.cancel_scope.cancel()


async def test_a_refused_connect_is_retried_on_another_endpoint(
    nursery: trio.Nursery, refusing: Callable[[], int]
) -> None:
    server = await EchoServer("alive").start(nursery)
    dead = [wire.WireInstance(f"dead{i}", "127.0.0.1", refusing()) for i in range(2)]
    table = table_of(*dead, server.instance())
    reports: list[tuple[str, str, str]] = []
    policy = OutlierPolicy(consecutive_failures=2, max_ejection_percent=100)
    forwarder, address = await forwarder_for(
        nursery, table, policy=policy, attempts=3,
        on_eject=lambda *report: reports.append(report),
    )  # fmt: skip
    for _ in range(12):
        stream = await connect(address)
        await exchange(stream, b"still works")
        await stream.aclose()
    assert server.accepted == 12
    # Both dead endpoints were ejected after two refusals each, and reported.
    assert sorted(reports) == [("echo", "dead0", "connect-refused"),
                               ("echo", "dead1", "connect-refused")]  # fmt: skip
    assert forwarder.stats.connect_failures == 4
    assert [e.id for e in table.candidates(trio.current_time())] == ["alive"]


async def test_no_reachable_endpoint_closes_the_client_at_once(
    nursery: trio.Nursery, refusing: Callable[[], int]
) -> None:
    table = table_of(wire.WireInstance("dead", "127.0.0.1", refusing()))
    forwarder, address = await forwarder_for(nursery, table)
    stream = await connect(address)
    with trio.fail_after(5):
        with pytest.raises(trio.BrokenResourceError):
            await exchange(stream, b"anyone?")
    assert forwarder.stats.unrouted == 1


async def test_a_connection_waits_for_the_first_endpoints(nursery: trio.Nursery) -> None:
    server = await EchoServer("late").start(nursery)
    table = ServiceTable("echo")
    forwarder, address = await forwarder_for(nursery, table)
    stream = await connect(address)
    async with trio.open_nursery() as inner:
        inner.start_soon(exchange, stream, b"early bird")
        # The connection is parked (accepted, waiting for the table to change); then
        # endpoints arrive. Everything here is in-process: once all tasks wait, it is parked.
        await until(lambda: forwarder.stats.accepted == 1, "the early connection accepted")
        await trio.testing.wait_all_tasks_blocked()
        assert forwarder.stats.forwarded == 0 and forwarder.stats.unrouted == 0
        table.apply_full(wire.Full("echo", 1, (server.instance(),)), "d/1")
    await stream.aclose()
    assert server.accepted == 1


async def test_endpoints_added_and_removed_while_traffic_flows(
    nursery: trio.Nursery, engine: str
) -> None:
    a, b, c = [await EchoServer(n).start(nursery) for n in "abc"]
    table = table_of(a.instance())
    _, address = await forwarder_for(nursery, table, engine=engine)
    traffic = Traffic(address)
    await traffic.run_until(nursery, clients=4)
    await traffic.more(50)
    table.apply_deltas(wire.Deltas("echo", 1, 2, (b.instance(), c.instance())), "d/1")
    await traffic.more(150)
    assert b.accepted > 0 and c.accepted > 0
    table.apply_deltas(wire.Deltas("echo", 2, 3, removed=("a", "b")), "d/1")
    await until(lambda: a.open == 0 and b.open == 0)  # their last connections finished
    before = (a.accepted, b.accepted, c.accepted)
    await traffic.more(100)
    assert (a.accepted, b.accepted) == before[:2] and c.accepted > before[2]
    traffic.stop.set()
    assert traffic.failed == []


async def test_killed_endpoint_fails_only_the_connections_open_to_it(
    nursery: trio.Nursery, engine: str
) -> None:
    servers = [await EchoServer(n).start(nursery) for n in "abc"]
    table = table_of(*(s.instance() for s in servers))
    reports: list[tuple[str, str, str]] = []
    _, address = await forwarder_for(
        nursery, table, policy=OutlierPolicy(consecutive_failures=1), engine=engine,
        on_eject=lambda *r: reports.append(r),
    )  # fmt: skip
    # Long-lived connections (as pooled RPC clients keep them).
    traffic = Traffic(address, per_connection=0)
    await traffic.run_until(nursery, clients=9)
    await traffic.more(100)
    victim = servers[1]
    open_to_victim = victim.open
    assert open_to_victim > 0
    victim.kill()
    await traffic.more(300)
    traffic.stop.set()
    assert 0 < len(traffic.failed) <= open_to_victim, traffic.failed
    assert all(f.startswith("exchange") for f in traffic.failed)
    # The clients that reconnected were routed around it (refused, retried, ejected).
    assert reports == [("echo", "b", "connect-refused")]


async def test_unix_socket_listener(nursery: trio.Nursery, tmp_path: Path, engine: str) -> None:
    server = await EchoServer("e").start(nursery)
    path = tmp_path / "echo.sock"
    # A stale socket file from a dead proxy is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    address = ListenAddress.parse(str(path))
    async with trio.open_nursery() as inner:
        _, bound = await forwarder_for(inner, table_of(server.instance()), listen=address,
                                       engine=engine)  # fmt: skip
        assert bound == address
        traffic = Traffic(address)
        await traffic.run_until(inner, clients=3)
        await traffic.more(60)
        traffic.stop.set()
        assert traffic.failed == []
        # A second proxy on the same live socket is refused, not silently stealing it.
        with pytest.raises(OSError, match="another process listens"):
            await forwarder_for(inner, table_of(server.instance()), listen=address)
        inner.cancel_scope.cancel()
    assert not path.exists()  # removed on exit


def test_listen_addresses_parse() -> None:
    assert ListenAddress.parse("127.0.0.1:8080") == ListenAddress("127.0.0.1", 8080)
    assert ListenAddress.parse("/run/x.sock").path == "/run/x.sock"
    assert ListenAddress.parse("unix:rel.sock").path == "rel.sock"
    assert ListenAddress.parse("[::1]:9") == ListenAddress("::1", 9)
    for bad in ("8080", "host:", "host:99999", "unix:"):
        with pytest.raises(ValueError):
            ListenAddress.parse(bad)


# ============================================================================ the whole sidecar


Mesh = tuple[MetaDriver, DispatcherDriver, Sidecar, ListenAddress]


async def start_mesh(
    nursery: trio.Nursery, echo_servers: list[EchoServer], listen: ListenAddress, **config: Any
) -> Mesh:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("echo", *(s.instance(health="passing") for s in echo_servers))
    meta.owners["echo"] = d1.owner
    sidecar = Sidecar(SidecarConfig(meta.address, {"echo": listen}, control=FAST,
                                    **config))  # fmt: skip
    listening = await nursery.start(sidecar.run)
    return meta, d1, sidecar, listening["echo"]


async def test_sidecar_reports_ejected_endpoints_to_the_owner(nursery: trio.Nursery) -> None:
    alive = await EchoServer("alive").start(nursery)
    doomed = await EchoServer("doomed").start(nursery)
    _, d1, sidecar, address = await start_mesh(
        nursery, [alive, doomed], ListenAddress("127.0.0.1", 0),
        outlier=OutlierPolicy(consecutive_failures=1),
    )  # fmt: skip
    await until(lambda: len(sidecar.tables["echo"]) == 2)
    doomed.kill()
    for _ in range(6):
        stream = await connect(address)
        await exchange(stream, b"x")
        await stream.aclose()
    await until(lambda: d1.received(wire.Report))
    assert d1.received(wire.Report) == [wire.Report("echo", "doomed", "connect-refused")]
    # The central checker marks it failing: the proxy stops trying it at all.
    d1.put("echo", doomed.instance(health="failing"))
    await until(lambda: endpoint_in(sidecar.tables["echo"], "doomed").instance.health == "failing")
    failures = sidecar.forwarders["echo"].stats.connect_failures
    for _ in range(6):
        stream = await connect(address)
        await exchange(stream, b"x")
        await stream.aclose()
    assert sidecar.forwarders["echo"].stats.connect_failures == failures


async def test_shard_move_while_traffic_flows(nursery: trio.Nursery) -> None:
    servers = [await EchoServer(n).start(nursery) for n in "ab"]
    meta, d1, sidecar, address = await start_mesh(nursery, servers, ListenAddress("127.0.0.1", 0))
    d2 = DispatcherDriver("d2")
    await d2.start(nursery)
    d2.put("echo", *(s.instance(health="passing") for s in servers))
    traffic = Traffic(address)
    await traffic.run_until(nursery, clients=4)
    await traffic.more(100)
    meta.assign(echo=d2.owner)
    d1.disown("echo", d2.owner, meta.epoch)
    await until(lambda: sidecar.tables["echo"].source == d2.server_id)
    await traffic.more(100)
    # The new owner's changes route traffic now.
    c = await EchoServer("c").start(nursery)
    d2.put("echo", c.instance(health="passing"))
    await until(lambda: c.accepted > 0)
    await traffic.more(50)
    traffic.stop.set()
    assert traffic.failed == []
    assert d1.subscribers("echo") == 0 and d2.subscribers("echo") == 1


async def test_control_plane_stopped_and_started_while_traffic_flows(
    nursery: trio.Nursery, tmp_path: Path, engine: str
) -> None:
    servers = [await EchoServer(n).start(nursery) for n in "ab"]
    meta, d1, sidecar, address = await start_mesh(
        nursery, servers, ListenAddress(path=str(tmp_path / "echo.sock")), engine=engine
    )
    traffic = Traffic(address)
    await traffic.run_until(nursery, clients=4)
    await traffic.more(50)
    meta.stop()
    d1.stop()
    await until(lambda: not sidecar.control.meta_connected)
    await traffic.more(200)  # routing on the last endpoints
    c = await EchoServer("c").start(nursery)
    d1.put("echo", c.instance(health="passing"))
    await meta.restart()
    await d1.restart()
    await until(lambda: c.accepted > 0)
    await traffic.more(50)
    traffic.stop.set()
    assert traffic.failed == []


async def test_zkgate_proxy_command(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await EchoServer("e").start(nursery)
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("echo", server.instance(health="passing"))
    meta.owners["echo"] = d1.owner
    sock = tmp_path / "echo.sock"
    port = free_port()
    command = [sys.executable, "-m", "dispatcher", "--log-format", "plain", "proxy",
               "--meta", meta.address, "--service", f"echo={sock}",
               "--service", f"other=127.0.0.1:{port}", "--balancer", "p2c"]  # fmt: skip
    env = {**os.environ, "ZKGATE_TOKEN": TOKEN}
    process = await trio.lowlevel.open_process(command, cwd=ROOT, env=env,
                                               stderr=open(tmp_path / "proxy.log", "wb"))  # noqa: SIM115  # fmt: skip
    try:
        await until(lambda: sock.exists(), timeout=15)
        await until(lambda: meta.hellos and d1.hellos, timeout=15)
        stream = await connect(ListenAddress.parse(str(sock)))
        await exchange(stream, b"through the real command")
        await stream.aclose()
        assert meta.hellos[0].client_id.startswith("zkgate-proxy/")
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
    assert server.accepted == 1


def test_proxy_command_refuses_bad_arguments(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "proxy", "--meta", "127.0.0.1:1",
         "--service", "a=127.0.0.1:1", "--service", "a=127.0.0.1:2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "given twice" in result.stderr
    env = {k: v for k, v in os.environ.items() if k != "ZKGATE_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "proxy", "--meta", "127.0.0.1:1",
         "--service", "a=127.0.0.1:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "a token is needed" in result.stderr


# ============================================================================ the real servers


def _dispatcher_config(tmp_path: Path, name: str, zookeeper: str, root: str, static: Path) -> Path:
    port = free_port()
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
node_id = "{name}"
[admin]
enabled = false
[subscriptions]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"
[membership]
kind = "zookeeper"
address = "{zookeeper}"
root = "{root}"
session_timeout = 2.0
[sharding]
id = "{name}"
services = ["echo"]
warm_timeout = 2.0
[[upstream]]
name = "file"
kind = "static"
path = "{static}"
poll_interval = 0.2
""")
    return path


def _write_static(path: Path, servers: list[EchoServer]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(
        f'[[instance]]\nservice = "echo"\nid = "{s.name}"\nhost = "127.0.0.1"\n'
        f'port = {s.port}\nhealth = "passing"\n\n' for s in servers
    ))  # fmt: skip
    tmp.rename(path)  # atomically, as the static upstream asks


async def test_real_meta_server_and_dispatchers_with_a_shard_failover(
    nursery: trio.Nursery,
    tmp_path: Path,
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    unique_path: str,
) -> None:
    """zkgate's own Meta Server and two sharded Dispatchers (``zkgate serve``) on a real
    ZooKeeper: traffic flows, then the owning Dispatcher is killed; the Meta Server moves
    the service, the proxy resubscribes at the survivor, and no request fails."""
    from metaserver.cli import parse_meta_config, run_meta

    a, b = [await EchoServer(n).start(nursery) for n in "ab"]
    static = tmp_path / "echo.toml"
    _write_static(static, [a, b])
    zk_address = zookeeper.address
    dispatchers = {}
    for name in ("d1", "d2"):
        config = _dispatcher_config(tmp_path, name, zk_address, unique_path, static)
        dispatchers[name] = await trio.to_thread.run_sync(
            functools.partial(zkgate_factory, ["--config", str(config)])
        )
    meta_config = parse_meta_config({
        "token": TOKEN, "server_id": "meta-1", "meta": {"listen": "127.0.0.1:0"},
        "membership": {"kind": "zookeeper", "address": zk_address, "root": unique_path,
                       "session_timeout": 2.0},
    })  # fmt: skip
    _, meta_port = await nursery.start(run_meta, meta_config)

    listen = {"echo": ListenAddress("127.0.0.1", 0)}
    sidecar = Sidecar(SidecarConfig(f"127.0.0.1:{meta_port}", listen, control=FAST))
    address = (await nursery.start(sidecar.run))["echo"]
    table = sidecar.tables["echo"]
    # (The fan-in names an endpoint by its address, whatever id the file gives.)
    await until(lambda: {e.address[1] for e in table} == {a.port, b.port}, timeout=30)
    traffic = Traffic(address)
    await traffic.run_until(nursery, clients=4)
    await traffic.more(100)

    owner = sidecar.control.owners["echo"]
    assert owner is not None and owner.id in dispatchers
    survivor = "d2" if owner.id == "d1" else "d1"
    await trio.to_thread.run_sync(dispatchers[owner.id].kill)
    await until(lambda: (sidecar.control.owners["echo"] or owner).id == survivor
                and (table.source or "").startswith(survivor), timeout=30)  # fmt: skip
    await traffic.more(100)
    # The survivor's subscription is live: a new endpoint reaches the proxy through it.
    c = await EchoServer("c").start(nursery)
    _write_static(static, [a, b, c])
    await until(lambda: c.accepted > 0, timeout=30)
    traffic.stop.set()
    assert traffic.failed == []
