"""Fold one upstream's events into a snapshot, the way the fan-in does, for adapter tests.

An adapter's events only mean something once folded: a :class:`Listing` is the
complete state of some services, so what a consumer sees is its diff against
what the upstream had before. :class:`Fold` applies events exactly as the
contract in ``dispatcher/core/upstream.py`` describes and records every
:class:`~dispatcher.core.snapshot.Delta`, so a test can assert both the resulting
state and that a change produced exactly the deltas it should (a re-list after
a reconnect that emits nothing is a delta-free fold).

Shared by the adapter tests; extend it only additively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import trio

from dispatcher.core.model import Instance
from dispatcher.core.snapshot import Delta, Snapshot, diff
from dispatcher.core.upstream import Changed, Listing, Status, UpstreamEvent

__all__ = ["Fold"]


class Fold:
    """The state one upstream's events describe, and the deltas that led there.

    ``stale`` is True while the last :class:`Status` said disconnected.
    """

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.deltas: list[Delta] = []
        self.statuses: list[Status] = []
        self.events: list[UpstreamEvent] = []
        self.stale = False

    def apply(self, event: UpstreamEvent) -> tuple[Delta, ...]:
        """Fold one event; return the deltas it produced."""
        self.events.append(event)
        if isinstance(event, Status):
            self.statuses.append(event)
            self.stale = not event.connected
            return ()
        if isinstance(event, Listing):
            if event.services is None:
                old: list[Instance] = [
                    instance
                    for entry in self.snapshot.values()
                    for instance in entry.instances.values()
                ]
            else:
                stray = [i for i in event.instances if i.service not in event.services]
                assert not stray, f"Listing for {sorted(event.services)} carries {stray!r}"
                old = [
                    instance
                    for service in event.services
                    for instance in self.snapshot.full(service).instances.values()
                ]
            changes = diff(old, event.instances)
        elif isinstance(event, Changed):
            changes = event.changes
        else:
            raise TypeError(f"not an upstream event: {event!r}")
        self.snapshot, deltas = self.snapshot.apply(changes)
        self.deltas.extend(deltas)
        return deltas

    def instances(self, service: str) -> dict[str, Instance]:
        """The current instances of ``service`` by id (empty if none)."""
        return dict(self.snapshot.full(service).instances)

    async def until(
        self,
        receive: trio.MemoryReceiveChannel[UpstreamEvent],
        predicate: Callable[[Self], object],
        timeout: float = 10.0,
        message: str = "condition",
    ) -> None:
        """Fold events from ``receive`` until ``predicate(self)`` holds (checked first).

        Fails the test with ``message`` if it does not hold within ``timeout``.
        """
        try:
            with trio.fail_after(timeout):
                while not predicate(self):
                    self.apply(await receive.receive())
        except trio.TooSlowError:
            raise AssertionError(
                f"{message} not reached within {timeout}s; last events: {self.events[-5:]!r}"
            ) from None

    def drain(self, receive: trio.MemoryReceiveChannel[UpstreamEvent]) -> int:
        """Fold every event already waiting in ``receive``, without blocking; return how many."""
        count = 0
        while True:
            try:
                event = receive.receive_nowait()
            except trio.WouldBlock:
                return count
            self.apply(event)
            count += 1
