"""The ``[[projection]]`` tables: read-only subtrees of the ZooKeeper face showing the
unified registry in one layout (see :mod:`dispatcher.faces.projection`)::

    [[projection]]
    root = "/dubbo"                 # where the subtree is mounted
    layout = "dubbo"                # an entry point of the zkgate.layouts group
    hide_failing = true             # leave failing instances out (ServerSet marks them DEAD)
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.core.upstream import layout_kind
from dispatcher.settings import ConfigError
from dispatcher.zk.server.config import mount_root

__all__ = ["ProjectionConfig", "parse_projections"]

_PROJECTION_KEYS: Final = ("root", "layout", "hide_failing")


@attrs.frozen
class ProjectionConfig:
    """A read-only subtree at ``root`` showing the unified registry in ``layout``."""

    root: str
    layout: str
    #: Leave failing instances out (layouts without a status field); ServerSet
    #: shows them with status DEAD instead.
    hide_failing: bool = True

    def to_mapping(self) -> dict[str, Any]:
        """The ``[[projection]]`` table as TOML would give it."""
        return {"root": self.root, "layout": self.layout, "hide_failing": self.hide_failing}


def parse_projections(value: Any) -> tuple[ProjectionConfig, ...]:
    """Check the ``[[projection]]`` array; each layout must be installed."""
    result: list[ProjectionConfig] = []
    for where, table in settings.array_of_tables(value, "projection"):
        settings.reject_unknown(table, _PROJECTION_KEYS, where)
        root = mount_root(table, where, ("root", "layout"), [p.root for p in result])
        layout_name = settings.string(table["layout"], f"{where}.layout")
        try:
            layout_kind(layout_name)
        except ConfigError as exc:
            raise ConfigError(f"{where}.layout: {exc}") from None
        hide = table.get("hide_failing", True)
        if not isinstance(hide, bool):
            raise ConfigError(
                f"{where}.hide_failing: must be a boolean, not {settings.type_name(hide)}"
            )
        result.append(ProjectionConfig(root, layout_name, hide))
    return tuple(result)
