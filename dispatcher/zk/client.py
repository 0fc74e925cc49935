"""A trio-native ZooKeeper client session on zkgate's own codec.

Why not kazoo: kazoo runs its I/O in a thread, has no ``addWatch`` (ZooKeeper
3.6+ persistent and persistent-recursive watches) and hands watch events and
replies to different threads, so their relative order is lost. The mirror
backend keeps a cache whose correctness rests on ZooKeeper's ordering promise
(a session sees a watch event before any reply to a request the server
processed after the change); this client keeps that promise visible by
calling every callback synchronously from the one task that reads the socket,
in the order the frames arrived.

One :class:`ZooKeeperClient` is one session over time: :meth:`~ZooKeeperClient.run`
owns the connection for as long as it runs (connect, handshake, replay,
ping, reconnect), and requests go in through :meth:`~ZooKeeperClient.submit`
(synchronous, pipelined) or the awaitable helpers built on it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn
from urllib.parse import urlsplit

import attrs
import trio

from dispatcher.zk.codec import client_connection as wire
from dispatcher.zk.codec.client_connection import (
    FRAME_SLACK,
    ClientConnection,
    Connect,
    LocalProtocolError,
    ProtocolError,
    ReplyReceived,
    Request,
    WatchNotified,
    decode_body,
)
from dispatcher.zk.codec.protocol import (
    DEFAULT_MAX_BUFFER,
    XID_AUTH,
    XID_PING,
    XID_SET_WATCHES,
    Err,
    EventType,
    OpCode,
)
from dispatcher.zk.codec.records import (
    ACL,
    OPEN_ACL_UNSAFE,
    AddWatchRequest,
    AuthPacket,
    ConnectRequest,
    CreateRequest,
    CreateResponse,
    DeleteRequest,
    GetChildrenResponse,
    GetDataResponse,
    GetSASLRequest,
    PathRequest,
    PathWatchRequest,
    Record,
    SetDataRequest,
    SetSASLResponse,
    SetWatches2,
    Stat,
    StatResponse,
    WatcherEvent,
    WatchesRequest,
)
from dispatcher.zk.sasl_client import DigestMd5Client, SaslCredentials, SaslError

__all__ = [
    "OPEN_ACL",
    "AddWatchMode",
    "AuthFailed",
    "ClientState",
    "Connected",
    "ConnectionLost",
    "Disconnected",
    "Expired",
    "KeeperError",
    "Overloaded",
    "Reply",
    "SessionEvent",
    "ZooKeeperClient",
    "split_connect_string",
]

log = logging.getLogger(__name__)

OPEN_ACL = OPEN_ACL_UNSAFE

_RECEIVE_SIZE = 65536
#: ZooKeeper's client port, where a connect string names none.
_DEFAULT_PORT = 2181
#: First pause after a full round of failed connection attempts; it doubles per
#: round up to ``max_backoff``. Small, because the usual cause is a server that
#: is restarting and answers again within a second or two.
_FIRST_BACKOFF = 0.05
#: Upper bound on the path bytes of one SetWatches2 packet, ZooKeeper's own
#: client's SET_WATCHES_MAX_LENGTH: a session with many watches replays them in
#: several packets, none near jute.maxbuffer.
_SET_WATCHES_MAX_BYTES = 128 * 1024
#: How long closing a session may wait for the server's answer.
_CLOSE_TIMEOUT = 2.0
_PING = Request(XID_PING, OpCode.PING)

#: Opcodes the session sends itself, with reserved xids or at fixed moments.
_SESSION_OPCODES = frozenset({
    OpCode.PING, OpCode.AUTH, OpCode.SET_WATCHES, OpCode.SET_WATCHES2,
    OpCode.CLOSE_SESSION, OpCode.CREATE_SESSION, OpCode.NOTIFICATION,
})  # fmt: skip
_WATCHING_READS = frozenset({
    OpCode.GET_DATA, OpCode.EXISTS, OpCode.GET_CHILDREN, OpCode.GET_CHILDREN2,
})  # fmt: skip


class AddWatchMode(enum.IntEnum):
    """The ``mode`` of addWatch (ZooKeeper's ``AddWatchMode``)."""

    PERSISTENT = 0
    PERSISTENT_RECURSIVE = 1


class ConnectionLost(Exception):
    """There is no connection now, or it dropped before the reply arrived."""


class Overloaded(ConnectionLost):
    """Too many requests in flight or too many bytes unsent: back off and retry.

    A ConnectionLost because callers treat both alike (nothing was sent; try
    again later), but distinct so that a caller can tell a full pipe from a
    broken one.
    """


class KeeperError(Exception):
    """The server answered a convenience call with an error code."""

    def __init__(self, err: Err | int, path: str | None = None) -> None:
        self.err = _as_err(err)
        self.path = path
        name = self.err.name if isinstance(self.err, Err) else str(self.err)
        super().__init__(name if path is None else f"{name} for {path}")


@attrs.frozen
class Reply:
    """The server's answer: error code, the zxid in its header, the decoded body.

    ``body`` is None when ``err != 0`` and for operations that answer with no
    body; ``zxid`` is -1 for a reply synthesised on connection loss.
    """

    err: int
    zxid: int
    body: Record | None


@attrs.frozen
class Connected:
    """A connection is up and ready for requests.

    ``resumed`` is True when it carries the same session as before (watches
    were replayed, ephemerals survive); False for a brand-new session.
    """

    session_id: int
    resumed: bool


@attrs.frozen
class Disconnected:
    """The connection was lost; the session may survive (a Connected follows)."""


@attrs.frozen
class Expired:
    """The server no longer knows the session: its ephemerals and watches are gone.

    The client opens a new session at once; re-create what the old one owned
    and re-add watches after the Connected(resumed=False) that follows.
    """


@attrs.frozen
class AuthFailed:
    """The server refused the credentials of ``scheme``; :meth:`ZooKeeperClient.run` raises."""

    scheme: str


SessionEvent = Connected | Disconnected | Expired | AuthFailed


class ClientState(enum.Enum):
    CONNECTING = "connecting"  # no connection now: before the first, or between two
    CONNECTED = "connected"
    AUTH_FAILED = "auth_failed"
    CLOSED = "closed"  # run() has returned; the client cannot be used again


def _as_err(err: int) -> Err | int:
    try:
        return Err(err)
    except ValueError:
        return err


_CONNECTION_LOSS = Reply(Err.CONNECTIONLOSS, -1, None)


@attrs.frozen
class _Pending:
    xid: int
    opcode: int
    on_reply: Callable[[Reply], None]
    #: The request when its success arms or removes a watch, else None (so the
    #: queue does not hold on to the data of every create and setData).
    watching: Record | None


@attrs.frozen
class _PendingAuth:
    scheme: str
    on_reply: Callable[[int], None] | None


class _Armed(enum.Enum):
    """What one of the server's two watch tables holds for this session on a path."""

    DATA = "data"  # one-shot, set by getData (or exists on a node that is there)
    EXIST = "exist"  # one-shot, set by exists on a node that is not there
    CHILD = "child"  # one-shot, set by getChildren
    PERSISTENT = "persistent"
    RECURSIVE = "recursive"


_ONE_SHOT = frozenset({_Armed.DATA, _Armed.EXIST, _Armed.CHILD})


class _ArmedWatches:
    """The watches the server holds for this session, as the client must replay them.

    A model of ZooKeeper 3.8's two watch tables for this one connection (see
    dispatcher/zk/server/watches.py): ``data`` and ``child`` map a path to what that
    table holds there. ``addWatch`` writes both tables with its mode; a
    one-shot read writes only its own, so ``addWatch(p)`` then
    ``getChildren(p, watch)`` leaves a persistent data watch and a one-shot
    child watch, which is what the server then fires. An event uses up the
    one-shot watches of its path in the tables it triggers (NodeDeleted: both).
    The reads inside a multiRead arm nothing: ZooKeeper drops their flag.

    One thing the model cannot see: a watch the server uses up without telling
    (a change to a znode this session may not read) stays here, and a replay
    sets it again; its next event is then a spurious one, never a lost one.
    """

    def __init__(self) -> None:
        self.data: dict[str, _Armed] = {}
        self.child: dict[str, _Armed] = {}
        #: Paths of the last replay with a persistent half and a one-shot half.
        self._mixed: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.data or self.child)

    def clear(self) -> None:
        self.data.clear()
        self.child.clear()
        self._mixed.clear()

    def answered(self, opcode: int, request: Record, err: int) -> None:
        """A request that may arm or remove a watch got its answer."""
        if (
            not isinstance(request, PathWatchRequest | AddWatchRequest | WatchesRequest)
            or request.path is None
        ):
            # No event ever fires on a null path, so there is nothing to replay.
            return
        path = request.path
        if opcode == OpCode.EXISTS and isinstance(request, PathWatchRequest):
            # exists arms a watch both ways: on the data if the node is there,
            # on its creation if not.
            if err == Err.OK:
                self.data[path] = _Armed.DATA
            elif err == Err.NONODE:
                self.data[path] = _Armed.EXIST
        elif err != Err.OK:
            return
        elif opcode == OpCode.GET_DATA and isinstance(request, PathWatchRequest):
            self.data[path] = _Armed.DATA
        elif opcode in (OpCode.GET_CHILDREN, OpCode.GET_CHILDREN2) and isinstance(
            request, PathWatchRequest
        ):
            self.child[path] = _Armed.CHILD
        elif opcode == OpCode.ADD_WATCH and isinstance(request, AddWatchRequest):
            recursive = request.mode == AddWatchMode.PERSISTENT_RECURSIVE
            mode = _Armed.RECURSIVE if recursive else _Armed.PERSISTENT
            self.data[path] = self.child[path] = mode
        elif opcode == OpCode.REMOVE_WATCHES and isinstance(request, WatchesRequest):
            # removeWatches types: 1 children, 2 data, 3 any.
            if request.type in (1, 3):
                self.child.pop(path, None)
            if request.type in (2, 3):
                self.data.pop(path, None)

    def fired(self, event: WatcherEvent) -> None:
        """The server sent ``event``: one-shot watches it triggered are gone there."""
        path, kind = event.path, event.type
        if kind != EventType.NODE_CHILDREN_CHANGED and self.data.get(path) in _ONE_SHOT:
            del self.data[path]
        if kind in (EventType.NODE_DELETED, EventType.NODE_CHILDREN_CHANGED) and (
            self.child.get(path) is _Armed.CHILD
        ):
            del self.child[path]

    def replay(self, relative_zxid: int, max_bytes: int) -> list[tuple[int, Record]]:
        """The requests that re-arm every watch on a new connection, in order:
        SetWatches2 packets, each under ``max_bytes`` of paths, then
        removeWatches for the halves of persistent watches to take back.

        The server applies a packet's one-shot lists before its persistent
        ones, and a persistent entry arms both tables. So the persistent
        watches go first, and a path's one-shot watch goes in a later packet
        than the persistent watch of the same path: that restores a mix. A
        persistent watch left in one table (the other half removed, or used
        up by an event after a one-shot read replaced it) is re-armed in both
        and the other half removed again.
        """
        lists = {_Armed.DATA: 0, _Armed.EXIST: 1, _Armed.CHILD: 2,
                 _Armed.PERSISTENT: 3, _Armed.RECURSIVE: 4}  # fmt: skip
        persistent: list[tuple[int, str]] = []
        one_shot: list[tuple[int, str]] = []
        take_back: list[tuple[int, Record]] = []
        for path in sorted(self.data.keys() | self.child.keys()):
            data, child = self.data.get(path), self.child.get(path)
            for armed in (data, child):
                if armed is not None and armed not in _ONE_SHOT:
                    persistent.append((lists[armed], path))
                    break
            for armed in (data, child):
                if armed is not None and armed in _ONE_SHOT:
                    one_shot.append((lists[armed], path))
            if data is None and child is not None and child not in _ONE_SHOT:
                take_back.append((OpCode.REMOVE_WATCHES, WatchesRequest(path, 2)))
            elif child is None and data is not None and data not in _ONE_SHOT:
                take_back.append((OpCode.REMOVE_WATCHES, WatchesRequest(path, 1)))
        mixed = self._mixed = {path for _, path in persistent} & {path for _, path in one_shot}
        requests: list[tuple[int, Record]] = []
        batch: list[list[str]] = [[] for _ in range(5)]
        size = 0

        def flush() -> None:
            nonlocal batch, size
            packet = SetWatches2(relative_zxid, *(tuple(paths) for paths in batch))
            requests.append((OpCode.SET_WATCHES2, packet))
            batch = [[] for _ in range(5)]
            size = 0

        for group in (persistent, one_shot):
            if group is one_shot and mixed and size:
                flush()  # one-shot watches of a mixed path after its persistent one
            for index, path in group:
                cost = len(path.encode("utf-8")) + 4
                if size and size + cost > max_bytes:
                    flush()
                batch[index].append(path)
                size += cost
        if size:
            flush()
        return requests + take_back

    def settle(self) -> list[tuple[int, Record]]:
        """After :meth:`replay`'s answers: the removeWatches that make the server
        match this model again where an event used up a one-shot half of a mix.

        Such an event is a catch-up (the node changed while disconnected: the
        server sends it instead of arming the one-shot watch, so the
        persistent watch just re-armed keeps that table) or a change during
        the replay; either way this model has already dropped the half.
        """
        requests: list[tuple[int, Record]] = []
        for path in sorted(self._mixed):
            data, child = self.data.get(path), self.child.get(path)
            if data is None and child is not None and child not in _ONE_SHOT:
                requests.append((OpCode.REMOVE_WATCHES, WatchesRequest(path, 2)))
            elif child is None and data is not None and data not in _ONE_SHOT:
                requests.append((OpCode.REMOVE_WATCHES, WatchesRequest(path, 1)))
        self._mixed = set()
        return requests


