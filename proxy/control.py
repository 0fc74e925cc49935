"""The proxy's control plane: who owns my services, and what endpoints do they have.

:class:`ControlPlane` keeps the proxy's :class:`~proxy.endpoints.ServiceTable`
objects current, over :mod:`dispatcher.wire`:

* **Meta Server.** One connection: ``Hello``, then ``Lookup(services)`` and
  ``WatchAssignments(services)``; every ``Assignment`` (the Lookup's answer
  and each pushed change) names the Dispatcher that owns each service.
  Epochs only grow, so an ``Assignment`` older than the newest one seen is
  ignored, except the first answer on a new connection (a restarted Meta
  Server with in-memory membership may count from zero again, and it is the
  only truth there is).
* **Dispatchers.** One session per owner, shared by all the services it
  owns: ``Hello``, ``Subscribe({service: version held or None})``, then
  ``Full``/``Deltas`` applied to the tables and acknowledged with ``Ack``.
  A held version is offered only to the Dispatcher it came from (the very
  ``Welcome`` server id: versions are meaningful only to the fan-in that
  made them), so a session that reconnects to the same Dispatcher resumes
  with ``Deltas`` and one that reaches a new one gets a ``Full``.
* **Shard moves, with no gap.** When a service's owner changes (a new
  ``Assignment``, or a ``Redirect`` from its Dispatcher whose epoch is not
  older than ours), the proxy subscribes at the new owner *first* and keeps
  the old subscription, and keeps applying its updates, until the new owner
  answered; only then does it unsubscribe at the old one. The table is never
  emptied, so routing never stops. A ``Redirect`` to nobody, or from an older
  epoch, makes the proxy ask the Meta Server again (with backoff, so two
  servers that disagree cannot make it spin).
* **Control plane away.** Every connection reconnects with exponential
  backoff and full jitter; a connection that hears nothing for ``dead_after``
  seconds (Pings are sent every ``ping_interval``) counts as lost. The tables
  are never cleared for a lost connection: the proxy keeps routing on the
  last endpoints it had until a Dispatcher tells it otherwise.
* **Failure reports.** :meth:`ControlPlane.report` queues a ``Report`` to the
  Dispatcher that owns the service (held, bounded, while that session is
  reconnecting), so that the central health checker re-checks the endpoint
  at once.

Everything runs in the nursery of :meth:`ControlPlane.run`; every queue is
bounded.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping

import attrs
import trio

from dispatcher import wire
from dispatcher.backoff import Backoff
from dispatcher.containment import InternalErrors
from proxy.endpoints import ServiceTable

__all__ = ["ControlPlane", "ControlSettings", "SessionStatus", "open_wire_stream"]

log = logging.getLogger(__name__)


def _default_client_id() -> str:
    return f"zkgate-proxy/{socket.gethostname()}/{os.getpid()}"


@attrs.frozen
class ControlSettings:
    """Timeouts, backoff and bounds of the control-plane client."""

    token: str = ""
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


@attrs.frozen
class SessionStatus:
    """What the proxy knows of one Dispatcher session (for status output and tests)."""

    owner: wire.Owner
    connected: bool
    server_id: str | None
    services: frozenset[str]
    leaving: frozenset[str]


async def open_wire_stream(address: str, timeout: float) -> wire.WireStream:
    """A :class:`~dispatcher.wire.WireStream` to ``HOST:PORT`` or a Unix socket path
    (``unix:/path`` or anything with a ``/``)."""
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
    return wire.WireStream(stream)


def _backoff(settings: ControlSettings, rng: random.Random) -> Backoff:
    return Backoff(settings.backoff_initial, settings.backoff_max, rng)


def _connection_ended(backoff: Backoff, lived: float) -> None:
    """A connection that lived ``lived`` seconds ended. Only one that stayed up
    longer than the longest delay resets the backoff: a server that welcomes and
    then refuses at once (an Error) must not be redialled in a tight loop."""
    if lived > backoff.maximum:
        backoff.reset()


class _Closed(Exception):
    """This connection is over (lost, refused, silent, or asked to reconnect)."""


class ControlPlane:
    """Keeps ``tables`` current from the Meta Server at ``meta``; see the module docstring."""

    def __init__(
        self,
        meta: str,
        tables: Mapping[str, ServiceTable],
        settings: ControlSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not tables:
            raise ValueError("a control plane needs at least one service")
        self.meta = meta
        self.tables = dict(tables)
        self.settings = settings or ControlSettings()
        self._rng = rng or random.Random()
        self.internal_errors = InternalErrors("proxy-control")
        #: The newest assignment epoch seen (from the Meta Server or a Redirect).
        self.epoch = -1
        #: The owner of each service as last learned; None: nobody (or not yet known).
        self.owners: dict[str, wire.Owner | None] = dict.fromkeys(self.tables)
        #: Whether the Meta Server connection is up (Welcome received).
        self.meta_connected = False
        self._sessions: dict[wire.Owner, _Session] = {}
        #: The session each service is subscribed through (its current owner's).
        self._assigned: dict[str, _Session] = {}
        self._nursery: trio.Nursery | None = None
        self._meta_link: _Link | None = None
        self._redirects: collections.Counter[str] = collections.Counter()
        self._lookup_scheduled = False
        self._changed = trio.Event()

    # ------------------------------------------------------------- reading

    def sessions(self) -> dict[str, SessionStatus]:
        """The Dispatcher sessions, by owner id."""
        return {s.owner.id: s.status() for s in self._sessions.values()}

    def owner_session(self, service: str) -> SessionStatus | None:
        session = self._assigned.get(service)
        return None if session is None else session.status()

    async def wait_changed(self) -> None:
        """Until the next change of an owner, a session, or a table (for tests and status)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (started at once: the tables fill as answers arrive)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._meta_loop)
            task_status.started()

    def report(self, service: str, instance_id: str, reason: str) -> None:
        """Tell the owner of ``service`` that ``instance_id`` failed here (never blocks)."""
        session = self._assigned.get(service)
        if session is None:
            log.info("no Dispatcher to send a failure report to yet; dropped", extra={
                "service": service, "instance": instance_id, "reason": reason,
            })  # fmt: skip
            return
        session.send_or_hold(wire.Report(service, instance_id, reason))

    # ------------------------------------------------------------- the Meta Server

    async def _meta_loop(self) -> None:
        backoff = _backoff(self.settings, self._rng)
        services = tuple(self.tables)
        while True:
            try:
                link = await self._connect(self.meta, "Meta Server")
            except _Closed as exc:
                delay = backoff.next_delay()
                log.warning("cannot reach the Meta Server; retrying", extra={
                    "address": self.meta, "error": str(exc), "retry_in_s": round(delay, 2),
                })  # fmt: skip
                await trio.sleep(delay)
                continue
            log.info("connected to the Meta Server", extra={"address": self.meta})
            fresh = True

            def handle(message: wire.Message) -> None:
                nonlocal fresh
                if isinstance(message, wire.Assignment):
                    self._apply_assignment(message, fresh=fresh)
                    fresh = False
                elif isinstance(message, wire.Error):
                    raise _Closed(f"refused: {message.code} {message.message}")
                else:
                    log.debug("ignoring a message from the Meta Server",
                              extra={"address": self.meta, "type": message.type})  # fmt: skip

            link.send(wire.Lookup(services))
            link.send(wire.WatchAssignments(services))
            self._meta_link = link
            self.meta_connected = True
            self._notify()
            try:
                reason = await link.run(handle)
            finally:
                self._meta_link = None
                self.meta_connected = False
                self._notify()
            _connection_ended(backoff, link.age)
            log.warning("lost the Meta Server", extra={"address": self.meta, "reason": reason})
            await trio.sleep(backoff.next_delay())

    def _apply_assignment(self, assignment: wire.Assignment, *, fresh: bool) -> None:
        if assignment.epoch < self.epoch and not fresh:
            log.debug("ignoring an older assignment",
                      extra={"epoch": assignment.epoch, "our_epoch": self.epoch})  # fmt: skip
            return
        self.epoch = assignment.epoch if fresh else max(self.epoch, assignment.epoch)
        for service, owner in assignment.owners.items():
            if service in self.tables:
                self._set_owner(service, owner)
        self._notify()

    def _set_owner(self, service: str, owner: wire.Owner | None) -> None:
        previous = self.owners.get(service)
        self.owners[service] = owner
        if owner is None:
            # Nobody owns it now: keep the subscription we have (its Dispatcher
            # may still serve it) and the table; a later assignment moves it.
            if previous is not None:
                log.warning("service has no owner now; routing on the last endpoints",
                            extra={"service": service, "from_member": previous.id})  # fmt: skip
            return
        current = self._assigned.get(service)
        if current is not None and current.owner == owner:
            return
        target = self._sessions.get(owner)
        if target is None:
            target = self._sessions[owner] = _Session(self, owner)
            assert self._nursery is not None
            self._nursery.start_soon(target.run)
        self._assigned[service] = target
        if current is not None:
            log.info("service moves to another Dispatcher", extra={
                "service": service, "from_member": current.owner.id, "to_member": owner.id,
            })  # fmt: skip
            current.leave(service)
        target.add(service)

    # ------------------------------------------------------------- called by sessions

    def _on_update(self, session: _Session, message: wire.Full | wire.Deltas) -> None:
        """A Full or Deltas arrived on ``session``: apply it if that session feeds the table."""
        service = message.service
        table = self.tables.get(service)
        if table is None:
            return
        assigned = self._assigned.get(service)
        if session is assigned:
            pass
        elif service in session.leaving and table.source in (session.server_id, None):
            pass  # the new owner has not answered yet: the old one still feeds the table
        else:
            return
        server_id = session.server_id
        assert server_id is not None
        if isinstance(message, wire.Full):
            table.apply_full(message, server_id)
        elif not table.apply_deltas(message, server_id):
            log.info("deltas do not chain on the version held; asking for a Full", extra={
                "service": service, "from_version": message.from_version,
                "to_version": message.to_version, "version": table.version,
                "source": table.source,
            })  # fmt: skip
            session.send(wire.Subscribe({service: None}))
            return
        session.send(wire.Ack(service, message.to_version if isinstance(message, wire.Deltas)
                              else message.version))  # fmt: skip
        if session is assigned:
            self._redirects.pop(service, None)
            # The new owner answered: the old one can let go.
            for other in tuple(self._sessions.values()):
                if other is not session and service in other.leaving:
                    other.drop(service)
        self._notify()

    def _on_redirect(self, session: _Session, redirect: wire.Redirect) -> None:
        service = redirect.service
        session.forget(service)
        if service not in self.tables or self._assigned.get(service) is not session:
            self._retire_if_idle(session)
            return
        owner = redirect.owner
        if owner is not None and owner != session.owner and redirect.epoch >= self.epoch:
            log.info("service redirected to another Dispatcher", extra={
                "service": service, "from_member": session.owner.id, "to_member": owner.id,
                "epoch": redirect.epoch,
            })  # fmt: skip
            self.epoch = redirect.epoch
            del self._assigned[service]
            self._set_owner(service, owner)
            self._retire_if_idle(session)
            self._notify()
            return
        # A redirect we cannot follow: ask the Meta Server again, after a
        # pause that grows while the answers keep disagreeing.
        del self._assigned[service]
        self.owners[service] = None
        self._retire_if_idle(session)
        self._redirects[service] += 1
        delay = _backoff(self.settings, self._rng)
        delay.attempt = self._redirects[service] - 1
        log.warning("cannot follow a redirect; asking the Meta Server again", extra={
            "service": service, "from_member": session.owner.id,
            "to_member": None if owner is None else owner.id,
            "epoch": redirect.epoch, "our_epoch": self.epoch,
        })  # fmt: skip
        if not self._lookup_scheduled:
            # One timer for all: a burst of redirects costs one Lookup.
            self._lookup_scheduled = True
            assert self._nursery is not None
            self._nursery.start_soon(self._lookup_later, delay.next_delay())
        self._notify()

    async def _lookup_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self._lookup_scheduled = False
        if self._meta_link is not None:
            self._meta_link.send(wire.Lookup(tuple(self.tables)))
        # else: the next Meta Server connection starts with a Lookup anyway

    def _retire_if_idle(self, session: _Session) -> None:
        if session.idle:
            self._sessions.pop(session.owner, None)
            session.stop()

    # ------------------------------------------------------------- connections

    async def _connect(self, address: str, what: str) -> _Link:
        """A connection that said Welcome; raises _Closed otherwise."""
        settings = self.settings
        try:
            conn = await open_wire_stream(address, settings.connect_timeout)
        except (OSError, trio.TooSlowError) as exc:
            raise _Closed(f"cannot connect: {exc or type(exc).__name__}") from None
        try:
            with trio.fail_after(settings.connect_timeout):
                await conn.send(wire.Hello(wire.PROTOCOL_VERSION, settings.token,
                                           settings.client_id))  # fmt: skip
                answer = await conn.receive()
        except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError,
                wire.WireError) as exc:  # fmt: skip
            await _close(conn)
            raise _Closed(f"no welcome: {exc or type(exc).__name__}") from None
        if isinstance(answer, wire.Error):
            await _close(conn)
            raise _Closed(f"{what} refused us: {answer.code} {answer.message}")
        if not isinstance(answer, wire.Welcome):
            await _close(conn)
            raise _Closed(f"expected welcome, got {answer.type}")
        return _Link(conn, answer.server_id, settings, self.internal_errors)


