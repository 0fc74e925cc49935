"""In-process subscriptions to the snapshot: a full entry first, then deltas.

A consumer (the subscription server's connection to one proxy, a projection
into ZooKeeper paths, a test) calls :meth:`SubscriptionHub.subscribe` with the
service names it cares about and iterates the :class:`Subscription` it gets
back. Every service's first :class:`Update` is a full :class:`ServiceEntry`;
after that come the :class:`Delta`\\ s the fan-in publishes, each chaining on
the previous one (``from_version`` equals the version the subscriber last saw
for that service).

Publishing never waits for a subscriber. Each subscription has a bounded
queue; when a slow subscriber's queue is full, its queued updates are thrown
away and every service they (and any later update) concerned is marked
*dirty*. A dirty service is delivered as one full entry read from the hub's
current snapshot at the moment the subscriber asks for it, so the subscriber
skips straight to the newest state and never sees a gap. Memory per
subscription is therefore bounded by ``max_queue`` updates plus one set entry
per subscribed service, however far behind it falls.

The hub indexes subscribers by service in a
:class:`~dispatcher.core.watch_index.WatchIndex`: a publish costs one lookup per
changed service, and the first subscriber of a service (or the last one to
leave) is reported to the owner through ``on_interest_changed``, so that ten
thousand subscribers of one service cost the upstream registries one
interest, not ten thousand.

All of this runs on the trio thread and nothing in it awaits while it
mutates state, so the fan-in's publish and a subscriber's subscribe or close
can never interleave halfway.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Final

import attrs
import trio

from dispatcher.core.snapshot import Delta, ServiceEntry, Snapshot
from dispatcher.core.watch_index import WatchIndex

__all__ = [
    "DEFAULT_QUEUE",
    "EVERYTHING",
    "Subscription",
    "SubscriptionHub",
    "Update",
]

EVERYTHING: Final = "*"
"""The key that subscribes to every service, present and future.

