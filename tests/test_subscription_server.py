"""The subscription server, over real TCP and Unix sockets, as a proxy sees it.

The fan-in is fed by :class:`~tests.test_fanin.ScriptedUpstream` (the test
scripts what a registry reports); its ``send`` waits until every task is
idle, so the fan-in has published and every connection has queued what it
will. :meth:`Client.settle` then asks the server for a ``Pong``: everything
the server had to say arrives before it, which is how a test proves that
nothing else (no Full, no delta of a dropped service) was sent.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import struct
import textwrap
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing

from dispatcher import wire
from dispatcher.config import ConfigError, SubscriptionsConfig, load_config, parse_config
from dispatcher.core.fanin import FanIn, Interest
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.ownership import Ownership, SoleOwnership
from dispatcher.core.snapshot import Delta, Put, Remove
from dispatcher.core.upstream import Changed, Listing
from dispatcher.faces.subscription_server import (
    DEFAULT_HISTORY,
    DeltaHistory,
    SubscriptionLimits,
    SubscriptionServer,
)
from dispatcher.gateway import Gateway, run_gateway
from tests.test_fanin import ScriptedUpstream

TOKEN = "s3cret-token"
HERE = wire.Owner("d1", "127.0.0.1:7000", "127.0.0.1:2181")
THERE = wire.Owner("d2", "127.0.0.1:7001", "127.0.0.1:2182")
TIMEOUT = 10

M = TypeVar("M", bound=wire.Message)


def ep(port: int, service: str = "orders", **kw: Any) -> Instance:
    """An instance as the scripted registry reports it (the fan-in re-ids it host:port)."""
    return Instance(service, f"r{port}", "10.0.0.1", port,
                    source=Source("a", f"/{service}/{port}"), **kw)  # fmt: skip


def merged_id(port: int) -> str:
    return f"10.0.0.1:{port}"


class Client:
    """A proxy's side of one connection, written against the wire module alone."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.wire = wire.WireStream(stream)

    @classmethod
    async def tcp(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    @classmethod
    async def unix(cls, path: str) -> Client:
        return cls(await trio.open_unix_socket(path))

    async def send(self, message: wire.Message) -> None:
        await self.wire.send(message)

    async def send_raw(self, data: bytes) -> None:
        await self.wire.stream.send_all(data)

    async def receive(self) -> wire.Message:
        with trio.fail_after(TIMEOUT):
            return await self.wire.receive()

    async def expect(self, kind: type[M]) -> M:
        message = await self.receive()
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def hello(self, client_id: str = "proxy-1", token: str = TOKEN) -> wire.Welcome:
        await self.send(wire.Hello(wire.PROTOCOL_VERSION, token, client_id))
        return await self.expect(wire.Welcome)

    async def settle(self) -> list[wire.Message]:
        """Everything the server sends until it is idle (the Pong excluded)."""
        await trio.testing.wait_all_tasks_blocked()
        await self.send(wire.Ping())
        seen: list[wire.Message] = []
        while not isinstance(message := await self.receive(), wire.Pong):
            seen.append(message)
        return seen

    async def expect_closed(self) -> None:
        """The server closes the connection (after whatever it still had to say)."""
        with trio.fail_after(TIMEOUT):
            while True:
                try:
                    await self.wire.receive()
                except (EOFError, trio.BrokenResourceError):
                    return

    async def aclose(self) -> None:
        await self.wire.aclose()


@attrs.define
class Harness:
    fanin: FanIn
    upstream: ScriptedUpstream
    server: SubscriptionServer
    port: int

    async def connect(self, client_id: str = "proxy-1") -> Client:
        client = await Client.tcp(self.port)
        await client.hello(client_id)
        return client

    def version(self, service: str = "orders") -> int:
        return self.fanin.snapshot.full(service).version

    async def connections(self, count: int) -> None:
        """Wait until exactly ``count`` connections are open."""
        with trio.fail_after(TIMEOUT):
            while len(self.server.connections) != count:
                await trio.testing.wait_all_tasks_blocked()
                if len(self.server.connections) != count:
                    await trio.sleep(0.01)  # a closing socket's last steps are kernel-side


@asynccontextmanager
async def serving(
    *,
    interest: Interest = "all",
    ownership: Ownership | None = None,
    history: int = DEFAULT_HISTORY,
    limits: SubscriptionLimits | None = None,
    on_report: Any = None,
    subscriber_queue: int = 1024,
) -> AsyncIterator[Harness]:
    fanin = FanIn("node-1", interest=interest, subscriber_queue=subscriber_queue)
    upstream = ScriptedUpstream("a")
    server = SubscriptionServer(
        fanin, ownership or SoleOwnership(HERE), TOKEN, "d1",
        history=history, limits=limits, on_report=on_report,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        with trio.fail_after(TIMEOUT):
            await upstream.running()
            await trio.testing.wait_all_tasks_blocked()
        yield Harness(fanin, upstream, server, port)
        nursery.cancel_scope.cancel()


def apply(state: dict[str, wire.WireInstance], message: wire.Message) -> None:
    """What a proxy does with a Full or Deltas."""
    if isinstance(message, wire.Full):
        state.clear()
        state.update((i.id, i) for i in message.instances)
    else:
        assert isinstance(message, wire.Deltas)
        for instance_id in message.removed:
            del state[instance_id]
        state.update((i.id, i) for i in message.upserted)


# --------------------------------------------------------------- authentication


async def test_a_wrong_token_is_refused_and_the_connection_closed() -> None:
    async with serving() as h:
        client = await Client.tcp(h.port)
        await client.send(wire.Hello(wire.PROTOCOL_VERSION, "guess", "intruder"))
        error = await client.expect(wire.Error)
        assert error.code == "unauthenticated"
        await client.expect_closed()
        await h.connections(0)


async def test_a_wrong_protocol_version_is_refused() -> None:
    async with serving() as h:
        client = await Client.tcp(h.port)
        await client.send(wire.Hello(wire.PROTOCOL_VERSION + 1, TOKEN, "future-proxy"))
        error = await client.expect(wire.Error)
        assert error.code == "unsupported-version"
        assert str(wire.PROTOCOL_VERSION) in error.message
        await client.expect_closed()


async def test_nothing_is_served_before_hello() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081),)))
        for early in (wire.Subscribe({"orders": None}),
                      wire.Report("orders", merged_id(8081), "reset")):  # fmt: skip
            client = await Client.tcp(h.port)
            await client.send(early)
            error = await client.expect(wire.Error)
            assert error.code == "unauthenticated"
            await client.expect_closed()


