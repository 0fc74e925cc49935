"""The proxy's control-plane client against servers that speak dispatcher.wire.

:class:`MetaDriver` and :class:`DispatcherDriver` are small, real servers of
the subscription protocol, driven by the test: they keep a service's
instances and versions as a Dispatcher does (a Full, then chained Deltas;
a resume from a held version with the Deltas since, when the version came
from this very server incarnation) and record what the proxy sent, so the
tests can assert on the conversation as well as on the proxy's tables.
They are protocol drivers, not a registry double: the registries behind a
Dispatcher play no part in what the proxy does.

Every test runs on trio's ``MockClock`` with autojump: the sockets are real
and in this process, the time is virtual, so backoff, pings and the silence
limit take no wall-clock time and their bounds are checked without slack.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Iterable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from dispatcher import wire
from proxy.control import ControlPlane, ControlSettings
from proxy.endpoints import ServiceTable
from tests.waiting import until

TOKEN = "s3cret"
FAST = ControlSettings(token=TOKEN, client_id="test-proxy", connect_timeout=2.0,
                       ping_interval=0.5, dead_after=2.0, backoff_initial=0.02,
                       backoff_max=0.2)  # fmt: skip


def instance(n: int, port: int = 0, **kw: Any) -> wire.WireInstance:
    return wire.WireInstance(f"i{n}", "127.0.0.1", port or 20000 + n, **kw)


# ============================================================================ drivers

#: How a connection ends from the other side.
_GONE = (EOFError, trio.BrokenResourceError, trio.ClosedResourceError)


class _Server:
    """A TCP server on 127.0.0.1 that can be stopped and started again on its port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.connections: list[_Conn] = []
        self.hellos: list[wire.Hello] = []
        self.token = TOKEN
        #: While set, the server reads but sends nothing (a hung peer).
        self.mute = False
        self._log: list[wire.Message] = []
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await nursery.start(self._serve)

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    def stop(self) -> None:
        """Close the listener and every connection at once."""
        assert self._scope is not None
        self._scope.cancel()
        self.connections.clear()

    async def restart(self) -> None:
        assert self._nursery is not None
        await self._nursery.start(self._serve)

    def drop_connections(self) -> None:
        """Close the open connections, keep listening (a network blip)."""
        for conn in self.connections:
            conn.scope.cancel()
        self.connections.clear()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = _Conn(self, wire.WireStream(stream))
        with conn.scope:
            try:
                hello = await conn.stream.receive()
                if not isinstance(hello, wire.Hello) or hello.token != self.token:
                    await conn.stream.send(wire.Error("unauthenticated", "wrong token"))
                    return
                self.hellos.append(hello)
                await conn.stream.send(wire.Welcome(wire.PROTOCOL_VERSION, self.server_id))
            except _GONE:
                return
            self.connections.append(conn)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.write)
                    await self._read(conn)
                    nursery.cancel_scope.cancel()
            finally:
                if conn in self.connections:
                    self.connections.remove(conn)
                conn.closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(conn.stream.stream)

    async def _read(self, conn: _Conn) -> None:
        try:
            async for message in conn.stream:
                self._log.append(message)
                if isinstance(message, wire.Ping):
                    conn.send(wire.Pong())
                else:
                    self.on_message(conn, message)
        except _GONE:
            pass  # the proxy went away (or reset): this connection is over

    @property
    def server_id(self) -> str:
        return self.name

    def on_message(self, conn: _Conn, message: wire.Message) -> None:
        raise NotImplementedError

    def received(self, kind: type[wire.Message] | tuple[type[wire.Message], ...]) -> list[Any]:
        """Every message of ``kind`` received so far, over all connections ever made."""
        return [m for m in self.log if isinstance(m, kind)]

    @property
    def log(self) -> list[wire.Message]:
        return self._log


class _Conn:
    def __init__(self, server: _Server, stream: wire.WireStream) -> None:
        self.server = server
        self.stream = stream
        self.scope = trio.CancelScope()
        self.services: set[str] = set()
        self.watching: set[str] = set()
        self.closed = False
        self._send, self._queue = trio.open_memory_channel[wire.Message](math.inf)

    def send(self, message: wire.Message) -> None:
        if not self.server.mute:
            self._send.send_nowait(message)

    async def write(self) -> None:
        try:
            async for message in self._queue:
                await self.stream.send(message)
        except _GONE:
            self.scope.cancel()


