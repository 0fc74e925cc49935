"""A mirror: an upstream ZooKeeper subtree served from a cache, writes forwarded.

Legacy clients point their connect string at zkgate instead of the ensemble.
Under the mirror's ``root`` zkgate answers reads from a cache it fills on
first use, and the ensemble carries ONE watch for the whole subtree, a
persistent recursive watch on ``root`` held by the mirror's own session,
however many clients watch however many paths.

Consistency rests on one ordering fact: ZooKeeper delivers a session's watch
events and replies in the order the server produced them, so a reply that
arrives after an event reflects that event's change. The upstream client
(:mod:`dispatcher.zk.client`) calls back synchronously in arrival order, and
the mirror applies each frame as it arrives:

* an event drops the cached znode (and, for a create or delete, its parent)
  at once, so no read serves the old state after it;
* the downstream watches it concerns fire once the znodes their watchers
  will read again are loaded (one upstream load however many watch), and
  events fire in the upstream's order, so a client that hears of a change
  reads the new state from the cache;
* a load that an event overtook while in flight is thrown away and repeated.

Writes go upstream on a session carrying the writing client's credentials
(:mod:`dispatcher.zk.upstream_sessions`), and the client's answer waits for a
``sync`` on the mirror's session, so the event of its own write has been
applied and its next read shows the write. Ephemerals created through the
mirror show the creating downstream session as ``ephemeralOwner`` and are
deleted upstream when that session ends. A client's ``sync`` is answered
after a ``sync`` on the mirror's session and, when its forwarded reads left
watches on its credentials' write session, after one there too: their events
come on that session, which nothing orders with the mirror's.

While the upstream is away, cached reads go on (``mntr`` says
``zk_mirror_stale 1``); misses and writes get CONNECTIONLOSS, which ZooKeeper
clients retry. On reconnection every cached znode is checked again and the
watches of what changed meanwhile fire.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType

import attrs
import trio

from dispatcher.tls import ClientTls, client_context
from dispatcher.zk.client import (
    AuthFailed,
    Connected,
    ConnectionLost,
    Disconnected,
    Expired,
    KeeperError,
    Reply,
    ZooKeeperClient,
)
from dispatcher.zk.codec.paths import parent_of
from dispatcher.zk.codec.protocol import CreateMode, Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    ACL,
    OPS,
    Create2Response,
    CreateRequest,
    CreateTTLRequest,
    DeleteRequest,
    GetACLResponse,
    GetChildren2Response,
    GetDataResponse,
    MultiRequest,
    MultiResponse,
    PathRequest,
    PathResponse,
    PathWatchRequest,
    Record,
    Stat,
    StatResponse,
    WatcherEvent,
    encode,
)
from dispatcher.zk.sasl_client import SaslCredentials
from dispatcher.zk.server.engine import Client, Engine
from dispatcher.zk.server.pending import Pending
from dispatcher.zk.server.tree import Trigger, encode_children, encode_data_body, world_perms
from dispatcher.zk.upstream_sessions import Credentials, UpstreamSession, UpstreamSessions

log = logging.getLogger(__name__)

_LOST = Reply(Err.CONNECTIONLOSS, -1, None)
_CHILD_READS = frozenset({OpCode.GET_CHILDREN, OpCode.GET_CHILDREN2})
#: Loads an event overtook are repeated this often before the read goes
#: upstream uncached (a znode changing faster than a round trip).
_MAX_ATTEMPTS = 3
#: Checks in flight while a mirror catches up after a reconnection.
_RESYNC_WINDOW = 1000
#: Paths the test-only fault hook may hold at once.
_MAX_DROPPING = 64


@attrs.frozen
class MirrorConfig:
    root: str
    hosts: tuple[tuple[str, int], ...]
    session_timeout_ms: int = 10_000
    #: Credentials of the mirror's own session, which loads the cache: it
    #: needs READ on what clients read through the mirror.
    auth: tuple[tuple[str, bytes], ...] = ()
    #: Upstream sessions for writes, one per distinct client credentials.
    max_sessions: int = 32
    #: Cached znodes; beyond this, unwatched ones are dropped.
    max_cached: int = 200_000
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    #: TLS to the ensemble's secure port; None: plain text.
    tls: ClientTls | None = None
    #: DIGEST-MD5 user of every upstream session (the mirror's own and the
    #: write sessions); None: no SASL.
    sasl: SaslCredentials | None = None


@attrs.define(slots=True, eq=False)
class CachedNode:
    """One upstream znode as last loaded; read by the engine like a Znode."""

    data: bytes | None
    stat_record: Stat
    #: None when the mirror's own session may not read the ACL.
    acl: tuple[ACL, ...] | None
    #: False when the mirror's own session may not read the data.
    readable: bool
    #: None until a getChildren loads them.
    children: frozenset[str] | None
    #: The engine's zxid when this was loaded: unchanged since then.
    loaded_zxid: int
    _stat_bytes: bytes | None = None
    _data_body: bytes | None = None
    _children_body: bytes | None = None

    @property
    def world_perms(self) -> int:
        return world_perms(self.acl or ())

    def stat(self) -> Stat:
        return self.stat_record

    def stat_bytes(self) -> bytes:
        if self._stat_bytes is None:
            self._stat_bytes = encode(self.stat_record)
        return self._stat_bytes

    def data_body(self) -> bytes:
        if self._data_body is None:
            self._data_body = encode_data_body(self.data, self.stat_bytes())
        return self._data_body

    def children_body(self) -> bytes:
        if self._children_body is None:
            self._children_body = encode_children(self.children or ())
        return self._children_body

    def set_children(self, children: tuple[str, ...], stat: Stat) -> None:
        """The children facet arrived, with a stat at least as fresh as ours."""
        self.children = frozenset(children)
        self.stat_record = stat
        self._stat_bytes = self._data_body = self._children_body = None


@attrs.define(eq=False)
class _Load:
    """Requests in flight that fill one cache entry; waiters run when it lands."""

    path: str
    with_node: bool
    with_children: bool
    waiters: list[Callable[[int], None]]
    attempts: int = 1
    replies: list[Reply] = attrs.Factory(list)
    expected: int = 0
    #: An event touched the path while this was in flight: its answer may mix
    #: states from before and after, so it is not cached.
    overtaken: bool = False


@attrs.define(eq=False)
class _Announcement:
    """Watch events held until ``waiting`` loads have landed; ``then`` runs
    when their turn comes (a write's answer, after every earlier event)."""

    triggers: list[Trigger]
    waiting: int
    then: Callable[[], None] | None = None


_ANSWERED, _MISSING, _FORWARD = "answered", "missing", "forward"


class Mirror:
    """Serves ``config.root`` of ``engine`` from an upstream ensemble."""

    def __init__(self, engine: Engine, config: MirrorConfig) -> None:
        self.engine = engine
        self.config = config
        self.root = config.root
        self._cache: dict[str, CachedNode | None] = {}
        self._loads: dict[tuple[str, bool], _Load] = {}
        self.stale = True
        #: Wall-clock time of the last change of ``stale``, for staleness metrics.
        self.since = time.time()
        self.resyncs = 0
        self._synced = trio.Event()
        tls = None if config.tls is None else client_context(config.tls)
        server_name = None if config.tls is None else config.tls.server_name
        self._watcher = ZooKeeperClient(
            config.hosts, session_timeout_ms=config.session_timeout_ms, auth=config.auth,
            tls=tls, server_name=server_name, sasl=config.sasl,
            on_watch=self._upstream_event, on_session=self._watcher_event,
            # A restarting ZooKeeper can leave a handshake hanging: give up on
            # one attempt well before the session could lapse.
            connect_timeout=min(config.connect_timeout, 2.0),
        )  # fmt: skip
        #: Watches of forwarded reads, held upstream on the client's session:
        #: credentials → path → the clients waiting, and for which kind. Keyed
        #: by credentials first so a sync finds at once whether the client's
        #: write session has events it must wait for, and the pool keeps
        #: such a session open.
        self._forwarded: dict[Credentials, dict[str, set[tuple[Client, str]]]] = {}
        self._writers = UpstreamSessions(
            config.hosts, session_timeout_ms=config.session_timeout_ms,
            max_sessions=config.max_sessions, connect_timeout=config.connect_timeout,
            idle_timeout=config.idle_timeout, on_expired=self._writer_expired,
            on_watch=self._forwarded_event, watched=self._forwarded.__contains__,
            tls=tls, server_name=server_name, sasl=config.sasl,
        )  # fmt: skip
        #: Events waiting for the loads their watchers will want, in order.
        self._announcements: deque[_Announcement] = deque()
        #: Ephemerals created through the mirror: path → (downstream session, upstream session).
        self._owners: dict[str, tuple[int, UpstreamSession]] = {}
        self._owned: dict[int, set[str]] = {}
        self._nursery: trio.Nursery | None = None
        #: Test-only fault: paths whose next upstream event is ignored (bounded).
        self._dropping: set[str] = set()

    # --- lifetime ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the mirror's session and the write sessions; mount first."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._writers.run)
            nursery.start_soon(self._watcher.run)
            task_status.started()

    @property
    def connected(self) -> bool:
        return self._watcher.connected

    def status(self) -> dict[str, int]:
        return {
            "zk_mirror_connected": int(self.connected),
            "zk_mirror_stale": int(self.stale),
            "zk_mirror_cached_znodes": len(self._cache),
            "zk_mirror_upstream_sessions": 1 + len(self._writers.sessions),
            "zk_mirror_resyncs": self.resyncs,
        }

    def _watcher_event(self, event: Connected | Disconnected | Expired | AuthFailed) -> None:
        if isinstance(event, Connected):
            log.info("mirror connected upstream", extra={
                "path": self.root, "upstream_session": event.session_id, "resumed": event.resumed,
            })  # fmt: skip
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_and_resync, event.resumed)
        elif isinstance(event, Disconnected):
            if not self.stale:
                log.warning(
                    "mirror lost its upstream; serving the cache, stale",
                    extra={"path": self.root, "cached": len(self._cache)},
                )
            self._mark_stale()
        elif isinstance(event, Expired):
            log.warning("mirror's upstream session expired", extra={"path": self.root})
            self._mark_stale()
        elif isinstance(event, AuthFailed):
            log.error(
                "the upstream refused the mirror's credentials",
                extra={"path": self.root, "scheme": event.scheme},
            )

    async def _watch_and_resync(self, resumed: bool) -> None:
        if not resumed:
            # A new session holds no watches; a resumed one got its recursive
            # watch back from the client, before any other request.
            try:
                await self._watcher.add_watch(self.root, recursive=True)
            except (ConnectionLost, KeeperError) as exc:  # the next Connected retries
                log.warning(
                    "could not watch the mirrored subtree",
                    extra={"path": self.root, "error": repr(exc)},
                )
                return
        self._resync()

    def _resync(self) -> None:
        """Check every cached znode again; fire the watches of what changed.

        Events are not replayed for the time a session was disconnected, so
        the cache is compared with the ensemble: one ``exists`` per entry,
        pipelined, each applied as its answer arrives (in order with events).
        """
        entries = iter(list(self._cache.items()))
        in_flight = 0
        failed = False

        def submit_more() -> None:
            nonlocal in_flight, failed
            while in_flight < _RESYNC_WINDOW and not failed:
                entry = next(entries, None)
                if entry is None:
                    break
                path, before = entry
                try:
                    self._watcher.submit(
                        OpCode.EXISTS, PathWatchRequest(path, False),
                        # mypy cannot infer a lambda whose defaults bind the loop's values.
                        lambda reply, p=path, b=before: checked(p, b, reply),  # type: ignore[misc]
                    )  # fmt: skip
                except ConnectionLost:
                    failed = True  # the next Connected starts again
                    return
                in_flight += 1
            if in_flight == 0 and not failed:
                self._resynced()

        def checked(path: str, before: CachedNode | None, reply: Reply) -> None:
            nonlocal in_flight, failed
            in_flight -= 1
            if reply.err not in (Err.OK, Err.NONODE):
                failed = True  # the connection went again; the next Connected resyncs
                return
            if self._cache.get(path, _GONE) is before:
                stat = reply.body.stat if isinstance(reply.body, StatResponse) else None
                self._compare(path, before, stat)
            submit_more()

        self._retry_orphans()
        submit_more()

    def _compare(self, path: str, before: CachedNode | None, stat: Stat | None) -> None:
        triggers: list[Trigger] = []
        if before is None:
            if stat is None:
                return  # still absent
            triggers.append(Trigger(path, EventType.NODE_CREATED))
        elif stat is None:
            triggers.append(Trigger(path, EventType.NODE_DELETED))
        else:
            old = before.stat_record
            if stat.mzxid != old.mzxid:
                triggers.append(Trigger(path, EventType.NODE_DATA_CHANGED))
            if stat.pzxid != old.pzxid or stat.cversion != old.cversion:
                triggers.append(Trigger(path, EventType.NODE_CHILDREN_CHANGED))
            if not triggers and stat.aversion == old.aversion:
                return
        del self._cache[path]
        if triggers:
            self._announce(triggers)

    def _mark_stale(self) -> None:
        if not self.stale:
            self.stale = True
            self.since = time.time()

    @property
    def stale_seconds(self) -> float:
        return max(0.0, time.time() - self.since) if self.stale else 0.0

    async def wait_synced(self) -> None:
        """Until the first time the mirror is connected and in sync."""
        await self._synced.wait()

    def _resynced(self) -> None:
        self._synced.set()
        if self.stale:
            self.since = time.time()
            self.resyncs += 1
            log.info(
                "mirror in sync with its upstream",
                extra={"path": self.root, "cached": len(self._cache)},
            )
        self.stale = False

    # --- inspection -------------------------------------------------------------------

    @property
    def cached(self) -> Mapping[str, CachedNode | None]:
        """The cache, read-only: path -> entry (None: known absent). For inspection."""
        return MappingProxyType(self._cache)

    async def caught_up(self) -> None:
        """Until the mirror's session has applied every event up to now (a ``sync``
        on it: the ensemble sends a session's events before a later reply)."""
        done = trio.Event()
        self._after_sync(done.set)
        await done.wait()

    async def reload(self, path: str) -> None:
        """Check the cache entry of ``path`` against the ensemble as after a
        reconnection (a change missed fires its watches), then load it again."""
        before = self._cache.get(path, _GONE)
        if isinstance(before, _Gone):
            return
        checked = trio.Event()

        def compared(reply: Reply) -> None:
            if reply.err in (Err.OK, Err.NONODE) and self._cache.get(path, _GONE) is before:
                stat = reply.body.stat if isinstance(reply.body, StatResponse) else None
                self._compare(path, before, stat)
            # Dropped whatever the stat said: the data may differ under an equal stat.
            self._invalidate(path)
            checked.set()

        try:
            self._watcher.submit(OpCode.EXISTS, PathWatchRequest(path, False), compared)
        except ConnectionLost:
            return
        await checked.wait()
        loaded = trio.Event()
        children = before is not None and before.children is not None
        self._load(path, children, lambda _err: loaded.set())
        await loaded.wait()

    def drop_next_event(self, path: str) -> None:
        """Test-only fault: ignore the next upstream event on ``path``, leaving
        its cache entry stale (as a lost event would)."""
        if len(self._dropping) < _MAX_DROPPING:
            self._dropping.add(path)

    # --- upstream events -----------------------------------------------------------

    def _upstream_event(self, event: WatcherEvent) -> None:
        path = event.path
        if not self._within(path):
            return
        if path in self._dropping:
            self._dropping.discard(path)
            return
        kind = event.type
        triggers = [Trigger(path, EventType(kind), self._acl_of(path))] if (
            kind in _CHANGE_EVENTS
        ) else []  # fmt: skip
        if kind == EventType.NODE_CHILDREN_CHANGED:  # only one-shot watches send it
            self._invalidate(path)
            self._announce(triggers)
            return
        watches = self.engine.watches
        reload = [(path, False)] if path in watches.data else []
        self._invalidate(path)
        if kind in (EventType.NODE_CREATED, EventType.NODE_DELETED) and path != self.root:
            parent = parent_of(path)
            triggers.append(Trigger(parent, EventType.NODE_CHILDREN_CHANGED, self._acl_of(parent)))
            self._invalidate(parent)
            if watches.hears_children(parent):
                reload.append((parent, True))
        if kind == EventType.NODE_DELETED:
            self._forget_owner(path)
        if not triggers:
            return
        # Watchers read again as soon as they hear of the change. Their events
        # go out when the new state is loaded, so those reads find it cached
        # instead of a thousand of them waiting on one load; later events
        # queue behind, keeping the upstream's order.
        announcement = _Announcement(triggers, waiting=len(reload) if self.connected else 0)
        self._announcements.append(announcement)

        def loaded(_err: int, announcement: _Announcement = announcement) -> None:
            self._loaded_for(announcement)

        for where, children in reload if self.connected else ():
            self._load(where, children, loaded)
        self._announce_ready()

    def _announce(self, triggers: list[Trigger]) -> None:
        """Fire ``triggers`` once the events before them have gone out."""
        self._announcements.append(_Announcement(triggers, 0))
        self._announce_ready()

    def _loaded_for(self, announcement: _Announcement) -> None:
        announcement.waiting -= 1
        self._announce_ready()

    def _announce_ready(self) -> None:
        queue = self._announcements
        while queue and queue[0].waiting <= 0:
            item = queue.popleft()
            if item.triggers:
                self.engine.announce(item.triggers)
            if item.then is not None:
                item.then()

    def _forwarded_event(self, session: UpstreamSession, event: WatcherEvent) -> None:
        """A watch set by a forwarded read fired on a client's upstream session.

        ZooKeeper sent it because those credentials may read the znode; it
        goes to the clients whose forwarded reads set it, and to no one else.
        (Where the mirror's own session could read the znode as well, as when
        a hot znode's read was forwarded, the parent's watchers may hear of
        a create or delete twice: a spurious event costs a read.)
        """
        path, kind = event.path, event.type
        if not self._within(path):
            return
        self._invalidate(path)
        if kind in (EventType.NODE_CREATED, EventType.NODE_DELETED) and path != self.root:
            # The mirror's session did not hear of it (it may not read the
            # znode); the parent's child watchers must, where they may read it.
            parent = parent_of(path)
            trigger = Trigger(parent, EventType.NODE_CHILDREN_CHANGED, self._acl_of(parent))
            self._invalidate(parent)
            self._announce([trigger])
        watched = self._forwarded.get(session.credentials)
        waiting = None if watched is None else watched.get(path)
        if watched is None or not waiting:
            return
        # Data watches hear created/changed/deleted, child watches
        # children-changed/deleted, as ZooKeeper's two watch tables do.
        hears = {"data"} if kind != EventType.NODE_CHILDREN_CHANGED else {"child"}
        if kind == EventType.NODE_DELETED:
            hears = {"data", "child"}
        for client, watch_kind in [w for w in waiting if w[1] in hears]:
            waiting.discard((client, watch_kind))
            self.engine.notify(client, EventType(kind), path)
        if not waiting:
            del watched[path]
            if not watched:
                del self._forwarded[session.credentials]

    def _acl_of(self, path: str) -> tuple[ACL, ...] | None:
        """The cached ACL of ``path``, for telling only watchers that may read it."""
        node = self._cache.get(path)
        return None if node is None else node.acl

    def _invalidate(self, path: str) -> None:
        self._cache.pop(path, None)
        for key in ((path, False), (path, True)):
            load = self._loads.get(key)
            if load is not None:
                load.overtaken = True

    def _within(self, path: str) -> bool:
        root = self.root
        return path == root or (path.startswith(root) and path[len(root) : len(root) + 1] == "/")

    # --- reads ----------------------------------------------------------------------

    def read(self, client: Client, xid: int, opcode: int, path: str, watch: bool) -> Pending | None:
        outcome = self._answer(client, xid, opcode, path, watch)
        if outcome is _ANSWERED:
            return None
        pending = Pending()
        if outcome is _FORWARD:
            self._forward_read(client, xid, opcode, path, watch, pending)
            return pending
        attempts = 0

        def loaded(err: int) -> None:
            nonlocal attempts
            attempts += 1
            if err != Err.OK:
                self.engine.reply(client, xid, err)
                pending.finish()
                return
            outcome = self._answer(client, xid, opcode, path, watch)
            if outcome is _ANSWERED:
                pending.finish()
            elif outcome is _FORWARD or attempts >= _MAX_ATTEMPTS:
                self._forward_read(client, xid, opcode, path, watch, pending)
            else:
                self._load(path, opcode in _CHILD_READS, loaded)

        self._load(path, opcode in _CHILD_READS, loaded)
        return pending

    def _answer(self, client: Client, xid: int, opcode: int, path: str, watch: bool) -> str:
        """Answer from the cache if it can; else say what is missing."""
        cache = self._cache
        if path not in cache:
            return _MISSING
        node = cache[path]
        engine = self.engine
        if node is not None and node.acl is None:
            # The mirror may not read the ACL, so it cannot tell who may read
            # or watch (even through exists): ask upstream as the client.
            return _FORWARD
        if opcode == OpCode.EXISTS:
            if watch:
                engine.watches.add_data(path, client)
            if node is None:
                engine.reply(client, xid, Err.NONODE)
            else:
                engine.reply(client, xid, Err.OK, node.stat_bytes())
            return _ANSWERED
        if node is None:
            engine.reply(client, xid, Err.NONODE)
            return _ANSWERED
        # node.acl is not None here: a None ACL was forwarded above.
        if not engine.can_read(client, node.acl or ()):
            engine.reply(client, xid, Err.NOAUTH)
            return _ANSWERED
        if opcode == OpCode.GET_DATA:
            if not node.readable:
                return _FORWARD
            if watch:
                engine.watches.add_data(path, client)
            engine.reply(client, xid, Err.OK, node.data_body())
            return _ANSWERED
        if node.children is None:
            return _MISSING if node.readable else _FORWARD
        if watch:
            engine.watches.add_child(path, client)
        body = node.children_body()
        if opcode == OpCode.GET_CHILDREN2:
            body += node.stat_bytes()
        engine.reply(client, xid, Err.OK, body)
        return _ANSWERED

    def _load(self, path: str, children: bool, then: Callable[[int], None]) -> None:
        """Fill the cache entry of ``path`` (and its children); ``then(err)`` after."""
        key = (path, children)
        load = self._loads.get(key)
        if load is not None:
            load.waiters.append(then)
            return
        with_node = path not in self._cache or self._cache[path] is None or not children
        load = _Load(path, with_node, children, [then])
        requests: list[tuple[int, Record]] = []
        if with_node:
            # ACL first and data last: the entry is built when the last answer
            # lands, and an event between them marks the load overtaken.
            requests += [
                (OpCode.GET_ACL, PathRequest(path)),
                (OpCode.EXISTS, PathWatchRequest(path, False)),
                (OpCode.GET_DATA, PathWatchRequest(path, False)),
            ]
        if children:
            requests.append((OpCode.GET_CHILDREN2, PathWatchRequest(path, False)))
        load.expected = len(requests)
        self._loads[key] = load

        def landed(reply: Reply, load: _Load = load) -> None:
            self._landed(load, reply)

        for opcode, record in requests:
            try:
                self._watcher.submit(opcode, record, landed)
            except ConnectionLost:
                self._landed(load, _LOST)

    def _landed(self, load: _Load, reply: Reply) -> None:
        load.replies.append(reply)
        if len(load.replies) < load.expected:
            return
        key = (load.path, load.with_children)
        if self._loads.get(key) is load:
            del self._loads[key]
        failed = next(
            (r.err for r in load.replies if r.err not in (Err.OK, Err.NONODE, Err.NOAUTH)), None
        )
        if failed is not None:
            for waiter in load.waiters:
                waiter(failed)
            return
        if not load.overtaken:
            self._store(load)
        # A waiter that still misses loads again (its attempt count bounds that).
        for waiter in load.waiters:
            waiter(Err.OK)

    def _store(self, load: _Load) -> None:
        path, replies = load.path, load.replies
        zxid = self.engine.zxid
        if load.with_node:
            acl_reply, exists_reply, data_reply = replies[:3]
            if exists_reply.err == Err.NONODE:
                if data_reply.err == Err.NONODE:
                    self._put(path, None)
                return
            assert isinstance(exists_reply.body, StatResponse)
            stat = exists_reply.body.stat
            data: bytes | None = None
            readable = data_reply.err == Err.OK
            if readable:
                assert isinstance(data_reply.body, GetDataResponse)
                data, stat = data_reply.body.data, data_reply.body.stat
            acl = acl_reply.body.acl if isinstance(acl_reply.body, GetACLResponse) else None
            if acl is not None and any(_redacted(entry) for entry in acl):
                acl = None  # without ADMIN upstream, digests come back as "user:x"
            self._put(path, CachedNode(data, self._shown(path, stat), acl, readable, None, zxid))
        if load.with_children:
            node = self._cache.get(path)
            reply = replies[-1]
            if node is None or not isinstance(reply.body, GetChildren2Response):
                return  # gone, or unreadable to the mirror: reads go upstream
            node.set_children(reply.body.children, self._shown(path, reply.body.stat))

    def _put(self, path: str, node: CachedNode | None) -> None:
        cache = self._cache
        cache[path] = node
        if len(cache) > self.config.max_cached:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest unwatched entries, down to 90% of the bound."""
        watches = self.engine.watches
        target = self.config.max_cached * 9 // 10
        doomed: list[str] = []
        for path in self._cache:
            if len(self._cache) - len(doomed) <= target:
                break
            if path not in watches.data and path not in watches.child:
                doomed.append(path)
        for path in doomed:
            del self._cache[path]

    def _forward_read(
        self, client: Client, xid: int, opcode: int, path: str, watch: bool, pending: Pending
    ) -> None:
        """A read the cache cannot answer goes upstream as the client, uncached.

        Its watch is set upstream too, on the client's session: ZooKeeper
        sends a watch event only to sessions that may read the znode, so for
        a znode the mirror's own session cannot read, the client's session is
        the only one that hears of its changes (see :meth:`_forwarded_event`).
        The downstream watch is set when the reply arrives, which on that
        session comes before the event of any later change.
        """
        credentials = client.credentials

        def answered(reply: Reply) -> None:
            watched = reply.err == Err.OK or (reply.err == Err.NONODE and opcode == OpCode.EXISTS)
            if watch and watched:
                kind = "child" if opcode in _CHILD_READS else "data"
                by_path = self._forwarded.setdefault(credentials, {})
                by_path.setdefault(path, set()).add((client, kind))
            self._relay(client, xid, path, reply)
            pending.finish()

        self._writer_for(client, answered, opcode, PathWatchRequest(path, watch))

    def rewatch(self, client: Client, kind: str, path: str, relative_zxid: int) -> None:
        """A reconnecting client's watch: catch up as ZooKeeper's setWatches does.

        Without an entry loaded before the client's last zxid the mirror cannot
        tell whether the znode changed meanwhile, so it says it did (a client
        reads again after an event; it would wait forever after a missed one).
        """
        node = self._cache.get(path, _GONE)
        watches = self.engine.watches
        # A znode whose ACL the mirror cannot read hears no events here: unknown too.
        known = not isinstance(node, _Gone) and (
            node is None or (node.acl is not None and node.loaded_zxid <= relative_zxid)
        )
        exists = known and node is not None
        if kind == "exist":
            if known and node is None:
                watches.add_data(path, client)
            else:
                self.engine.notify(client, EventType.NODE_CREATED, path)
        elif exists:
            (watches.add_data if kind == "data" else watches.add_child)(path, client)
        elif known:  # known to be gone
            self.engine.notify(client, EventType.NODE_DELETED, path)
        else:
            changed = (
                EventType.NODE_DATA_CHANGED if kind == "data" else (EventType.NODE_CHILDREN_CHANGED)
            )
            self.engine.notify(client, changed, path)

    # --- writes and other forwarded requests ------------------------------------------

    def request(self, client: Client, xid: int, opcode: int, record: Record) -> Pending | None:
        pending = Pending()
        if opcode == OpCode.SYNC:
            self._sync(client, xid, record, pending)
            return pending
        writes = opcode in _WRITES

        def answered(reply: Reply) -> None:
            if reply.err == Err.OK and writes:
                self._note_ephemerals(client, opcode, record, reply)
                # Forget what the write touched rather than count on its event:
                # none comes while the mirror is cut off, and none ever for a
                # znode the mirror's own session may not read.
                for path in _written_paths(record):
                    self._invalidate(path)
                    self._invalidate(parent_of(path))
            if writes and reply.err != Err.CONNECTIONLOSS:
                # The write's own event must be applied before the client may
                # read again: a sync on the mirror's session puts it behind it.
                self._after_sync(lambda: finish(reply))
            else:
                finish(reply)

        def finish(reply: Reply) -> None:
            self._relay(client, xid, getattr(record, "path", ""), reply, record)
            pending.finish()

        self._writer_for(client, answered, opcode, record)
        return pending

    def _sync(self, client: Client, xid: int, record: Record, pending: Pending) -> None:
        """Answer a client's ``sync`` once every event it is owed has gone out.

        Events come on the mirror's own session and, for the watches of the
        client's forwarded reads, on its credentials' write session; nothing
        orders two sessions, so where the latter holds such watches the
        answer waits for a round trip on each.
        """
        path = getattr(record, "path", self.root)

        def synced() -> None:
            self.engine.reply(client, xid, Err.OK, encode(PathResponse(path)))
            pending.finish()

        if not self.connected:
            self.engine.reply(client, xid, Err.CONNECTIONLOSS)
            pending.finish()
            return
        credentials = client.credentials
        # Without forwarded watches nothing is owed on the write session: the
        # common case costs the one round trip it always did.
        writer = self._writers.sessions.get(credentials) if credentials in self._forwarded else None
        self._after_sync(synced, writer)

    def _after_sync(self, then: Callable[[], None], writer: UpstreamSession | None = None) -> None:
        """Run ``then`` once every event the upstream produced so far has fired:
        the mirror's session's and, given ``writer``, that write session's.

        Each needs its own ``sync`` (ZooKeeper delivers a session's events
        before a later reply on it, and orders nothing across sessions); both
        go out at once, and ``then`` queues behind the announcements pending
        when the later answer lands. A failed ``sync`` counts as answered, as
        it always has: nothing more comes on that connection before it.
        """
        remaining = 1 if writer is None else 2

        def synced(_reply: Reply) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining:
                return
            self._announcements.append(_Announcement([], 0, then))
            self._announce_ready()

        if writer is not None:
            writer.submit(OpCode.SYNC, PathRequest(self.root), synced)
        try:
            self._watcher.submit(OpCode.SYNC, PathRequest(self.root), synced)
        except ConnectionLost:
            synced(_LOST)

    def _writer_for(
        self, client: Client, on_reply: Callable[[Reply], None], opcode: int, record: Record
    ) -> None:
        session = self._writers.get(client.credentials)
        if session is None:
            on_reply(_LOST)
            return
        session.submit(opcode, record, on_reply)

    def _relay(
        self, client: Client, xid: int, path: str, reply: Reply, request: Record | None = None
    ) -> None:
        """Answer ``client`` with an upstream reply, owners shown as downstream sessions."""
        body = reply.body
        if reply.err != Err.OK or body is None:
            self.engine.reply(client, xid, reply.err)
            return
        if isinstance(body, MultiResponse) and isinstance(request, MultiRequest):
            # Each result belongs to its own op's path.
            pairs = zip(request.ops, body.results, strict=False)
            body = MultiResponse(tuple(
                (op, self._translated(getattr(r, "path", ""), result))
                for (_, r), (op, result) in pairs
            ))  # fmt: skip
        else:
            body = self._translated(path, body)
        self.engine.reply(client, xid, Err.OK, encode(body))

    def _translated(self, path: str, body: Record) -> Record:
        if isinstance(body, StatResponse | GetDataResponse | GetACLResponse | GetChildren2Response):
            return attrs.evolve(body, stat=self._shown(path, body.stat))
        if isinstance(body, Create2Response):
            return attrs.evolve(body, stat=self._shown(body.path, body.stat))
        return body

    def _shown(self, path: str, stat: Stat) -> Stat:
        """The stat a client sees: an ephemeral made through zkgate is owned
        by the downstream session that made it."""
        owner = self._owners.get(path)
        if owner is None or stat.ephemeral_owner == 0:
            return stat
        return attrs.evolve(stat, ephemeral_owner=owner[0])

    # --- ephemerals -----------------------------------------------------------------

    def _note_ephemerals(self, client: Client, opcode: int, record: Record, reply: Reply) -> None:
        created: list[tuple[Record, Record | None]]
        if isinstance(record, MultiRequest) and isinstance(reply.body, MultiResponse):
            pairs = zip(record.ops, reply.body.results, strict=False)
            created = [(r, result) for (_, r), (_, result) in pairs]
        else:
            created = [(record, reply.body)]
        for request, result in created:
            if not isinstance(request, CreateRequest | CreateTTLRequest):
                continue
            try:
                ephemeral = CreateMode(request.flags).is_ephemeral
            except ValueError:
                continue
            path = getattr(result, "path", None)
            if ephemeral and path is not None:
                session = self._writers.sessions.get(client.credentials)
                if session is None:
                    continue
                self._owners[path] = (client.session.id, session)
                self._owned.setdefault(client.session.id, set()).add(path)
                session.holders.add(client.session.id)

    def _forget_owner(self, path: str) -> None:
        owner = self._owners.pop(path, None)
        if owner is None:
            return
        session_id, session = owner
        paths = self._owned.get(session_id)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._owned[session_id]
                session.holders.discard(session_id)

    def ephemerals(self, session_id: int) -> list[str]:
        return sorted(self._owned.get(session_id, ()))

    def session_ended(self, session_id: int, done: Callable[[], None]) -> None:
        for credentials, watched in list(self._forwarded.items()):
            for path, waiting in list(watched.items()):
                waiting.difference_update({w for w in waiting if w[0].session.id == session_id})
                if not waiting:
                    del watched[path]
            if not watched:
                del self._forwarded[credentials]
        paths = sorted(self._owned.get(session_id, ()), reverse=True)
        if not paths:
            done()
            return
        remaining = len(paths)

        def deleted(path: str, reply: Reply) -> None:
            nonlocal remaining
            remaining -= 1
            if reply.err in (Err.OK, Err.NONODE):
                self._forget_owner(path)
            else:
                log.warning(
                    "could not delete an ephemeral upstream; will retry",
                    extra={"path": path, "session": session_id, "error": reply.err},
                )
            if remaining == 0:
                done()

        for path in paths:
            _, session = self._owners[path]

            def answered(reply: Reply, path: str = path) -> None:
                deleted(path, reply)

            session.submit(OpCode.DELETE, DeleteRequest(path, -1), answered)

    def _retry_orphans(self) -> None:
        """Ephemerals whose downstream session ended while the upstream was away."""
        live = self.engine.sessions
        for session_id in list(self._owned):
            if live.get(session_id) is None:
                self.session_ended(session_id, lambda: None)

    def _writer_expired(self, session: UpstreamSession) -> None:
        """The upstream dropped the ephemerals of these sessions: end them too."""
        for session_id in sorted(session.holders):
            for path in list(self._owned.get(session_id, ())):
                self._forget_owner(path)
            self.engine.end_session(session_id)


def _written_paths(record: Record) -> list[str]:
    if isinstance(record, MultiRequest):
        return [r.path for _, r in record.ops]  # type: ignore[attr-defined]  # write ops have paths
    return [record.path]  # type: ignore[attr-defined]  # Record declares no path; writes have one


def _redacted(entry: ACL) -> bool:
    return entry.id.scheme == "digest" and (entry.id.id or "").endswith(":x")


class _Gone:
    """Marks a path with no cache entry (distinct from a known-absent znode)."""


_GONE = _Gone()
_CHANGE_EVENTS = frozenset({
    EventType.NODE_CREATED, EventType.NODE_DELETED, EventType.NODE_DATA_CHANGED,
    EventType.NODE_CHILDREN_CHANGED,
})  # fmt: skip
#: Requests forwarded as writes: their answer waits for the mirror's sync and
#: what they touched is dropped from the cache. Of the table's writes only the
#: creates, delete, setData, setACL and multi get here: the engine answers
#: check, deleteContainer, reconfig and the session opcodes itself.
_WRITES = frozenset(code for code, op in OPS.items() if op.write)


__all__ = ["CachedNode", "Mirror", "MirrorConfig"]
