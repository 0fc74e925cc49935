"""A gateway joined to its shard: its membership store, its ownership, what it loads.

:class:`ShardWiring` is what ``[membership]`` and ``[sharding]`` add to a
:class:`~dispatcher.gateway.Gateway`; see :mod:`dispatcher.sharding.ownership`
for the handover protocol it follows.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from dispatcher.core.fanin import FanIn
from dispatcher.core.upstream import Listing, Status, Upstream
from dispatcher.sharding.config import ShardingConfig
from dispatcher.sharding.membership import (
    MembershipConfig,
    MembershipStore,
    Registration,
    open_membership,
)
from dispatcher.sharding.ownership import ShardedOwnership
from dispatcher.wire import join_address

if TYPE_CHECKING:
    from dispatcher.gateway import Gateway

__all__ = ["LINGER", "ShardWiring"]

log = logging.getLogger(__name__)


class ShardWiring:
    """One gateway as a shard: its membership store, its ownership, and what it loads.

    * :attr:`ownership` (:class:`~dispatcher.sharding.ownership.ShardedOwnership`) follows the store
      and answers the subscription server (and the health checker);
    * its :attr:`~dispatcher.sharding.ownership.ShardedOwnership.interest` (owned, outgoing and
      adopted
      services) is held as one subscription to the fan-in's hub, so the fan-in narrows its
      upstreams to it (interest "subscribed"); on a change the new subscription is taken
      before the old one is closed, so a service in both never loses its interest. A service
      the ownership lets go of stays held for :data:`LINGER` seconds: ownership often
      flips back within moments (several shards starting together, a shard restarting), and
      the adapters fold an interest that narrows and widens again while they are busy into no
      change at all, so they would not list again a service the fan-in dropped meanwhile;
    * every upstream is wrapped in a :class:`_TrackedUpstream`, which tells the ownership
      when a newly wanted service has been listed by every upstream and the fan-in has applied
      the listing: the "loaded" that ends a service's warm-up;
    * :meth:`join` registers the shard once its ports are bound (it must not be given
      services before it can serve them) and connects the subscription server's
      ``ownership_changed``.
    """

    def __init__(
        self,
        settings: ShardingConfig,
        store_config: MembershipConfig,
        node: str,
        fanin: FanIn,
        *,
        membership: MembershipStore | None = None,
    ) -> None:
        """``settings`` and ``store_config`` are the ``[sharding]`` and ``[membership]``
        tables; ``node`` is the gateway's node id, the member id when ``[sharding] id`` is
        not set. ``membership`` replaces the store ``store_config`` names."""
        self.settings = settings
        self.member_id = settings.id or node
        self.fanin = fanin
        self.store = membership if membership is not None else open_membership(store_config)
        self.ownership = ShardedOwnership(
            self.member_id,
            self.store,
            balance=settings.balance,
            warm_timeout=settings.warm_timeout,
        )
        self.tracked: tuple[_TrackedUpstream, ...] = ()
        self.registration: Registration | None = None
        self._hold: Any = None  # the hub subscription that holds the interest
        self._held: frozenset[str] = frozenset()
        #: Services the ownership let go of, still held -> trio time it let go.
        self._lingering: dict[str, float] = {}
        self._linger_wakeup = trio.Event()
        self.ownership.set_loaded_probe(self.loaded)
        self.ownership.add_listener(self._follow_interest)
        if settings.services:
            self.store.add_services(settings.services)

    def track(self, upstreams: Sequence[Upstream]) -> tuple[_TrackedUpstream, ...]:
        """The upstreams as the fan-in should run them (see :class:`_TrackedUpstream`)."""
        self.tracked = tuple(_TrackedUpstream(u, self.fanin, self) for u in upstreams)
        return self.tracked

    def loaded(self, service: str) -> bool:
        """Every upstream has listed ``service`` since it became wanted, and it is applied."""
        return all(tracked.loaded(service) for tracked in self.tracked)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.run)
                await nursery.start(self.ownership.run)
                nursery.start_soon(self._expire_lingering)
                task_status.started()
        finally:
            if self._hold is not None:
                self._hold.close()
                self._hold = None

    def join(self, gateway: Gateway) -> None:
        """Register in the store with the bound (or advertised) addresses."""
        settings = self.settings
        subscribe = settings.subscribe_address
        if not subscribe and gateway.subscription_port is not None:
            assert gateway.config.subscriptions is not None
            subscribe = _advertised(gateway.config.subscriptions.host, gateway.subscription_port)
        zookeeper = settings.zookeeper_address
        if not zookeeper and gateway.port is not None:
            zookeeper = _advertised(gateway.config.zookeeper.host, gateway.port)
        if gateway.subscriptions is not None:
            self.ownership.add_listener(gateway.subscriptions.ownership_changed)
        self.registration = Registration(self.member_id, subscribe, zookeeper, settings.weight)
        log.info("joining the shard membership", extra={
            "member": self.member_id,
            "subscribe_address": self.registration.subscribe_address,
            "zookeeper_address": self.registration.zookeeper_address,
            "weight": self.registration.weight,
        })  # fmt: skip
        self.store.register(self.registration)

    def _follow_interest(self) -> None:
        wanted = self.ownership.interest
        now = trio.current_time()
        for service in self._held - wanted:
            self._lingering.setdefault(service, now)
        for service in wanted & self._lingering.keys():
            del self._lingering[service]
        for service, since in list(self._lingering.items()):
            if now - since >= LINGER:
                del self._lingering[service]
        held = wanted | self._lingering.keys()
        if self._lingering:
            self._linger_wakeup.set()
        if held == self._held:
            return
        new = self.fanin.subscribe(held) if held else None
        if self._hold is not None:
            self._hold.close()
        self._hold, self._held = new, held

    async def _expire_lingering(self) -> None:
        while True:
            if not self._lingering:
                self._linger_wakeup = trio.Event()
                await self._linger_wakeup.wait()
                continue
            await trio.sleep_until(min(self._lingering.values()) + LINGER)
            self._follow_interest()


LINGER = 2.0
"""Seconds a service stays loaded after this shard stopped serving it (see ShardWiring)."""


def _advertised(host: str, port: int) -> str:
    """``host:port`` for others to dial; a wildcard address advertises the host name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return join_address(host, port)