async def test_a_silent_connection_is_closed_after_the_hello_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(limits=SubscriptionLimits(hello_timeout=0.2)) as h:
        client = await Client.tcp(h.port)
        # Virtual time: the server accepted within this same instant, so its deadline
        # is exactly ``hello_timeout`` from here; not a moment sooner, not later.
        connected = trio.current_time()
        error = await client.expect(wire.Error)
        assert trio.current_time() - connected == pytest.approx(0.2, abs=1e-9)
        assert error.code == "unauthenticated" and "no hello" in error.message
        await client.expect_closed()
        await h.connections(0)


async def test_welcome_names_the_server_and_this_incarnation() -> None:
    async with serving() as h:
        client = await Client.tcp(h.port)
        welcome = await client.hello()
        assert welcome.version == wire.PROTOCOL_VERSION
        assert welcome.server_id == f"d1/{h.server.incarnation}"
        other = SubscriptionServer(h.fanin, SoleOwnership(HERE), TOKEN, "d1")
        assert other.welcome_id != h.server.welcome_id  # a restart is another incarnation


# --------------------------------------------------------------- snapshot and deltas


async def test_subscribe_gives_a_full_then_chained_deltas() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((
            ep(8081, weight=30, zone="eu-1", metadata={"version": "1.2"}, health="passing"),
            ep(8082),
        )))  # fmt: skip
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": None}))
        full = await client.expect(wire.Full)
        assert full.service == "orders" and full.version == h.version()
        assert full.instances == (
            wire.WireInstance(merged_id(8081), "10.0.0.1", 8081, 30, "eu-1", "passing",
                              {"version": "1.2"}),
            wire.WireInstance(merged_id(8082), "10.0.0.1", 8082),
        )  # fmt: skip
        state: dict[str, wire.WireInstance] = {}
        apply(state, full)

        held = full.version
        for change in (
            Put(ep(8083)),
            Remove("orders", "r8081"),
            Put(ep(8082, weight=5, health=Health.FAILING)),
        ):
            await h.upstream.send(Changed((change,)))
            delta = await client.expect(wire.Deltas)
            assert delta.service == "orders"
            assert delta.from_version == held and delta.to_version == h.version() > held
            held = delta.to_version
            apply(state, delta)
        assert set(state) == {merged_id(8082), merged_id(8083)}
        assert state[merged_id(8082)].weight == 5 and state[merged_id(8082)].health == "failing"
        assert await client.settle() == []


