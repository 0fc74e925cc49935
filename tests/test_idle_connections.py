"""Idle connections are parked without a task, and lose nothing by it.

An idle ZooKeeper session (connected, saying nothing) is what a server holds
most of; parked, it costs its objects and no task. These tests check the
parking set itself on socket pairs, then a real in-process ZooKeeper face with
raw wire clients (tests/zkwire.py, in threads): every idle session parked, and
a parked session still answered, still told of its watches (also when the
burst is larger than its socket takes at once), still closed when its session
expires, and closed when the server stops.
"""

from __future__ import annotations

import gc
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from dispatcher.zk.codec.protocol import Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    CreateRequest,
    DeleteRequest,
    PathWatchRequest,
    Record,
    SetDataRequest,
)
from dispatcher.zk.server.engine import Engine, EngineConfig
from dispatcher.zk.server.idle import IdleConnections
from dispatcher.zk.server.listener import ServerLimits, ZooKeeperServer
from dispatcher.zk.server.store import TreeStore
from tests.waiting import until
from tests.zkwire import Reply, WireClient

# ------------------------------------------------------------ the parking set


class Recorder:
    """What an :class:`IdleConnections` did with each connection."""

    def __init__(self) -> None:
        self.resumed: list[str] = []
        self.ended: list[str] = []
        self.resumed_event = trio.Event()

    async def resume(self, name: str) -> None:
        self.resumed.append(name)
        self.resumed_event.set()

    def end(self, name: str) -> None:
        self.ended.append(name)


@asynccontextmanager
async def parking() -> AsyncIterator[tuple[IdleConnections[str], Recorder]]:
    recorder = Recorder()
    idle: IdleConnections[str] = IdleConnections(recorder.resume, recorder.end)
    async with trio.open_nursery() as nursery:
        await nursery.start(idle.run)
        yield idle, recorder
        nursery.cancel_scope.cancel()


async def test_a_parked_connection_resumes_when_its_socket_is_readable() -> None:
    a, b = socket.socketpair()
    with a, b:
        async with parking() as (idle, recorder):
            idle.park(a.fileno(), "a")
            assert len(idle) == 1
            b.send(b"x")
            await recorder.resumed_event.wait()
            assert recorder.resumed == ["a"]
            assert len(idle) == 0


async def test_bytes_that_arrived_before_parking_resume_it_at_once() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.send(b"already here")
        async with parking() as (idle, recorder):
            idle.park(a.fileno(), "a")
            await recorder.resumed_event.wait()
            assert recorder.resumed == ["a"]


async def test_a_peer_hanging_up_resumes_the_connection() -> None:
    a, b = socket.socketpair()
    with a:
        async with parking() as (idle, recorder):
            idle.park(a.fileno(), "a")
            b.close()
            await recorder.resumed_event.wait()
            assert recorder.resumed == ["a"]


