"""The registry model: what one service instance is, wherever it was registered.

Every adapter turns its registry's records into :class:`Instance` values and
every face (the ZooKeeper projection, the subscription server) turns them
back into something a client understands. The values are small, frozen and
hashable so that a snapshot can share them freely between versions and
readers never need a lock: nothing here can change after construction.

Memory matters because a Dispatcher holds every instance of its shard at
once (the target is well under 1 KiB per instance at 100k instances), so the
classes use ``__slots__`` and the low-cardinality strings (service, host,
zone, protocol, metadata keys) are interned: a registry with 100k instances
has a few thousand distinct values for those (one host runs many services),
and each parse of a record would otherwise allocate a fresh copy of every
one of them. Interned strings are freed again once nothing refers to them.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import ItemsView, Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

__all__ = [
    "EMPTY_METADATA",
    "Health",
    "Instance",
    "Metadata",
    "Source",
]

_MAX_PORT: Final = 65535


class Health(enum.StrEnum):
    """What the Dispatcher believes about an instance's ability to serve.

    ``UNKNOWN`` is the normal state of a freshly registered instance when no
    health checker covers it: consumers should route to it, because in the
    registries we front, registration itself (an ephemeral znode, a lease)
    is the liveness signal. Only ``FAILING`` means "do not route here".
    """

    UNKNOWN = "unknown"
    PASSING = "passing"
    FAILING = "failing"


class Metadata(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping compared by value.

    ``dict`` cannot be used in a frozen value class because it is mutable
    and unhashable, and ``types.MappingProxyType`` is a view of a dict that
    someone else may still mutate (and is unhashable before Python 3.12).

    The entries are stored as one flat tuple ``(k1, v1, k2, v2, ...)``
    sorted by key: less than half the memory of a dict for the handful of
    entries an instance carries, and the sort makes equality and hashing
    plain tuple operations, independent of the order entries were given in.
    Lookups scan the keys: linear, but over a handful of entries, and the
    hot paths (diffing, rendering) compare or iterate rather than look up.
    Iteration is in key order. Keys are interned: the same few keys
    (``version``, ``application``...) repeat on every instance.
    """

    __slots__ = ("_flat",)

    _flat: tuple[str, ...]

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = (), /) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        entries: dict[str, str] = {}
        for key, value in pairs:
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata keys and values must be str, got {key!r}: {value!r}")
            entries[sys.intern(key)] = value
        self._flat = tuple(part for key in sorted(entries) for part in (key, entries[key]))

    def __getitem__(self, key: str) -> str:
        flat = self._flat
        for index in range(0, len(flat), 2):
            if flat[index] == key:
                return flat[index + 1]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat[::2])

    def __len__(self) -> int:
        return len(self._flat) // 2

    def __contains__(self, key: object) -> bool:
        # Mapping's default goes through __getitem__ and an exception.
        return key in self._flat[::2]

    def items(self) -> ItemsView[str, str]:
        # Mapping's default would look every key up again.
        return _MetadataItems(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._flat == other._flat
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._flat)

    def __repr__(self) -> str:
        return f"Metadata({dict(self.items())!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Slots do not pickle without help; worker threads and tests may
        # want to copy instances.
        return (Metadata, (dict(self.items()),))


class _MetadataItems(ItemsView[str, str]):
    __slots__ = ()

    _mapping: Metadata

    def __iter__(self) -> Iterator[tuple[str, str]]:
        flat = self._mapping._flat
        return zip(flat[::2], flat[1::2], strict=True)


EMPTY_METADATA: Final = Metadata()
"""The shared empty metadata: most instances of some registries have none,
and one shared object costs nothing per instance."""


def _to_metadata(value: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Metadata:
    if isinstance(value, Metadata):
        return value
    if value is None:
        return EMPTY_METADATA
    metadata = Metadata(value)
    return metadata if metadata else EMPTY_METADATA


def _intern(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}: {value!r}")
    return sys.intern(value)


def _non_empty(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


def _strict_int(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    # bool is an int subclass; "port=True" is always a bug upstream.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be int, got {type(value).__name__}: {value!r}")


def _valid_port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    _strict_int(instance, attribute, value)
    if not 0 <= value <= _MAX_PORT:
        raise ValueError(f"{attribute.name} must be in 0..{_MAX_PORT}, got {value}")


def _valid_weight(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    _strict_int(instance, attribute, value)
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen(slots=True)
class Source:
    """Where an instance came from: provenance, not part of its value.

    ``adapter`` is the configured adapter's name, ``key`` the upstream key
    (a znode path, an etcd key, a Consul service id) and ``revision`` the
    upstream's own version of that record (the znode's ``mzxid``, etcd's
    ``mod_revision``, Consul's ``ModifyIndex``), so that an adapter can tell
    a stale event from a fresh one.
    """

    adapter: str = attrs.field(converter=_intern, validator=_non_empty)
    key: str = attrs.field(validator=attrs.validators.instance_of(str))
    revision: int = attrs.field(default=0, validator=_strict_int)


@attrs.frozen(slots=True)
class Instance:
    """One registered endpoint of one service.

    ``instance_id`` is unique within ``service`` and is the key a snapshot
    files the instance under; ``endpoint`` (``(host, port)``) is the identity
    used when merging the same endpoint seen through several registries.

    ``source`` is excluded from equality and hashing on purpose: two records
    that describe the same endpoint identically are the same instance to
    every consumer, whichever upstream revision carried them. Comparing it
    would make an adapter's re-list after a reconnect report "updates" for
    records that were merely rewritten, which is exactly the noise the
    Dispatcher exists to absorb.

    Invalid values (empty service, id or host; port outside 0..65535;
    negative weight) raise ``ValueError``; wrongly typed ones ``TypeError``.
    """

    service: str = attrs.field(converter=_intern, validator=_non_empty)
    instance_id: str = attrs.field(validator=[attrs.validators.instance_of(str), _non_empty])
    host: str = attrs.field(converter=_intern, validator=_non_empty)
    port: int = attrs.field(validator=_valid_port)
    weight: int = attrs.field(default=100, kw_only=True, validator=_valid_weight)
    zone: str = attrs.field(default="", kw_only=True, converter=_intern)
    protocol: str = attrs.field(default="", kw_only=True, converter=_intern)
    metadata: Metadata = attrs.field(default=EMPTY_METADATA, kw_only=True, converter=_to_metadata)
    health: Health = attrs.field(default=Health.UNKNOWN, kw_only=True, converter=Health)
    source: Source | None = attrs.field(
        default=None,
        kw_only=True,
        eq=False,
        validator=attrs.validators.optional(attrs.validators.instance_of(Source)),
    )

    @property
    def endpoint(self) -> tuple[str, int]:
        """``(host, port)``: the identity of this instance when merging registries."""
        return (self.host, self.port)
