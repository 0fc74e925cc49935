"""Watches of forwarded reads: a ``sync`` through the mirror waits for their events.

For a znode the mirror's own session may not read, a client's read goes
upstream on the write session of its credentials, and so does its watch; the
event comes back on that session. ZooKeeper orders nothing across two
sessions, so these tests put a relay between zkgate and a real ZooKeeper 3.8
that holds back what the ensemble sends on the write sessions, a schedule the
network may produce on its own, and check that a ``sync`` through zkgate is
answered as ZooKeeper answers it: after every event of a change committed
before it.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kazoo.security import make_digest_acl

from dispatcher.zk.codec.protocol import Err, EventType, KeeperState, OpCode
from dispatcher.zk.codec.records import (
    AuthPacket,
    PathRequest,
    PathWatchRequest,
    WatcherEvent,
)
from tests.servers import LOOPBACK, ServerFactory, ZkgateServer, ZooKeeperServer
from tests.test_mirror import TIMEOUT, kazoo, start_mirror
from tests.zkwire import WireClient

#: What the relay holds back per connection before it gives up on the test.
_MAX_HELD = 1 << 20
_FRAME = struct.Struct(">iii")  # length, xid, opcode


class _Leg:
    """One relayed connection; what the upstream sent while held waits here."""

    def __init__(self, down: socket.socket, up: socket.socket, *, write_session: bool) -> None:
        self.down = down
        self.up = up
        self.write_session = write_session
        self.held = bytearray()


class HoldingRelay:
    """A TCP relay on loopback between zkgate and its upstream ZooKeeper.

    Connections accepted after :meth:`write_sessions_from_now` are taken for
    zkgate's write sessions (its own session connected before). While
    :meth:`hold` is in force, what the upstream sends on those is held back,
    in order, until zkgate sends a ``sync`` on one of them: the held events
    then go ahead of that sync's answer, as TCP keeps them. The mirror's own
    session is never held.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._legs: list[_Leg] = []
        self._marking = False
        self._holding = False
        #: ``sync`` requests zkgate sent on write sessions.
        self.write_syncs = 0
        self._closed = False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._legs)

    @property
    def write_sessions(self) -> int:
        with self._lock:
            return sum(leg.write_session for leg in self._legs)

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def write_sessions_from_now(self) -> None:
        with self._lock:
            self._marking = True

    def hold(self) -> None:
        with self._lock:
            self._holding = True

    def release(self) -> None:
        with self._lock:
            self._release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._holding = False
            legs = list(self._legs)
        self._listener.close()
        for leg in legs:
            for sock in (leg.down, leg.up):
                sock.close()

    def _release(self) -> None:
        # Under the lock: what was held goes out before anything received later.
        self._holding = False
        for leg in self._legs:
            if leg.held:
                leg.down.sendall(leg.held)
                leg.held.clear()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed at teardown
            up = socket.create_connection(self.upstream, timeout=TIMEOUT)
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                leg = _Leg(down, up, write_session=self._marking)
                self._legs.append(leg)
            threading.Thread(target=self._downstream, args=(leg,), daemon=True).start()
            threading.Thread(target=self._upstream, args=(leg,), daemon=True).start()

    def _downstream(self, leg: _Leg) -> None:
        """zkgate → ZooKeeper; on a write session, a ``sync`` releases the hold."""
        buffer = bytearray()
        first = True  # the connect request carries no xid and opcode
        try:
            while data := leg.down.recv(65536):
                leg.up.sendall(data)
                if not leg.write_session:
                    continue
                buffer += data
                while len(buffer) >= 4:
                    (length,) = struct.unpack_from(">i", buffer)
                    if len(buffer) < 4 + length:
                        break
                    if not first and length >= 8:
                        _, _, opcode = _FRAME.unpack_from(buffer)
                        if opcode == OpCode.SYNC:
                            with self._lock:
                                self.write_syncs += 1
                                self._release()
                    first = False
                    del buffer[: 4 + length]
        except OSError:
            pass
        finally:
            leg.up.close()

    def _upstream(self, leg: _Leg) -> None:
        """ZooKeeper → zkgate, held back on write sessions while holding."""
        try:
            while data := leg.up.recv(65536):
                with self._lock:
                    if self._holding and leg.write_session:
                        if len(leg.held) + len(data) > _MAX_HELD:
                            raise OSError("the relay held back more than it may")
                        leg.held += data
                        continue
                    leg.down.sendall(data)
        except OSError:
            pass
        finally:
            leg.down.close()


