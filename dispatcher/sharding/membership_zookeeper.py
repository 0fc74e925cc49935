"""Membership in ZooKeeper on zkgate's own trio client (the layout and the epoch rule are in
:mod:`dispatcher.sharding.membership`'s docstring).

One ZooKeeper stack in the whole process: :class:`~dispatcher.zk.client.ZooKeeperClient` runs
the session in a trio task beside this backend's, calls its watch and session callbacks from
that task in the order the server's frames arrived, and uses no threads. The callbacks only
note what changed and ring the backend's bell; every request is made from the backend's task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs
import trio

from dispatcher.sharding.membership_core import (
    BATCH,
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    Bell,
    PendingWrites,
    Registration,
    View,
    ViewFeed,
    log,
    quote_service,
    unquote_service,
)
from dispatcher.store_clients import zookeeper_client
from dispatcher.tls import ClientTls
from dispatcher.zk.client import (
    OPEN_ACL,
    Connected,
    ConnectionLost,
    KeeperError,
    Reply,
    SessionEvent,
    ZooKeeperClient,
)
from dispatcher.zk.codec.protocol import CreateMode, Err, OpCode
from dispatcher.zk.codec.records import (
    CreateRequest,
    DeleteRequest,
    ErrorResult,
    GetChildren2Response,
    GetDataResponse,
    MultiRequest,
    MultiResponse,
    PathWatchRequest,
    Record,
    WatcherEvent,
)
from dispatcher.zk.sasl_client import SaslCredentials

__all__ = ["ZooKeeperMembership"]

_PARTS: Final = ("members", "services", "warm")
_RETRY_PAUSE: Final = 0.2
"""Pause before retrying after a request failed while the session stayed connected."""


@attrs.define
class _Read:
    """What the backend last read (its own task only)."""

    members_pzxid: int = 0
    services_pzxid: int = 0
    warm_pzxid: int = 0
    members: dict[str, Registration] = attrs.field(factory=dict)
    catalog: frozenset[str] = frozenset()
    warm: dict[str, int] = attrs.field(factory=dict)


class ZooKeeperMembership:
    """Membership in ZooKeeper (see :mod:`dispatcher.sharding.membership` for the layout).

    ``hosts`` is a connect string (a chroot in it is prefixed to ``root``, as kazoo did);
    ``tls`` and ``sasl`` reach an ensemble with only a secure port, or one that requires SASL.
    Every watch firing names the part of the tree that changed (members, services or warm), and
    only that part is read again, with its watch re-armed by the read. On every connection,
    a resumed session's too, the registration and warm marker are written again and everything
    is re-read; after a session expiry that re-creates the ephemerals the expiry deleted.
    """

    def __init__(
        self,
        hosts: str,
        root: str = DEFAULT_ROOT,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        *,
        watch_warm: bool = True,
        tls: ClientTls | None = None,
        sasl: SaslCredentials | None = None,
    ) -> None:
        self.hosts = hosts
        self.tls = tls
        self.sasl = sasl
        self.root = root
        self.session_timeout = session_timeout
        self.watch_warm = watch_warm
        self.feed = ViewFeed()
        self._wanted = PendingWrites()
        self._bell = Bell()
        # Parts to read again; everything at first.
        self._dirty: set[str] = set(_PARTS)
        self._write = True
        self._connected = False
        self._generation = 0
        self._read = _Read()
        # The chroot-prefixed root; set by run() from the connect string.
        self._base = root

    # -- intents -------------------------------------------------------------------

    def register(self, registration: Registration) -> None:
        self._wanted.registration = registration
        self._write = True
        self._bell.ring()

    def set_warm(self, epoch: int) -> None:
        if self._wanted.warm != epoch:
            self._wanted.warm = epoch
            self._write = True
            self._bell.ring()

    def add_services(self, names: Iterable[str]) -> None:
        self._wanted.add_services(names)
        self._write = True
        self._bell.ring()

    # -- paths ---------------------------------------------------------------------

    def _path(self, part: str, name: str | None = None) -> str:
        return f"{self._base}/{part}" if name is None else f"{self._base}/{part}/{name}"

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._generation += 1
        generation = self._generation
        client, chroot = zookeeper_client(
            self.hosts,
            self.session_timeout,
            tls=self.tls,
            sasl=self.sasl,
            on_watch=lambda event: self._note_watch(generation, event),
            on_session=lambda event: self._note_session(generation, event),
        )
        self._base = chroot + self.root
        task_status.started()
        # Leaving the nursery cancels client.run, which closes the session: that deletes our
        # ephemerals in one step, so the member record and warm marker go at once, and so do
        # its services.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            try:
                while True:
                    await self._bell.wait()
                    await self._work(client)
            finally:
                self._connected = False
                self.feed.mark_disconnected()
                nursery.cancel_scope.cancel()

    def _note_session(self, generation: int, event: SessionEvent) -> None:
        if generation != self._generation:
            return
        if isinstance(event, Connected):
            self._connected = True
            self._write = True
            self._dirty = set(_PARTS)
        else:
            self._connected = False
            self.feed.mark_disconnected()
        self._bell.ring()

    def _note_watch(self, generation: int, event: WatcherEvent) -> None:
        if generation != self._generation:
            return
        path = event.path
        for part in _PARTS:
            prefix = self._path(part)
            if path == prefix or path.startswith(prefix + "/"):
                self._dirty.add(part)
                if part == "members" and self._wanted.registration is not None:
                    # Our record may be what went (an operator, or the record of another
                    # process holding our id, whose session ended): write it again.
                    self._write = True
        self._bell.ring()

    async def _work(self, client: ZooKeeperClient) -> None:
        while self._connected and (self._write or self._dirty):
            write, self._write = self._write, False
            dirty, self._dirty = self._dirty, set()
            wanted = self._wanted
            services = list(wanted.services)
            try:
                if write:
                    await self._write_wanted(client, wanted.registration, wanted.warm, services)
                await self._read_dirty(client, dirty)
            except (ConnectionLost, KeeperError) as exc:
                # A lost connection: the session callback reports it, and the next Connected
                # re-reads everything. Anything else: try again shortly.
                log.warning("zookeeper request failed; retrying",
                            extra={"address": self.hosts, "error": str(exc)})  # fmt: skip
                self._write = self._write or write
                self._dirty |= dirty
                if self._connected:
                    await trio.sleep(_RETRY_PAUSE)
                continue
            for name in services:
                wanted.services.pop(name, None)
            self._publish()

    def _publish(self) -> None:
        read = self._read
        inputs = max(read.members_pzxid, read.services_pzxid)
        self.feed.publish(
            View(
                max(inputs, read.warm_pzxid),
                tuple(read.members[i].member() for i in sorted(read.members)),
                read.catalog,
                {i: e for i, e in read.warm.items() if i in read.members},
                # A read that was in flight when the connection dropped must not mark the
                # view fresh again.
                connected=self._connected,
                inputs_epoch=inputs,
            )
        )

    # -- writing -------------------------------------------------------------------

    async def _write_wanted(
        self,
        client: ZooKeeperClient,
        registration: Registration | None,
        warm: int | None,
        services: list[str],
    ) -> None:
        for part in _PARTS:
            await _ensure_path(client, self._path(part))
        if registration is not None:
            await self._register(client, registration)
            if warm is not None:
                await self._write_warm(client, registration.id, warm)
        await self._create_services(client, services)

    async def _register(self, client: ZooKeeperClient, registration: Registration) -> None:
        path = self._path("members", registration.id)
        data = registration.to_json()
        for _ in range(3):
            try:
                await client.create(path, data, flags=CreateMode.EPHEMERAL)
                return
            except KeeperError as exc:
                if exc.err != Err.NODEEXISTS:
                    raise
            reply = await _call(client, OpCode.GET_DATA, PathWatchRequest(path, False), path)
            if reply.err == Err.NONODE:
                continue
            assert isinstance(reply.body, GetDataResponse)
            existing, stat = reply.body.data or b"", reply.body.stat
            if stat.ephemeral_owner == client.session_id:
                if existing == data:
                    return
                # Re-registering with new addresses is a leave and a join.
                await client.delete(path, version=stat.version)
                continue
            if existing == data:
                # Our own record from before a crash, still waiting for its session to
                # expire: take it over now rather than after the timeout.
                with contextlib.suppress(KeeperError):
                    await client.delete(path, version=stat.version)
                continue
            log.error(
                "member id registered by another process; waiting for it to go away",
                extra={"member": registration.id, "registered": existing.decode(errors="replace")},
            )
            await client.exists(path, watch=True)
            return

    async def _write_warm(self, client: ZooKeeperClient, member_id: str, epoch: int) -> None:
        path = self._path("warm", member_id)
        data = str(epoch).encode()
        for _ in range(3):
            reply = await _call(client, OpCode.GET_DATA, PathWatchRequest(path, False), path)
            if reply.err == Err.NONODE:
                try:
                    await client.create(path, data, flags=CreateMode.EPHEMERAL)
                    return
                except KeeperError as exc:
                    if exc.err != Err.NODEEXISTS:
                        raise
                    continue
            assert isinstance(reply.body, GetDataResponse)
            if reply.body.data == data:
                return
            # Delete and create in one multi: the parent's pzxid (the epoch) moves, which a
            # setData would not do.
            multi = MultiRequest((
                (OpCode.DELETE, DeleteRequest(path, -1)),
                (OpCode.CREATE, CreateRequest(path, data, OPEN_ACL, CreateMode.EPHEMERAL)),
            ))  # fmt: skip
            reply = await _call(client, OpCode.MULTI, multi, path, allowed=_ANY_ERROR)
            if (
                reply.err == Err.OK
                and isinstance(reply.body, MultiResponse)
                and not any(isinstance(result, ErrorResult) for _, result in reply.body.results)
            ):
                return

    async def _create_services(self, client: ZooKeeperClient, services: list[str]) -> None:
        parent = self._path("services")
        for start in range(0, len(services), BATCH):
            paths = [f"{parent}/{quote_service(name)}" for name in services[start : start + BATCH]]
            requests: list[tuple[int, Record]] = [
                (OpCode.CREATE, CreateRequest(path, b"", OPEN_ACL, 0)) for path in paths
            ]
            for path, reply in zip(paths, await _pipelined(client, requests), strict=True):
                _check(reply, path, allowed=(Err.NODEEXISTS,))

    # -- reading -------------------------------------------------------------------

    async def _read_dirty(self, client: ZooKeeperClient, dirty: set[str]) -> None:
        """Read the dirty parts (arming their watches) into ``self._read``."""
        read = self._read
        if "members" in dirty:
            read.members_pzxid, read.members = await self._read_members(client)
        if "services" in dirty:
            children, pzxid = await self._children(client, self._path("services"))
            read.services_pzxid = pzxid
            read.catalog = frozenset(unquote_service(c) for c in children)
        if "warm" in dirty:
            read.warm_pzxid, read.warm = await self._read_warm(client)

    async def _children(self, client: ZooKeeperClient, path: str) -> tuple[list[str], int]:
        """The children of ``path`` and its pzxid, with a child watch; ``([], 0)`` if it is
        gone (an operator deleted it), with a watch on its creation instead."""
        reply = await _call(
            client, OpCode.GET_CHILDREN2, PathWatchRequest(path, True), path, allowed=(Err.NONODE,)
        )
        if reply.err == Err.NONODE:
            await client.exists(path, watch=True)
            return [], 0
        assert isinstance(reply.body, GetChildren2Response)
        return list(reply.body.children), reply.body.stat.pzxid

    async def _read_data(
        self, client: ZooKeeperClient, parent: str, names: list[str]
    ) -> Iterable[tuple[str, bytes]]:
        """``(name, data)`` of each child still there, read pipelined and without a watch: a
        record is only ever replaced whole, which the parent's child watch sees."""
        found: list[tuple[str, bytes]] = []
        for start in range(0, len(names), BATCH):
            batch = names[start : start + BATCH]
            requests: list[tuple[int, Record]] = [
                (OpCode.GET_DATA, PathWatchRequest(f"{parent}/{name}", False)) for name in batch
            ]
            replies = await _pipelined(client, requests)
            for name, reply in zip(batch, replies, strict=True):
                # NONODE: gone since the listing; its deletion fired our child watch.
                if _check(reply, f"{parent}/{name}", allowed=(Err.NONODE,)):
                    assert isinstance(reply.body, GetDataResponse)
                    found.append((name, reply.body.data or b""))
        return found

    async def _read_members(self, client: ZooKeeperClient) -> tuple[int, dict[str, Registration]]:
        parent = self._path("members")
        children, pzxid = await self._children(client, parent)
        members: dict[str, Registration] = {}
        for name, data in await self._read_data(client, parent, children):
            try:
                members[name] = Registration.from_json(name, data)
            except ValueError as exc:
                log.warning("ignoring a member record", extra={
                    "path": f"{parent}/{name}", "member": name, "error": str(exc),
                })  # fmt: skip
        return pzxid, members

    async def _read_warm(self, client: ZooKeeperClient) -> tuple[int, dict[str, int]]:
        """The warm directory's pzxid (part of the epoch) and, if watched, the markers."""
        parent = self._path("warm")
        children, pzxid = await self._children(client, parent)
        warm: dict[str, int] = {}
        if not self.watch_warm:
            return pzxid, warm
        for name, data in await self._read_data(client, parent, children):
            try:
                warm[name] = int(data)
            except ValueError:
                log.warning("ignoring a warm marker that is not an int",
                            extra={"path": f"{parent}/{name}", "member": name})  # fmt: skip
        return pzxid, warm