``*`` cannot clash with a service name in practice: none of the registries
we front (ZooKeeper paths, etcd keys under a prefix, Consul service names)
produce it as a whole service name.
"""

DEFAULT_QUEUE: Final = 1024
"""Updates a subscriber may have waiting before it is collapsed to full entries."""


@attrs.frozen(slots=True)
class Update:
    """One step for one service: a delta, or the whole current entry.

    ``version`` is the snapshot version at which this update is true: the
    delta's ``to_version``, or for a full entry the snapshot's version when
    it was read (the entry's own ``full.version`` is when that service last
    changed, which may be older). Within one subscription ``version`` never
    goes down.

    Exactly one of ``delta`` and ``full`` is set. A consumer that receives a
    full entry replaces everything it held for ``service``; a delta applies
    on top of the state it holds, and its ``from_version`` is always the
    version the consumer last saw for that service (a service the consumer
    never saw starts with a full entry).
    """

    version: int
    service: str
    delta: Delta | None = None
    full: ServiceEntry | None = None


class Subscription:
    """An async iterator of :class:`Update` for a fixed set of services.

    Get one from :meth:`SubscriptionHub.subscribe`. Use it as an async
    context manager, which unsubscribes on exit; otherwise call
    :meth:`close` when done, since the hub keeps every open subscription.
    After :meth:`close`, iteration ends (a reader blocked in it wakes up and
    stops). One task at a time may iterate a subscription.

    ``collapses`` counts how often this subscriber fell ``max_queue``
    updates behind and had its queue collapsed into full entries.
    """

    __slots__ = (
        "_closed",
        "_dirty",
        "_hub",
        "_queue",
        "_reading",
        "_seen",
        "_wakeup",
        "collapses",
        "keys",
        "max_queue",
    )

    def __init__(self, hub: SubscriptionHub, keys: frozenset[str], max_queue: int) -> None:
        self._hub = hub
        self.keys = keys
        self.max_queue = max_queue
        self.collapses = 0
        self._queue: collections.deque[Update] = collections.deque()
        # Services whose next update is their full current entry, in the
        # order they became dirty (a dict is an ordered set). While this is
        # non-empty every new update goes here too, so a service's queued
        # deltas are always older than its full entry.
        self._dirty: dict[str, None] = {}
        # For EVERYTHING only: services this subscriber has been told about,
        # so that a service it never saw starts with a full entry.
        self._seen: set[str] | None = None
        self._wakeup: trio.Event | None = None
        self._reading = False
        self._closed = False

    @property
    def pending(self) -> int:
        """Updates waiting to be read: queued deltas plus dirty services."""
        return len(self._queue) + len(self._dirty)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unsubscribe; idempotent. A blocked reader wakes up and iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._dirty.clear()
        self._wake()
        self._hub._unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Update:
        if self._reading:
            raise trio.BusyResourceError("another task is already reading this subscription")
        self._reading = True
        try:
            while not self._closed:
                update = self._next_ready()
                if update is not None:
                    # Yield even when an update was ready, so that a consumer
                    # that keeps up cannot starve the rest of the process.
                    await trio.lowlevel.checkpoint()
                    return update
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            raise StopAsyncIteration
        finally:
            self._reading = False

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Subscription(keys={sorted(self.keys)!r}, pending={self.pending}, "
            f"collapses={self.collapses}, closed={self._closed})"
        )

    # ------------------------------------------------------- hub side (sync)

    def _start(self, snapshot: Snapshot) -> None:
        # The first full entries are produced lazily, like collapsed ones:
        # marking every key dirty costs one set entry per key, and the entry
        # is read when the subscriber asks for it, so it is as fresh as can be.
        if EVERYTHING in self.keys:
            self._seen = set(snapshot)
            self._dirty = dict.fromkeys(snapshot)
        else:
            self._dirty = dict.fromkeys(sorted(self.keys))
        self._wake()

    def _push(self, update: Update) -> None:
        service = update.service
        if self._seen is not None and service not in self._seen:
            self._seen.add(service)
            self._mark_dirty(service)
        elif self._dirty:
            self._mark_dirty(service)
        elif len(self._queue) >= self.max_queue:
            self._collapse(service)
        else:
            self._queue.append(update)
            self._wake()

    def _collapse(self, service: str) -> None:
        self.collapses += 1
        for queued in self._queue:
            self._dirty[queued.service] = None
        self._queue.clear()
        self._mark_dirty(service)

    def _mark_dirty(self, service: str) -> None:
        self._dirty[service] = None
        self._wake()

    def _next_ready(self) -> Update | None:
        if self._queue:
            return self._queue.popleft()
        if self._dirty:
            service = next(iter(self._dirty))
            del self._dirty[service]
            snapshot = self._hub.snapshot
            return Update(snapshot.version, service, None, snapshot.full(service))
        return None

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None


class SubscriptionHub:
    """Every open :class:`Subscription`, indexed by service, and the fan-out to them.

    The owner (the fan-in) calls :meth:`publish` with each new snapshot and
    its deltas. ``on_interest_changed`` is called (synchronously, after the
    index is updated) whenever a service gains its first subscriber or loses
    its last one; :attr:`interest` then tells what is wanted now.
    """

    def __init__(
        self,
        *,
        max_queue: int = DEFAULT_QUEUE,
        on_interest_changed: Callable[[], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._on_interest_changed = on_interest_changed
        self._index: WatchIndex[str, Subscription] = WatchIndex()
        self._snapshot = Snapshot()
        self._open = 0
        #: How many times a service gained its first subscriber (an upstream
        #: interest was created); for metrics and tests.
        self.interest_added = 0
        #: How many times a service lost its last subscriber.
        self.interest_removed = 0

    @property
    def snapshot(self) -> Snapshot:
        """The last snapshot published; full entries are read from it."""
        return self._snapshot

    @property
    def interest(self) -> frozenset[str] | None:
        """The services someone subscribes to; None when someone subscribes to everything."""
        keys = self._index.keys()
        if EVERYTHING in keys:
            return None
        return frozenset(keys)

    @property
    def subscriber_count(self) -> int:
        """Open subscriptions."""
        return self._open

    def subscribe(self, keys: Iterable[str], *, max_queue: int | None = None) -> Subscription:
        """Subscribe to ``keys`` (service names, or :data:`EVERYTHING`).

        The subscription is registered at once: nothing published after this
        call is missed, even if the caller starts iterating later. Its first
        update for each service is that service's full entry (empty for a
        service with no instances). ``max_queue`` overrides the hub's default
        bound for this subscriber.
        """
        wanted = frozenset(keys)
        if not wanted:
            raise ValueError("subscribe to at least one service")
        for key in wanted:
            if not isinstance(key, str) or not key:
                raise ValueError(f"service names must be non-empty strings, got {key!r}")
        if EVERYTHING in wanted:
            # Everything includes the rest; keeping only "*" means a publish
            # finds this subscriber under one key and delivers once.
            wanted = frozenset((EVERYTHING,))
        bound = self.max_queue if max_queue is None else max_queue
        if bound < 1:
            raise ValueError(f"max_queue must be >= 1, got {bound}")
        subscription = Subscription(self, wanted, bound)
        subscription._start(self._snapshot)
        self._open += 1
        firsts = 0
        for key in sorted(wanted):
            if self._index.add(key, subscription):
                firsts += 1
        if firsts:
            self.interest_added += firsts
            self._interest_changed()
        return subscription

    def publish(self, snapshot: Snapshot, deltas: Iterable[Delta]) -> None:
        """Make ``snapshot`` current and hand each delta to its subscribers.

        Never blocks and never fails because of a subscriber: a full queue
        collapses (see the module docstring). ``deltas`` must be those that
        lead from the previously published snapshot to ``snapshot``.
        """
        self._snapshot = snapshot
        everyone = self._index.subscribers(EVERYTHING)
        for delta in deltas:
            update = Update(delta.to_version, delta.service, delta, None)
            for subscription in self._index.subscribers(delta.service):
                subscription._push(update)
            for subscription in everyone:
                subscription._push(update)

    def subscriptions(self) -> Iterator[Subscription]:
        """Every open subscription, once each (one may be indexed under several keys)."""
        seen: set[int] = set()
        for key in tuple(self._index.keys()):
            for subscription in self._index.subscribers(key):
                if id(subscription) not in seen:
                    seen.add(id(subscription))
                    yield subscription

    def close(self) -> None:
        """Close every subscription (their readers' iterations end)."""
        for subscription in tuple(self.subscriptions()):
            subscription.close()

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._open -= 1
        emptied = self._index.remove_subscriber(subscription)
        if emptied:
            self.interest_removed += len(emptied)
            self._interest_changed()

    def _interest_changed(self) -> None:
        if self._on_interest_changed is not None:
            self._on_interest_changed()
