"""The ``[[upstream]]`` tables: which registries the fan-in reads, in precedence order::

    [[upstream]]                    # one table per registry, in precedence order
    name = "zk-main"                # unique; becomes every instance's source.adapter
    kind = "zookeeper"              # an entry point of the zkgate.upstreams group
    # ... the kind's own options, checked by its from_config

Each table is validated by calling its kind's ``from_config`` at load time; the
gateway calls it again to build the live object (:meth:`UpstreamConfig.build`), so
``from_config`` must have no side effects (no connections, no threads).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from dispatcher import settings
from dispatcher.core.upstream import Upstream
from dispatcher.settings import ConfigError

__all__ = ["KindLookup", "UpstreamConfig", "parse_upstreams"]

KindLookup = Callable[[str], type[Upstream]]
"""Resolves an upstream kind to its class; raises ConfigError for an unknown one."""


def _read_only_copy(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # A deep copy: the caller's nested tables must not change the value later.
    return MappingProxyType(copy.deepcopy(dict(value)))


@attrs.frozen
class UpstreamConfig:
    """One ``[[upstream]]`` table: its name, kind, the kind's class and its options.

    ``options`` is the table without ``name`` and ``kind``, exactly as read
    (nested tables and arrays included), behind a read-only view.
    """

    name: str
    kind: str
    factory: type[Upstream] = attrs.field(repr=False)
    options: Mapping[str, Any] = attrs.field(
        factory=lambda: MappingProxyType({}), hash=False, converter=_read_only_copy
    )

    def build(self) -> Upstream:
        """A new live upstream object for this table.

        The adapter gets its own deep copy of the options, so nothing it
        keeps or changes can alter this value.
        """
        return self.factory.from_config(self.name, copy.deepcopy(dict(self.options)))

    def to_mapping(self) -> dict[str, Any]:
        """The ``[[upstream]]`` table as TOML would give it."""
        return {"name": self.name, "kind": self.kind, **copy.deepcopy(dict(self.options))}


def parse_upstreams(value: Any, lookup: KindLookup) -> tuple[UpstreamConfig, ...]:
    """Check the ``[[upstream]]`` array, resolving each kind with ``lookup``."""
    result: list[UpstreamConfig] = []
    seen: dict[str, int] = {}
    for index, (where, table) in enumerate(settings.array_of_tables(value, "upstream")):
        for key in ("name", "kind"):
            if key not in table:
                raise ConfigError(f"{where}.{key}: missing (every upstream needs one)")
        name = settings.string(table["name"], f"{where}.name")
        if name in seen:
            raise ConfigError(
                f"{where}.name: {name!r} is already the name of upstream[{seen[name]}]"
            )
        seen[name] = index
        kind = settings.string(table["kind"], f"{where}.kind")
        try:
            factory = lookup(kind)
        except ConfigError as exc:
            raise ConfigError(f"{where}.kind: {exc}") from None
        options = {k: v for k, v in table.items() if k not in ("name", "kind")}
        upstream = UpstreamConfig(name, kind, factory, options)
        try:
            upstream.build()
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise ConfigError(_adapter_message(where, name, str(exc))) from None
        result.append(upstream)
    return tuple(result)


def _adapter_message(where: str, name: str, message: str) -> str:
    # Adapters name the table by its name ("upstream 'zk': ..."); put the
    # index in front so the message points into the file either way.
    own = f"upstream {name!r}"
    if message.startswith(own):
        return f"{where} ({name!r}){message[len(own) :]}"
    return f"{where} ({name!r}): {message}"
