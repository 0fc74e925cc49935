"""Fan-in: many upstream registries, one merged, versioned snapshot.

:class:`FanIn` runs every configured :class:`~dispatcher.core.upstream.Upstream`,
keeps what each one currently reports, merges them into one
:class:`~dispatcher.core.snapshot.Snapshot` and hands each new version's deltas to
its :class:`~dispatcher.core.subscriptions.SubscriptionHub`.

The merge rules (users rely on these; keep them in the docs when changing):

* **Identity.** Instances are merged by endpoint: one merged instance per
  ``(service, host, port)``, whatever ids the registries gave it. Its
  ``instance_id`` is the endpoint itself, ``host:port`` (``[host]:port``
  when the host contains a colon, as IPv6 literals do). The id must not
  depend on which registry currently wins: when the winner withdraws and the
  next registry's record takes over, consumers see one *update* of the same
  instance, not a removal and an addition (which a ZooKeeper projection
  would turn into a deleted and a created znode, and a proxy into a dropped
  endpoint). The registry's own id stays reachable through ``source.key``.
* **Precedence.** Upstreams rank in the order the configuration lists them:
  the first that reports an endpoint wins. If one upstream reports the same
  endpoint under several ids (a re-registration that left its old record
  behind), its record with the smallest id wins, so the choice never depends
  on arrival order.
* **Conflicting metadata.** The winner's record is taken whole: every field,
  including all of its metadata, comes from the winner, and keys that only a
  losing record has are *not* merged in. One source of truth per instance:
  a record stitched from several registries would be a value no registry
  ever held, which nobody can reason about when debugging, and which would
  change shape whenever a lower-ranked registry edits a key that the winner
  happens to lack.
* **Provenance.** A merged instance keeps its winner's ``source``, so every
  instance says which upstream (and which key there) it came from.
  :meth:`FanIn.reports` lists every upstream's record for one endpoint.
  Caveat, from :meth:`Snapshot.apply`: when the winner changes to a record
  that is *equal* in value (equality ignores ``source``), no new version is
  made and the snapshot keeps the earlier ``source``; provenance alone is
  not a change consumers can see.
* **Loop prevention.** An instance whose metadata has
  :data:`EXPORTED_BY` equal to this node's id was written upstream by this
  gateway's own projection; it is dropped on arrival (as if the upstream did
  not have it) and counted in :attr:`FanInCounters.looped_back`.

Probe health (the health checker's overlay, :meth:`FanIn.set_probe_health`):
the Dispatcher's own health checker (:mod:`dispatcher.core.health`) reports what
its probes say about a merged instance, and the snapshot's ``health`` of
that instance is then the combination :func:`combine_health` of the
winner's own (source) health and the probe result:

* the source says ``failing`` → ``failing``: a registry's own verdict (a
  Consul check critical, a Dubbo provider ``disabled``, a ServerSet member
  ``DEAD``) means "do not route here" whatever a TCP connect says, since the
  registry may know about the application what a probe cannot;
* otherwise, a probe result (``passing`` or ``failing``) → that result: the
  probe has seen the endpoint recently, the registration alone has not;
* no probe result (never probed, or the checker gave its verdict up) → the
  source's health.

The overlay is held per endpoint beside the upstreams' reports and applied
when an instance is merged, so a change of winner keeps it, and it is
dropped when the endpoint leaves the snapshot (a re-registration starts
from the source's health again). A change of the overlay is published like
any other change: a new snapshot version whose deltas update the instance.
``reports`` still shows the records as the registries sent them.

Staleness: an upstream is *stale* from the start until its first
``Status(connected=True)``, and again from each ``Status(connected=False)``
until it reconnects. While stale, whatever it last reported stays in the
snapshot (keep serving the last known state); its next :class:`Listing`
resyncs it by an exact diff.

Interest: with ``interest="all"`` (the default) upstreams load everything
under their roots and :meth:`Upstream.set_interest` is never called. With
``interest="subscribed"`` the fan-in narrows every upstream to the services
someone subscribes to (all of them while someone subscribes to ``*``): it
calls ``set_interest`` before starting each upstream and whenever a service
gains its first subscriber or loses its last. A service that loses its last
subscriber is dropped from the snapshot at once, since no upstream watches
it any more and its state would silently go stale; events that still arrive
for uninteresting services are ignored.

Concurrency: each upstream's ``run`` writes to its own bounded channel; one
forwarder per upstream moves whatever is ready, as one batch, into a shared
bounded channel; one consumer task drains what is ready there, applies it
all with one :meth:`Snapshot.apply` and publishes. A slow consumer therefore
pushes back on the upstreams (their ``send`` waits) and memory stays
bounded. The published snapshot is one reference, rebound: readers never
lock. All state changes happen in synchronous code on the trio thread, so
the consumer and a subscriber's subscribe/close never interleave halfway.

Memory: a Dispatcher holds every instance of its shard (the target is
1 KiB per instance, records included), so the bookkeeping beside the
snapshot is two dict slots per record and no object per record but the
record itself. Each upstream's record is kept once, already under the
endpoint id (``held``: service -> the upstream's id -> record), and without
a probe verdict that same object is the snapshot's instance: the adapter's
original is not kept (nor is the last batch of events, once applied). An
index per upstream maps each endpoint id back to the upstream's id
(``endpoints``: service -> endpoint id -> id, a sorted tuple only when one
upstream reports the endpoint under several ids). One endpoint id string
per endpoint is shared by the record, the index and the snapshot. The
winner is found by looking the endpoint up in each upstream's index in
precedence order, so nothing per endpoint remembers it: an unchanged winner
is put again and :meth:`Snapshot.apply` drops the equal value.
:meth:`FanIn.reports` rebuilds the records under the upstreams' own ids.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal

import attrs
import trio

from dispatcher.backoff import Backoff
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.snapshot import Change, Delta, Put, Remove, Snapshot
from dispatcher.core.subscriptions import DEFAULT_QUEUE, Subscription, SubscriptionHub
from dispatcher.core.upstream import Changed, Listing, Status, Upstream, UpstreamEvent
from dispatcher.wire import join_address

__all__ = [
    "EXPORTED_BY",
    "FanIn",
    "FanInCounters",
    "Interest",
    "UpstreamState",
    "combine_health",
    "endpoint_id",
]

log = logging.getLogger(__name__)

EXPORTED_BY: Final = "zkgate.exported-by"
"""Metadata key a projection sets to its gateway's ``node_id`` when it writes
an instance into an upstream registry, so that the same gateway reading that
registry back recognises its own export."""

Interest = Literal["all", "subscribed"]

_Key = tuple[str, str]
"""``(service, endpoint id)``: the identity of a merged instance (see :func:`endpoint_id`)."""

_Ids = str | tuple[str, ...]
"""What an upstream's endpoint index holds for one endpoint: its id there, or
the sorted ids when it reports the endpoint under several."""

_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})

_INSTANCE_FIELDS: Final = tuple(field.name for field in attrs.fields(Instance))

_value_but_id: Final = operator.attrgetter(
    *(
        field.name
        for field in attrs.fields(Instance)
        if field.eq and field.name not in ("service", "instance_id")
    )
)
"""The fields ``Instance.__eq__`` compares, but the id (and the service, which
the callers already matched): a record held under the endpoint id equals a
newly listed one under the upstream's id exactly when these agree."""


