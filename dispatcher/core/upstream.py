"""The contract between the Dispatcher and its adapters, and the registry of kinds.

An adapter turns one upstream registry (a ZooKeeper ensemble, an etcd cluster,
a Consul agent, a file) into an :class:`Upstream`: a task that connects,
lists, watches, reconnects on its own, and reports what it sees as a stream of
:class:`UpstreamEvent`\\ s on a trio memory channel:

* :class:`Listing`: the complete current state of some services (or all). The
  fan-in diffs it against what it held from this upstream, so an adapter that
  re-lists after a reconnect, a session loss or a compaction emits exactly the
  changes that happened meanwhile, no more, no fewer.
* :class:`Changed`: incremental puts and removals between listings.
* :class:`Status`: connected or not. While disconnected the last state stays
  served and is marked stale.

Blocking client libraries run in worker threads and hand events to trio with
``trio.from_thread``; they never touch trio state from a thread.

Adapters are chosen by configuration through one registry of kinds, the
``zkgate.upstreams`` entry-point group (:func:`upstream_kind`) in ``pyproject.toml``; the Dispatcher
never imports an adapter module by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, Self

import attrs
import trio

from dispatcher.core.model import Instance, Source
from dispatcher.core.snapshot import Change

# Re-exported: adapters take the configuration error and the one unknown-key check
# from the contract they implement. Both are defined in dispatcher.settings.
from dispatcher.settings import ConfigError as ConfigError
from dispatcher.settings import reject_unknown as reject_unknown

ENTRY_POINT_GROUP = "zkgate.upstreams"
LAYOUT_GROUP = "zkgate.layouts"


@attrs.frozen
class Listing:
    """Everything the upstream holds for ``services`` (all of its services when None)."""

    instances: tuple[Instance, ...]
    services: frozenset[str] | None = None


@attrs.frozen
class Changed:
    """Incremental changes since the last event."""

    changes: tuple[Change, ...]


@attrs.frozen
class Status:
    """Whether the upstream is reachable; ``detail`` says why, for logs and mntr."""

    connected: bool
    detail: str = ""


UpstreamEvent = Listing | Changed | Status


@attrs.frozen
class Inspection:
    """What an upstream holds, read directly for inspection, and at which revision.

    ``instances`` cover ``services`` (every service under the roots when
    None), as the adapter would list them. ``revision`` is the upstream's own
    version the read reflects (etcd's revision, ZooKeeper's highest zxid
    seen, Consul's index), in the unit of ``Source.revision``; 0 when the
    upstream has none. A record the fan-in holds with a newer revision
    arrived after this read and is not compared.
    """

    instances: tuple[Instance, ...]
    services: frozenset[str] | None
    revision: int = 0
    #: Requests the read took (pages, listings, queries): its cost, for metrics.
    reads: int = 1


class Upstream(Protocol):
    """One configured registry, as the Dispatcher drives it."""

    #: The configured name, unique in one process; it becomes ``Source.adapter``.
    name: str

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        """Build from a config table; raise :class:`ConfigError` naming a bad key."""
        ...

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        """Connect, list, watch, and reconnect with backoff until cancelled."""
        ...

    def set_interest(self, services: frozenset[str] | None) -> None:
        """Watch only these services upstream (None: every service under the roots).

        Called from the trio thread. Narrowing drops upstream watches;
        widening lists the new services (a :class:`Listing` for them) and
        watches them.
        """
        ...


class Inspectable(Protocol):
    """An upstream that can be read directly, beside its watch, for inspection.

    Optional: the inspector (:mod:`dispatcher.inspection`) checks upstreams
    that have this method and skips the rest. The read must not disturb the
    adapter's own session, and its cost must be bounded by the number of
    services, not of instances (one range per prefix, one listing per
    service directory, one catalog query per service).
    """

    async def inspect(self, services: frozenset[str] | None) -> Inspection:
        """Read ``services`` (None: everything under the roots) directly; raise
        ``OSError`` or the client's error when the upstream cannot be reached."""
        ...


def upstream_kind(kind: str) -> type[Upstream]:
    """The adapter class registered for ``kind``; loads that one entry point only,
    so one broken adapter cannot break configurations that do not use it."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=kind)
    if not found:
        known = ", ".join(sorted(entry_points(group=ENTRY_POINT_GROUP).names)) or "none installed"
        raise ConfigError(f"unknown upstream kind {kind!r} (known: {known})")
    try:
        loaded: type[Upstream] = next(iter(found)).load()
    except Exception as exc:
        raise ConfigError(f"upstream kind {kind!r} cannot be loaded: {exc!r}") from None
    return loaded


class Layout(Protocol):
    """How one ZooKeeper path layout spells an instance as a znode.

    The one definition for projections (which render) and the ZooKeeper
    adapter (which parses); layout modules such as ``adapters.layouts.dubbo``
    satisfy it. ``parse`` never raises on bad input: garbage yields None.
    """

    NAME: str

    def directory(self, service: str) -> str:
        """The directory holding ``service``'s instance znodes, relative to the root."""
        ...

    def service_of(self, directory: str) -> str | None:
        """The service whose instance directory ``directory`` is, or None."""
        ...

    def parse(
        self, service: str, name: str, data: bytes, *, source: Source | None = None
    ) -> Instance | None:
        """One znode (``name`` under ``service``'s directory, with ``data``) as an Instance."""
        ...

    def render(self, instance: Instance) -> tuple[str, bytes]:
        """``instance`` as ``(znode name, data)`` under its service's directory."""
        ...


def layout_kind(name: str) -> Layout:
    """The path layout registered as ``name`` in the ``zkgate.layouts`` entry-point group.

    The one way to find a layout, so a plugin layout works wherever a built-in
    one does (projections and the ZooKeeper adapter). Loads that entry point
    only; raises :class:`ConfigError` for an unknown name or one that fails to load.
    """
    found = entry_points(group=LAYOUT_GROUP, name=name)
    if not found:
        known = ", ".join(sorted(entry_points(group=LAYOUT_GROUP).names)) or "none installed"
        raise ConfigError(f"unknown layout {name!r} (known: {known})")
    try:
        loaded: Layout = next(iter(found)).load()
    except Exception as exc:
        raise ConfigError(f"layout {name!r} cannot be loaded: {exc!r}") from None
    return loaded


def require(options: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """``options[key]``, checked to be a ``kind``; a ConfigError names what is wrong."""
    if key not in options:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return check_type(options[key], key, kind, where)


def check_type(value: Any, key: str, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: key {key!r} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value