async def test_wake_resumes_a_parked_connection_once_and_only_a_parked_one() -> None:
    a, b = socket.socketpair()
    with a, b:
        async with parking() as (idle, recorder):
            assert not idle.wake(a.fileno())  # not parked: nothing to do
            idle.park(a.fileno(), "a")
            assert idle.wake(a.fileno())
            assert not idle.wake(a.fileno())
            await recorder.resumed_event.wait()
            # Readable later: no longer parked, so not resumed a second time.
            b.send(b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert recorder.resumed == ["a"]


async def test_connections_still_parked_when_it_stops_are_ended() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        async with parking() as (idle, recorder):
            for index, (a, _) in enumerate(pairs):
                idle.park(a.fileno(), f"c{index}")
            assert idle.running
        assert not idle.running
        assert sorted(recorder.ended) == ["c0", "c1", "c2"]
        assert recorder.resumed == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# ------------------------------------------------------------ the ZooKeeper face


@asynccontextmanager
async def serving(
    tmp_path: Path, config: EngineConfig | None = None
) -> AsyncIterator[tuple[ZooKeeperServer, int]]:
    store = TreeStore(tmp_path / "data")
    server = ZooKeeperServer(Engine(store, config), ServerLimits(max_client_cnxns=0))
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            yield server, port
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def _tasks() -> int:
    """Every task in this trio run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count = 0
    todo = [root]
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


def _connect(port: int, count: int, timeout_ms: int = 30000) -> list[WireClient]:
    clients = []
    for _ in range(count):
        client = WireClient("127.0.0.1", port)
        clients.append(client)
        client.connect(timeout_ms)
    return clients


async def test_idle_sessions_have_no_task_and_are_answered_when_they_speak(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (server, port):
        before = _tasks()
        clients = await trio.to_thread.run_sync(_connect, port, 200)
        try:
            await until(lambda: len(server.idle) == 200, "every idle session parked")
            # Parked, 200 sessions add no task at all (the accepting tasks
            # end a moment after they park their connection).
            await until(lambda: _tasks() == before, "no task left for an idle session")
            replies = await trio.to_thread.run_sync(
                lambda: [c.call(OpCode.EXISTS, PathWatchRequest("/", False)) for c in clients]
            )
            assert {reply.header.err for reply in replies} == {Err.OK}
            await until(lambda: len(server.idle) == 200, "parked again after answering")
        finally:
            for client in clients:
                client.close()


def _pipelined(
    client: WireClient, requests: list[tuple[int, Record]], batch: int = 100
) -> list[Reply]:
    """Each request sent ahead of its reply, ``batch`` at a time."""
    replies: list[Reply] = []
    for start in range(0, len(requests), batch):
        xids = [client.send(op, record) for op, record in requests[start : start + batch]]
        replies.extend(client.receive(xid) for xid in xids)
    return replies


async def test_parked_sessions_hear_their_watches_even_past_what_the_socket_takes(
    tmp_path: Path,
) -> None:
    """One write fires a watch on each of 20 parked sessions; then 16 MiB of
    events go to one parked session that is not reading, far more than its
    socket takes at once: they arrive whole and in order when it reads."""
    async with serving(tmp_path) as (server, port):
        writer, *watchers = await trio.to_thread.run_sync(_connect, port, 21)
        try:

            def arm() -> None:
                writer.call(OpCode.CREATE, CreateRequest("/w", b"", OPEN_ACL_UNSAFE, 0))
                for client in watchers:
                    client.call(OpCode.GET_DATA, PathWatchRequest("/w", True))

            await trio.to_thread.run_sync(arm)
            await until(lambda: len(server.idle) == 21, "every session parked")
            await trio.to_thread.run_sync(
                lambda: writer.call(OpCode.SET_DATA, SetDataRequest("/w", b"1", -1))
            )
            events = await trio.to_thread.run_sync(lambda: [c.read_event() for c in watchers])
            assert [(e[1].type, e[1].path) for e in events if e is not None] == [
                (EventType.NODE_DATA_CHANGED, "/w")
            ] * 20

            # Watch events carry their path: 2,000 paths of 8 KiB.
            reader = watchers[0]
            names = [f"/w/{index:04}-" + "n" * 8192 for index in range(2000)]
            await trio.to_thread.run_sync(lambda: _pipelined(writer, [
                (OpCode.CREATE, CreateRequest(name, b"", OPEN_ACL_UNSAFE, 0)) for name in names
            ]))  # fmt: skip
            await trio.to_thread.run_sync(lambda: _pipelined(reader, [
                (OpCode.EXISTS, PathWatchRequest(name, True)) for name in names
            ]))  # fmt: skip
            await until(lambda: len(server.idle) == 21, "the reader parked with its watches")
            deleted = await trio.to_thread.run_sync(lambda: _pipelined(writer, [
                (OpCode.DELETE, DeleteRequest(name, -1)) for name in names
            ]))  # fmt: skip
            assert {reply.header.err for reply in deleted} == {Err.OK}
            heard = await trio.to_thread.run_sync(lambda: [reader.read_event() for _ in names])
            assert [(e[1].type, e[1].path) for e in heard if e is not None] == [
                (EventType.NODE_DELETED, name) for name in names
            ]
            await until(lambda: len(server.idle) == 21, "the reader parked again once flushed")
        finally:
            for client in (writer, *watchers):
                client.close()


async def test_a_parked_session_that_expires_is_closed(tmp_path: Path) -> None:
    """A client that neither speaks nor pings loses its session at its
    timeout, and the server closes its connection though it had no task."""
    async with serving(tmp_path, EngineConfig(tick_ms=100)) as (server, port):
        (client,) = await trio.to_thread.run_sync(_connect, port, 1, 200)
        try:
            await until(lambda: len(server.idle) == 1, "the session parked")
            assert await trio.to_thread.run_sync(client.read_frame) is None  # EOF
            assert len(server.idle) == 0
            assert len(server.engine.sessions) == 0
        finally:
            client.close()


async def test_stopping_the_server_closes_parked_connections(tmp_path: Path) -> None:
    store = TreeStore(tmp_path / "data")
    engine = Engine(store)
    server = ZooKeeperServer(engine, ServerLimits(max_client_cnxns=0))
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            clients = await trio.to_thread.run_sync(_connect, port, 10)
            await until(lambda: len(server.idle) == 10, "every session parked")
            nursery.cancel_scope.cancel()
        assert len(server.idle) == 0
        assert not engine.clients
        assert (
            await trio.to_thread.run_sync(lambda: [c.read_frame() for c in clients]) == [None] * 10
        )
        for client in clients:
            client.close()
    finally:
        store.close()


async def test_an_idle_session_costs_well_under_two_kib_of_objects(tmp_path: Path) -> None:
    """What 1,000 idle sessions allocate, per session, as tracemalloc counts
    it. A session that keeps a task costs some 5 KiB this way; parked, under
    1 KiB (bench/zk_writes.py measures the process's RSS, against ZooKeeper)."""
    async with serving(tmp_path) as (server, port):
        # Grown once, so the tables' own growth is not counted as sessions'.
        warm = await trio.to_thread.run_sync(_connect, port, 1000)
        await until(lambda: len(server.idle) == 1000, "the first sessions parked")
        for client in warm:
            client.close()
        await until(lambda: len(server.idle) == 0 and not server.engine.clients, "all gone")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            clients = await trio.to_thread.run_sync(_connect, port, 1000)
            await until(lambda: len(server.idle) == 1000, "every session parked")
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # Only the server's side: the clients' sockets live in this process too.
        server_side = [
            stat for stat in after.compare_to(before, "filename")
            if "/dispatcher/" in stat.traceback[0].filename
            or "/trio/" in stat.traceback[0].filename
        ]  # fmt: skip
        per_session = sum(stat.size_diff for stat in server_side) / 1000
        for client in clients:
            client.close()
        assert per_session < 2048, per_session