async def test_a_service_with_no_instances_is_an_empty_full() -> None:
    async with serving() as h:
        client = await h.connect()
        await client.send(wire.Subscribe({"nobody": None}))
        full = await client.expect(wire.Full)
        assert (full.service, full.version, full.instances) == ("nobody", 0, ())
        await h.upstream.send(Changed((Put(ep(9000, service="nobody")),)))
        delta = await client.expect(wire.Deltas)
        assert delta.from_version == 0 and [i.id for i in delta.upserted] == [merged_id(9000)]


async def test_adding_a_service_sends_only_that_service() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081), ep(9001, service="users"))))
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": None}))
        await client.expect(wire.Full)
        await client.send(wire.Subscribe({"users": None}))
        full = await client.expect(wire.Full)
        assert full.service == "users"
        assert await client.settle() == []  # orders was not sent again
        assert h.server.connections[0].services == {"orders", "users"}

        await h.upstream.send(Changed((Put(ep(8082)), Put(ep(9002, service="users")))))
        deltas = {m.service: m for m in await client.settle()}
        assert set(deltas) == {"orders", "users"}

        await client.send(wire.Unsubscribe(("users",)))
        await h.upstream.send(Changed((Put(ep(8083)), Put(ep(9003, service="users")))))
        (only,) = await client.settle()
        assert isinstance(only, wire.Deltas) and only.service == "orders"


async def test_many_subscribers_of_one_service_all_get_every_delta() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081),)))
        clients = [await h.connect(f"proxy-{n}") for n in range(5)]
        for client in clients:
            await client.send(wire.Subscribe({"orders": None}))
            await client.expect(wire.Full)
        await h.upstream.send(Changed((Put(ep(8082)),)))
        for client in clients:
            delta = await client.expect(wire.Deltas)
            assert delta.to_version == h.version()


# --------------------------------------------------------------- resuming


async def test_reconnecting_with_a_version_in_history_gets_only_the_missing_deltas() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081), ep(8082))))
        first = await h.connect()
        await first.send(wire.Subscribe({"orders": None}))
        full = await first.expect(wire.Full)
        state: dict[str, wire.WireInstance] = {}
        apply(state, full)
        await first.aclose()
        await h.connections(0)

        # Changes while the proxy is away (and nobody else subscribes).
        await h.upstream.send(Changed((Put(ep(8083)),)))
        await h.upstream.send(Changed((Remove("orders", "r8081"),)))
        await h.upstream.send(Listing((ep(8082, weight=7), ep(8083))))

        again = await h.connect()
        await again.send(wire.Subscribe({"orders": full.version}))
        missing = await again.settle()
        assert all(isinstance(m, wire.Deltas) for m in missing), missing
        assert [m.from_version for m in missing] == [
            full.version,
            *[m.to_version for m in missing][:-1],
        ]
        assert missing[-1].to_version == h.version() and len(missing) == 3
        for message in missing:
            apply(state, message)

        fresh = await h.connect("proxy-2")
        await fresh.send(wire.Subscribe({"orders": None}))
        current = await fresh.expect(wire.Full)
        assert state == {i.id: i for i in current.instances}

        # And it goes on streaming from there.
        await h.upstream.send(Changed((Put(ep(8084)),)))
        delta = await again.expect(wire.Deltas)
        assert delta.from_version == missing[-1].to_version