# ------------------------------------------------------------------- request helpers

_ANY_ERROR: Final = tuple(int(err) for err in Err if err != Err.CONNECTIONLOSS)


def _check(reply: Reply, path: str, allowed: Sequence[int] = ()) -> bool:
    """True for an OK reply, False for an allowed error; raise for the rest."""
    if reply.err == Err.OK:
        return True
    if reply.err == Err.CONNECTIONLOSS:
        raise ConnectionLost(f"connection lost before the reply for {path}")
    if reply.err in allowed:
        return False
    raise KeeperError(reply.err, path)


async def _call(
    client: ZooKeeperClient,
    opcode: int,
    request: Record,
    path: str,
    allowed: Sequence[int] = (Err.NONODE,),
) -> Reply:
    """One request; its reply if OK or an ``allowed`` error, else ConnectionLost/KeeperError."""
    reply = await client.call(opcode, request)
    _check(reply, path, allowed)
    return reply


async def _pipelined(client: ZooKeeperClient, requests: list[tuple[int, Record]]) -> list[Reply]:
    """Send ``requests`` back to back and wait for every reply (in order).

    The caller bounds the batch (:data:`BATCH`), well under the client's in-flight limit; if
    the client refuses one (not connected, overloaded), that ConnectionLost propagates and
    the replies of those already sent are dropped as they come.
    """
    replies: list[Reply | None] = [None] * len(requests)
    remaining = len(requests)
    done = trio.Event()

    def answer(index: int) -> Callable[[Reply], None]:
        def on_reply(reply: Reply) -> None:
            nonlocal remaining
            replies[index] = reply
            remaining -= 1
            if remaining == 0:
                done.set()

        return on_reply

    if not requests:
        return []
    for index, (opcode, request) in enumerate(requests):
        client.submit(opcode, request, answer(index))
    await done.wait()
    return [reply for reply in replies if reply is not None]


async def _ensure_path(client: ZooKeeperClient, path: str) -> None:
    """Create ``path`` and its missing ancestors (persistent, empty, open ACL)."""
    if await client.exists(path) is not None:
        return
    segments = path.strip("/").split("/")
    for end in range(1, len(segments) + 1):
        prefix = "/" + "/".join(segments[:end])
        reply = await client.call(
            OpCode.CREATE, CreateRequest(prefix, b"", OPEN_ACL, CreateMode.PERSISTENT)
        )
        _check(reply, prefix, allowed=(Err.NODEEXISTS,))