@pytest.fixture
def relay(zookeeper: ZooKeeperServer) -> Iterator[HoldingRelay]:
    relay = HoldingRelay((zookeeper.host, zookeeper.port))
    relay.start()
    yield relay
    relay.close()


@pytest.fixture
def gate(
    zookeeper: ZooKeeperServer, zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path,
    unique_path: str, relay: HoldingRelay,
) -> ZkgateServer:  # fmt: skip
    """zkgate mirroring ``unique_path`` through ``relay``; ``unique_path/secret``
    is alice's alone, so the mirror's own session may not read it."""
    with kazoo(zookeeper.address) as direct:
        direct.create(unique_path)
        direct.create(
            f"{unique_path}/secret", b"s3cret", acl=[make_digest_acl("alice", "pw", all=True)]
        )
    gate = start_mirror(zkgate_factory, tmp_path, unique_path, relay.address)
    with _client(gate) as anonymous:
        # Answered from the mirror's own session: connected through the relay.
        reply = anonymous.call(OpCode.EXISTS, PathWatchRequest(unique_path, False))
        assert reply.header.err == Err.OK
    assert relay.connections == 1
    relay.write_sessions_from_now()
    return gate


@contextmanager
def _client(gate: ZkgateServer, auth: bytes | None = None) -> Iterator[WireClient]:
    with WireClient(gate.host, gate.port, timeout=TIMEOUT) as client:
        client.connect()
        if auth is not None:
            reply = client.call(OpCode.AUTH, AuthPacket(0, "digest", auth))
            assert reply.header.err == Err.OK
        yield client


def _watch_secret(client: WireClient, path: str) -> None:
    reply = client.call(OpCode.GET_DATA, PathWatchRequest(path, True))
    assert reply.header.err == Err.OK
    assert reply.body.startswith(struct.pack(">i", len(b"s3cret")) + b"s3cret")


def test_a_sync_answers_after_the_event_of_a_forwarded_watch(
    gate: ZkgateServer, relay: HoldingRelay, zookeeper: ZooKeeperServer, unique_path: str,
) -> None:  # fmt: skip
    secret = f"{unique_path}/secret"
    with _client(gate, b"alice:pw") as alice:
        _watch_secret(alice, secret)
        assert relay.write_sessions == 1  # the read (and its watch) went upstream as alice
        relay.hold()
        with kazoo(zookeeper.address, auth_data=[("digest", "alice:pw")]) as direct:
            direct.set(secret, b"changed")
        # ZooKeeper committed the change before answering it: a sync begun
        # now is answered after its event, whichever session carries it.
        reply = alice.call(OpCode.SYNC, PathRequest(unique_path))
        assert reply.header.err == Err.OK
        assert [event for _, event in reply.events] == [
            WatcherEvent(EventType.NODE_DATA_CHANGED, KeeperState.SYNC_CONNECTED, secret)
        ]
        assert relay.write_syncs == 1


def test_a_sync_without_forwarded_watches_does_not_wait_on_write_sessions(
    gate: ZkgateServer, relay: HoldingRelay, zookeeper: ZooKeeperServer, unique_path: str,
) -> None:  # fmt: skip
    secret = f"{unique_path}/secret"
    with _client(gate, b"alice:pw") as alice, _client(gate) as anonymous:
        _watch_secret(alice, secret)
        relay.hold()
        with kazoo(zookeeper.address, auth_data=[("digest", "alice:pw")]) as direct:
            direct.set(secret, b"changed")
        # alice's write session is held; a client with no forwarded watch is
        # answered on the mirror's own session alone, without a round trip there.
        reply = anonymous.call(OpCode.SYNC, PathRequest(unique_path))
        assert (reply.header.err, reply.events) == (Err.OK, ())
        assert relay.write_syncs == 0
        # alice is still owed the event, and gets it before her own sync's answer.
        reply = alice.call(OpCode.SYNC, PathRequest(unique_path))
        assert [event.path for _, event in reply.events] == [secret]
        assert relay.write_syncs == 1
