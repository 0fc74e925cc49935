"""Group commit: writes that arrive while an fsync is under way share the next
one, and nothing that shows a write leaves the server before it is durable.

The server runs in-process over a real SQLite store whose commits are held in
the worker thread until the test lets them go, so "a commit is in progress"
is a state the test controls rather than a race it hopes to win. Clients are
raw wire clients in threads (tests/zkwire.py).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from dispatcher.zk.codec.protocol import Err, OpCode
from dispatcher.zk.codec.records import OPEN_ACL_UNSAFE, CreateRequest, PathWatchRequest
from dispatcher.zk.server.engine import Engine
from dispatcher.zk.server.listener import ZooKeeperServer
from dispatcher.zk.server.store import TreeStore
from dispatcher.zk.server.tree import DataTree
from tests.waiting import until
from tests.zkwire import WireClient


class HeldStore(TreeStore):
    """A real store whose group commits wait for :attr:`release` in their thread."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.release = threading.Event()
        self.release.set()
        self.started = 0

    def prepare_commit(self, tree: DataTree, paths: Iterable[str]) -> Callable[[], None]:
        write = super().prepare_commit(tree, paths)

        def held() -> None:
            self.started += 1
            self.release.wait(30)
            write()

        return held


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[Engine, HeldStore, int]]:
    store = HeldStore(tmp_path / "data")
    engine = Engine(store)
    server = ZooKeeperServer(engine)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            yield engine, store, port
            store.release.set()
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def nothing_received(client: WireClient) -> bool:
    """True if no byte has arrived for ``client`` (asked now, without waiting)."""
    timeout = client.sock.gettimeout()
    client.sock.settimeout(0)
    try:
        return not client.sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        client.sock.settimeout(timeout)


def create(path: str) -> CreateRequest:
    return CreateRequest(path, b"v", OPEN_ACL_UNSAFE, 0)


async def test_no_reply_shows_a_write_before_it_is_durable(tmp_path: Path) -> None:
    async with serving(tmp_path) as (engine, store, port):
        writer, reader = WireClient("127.0.0.1", port), WireClient("127.0.0.1", port)
        try:
            await trio.to_thread.run_sync(writer.connect)
            await trio.to_thread.run_sync(reader.connect)
            store.release.clear()
            xid = writer.send(OpCode.CREATE, create("/x"))
            await until(lambda: store.started == 1, "the create's commit started")
            read = reader.send(OpCode.EXISTS, PathWatchRequest("/x", False))
            gate = engine.durability
            assert gate is not None
            await until(lambda: gate.held_bytes > 0, "the read answered (and held)")
            # The write is in the tree and its commit is in the disk's hands:
            # neither its reply nor a read that would show it may have left.
            assert "/x" in engine.tree.nodes
            assert nothing_received(writer) and nothing_received(reader)
            store.release.set()
            created = await trio.to_thread.run_sync(writer.receive, xid)
            exists = await trio.to_thread.run_sync(reader.receive, read)
            assert created.header.err == Err.OK
            assert exists.header.err == Err.OK
        finally:
            writer.close()
            reader.close()


async def test_writes_during_a_commit_share_the_next_fsync(tmp_path: Path) -> None:
    async with serving(tmp_path) as (engine, store, port):
        client = WireClient("127.0.0.1", port)
        try:
            await trio.to_thread.run_sync(client.connect)
            store.release.clear()
            first = client.send(OpCode.CREATE, create("/g"))
            await until(lambda: store.started == 1, "the first commit started")
            xids = [client.send(OpCode.CREATE, create(f"/g{i}")) for i in range(200)]
            await until(lambda: all(f"/g{i}" in engine.tree.nodes for i in range(200)),
                        "the other creates applied")  # fmt: skip
            store.release.set()
            for xid in (first, *xids):
                reply = await trio.to_thread.run_sync(client.receive, xid)
                assert reply.header.err == Err.OK
            gate = engine.durability
            assert gate is not None
            assert gate.commits == 2, "200 writes that arrived during one fsync shared one"
        finally:
            client.close()
    # And they are durable: a new engine on the same directory has them all.
    reopened = TreeStore(tmp_path / "data")
    try:
        tree = DataTree()
        reopened.load(tree)
        assert {"/g", *(f"/g{i}" for i in range(200))} <= set(tree.nodes)
    finally:
        reopened.close()


async def test_replies_keep_their_order_across_groups(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_, store, port):
        client = WireClient("127.0.0.1", port)
        try:
            await trio.to_thread.run_sync(client.connect)
            store.release.clear()
            xids = []
            for i in range(50):
                xids.append(client.send(OpCode.CREATE, create(f"/o{i}")))
                xids.append(client.send(OpCode.GET_DATA, PathWatchRequest(f"/o{i}", False)))
            await until(lambda: store.started >= 1, "a commit started")
            store.release.set()

            def replies_in_order() -> list[int]:
                return [client.receive(xid).header.err for xid in xids]

            errs = await trio.to_thread.run_sync(replies_in_order)
            assert errs == [Err.OK] * 100
        finally:
            client.close()
