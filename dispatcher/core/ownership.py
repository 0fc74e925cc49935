"""Which services this Dispatcher owns: the question the subscription server asks.

The subscription server serves a service only to the Dispatcher that owns it
and answers everyone else with a :class:`~dispatcher.wire.Redirect` to the
owner. :class:`Ownership` is all it needs to know about sharding, so that
the server does not care whether ownership comes from one process
(:class:`SoleOwnership`) or from a membership store and rendezvous hashing
(the sharded implementation, which lives elsewhere and calls
:meth:`SubscriptionServer.ownership_changed
<dispatcher.faces.subscription_server.SubscriptionServer.ownership_changed>`
whenever its answers change).

The protocol is deliberately this small: anything richer (membership,
weights, the hash) belongs to the implementation, not to the server.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from dispatcher.wire import Owner

__all__ = ["Ownership", "SoleOwnership"]


class Ownership(Protocol):
    """Who owns each service, as of one ``epoch``.

    ``epoch`` only grows, and grows whenever any answer of :meth:`owns` or
    :meth:`owner_of` may have changed; it travels in every Redirect so that a
    proxy can tell a newer redirect from an older one. All three are called on
    the trio thread and must answer at once, from memory.
    """

    @property
    def epoch(self) -> int: ...

    def owns(self, service: str) -> bool:
        """Whether this Dispatcher serves ``service`` now."""
        ...

    def owner_of(self, service: str) -> Owner | None:
        """The Dispatcher that owns ``service``, or None while nobody does (no live shard)."""
        ...


@attrs.frozen
class SoleOwnership:
    """One Dispatcher and no shards: it owns every service, forever (epoch 0)."""

    owner: Owner
    epoch: int = attrs.field(default=0, init=False)

    def owns(self, service: str) -> bool:
        return True

    def owner_of(self, service: str) -> Owner | None:
        return self.owner
