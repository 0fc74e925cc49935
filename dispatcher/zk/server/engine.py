"""The ZooKeeper request processor of the embedded tree.

The engine is ZooKeeper's PrepRequestProcessor and FinalRequestProcessor in
one synchronous object: a decoded request goes in, its answer goes as an
event to the connection's codec
(:class:`~dispatcher.zk.codec.connection.ServerConnection`), whose bytes go
to the client's :class:`Peer`, and watch events go out to every other peer
they concern before the writer's own reply. Being synchronous is the
ordering guarantee: no other request runs between applying a write,
committing it to disk, firing its watches and answering it, so every read
that follows sees the write and every watcher hears of it first.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import attrs

from dispatcher.zk.codec.connection import ConnectAccepted, Notification, ServerConnection
from dispatcher.zk.codec.jute import DecodeError, Reader
from dispatcher.zk.codec.paths import InvalidPath, is_within, join, parent_of, validate_path
from dispatcher.zk.codec.protocol import (
    CreateMode,
    Err,
    EventType,
    KeeperState,
    OpCode,
    Perm,
)
from dispatcher.zk.codec.records import (
    ACL,
    OPS,
    AddWatchRequest,
    AuthPacket,
    ClientInfo,
    ConnectRequest,
    ConnectResponse,
    CountResponse,
    Create2Response,
    CreateRequest,
    CreateResponse,
    CreateTTLRequest,
    DeleteRequest,
    Empty,
    ErrorResult,
    GetACLResponse,
    GetChildrenResponse,
    GetDataResponse,
    GetSASLRequest,
    Id,
    MultiReadRequest,
    MultiRequest,
    MultiResponse,
    PathRequest,
    PathResponse,
    PathsResponse,
    PathWatchRequest,
    ReconfigRequest,
    Record,
    SetACLRequest,
    SetDataRequest,
    SetSASLResponse,
    SetWatches,
    SetWatches2,
    StatResponse,
    WatcherEvent,
    WatchesRequest,
    WhoAmIResponse,
    read_acls,
)
from dispatcher.zk.digest_md5 import SaslError
from dispatcher.zk.server import acl as acls
from dispatcher.zk.server.durability import GroupCommit
from dispatcher.zk.server.jaas import SaslUsers
from dispatcher.zk.server.pending import Pending
from dispatcher.zk.server.quotas import QuotaUsage
from dispatcher.zk.server.sasl import DigestMd5Server
from dispatcher.zk.server.sessions import Session, SessionTable
from dispatcher.zk.server.stats import ServerStats
from dispatcher.zk.server.store import TreeStore
from dispatcher.zk.server.tree import (
    CONTAINER_OWNER,
    MAX_TTL_MS,
    OPEN_WORLD,
    READ_ONLY_WORLD,
    DataTree,
    Trigger,
    Txn,
    Znode,
    ttl_owner,
    world_perms,
)
from dispatcher.zk.server.watches import WatcherType, WatchManager

log = logging.getLogger(__name__)

_READ, _WRITE, _CREATE, _DELETE, _ADMIN = (
    int(Perm.READ),
    int(Perm.WRITE),
    int(Perm.CREATE),
    int(Perm.DELETE),
    int(Perm.ADMIN),
)
_SPECIAL_PATHS = frozenset({"/", "/zookeeper", "/zookeeper/quota", "/zookeeper/config"})
# A projection root open to clients' registrations: anyone may list it and
# create in it; what may be created there is decided by the projection's paths.
_READ_CREATE_WORLD = (ACL(_READ | _CREATE, Id("world", "anyone")),)


class Mount(Protocol):
    """A subtree served from somewhere other than the embedded tree (a mirror).

    The engine routes every request whose path lies under ``root`` to the
    mount; a mount answers through :meth:`Engine.reply` and fires watches
    through :meth:`Engine.announce`, now or later. Returning a
    :class:`Pending` holds back the connection's next request until it is
    finished, which keeps each session's order.
    """

    root: str

    def read(
        self, client: Client, xid: int, opcode: int, path: str, watch: bool
    ) -> Pending | None: ...

    def request(self, client: Client, xid: int, opcode: int, record: Record) -> Pending | None: ...

    def rewatch(self, client: Client, kind: str, path: str, relative_zxid: int) -> None:
        """Re-register one watch of a reconnecting client (``setWatches``)."""

    def session_ended(self, session_id: int, done: Callable[[], None]) -> None:
        """The session closed or expired: delete its ephemerals under the
        mount, then call ``done`` (perhaps at once)."""

    def ephemerals(self, session_id: int) -> list[str]: ...

    def status(self) -> Mapping[str, int]:
        """``mntr`` lines (``zk_mirror_stale`` and the like)."""


class ReadHook(Protocol):
    """Answers some reads itself (per-consumer views of projected znodes); True if it did."""

    def read(self, client: Client, xid: int, opcode: int, path: str, watch: bool) -> bool: ...


class Peer(Protocol):
    """Where the engine's bytes for one connection go.

    The engine never frames bytes itself: it hands events to the connection's
    :class:`ServerConnection` and gives the peer what ``send`` returned.
    """

    remote_ip: str

    @property
    def remote(self) -> str:
        """``/ip:port``, as ZooKeeper prints a client in logs and ``cons``."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@attrs.frozen
class EngineConfig:
    tick_ms: int = 2000
    min_session_timeout_ms: int | None = None
    max_session_timeout_ms: int | None = None
    super_digest: str | None = None
    #: ZooKeeper's ``zookeeper.extendedTypesEnabled``: TTL nodes (off by default).
    extended_types: bool = False
    #: ZooKeeper's ``znode.container.checkIntervalMs``.
    container_check_ms: int = 60000
    #: ZooKeeper's ``znode.container.maxNeverUsedIntervalMs`` (0: keep forever).
    container_max_never_used_ms: int = 0
    #: DIGEST-MD5 users (the JAAS file's ``Server`` section); None: SASL is off,
    #: the ``sasl`` opcode gets an empty token and ``sasl:`` ACLs are invalid.
    sasl_users: SaslUsers | None = None
    #: ZooKeeper's ``zookeeper.sessionRequireClientSASLAuth``: every request but
    #: ``auth`` and ``sasl`` from a connection without a ``sasl`` identity is
    #: answered SESSIONCLOSEDREQUIRESASLAUTH and the connection closed.
    sasl_required: bool = False
    #: ZooKeeper's ``X509AuthenticationProvider`` is registered: the face has a TLS
    #: port that verifies client certificates. Without it ``x509:`` ACLs are
    #: INVALIDACL, as on an ensemble that does not configure that provider.
    x509: bool = False

    @property
    def min_timeout(self) -> int:
        return self.min_session_timeout_ms or 2 * self.tick_ms

    @property
    def max_timeout(self) -> int:
        return self.max_session_timeout_ms or 20 * self.tick_ms


@attrs.define(eq=False)
class Client:
    """One connection's ZooKeeper state: its session, its auth, its counters."""

    peer: Peer
    #: The connection's codec: every byte sent to ``peer`` comes from its ``send``.
    conn: ServerConnection
    session: Session
    #: The identities the connection has proved, in the order it proved them;
    #: a tuple, replaced on change, so connections from one address share one.
    auth: tuple[Id, ...]
    connected_at: float
    #: The digest credentials the client authenticated with, as sent, so a
    #: mirror can authenticate as the client upstream (and key its upstream
    #: session by them); a tuple, replaced on change, and the one empty tuple
    #: for the many clients that never authenticate.
    credentials: tuple[tuple[str, bytes], ...] = ()
    received: int = 0
    sent: int = 0
    last_zxid: int = 0
    #: The opcode of the last request, for ``cons`` (kept as an int: cheap).
    last_op: int | None = None
    closed: bool = False
    #: Persistent watches on a null path (addWatch or setWatches2 with one);
    #: created on first use, which almost never comes.
    null_watches: NullPathWatches | None = None
    #: The connection's DIGEST-MD5 exchange, from its first ``sasl`` request.
    sasl: DigestMd5Server | None = None

    def __hash__(self) -> int:
        return id(self)


@attrs.define
class NullPathWatches:
    """One connection's watches on a null path, as ZooKeeper 3.8 keeps them.

    The Java server stores such a watch (a HashMap takes a null key) in its
    data and child watch tables, each of which also records the watch's mode
    under a key whose ``equals`` dereferences the path. So, per table, the
    watch may be present and its mode recorded; recording or removing the
    mode of one already recorded throws (MARSHALLINGERROR), after the
    watcher was added to, or removed from, the table. No event ever fires
    on a null path, so only later addWatch and removeWatches calls see them.
    """

    #: Per table ("data", "child"): the watcher is in the table.
    present: dict[str, bool] = attrs.Factory(lambda: {"data": False, "child": False})
    #: Per table: a mode is recorded for it.
    moded: dict[str, bool] = attrs.Factory(lambda: {"data": False, "child": False})

    def add(self, table: str) -> bool:
        """Add the watch to ``table``; False where ZooKeeper throws."""
        self.present[table] = True
        if self.moded[table]:
            return False
        self.moded[table] = True
        return True

    def remove(self, table: str) -> bool | None:
        """Remove it from ``table``: False if absent, None where ZooKeeper throws."""
        if not self.present[table]:
            return False
        self.present[table] = False
        return None if self.moded[table] else True


class ZkError(Exception):
    def __init__(self, err: Err) -> None:
        super().__init__(err.name)
        self.err = err