def _with_id(instance: Instance, instance_id: str) -> Instance:
    """``instance`` under another (non-empty) id, without re-validating it.

    ``attrs.evolve`` would run every converter and validator again on a
    value that already passed them, and re-iding every winner is the
    fan-in's hot path (it was most of the cost of a 100k-instance listing).
    """
    copy = object.__new__(Instance)
    for name in _INSTANCE_FIELDS:
        object.__setattr__(copy, name, getattr(instance, name))
    object.__setattr__(copy, "instance_id", instance_id)
    return copy


def _with_health(instance: Instance, health: Health) -> Instance:
    """``instance`` with another health, without re-validating it (see :func:`_with_id`)."""
    copy = object.__new__(Instance)
    for name in _INSTANCE_FIELDS:
        object.__setattr__(copy, name, getattr(instance, name))
    object.__setattr__(copy, "health", health)
    return copy


def combine_health(source: Health, probe: Health | None) -> Health:
    """The merged instance's health from its source's and the probes' verdicts.

    ``failing`` from the source wins; otherwise a probe result, if there is
    one; otherwise the source's health. See "Probe health" in the module
    docstring for why.
    """
    if probe is None or source is Health.FAILING:
        return source
    return probe


def endpoint_id(host: str, port: int) -> str:
    """The merged instance id for an endpoint: ``host:port``, ``[host]:port`` for IPv6."""
    return join_address(host, port)