async def test_reconnecting_with_the_current_version_gets_an_empty_confirmation() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081),)))
        first = await h.connect()
        await first.send(wire.Subscribe({"orders": None}))
        full = await first.expect(wire.Full)
        await first.aclose()
        again = await h.connect()
        await again.send(wire.Subscribe({"orders": full.version}))
        assert await again.settle() == [wire.Deltas("orders", full.version, full.version)]


async def test_a_version_older_than_the_history_gets_a_full() -> None:
    async with serving(history=2) as h:
        await h.upstream.send(Listing((ep(8081),)))
        first = await h.connect()
        await first.send(wire.Subscribe({"orders": None}))
        old = await first.expect(wire.Full)
        await first.aclose()
        for port in (8082, 8083, 8084):
            await h.upstream.send(Changed((Put(ep(port)),)))

        again = await h.connect()
        await again.send(wire.Subscribe({"orders": old.version}))
        (full,) = await again.settle()
        assert isinstance(full, wire.Full) and full.version == h.version()
        assert len(full.instances) == 4


async def test_a_version_this_server_never_had_gets_a_full() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081),)))
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": h.version() + 100}))
        (full,) = await client.settle()
        assert isinstance(full, wire.Full) and full.version == h.version()


async def test_with_subscribed_interest_history_comes_from_other_subscribers() -> None:
    # interest "subscribed" has no recorder (it would load every service);
    # the deltas a connected proxy reads are what a reconnecting one resumes from.
    async with serving(interest="subscribed") as h:
        keeper = await h.connect("keeper")
        await keeper.send(wire.Subscribe({"orders": None}))
        await keeper.expect(wire.Full)
        await h.upstream.send(Listing((ep(8081),)))
        await keeper.expect(wire.Deltas)

        leaver = await h.connect("leaver")
        await leaver.send(wire.Subscribe({"orders": None}))
        held = (await leaver.expect(wire.Full)).version
        await leaver.aclose()
        await h.upstream.send(Changed((Put(ep(8082)),)))
        await h.upstream.send(Changed((Put(ep(8083)),)))
        assert len(await keeper.settle()) == 2

        again = await h.connect("leaver")
        await again.send(wire.Subscribe({"orders": held}))
        missing = await again.settle()
        assert [type(m) for m in missing] == [wire.Deltas, wire.Deltas]
        assert missing[0].from_version == held and missing[-1].to_version == h.version()


# --------------------------------------------------------------- ownership


@attrs.define
class Shards:
    """An in-test Ownership: this Dispatcher owns ``owned``; d2 owns the rest."""

    owned: set[str]
    epoch: int = 1

    def owns(self, service: str) -> bool:
        return service in self.owned

    def owner_of(self, service: str) -> wire.Owner | None:
        if service in self.owned:
            return HERE
        return None if service == "orphan" else THERE


async def test_a_service_owned_elsewhere_is_a_redirect_not_data() -> None:
    shards = Shards({"orders"})
    async with serving(ownership=shards) as h:
        await h.upstream.send(Listing((ep(8081), ep(9001, service="users"))))
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": None, "users": None, "orphan": 3}))
        messages = await client.settle()
        redirects = {m.service: m for m in messages if isinstance(m, wire.Redirect)}
        assert redirects == {
            "users": wire.Redirect("users", THERE, 1),
            "orphan": wire.Redirect("orphan", None, 1),
        }
        assert [m.service for m in messages if isinstance(m, wire.Full)] == ["orders"]
        assert h.server.connections[0].services == {"orders"}
        # Reports about a service owned elsewhere go to its owner.
        await client.send(wire.Report("users", merged_id(9001), "reset"))
        assert await client.settle() == [wire.Redirect("users", THERE, 1)]


