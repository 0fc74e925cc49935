"""The governance store in ZooKeeper, on zkgate's own trio client (layout and write rule in
:mod:`dispatcher.governance.store`).

One :class:`~dispatcher.zk.client.ZooKeeperClient` session per open store, run in a trio task
beside the callers; its watch and session callbacks only ring the bells of the running
:meth:`ZooKeeperGovernanceStore.watch` iterators, which do every read themselves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

import trio

from dispatcher.governance.store import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HISTORY,
    DEFAULT_REQUEST_TIMEOUT,
    Conflict,
    GovernanceError,
    GovernanceStore,
    Revision,
    StoreUnavailable,
    governance_base,
)
from dispatcher.sharding.membership_core import Bell
from dispatcher.store_clients import zookeeper_client
from dispatcher.tls import ClientTls
from dispatcher.zk.client import (
    OPEN_ACL,
    Connected,
    ConnectionLost,
    KeeperError,
    Reply,
    SessionEvent,
)
from dispatcher.zk.codec.protocol import CreateMode, Err, OpCode
from dispatcher.zk.codec.records import (
    CreateRequest,
    DeleteRequest,
    ErrorResult,
    GetDataResponse,
    MultiRequest,
    MultiResponse,
    PathWatchRequest,
    Record,
    SetDataRequest,
    WatcherEvent,
)
from dispatcher.zk.sasl_client import SaslCredentials

log = logging.getLogger(__name__)

__all__ = ["ZooKeeperGovernanceStore", "open_zookeeper_store"]

_PREFIX: Final = "rev-"
_CONFLICTS: Final = (Err.BADVERSION, Err.NODEEXISTS)
_ATTEMPTS: Final = 3
"""Tries of one write when a revision it meant to prune vanished under it (an operator)."""


class ZooKeeperGovernanceStore(GovernanceStore):
    """Governance documents of one kind in ZooKeeper, on a session of its own. Open it with
    :func:`open_zookeeper_store`, which runs the session for as long as the store is open."""

    def __init__(
        self,
        hosts: str,
        root: str,
        kind: str,
        *,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_body: int = DEFAULT_MAX_BODY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        session_timeout: float = 10.0,
        tls: ClientTls | None = None,
        sasl: SaslCredentials | None = None,
    ) -> None:
        super().__init__(kind, max_history=max_history, max_body=max_body)
        self.client, chroot = zookeeper_client(
            hosts,
            session_timeout,
            tls=tls,
            sasl=sasl,
            on_watch=self._note_watch,
            on_session=self._note_session,
        )
        self.base = governance_base(chroot + root, kind)
        self.head = f"{self.base}/head"
        self.request_timeout = request_timeout
        self._bells: set[Bell] = set()
        # Whether <root>/governance/<kind> is known to exist: made once, not on every write.
        self._base_ready = False

    def _rev_path(self, version: int) -> str:
        return f"{self.base}/{_PREFIX}{version:010d}"

    # -- callbacks (from the client's task: note and ring, nothing else) ----------

    def _note_watch(self, event: WatcherEvent) -> None:
        if event.path == self.head:
            self._ring()

    def _note_session(self, event: SessionEvent) -> None:
        # A new session lost every watch; a resumed one may have missed a change while away
        # only if its watch fired then, which it replays. Re-reading costs one request.
        if isinstance(event, Connected):
            self._ring()

    def _ring(self) -> None:
        for bell in self._bells:
            bell.ring()

    # -- requests ------------------------------------------------------------------

    async def _request(self, opcode: int, request: Record) -> Reply:
        """One request once connected; StoreUnavailable if not within the timeout."""
        with trio.move_on_after(self.request_timeout):
            while True:
                try:
                    await self.client.wait_connected()
                    reply = await self.client.call(opcode, request)
                except ConnectionLost:
                    await trio.sleep(0.05)  # a bounded retry until the deadline
                    continue
                if reply.err != Err.CONNECTIONLOSS:
                    return reply
        raise StoreUnavailable(
            f"{self.kind}: ZooKeeper did not answer within {self.request_timeout}s"
        )

    async def _get(self, path: str, *, watch: bool = False) -> tuple[Revision | None, int]:
        """The revision at ``path`` and its znode version; ``(None, -1)`` if there is none."""
        reply = await self._request(OpCode.GET_DATA, PathWatchRequest(path, watch))
        if reply.err == Err.NONODE:
            return None, -1
        if reply.err != Err.OK:
            raise GovernanceError(f"{self.kind}: reading {path}: {KeeperError(reply.err)}")
        assert isinstance(reply.body, GetDataResponse)
        try:
            return Revision.from_json(reply.body.data or b""), reply.body.stat.version
        except ValueError as exc:
            raise GovernanceError(f"{self.kind}: {path}: {exc}") from None

    async def _versions(self) -> list[int]:
        """The versions of the revision nodes present, oldest first."""
        reply = await self._request(OpCode.GET_CHILDREN, PathWatchRequest(self.base, False))
        if reply.err == Err.NONODE:
            return []
        if reply.err != Err.OK:
            raise GovernanceError(f"{self.kind}: listing {self.base}: {KeeperError(reply.err)}")
        children: list[str] = list(getattr(reply.body, "children", ()))
        return sorted(
            int(name[len(_PREFIX) :])
            for name in children
            if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit()
        )

    async def current(self) -> Revision | None:
        return (await self._get(self.head))[0]

    async def revision(self, version: int) -> Revision | None:
        return (await self._get(self._rev_path(version)))[0]

    async def _history(self, limit: int | None) -> list[Revision]:
        versions = (await self._versions())[::-1][:limit]
        found: dict[int, Revision | None] = {}

        async def read(version: int) -> None:
            found[version] = await self.revision(version)

        # Pipelined on the one session: the history costs one round trip, not one per
        # revision. At most max_history reads (plus any an operator left behind).
        async with trio.open_nursery() as nursery:
            for version in versions:
                nursery.start_soon(read, version)
        # A revision pruned between the listing and its read is simply left out.
        return [r for v in versions if (r := found.get(v)) is not None]

    # -- writing -------------------------------------------------------------------

    async def _commit(self, revision: Revision, expected_version: int) -> None:
        data = revision.to_json()
        for _ in range(_ATTEMPTS):
            if not self._base_ready:
                await self._ensure_base()
                self._base_ready = True
            head, znode_version = await self._get(self.head)
            current = 0 if head is None else head.version
            if current != expected_version:
                raise Conflict(self.kind, current, expected_version)
            oldest_kept = self._oldest_kept(revision.version)
            prune = [v for v in await self._versions() if v < oldest_kept]
            head_op: tuple[int, Record] = (
                (OpCode.CREATE, CreateRequest(self.head, data, OPEN_ACL, CreateMode.PERSISTENT))
                if head is None
                # The znode version as read is the compare-and-set: any write since fails it.
                else (OpCode.SET_DATA, SetDataRequest(self.head, data, znode_version))
            )
            ops: list[tuple[int, Record]] = [
                head_op,
                (
                    OpCode.CREATE,
                    CreateRequest(
                        self._rev_path(revision.version), data, OPEN_ACL, CreateMode.PERSISTENT
                    ),
                ),
                *((OpCode.DELETE, DeleteRequest(self._rev_path(v), -1)) for v in prune),
            ]
            try:
                reply = await self.client.call(OpCode.MULTI, MultiRequest(tuple(ops)))
            except ConnectionLost:
                continue  # refused before it was sent (not connected, overloaded): try again
            if reply.err == Err.CONNECTIONLOSS:
                # Sent, but the answer was lost: sending it again could fail on our own
                # success and report a conflict, so look at what the head says instead.
                await self._settle_lost_write(revision, expected_version)
                return
            err = _multi_error(reply)
            if err == Err.OK:
                return
            if err in _CONFLICTS or err == Err.NONODE:
                head, _ = await self._get(self.head)
                current = 0 if head is None else head.version
                if current != expected_version:
                    raise Conflict(self.kind, current, expected_version)
                if err == Err.NONODE:
                    # A revision to prune went meanwhile, or the directory itself (an
                    # operator): list again, and make the directory again if need be.
                    self._base_ready = False
                    continue
            raise GovernanceError(f"{self.kind}: the write failed: {KeeperError(err)}")
        raise StoreUnavailable(f"{self.kind}: the write failed {_ATTEMPTS} times; try again")

    async def _settle_lost_write(self, revision: Revision, expected_version: int) -> None:
        """The connection dropped before the multi's answer: find out whether it applied."""
        head, _ = await self._get(self.head)
        if head is not None and head.to_json() == revision.to_json():
            return
        current = 0 if head is None else head.version
        if current != expected_version:
            raise Conflict(self.kind, current, expected_version)
        raise StoreUnavailable(
            f"{self.kind}: the connection to ZooKeeper dropped; the write was not applied"
        )

    async def _ensure_base(self) -> None:
        segments = self.base.strip("/").split("/")
        for end in range(1, len(segments) + 1):
            path = "/" + "/".join(segments[:end])
            request = CreateRequest(path, b"", OPEN_ACL, CreateMode.PERSISTENT)
            reply = await self._request(OpCode.CREATE, request)
            if reply.err not in (Err.OK, Err.NODEEXISTS):
                raise GovernanceError(f"{self.kind}: creating {path}: {KeeperError(reply.err)}")

    # -- watching ------------------------------------------------------------------

    async def watch(self) -> AsyncIterator[Revision]:
        bell = Bell()
        self._bells.add(bell)
        seen = 0
        try:
            while True:
                try:
                    # Reading the head arms a data watch on it; a missing head arms an
                    # exists watch, which fires on its creation.
                    head, _ = await self._get(self.head, watch=True)
                    if head is None:
                        await self._request(OpCode.EXISTS, PathWatchRequest(self.head, True))
                        head, _ = await self._get(self.head, watch=True)
                except GovernanceError as exc:
                    # Unreachable, or a head that does not parse (an operator's hand): keep
                    # what we have and look again at the next change or connection.
                    log.warning("governance watch could not read the head",
                                extra={"kind": self.kind, "error": str(exc)})  # fmt: skip
                    head = None
                if head is not None and head.version > seen:
                    seen = head.version
                    yield head
                await bell.wait()
        finally:
            self._bells.discard(bell)


def _multi_error(reply: Reply) -> int:
    """The error that failed a multi (OK if none did)."""
    if isinstance(reply.body, MultiResponse):
        for _, result in reply.body.results:
            if isinstance(result, ErrorResult) and result.err not in (
                Err.OK,
                Err.RUNTIMEINCONSISTENCY,
            ):
                return result.err
    return reply.err


@contextlib.asynccontextmanager
async def open_zookeeper_store(
    hosts: str,
    root: str,
    kind: str,
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    max_body: int = DEFAULT_MAX_BODY,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    session_timeout: float = 10.0,
    tls: ClientTls | None = None,
    sasl: SaslCredentials | None = None,
) -> AsyncIterator[ZooKeeperGovernanceStore]:
    """A store on its own session to ``hosts`` (a connect string; a chroot in it is prefixed
    to ``root``), over TLS with ``tls`` and authenticated with ``sasl``, closed when the
    block ends."""
    store = ZooKeeperGovernanceStore(
        hosts,
        root,
        kind,
        max_history=max_history,
        max_body=max_body,
        request_timeout=request_timeout,
        session_timeout=session_timeout,
        tls=tls,
        sasl=sasl,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.client.run)
        try:
            yield store
        finally:
            nursery.cancel_scope.cancel()
