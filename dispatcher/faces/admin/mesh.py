"""The admin endpoint's mesh API: the switch and the ratio, and the consumers known.

The same routes, rules and refusals as the policy API (:mod:`dispatcher.faces.admin.policies`:
bearer token compared in constant time, loopback only, 409 on a stale version, 404 for a
rollback to a version not kept), on the governance document of kind ``mesh``
(:mod:`dispatcher.governance.mesh`)::

    GET  /mesh                  version, who, when, why, restores, document
    GET  /mesh/history?limit=N  the kept versions, newest first
    POST /mesh/diff             body: a mesh document; the changes (nothing written)
    PUT  /mesh                  body: {"document", "expected_version", "why", "who"}
    POST /mesh/rollback         body: {"to_version", "expected_version", "why", "who"}
    GET  /mesh/consumers        the consumers known, their sessions, versions and, per
                                service, mode, ratio, state (on, off, refused, waiting) and why

Every refusal names this API (``/mesh``, "mesh writes"), not the policy API it shares
its code with: an operator reading a 401 or a 404 must know which endpoint answered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import attrs
import trio

from dispatcher.faces.admin.policies import (
    ApiAnswer,
    PolicyApi,
    _error,
    _parse_json,
    _parse_request,
    _write_fields,
    revision_json,
)
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import MeshError, MeshSettings, diff
from dispatcher.governance.store import GovernanceError, Revision

__all__ = ["PREFIX", "MeshApi"]

log = logging.getLogger(__name__)

WRITE_WAIT: Final = 5.0
"""Seconds a write's answer waits for this Dispatcher's feed to show it (``seen``)."""

PREFIX: Final = "/mesh"

_ROUTES: Final[Mapping[str, tuple[bytes, ...]]] = {
    PREFIX: (b"GET", b"PUT"),
    f"{PREFIX}/history": (b"GET",),
    f"{PREFIX}/diff": (b"POST",),
    f"{PREFIX}/rollback": (b"POST",),
    f"{PREFIX}/consumers": (b"GET",),
}

UNAVAILABLE: Final = (
    "mesh settings are unavailable: a [membership] store (ZooKeeper or etcd) is required; "
    "they are kept there, shared by every Dispatcher"
)


class MeshApi(PolicyApi):
    """The ``/mesh`` routes of one gateway's admin endpoint (see the module docstring)."""

    @property
    def feed(self) -> GovernanceFeed | None:
        return self.gateway.mesh

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def handle(
        self,
        method: bytes,
        path: str,
        query: Mapping[str, list[str]],
        headers: Mapping[bytes, bytes],
        body: bytes,
    ) -> ApiAnswer:
        """Answer one request under ``/mesh``; ``headers`` by lower-case name."""
        allowed = _ROUTES.get(path)
        if allowed is None:
            return _error(404, f"no such page: {path} (try {', '.join(_ROUTES)})")
        if method == b"HEAD" and b"GET" in allowed:
            method = b"GET"
        if method not in allowed:
            names = ", ".join(m.decode() for m in allowed)
            return _error(405, f"{path} answers {names}", ("allow", names))
        if path == f"{PREFIX}/consumers":
            views = self.gateway.mesh_views
            if views is None:
                return _error(503, "the ZooKeeper face is not serving yet", ("retry-after", "1"))
            return ApiAnswer(200, {"version": views.version, "consumers": views.consumers()})
        feed = self.feed
        if feed is None:
            return _error(503, UNAVAILABLE)
        if not feed.loaded.is_set():
            return _error(503, "mesh settings are not loaded yet; the store is being read",
                          ("retry-after", "1"))  # fmt: skip
        # The policy API's checks and writes, on the /mesh paths (routed above).
        relative = path[len(PREFIX) :]
        answer = await super().handle(method, "/policies" + relative, query, headers, body)
        error = answer.body.get("error")
        if answer.status == 503 and isinstance(error, str):
            # The store's own failure, worded by the shared code for the policies.
            return attrs.evolve(answer, body={**answer.body, "error": error.replace(
                "the policy store", "the mesh settings store", 1)})  # fmt: skip
        return answer

    def _refuse_write(self, headers: Mapping[bytes, bytes]) -> ApiAnswer | None:
        """The policy API's write checks (listener, token in constant time), worded for
        mesh writes."""
        refused = super()._refuse_write(headers)
        if refused is None:
            return None
        error = str(refused.body.get("error", "")).replace("policy writes", "mesh writes")
        return attrs.evolve(refused, body={**refused.body, "error": error})

    def _changes(self, feed: GovernanceFeed, document: object) -> ApiAnswer:
        try:
            new = MeshSettings.from_mapping(document)
        except MeshError as exc:
            return _error(400, str(exc))
        changes = diff(_settings(feed.current), new)
        return ApiAnswer(200, {
            "base_version": feed.version,
            "changes": [{"scope": c.application, "path": c.service,
                         "old": None if c.old is None else c.old.to_mapping(),
                         "new": None if c.new is None else c.new.to_mapping(),
                         "text": str(c)} for c in changes],
        })  # fmt: skip

    async def _diff(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        document = _parse_json(body)
        if isinstance(document, ApiAnswer):
            return document
        return self._changes(feed, document)

    async def _put(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        request = _parse_request(body, ("document", "expected_version", "why", "who"))
        if isinstance(request, ApiAnswer):
            return request
        if "document" not in request:
            return _error(400, "the body needs 'document': the whole mesh document")
        try:
            settings = MeshSettings.from_mapping(request["document"])
        except MeshError as exc:
            self._count("invalid")
            return _error(400, str(exc))
        fields = _write_fields(request)
        if isinstance(fields, ApiAnswer):
            return fields
        expected, who, why = fields
        before = feed.current
        try:
            revision = await feed.store.write(
                settings.to_json(), expected_version=expected, who=who, why=why
            )
        except GovernanceError as exc:
            return self._refused_write(exc)
        return await self._written(feed, revision, before)

    async def _written(
        self, feed: GovernanceFeed, revision: Revision, before: Revision | None
    ) -> ApiAnswer:
        self._count("written")
        log.info("mesh settings written", extra={"version": revision.version,
                                                 "who": revision.who,
                                                 "restores": revision.restores})  # fmt: skip
        seen = False
        with trio.move_on_after(WRITE_WAIT):
            await feed.wait_version(revision.version)
            seen = True
        changes = diff(_settings(before), _settings(revision))
        return ApiAnswer(200, {**revision_json(revision), "seen": seen,
                               "changes": [str(change) for change in changes]})  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The ``mesh`` section of ``/status`` (the status page's mesh console): the current
        version with its document, the last few history entries (as read by
        :meth:`refresh_status`) and the last rollback among them, if any."""
        feed = self.feed
        if feed is None:
            return {"available": False, "reason": UNAVAILABLE}
        result: dict[str, Any] = {"available": True, "loaded": feed.loaded.is_set(),
                                  "version": feed.version, "document": {}}  # fmt: skip
        if feed.current is not None:
            result.update(revision_json(feed.current))
        history = [] if self._history is None else self._history[1]
        result["history"] = history
        error = self._history_error
        result["history_error"] = None if error is None else error.replace("policy", "mesh")
        result["last_rollback"] = next(
            (
                {key: entry.get(key) for key in ("version", "restores", "who", "when", "why")}
                for entry in history
                if entry.get("restores") is not None
            ),
            None,
        )
        return result


def _settings(revision: Revision | None) -> MeshSettings:
    if revision is None:
        return MeshSettings()
    try:
        return MeshSettings.from_json(revision.body)
    except MeshError:
        return MeshSettings()  # a store edited by hand: shown as if empty, not an error