async def test_losing_ownership_pushes_a_redirect_and_stops_the_deltas() -> None:
    shards = Shards({"orders", "users"})
    async with serving(ownership=shards) as h:
        await h.upstream.send(Listing((ep(8081), ep(9001, service="users"))))
        client = await h.connect()
        other = await h.connect("proxy-2")
        await client.send(wire.Subscribe({"orders": None, "users": None}))
        await other.send(wire.Subscribe({"orders": None}))
        assert len(await client.settle()) == 2
        assert len(await other.settle()) == 1

        shards.owned.discard("users")
        shards.epoch = 2
        h.server.ownership_changed()
        assert await client.settle() == [wire.Redirect("users", THERE, 2)]
        assert await other.settle() == []  # it never had users
        assert h.server.connections[0].services == {"orders"}

        await h.upstream.send(Changed((Put(ep(8082)), Put(ep(9002, service="users")))))
        (delta,) = await client.settle()
        assert isinstance(delta, wire.Deltas) and delta.service == "orders"
        # Asking again is answered with a redirect, as for any service owned elsewhere.
        await client.send(wire.Subscribe({"users": None}))
        assert await client.settle() == [wire.Redirect("users", THERE, 2)]


# --------------------------------------------------------------- acks, reports, pings


async def test_acks_are_recorded_per_connection() -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081),)))
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": None}))
        full = await client.expect(wire.Full)
        await client.send(wire.Ack("orders", full.version))
        await client.send(wire.Ack("not-subscribed", 5))  # ignored
        await client.settle()
        (connection,) = h.server.connections
        assert connection.client_id == "proxy-1"
        assert dict(connection.acked) == {"orders": full.version}
        assert dict(connection.sent) == {"orders": full.version}

        await h.upstream.send(Changed((Put(ep(8082)),)))
        delta = await client.expect(wire.Deltas)
        assert connection.sent["orders"] - connection.acked["orders"] > 0  # lag, before the ack
        await client.send(wire.Ack("orders", delta.to_version))
        await client.settle()
        assert connection.acked["orders"] == connection.sent["orders"] == delta.to_version


async def test_reports_reach_the_callback_with_the_client_id() -> None:
    reports: list[tuple[str, str, str, str]] = []

    def on_report(service: str, instance_id: str, reason: str, client_id: str) -> None:
        reports.append((service, instance_id, reason, client_id))
        if reason == "explode":
            raise RuntimeError("health checker bug")

    async with serving(on_report=on_report) as h:
        client = await h.connect("proxy-7")
        await client.send(wire.Report("orders", merged_id(8081), "connect-refused"))
        await client.send(wire.Report("orders", merged_id(8082), "explode"))
        await client.send(wire.Report("orders", merged_id(8083), "reset"))
        assert await client.settle() == []
        assert reports == [
            ("orders", merged_id(8081), "connect-refused", "proxy-7"),
            ("orders", merged_id(8082), "explode", "proxy-7"),
            ("orders", merged_id(8083), "reset", "proxy-7"),  # a failing callback did no harm
        ]


