"""The ``[health]`` table: how the central health checker (:mod:`dispatcher.core.health`)
probes, and its ``[[health.service]]`` overrides::

    [health]
    enabled = false                 # probe the instances of the services this node owns
    interval = 5.0                  # seconds between two probes of one instance
    timeout = 1.0                   # seconds a probe may take; less than interval
    rise = 2                        # passes in a row that bring a failing instance back
    fall = 3                        # failures in a row that make a passing one failing
    jitter = 0.1                    # fraction of interval added per probe, in [0, 0.5]
    concurrency = 256               # probes in flight at once (sockets)
    recheck = 0.5                   # seconds between report-triggered probes of one instance
    probe = "tcp"                   # default probe: "tcp", "http" or "none"
    path = "/health"                # default path of the http probe

    [[health.service]]              # per-service overrides
    name = "orders"
    probe = "http"
    path = "/healthz"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.settings import ConfigError

__all__ = ["PROBES", "HealthConfig", "ServiceProbe", "parse_health"]

PROBES: Final = ("tcp", "http", "none")
"""Probe kinds: a TCP connect, an HTTP GET (2xx or 3xx passes), or no probing."""

_HEALTH_KEYS: Final = (
    "enabled", "interval", "timeout", "rise", "fall", "jitter", "concurrency", "recheck",
    "probe", "path", "service",
)  # fmt: skip
_HEALTH_SERVICE_KEYS: Final = ("name", "probe", "path")


def _check_probe(probe: str, path: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe: must be one of {', '.join(map(repr, PROBES))}, not {probe!r}")
    # The path goes into a request line as is: no room for whitespace.
    if not path.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in path):
        raise ValueError(f"path: must start with / and contain no whitespace, not {path!r}")


@attrs.frozen
class ServiceProbe:
    """A ``[[health.service]]`` table: how one service's instances are probed."""

    name: str
    probe: str = "tcp"
    path: str = "/health"

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        _check_probe(self.probe, self.path)


@attrs.frozen
class HealthConfig:
    """The ``[health]`` table: the central health checker (see :mod:`dispatcher.core.health`).

    Times are in seconds. Invalid values raise ``ValueError`` naming the key.
    """

    enabled: bool = False
    interval: float = 5.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1
    concurrency: int = 256
    recheck: float = 0.5
    probe: str = "tcp"
    path: str = "/health"
    services: tuple[ServiceProbe, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"interval: must be positive, not {self.interval}")
        # A probe slower than the interval would overlap the next one of the
        # same instance: one probe per instance per interval is the contract.
        if not 0 < self.timeout < self.interval:
            raise ValueError(
                f"timeout: must be positive and less than interval, not {self.timeout}"
            )
        if not 0 <= self.jitter <= 0.5:
            raise ValueError(f"jitter: must be in [0, 0.5], not {self.jitter}")
        if not self.recheck > 0:
            raise ValueError(f"recheck: must be positive, not {self.recheck}")
        for key in ("rise", "fall", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, not {getattr(self, key)}")
        _check_probe(self.probe, self.path)
        names = [service.name for service in self.services]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"service: names must be unique, repeated: {repeated}")

    def probe_for(self, service: str) -> ServiceProbe:
        """How ``service`` is probed: its own table, or the defaults."""
        for override in self.services:
            if override.name == service:
                return override
        return ServiceProbe(service, self.probe, self.path)

    def to_mapping(self) -> dict[str, Any]:
        """The ``[health]`` table as TOML would give it."""
        table: dict[str, Any] = {
            key: getattr(self, key)
            for key in _HEALTH_KEYS if key != "service"
        }  # fmt: skip
        if self.services:
            table["service"] = [
                {"name": s.name, "probe": s.probe, "path": s.path} for s in self.services
            ]
        return table


def parse_health(table: Mapping[str, Any]) -> HealthConfig:
    """Check the ``[health]`` table and its ``[[health.service]]`` overrides."""
    settings.reject_unknown(table, _HEALTH_KEYS, "health")
    options: dict[str, Any] = {}
    if "enabled" in table:
        options["enabled"] = settings.boolean(table["enabled"], "health.enabled")
    for key in ("interval", "timeout", "jitter", "recheck"):
        if key in table:
            value = table[key]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(
                    f"health.{key}: must be a number, not {settings.type_name(value)}"
                )
            options[key] = float(value)
    for key in ("rise", "fall", "concurrency"):
        if key in table:
            options[key] = settings.integer(table[key], f"health.{key}", minimum=1)
    for key in ("probe", "path"):
        if key in table:
            options[key] = settings.string(table[key], f"health.{key}")
    overrides: list[ServiceProbe] = []
    for where, entry in settings.array_of_tables(table.get("service", []), "health.service"):
        settings.reject_unknown(entry, _HEALTH_SERVICE_KEYS, where)
        if "name" not in entry:
            raise ConfigError(f"{where}.name: missing (every [[health.service]] needs one)")
        fields = {key: settings.string(entry[key], f"{where}.{key}") for key in entry}
        fields.setdefault("probe", options.get("probe", "tcp"))
        fields.setdefault("path", options.get("path", "/health"))
        try:
            overrides.append(ServiceProbe(**fields))
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    try:
        return HealthConfig(**options, services=tuple(overrides))
    except ValueError as exc:
        raise ConfigError(f"health.{exc}") from None
