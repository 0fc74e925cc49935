"""The Meta Server: which Dispatcher owns each service, over the subscription protocol.

A proxy connects, says :class:`~dispatcher.wire.Hello` with the shared token, and then asks:

* ``Lookup(services)`` → one ``Assignment(epoch, owners)`` with an
  :class:`~dispatcher.wire.Owner` (or None: no live Dispatcher) for each name asked;
* ``WatchAssignments(services)`` → the current ``Assignment`` of those services at once, then a
  new one pushed on every epoch change. Each ``WatchAssignments`` adds to what the connection
  watches; an empty list watches the whole catalog.
* ``Ping`` → ``Pong``.

Stateless: a Meta Server holds no state of its own. It follows the membership views of a
:class:`~dispatcher.sharding.membership.MembershipStore` (as a reader: it never registers) and
answers
from :func:`~dispatcher.sharding.assignment.assign` of the latest one, so any number of Meta
Servers on
the same store answer the same, epoch included, and any of them can be restarted or added at
any time. While the store cannot be reached it keeps answering from the last view it read;
before it has read any, lookups get ``Error("unavailable")`` (the connection stays open).

Fast path. Per epoch the server keeps one :class:`_Answers`: each member's :class:`Owner` as
encoded JSON, and each service's ``"name":{owner}`` fragment, encoded the first time someone asks
(cataloged services, and the fallback answers for uncataloged ones, up to a bound). A lookup is
then a frame decode, a dictionary lookup per name, and one join. Requests are pipelined: every
frame that arrived in one read is answered in one write, in order.

Bounds: at most ``max_connections`` connections (more are told ``Error("overloaded")`` and
closed), frames of at most ``max_frame`` bytes, ``max_services`` names per request and
``max_watched`` per connection (else ``Error("bad-request")`` and the connection closes), a
Hello within ``hello_timeout``, and every write done within ``send_timeout`` (a proxy that stops
reading is disconnected rather than holding a task and its buffers for ever). Bad bytes close
that one connection with a log line; nothing a client sends can stop the server.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Final

import attrs
import trio

from dispatcher.containment import InternalErrors
from dispatcher.sharding.assignment import (
    DEFAULT_BALANCE,
    Assignment,
    Member,
    NoLiveMembersError,
    assign,
)
from dispatcher.sharding.membership import MembershipStore, View, owner_endpoints
from dispatcher.tls import PlainGuard, ServerTls
from dispatcher.wire import (
    Error,
    FrameDecoder,
    Hello,
    Lookup,
    Message,
    Ping,
    Pong,
    WatchAssignments,
    WireError,
    check_hello,
    encode,
)

__all__ = ["MetaLimits", "MetaServer"]

log = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct(">I")
_RECEIVE: Final = 65536
_FALLBACK_CACHE: Final = 100_000
"""Encoded answers kept per epoch for services that are not in the catalog."""


@attrs.frozen
class MetaLimits:
    """The Meta Server's bounds (see the module docstring)."""

    max_connections: int = 10_000
    max_frame: int = 1024 * 1024
    max_services: int = 10_000
    max_watched: int = 100_000
    hello_timeout: float = 10.0
    send_timeout: float = 30.0


class _Answers:
    """Everything needed to answer at one epoch, encoded lazily and kept for the epoch."""

    __slots__ = (
        "_cache", "_catalog_frame", "_fallbacks", "_owners", "assignment", "epoch", "head", "view",
    )  # fmt: skip

    def __init__(self, view: View, assignment: Assignment | None) -> None:
        self.view = view
        self.epoch = view.epoch
        self.assignment = assignment
        self.head = b'{"type":"assignment","epoch":%d,"owners":{' % view.epoch
        self._owners: dict[str, bytes] = {}
        if assignment is not None:
            for member in assignment.members:
                self._owners[member.id] = _owner_json(member)
        self._cache: dict[str, bytes] = {}
        self._fallbacks = 0
        self._catalog_frame: bytes | None = None

    def fragment(self, service: str) -> bytes:
        """``"service":{owner}`` (or ``"service":null``) as JSON bytes."""
        cached = self._cache.get(service)
        if cached is not None:
            return cached
        assignment = self.assignment
        if assignment is None:
            owner = b"null"
        else:
            member_id = assignment.owners.get(service)
            if member_id is None:
                member_id = assignment.owner(service).id
                if self._fallbacks >= _FALLBACK_CACHE:
                    # Bounded: stop caching fallbacks for the rest of this epoch.
                    return json.dumps(service).encode() + b":" + self._owners[member_id]
                self._fallbacks += 1
            owner = self._owners[member_id]
        fragment = json.dumps(service).encode() + b":" + owner
        self._cache[service] = fragment
        return fragment

    def frame(self, services: Iterable[str]) -> bytes:
        """A whole length-prefixed ``Assignment`` frame for ``services`` (duplicates once)."""
        fragment = self.fragment
        body = b"".join(
            (self.head, b",".join([fragment(s) for s in dict.fromkeys(services)]), b"}}")
        )
        return _LENGTH.pack(len(body)) + body

    def at(self, view: View) -> _Answers:
        """The same answers at ``view``'s epoch (same members and catalog: a warm marker moved
        the epoch). The encoded fragments do not hold the epoch, so they are reused."""
        assignment = self.assignment
        if assignment is not None:
            assignment = attrs.evolve(assignment, epoch=view.epoch)
        answers = _Answers(view, assignment)
        answers._cache = dict(self._cache)
        answers._fallbacks = self._fallbacks
        return answers

    def catalog_frame(self) -> bytes:
        """The frame for the whole catalog (watchers of everything), built once per epoch."""
        if self._catalog_frame is None:
            self._catalog_frame = self.frame(sorted(self.view.catalog))
        return self._catalog_frame

    def owners_of(self, services: Iterable[str]) -> dict[str, Member | None]:
        """For tests and diagnostics: the member answered for each service."""
        if self.assignment is None:
            return dict.fromkeys(services)
        return {s: self.assignment.owner(s) for s in services}


