"""A versioned, audited store of governance documents, kept where membership is kept.

Policies (and, later, mesh settings) are *documents*: one JSON body per ``kind``, replaced
whole by every change. Each change is a new :class:`Revision` (version, who, when, why, body)
written atomically with the head that names it; the last ``max_history`` revisions are kept
and older ones are deleted in the same atomic write. Nothing lives in a file on one node: the
store is the ZooKeeper ensemble or etcd cluster of ``[membership]``
(:class:`~dispatcher.sharding.membership.MembershipConfig`), under its root::

    ZooKeeper                                      etcd (keys)
    <root>/governance/<kind>/head                  <root>/governance/<kind>/head
    <root>/governance/<kind>/rev-0000000042        <root>/governance/<kind>/rev/0000000042

The head holds the whole current revision (so one read, or one watch event, gives it); each
revision node or key holds its own. A write is

* ZooKeeper: one ``multi``: ``setData(head, version=<the head's znode version as read>)``
  (``create(head)`` for the first write, which fails if someone else made it), ``create`` of
  the revision node, ``delete`` of the revisions that fall out of the history;
* etcd: one transaction: ``if mod_revision(head) == <as read>`` (0 for the first write)
  ``then put(revision), put(head), delete(<revisions older than the history>)``.

A writer names the version it saw (``expected_version``, 0 before the first write); if the
head is anything else, or changes between the read and the atomic write, the write raises
:class:`Conflict` naming the current version and changes nothing. So two operators who both
edited version 7 cannot both win: one gets version 8, the other a conflict.

Versions start at 1 and grow by one per write. ``rollback(v)`` is a write like any other, whose
body is revision ``v``'s (and which records ``restores=v``). ``watch()`` yields the head as of
when it is armed, then every newer head: a Dispatcher learns a change in one round trip.
Several changes in quick succession may be seen as one jump to the newest (the ones in
between stay in the history).

Modules: this one holds the values, the errors and the rules every backend shares;
:mod:`~dispatcher.governance.store_zookeeper` (zkgate's own trio client),
:mod:`~dispatcher.governance.store_etcd` (python-etcd3 in worker threads) and
:mod:`~dispatcher.governance.store_memory` (for unit tests of the logic above the store) are
the backends; :func:`dispatcher.governance.backends.open_governance_store` opens the one the
``[membership]`` table names.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

import attrs

from dispatcher.governance.policy import canonical_json

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_HISTORY",
    "DEFAULT_REQUEST_TIMEOUT",
    "Conflict",
    "GovernanceError",
    "GovernanceStore",
    "InvalidWrite",
    "Revision",
    "StoreUnavailable",
    "UnknownVersion",
    "check_kind",
    "governance_base",
]

DEFAULT_MAX_HISTORY: Final = 100
"""Revisions kept per kind, the current one included."""

DEFAULT_MAX_BODY: Final = 256 * 1024
"""Largest body, in bytes of canonical JSON. The head and the new revision both carry it in
one atomic write, which stays well under ZooKeeper's default 1 MiB frame and etcd's default
1.5 MiB request."""

DEFAULT_REQUEST_TIMEOUT: Final = 10.0
"""Seconds an operation waits for the store (connecting included) before StoreUnavailable."""

MAX_WHO: Final = 256
MAX_WHY: Final = 4096

_KIND = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class GovernanceError(Exception):
    """Base of the governance store's errors."""


class Conflict(GovernanceError):
    """The write named a version that is not the current one; nothing was changed."""

    def __init__(self, kind: str, current_version: int, expected_version: int) -> None:
        self.kind = kind
        self.current_version = current_version
        self.expected_version = expected_version
        super().__init__(
            f"{kind}: conflict: the current version is {current_version}, "
            f"not {expected_version}; read it, and apply the change to it"
        )


class InvalidWrite(GovernanceError, ValueError):
    """The write itself is malformed (body not JSON, too large, no author...)."""


class UnknownVersion(GovernanceError):
    """A version that is not (or no longer) in the history."""


class StoreUnavailable(GovernanceError):
    """The store could not be reached within the request timeout."""


def check_kind(kind: str) -> str:
    """``kind`` if it is a valid document kind (it becomes a znode name and a key part)."""
    if not _KIND.fullmatch(kind):
        raise ValueError(
            f"governance kind must be lower-case letters, digits, '-' or '_', not {kind!r}"
        )
    return kind


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("a revision's time must carry its time zone")
    return value.astimezone(UTC)


