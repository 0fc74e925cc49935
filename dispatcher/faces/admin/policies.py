"""The admin endpoint's policy API: read, diff, write and roll back the governance policies.

Served beside the other admin routes (:mod:`dispatcher.faces.admin.http` dispatches every
path under ``/policies`` here), JSON in and out::

    GET  /policies                  the current version: version, who, when, why, restores,
                                    document (version 0 and an empty document before the
                                    first write)
    GET  /policies/history?limit=N  the kept versions, newest first (at most N, default
                                    20), each with its document
    POST /policies/diff             body: a policy document; answers the changes from the
                                    current version to it (nothing is written)
    PUT  /policies                  body: {"document": {...}, "expected_version": N,
                                    "why": "...", "who": "..." (optional)}
    POST /policies/rollback         body: {"to_version": V, "expected_version": N,
                                    "why": "...", "who": "..." (optional)}

Reads come from this Dispatcher's :class:`~dispatcher.governance.feed.GovernanceFeed` (the
version every face of it serves); history from the store. A write answers 200 with the new
revision once this Dispatcher's feed holds it, so a read that follows shows it.

Writes are refused, and the store left as it was, in this order:

* 503: policies are unavailable (no ``[membership]`` store) or not loaded yet;
* 403: the admin endpoint listens beyond loopback (writes there would cross the network in
  clear text: the admin endpoint has no TLS yet), or no write token is configured
  (``[governance] token`` / ``token_file``);
* 401: the ``Authorization: Bearer <token>`` header is missing or wrong (compared in
  constant time);
* 400: the body is not JSON, or the document is not a valid policy set (the message names
  the key), or a field of the request is malformed;
* 404: a rollback to a version that is not in the history;
* 409: ``expected_version`` is not the current version (the answer names the current one).

Nothing secret is logged, counted or shown: the token never leaves the comparison.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import PolicyError, PolicySet, diff
from dispatcher.governance.store import (
    Conflict,
    GovernanceError,
    InvalidWrite,
    Revision,
    StoreUnavailable,
    UnknownVersion,
)

if TYPE_CHECKING:
    from dispatcher.gateway import Gateway

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "PREFIX",
    "STATUS_HISTORY",
    "ApiAnswer",
    "PolicyApi",
    "revision_json",
    "writes_refused_on",
]

log = logging.getLogger(__name__)

PREFIX: Final = "/policies"
DEFAULT_HISTORY_LIMIT: Final = 20
STATUS_HISTORY: Final = 5
"""History entries shown on ``/status`` and the status page."""

DEFAULT_WHO: Final = "admin-api"
"""The author recorded when a write names none."""

_WRITE_WAIT: Final = 5.0
"""Seconds a write's answer waits for this Dispatcher's feed to show it; the write is done
either way (the answer says ``seen`` false when the feed was slower)."""

_STATUS_READ: Final = 2.0
"""Seconds ``/status`` waits for the store's history before showing the last one it read."""

UNAVAILABLE: Final = (
    "policies are unavailable: a [membership] store (ZooKeeper or etcd) is required; "
    "policies are kept there, shared by every Dispatcher"
)


@attrs.frozen
class ApiAnswer:
    """One answer of the policy API: an HTTP status, a JSON body and extra headers."""

    status: int
    body: Mapping[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str, *headers: tuple[str, str], **extra: Any) -> ApiAnswer:
    return ApiAnswer(status, {"error": message, **extra}, headers)


def revision_json(revision: Revision, *, document: bool = True) -> dict[str, Any]:
    """A revision as the API shows it; ``document`` adds the parsed body."""
    record = json.loads(revision.to_json())
    body = record.pop("body")
    record.setdefault("restores", None)
    if document:
        record["document"] = json.loads(body)
    return record


def writes_refused_on(admin: object) -> str | None:
    """Why policy writes are refused on the admin listener ``admin`` (its config), or None.

    Loopback only: a bearer token sent in clear text beyond the host could be read on the
    way. An admin configuration that carries TLS settings (an attribute ``tls`` that is not
    None, which TLS for the admin endpoint adds) lifts the restriction.
    """
    if getattr(admin, "tls", None) is not None:
        return None
    listen = getattr(admin, "address", ("127.0.0.1", 0))[0]
    if listen == "localhost":
        return None
    try:
        if ipaddress.ip_address(listen).is_loopback:
            return None
    except ValueError:
        pass  # a host name other than localhost: it may resolve beyond loopback
    return (
        f"policy writes are refused on an admin endpoint listening beyond loopback "
        f"({listen}) without TLS; listen on 127.0.0.1 and reach it from this host "
        "(for example through an SSH tunnel)"
    )