# --------------------------------------------------------------- bad input


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "garbage",
    [
        frame(b"\xff\xfe not json"),
        frame(b"[1, 2]"),
        frame(json.dumps({"type": "no-such-message"}).encode()),
        frame(json.dumps({"type": "subscribe", "services": {"orders": "latest"}}).encode()),
        frame(json.dumps({"type": "lookup", "services": ["orders"]}).encode()),  # Meta Server's
        frame(json.dumps({"type": "subscribe", "services": {"*": None}}).encode()),
        struct.pack(">I", wire.MAX_FRAME + 1),  # oversized: refused from its header alone
    ],
    ids=[
        "not-json",
        "not-object",
        "unknown-type",
        "bad-version",
        "not-for-us",
        "star",
        "oversized",
    ],
)
async def test_a_bad_frame_closes_that_connection_only(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving() as h:
        await h.upstream.send(Listing((ep(8081),)))
        bystander = await h.connect("bystander")
        await bystander.send(wire.Subscribe({"orders": None}))
        await bystander.expect(wire.Full)

        bad = await h.connect("bad")
        with caplog.at_level(logging.WARNING, logger="dispatcher.faces.subscription_server"):
            await bad.send_raw(garbage)
            error = await bad.expect(wire.Error)
            assert error.code == "bad-request"
            await bad.expect_closed()
            await h.connections(1)
        (line,) = [r for r in caplog.records if r.getMessage() == "closing a subscriber"]
        assert vars(line)["client"] == "bad" and "bad-request" in vars(line)["reason"]

        await h.upstream.send(Changed((Put(ep(8082)),)))
        assert (await bystander.expect(wire.Deltas)).to_version == h.version()


async def test_a_bad_frame_before_hello_is_refused_too() -> None:
    async with serving() as h:
        client = await Client.tcp(h.port)
        await client.send_raw(struct.pack(">I", wire.MAX_FRAME + 1))
        assert (await client.expect(wire.Error)).code == "bad-request"
        await client.expect_closed()


# --------------------------------------------------------------- bounds


async def test_connections_above_the_limit_are_refused_overloaded() -> None:
    async with serving(limits=SubscriptionLimits(max_connections=2)) as h:
        first, second = await h.connect("p1"), await h.connect("p2")
        third = await Client.tcp(h.port)
        assert (await third.expect(wire.Error)).code == "overloaded"
        await third.expect_closed()
        assert h.server.refused == 1
        await first.aclose()
        await h.connections(1)
        fourth = await h.connect("p4")
        assert await fourth.settle() == [] and await second.settle() == []


async def test_a_client_that_never_reads_is_disconnected_and_others_keep_receiving() -> None:
    limits = SubscriptionLimits(send_stall=0.5)
    async with serving(limits=limits) as h:
        blob = "x" * 200
        ports = range(10000, 12000)
        await h.upstream.send(Listing(tuple(ep(p, "bulk", metadata={"b": blob}) for p in ports)))

        # A proxy with a tiny receive window that reads its Welcome and then nothing.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", h.port))
        slow = Client(trio.SocketStream(sock))
        await slow.hello("slow")
        await slow.send(wire.Subscribe({"bulk": None}))

        fast = await h.connect("fast")
        await fast.send(wire.Subscribe({"bulk": None}))
        await fast.expect(wire.Full)

        # Each round changes every instance (about 0.5 MB of deltas per subscriber).
        rounds = 0
        with trio.fail_after(30):
            while len(h.server.connections) > 1:
                rounds += 1
                assert rounds < 500
                await h.upstream.send(Listing(tuple(
                    ep(p, "bulk", weight=rounds % 100, metadata={"b": blob}) for p in ports
                )))  # fmt: skip
                delta = await fast.expect(wire.Deltas)
                assert delta.to_version == h.version("bulk")
                # The slow subscriber's backlog stays bounded, here and in the hub.
                for connection in h.server.connections:
                    assert connection.unsent <= limits.output_high_water + wire.MAX_FRAME
        assert [c.client_id for c in h.server.connections] == ["fast"]

        # The slow one finds its connection closed once it reads again.
        with trio.fail_after(TIMEOUT):
            while True:
                try:
                    if not await slow.wire.stream.receive_some(1 << 20):
                        break
                except trio.BrokenResourceError:
                    break

        await h.upstream.send(Changed((Put(ep(20000, "bulk")),)))
        assert (await fast.expect(wire.Deltas)).to_version == h.version("bulk")


async def test_a_reader_that_fell_far_behind_gets_a_full_and_nothing_is_lost() -> None:
    # The hub keeps at most 4 updates for it; a client that reads nothing for a
    # while (a GC pause, a busy proxy) must come back to the exact current state.
    limits = SubscriptionLimits(output_high_water=1, send_stall=30)
    async with serving(limits=limits, subscriber_queue=4) as h:
        blob = "y" * 1000
        ports = range(10000, 10500)

        def listing(weight: int) -> Listing:
            return Listing(tuple(ep(p, "bulk", weight=weight, metadata={"b": blob})
                                 for p in ports))  # fmt: skip

        await h.upstream.send(listing(0))
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", h.port))
        client = Client(trio.SocketStream(sock))
        await client.hello()
        await client.send(wire.Subscribe({"bulk": None}))
        state: dict[str, wire.WireInstance] = {}
        first = await client.expect(wire.Full)
        apply(state, first)

        for weight in range(1, 41):  # about 0.5 MB per version, never read meanwhile
            await h.upstream.send(listing(weight))

        kinds: list[str] = []
        held = first.version
        with trio.fail_after(TIMEOUT):
            while held != h.version("bulk"):
                message = await client.receive()
                assert isinstance(message, (wire.Full, wire.Deltas))
                if isinstance(message, wire.Deltas):
                    assert message.from_version == held
                kinds.append(message.type)
                held = message.to_version if isinstance(message, wire.Deltas) else message.version
                apply(state, message)
        assert "full" in kinds and len(kinds) < 40  # collapsed, not replayed
        assert {i.weight for i in state.values()} == {40} and len(state) == len(ports)
        assert await client.settle() == []


async def test_a_client_that_pings_without_reading_is_disconnected() -> None:
    limits = SubscriptionLimits(max_output=64 * 1024, send_stall=30)
    async with serving(limits=limits) as h:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", h.port))
        client = Client(trio.SocketStream(sock))
        await client.hello()
        pings = wire.encode(wire.Ping()) * 10_000
        with trio.fail_after(TIMEOUT):
            try:
                while len(h.server.connections):
                    await client.send_raw(pings)
                    await trio.testing.wait_all_tasks_blocked()
            except trio.BrokenResourceError:
                pass
        await h.connections(0)


async def test_services_per_connection_and_client_ids_are_bounded() -> None:
    async with serving(limits=SubscriptionLimits(max_services=2)) as h:
        client = await h.connect()
        await client.send(wire.Subscribe({"a": None, "b": None}))
        assert len(await client.settle()) == 2
        await client.send(wire.Subscribe({"c": None}))
        assert (await client.expect(wire.Error)).code == "bad-request"
        await client.expect_closed()

        chatty = await Client.tcp(h.port)
        await chatty.send(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "x" * 10_000))
        error = await chatty.expect(wire.Error)
        assert error.code == "bad-request" and "client_id" in error.message
        await chatty.expect_closed()


