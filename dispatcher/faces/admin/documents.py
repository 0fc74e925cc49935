"""The admin endpoint's API for one kind of governance document: read, diff, write, roll back.

Each kind (the policies, the mesh settings: :mod:`dispatcher.governance`) is served under its
own prefix by a thin subclass of :class:`DocumentApi` that names its :class:`DocumentKind`,
its feed and its ``/status`` section; JSON in and out::

    GET  PREFIX                  the current version: version, who, when, why, restores,
                                 document (version 0 and an empty document before the
                                 first write)
    GET  PREFIX/history?limit=N  the kept versions, newest first (at most N, default 20),
                                 each with its document
    POST PREFIX/diff             body: a document; answers the changes from the current
                                 version to it (nothing is written)
    PUT  PREFIX                  body: {"document": {...}, "expected_version": N,
                                 "why": "...", "who": "..." (optional)}
    POST PREFIX/rollback         body: {"to_version": V, "expected_version": N,
                                 "why": "...", "who": "..." (optional)}

Reads come from this Dispatcher's :class:`~dispatcher.governance.feed.GovernanceFeed` (the
version every face of it serves); history from the store. A write answers 200 with the new
revision once this Dispatcher's feed holds it, so a read that follows shows it.

Writes are refused, and the store left as it was, in this order:

* 503: the kind is unavailable (no ``[membership]`` store) or not loaded yet;
* 403: the admin endpoint listens beyond loopback (writes there would cross the network in
  clear text: the admin endpoint has no TLS yet), or no write token is configured
  (``[governance] token`` / ``token_file``);
* 401: the ``Authorization: Bearer <token>`` header is missing or wrong (compared in
  constant time);
* 400: the body is not JSON, or the document is not valid (the message names the key), or
  a field of the request is malformed;
* 404: a rollback to a version that is not in the history;
* 409: ``expected_version`` is not the current version (the answer names the current one).

Every message names the kind's own API (its prefix, "policy writes", "mesh writes"): an
operator reading a 401 or a 404 must know which endpoint answered. Nothing secret is
logged, counted or shown: the token never leaves the comparison.
"""

from __future__ import annotations

import abc
import functools
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar

import attrs
import trio

from dispatcher.governance.feed import GovernanceFeed
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
    "DEFAULT_WHO",
    "STATUS_HISTORY",
    "ApiAnswer",
    "DocumentApi",
    "DocumentKind",
    "ExtraRoute",
    "error",
    "revision_json",
    "writes_refused_on",
]

log = logging.getLogger(__name__)

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

Document = TypeVar("Document")
Change = TypeVar("Change")


