"""A failure is one connection's, never the process's.

Each listener is given a peer that meets a bug (a handler made to raise, as
a bug would) or a frame built to break a parser, and must answer that peer
with an error where its protocol has one, close that connection only, count
the failure in ``zkgate_internal_errors_total{listener}``, and go on serving
everyone else. The quota poison of issue #13 runs against a real zkgate
process: it used to end the process, and again after every restart.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import trio
from kazoo.client import KazooClient

from dispatcher import wire
from dispatcher.faces.subscription_server import SubscriberConnection
from dispatcher.logs import LogfmtFormatter, RepeatLimiter
from dispatcher.zk.codec.protocol import Err, OpCode
from dispatcher.zk.codec.records import PathRequest, Record
from dispatcher.zk.server.engine import Client
from dispatcher.zk.server.tree import Txn
from tests.servers import ServerFactory, ZkgateServer
from tests.test_admin import gateway, kazoo, scrape
from tests.zkwire import WireClient

TOKEN = "containment-token"
SUBSCRIPTIONS = {"listen": "127.0.0.1:0", "token": TOKEN}


def _bug(*args: object) -> NoReturn:
    raise RuntimeError("a bug in a handler")


async def _internal_errors(admin_port: int, listener: str) -> float:
    return (await scrape(admin_port))[("zkgate_internal_errors_total", (("listener", listener),))]


# ------------------------------------------------------------- the ZooKeeper face


async def test_a_request_that_meets_a_bug_gets_systemerror_and_only_it_is_closed(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (running, admin_port):
        assert running.engine is not None and running.port is not None
        port = running.port
        bystander = await trio.to_thread.run_sync(kazoo, port)
        try:
            await trio.to_thread.run_sync(bystander.create, "/kept", b"v")
            running.engine._handlers[OpCode.GET_ACL] = _bug

            def unlucky() -> tuple[int, bytes | None]:
                client = WireClient("127.0.0.1", port)
                try:
                    client.connect()
                    reply = client.call(OpCode.GET_ACL, PathRequest("/kept"))
                    return reply.header.err, client.read_frame()
                finally:
                    client.sock.close()

            err, after = await trio.to_thread.run_sync(unlucky)
            assert err == Err.SYSTEMERROR
            assert after is None, "the connection stays open after an internal error"
            # The other session, the process and the tree are unharmed.
            data, _ = await trio.to_thread.run_sync(bystander.get, "/kept")
            assert data == b"v"
            await trio.to_thread.run_sync(bystander.set, "/kept", b"w")
            assert await _internal_errors(admin_port, "zookeeper") == 1
        finally:
            await trio.to_thread.run_sync(bystander.stop)
            await trio.to_thread.run_sync(bystander.close)


async def test_a_write_that_meets_a_bug_leaves_nothing_behind(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (running, _):
        assert running.engine is not None and running.port is not None
        engine = running.engine
        # A create alone takes the single-write table, one inside a multi the other:
        # the bug goes into both. (A plain create is done in place, with no
        # transaction to undo, unless that shortcut declines it: here it is off.)
        tables = (engine._writes, engine._single_writes)
        creates = [table[OpCode.CREATE] for table in tables]
        in_place = engine._shortcuts.pop(OpCode.CREATE)

        def failing(create: Callable[..., object]) -> Callable[..., NoReturn]:
            def create_then_fail(txn: Txn, client: Client, opcode: int, record: Record) -> NoReturn:
                create(txn, client, opcode, record)  # the txn has changed the tree...
                raise RuntimeError("...and then a bug")

            return create_then_fail

        for table, create in zip(tables, creates, strict=True):
            table[OpCode.CREATE] = failing(create)
        client = await trio.to_thread.run_sync(kazoo, running.port)
        try:
            try:
                await trio.to_thread.run_sync(client.create, "/half", b"x")
            except Exception as exc:  # kazoo's SystemErrorException or a lost connection
                failure: Exception | None = exc
            else:
                failure = None
            assert failure is not None, "a failed create was acknowledged"
            for table, create in zip(tables, creates, strict=True):
                table[OpCode.CREATE] = create
            engine._shortcuts[OpCode.CREATE] = in_place
            assert "/half" not in engine.tree.nodes
            # The server closed that connection: kazoo reconnects, and its
            # retry rides that out as an application would.
            assert await trio.to_thread.run_sync(client.retry, client.exists, "/half") is None
        finally:
            await trio.to_thread.run_sync(client.stop)
            await trio.to_thread.run_sync(client.close)


# ------------------------------------------------------------- the subscription server


async def _converse(port: int, *frames: bytes) -> list[wire.Message]:
    """Send ``frames`` raw, then read every message until the server closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for frame in frames:
                await stream.send_all(frame)
            decoder = wire.FrameDecoder()
            received: list[wire.Message] = []
            while data := await stream.receive_some(65536):
                received.extend(decoder.feed(data))
            return received


def _raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