# --------------------------------------------------------------- unix sockets


async def test_the_same_protocol_over_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "sub.sock")
    # A dead server's socket file is replaced.
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)
    leftover.close()
    async with serving() as h, trio.open_nursery() as nursery:
        assert await nursery.start(h.server.serve_unix, path) == path
        with pytest.raises(OSError) as busy:
            await h.server.serve_unix(path)
        assert busy.value.errno == errno.EADDRINUSE

        await h.upstream.send(Listing((ep(8081),)))
        client = await Client.unix(path)
        await client.hello()
        await client.send(wire.Subscribe({"orders": None}))
        assert (await client.expect(wire.Full)).instances[0].id == merged_id(8081)
        await h.upstream.send(Changed((Put(ep(8082)),)))
        assert (await client.expect(wire.Deltas)).to_version == h.version()
        assert h.server.connections[0].peer.startswith(f"unix:{path}")

        bad = await Client.unix(path)
        await bad.send(wire.Hello(wire.PROTOCOL_VERSION, "wrong", "x"))
        assert (await bad.expect(wire.Error)).code == "unauthenticated"
        nursery.cancel_scope.cancel()
    assert not Path(path).exists()  # removed on exit

    Path(path).write_text("not a socket")
    with pytest.raises(FileExistsError):
        await h.server.serve_unix(path)
    assert Path(path).read_text() == "not a socket"  # never deleted


# --------------------------------------------------------------- the history itself


def delta(service: str, start: int, end: int) -> Delta:
    return Delta(service, start, end, (ep(8000 + end, service),))


def test_history_chains_and_ignores_what_it_already_has() -> None:
    history = DeltaHistory(per_service=4, total=100)
    for start, end in ((0, 1), (1, 3), (3, 4)):
        history.record(delta("s", start, end))
    history.record(delta("s", 1, 3))  # a second reader offers the same delta
    assert history.head("s") == 4 and len(history) == 3
    assert history.chain("s", 1, 4) == (delta("s", 1, 3), delta("s", 3, 4))
    assert history.chain("s", 1, 3) == (delta("s", 1, 3),)
    assert history.chain("s", 4, 4) == ()
    assert history.chain("s", 2, 4) is None  # 2 was never a version of s
    assert history.chain("s", 1, 5) is None  # not there yet
    assert history.chain("other", 1, 2) is None


