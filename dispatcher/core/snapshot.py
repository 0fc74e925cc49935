"""The versioned, immutable snapshot of every service a Dispatcher knows.

A :class:`Snapshot` is never modified: :meth:`Snapshot.apply` returns a new
one that shares every unchanged :class:`ServiceEntry` (and every unchanged
:class:`~dispatcher.core.model.Instance` inside a changed entry) with the old one.
Readers keep whatever snapshot they picked up for as long as they like and
never take a lock; the writer (one task, the fan-in) publishes a new
snapshot by rebinding a single reference.

Versions. The global version grows by exactly one per ``apply`` that changes
something, and a service's version is the global version at which it last
changed. A service whose last instance disappears leaves a *tombstone*
(just its version) so that its version never goes backwards: a consumer that
saw it at version 7 must never later be told "empty at version 0", and the
:class:`Delta` that recreates it names version 7 as its ``from_version``, so
consecutive deltas of one service always chain (``from_version`` equals the
previous ``to_version``). Tombstones cost one dict slot per service name that
ever went empty; service names are low-cardinality in every registry we
front, so they are not collected.

Cost. ``apply`` copies the top-level service dict and, for each changed
service, that service's instance dict: O(services + instances of changed
services). Callers should batch the changes that arrive together (one
``apply`` per batch of upstream events) rather than apply them one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Final, TypeAlias, cast

import attrs

from dispatcher.core.model import Instance

__all__ = [
    "Change",
    "Delta",
    "Put",
    "Remove",
    "ServiceEntry",
    "Snapshot",
    "diff",
]

_NO_INSTANCES: Final[Mapping[str, Instance]] = MappingProxyType({})


@attrs.frozen(slots=True)
class Put:
    """Make ``instance`` the current value of its ``(service, instance_id)``."""

    instance: Instance


@attrs.frozen(slots=True)
class Remove:
    """Remove the instance ``instance_id`` of ``service``, if it is there."""

    service: str
    instance_id: str


Change: TypeAlias = Put | Remove


@attrs.frozen(slots=True)
class ServiceEntry:
    """One service in one snapshot: its instances by id, and its version.

    ``instances`` is a read-only view of a dict that the snapshot created
    for this entry alone and never mutates afterwards, so handing it out
    needs no copy.
    """

    service: str
    version: int
    instances: Mapping[str, Instance] = attrs.field(default=_NO_INSTANCES, hash=False)


@attrs.frozen(slots=True)
class Delta:
    """What changed in one service between two of its versions.

    A consumer holding the service at ``from_version`` reaches
    ``to_version`` by adding ``added``, replacing ``updated`` (new values,
    matched by ``instance_id``) and dropping ``removed`` (the old values, so
    that a face can still render what it must take away). A consumer at any
    other version must ask for :meth:`Snapshot.full` instead: applying a
    delta across a gap would silently lose changes.

    Deltas are minimal: an instance appears at most once, and re-putting an
    equal value produces nothing.
    """

    service: str
    from_version: int
    to_version: int
    added: tuple[Instance, ...] = ()
    updated: tuple[Instance, ...] = ()
    removed: tuple[Instance, ...] = ()

    @property
    def removed_ids(self) -> tuple[str, ...]:
        """The instance ids of ``removed``."""
        return tuple(instance.instance_id for instance in self.removed)


def _keyed(
    instances: Mapping[str, Instance] | Iterable[Instance],
) -> dict[tuple[str, str], Instance]:
    values = instances.values() if isinstance(instances, Mapping) else instances
    # A later duplicate wins: re-listing a registry can briefly show two
    # records for one id (a dead session's ephemeral znode next to the new
    # one), and the adapter, not this helper, knows which one to prefer.
    return {(instance.service, instance.instance_id): instance for instance in values}


def diff(
    old: Mapping[str, Instance] | Iterable[Instance],
    new: Mapping[str, Instance] | Iterable[Instance],
) -> tuple[Change, ...]:
    """The minimal changes that turn the instance set ``old`` into ``new``.

    Instances are matched by ``(service, instance_id)``, so one call can
    cover an adapter's whole listing across many services. The result holds
    a :class:`Put` for each instance that is new or whose value changed and a
    :class:`Remove` for each one that is gone; equal instances (equality
    ignores :attr:`Instance.source`) produce nothing. This is what an adapter
    emits after re-listing its registry on reconnect: exactly the changes
    that happened while it was away.

    Mappings are read through their values (their keys are ignored);
    ``Snapshot.full(service).instances`` can be passed directly.
    """
    before = _keyed(old)
    after = _keyed(new)
    changes: list[Change] = [
        Put(instance) for key, instance in after.items() if before.get(key) != instance
    ]
    changes.extend(
        Remove(service, instance_id)
        for (service, instance_id) in before
        if (service, instance_id) not in after
    )
    return tuple(changes)


@attrs.frozen(slots=True, eq=False)
class Snapshot(Mapping[str, ServiceEntry]):
    """An immutable mapping of service name to :class:`ServiceEntry`.

    ``Snapshot()`` is the empty snapshot at version 0. Only services with at
    least one instance are keys of the mapping; :meth:`full` also answers
    for services that are empty or were never seen.

    Snapshots compare like any mapping (by content); two snapshots with the
    same content but different versions are equal, so compare ``version``
    when that matters.
    """

    version: int = 0
    _services: Mapping[str, ServiceEntry] = attrs.field(factory=dict, repr=False, alias="_services")
    _tombstones: Mapping[str, int] = attrs.field(factory=dict, repr=False, alias="_tombstones")

    def __getitem__(self, service: str) -> ServiceEntry:
        return self._services[service]

    def __iter__(self) -> Iterator[str]:
        return iter(self._services)

    def __len__(self) -> int:
        return len(self._services)

    def __contains__(self, service: object) -> bool:
        return service in self._services

    def __repr__(self) -> str:
        return f"Snapshot(version={self.version}, services={len(self._services)})"

    def full(self, service: str) -> ServiceEntry:
        """The whole current state of ``service``, for a consumer that fell behind.

        A service that has no instances (never seen, or emptied) yields an
        empty entry whose version is the one it last changed at (0 if never
        seen), so versions a consumer sees for a service never go down.
        """
        entry = self._services.get(service)
        if entry is not None:
            return entry
        return ServiceEntry(service, self._tombstones.get(service, 0))

    def apply(self, changes: Iterable[Change]) -> tuple[Snapshot, tuple[Delta, ...]]:
        """Apply a batch of changes; return the new snapshot and its deltas.

        Within one batch the last change to an ``(service, instance_id)``
        wins, and only the net effect relative to this snapshot is reported:
        putting an instance and removing it again, or re-putting an equal
        value, produces no delta. A put whose value equals the current one
        keeps the current object, including its older ``source``: provenance
        alone is not a change consumers can see.

        If nothing changed, the result is ``(self, ())``: no new version.
        Otherwise the new snapshot has version ``self.version + 1``, every
        changed service gets that version, and there is one :class:`Delta`
        per changed service, in the order the services first appear in
        ``changes``. ``self`` is untouched and stays valid.
        """
        wanted: dict[str, dict[str, Instance | None]] = {}
        for change in changes:
            if isinstance(change, Put):
                instance = change.instance
                wanted.setdefault(instance.service, {})[instance.instance_id] = instance
            elif isinstance(change, Remove):
                wanted.setdefault(change.service, {})[change.instance_id] = None
            else:
                raise TypeError(f"not a Put or Remove: {change!r}")

        version = self.version + 1
        deltas: list[Delta] = []
        entries: dict[str, ServiceEntry | None] = {}
        for service, targets in wanted.items():
            entry = self._services.get(service)
            # Every entry in _services was built by apply() around a MappingProxyType
            # (and _NO_INSTANCES is one), so the public Mapping type hides a proxy.
            current = cast(
                "MappingProxyType[str, Instance]",
                entry.instances if entry is not None else _NO_INSTANCES,
            )
            added: list[Instance] = []
            updated: list[Instance] = []
            removed: list[Instance] = []
            for instance_id, target in targets.items():
                existing = current.get(instance_id)
                if target is None:
                    if existing is not None:
                        removed.append(existing)
                elif existing is None:
                    added.append(target)
                elif existing != target:
                    updated.append(target)
            if not (added or updated or removed):
                continue

            # mappingproxy.copy() copies the dict behind it at C speed; dict(proxy)
            # walks it item by item, 17x slower, and dominated apply().
            instances = current.copy()
            for instance in removed:
                del instances[instance.instance_id]
            for instance in (*added, *updated):
                instances[instance.instance_id] = instance
            previous = entry.version if entry is not None else self._tombstones.get(service, 0)
            deltas.append(
                Delta(service, previous, version, tuple(added), tuple(updated), tuple(removed))
            )
            entries[service] = (
                ServiceEntry(service, version, MappingProxyType(instances)) if instances else None
            )

        if not deltas:
            return self, ()

        services = dict(self._services)
        for service, new_entry in entries.items():
            if new_entry is None:
                del services[service]
            else:
                services[service] = new_entry
        tombstones = self._tombstones
        # Copy the tombstones only when this batch emptied or revived a
        # service; the common batch touches live services only.
        if any(e is None or s in tombstones for s, e in entries.items()):
            tombstones = {s: v for s, v in tombstones.items() if s not in entries}
            tombstones.update((s, version) for s, e in entries.items() if e is None)
        return Snapshot(version, services, tombstones), tuple(deltas)