@attrs.frozen
class Revision:
    """One version of a governance document.

    ``body`` is the document as canonical JSON text; ``when`` is the writer's clock, in UTC;
    ``restores`` is the version a rollback copied, None for an ordinary write.
    """

    version: int
    who: str
    when: datetime = attrs.field(converter=_utc)
    why: str
    body: str
    restores: int | None = None

    def document(self) -> Any:
        """The body, parsed."""
        return json.loads(self.body)

    def to_json(self) -> bytes:
        record: dict[str, Any] = {
            "version": self.version,
            "who": self.who,
            "when": self.when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "why": self.why,
            "body": self.body,
        }
        if self.restores is not None:
            record["restores"] = self.restores
        return canonical_json(record).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Revision:
        """Read a stored revision; ValueError for anything that is not one."""
        try:
            record = json.loads(data)
            version, who, why, body = (record[k] for k in ("version", "who", "why", "body"))
            when = datetime.fromisoformat(record["when"])
            restores = record.get("restores")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a governance revision: {exc}") from None
        if not (
            isinstance(version, int)
            and not isinstance(version, bool)
            and version >= 1
            and isinstance(who, str)
            and isinstance(why, str)
            and isinstance(body, str)
            and (restores is None or isinstance(restores, int))
        ):
            raise ValueError("not a governance revision: a field has the wrong type")
        return cls(version, who, when, why, body, restores)


def canonical_body(kind: str, body: str | bytes, max_body: int) -> str:
    """``body`` as canonical JSON, or InvalidWrite saying why it cannot be stored."""
    try:
        text = canonical_json(json.loads(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidWrite(f"{kind}: the body is not valid JSON: {exc}") from None
    size = len(text.encode())
    if size > max_body:
        raise InvalidWrite(
            f"{kind}: the body is {size} bytes of canonical JSON; the limit is {max_body}"
        )
    return text


class GovernanceStore(abc.ABC):
    """One kind of governance document in one store; the backends fill in the storage.

    Every method may raise :class:`StoreUnavailable`; writes raise :class:`Conflict` and
    :class:`InvalidWrite` as described in the module docstring.
    """

    def __init__(self, kind: str, *, max_history: int, max_body: int) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, not {max_history}")
        if max_body < 2:
            raise ValueError(f"max_body must be >= 2, not {max_body}")
        self.kind = check_kind(kind)
        self.max_history = max_history
        self.max_body = max_body

    @abc.abstractmethod
    async def current(self) -> Revision | None:
        """The head revision; None before the first write."""

    @abc.abstractmethod
    async def revision(self, version: int) -> Revision | None:
        """Revision ``version`` if it is still in the history."""

    async def history(self, limit: int | None = None) -> list[Revision]:
        """The kept revisions, newest first, at most ``limit`` of them."""
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise ValueError(f"limit must be None or >= 0, not {limit!r}")
        if limit == 0:
            return []
        return await self._history(limit)

    @abc.abstractmethod
    async def _history(self, limit: int | None) -> list[Revision]:
        """:meth:`history` for a limit that is None or positive."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[Revision]:
        """The head as of when the watch is armed (if any), then every newer head."""

    @abc.abstractmethod
    async def _commit(self, revision: Revision, expected_version: int) -> None:
        """Write ``revision`` (version ``expected_version + 1``) atomically with the head and
        the pruning of the history, or raise Conflict and change nothing."""

    async def write(
        self,
        body: str | bytes,
        *,
        expected_version: int,
        who: str,
        why: str,
        restores: int | None = None,
    ) -> Revision:
        """Store ``body`` (JSON text) as the next version; see the module docstring."""
        if isinstance(expected_version, bool) or not isinstance(expected_version, int):
            raise InvalidWrite(f"{self.kind}: expected_version must be an int")
        if expected_version < 0:
            raise InvalidWrite(f"{self.kind}: expected_version must be >= 0")
        if not who.strip() or len(who) > MAX_WHO:
            raise InvalidWrite(f"{self.kind}: who must be 1 to {MAX_WHO} characters")
        if len(why) > MAX_WHY:
            raise InvalidWrite(f"{self.kind}: why must be at most {MAX_WHY} characters")
        revision = Revision(
            expected_version + 1,
            who,
            datetime.now(UTC),
            why,
            canonical_body(self.kind, body, self.max_body),
            restores,
        )
        await self._commit(revision, expected_version)
        return revision

    async def rollback(
        self, to_version: int, *, expected_version: int, who: str, why: str
    ) -> Revision:
        """Write, as a new version, the body revision ``to_version`` had."""
        old = await self.revision(to_version)
        if old is None:
            raise UnknownVersion(
                f"{self.kind}: version {to_version} is not in the history "
                f"(the last {self.max_history} versions are kept)"
            )
        return await self.write(
            old.body, expected_version=expected_version, who=who, why=why, restores=to_version
        )

    def _oldest_kept(self, version: int) -> int:
        """The oldest version kept once ``version`` is written."""
        return max(1, version - self.max_history + 1)


def governance_base(root: str, kind: str) -> str:
    """Where documents of ``kind`` live under a membership root or prefix."""
    return f"{root}/governance/{check_kind(kind)}"