def _file(endpoints: dict[str, _Ids], merged_id: str, instance_id: str) -> None:
    """Add ``instance_id`` to an upstream's ids for the endpoint ``merged_id``."""
    present = endpoints.get(merged_id)
    if present is None:
        endpoints[merged_id] = instance_id
    else:
        # Rare (a re-registration that left its old record behind): a
        # sorted tuple, so that the first id is the one that wins.
        others = (present,) if isinstance(present, str) else present
        endpoints[merged_id] = tuple(sorted((*others, instance_id)))


def _unfile(endpoints: dict[str, _Ids], merged_id: str, instance_id: str) -> str:
    """Take ``instance_id`` out of the endpoint's ids; return the string object filed."""
    present = endpoints[merged_id]
    if isinstance(present, str):
        del endpoints[merged_id]
        return present
    kept = tuple(other for other in present if other != instance_id)
    endpoints[merged_id] = kept[0] if len(kept) == 1 else kept
    return next(other for other in present if other == instance_id)


@attrs.frozen(slots=True)
class UpstreamState:
    """Whether one upstream is connected, since when, and why.

    ``since`` is wall-clock time (``time.time()``) of the last transition,
    for humans and ``mntr``; ``detail`` is the adapter's own explanation.
    """

    name: str
    connected: bool
    since: float
    detail: str = ""


@attrs.define
class FanInCounters:
    """Monotonic counters, for metrics and tests."""

    #: Upstream events received (each Listing, Changed or Status is one).
    events: int = 0
    #: Batches applied (each is one pass of the consumer).
    batches: int = 0
    #: Batches that produced a new snapshot version.
    versions: int = 0
    #: Instances dropped because this node exported them (loop prevention).
    looped_back: int = 0
    #: Instances dropped from a Listing because their service was outside its scope.
    out_of_scope: int = 0
    #: Upstream runs that raised or returned and were restarted.
    restarts: int = 0
    #: Probe-health results that changed the overlay (see set_probe_health).
    probe_updates: int = 0


