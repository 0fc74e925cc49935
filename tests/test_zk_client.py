"""The trio ZooKeeper client session against real ZooKeeper 3.8.

What the mirror backend relies on: requests and their error codes as kazoo
sees them, pipelining with replies in order, the ordering promise (a watch
event reaches on_watch before the reply to any request the server processed
after the change), persistent-recursive watches that survive a server crash
on a resumed session, expiry followed by a new session, credentials replayed
on every connection, and the failure paths (CONNECTIONLOSS for what was in
flight, ConnectionLost while disconnected, an oversized frame closing the
connection, closeSession on cancellation).
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Generic, TypeVar

import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.security import make_digest_acl

from dispatcher.zk.client import (
    OPEN_ACL,
    AuthFailed,
    ClientState,
    Connected,
    ConnectionLost,
    Disconnected,
    Expired,
    KeeperError,
    Overloaded,
    Reply,
    SessionEvent,
    ZooKeeperClient,
)
from dispatcher.zk.codec import client_connection as wire
from dispatcher.zk.codec.protocol import (
    DEFAULT_MAX_BUFFER,
    XID_NOTIFICATION,
    CreateMode,
    Err,
    EventType,
    OpCode,
)
from dispatcher.zk.codec.records import (
    ACL,
    ConnectRequest,
    ConnectResponse,
    CreateRequest,
    CreateResponse,
    GetDataResponse,
    Id,
    MultiReadRequest,
    PathWatchRequest,
    Stat,
    WatcherEvent,
    WatchesRequest,
    encode,
)
from tests.partition import Partition
from tests.servers import ServerFactory, ZooKeeperServer, wait_for

#: Generous bound for anything that waits on a server.
TIMEOUT = 15.0


# ---------------------------------------------------------------------- helpers


T = TypeVar("T")


class Recorder(Generic[T]):
    """Collects callback arguments; a test can wait until they satisfy a condition."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = trio.Event()

    def __call__(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[list[T]], object], what: str) -> None:
        try:
            with trio.fail_after(TIMEOUT):
                while not predicate(self.items):
                    await self._changed.wait()
        except trio.TooSlowError:
            raise AssertionError(f"{what} not seen; got {self.items}") from None


class Session:
    """A running ZooKeeperClient with its recorded watch and session events."""

    def __init__(self, client: ZooKeeperClient, watches: Recorder[WatcherEvent],
                 sessions: Recorder[SessionEvent]) -> None:  # fmt: skip
        self.client = client
        self.watches = watches
        self.sessions = sessions

    async def wait_session(self, event: SessionEvent, occurrence: int = 1) -> None:
        await self.sessions.wait_for(
            lambda items: items.count(event) >= occurrence, f"{event} #{occurrence}"
        )