def test_history_restarts_after_a_gap_and_is_bounded() -> None:
    history = DeltaHistory(per_service=2, total=3)
    for start, end in ((0, 1), (1, 2), (2, 3)):
        history.record(delta("s", start, end))
    assert history.chain("s", 0, 3) is None and history.chain("s", 1, 3) is not None
    history.record(delta("s", 5, 6))  # 3 -> 5 was never seen here
    assert history.chain("s", 1, 6) is None and history.chain("s", 5, 6) is not None
    history.reset("s", 9)  # a full entry at 9
    assert history.head("s") == 9 and history.chain("s", 5, 9) is None
    for name in "abcd":
        history.record(delta(name, 0, 1))
    assert len(history) <= 3
    assert history.chain("a", 0, 1) is None and history.chain("d", 0, 1) is not None


# --------------------------------------------------------------- configuration and gateway


def test_the_subscriptions_table_is_read_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "zkgate.toml"
    path.write_text(
        textwrap.dedent("""\
        [subscriptions]
        listen = "127.0.0.1:7100"
        unix = "run/sub.sock"
        token = "t0ken"
        history = 16
        max_connections = 8
    """)
    )
    config = load_config(path)
    assert config.subscriptions == SubscriptionsConfig(
        token="t0ken", listen="127.0.0.1:7100", unix=tmp_path / "run" / "sub.sock",
        history=16, max_connections=8,
    )  # fmt: skip
    assert "t0ken" not in repr(config)
    assert parse_config(config.to_mapping()) == config
    assert parse_config({}).subscriptions is None  # no table, no server
    defaults = parse_config({"subscriptions": {"token": "t"}}).subscriptions
    assert defaults is not None and defaults.listen == "127.0.0.1:7000"
    assert defaults.history == DEFAULT_HISTORY


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({}, "subscriptions.token: missing"),
        ({"token": ""}, "subscriptions.token: must not be empty"),
        ({"token": 5}, "subscriptions.token: must be a string"),
        ({"token": "t", "listen": "nowhere"}, "subscriptions.listen: expected HOST:PORT"),
        ({"token": "t", "history": -1}, "subscriptions.history: must be at least 0"),
        ({"token": "t", "max_connections": 0}, "subscriptions.max_connections: must be at least 1"),
        ({"token": "t", "unix": 3}, "subscriptions.unix: must be a string"),
        ({"token": "t", "tokn": "x"}, "subscriptions.tokn: unknown key"),
    ],
)
def test_each_subscriptions_mistake_names_its_key(table: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"subscriptions": table})
    assert str(caught.value).startswith(expected), str(caught.value)
    with pytest.raises(ConfigError, match=r"^subscriptions: must be a table"):
        parse_config({"subscriptions": "on"})


async def test_the_gateway_serves_subscriptions_when_configured(tmp_path: Path) -> None:
    registry = tmp_path / "instances.toml"

    def write_registry(ports: Iterable[int]) -> None:
        text = "".join(
            f'[[instance]]\nservice = "orders"\nhost = "10.0.0.1"\nport = {p}\n' for p in ports
        )
        staging = tmp_path / "instances.tmp"
        staging.write_text(text)
        staging.replace(registry)  # atomically, as the static upstream asks

    write_registry([8081, 8082])
    socket_path = tmp_path / "sub.sock"
    config = parse_config({
        "node_id": "gw-1",
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
        "admin": {"enabled": False},
        "subscriptions": {"listen": "127.0.0.1:0", "unix": str(socket_path), "token": TOKEN},
        "upstream": [{"name": "file", "kind": "static", "path": str(registry),
                      "poll_interval": 0.05}],
    })  # fmt: skip
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(run_gateway, config)
        assert gateway.subscriptions is not None and gateway.subscription_port
        for client in (await Client.tcp(gateway.subscription_port),
                       await Client.unix(str(socket_path))):  # fmt: skip
            welcome = await client.hello()
            assert welcome.server_id.startswith("gw-1/")
            await client.send(wire.Subscribe({"orders": None}))
            with trio.fail_after(TIMEOUT):
                held: dict[str, wire.WireInstance] = {}
                while len(held) < 2:  # the file may be loaded after we subscribed
                    apply(held, await client.receive())
            assert set(held) == {merged_id(8081), merged_id(8082)}

        write_registry([8082, 8083])
        with trio.fail_after(TIMEOUT):
            while set(held) != {merged_id(8082), merged_id(8083)}:
                apply(held, await client.expect(wire.Deltas))
        nursery.cancel_scope.cancel()