class MetaDriver(_Server):
    """A Meta Server: Lookup and WatchAssignments answered from ``owners``."""

    def __init__(self) -> None:
        super().__init__("meta-1")
        self.epoch = 1
        self.owners: dict[str, wire.Owner | None] = {}

    def on_message(self, conn: _Conn, message: wire.Message) -> None:
        if isinstance(message, wire.Lookup | wire.WatchAssignments):
            if isinstance(message, wire.WatchAssignments):
                conn.watching.update(message.services)
            conn.send(self._assignment(message.services))

    def _assignment(self, services: Iterable[str]) -> wire.Assignment:
        return wire.Assignment(self.epoch, {s: self.owners.get(s) for s in services})

    def assign(self, **owners: wire.Owner | None) -> None:
        """A new epoch in which ``owners`` changed; pushed to every watcher."""
        self.epoch += 1
        self.owners.update(owners)
        for conn in self.connections:
            if conn.watching:
                conn.send(self._assignment(conn.watching))


@attrs.define
class _Service:
    version: int
    instances: dict[str, wire.WireInstance]
    history: list[wire.Deltas]


class DispatcherDriver(_Server):
    """A Dispatcher's subscription face over state the test sets with put/remove."""

    _versions = itertools.count(100, 7)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.incarnation = secrets.token_hex(3)
        self.services: dict[str, _Service] = {}
        #: Services this Dispatcher does not own, and whom to redirect to (with the epoch).
        self.not_owned: dict[str, tuple[wire.Owner | None, int]] = {}

    @property
    def server_id(self) -> str:
        return f"{self.name}/{self.incarnation}"

    @property
    def owner(self) -> wire.Owner:
        return wire.Owner(self.name, self.address)

    def new_incarnation(self) -> None:
        """As a restarted Dispatcher: versions held from before mean nothing here."""
        self.incarnation = secrets.token_hex(3)
        for state in self.services.values():
            state.history.clear()

    # ------------------------------------------------------------- state

    def put(self, service: str, *instances: wire.WireInstance) -> None:
        state = self.services.get(service)
        if state is None:
            state = self.services[service] = _Service(next(self._versions), {}, [])
        self._change(service, upserted=instances)

    def remove(self, service: str, *ids: str) -> None:
        self._change(service, removed=ids)

    def _change(self, service: str, upserted: Iterable[wire.WireInstance] = (),
                removed: Iterable[str] = ()) -> None:  # fmt: skip
        state = self.services[service]
        upserted, removed = tuple(upserted), tuple(removed)
        new = next(self._versions)
        delta = wire.Deltas(service, state.version, new, upserted, removed)
        for i in upserted:
            state.instances[i.id] = i
        for r in removed:
            state.instances.pop(r, None)
        state.version = new
        state.history.append(delta)
        for conn in self.connections:
            if service in conn.services:
                conn.send(delta)

    def full(self, service: str) -> wire.Full:
        state = self.services.get(service)
        if state is None:
            return wire.Full(service, 0, ())
        return wire.Full(service, state.version, tuple(state.instances.values()))

    def disown(self, service: str, owner: wire.Owner | None, epoch: int) -> None:
        """Stop owning ``service``: Redirect its subscribers, as ownership_changed does."""
        self.not_owned[service] = (owner, epoch)
        for conn in self.connections:
            if service in conn.services:
                conn.services.discard(service)
                conn.send(wire.Redirect(service, owner, epoch))

    def subscribers(self, service: str) -> int:
        return sum(1 for c in self.connections if service in c.services)

    # ------------------------------------------------------------- protocol

    def on_message(self, conn: _Conn, message: wire.Message) -> None:
        if isinstance(message, wire.Subscribe):
            for name, held in message.services.items():
                if name in self.not_owned:
                    owner, epoch = self.not_owned[name]
                    conn.send(wire.Redirect(name, owner, epoch))
                    continue
                conn.services.add(name)
                for m in self._resume(name, held):
                    conn.send(m)
        elif isinstance(message, wire.Unsubscribe):
            conn.services.difference_update(message.services)

    def _resume(self, service: str, held: int | None) -> list[wire.Message]:
        state = self.services.get(service)
        if held is None or state is None:
            return [self.full(service)]
        if held == state.version:
            return [wire.Deltas(service, held, held)]
        chain = list(itertools.dropwhile(lambda d: d.from_version != held, state.history))
        if not chain:
            return [self.full(service)]
        return list(chain)


@pytest.fixture
def table() -> ServiceTable:
    return ServiceTable("orders")


async def start_control(
    nursery: trio.Nursery, meta: MetaDriver, services: Iterable[str],
    settings: ControlSettings = FAST,
) -> ControlPlane:  # fmt: skip
    control = ControlPlane(meta.address, {s: ServiceTable(s) for s in services}, settings)
    await nursery.start(control.run)
    return control


def ids(table: ServiceTable) -> set[str]:
    return {e.id for e in table}


# ============================================================================ tests


