"""The trio server around the sans-I/O codec and the synchronous engine.

Each connection is one task, its reader, which turns bytes into engine calls
and writes the engine's output for that connection (replies and watch events
alike) straight to the socket, once per batch of requests; output produced by
other tasks (a watch another session fired, a deferred answer) is written at
once too. Only while the socket does not take everything does a second task,
a writer, run beside the reader to flush the rest. Queues are bounded: a reader
stops reading while its connection's unsent output is above a high-water mark
(so one connection's outstanding requests are bounded), and a connection whose
unsent output passes a hard cap (a watcher that never reads) is closed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
from collections.abc import Mapping

import attrs
import trio

from dispatcher.containment import InternalErrors
from dispatcher.tls import ServerTls, looks_like_tls, refuse_tls_on_plain_port, x509_subject
from dispatcher.zk.codec.connection import (
    ConnectRequested,
    FourLetterReply,
    FourLetterWord,
    ProtocolError,
    RequestReceived,
    ServerConnection,
)
from dispatcher.zk.codec.jute import DecodeError
from dispatcher.zk.codec.protocol import DEFAULT_MAX_BUFFER, Err
from dispatcher.zk.codec.records import Id
from dispatcher.zk.server.durability import GroupCommit
from dispatcher.zk.server.engine import Client, Engine
from dispatcher.zk.server.fourletter import answer
from dispatcher.zk.server.pending import Pending

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536


def _read_some(fd: int) -> bytes | None:
    """What the socket has: b"" at its end (or reset), None if nothing yet.

    A function of its own because an exception raised in the reader's frame
    would give that frame a frame object, kept for the connection's life.
    """
    try:
        return os.read(fd, _RECEIVE_SIZE)
    except BlockingIOError:
        return None
    except OSError:  # reset by the peer: as good as the end of the stream
        return b""


@attrs.frozen
class ServerLimits:
    max_buffer: int = DEFAULT_MAX_BUFFER
    #: Stop reading a connection's requests while this much output is unsent.
    output_high_water: int = 4 * 1024 * 1024
    #: Close a connection whose unsent output grows past this.
    output_hard_cap: int = 64 * 1024 * 1024
    #: How long a closing connection may take to take its last bytes.
    close_flush_timeout: float = 5.0
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


class StreamPeer:
    """One socket as the engine sees it: a bounded output queue and a close.

    Output is written straight to the socket by whichever task produced it;
    only what the socket does not take at once is queued (``_out``), and a
    writer task runs beside the connection's reader only while such a backlog
    exists. An idle connection is thus one task waiting for its socket to be
    readable and a few small objects, which is what lets a server hold tens of
    thousands of sessions.

    It also carries the reader's state (``client``, ``pending``) so that the
    reader can be interrupted, to start or stop the writer task, or to close,
    without losing its place.
    """

    __slots__ = (
        "_close_deadline",
        "_drained",
        "_out",
        "_port",
        "_scope",
        "budget",
        "client",
        "closing",
        "fd",
        "fresh",
        "identities",
        "in_batch",
        "limits",
        "pending",
        "remote_ip",
        "writing",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        limits: ServerLimits,
        budget: OutputBudget,
        address: tuple[str, int] | None = None,
        identities: tuple[Id, ...] = (),
    ) -> None:
        self.limits = limits
        self.budget = budget
        # A TLS connection reaches the reader through a local socket pair:
        # its client's address is given, not asked of the socket.
        host, port, *_ = address or stream.socket.getpeername()
        # One string per client address, however many connections it has.
        self.remote_ip: str = sys.intern(host)
        self._port: int = port
        self.fd: int = stream.socket.fileno()
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
        #: the reader start a writer task.
        self._scope: trio.CancelScope | None = None
        self.client: Client | None = None
        self.pending: Pending | None = None
        #: Identities the transport proved (an ``x509`` id from a verified
        #: client certificate), added to the session's auth on connect.
        self.identities = identities
        #: True until the first bytes arrive (checked for a TLS handshake on
        #: the plain-text port).
        self.fresh = address is None

    @property
    def remote(self) -> str:
        return f"/{self.remote_ip}:{self._port}"

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
            self.budget.add(len(out))
            if not self.writing:
                self._wake_reader()
        else:
            if out is None:
                self._out = out = bytearray()
            out += data
            self.budget.add(len(data))
        if len(out) > self.limits.output_hard_cap:
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
                self.budget.release(sent)
            if not out and self._out is out:
                self._out = None

    def _write(self, data: bytes | bytearray) -> int:
        """Write what the socket takes now, without waiting; a broken socket
        closes the connection."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self._discard_output()
            self.close()
            return 0

    def _wake_reader(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _discard_output(self) -> None:
        if self._out:
            self.budget.release(len(self._out))
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
            self._close_deadline = trio.current_time() + self.limits.close_flush_timeout
        self.closing = True
        self._wake_reader()

    @property
    def unsent(self) -> bool:
        return bool(self._out)

    @property
    def backlogged(self) -> bool:
        return self._out is not None and len(self._out) > self.limits.output_high_water

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
        while self._out:
            await trio.lowlevel.wait_writable(self.fd)
            out = self._out
            if not out:
                break
            sent = self._write(out)
            if sent:
                del out[:sent]
                self.budget.release(sent)
                if len(out) <= self.limits.output_high_water:
                    self._set_drained()
        self._out = None

    async def flush_before_close(self) -> None:
        """The last output of a closed connection, within close_flush_timeout."""
        with trio.CancelScope(deadline=self._close_deadline):
            await self.flush()
        self._discard_output()


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
        self._connections_by_ip: dict[str, int] = {}

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
        """Handshake, then serve the decrypted bytes through a socket pair, so the
        reader and its bounds are the plain-text port's own."""
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        secure = await tls.accept(stream, f"/{host}:{port}")
        if secure is None:
            return
        identities: tuple[Id, ...] = ()
        der = secure.getpeercert(binary_form=True)
        if der:
            try:
                identities = (Id("x509", x509_subject(der)),)
            except (IndexError, ValueError) as exc:
                log.warning(
                    "cannot read the client certificate's subject; closing",
                    extra={"peer": f"/{host}:{port}", "reason": str(exc)},
                )
                await trio.aclose_forcefully(secure)
                return
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        outer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(outer))
        inner_stream = trio.SocketStream(trio.socket.from_stdlib_socket(inner))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_in, secure, outer_stream)
            nursery.start_soon(_pump_out, outer_stream, secure, nursery.cancel_scope)
            await self._serve_connection(inner_stream, (host, port), identities)

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

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        address: tuple[str, int] | None = None,
        identities: tuple[Id, ...] = (),
    ) -> None:
        try:
            peer = StreamPeer(stream, self.limits, self.budget, address, identities)
        except OSError:
            return  # the client left before we could ask who it was
        ip = peer.remote_ip
        limit = self.limits.max_client_cnxns
        if limit and self._connections_by_ip.get(ip, 0) >= limit:
            log.warning(
                "too many connections from one address", extra={"peer": peer.remote, "max": limit}
            )
            await stream.aclose()
            return
        self._connections_by_ip[ip] = self._connections_by_ip.get(ip, 0) + 1
        conn = ServerConnection(self.limits.max_buffer)
        try:
            try:
                while not peer.closing:
                    # One task while all output has gone out; a writer task
                    # beside the reader while some waits for the socket. Each
                    # switch cancels the scope, so the reader resumes from the
                    # state it keeps on the peer.
                    with peer.reader_scope():
                        if peer.unsent and not peer.writing:
                            async with trio.open_nursery() as nursery:
                                peer.writing = True
                                nursery.start_soon(peer.write_backlog)
                                await self._read_loop(conn, peer)
                        else:
                            await self._read_loop(conn, peer)
            finally:
                if peer.client is not None:
                    self.engine.disconnect(peer.client)
                peer.close()
            await peer.flush_before_close()
        except Exception as exc:
            # What _answer_batch did not catch (the connection's own bookkeeping).
            self.internal_errors.record(exc, peer=peer.remote)
        finally:
            peer.closing = True
            remaining = self._connections_by_ip[ip] - 1
            if remaining:
                self._connections_by_ip[ip] = remaining
            else:
                del self._connections_by_ip[ip]
            # Closed here, synchronously, so that no write can reach the fd
            # after it is closed (and perhaps reused) even if we are cancelled.
            stream.socket.close()

    async def _read_loop(self, conn: ServerConnection, peer: StreamPeer) -> None:
        """Read and answer requests until the connection ends, or (with no
        writer task running) until output is left unsent: the caller then
        starts a writer task and calls again."""
        fd = peer.fd
        budget = self.budget
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
                    return
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
            data = _read_some(fd)
            if data is None:
                await trio.lowlevel.wait_readable(fd)
                waited = True
                continue
            if not data:
                peer.close()
                return
            if peer.fresh:
                peer.fresh = False
                if looks_like_tls(data):
                    refuse_tls_on_plain_port("zookeeper", peer.remote)
                    peer.close()
                    return
            if not waited:
                # A read that did not wait is still a schedule point, as
                # trio's own streams make it, or a client that never pauses
                # would starve the others. Shielded: the bytes are read.
                await trio.lowlevel.cancel_shielded_checkpoint()
            waited = False
            conn.receive_data(data)
            self._answer(conn, peer)

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
        while not peer.closing:
            event = None
            try:
                event = conn.next_event()
                if event is None:
                    break
                if isinstance(event, RequestReceived):
                    if client is None or client.closed:
                        peer.close()
                        break
                    pending = engine.handle(client, event.xid, event.opcode, event.body)
                    if pending is not None and not pending.finished:
                        return client, pending
                elif isinstance(event, ConnectRequested):
                    client = engine.connect(peer, conn, event.request)
                    if client is not None and peer.identities:
                        client.auth.extend(peer.identities)
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
                if isinstance(event, RequestReceived) and client is not None:
                    with contextlib.suppress(Exception):  # recorded above already
                        engine.reply(client, event.xid, Err.SYSTEMERROR)
                peer.close()
        return client, None


async def _pump_in(source: trio.abc.Stream, sink: trio.SocketStream) -> None:
    """Decrypted client bytes to the reader's socket; the client's end is its end."""
    try:
        while data := await source.receive_some(_RECEIVE_SIZE):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sink.send_eof()


async def _pump_out(
    source: trio.SocketStream, sink: trio.abc.Stream, scope: trio.CancelScope
) -> None:
    """The reader's output to the client, encrypted; when the reader closes its
    end, the TLS connection closes too."""
    try:
        while data := await source.receive_some(_RECEIVE_SIZE):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    # A close_notify for the client, if it still listens; never waited on long.
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await sink.aclose()
    await trio.aclose_forcefully(source)
    scope.cancel()


__all__ = ["ServerLimits", "ZooKeeperServer"]
