"""The ``[mesh]`` table: who the consumers are and which client versions may be switched on::

    [mesh]
    min_version = { dubbo = "2.7.8" }     # per framework; a consumer below it stays off
    sidecars = "/zkgate/sidecars"         # where proxies register (``<host>/<service>``)
    rollback = { max_failure_ratio = 0.2, max_p99_ms = 500, relative_to_direct = 2.0,
                 window = 10, min_requests = 20 }  # optional: automatic rollback

    [[mesh.consumer]]                     # a client that does not say who it is (Curator,
    application = "billing"               # plain ZooKeeper), known by its address
    address = "10.1.0.0/16"               # an IP address or a CIDR block
    framework = "curator"                 # optional: checked against min_version
    version = "5.4.0"                     # optional

A Dubbo consumer names itself in its registration (``application``, ``release`` or
``dubbo`` version); a rule applies to sessions from its address that carry no such
registration. The first matching rule wins.

``rollback`` (absent: no automatic rollback) is the rule
:mod:`dispatcher.faces.mesh.rollback` applies to the outcomes proxies report, per consumer
application and service, over the last ``window`` seconds; see :class:`RollbackConfig`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.settings import ConfigError
from dispatcher.zk.codec.paths import InvalidPath, validate_path

__all__ = [
    "DEFAULT_SIDECARS",
    "ConsumerRule",
    "MeshConfig",
    "RollbackConfig",
    "parse_mesh",
    "parse_version",
]

DEFAULT_SIDECARS: Final = "/zkgate/sidecars"
MAX_RULES: Final = 10_000

_KEYS: Final = ("min_version", "sidecars", "consumer", "rollback")
_ROLLBACK_KEYS: Final = (
    "max_failure_ratio", "max_p99_ms", "relative_to_direct", "window", "min_requests",
)  # fmt: skip
MAX_WINDOW: Final = 600
_RULE_KEYS: Final = ("application", "address", "framework", "version")
_VERSION_PART = re.compile(r"\d+")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_version(text: str) -> tuple[int, ...] | None:
    """A dotted version as numbers, as Dubbo compares them (``2.7.8-SNAPSHOT`` is
    ``(2, 7, 8)``: each part's leading digits); None when the first part has none."""
    parts: list[int] = []
    for part in text.strip().split("."):
        match = _VERSION_PART.match(part)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(part):
            break  # a qualifier ends the numbers: "8-SNAPSHOT", "0-beta"
    return tuple(parts) if parts else None


@attrs.frozen
class ConsumerRule:
    """A ``[[mesh.consumer]]``: sessions from ``network`` are application ``application``."""

    application: str
    network: Network
    framework: str | None = None
    version: str | None = None

    def to_mapping(self) -> dict[str, Any]:
        result: dict[str, Any] = {"application": self.application, "address": str(self.network)}
        if self.framework is not None:
            result["framework"] = self.framework
        if self.version is not None:
            result["version"] = self.version
        return result


@attrs.frozen
class RollbackConfig:
    """``[mesh] rollback``: when the mesh path of a consumer is judged to misbehave.

    Over the last ``window`` seconds, a (consumer application, service) pair whose mesh path
    has at least ``min_requests`` outcomes is rolled back when

    * its failure ratio (connect failures, resets, timeouts over all outcomes) is above
      ``max_failure_ratio``, or its latency p99 above ``max_p99_ms`` (absolute), or
    * with ``relative_to_direct`` set and the same pair's direct path known (at least
      ``min_requests`` outcomes in the window): its p99 is above ``relative_to_direct``
      times the direct p99, or its failure ratio above ``relative_to_direct`` times the
      direct one (a direct path with no failure counts as one failure in its outcomes, the
      smallest ratio its sample could tell from none). ``relative_to_direct = 0``: off.
    """

    max_failure_ratio: float = 0.2
    max_p99_ms: float = 500.0
    relative_to_direct: float | None = 2.0
    window: float = 10.0
    min_requests: int = 20

    def to_mapping(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "max_failure_ratio": self.max_failure_ratio, "max_p99_ms": self.max_p99_ms,
            "window": self.window, "min_requests": self.min_requests,
        }  # fmt: skip
        if self.relative_to_direct is not None:
            result["relative_to_direct"] = self.relative_to_direct
        return result


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{where}: must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def parse_rollback(table: Any, where: str) -> RollbackConfig:
    """Check ``[mesh] rollback``."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table (max_failure_ratio, max_p99_ms, ...)")
    settings.reject_unknown(table, _ROLLBACK_KEYS, where)
    options: dict[str, Any] = {}
    if "max_failure_ratio" in table:
        options["max_failure_ratio"] = _number(
            table["max_failure_ratio"], f"{where}.max_failure_ratio", 0.0, 1.0
        )
    if "max_p99_ms" in table:
        options["max_p99_ms"] = _number(table["max_p99_ms"], f"{where}.max_p99_ms", 0.001, 3.6e6)
    if "relative_to_direct" in table:
        relative = _number(table["relative_to_direct"], f"{where}.relative_to_direct", 0, 1000)
        if 0 < relative < 1:
            raise ConfigError(f"{where}.relative_to_direct: 0 (off) or at least 1, not {relative}")
        options["relative_to_direct"] = relative or None
    if "window" in table:
        options["window"] = _number(table["window"], f"{where}.window", 1.0, MAX_WINDOW)
    if "min_requests" in table:
        options["min_requests"] = settings.integer(
            table["min_requests"], f"{where}.min_requests", minimum=1
        )
    return RollbackConfig(**options)


@attrs.frozen
class MeshConfig:
    """The ``[mesh]`` table (see the module docstring)."""

    min_version: Mapping[str, str] = attrs.field(factory=dict)
    sidecars: str = DEFAULT_SIDECARS
    consumers: tuple[ConsumerRule, ...] = ()
    #: The automatic rollback's rule; None: no automatic rollback.
    rollback: RollbackConfig | None = None

    def rule_for(self, address: str) -> ConsumerRule | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        return next((rule for rule in self.consumers if ip in rule.network), None)

    def to_mapping(self) -> dict[str, Any]:
        result: dict[str, Any] = {"min_version": dict(self.min_version), "sidecars": self.sidecars}
        if self.consumers:
            result["consumer"] = [rule.to_mapping() for rule in self.consumers]
        if self.rollback is not None:
            result["rollback"] = self.rollback.to_mapping()
        return result


def _version(value: Any, where: str) -> str:
    text = settings.string(value, where)
    if parse_version(text) is None:
        raise ConfigError(f"{where}: not a version (digits and dots, e.g. 2.7.8): {text!r}")
    return text


def parse_mesh(table: Mapping[str, Any]) -> MeshConfig:
    """Check the ``[mesh]`` table."""
    where = "mesh"
    settings.reject_unknown(table, _KEYS, where)
    options: dict[str, Any] = {}
    versions = table.get("min_version", {})
    if not isinstance(versions, Mapping):
        raise ConfigError(f'{where}.min_version: must be a table of framework = "version"')
    options["min_version"] = {
        str(framework): _version(value, f"{where}.min_version.{framework}")
        for framework, value in versions.items()
    }
    if "sidecars" in table:
        path = settings.string(table["sidecars"], f"{where}.sidecars")
        try:
            validate_path(path)
        except InvalidPath as exc:
            raise ConfigError(f"{where}.sidecars: {exc}") from None
        options["sidecars"] = path
    rules = []
    for place, rule in settings.array_of_tables(table.get("consumer", []), f"{where}.consumer"):
        settings.reject_unknown(rule, _RULE_KEYS, place)
        for key in ("application", "address"):
            if key not in rule:
                raise ConfigError(f"{place}.{key}: required")
        address = settings.string(rule["address"], f"{place}.address")
        try:
            network = ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ConfigError(f"{place}.address: not an IP address or CIDR: {address!r}") from None
        framework = rule.get("framework")
        rules.append(ConsumerRule(
            settings.string(rule["application"], f"{place}.application"), network,
            None if framework is None else settings.string(framework, f"{place}.framework"),
            None if "version" not in rule else _version(rule["version"], f"{place}.version"),
        ))  # fmt: skip
    if len(rules) > MAX_RULES:
        raise ConfigError(f"{where}.consumer: at most {MAX_RULES} rules")
    options["consumers"] = tuple(rules)
    if "rollback" in table:
        options["rollback"] = parse_rollback(table["rollback"], f"{where}.rollback")
    return MeshConfig(**options)
