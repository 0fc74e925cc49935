"""The client side of the subscription protocol (:mod:`dispatcher.wire`), shared by every
subscriber: the proxy's control plane and a Dispatcher that follows a service from its owner.

* :func:`connect` opens a connection and says ``Hello``; it returns a :class:`Link` once
  the server said ``Welcome``, or raises :class:`Closed` saying why not.
* A :class:`Link` is one welcomed connection: a writer fed by a bounded queue (so messages
  leave in the order they were queued, and a peer that stops reading cannot make us
  buffer without bound), a keepalive (``Ping`` after ``ping_interval`` of silence) and a
  reader that counts a connection silent for ``dead_after`` as lost.
* An :class:`OwnerSession` is one Dispatcher and the services subscribed there: it
  reconnects with exponential backoff and full jitter, re-subscribes everything on each
  connection (offering a held version only to the very server it came from, see
  :meth:`SessionHost.held_version`), keeps services that are moving away subscribed until
  their new owner answered (:meth:`OwnerSession.leave`), and hands every ``Full``,
  ``Deltas`` and ``Redirect`` to its :class:`SessionHost`, which decides what they mean.

What to subscribe where, and how a move between owners goes, is the host's business;
everything here is the protocol's. Everything runs on the trio thread; every queue is
bounded.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import attrs
import trio

from dispatcher import wire
from dispatcher.backoff import Backoff
from dispatcher.containment import InternalErrors
from dispatcher.tls import ClientTls, client_context

__all__ = [
    "ClientSettings",
    "Closed",
    "Link",
    "OwnerSession",
    "SessionHost",
    "SessionStatus",
    "connect",
    "connection_ended",
    "new_backoff",
    "open_wire_stream",
]

log = logging.getLogger(__name__)


def _default_client_id() -> str:
    return f"zkgate/{socket.gethostname()}/{os.getpid()}"


@attrs.frozen
class ClientSettings:
    """Timeouts, backoff and bounds of a subscription-protocol client."""

    token: str = attrs.field(default="", repr=False)
    client_id: str = attrs.field(factory=_default_client_id)
    #: Seconds to open a connection and to get the Welcome.
    connect_timeout: float = 3.0
    #: Send a Ping after this many seconds of silence from the server.
    ping_interval: float = 5.0
    #: Drop a connection that has said nothing for this long (Pings unanswered).
    dead_after: float = 15.0
    #: First reconnect delay; doubles per failed attempt up to ``backoff_max``.
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    #: Messages queued for one connection before it is considered wedged.
    max_queued: int = 1024
    #: Reports held per Dispatcher while its session reconnects (oldest dropped).
    max_pending_reports: int = 256
    #: Ask for the policies of the services subscribed (``Hello.policies``).
    policies: bool = False
    #: The consumer application whose per-consumer policies apply ("" for none).
    application: str = ""
    #: TLS to the server (its CA, and a client certificate if it asks for one);
    #: None: plain text. The files are read at each connect, so renewed ones are used.
    tls: ClientTls | None = None


@attrs.frozen
class SessionStatus:
    """What a client knows of one Dispatcher session (for status output and tests)."""

    owner: wire.Owner
    connected: bool
    server_id: str | None
    services: frozenset[str]
    leaving: frozenset[str]


async def open_wire_stream(
    address: str, timeout: float, tls: ClientTls | None = None
) -> wire.WireStream:
    """A :class:`~dispatcher.wire.WireStream` to ``HOST:PORT`` or a Unix socket path
    (``unix:/path`` or anything with a ``/``); over TLS to a TCP address with ``tls``
    (a refused handshake raises OSError naming the cause)."""
    with trio.fail_after(timeout):
        if address.startswith("unix:") or "/" in address:
            path = address.removeprefix("unix:")
            stream: trio.abc.Stream = await trio.open_unix_socket(path)
        else:
            try:
                host, port = wire.parse_address(address, allow_port_zero=False)
            except ValueError as exc:
                raise OSError(str(exc)) from None
            stream = await trio.open_tcp_stream(host, port)
            if tls is not None:
                stream = await _tls_handshake(stream, tls, host)
    return wire.WireStream(stream)


async def _tls_handshake(stream: trio.SocketStream, tls: ClientTls, host: str) -> trio.abc.Stream:
    try:
        context = client_context(tls)
    except (OSError, ValueError) as exc:
        await trio.aclose_forcefully(stream)
        raise OSError(f"cannot load the TLS files: {exc}") from None
    secure = trio.SSLStream(stream, context, server_hostname=tls.server_name or host)
    try:
        await secure.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        reason = getattr(cause, "verify_message", None) or str(cause or "closed by the server")
        raise OSError(f"TLS handshake failed: {reason}") from None
    return secure


def new_backoff(settings: ClientSettings, rng: random.Random) -> Backoff:
    """The reconnect backoff ``settings`` describe, drawing its jitter from ``rng``."""
    return Backoff(settings.backoff_initial, settings.backoff_max, rng)


def connection_ended(backoff: Backoff, lived: float) -> None:
    """A connection that lived ``lived`` seconds ended. Only one that stayed up
    longer than the longest delay resets the backoff: a server that welcomes and
    then refuses at once (an Error) must not be redialled in a tight loop."""
    if lived > backoff.maximum:
        backoff.reset()


class Closed(Exception):
    """This connection is over (lost, refused, silent, or asked to reconnect)."""


async def connect(
    address: str, what: str, settings: ClientSettings, internal_errors: InternalErrors
) -> Link:
    """A connection to ``address`` that said Welcome; raises :class:`Closed` otherwise
    (``what`` names the peer in the reason)."""
    try:
        conn = await open_wire_stream(address, settings.connect_timeout, settings.tls)
    except (OSError, trio.TooSlowError) as exc:
        raise Closed(f"cannot connect: {exc or type(exc).__name__}") from None
    try:
        with trio.fail_after(settings.connect_timeout):
            await conn.send(wire.Hello(wire.PROTOCOL_VERSION, settings.token,
                                       settings.client_id, settings.policies,
                                       settings.application))  # fmt: skip
            answer = await conn.receive()
    except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError,
            wire.WireError) as exc:  # fmt: skip
        await close_stream(conn)
        raise Closed(f"no welcome: {exc or type(exc).__name__}") from None
    if isinstance(answer, wire.Error):
        await close_stream(conn)
        raise Closed(f"{what} refused us: {answer.code} {answer.message}")
    if not isinstance(answer, wire.Welcome):
        await close_stream(conn)
        raise Closed(f"expected welcome, got {answer.type}")
    link = Link(conn, answer.server_id, settings, internal_errors)
    link.takes_outcomes = answer.outcomes
    return link


class Link:
    """One welcomed connection: a writer fed by a bounded queue, a keepalive, a reader.

    Everything sent goes through the queue, so messages leave in the order
    they were queued; :meth:`run` returns (never raises) why the connection
    ended.
    """

    def __init__(
        self, conn: wire.WireStream, server_id: str, settings: ClientSettings,
        internal_errors: InternalErrors,
    ) -> None:  # fmt: skip
        self.conn = conn
        self.server_id = server_id
        self.settings = settings
        self.internal_errors = internal_errors
        self._outbox, self._queued = trio.open_memory_channel[wire.Message](settings.max_queued)
        self._scope = trio.CancelScope()
        self._last_heard = trio.current_time()
        self._opened = self._last_heard
        self.reason = ""
        #: The server's Welcome said it takes :class:`~dispatcher.wire.Outcomes` reports.
        self.takes_outcomes = False

    @property
    def age(self) -> float:
        """Seconds since the connection was welcomed."""
        return trio.current_time() - self._opened

    def send(self, message: wire.Message) -> None:
        """Queue ``message``; a connection that stopped taking them is closed."""
        try:
            self._outbox.send_nowait(message)
        except trio.WouldBlock:
            self.close(f"{self.settings.max_queued} messages queued and not sent; wedged")
        except trio.ClosedResourceError:
            pass  # over already

    def finish(self) -> None:
        """Close once everything queued has been sent."""
        self._outbox.close()

    def close(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self._scope.cancel()

    async def run(self, handle: Callable[[wire.Message], None]) -> str:
        """Serve until the connection ends; ``handle`` gets every message but Ping/Pong
        and may raise :class:`Closed` to end it."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._write)
                    nursery.start_soon(self._guard, self._keepalive)
                    nursery.start_soon(self._guard, self._read, handle)
        finally:
            self._outbox.close()
            await close_stream(self.conn)
        return self.reason or "closed"

    async def _guard(self, work: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await work(*args)
        except Closed as exc:
            self.close(str(exc))
        except EOFError:
            self.close("closed by the server")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                wire.WireError) as exc:  # fmt: skip
            self.close(f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            # A bug met handling one message: this link closes and is opened
            # again; the subscriber keeps what it holds meanwhile.
            self.internal_errors.record(exc, server=self.server_id)
            self.close(f"internal error ({type(exc).__name__}); see the log")

    async def _write(self) -> None:
        async for message in self._queued:
            await self.conn.send(message)
        raise Closed("finished")

    async def _keepalive(self) -> None:
        interval = self.settings.ping_interval
        while True:
            await trio.sleep_until(self._last_heard + interval)
            if trio.current_time() >= self._last_heard + interval:
                self.send(wire.Ping())
                await trio.sleep(interval)

    async def _read(self, handle: Callable[[wire.Message], None]) -> None:
        dead_after = self.settings.dead_after
        while True:
            with trio.move_on_after(dead_after) as silent:
                message = await self.conn.receive()
            if silent.cancelled_caught:
                raise Closed(f"silent for {dead_after:g} s")
            self._last_heard = trio.current_time()
            if isinstance(message, wire.Ping):
                self.send(wire.Pong())
            elif not isinstance(message, wire.Pong):
                handle(message)


async def close_stream(conn: wire.WireStream) -> None:
    """Close ``conn`` at once, even from a cancelled scope."""
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(conn.stream)


class SessionHost(Protocol):
    """What an :class:`OwnerSession` reports to and asks of (all on the trio thread)."""

    @property
    def settings(self) -> ClientSettings: ...

    @property
    def internal_errors(self) -> InternalErrors: ...

    def held_version(self, service: str, server_id: str | None) -> int | None:
        """The version of ``service`` to offer the server ``server_id``: one that came
        from that very server, else None (a ``Full`` is needed)."""
        ...

    def session_update(self, session: OwnerSession, message: wire.Full | wire.Deltas) -> None:
        """A ``Full`` or ``Deltas`` arrived on ``session``."""
        ...

    def session_redirect(self, session: OwnerSession, redirect: wire.Redirect) -> None:
        """``session``'s server does not own ``redirect.service`` (it is no longer
        subscribed there: the session already forgot it)."""
        ...

    def session_policy(self, session: OwnerSession, message: wire.PolicyUpdate) -> None:
        """A ``PolicyUpdate`` arrived on ``session`` (only if ``settings.policies``)."""
        ...

    def session_idle(self, session: OwnerSession) -> None:
        """``session`` holds no service any more (retire it, or keep it for later)."""
        ...

    def session_changed(self) -> None:
        """A session connected or lost its connection."""
        ...


class OwnerSession:
    """One Dispatcher, the services subscribed there, and its connection."""

    def __init__(self, host: SessionHost, owner: wire.Owner, rng: random.Random) -> None:
        self.host = host
        self.owner = owner
        self._rng = rng
        #: Services to subscribe to on every (re)connect.
        self.services: dict[str, None] = {}
        #: Services moving away: still subscribed until their new owner answers.
        self.leaving: set[str] = set()
        self.server_id: str | None = None
        self._link: Link | None = None
        self._stopping = False
        self._pending_reports: collections.deque[wire.Report] = collections.deque(
            maxlen=host.settings.max_pending_reports
        )
        self._scope = trio.CancelScope()

    def status(self) -> SessionStatus:
        return SessionStatus(self.owner, self._link is not None, self.server_id,
                             frozenset(self.services), frozenset(self.leaving))  # fmt: skip

    @property
    def idle(self) -> bool:
        return not self.services and not self.leaving

    @property
    def connected(self) -> bool:
        return self._link is not None

    # ------------------------------------------------------------- changes

    def add(self, service: str) -> None:
        self.leaving.discard(service)
        self.services[service] = None
        self.send(wire.Subscribe({service: self.host.held_version(service, self.server_id)}))

    def leave(self, service: str) -> None:
        """Keep ``service`` subscribed until its new owner answers (then :meth:`drop`)."""
        if service in self.services:
            del self.services[service]
            self.leaving.add(service)

    def drop(self, service: str) -> None:
        """Unsubscribe ``service`` here (the host is told if the session is idle then)."""
        self.leaving.discard(service)
        self.services.pop(service, None)
        self.send(wire.Unsubscribe((service,)))
        if self.idle:
            self.host.session_idle(self)

    def forget(self, service: str) -> None:
        """The server dropped ``service`` (a Redirect): nothing to unsubscribe."""
        self.leaving.discard(service)
        self.services.pop(service, None)

    def stop(self) -> None:
        """End the session: flush what is queued (an Unsubscribe), then close."""
        self._stopping = True
        if self._link is not None:
            self._link.finish()
        else:
            self._scope.cancel()

    def send(self, message: wire.Message) -> None:
        """Queue ``message`` if connected; else drop it (a reconnect re-subscribes)."""
        if self._link is not None:
            self._link.send(message)

    def send_outcomes(self, outcomes: wire.Outcomes) -> bool:
        """Send ``outcomes`` now if connected to a server that takes them; False: dropped
        (they are increments of a sliding window: late ones are worth nothing)."""
        link = self._link
        if link is None or not link.takes_outcomes:
            return False
        link.send(outcomes)
        return True

    def send_or_hold(self, report: wire.Report) -> None:
        if self._link is None:
            self._pending_reports.append(report)
        else:
            self._link.send(report)

    # ------------------------------------------------------------- the connection

    async def run(self) -> None:
        host = self.host
        backoff = new_backoff(host.settings, self._rng)
        with self._scope:
            while True:
                try:
                    link = await connect(self.owner.subscribe_address,
                                         f"Dispatcher {self.owner.id}", host.settings,
                                         host.internal_errors)  # fmt: skip
                except Closed as exc:
                    delay = backoff.next_delay()
                    log.warning("cannot reach a Dispatcher; retrying", extra={
                        "member": self.owner.id, "address": self.owner.subscribe_address,
                        "error": str(exc), "retry_in_s": round(delay, 2),
                    })  # fmt: skip
                    await trio.sleep(delay)
                    continue
                self.server_id = link.server_id
                log.info("connected to a Dispatcher", extra={
                    "member": self.owner.id, "address": self.owner.subscribe_address,
                    "server": self.server_id,
                })  # fmt: skip
                wanted = {**dict.fromkeys(self.leaving), **self.services}
                if wanted:
                    link.send(wire.Subscribe(self._held(wanted)))
                while self._pending_reports:
                    link.send(self._pending_reports.popleft())
                self._link = link
                host.session_changed()
                try:
                    reason = await link.run(self._handle)
                finally:
                    self._link = None
                    host.session_changed()
                connection_ended(backoff, link.age)
                if self._stopping:
                    log.info("left a Dispatcher: no services of ours there",
                             extra={"member": self.owner.id})  # fmt: skip
                    return
                log.warning("lost a Dispatcher",
                            extra={"member": self.owner.id, "reason": reason})  # fmt: skip
                await trio.sleep(backoff.next_delay())

    def _held(self, services: Iterable[str]) -> dict[str, int | None]:
        return {name: self.host.held_version(name, self.server_id) for name in services}

    def _handle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Full | wire.Deltas):
            self.host.session_update(self, message)
        elif isinstance(message, wire.Redirect):
            self.forget(message.service)
            self.host.session_redirect(self, message)
        elif isinstance(message, wire.PolicyUpdate):
            self.host.session_policy(self, message)
        elif isinstance(message, wire.Error):
            raise Closed(f"error from the Dispatcher: {message.code} {message.message}")
        else:
            log.debug("ignoring a message from a Dispatcher",
                      extra={"member": self.owner.id, "type": message.type})  # fmt: skip
