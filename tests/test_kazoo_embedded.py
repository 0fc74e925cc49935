"""kazoo 2.11 against ``zkgate serve`` on its embedded, durable tree.

What a kazoo user relies on, end to end through a real zkgate process: every
call of kazoo's basic API, watches (one-shot, ordered before the reads that
show the change), sessions (close, expiry, reconnect with id and password,
``setWatches`` replay), restarts (SIGTERM and SIGKILL) and the four-letter
words monitoring tools read. Where kazoo hides what the server sent, the raw
``tests.zkwire.WireClient`` checks the frames.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    RolledBackError,
    RuntimeInconsistency,
)
from kazoo.protocol.states import EventType, KazooState, WatchedEvent, ZnodeStat
from kazoo.security import (
    OPEN_ACL_UNSAFE,
    READ_ACL_UNSAFE,
    make_digest_acl,
    make_digest_acl_credential,
)

from dispatcher.zk.codec.protocol import XID_SET_WATCHES, CreateMode, Err, OpCode
from dispatcher.zk.codec.protocol import EventType as WireEvent
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE as WIRE_OPEN_ACL,
)
from dispatcher.zk.codec.records import (
    CreateRequest,
    CreateResponse,
    GetDataResponse,
    PathWatchRequest,
    SetDataRequest,
    SetWatches,
)
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, four_letter, wait_for
from tests.zkwire import WireClient

#: zkgate's tickTime in these tests: session timeouts are granted between
#: 400 ms and 4 s, so expiry tests take about a second.
TICK_MS = 200
EVENT_TIMEOUT = 10.0


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def server(zkgate_factory: ServerFactory[ZkgateServer]) -> ZkgateServer:
    """A fresh zkgate with a short tick, so that sessions expire quickly, answering
    every four-letter word (``stat`` is not whitelisted by default)."""
    return zkgate_factory(["--tick-ms", str(TICK_MS), "--4lw", "*"])


@contextmanager
def kazoo_client(server: ZkgateServer, timeout: float = 10.0) -> Iterator[KazooClient]:
    client = KazooClient(hosts=server.address, timeout=timeout)
    client.start(timeout=15.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def zk(server: ZkgateServer) -> Iterator[KazooClient]:
    with kazoo_client(server) as client:
        yield client


@contextmanager
def wire_client(server: ZkgateServer) -> Iterator[WireClient]:
    client = WireClient(server.host, server.port)
    try:
        yield client
    finally:
        client.close()


class EventLog:
    """Watch callbacks that put (label, event) on a queue, read with a deadline."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, WatchedEvent]] = queue.Queue()

    def watcher(self, label: str) -> Callable[[WatchedEvent], None]:
        def watch(event: WatchedEvent) -> None:
            self.events.put((label, event))

        return watch

    def next(self, timeout: float = EVENT_TIMEOUT) -> tuple[str, WatchedEvent]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch event within {timeout}s") from None

    def pending(self) -> list[tuple[str, WatchedEvent]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out


def mntr(server: ZkgateServer | ZooKeeperServer) -> dict[str, str]:
    lines = server.four_letter("mntr").splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def wire_create(client: WireClient, path: str, data: bytes, mode: CreateMode) -> str:
    reply = client.call(OpCode.CREATE, CreateRequest(path, data, WIRE_OPEN_ACL, int(mode)))
    assert reply.header.err == Err.OK, reply.header
    created = reply.decode(OpCode.CREATE)
    assert isinstance(created, CreateResponse)
    return created.path


# ---------------------------------------------------------------- basic API


def test_create_modes_and_sequential_names(zk: KazooClient, unique_path: str) -> None:
    base = unique_path
    assert zk.create(base, b"root") == base
    assert zk.create(f"{base}/plain", b"p") == f"{base}/plain"
    with pytest.raises(NodeExistsError):
        zk.create(f"{base}/plain", b"again")

    eph = zk.create(f"{base}/eph", b"e", ephemeral=True)
    assert zk.exists(eph).ephemeralOwner == zk.client_id[0]
    assert zk.exists(f"{base}/plain").ephemeralOwner == 0

    # Sequence numbers come from the parent's cversion: two creates came before.
    seq = zk.create(f"{base}/seq-", b"s", sequence=True)
    assert seq == f"{base}/seq-0000000002"
    eseq = zk.create(f"{base}/eseq-", b"es", ephemeral=True, sequence=True)
    assert eseq == f"{base}/eseq-0000000003"
    assert zk.exists(eseq).ephemeralOwner == zk.client_id[0]
    assert zk.exists(seq).ephemeralOwner == 0

    with pytest.raises(NoNodeError):
        zk.create(f"{base}/missing/child", b"x")
    deep = zk.create(f"{base}/a/b/c", b"deep", makepath=True)
    assert deep == f"{base}/a/b/c"
    assert zk.get(deep)[0] == b"deep"
    assert zk.get_children(f"{base}/a") == ["b"]

    assert sorted(zk.get_children(base)) == sorted(
        ["plain", "eph", "seq-0000000002", "eseq-0000000003", "a"]
    )


def test_create_with_acl_is_enforced(
    server: ZkgateServer, zk: KazooClient, unique_path: str
) -> None:
    acl = make_digest_acl("alice", "secret", all=True)
    zk.create(unique_path, b"private", acl=[acl])
    # The creator is not alice: the node is closed to it too, even getACL.
    assert zk.exists(unique_path) is not None  # exists needs no permission
    for denied in (
        lambda: zk.get(unique_path),
        lambda: zk.get_acls(unique_path),
        lambda: zk.get_children(unique_path),
        lambda: zk.set(unique_path, b"nope"),
        lambda: zk.create(f"{unique_path}/child"),
    ):
        with pytest.raises(NoAuthError):
            denied()

    with kazoo_client(server) as other:
        other.add_auth("digest", "bob:wrong")
        with pytest.raises(NoAuthError):
            other.get(unique_path)
        other.add_auth("digest", "alice:secret")
        assert other.get(unique_path)[0] == b"private"
        acls, stat = other.get_acls(unique_path)
        assert [(a.perms, a.id.scheme, a.id.id) for a in acls] == [
            (31, "digest", make_digest_acl_credential("alice", "secret"))
        ]
        assert stat.aversion == 0
        other.set(unique_path, b"by alice")
        other.create(f"{unique_path}/child")
    with pytest.raises(NoAuthError):
        zk.get(unique_path)


def test_create_include_data_returns_the_stat(zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path)
    path, stat = zk.create(f"{unique_path}/n", b"hello", include_data=True)
    assert path == f"{unique_path}/n"
    assert isinstance(stat, ZnodeStat)
    assert stat.version == 0 and stat.cversion == 0 and stat.aversion == 0
    assert stat.dataLength == 5 and stat.numChildren == 0
    assert stat.czxid == stat.mzxid == stat.pzxid
    assert stat.ephemeralOwner == 0
    assert stat == zk.exists(path)

    path, stat = zk.create(f"{unique_path}/e-", b"", ephemeral=True, sequence=True,
                           include_data=True)  # fmt: skip
    assert path == f"{unique_path}/e-0000000001"
    assert stat.ephemeralOwner == zk.client_id[0]
    assert stat.czxid > zk.exists(f"{unique_path}/n").czxid


def test_get_set_with_versions(zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path, b"v0")
    data, stat = zk.get(unique_path)
    assert data == b"v0" and stat.version == 0

    stat1 = zk.set(unique_path, b"v1", version=0)
    assert stat1.version == 1 and stat1.mzxid > stat.mzxid and stat1.czxid == stat.czxid
    with pytest.raises(BadVersionError):
        zk.set(unique_path, b"stale", version=0)
    assert zk.get(unique_path) == (b"v1", stat1)

    stat2 = zk.set(unique_path, b"v2")  # -1: any version
    assert stat2.version == 2
    assert zk.get(unique_path)[0] == b"v2"
    with pytest.raises(NoNodeError):
        zk.get(f"{unique_path}/missing")
    with pytest.raises(NoNodeError):
        zk.set(f"{unique_path}/missing", b"x")


def test_exists(zk: KazooClient, unique_path: str) -> None:
    assert zk.exists(unique_path) is None
    zk.create(unique_path, b"abc")
    stat = zk.exists(unique_path)
    assert stat is not None and stat.dataLength == 3 and stat.numChildren == 0
    zk.create(f"{unique_path}/c")
    stat = zk.exists(unique_path)
    assert stat.numChildren == 1 and stat.cversion == 1


def test_get_children_with_and_without_data(zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path)
    assert zk.get_children(unique_path) == []
    for name in ("b", "a", "c"):
        zk.create(f"{unique_path}/{name}")
    assert sorted(zk.get_children(unique_path)) == ["a", "b", "c"]

    children, stat = zk.get_children(unique_path, include_data=True)  # getChildren2
    assert sorted(children) == ["a", "b", "c"]
    assert stat.numChildren == 3 and stat.cversion == 3
    assert stat == zk.exists(unique_path)
    with pytest.raises(NoNodeError):
        zk.get_children(f"{unique_path}/missing")


def test_delete_variants(zk: KazooClient, unique_path: str) -> None:
    zk.create(f"{unique_path}/x/y/z", b"", makepath=True)
    zk.set(f"{unique_path}/x/y/z", b"changed")

    with pytest.raises(NotEmptyError):
        zk.delete(f"{unique_path}/x")
    with pytest.raises(BadVersionError):
        zk.delete(f"{unique_path}/x/y/z", version=0)
    zk.delete(f"{unique_path}/x/y/z", version=1)
    assert zk.exists(f"{unique_path}/x/y/z") is None
    with pytest.raises(NoNodeError):
        zk.delete(f"{unique_path}/x/y/z")

    zk.create(f"{unique_path}/x/y/w/v", b"", makepath=True)
    zk.delete(f"{unique_path}/x", recursive=True)
    assert zk.exists(f"{unique_path}/x") is None
    assert zk.get_children(unique_path) == []


def test_sync(zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path)
    assert zk.sync(unique_path) == unique_path


def test_get_and_set_acls(server: ZkgateServer, zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path, b"data")
    acls, stat = zk.get_acls(unique_path)
    assert list(acls) == OPEN_ACL_UNSAFE and stat.aversion == 0

    with pytest.raises(BadVersionError):
        zk.set_acls(unique_path, READ_ACL_UNSAFE, version=3)
    stat = zk.set_acls(unique_path, READ_ACL_UNSAFE, version=0)
    assert stat.aversion == 1 and stat.version == 0
    acls, _ = zk.get_acls(unique_path)
    assert [(a.perms, a.id.scheme, a.id.id) for a in acls] == [(1, "world", "anyone")]
    assert zk.get(unique_path)[0] == b"data"
    with pytest.raises(NoAuthError):
        zk.set(unique_path, b"denied")
    with pytest.raises(NoAuthError):
        zk.set_acls(unique_path, OPEN_ACL_UNSAFE)  # ADMIN is gone too

    # "auth" ACLs name the caller's own authenticated ids.
    zk.add_auth("digest", "carol:pw")
    zk.create(f"{unique_path}-auth", b"x", acl=[make_digest_acl("carol", "pw", all=True)])
    with kazoo_client(server) as other:
        with pytest.raises(NoAuthError):
            other.get(f"{unique_path}-auth")
        other.add_auth("digest", "carol:pw")
        assert other.get(f"{unique_path}-auth")[0] == b"x"


def test_transaction_commit(zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path)
    zk.create(f"{unique_path}/old", b"old")
    zk.create(f"{unique_path}/keep", b"k0")

    txn = zk.transaction()
    txn.create(f"{unique_path}/new", b"new")
    txn.set_data(f"{unique_path}/keep", b"k1", version=0)
    txn.check(f"{unique_path}/keep", 1)
    txn.delete(f"{unique_path}/old")
    results = txn.commit()

    assert results[0] == f"{unique_path}/new"
    assert isinstance(results[1], ZnodeStat) and results[1].version == 1
    assert results[2] is True and results[3] is True
    assert sorted(zk.get_children(unique_path)) == ["keep", "new"]
    data, stat = zk.get(f"{unique_path}/keep")
    assert data == b"k1"
    # One transaction, one zxid.
    assert stat.mzxid == zk.exists(f"{unique_path}/new").czxid


def test_failing_transaction_changes_nothing(zk: KazooClient, unique_path: str) -> None:
    zk.create(unique_path)
    zk.create(f"{unique_path}/stays", b"s")
    before = zk.get_children(unique_path, include_data=True)

    txn = zk.transaction()
    txn.create(f"{unique_path}/new", b"new")
    txn.set_data(f"{unique_path}/missing", b"x")
    txn.delete(f"{unique_path}/stays")
    results = txn.commit()

    assert [type(r) for r in results] == [RolledBackError, NoNodeError, RuntimeInconsistency]
    assert zk.exists(f"{unique_path}/new") is None
    assert zk.get(f"{unique_path}/stays")[0] == b"s"
    assert zk.get_children(unique_path, include_data=True) == before

    txn = zk.transaction()
    txn.check(f"{unique_path}/stays", 7)
    txn.set_data(f"{unique_path}/stays", b"changed")
    results = txn.commit()
    assert [type(r) for r in results] == [BadVersionError, RuntimeInconsistency]
    assert zk.get(f"{unique_path}/stays")[0] == b"s"


# --------------------------------------------------------------------- watches


def test_data_watch_fires_once(zk: KazooClient, server: ZkgateServer, unique_path: str) -> None:
    log = EventLog()
    zk.create(unique_path, b"0")
    assert zk.get(unique_path, watch=log.watcher("first"))[0] == b"0"
    with kazoo_client(server) as writer:
        writer.set(unique_path, b"1")
        label, event = log.next()
        assert (label, event.type, event.path) == ("first", EventType.CHANGED, unique_path)

        writer.set(unique_path, b"2")  # no watch registered any more
        # A fresh watch and a third change: had the second change fired, its
        # event would have been delivered before this one.
        zk.get(unique_path, watch=log.watcher("second"))
        writer.set(unique_path, b"3")
    label, event = log.next()
    assert (label, event.type, event.path) == ("second", EventType.CHANGED, unique_path)
    assert log.pending() == []


def test_data_watch_is_one_shot_on_the_wire(server: ZkgateServer, unique_path: str) -> None:
    with wire_client(server) as watcher, wire_client(server) as writer:
        watcher.connect()
        writer.connect()
        wire_create(writer, unique_path, b"0", CreateMode.PERSISTENT)
        assert watcher.call(OpCode.GET_DATA, PathWatchRequest(unique_path, True)).header.err == 0
        for value in (b"1", b"2"):
            reply = writer.call(OpCode.SET_DATA, SetDataRequest(unique_path, value, -1))
            assert reply.header.err == Err.OK
        reply = watcher.call(OpCode.GET_DATA, PathWatchRequest(unique_path, False))
        assert [(e.type, e.path) for _, e in reply.events] == [
            (WireEvent.NODE_DATA_CHANGED, unique_path)
        ]
        assert all(header.xid == -1 for header, _ in reply.events)


def test_watch_event_arrives_before_the_read_that_shows_the_change(
    server: ZkgateServer, unique_path: str
) -> None:
    with wire_client(server) as watcher, wire_client(server) as writer:
        watcher.connect()
        writer.connect()
        wire_create(writer, unique_path, b"old", CreateMode.PERSISTENT)
        watcher.call(OpCode.GET_DATA, PathWatchRequest(unique_path, True))
        watcher.call(OpCode.GET_CHILDREN, PathWatchRequest(unique_path, True))

        writer.call(OpCode.SET_DATA, SetDataRequest(unique_path, b"new", -1))
        reply = watcher.call(OpCode.GET_DATA, PathWatchRequest(unique_path, False))
        body = reply.decode(OpCode.GET_DATA)
        assert isinstance(body, GetDataResponse) and body.data == b"new"
        assert [(e.type, e.path) for _, e in reply.events] == [
            (WireEvent.NODE_DATA_CHANGED, unique_path)
        ]

        wire_create(writer, f"{unique_path}/child", b"", CreateMode.PERSISTENT)
        reply = watcher.call(OpCode.GET_CHILDREN, PathWatchRequest(unique_path, False))
        assert [(e.type, e.path) for _, e in reply.events] == [
            (WireEvent.NODE_CHILDREN_CHANGED, unique_path)
        ]


def test_exists_watch_on_missing_node_fires_created(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    log = EventLog()
    assert zk.exists(unique_path, watch=log.watcher("exists")) is None
    with kazoo_client(server) as writer:
        writer.create(unique_path, b"born")
    label, event = log.next()
    assert (label, event.type, event.path) == ("exists", EventType.CREATED, unique_path)
    assert zk.get(unique_path)[0] == b"born"


def test_child_watch_fires_on_create_and_delete(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    log = EventLog()
    zk.create(unique_path)
    assert zk.get_children(unique_path, watch=log.watcher("create")) == []
    with kazoo_client(server) as writer:
        writer.create(f"{unique_path}/kid")
        label, event = log.next()
        assert (label, event.type, event.path) == ("create", EventType.CHILD, unique_path)

        assert zk.get_children(unique_path, watch=log.watcher("delete")) == ["kid"]
        writer.set(f"{unique_path}/kid", b"data changes are not child changes")
        writer.delete(f"{unique_path}/kid")
    label, event = log.next()
    assert (label, event.type, event.path) == ("delete", EventType.CHILD, unique_path)
    assert log.pending() == []


def test_delete_fires_node_deleted_to_data_and_child_watchers(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    log = EventLog()
    zk.create(unique_path)
    zk.get(unique_path, watch=log.watcher("data"))
    zk.get_children(unique_path, watch=log.watcher("child"))
    with kazoo_client(server) as writer:
        writer.delete(unique_path)
    got: dict[str, WatchedEvent] = {}
    for _ in range(2):
        label, event = log.next()
        got[label] = event
    assert set(got) == {"data", "child"}
    for event in got.values():
        assert (event.type, event.path) == (EventType.DELETED, unique_path)


# --------------------------------------------------------------------- sessions


def test_ephemerals_go_when_the_session_closes(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    zk.create(unique_path)
    log = EventLog()
    owner = KazooClient(hosts=server.address, timeout=10.0)
    owner.start(timeout=15.0)
    try:
        owner.create(f"{unique_path}/e", b"", ephemeral=True)
        owner.create(f"{unique_path}/es-", b"", ephemeral=True, sequence=True)
        assert zk.exists(f"{unique_path}/e", watch=log.watcher("e")) is not None
    finally:
        owner.stop()
        owner.close()
    label, event = log.next()
    assert (label, event.type, event.path) == ("e", EventType.DELETED, f"{unique_path}/e")
    assert zk.get_children(unique_path) == []


def test_close_session_is_answered_before_the_connection_closes(
    server: ZkgateServer, unique_path: str
) -> None:
    """ZooKeeper 3.8 answers closeSession (xid, close txn's zxid, err 0), then closes."""
    with wire_client(server) as client:
        client.connect()
        wire_create(client, unique_path, b"", CreateMode.EPHEMERAL)
        reply = client.call(OpCode.CLOSE_SESSION)
        assert reply.header.err == Err.OK
        assert reply.header.zxid > 0
        assert client.read_frame() is None


def test_kazoo_stop_is_a_clean_close(server: ZkgateServer) -> None:
    """kazoo sees CONNECTED then LOST, as with ZooKeeper, not a dropped connection."""
    states: list[str] = []
    client = KazooClient(hosts=server.address, timeout=10.0)
    client.add_listener(states.append)
    client.start(timeout=15.0)
    client.stop()
    client.close()
    assert states == [KazooState.CONNECTED, KazooState.LOST]


def test_expired_session_deletes_its_ephemerals_and_fires_watches(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    zk.create(unique_path)
    log = EventLog()
    timeout_ms = 4 * TICK_MS
    with wire_client(server) as raw:
        session = raw.connect(timeout_ms=timeout_ms)
        assert session.timeout == timeout_ms
        path = wire_create(raw, f"{unique_path}/lease", b"", CreateMode.EPHEMERAL)
        assert zk.exists(path, watch=log.watcher("lease")).ephemeralOwner == session.session_id
        closed_at = time.monotonic()
    # Socket closed without closeSession: the session lives on until it times out.
    label, event = log.next()
    elapsed = time.monotonic() - closed_at
    assert (label, event.type, event.path) == ("lease", EventType.DELETED, path)
    assert elapsed >= timeout_ms / 1000 * 0.9, "expired before its timeout"
    assert zk.exists(path) is None
    assert zk.get_children(unique_path) == []


def test_reconnect_with_session_id_and_password_keeps_ephemerals(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    zk.create(unique_path)
    timeout_ms = 4000
    with wire_client(server) as first:
        session = first.connect(timeout_ms=timeout_ms)
        path = wire_create(first, f"{unique_path}/e", b"", CreateMode.EPHEMERAL)
    # Closed without closeSession: the session waits for a reconnect.

    with wire_client(server) as second:
        resumed = second.connect(
            timeout_ms=timeout_ms, session_id=session.session_id, passwd=session.passwd
        )
        assert resumed.session_id == session.session_id
        assert resumed.passwd == session.passwd
        assert resumed.timeout == timeout_ms
        assert zk.exists(path).ephemeralOwner == session.session_id
        # The resumed connection works, and its session owns the node.
        reply = second.call(OpCode.GET_DATA, PathWatchRequest(path, False))
        assert reply.header.err == Err.OK

        # A third connection moves the session; the second one is closed.
        with wire_client(server) as third:
            again = third.connect(
                timeout_ms=timeout_ms, session_id=session.session_id, passwd=session.passwd
            )
            assert again.session_id == session.session_id
            assert second.read_frame() is None
            assert zk.exists(path) is not None
            assert third.call(OpCode.CLOSE_SESSION).header.err == Err.OK
    wait_for(lambda: zk.exists(path) is None, timeout=EVENT_TIMEOUT, message="ephemeral gone")


def test_reconnect_with_wrong_password_is_refused(
    zk: KazooClient, server: ZkgateServer, unique_path: str
) -> None:
    zk.create(unique_path)
    with wire_client(server) as owner:
        session = owner.connect(timeout_ms=4000)
        path = wire_create(owner, f"{unique_path}/e", b"", CreateMode.EPHEMERAL)
        with wire_client(server) as intruder:
            wrong = bytes(b ^ 0xFF for b in session.passwd)
            refused = intruder.connect(timeout_ms=4000, session_id=session.session_id, passwd=wrong)
            assert (refused.session_id, refused.timeout) == (0, 0)
            assert refused.passwd == bytes(16)
            assert intruder.read_frame() is None
    # The session itself is untouched: its ephemeral stays and the right
    # password still resumes it. (ZooKeeper 3.8.0 also drops the owner's
    # connection on a wrong-password attempt; zkgate need not copy that.)
    assert zk.exists(path).ephemeralOwner == session.session_id
    with wire_client(server) as owner:
        resumed = owner.connect(
            timeout_ms=4000, session_id=session.session_id, passwd=session.passwd
        )
        assert resumed.session_id == session.session_id
        assert owner.call(OpCode.CLOSE_SESSION).header.err == Err.OK
    assert zk.exists(path) is None


def test_set_watches_replays_watches_after_reconnect(
    server: ZkgateServer, unique_path: str
) -> None:
    with wire_client(server) as writer:
        writer.connect()
        wire_create(writer, unique_path, b"0", CreateMode.PERSISTENT)
        wire_create(writer, f"{unique_path}/kid", b"", CreateMode.PERSISTENT)

        with wire_client(server) as first:
            session = first.connect(timeout_ms=4000)
            reply = first.call(OpCode.GET_DATA, PathWatchRequest(unique_path, True))
            last_zxid = reply.header.zxid

        with wire_client(server) as second:
            second.connect(
                timeout_ms=4000, session_id=session.session_id, passwd=session.passwd,
                last_zxid=last_zxid,
            )  # fmt: skip
            watches = SetWatches(last_zxid, (unique_path,), (f"{unique_path}/new",),
                                 (unique_path,))  # fmt: skip
            reply = second.call(OpCode.SET_WATCHES, watches, xid=XID_SET_WATCHES)
            assert reply.header.err == Err.OK
            assert reply.events == (), "nothing changed since last_zxid"

            writer.call(OpCode.SET_DATA, SetDataRequest(unique_path, b"1", -1))
            wire_create(writer, f"{unique_path}/new", b"", CreateMode.PERSISTENT)
            reply = second.call(OpCode.EXISTS, PathWatchRequest(unique_path, False))
            assert [(e.type, e.path) for _, e in reply.events] == [
                (WireEvent.NODE_DATA_CHANGED, unique_path),
                (WireEvent.NODE_CREATED, f"{unique_path}/new"),
                (WireEvent.NODE_CHILDREN_CHANGED, unique_path),
            ]


def test_set_watches_with_older_zxid_fires_at_once(server: ZkgateServer, unique_path: str) -> None:
    with wire_client(server) as writer, wire_client(server) as watcher:
        writer.connect()
        watcher.connect()
        wire_create(writer, unique_path, b"0", CreateMode.PERSISTENT)
        seen = watcher.call(OpCode.EXISTS, PathWatchRequest(unique_path, False)).header.zxid
        # Changes the watcher has not seen: data, a child, a deletion, a creation.
        writer.call(OpCode.SET_DATA, SetDataRequest(unique_path, b"1", -1))
        wire_create(writer, f"{unique_path}/kid", b"", CreateMode.PERSISTENT)
        wire_create(writer, f"{unique_path}/born", b"", CreateMode.PERSISTENT)
        watches = SetWatches(
            seen,
            (unique_path, f"{unique_path}/gone"),
            (f"{unique_path}/born",),
            (unique_path,),
        )
        reply = watcher.call(OpCode.SET_WATCHES, watches, xid=XID_SET_WATCHES)
        assert reply.header.err == Err.OK
        assert sorted((e.type, e.path) for _, e in reply.events) == sorted(
            [
                (WireEvent.NODE_DATA_CHANGED, unique_path),
                (WireEvent.NODE_DELETED, f"{unique_path}/gone"),
                (WireEvent.NODE_CREATED, f"{unique_path}/born"),
                (WireEvent.NODE_CHILDREN_CHANGED, unique_path),
            ]
        )
        # Fired watches are used up: a further change reaches nobody.
        writer.call(OpCode.SET_DATA, SetDataRequest(unique_path, b"2", -1))
        reply = watcher.call(OpCode.EXISTS, PathWatchRequest(unique_path, False))
        assert reply.events == ()


def test_kazoo_after_a_restart_sees_session_expired_and_keeps_data(
    server: ZkgateServer, unique_path: str
) -> None:
    """Sessions do not survive a zkgate restart; persistent data does."""
    states: queue.Queue[str] = queue.Queue()
    client = KazooClient(hosts=server.address, timeout=10.0)
    client.add_listener(states.put)
    client.start(timeout=15.0)
    try:
        assert states.get(timeout=EVENT_TIMEOUT) == KazooState.CONNECTED
        old_session = client.client_id[0]
        client.create(unique_path, b"persistent")
        client.create(f"{unique_path}/e", b"", ephemeral=True)

        server.stop()
        server.start()

        seen = [states.get(timeout=EVENT_TIMEOUT) for _ in range(3)]
        assert seen == [KazooState.SUSPENDED, KazooState.LOST, KazooState.CONNECTED]
        wait_for(lambda: client.connected, timeout=EVENT_TIMEOUT, message="kazoo reconnected")
        assert client.client_id[0] != old_session
        assert client.get(unique_path)[0] == b"persistent"
        assert client.exists(f"{unique_path}/e") is None
    finally:
        client.stop()
        client.close()


# ------------------------------------------------------------------- restarts


def _read_tree(client: KazooClient, root: str) -> dict[str, tuple[object, ...]]:
    """Every node under ``root``: data, stat, sorted children and ACLs."""
    tree: dict[str, tuple[object, ...]] = {}
    pending = [root]
    while pending:
        path = pending.pop()
        data, stat = client.get(path)
        children = sorted(client.get_children(path))
        acls, _ = client.get_acls(path)
        tree[path] = (data, stat, children, [(a.perms, a.id.scheme, a.id.id) for a in acls])
        pending += [f"{path}/{child}" for child in children]
    return tree


def test_restart_keeps_data_stats_and_acls(server: ZkgateServer, unique_path: str) -> None:
    secret = make_digest_acl("dave", "pw", all=True)
    with kazoo_client(server) as zk:
        zk.add_auth("digest", "dave:pw")
        zk.create(f"{unique_path}/config", b'{"a": 1}', makepath=True)
        zk.set(f"{unique_path}/config", b'{"a": 2}')
        zk.set(f"{unique_path}/config", b'{"a": 3}')
        zk.create(f"{unique_path}/queue")
        for index in range(3):
            zk.create(f"{unique_path}/queue/item-", str(index).encode(), sequence=True)
        zk.delete(f"{unique_path}/queue/item-0000000001")
        zk.create(f"{unique_path}/private", b"secret", acl=[secret])
        zk.set_acls(f"{unique_path}/config", [*READ_ACL_UNSAFE, secret])
        zk.create(f"{unique_path}/empty", None)
        zk.create(f"{unique_path}/leases")
        before = _read_tree(zk, unique_path)
        old_session = zk.client_id[0]
        last_zxid = zk.last_zxid
        with wire_client(server) as raw:
            raw_session = raw.connect()
            wire_create(raw, f"{unique_path}/leases/l", b"", CreateMode.EPHEMERAL)
            server.stop()  # SIGTERM, with the session and its ephemeral alive
    server.start()

    with kazoo_client(server) as zk:
        zk.add_auth("digest", "dave:pw")
        after = _read_tree(zk, unique_path)
        leases = f"{unique_path}/leases"
        assert after[leases][2] == [], "ephemerals must not survive a restart"
        assert set(after) == set(before) - {f"{leases}/l"}
        for path, (data, stat, children, acl) in before.items():
            if path.startswith(leases):
                continue
            assert after[path] == (data, stat, children, acl), path
        lease_stat, stat_before = after[leases][1], before[leases][1]
        assert isinstance(lease_stat, ZnodeStat) and isinstance(stat_before, ZnodeStat)
        assert lease_stat.czxid == stat_before.czxid

        # Sequence numbers continue from the parent's counter.
        # (ZooKeeper 3.8 numbers them by children created, not by cversion.)
        created = zk.create(f"{unique_path}/queue/item-", b"", sequence=True)
        assert created == f"{unique_path}/queue/item-0000000003"
        new_stat = zk.exists(created)
        assert new_stat.czxid > last_zxid
        assert zk.client_id[0] not in (old_session, raw_session.session_id)


def test_acknowledged_writes_survive_sigkill(server: ZkgateServer, unique_path: str) -> None:
    nodes = [f"{unique_path}/n{index}" for index in range(20)]
    sessions = set()
    with kazoo_client(server) as zk:
        sessions.add(zk.client_id[0])
        zk.create(unique_path)
        for path in nodes:
            zk.create(path, b"")
        pending = [
            (path, value, zk.set_async(path, f"{path}={value}".encode()))
            for value in range(10)
            for path in nodes
        ]
        acknowledged: dict[str, tuple[bytes, int]] = {}
        for path, value, result in pending:
            stat = result.get(timeout=30)
            acknowledged[path] = (f"{path}={value}".encode(), stat.version)
        created = [zk.create(f"{unique_path}/s-", b"", sequence=True) for _ in range(5)]
        highest_zxid = zk.last_zxid
        server.kill()  # no shutdown: only what was committed before each reply counts
    assert len(pending) == 200

    server.start()
    with kazoo_client(server) as zk:
        for path, (value, version) in acknowledged.items():
            data, stat = zk.get(path)
            assert (data, stat.version) == (value, version) == (value, 10), path
        for path in created:
            assert zk.exists(path) is not None
        stat = zk.set(nodes[0], b"after restart")
        assert stat.mzxid > highest_zxid
        assert zk.client_id[0] not in sessions


# --------------------------------------------------------------- four-letter words

#: The mntr keys monitoring tools (Prometheus exporters, zk-shell, checks) read.
MNTR_KEYS = {
    "zk_version",
    "zk_avg_latency",
    "zk_min_latency",
    "zk_max_latency",
    "zk_packets_received",
    "zk_packets_sent",
    "zk_num_alive_connections",
    "zk_outstanding_requests",
    "zk_server_state",
    "zk_znode_count",
    "zk_watch_count",
    "zk_ephemerals_count",
    "zk_approximate_data_size",
}
MNTR_TEXT_KEYS = {"zk_version", "zk_server_state"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_ruok_and_srvr(server: ZkgateServer, zk: KazooClient, unique_path: str) -> None:
    assert four_letter(server.host, server.port, "ruok") == "imok"
    zk.create(unique_path)
    srvr = server.four_letter("srvr")
    assert srvr.startswith("Zookeeper version: 3.8.")
    assert "Mode: standalone\n" in srvr
    counts = [line for line in srvr.splitlines() if line.startswith("Node count:")]
    assert len(counts) == 1
    assert int(counts[0].split(":")[1]) == int(mntr(server)["zk_znode_count"])


def test_mntr_keys_match_zookeeper(server: ZkgateServer, zookeeper: ZooKeeperServer) -> None:
    ours, theirs = mntr(server), mntr(zookeeper)
    assert set(theirs) >= MNTR_KEYS, "the key list itself must be ZooKeeper's"
    assert set(ours) >= MNTR_KEYS
    for key in MNTR_KEYS - MNTR_TEXT_KEYS:
        assert _is_number(theirs[key]), (key, theirs[key])  # numeric in ZooKeeper...
        assert _is_number(ours[key]), (key, ours[key])  # ...so numeric here
    assert ours["zk_server_state"] == theirs["zk_server_state"] == "standalone"
    assert ours["zk_version"].startswith("3.8.")


def test_mntr_counts_follow_nodes_watches_and_ephemerals(
    server: ZkgateServer, zk: KazooClient, unique_path: str
) -> None:
    start = {key: int(value) for key, value in mntr(server).items() if value.isdigit()}
    zk.create(unique_path, b"x" * 100)
    zk.create(f"{unique_path}/e1", b"", ephemeral=True)
    zk.create(f"{unique_path}/e2", b"", ephemeral=True)
    zk.exists(unique_path, watch=lambda event: None)
    zk.get_children(unique_path, watch=lambda event: None)
    now = mntr(server)
    assert int(now["zk_znode_count"]) == start["zk_znode_count"] + 3
    assert int(now["zk_ephemerals_count"]) == start["zk_ephemerals_count"] + 2
    assert int(now["zk_watch_count"]) == start["zk_watch_count"] + 2
    assert int(now["zk_approximate_data_size"]) >= start["zk_approximate_data_size"] + 100
    assert int(now["zk_num_alive_connections"]) >= 1
    assert int(now["zk_packets_received"]) > start["zk_packets_received"]

    zk.delete(f"{unique_path}/e1")  # fires and uses up the child watch
    now = mntr(server)
    assert int(now["zk_znode_count"]) == start["zk_znode_count"] + 2
    assert int(now["zk_ephemerals_count"]) == start["zk_ephemerals_count"] + 1
    assert int(now["zk_watch_count"]) == start["zk_watch_count"] + 1


def test_stat_lists_connected_clients(server: ZkgateServer, zk: KazooClient) -> None:
    with wire_client(server) as raw:
        raw.connect()
        raw.call(OpCode.PING)
        local_port = raw.sock.getsockname()[1]
        stat = server.four_letter("stat")
        assert "Clients:\n" in stat
        assert f"/127.0.0.1:{local_port}[" in stat
        assert "Mode: standalone\n" in stat
        client_lines = [line for line in stat.splitlines() if line.startswith(" /")]
        assert len(client_lines) >= 2  # the raw client and kazoo (ZooKeeper lists stat's own)
    wait_for(
        lambda: f"/127.0.0.1:{local_port}[" not in server.four_letter("stat"),
        timeout=EVENT_TIMEOUT,
        message="a closed client leaves stat's list",
    )
