"""One Dispatcher's share of the services: what it owns, what it hands over, what it loads.

:class:`ShardedOwnership` is the sharded implementation of the Dispatcher's ownership protocol
(``dispatcher/core/ownership.py``: ``epoch``, ``owns(service)``, ``owner_of(service)``, and the
subscription server's ``ownership_changed()`` hook, which it calls through
:meth:`ShardedOwnership.add_listener`). It follows the membership views of a
:class:`~dispatcher.sharding.membership.MembershipStore`, computes the same
:func:`~dispatcher.sharding.assignment.assign` as every Meta Server and every other Dispatcher, and
tells the Dispatcher which services to load (:attr:`ShardedOwnership.interest`).

Handover: "at no moment is a service unserved". A service moves from an old owner A to a new
owner B when both have seen the membership or catalog change that moves it (its epoch is the
view's *inputs epoch* I, the same for everyone; see :mod:`dispatcher.sharding.membership`):

1. B puts the service in its interest at once, so its upstreams load it. Until the Dispatcher
   reports it loaded (the probe given to :meth:`~ShardedOwnership.set_loaded_probe`: every
   upstream has listed it and the fan-in has applied the listing), B is *warming* it:
   ``owns`` is False and ``owner_of`` names A, the member B saw owning it before (None if A is
   gone: then nobody serves it for the moment B takes to load it, which is what a crash costs).
2. A keeps serving the service, and keeps it in its interest, as *outgoing*: ``owns`` stays
   True, so A's subscribers stay put and see every change.
3. When B has loaded every service assigned to it under inputs epoch I, it publishes its warm
   marker I in the store (:meth:`MembershipStore.set_warm`). Every member does so after every
   change of the inputs, whether or not anything moved to it (others may be waiting for it:
   what each one saw move depends on which views it happened to read). Publishing a marker is
   itself an epoch change (E' > I) that moves no service, and is done once per inputs epoch.
4. At E', A sees B's marker reach the current inputs epoch, drops the service (``owns``
   False, ``owner_of`` B), and tells its listeners: the subscription server redirects the
   subscribers to B.

B answers ``owns`` True for a service as soon as it has loaded it, before its marker: between
that and E' both serve it, never neither (B cannot wait for its own marker to come back: A and
B read the view of E' each in its own time, and A might let go first). That acceptance is the
one answer that changes without the epoch; every other change of ``owns`` or ``owner_of`` comes
with a new epoch, as the ownership protocol promises. It cannot mislead a proxy that goes by the
larger epoch: the only Redirect B sent before it pointed at A, at an epoch before E', and A's
Redirect to B carries E'. (Adopting an uncataloged service, below, likewise goes from "never
asked" to served.)

A warm marker is per member and per inputs epoch, not per service: one small record per
Dispatcher instead of one per service, at the price that one slow service holds back every
handover to that Dispatcher. ``warm_timeout`` bounds the wait: a service not loaded after
that long (its upstream is down, say) counts as warm, so a broken upstream cannot pin services
to an old owner for ever; the fan-in then serves whatever it has, marked stale.

Services nobody has cataloged yet (a proxy asks for a brand-new name): the Meta Server answers
with :meth:`Assignment.owner`'s fallback, and so does ``owns`` here. The Dispatcher that is the
fallback owner *adopts* the service: it serves it at once (cold, as any Dispatcher serves a
service's first subscriber) and adds the name to the catalog. The next epoch includes it, and
if the full assignment puts it elsewhere it is handed over like any other service. At most
``max_adopted`` services are adopted at a time, so nobody can grow the catalog without bound
through one Dispatcher.

Everything here runs on the trio thread. :func:`assign` runs in a worker thread (it is pure
and its inputs are immutable) so that a large catalog does not stall the Dispatcher.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Final

import attrs
import trio

from dispatcher.sharding.assignment import (
    DEFAULT_BALANCE,
    Assignment,
    Member,
    NoLiveMembersError,
    assign,
)
from dispatcher.sharding.membership import MembershipStore, View, owner_endpoints
from dispatcher.wire import Owner

__all__ = ["DEFAULT_WARM_TIMEOUT", "ShardedOwnership", "member_owner"]

log = logging.getLogger(__name__)

DEFAULT_WARM_TIMEOUT: Final = 10.0
DEFAULT_MAX_ADOPTED: Final = 10_000


def member_owner(member: Member) -> Owner:
    """The wire :class:`Owner` for a member of the assignment."""
    subscribe, zookeeper = owner_endpoints(member)
    return Owner(member.id, subscribe, zookeeper)


def _assign_or_none(
    catalog: frozenset[str], members: tuple[Member, ...], balance: float, epoch: int
) -> Assignment | None:
    try:
        return assign(catalog, members, balance, epoch=epoch)
    except NoLiveMembersError:
        return None


@attrs.frozen
class _Computed:
    view: View
    assignment: Assignment | None
    #: Where the services were before this member joined: the assignment without it. Only
    #: computed for the first view this member appears in, when it has no history of its own.
    baseline: Assignment | None


class ShardedOwnership:
    """Ownership of services by one Dispatcher shard (see the module docstring).

    ``member_id`` is this Dispatcher's id in the store (the gateway registers it there once its
    ports are bound). ``balance`` must be the same for every Dispatcher and Meta Server.
    """

    def __init__(
        self,
        member_id: str,
        store: MembershipStore,
        *,
        balance: float = DEFAULT_BALANCE,
        warm_timeout: float = DEFAULT_WARM_TIMEOUT,
        max_adopted: int = DEFAULT_MAX_ADOPTED,
    ) -> None:
        if not (math.isfinite(warm_timeout) and warm_timeout > 0):
            raise ValueError(f"warm_timeout must be > 0, got {warm_timeout!r}")
        self.id = member_id
        self.store = store
        self.balance = balance
        self.warm_timeout = warm_timeout
        self.max_adopted = max_adopted
        self._loaded: Callable[[str], bool] = lambda service: True
        self._listeners: list[Callable[[], None]] = []
        self._view: View | None = None
        self._assignment: Assignment | None = None
        self._owned: frozenset[str] = frozenset()
        #: Owned here but not loaded yet -> trio time it was assigned here.
        self._warming: dict[str, float] = {}
        #: Owned here and warming -> the member that owned it before (it serves meanwhile).
        self._came_from: dict[str, str] = {}
        #: No longer owned here, still served -> its new owner (None: no member at all).
        self._outgoing: dict[str, str | None] = {}
        #: Uncataloged services served here (ordered set).
        self._adopted: dict[str, None] = {}
        self._warm_published: int | None = None
        self._signature: tuple[object, ...] = ()
        self._wake_send, self._wake_receive = trio.open_memory_channel[None](1)

    # ------------------------------------------------------------- the protocol

    @property
    def epoch(self) -> int:
        """The epoch of the view this Dispatcher acts on (0 before the first view)."""
        return self._view.epoch if self._view is not None else 0

    def owns(self, service: str) -> bool:
        """True if this Dispatcher serves ``service`` now (see the module docstring).

        Asking about an uncataloged service of which this Dispatcher is the fallback owner
        adopts it (and schedules its addition to the catalog).
        """
        if service in self._outgoing or service in self._adopted:
            return True
        if service in self._owned:
            return service not in self._warming
        view, assignment = self._view, self._assignment
        if view is None or assignment is None or service in view.catalog or not service:
            return False
        if assignment.owner(service).id != self.id or len(self._adopted) >= self.max_adopted:
            return False
        self._adopt(service)
        return True

    def probes(self, service: str) -> bool:
        """Whether this Dispatcher's health checker probes ``service`` now.

        Exactly one member does, also during a handover, when both the old
        and the new owner serve it: the assigned owner (warming or not), or
        the old one while no member is assigned at all. Unlike :meth:`owns`
        this never adopts anything.
        """
        if service in self._owned or service in self._adopted:
            return True
        return service in self._outgoing and self._outgoing[service] is None

    def owner_of(self, service: str) -> Owner | None:
        """Where a subscriber of ``service`` should go: this Dispatcher if it serves it, the
        member it came from while it warms here, else its owner; None when nobody can take it
        (no live member, or its previous owner died and it is still loading here)."""
        view, assignment = self._view, self._assignment
        if view is None or assignment is None:
            return None
        if service in self._warming:
            previous = self._came_from.get(service)
            member = view.member(previous) if previous is not None else None
            return member_owner(member) if member is not None else None
        if service in self._owned or service in self._outgoing or service in self._adopted:
            me = view.member(self.id)
            return member_owner(me) if me is not None else None
        return member_owner(assignment.owner(service))

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the trio thread, never from inside ``owns``) whenever the
        answers of ``epoch``, ``owns``, ``owner_of`` or ``interest`` may have changed. The
        subscription server passes its ``ownership_changed``."""
        self._listeners.append(callback)

    # -------------------------------------------------------- for the Dispatcher

    @property
    def interest(self) -> frozenset[str]:
        """The services this Dispatcher must load: owned (warm or warming), outgoing, adopted."""
        return self._owned | self._outgoing.keys() | self._adopted.keys()

    @property
    def warming(self) -> frozenset[str]:
        return frozenset(self._warming)

    @property
    def outgoing(self) -> frozenset[str]:
        return frozenset(self._outgoing)

    @property
    def marked(self) -> bool:
        """This member's warm marker in the view covers the current inputs epoch (nobody is
        waiting for it any more)."""
        view = self._view
        return view is not None and view.warm.get(self.id, -1) >= view.inputs_epoch

    @property
    def view(self) -> View | None:
        return self._view

    @property
    def assignment(self) -> Assignment | None:
        return self._assignment

    def set_loaded_probe(self, loaded: Callable[[str], bool]) -> None:
        """How to tell that a service's data is loaded (default: always). Call
        :meth:`loaded_changed` whenever its answer may have become True."""
        self._loaded = loaded
        self._wake()

    def loaded_changed(self) -> None:
        self._wake()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the store's views until cancelled (the store's own ``run`` runs elsewhere)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_views)
            task_status.started()
            computed: _Computed | None = None
            while True:
                deadline = min(self._warming.values(), default=math.inf) + self.warm_timeout
                with trio.move_on_at(deadline):
                    await self._wake_receive.receive()
                view = self.store.feed.view
                if view is not None and view is not self._view:
                    if computed is not None and view.same_inputs(computed.view):
                        # Same members and catalog (a warm marker moved the epoch): the same
                        # assignment, at the new epoch, without computing it again.
                        assignment = computed.assignment
                        if assignment is not None:
                            assignment = attrs.evolve(assignment, epoch=view.epoch)
                        computed = _Computed(view, assignment, computed.baseline)
                    else:
                        computed = await self._compute(view)
                    self._apply(view, computed)
                self._check_warming()
                self._notify()

    async def _follow_views(self) -> None:
        serial = 0
        while True:
            serial, _ = await self.store.feed.wait_newer(serial)
            self._wake()

    async def _compute(self, view: View) -> _Computed:
        members = view.members
        baseline = None
        first = self._assignment is None and view.member(self.id) is not None
        others = tuple(m for m in members if m.id != self.id)
        if first and others:
            baseline = await trio.to_thread.run_sync(
                _assign_or_none, view.catalog, others, self.balance, view.epoch
            )
        assignment = await trio.to_thread.run_sync(
            _assign_or_none, view.catalog, members, self.balance, view.epoch
        )
        return _Computed(view, assignment, baseline)

    def _apply(self, view: View, computed: _Computed) -> None:
        """Move to a new view (sync: no subscriber sees a half-applied state)."""
        assignment = computed.assignment
        previous = self._assignment or computed.baseline
        now = trio.current_time()
        owned = assignment.services_of(self.id) if assignment is not None else frozenset()
        for service in owned - self._owned:
            served = service in self._outgoing or service in self._adopted
            self._outgoing.pop(service, None)
            self._adopted.pop(service, None)
            if served:
                continue  # it never stopped being served here: nothing to warm or wait for
            self._warming[service] = now
            if previous is not None:
                before = previous.owner(service).id
                if before != self.id:
                    self._came_from[service] = before
        for service in self._owned - owned:
            was_warming = self._warming.pop(service, None) is not None
            self._came_from.pop(service, None)
            if not was_warming:
                # Served here until the new owner is warm (or kept while nobody is a member).
                self._outgoing[service] = self._target(assignment, service)
        for service in [s for s in self._adopted if s in view.catalog]:
            # Cataloged now; if it is not ours it is handed over like any other.
            del self._adopted[service]
            if service not in owned:
                self._outgoing[service] = self._target(assignment, service)
        for service in list(self._outgoing):
            target = self._outgoing[service] = self._target(assignment, service)
            if assignment is not None and service not in view.catalog:
                del self._outgoing[service]  # an operator removed it from the catalog
            elif target is not None and view.warm.get(target, -1) >= view.inputs_epoch:
                del self._outgoing[service]  # the new owner has everything loaded
        self._owned = owned
        self._view = view
        self._assignment = assignment

    @staticmethod
    def _target(assignment: Assignment | None, service: str) -> str | None:
        if assignment is None:
            return None
        owner = assignment.owners.get(service)
        return owner if owner is not None else assignment.owner(service).id

    def _check_warming(self) -> None:
        now = trio.current_time()
        for service, since in list(self._warming.items()):
            if self._loaded(service):
                del self._warming[service]
                self._came_from.pop(service, None)
            elif now - since >= self.warm_timeout:
                log.warning(
                    "service not loaded within warm_timeout of its assignment; serving it anyway",
                    extra={
                        "service": service,
                        "member": self.id,
                        "warm_timeout": self.warm_timeout,
                    },
                )
                del self._warming[service]
                self._came_from.pop(service, None)
        view = self._view
        if (
            not self._warming
            and view is not None
            and view.member(self.id) is not None
            and self._warm_published != view.inputs_epoch
        ):
            # Everything assigned here is loaded: say so, once per inputs epoch (the marker
            # is itself an epoch change; publishing on every epoch would never stop).
            self._warm_published = view.inputs_epoch
            self.store.set_warm(view.inputs_epoch)

    def _adopt(self, service: str) -> None:
        log.info("adopting an uncataloged service", extra={"service": service, "member": self.id})
        self._adopted[service] = None
        try:
            self.store.add_services([service])
        except ValueError as exc:  # a name no store can hold: serve it, never catalog it
            log.warning("cannot catalog a service", extra={"service": service, "error": str(exc)})
        self._wake()

    def _wake(self) -> None:
        # Already woken: the loop looks at everything when it runs.
        with contextlib.suppress(trio.WouldBlock):
            self._wake_send.send_nowait(None)

    def _notify(self) -> None:
        signature = (
            self.epoch,
            self._owned,
            frozenset(self._warming),
            frozenset(self._outgoing),
            frozenset(self._adopted),
        )
        if signature == self._signature:
            return
        self._signature = signature
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("ownership listener failed", extra={"listener": repr(callback)})