_POLL_APPLIED = 0.002
"""Seconds between looks at the fan-in while waiting for it to apply a listing."""


class _TrackedUpstream:
    """An upstream as the fan-in runs it, noting which wanted services its listings covered.

    A :class:`~dispatcher.core.upstream.Listing` covers the services of its scope (all of them
    for scope None), and the adapters list exactly their interest of the moment, so a
    service is *loaded* here once a listing that covers it has been applied after the service
    became wanted (narrowing forgets it; the fan-in drops the data then too).

    "Applied": the fan-in applies each upstream's events in order, and shows the detail of
    the last :class:`~dispatcher.core.upstream.Status` in :attr:`FanIn.status`. So after relaying
    a listing that covers new services, the relay sends a Status with the same ``connected``
    and a detail that names the listing, and waits until the fan-in shows it (the detail is
    the adapter's own with ``[listing N applied]`` appended; the adapter's next Status
    replaces it). The fan-in has no hook for this; one (``on_listed``) would remove the
    marker (proposed to the lead).
    """

    def __init__(self, inner: Upstream, fanin: FanIn, wiring: ShardWiring) -> None:
        self.inner = inner
        self.name = inner.name
        self._fanin = fanin
        self._wiring = wiring
        self._interest: frozenset[str] | None = None
        self._listed: set[str] = set()
        self._listed_all = False
        self._connected = False
        self._detail = ""
        self._listings = 0

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> _TrackedUpstream:
        raise TypeError("a tracked upstream wraps a built one; it has no configuration")

    def set_interest(self, services: frozenset[str] | None) -> None:
        if services is not None:
            if self._interest is None and self._listed_all:
                # From everything to some: what was loaded stays loaded.
                self._listed = set(services)
            self._listed &= services
            self._listed_all = False
        self._interest = services
        self.inner.set_interest(services)

    def loaded(self, service: str) -> bool:
        return service in self._listed or (self._listed_all and self._interest is None)

    async def run(self, events: trio.MemorySendChannel[Any]) -> None:
        send, receive = trio.open_memory_channel[Any](16)
        self._connected, self._detail = False, ""  # as the fan-in sees a (re)started upstream
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._relay, receive, events)
            try:
                await self.inner.run(send)
            except Exception as exc:  # carried out by hand: the fan-in logs it, not a group
                failure = exc
            finally:
                send.close()  # the relay forwards what is left, then ends
        if failure is not None:
            raise failure

    async def _relay(
        self, receive: trio.MemoryReceiveChannel[Any], events: trio.MemorySendChannel[Any]
    ) -> None:
        async with receive:
            async for event in receive:
                await events.send(event)
                if isinstance(event, Status):
                    self._connected, self._detail = event.connected, event.detail
                elif isinstance(event, Listing):
                    covered = self._covered(event.services)
                    if covered:
                        await self._applied(events)
                        self._mark(event.services)
                        self._wiring.ownership.loaded_changed()

    def _covered(self, scope: frozenset[str] | None) -> bool:
        """Whether a listing of ``scope`` loads something not loaded yet."""
        if scope is None:
            return (
                not self._listed_all
                if self._interest is None
                else bool(self._interest - self._listed)
            )
        wanted = scope if self._interest is None else scope & self._interest
        return bool(wanted - self._listed)

    def _mark(self, scope: frozenset[str] | None) -> None:
        if scope is None:
            if self._interest is None:
                self._listed_all = True
            else:
                self._listed |= self._interest
        else:
            self._listed |= scope if self._interest is None else scope & self._interest

    async def _applied(self, events: trio.MemorySendChannel[Any]) -> None:
        self._listings += 1
        marker = f"{self._detail} [listing {self._listings} applied]".lstrip()
        await events.send(Status(self._connected, marker))
        while True:
            state = self._fanin.status.get(self.name)
            if state is not None and state.detail == marker:
                return
            await trio.sleep(_POLL_APPLIED)
