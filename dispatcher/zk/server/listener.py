"""The trio server around the sans-I/O codec and the synchronous engine.

A connection with work is one task, its reader, which turns bytes into engine
calls and writes the engine's output for that connection (replies and watch
events alike) straight to the socket, once per batch of requests; output
produced by other tasks (a watch another session fired, a deferred answer) is
written at once too. Only while the socket does not take everything does a
second task, a writer, run beside the reader to flush the rest. A connection
with nothing to read, write or wait for has no task at all: it is parked in
:class:`~dispatcher.zk.server.idle.IdleConnections` until its socket is
readable, or until the server must write to it or close it. Queues are bounded: a reader
stops reading while its connection's unsent output is above a high-water mark
(so one connection's outstanding requests are bounded), and a connection whose
unsent output passes a hard cap (a watcher that never reads) is closed.

A TLS connection (the secure port) is the same reader on the same socket: after
the handshake, :class:`TlsPeer` decrypts what it reads and encrypts what it
writes in memory, without waiting, so framing, output bounds, batching and
closing are the plain-text path's own. The per-address connection limit is
applied as a connection is accepted, before any handshake work.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import os
import select
import ssl
import sys
from collections.abc import Mapping

import attrs
import trio

from dispatcher.containment import InternalErrors
from dispatcher.tls import (
    ServerTls,
    TlsSession,
    looks_like_tls,
    refuse_tls_on_plain_port,
    x509_subject,
)
from dispatcher.zk.codec.connection import (
    ConnectRequested,
    FourLetterReply,
    FourLetterWord,
    ProtocolError,
    RequestReceived,
    ServerConnection,
    State,
)
from dispatcher.zk.codec.jute import DecodeError
from dispatcher.zk.codec.protocol import DEFAULT_MAX_BUFFER, Err
from dispatcher.zk.codec.records import Id
from dispatcher.zk.server.durability import GroupCommit
from dispatcher.zk.server.engine import Client, Engine
from dispatcher.zk.server.fourletter import answer
from dispatcher.zk.server.idle import IdleConnections
from dispatcher.zk.server.pending import Pending

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536
#: Plaintext encrypted per write on a TLS connection: what is encrypted but not
#: yet taken by the socket is held apart from the output budget, so it is kept
#: this small (the rest waits, counted, as plain text).
_TLS_WRITE_CHUNK = 262144
_CONNECTED = State.CONNECTED


@attrs.frozen
class ServerLimits:
    max_buffer: int = DEFAULT_MAX_BUFFER
    #: Stop reading a connection's requests while this much output is unsent.
    output_high_water: int = 4 * 1024 * 1024
    #: Close a connection whose unsent output grows past this.
    output_hard_cap: int = 64 * 1024 * 1024
    #: How long a closing connection may take to take its last bytes.
    close_flush_timeout: float = 5.0
    #: Seconds a connection waits for its next request with a task of its own
    #: before it is parked without one (see dispatcher/zk/server/idle.py).
    park_after: float = 0.1
    #: Connections allowed from one client IP, as ZooKeeper's maxClientCnxns (0: no limit).
    max_client_cnxns: int = 60
    #: Unsent output across all connections above which every connection stops
    #: being read until writers catch up: ZooKeeper's global throttle, counted
    #: in bytes because zkgate answers each request as soon as it is read.
    global_output_limit: int = 512 * 1024 * 1024


class OutputBudget:
    """Unsent bytes across every connection, and a gate readers wait on when over."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.unsent = 0
        self._below = trio.Event()
        self._below.set()

    def add(self, count: int) -> None:
        self.unsent += count
        if self.unsent > self.limit and self._below.is_set():
            self._below = trio.Event()

    def release(self, count: int) -> None:
        self.unsent -= count
        if self.unsent <= self.limit:
            self._below.set()

    @property
    def exhausted(self) -> bool:
        return not self._below.is_set()

    async def wait(self) -> None:
        await self._below.wait()