HELLO = wire.encode(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "test"))
HOSTILE = {
    "deep nesting": _raw_frame(b"[" * 100_000 + b"]" * 100_000),
    "5,000-digit version": _raw_frame(
        b'{"type":"hello","version":' + b"9" * 5000 + b',"token":"t","client_id":"c"}'
    ),
    "not UTF-8": _raw_frame(b'{"type":"hello","token":"\xff"}'),
}


async def test_hostile_frames_get_an_error_and_the_dispatcher_serves_on(tmp_path: Path) -> None:
    async with gateway(tmp_path, subscriptions=SUBSCRIPTIONS) as (running, admin_port):
        port = running.subscription_port
        assert port is not None
        for name, frame in HOSTILE.items():
            for before in ((), (HELLO,)):
                answer = await _converse(port, *before, frame)
                assert isinstance(answer[-1], wire.Error), (name, answer)
                assert answer[-1].code == "bad-request", (name, answer)
        welcome, full = await _converse_until_full(port)
        assert isinstance(welcome, wire.Welcome)
        assert isinstance(full, wire.Full) and full.service == "orders"
        assert await _internal_errors(admin_port, "subscriptions") == 0


async def _converse_until_full(port: int) -> tuple[wire.Message, wire.Message]:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = wire.WireStream(stream)
            await conn.send(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "test"))
            welcome = await conn.receive()
            await conn.send(wire.Subscribe({"orders": None}))
            return welcome, await conn.receive()


async def test_a_subscriber_that_meets_a_bug_gets_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(tmp_path, subscriptions=SUBSCRIPTIONS) as (running, admin_port):
        port = running.subscription_port
        assert port is not None
        with monkeypatch.context() as patch:
            patch.setattr(SubscriberConnection, "_subscribe", _bug)
            answer = await _converse(port, HELLO, wire.encode(wire.Subscribe({"orders": None})))
        assert isinstance(answer[0], wire.Welcome)
        assert [(m.code, m.type) for m in answer if isinstance(m, wire.Error)] == [
            ("internal", "error")
        ]
        assert await _internal_errors(admin_port, "subscriptions") == 1
        welcome, full = await _converse_until_full(port)
        assert isinstance(welcome, wire.Welcome) and isinstance(full, wire.Full)


# ------------------------------------------------------------- quota poison


def _poison(client: KazooClient, stats: bytes) -> None:
    client.create("/q")
    client.create("/zookeeper/quota/q/zookeeper_limits", b"count=10,bytes=-1", makepath=True)
    client.create("/zookeeper/quota/q/zookeeper_stats", b"count=1,bytes=0")
    client.set("/zookeeper/quota/q/zookeeper_stats", stats)


def test_an_unreadable_quota_counts_as_none_and_the_tree_serves(
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    server = zkgate_factory()
    client = KazooClient(hosts=server.address, timeout=10.0)
    client.start(timeout=15.0)
    try:
        _poison(client, b"\xff")
        client.create("/q/child", b"abc")  # ended the process with UnicodeDecodeError
        assert client.get_children("/q") == ["child"]
        # The malformed stats node is left as it was: it is no quota any more.
        assert client.get("/zookeeper/quota/q/zookeeper_stats")[0] == b"\xff"
        client.set("/zookeeper/quota/q/zookeeper_stats", b"count=abc")
        client.delete("/q", recursive=True)  # ended it with KeyError
        assert client.exists("/q") is None
    finally:
        client.stop()
        client.close()
    assert server.four_letter("ruok") == "imok"
    server.restart()  # the poisoned stats node is durable; the tree must load
    assert server.four_letter("ruok") == "imok"
    client = KazooClient(hosts=server.address, timeout=10.0)
    client.start(timeout=15.0)
    try:
        client.create("/q", b"")
        client.create("/q/again", b"")
        assert client.get("/zookeeper/quota/q/zookeeper_stats")[0] == b"count=abc"
    finally:
        client.stop()
        client.close()


def test_a_readable_quota_still_counts(zkgate_factory: ServerFactory[ZkgateServer]) -> None:
    server = zkgate_factory()
    client = KazooClient(hosts=server.address, timeout=10.0)
    client.start(timeout=15.0)
    try:
        _poison(client, b"count=1,bytes=0")
        client.create("/q/child", b"abc")
        assert client.get("/zookeeper/quota/q/zookeeper_stats")[0] == b"count=2,bytes=3"
    finally:
        client.stop()
        client.close()


# ------------------------------------------------------------- log flooding


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_warning_is_logged_once_a_second_with_a_count() -> None:
    clock = _Clock()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(RepeatLimiter(interval=1.0, clock=clock))
    log = logging.getLogger("tests.containment.flood")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for _ in range(1000):
            log.warning("refusing a connection", extra={"peer": "10.0.0.1:1"})
        log.warning("another message")
        for _ in range(5):
            log.info("session opened")  # below WARNING: never held back
        clock.now = 0.999
        log.warning("refusing a connection")
        clock.now = 1.0
        log.warning("refusing a connection")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    refusals = [line for line in lines if "refusing a connection" in line]
    assert len(refusals) == 2
    assert "suppressed" not in refusals[0]
    assert refusals[1].endswith("suppressed=1000")
    assert sum("another message" in line for line in lines) == 1
    assert sum("session opened" in line for line in lines) == 5