def _owner_json(member: Member) -> bytes:
    subscribe, zookeeper = owner_endpoints(member)
    return json.dumps(
        {"id": member.id, "subscribe_address": subscribe, "zookeeper_address": zookeeper},
        separators=(",", ":"),
    ).encode()


def _compute(view: View, balance: float) -> _Answers:
    try:
        assignment = assign(view.catalog, view.members, balance, epoch=view.epoch)
    except NoLiveMembersError:
        assignment = None
    answers = _Answers(view, assignment)
    # Encode the catalog's answers here, in the worker thread, not on the first lookups.
    for service in view.catalog:
        answers.fragment(service)
    return answers


class _Refused(Exception):
    """End this connection after telling the client why."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


class MetaServer:
    """A Meta Server on one membership store (see the module docstring).

    Run :meth:`run` (follows the store's views; the store's own ``run`` must run too) and
    :meth:`serve` (the TCP listener) in a nursery. ``balance`` must be the Dispatchers'.
    """

    def __init__(
        self,
        store: MembershipStore,
        *,
        token: str = "",
        server_id: str = "",
        balance: float = DEFAULT_BALANCE,
        limits: MetaLimits | None = None,
    ) -> None:
        self.store = store
        self.token = token
        self.server_id = server_id or f"meta-{socket.gethostname()}"
        self.balance = balance
        self.limits = limits or MetaLimits()
        self._answers: _Answers | None = None
        self._changed = trio.Event()
        self._connections = 0
        self.internal_errors = InternalErrors("meta")
        #: Lookups answered (for the benchmark and tests).
        self.lookups = 0

    # ----------------------------------------------------------------- reading

    @property
    def epoch(self) -> int | None:
        """The epoch answers are given at; None before the first view."""
        return None if self._answers is None else self._answers.epoch

    @property
    def connections(self) -> int:
        return self._connections

    def lookup(self, services: Sequence[str]) -> dict[str, Member | None]:
        """The owners this server answers now, in process (tests and diagnostics)."""
        if self._answers is None:
            raise LookupError("no membership view yet")
        return self._answers.owners_of(services)

    async def wait_epoch(self, epoch: int) -> int:
        """Wait until answers are given at ``epoch`` or later; return that epoch."""
        while self._answers is None or self._answers.epoch < epoch:
            await self._changed.wait()
        return self._answers.epoch

    # ----------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the membership views and keep the answers current, until cancelled."""
        task_status.started()
        async for view in self.store.feed:
            current = self._answers
            if current is not None and view.same_shards(current.view):
                continue
            if current is not None and view.same_inputs(current.view):
                answers = current.at(view)
            else:
                answers = await trio.to_thread.run_sync(_compute, view, self.balance)
            self._answers = answers
            log.info(
                "serving a new membership view" if view.connected
                else "serving the last known membership view: store unreachable",
                extra={"server": self.server_id, "epoch": answers.epoch,
                       "members": len(view.members), "services": len(view.catalog)},
            )  # fmt: skip
            self._changed.set()
            self._changed = trio.Event()

    async def serve(
        self,
        host: str,
        port: int,
        tls: ServerTls | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``host:port`` until cancelled; ``started(bound port)``.

        With ``tls``, each connection completes a TLS handshake first; without,
        a TLS client is refused with a log line."""
        # Bound here, not in a task: a port that cannot be bound is the caller's OSError.
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("meta server listening",
                 extra={"server": self.server_id, "listen": f"{host}:{bound}"})  # fmt: skip
        task_status.started(bound)

        async def accept(stream: trio.SocketStream) -> None:
            peer = _peer(stream)
            if tls is None:
                await self.handle(PlainGuard(stream, "meta", peer))
                return
            secure = await tls.accept(stream, peer)
            if secure is not None:
                await self.handle(secure)

        await trio.serve_listeners(accept, listeners)

    # ------------------------------------------------------------- connections

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it closes (the ``serve_tcp`` handler)."""
        peer = _peer(stream)
        limits = self.limits
        if self._connections >= limits.max_connections:
            with trio.move_on_after(1):
                await stream.send_all(encode(Error("overloaded", "too many connections")))
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        connection = _Connection(self, stream, peer)
        try:
            await connection.serve()
        except _Refused as refused:
            # Warning, as the Dispatcher's subscription server logs its refusals:
            # a wrong token or an unsupported version is a misconfigured client.
            log.warning("closing a connection: request refused", extra={
                "peer": peer, "code": refused.error.code, "reason": refused.error.message,
            })  # fmt: skip
            await connection.try_send(encode(refused.error))
        except WireError as exc:
            log.warning("closing a connection: bad request",
                        extra={"peer": peer, "error": str(exc)})  # fmt: skip
            await connection.try_send(encode(Error("bad-request", str(exc))))
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, trio.TooSlowError):
            pass
        except Exception as exc:
            # A bug met by one peer ends its connection, not the Meta Server.
            self.internal_errors.record(exc, peer=peer)
            await connection.try_send(
                encode(Error("internal", "the server failed to handle a message; see its log"))
            )
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(self, server: MetaServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.decoder = FrameDecoder(server.limits.max_frame)
        self.send_lock = trio.Lock()
        self.watched: dict[str, None] = {}
        self.watch_all = False
        self.watching = False
        self.pending: list[Message] = []

    async def try_send(self, data: bytes) -> None:
        try:
            with trio.move_on_after(1):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send(self, data: bytes) -> None:
        with trio.fail_after(self.server.limits.send_timeout):
            async with self.send_lock:
                await self.stream.send_all(data)

    async def receive(self) -> list[Message]:
        while True:
            data = await self.stream.receive_some(_RECEIVE)
            if not data:
                raise EOFError
            messages = list(self.decoder.feed(data))
            if messages:
                return messages

    async def serve(self) -> None:
        server = self.server
        with trio.fail_after(server.limits.hello_timeout):
            messages = await self.receive()
        answer = check_hello(messages[0], server.token, server.server_id)
        if isinstance(answer, Error):
            raise _Refused(answer)
        await self.send(encode(answer))
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            # Errors of the read loop are carried out of the nursery by hand, so that the
            # handler sees the error itself and not an exception group around it.
            try:
                rest = messages[1:]
                while True:
                    if rest:
                        await self._answer(rest, nursery)
                    rest = await self.receive()
            except Exception as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _answer(self, messages: list[Message], nursery: trio.Nursery) -> None:
        server = self.server
        limits = server.limits
        out: list[bytes] = []
        for message in messages:
            if isinstance(message, Lookup):
                if len(message.services) > limits.max_services:
                    raise _Refused(Error("bad-request", f"more than {limits.max_services} names"))
                answers = server._answers
                if answers is None:
                    out.append(encode(Error("unavailable", "no membership view yet")))
                    continue
                out.append(answers.frame(message.services))
                server.lookups += 1
            elif isinstance(message, WatchAssignments):
                if not message.services:
                    self.watch_all = True
                elif len(self.watched) + len(message.services) > limits.max_watched:
                    raise _Refused(Error("bad-request", f"more than {limits.max_watched} watched"))
                else:
                    self.watched.update(dict.fromkeys(message.services))
                if not self.watching:
                    self.watching = True
                    nursery.start_soon(self._push)
                answers = server._answers
                if answers is not None:
                    out.append(self._watch_frame(answers))
            elif isinstance(message, Ping):
                out.append(encode(Pong()))
            elif isinstance(message, Hello):
                raise _Refused(Error("bad-request", "hello twice"))
            else:
                raise _Refused(
                    Error("bad-request", f"a Meta Server does not take {message.type!r}")
                )
        if out:
            await self.send(b"".join(out))

    def _watch_frame(self, answers: _Answers) -> bytes:
        if not self.watch_all:
            return answers.frame(self.watched)
        if not self.watched.keys() - answers.view.catalog:
            return answers.catalog_frame()
        return answers.frame([*sorted(answers.view.catalog), *self.watched])

    async def _push(self) -> None:
        """Send the watched services' assignment on every epoch change (the newest only)."""
        server = self.server
        answers = server._answers
        epoch = answers.epoch if answers is not None else -1
        try:
            while True:
                await server.wait_epoch(epoch + 1)
                answers = server._answers
                assert answers is not None
                epoch = answers.epoch
                await self.send(self._watch_frame(answers))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            # Closing the stream ends the read loop too, which ends the connection.
            log.info("closing a connection: push failed",
                     extra={"peer": self.peer, "error": type(exc).__name__})  # fmt: skip
            await trio.aclose_forcefully(self.stream)


def _peer(stream: trio.abc.Stream) -> str:
    # Under TLS or the plain-port guard, the socket is the wrapped stream's.
    inner = getattr(stream, "transport_stream", None) or getattr(stream, "stream", stream)
    sock = getattr(inner, "socket", None)
    if sock is None:
        return "?"
    try:
        host, port = sock.getpeername()[:2]
    except (AttributeError, OSError):
        return "?"
    return f"{host}:{port}"