@asynccontextmanager
async def session(
    hosts: list[tuple[str, int]],
    also_on_watch: Callable[[WatcherEvent], None] | None = None,
    **options: object,
) -> AsyncIterator[Session]:
    """A client running in its own nursery, connected; cancelled (closing the
    session) at the end of the block."""
    watches: Recorder[WatcherEvent] = Recorder()
    sessions: Recorder[SessionEvent] = Recorder()

    def on_watch(event: WatcherEvent) -> None:
        watches(event)
        if also_on_watch is not None:
            also_on_watch(event)

    options.setdefault("session_timeout_ms", 4000)
    options.setdefault("max_backoff", 0.2)
    client = ZooKeeperClient(hosts, on_watch=on_watch, on_session=sessions, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(TIMEOUT):
            await client.wait_connected()
        yield Session(client, watches, sessions)
        nursery.cancel_scope.cancel()


def address(server: ZooKeeperServer) -> list[tuple[str, int]]:
    return [(server.host, server.port)]


@contextmanager
def kazoo(server: ZooKeeperServer, **options: object) -> Iterator[KazooClient]:
    client = KazooClient(hosts=server.address, timeout=4.0, **options)
    client.start(timeout=TIMEOUT)
    try:
        yield client
    finally:
        client.stop()
        client.close()


#: For clients that live through a server restart: ZooKeeper 3.8.0 may leave a
#: handshake that arrives while it is starting unanswered, and a shorter
#: handshake timeout gets the client past that well within the session timeout.
RESTART_OPTIONS: dict[str, object] = {"connect_timeout": 1.0}


async def restart_after_kill(server: ZooKeeperServer) -> None:
    """kill -9, then start again on the same data dir and port (in a thread: the
    client under test keeps running meanwhile)."""
    server.kill()
    await trio.to_thread.run_sync(server.start)


# ------------------------------------------------------------------------ tests


async def test_crud_round_trips(zookeeper: ZooKeeperServer, unique_path: str) -> None:
    async with session(address(zookeeper)) as s:
        zk = s.client
        root = unique_path
        assert await zk.create(root, b"root") == root
        assert await zk.create(f"{root}/a", b"one") == f"{root}/a"
        data, stat = await zk.get_data(f"{root}/a")
        assert (data, stat.version, stat.data_length) == (b"one", 0, 3)
        stat = await zk.set_data(f"{root}/a", b"two", version=0)
        assert stat.version == 1
        assert (await zk.get_data(f"{root}/a"))[0] == b"two"
        seq = await zk.create(f"{root}/s-", flags=CreateMode.PERSISTENT_SEQUENTIAL)
        assert seq == f"{root}/s-0000000001"
        assert sorted(await zk.get_children(root)) == ["a", "s-0000000001"]
        exists = await zk.exists(f"{root}/a")
        assert exists is not None and exists.version == 1
        await zk.sync(root)
        await zk.delete(f"{root}/a", version=1)
        assert await zk.exists(f"{root}/a") is None
        assert zk.last_zxid > 0


async def test_error_codes_equal_kazoos(zookeeper: ZooKeeperServer, unique_path: str) -> None:
    root = unique_path
    async with session(address(zookeeper)) as s:
        zk = s.client
        await zk.create(root)
        await zk.create(f"{root}/full")
        await zk.create(f"{root}/full/child")
        await zk.create(f"{root}/eph", flags=CreateMode.EPHEMERAL)
        calls: list[tuple[str, tuple[object, ...]]] = [
            ("get_data", (f"{root}/missing",)),
            ("get_children", (f"{root}/missing",)),
            ("create", (f"{root}/full", b"")),
            ("create", (f"{root}/missing/child", b"")),
            ("create", (f"{root}/eph/child", b"")),
            ("set_data", (f"{root}/full", b"x", 7)),
            ("set_data", (f"{root}/missing", b"x")),
            ("delete", (f"{root}/full",)),
            ("delete", (f"{root}/full/child", 3)),
            ("delete", (f"{root}/missing",)),
        ]
        ours: list[int] = []
        for method, args in calls:
            with pytest.raises(KeeperError) as caught:
                await getattr(zk, method)(*args)
            ours.append(int(caught.value.err))

        def kazoo_codes() -> list[int]:
            codes = []
            with kazoo(zookeeper) as kz:
                for method, args in calls:
                    name = {"get_data": "get", "set_data": "set"}.get(method, method)
                    try:
                        getattr(kz, name)(*args)
                    except KazooException as exc:
                        codes.append(exc.code)  # type: ignore[attr-defined]
            return codes

        theirs = await trio.to_thread.run_sync(kazoo_codes)
    assert ours == theirs
    assert ours == [
        Err.NONODE, Err.NONODE, Err.NODEEXISTS, Err.NONODE, Err.NOCHILDRENFOREPHEMERALS,
        Err.BADVERSION, Err.NONODE, Err.NOTEMPTY, Err.BADVERSION, Err.NONODE,
    ]  # fmt: skip


async def test_pipelined_requests_answer_in_order(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    count = 1000
    async with session(address(zookeeper)) as s:
        zk = s.client
        await zk.create(unique_path)
        replies: list[tuple[int, Reply]] = []
        done = trio.Event()

        def on_reply(index: int) -> Callable[[Reply], None]:
            def record(reply: Reply) -> None:
                replies.append((index, reply))
                if len(replies) == count:
                    done.set()

            return record

        started = time.perf_counter()
        # All submitted before any reply can arrive: one pipeline, no awaits.
        for i in range(count):
            request = CreateRequest(f"{unique_path}/n{i:04d}", str(i).encode(), OPEN_ACL, 0)
            s.client.submit(OpCode.CREATE, request, on_reply(i))
        with trio.fail_after(TIMEOUT):
            await done.wait()
        elapsed = time.perf_counter() - started
        print(f"{count} pipelined creates: {elapsed * 1000:.0f} ms")
        assert [index for index, _ in replies] == list(range(count))
        assert all(reply.err == Err.OK for _, reply in replies)
        paths = [reply.body.path for _, reply in replies if isinstance(reply.body, CreateResponse)]
        assert paths == [f"{unique_path}/n{i:04d}" for i in range(count)]
        zxids = [reply.zxid for _, reply in replies]
        assert zxids == sorted(zxids) and len(set(zxids)) == count
        assert len(await zk.get_children(unique_path)) == count


async def test_watch_event_precedes_replies_that_show_the_change(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """The ordering promise, under load: while another session changes a node
    200 times, this one keeps 50 getData requests in flight; every reply that
    shows version v must come after at least v change events."""
    node = f"{unique_path}/n"
    changes = 200
    seen_changes = 0
    violations: list[tuple[int, int]] = []
    latest = 0
    finished = trio.Event()

    def on_watch(event: WatcherEvent) -> None:
        nonlocal seen_changes
        if event.type == EventType.NODE_DATA_CHANGED and event.path == node:
            seen_changes += 1

    async with (
        session(address(zookeeper), also_on_watch=on_watch) as reader,
        session(address(zookeeper)) as writer,
    ):
        await writer.client.create(unique_path)
        await writer.client.create(node, b"0")
        await reader.client.add_watch(unique_path, recursive=True)

        def on_reply(reply: Reply) -> None:
            nonlocal latest
            assert isinstance(reply.body, GetDataResponse)
            version = reply.body.stat.version
            if version > seen_changes:
                violations.append((version, seen_changes))
            latest = max(latest, version)
            if latest == changes:
                finished.set()
            elif not finished.is_set():
                reader.client.submit(OpCode.GET_DATA, PathWatchRequest(node, False), on_reply)

        for _ in range(50):
            reader.client.submit(OpCode.GET_DATA, PathWatchRequest(node, False), on_reply)
        for i in range(1, changes + 1):
            await writer.client.set_data(node, str(i).encode())
        with trio.fail_after(TIMEOUT):
            await finished.wait()
    assert violations == []
    assert seen_changes == changes


async def test_persistent_recursive_watch_sees_the_subtree(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    root = unique_path
    async with session(address(zookeeper)) as watcher, session(address(zookeeper)) as writer:
        await writer.client.create(root)
        await watcher.client.add_watch(root, recursive=True)
        await writer.client.create(f"{root}/a", b"1")
        await writer.client.set_data(f"{root}/a", b"2")
        await writer.client.create(f"{root}/a/b")
        await writer.client.delete(f"{root}/a/b")
        await writer.client.set_data(root, b"r")
        # sync through the watcher's own session: its reply comes after every
        # event for changes made before it.
        await watcher.client.sync(root)
        await watcher.client.exists(root)
        assert [(e.type, e.path) for e in watcher.watches.items] == [
            (EventType.NODE_CREATED, f"{root}/a"),
            (EventType.NODE_DATA_CHANGED, f"{root}/a"),
            (EventType.NODE_CREATED, f"{root}/a/b"),
            (EventType.NODE_DELETED, f"{root}/a/b"),
            (EventType.NODE_DATA_CHANGED, root),
        ]


async def test_server_crash_fails_in_flight_requests_then_the_session_resumes(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    """kill -9 and restart on the same data dir, within the session timeout:
    what was in flight gets CONNECTIONLOSS in submission order, requests are
    refused while down, and the session comes back with its recursive watch."""
    server = zookeeper_factory()
    async with session(address(server), **RESTART_OPTIONS) as watcher:
        zk = watcher.client
        await zk.create("/svc")
        await zk.add_watch("/svc", recursive=True)
        await zk.create("/svc/before")
        await watcher.watches.wait_for(lambda items: len(items) == 1, "event before the kill")
        session_id = zk.session_id
        replies: list[tuple[int, int]] = []
        for i in range(100):
            zk.submit(
                OpCode.GET_DATA, PathWatchRequest("/svc", False),
                lambda reply, i=i: replies.append((i, reply.err)),
            )  # fmt: skip

        server.kill()
        await watcher.wait_session(Disconnected())
        assert replies == [(i, Err.CONNECTIONLOSS) for i in range(100)]
        assert not zk.connected
        with pytest.raises(ConnectionLost):
            zk.submit(OpCode.GET_DATA, PathWatchRequest("/svc", False), replies.append)
        with pytest.raises(ConnectionLost):
            await zk.get_data("/svc")

        await trio.to_thread.run_sync(server.start)
        await watcher.wait_session(Connected(session_id, resumed=True))
        assert watcher.sessions.items == [
            Connected(session_id, False), Disconnected(), Connected(session_id, True),
        ]  # fmt: skip
        async with session(address(server)) as writer:
            await writer.client.create("/svc/after", b"x")
            await writer.client.delete("/svc/before")
        await watcher.watches.wait_for(lambda items: len(items) == 3, "events after restart")
        assert [(e.type, e.path) for e in watcher.watches.items[1:]] == [
            (EventType.NODE_CREATED, "/svc/after"),
            (EventType.NODE_DELETED, "/svc/before"),
        ]


async def test_resumed_session_replays_watches(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """SetWatches2 carries the last zxid seen: one-shot watches whose node
    changed while the client was away fire on the resumed session, before
    Connected. Persistent watches are only re-registered: ZooKeeper 3.8 says
    nothing of changes made under them meanwhile, but they fire again after."""
    root = unique_path
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with session([("127.0.0.1", partition.port)]) as watcher:
            zk = watcher.client
            await zk.create(root)
            await zk.create(f"{root}/node", b"v0")
            await zk.create(f"{root}/tree")
            await zk.get_data(f"{root}/node", watch=True)
            assert await zk.exists(f"{root}/later", watch=True) is None
            await zk.add_watch(f"{root}/tree", recursive=True)
            partition.cut()
            await watcher.wait_session(Disconnected())
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(kz.set, f"{root}/node", b"v1")
                await trio.to_thread.run_sync(kz.create, f"{root}/later")
                await trio.to_thread.run_sync(kz.create, f"{root}/tree/missed")
            partition.heal()
            await watcher.wait_session(Connected(zk.session_id, resumed=True))
            assert sorted((e.type, e.path) for e in watcher.watches.items) == [
                (EventType.NODE_CREATED, f"{root}/later"),
                (EventType.NODE_DATA_CHANGED, f"{root}/node"),
            ]
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(kz.create, f"{root}/tree/seen")
            await watcher.watches.wait_for(lambda items: len(items) == 3, "the event after")
            assert (watcher.watches.items[2].type, watcher.watches.items[2].path) == (
                EventType.NODE_CREATED, f"{root}/tree/seen",
            )  # fmt: skip
        nursery.cancel_scope.cancel()


async def _watched(zk: ZooKeeperClient, path: str, kind: int) -> str:
    """checkWatches on the server: "OK" or "NOWATCHER" (kind 1 children, 2 data).

    ZooKeeper 3.8.0 answers for any session's watch of the path, so the
    tests below keep their paths to one watching session."""
    reply = await zk.call(OpCode.CHECK_WATCHES, WatchesRequest(path, kind))
    return Err(reply.err).name


async def _resume(watcher: Session, partition: Partition, occurrence: int = 1) -> None:
    """Cut the link and heal it: the session resumes on a new connection,
    where the client replays its watches with SetWatches2."""
    partition.cut()
    await watcher.wait_session(Disconnected(), occurrence)
    partition.heal()
    await watcher.wait_session(Connected(watcher.client.session_id, resumed=True), occurrence)


async def test_multi_read_sets_no_watch_and_the_replay_adds_none(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """ZooKeeper ignores the watch flag of the reads inside a multiRead, so
    the client must not replay them as watches after a reconnect: the server
    would then hold (and fire) watches the session never had."""
    root = unique_path
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with session([("127.0.0.1", partition.port)]) as watcher:
            zk = watcher.client
            await zk.create(root)
            await zk.create(f"{root}/read", b"v0")
            await zk.create(f"{root}/watched", b"v0")
            reply = await zk.call(OpCode.MULTI_READ, MultiReadRequest((
                (OpCode.GET_DATA, PathWatchRequest(f"{root}/read", True)),
                (OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
            )))  # fmt: skip
            assert reply.err == Err.OK
            await zk.get_data(f"{root}/watched", watch=True)
            expected = {
                (f"{root}/read", 2): "NOWATCHER", (root, 1): "NOWATCHER",
                (f"{root}/watched", 2): "OK",
            }  # fmt: skip
            assert {key: await _watched(zk, *key) for key in expected} == expected
            await _resume(watcher, partition)
            assert {key: await _watched(zk, *key) for key in expected} == expected
            # Events come in the server's order: one for the multiRead's reads
            # would arrive before the event of the real watch.
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(kz.set, f"{root}/read", b"v1")
                await trio.to_thread.run_sync(kz.create, f"{root}/new")
                await trio.to_thread.run_sync(kz.set, f"{root}/watched", b"v1")
            await watcher.watches.wait_for(lambda items: items, "the real watch's event")
            assert [(e.type, e.path) for e in watcher.watches.items] == [
                (EventType.NODE_DATA_CHANGED, f"{root}/watched"),
            ]
        nursery.cancel_scope.cancel()


async def test_mixed_persistent_and_one_shot_watches_are_replayed_exactly(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """A recursive watch and a getChildren watch on one path are two watches
    on ZooKeeper (one per table), and a resumed session must get both back:
    the child watch still one-shot, the recursive one still hearing the
    subtree. A getData watch on a path under a persistent watch, used up
    before the reconnect, must not come back."""
    root = unique_path
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with session([("127.0.0.1", partition.port)]) as watcher:
            zk = watcher.client
            await zk.create(root)
            await zk.create(f"{root}/p", b"v0")
            await zk.add_watch(root, recursive=True)
            await zk.get_children(root, watch=True)
            await zk.add_watch(f"{root}/p", recursive=False)
            await zk.get_data(f"{root}/p", watch=True)
            await zk.set_data(f"{root}/p", b"v1")  # uses the one-shot data watch up
            await watcher.watches.wait_for(lambda items: len(items) == 1, "the data event")
            before = [(await _watched(zk, path, kind)) for path in (root, f"{root}/p")
                      for kind in (1, 2)]  # fmt: skip
            await _resume(watcher, partition)
            after = [(await _watched(zk, path, kind)) for path in (root, f"{root}/p")
                     for kind in (1, 2)]  # fmt: skip
            # /p's data watch is gone on the server until the reconnect.
            assert before == ["OK", "OK", "OK", "NOWATCHER"]
            assert after == before
            watcher.watches.items.clear()
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(kz.create, f"{root}/x")
                await trio.to_thread.run_sync(kz.create, f"{root}/y")
                await trio.to_thread.run_sync(kz.set, f"{root}/x", b"1")
            await watcher.watches.wait_for(lambda items: len(items) >= 4, "four events")
            assert [(e.type, e.path) for e in watcher.watches.items] == [
                (EventType.NODE_CREATED, f"{root}/x"),
                (EventType.NODE_CHILDREN_CHANGED, root),  # the one-shot child watch
                (EventType.NODE_CREATED, f"{root}/y"),
                (EventType.NODE_DATA_CHANGED, f"{root}/x"),
            ]
        nursery.cancel_scope.cancel()


async def test_a_mixed_watch_whose_node_changed_meanwhile_comes_back_as_it_was(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """A persistent watch with a getData watch over it, and the data changed
    while the client was away: the replay's catch-up event uses the one-shot
    watch up, and the persistent one is left with its child half only, as if
    the change had happened while connected."""
    node = f"{unique_path}/p"
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with session([("127.0.0.1", partition.port)]) as watcher:
            zk = watcher.client
            await zk.create(unique_path)
            await zk.create(node, b"v0")
            await zk.add_watch(node, recursive=False)
            await zk.get_data(node, watch=True)
            partition.cut()
            await watcher.wait_session(Disconnected())
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(kz.set, node, b"v1")
            partition.heal()
            await watcher.wait_session(Connected(zk.session_id, resumed=True))
            assert [(e.type, e.path) for e in watcher.watches.items] == [
                (EventType.NODE_DATA_CHANGED, node),
            ]
            assert [await _watched(zk, node, kind) for kind in (1, 2)] == ["OK", "NOWATCHER"]
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(kz.set, node, b"v2")  # no watch left for it
                await trio.to_thread.run_sync(kz.create, f"{node}/c")
            await watcher.watches.wait_for(lambda items: len(items) >= 2, "the child event")
            assert [(e.type, e.path) for e in watcher.watches.items[1:]] == [
                (EventType.NODE_CHILDREN_CHANGED, node),
            ]
        nursery.cancel_scope.cancel()


async def test_session_expiry_then_a_new_session(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """Cut off for longer than the session timeout, the client learns on
    reconnecting that the session expired, and opens a new one. (A server
    that is down does not do: ZooKeeper restores sessions with a fresh
    timeout when it restarts, so a partition is what expires one.)"""
    root = unique_path
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with session([("127.0.0.1", partition.port)], session_timeout_ms=800) as s:
            old = s.client.session_id
            await s.client.create(root)
            await s.client.create(f"{root}/eph", flags=CreateMode.EPHEMERAL)
            await s.client.add_watch(root, recursive=True)
            partition.cut()
            await s.wait_session(Disconnected())
            with kazoo(zookeeper) as kz:
                await trio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: kz.exists(f"{root}/eph") is None,
                        timeout=TIMEOUT,
                        message="server-side expiry",
                    )
                )
            partition.heal()
            await s.sessions.wait_for(lambda items: len(items) >= 4, "a new session")
            new = s.client.session_id
            assert new != old
            assert s.sessions.items == [
                Connected(old, False), Disconnected(), Expired(), Connected(new, False),
            ]  # fmt: skip
            # Watches of the dead session are forgotten, not replayed: were the
            # recursive watch armed, its event would precede this reply.
            await s.client.create(f"{root}/eph", flags=CreateMode.EPHEMERAL)
            assert s.watches.items == []
        nursery.cancel_scope.cancel()


async def test_digest_auth_is_replayed_after_reconnect(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = zookeeper_factory()
    creator_only = (ACL(31, Id("auth", "")),)
    async with (
        session(address(server), **RESTART_OPTIONS) as owner,
        session(address(server), **RESTART_OPTIONS) as stranger,
    ):
        await owner.client.add_auth("digest", b"alice:secret")
        await owner.client.create("/private", b"mine", acl=creator_only)
        with pytest.raises(KeeperError) as refused:
            await stranger.client.get_data("/private")
        assert refused.value.err == Err.NOAUTH

        session_id = owner.client.session_id
        await restart_after_kill(server)
        await owner.wait_session(Connected(session_id, resumed=True))
        # ZooKeeper keeps credentials per connection: only the replay makes this pass.
        assert (await owner.client.get_data("/private"))[0] == b"mine"

    async with session(address(server), auth=[("digest", b"alice:secret")]) as again:
        assert (await again.client.get_data("/private"))[0] == b"mine"
    digest_acl = make_digest_acl("alice", "secret", all=True)
    with kazoo(server, auth_data=[("digest", "alice:secret")]) as kz:
        acls, _ = await trio.to_thread.run_sync(kz.get_acls, "/private")
    assert [(acl.id.scheme, acl.id.id) for acl in acls] == [("digest", digest_acl.id.id)]


async def test_refused_credentials_stop_the_client(zookeeper: ZooKeeperServer) -> None:
    sessions: Recorder[SessionEvent] = Recorder()
    client = ZooKeeperClient(address(zookeeper), on_session=sessions, session_timeout_ms=4000)

    async def run_until_refused() -> None:
        with pytest.raises(KeeperError) as caught:
            await client.run()
        assert caught.value.err == Err.AUTHFAILED

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_refused)
        with trio.fail_after(TIMEOUT):
            await client.wait_connected()
        with pytest.raises(KeeperError) as caught:
            await client.add_auth("no-such-scheme", b"x")
        assert caught.value.err == Err.AUTHFAILED
    assert sessions.items[-1] == AuthFailed("no-such-scheme")
    assert client.state is ClientState.AUTH_FAILED
    with pytest.raises(ConnectionLost):
        await client.wait_connected()


async def test_submit_before_connecting_raises(zookeeper: ZooKeeperServer) -> None:
    client = ZooKeeperClient(address(zookeeper))
    with pytest.raises(ConnectionLost):
        client.submit(OpCode.GET_DATA, PathWatchRequest("/", False), lambda reply: None)


async def test_a_callback_exception_ends_run_with_that_exception(
    zookeeper: ZooKeeperServer,
) -> None:
    class Boom(Exception):
        pass

    def on_reply(reply: Reply) -> None:
        raise Boom

    client = ZooKeeperClient(address(zookeeper), session_timeout_ms=4000)

    async def run_until_boom() -> None:
        with pytest.raises(Boom):
            await client.run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_boom)
        with trio.fail_after(TIMEOUT):
            await client.wait_connected()
        client.submit(OpCode.EXISTS, PathWatchRequest("/", False), on_reply)
    assert client.state is ClientState.CLOSED


async def test_bounded_in_flight(zookeeper: ZooKeeperServer) -> None:
    async with session(address(zookeeper), max_in_flight=10) as s:
        answered: Recorder[Reply] = Recorder()
        for _ in range(10):
            s.client.submit(OpCode.EXISTS, PathWatchRequest("/", False), answered)
        with pytest.raises(Overloaded):
            s.client.submit(OpCode.EXISTS, PathWatchRequest("/", False), answered)
        await answered.wait_for(lambda items: len(items) == 10, "ten replies")
        assert [reply.err for reply in answered.items] == [Err.OK] * 10
        # Room again once the replies are in.
        await s.client.sync("/")


async def test_frame_over_max_buffer_closes_the_connection(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    async with session(address(zookeeper)) as writer:
        await writer.client.create(unique_path, b"x" * 10_000)
        await writer.client.create(f"{unique_path}-small", b"ok")
    async with session(address(zookeeper), max_buffer=1000) as s:
        session_id = s.client.session_id
        with pytest.raises(ConnectionLost):
            await s.client.get_data(unique_path)
        await s.wait_session(Connected(session_id, resumed=True))
        assert s.sessions.items == [
            Connected(session_id, False), Disconnected(), Connected(session_id, True),
        ]  # fmt: skip
        assert (await s.client.get_data(f"{unique_path}-small"))[0] == b"ok"


async def test_cancelling_run_closes_the_session(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    async with session(address(zookeeper)) as s:
        await s.client.create(unique_path, flags=CreateMode.EPHEMERAL)
    assert s.client.state is ClientState.CLOSED
    # closeSession was answered, so its ephemerals are gone now, not after the timeout.
    with kazoo(zookeeper) as kz:
        assert await trio.to_thread.run_sync(kz.exists, unique_path) is None


async def test_idle_session_is_kept_alive_by_pings(zookeeper: ZooKeeperServer) -> None:
    async with session(address(zookeeper), session_timeout_ms=800) as s:
        timeout = s.client.negotiated_timeout_ms / 1000
        # Idling is what is under test: three session timeouts without a request.
        await trio.sleep(3 * timeout)
        assert s.sessions.items == [Connected(s.client.session_id, False)]
        assert await s.client.exists("/") is not None


async def test_silent_connection_is_dropped_and_the_session_resumed(
    zookeeper: ZooKeeperServer,
) -> None:
    """A connection that stays open but carries nothing counts as lost after
    two thirds of the session timeout: early enough to resume the session."""
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with session([("127.0.0.1", partition.port)], session_timeout_ms=1500) as s:
            session_id = s.client.session_id
            timeout = s.client.negotiated_timeout_ms / 1000
            frozen_at = trio.current_time()
            partition.freeze()
            await s.wait_session(Disconnected())
            silent_for = trio.current_time() - frozen_at
            assert 2 / 3 * timeout * 0.9 <= silent_for < timeout
            await s.wait_session(Connected(session_id, resumed=True))
        nursery.cancel_scope.cancel()


def test_codec_events_do_not_depend_on_how_bytes_are_split() -> None:
    response = ConnectResponse(0, 4000, 0x1234, b"p" * 16, False)
    stream = bytearray(encode_connect_response(response))
    stream += reply_frame(XID_NOTIFICATION, -1, 0, encode(WatcherEvent(3, 3, "/a")))
    stream += reply_frame(7, 42, 0, encode(GetDataResponse(b"x", STAT)))
    stream += reply_frame(8, 43, Err.NONODE, b"")
    expected = [
        wire.Connected(response),
        wire.WatchNotified(WatcherEvent(3, 3, "/a")),
        wire.ReplyReceived(7, 42, 0, encode(GetDataResponse(b"x", STAT))),
        wire.ReplyReceived(8, 43, Err.NONODE, b""),
    ]
    for chunk in (1, 3, 7, len(stream)):
        codec = connecting_codec()
        events: list[wire.Event] = []
        for start in range(0, len(stream), chunk):
            codec.receive_data(bytes(stream[start : start + chunk]))
            while (event := codec.next_event()) is not None:
                events.append(event)
        assert events == expected
    assert wire.decode_body(OpCode.GET_DATA, 0, encode(GetDataResponse(b"x", STAT))) == (
        GetDataResponse(b"x", STAT)
    )
    assert wire.decode_body(OpCode.GET_DATA, Err.NONODE, b"") is None
    assert wire.decode_body(OpCode.DELETE, 0, b"") is None


def test_codec_refuses_a_frame_over_max_buffer_from_its_length_alone() -> None:
    codec = connecting_codec(max_buffer=100)
    codec.receive_data(encode_connect_response(ConnectResponse(0, 4000, 1, bytes(16), False)))
    assert isinstance(codec.next_event(), wire.Connected)
    codec.receive_data(struct.pack(">i", 100 + wire.FRAME_SLACK + 1))
    with pytest.raises(wire.ProtocolError):
        codec.next_event()


STAT = Stat(1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 9)


def connecting_codec(max_buffer: int = DEFAULT_MAX_BUFFER) -> wire.ClientConnection:
    """A client codec that has sent its ConnectRequest and awaits the answer."""
    codec = wire.ClientConnection(max_buffer)
    codec.send(wire.Connect(ConnectRequest(0, 0, 4000, 0, bytes(16), False)))
    return codec


def encode_connect_response(response: ConnectResponse) -> bytes:
    body = encode(response)
    return struct.pack(">i", len(body)) + body


def reply_frame(xid: int, zxid: int, err: int, body: bytes) -> bytes:
    payload = struct.pack(">iqi", xid, zxid, err) + body
    return struct.pack(">i", len(payload)) + payload
