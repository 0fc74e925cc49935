"""The admin endpoint's mesh API: the switch and the ratio, and the consumers known.

The routes, rules and refusals of :mod:`dispatcher.faces.admin.documents` under ``/mesh``,
on the governance document of kind ``mesh`` (:mod:`dispatcher.governance.mesh`); refusals
name "mesh writes". One route more::

    GET  /mesh/consumers        the consumers known, their sessions, versions and, per
                                service, mode, ratio, state (on, off, refused, waiting) and why
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from dispatcher.faces.admin.documents import (
    ApiAnswer,
    DocumentApi,
    DocumentKind,
    ExtraRoute,
    error,
    revision_json,
)
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import MeshChange, MeshError, MeshSettings, diff
from dispatcher.governance.store import Revision

__all__ = ["KIND", "PREFIX", "MeshApi"]

PREFIX: Final = "/mesh"


def _load(revision: Revision | None) -> MeshSettings:
    if revision is None:
        return MeshSettings()
    try:
        return MeshSettings.from_json(revision.body)
    except MeshError:
        return MeshSettings()  # a store edited by hand: shown as if empty, not an error


def _change_json(change: MeshChange) -> Mapping[str, Any]:
    return {"scope": change.application, "path": change.service,
            "old": None if change.old is None else change.old.to_mapping(),
            "new": None if change.new is None else change.new.to_mapping()}  # fmt: skip


KIND: Final[DocumentKind[MeshSettings, MeshChange]] = DocumentKind(
    prefix=PREFIX,
    title="mesh settings",
    writes="mesh writes",
    store="the mesh settings store",
    whole="the whole mesh document",
    unavailable=(
        "mesh settings are unavailable: a [membership] store (ZooKeeper or etcd) is "
        "required; they are kept there, shared by every Dispatcher"
    ),
    parse=MeshSettings.from_mapping,
    invalid=MeshError,
    load=_load,
    to_json=MeshSettings.to_json,
    diff=diff,
    change_json=_change_json,
)


class MeshApi(DocumentApi):
    """The ``/mesh`` routes of one gateway's admin endpoint (see the module docstring)."""

    kind: ClassVar[DocumentKind[MeshSettings, MeshChange]] = KIND

    @property
    def feed(self) -> GovernanceFeed | None:
        return self.gateway.mesh

    def extra_routes(self) -> Mapping[str, Mapping[bytes, ExtraRoute]]:
        return {f"{PREFIX}/consumers": {b"GET": self._consumers}}

    async def _consumers(self, query: Mapping[str, list[str]]) -> ApiAnswer:
        views = self.gateway.mesh_views
        if views is None:
            return error(503, "the ZooKeeper face is not serving yet", ("retry-after", "1"))
        return ApiAnswer(200, {"version": views.version, "consumers": views.consumers()})

    def status(self) -> dict[str, Any]:
        """The ``mesh`` section of ``/status`` (the status page's mesh console): the current
        version with its document, the last few history entries (as read by
        :meth:`refresh_status`) and the last rollback among them, if any."""
        feed = self.feed
        if feed is None:
            return {"available": False, "reason": KIND.unavailable}
        result: dict[str, Any] = {"available": True, "loaded": feed.loaded.is_set(),
                                  "version": feed.version, "document": {}}  # fmt: skip
        if feed.current is not None:
            result.update(revision_json(feed.current))
        history = self.status_history
        result["history"] = history
        result["history_error"] = self.status_history_error
        result["last_rollback"] = next(
            (
                {key: entry.get(key) for key in ("version", "restores", "who", "when", "why")}
                for entry in history
                if entry.get("restores") is not None
            ),
            None,
        )
        return result
