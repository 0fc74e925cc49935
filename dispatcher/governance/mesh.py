"""The mesh settings document: per consumer application and service, the switch and the ratio.

Kept in the governance store as kind ``"mesh"`` (versioned, audited, rolled back like the
policies), as JSON::

    {"consumers": {"web-frontend": {"shop.Cart": {"mode": "on", "ratio": 30}}}}

``mode`` is ``"off"`` (the consumer sees the providers as the registries say) or ``"on"``
with ``ratio`` R, 0 to 100 (default 100): R% of that consumer's calls to that service go
through its host's sidecar proxy, the rest directly (see :mod:`dispatcher.faces.mesh.views`).
A pair with no entry is off. An ``"off"`` entry keeps no ratio.

An ``"off"`` entry may be ``locked`` with a ``reason``: the automatic rollback
(:mod:`dispatcher.faces.mesh.rollback`) writes ``{"mode": "off", "locked": true, "reason":
"..."}`` when the mesh path misbehaves, and never turns a pair on, so a rolled-back consumer
stays off until an operator writes the pair ``"on"`` again (an ``"on"`` entry cannot be
locked: writing it is what clears the lock).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Final

import attrs

from dispatcher.governance.policy import canonical_json

__all__ = ["KIND", "MeshChange", "MeshError", "MeshSettings", "Switch", "diff"]

KIND: Final = "mesh"
"""The governance store kind of the mesh settings."""

MODES: Final = ("off", "on")
MAX_NAME: Final = 512
MAX_REASON: Final = 2048
"""Longest ``reason`` of a locked switch (it is shown in listings and the console)."""
MAX_ENTRIES: Final = 100_000
"""Most (application, service) pairs one document may hold; each is checked on every read."""


class MeshError(ValueError):
    """A mesh document that cannot be accepted; the message names the key."""


@attrs.frozen
class Switch:
    """One consumer application's setting for one service."""

    mode: str = "off"
    ratio: int = 0
    #: Off by the automatic rollback; only an operator's write of the pair clears it.
    locked: bool = False
    #: Why it is locked: the rule that tripped and the figures it saw.
    reason: str = ""

    def __str__(self) -> str:
        if self.mode == "on":
            return f"on {self.ratio}%"
        return f"off (locked: {self.reason})" if self.locked else "off"

    def to_mapping(self) -> dict[str, Any]:
        if self.mode == "off":
            result: dict[str, Any] = {"mode": "off"}
            if self.locked:
                result["locked"] = True
            if self.reason:
                result["reason"] = self.reason
            return result
        return {"mode": "on", "ratio": self.ratio}


OFF: Final = Switch()


@attrs.frozen
class MeshChange:
    """One difference between two documents: ``old`` or ``new`` None where there is no entry."""

    application: str
    service: str
    old: Switch | None
    new: Switch | None

    def __str__(self) -> str:
        old = "unset" if self.old is None else str(self.old)
        new = "unset" if self.new is None else str(self.new)
        return f"mesh {self.application!r} -> {self.service!r}: {old} -> {new}"


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise MeshError(f"{where}: must be a non-empty name of at most {MAX_NAME} characters")
    return value


def _switch(value: object, where: str) -> Switch:
    if not isinstance(value, Mapping):
        raise MeshError(f"{where}: must be a table with mode (and ratio)")
    unknown = sorted(set(value) - {"mode", "ratio", "locked", "reason"})
    if unknown:
        raise MeshError(
            f"{where}: unknown key {unknown[0]!r} (expected mode, ratio, locked, reason)"
        )
    mode = value.get("mode")
    if mode not in MODES:
        raise MeshError(f"{where}.mode: must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        if "ratio" in value:
            raise MeshError(f"{where}.ratio: an 'off' switch has no ratio")
        locked = value.get("locked", False)
        if not isinstance(locked, bool):
            raise MeshError(f"{where}.locked: must be true or false, not {locked!r}")
        reason = value.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise MeshError(f"{where}.reason: must be text of at most {MAX_REASON} characters")
        return Switch("off", 0, locked, reason) if locked or reason else OFF
    for key in ("locked", "reason"):
        if key in value:
            # Writing the pair "on" is how an operator clears a rollback's lock.
            raise MeshError(f"{where}.{key}: only an 'off' switch is locked or has a reason")
    ratio = value.get("ratio", 100)
    if isinstance(ratio, bool) or not isinstance(ratio, int) or not 0 <= ratio <= 100:
        raise MeshError(f"{where}.ratio: must be a whole number from 0 to 100, got {ratio!r}")
    return Switch("on", ratio)


@attrs.frozen
class MeshSettings:
    """A whole mesh document: ``switches[(application, service)]``."""

    switches: Mapping[tuple[str, str], Switch] = attrs.field(factory=dict)

    def switch(self, application: str, service: str) -> Switch | None:
        """The entry for the pair, None when there is none (which means off)."""
        return self.switches.get((application, service))

    def services_of(self, application: str) -> Iterator[str]:
        return (service for app, service in self.switches if app == application)

    def with_switch(self, application: str, service: str, switch: Switch) -> MeshSettings:
        """A copy with the pair's entry replaced by ``switch``."""
        return MeshSettings({**self.switches, (application, service): switch})

    @classmethod
    def from_mapping(cls, document: object) -> MeshSettings:
        """Check a parsed document; MeshError names the first bad key."""
        if not isinstance(document, Mapping):
            raise MeshError("the mesh document must be a JSON object with 'consumers'")
        unknown = sorted(set(document) - {"consumers"})
        if unknown:
            raise MeshError(f"unknown key {unknown[0]!r} (expected consumers)")
        consumers = document.get("consumers", {})
        if not isinstance(consumers, Mapping):
            raise MeshError("consumers: must be a table of applications")
        switches: dict[tuple[str, str], Switch] = {}
        for application, services in consumers.items():
            where = f"consumers.{application!r}"
            _name(application, where)
            if not isinstance(services, Mapping):
                raise MeshError(f"{where}: must be a table of services")
            for service, value in services.items():
                _name(service, f"{where}.{service!r}")
                switches[(application, service)] = _switch(value, f"{where}.{service!r}")
                if len(switches) > MAX_ENTRIES:
                    raise MeshError(f"consumers: more than {MAX_ENTRIES} entries")
        return cls(switches)

    @classmethod
    def from_json(cls, body: str) -> MeshSettings:
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise MeshError(f"the mesh document is not JSON: {exc}") from None
        return cls.from_mapping(document)

    def to_mapping(self) -> dict[str, Any]:
        consumers: dict[str, dict[str, Any]] = {}
        for (application, service), switch in sorted(self.switches.items()):
            consumers.setdefault(application, {})[service] = switch.to_mapping()
        return {"consumers": consumers}

    def to_json(self) -> str:
        return canonical_json(self.to_mapping())


def diff(old: MeshSettings, new: MeshSettings) -> list[MeshChange]:
    """Every pair whose entry differs, sorted by application then service."""
    pairs = sorted(set(old.switches) | set(new.switches))
    return [
        MeshChange(app, service, old.switch(app, service), new.switch(app, service))
        for app, service in pairs
        if old.switch(app, service) != new.switch(app, service)
    ]