class PolicyApi:
    """The ``/policies`` routes of one gateway's admin endpoint (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        #: Writes applied and refused through this endpoint, by outcome (for tests and logs).
        self.writes: dict[str, int] = {}
        self._history: tuple[int, list[dict[str, Any]]] | None = None
        self._history_error: str | None = None

    @property
    def feed(self) -> GovernanceFeed | None:
        return self.gateway.policies

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    # ------------------------------------------------------------------ routing

    async def handle(
        self,
        method: bytes,
        path: str,
        query: Mapping[str, list[str]],
        headers: Mapping[bytes, bytes],
        body: bytes,
    ) -> ApiAnswer:
        """Answer one request under ``/policies``; ``headers`` by lower-case name."""
        routes: dict[str, dict[bytes, Any]] = {
            PREFIX: {b"GET": self._get, b"PUT": self._put},
            f"{PREFIX}/history": {b"GET": self._history_route},
            f"{PREFIX}/diff": {b"POST": self._diff},
            f"{PREFIX}/rollback": {b"POST": self._rollback},
        }
        methods = routes.get(path)
        if methods is None:
            return _error(404, f"no such page: {path} (try {', '.join(routes)})")
        get = methods.get(b"GET")
        if method == b"HEAD" and get is not None:
            method = b"GET"
        if method not in methods:
            allowed = ", ".join(m.decode() for m in methods)
            return _error(405, f"{path} answers {allowed}", ("allow", allowed))
        feed = self.feed
        if feed is None:
            return _error(503, UNAVAILABLE)
        if not feed.loaded.is_set():
            return _error(503, "policies are not loaded yet; the store is being read",
                          ("retry-after", "1"))  # fmt: skip
        if method in (b"PUT", b"POST") and path != f"{PREFIX}/diff":
            refused = self._refuse_write(headers)
            if refused is not None:
                self.writes[str(refused.status)] = self.writes.get(str(refused.status), 0) + 1
                return refused
        handler = methods[method]
        try:
            answer: ApiAnswer = await handler(feed, query, body)
        except StoreUnavailable as exc:
            return _error(503, f"the policy store is unreachable: {exc}", ("retry-after", "1"))
        return answer

    def _refuse_write(self, headers: Mapping[bytes, bytes]) -> ApiAnswer | None:
        gateway = self.gateway
        listener = writes_refused_on(gateway.config.admin)
        if listener is not None:
            return _error(403, listener)
        token = gateway.config.governance.token
        if token is None:
            return _error(
                403,
                "policy writes are disabled: no write token is configured "
                "([governance] token or token_file)",
            )
        given = headers.get(b"authorization", b"")
        scheme, _, credential = given.partition(b" ")
        # The comparison runs whatever was sent, so its time says nothing about the token.
        matches = hmac.compare_digest(credential.strip(), token.encode())
        if scheme.lower() != b"bearer" or not matches:
            what = "missing" if not given else "wrong"
            message = (
                f"policy writes need 'Authorization: Bearer <token>' ([governance] token): {what}"
            )
            return _error(401, message, ("www-authenticate", "Bearer"))
        return None

    # ------------------------------------------------------------------- reads

    async def _get(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        current = feed.current
        if current is None:
            return ApiAnswer(200, {"version": 0, "who": None, "when": None, "why": None,
                                   "restores": None, "document": {}})  # fmt: skip
        return ApiAnswer(200, revision_json(current))

    async def _history_route(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        store = feed.store
        text = query.get("limit", [str(DEFAULT_HISTORY_LIMIT)])[-1]
        if not text.isdigit() or int(text) < 1:
            return _error(400, f"limit must be a whole number of 1 or more, not {text!r}")
        # More than the store keeps is not an error: there are no more.
        revisions = await store.history(min(int(text), store.max_history))
        return ApiAnswer(200, {
            "version": feed.version, "kept": store.max_history,
            "versions": [revision_json(revision) for revision in revisions],
        })  # fmt: skip

    async def _diff(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        document = _parse_json(body)
        if isinstance(document, ApiAnswer):
            return document
        return self._changes(feed, document)

    def _changes(self, feed: GovernanceFeed, document: object) -> ApiAnswer:
        try:
            new = PolicySet.from_mapping(document)
        except PolicyError as exc:
            return _error(400, str(exc))
        current = feed.current
        old = PolicySet() if current is None else PolicySet.from_json(current.body)
        changes = diff(old, new)
        return ApiAnswer(200, {
            "base_version": feed.version,
            "changes": [{"scope": c.scope, "path": c.path, "old": c.old, "new": c.new,
                         "text": str(c)} for c in changes],
        })  # fmt: skip

    # ------------------------------------------------------------------ writes

    async def _put(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        request = _parse_request(body, ("document", "expected_version", "why", "who"))
        if isinstance(request, ApiAnswer):
            return request
        if "document" not in request:
            return _error(400, "the body needs 'document': the whole policy set")
        try:
            policies = PolicySet.from_mapping(request["document"])
        except PolicyError as exc:
            self._count("invalid")
            return _error(400, str(exc))
        fields = _write_fields(request)
        if isinstance(fields, ApiAnswer):
            return fields
        expected, who, why = fields
        before = feed.current
        try:
            revision = await feed.store.write(
                policies.to_json(), expected_version=expected, who=who, why=why
            )
        except GovernanceError as exc:
            return self._refused_write(exc)
        return await self._written(feed, revision, before)

    async def _rollback(
        self, feed: GovernanceFeed, query: Mapping[str, list[str]], body: bytes
    ) -> ApiAnswer:
        request = _parse_request(body, ("to_version", "expected_version", "why", "who"))
        if isinstance(request, ApiAnswer):
            return request
        to_version = request.get("to_version")
        if isinstance(to_version, bool) or not isinstance(to_version, int) or to_version < 1:
            return _error(400, "to_version must be a version number (1 or more)")
        fields = _write_fields(request)
        if isinstance(fields, ApiAnswer):
            return fields
        expected, who, why = fields
        before = feed.current
        try:
            revision = await feed.store.rollback(
                to_version, expected_version=expected, who=who, why=why
            )
        except GovernanceError as exc:
            return self._refused_write(exc)
        return await self._written(feed, revision, before)

    def _refused_write(self, exc: GovernanceError) -> ApiAnswer:
        if isinstance(exc, Conflict):
            self._count("conflict")
            return _error(409, str(exc), current_version=exc.current_version,
                          expected_version=exc.expected_version)  # fmt: skip
        if isinstance(exc, UnknownVersion):
            self._count("unknown_version")
            return _error(404, str(exc))
        if isinstance(exc, InvalidWrite):
            self._count("invalid")
            return _error(400, str(exc))
        raise exc  # StoreUnavailable: answered 503 by handle()

    async def _written(
        self, feed: GovernanceFeed, revision: Revision, before: Revision | None
    ) -> ApiAnswer:
        self._count("written")
        log.info("policies written", extra={"version": revision.version, "who": revision.who,
                                            "restores": revision.restores})  # fmt: skip
        seen = False
        with trio.move_on_after(_WRITE_WAIT):
            await feed.wait_version(revision.version)
            seen = True
        old = PolicySet() if before is None else PolicySet.from_json(before.body)
        changes = diff(old, PolicySet.from_json(revision.body))
        return ApiAnswer(200, {**revision_json(revision), "seen": seen,
                               "changes": [str(change) for change in changes]})  # fmt: skip

    def _count(self, outcome: str) -> None:
        self.writes[outcome] = self.writes.get(outcome, 0) + 1

    # ------------------------------------------------------------------ status

    async def refresh_status(self) -> None:
        """Read the last few history entries if the version moved since the last read (so a
        status page polling every second costs a store read per change, not per poll)."""
        feed = self.feed
        if feed is None or not feed.loaded.is_set():
            return
        version = feed.version
        if self._history is not None and self._history[0] == version:
            return
        with trio.move_on_after(_STATUS_READ):
            try:
                revisions = await feed.store.history(STATUS_HISTORY)
            except GovernanceError as exc:
                self._history_error = str(exc)
                return
            self._history = (version, [revision_json(r, document=False) for r in revisions])
            self._history_error = None
            return
        self._history_error = "the policy store did not answer in time"

    def status(self) -> dict[str, Any]:
        """The ``policies`` section of ``/status``: each service's current policy, the
        version with who, when and why, and the last few history entries."""
        feed = self.feed
        if feed is None:
            return {"available": False, "reason": UNAVAILABLE}
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
        history = self._history
        result["history"] = [] if history is None else history[1]
        result["history_error"] = self._history_error
        return result


# ---------------------------------------------------------------------- helpers


def _parse_json(body: bytes) -> Any:
    """The body as JSON, or a 400 answer."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, f"the body is not valid JSON: {exc}")


def _parse_request(body: bytes, keys: tuple[str, ...]) -> dict[str, Any] | ApiAnswer:
    request = _parse_json(body)
    if isinstance(request, ApiAnswer):
        return request
    if not isinstance(request, dict):
        return _error(400, f"the body must be a JSON object with {', '.join(keys)}")
    unknown = sorted(set(request) - set(keys))
    if unknown:
        return _error(400, f"unknown field {unknown[0]!r} (expected {', '.join(keys)})")
    return request


def _write_fields(request: Mapping[str, Any]) -> tuple[int, str, str] | ApiAnswer:
    """``expected_version``, ``who``, ``why`` of a write, checked."""
    expected = request.get("expected_version")
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        return _error(400, "expected_version must be the version the change was made on "
                           "(0 before the first write)")  # fmt: skip
    why = request.get("why")
    if not isinstance(why, str) or not why.strip():
        return _error(400, "why must say why the change is made (a non-empty string)")
    who = request.get("who", DEFAULT_WHO)
    if not isinstance(who, str) or not who.strip():
        return _error(400, "who must be a non-empty string")
    return expected, who, why
