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
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from dispatcher import wire
from dispatcher.backoff import Backoff
from dispatcher.containment import InternalErrors
from dispatcher.wire_client import (
    ClientSettings,
    Closed,
    Link,
    OwnerSession,
    SessionStatus,
    connect,
    connection_ended,
    new_backoff,
    open_wire_stream,
)
from proxy.endpoints import ServiceTable

__all__ = ["ControlPlane", "ControlSettings", "SessionStatus", "open_wire_stream"]

log = logging.getLogger(__name__)


def _default_client_id() -> str:
    return f"zkgate-proxy/{socket.gethostname()}/{os.getpid()}"


@attrs.frozen
class ControlSettings(ClientSettings):
    """The control-plane client's settings (:class:`~dispatcher.wire_client.ClientSettings`),
    with the proxy's own default ``client_id``."""

    client_id: str = attrs.field(factory=_default_client_id)


# The protocol-generic client lives in dispatcher.wire_client (a Dispatcher that
# follows a service from its owner uses it too); the names this module used.
_Closed = Closed
_Link = Link
_connection_ended = connection_ended


def _backoff(settings: ControlSettings, rng: random.Random) -> Backoff:
    return new_backoff(settings, rng)


class ControlPlane:
    """Keeps ``tables`` current from the Meta Server at ``meta``; see the module docstring."""

    def __init__(
        self,
        meta: str,
        tables: Mapping[str, ServiceTable],
        settings: ControlSettings | None = None,
        *,
        rng: random.Random | None = None,
        on_policy: Callable[[str, int, Mapping[str, Any]], bool] | None = None,
    ) -> None:
        if not tables:
            raise ValueError("a control plane needs at least one service")
        self.meta = meta
        self.tables = dict(tables)
        self.settings = settings or ControlSettings()
        #: ``on_policy(service, version, policy)`` applies a service's policy (True if it
        #: did); given, the proxy asks the Dispatchers for policies and acknowledges them.
        self.on_policy = on_policy
        if on_policy is not None:
            self.settings = attrs.evolve(self.settings, policies=True)
        self._rng = rng or random.Random()
        self.internal_errors = InternalErrors("proxy-control")
        #: The newest assignment epoch seen (from the Meta Server or a Redirect).
        self.epoch = -1
        #: The owner of each service as last learned; None: nobody (or not yet known).
        self.owners: dict[str, wire.Owner | None] = dict.fromkeys(self.tables)
        #: Whether the Meta Server connection is up (Welcome received).
        self.meta_connected = False
        self._sessions: dict[wire.Owner, OwnerSession] = {}
        #: The session each service is subscribed through (its current owner's).
        self._assigned: dict[str, OwnerSession] = {}
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

    def send_outcomes(self, service: str, outcomes: wire.Outcomes) -> bool:
        """Hand ``outcomes`` to the owner of ``service`` now (never blocks); False: dropped
        (no owner connected yet, or one whose Welcome did not offer to take them)."""
        session = self._assigned.get(service)
        return session is not None and session.send_outcomes(outcomes)

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
            target = self._sessions[owner] = OwnerSession(self, owner, self._rng)
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

    def _on_update(self, session: OwnerSession, message: wire.Full | wire.Deltas) -> None:
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
        version = message.to_version if isinstance(message, wire.Deltas) else message.version
        session.send(wire.Ack(service, version, table.digest()))
        if session is assigned:
            self._redirects.pop(service, None)
            # The new owner answered: the old one can let go.
            for other in tuple(self._sessions.values()):
                if other is not session and service in other.leaving:
                    other.drop(service)
        self._notify()

    def _on_redirect(self, session: OwnerSession, redirect: wire.Redirect) -> None:
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

    def _retire_if_idle(self, session: OwnerSession) -> None:
        if session.idle:
            self._sessions.pop(session.owner, None)
            session.stop()

    # ------------------------------------------------------------- connections

    async def _connect(self, address: str, what: str) -> Link:
        """A connection that said Welcome; raises Closed otherwise."""
        return await connect(address, what, self.settings, self.internal_errors)

    # ------------------------------------------------------------- the session host

    def held_version(self, service: str, server_id: str | None) -> int | None:
        table = self.tables[service]
        return table.version if table.source == server_id else None

    def session_update(self, session: OwnerSession, message: wire.Full | wire.Deltas) -> None:
        self._on_update(session, message)

    def session_redirect(self, session: OwnerSession, redirect: wire.Redirect) -> None:
        self._on_redirect(session, redirect)

    def session_policy(self, session: OwnerSession, message: wire.PolicyUpdate) -> None:
        # Only the current owner's word counts: every Dispatcher reads the same governance
        # versions, and the owner is the one that keeps sending them.
        service = message.service
        if self.on_policy is None or self._assigned.get(service) is not session:
            return
        if self.on_policy(service, message.version, message.policy):
            session.send(wire.PolicyAck(service, message.version))
        self._notify()

    def session_idle(self, session: OwnerSession) -> None:
        self._retire_if_idle(session)

    def session_changed(self) -> None:
        self._notify()
