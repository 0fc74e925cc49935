"""The ``[dispatcher]`` table: how the fan-in (:mod:`dispatcher.core.fanin`) loads and serves::

[dispatcher]
interest = "all"                # or "subscribed": load only subscribed services
subscriber_queue = 1024         # updates a subscriber may lag before it is collapsed
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.core.fanin import Interest
from dispatcher.core.subscriptions import DEFAULT_QUEUE
from dispatcher.settings import ConfigError

__all__ = ["DispatcherConfig", "parse_dispatcher"]

_DISPATCHER_KEYS: Final = ("interest", "subscriber_queue")
_INTERESTS: Final = ("all", "subscribed")


@attrs.frozen
class DispatcherConfig:
    """The ``[dispatcher]`` table: how the fan-in loads and serves."""

    interest: Interest = "all"
    subscriber_queue: int = DEFAULT_QUEUE

    def to_mapping(self) -> dict[str, Any]:
        """The ``[dispatcher]`` table as TOML would give it."""
        return {"interest": self.interest, "subscriber_queue": self.subscriber_queue}


def parse_dispatcher(table: Mapping[str, Any]) -> DispatcherConfig:
    """Check the ``[dispatcher]`` table."""
    settings.reject_unknown(table, _DISPATCHER_KEYS, "dispatcher")
    options: dict[str, Any] = {}
    if "interest" in table:
        interest = settings.string(table["interest"], "dispatcher.interest")
        if interest not in _INTERESTS:
            raise ConfigError(
                f"dispatcher.interest: must be one of {', '.join(map(repr, _INTERESTS))}, "
                f"not {interest!r}"
            )
        options["interest"] = interest
    if "subscriber_queue" in table:
        options["subscriber_queue"] = settings.integer(
            table["subscriber_queue"], "dispatcher.subscriber_queue", minimum=1
        )
    return DispatcherConfig(**options)