@attrs.frozen
class ApiAnswer:
    """One answer of a document API: an HTTP status, a JSON body and extra headers."""

    status: int
    body: Mapping[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class DocumentKind(Generic[Document, Change]):
    """One kind of governance document as its admin API serves it: where, how it is named
    in messages, and how its documents are parsed, stored and compared."""

    #: The URL prefix of its routes, ``/policies``.
    prefix: str
    #: What the documents are called, plural: ``policies`` ("policies are not loaded yet").
    title: str
    #: What writes are called in refusals: ``policy writes``.
    writes: str
    #: What its store is called when it fails: ``the policy store``.
    store: str
    #: What a PUT's ``document`` must be: ``the whole policy set``.
    whole: str
    #: The 503 message when there is no ``[membership]`` store to keep the documents.
    unavailable: str
    #: A document from its JSON value; raises ``invalid`` naming the key at fault.
    parse: Callable[[object], Document]
    invalid: type[ValueError]
    #: The document a stored revision holds, the empty document for None (before the
    #: first write).
    load: Callable[[Revision | None], Document]
    #: The canonical JSON text the store keeps.
    to_json: Callable[[Document], str]
    #: The changes from the first document to the second, each printable.
    diff: Callable[[Document, Document], Sequence[Change]]
    #: One change as ``POST PREFIX/diff`` shows it (beside its ``text``).
    change_json: Callable[[Change], Mapping[str, Any]]


Query = Mapping[str, list[str]]
ExtraRoute = Callable[[Query], Awaitable[ApiAnswer]]
"""A route of a kind beyond the document's own (``GET /mesh/consumers``): it needs no
store, so it is answered before the feed is looked at."""

_Handler = Callable[[GovernanceFeed, Query, bytes], Awaitable[ApiAnswer]]


def error(status: int, message: str, *headers: tuple[str, str], **extra: Any) -> ApiAnswer:
    """An error answer: ``{"error": message, **extra}`` with ``headers``."""
    return ApiAnswer(status, {"error": message, **extra}, headers)


def revision_json(revision: Revision, *, document: bool = True) -> dict[str, Any]:
    """A revision as the API shows it; ``document`` adds the parsed body."""
    record = json.loads(revision.to_json())
    body = record.pop("body")
    record.setdefault("restores", None)
    if document:
        record["document"] = json.loads(body)
    return record


def writes_refused_on(admin: object, writes: str) -> str | None:
    """Why ``writes`` (``"policy writes"``) are refused on the admin listener ``admin`` (its
    config), or None.

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
        f"{writes} are refused on an admin endpoint listening beyond loopback "
        f"({listen}) without TLS; listen on 127.0.0.1 and reach it from this host "
        "(for example through an SSH tunnel)"
    )


class DocumentApi(abc.ABC):
    """The routes of one kind of governance document on one gateway's admin endpoint (see
    the module docstring); a subclass names the kind, its feed and its ``/status``."""

    #: The kind served; a class attribute so that :meth:`handles` needs no instance.
    kind: ClassVar[DocumentKind[Any, Any]]

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        #: Writes applied and refused through this endpoint, by outcome (for tests and logs).
        self.writes: dict[str, int] = {}
        self._history: tuple[int, list[dict[str, Any]]] | None = None
        self._history_error: str | None = None

    @property
    @abc.abstractmethod
    def feed(self) -> GovernanceFeed | None:
        """This Dispatcher's feed of the kind, None without a ``[membership]`` store."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """The kind's section of ``/status``."""

    def extra_routes(self) -> Mapping[str, Mapping[bytes, ExtraRoute]]:
        """The kind's routes beyond the document's own, by path and method."""
        return {}

    @classmethod
    def handles(cls, path: str) -> bool:
        prefix = cls.kind.prefix
        return path == prefix or path.startswith(prefix + "/")

    # ------------------------------------------------------------------ routing

    async def handle(
        self,
        method: bytes,
        path: str,
        query: Query,
        headers: Mapping[bytes, bytes],
        body: bytes,
    ) -> ApiAnswer:
        """Answer one request under the kind's prefix; ``headers`` by lower-case name."""
        kind = self.kind
        own: dict[str, dict[bytes, _Handler]] = {
            kind.prefix: {b"GET": self._get, b"PUT": self._put},
            f"{kind.prefix}/history": {b"GET": self._history_route},
            f"{kind.prefix}/diff": {b"POST": self._diff},
            f"{kind.prefix}/rollback": {b"POST": self._rollback},
        }
        extra = self.extra_routes()
        methods: Mapping[bytes, object] | None = own.get(path) or extra.get(path)
        if methods is None:
            return error(404, f"no such page: {path} (try {', '.join([*own, *extra])})")
        if method == b"HEAD" and b"GET" in methods:
            method = b"GET"
        if method not in methods:
            allowed = ", ".join(m.decode() for m in methods)
            return error(405, f"{path} answers {allowed}", ("allow", allowed))
        if path in extra:
            return await extra[path][method](query)
        feed = self.feed
        if feed is None:
            return error(503, kind.unavailable)
        if not feed.loaded.is_set():
            return error(503, f"{kind.title} are not loaded yet; the store is being read",
                         ("retry-after", "1"))  # fmt: skip
        if method in (b"PUT", b"POST") and path != f"{kind.prefix}/diff":
            refused = self._refuse_write(headers)
            if refused is not None:
                self._count(str(refused.status))
                return refused
        try:
            return await own[path][method](feed, query, body)
        except StoreUnavailable as exc:
            return error(503, f"{kind.store} is unreachable: {exc}", ("retry-after", "1"))

    def _refuse_write(self, headers: Mapping[bytes, bytes]) -> ApiAnswer | None:
        gateway = self.gateway
        writes = self.kind.writes
        listener = writes_refused_on(gateway.config.admin, writes)
        if listener is not None:
            return error(403, listener)
        token = gateway.config.governance.token
        if token is None:
            return error(
                403,
                f"{writes} are disabled: no write token is configured "
                "([governance] token or token_file)",
            )
        given = headers.get(b"authorization", b"")
        scheme, _, credential = given.partition(b" ")
        # The comparison runs whatever was sent, so its time says nothing about the token.
        matches = hmac.compare_digest(credential.strip(), token.encode())
        if scheme.lower() != b"bearer" or not matches:
            what = "missing" if not given else "wrong"
            message = f"{writes} need 'Authorization: Bearer <token>' ([governance] token): {what}"
            return error(401, message, ("www-authenticate", "Bearer"))
        return None

    # ------------------------------------------------------------------- reads

    async def _get(self, feed: GovernanceFeed, query: Query, body: bytes) -> ApiAnswer:
        current = feed.current
        if current is None:
            return ApiAnswer(200, {"version": 0, "who": None, "when": None, "why": None,
                                   "restores": None, "document": {}})  # fmt: skip
        return ApiAnswer(200, revision_json(current))

    async def _history_route(self, feed: GovernanceFeed, query: Query, body: bytes) -> ApiAnswer:
        store = feed.store
        text = query.get("limit", [str(DEFAULT_HISTORY_LIMIT)])[-1]
        if not text.isdigit() or int(text) < 1:
            return error(400, f"limit must be a whole number of 1 or more, not {text!r}")
        # More than the store keeps is not an error: there are no more.
        revisions = await store.history(min(int(text), store.max_history))
        return ApiAnswer(200, {
            "version": feed.version, "kept": store.max_history,
            "versions": [revision_json(revision) for revision in revisions],
        })  # fmt: skip

    async def _diff(self, feed: GovernanceFeed, query: Query, body: bytes) -> ApiAnswer:
        document = _parse_json(body)
        if isinstance(document, ApiAnswer):
            return document
        kind = self.kind
        try:
            new = kind.parse(document)
        except kind.invalid as exc:
            return error(400, str(exc))
        changes = kind.diff(kind.load(feed.current), new)
        return ApiAnswer(200, {
            "base_version": feed.version,
            "changes": [{**kind.change_json(c), "text": str(c)} for c in changes],
        })  # fmt: skip

    # ------------------------------------------------------------------ writes

    async def _put(self, feed: GovernanceFeed, query: Query, body: bytes) -> ApiAnswer:
        kind = self.kind
        request = _parse_request(body, ("document", "expected_version", "why", "who"))
        if isinstance(request, ApiAnswer):
            return request
        if "document" not in request:
            return error(400, f"the body needs 'document': {kind.whole}")
        try:
            document = kind.parse(request["document"])
        except kind.invalid as exc:
            self._count("invalid")
            return error(400, str(exc))
        return await self._commit(
            feed, request, functools.partial(feed.store.write, kind.to_json(document))
        )

    async def _rollback(self, feed: GovernanceFeed, query: Query, body: bytes) -> ApiAnswer:
        request = _parse_request(body, ("to_version", "expected_version", "why", "who"))
        if isinstance(request, ApiAnswer):
            return request
        to_version = request.get("to_version")
        if isinstance(to_version, bool) or not isinstance(to_version, int) or to_version < 1:
            return error(400, "to_version must be a version number (1 or more)")
        return await self._commit(feed, request, functools.partial(feed.store.rollback, to_version))

    async def _commit(
        self,
        feed: GovernanceFeed,
        request: Mapping[str, Any],
        store_write: Callable[..., Awaitable[Revision]],
    ) -> ApiAnswer:
        """Check the request's ``expected_version``, ``who`` and ``why``, then have
        ``store_write`` (a write or a rollback) make the new version with them."""
        fields = _write_fields(request)
        if isinstance(fields, ApiAnswer):
            return fields
        expected, who, why = fields
        before = feed.current
        try:
            revision = await store_write(expected_version=expected, who=who, why=why)
        except GovernanceError as exc:
            return self._refused_write(exc)
        return await self._written(feed, revision, before)

    def _refused_write(self, exc: GovernanceError) -> ApiAnswer:
        if isinstance(exc, Conflict):
            self._count("conflict")
            return error(409, str(exc), current_version=exc.current_version,
                         expected_version=exc.expected_version)  # fmt: skip
        if isinstance(exc, UnknownVersion):
            self._count("unknown_version")
            return error(404, str(exc))
        if isinstance(exc, InvalidWrite):
            self._count("invalid")
            return error(400, str(exc))
        raise exc  # StoreUnavailable: answered 503 by handle()

    async def _written(
        self, feed: GovernanceFeed, revision: Revision, before: Revision | None
    ) -> ApiAnswer:
        kind = self.kind
        self._count("written")
        log.info("%s written", kind.title, extra={"version": revision.version,
                                                  "who": revision.who,
                                                  "restores": revision.restores})  # fmt: skip
        seen = False
        with trio.move_on_after(_WRITE_WAIT):
            await feed.wait_version(revision.version)
            seen = True
        changes = kind.diff(kind.load(before), kind.load(revision))
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
        self._history_error = f"{self.kind.store} did not answer in time"

    @property
    def status_history(self) -> list[dict[str, Any]]:
        """The history entries last read by :meth:`refresh_status`, newest first."""
        return [] if self._history is None else self._history[1]

    @property
    def status_history_error(self) -> str | None:
        """Why the last :meth:`refresh_status` could not read the history, or None."""
        return self._history_error


