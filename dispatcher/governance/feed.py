"""The current governance revision, held in memory and published as a versioned stream.

Every Dispatcher runs one :class:`GovernanceFeed` per document kind, fed by the store's
:meth:`~dispatcher.governance.store.GovernanceStore.watch`. Faces read
:attr:`~GovernanceFeed.current` or :meth:`~GovernanceFeed.subscribe` to it, the way they read
the snapshot: the first item of a subscription is the current revision, then each newer one,
and versions only go up.

Publishing never waits for a subscriber. Each subscription has a bounded queue; when a slow
subscriber's queue is full, what it holds is replaced by the newest revision alone (counted in
``collapses``): a consumer of governance documents only ever applies the newest whole document,
and the ones it skipped remain in the store's history.

A Dispatcher must not answer with a governance state it has not loaded: :meth:`GovernanceFeed.run`
reads the current revision (retrying while the store is unreachable) before it reports
started (``task_status``) and sets :attr:`~GovernanceFeed.loaded`.
"""

from __future__ import annotations

import collections
import logging
from types import TracebackType
from typing import Final

import trio

from dispatcher.backoff import Backoff
from dispatcher.governance.store import GovernanceError, GovernanceStore, Revision

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_QUEUE", "FeedSubscription", "GovernanceFeed"]

DEFAULT_QUEUE: Final = 16
"""Revisions a subscriber may have waiting before its queue collapses to the newest."""


class FeedSubscription:
    """An async iterator of revisions: the current one (if any), then each newer one.

    Use it as an async context manager, or call :meth:`close`; after that iteration ends. One
    task at a time may iterate it.
    """

    def __init__(self, feed: GovernanceFeed, max_queue: int) -> None:
        self._feed = feed
        self.max_queue = max_queue
        self.collapses = 0
        self._queue: collections.deque[Revision] = collections.deque()
        self._wakeup = trio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _push(self, revision: Revision) -> None:
        if len(self._queue) >= self.max_queue:
            self._queue.clear()
            self.collapses += 1
        self._queue.append(revision)
        self._wakeup.set()

    def close(self) -> None:
        """Unsubscribe; idempotent. A blocked reader wakes up and iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._wakeup.set()
        self._feed._subscribers.discard(self)

    def __aiter__(self) -> FeedSubscription:
        return self

    async def __anext__(self) -> Revision:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        if self._closed:
            raise StopAsyncIteration
        return self._queue.popleft()

    async def __aenter__(self) -> FeedSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class GovernanceFeed:
    """The newest revision of one kind, kept current from ``store``'s watch."""

    def __init__(self, store: GovernanceStore, *, max_queue: int = DEFAULT_QUEUE) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, not {max_queue}")
        self.store = store
        self.max_queue = max_queue
        self.loaded = trio.Event()
        self._current: Revision | None = None
        self._subscribers: set[FeedSubscription] = set()

    @property
    def current(self) -> Revision | None:
        """The newest revision seen; None before the first write (or before :attr:`loaded`)."""
        return self._current

    @property
    def version(self) -> int:
        """The current version; 0 when nothing was ever written."""
        return 0 if self._current is None else self._current.version

    def subscribe(self, *, max_queue: int | None = None) -> FeedSubscription:
        """A subscription whose first item is the current revision, if there is one."""
        subscription = FeedSubscription(self, max_queue or self.max_queue)
        if self._current is not None:
            subscription._push(self._current)
        self._subscribers.add(subscription)
        return subscription

    def _publish(self, revision: Revision) -> None:
        if revision.version <= self.version:
            return  # a watch re-armed after a reconnect yields the head we hold again
        self._current = revision
        for subscription in self._subscribers:
            subscription._push(revision)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the current revision, report started, then follow the store until cancelled."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                head = await self.store.current()
                break
            except GovernanceError as exc:
                log.warning("cannot load the governance document yet; retrying",
                            extra={"kind": self.store.kind, "error": str(exc)})  # fmt: skip
                await backoff.sleep()
        if head is not None:
            self._publish(head)
        self.loaded.set()
        task_status.started()
        async for revision in self.store.watch():
            self._publish(revision)

    async def wait_version(self, version: int) -> Revision:
        """Wait until the current version is at least ``version``; return that revision."""
        if self._current is not None and self._current.version >= version:
            return self._current
        async with self.subscribe() as subscription:
            async for revision in subscription:
                if revision.version >= version:
                    return revision
        raise RuntimeError("the feed's subscription closed while waiting")
