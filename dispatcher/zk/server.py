"""The trio server around the sans-I/O codec and the synchronous engine.

Each connection runs two tasks in its own nursery: a reader that turns bytes
into engine calls, and a writer that flushes whatever the engine queued for
that connection, replies and watch events alike, in one ``send_all`` per
wake-up. Queues are bounded: a reader stops reading while its connection's
unsent output is above a high-water mark (so one connection's outstanding
requests are bounded), and a connection whose unsent output passes a hard cap
(a watcher that never reads) is closed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import attrs
import trio

from dispatcher.zk.connection import (
    ConnectRequested,
    FourLetterWord,
    ProtocolError,
    RequestReceived,
    ServerConnection,
)
from dispatcher.zk.engine import Client, Engine
from dispatcher.zk.fourletter import answer
from dispatcher.zk.jute import DecodeError
from dispatcher.zk.pending import Pending
from dispatcher.zk.protocol import DEFAULT_MAX_BUFFER

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536


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
    """One socket as the engine sees it: a bounded output queue and a close."""

    def __init__(
        self, stream: trio.SocketStream, limits: ServerLimits, budget: OutputBudget
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.budget = budget
        host, port, *_ = stream.socket.getpeername()
        self.remote_ip = host
        self.remote = f"/{host}:{port}"
        self._fd = stream.socket.fileno()
        self._out = bytearray()
        self._wake = trio.Event()
        self._writer_idle = False
        #: True while this connection's own reader is answering a batch of
        #: requests: its replies are then sent once, at the end of the batch.
        self.in_batch = False
        self._drained = trio.Event()
        self.closing = False
        self.reader_scope = trio.CancelScope()
        # A client that stopped reading can block send_all forever; closing
        # gives the writer close_flush_timeout more, then cancels it.
        self.writer_scope = trio.CancelScope()

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        self._out += data
        self.budget.add(len(data))
        if not self.in_batch:
            # Output for a connection that is not answering its own batch: a
            # watch event, or a deferred answer. Written at once when the
            # writer is idle, so that firing a watch for a thousand
            # connections costs a thousand writes, not a thousand task switches.
            self._write_now()
            if self._out:
                self._wake.set()
        if len(self._out) > self.limits.output_hard_cap:
            log.warning("closing a connection that is not reading",
                        extra={"peer": self.remote, "unsent": len(self._out)})
            self._discard_output()
            self.close()

    def end_batch(self) -> None:
        """The reader answered a batch: send it now if the writer is idle.

        A request/response client would otherwise cost a writer wake-up and a
        task switch per request.
        """
        self.in_batch = False
        self._write_now()
        if self._out or self.closing:
            self._wake.set()

    def _write_now(self) -> None:
        """Write what is queued straight to the socket, if the writer task is
        idle (then nothing of ours is in flight on it); what the socket does
        not take at once is left to the writer."""
        if self._out and self._writer_idle and not self.closing:
            try:
                sent = os.write(self._fd, self._out)
            except OSError:  # would block, or broken: the writer deals with both
                sent = 0
            if sent:
                del self._out[:sent]
                self.budget.release(sent)

    def _discard_output(self) -> None:
        self.budget.release(len(self._out))
        self._out = bytearray()

    def close(self) -> None:
        if not self.closing:
            self.writer_scope.deadline = trio.current_time() + self.limits.close_flush_timeout
        self.closing = True
        self.reader_scope.cancel()
        self._wake.set()

    @property
    def backlogged(self) -> bool:
        return len(self._out) > self.limits.output_high_water

    async def wait_drained(self) -> None:
        self._drained = trio.Event()
        await self._drained.wait()

    async def write_loop(self) -> None:
        with self.writer_scope:
            await self._write_until_closed()

    async def _write_until_closed(self) -> None:
        try:
            while True:
                if not self._out:
                    if self.closing:
                        return
                    self._wake = trio.Event()
                    self._writer_idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._writer_idle = False
                    continue
                data, self._out = self._out, bytearray()
                try:
                    await self.stream.send_all(data)
                finally:
                    self.budget.release(len(data))
                if len(self._out) <= self.limits.output_high_water:
                    self._drained.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close()
        finally:
            self.closing = True
            self._discard_output()
            self._drained.set()
            self.reader_scope.cancel()


class ZooKeeperServer:
    """Serves one :class:`Engine` over TCP."""

    def __init__(
        self, engine: Engine, limits: ServerLimits | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.settings = dict(settings or {})
        self.budget = OutputBudget(self.limits.global_output_limit)
        self._connections_by_ip: dict[str, int] = {}

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.settings.setdefault("clientPort", bound)
        log.info("serving the ZooKeeper protocol", extra={"listen": f"{host}:{bound}"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_sessions)
            nursery.start_soon(self._reap_containers)
            task_status.started(bound)
            await trio.serve_listeners(self._serve_connection, listeners)

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
        try:
            peer = StreamPeer(stream, self.limits, self.budget)
        except OSError:
            return  # the client left before we could ask who it was
        ip = peer.remote_ip
        limit = self.limits.max_client_cnxns
        if limit and self._connections_by_ip.get(ip, 0) >= limit:
            log.warning("too many connections from one address",
                        extra={"peer": peer.remote, "max": limit})
            await stream.aclose()
            return
        self._connections_by_ip[ip] = self._connections_by_ip.get(ip, 0) + 1
        conn = ServerConnection(self.limits.max_buffer)
        client: Client | None = None
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(peer.write_loop)
                try:
                    with peer.reader_scope:
                        client = await self._read_loop(stream, conn, peer)
                finally:
                    if client is not None:
                        self.engine.disconnect(client)
                    peer.close()
        finally:
            remaining = self._connections_by_ip[ip] - 1
            if remaining:
                self._connections_by_ip[ip] = remaining
            else:
                del self._connections_by_ip[ip]

    async def _read_loop(
        self, stream: trio.SocketStream, conn: ServerConnection, peer: StreamPeer
    ) -> Client | None:
        client: Client | None = None
        while not peer.closing:
            if peer.backlogged:
                await peer.wait_drained()
                continue
            if self.budget.exhausted:
                await self.budget.wait()
                continue
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return client
            if not data:
                return client
            conn.receive_data(data)
            while True:
                peer.in_batch = True
                try:
                    client, pending = self._answer_batch(conn, peer, client)
                finally:
                    peer.end_batch()
                if pending is None:
                    break
                # A mounted subtree answers later: this connection's next
                # request waits for it, the other connections do not.
                await pending.wait()
        return client

    def _answer_batch(
        self, conn: ServerConnection, peer: StreamPeer, client: Client | None
    ) -> tuple[Client | None, Pending | None]:
        """Answer complete requests received so far, in order, until one is
        deferred (returned, with the rest left buffered)."""
        engine = self.engine
        while not peer.closing:
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
                    client = engine.connect(peer, event.request)
                elif isinstance(event, FourLetterWord):
                    peer.send(answer(engine, event.word, self.settings).encode())
                    peer.close()
            except (ProtocolError, DecodeError) as exc:
                log.warning("closing a connection that broke the protocol",
                            extra={"peer": peer.remote, "reason": str(exc)})
                peer.close()
        return client, None


__all__ = ["ServerLimits", "ZooKeeperServer"]