class _Upstream:
    """The fan-in's bookkeeping for one upstream (not shared outside)."""

    __slots__ = ("applied", "endpoints", "held", "name", "state", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.name = upstream.name
        #: What this upstream currently reports (after loop prevention):
        #: service -> its instance id -> its record under the endpoint id.
        self.held: dict[str, dict[str, Instance]] = {}
        #: The same records by endpoint: service -> endpoint id -> the
        #: upstream's id(s) there. A service is in both or in neither.
        self.endpoints: dict[str, dict[str, _Ids]] = {}
        self.state = UpstreamState(self.name, False, time.time(), "not connected yet")
        #: Events applied from this upstream so far (inspection's "nothing
        #: arrived meanwhile" test before it repairs).
        self.applied = 0


class FanIn:
    """Merges upstreams into one snapshot and serves subscriptions to it.

    ``node_id`` is this gateway's id for loop prevention. ``interest``,
    ``subscriber_queue`` are as in the configuration's ``[dispatcher]``
    table. ``event_buffer`` bounds each upstream's channel, ``max_batch`` the
    number of events applied in one snapshot version. A crashed upstream
    (its ``run`` raised, or returned although it should run until
    cancelled) is marked stale, logged and restarted with jittered backoff
    between ``restart_initial`` and ``restart_max`` seconds.
    """

    def __init__(
        self,
        node_id: str,
        *,
        interest: Interest = "all",
        subscriber_queue: int = DEFAULT_QUEUE,
        event_buffer: int = 256,
        max_batch: int = 4096,
        restart_initial: float = 1.0,
        restart_max: float = 30.0,
    ) -> None:
        if interest not in ("all", "subscribed"):
            raise ValueError(f"interest must be 'all' or 'subscribed', got {interest!r}")
        if event_buffer < 1 or max_batch < 1:
            raise ValueError("event_buffer and max_batch must be >= 1")
        self.node_id = node_id
        self.interest_mode: Interest = interest
        self.event_buffer = event_buffer
        self.max_batch = max_batch
        self.restart_initial = restart_initial
        self.restart_max = restart_max
        self.counters = FanInCounters()
        self.hub = SubscriptionHub(
            max_queue=subscriber_queue,
            on_interest_changed=self._interest_changed if interest == "subscribed" else None,
        )
        self._snapshot = Snapshot()
        # In precedence order (dicts keep insertion order).
        self._upstreams: dict[str, _Upstream] = {}
        self._interest: frozenset[str] | None = (
            self.hub.interest if interest == "subscribed" else None
        )
        # The health checker's verdict per endpoint present in the snapshot,
        # service -> endpoint id -> verdict (never UNKNOWN: no verdict is no
        # entry; no empty inner dicts); see set_probe_health.
        self._probe: dict[str, dict[str, Health]] = {}
        # Test-only fault injection: (upstream, service) whose next change is dropped.
        self._drops: set[tuple[str, str]] = set()

    # ----------------------------------------------------------------- reading

    @property
    def snapshot(self) -> Snapshot:
        """The current merged snapshot; keep it as long as you like, it never changes."""
        return self._snapshot

    @property
    def interest(self) -> frozenset[str] | None:
        """The services the upstreams are asked to load (None: everything)."""
        return self._interest

    @property
    def status(self) -> Mapping[str, UpstreamState]:
        """Every upstream's connection state, by name, in precedence order."""
        return MappingProxyType({name: u.state for name, u in self._upstreams.items()})

    @property
    def stale(self) -> Mapping[str, UpstreamState]:
        """The upstreams that are not connected now (and since when): their data is stale."""
        return MappingProxyType(
            {name: u.state for name, u in self._upstreams.items() if not u.state.connected}
        )

    def reports(self, service: str, host: str, port: int) -> tuple[Instance, ...]:
        """Every upstream's record of one endpoint, winner first (precedence order).

        The records are as the upstreams reported them (after loop
        prevention, with a ``source``), under their own ids: values equal to
        what the adapters sent, rebuilt on each call, since the fan-in keeps
        each record under the endpoint id only.
        """
        merged_id = endpoint_id(host, port)
        found: list[Instance] = []
        for state in self._upstreams.values():
            ids = state.endpoints.get(service, _EMPTY).get(merged_id)
            if ids is None:
                continue
            held = state.held[service]
            for instance_id in (ids,) if isinstance(ids, str) else ids:
                record = held[instance_id]
                if record.instance_id != instance_id:
                    record = _with_id(record, instance_id)
                found.append(record)
        return tuple(found)

    # ------------------------------------------------------------- inspection

    def upstream(self, name: str) -> Upstream:
        """The running upstream called ``name`` (KeyError: none)."""
        return self._upstreams[name].upstream

    def held(self, name: str) -> Mapping[str, Mapping[str, Instance]]:
        """What upstream ``name`` currently reports: service -> its id -> record.

        The records carry the endpoint id as ``instance_id`` (compare them
        ignoring it). A live view: read it synchronously, never change it.
        """
        return MappingProxyType(self._upstreams[name].held)

    def applied(self, name: str) -> int:
        """How many events from upstream ``name`` have been applied so far."""
        return self._upstreams[name].applied

    def resync(self, name: str, listing: Listing) -> tuple[Delta, ...]:
        """Replace what upstream ``name`` holds for ``listing.services`` by ``listing``.

        For inspection's repair: ``listing`` is a direct read of the upstream
        that is at least as new as everything applied from it (the caller
        checks :meth:`applied` did not move since the read began). Applied
        and published like the upstream's own listing.
        """
        state = self._upstreams[name]
        touched: dict[_Key, None] = {}
        self._on_listing(state, listing, touched)
        return self._commit(self._resolve(touched))

    def drop_next_change(self, name: str, service: str) -> None:
        """Fault injection for tests: ignore the next change upstream ``name``
        reports for ``service`` (a Put or Remove, or a listing of that service
        alone), as if its event had been lost on the way."""
        self._drops.add((name, service))

    def subscribe(self, keys: Iterable[str], *, max_queue: int | None = None) -> Subscription:
        """Subscribe to services of the merged snapshot; see :class:`SubscriptionHub`."""
        return self.hub.subscribe(keys, max_queue=max_queue)

    # ----------------------------------------------------------------- running

    async def run(self, upstreams: Sequence[Upstream]) -> None:
        """Run ``upstreams`` (in precedence order) and merge them until cancelled.

        May be called once per FanIn.
        """
        if self._upstreams:
            raise RuntimeError("FanIn.run was already called")
        names = [upstream.name for upstream in upstreams]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique, repeated: {duplicates}")
        for upstream in upstreams:
            self._upstreams[upstream.name] = _Upstream(upstream)
        if self.interest_mode == "subscribed":
            self._interest = self.hub.interest
            for state in self._upstreams.values():
                self._set_interest(state, self._interest)

        merged_send, merged_receive = trio.open_memory_channel[
            tuple[_Upstream, list[UpstreamEvent]]
        ](max(1, len(upstreams)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._consume, merged_receive)
            async with merged_send:
                for state in self._upstreams.values():
                    send, receive = trio.open_memory_channel[UpstreamEvent](self.event_buffer)
                    nursery.start_soon(self._forward, state, receive, merged_send.clone())
                    nursery.start_soon(self._supervise, state, send)

    async def _supervise(
        self, state: _Upstream, send: trio.MemorySendChannel[UpstreamEvent]
    ) -> None:
        backoff = Backoff(self.restart_initial, self.restart_max)
        async with send:
            while True:
                started = trio.current_time()
                try:
                    # A clone, so that an adapter closing its channel on exit
                    # does not end the stream we keep for its restart.
                    await state.upstream.run(send.clone())
                    reason = "adapter's run() returned"
                    log.error("upstream %r: run() returned; restarting it", state.name)
                except Exception as exc:
                    reason = f"adapter crashed: {exc!r}"
                    log.exception("upstream %r crashed; restarting it", state.name)
                self.counters.restarts += 1
                # Through the channel, after whatever the run sent before it
                # died, so that a Status(True) still in flight cannot undo it.
                await send.send(Status(False, reason))
                if trio.current_time() - started > self.restart_max:
                    backoff.reset()
                await backoff.sleep()

    async def _forward(
        self,
        state: _Upstream,
        receive: trio.MemoryReceiveChannel[UpstreamEvent],
        merged: trio.MemorySendChannel[tuple[_Upstream, list[UpstreamEvent]]],
    ) -> None:
        async with receive, merged:
            async for first in receive:
                batch = [first]
                del first  # see _consume
                while len(batch) < self.max_batch:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await merged.send((state, batch))
                del batch

    async def _consume(
        self, receive: trio.MemoryReceiveChannel[tuple[_Upstream, list[UpstreamEvent]]]
    ) -> None:
        async with receive:
            async for first in receive:
                items = [first]
                del first
                count = len(items[0][1])
                while count < self.max_batch:
                    try:
                        items.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    count += len(items[-1][1])
                self._apply_batch(items)
                # No reference to the batch while waiting for the next one: the
                # adapter's records in it (a whole listing) would otherwise stay
                # alive beside the fan-in's own until more events came.
                del items

    # ---------------------------------------------------------------- applying

    def _apply_batch(self, items: Iterable[tuple[_Upstream, Iterable[UpstreamEvent]]]) -> None:
        """Apply events from upstreams, in order, as one snapshot version (sync)."""
        touched: dict[_Key, None] = {}
        for state, events in items:
            for event in events:
                self.counters.events += 1
                state.applied += 1
                if isinstance(event, Listing):
                    self._on_listing(state, event, touched)
                elif isinstance(event, Changed):
                    self._on_changed(state, event, touched)
                elif isinstance(event, Status):
                    self._on_status(state, event)
                else:
                    log.error("upstream %r sent %r, not an UpstreamEvent", state.name, event)
        self.counters.batches += 1
        self._commit(self._resolve(touched))

    def _on_status(self, state: _Upstream, event: Status) -> None:
        if event.connected == state.state.connected:
            if event.detail != state.state.detail:
                state.state = attrs.evolve(state.state, detail=event.detail)
            return
        state.state = UpstreamState(state.name, event.connected, time.time(), event.detail)
        if event.connected:
            log.info("upstream connected", extra={"upstream": state.name, "detail": event.detail})
        else:
            log.warning(
                "upstream disconnected; serving its last state, marked stale",
                extra={"upstream": state.name, "detail": event.detail or "no detail"},
            )

    def _on_listing(self, state: _Upstream, event: Listing, touched: dict[_Key, None]) -> None:
        # The listing replaces everything this upstream holds for its scope,
        # by an exact diff (as snapshot.diff makes it, in the same order:
        # puts for new and changed records, then removes for the gone).
        # Held state only ever covers wanted services (narrowing forgets the
        # rest), so the scope needs no intersection with the interest.
        scope = event.services
        if self._drops and scope is not None and len(scope) == 1:
            (service,) = scope
            if (state.name, service) in self._drops:
                self._drops.discard((state.name, service))
                return
        listed: dict[str, dict[str, Instance]] = {}
        for instance in event.instances:
            if scope is not None and instance.service not in scope:
                # An adapter bug; guessing what it meant could remove
                # instances that another listing still vouches for.
                self.counters.out_of_scope += 1
                continue
            if not self._wanted(instance.service):
                continue
            accepted = self._accept(state, instance)
            if accepted is not None:
                by_id = listed.get(accepted.service)
                if by_id is None:
                    by_id = listed[accepted.service] = {}
                # A later duplicate wins, as in diff(): the adapter, not the
                # fan-in, knows which of two records for one id to prefer.
                by_id[accepted.instance_id] = accepted
        for service, by_id in listed.items():
            held = state.held.get(service, _EMPTY)
            for instance_id, instance in by_id.items():
                previous = held.get(instance_id)
                if previous is None or _value_but_id(previous) != _value_but_id(instance):
                    self._put(state, instance, touched)
        gone = [
            (service, instance_id)
            for service, held in state.held.items()
            if scope is None or service in scope
            for instance_id in held
            if instance_id not in listed.get(service, _EMPTY)
        ]
        for service, instance_id in gone:
            self._remove(state, service, instance_id, touched)

    def _on_changed(self, state: _Upstream, event: Changed, touched: dict[_Key, None]) -> None:
        for change in event.changes:
            if self._drops:
                service = change.instance.service if isinstance(change, Put) else change.service
                if (state.name, service) in self._drops:
                    self._drops.discard((state.name, service))
                    continue
            if isinstance(change, Put):
                instance = change.instance
                if not self._wanted(instance.service):
                    continue
                accepted = self._accept(state, instance)
                if accepted is None:
                    # It was ours: the upstream's record must not stay held
                    # from before, when it may have looked like a foreign one.
                    self._remove(state, instance.service, instance.instance_id, touched)
                else:
                    self._put(state, accepted, touched)
            elif isinstance(change, Remove):
                self._remove(state, change.service, change.instance_id, touched)
            else:
                log.error("upstream %r sent %r, not a Put or Remove", state.name, change)

    def _accept(self, state: _Upstream, instance: Instance) -> Instance | None:
        """The instance as held, or None when loop prevention drops it."""
        if instance.metadata.get(EXPORTED_BY) == self.node_id:
            self.counters.looped_back += 1
            return None
        if instance.source is None:
            # Every merged instance says where it came from, even when an
            # adapter forgot to say so.
            return attrs.evolve(instance, source=Source(state.name, instance.instance_id))
        return instance

    def _wanted(self, service: str) -> bool:
        return self._interest is None or service in self._interest

    def _put(self, state: _Upstream, instance: Instance, touched: dict[_Key, None]) -> None:
        """Hold ``instance`` as ``state``'s record under its id, filed under its endpoint."""
        service, instance_id = instance.service, instance.instance_id
        held = state.held.get(service)
        if held is None:
            held = state.held[service] = {}
            endpoints = state.endpoints[service] = {}
        else:
            endpoints = state.endpoints[service]
        previous = held.get(instance_id)
        host, port = instance.host, instance.port
        if previous is not None and previous.port == port and previous.host == host:
            # The same endpoint: the index files this id there already.
            merged_id = previous.instance_id
        else:
            if previous is not None:
                # Moved to another endpoint. Refile the id object the index
                # had, the one that is also held's key, not a second copy.
                instance_id = _unfile(endpoints, previous.instance_id, instance_id)
                touched[(service, previous.instance_id)] = None
            merged_id = self._merged_id(instance)
            _file(endpoints, merged_id, instance_id)
        if instance.instance_id is not merged_id:
            instance = _with_id(instance, merged_id)
        held[instance_id] = instance
        touched[(service, merged_id)] = None

    def _remove(
        self, state: _Upstream, service: str, instance_id: str, touched: dict[_Key, None]
    ) -> None:
        """Forget ``state``'s record ``instance_id`` of ``service``, if it has one."""
        held = state.held.get(service)
        previous = held.pop(instance_id, None) if held is not None else None
        if previous is None:
            return
        merged_id = previous.instance_id
        _unfile(state.endpoints[service], merged_id, instance_id)
        if not held:
            del state.held[service]
            del state.endpoints[service]
        touched[(service, merged_id)] = None

    def _merged_id(self, instance: Instance) -> str:
        """The endpoint id of ``instance``, the string object the snapshot has if it has one.

        Records, indexes and the snapshot then share one string per endpoint
        rather than one per record (a string per instance is a tenth of the
        1 KiB budget). An endpoint that two upstreams first report in one
        batch may end up with two; that costs memory, never correctness.
        """
        merged_id = endpoint_id(instance.host, instance.port)
        if merged_id == instance.instance_id:
            # The adapter's id is the endpoint id already: no copy needed.
            return instance.instance_id
        snapshot = self._snapshot
        if instance.service in snapshot:
            current = snapshot[instance.service].instances.get(merged_id)
            if current is not None:
                return current.instance_id
        return merged_id

    def _winner(self, service: str, merged_id: str) -> Instance | None:
        """The record that wins an endpoint: first upstream, then its smallest id."""
        for state in self._upstreams.values():
            endpoints = state.endpoints.get(service)
            if endpoints is not None:
                ids = endpoints.get(merged_id)
                if ids is not None:
                    return state.held[service][ids if isinstance(ids, str) else ids[0]]
        return None

    def _resolve(self, touched: Iterable[_Key]) -> list[Change]:
        """The merged changes for the endpoints whose records changed.

        Every touched endpoint is put again (or removed) even when its
        winner did not change: remembering each winner would cost a dict
        slot per instance, and :meth:`Snapshot.apply` drops an equal put
        (cheaply, when it is the very object it holds).
        """
        changes: list[Change] = []
        for service, merged_id in touched:
            winner = self._winner(service, merged_id)
            if winner is None:
                changes.append(Remove(service, merged_id))
                if self._probe:
                    self._drop_probe(service, merged_id)
            else:
                changes.append(Put(self._merged(service, winner)))
        return changes

    def _merged(self, service: str, winner: Instance) -> Instance:
        """The snapshot's value for the endpoint that ``winner`` won.

        ``winner`` is held under the endpoint id already, so this is the
        record itself, or a copy of it with the probe's verdict overlaid.
        """
        if not self._probe:
            return winner
        probe = self._probe.get(service, _EMPTY).get(winner.instance_id)
        if probe is not None:
            health = combine_health(winner.health, probe)
            if health is not winner.health:
                winner = _with_health(winner, health)
        return winner

    def _drop_probe(self, service: str, merged_id: str) -> None:
        probes = self._probe.get(service)
        if probes is not None and probes.pop(merged_id, None) is not None and not probes:
            del self._probe[service]

    def _commit(self, changes: Sequence[Change]) -> tuple[Delta, ...]:
        if not changes:
            return ()
        snapshot, deltas = self._snapshot.apply(changes)
        if not deltas:
            return ()
        self._snapshot = snapshot
        self.counters.versions += 1
        log.debug(
            "snapshot version %d: %d service(s) changed (%s)",
            snapshot.version,
            len(deltas),
            ", ".join(delta.service for delta in deltas[:5]) + (", ..." if len(deltas) > 5 else ""),
        )
        self.hub.publish(snapshot, deltas)
        return deltas

    # ----------------------------------------------------- probe health overlay

    def set_probe_health(
        self, results: Iterable[tuple[str, str, Health | None]]
    ) -> tuple[Delta, ...]:
        """Record the health checker's verdicts and publish what they change (sync).

        ``results`` are ``(service, instance_id, health)`` for merged
        instances (``instance_id`` as in the snapshot, ``host:port``);
        ``health`` None or ``UNKNOWN`` withdraws the verdict, so the source's
        health applies again. The snapshot's health becomes
        :func:`combine_health` of the source's and this verdict. Results for
        instances not in the snapshot are ignored (a probe that finished
        after its instance was removed must not resurrect a verdict for a
        later re-registration). Everything given is applied as one snapshot
        version; the returned deltas are also published to subscribers.

        This is the one entry point through which anything but an upstream
        changes the snapshot; it is meant for :mod:`dispatcher.core.health`.
        """
        touched: dict[_Key, Instance] = {}
        for service, instance_id, health in results:
            current = self._snapshot.full(service).instances.get(instance_id)
            if current is None:
                continue
            merged_id = current.instance_id
            winner = self._winner(service, merged_id)
            if winner is None:
                continue
            verdict = None if health is None or health is Health.UNKNOWN else Health(health)
            probes = self._probe.get(service)
            if (probes.get(merged_id) if probes is not None else None) is verdict:
                continue
            if verdict is None:
                self._drop_probe(service, merged_id)
            else:
                if probes is None:
                    probes = self._probe[service] = {}
                probes[merged_id] = verdict
            self.counters.probe_updates += 1
            touched[(service, merged_id)] = winner
        changes = [Put(self._merged(service, winner)) for (service, _), winner in touched.items()]
        return self._commit(changes)

    def probe_health(self, service: str, instance_id: str) -> Health | None:
        """The health checker's current verdict on a merged instance (None: none)."""
        current = self._snapshot.full(service).instances.get(instance_id)
        if current is None:
            return None
        return self._probe.get(service, _EMPTY).get(current.instance_id)

    # ---------------------------------------------------------------- interest

    def _interest_changed(self) -> None:
        wanted = self.hub.interest
        previous = self._interest
        if wanted == previous:
            return
        self._interest = wanted
        for state in self._upstreams.values():
            self._set_interest(state, wanted)
        if wanted is None:
            return
        # Narrowed: forget what the upstreams held for services nobody wants
        # any more; no upstream watches them now, so they would go stale.
        touched: dict[_Key, None] = {}
        for state in self._upstreams.values():
            for service in [s for s in state.held if s not in wanted]:
                for instance_id in list(state.held[service]):
                    self._remove(state, service, instance_id, touched)
        self._commit(self._resolve(touched))

    def _set_interest(self, state: _Upstream, services: frozenset[str] | None) -> None:
        try:
            state.upstream.set_interest(services)
        except Exception:
            # One adapter's bug must not fail the subscriber that happened
            # to be first; the adapter keeps its previous interest.
            log.exception("upstream %r: set_interest failed", state.name)