class _Connection:
    """One TCP connection of the session: the stream, its codec, and unsent output."""

    def __init__(self, stream: trio.abc.Stream, codec: ClientConnection, peer: str) -> None:
        self.stream = stream
        self.codec = codec
        self.peer = peer
        self.out = bytearray()
        self.wake = trio.Event()
        #: True while a send_all is in progress: if it is cancelled half-way the
        #: server has half a frame, and nothing more may be written.
        self.sending = False
        self.set_watches_outstanding = 0
        self.lost_reason = "closed"

    def lost(self, reason: str) -> None:
        """Record the first reason the connection failed (the one worth logging)."""
        if self.lost_reason == "closed":
            self.lost_reason = reason

    def write(self, frame: bytes) -> None:
        self.out += frame
        self.wake.set()


class _Expired(Exception):
    """The server answered the handshake with a dead session."""


class _HandshakeFailed(Exception):
    """This connection attempt failed; try the next host."""


class ZooKeeperClient:
    """One ZooKeeper session, kept alive across connections by :meth:`run`.

    Callbacks (``on_watch``, ``on_session`` and every ``on_reply``) are called
    synchronously from the task that reads the socket, one at a time, in the
    order the server's frames arrived; they must not block, and may call
    :meth:`submit`. An exception raised by a callback ends :meth:`run` with it.

    Watches: one-shot watches (``watch=True`` on getData, exists, getChildren)
    and persistent ones (:meth:`add_watch`, or addWatch through :meth:`submit`)
    are tracked from the replies that armed them. After a reconnect with the
    same session they are replayed with SetWatches2 before
    ``Connected(resumed=True)``; the server then sends events for one-shot
    watches whose node changed meanwhile, but NOT for changes under persistent
    watches (ZooKeeper 3.8 just re-registers those), so a cache must resync
    after a resumed session. After :class:`Expired` every watch is forgotten:
    the caller re-adds them after the following ``Connected(resumed=False)``.

    Bounds: at most ``max_in_flight`` requests awaiting replies and
    ``max_unsent`` bytes queued for the socket (beyond either, :meth:`submit`
    raises :class:`Overloaded`); no frame in either direction longer than
    ``max_buffer`` plus :data:`~dispatcher.zk.codec.client_connection.FRAME_SLACK`
    (a longer reply closes the connection, a longer request is refused).
    """

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        *,
        session_timeout_ms: int = 10_000,
        auth: Sequence[tuple[str, bytes]] = (),
        on_watch: Callable[[WatcherEvent], None] | None = None,
        on_session: Callable[[SessionEvent], None] | None = None,
        max_in_flight: int = 10_000,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_unsent: int = 16 * 1024 * 1024,
        connect_timeout: float = 5.0,
        max_backoff: float = 2.0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        sasl: SaslCredentials | None = None,
    ) -> None:
        """``tls``: speak TLS (ZooKeeper's ``secureClientPort``) with this context,
        checking the server's certificate against ``server_name`` (the host
        dialled if None). ``sasl``: authenticate every connection with
        DIGEST-MD5 as this user before anything else is sent, as ZooKeeper's
        Java client does; a refusal is reported as :class:`AuthFailed` for the
        scheme ``sasl`` and ends :meth:`run` as a refused credential does."""
        if not hosts:
            raise ValueError("at least one host is required")
        self._hosts = list(hosts)
        self._session_timeout_ms = session_timeout_ms
        self._auth: list[tuple[str, bytes]] = list(auth)
        self._on_watch = on_watch
        self._on_session = on_session
        self._max_in_flight = max_in_flight
        self._max_buffer = max_buffer
        self._max_unsent = max_unsent
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._tls = tls
        self._server_name = server_name
        self._sasl = sasl
        self._random = random.Random()
        # Spread a fleet of clients over an ensemble, as ZooKeeper's client does.
        self._random.shuffle(self._hosts)

        self._state = ClientState.CONNECTING
        self._state_changed = trio.Event()
        self._running = False
        self._session_id = 0
        self._announced_session_id = 0
        self._passwd = bytes(16)
        self._negotiated_timeout_ms = 0
        self._last_zxid = 0
        self._xid = 0
        self._conn: _Connection | None = None
        self._pending: deque[_Pending] = deque()
        self._pending_auth: deque[_PendingAuth] = deque()
        self._watches = _ArmedWatches()
        self._auth_failed: str | None = None
        self._close_xid: int | None = None
        self._close_answered = False

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is ClientState.CONNECTED

    @property
    def session_id(self) -> int:
        """The current session's id; 0 before the first session."""
        return self._session_id

    @property
    def password(self) -> bytes:
        """The session's password, which with :attr:`session_id` resumes it."""
        return self._passwd

    @property
    def last_zxid(self) -> int:
        """The largest zxid seen in a reply header (sent as lastZxidSeen and relativeZxid)."""
        return self._last_zxid

    @property
    def negotiated_timeout_ms(self) -> int:
        """The session timeout the server granted; 0 before the first session."""
        return self._negotiated_timeout_ms

    def _set_state(self, state: ClientState) -> None:
        self._state = state
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def wait_connected(self) -> None:
        """Return once connected; raise ConnectionLost if the client has stopped for good."""
        while self._state is not ClientState.CONNECTED:
            if self._state in (ClientState.CLOSED, ClientState.AUTH_FAILED):
                raise ConnectionLost(f"the client is {self._state.value}")
            await self._state_changed.wait()

    # --------------------------------------------------------------- requests

    def submit(
        self, opcode: int, request: Record | None, on_reply: Callable[[Reply], None]
    ) -> None:
        """Queue one request; ``on_reply`` gets its answer exactly once.

        Raises :class:`ConnectionLost` when not connected, :class:`Overloaded`
        when a bound is reached, ValueError for an opcode the session sends
        itself (ping, auth, setWatches, closeSession) or a request too large.
        Otherwise ``on_reply`` is called later from the reader task, in frame
        order with every other reply and watch event, or with
        ``Reply(CONNECTIONLOSS, -1, None)`` if the connection drops first
        (pending requests fail in submission order).
        """
        if opcode in _SESSION_OPCODES:
            raise ValueError(f"opcode {opcode} is sent by the session itself")
        conn = self._conn
        if conn is None or self._state is not ClientState.CONNECTED:
            raise ConnectionLost("not connected")
        if len(self._pending) >= self._max_in_flight:
            raise Overloaded(f"{len(self._pending)} requests in flight")
        xid = self._next_xid()
        frame = _encoded(conn, Request(xid, opcode, request))
        if len(frame) - 4 > self._max_buffer + FRAME_SLACK:
            raise ValueError(f"request of {len(frame)} bytes exceeds max_buffer")
        if len(conn.out) + len(frame) > self._max_unsent:
            raise Overloaded(f"{len(conn.out)} bytes unsent")
        self._pending.append(_Pending(xid, opcode, on_reply, _watching(opcode, request)))
        conn.write(frame)

    async def call(self, opcode: int, request: Record | None) -> Reply:
        """:meth:`submit` and wait for the reply (CONNECTIONLOSS comes back as a Reply)."""
        done = trio.Event()
        replies: list[Reply] = []

        def on_reply(reply: Reply) -> None:
            replies.append(reply)
            done.set()

        self.submit(opcode, request, on_reply)
        await done.wait()
        return replies[0]

    async def _checked(
        self, opcode: int, request: Record, path: str, allowed: tuple[int, ...] = ()
    ) -> Reply:
        reply = await self.call(opcode, request)
        if reply.err == Err.CONNECTIONLOSS:
            raise ConnectionLost(f"connection lost before the reply for {path}")
        if reply.err != Err.OK and reply.err not in allowed:
            raise KeeperError(reply.err, path)
        return reply

    async def get_data(self, path: str, watch: bool = False) -> tuple[bytes | None, Stat]:
        reply = await self._checked(OpCode.GET_DATA, PathWatchRequest(path, watch), path)
        assert isinstance(reply.body, GetDataResponse)
        return reply.body.data, reply.body.stat

    async def exists(self, path: str, watch: bool = False) -> Stat | None:
        """The node's Stat, or None if it does not exist (a watch is armed either way)."""
        reply = await self._checked(
            OpCode.EXISTS, PathWatchRequest(path, watch), path, allowed=(Err.NONODE,)
        )
        if reply.err == Err.NONODE:
            return None
        assert isinstance(reply.body, StatResponse)
        return reply.body.stat

    async def get_children(self, path: str, watch: bool = False) -> list[str]:
        reply = await self._checked(OpCode.GET_CHILDREN, PathWatchRequest(path, watch), path)
        assert isinstance(reply.body, GetChildrenResponse)
        return list(reply.body.children)

    async def create(
        self, path: str, data: bytes = b"", acl: Sequence[ACL] = OPEN_ACL, flags: int = 0
    ) -> str:
        """Create a node; returns its path (with the sequence suffix if sequential)."""
        request = CreateRequest(path, data, tuple(acl), flags)
        reply = await self._checked(OpCode.CREATE, request, path)
        assert isinstance(reply.body, CreateResponse)
        return reply.body.path

    async def delete(self, path: str, version: int = -1) -> None:
        await self._checked(OpCode.DELETE, DeleteRequest(path, version), path)

    async def set_data(self, path: str, data: bytes, version: int = -1) -> Stat:
        reply = await self._checked(OpCode.SET_DATA, SetDataRequest(path, data, version), path)
        assert isinstance(reply.body, StatResponse)
        return reply.body.stat

    async def sync(self, path: str) -> None:
        await self._checked(OpCode.SYNC, PathRequest(path), path)

    async def add_watch(self, path: str, *, recursive: bool) -> None:
        """Add a persistent (or persistent-recursive) watch; replayed on a resumed session."""
        mode = AddWatchMode.PERSISTENT_RECURSIVE if recursive else AddWatchMode.PERSISTENT
        await self._checked(OpCode.ADD_WATCH, AddWatchRequest(path, mode), path)

    async def add_auth(self, scheme: str, credential: bytes) -> None:
        """Authenticate this session; the credential is replayed on every later connection.

        Raises ConnectionLost if not connected (nothing is recorded then). Once
        sent, the credential is recorded even if the connection drops before
        the answer. If the server refuses it, :class:`AuthFailed` is reported,
        :meth:`run` raises, and so does this call (KeeperError AUTHFAILED).
        """
        conn = self._conn
        if conn is None or self._state is not ClientState.CONNECTED:
            raise ConnectionLost("not connected")
        done = trio.Event()
        answers: list[int] = []

        def on_reply(err: int) -> None:
            answers.append(err)
            done.set()

        frame = _encoded(conn, Request(XID_AUTH, OpCode.AUTH, AuthPacket(0, scheme, credential)))
        self._auth.append((scheme, credential))
        self._pending_auth.append(_PendingAuth(scheme, on_reply))
        conn.write(frame)
        await done.wait()
        if answers[0] == Err.CONNECTIONLOSS:
            raise ConnectionLost(f"connection lost before the answer to auth {scheme}")
        if answers[0] != Err.OK:
            raise KeeperError(answers[0], None)

    async def _tls_handshake(
        self, stream: trio.SocketStream, host: tuple[str, int]
    ) -> trio.SSLStream[trio.SocketStream]:
        """The TLS handshake; a refusal is logged as a warning, being a
        misconfiguration that retrying will not mend."""
        assert self._tls is not None
        secure = trio.SSLStream(stream, self._tls, server_hostname=self._server_name or host[0])
        try:
            await secure.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            cause = exc.__cause__
            reason = (
                cause.verify_message if isinstance(cause, ssl.SSLCertVerificationError)
                else str(cause or exc) or "closed during the handshake"
            )  # fmt: skip
            log.warning("TLS handshake with ZooKeeper failed",
                        extra={"peer": _peer(host), "reason": reason})  # fmt: skip
            raise _HandshakeFailed(f"TLS handshake failed: {reason}") from None
        return secure

    def _next_xid(self) -> int:
        # Positive and wrapping: negative xids are reserved for the session.
        self._xid = self._xid + 1 if self._xid < 0x7FFFFFFF else 1
        return self._xid

    # ---------------------------------------------------------------- session

    async def run(self) -> NoReturn:
        """Own the session: connect, keep connected, reconnect; forever.

        Tries the hosts in rotation (a full round of failures waits with
        exponential backoff and jitter, up to ``max_backoff``), pings when
        idle for a third of the negotiated timeout, and treats two thirds of
        it without a byte from the server as a lost connection. Raises
        KeeperError(AUTHFAILED) if the server refuses a credential. On
        cancellation it sends closeSession (best effort, bounded wait), fails
        pending requests with CONNECTIONLOSS and closes the socket; the client
        cannot be run again.
        """
        if self._running or self._state is ClientState.CLOSED:
            raise RuntimeError("run() may be called once")
        self._running = True
        try:
            with _single_error():
                await self._run_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _run_forever(self) -> NoReturn:
        failures = 0
        index = 0
        while True:
            if failures >= len(self._hosts):
                rounds = min(failures // len(self._hosts), 16)
                delay = min(self._max_backoff, _FIRST_BACKOFF * 2 ** (rounds - 1))
                await trio.sleep(delay * self._random.uniform(0.5, 1.0))
            host = self._hosts[index % len(self._hosts)]
            index += 1
            try:
                conn = await self._connect(host)
            except _Expired:
                self._session_expired()
                failures = 0
                index -= 1  # the host is fine: open the new session there
                continue
            except _HandshakeFailed as exc:
                failures += 1
                log.debug("connection attempt failed: %s", exc, extra={"peer": _peer(host)})
                continue
            failures = 0
            await self._serve(conn)
            if self._auth_failed is not None:
                raise KeeperError(Err.AUTHFAILED, None)

    async def _connect(self, host: tuple[str, int]) -> _Connection:
        """Open a connection and bring it to CONNECTED, or raise _HandshakeFailed/_Expired.

        The whole handshake (TCP, ConnectRequest, auth replay, watch replay)
        is bounded by ``connect_timeout``, and, as in ZooKeeper's own client,
        by the session timeout divided by the number of hosts: a resumed
        session must reach some host before the server expires it, and a
        server may leave a handshake unanswered (ZooKeeper 3.8.0 does, for a
        connection accepted while it is still starting).
        """
        stream: trio.abc.Stream | None = None
        peer = _peer(host)
        timeout = min(self._connect_timeout, self._session_timeout_ms / 1000 / len(self._hosts))
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(*host)
                if self._tls is not None:
                    stream = await self._tls_handshake(stream, host)
                conn = _Connection(stream, ClientConnection(self._max_buffer), peer)
                request = ConnectRequest(
                    0, self._last_zxid, self._session_timeout_ms, self._session_id,
                    self._passwd, False,
                )  # fmt: skip
                await stream.send_all(conn.codec.send(Connect(request)))
                event = await self._next_event(conn)
                if not isinstance(event, wire.Connected):
                    raise _HandshakeFailed("closed without answering the ConnectRequest")
                response = event.response
                if response.timeout <= 0:
                    raise _Expired()
                same = self._session_id != 0 and response.session_id == self._session_id
                if self._session_id != 0 and not same:
                    # A different session than asked for: the old one is gone.
                    self._session_expired()
                self._session_id = response.session_id
                self._passwd = response.passwd
                self._negotiated_timeout_ms = response.timeout
                await self._setup(conn, replay_watches=same)
                if self._auth_failed is not None:
                    raise KeeperError(Err.AUTHFAILED, None)
        except BaseException as exc:
            await _close(stream)
            self._fail_pending_auth()
            if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
                raise _HandshakeFailed(f"{type(exc).__name__}: {exc}") from exc
            if isinstance(exc, trio.TooSlowError):
                raise _HandshakeFailed(f"no handshake within {timeout:.2f}s") from exc
            if isinstance(exc, ProtocolError):
                raise _HandshakeFailed(f"protocol error: {exc}") from exc
            raise
        # "Resumed" is about what the caller saw: a session whose first
        # handshake failed half-way was never announced, so it is new to them.
        resumed = self._session_id == self._announced_session_id
        self._announced_session_id = self._session_id
        self._conn = conn
        self._set_state(ClientState.CONNECTED)
        log.info(
            "zookeeper session connected",
            extra={"session": self._session_id, "peer": peer, "resumed": resumed,
                   "timeout_ms": self._negotiated_timeout_ms},
        )  # fmt: skip
        if self._on_session is not None:
            self._on_session(Connected(self._session_id, resumed))
        return conn

    async def _setup(self, conn: _Connection, *, replay_watches: bool) -> None:
        """Replay credentials (always) and watches (on a resumed session), then wait
        for the answers, so that nothing the caller sends can overtake them."""
        if self._sasl is not None:
            await self._sasl_exchange(conn, self._sasl)
            if self._auth_failed is not None:
                return
        frames = bytearray()
        for scheme, credential in self._auth:
            auth = AuthPacket(0, scheme, credential)
            frames += conn.codec.send(Request(XID_AUTH, OpCode.AUTH, auth))
            self._pending_auth.append(_PendingAuth(scheme, None))
        replay = replay_watches and bool(self._watches)
        if replay:
            limit = min(_SET_WATCHES_MAX_BYTES, self._max_buffer // 2)
            frames += self._watch_requests(conn, self._watches.replay(self._last_zxid, limit))
        if not frames:
            return
        await self._handshake(conn, frames)
        if replay and self._auth_failed is None:
            settling = self._watch_requests(conn, self._watches.settle())
            if settling:
                await self._handshake(conn, settling)

    async def _sasl_exchange(self, conn: _Connection, credentials: SaslCredentials) -> None:
        """DIGEST-MD5 on this connection; a refusal (the server's, or a server
        that cannot prove it knows the password) sets ``_auth_failed``."""
        mechanism = DigestMd5Client(credentials)
        token: bytes | None = mechanism.initial()
        while token is not None:
            xid = self._next_xid()
            await conn.stream.send_all(
                conn.codec.send(Request(xid, OpCode.SASL, GetSASLRequest(token)))
            )
            while True:
                event = await self._next_event(conn)
                if event is None:
                    raise _HandshakeFailed("closed during SASL authentication")
                if isinstance(event, ReplyReceived) and event.xid == xid:
                    break
                if not isinstance(event, WatchNotified):
                    raise ProtocolError(f"unexpected {type(event).__name__} during SASL")
                self._dispatch(conn, event)
            if event.err != Err.OK:
                err = _as_err(event.err)
                # An IntEnum formats as its number; the name is what an operator looks up.
                said = err.name if isinstance(err, Err) else str(err)
                return self._sasl_refused(f"the server answered {said}")
            body = decode_body(OpCode.SASL, event.err, event.body)
            assert isinstance(body, SetSASLResponse)
            try:
                token = mechanism.evaluate(body.token)
            except SaslError as exc:
                return self._sasl_refused(str(exc))
        log.info("zookeeper SASL authenticated",
                 extra={"user": credentials.username, "peer": conn.peer})  # fmt: skip

    def _sasl_refused(self, reason: str) -> None:
        # As for a refused digest: the same password would be refused again.
        self._auth_failed = "sasl"
        self._set_state(ClientState.AUTH_FAILED)
        log.error("zookeeper SASL authentication failed: %s", reason,
                  extra={"session": self._session_id})  # fmt: skip
        if self._on_session is not None:
            self._on_session(AuthFailed("sasl"))

    @staticmethod
    def _watch_requests(conn: _Connection, requests: list[tuple[int, Record]]) -> bytearray:
        # All with setWatches' xid: the handshake waits for their answers by count.
        frames = bytearray()
        for opcode, request in requests:
            frames += conn.codec.send(Request(XID_SET_WATCHES, opcode, request))
            conn.set_watches_outstanding += 1
        return frames

    async def _handshake(self, conn: _Connection, frames: bytearray) -> None:
        await conn.stream.send_all(bytes(frames))
        while self._pending_auth or conn.set_watches_outstanding:
            event = await self._next_event(conn)
            if event is None:
                raise _HandshakeFailed("closed during the auth and watch replay")
            self._dispatch(conn, event)
            if self._auth_failed is not None:
                return

    async def _next_event(self, conn: _Connection) -> wire.Event | None:
        """The next event from the connection, reading as needed; None at EOF."""
        while True:
            event = conn.codec.next_event()
            if event is not None:
                return event
            data = await conn.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return None
            conn.codec.receive_data(bytes(data))

    async def _serve(self, conn: _Connection) -> None:
        """Run a connected connection until it is lost, then report the loss."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, conn, nursery.cancel_scope)
            await self._read_loop(conn)
            nursery.cancel_scope.cancel()
        # Only a lost connection gets here. On cancellation (or a callback's
        # exception) self._conn stays set, for _shutdown to close the session on.
        self._conn = None
        await _close(conn.stream)
        self._set_state(
            ClientState.AUTH_FAILED if self._auth_failed is not None else ClientState.CONNECTING
        )
        log.warning(
            "zookeeper connection lost: %s", conn.lost_reason,
            extra={"session": self._session_id, "peer": conn.peer},
        )  # fmt: skip
        self._fail_pending()
        if self._auth_failed is None and self._on_session is not None:
            self._on_session(Disconnected())

    async def _read_loop(self, conn: _Connection) -> None:
        """Read and dispatch until the connection is lost (conn.lost_reason says why)."""
        read_timeout = self._negotiated_timeout_ms * 2 / 3000
        try:
            while self._auth_failed is None:
                event = conn.codec.next_event()
                if event is not None:
                    self._dispatch(conn, event)
                    continue
                data: bytes | bytearray | None = None
                with trio.move_on_after(read_timeout):
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                if data is None:
                    conn.lost(f"nothing from the server for {read_timeout:.2f}s")
                    return
                if not data:
                    conn.lost("closed by the server")
                    return
                # A TLS stream hands out bytearrays; the codec keeps bytes.
                conn.codec.receive_data(data if isinstance(data, bytes) else bytes(data))
            conn.lost(f"credentials for scheme {self._auth_failed} refused")
        except ProtocolError as exc:
            conn.lost(f"protocol error: {exc}")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            conn.lost(f"read failed: {type(exc).__name__}: {exc}")

    async def _write_loop(self, conn: _Connection, scope: trio.CancelScope) -> None:
        ping_interval = self._negotiated_timeout_ms / 3000
        try:
            while True:
                if not conn.out:
                    with trio.move_on_after(ping_interval):
                        await conn.wake.wait()
                    if not conn.out:
                        conn.out += conn.codec.send(_PING)
                conn.wake = trio.Event()
                data = bytes(conn.out)
                conn.out.clear()
                conn.sending = True
                await conn.stream.send_all(data)
                conn.sending = False
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            LocalProtocolError,
        ) as exc:
            # Cancelling stops the reader too, rather than letting it wait for
            # a read timeout on a socket that can no longer carry requests.
            conn.lost(f"write failed: {type(exc).__name__}: {exc}")
            scope.cancel()

    def _dispatch(self, conn: _Connection, event: wire.Event) -> None:
        """Hand one frame to whoever waits for it: the heart of the ordering promise."""
        if isinstance(event, WatchNotified):
            self._watches.fired(event.event)
            if self._on_watch is not None:
                self._on_watch(event.event)
            return
        if not isinstance(event, ReplyReceived):
            raise ProtocolError("a second ConnectResponse")
        if event.xid == XID_PING:
            return
        if event.xid == XID_AUTH:
            self._auth_answered(event.err)
            return
        if event.xid == XID_SET_WATCHES:
            if conn.set_watches_outstanding <= 0:
                raise ProtocolError("setWatches reply without a setWatches")
            conn.set_watches_outstanding -= 1
            # NOWATCHER: a take-back whose one-shot watch an event used up.
            if event.err not in (Err.OK, Err.NOWATCHER):
                log.warning(
                    "watch replay refused: %s",
                    _as_err(event.err),
                    extra={"session": self._session_id, "peer": conn.peer},
                )
            return
        if event.xid == self._close_xid:
            self._close_answered = True
            return
        if not self._pending or self._pending[0].xid != event.xid:
            expected = self._pending[0].xid if self._pending else None
            raise ProtocolError(f"reply for xid {event.xid}, expected {expected}")
        pending = self._pending.popleft()
        if event.zxid > 0:
            self._last_zxid = max(self._last_zxid, event.zxid)
        body = decode_body(pending.opcode, event.err, event.body)
        if pending.watching is not None:
            self._watches.answered(pending.opcode, pending.watching, event.err)
        pending.on_reply(Reply(event.err, event.zxid, body))

    def _auth_answered(self, err: int) -> None:
        if not self._pending_auth:
            raise ProtocolError("auth reply without an auth request")
        auth = self._pending_auth.popleft()
        if err != Err.OK:
            # ZooKeeper closes the connection after AUTHFAILED; retrying with
            # the same credential would only fail again.
            self._auth_failed = auth.scheme
            self._set_state(ClientState.AUTH_FAILED)
            log.error(
                "zookeeper refused credentials",
                extra={"scheme": auth.scheme, "session": self._session_id},
            )
            if self._on_session is not None:
                self._on_session(AuthFailed(auth.scheme))
        if auth.on_reply is not None:
            auth.on_reply(err)

    def _fail_pending(self) -> None:
        """Answer every request the lost connection still owed, in submission order."""
        while self._pending:
            self._pending.popleft().on_reply(_CONNECTION_LOSS)
        self._fail_pending_auth()

    def _fail_pending_auth(self) -> None:
        while self._pending_auth:
            auth = self._pending_auth.popleft()
            if auth.on_reply is not None:
                auth.on_reply(Err.CONNECTIONLOSS)

    def _session_expired(self) -> None:
        log.warning("zookeeper session expired", extra={"session": self._session_id})
        announced = self._session_id == self._announced_session_id
        self._session_id = 0
        self._passwd = bytes(16)
        self._watches.clear()
        if announced and self._on_session is not None:
            self._on_session(Expired())

    async def _shutdown(self) -> None:
        """Close the session if there is one (bounded), fail what is pending, close."""
        conn = self._conn
        self._conn = None
        was_connected = self._state is ClientState.CONNECTED
        if self._state is not ClientState.AUTH_FAILED:
            self._set_state(ClientState.CLOSED)
        try:
            if conn is not None and was_connected and not conn.sending:
                await self._close_session(conn)
        finally:
            self._fail_pending()
            if conn is not None:
                await _close(conn.stream)

    async def _close_session(self, conn: _Connection) -> None:
        xid = self._next_xid()
        self._close_xid = xid
        with trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                # Whatever callers queued still goes out first: closing is the last request.
                frames = bytes(conn.out) + conn.codec.send(Request(xid, OpCode.CLOSE_SESSION))
                conn.out.clear()
                await conn.stream.send_all(frames)
                while not self._close_answered:
                    event = await self._next_event(conn)
                    if event is None:
                        break
                    self._dispatch(conn, event)
            except (
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                ProtocolError,
                LocalProtocolError,
            ):
                pass
        if self._close_answered:
            log.info("zookeeper session closed", extra={"session": self._session_id})


def _watching(opcode: int, request: Record | None) -> Record | None:
    """The request, if its answer can arm or remove a watch this session must track."""
    if opcode in _WATCHING_READS:
        return request if isinstance(request, PathWatchRequest) and request.watch else None
    if opcode in (OpCode.ADD_WATCH, OpCode.REMOVE_WATCHES):
        return request
    # Not a multiRead: ZooKeeper 3.8 drops the watch flag of the reads inside one.
    return None


def _encoded(conn: _Connection, request: Request) -> bytes:
    """The request's bytes; ConnectionLost once the connection broke (its codec
    refuses everything after a protocol error, and the session is reconnecting)."""
    try:
        return conn.codec.send(request)
    except LocalProtocolError as exc:
        raise ConnectionLost(f"connection unusable: {exc}") from None


def _peer(host: tuple[str, int]) -> str:
    return f"{host[0]}:{host[1]}"


async def _close(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)


@contextlib.contextmanager
def _single_error() -> Iterator[None]:
    """Unwrap a one-exception group from the connection's nursery.

    The writer task never raises, so a group from that nursery holds exactly
    the reader's exception (a callback's, or Cancelled); callers of run()
    should see that exception itself, not a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None


def split_connect_string(hosts: str) -> tuple[tuple[tuple[str, int], ...], str]:
    """``(host, port)`` pairs and the chroot ("" for none) of a ZooKeeper connect string:
    comma-separated ``host[:port]`` (port 2181 by default, IPv6 in brackets), then an optional
    chroot path, as ZooKeeper's and kazoo's clients take it. ValueError says what is wrong."""
    host_ports, slash, chroot = hosts.partition("/")
    servers: list[tuple[str, int]] = []
    for part in host_ports.split(","):
        part = part.strip()
        try:
            # urlsplit knows bracketed IPv6 and refuses a port out of range.
            parsed = urlsplit(f"zk://{part}")
            host, port = parsed.hostname, parsed.port
        except ValueError as exc:
            raise ValueError(f"bad host:port {part!r} ({exc})") from None
        if not host:
            raise ValueError(f"no host in {part!r}")
        servers.append((host, port or _DEFAULT_PORT))
    root = f"/{chroot}".rstrip("/") if slash else ""
    if root and any(segment in {"", ".", ".."} for segment in root.split("/")[1:]):
        raise ValueError(f"chroot {root!r} is not a znode path")
    return tuple(servers), root