async def test_lookup_subscribe_and_apply_full_then_deltas(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1), instance(2))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1", "i2"})
    assert table.source == d1.server_id and table.version == d1.services["orders"].version
    assert meta.received(wire.Lookup)[0].services == ("orders",)
    assert meta.received(wire.WatchAssignments)[0].services == ("orders",)
    assert meta.hellos[0].token == TOKEN and meta.hellos[0].client_id == "test-proxy"

    d1.put("orders", instance(3, weight=5))
    d1.remove("orders", "i1")
    await until(lambda: ids(table) == {"i2", "i3"})
    i3 = table.get("i3")
    assert i3 is not None and i3.weight == 5
    # Every state the proxy applied is acknowledged with its version.
    await until(lambda: any(a.version == table.version for a in d1.received(wire.Ack)))


async def test_reconnect_resumes_with_the_held_version(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1"})
    held = table.version

    d1.drop_connections()
    # No checkpoint in between: the change happens while the proxy is away, however
    # short its (jittered, possibly near-zero) reconnect delay is.
    d1.put("orders", instance(2))
    await until(lambda: ids(table) == {"i1", "i2"})
    subscribes = d1.received(wire.Subscribe)
    assert [s.services for s in subscribes] == [{"orders": None}, {"orders": held}]
    # It resumed on the missing delta, not on a new Full.
    assert table.version == d1.services["orders"].version


async def test_a_restarted_dispatcher_gets_no_foreign_version(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1"})

    d1.stop()
    d1.new_incarnation()
    d1.services["orders"] = _Service(5, {"i9": instance(9)}, [])
    await d1.restart()
    await until(lambda: ids(table) == {"i9"})
    # A version from the old incarnation is never offered to the new one.
    assert d1.received(wire.Subscribe)[-1].services == {"orders": None}
    assert table.source == d1.server_id and table.version == 5


async def test_shard_move_subscribes_at_the_new_owner_before_leaving_the_old(
    nursery: trio.Nursery,
) -> None:
    meta, d1, d2 = MetaDriver(), DispatcherDriver("d1"), DispatcherDriver("d2")
    for server in (meta, d1, d2):
        await server.start(nursery)
    d1.put("orders", instance(1), instance(2))
    d2.put("orders", instance(1), instance(2), instance(3))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders", "users"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1", "i2"})

    # The table must never be empty during the move: watch every change.
    sizes: list[int] = []

    async def watch() -> None:
        while True:
            await table.wait_changed()
            sizes.append(len(table))

    nursery.start_soon(watch)
    meta.assign(orders=d2.owner)
    await until(lambda: ids(table) == {"i1", "i2", "i3"} and table.source == d2.server_id)
    await until(lambda: d1.subscribers("orders") == 0, what="old owner unsubscribed")
    assert d1.received(wire.Unsubscribe)[-1].services == ("orders",)
    assert all(sizes), sizes
    # d1 owns nothing of ours any more: its session is gone.
    await until(lambda: "d1" not in control.sessions())
    assert control.owners["orders"] == d2.owner


async def test_old_owner_feeds_the_table_until_the_new_one_answers(
    nursery: trio.Nursery,
) -> None:
    meta, d1, d2 = MetaDriver(), DispatcherDriver("d1"), DispatcherDriver("d2")
    for server in (meta, d1, d2):
        await server.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1"})

    d2.stop()  # the new owner is not reachable yet
    meta.assign(orders=d2.owner)
    await until(
        lambda: (
            (session := control.owner_session("orders")) is not None and session.owner == d2.owner
        )
    )
    d1.put("orders", instance(2))  # still applied: d1 is all we have
    await until(lambda: ids(table) == {"i1", "i2"})
    assert control.sessions()["d1"].leaving == {"orders"}

    d2.put("orders", instance(7))
    await d2.restart()
    await until(lambda: ids(table) == {"i7"} and table.source == d2.server_id)
    d1.put("orders", instance(8))  # d1 no longer counts
    await until(lambda: d1.subscribers("orders") == 0)
    assert ids(table) == {"i7"}


async def test_redirect_to_a_newer_owner_is_followed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1, d2 = MetaDriver(), DispatcherDriver("d1"), DispatcherDriver("d2")
    for server in (meta, d1, d2):
        await server.start(nursery)
    d1.put("orders", instance(1))
    d2.put("orders", instance(2))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1"})

    d1.disown("orders", d2.owner, meta.epoch + 1)
    await until(lambda: ids(table) == {"i2"})
    assert control.epoch == meta.epoch + 1
    assert control.owners["orders"] == d2.owner