class _Link:
    """One welcomed connection: a writer fed by a bounded queue, a keepalive, a reader.

    Everything sent goes through the queue, so messages leave in the order
    they were queued; :meth:`run` returns (never raises) why the connection
    ended.
    """

    def __init__(
        self, conn: wire.WireStream, server_id: str, settings: ControlSettings,
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
        and may raise :class:`_Closed` to end it."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._write)
                    nursery.start_soon(self._guard, self._keepalive)
                    nursery.start_soon(self._guard, self._read, handle)
        finally:
            self._outbox.close()
            await _close(self.conn)
        return self.reason or "closed"

    async def _guard(self, work: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await work(*args)
        except _Closed as exc:
            self.close(str(exc))
        except EOFError:
            self.close("closed by the server")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                wire.WireError) as exc:  # fmt: skip
            self.close(f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            # A bug met handling one message: this link closes and is opened
            # again; the proxy keeps forwarding on the tables it has.
            self.internal_errors.record(exc, server=self.server_id)
            self.close(f"internal error ({type(exc).__name__}); see the log")

    async def _write(self) -> None:
        async for message in self._queued:
            await self.conn.send(message)
        raise _Closed("finished")

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
                raise _Closed(f"silent for {dead_after:g} s")
            self._last_heard = trio.current_time()
            if isinstance(message, wire.Ping):
                self.send(wire.Pong())
            elif not isinstance(message, wire.Pong):
                handle(message)


async def _close(conn: wire.WireStream) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(conn.stream)


class _Session:
    """One Dispatcher, the services subscribed there, and its connection."""

    def __init__(self, control: ControlPlane, owner: wire.Owner) -> None:
        self.control = control
        self.owner = owner
        #: Services to subscribe to on every (re)connect.
        self.services: dict[str, None] = {}
        #: Services moving away: still subscribed until their new owner answers.
        self.leaving: set[str] = set()
        self.server_id: str | None = None
        self._link: _Link | None = None
        self._stopping = False
        self._pending_reports: collections.deque[wire.Report] = collections.deque(
            maxlen=control.settings.max_pending_reports
        )
        self._scope = trio.CancelScope()

    def status(self) -> SessionStatus:
        return SessionStatus(self.owner, self._link is not None, self.server_id,
                             frozenset(self.services), frozenset(self.leaving))  # fmt: skip

    @property
    def idle(self) -> bool:
        return not self.services and not self.leaving

    # ------------------------------------------------------------- changes

    def add(self, service: str) -> None:
        self.leaving.discard(service)
        self.services[service] = None
        table = self.control.tables[service]
        held = table.version if table.source == self.server_id else None
        self.send(wire.Subscribe({service: held}))

    def leave(self, service: str) -> None:
        """Keep ``service`` subscribed until its new owner answers (then :meth:`drop`)."""
        if service in self.services:
            del self.services[service]
            self.leaving.add(service)

    def drop(self, service: str) -> None:
        self.leaving.discard(service)
        self.services.pop(service, None)
        self.send(wire.Unsubscribe((service,)))
        self.control._retire_if_idle(self)

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

    def send_or_hold(self, report: wire.Report) -> None:
        if self._link is None:
            self._pending_reports.append(report)
        else:
            self._link.send(report)

    # ------------------------------------------------------------- the connection

    async def run(self) -> None:
        control = self.control
        backoff = _backoff(control.settings, control._rng)
        with self._scope:
            while True:
                try:
                    link = await control._connect(self.owner.subscribe_address,
                                                  f"Dispatcher {self.owner.id}")  # fmt: skip
                except _Closed as exc:
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
                control._notify()
                try:
                    reason = await link.run(self._handle)
                finally:
                    self._link = None
                    control._notify()
                _connection_ended(backoff, link.age)
                if self._stopping:
                    log.info("left a Dispatcher: no services of ours there",
                             extra={"member": self.owner.id})  # fmt: skip
                    return
                log.warning("lost a Dispatcher",
                            extra={"member": self.owner.id, "reason": reason})  # fmt: skip
                await trio.sleep(backoff.next_delay())

    def _held(self, services: Iterable[str]) -> dict[str, int | None]:
        held: dict[str, int | None] = {}
        for name in services:
            table = self.control.tables[name]
            held[name] = table.version if table.source == self.server_id else None
        return held

    def _handle(self, message: wire.Message) -> None:
        control = self.control
        if isinstance(message, wire.Full | wire.Deltas):
            control._on_update(self, message)
        elif isinstance(message, wire.Redirect):
            control._on_redirect(self, message)
        elif isinstance(message, wire.Error):
            raise _Closed(f"error from the Dispatcher: {message.code} {message.message}")
        else:
            log.debug("ignoring a message from a Dispatcher",
                      extra={"member": self.owner.id, "type": message.type})  # fmt: skip
