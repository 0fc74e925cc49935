"""The ``[inspection]`` table (see :mod:`dispatcher.inspection.inspector`)::

[inspection]
enabled = false        # the scheduled passes; POST /inspect works either way
interval = 60.0        # seconds between the starts of two scheduled passes
grace = 5.0            # a difference younger than this is a change still in flight
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.settings import ConfigError

__all__ = ["InspectionConfig", "parse_inspection"]

_KEYS: Final = ("enabled", "interval", "grace")
_MOST_SECONDS: Final = 86400.0


@attrs.frozen
class InspectionConfig:
    """When inspection runs, and how old a difference must be to count.

    ``grace`` must stay below ``interval`` so that a divergence is reported
    within two intervals of its appearance.
    """

    enabled: bool = False
    interval: float = 60.0
    grace: float = 5.0

    def to_mapping(self) -> dict[str, Any]:
        """The ``[inspection]`` table as TOML would give it."""
        return {"enabled": self.enabled, "interval": self.interval, "grace": self.grace}


def parse_inspection(table: Mapping[str, Any], where: str = "inspection") -> InspectionConfig:
    """Check the ``[inspection]`` table; a ConfigError names the bad key."""
    settings.reject_unknown(table, _KEYS, where)
    options: dict[str, Any] = {}
    if "enabled" in table:
        options["enabled"] = settings.boolean(table["enabled"], f"{where}.enabled")
    for key in ("interval", "grace"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{where}.{key}: must be a number of seconds, not {settings.type_name(value)}"
                )
            if not 0 < value <= _MOST_SECONDS:
                raise ConfigError(
                    f"{where}.{key}: must be above 0 and at most {_MOST_SECONDS:g} seconds, "
                    f"not {value}"
                )
            options[key] = float(value)
    config = InspectionConfig(**options)
    if config.grace >= config.interval:
        raise ConfigError(
            f"{where}.grace: must be below interval ({config.interval:g} s), not {config.grace:g}"
        )
    return config