# ---------------------------------------------------------------------- helpers


def _parse_json(body: bytes) -> Any:
    """The body as JSON, or a 400 answer."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return error(400, f"the body is not valid JSON: {exc}")


def _parse_request(body: bytes, keys: tuple[str, ...]) -> dict[str, Any] | ApiAnswer:
    request = _parse_json(body)
    if isinstance(request, ApiAnswer):
        return request
    if not isinstance(request, dict):
        return error(400, f"the body must be a JSON object with {', '.join(keys)}")
    unknown = sorted(set(request) - set(keys))
    if unknown:
        return error(400, f"unknown field {unknown[0]!r} (expected {', '.join(keys)})")
    return request


def _write_fields(request: Mapping[str, Any]) -> tuple[int, str, str] | ApiAnswer:
    """``expected_version``, ``who``, ``why`` of a write, checked."""
    expected = request.get("expected_version")
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        return error(400, "expected_version must be the version the change was made on "
                          "(0 before the first write)")  # fmt: skip
    why = request.get("why")
    if not isinstance(why, str) or not why.strip():
        return error(400, "why must say why the change is made (a non-empty string)")
    who = request.get("who", DEFAULT_WHO)
    if not isinstance(who, str) or not who.strip():
        return error(400, "who must be a non-empty string")
    return expected, who, why
