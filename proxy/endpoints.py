"""The endpoints of each service, as one proxy knows them.

A :class:`ServiceTable` is fed by the control plane (:mod:`proxy.control`)
with the Dispatcher's ``Full`` and ``Deltas`` messages and read by the
forwarder (:mod:`proxy.forward`) on every new connection. Both run on the
one trio thread, so nothing here locks.

What the table keeps, per endpoint (:class:`EndpointState`):

* the instance as the Dispatcher last described it (address, weight,
  central health);
* the open connections the forwarder has to it (for power-of-two-choices);
* the local ejection state that :mod:`proxy.outlier` manages (consecutive
  connect failures, ejected until when, how often).

Versions. ``version`` is the service version the table holds and
``source`` the Dispatcher (its ``Welcome`` server id) that version came
from: a version means something only to the Dispatcher that made it, so
the control plane offers it back only to that same server. A ``Deltas``
that does not chain on the held version is refused (:meth:`apply_deltas`
returns False) and the caller asks for a ``Full``; the table keeps routing
on what it has meanwhile.

Routing set. :meth:`candidates` is what a balancer chooses from: endpoints
whose central health is not ``failing`` and that are not ejected here. When
that leaves nothing, the table *panics* as Envoy does: it offers the
endpoints that are merely failing centrally, then everything, since trying
an endpoint that may be down beats refusing every connection. The set is
cached and rebuilt only when the table changes or an ejection expires.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import trio

from dispatcher import wire

__all__ = ["FAILING", "EndpointState", "ServiceTable"]

#: The central health value that takes an endpoint out of rotation.
FAILING = "failing"


class EndpointState:
    """One endpoint and what this proxy knows about it (mutable; owned by its table)."""

    __slots__ = (
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "instance",
        "open_connections",
        "returned_at",
    )

    def __init__(self, instance: wire.WireInstance) -> None:
        self.instance = instance
        #: Connections the forwarder has open to this endpoint now.
        self.open_connections = 0
        #: Connect failures since the last success (the outlier detector's count).
        self.consecutive_failures = 0
        #: trio clock time until which this endpoint is ejected; -inf: not ejected.
        self.ejected_until = -math.inf
        #: How many times it was ejected (decays while it behaves; see proxy.outlier).
        self.ejections = 0
        #: When its last ejection ended (for the decay).
        self.returned_at = -math.inf

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def address(self) -> tuple[str, int]:
        return (self.instance.host, self.instance.port)

    @property
    def weight(self) -> int:
        return self.instance.weight

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def __repr__(self) -> str:
        i = self.instance
        return f"EndpointState({i.id!r}, {i.host}:{i.port}, weight={i.weight}, health={i.health})"


class ServiceTable:
    """The versioned endpoint table of one service; see the module docstring."""

    def __init__(self, service: str) -> None:
        self.service = service
        #: The service version held; None before the first Full.
        self.version: int | None = None
        #: The Welcome server id of the Dispatcher that ``version`` came from.
        self.source: str | None = None
        self._endpoints: dict[str, EndpointState] = {}
        self._candidates: tuple[EndpointState, ...] | None = None
        # The earliest end of an ejection among the endpoints: the cached
        # candidate set is stale once the clock passes it.
        self._next_return = math.inf
        self._changed: trio.Event | None = None
        #: Bumped on every change of the endpoint set or of any endpoint's record.
        self.generation = 0

    # ------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._endpoints)

    def __iter__(self) -> Iterator[EndpointState]:
        return iter(self._endpoints.values())

    def get(self, instance_id: str) -> EndpointState | None:
        return self._endpoints.get(instance_id)

    @property
    def ready(self) -> bool:
        """Whether a Full has ever been applied (the table may still be empty)."""
        return self.version is not None

    def digest(self) -> str:
        """:func:`~dispatcher.wire.table_digest` of the records held (what ``Ack`` reports)."""
        return wire.table_digest(e.instance for e in self._endpoints.values())

    def candidates(self, now: float) -> tuple[EndpointState, ...]:
        """The endpoints to route to at ``now`` (see *Routing set*); the same tuple
        object while nothing changed, so balancers can key their state on it."""
        if self._candidates is None or now >= self._next_return:
            self._candidates = self._build_candidates(now)
        return self._candidates

    def _build_candidates(self, now: float) -> tuple[EndpointState, ...]:
        returns = [e.ejected_until for e in self._endpoints.values() if e.ejected(now)]
        self._next_return = min(returns, default=math.inf)
        healthy = tuple(
            e for e in self._endpoints.values()
            if not e.ejected(now) and e.instance.health != FAILING
        )  # fmt: skip
        if healthy:
            return healthy
        present = tuple(e for e in self._endpoints.values() if not e.ejected(now))
        return present or tuple(self._endpoints.values())

    async def wait_changed(self) -> None:
        """Until the next change of this table (a Full, a Deltas, an ejection)."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    # ------------------------------------------------------------- updates

    def apply_full(self, full: wire.Full, source: str) -> None:
        """Replace the table by ``full``; endpoints that stay keep their local state."""
        old = self._endpoints
        self._endpoints = {}
        for instance in full.instances:
            self._endpoints[instance.id] = self._carry(old.get(instance.id), instance)
        self.version = full.version
        self.source = source
        self._touch()

    def apply_deltas(self, deltas: wire.Deltas, source: str) -> bool:
        """Apply ``deltas`` if it chains on what is held from ``source``; False if it
        does not (nothing applied: ask for a Full)."""
        if self.version is None or source != self.source or deltas.from_version != self.version:
            return False
        for instance_id in deltas.removed:
            self._endpoints.pop(instance_id, None)
        for instance in deltas.upserted:
            self._endpoints[instance.id] = self._carry(self._endpoints.get(instance.id), instance)
        self.version = deltas.to_version
        if deltas.upserted or deltas.removed:
            self._touch()
        return True

    @staticmethod
    def _carry(state: EndpointState | None, instance: wire.WireInstance) -> EndpointState:
        """The state for ``instance``: the old one updated in place if it is the same
        address (open connections and ejection survive a weight or health change),
        else a fresh one (another process behind the same id owes nothing)."""
        if state is None or (state.instance.host, state.instance.port) != (
            instance.host,
            instance.port,
        ):
            # Connections still open to an old address close against the old
            # state object, so the new address starts at zero.
            return EndpointState(instance)
        state.instance = instance
        return state

    def eject(self, endpoint: EndpointState, until: float) -> None:
        """Take ``endpoint`` out of rotation until ``until`` (trio clock)."""
        endpoint.ejected_until = until
        self._touch()

    def changed(self) -> None:
        """An endpoint's record changed in a way that affects routing."""
        self._touch()

    def _touch(self) -> None:
        self._candidates = None
        self.generation += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
