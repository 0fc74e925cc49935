"""In-process membership: a store that lives in this process, for one-process setups and tests.

Handles (:class:`MemoryMembership`) play the part of sessions: a handle's registration and warm
marker go away when its ``run`` ends, as an ephemeral znode goes with its session. The epoch is
a counter bumped on every change.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from dispatcher.sharding.membership_core import Registration, View, ViewFeed, quote_service

__all__ = ["MemoryMembership", "MemoryStore"]


class MemoryStore:
    """The store itself for in-process membership: one per process (or per test).

    ``epoch``, ``inputs_epoch``, ``members``, ``catalog`` and ``warm`` are its state, readable
    by anyone; change them only through the methods, which publish every change to the feeds
    of the attached handles.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.inputs_epoch = 0
        self.members: dict[str, Registration] = {}
        self.catalog: set[str] = set()
        self.warm: dict[str, int] = {}
        self._feeds: set[ViewFeed] = set()

    def view(self) -> View:
        return View(
            self.epoch,
            tuple(self.members[i].member() for i in sorted(self.members)),
            frozenset(self.catalog),
            self.warm,
            inputs_epoch=self.inputs_epoch,
        )

    def attach(self, feed: ViewFeed) -> None:
        """Publish the current view, and every later change, into ``feed`` (a running handle's)."""
        self._feeds.add(feed)
        feed.publish(self.view())

    def detach(self, feed: ViewFeed) -> None:
        self._feeds.discard(feed)

    def add_services(self, names: Iterable[str]) -> None:
        """Add to the catalog (what an operator or a Dispatcher does)."""
        new = {name for name in names if name not in self.catalog}
        for name in new:
            quote_service(name)  # the same names as the real stores accept
        if new:
            self.catalog |= new
            self._inputs_changed()

    def remove_services(self, names: Iterable[str]) -> None:
        """Remove from the catalog (what only an operator does)."""
        gone = self.catalog & set(names)
        if gone:
            self.catalog -= gone
            self._inputs_changed()

    def join(self, registration: Registration) -> None:
        """Make ``registration`` a member (a changed record drops the member's warm marker)."""
        if self.members.get(registration.id) != registration:
            self.members[registration.id] = registration
            self.warm.pop(registration.id, None)
            self._inputs_changed()
        else:
            self._publish()

    def leave(self, member_id: str) -> None:
        """Remove the member and its warm marker."""
        self.warm.pop(member_id, None)
        if self.members.pop(member_id, None) is not None:
            self._inputs_changed()
        else:
            self._publish()

    def set_warm(self, member_id: str, epoch: int) -> None:
        """Set a member's warm marker (ignored for an id that is not a member)."""
        if member_id in self.members and self.warm.get(member_id) != epoch:
            self.warm[member_id] = epoch
            self.epoch += 1
            self._publish()

    def _inputs_changed(self) -> None:
        self.epoch += 1
        self.inputs_epoch = self.epoch
        self._publish()

    def _publish(self) -> None:
        view = self.view()
        for feed in self._feeds:
            feed.publish(view)


class MemoryMembership:
    """A participant of a :class:`MemoryStore` (see
    :class:`~dispatcher.sharding.membership_core.MembershipStore`)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.feed = ViewFeed()
        self._registration: Registration | None = None
        self._running = False
        self._warm: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        store = self.store
        self._running = True
        try:
            if self._registration is not None:
                store.join(self._registration)
                if self._warm is not None:
                    store.set_warm(self._registration.id, self._warm)
            store.attach(self.feed)
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            store.detach(self.feed)
            if self._registration is not None:
                store.leave(self._registration.id)

    def register(self, registration: Registration) -> None:
        old, self._registration = self._registration, registration
        if self._running:
            if old is not None and old.id != registration.id:
                self.store.leave(old.id)
            self.store.join(registration)

    def set_warm(self, epoch: int) -> None:
        self._warm = epoch
        if self._running and self._registration is not None:
            self.store.set_warm(self._registration.id, epoch)

    def add_services(self, names: Iterable[str]) -> None:
        self.store.add_services(names)