@attrs.frozen(eq=False)
class Shared:
    """What every connection of one server refers to, held once."""

    limits: ServerLimits
    budget: OutputBudget
    idle: IdleConnections[StreamPeer]


@attrs.define
class _Address:
    """The connections from one client address, and the identity they share."""

    auth: tuple[Id, ...]
    connections: int = 0


class StreamPeer:
    """One socket as the engine sees it: a bounded output queue and a close.

    Output is written straight to the socket by whichever task produced it;
    only what the socket does not take at once is queued (``_out``), and a
    writer task runs beside the connection's reader only while such a backlog
    exists. An idle connection has no task: it is parked until its socket is
    readable, so it costs this object, its codec and its session, which is
    what lets a server hold tens of thousands of sessions.

    It owns its file descriptor (the accepting task's socket object is
    detached from it, as the connection outlives that task) and carries the
    reader's state (``conn``, ``client``, ``pending``), so that the reader can
    be interrupted, to start or stop the writer task, to close, or to park,
    without losing its place.
    """

    __slots__ = (
        "_close_deadline",
        "_drained",
        "_out",
        "_port",
        "_scope",
        "auth",
        "client",
        "closing",
        "conn",
        "fd",
        "fresh",
        "in_batch",
        "pending",
        "remote_ip",
        "shared",
        "writing",
    )

    def __init__(
        self,
        fd: int,
        ip: str,
        port: int,
        shared: Shared,
        auth: tuple[Id, ...],
    ) -> None:
        self.shared = shared
        #: One string per client address, however many connections it has.
        self.remote_ip = ip
        self._port = port
        self.fd = fd
        self.conn = ServerConnection(shared.limits.max_buffer)
        #: Output the socket has not taken yet; None (not an empty buffer) when
        #: there is none, which is nearly always.
        self._out: bytearray | None = None
        #: True while this connection's own reader is answering a batch of
        #: requests: its replies are then sent once, at the end of the batch.
        self.in_batch = False
        #: True while a writer task is flushing the backlog.
        self.writing = False
        self.closing = False
        self._close_deadline = 0.0
        #: Set (and dropped) when the backlog falls to the high-water mark;
        #: created only when the reader waits for that.
        self._drained: trio.Event | None = None
        #: The reader's current cancel scope: cancelled to close, or to have
        #: the reader start a writer task; None while the connection is parked.
        self._scope: trio.CancelScope | None = None
        self.client: Client | None = None
        self.pending: Pending | None = None
        #: The identities the session starts with: its address's ``ip`` id
        #: (shared by every connection from that address), and any the
        #: transport proved (an ``x509`` id from a verified client certificate).
        self.auth = auth
        #: True until the first bytes arrive (checked for a TLS handshake on
        #: the plain-text port).
        self.fresh = True

    @property
    def remote(self) -> str:
        return f"/{self.remote_ip}:{self._port}"

    def receive(self) -> bytes | None:
        """What the client sent: b"" at its end (or reset), None if nothing yet.

        A method of its own because an exception raised in the reader's frame
        would give that frame a frame object, kept for the connection's life.
        """
        try:
            return os.read(self.fd, _RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError:  # reset by the peer: as good as the end of the stream
            return b""

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        out = self._out
        if not out and not self.in_batch:
            # Output for a connection that is not answering its own batch: a
            # watch event, or a deferred answer. Nothing is queued before it,
            # so it goes out at once: firing a watch for a thousand
            # connections costs a thousand writes, not a thousand task switches.
            sent = self._write(data)
            if sent == len(data) or self.closing:
                return
            self._out = out = bytearray(memoryview(data)[sent:])
            self.shared.budget.add(len(out))
            if not self.writing:
                self._wake_reader()
        else:
            if out is None:
                self._out = out = bytearray()
            out += data
            self.shared.budget.add(len(data))
        if len(out) > self.shared.limits.output_hard_cap:
            log.warning(
                "closing a connection that is not reading",
                extra={"peer": self.remote, "unsent": len(out)},
            )
            self._discard_output()
            self.close()

    def end_batch(self) -> None:
        """The reader answered a batch: send it now, unless a writer task is
        at work (it takes it next, in order); what the socket does not take
        stays queued, and the reader starts a writer task for it."""
        self.in_batch = False
        out = self._out
        if out and not self.writing and not self.closing:
            sent = self._write(out)
            if sent:
                del out[:sent]
                self.shared.budget.release(sent)
            if not out and self._out is out:
                self._out = None

    def _write(self, data: bytes | bytearray) -> int:
        """Write what the socket takes now, without waiting; a broken socket
        closes the connection. Returns how much of ``data`` was taken."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self._discard_output()
            self.close()
            return 0

    def _wake_reader(self) -> None:
        """Interrupt the reader, or give a parked connection a task again."""
        if self._scope is not None:
            self._scope.cancel()
        else:
            self.shared.idle.wake(self.fd)

    def _discard_output(self) -> None:
        if self._out:
            self.shared.budget.release(len(self._out))
        self._out = None
        self._set_drained()

    def _set_drained(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def close(self) -> None:
        if not self.closing:
            # A client that stopped reading could hold the last output back
            # forever: it gets close_flush_timeout to take it.
            self._close_deadline = trio.current_time() + self.shared.limits.close_flush_timeout
        self.closing = True
        self._wake_reader()

    @property
    def unsent(self) -> bool:
        """Whether output waits for the socket (a writer task then flushes it)."""
        return bool(self._out)

    @property
    def backlogged(self) -> bool:
        return self._out is not None and len(self._out) > self.shared.limits.output_high_water

    async def wait_drained(self) -> None:
        if self._drained is None:
            self._drained = trio.Event()
        await self._drained.wait()

    def reader_scope(self) -> trio.CancelScope:
        """A fresh cancel scope for the reader, cancelled by :meth:`close`
        and when output is left for a writer task to flush."""
        scope = self._scope = trio.CancelScope()
        return scope

    async def write_backlog(self) -> None:
        """The writer task: flush the backlog, then have the reader carry on
        alone (cancelling its scope ends the nursery the two share)."""
        try:
            await self.flush()
        finally:
            self.writing = False
        self._wake_reader()

    async def flush(self) -> None:
        """Write the queued output as the socket takes it, until none is left
        or the socket breaks."""
        while self.unsent:
            await trio.lowlevel.wait_writable(self.fd)
            out = self._out
            if not out:
                self._write(b"")  # what a TLS connection encrypted already
                continue
            sent = self._write(out)
            if sent:
                del out[:sent]
                self.shared.budget.release(sent)
                if len(out) <= self.shared.limits.output_high_water:
                    self._set_drained()
        self._out = None

    async def flush_before_close(self) -> None:
        """The last output of a closed connection, within close_flush_timeout."""
        with trio.CancelScope(deadline=self._close_deadline):
            await self.flush()
            self._end()
            await self.flush()
        self._discard_output()

    def _end(self) -> None:
        """Say goodbye on the transport, if it has a way to (TLS: close_notify)."""

    def park(self) -> None:
        """Leave the connection without a task until it has work again."""
        self._scope = None
        self.shared.idle.park(self.fd, self)

    def close_descriptor(self) -> None:
        """Close the socket: the connection's last step, whichever task takes it."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


class TlsPeer(StreamPeer):
    """A TLS connection as the engine sees it: :class:`StreamPeer` on the same
    socket, decrypting what it reads and encrypting what it writes in memory.

    Ciphertext the socket did not take yet (``_cipher``) is flushed before any
    more plain text is encrypted, so the output's order is kept and at most
    one chunk of it is held encrypted; the rest stays in the plain-text queue,
    under the same bounds as on the plain-text port.
    """

    __slots__ = ("_cipher", "_incoming", "_outgoing", "_tls")

    def __init__(
        self,
        fd: int,
        ip: str,
        port: int,
        shared: Shared,
        auth: tuple[Id, ...],
        session: TlsSession,
    ) -> None:
        super().__init__(fd, ip, port, shared, auth)
        self.fresh = False
        self._tls = session.tls
        self._incoming = session.incoming
        self._outgoing = session.outgoing
        #: Encrypted output the socket has not taken yet.
        self._cipher = b""

    @property
    def unsent(self) -> bool:
        return bool(self._out) or bool(self._cipher)

    def receive(self) -> bytes | None:
        tls = self._tls
        while True:
            try:
                data = tls.read(_RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # the client's close_notify
                return b""
            except ssl.SSLError as exc:
                log.warning(
                    "closing a TLS connection that sent a bad record",
                    extra={"peer": self.remote, "reason": exc.reason or str(exc)},
                )
                return b""
            else:
                if self._outgoing.pending:
                    # A post-handshake message (a TLS 1.3 key update) wants an answer.
                    self._encrypted(self._outgoing.read())
                return data
            try:
                raw = os.read(self.fd, _RECEIVE_SIZE)
            except BlockingIOError:
                return None
            except OSError:
                return b""
            if not raw:
                return b""
            self._incoming.write(raw)

    def send(self, data: bytes) -> None:
        super().send(data)
        if self._cipher and not self.writing and not self.closing:
            self._wake_reader()

    def _write(self, data: bytes | bytearray) -> int:
        if self._cipher and not self._send_cipher():
            return 0
        if not data:
            return 0
        try:
            taken = self._tls.write(memoryview(data)[:_TLS_WRITE_CHUNK])
        except ssl.SSLError:
            self._discard_output()
            self.close()
            return 0
        self._encrypted(self._outgoing.read())
        # Taken even if its ciphertext waits: that is flushed before anything else.
        return 0 if self.closing else taken

    def _encrypted(self, cipher: bytes) -> None:
        self._cipher += cipher
        self._send_cipher()

    def _send_cipher(self) -> bool:
        """Write the pending ciphertext the socket takes now; whether all went."""
        cipher = self._cipher
        try:
            sent = os.write(self.fd, cipher)
        except BlockingIOError:
            return False
        except OSError:
            self._discard_output()
            self.close()
            return False
        self._cipher = cipher[sent:]
        return not self._cipher

    def _discard_output(self) -> None:
        self._cipher = b""
        super()._discard_output()

    def _end(self) -> None:
        if self._cipher or self._out:
            return  # the client did not take the rest: it gets no close_notify
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._tls.unwrap()
        if self._outgoing.pending:
            self._encrypted(self._outgoing.read())


class ZooKeeperServer:
    """Serves one :class:`Engine` over TCP."""

    def __init__(
        self,
        engine: Engine,
        limits: ServerLimits | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.settings = dict(settings or {})
        self.budget = OutputBudget(self.limits.global_output_limit)
        self.internal_errors = InternalErrors("zookeeper")
        self._addresses: dict[str, _Address] = {}
        self.idle: IdleConnections[StreamPeer] = IdleConnections(self._serve_peer, self._end)
        self._shared = Shared(self.limits, self.budget, self.idle)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        plain: bool = True,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the engine's background work and, unless ``plain`` is False (a
        TLS-only face, see :meth:`serve_secure`), serve plain text on
        ``host:port``; ``started(bound port)`` (0 without the plain port)."""
        listeners = await trio.open_tcp_listeners(port, host=host) if plain else []
        bound = listeners[0].socket.getsockname()[1] if listeners else 0
        if listeners:
            self.settings.setdefault("clientPort", bound)
            log.info("serving the ZooKeeper protocol", extra={"listen": f"{host}:{bound}"})
        engine = self.engine
        engine.durability = GroupCommit(functools.partial(engine.store.prepare_commit, engine.tree))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.durability.run)
                nursery.start_soon(self._expire_sessions)
                nursery.start_soon(self._reap_containers)
                if hasattr(select, "epoll"):
                    await nursery.start(self.idle.run)
                task_status.started(bound)
                if listeners:
                    await trio.serve_listeners(self._serve_connection, listeners)
                else:
                    await trio.sleep_forever()
        finally:
            # Writes not yet durable were never acknowledged; whoever uses the
            # engine after this server commits each write alone again.
            engine.durability = None

    async def serve_secure(
        self,
        host: str,
        port: int,
        tls: ServerTls,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve TLS connections on ``host:port`` (ZooKeeper's ``secureClientPort``)
        until cancelled, beside a running :meth:`serve`; ``started(bound port)``."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.settings.setdefault("secureClientPort", bound)
        log.info(
            "serving the ZooKeeper protocol over TLS",
            extra={"listen": f"{host}:{bound}", "verify_client": tls.config.verify_client},
        )
        task_status.started(bound)
        await trio.serve_listeners(functools.partial(self._serve_tls_connection, tls), listeners)

    async def _serve_tls_connection(self, tls: ServerTls, stream: trio.SocketStream) -> None:
        """Admit (the per-address limit costs a refused client no handshake),
        handshake, then serve the connection as the plain-text port does."""
        sock = stream.socket
        try:
            host, port, *_ = sock.getpeername()
        except OSError:
            return  # the client left before we could ask who it was
        ip = sys.intern(host)
        remote = f"/{host}:{port}"
        address_auth = self._admit(ip, remote)
        if address_auth is None:
            return
        identities: tuple[Id, ...] | None = None
        try:
            session = await tls.handshake(sock, remote)
            if session is not None:
                identities = _certificate_identities(session, tls, remote)
        finally:
            if identities is None:
                self._release(ip)
        if session is None or identities is None:
            return
        auth = (*address_auth, *identities) if identities else address_auth
        # The connection owns its descriptor from here; the stream closes nothing.
        peer = TlsPeer(sock.detach(), ip, port, self._shared, auth, session)
        await self._serve_peer(peer)

    def _admit(self, ip: str, remote: str) -> tuple[Id, ...] | None:
        """Count a new connection from ``ip`` and give the identity its session
        starts with, or refuse it (logged, None) at the limit; an admitted one
        is given back with :meth:`_release`."""
        address = self._addresses.get(ip)
        if address is None:
            address = self._addresses[ip] = _Address((Id("ip", ip),))
        limit = self.limits.max_client_cnxns
        if limit and address.connections >= limit:
            log.warning(
                "too many connections from one address", extra={"peer": remote, "max": limit}
            )
            return None
        address.connections += 1
        return address.auth

    def _release(self, ip: str) -> None:
        address = self._addresses[ip]
        address.connections -= 1
        if not address.connections:
            del self._addresses[ip]

    async def _expire_sessions(self) -> None:
        # Expiry runs on ZooKeeper's tick; a session lapses between its timeout
        # and its timeout plus half a tick, as with ZooKeeper's buckets.
        interval = max(self.engine.config.tick_ms / 2000, 0.01)
        while True:
            await trio.sleep(interval)
            self.engine.expire_sessions()

    async def _reap_containers(self) -> None:
        interval = self.engine.config.container_check_ms / 1000
        while True:
            await trio.sleep(interval)
            reaped = self.engine.reap_containers()
            if reaped:
                log.info("reaped empty containers and expired TTL nodes", extra={"reaped": reaped})

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        sock = stream.socket
        try:
            host, port, *_ = sock.getpeername()
        except OSError:
            return  # the client left before we could ask who it was
        ip = sys.intern(host)
        auth = self._admit(ip, f"/{host}:{port}")
        if auth is None:
            return
        # The connection owns its descriptor from here: it outlives this task
        # when it goes idle, and the stream closes nothing.
        await self._serve_peer(StreamPeer(sock.detach(), ip, port, self._shared, auth))

    async def _serve_peer(self, peer: StreamPeer) -> None:
        """Read, answer and write one admitted connection until it ends, or
        until it is idle: it is then parked, and this runs again, in a new
        task, when it has work."""
        conn = peer.conn
        parked = False
        try:
            try:
                while not peer.closing:
                    # One task while all output has gone out; a writer task
                    # beside the reader while some waits for the socket. Each
                    # switch cancels the scope, so the reader resumes from the
                    # state it keeps on the peer.
                    idle = False
                    with peer.reader_scope():
                        if peer.unsent and not peer.writing:
                            async with trio.open_nursery() as nursery:
                                peer.writing = True
                                nursery.start_soon(peer.write_backlog)
                                idle = await self._read_loop(conn, peer)
                        else:
                            idle = await self._read_loop(conn, peer)
                    if idle and not peer.closing and not peer.unsent and self.idle.running:
                        peer.park()
                        parked = True
                        return
            finally:
                if not parked:
                    self._disconnect(peer)
            await peer.flush_before_close()
        except Exception as exc:
            # What _answer_batch did not catch (the connection's own bookkeeping).
            self.internal_errors.record(exc, peer=peer.remote)
        finally:
            if not parked:
                self._forget(peer)

    def _disconnect(self, peer: StreamPeer) -> None:
        """Detach the connection from its session and start closing it."""
        if peer.client is not None:
            self.engine.disconnect(peer.client)
        peer.close()

    def _forget(self, peer: StreamPeer) -> None:
        """The connection's last step: give back its address's slot and its socket."""
        peer.closing = True
        self._release(peer.remote_ip)
        peer.close_descriptor()

    def _end(self, peer: StreamPeer) -> None:
        """End a parked connection when the server stops (no last output)."""
        self._disconnect(peer)
        self._forget(peer)

    async def _read_loop(self, conn: ServerConnection, peer: StreamPeer) -> bool:
        """Read and answer requests until the connection ends, or (with no
        writer task running) until output is left unsent: the caller then
        starts a writer task and calls again. True when it stopped because the
        connection is idle (nothing to read, write or wait for): the caller
        then parks it."""
        fd = peer.fd
        receive = peer.receive
        budget = self.budget
        idle = self.idle
        waited = True
        while not peer.closing:
            pending = peer.pending
            if pending is not None:
                # A mounted subtree answers later: this connection's next
                # request waits for it, the other connections do not.
                await pending.wait()
                peer.pending = None
                self._answer(conn, peer)
                continue
            if peer.unsent:
                if not peer.writing:
                    return False
                if peer.backlogged:
                    await peer.wait_drained()
                    continue
            if budget.exhausted:
                await budget.wait()
                continue
            gate = self.engine.durability
            if gate is not None and gate.held_bytes > self.limits.output_high_water:
                # Output held for a commit in progress is unsent output too:
                # clients that pipeline faster than the disk wait for it.
                await gate.wait_durable()
                continue
            data = receive()
            if data is None:
                if not peer.writing and idle.running:
                    # Parked only once quiet for a moment: parking and resuming
                    # cost more than a wait, and a client that is between two
                    # requests is not idle.
                    with trio.move_on_after(self.limits.park_after) as quiet:
                        await trio.lowlevel.wait_readable(fd)
                    if quiet.cancelled_caught:
                        return True
                else:
                    await trio.lowlevel.wait_readable(fd)
                waited = True
                continue
            if not data:
                peer.close()
                return False
            if peer.fresh:
                peer.fresh = False
                if looks_like_tls(data):
                    refuse_tls_on_plain_port("zookeeper", peer.remote)
                    peer.close()
                    return False
            if not waited:
                # A read that did not wait is still a schedule point, as
                # trio's own streams make it, or a client that never pauses
                # would starve the others. Shielded: the bytes are read.
                await trio.lowlevel.cancel_shielded_checkpoint()
            waited = False
            conn.receive_data(data)
            self._answer(conn, peer)
        return False

    def _answer(self, conn: ServerConnection, peer: StreamPeer) -> None:
        """Answer what is buffered, as one batch of output."""
        peer.in_batch = True
        try:
            peer.client, peer.pending = self._answer_batch(conn, peer, peer.client)
        finally:
            peer.end_batch()

    def _answer_batch(
        self, conn: ServerConnection, peer: StreamPeer, client: Client | None
    ) -> tuple[Client | None, Pending | None]:
        """Answer complete requests received so far, in order, until one is
        deferred (returned, with the rest left buffered)."""
        engine = self.engine
        handle = engine.handle
        while not peer.closing:
            # The xid of the request being answered, for its SYSTEMERROR.
            xid: int | None = None
            try:
                if client is not None and conn.state is _CONNECTED:
                    # In a session every frame is a request: taken as a tuple,
                    # not an event object, as this runs once per request.
                    request = conn.next_request()
                    if request is None:
                        break
                    if client.closed:
                        peer.close()
                        break
                    xid, opcode, body = request
                    pending = handle(client, xid, opcode, body)
                    if pending is not None and not pending.finished:
                        return client, pending
                    continue
                event = conn.next_event()
                if event is None:
                    break
                if isinstance(event, RequestReceived):
                    if client is None or client.closed:
                        peer.close()
                        break
                    xid = event.xid
                    pending = handle(client, xid, event.opcode, event.body)
                    if pending is not None and not pending.finished:
                        return client, pending
                elif isinstance(event, ConnectRequested):
                    client = engine.connect(peer, conn, event.request, peer.auth)
                elif isinstance(event, FourLetterWord):
                    peer.send(conn.send(FourLetterReply(answer(engine, event.word, self.settings))))
                    peer.close()
            except (ProtocolError, DecodeError) as exc:
                log.warning(
                    "closing a connection that broke the protocol",
                    extra={"peer": peer.remote, "reason": str(exc)},
                )
                if client is not None:
                    # At once, not when the reader task ends: until then other
                    # sessions' writes would fire watches into a codec that now
                    # refuses every event.
                    engine.disconnect(client)
                peer.close()
            except Exception as exc:
                # A bug met by one request: that request gets SYSTEMERROR, as
                # ZooKeeper answers an unexpected failure, and its connection
                # closes; the other connections and the process go on.
                self.internal_errors.record(exc, peer=peer.remote)
                if xid is not None and client is not None:
                    with contextlib.suppress(Exception):  # recorded above already
                        engine.reply(client, xid, Err.SYSTEMERROR)
                peer.close()
        return client, None


def _certificate_identities(
    session: TlsSession, tls: ServerTls, remote: str
) -> tuple[Id, ...] | None:
    """What a verified client certificate proves, as ZooKeeper's
    ``X509AuthenticationProvider`` has it: ``x509:<subject>``, after
    ``super:<subject>`` for the configured superuser; () without a certificate;
    None (logged) for a certificate whose subject cannot be read."""
    der = session.tls.getpeercert(binary_form=True)
    if not der:
        return ()
    try:
        subject = x509_subject(der)
    except (IndexError, ValueError) as exc:
        log.warning(
            "cannot read the client certificate's subject; closing",
            extra={"peer": remote, "reason": str(exc)},
        )
        return None
    superuser = tls.config.x509_superuser
    if superuser is not None and hmac.compare_digest(
        subject.encode("utf-8"), superuser.encode("utf-8")
    ):
        log.info("authenticated the x509 superuser", extra={"peer": remote, "subject": subject})
        return (Id("super", subject), Id("x509", subject))
    return (Id("x509", subject),)


__all__ = ["ServerLimits", "StreamPeer", "TlsPeer", "ZooKeeperServer"]
