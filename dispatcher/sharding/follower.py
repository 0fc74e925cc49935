"""Services a local face wants and another shard owns, followed from their owner.

A sharded Dispatcher loads from its upstreams only the services it owns, and its
subscription server redirects proxies to the owner of the rest. A face that cannot be
redirected (an Envoy or a gRPC client holds one ADS stream to one management server and
asks it for every cluster it routes to) needs every service it asks for from the
Dispatcher it is connected to. :class:`Follower` gives such faces one
:class:`~dispatcher.core.subscriptions.SubscriptionHub` (:attr:`Follower.hub`) that
serves every service they subscribe to, wherever it is owned:

* a service this Dispatcher serves (``ownership.owns``) is read from the fan-in's hub,
  through one subscription per service;
* any other is subscribed over the subscription protocol (:mod:`dispatcher.wire_client`)
  at its owner (``ownership.owner_of``): one :class:`~dispatcher.wire_client.OwnerSession`
  per owner, one subscription per service there, however many local subscribers (xDS
  streams) want it;
* a service nobody subscribes to any more is unsubscribed at once (at the owner, or from
  the fan-in) and forgotten.

The hub's snapshot is the Follower's own: every source's ``Full`` or full entry is
applied as the difference from what is held, and every ``Deltas`` as its puts and
removals, so versions only grow and subscribers see deltas whatever the source.

Moves, with no empty entry in between. When a service's source changes (this
Dispatcher's ownership changed, or the owner sent a ``Redirect`` to a newer owner), the
new source is subscribed *first* and the old one keeps feeding the entry until the new
one has answered; only then is the old one unsubscribed. An owner that is gone (its
session keeps reconnecting) or a redirect to nobody leaves the last known entry served
until a source answers again. A redirect that cannot be followed (to nobody, or from an
epoch older than what was already followed) is retried from the local ownership after a
backoff that grows while the answers keep disagreeing.

A subscriber of :data:`~dispatcher.core.subscriptions.EVERYTHING` (an xDS wildcard
CDS/LDS stream) gets the services this Dispatcher serves plus the ones some subscriber
names: following every service of every shard for a wildcard would make each Dispatcher
hold the whole catalog, which is what sharding exists to avoid.

This room is :mod:`dispatcher.sharding`: without shards every service is owned here and
the faces read the fan-in's hub directly; the Follower exists only to bridge shards, and
it reads :class:`~dispatcher.sharding.ownership.ShardedOwnership`'s answers as the
subscription server does. Everything runs on the trio thread and never awaits while it
mutates state.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

import trio

from dispatcher import wire
from dispatcher.containment import InternalErrors
from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Health, Instance
from dispatcher.core.snapshot import Change, Put, Remove, Snapshot, diff
from dispatcher.core.subscriptions import DEFAULT_QUEUE, EVERYTHING, Subscription, SubscriptionHub
from dispatcher.sharding.ownership import ShardedOwnership
from dispatcher.wire_client import ClientSettings, OwnerSession, SessionStatus, new_backoff

__all__ = ["Follower"]

log = logging.getLogger(__name__)


class _Followed:
    """Where one followed service comes from now, and what still feeds it meanwhile."""

    __slots__ = (
        "answered",
        "local",
        "old_local",
        "redirect_epoch",
        "remote_source",
        "remote_version",
        "retries",
        "session",
    )

    def __init__(self) -> None:
        #: The fan-in subscription, when this Dispatcher serves the service.
        self.local: Subscription | None = None
        #: The session at the owner, when another Dispatcher serves it.
        self.session: OwnerSession | None = None
        #: Whether the current source (``local`` or ``session``) has answered yet; until
        #: it has, the previous one (``old_local``, or a session where the service is
        #: leaving) keeps feeding the entry.
        self.answered = False
        self.old_local: Subscription | None = None
        #: The version held from a remote source, and that source's Welcome id (versions
        #: mean something only to the server that made them).
        self.remote_version: int | None = None
        self.remote_source: str | None = None
        #: The epoch of the last redirect followed: older local answers do not undo it.
        self.redirect_epoch = -1
        #: Redirects that could not be followed in a row (the retry's backoff).
        self.retries = 0


class Follower:
    """Serves :attr:`hub` with every service subscribed there; see the module docstring.

    ``settings`` carries the subscription protocol's shared token and this client's id.
    Call :meth:`ownership_changed` whenever the ownership's answers change (pass it to
    ``ownership.add_listener``); :meth:`run` must be running before anyone subscribes
    to :attr:`hub`.
    """

    def __init__(
        self,
        fanin: FanIn,
        ownership: ShardedOwnership,
        settings: ClientSettings,
        *,
        max_queue: int = DEFAULT_QUEUE,
        rng: random.Random | None = None,
    ) -> None:
        self.fanin = fanin
        self.ownership = ownership
        self.settings = settings
        self.internal_errors = InternalErrors("follower")
        #: What the faces read: every service subscribed here, wherever it is owned.
        self.hub = SubscriptionHub(max_queue=max_queue, on_interest_changed=self._interest_changed)
        self._rng = rng or random.Random()
        self._snapshot = Snapshot()
        self._followed: dict[str, _Followed] = {}
        self._sessions: dict[wire.Owner, OwnerSession] = {}
        self._retry_at: float | None = None
        self._retry_wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: Updates applied from another Dispatcher (Full or Deltas), for metrics and tests.
        self.remote_updates = 0

    # ------------------------------------------------------------- reading

    @property
    def followed(self) -> frozenset[str]:
        """The services held now, local or remote."""
        return frozenset(self._followed)

    def remote(self) -> dict[str, SessionStatus]:
        """The sessions at other Dispatchers, by owner id."""
        return {s.owner.id: s.status() for s in self._sessions.values()}

    # ------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then every subscription (local, remote, the hub's) ends."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._retry_loop)
                task_status.started()
                self._sync()
        finally:
            self._nursery = None
            for followed in self._followed.values():
                for subscription in (followed.local, followed.old_local):
                    if subscription is not None:
                        subscription.close()
            self._followed.clear()
            self._sessions.clear()
            self.hub.close()

    def ownership_changed(self) -> None:
        """Re-place every followed service (the ownership listener)."""
        self._sync()

    # ------------------------------------------------------------- what is wanted

    def _wanted(self) -> set[str]:
        interest = self.hub.interest
        if interest is not None:
            return set(interest)
        named = {
            key
            for subscription in self.hub.subscriptions()
            for key in subscription.keys
            if key != EVERYTHING
        }
        ownership = self.ownership
        named.update(s for s in ownership.interest if ownership.owns(s))
        return named

    def _interest_changed(self) -> None:
        self._sync(replace=False)

    def _sync(self, *, replace: bool = True) -> None:
        """Follow what is wanted and nothing else; ``replace``: also re-place what was
        followed already (its owner may have changed)."""
        if self._nursery is None:
            return  # run() syncs when it starts
        wanted = self._wanted()
        for service in [s for s in self._followed if s not in wanted]:
            self._unfollow(service)
        for service in wanted:
            if service not in self._followed:
                self._followed[service] = _Followed()
            elif not replace:
                continue
            self._place(service)

    def _place(self, service: str) -> None:
        """Make the source of ``service`` the one the ownership names now."""
        followed = self._followed[service]
        ownership = self.ownership
        if ownership.epoch < followed.redirect_epoch:
            return  # a redirect told us newer news than our view has yet
        if ownership.owns(service):
            if followed.local is not None:
                return
            self._switch(service, followed)
            subscription = self.fanin.subscribe((service,))
            followed.local = subscription
            assert self._nursery is not None
            self._nursery.start_soon(self._drain, service, subscription)
            return
        owner = ownership.owner_of(service)
        if owner is None or owner.id == ownership.id:
            # Nobody can serve it, or it is warming here: keep what is held; the
            # ownership calls again when that changes.
            return
        if followed.session is not None and followed.session.owner == owner:
            return
        self._subscribe_at(service, followed, owner)

    def _switch(self, service: str, followed: _Followed) -> None:
        """The current source becomes a previous one, still feeding until the next answers."""
        if followed.local is not None:
            if followed.old_local is not None:
                followed.old_local.close()
            followed.old_local, followed.local = followed.local, None
        if followed.session is not None:
            followed.session.leave(service)
            followed.session = None
        followed.answered = False

    def _subscribe_at(self, service: str, followed: _Followed, owner: wire.Owner) -> None:
        self._switch(service, followed)
        session = self._sessions.get(owner)
        if session is None:
            session = self._sessions[owner] = OwnerSession(self, owner, self._rng)
            assert self._nursery is not None
            self._nursery.start_soon(session.run)
        log.info("following a service from its owner", extra={
            "service": service, "member": owner.id,
        })  # fmt: skip
        followed.session = session
        session.add(service)

    def _unfollow(self, service: str) -> None:
        followed = self._followed.pop(service)
        for subscription in (followed.local, followed.old_local):
            if subscription is not None:
                subscription.close()
        for session in tuple(self._sessions.values()):
            if service in session.services or service in session.leaving:
                session.drop(service)
        self._replace(service, ())

    def _answered(self, service: str, followed: _Followed) -> None:
        """The current source answered: the previous ones let go."""
        followed.answered = True
        followed.retries = 0
        if followed.old_local is not None:
            followed.old_local.close()
            followed.old_local = None
        for session in tuple(self._sessions.values()):
            if session is not followed.session and service in session.leaving:
                session.drop(service)

    # ------------------------------------------------------------- the entry

    def _replace(self, service: str, instances: Iterable[Instance]) -> None:
        self._apply(diff(self._snapshot.full(service).instances, instances))

    def _apply(self, changes: Iterable[Change]) -> None:
        snapshot, deltas = self._snapshot.apply(changes)
        if deltas:
            self._snapshot = snapshot
            self.hub.publish(snapshot, deltas)

    async def _drain(self, service: str, subscription: Subscription) -> None:
        async for update in subscription:
            followed = self._followed.get(service)
            if followed is None:
                return
            current = subscription is followed.local
            if not current and not (subscription is followed.old_local and not followed.answered):
                continue
            if update.full is not None:
                self._replace(service, update.full.instances.values())
            elif update.delta is not None:
                delta = update.delta
                self._apply((
                    *(Put(i) for i in (*delta.added, *delta.updated)),
                    *(Remove(service, i.instance_id) for i in delta.removed),
                ))  # fmt: skip
            if current and not followed.answered:
                followed.remote_version = followed.remote_source = None
                self._answered(service, followed)

    # ------------------------------------------------------------- the session host

    def held_version(self, service: str, server_id: str | None) -> int | None:
        followed = self._followed.get(service)
        if followed is None or followed.remote_source != server_id:
            return None
        return followed.remote_version

    def session_update(self, session: OwnerSession, message: wire.Full | wire.Deltas) -> None:
        service = message.service
        followed = self._followed.get(service)
        if followed is None:
            return
        current = session is followed.session
        if not current and not (
            service in session.leaving
            and not followed.answered
            and followed.remote_source in (session.server_id, None)
        ):
            return  # the new source answered already: the old one's news is stale
        server_id = session.server_id
        assert server_id is not None
        if isinstance(message, wire.Full):
            self._replace(service, _instances(service, message.instances))
            version = message.version
        elif followed.remote_source != server_id or followed.remote_version != message.from_version:
            log.info("deltas do not chain on the version held; asking for a Full", extra={
                "service": service, "member": session.owner.id,
                "from_version": message.from_version, "version": followed.remote_version,
            })  # fmt: skip
            session.send(wire.Subscribe({service: None}))
            return
        else:
            self._apply((
                *(Put(i) for i in _instances(service, message.upserted)),
                *(Remove(service, instance_id) for instance_id in message.removed),
            ))  # fmt: skip
            version = message.to_version
        followed.remote_version, followed.remote_source = version, server_id
        self.remote_updates += 1
        session.send(wire.Ack(service, version))
        if current and not followed.answered:
            self._answered(service, followed)

    def session_redirect(self, session: OwnerSession, redirect: wire.Redirect) -> None:
        service = redirect.service
        followed = self._followed.get(service)
        if followed is not None and followed.session is session:
            followed.session = None
            owner = redirect.owner
            if (
                owner is not None
                and owner != session.owner
                and owner.id != self.ownership.id
                and redirect.epoch >= max(self.ownership.epoch, followed.redirect_epoch)
            ):
                log.info("service redirected to another Dispatcher", extra={
                    "service": service, "from_member": session.owner.id, "to_member": owner.id,
                    "epoch": redirect.epoch,
                })  # fmt: skip
                followed.redirect_epoch = redirect.epoch
                self._subscribe_at(service, followed, owner)
            else:
                # The owner and our view disagree (or it points back at us while we
                # are still warming): ask our view again, later, keeping the entry.
                followed.retries += 1
                delay = new_backoff(self.settings, self._rng)
                delay.attempt = followed.retries - 1
                self._retry_in(delay.next_delay())
        if session.idle:
            self.session_idle(session)

    def session_idle(self, session: OwnerSession) -> None:
        if session.idle:
            self._sessions.pop(session.owner, None)
            session.stop()

    def session_changed(self) -> None:
        pass  # nothing here waits on a session's connection

    def session_policy(self, session: OwnerSession, message: wire.PolicyUpdate) -> None:
        pass  # never asked for (``settings.policies`` is off): faces read the local feed

    # ------------------------------------------------------------- retries

    def _retry_in(self, delay: float) -> None:
        at = trio.current_time() + delay
        if self._retry_at is None or at < self._retry_at:
            self._retry_at = at
            self._retry_wakeup.set()

    async def _retry_loop(self) -> None:
        while True:
            if self._retry_at is None:
                self._retry_wakeup = trio.Event()
                await self._retry_wakeup.wait()
                continue
            wakeup = self._retry_wakeup = trio.Event()
            with trio.move_on_at(self._retry_at):
                await wakeup.wait()
            if self._retry_at is not None and trio.current_time() >= self._retry_at:
                self._retry_at = None
                for service, followed in tuple(self._followed.items()):
                    if followed.session is None and followed.local is None:
                        followed.redirect_epoch = -1
                        self._place(service)


_HEALTH = {health.value: health for health in Health}


def _instances(service: str, received: Iterable[wire.WireInstance]) -> list[Instance]:
    """The model's instances for what an owner sent; one it could not have meant (a port
    out of range, a negative weight) is left out, with a log line."""
    out: list[Instance] = []
    for item in received:
        try:
            out.append(Instance(
                service, item.id, item.host, item.port, weight=item.weight, zone=item.zone,
                metadata=item.metadata, health=_HEALTH.get(item.health, Health.UNKNOWN),
            ))  # fmt: skip
        except (TypeError, ValueError) as exc:
            log.warning("ignoring an instance an owner sent", extra={
                "service": service, "instance": wire.clip(item.id), "error": str(exc),
            })  # fmt: skip
    return out