class Engine:
    """Sessions, tree, watches and durability behind the ZooKeeper protocol."""

    def __init__(
        self,
        store: TreeStore,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or EngineConfig()
        self.store = store
        self.clock = clock
        self.wall_clock = wall_clock
        self.tree = DataTree()
        loaded = store.load(self.tree)
        # zxid epochs, as ZooKeeper's: each boot starts above everything before.
        self.zxid = store.boot << 32
        self.sessions = SessionTable(store.boot, self.config.min_timeout, self.config.max_timeout)
        self.watches = WatchManager()
        self.stats = ServerStats()
        self.clients: set[Client] = set()
        self.quotas = QuotaUsage(self.tree)
        #: Called with (opcode, seconds) after each request, for metrics; runs
        #: on the hot path, so it must be cheap.
        self.observer: Callable[[int, float], None] | None = None
        #: Set by a server that runs its commit task: writes then share fsyncs,
        #: and what the engine sends waits for the writes it could show (see
        #: :mod:`dispatcher.zk.server.durability`). None: each write commits alone.
        self.durability: GroupCommit | None = None
        #: Roots of the read-only subtrees rendered from the unified snapshot.
        self.projection_roots: tuple[str, ...] = ()
        #: Per projection root, the paths below it opened to clients' writes (split).
        self.projection_open: dict[str, tuple[tuple[str, ...], ...]] = {}
        #: Subtrees served by another backend (mirrors of upstream ensembles).
        self.mounts: tuple[Mount, ...] = ()
        #: Per-consumer views of projected znodes (mesh onboarding); None: none.
        self.views: ReadHook | None = None
        #: Told each committed transaction's triggers, after their watches fired (the mesh
        #: views follow sidecar registrations this way); runs on every write: keep it cheap.
        self.changed: Callable[[list[Trigger]], None] | None = None
        self.started = wall_clock()
        log.info("tree loaded from disk", extra={"znodes": loaded, "boot": store.boot})
        self._expire_orphaned_ephemerals()
        self._reads: dict[int, Callable[[Client, int, str, bool], None]] = {
            OpCode.GET_DATA: self._get_data,
            OpCode.EXISTS: self._exists,
            OpCode.GET_CHILDREN: self._get_children,
            OpCode.GET_CHILDREN2: self._get_children2,
        }
        # Each handler below takes its opcode's own Record subclass, which the
        # dispatcher decodes from REQUESTS[opcode]; a dict cannot say that, hence
        # the dict-item ignores.
        self._handlers: dict[int, Callable[[Client, int, Record], None]] = {
            OpCode.GET_ACL: self._get_acl,  # type: ignore[dict-item]
            OpCode.SYNC: self._sync,  # type: ignore[dict-item]
            OpCode.SET_WATCHES: self._set_watches,  # type: ignore[dict-item]
            OpCode.SET_WATCHES2: self._set_watches,  # type: ignore[dict-item]
            OpCode.AUTH: self._auth,  # type: ignore[dict-item]
            OpCode.MULTI: self._multi,  # type: ignore[dict-item]
            OpCode.ADD_WATCH: self._add_watch,  # type: ignore[dict-item]
            OpCode.CHECK_WATCHES: self._check_watches,  # type: ignore[dict-item]
            OpCode.REMOVE_WATCHES: self._remove_watches,  # type: ignore[dict-item]
            OpCode.MULTI_READ: self._multi_read,  # type: ignore[dict-item]
            OpCode.GET_EPHEMERALS: self._get_ephemerals,  # type: ignore[dict-item]
            OpCode.GET_ALL_CHILDREN_NUMBER: self._get_all_children_number,  # type: ignore[dict-item]
            OpCode.WHO_AM_I: self._who_am_i,  # type: ignore[dict-item]
            OpCode.SASL: self._sasl,  # type: ignore[dict-item]
            OpCode.RECONFIG: self._reconfig,  # type: ignore[dict-item]
        }
        # As above: each writer takes its opcode's own Record subclass.
        self._writes: dict[int, Callable[[Txn, Client, int, Record], Record | None]] = {
            OpCode.CREATE: self._create,
            OpCode.CREATE2: self._create,
            OpCode.CREATE_CONTAINER: self._create,
            OpCode.CREATE_TTL: self._create,
            OpCode.DELETE: self._delete,  # type: ignore[dict-item]
            OpCode.SET_DATA: self._set_data,  # type: ignore[dict-item]
            OpCode.SET_ACL: self._set_acl,  # type: ignore[dict-item]
            OpCode.CHECK: self._check,  # type: ignore[dict-item]
        }
        # A write alone (not in a multi) answers with its result's encoding
        # made straight from the znode: no result record to build and encode.
        self._single_writes: dict[int, Callable[[Txn, Client, int, Record], Record | bytes | None]]
        self._single_writes = {
            **self._writes,
            OpCode.CREATE: self._create_single,
            OpCode.CREATE2: self._create_single,
            OpCode.CREATE_CONTAINER: self._create_single,
            OpCode.CREATE_TTL: self._create_single,
            OpCode.SET_DATA: self._set_data_single,  # type: ignore[dict-item]
        }
        #: Writes done in place when nothing about them is unusual (see
        #: :meth:`_create_in_place`); each returns False, having done nothing,
        #: for the transaction path to take the request instead.
        self._shortcuts: dict[int, Callable[[Client, int, int, _WriteFields], bool]] = {
            OpCode.CREATE: self._create_in_place,
            OpCode.CREATE2: self._create_in_place,
            OpCode.CREATE_CONTAINER: self._create_in_place,
            OpCode.SET_DATA: self._set_data_in_place,
            OpCode.DELETE: self._delete_in_place,
        }
        #: Per decoded create ACL without an ``auth`` entry (by id, with the
        #: ACL itself): the ACL its znodes get, validated and shared, which
        #: then depends on nothing else.
        self._create_acls: dict[int, tuple[tuple[ACL, ...], tuple[ACL, ...]]] = {}
        #: Encoded ACL vectors of create requests, decoded once (clients send
        #: the same few ACLs with every create).
        self._request_acls: dict[bytes, tuple[ACL, ...]] = {}
        #: One tuple per distinct ACL for new znodes: znodes then share it
        #: (less memory), and the store finds its encoding by identity.
        self._acls: dict[tuple[ACL, ...], tuple[ACL, ...]] = {}

    # --- sessions ---------------------------------------------------------------

    def _expire_orphaned_ephemerals(self) -> None:
        """Sessions never survive a restart; their ephemerals go, as after a failover."""
        for owner in sorted(self.tree.ephemerals):
            self._close_session_txn(owner)

    def connect(
        self,
        peer: Peer,
        conn: ServerConnection,
        request: ConnectRequest,
        auth: tuple[Id, ...] | None = None,
    ) -> Client | None:
        """Open or resume a session; None when the connection must close.

        ``conn`` is the connection's codec, which has just delivered ``request``;
        ``auth``, what the connection has proved already (by default its ``ip``
        identity alone).
        """
        now = self.clock()
        if request.last_zxid_seen > self.zxid:
            log.warning(
                "session refused: the client has seen a later zxid than ours",
                extra={"peer": peer.remote, "client_zxid": hex(request.last_zxid_seen),
                       "zxid": hex(self.zxid)},
            )  # fmt: skip
            peer.close()
            return None
        if request.session_id == 0:
            session = self.sessions.create(request.timeout, now)
            self.zxid += 1  # createSession is a transaction in ZooKeeper too
            log.info("session opened", extra={
                "session": session.id, "peer": peer.remote, "timeout_ms": session.timeout_ms,
            })  # fmt: skip
        else:
            session = self.sessions.resumable(request.session_id, request.passwd)  # type: ignore[assignment]  # None is checked next
            if session is None:
                log.info(
                    "session refused: expired or wrong password",
                    extra={"session": request.session_id, "peer": peer.remote},
                )
                self._send_connect(peer, conn, ConnectResponse(0, 0, 0, bytes(16)))
                peer.close()
                return None
            session.timeout_ms = self.sessions.negotiate(request.timeout)
            self.sessions.touch(session, now)
            stale = session.client
            if isinstance(stale, Client):
                log.info(
                    "session moved; closing its old connection",
                    extra={"session": session.id, "peer": peer.remote},
                )
                self.disconnect(stale)
                self._close_peer(stale.peer)
            log.info("session resumed", extra={"session": session.id, "peer": peer.remote})
        if auth is None:
            auth = (Id("ip", peer.remote_ip),)
        client = Client(peer, conn, session, auth, now)
        session.client = client
        self.clients.add(client)
        self._send_connect(
            peer,
            conn,
            ConnectResponse(0, session.timeout_ms, session.id, self.sessions.password(session)),
        )
        return client

    def _send_connect(self, peer: Peer, conn: ServerConnection, response: ConnectResponse) -> None:
        # ZooKeeper 3.8 always appends the readOnly flag; clients that predate it
        # read a length-prefixed frame and ignore what they do not know.
        peer.send(conn.send(ConnectAccepted(attrs.evolve(response, read_only=False))))
        self.stats.packets_sent += 1

    def disconnect(self, client: Client) -> None:
        """The connection is gone; the session waits for its timeout."""
        if client.closed:
            return
        client.closed = True
        self.clients.discard(client)
        self.watches.drop_watcher(client)
        if client.session.client is client:
            client.session.client = None

    def expire_sessions(self) -> int:
        """Expire every session whose deadline passed; returns how many."""
        expired = self.sessions.expired(self.clock())
        for session in expired:
            log.info("session expired", extra={"session": session.id})
            self._end_session(session)
            if isinstance(session.client, Client):
                self._lose(session.client)
        return len(expired)

    def _end_session(self, session: Session, done: Callable[[int], None] | None = None) -> None:
        """Delete the session and its ephemerals.

        Mounts delete the session's ephemerals upstream; ``done`` gets the
        closeSession zxid once every mount has (at once without mounts).
        """
        session.closing = True
        zxid = self._close_session_txn(session.id)
        self.sessions.remove(session)
        remaining = len(self.mounts)

        def mount_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and done is not None:
                done(zxid)

        for mount in self.mounts:
            mount.session_ended(session.id, mount_done)
        if not self.mounts and done is not None:
            done(zxid)

    def end_session(self, session_id: int) -> None:
        """Expire a session now, as if its timeout had passed.

        A mirror calls this when the upstream session that held the session's
        ephemerals expired: the ephemerals are gone upstream, so the session
        must end too, or its client would believe they still exist.
        """
        session = self.sessions.get(session_id)
        if session is None or session.closing:
            return
        log.warning(
            "session expired with the upstream session holding its ephemerals",
            extra={"session": session_id},
        )
        self._end_session(session)
        if isinstance(session.client, Client):
            self._lose(session.client)

    def _close_session_txn(self, session_id: int) -> int:
        self.zxid += 1
        txn = Txn(self.tree, self.zxid, self._now_ms())
        for path in sorted(self.tree.ephemerals.get(session_id, ()), reverse=True):
            txn.delete(path)
        self._commit(txn)
        return txn.zxid

    # --- projections -------------------------------------------------------------

    def _projected(self, path: str) -> bool:
        return any(path == root or path.startswith(root + "/") for root in self.projection_roots)

    def _refuse_projected(self, path: str) -> None:
        """Projected znodes are read-only to every client, super included, except
        where the projection opened its subtree to clients (:meth:`mount_projection`).

        A refused write gets the answer ZooKeeper gives for a node whose ACL is
        world:anyone:r: NOAUTH. A write to an opened path goes on to the usual
        checks (the parent's ACL, existence, versions), so clients get
        ZooKeeper's own answers there, NODEEXISTS included.
        """
        if self.projection_roots and self._projected(path) and not self._opened(path):
            raise ZkError(Err.NOAUTH)

    def _opened(self, path: str) -> bool:
        for root, patterns in self.projection_open.items():
            if path.startswith(root + "/"):
                names = path[len(root) + 1 :].split("/")
                return any(
                    len(pattern) == len(names)
                    and all(want in ("*", name) for want, name in zip(pattern, names, strict=True))
                    for pattern in patterns
                )
        return False

    def mount_projection(self, root: str, *, open_paths: Iterable[str] = ()) -> None:
        """Reserve ``root`` for a projection: created (with missing parents) as a
        never-stored subtree, read-only to clients. A root that already holds
        stored znodes is refused, so a projection never hides a client's data.

        ``open_paths`` are the znodes below ``root`` (relative paths, ``*``
        standing for any one name) that clients may create, change and delete
        as anywhere in ZooKeeper, subject to the ACLs there: the registrations
        a layout's clients write themselves (Dubbo consumers under
        ``*/consumers/*``). With any, the root grants world CREATE as well as
        READ, so a client can make the directories of a service the
        projection does not hold (yet). What clients make here is not stored:
        it lasts as long as the process, like the sessions that own it.
        """
        validate_path(root)
        if root == "/" or any(root == r or root.startswith(r + "/") or r.startswith(root + "/")
                              for r in self.projection_roots):  # fmt: skip
            raise ValueError(f"projection root {root} overlaps another mount")
        if self.tree.get(root) is not None:
            raise ValueError(
                f"projection root {root} already exists in the embedded tree; "
                "delete it or choose another root"
            )
        patterns = tuple(tuple(p.strip("/").split("/")) for p in open_paths)
        self.projection_roots = (*self.projection_roots, root)
        if patterns:
            self.projection_open = {**self.projection_open, root: patterns}
        txn = self._internal_txn()
        self._ensure_directory(txn, parent_of(root))
        txn.create(root, b"", _READ_CREATE_WORLD if patterns else READ_ONLY_WORLD, 0)
        self._commit(txn)

    def sync_projection(
        self,
        directory: str,
        children: Mapping[str, bytes],
        *,
        keep: bool = False,
        beside: Mapping[str, tuple[ACL, ...]] | None = None,
        beside_children: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> None:
        """Make ``directory`` (inside a projection) hold exactly ``children`` (name → data).

        One transaction: created, changed and removed znodes get one zxid and
        fire the watches a client's writes would. Missing parent directories
        are created. Unchanged znodes keep their stats.

        ``beside`` are the other znodes (path → ACL) a layout keeps with the
        directory: a Dubbo service's znode and its other category directories.
        They are created with it, parents first, and never changed once there.
        ``beside_children`` are the projected children of some of them (Dubbo's
        governance URLs in ``configurators`` and ``routers``), kept exactly so in
        the same transaction (emptied first when the directory goes).
        With ``keep`` the directory and ``beside`` stay while ``children`` is
        empty (a service that is known but has nothing to show). Without it, an
        empty directory is removed with ``beside`` and the parents left empty
        (up to, not including, the projection root), unless something that
        clients made is in them: a client's znode (a consumer's registration)
        is never deleted here, and keeps the znodes that hold it and their
        watchers.
        """
        assert self._projected(directory), directory
        tree = self.tree
        beside = beside or {}
        if not children and not keep and tree.get(directory) is None:
            return
        txn = self._internal_txn()
        if children or keep:
            for path in sorted(beside, key=lambda p: p.count("/")):
                if tree.get(path) is None:
                    self._ensure_directory(txn, parent_of(path))
                    txn.create(path, b"", beside[path], 0)
        for path, wanted in sorted((beside_children or {}).items()):
            if tree.get(path) is not None:
                self._sync_children(txn, path, wanted if children or keep else {})
        self._ensure_directory(txn, directory)
        self._sync_children(txn, directory, children)
        if not children and not keep:
            self._prune_empty(txn, directory, beside)
        if txn.touched_paths:
            self._commit(txn)
        else:
            self.zxid -= 1  # nothing changed: no transaction, no zxid

    def _sync_children(self, txn: Txn, directory: str, children: Mapping[str, bytes]) -> None:
        tree = self.tree
        for name in sorted(tree.nodes[directory].children - set(children)):
            self._delete_projected(txn, join(directory, name))
        for name, data in sorted(children.items()):
            path = join(directory, name)
            existing = tree.nodes.get(path)
            if existing is None:
                txn.create(path, data, READ_ONLY_WORLD, 0)
            elif existing.data != data:
                txn.set_data(path, data, existing.version + 1)

    def _internal_txn(self) -> Txn:
        self.zxid += 1
        return Txn(self.tree, self.zxid, self._now_ms())

    def _ensure_directory(self, txn: Txn, directory: str) -> None:
        missing = []
        while self.tree.get(directory) is None:
            missing.append(directory)
            directory = parent_of(directory)
        for path in reversed(missing):
            # Parents above a projection root are ordinary (stored, writable) znodes.
            acl = READ_ONLY_WORLD if self._projected(path) else OPEN_WORLD
            txn.create(path, b"", acl, 0)

    def _delete_projected(self, txn: Txn, path: str) -> None:
        node = self.tree.nodes[path]
        for name in sorted(node.children):
            self._delete_projected(txn, join(path, name))
        txn.delete(path)

    def _prune_empty(self, txn: Txn, directory: str, beside: Iterable[str] = ()) -> None:
        nodes = self.tree.nodes
        own = {directory, *beside}
        if any(join(path, name) not in own for path in own if path in nodes
               for name in nodes[path].children):  # fmt: skip
            return  # a client's znode is in there
        for path in sorted(own, key=lambda p: p.count("/"), reverse=True):
            if path in nodes and path not in self.projection_roots:
                txn.delete(path)
        while directory not in self.projection_roots:
            if directory in nodes:
                if nodes[directory].children:
                    break
                txn.delete(directory)
            directory = parent_of(directory)

    def reap_containers(self) -> int:
        """Delete empty used containers and expired TTL nodes, as ZooKeeper's ContainerManager.

        Returns how many nodes were deleted. Each deletion is its own
        transaction (ZooKeeper submits a deleteContainer request for each) and
        fires the watches a delete fires.
        """
        now = self._now_ms()
        tree = self.tree
        doomed = []
        for path in tree.containers:
            node = tree.nodes[path]
            if node.children:
                continue
            never_used_limit = self.config.container_max_never_used_ms
            if node.cversion > 0 or (never_used_limit and now - node.mtime > never_used_limit):
                doomed.append(path)
        for path in tree.ttls:
            node = tree.nodes[path]
            ttl = node.ttl
            if not node.children and ttl and now - node.mtime > ttl:
                doomed.append(path)
        for path in sorted(doomed):
            self.zxid += 1
            txn = Txn(tree, self.zxid, now)
            txn.delete(path)
            self._commit(txn)
        return len(doomed)

    def _now_ms(self) -> int:
        return int(self.wall_clock() * 1000)

    # --- requests ---------------------------------------------------------------

    def handle(self, client: Client, xid: int, opcode: int, body: bytes) -> Pending | None:
        """Answer one request, now or (when a :class:`Pending` is returned) later.

        Raises :class:`DecodeError` for an undecodable request.
        """
        started = self.clock()
        client.received += 1
        self.stats.packets_received += 1
        self.sessions.touch(client.session, started)
        if self.config.sasl_required and opcode not in _BEFORE_SASL and not _has_sasl(client):
            self._require_sasl(client, xid, opcode)
            return None
        pending = None
        read = self._reads.get(opcode)
        if read is not None:
            # Reads of (path, watch) are the hot path: decoded in place rather
            # than through a record object.
            path, watch = _path_and_watch(body)
            if path is None:
                # ZooKeeper's read dereferences the null path: the exception
                # is answered as MARSHALLINGERROR and the connection stays.
                self._reply(client, xid, Err.MARSHALLINGERROR)
            elif self.views is not None and self.views.read(client, xid, opcode, path, watch):
                pass  # answered from the session's own view
            elif (mount := self._mount_of(path) if self.mounts else None) is None:
                read(client, xid, path, watch)
            else:
                pending = mount.read(client, xid, opcode, path, watch)
        elif opcode == _OP_PING:
            self._reply(client, xid, Err.OK)
        elif opcode == _OP_CLOSE_SESSION:
            pending = self._close_session(client, xid)
        elif opcode == _OP_DELETE_CONTAINER:
            self._delete_container(client, xid)
            client.last_op = opcode
        elif (
            opcode in _FAST_WRITES
            and not self.mounts
            and (fields := _write_fields(opcode, body, self._request_acls)) is not None
        ):
            # The common writes, decoded in place; anything unusual in the
            # body (a null field, a short frame) takes the generic path below,
            # which answers it exactly as before. A write that will succeed
            # and concerns nothing special is then done in place; any other
            # goes through a transaction record.
            shortcut = self._shortcuts.get(opcode)
            if shortcut is None or not shortcut(client, xid, opcode, fields):
                record = _write_record(opcode, fields)
                self._single_write(client, xid, opcode, record, self._single_writes[opcode])
            client.last_op = opcode
        else:
            op = OPS.get(opcode)
            record_type = None if op is None else op.request
            handler = self._handlers.get(opcode)
            # A write the table knows and the engine has no handler of its own
            # for is one transaction of one operation.
            write = None
            if handler is None and op is not None and op.write:
                write = self._single_writes.get(opcode)
            if record_type is None or (handler is None and write is None):
                self._unimplemented(client, xid, opcode)
                return None
            if opcode == OpCode.CHECK:
                # ZooKeeper 3.8 accepts check only inside a multi: alone, its
                # reply fails to serialize and the server drops the connection.
                log.warning(
                    "check outside multi; closing, as ZooKeeper does",
                    extra={"session": client.session.id, "peer": client.peer.remote},
                )
                self.zxid += 1
                self._lose(client)
                return None
            record = record_type.read(Reader(body))
            routed = self._route(opcode, record) if self.mounts else None
            if isinstance(routed, _CrossesMounts):
                self._reply(client, xid, Err.BADARGUMENTS)
            elif routed is not None:
                pending = routed.request(client, xid, opcode, record)
            elif handler is not None:
                handler(client, xid, record)
            else:
                # write is not None here: with no handler, the check above required one.
                self._single_write(client, xid, opcode, record, write)  # type: ignore[arg-type]
            client.last_op = opcode
        elapsed = self.clock() - started
        self.stats.record_latency(elapsed * 1000)
        if self.observer is not None:
            self.observer(opcode, elapsed)
        return pending

    # --- mounts -----------------------------------------------------------------

    def mount(self, mount: Mount) -> None:
        """Serve ``mount.root`` and everything below it from ``mount``.

        The root's parents are created in the embedded tree, and the root
        itself as a never-stored placeholder, so the root shows in its
        parent's children as a mount point does in a file system.
        """
        root = mount.root
        validate_path(root)
        taken = (*self.projection_roots, *(m.root for m in self.mounts))
        if root == "/" or any(is_within(root, r) or is_within(r, root) for r in taken):
            raise ValueError(f"mount {root} overlaps another mount")
        if root.startswith("/zookeeper"):
            raise ValueError(f"mount {root}: /zookeeper is the server's own")
        node = self.tree.get(root)
        if node is not None and (node.children or node.data):
            raise ValueError(
                f"mount {root} already holds data in the embedded tree; "
                "delete it or choose another root"
            )
        self.mounts = (*self.mounts, mount)
        if node is None:
            txn = self._internal_txn()
            self._ensure_directory(txn, root)
            self._commit(txn)

    def _mount_of(self, path: str) -> Mount | None:
        for mount in self.mounts:
            root = mount.root
            if path == root or (path.startswith(root) and path[len(root) : len(root) + 1] == "/"):
                return mount
        return None

    def _route(self, opcode: int, record: Record) -> Mount | _CrossesMounts | None:
        """The mount a request belongs to, None for the embedded tree, or
        ``_CROSSES_MOUNTS`` for a multi that spans backends (no backend can
        make that atomic)."""
        if opcode in _LOCAL_OPS:
            return None
        if isinstance(record, MultiRequest):
            if _names_null_path(record):
                return None  # refused as a whole, before any op: no backend needed
            # A malformed path belongs to no backend: whichever gets the multi
            # answers it with that op's error, as ZooKeeper does.
            owners = {
                self._mount_of(r.path)  # type: ignore[attr-defined]  # every op of a multi has a path
                for _, r in record.ops
                if _well_formed(r.path)  # type: ignore[attr-defined]  # as above
            }
            if len(owners) > 1:
                return _CROSSES_MOUNTS
            return owners.pop() if owners else None
        path = getattr(record, "path", None)
        return None if path is None else self._mount_of(path)

    def reply(self, client: Client, xid: int, err: int, body: bytes | Record = b"") -> None:
        """Answer a request a mount deferred (zxid: the engine's current one).

        ``err`` may be any code an upstream sent, known to :class:`Err` or not.
        """
        self._reply(client, xid, err, body)

    def announce(self, triggers: list[Trigger]) -> None:
        """A mount's subtree changed: one zxid, and the watches fire."""
        self.zxid += 1
        self._fire(triggers)

    def notify(self, client: Client, event: EventType, path: str) -> None:
        """Send one watch event to one client (a mount's setWatches catch-up)."""
        self._notify(client, event, path)

    def can_read(self, client: Client, acl: tuple[ACL, ...]) -> bool:
        """Whether ``client``'s own identities grant READ on ``acl``.

        zkgate's super digest is left out: it is this server's, and an
        upstream ensemble would not know it.
        """
        auth = tuple(a for a in client.auth if a.scheme != "super")
        return acls.allowed(acl, Perm.READ, auth)

    def _reply(
        self, client: Client, xid: int, err: int, body: bytes | Record = b"", zxid: int = -2
    ) -> None:
        """Answer ``xid``: ``body`` is the result record, or its encoding when
        the engine has it already (a znode's cached data and Stat)."""
        if zxid == -2:
            zxid = self.zxid
        if not client.closed:
            # A closed client's peer drops whatever it is given; its codec may
            # be past the point where it accepts a reply.
            # send_reply is send(Reply(...)) without the event object: this is
            # the hot path of every read.
            data = client.conn.send_reply(xid, zxid, err, body)
            gate = self.durability
            if gate is None:
                client.peer.send(data)
            else:
                gate.send(client.peer, data)
        client.sent += 1
        client.last_zxid = zxid
        self.stats.packets_sent += 1

    def _delete_container(self, client: Client, xid: int) -> None:
        """deleteContainer from a client: BADARGUMENTS, and the connection stays.

        ZooKeeper 3.8 takes the path of a deleteContainer from the whole
        request buffer, header included, whose opcode bytes always hold a NUL,
        so its path check refuses every one a client sends, whatever the body
        (only the server's own container reaper gets further). The refusal is
        a failed write: it takes a zxid, which the reply header carries.
        """
        self.zxid += 1
        self._reply(client, xid, Err.BADARGUMENTS, zxid=self.zxid)

    def _unimplemented(self, client: Client, xid: int, opcode: int) -> None:
        log.warning("unknown opcode; closing, as ZooKeeper does", extra={
            "opcode": opcode, "session": client.session.id, "peer": client.peer.remote,
        })  # fmt: skip
        self._reply(client, xid, Err.UNIMPLEMENTED, zxid=-1)
        self._lose(client)

    def _lose(self, client: Client) -> None:
        self.disconnect(client)
        self._close_peer(client.peer)

    def _send(self, peer: Peer, data: bytes) -> None:
        """Send ``data``, after the writes it could show are durable."""
        gate = self.durability
        if gate is None:
            peer.send(data)
        else:
            gate.send(peer, data)

    def _close_peer(self, peer: Peer) -> None:
        """Close ``peer`` once what was sent to it before has left."""
        gate = self.durability
        if gate is None:
            peer.close()
        else:
            gate.close(peer)

    def _close_session(self, client: Client, xid: int) -> Pending | None:
        log.info("session closed by its client", extra={"session": client.session.id})
        # ZooKeeper answers closeSession once the ephemerals are gone; under a
        # mirror that takes the upstream's answer.
        pending = Pending()

        def answer(zxid: int) -> None:
            self._reply(client, xid, Err.OK, zxid=zxid)
            self._lose(client)
            pending.finish()

        self._end_session(client.session, answer)
        return None if pending.finished else pending

    def _can(self, client: Client, node: Znode, perm: int) -> bool:
        # Plain ints, not Perm flags: this runs on every read, and IntFlag
        # arithmetic costs more than the rest of the check.
        if node.world_perms & perm == perm:
            return True
        return acls.allowed(node.acl, Perm(perm), client.auth)

    # --- reads ------------------------------------------------------------------

    def _get_data(self, client: Client, xid: int, path: str, watch: bool) -> None:
        node = self.tree.get(path)
        if node is None:
            return self._reply(client, xid, Err.NONODE)
        if not self._can(client, node, _READ):
            return self._reply(client, xid, Err.NOAUTH)
        if watch:
            self.watches.add_data(path, client)
        self._reply(client, xid, Err.OK, node.data_body())

    def _exists(self, client: Client, xid: int, path: str, watch: bool) -> None:
        node = self.tree.get(path)
        if watch:
            self.watches.add_data(path, client)
        if node is None:
            return self._reply(client, xid, Err.NONODE)
        self._reply(client, xid, Err.OK, node.stat_bytes())

    def _get_children(self, client: Client, xid: int, path: str, watch: bool) -> None:
        node = self._children_of(client, xid, path, watch)
        if node is not None:
            self._reply(client, xid, Err.OK, node.children_body())

    def _get_children2(self, client: Client, xid: int, path: str, watch: bool) -> None:
        node = self._children_of(client, xid, path, watch)
        if node is not None:
            self._reply(client, xid, Err.OK, node.children_body() + node.stat_bytes())

    def _children_of(self, client: Client, xid: int, path: str, watch: bool) -> Znode | None:
        node = self.tree.get(path)
        if node is None:
            self._reply(client, xid, Err.NONODE)
            return None
        if not self._can(client, node, _READ):
            self._reply(client, xid, Err.NOAUTH)
            return None
        if watch:
            self.watches.add_child(path, client)
        return node

    def _get_acl(self, client: Client, xid: int, req: PathRequest) -> None:
        if req.path is None:
            return self._reply(client, xid, Err.MARSHALLINGERROR)
        node = self.tree.get(req.path)
        if node is None:
            return self._reply(client, xid, Err.NONODE)
        if not self._can(client, node, _READ | _ADMIN):
            return self._reply(client, xid, Err.NOAUTH)
        acl = node.acl
        if not self._can(client, node, _ADMIN):
            # Without ADMIN a client may see who has access, not the digests.
            acl = tuple(
                # A stored digest id is never null: fixup_acl refused those.
                ACL(a.perms, Id("digest", (a.id.id or "").split(":", 1)[0] + ":x"))
                if a.id.scheme == "digest" else a
                for a in acl
            )  # fmt: skip
        self._reply(client, xid, Err.OK, GetACLResponse(acl, node.stat()))

    def _sync(self, client: Client, xid: int, req: PathRequest) -> None:
        self._reply(client, xid, Err.OK, PathResponse(req.path))

    def _set_watches(self, client: Client, xid: int, req: SetWatches | SetWatches2) -> None:
        # ZooKeeper walks the lists in order and stops, answering
        # MARSHALLINGERROR, at a null list or at a null path in the data, exist
        # or child list (its node lookup throws); what came before stays done.
        relative = req.relative_zxid
        tree, watches = self.tree, self.watches
        mount_of = self._mount_of if self.mounts else None
        for kind in ("data", "exist", "child"):
            paths = getattr(req, kind)
            if paths is None:
                return self._reply(client, xid, Err.MARSHALLINGERROR)
            for path in paths:
                if path is None:
                    return self._reply(client, xid, Err.MARSHALLINGERROR)
                mount = None if mount_of is None else mount_of(path)
                if mount is not None:
                    mount.rewatch(client, kind, path, relative)
                    continue
                node = tree.get(path)
                if kind == "exist":
                    if node is not None:
                        self._notify(client, EventType.NODE_CREATED, path)
                    else:
                        watches.add_data(path, client)
                elif node is None:
                    self._notify(client, EventType.NODE_DELETED, path)
                elif kind == "data":
                    if node.mzxid > relative:
                        self._notify(client, EventType.NODE_DATA_CHANGED, path)
                    else:
                        watches.add_data(path, client)
                elif node.pzxid > relative:
                    self._notify(client, EventType.NODE_CHILDREN_CHANGED, path)
                else:
                    watches.add_child(path, client)
        if isinstance(req, SetWatches2):
            for recursive, paths in ((False, req.persistent), (True, req.persistent_recursive)):
                if paths is None:
                    return self._reply(client, xid, Err.MARSHALLINGERROR)
                for path in paths:
                    if path is not None:
                        watches.add_persistent(path, client, recursive=recursive)
                    # A null one goes to the child table, then the data table.
                    elif not _add_null_watch(client, ("child", "data")):
                        return self._reply(client, xid, Err.MARSHALLINGERROR)
        self._reply(client, xid, Err.OK)

    def _add_watch(self, client: Client, xid: int, req: AddWatchRequest) -> None:
        if req.mode not in (0, 1):
            # ZooKeeper fails to deserialize an unknown mode: MARSHALLINGERROR.
            return self._reply(client, xid, Err.MARSHALLINGERROR)
        if req.path is None:
            # ZooKeeper adds it to the data table, then the child table.
            if not _add_null_watch(client, ("data", "child")):
                return self._reply(client, xid, Err.MARSHALLINGERROR)
        else:
            self.watches.add_persistent(req.path, client, recursive=req.mode == 1)
        self._reply(client, xid, Err.OK, ErrorResult(Err.OK))

    def _check_watches(self, client: Client, xid: int, req: WatchesRequest) -> None:
        if req.path is None:
            # ZooKeeper's lookup throws on a null path, whatever is watched.
            return self._reply(client, xid, Err.MARSHALLINGERROR)
        self._watches_op(client, xid, req, self.watches.contains)

    def _remove_watches(self, client: Client, xid: int, req: WatchesRequest) -> None:
        if req.path is None:
            return self._remove_null_watch(client, xid, req.type)
        self._watches_op(client, xid, req, self.watches.remove)

    def _remove_null_watch(self, client: Client, xid: int, type_: int) -> None:
        """removeWatches on a null path, as ZooKeeper 3.8's tables answer it."""
        try:
            kind = WatcherType(type_)
        except ValueError:
            return self._reply(client, xid, Err.MARSHALLINGERROR)
        tables = {
            WatcherType.CHILDREN: ("child",), WatcherType.DATA: ("data",),
            WatcherType.ANY: ("child", "data"),
        }[kind]  # fmt: skip
        held = client.null_watches
        removed = False
        for table in tables if held is not None else ():
            outcome = held.remove(table)  # type: ignore[union-attr]  # loops only if held is not None
            if outcome is None:
                return self._reply(client, xid, Err.MARSHALLINGERROR)
            removed = removed or outcome
        self._reply(client, xid, Err.OK if removed else Err.NOWATCHER)

    def _watches_op(
        self,
        client: Client,
        xid: int,
        req: WatchesRequest,
        op: Callable[[str, Client, WatcherType], bool],
    ) -> None:
        try:
            kind = WatcherType(req.type)
        except ValueError:
            return self._reply(client, xid, Err.MARSHALLINGERROR)
        # Callers answered a null path themselves.
        path = req.path or ""
        self._reply(client, xid, Err.OK if op(path, client, kind) else Err.NOWATCHER)

    def _multi_read(self, client: Client, xid: int, req: MultiReadRequest) -> None:
        results: list[tuple[int, Record]] = []
        for opcode, record in req.ops:
            assert isinstance(record, PathWatchRequest)
            if record.path is None:
                # ZooKeeper's read throws; the reply carries the results so far.
                body = MultiResponse(tuple(results))
                return self._reply(client, xid, Err.MARSHALLINGERROR, body)
            node = self.tree.get(record.path)
            if node is None:
                results.append((OpCode.ERROR, ErrorResult(Err.NONODE)))
                continue
            if not self._can(client, node, _READ):
                results.append((OpCode.ERROR, ErrorResult(Err.NOAUTH)))
                continue
            # ZooKeeper 3.8 ignores the watch flag of the reads inside a multiRead.
            if opcode == OpCode.GET_DATA:
                results.append((opcode, GetDataResponse(node.data, node.stat())))
            else:
                results.append((opcode, GetChildrenResponse(tuple(sorted(node.children)))))
        self._reply(client, xid, Err.OK, MultiResponse(tuple(results)))

    def _get_ephemerals(self, client: Client, xid: int, req: PathRequest) -> None:
        owned = list(self.tree.ephemerals.get(client.session.id, ()))
        for mount in self.mounts:
            owned += mount.ephemerals(client.session.id)
        # ZooKeeper lists them all for a null, blank or "/" prefix (after trim).
        prefix = req.path
        if prefix is None or _java_trim(prefix) in ("", "/"):
            prefix = ""
        paths = tuple(sorted(p for p in owned if p.startswith(prefix)))
        self._reply(client, xid, Err.OK, PathsResponse(paths))

    def _get_all_children_number(self, client: Client, xid: int, req: PathRequest) -> None:
        if req.path is None:
            return self._reply(client, xid, Err.MARSHALLINGERROR)
        node = self.tree.get(req.path)
        if node is None:
            return self._reply(client, xid, Err.NONODE)
        if not self._can(client, node, _READ):
            return self._reply(client, xid, Err.NOAUTH)
        self._reply(client, xid, Err.OK, CountResponse(self.tree.descendants(req.path)))

    def _who_am_i(self, client: Client, xid: int, req: Empty) -> None:
        infos = tuple(
            # The engine makes every Id of client.auth, none with a null part.
            ClientInfo(
                a.scheme or "",
                (a.id or "").split(":", 1)[0] if a.scheme == "digest" else a.id or "",
            )
            for a in sorted(client.auth, key=lambda a: (a.scheme, a.id))
        )
        self._reply(client, xid, Err.OK, WhoAmIResponse(infos))

    def _sasl(self, client: Client, xid: int, req: GetSASLRequest) -> None:
        if req.token is None:
            # ZooKeeper reads the null token's length, throws, and closes the
            # connection without an answer (the session lives on).
            log.warning(
                "sasl request with a null token; closing, as ZooKeeper does",
                extra={"session": client.session.id, "peer": client.peer.remote},
            )
            return self._lose(client)
        users = self.config.sasl_users
        if users is None:
            # A ZooKeeper without SASL configured answers with an empty token.
            self._reply(client, xid, Err.OK, SetSASLResponse(None), zxid=0)
            return
        if client.sasl is None:
            client.sasl = DigestMd5Server(users)
        try:
            token = client.sasl.evaluate(req.token)
        except SaslError as exc:
            # ZooKeeper (without allowSaslFailedClients) answers a refused
            # token and closes the connection; the session lives on.
            required = self.config.sasl_required
            log.warning("SASL authentication failed; closing", extra={
                "reason": str(exc), "session": client.session.id, "peer": client.peer.remote,
            })  # fmt: skip
            err = Err.SESSIONCLOSEDREQUIRESASLAUTH if required else Err.AUTHFAILED
            self._reply(client, xid, err, SetSASLResponse(None), zxid=0)
            self._lose(client)
            return
        if client.sasl.complete and client.sasl.authorization_id is not None:
            ident = Id("sasl", client.sasl.authorization_id)
            if ident not in client.auth:
                client.auth = (*client.auth, ident)
            log.info("SASL authenticated", extra={
                "user": client.sasl.authorization_id, "session": client.session.id,
                "peer": client.peer.remote,
            })  # fmt: skip
        self._reply(client, xid, Err.OK, SetSASLResponse(token), zxid=0)

    def _require_sasl(self, client: Client, xid: int, opcode: int) -> None:
        """ZooKeeper's answer to a request before SASL when SASL is required."""
        log.warning("request before SASL authentication; closing", extra={
            "opcode": opcode, "session": client.session.id, "peer": client.peer.remote,
        })  # fmt: skip
        self._reply(client, xid, Err.SESSIONCLOSEDREQUIRESASLAUTH, zxid=0)
        self._lose(client)

    def _reconfig(self, client: Client, xid: int, req: ReconfigRequest) -> None:
        self.zxid += 1  # refused in ZooKeeper's prep stage, as an error txn
        self._reply(client, xid, Err.RECONFIGDISABLED)

    def _auth(self, client: Client, xid: int, req: AuthPacket) -> None:
        # A null digest fails in ZooKeeper's provider (caught: AUTHFAILED); a
        # null scheme names no provider; the ip provider never reads the auth.
        if req.scheme == "digest" and req.auth is not None:
            ident = acls.digest_id(req.auth.decode("utf-8", "replace"))
            new = [Id("digest", ident)]
            if (req.scheme, req.auth) not in client.credentials:
                client.credentials = (*client.credentials, (req.scheme, req.auth))
            if self.config.super_digest is not None and ident == self.config.super_digest:
                new.append(acls.SUPER)
        elif req.scheme == "ip":
            new = [Id("ip", client.peer.remote_ip)]
        else:
            log.warning("authentication failed; closing", extra={
                "scheme": req.scheme, "session": client.session.id, "peer": client.peer.remote,
            })  # fmt: skip
            self._reply(client, xid, Err.AUTHFAILED, zxid=0)
            self._lose(client)
            return
        for ident_ in new:
            if ident_ not in client.auth:
                client.auth = (*client.auth, ident_)
        self._reply(client, xid, Err.OK, zxid=0)

    # --- writes -----------------------------------------------------------------

    def _single_write(
        self,
        client: Client,
        xid: int,
        opcode: int,
        record: Record,
        write: Callable[[Txn, Client, int, Record], Record | bytes | None],
    ) -> None:
        # A failed write still takes a zxid in ZooKeeper (it is logged as an
        # error txn), and clients see it in the reply header.
        self.zxid += 1
        txn = Txn(self.tree, self.zxid, self._now_ms())
        try:
            result = write(txn, client, opcode, record)
        except ZkError as exc:
            txn.rollback()
            return self._reply(client, xid, exc.err, zxid=txn.zxid)
        except BaseException:
            # A bug: the server answers SYSTEMERROR; the tree must not keep half of it.
            txn.rollback()
            raise
        self._commit(txn)
        self._reply(client, xid, Err.OK, b"" if result is None else result, txn.zxid)

    # --- writes in place ----------------------------------------------------------
    #
    # create, setData and delete that will succeed, on a server that commits in
    # groups, touching nothing the generic path treats specially (projections,
    # mounts, quotas, /zookeeper, ACLs that world:anyone does not open): done
    # straight on the tree, with no transaction record, undo log or request
    # record, and answered with the bytes the generic path would send. Every
    # condition is checked before anything changes; where one does not hold
    # they return False and the generic path takes the request, and answers
    # it (errors included) as always. The group is told of the paths first:
    # it reads them only when it closes, after this call, and a failure there
    # would leave the tree untouched.

    def _in_place_allowed(self, path: str) -> bool:
        """True when a write of ``path`` may be done in place (see above)."""
        return not (
            self.durability is None
            or self.quotas.active
            or path.startswith("/zookeeper")
            or (self.projection_roots and self._projected(path))
        )

    def _set_data_in_place(
        self, client: Client, xid: int, opcode: int, fields: _WriteFields
    ) -> bool:
        path, data, _, expected = fields
        node = self.tree.nodes.get(path)
        if node is None or not node.world_perms & _WRITE or not self._in_place_allowed(path):
            return False
        version = node.version
        if expected != -1 and expected != version:
            return False
        self.durability.add_path(path)  # type: ignore[union-attr]  # _in_place_allowed: not None
        self.zxid = zxid = self.zxid + 1
        node.data = data
        node.version = version + 1 if version != 0x7FFFFFFF else 1
        node.mzxid = zxid
        node.mtime = int(self.wall_clock() * 1000)
        node.touched()
        if self.watches.data or self.watches.child or self.changed is not None:
            self._committed_in_place([Trigger(path, _NODE_DATA_CHANGED, node.acl)])
        self._reply(client, xid, _OK, node.stat_bytes(), zxid)
        return True

    def _delete_in_place(self, client: Client, xid: int, opcode: int, fields: _WriteFields) -> bool:
        path, _, _, expected = fields
        nodes = self.tree.nodes
        node = nodes.get(path)
        if node is None or node.children or path in _SPECIAL_PATHS or "\0" in path:
            return False
        if expected != -1 and expected != node.version:
            return False
        cut = path.rfind("/")
        parent_path = path[:cut] or "/"
        parent = nodes.get(parent_path)
        if parent is None or not parent.world_perms & _DELETE:
            return False
        if not self._in_place_allowed(path):
            return False
        self.durability.add((path, parent_path))  # type: ignore[union-attr]  # as above
        self.zxid = zxid = self.zxid + 1
        self.tree.unindex(path, node)
        del nodes[path]
        parent.children.discard(path[cut + 1 :])
        parent.cversion += 1
        parent.pzxid = zxid
        parent.touched()
        if self.watches.data or self.watches.child or self.changed is not None:
            self._committed_in_place([
                Trigger(path, _NODE_DELETED, node.acl),
                Trigger(parent_path, _NODE_CHILDREN_CHANGED, parent.acl),
            ])  # fmt: skip
        self._reply(client, xid, _OK, b"", zxid)
        return True

    def _create_in_place(self, client: Client, xid: int, opcode: int, fields: _WriteFields) -> bool:
        path, data, requested, flags = fields
        mode = _CREATE_MODES.get(flags)
        if mode is None or mode[0] or requested is None:
            return False  # unknown flags, or a TTL mode: refused by the generic path
        acl = self._create_acl(client, requested)
        if acl is None:
            return False
        cut = path.rfind("/")
        if cut == -1:
            return False
        nodes = self.tree.nodes
        parent_path = path[:cut] or "/"
        parent = nodes.get(parent_path)
        if parent is None or not parent.world_perms & _CREATE or parent.is_ephemeral:
            return False
        if not self._in_place_allowed(path):
            return False  # checked before the sequence number too: the generic path does
        if mode[1]:
            path = f"{path}{parent.child_creates:010d}"
            if not self._in_place_allowed(path):
                return False
        if path in nodes or not _well_formed(path):
            return False
        if opcode == _OP_CREATE_CONTAINER:
            owner = CONTAINER_OWNER
        elif mode[2]:
            owner = client.session.id
        else:
            owner = 0
        self.durability.add((path, parent_path))  # type: ignore[union-attr]  # as above
        self.zxid = zxid = self.zxid + 1
        now = int(self.wall_clock() * 1000)
        node = Znode(data, acl, zxid, zxid, now, now, ephemeral_owner=owner, pzxid=zxid)
        self.tree.index(path, node)
        nodes[path] = node
        parent.children.add(path[cut + 1 :])
        parent.cversion += 1
        parent.child_creates += 1
        parent.pzxid = zxid
        parent.touched()
        if self.watches.data or self.watches.child or self.changed is not None:
            self._committed_in_place([
                Trigger(path, _NODE_CREATED, acl),
                Trigger(parent_path, _NODE_CHILDREN_CHANGED, parent.acl),
            ])  # fmt: skip
        raw = path.encode()
        result = _PATH_LENGTH.pack(len(raw)) + raw
        if opcode != _OP_CREATE:
            result += node.stat_bytes()
        self._reply(client, xid, _OK, result, zxid)
        return True

    def _committed_in_place(self, triggers: list[Trigger]) -> None:
        """What :meth:`_commit` does once a transaction is handed to the store:
        the watches fire, then :attr:`changed` hears of it."""
        self._fire(triggers)
        if self.changed is not None:
            self.changed(triggers)

    def _create_acl(self, client: Client, requested: tuple[ACL, ...]) -> tuple[ACL, ...] | None:
        """The ACL a create's znode gets, as the generic path fixes it up, if
        that depends on ``requested`` alone (no ``auth`` entry, which stands
        for the client's ids) and is valid; None otherwise."""
        # By identity: the decoded ACLs of the few encodings clients send are
        # kept (see _write_fields), and hashing one costs more than a lookup.
        known = self._create_acls.get(id(requested))
        if known is not None and known[0] is requested:
            return known[1]
        if any(entry.id.scheme == "auth" for entry in requested):
            return None
        try:
            fixed = _fixed_acl(
                requested, (), sasl=self.config.sasl_users is not None, x509=self.config.x509
            )
        except ZkError:
            return None
        acl = self._shared_acl(fixed)
        if len(self._create_acls) < _REQUEST_ACLS:
            # The entry holds ``requested``: its id cannot be reused meanwhile.
            self._create_acls[id(requested)] = (requested, acl)
        return acl

    def _multi(self, client: Client, xid: int, req: MultiRequest) -> None:
        self.zxid += 1
        if _names_null_path(req):
            # ZooKeeper reads every op's path (for its pending changes) before
            # running any and throws on a null one: the zxid is spent, the
            # reply carries the previous one and an empty result list.
            body = MultiResponse(())
            return self._reply(client, xid, Err.MARSHALLINGERROR, body, self.zxid - 1)
        txn = Txn(self.tree, self.zxid, self._now_ms())
        results: list[tuple[int, Record]] = []
        failed: ZkError | None = None
        for opcode, record in req.ops:
            try:
                result = self._writes[opcode](txn, client, opcode, record)
            except ZkError as exc:
                failed = exc
                break
            except BaseException:
                txn.rollback()
                raise
            results.append(_multi_result(opcode, result))
        if failed is None:
            self._commit(txn)
        elif failed.err == Err.MARSHALLINGERROR:
            # An op that throws (not a KeeperException) fails the whole multi:
            # ZooKeeper answers it like a failed single write, without results.
            txn.rollback()
            return self._reply(client, xid, failed.err, zxid=txn.zxid)
        else:
            txn.rollback()
            # ZooKeeper's answer to a failed multi: the ops before the failure
            # report OK (rolled back), the failed one its error, the rest
            # RUNTIMEINCONSISTENCY; the reply header itself says OK.
            done = len(results)
            results = [(OpCode.ERROR, ErrorResult(Err.OK)) for _ in range(done)]
            results.append((OpCode.ERROR, ErrorResult(failed.err)))
            results += [
                (OpCode.ERROR, ErrorResult(Err.RUNTIMEINCONSISTENCY))
                for _ in range(len(req.ops) - done - 1)
            ]
        self._reply(client, xid, Err.OK, MultiResponse(tuple(results)), txn.zxid)

    def _commit(self, txn: Txn) -> None:
        try:
            self.quotas.account(txn)
            paths = txn.touched_paths
            if self.projection_roots or self.mounts:
                # Projected subtrees are rebuilt from the snapshot at start, never stored.
                paths = [
                    p
                    for p in paths
                    if not self._projected(p) and (not self.mounts or self._mount_of(p) is None)
                ]
            if paths:
                if self.durability is None:
                    self.store.commit(self.tree, paths)
                else:
                    self.durability.add(paths)
        except BaseException:
            # Nothing of it is durable (the store's transaction rolled back), so
            # the tree must not show it either: the client gets SYSTEMERROR.
            txn.rollback()
            raise
        self._fire(txn.triggers)
        if self.changed is not None:
            self.changed(txn.triggers)

    def _fire(self, triggers: list[Trigger]) -> None:
        """Send each trigger's event to its watchers.

        A watcher that hears several events of one transaction (a multi under
        a recursive watch) gets them in one send, in order.
        """
        if not self.watches.data and not self.watches.child:
            return  # nobody watches anything (recursive watches are in there too)
        if len(triggers) == 1:
            for watcher, notification in self._heard(triggers[0]):
                self._send(watcher.peer, watcher.conn.send(notification))
            return
        outgoing: dict[Client, list[bytes]] = {}
        for trigger in triggers:
            for watcher, notification in self._heard(trigger):
                outgoing.setdefault(watcher, []).append(watcher.conn.send(notification))
        for watcher, packets in outgoing.items():
            self._send(watcher.peer, b"".join(packets))

    def _heard(self, trigger: Trigger) -> Iterator[tuple[Client, Notification]]:
        """Who hears ``trigger``, each with the one Notification (framed once) of it."""
        watchers = self.watches.fire(trigger.path, trigger.event)
        if not watchers:
            return
        notification = Notification(
            WatcherEvent(trigger.event, KeeperState.SYNC_CONNECTED, trigger.path)
        )
        acl = trigger.acl
        # A watcher that may not READ the znode loses its watch unheard, as in
        # ZooKeeper: the event would disclose the znode's path.
        guarded = acl is not None and not world_perms(acl) & _READ
        for watcher in watchers:
            assert isinstance(watcher, Client)
            # guarded implies acl is not None, which mypy cannot carry across.
            if guarded and not acls.allowed(acl, Perm.READ, watcher.auth):  # type: ignore[arg-type]
                continue
            self.stats.packets_sent += 1
            yield watcher, notification

    def _notify(self, client: Client, event: EventType, path: str) -> None:
        if not client.closed:
            notification = Notification(WatcherEvent(event, KeeperState.SYNC_CONNECTED, path))
            self._send(client.peer, client.conn.send(notification))
        self.stats.packets_sent += 1

    def _create(self, txn: Txn, client: Client, opcode: int, req: Record) -> Record:
        path, node = self._create_node(txn, client, opcode, req)
        if opcode == OpCode.CREATE:
            return CreateResponse(path)
        return Create2Response(path, node.stat())

    def _create_single(self, txn: Txn, client: Client, opcode: int, req: Record) -> bytes:
        """:meth:`_create`'s result, encoded (the same bytes, made directly)."""
        path, node = self._create_node(txn, client, opcode, req)
        raw = path.encode()
        if opcode == _OP_CREATE:
            return _PATH_LENGTH.pack(len(raw)) + raw
        return _PATH_LENGTH.pack(len(raw)) + raw + node.stat_bytes()

    def _shared_acl(self, acl: tuple[ACL, ...]) -> tuple[ACL, ...]:
        shared = self._acls.get(acl)
        if shared is not None:
            return shared
        if len(self._acls) < _SHARED_ACLS:
            self._acls[acl] = acl
        return acl

    def _create_node(self, txn: Txn, client: Client, opcode: int, req: Record) -> tuple[str, Znode]:
        """Create what ``req`` asks for; the path created (sequential names
        resolved) and its znode."""
        assert isinstance(req, CreateRequest | CreateTTLRequest)
        if req.path is not None:
            self._refuse_projected(req.path)
        mode = _CREATE_MODES.get(req.flags)
        if mode is None:
            raise ZkError(Err.BADARGUMENTS)
        is_ttl, is_sequential, is_ephemeral = mode
        ttl = req.ttl if isinstance(req, CreateTTLRequest) else -1
        if is_ttl:
            if not self.config.extended_types:
                raise ZkError(Err.UNIMPLEMENTED)
            if not 0 < ttl <= MAX_TTL_MS:
                raise ZkError(Err.BADARGUMENTS)
        elif ttl >= 0:
            raise ZkError(Err.BADARGUMENTS)
        path = req.path
        if path is None:
            # ZooKeeper looks for the parent's slash in the null path and throws.
            raise ZkError(Err.MARSHALLINGERROR)
        cut = path.rfind("/")
        if cut == -1 or "\0" in path:
            raise ZkError(Err.BADARGUMENTS)
        acl = self._shared_acl(
            _fixed_acl(
                req.acl, client.auth, sasl=self.config.sasl_users is not None, x509=self.config.x509
            )
        )
        parent = self.tree.get(path[:cut])
        if parent is None:
            raise ZkError(Err.NONODE)
        if not self._can(client, parent, _CREATE):
            raise ZkError(Err.NOAUTH)
        if is_sequential:
            path = f"{path}{parent.child_creates:010d}"
        try:
            validate_path(path)
        except InvalidPath:
            raise ZkError(Err.BADARGUMENTS) from None
        if self.tree.get(path) is not None:
            raise ZkError(Err.NODEEXISTS)
        if parent.is_ephemeral:
            raise ZkError(Err.NOCHILDRENFOREPHEMERALS)
        # What the node becomes follows the opcode, as ZooKeeper 3.8's txns
        # record it: createContainer always makes a container and createTTL a
        # TTL node, whatever else the flags say; a plain create with the
        # container flag makes a persistent node.
        if opcode == _OP_CREATE_CONTAINER:
            owner = CONTAINER_OWNER
        elif opcode == _OP_CREATE_TTL:
            owner = ttl_owner(ttl)
        elif is_ephemeral:
            owner = client.session.id
        else:
            owner = 0
        return path, txn.create(path, req.data, acl, owner)

    def _delete(self, txn: Txn, client: Client, opcode: int, req: DeleteRequest) -> None:
        path = req.path
        if path is None:
            raise ZkError(Err.MARSHALLINGERROR)  # ZooKeeper splits the null path and throws
        self._refuse_projected(path)
        cut = path.rfind("/")
        if cut == -1 or "\0" in path or path in _SPECIAL_PATHS:
            raise ZkError(Err.BADARGUMENTS)
        parent = self.tree.get(path[:cut])
        if parent is None:
            raise ZkError(Err.NONODE)
        if not self._can(client, parent, _DELETE):
            raise ZkError(Err.NOAUTH)
        node = self.tree.nodes.get(path)
        if node is None:
            raise ZkError(Err.NONODE)
        _check_version(node.version, req.version)
        if node.children:
            raise ZkError(Err.NOTEMPTY)
        txn.delete(path)

    def _validated(self, client: Client, path: str, perm: int) -> Znode:
        node = self.tree.nodes.get(path)
        # Every znode's path was checked when it was made, so a path that names
        # one needs no second look; projected znodes are named by the registry,
        # so they are checked, as paths that name nothing are.
        if node is None or self.projection_roots:
            try:
                validate_path(path)
            except InvalidPath:
                raise ZkError(Err.BADARGUMENTS) from None
        if perm != _READ:
            self._refuse_projected(path)
        if node is None:
            raise ZkError(Err.NONODE)
        if not self._can(client, node, perm):
            raise ZkError(Err.NOAUTH)
        return node

    def _set_data(self, txn: Txn, client: Client, opcode: int, req: SetDataRequest) -> Record:
        return StatResponse(self._set_node_data(txn, client, req).stat())

    def _set_data_single(self, txn: Txn, client: Client, opcode: int, req: SetDataRequest) -> bytes:
        """:meth:`_set_data`'s result, encoded; the next read reuses the bytes."""
        return self._set_node_data(txn, client, req).stat_bytes()

    def _set_node_data(self, txn: Txn, client: Client, req: SetDataRequest) -> Znode:
        path = _non_null(req.path)
        node = self._validated(client, path, _WRITE)
        version = _check_version(node.version, req.version)
        return txn.set_data(path, req.data, version)

    def _check(self, txn: Txn, client: Client, opcode: int, req: DeleteRequest) -> None:
        node = self._validated(client, _non_null(req.path), _READ)
        _check_version(node.version, req.version)

    def _set_acl(self, txn: Txn, client: Client, opcode: int, req: SetACLRequest) -> Record:
        path = _non_null(req.path)
        try:
            validate_path(path)
        except InvalidPath:
            raise ZkError(Err.BADARGUMENTS) from None
        acl = _fixed_acl(
            req.acl, client.auth, sasl=self.config.sasl_users is not None, x509=self.config.x509
        )
        node = self._validated(client, path, _ADMIN)
        aversion = _check_version(node.aversion, req.version)
        return StatResponse(txn.set_acl(path, acl, aversion).stat())


def _non_null(path: str | None) -> str:
    """The path of a write. A null one gets BADARGUMENTS, the answer
    :func:`validate_path` gives an empty one, as ZooKeeper's path check does."""
    if path is None:
        raise ZkError(Err.BADARGUMENTS)
    return path


def _has_sasl(client: Client) -> bool:
    return any(a.scheme == "sasl" for a in client.auth)


#: What a connection may send before SASL when SASL is required, as ZooKeeper
#: handles these two before its enforcement.
_BEFORE_SASL = frozenset({OpCode.AUTH, OpCode.SASL})


def _fixed_acl(
    acl: tuple[ACL, ...] | None, auth: tuple[Id, ...], *, sasl: bool = False, x509: bool = False
) -> tuple[ACL, ...]:
    """:func:`acls.fixup_acl` with its failures as ZooKeeper answers them."""
    try:
        return acls.fixup_acl(acl, auth, sasl=sasl, x509=x509)
    except acls.InvalidACL:
        raise ZkError(Err.INVALIDACL) from None
    except acls.UnreadableACL:
        raise ZkError(Err.MARSHALLINGERROR) from None


def _names_null_path(req: MultiRequest) -> bool:
    return any(getattr(record, "path", "") is None for _, record in req.ops)


def _add_null_watch(client: Client, tables: Iterable[str]) -> bool:
    """Add a null-path watch to ``tables`` in order; False where ZooKeeper throws."""
    held = client.null_watches
    if held is None:
        held = client.null_watches = NullPathWatches()
    return all(held.add(table) for table in tables)


def _java_trim(text: str) -> str:
    """Java's ``String.trim``: strips every character up to U+0020 at both ends."""
    start, end = 0, len(text)
    while start < end and text[start] <= " ":
        start += 1
    while end > start and text[end - 1] <= " ":
        end -= 1
    return text[start:end]


def _multi_result(opcode: int, result: Record | None) -> tuple[int, Record]:
    """A sub-result as ZooKeeper 3.8 labels it inside a multi reply.

    ZooKeeper answers create2 inside a multi as a plain create (path only), and
    createContainer and createTTL as create2 (path and stat).
    """
    if opcode == OpCode.CREATE2 and isinstance(result, Create2Response):
        return OpCode.CREATE, CreateResponse(result.path)
    if opcode in (OpCode.CREATE_CONTAINER, OpCode.CREATE_TTL):
        return OpCode.CREATE2, result or Empty()
    return opcode, result or Empty()


_PATH_LENGTH = struct.Struct(">i")
#: Requests a mount never sees: they concern the connection, not the tree.
_LOCAL_OPS = frozenset({
    OpCode.AUTH, OpCode.SET_WATCHES, OpCode.SET_WATCHES2, OpCode.ADD_WATCH,
    OpCode.CHECK_WATCHES, OpCode.REMOVE_WATCHES, OpCode.GET_EPHEMERALS, OpCode.WHO_AM_I,
    OpCode.SASL, OpCode.RECONFIG,
})  # fmt: skip


class _CrossesMounts:
    """Marks a multi whose operations lie in more than one backend."""


_CROSSES_MOUNTS = _CrossesMounts()


def _path_and_watch(body: bytes) -> tuple[str | None, bool]:
    """Decode the (ustring path, bool watch) body of exists/getData/getChildren.

    The path is None when the client sent a null string (length -1).
    """
    if len(body) < 5:
        raise DecodeError("record truncated")
    (length,) = _PATH_LENGTH.unpack_from(body)
    if length == -1:
        return None, body[4] != 0
    if length < 0 or 4 + length + 1 > len(body):
        raise DecodeError("path length exceeds the frame")
    try:
        path = body[4 : 4 + length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("path is not UTF-8") from exc
    return path, body[4 + length] != 0


# Opcodes compared on every request, as plain ints: comparing with an enum
# member costs a class attribute lookup each time.
_OP_PING, _OP_CLOSE_SESSION, _OP_DELETE_CONTAINER = (
    int(OpCode.PING), int(OpCode.CLOSE_SESSION), int(OpCode.DELETE_CONTAINER),
)  # fmt: skip
_OP_CREATE, _OP_CREATE_CONTAINER, _OP_CREATE_TTL = (
    int(OpCode.CREATE), int(OpCode.CREATE_CONTAINER), int(OpCode.CREATE_TTL),
)  # fmt: skip
_OP_DELETE, _OP_SET_DATA = int(OpCode.DELETE), int(OpCode.SET_DATA)
_OK = int(Err.OK)
# Watches compare events by identity: these are the enum members themselves.
_NODE_CREATED, _NODE_DELETED, _NODE_DATA_CHANGED, _NODE_CHILDREN_CHANGED = (
    EventType.NODE_CREATED, EventType.NODE_DELETED, EventType.NODE_DATA_CHANGED,
    EventType.NODE_CHILDREN_CHANGED,
)  # fmt: skip
#: Per create flags value: (TTL, sequential, ephemeral); absent: not a mode.
_CREATE_MODES = {
    int(mode): (mode.is_ttl, mode.is_sequential, mode.is_ephemeral) for mode in CreateMode
}
_FAST_WRITES = frozenset({
    OpCode.CREATE, OpCode.CREATE2, OpCode.CREATE_CONTAINER, OpCode.SET_DATA, OpCode.DELETE,
})  # fmt: skip
#: Distinct ACL encodings kept decoded (more are decoded each time).
_REQUEST_ACLS = 256
#: Distinct ACLs whose tuple new znodes share (more get a tuple each).
_SHARED_ACLS = 1024
#: ACL entries a create may carry and still take the fast path.
_FAST_ACL_ENTRIES = 16


#: What a create, setData or delete body holds, decoded in place: the path, the
#: data (None for delete), the decoded ACL (None but for creates), and the
#: last int (the expected version, or a create's flags).
_WriteFields = tuple[str, "bytes | None", "tuple[ACL, ...] | None", int]


def _write_fields(
    opcode: int, body: bytes, acl_cache: dict[bytes, tuple[ACL, ...]]
) -> _WriteFields | None:
    """The fields of a create, setData or delete body, decoded in place.

    None when the body holds anything but non-null fields that fit the frame
    (a null string or buffer, a short frame, a path that is not UTF-8): the
    record decoder then reads it, and answers or refuses it as always. So
    this returns only what that decoder would (trailing bytes are ignored
    there too).
    """
    size = len(body)
    if size < 8:
        return None
    (length,) = _PATH_LENGTH.unpack_from(body)
    at = 4 + length
    if length < 0 or at + 4 > size:
        return None
    try:
        path = body[4:at].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if opcode == _OP_DELETE:
        return path, None, None, _PATH_LENGTH.unpack_from(body, at)[0]
    (data_length,) = _PATH_LENGTH.unpack_from(body, at)
    end = at + 4 + data_length
    if data_length < 0 or end + 4 > size:
        return None
    data = body[at + 4 : end]
    if opcode == _OP_SET_DATA:
        return path, data, None, _PATH_LENGTH.unpack_from(body, end)[0]
    # create, create2, createContainer: the ACL vector, then the flags.
    (count,) = _PATH_LENGTH.unpack_from(body, end)
    if not 0 <= count <= _FAST_ACL_ENTRIES:
        return None
    cursor = end + 4
    for _ in range(count):
        cursor += 4  # perms; then the scheme and the id, each a non-null ustring
        for _field in range(2):
            if cursor + 4 > size:
                return None
            (field_length,) = _PATH_LENGTH.unpack_from(body, cursor)
            if field_length < 0:
                return None
            cursor += 4 + field_length
    if cursor + 4 > size:
        return None
    raw_acl = body[end:cursor]
    acl = acl_cache.get(raw_acl)
    if acl is None:
        try:
            acl = read_acls(Reader(raw_acl))
        except DecodeError:
            return None
        if acl is None:
            return None
        if len(acl_cache) < _REQUEST_ACLS:
            acl_cache[raw_acl] = acl
    return path, data, acl, _PATH_LENGTH.unpack_from(body, cursor)[0]


def _write_record(opcode: int, fields: _WriteFields) -> Record:
    """The request record that :func:`_write_fields`' fields stand for."""
    path, data, acl, last = fields
    if opcode == _OP_DELETE:
        return DeleteRequest(path, last)
    if opcode == _OP_SET_DATA:
        return SetDataRequest(path, data, last)
    return CreateRequest(path, data, acl, last)


def _decode_write(
    opcode: int, body: bytes, acl_cache: dict[bytes, tuple[ACL, ...]]
) -> Record | None:
    """The request record of a create, setData or delete, decoded in place;
    None where :func:`_write_fields` leaves the body to the record decoder."""
    fields = _write_fields(opcode, body, acl_cache)
    return None if fields is None else _write_record(opcode, fields)


def _well_formed(path: str) -> bool:
    try:
        validate_path(path)
    except InvalidPath:
        return False
    return True


def _check_version(current: int, expected: int) -> int:
    """ZooKeeper's checkAndIncVersion: -1 matches any version."""
    if expected != -1 and expected != current:
        raise ZkError(Err.BADVERSION)
    return current + 1 if current != 0x7FFFFFFF else 1


__all__ = ["Client", "Engine", "EngineConfig", "Peer", "ZkError"]