async def test_redirect_to_nobody_asks_the_meta_server_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1, d2 = MetaDriver(), DispatcherDriver("d1"), DispatcherDriver("d2")
    for server in (meta, d1, d2):
        await server.start(nursery)
    d1.put("orders", instance(1))
    d2.put("orders", instance(2))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1"})
    lookups = len(meta.received(wire.Lookup))

    meta.owners["orders"] = d2.owner  # the Meta Server knows; no push was sent
    d1.disown("orders", None, meta.epoch)
    await until(lambda: len(meta.received(wire.Lookup)) > lookups)
    await until(lambda: ids(table) == {"i2"})
    assert ids(table) == {"i2"}


async def test_stale_assignments_are_ignored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1, d2 = MetaDriver(), DispatcherDriver("d1"), DispatcherDriver("d2")
    for server in (meta, d1, d2):
        await server.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    meta.epoch = 10
    control = await start_control(nursery, meta, ["orders"])
    await until(lambda: ids(control.tables["orders"]) == {"i1"})
    for conn in meta.connections:  # an out-of-date push on the same connection
        conn.send(wire.Assignment(3, {"orders": d2.owner}))
    meta.assign()  # a newer push (epoch 11), to know the stale one was read
    await until(lambda: control.epoch == 11)
    assert control.owners["orders"] == d1.owner


async def test_control_plane_away_keeps_the_last_endpoints(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1), instance(2))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1", "i2"})

    meta.stop()
    d1.stop()
    await until(lambda: not control.meta_connected and not control.sessions()["d1"].connected)
    # Virtual time: 0.3 s is every backoff step from 0.02 s up to the 0.2 s cap,
    # so several reconnects fail meanwhile; the table stays as it was.
    await trio.sleep(0.3)
    assert ids(table) == {"i1", "i2"}

    d1.put("orders", instance(3))
    await meta.restart()
    await d1.restart()
    await until(lambda: ids(table) == {"i1", "i2", "i3"})
    await until(lambda: control.meta_connected)


async def test_deltas_that_do_not_chain_ask_for_a_full(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    table = control.tables["orders"]
    await until(lambda: ids(table) == {"i1"})
    # A delta from a version the proxy never held: it must not be applied.
    d1.connections[0].send(wire.Deltas("orders", 1, 2, (instance(5),), ()))
    await until(lambda: d1.received(wire.Subscribe)[-1].services == {"orders": None}
                and len(d1.received(wire.Subscribe)) == 2)  # fmt: skip
    assert ids(table) == {"i1"}


async def test_reports_reach_the_owner_and_wait_for_a_reconnect(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    control = await start_control(nursery, meta, ["orders"])
    await until(lambda: ids(control.tables["orders"]) == {"i1"})

    control.report("orders", "i1", "connect-refused")
    await until(lambda: d1.received(wire.Report))
    assert d1.received(wire.Report) == [wire.Report("orders", "i1", "connect-refused")]

    d1.stop()
    await until(lambda: not control.sessions()["d1"].connected)
    control.report("orders", "i1", "connect-timeout")
    await d1.restart()
    await until(lambda: len(d1.received(wire.Report)) == 2)
    assert d1.received(wire.Report)[-1].reason == "connect-timeout"


async def test_a_wrong_token_is_retried_without_crashing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta = MetaDriver()
    meta.token = "another"
    await meta.start(nursery)
    control = await start_control(nursery, meta, ["orders"])
    await until(lambda: len(meta.connections) == 0 and control.epoch == -1)
    first = len([1 for _ in meta.hellos])
    assert first == 0  # refused before any hello was accepted
    meta.token = TOKEN
    await until(lambda: control.meta_connected)


async def test_silent_server_is_dropped_and_redialed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    meta, d1 = MetaDriver(), DispatcherDriver("d1")
    await meta.start(nursery)
    await d1.start(nursery)
    d1.put("orders", instance(1))
    meta.owners["orders"] = d1.owner
    settings = attrs.evolve(FAST, ping_interval=0.1, dead_after=0.4)
    control = await start_control(nursery, meta, ["orders"], settings)
    await until(lambda: ids(control.tables["orders"]) == {"i1"})
    # The proxy pings when the server is quiet (the driver answers).
    await until(lambda: d1.received(wire.Ping))
    # A server that stops answering at all is given up on and dialled again.
    hellos = len(d1.hellos)
    d1.mute = True
    muted = trio.current_time()
    await until(lambda: len(d1.hellos) > hellos, timeout=5)
    # Virtual time: dropped ``dead_after`` after the last word heard (at most a ping
    # interval before the mute), then redialled within one backoff.
    silent = trio.current_time() - muted
    assert settings.dead_after - settings.ping_interval <= silent
    assert silent <= settings.dead_after + settings.backoff_max
