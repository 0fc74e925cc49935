"""The admin endpoint's policy API: read, diff, write and roll back the governance policies.

The routes, rules and refusals of :mod:`dispatcher.faces.admin.documents` under
``/policies`` (:mod:`dispatcher.faces.admin.http` dispatches every path there), on the
governance document of kind ``policies`` (:mod:`dispatcher.governance.policy`); refusals
name "policy writes". ``/status`` shows each service's and consumer's current policy, the
version with who, when and why, and the last few history entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from dispatcher.faces.admin import documents
from dispatcher.faces.admin.documents import DocumentApi, DocumentKind, revision_json
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import Change, PolicyError, PolicySet, diff
from dispatcher.governance.store import Revision

__all__ = ["KIND", "PREFIX", "PolicyApi", "writes_refused_on"]

PREFIX: Final = "/policies"


def _load(revision: Revision | None) -> PolicySet:
    return PolicySet() if revision is None else PolicySet.from_json(revision.body)


def _change_json(change: Change) -> Mapping[str, Any]:
    return {"scope": change.scope, "path": change.path, "old": change.old, "new": change.new}


KIND: Final[DocumentKind[PolicySet, Change]] = DocumentKind(
    prefix=PREFIX,
    title="policies",
    writes="policy writes",
    store="the policy store",
    whole="the whole policy set",
    unavailable=(
        "policies are unavailable: a [membership] store (ZooKeeper or etcd) is required; "
        "policies are kept there, shared by every Dispatcher"
    ),
    parse=PolicySet.from_mapping,
    invalid=PolicyError,
    load=_load,
    to_json=PolicySet.to_json,
    diff=diff,
    change_json=_change_json,
)


def writes_refused_on(admin: object) -> str | None:
    """Why policy writes are refused on the admin listener ``admin`` (its config), or None
    (see :func:`dispatcher.faces.admin.documents.writes_refused_on`)."""
    return documents.writes_refused_on(admin, KIND.writes)


class PolicyApi(DocumentApi):
    """The ``/policies`` routes of one gateway's admin endpoint."""

    kind: ClassVar[DocumentKind[PolicySet, Change]] = KIND

    @property
    def feed(self) -> GovernanceFeed | None:
        return self.gateway.policies

    def status(self) -> dict[str, Any]:
        """The ``policies`` section of ``/status``: each service's current policy, the
        version with who, when and why, and the last few history entries."""
        feed = self.feed
        if feed is None:
            return {"available": False, "reason": KIND.unavailable}
        if not feed.loaded.is_set():
            return {"available": True, "loaded": False}
        current = feed.current
        result: dict[str, Any] = {"available": True, "loaded": True, "version": feed.version,
                                  "who": None, "when": None, "why": None, "restores": None,
                                  "services": {}, "consumers": {}}  # fmt: skip
        if current is not None:
            document = PolicySet.from_json(current.body).to_mapping()
            result.update(revision_json(current, document=False))
            result["services"] = document.get("services", {})
            result["consumers"] = document.get("consumers", {})
        result["history"] = self.status_history
        result["history_error"] = self.status_history_error
        return result
