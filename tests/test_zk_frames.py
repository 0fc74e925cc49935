"""Hostile and careless bytes on zkgate's ZooKeeper port.

The rule (DESIGN.md, failure rules): bad input closes that one connection, the
process never dies of a client's bytes, and every buffer has a bound. Each
test breaks one connection in one way, then checks that an established kazoo
client on another connection still reads and writes and that ``ruok`` still
answers. Where ZooKeeper 3.8's exact answer is known and clients can see it
(an unknown opcode), the same bytes go to a real ZooKeeper too.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from dispatcher.zk.codec.jute import Reader
from dispatcher.zk.codec.protocol import Err, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    ConnectResponse,
    CreateRequest,
    GetDataResponse,
    PathWatchRequest,
    ReplyHeader,
    SetDataRequest,
    encode,
)
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, wait_for
from tests.zkwire import WireClient

#: How long a test waits for the server to close a connection it must close.
CLOSE_TIMEOUT = 10.0
_LENGTH = struct.Struct(">i")


# ---------------------------------------------------------------------- helpers


@contextmanager
def kazoo_client(address: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=address, timeout=10.0)
    client.start(timeout=15.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@contextmanager
def wire_client(host: str, port: int) -> Iterator[WireClient]:
    client = WireClient(host, port, timeout=CLOSE_TIMEOUT)
    try:
        yield client
    finally:
        client.close()


def read_until_closed(client: WireClient) -> bytes:
    """Everything the server still sends before it closes; fails if it never closes.

    A reset counts as closed: a server that closes a socket with unread input
    makes the kernel answer with RST.
    """
    received = bytearray(client._buffer)
    client.sock.settimeout(CLOSE_TIMEOUT)
    try:
        while True:
            chunk = client.sock.recv(65536)
            if not chunk:
                return bytes(received)
            received += chunk
    except ConnectionResetError:
        return bytes(received)
    except TimeoutError:
        raise AssertionError(
            f"server kept the connection open for {CLOSE_TIMEOUT}s (received {len(received)} bytes)"
        ) from None


def assert_still_serving(server: ZkgateServer, kazoo: KazooClient, path: str) -> None:
    """The process is up, and an established session still reads and writes."""
    assert server.running
    assert server.four_letter("ruok") == "imok"
    stat = kazoo.set(path, b"still here")
    assert kazoo.get(path) == (b"still here", stat)


def getdata_frame(xid: int, path: str) -> bytes:
    payload = struct.pack(">ii", xid, OpCode.GET_DATA) + encode(PathWatchRequest(path, False))
    return _LENGTH.pack(len(payload)) + payload


def setdata_frame(xid: int, path: str, data: bytes) -> bytes:
    payload = struct.pack(">ii", xid, OpCode.SET_DATA) + encode(SetDataRequest(path, data, -1))
    return _LENGTH.pack(len(payload)) + payload


def unread_bytes(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` that the application has not read."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Flooder(threading.Thread):
    """Sends getData requests without ever reading, until the server stops taking them.

    ``blocked`` is set once a send made no progress for ``stall`` seconds (the
    server stopped reading this connection); ``reset`` once the server closed
    the connection under it. Sending stops at ``limit`` bytes, which means the
    server never pushed back.
    """

    def __init__(self, sock: socket.socket, path: str, stall: float, limit: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.batch = b"".join(getdata_frame(xid, path) for xid in range(1, 1001))
        self.stall = stall
        self.limit = limit
        self.sent = 0
        self.blocked = threading.Event()
        self.reset = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(self.stall)
        view = memoryview(self.batch)
        offset = 0
        try:
            while not self.stop.is_set() and self.sent < self.limit:
                try:
                    n = self.sock.send(view[offset:])
                except TimeoutError:
                    self.blocked.set()
                    continue
                self.sent += n
                offset = (offset + n) % len(self.batch)
        except (ConnectionResetError, BrokenPipeError):
            self.reset.set()
        except OSError:
            if not self.stop.is_set():
                raise


@pytest.fixture
def small_buffer_server(zkgate_factory: ServerFactory[ZkgateServer]) -> ZkgateServer:
    return zkgate_factory(["--max-buffer", "4096"])


# ------------------------------------------------------------ oversized frames


@pytest.mark.parametrize(
    ("max_buffer", "length"),
    [(4096, 4097), (4096, 64 * 1024), (None, 2 * 1024 * 1024)],
    ids=["4096-by-one", "4096-by-64KiB", "default-1MiB-with-2MiB"],
)
def test_frame_over_the_limit_closes_only_that_connection(
    zkgate_factory: ServerFactory[ZkgateServer], max_buffer: int | None, length: int,
    unique_path: str,
) -> None:  # fmt: skip
    server = zkgate_factory([] if max_buffer is None else ["--max-buffer", str(max_buffer)])
    with kazoo_client(server.address) as kazoo, wire_client(server.host, server.port) as bad:
        kazoo.create(unique_path, b"")
        bad.connect()
        # Only the length and the start of the frame: the server must refuse on
        # the length alone, not wait for (or buffer) what it announces.
        bad.sock.sendall(_LENGTH.pack(length) + struct.pack(">ii", 1, OpCode.GET_DATA))
        assert read_until_closed(bad) == b""
        assert_still_serving(server, kazoo, unique_path)


def test_frame_over_the_limit_before_connect_is_refused(
    small_buffer_server: ZkgateServer, unique_path: str
) -> None:
    server = small_buffer_server
    with kazoo_client(server.address) as kazoo, wire_client(server.host, server.port) as bad:
        kazoo.create(unique_path, b"")
        bad.sock.sendall(_LENGTH.pack(4097) + bytes(64))
        assert read_until_closed(bad) == b""
        assert_still_serving(server, kazoo, unique_path)


def test_negative_length_closes_the_connection(zkgate: ZkgateServer, unique_path: str) -> None:
    with kazoo_client(zkgate.address) as kazoo, wire_client(zkgate.host, zkgate.port) as bad:
        kazoo.create(unique_path, b"")
        bad.connect()
        bad.sock.sendall(_LENGTH.pack(-5) + bytes(16))
        assert read_until_closed(bad) == b""
        assert_still_serving(zkgate, kazoo, unique_path)


def test_set_data_over_the_limit_is_refused_by_closing(
    small_buffer_server: ZkgateServer, unique_path: str
) -> None:
    server = small_buffer_server
    with kazoo_client(server.address) as kazoo, wire_client(server.host, server.port) as bad:
        stat = kazoo.create(unique_path, b"small", include_data=True)[1]
        bad.connect()
        bad.sock.sendall(setdata_frame(1, unique_path, b"x" * 8000))
        assert read_until_closed(bad) == b""
        assert kazoo.get(unique_path) == (b"small", stat), "the refused write must not apply"
        # A frame of exactly the limit is accepted (ZooKeeper refuses len > maxbuffer).
        overhead = len(setdata_frame(1, unique_path, b"")) - 4
        fitting = b"y" * (4096 - overhead)
        assert len(setdata_frame(1, unique_path, fitting)) - 4 == 4096
        with wire_client(server.host, server.port) as good:
            good.connect()
            reply = good.call(OpCode.SET_DATA, SetDataRequest(unique_path, fitting, -1))
            assert reply.header.err == Err.OK
        assert kazoo.get(unique_path)[0] == fitting
        assert_still_serving(server, kazoo, unique_path)


# ------------------------------------------------------------ undecodable input

GARBAGE_CONNECTS = {
    "too-short": _LENGTH.pack(5) + b"hello",
    "passwd-past-the-frame": _LENGTH.pack(28)
    + struct.pack(">iqiq", 0, 0, 30000, 0)
    + _LENGTH.pack(1000),
    "http": b"GET / HTTP/1.1\r\nHost: zk\r\n\r\n",
    "tls-client-hello": bytes.fromhex("16030100c8010000c40303") + bytes(200),
    "not-a-four-letter-word": b"abcd" + bytes(12),
}


@pytest.mark.parametrize("payload", list(GARBAGE_CONNECTS.values()), ids=list(GARBAGE_CONNECTS))
def test_garbage_instead_of_connect_request(
    zkgate: ZkgateServer, payload: bytes, unique_path: str
) -> None:
    with kazoo_client(zkgate.address) as kazoo, wire_client(zkgate.host, zkgate.port) as bad:
        kazoo.create(unique_path, b"")
        bad.sock.sendall(payload)
        answer = read_until_closed(bad)
        if answer:  # at most a refusal: never a session
            (length,) = _LENGTH.unpack_from(answer)
            response = ConnectResponse.read(Reader(answer[4 : 4 + length]))
            assert (response.session_id, response.timeout) == (0, 0)
        assert_still_serving(zkgate, kazoo, unique_path)


@pytest.mark.parametrize(
    "body",
    [
        _LENGTH.pack(1000) + b"/abc",  # path length pointing past the frame
        b"",  # no body at all
        _LENGTH.pack(4) + b"/ab",  # one byte short
    ],
    ids=["path-past-frame", "empty-body", "one-byte-short"],
)
def test_truncated_request_body_never_succeeds(
    zkgate: ZkgateServer, body: bytes, unique_path: str
) -> None:
    """A getData whose body does not decode gets no data.

    ZooKeeper 3.8 answers MARSHALLINGERROR (-5) and keeps the connection;
    zkgate may instead close the connection (DESIGN.md: an undecodable frame
    closes it). Either way the session's other clients are unaffected.
    """
    with kazoo_client(zkgate.address) as kazoo, wire_client(zkgate.host, zkgate.port) as bad:
        kazoo.create(unique_path, b"")
        bad.connect()
        payload = struct.pack(">ii", 1, OpCode.GET_DATA) + body
        bad.send_frame(payload)
        try:
            reply = bad.receive(1)
        except (ConnectionError, OSError):
            pass  # closed: the design's answer
        else:
            assert reply.header.err == Err.MARSHALLINGERROR
            # ...and then the connection still works, as with ZooKeeper.
            again = bad.call(OpCode.GET_DATA, PathWatchRequest(unique_path, False))
            assert again.header.err == Err.OK
        assert_still_serving(zkgate, kazoo, unique_path)


def test_frame_shorter_than_a_request_header(zkgate: ZkgateServer, unique_path: str) -> None:
    with kazoo_client(zkgate.address) as kazoo, wire_client(zkgate.host, zkgate.port) as bad:
        kazoo.create(unique_path, b"")
        bad.connect()
        bad.send_frame(struct.pack(">i", 1))
        assert read_until_closed(bad) == b""
        assert_still_serving(zkgate, kazoo, unique_path)


def _unknown_opcode_exchange(host: str, port: int) -> tuple[ReplyHeader, bytes]:
    """Send opcode 55 on a fresh session; the reply header and what follows it."""
    with wire_client(host, port) as client:
        client.connect()
        assert client.call(OpCode.EXISTS, PathWatchRequest("/", False)).header.err == Err.OK
        client.send_frame(struct.pack(">ii", 7, 55) + b"anything")
        payload = client.read_frame()
        assert payload is not None, "no reply to an unknown opcode"
        header = ReplyHeader.read(Reader(payload))
        assert payload[16:] == b"", "the error reply has no body"
        return header, read_until_closed(client)


def test_unknown_opcode_is_unimplemented_then_closed_like_zookeeper(
    zkgate: ZkgateServer, zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    expected = (ReplyHeader(xid=7, zxid=-1, err=Err.UNIMPLEMENTED), b"")
    assert _unknown_opcode_exchange(zookeeper.host, zookeeper.port) == expected
    with kazoo_client(zkgate.address) as kazoo:
        kazoo.create(unique_path, b"")
        assert _unknown_opcode_exchange(zkgate.host, zkgate.port) == expected
        assert_still_serving(zkgate, kazoo, unique_path)


# ------------------------------------------------------------ bounded buffering


def test_ten_thousand_pipelined_requests_all_answered_in_order(
    zkgate: ZkgateServer, unique_path: str
) -> None:
    """Per-session FIFO under backpressure: nothing dropped, nothing reordered.

    The replies (about 40 MB) are far more than the server may buffer for one
    connection plus what the kernel holds, so it has to stop reading the
    requests, and resume once the client reads.
    """
    gets, value_size = 10_000, 4000
    with wire_client(zkgate.host, zkgate.port) as client:
        client.connect(timeout_ms=30_000)
        value = b"v" * value_size
        created = client.call(OpCode.CREATE, CreateRequest(unique_path, value, OPEN_ACL_UNSAFE, 0))
        assert created.header.err == Err.OK
        # 10,000 getData with a setData before every 1,000th: each get must see
        # exactly the value of the last set before it.
        frames, expected = [], []
        xid = 0
        current = value
        for index in range(gets):
            if index % 1000 == 0:
                xid += 1
                current = str(index).encode().ljust(value_size, b".")
                frames.append(setdata_frame(xid, unique_path, current))
                expected.append((xid, OpCode.SET_DATA, current))
            xid += 1
            frames.append(getdata_frame(xid, unique_path))
            expected.append((xid, OpCode.GET_DATA, current))
        stream = b"".join(frames)

        failure: list[BaseException] = []

        def send_all() -> None:
            try:
                client.sock.sendall(stream)
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        # Read nothing until the server has stopped reading this connection:
        # requests wait, unread, in its socket, and their number stays put.
        local_port = client.sock.getsockname()[1]
        wait_for(
            _StallDetector(zkgate.port, local_port),
            timeout=30,
            message="server stops reading a connection whose replies are not read",
        )

        for want_xid, opcode, want_data in expected:
            payload = client.read_frame()
            assert payload is not None, f"connection closed before xid {want_xid}"
            header = ReplyHeader.read(Reader(payload))
            assert (header.xid, header.err) == (want_xid, Err.OK)
            if opcode == OpCode.GET_DATA:
                body = GetDataResponse.read(Reader(payload[16:]))
                assert body.data == want_data, f"xid {want_xid} saw a stale or future value"
        sender.join(timeout=30)
        assert not sender.is_alive() and not failure, failure
        # Nothing extra either.
        assert client.call(OpCode.PING).header.err == Err.OK


class _StallDetector:
    """True once the server side of a loopback connection has had the same
    non-empty receive queue (unread requests) for ``samples`` polls in a row."""

    def __init__(self, server_port: int, client_port: int, samples: int = 6) -> None:
        self.local = f"0100007F:{server_port:04X}"
        self.remote = f"0100007F:{client_port:04X}"
        self.samples = samples
        self.history: list[int] = []

    def rx_queue(self) -> int:
        for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[1] == self.local and fields[2] == self.remote:
                return int(fields[4].split(":")[1], 16)
        raise AssertionError("the connection is gone from /proc/net/tcp")

    def __call__(self) -> bool:
        self.history = [*self.history[-(self.samples - 1) :], self.rx_queue()]
        return (
            len(self.history) == self.samples
            and len(set(self.history)) == 1
            and (self.history[0] > 0)
        )


def test_client_that_never_reads_stops_being_read(zkgate: ZkgateServer, unique_path: str) -> None:
    """The server stops taking requests from a connection whose replies pile up,
    and keeps serving everyone else with bounded memory."""
    assert zkgate.pid is not None
    with kazoo_client(zkgate.address) as kazoo:
        kazoo.create(unique_path, b"z" * 4000)
        baseline = rss_kib(zkgate.pid)
        with wire_client(zkgate.host, zkgate.port) as hog:
            hog.connect(timeout_ms=30_000)
            flooder = Flooder(hog.sock, unique_path, stall=1.0, limit=1 << 30)
            flooder.start()
            try:
                assert flooder.blocked.wait(timeout=60), (
                    f"the server kept reading: {flooder.sent} bytes of requests taken"
                )
                assert not flooder.reset.is_set()
                # The requests it took are bounded by its buffers, not by the client.
                assert flooder.sent < 256 * 1024 * 1024
                assert_still_serving(zkgate, kazoo, unique_path)
                growth_mib = (rss_kib(zkgate.pid) - baseline) / 1024
                assert growth_mib < 200, f"server grew by {growth_mib:.0f} MiB"
            finally:
                flooder.stop.set()
        assert_still_serving(zkgate, kazoo, unique_path)
        flooder.join(timeout=CLOSE_TIMEOUT)


def test_session_of_a_client_that_never_reads_expires_and_is_disconnected(
    zkgate_factory: ServerFactory[ZkgateServer], unique_path: str
) -> None:
    """A stuck connection does not pin its socket forever.

    Once the server stops reading a connection, nothing renews its session;
    when the session times out the server must close the socket (ZooKeeper
    3.8 does: ``Expiring session ..., timeout of 400ms exceeded`` then the
    connection is closed and the client sees it reset), even though unsent
    replies are stuck in it. Otherwise every such client holds a socket, its
    file descriptor and its buffered replies for as long as it likes.
    """
    server = zkgate_factory(["--tick-ms", "200"])
    with kazoo_client(server.address) as kazoo:
        kazoo.create(unique_path, b"z" * 4000)
        with wire_client(server.host, server.port) as hog:
            session = hog.connect(timeout_ms=400)
            assert session.timeout == 400
            flooder = Flooder(hog.sock, unique_path, stall=0.5, limit=1 << 30)
            flooder.start()
            try:
                assert flooder.blocked.wait(timeout=30), "the server never stopped reading"
                stuck_at = time.monotonic()
                assert flooder.reset.wait(timeout=CLOSE_TIMEOUT), (
                    f"connection still open {time.monotonic() - stuck_at:.0f}s after the "
                    "server stopped reading it; its 400 ms session has long expired"
                )
            finally:
                flooder.stop.set()
            flooder.join(timeout=CLOSE_TIMEOUT)
        assert_still_serving(server, kazoo, unique_path)
