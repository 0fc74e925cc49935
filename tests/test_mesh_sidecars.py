"""Sidecar registrations reach the mesh views when they happen, not at the next look (#18).

In process, on trio's MockClock, with the clock never moving: a real engine on a real
SQLite tree, the fan-in, a Dubbo projection, the mesh feed over an in-memory governance
store, and :class:`~dispatcher.faces.mesh.views.MeshViews` as the gateway wires them. The
sessions speak the ZooKeeper protocol through the sans-I/O codecs (the listener's codec on
the engine's side, the client codec on the other), so every byte a consumer receives is
what a Dubbo consumer on a socket would receive, and "the event has arrived" is a fact to
check right after the write is handled, with no time for anything to poll.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote_plus

import attrs
import trio
import trio.testing

from adapters.layouts.dubbo import encode
from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Instance, Source
from dispatcher.core.upstream import Listing, layout_kind
from dispatcher.faces.mesh.config import parse_mesh
from dispatcher.faces.mesh.views import MeshViews
from dispatcher.faces.projection import Projection
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import MeshSettings, Switch
from dispatcher.governance.store_memory import MemoryGovernance, MemoryGovernanceStore
from dispatcher.zk.codec.client_connection import (
    ClientConnection,
    Connect,
    Connected,
    ReplyReceived,
    Request,
    WatchNotified,
)
from dispatcher.zk.codec.connection import (
    ConnectRequested,
    RequestReceived,
    ServerConnection,
)
from dispatcher.zk.codec.jute import Reader
from dispatcher.zk.codec.protocol import Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    ConnectRequest,
    CreateRequest,
    GetChildrenResponse,
    PathWatchRequest,
    Record,
    WatcherEvent,
)
from dispatcher.zk.server.engine import Client, Engine
from dispatcher.zk.server.store import TreeStore
from tests.test_fanin import ScriptedUpstream

SERVICE = "shop.Cart"
PROVIDERS = f"/dubbo/{encode(SERVICE)}/providers"
CONSUMERS = f"/dubbo/{encode(SERVICE)}/consumers"
SIDECAR = "127.0.0.1:15001"
EPHEMERAL = 1


@attrs.define(eq=False)
class Session:
    """One ZooKeeper session on the engine, through both codecs and no socket."""

    engine: Engine
    remote_ip: str = "127.0.0.1"
    codec: ClientConnection = attrs.Factory(ClientConnection)
    server: ServerConnection = attrs.Factory(ServerConnection)
    client: Client | None = None
    replies: dict[int, ReplyReceived] = attrs.Factory(dict)
    events: list[WatcherEvent] = attrs.Factory(list)
    closed: bool = False
    _xid: int = 0

    @property
    def remote(self) -> str:
        return f"/{self.remote_ip}:40000"

    # The engine's Peer: what it sends is read at once by the client codec.
    def send(self, data: bytes) -> None:
        self.codec.receive_data(data)
        while (event := self.codec.next_event()) is not None:
            if isinstance(event, WatchNotified):
                self.events.append(event.event)
            elif isinstance(event, ReplyReceived):
                self.replies[event.xid] = event
            else:
                assert isinstance(event, Connected)

    def close(self) -> None:
        self.closed = True

    def _deliver(self, data: bytes) -> None:
        self.server.receive_data(data)
        while (event := self.server.next_event()) is not None:
            if isinstance(event, ConnectRequested):
                self.client = self.engine.connect(self, self.server, event.request)
            else:
                assert isinstance(event, RequestReceived) and self.client is not None
                assert self.engine.handle(self.client, event.xid, event.opcode,
                                          event.body) is None  # fmt: skip

    def connect(self) -> Session:
        self._deliver(self.codec.send(Connect(ConnectRequest(0, 0, 30_000, 0, bytes(16)))))
        assert self.client is not None
        return self

    def call(self, opcode: int, record: Record | None = None) -> ReplyReceived:
        """Send one request; the engine answers it in the same step."""
        self._xid += 1
        self._deliver(self.codec.send(Request(self._xid, opcode, record)))
        return self.replies.pop(self._xid)

    def create(self, path: str, data: bytes = b"", flags: int = 0) -> None:
        reply = self.call(OpCode.CREATE, CreateRequest(path, data, OPEN_ACL_UNSAFE, flags))
        assert reply.err in (Err.OK, Err.NODEEXISTS), (path, reply.err)

    def providers(self) -> set[str]:
        """Dubbo's read: the providers' addresses, with a child watch."""
        reply = self.call(OpCode.GET_CHILDREN, PathWatchRequest(PROVIDERS, True))
        assert reply.err == Err.OK
        names = GetChildrenResponse.read(Reader(reply.body)).children
        return {unquote_plus(name).split("/")[2] for name in names}


@asynccontextmanager
async def dispatcher(tmp_path: Path, *applications_on: str) -> AsyncIterator[Engine]:
    """An engine with a Dubbo projection of two providers of ``SERVICE`` and the mesh
    views, ``applications_on`` switched on at R = 100."""
    store = TreeStore(tmp_path / "data")
    engine = Engine(store)
    fanin = FanIn("d1", interest="all")
    upstream = ScriptedUpstream("zk")
    upstream.script.append(Listing(tuple(
        Instance(SERVICE, f"10.0.0.{i}:20880", f"10.0.0.{i}", 20880,
                 source=Source("zk", f"/{SERVICE}/{i}"))
        for i in (1, 2)
    )))  # fmt: skip
    projection = Projection(engine, fanin, "/dubbo", layout_kind("dubbo"), "d1")
    projection.mount()
    governance = MemoryGovernanceStore(MemoryGovernance(), "mesh")
    settings = MeshSettings()
    for application in applications_on:
        settings = settings.with_switch(application, SERVICE, Switch("on", 100))
    await governance.write(settings.to_json(), expected_version=0, who="test", why="on")
    feed = GovernanceFeed(governance)
    views = MeshViews(engine, [projection], feed, parse_mesh({}))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fanin.run, [upstream])
            await nursery.start(feed.run)
            await nursery.start(projection.run)
            await nursery.start(views.run)
            engine.views = views
            await upstream.running()
            await trio.testing.wait_all_tasks_blocked()
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def consumer(engine: Engine, application: str, index: int) -> Session:
    """A Dubbo consumer of ``application`` on 127.0.0.1, registered and reading."""
    session = Session(engine).connect()
    url = (f"consumer://127.0.0.1/{SERVICE}?application={application}&category=consumers"
           f"&interface={SERVICE}&pid={index}&release=2.7.8&side=consumer")  # fmt: skip
    session.create(f"{CONSUMERS}/{encode(url)}", flags=EPHEMERAL)
    return session


TRUE = {"10.0.0.1:20880", "10.0.0.2:20880"}


async def test_a_sidecar_registration_and_its_session_loss_reach_the_views_at_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A consumer switched on whose host has no sidecar yet reads the true providers
    (waiting). The moment the host's proxy registers its sidecar, with no other request in
    between and no time passing (trio's MockClock, never advanced: a periodic look would
    never run), the consumer's child watch has fired and its re-read lists the sidecar
    alone (R = 100); a consumer of an application that is off hears nothing. When the
    proxy's session closes (its registration goes with it), the switched consumer's watch
    fires at once and it reads the true providers again."""
    async with dispatcher(tmp_path, "web") as engine:
        switched, other = consumer(engine, "web", 1), consumer(engine, "billing", 2)
        assert switched.providers() == TRUE and other.providers() == TRUE
        started = trio.current_time()

        proxy = Session(engine).connect()
        for path in ("/zkgate", "/zkgate/sidecars", "/zkgate/sidecars/127.0.0.1"):
            proxy.create(path)
        proxy.create(f"/zkgate/sidecars/127.0.0.1/{SERVICE}", SIDECAR.encode(), EPHEMERAL)

        assert [(e.type, e.path) for e in switched.events] == [
            (EventType.NODE_CHILDREN_CHANGED, PROVIDERS)
        ]
        assert switched.providers() == {SIDECAR}
        assert other.events == [] and other.providers() == TRUE

        assert proxy.call(OpCode.CLOSE_SESSION).err == Err.OK
        assert len(switched.events) == 2 and switched.events[-1].path == PROVIDERS
        assert switched.providers() == TRUE
        assert other.events == []
        assert trio.current_time() == started
