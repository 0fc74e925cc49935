"""Fault tests that stay: crashes, hostile peers and connection storms against real processes.

Three things a user relies on, each checked against ``zkgate serve`` (and
``zkgate meta``) run as the child processes users run:

* **kill -9 loses no acknowledged write.** Eight writers create and set
  znodes of their own over the raw wire, pipelined, and record every write
  the server acknowledged; the server is killed with SIGKILL at a random
  moment, started again on the same data directory, and every znode must
  hold at least the value of its last acknowledged write (a write still in
  flight may or may not have landed, but an older value, or no znode, is a
  lost write).
* **A hostile frame costs one connection, never the process.** The
  subscription server and the Meta Server are fed the frames that used to
  end the process (nesting deep enough to exhaust the parser's stack, a
  5,000-digit integer, strings that are not UTF-8, wrong types, an
  oversized or truncated frame), before and after a valid Hello; the admin
  endpoint is fed HTTP garbage. The peer gets an ``Error`` (or a 4xx) where
  one can still be sent, its connection closes, and a fresh client is then
  served as usual; the ZooKeeper face still answers.
* **A connection storm leaves nothing behind.** A thousand connections (by default)
  opened and closed against each listener; afterwards the server's own
  counts (``mntr``, ``/metrics``) are back where they started, and so are
  the process's file descriptors, with its memory within a margin.

The counts are small by default so that the module stays well under a
minute and a half on two cores; the environment variables below make the
long runs that ``RELIABILITY.md`` reports.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import resource
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final, Literal

import attrs
import pytest
import trio
from kazoo.client import KazooClient
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import wire
from dispatcher.zk.codec import jute
from dispatcher.zk.codec.protocol import CreateMode, Err, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    ConnectRequest,
    ConnectResponse,
    CreateRequest,
    GetDataResponse,
    PathWatchRequest,
    ReplyHeader,
    SetDataRequest,
)
from tests.servers import LOOPBACK, ServerFactory, ZkgateServer, free_port, wait_for
from tests.test_metaserver import TOKEN as META_TOKEN
from tests.test_metaserver import MetaProcess, meta_config_text
from tests.zkwire import WireClient


def _env_int(name: str, default: int) -> int:
    """A positive count from the environment (for long runs), or ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, not {raw!r}")
    return value


#: kill -9 cycles (``RELIABILITY.md`` reports a run of 25).
KILL_CYCLES: Final = _env_int("ZKGATE_KILL_CYCLES", 3)
#: The longest random wait (milliseconds) between the writers' warm-up and the
#: kill: longer windows make more acknowledged writes per cycle.
KILL_WINDOW_MS: Final = _env_int("ZKGATE_KILL_WINDOW_MS", 500)
#: Connections per listener in a storm (``RELIABILITY.md`` reports 10,000).
STORM_CONNECTIONS: Final = _env_int("ZKGATE_STORM_CONNECTIONS", 1000)

WRITERS: Final = 8
#: Requests each writer keeps in flight: more than one, so that a kill lands
#: between a write reaching the server and its answer reaching the writer.
WINDOW: Final = 8
#: Znodes per writer: enough for creates to keep happening in every cycle.
KEYS_PER_WRITER: Final = 200
#: Acknowledged writes each writer must see in a cycle before the kill may come.
ACKS_BEFORE_KILL: Final = 50

SUBSCRIPTION_TOKEN: Final = "reliability-token"
TICK_MS: Final = 200
#: A storm session dropped without closeSession expires after this (10 ticks):
#: short, so the storm's end is soon clean, yet long enough that a loaded
#: machine's scheduling stall does not expire a session between its requests.
SHORT_SESSION_MS: Final = 10 * TICK_MS
TIMEOUT: Final = 10.0
#: Connections opened at once in a storm, within every listener's caps and the fd limit.
STORM_BATCH: Final = 32
#: The admin endpoint's: below its per-address cap (8 by default), at which a
#: newcomer evicts the connection waiting longest. Each storm connection sends
#: its request at once and reads to the close that follows the answer (after
#: its slot is released), so at most this many are ever open.
ADMIN_STORM_BATCH: Final = 4
#: Memory a storm may add after its warm-up quarter. Over a 10,000-connection
#: storm a leak of 3 KiB per connection (a session, a subscription, a socket
#: buffer) passes it; the suite's smaller storms catch only larger leaks, and
#: rely on the server's own counts and the fd count, which are exact.
RSS_MARGIN: Final = 16 * 1024 * 1024
#: File descriptors that may differ after a storm (log files reopened, SQLite's
#: WAL index, a kazoo thread's socket): nothing near one per connection.
FD_MARGIN: Final = 4


# ======================================================================= processes


@attrs.frozen
class Gateway:
    """One ``zkgate serve`` with every listener of this module on: the ZooKeeper
    face, the subscription server and the admin endpoint."""

    server: ZkgateServer
    subscription_port: int
    admin_port: int

    @property
    def pid(self) -> int:
        pid = self.server.pid
        assert pid is not None, "zkgate is not running"
        return pid


def start_gateway(factory: ServerFactory[ZkgateServer], directory: Path) -> Gateway:
    """A zkgate with subscriptions and the admin endpoint on loopback ports of its own.

    ``--max-client-cnxns 0``: a storm opens connections faster than the
    server retires them, and the per-address cap is not what is tested here.
    ``--4lw *``: ``cons`` and ``wchs`` show what a storm left behind.
    """
    subscription_port, admin_port = free_port(), free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "zkgate.toml"
    config.write_text(
        f'[subscriptions]\nlisten = "{LOOPBACK}:{subscription_port}"\n'
        f'token = "{SUBSCRIPTION_TOKEN}"\n'
    )
    server = factory(
        [
            "--config", str(config), "--admin-listen", f"{LOOPBACK}:{admin_port}",
            "--tick-ms", str(TICK_MS), "--max-client-cnxns", "0", "--4lw", "*",
        ]
    )  # fmt: skip
    return Gateway(server, subscription_port, admin_port)


def start_meta(factory: ServerFactory[MetaProcess], gateway: Gateway) -> MetaProcess:
    """A ``zkgate meta`` whose membership store is the gateway's own ZooKeeper face
    (a ZooKeeper-compatible store that is running anyway; no JVM to start)."""
    meta = factory(meta_config_text("zookeeper", gateway.server.address, "/zkgate-meta"))
    wait_for_lookups(meta)
    return meta


def wait_for_lookups(meta: MetaProcess) -> None:
    """Until the Meta Server answers a Lookup: it says "unavailable" from its first
    Hello until it has read its first membership view."""

    def looked_up() -> bool:
        try:
            with FrameSocket(meta.port) as client:
                client.hello(META_TOKEN)
                client.send(wire.Lookup(("reliability",)))
                return isinstance(client.receive(), wire.Assignment)
        except (OSError, AssertionError):
            return False

    wait_for(looked_up, timeout=TIMEOUT, message="the Meta Server answering Lookup")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no VmRSS")


def mntr(server: ZkgateServer) -> dict[str, str]:
    return dict(
        line.split("\t", 1) for line in server.four_letter("mntr").splitlines() if "\t" in line
    )


# ====================================================================== small clients


def zk_frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def frame(body: bytes) -> bytes:
    """A subscription-protocol frame: 4-byte big-endian length, then the body."""
    return struct.pack(">I", len(body)) + body


def http_get(port: int, target: str, *, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """``GET target`` on a connection of its own (closed by the server after the
    answer): the status and the body."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nhost: {LOOPBACK}\r\nconnection: close\r\n\r\n".encode()
        )
        status, _, body = read_http_response(sock)
    return status, body


def read_http_response(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 response from ``sock``: status, headers (lower-cased names) and body
    (``content-length`` bytes, or everything until EOF without one)."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed inside a response head: {bytes(data)!r}")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    version, status, *_ = status_line.split(b" ", 2)
    assert version == b"HTTP/1.1", status_line
    headers: dict[bytes, bytes] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = bytearray(rest)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        while chunk := sock.recv(65536):
            body += chunk
    return int(status), headers, bytes(body)


def metrics(gateway: Gateway) -> dict[str, float]:
    """``/metrics`` as ``{sample: value}``, a labelled sample keyed as in the text
    format (``name{label="value"}``)."""
    status, body = http_get(gateway.admin_port, "/metrics")
    assert status == 200, body
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def internal_errors(gateway: Gateway) -> float:
    """Connections any listener closed on an unexpected exception, all listeners together."""
    return sum(
        value
        for name, value in metrics(gateway).items()
        if name.startswith("zkgate_internal_errors_total")
    )


class FrameSocket:
    """A blocking subscription-protocol client that can also send raw bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        self._decoder = wire.FrameDecoder()
        self._ready: collections.deque[wire.Message] = collections.deque()

    def send(self, message: wire.Message) -> None:
        self.sock.sendall(wire.encode(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> wire.Message | None:
        """The next message, or None once the server has closed the connection."""
        while not self._ready:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def hello(self, token: str) -> wire.Welcome:
        self.send(wire.Hello(wire.PROTOCOL_VERSION, token, "reliability"))
        welcome = self.receive()
        assert isinstance(welcome, wire.Welcome), welcome
        return welcome

    def closed(self) -> bool:
        """True once the server has closed its end (what it still sends is read and
        dropped); the socket's timeout bounds the wait."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> FrameSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ===================================================================== kill -9


@attrs.define
class _Key:
    """One writer's znode: the sequence numbers of its writes."""

    #: The last write the server acknowledged (None: its create was never acknowledged).
    acked: int | None = None
    #: The last write sent.
    sent: int = 0


@attrs.define
class _Write:
    xid: int
    path: str
    seq: int


class ZnodeWriter:
    """One of the concurrent writers: creates and sets its own znodes, pipelined,
    and records each acknowledgement. Its state carries over from cycle to cycle."""

    def __init__(self, index: int, root: str, seed: int) -> None:
        self.root = f"{root}/w{index}"
        self.keys: dict[str, _Key] = {}
        self._random = random.Random(seed)
        self._seq = 0
        self._next_key = 0
        #: Acknowledgements in the current cycle.
        self.acked = 0
        self.error: BaseException | None = None

    def run(self, host: str, port: int, killing: threading.Event) -> None:
        """Write until the server goes away; an error other than the kill is kept."""
        try:
            with WireClient(host, port, timeout=TIMEOUT) as client:
                client.connect(timeout_ms=10_000)
                window: collections.deque[_Write] = collections.deque()
                while True:
                    while len(window) < WINDOW:
                        window.append(self._send_one(client))
                    write = window.popleft()
                    reply = client.receive(write.xid)
                    if reply.header.err != Err.OK:
                        raise AssertionError(
                            f"{write.path}: error {Err(reply.header.err).name} for write "
                            f"{write.seq}"
                        )
                    key = self.keys[write.path]
                    key.acked = write.seq
                    self.acked += 1
        except OSError as exc:  # ConnectionError (EOF) and TimeoutError included
            if not killing.is_set():
                self.error = exc  # the connection failed while the server was up
        except BaseException as exc:
            self.error = exc

    def _send_one(self, client: WireClient) -> _Write:
        self._seq += 1
        data = str(self._seq).encode()
        ready = [path for path, key in self.keys.items() if key.acked is not None]
        if len(self.keys) < KEYS_PER_WRITER and (not ready or self._random.random() < 0.2):
            path = f"{self.root}/k{self._next_key}"
            self._next_key += 1
            self.keys[path] = _Key(sent=self._seq)
            xid = client.send(OpCode.CREATE, CreateRequest(path, data, OPEN_ACL_UNSAFE, 0))
        else:
            # Only znodes whose create was acknowledged: a set may then never
            # meet a create that did not survive the kill.
            path = self._random.choice(ready)
            self.keys[path].sent = self._seq
            xid = client.send(OpCode.SET_DATA, SetDataRequest(path, data, -1))
        return _Write(xid, path, self._seq)


@attrs.define
class _Verdict:
    lost: list[str] = attrs.field(factory=list)
    #: Writes in flight at the kill that turned out to have landed.
    landed_unacknowledged: int = 0


def verify_after_restart(server: ZkgateServer, writers: list[ZnodeWriter]) -> _Verdict:
    """Read every znode written; what is there becomes each writer's new baseline."""
    verdict = _Verdict()
    with WireClient(server.host, server.port, timeout=TIMEOUT) as client:
        client.connect()
        for writer in writers:
            for path, key in list(writer.keys.items()):
                reply = client.call(OpCode.GET_DATA, PathWatchRequest(path, False))
                if reply.header.err == Err.NONODE:
                    if key.acked is not None:
                        verdict.lost.append(f"{path}: gone, last acknowledged write {key.acked}")
                    # A create that was never acknowledged and did not land: the
                    # name is never used again.
                    del writer.keys[path]
                    continue
                assert reply.header.err == Err.OK, (path, reply.header)
                response = reply.decode(OpCode.GET_DATA)
                assert isinstance(response, GetDataResponse) and response.data is not None
                value = int(response.data)
                if key.acked is not None and value < key.acked:
                    verdict.lost.append(
                        f"{path}: holds write {value}, last acknowledged write {key.acked}"
                    )
                assert value <= key.sent, f"{path}: holds {value}, never sent (last {key.sent})"
                if key.acked is None or value > key.acked:
                    verdict.landed_unacknowledged += 1
                key.acked = key.sent = value
    return verdict


def test_acknowledged_writes_survive_kill_9_under_concurrent_writers(
    zkgate_factory: ServerFactory[ZkgateServer], unique_path: str
) -> None:
    server = zkgate_factory()
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    writers = [ZnodeWriter(index, unique_path, seed + index) for index in range(WRITERS)]
    with WireClient(server.host, server.port) as setup:
        setup.connect()
        for path in [unique_path, *(writer.root for writer in writers)]:
            reply = setup.call(OpCode.CREATE, CreateRequest(path, b"", OPEN_ACL_UNSAFE, 0))
            assert reply.header.err == Err.OK, (path, reply.header)

    acknowledged = landed = 0
    lost: list[str] = []
    for cycle in range(KILL_CYCLES):
        killing = threading.Event()
        for writer in writers:
            writer.acked = 0
        threads = [
            threading.Thread(
                target=writer.run, args=(server.host, server.port, killing), daemon=True
            )
            for writer in writers
        ]
        for thread in threads:
            thread.start()
        wait_for(
            lambda: all(w.acked >= ACKS_BEFORE_KILL or w.error for w in writers),
            timeout=60,
            message=f"cycle {cycle}: {ACKS_BEFORE_KILL} acknowledged writes per writer",
        )
        # The moment of the kill is what is being varied, not a wait for anything.
        time.sleep(rng.uniform(0.0, KILL_WINDOW_MS / 1000))
        killing.set()
        server.kill()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
            assert not thread.is_alive(), "a writer did not notice the kill"
        errors = [f"{w.root}: {w.error!r}" for w in writers if w.error is not None]
        assert not errors, f"cycle {cycle} (seed {seed}): writers failed before the kill: {errors}"
        acknowledged += sum(writer.acked for writer in writers)

        server.start()
        verdict = verify_after_restart(server, writers)
        lost += [f"cycle {cycle}: {line}" for line in verdict.lost]
        landed += verdict.landed_unacknowledged

    print(
        f"\nkill -9: cycles={KILL_CYCLES} writers={WRITERS} acknowledged={acknowledged} "
        f"lost={len(lost)} landed_unacknowledged={landed} seed={seed}"
    )
    assert not lost, f"acknowledged writes lost (seed {seed}):\n" + "\n".join(lost[:50])
    assert acknowledged >= KILL_CYCLES * WRITERS * ACKS_BEFORE_KILL


# ================================================================== hostile frames

_DEEP_ARRAY: Final = b"[" * 100_000 + b"]" * 100_000
_DEEP_OBJECT: Final = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
_DIGITS: Final = b"9" * 5000


def _hello_body(
    version: bytes = b"1", token: bytes = b'"TOKEN"', client_id: bytes = b'"x"'
) -> bytes:
    return b'{"type":"hello","version":%s,"token":%s,"client_id":%s}' % (version, token, client_id)


@attrs.frozen
class Hostile:
    """One hostile input and what the server must do with it.

    ``payload`` may contain ``TOKEN``, replaced by the listener's own token
    (a frame that is wrong only in the field under test). ``expect``:
    ``"error"``: an Error message, then the connection closes;
    ``"closed"``: the connection closes (an Error before that is allowed:
    the frame may be unanswerable, such as one cut short by the client).
    """

    name: str
    payload: bytes
    after_hello: bool
    expect: Literal["error", "closed"] = "error"
    #: Half-close after sending (the frame is cut short by the client).
    shutdown: bool = False


def _hostile_frames() -> list[Hostile]:
    before = [
        Hostile("deep-array", frame(_DEEP_ARRAY), False),
        Hostile("deep-object", frame(_DEEP_OBJECT), False),
        Hostile("hello-5000-digit-version", frame(_hello_body(version=_DIGITS)), False),
        Hostile("hello-5000-digit-token", frame(_hello_body(token=_DIGITS)), False),
        Hostile("hello-float-overflow-version", frame(_hello_body(version=b"1e999")), False),
        Hostile("hello-nan-version", frame(_hello_body(version=b"NaN")), False),
        Hostile("hello-deep-client-id", frame(_hello_body(client_id=_DEEP_ARRAY)), False),
        Hostile("hello-surrogate-token", frame(_hello_body(token=b'"\\ud800"')), False),
        Hostile("hello-wrong-types",
                frame(_hello_body(version=b'"1"', token=b'["TOKEN"]', client_id=b"{}")), False),
        Hostile("hello-huge-client-id",
                frame(_hello_body(client_id=b'"' + b"\\u0041" * 200_000 + b'"')), False),
        Hostile("type-is-a-list", frame(b'{"type":["hello"]}'), False),
        Hostile("type-is-an-object", frame(b'{"type":{"a":1}}'), False),
        Hostile("not-an-object", frame(b'"hello"'), False),
        Hostile("empty-frame", frame(b""), False),
        Hostile("not-utf8", frame(b'{"type":"hello","token":"\xff\xfe"}'), False),
        Hostile("length-over-max", struct.pack(">I", 0xFFFF_FFFF), False),
        Hostile("truncated-then-close", struct.pack(">I", 1000) + b'{"type":"hel', False,
                expect="closed", shutdown=True),
    ]  # fmt: skip
    after = [
        Hostile("deep-array", frame(_DEEP_ARRAY), True),
        Hostile("deep-object", frame(_DEEP_OBJECT), True),
        Hostile("deep-field", frame(b'{"type":"ping","x":' + _DEEP_ARRAY + b"}"), True),
        Hostile("huge-int-version",
                frame(b'{"type":"subscribe","services":{"a":%s}}' % _DIGITS), True),
        Hostile("huge-int-ack", frame(b'{"type":"ack","service":"a","version":%s}' % _DIGITS),
                True),
        Hostile("huge-int-in-list", frame(b'{"type":"lookup","services":[%s]}' % _DIGITS), True),
        Hostile("second-hello", frame(_hello_body()), True),
        Hostile("services-wrong-type", frame(b'{"type":"subscribe","services":["a"]}'), True),
        Hostile("fields-wrong-type",
                frame(b'{"type":"report","service":5,"instance_id":null,"reason":[]}'), True),
        Hostile("type-is-a-list", frame(b'{"type":["ping"]}'), True),
        Hostile("unknown-type", frame(b'{"type":"no-such-message"}'), True),
        Hostile("not-utf8", frame(b'{"type":"ping","x":"\xc3\x28"}'), True),
        Hostile("length-over-max", struct.pack(">I", wire.MAX_FRAME + 1), True),
        Hostile("truncated-then-close", struct.pack(">I", 1000) + b'{"type":"pi', True,
                expect="closed", shutdown=True),
    ]  # fmt: skip
    return before + after


HOSTILE_FRAMES: Final = tuple(_hostile_frames())
_HOSTILE_IDS: Final = tuple(f"{'after' if h.after_hello else 'before'}-hello-{h.name}"
                            for h in HOSTILE_FRAMES)  # fmt: skip


@attrs.define
class _Targets:
    """The module's long-lived processes for the hostile-frame tests."""

    zkgates: ServerFactory[ZkgateServer]
    metas: ServerFactory[MetaProcess]
    gateway: Gateway
    meta: MetaProcess

    def revive(self) -> None:
        """Start again whatever a previous test's frame took down, so that one crash
        fails one test, not every test after it. A process that no longer answers
        may still be on its way out: it is killed first."""
        server = self.gateway.server
        if not (server.running and _answers(lambda: server.four_letter("ruok", 2.0) == "imok")):
            server.kill()
            server.start()
        if not (self.meta.running and _answers(lambda: _welcomed(self.meta.port, META_TOKEN))):
            self.meta.kill()
            self.meta.start()
            wait_for_lookups(self.meta)


def _answers(probe: Callable[[], bool]) -> bool:
    try:
        return probe()
    except (OSError, AssertionError):
        return False


def _welcomed(port: int, token: str) -> bool:
    with FrameSocket(port) as client:
        client.hello(token)
    return True


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Targets]:
    base = tmp_path_factory.mktemp("hostile")
    zkgates = ServerFactory(ZkgateServer, base, "zkgate")
    metas = ServerFactory(MetaProcess, base, "meta")
    try:
        gateway = start_gateway(zkgates, base / "config")
        yield _Targets(zkgates, metas, gateway, start_meta(metas, gateway))
    finally:
        metas.close()
        zkgates.close()


@pytest.fixture
def hostile(targets: _Targets) -> _Targets:
    targets.revive()
    return targets


def _exited(process: ZkgateServer | MetaProcess) -> str:
    return f"{process.kind} exited; last lines of its log:\n{process.log_tail(40)}"


#: The codes of ``wire.Error`` a refused peer may get. Not "internal": every
#: hostile frame here must be refused by the parser, not by the catch-all.
ERROR_CODES: Final = frozenset({"bad-request", "unauthenticated", "unsupported-version"})


def with_token(payload: bytes, token: str) -> bytes:
    """``payload`` with the listener's token in place of ``TOKEN``, its length
    prefix recomputed (only whole frames carry the placeholder)."""
    if b"TOKEN" not in payload:
        return payload
    (length,) = struct.unpack_from(">I", payload)
    assert len(payload) == 4 + length, "TOKEN is only for whole frames"
    return frame(payload[4:].replace(b"TOKEN", token.encode()))


def feed(port: int, token: str, case: Hostile) -> None:
    """Send one hostile input on a fresh connection and check the answer."""
    with FrameSocket(port) as client:
        if case.after_hello:
            client.hello(token)
        try:
            client.send_raw(with_token(case.payload, token))
            if case.shutdown:
                client.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            # The server may refuse from the first bytes and close before the
            # rest arrives; what it sent before closing is still read below.
            pass
        answer = client.receive()
        if case.expect == "error":
            assert isinstance(answer, wire.Error), f"expected an Error, got {answer!r}"
            assert answer.code in ERROR_CODES, answer
        else:
            assert answer is None or isinstance(answer, wire.Error), answer
        assert client.closed()


def assert_zookeeper_face_serves(server: ZkgateServer) -> None:
    assert server.running, _exited(server)
    assert server.four_letter("ruok") == "imok"
    with WireClient(server.host, server.port, timeout=TIMEOUT) as client:
        client.connect()
        reply = client.call(OpCode.EXISTS, PathWatchRequest("/", False))
        assert reply.header.err == Err.OK


def assert_subscriptions_serve(gateway: Gateway) -> None:
    assert gateway.server.running, _exited(gateway.server)
    with FrameSocket(gateway.subscription_port) as client:
        client.hello(SUBSCRIPTION_TOKEN)
        client.send(wire.Subscribe({"reliability": None}))
        full = client.receive()
        assert isinstance(full, wire.Full) and full.service == "reliability", full


def assert_meta_serves(meta: MetaProcess) -> None:
    assert meta.running, _exited(meta)
    with FrameSocket(meta.port) as client:
        client.hello(META_TOKEN)
        client.send(wire.Lookup(("reliability",)))
        answer = client.receive()
        assert isinstance(answer, wire.Assignment) and "reliability" in answer.owners, answer


@pytest.mark.parametrize("case", HOSTILE_FRAMES, ids=_HOSTILE_IDS)
def test_a_hostile_frame_to_the_subscription_server_costs_only_its_connection(
    hostile: _Targets, case: Hostile
) -> None:
    gateway = hostile.gateway
    try:
        feed(gateway.subscription_port, SUBSCRIPTION_TOKEN, case)
    finally:
        assert_subscriptions_serve(gateway)
        assert_zookeeper_face_serves(gateway.server)


@pytest.mark.parametrize("case", HOSTILE_FRAMES, ids=_HOSTILE_IDS)
def test_a_hostile_frame_to_the_meta_server_costs_only_its_connection(
    hostile: _Targets, case: Hostile
) -> None:
    try:
        feed(hostile.meta.port, META_TOKEN, case)
    finally:
        assert_meta_serves(hostile.meta)


@attrs.frozen
class HostileRequest:
    name: str
    payload: bytes
    #: Statuses the admin endpoint may answer with (CLOSED: no answer, the
    #: connection closed).
    statuses: frozenset[int]


_BAD: Final = frozenset({400})
#: A TLS handshake on the plain-text port is refused by closing (with a log
#: line): a TLS client could not read an HTTP answer anyway.
CLOSED: Final = 0
HOSTILE_REQUESTS: Final = (
    HostileRequest("content-length-5000-digits",
                   b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: " + _DIGITS + b"\r\n\r\n",
                   frozenset({400, 413})),
    HostileRequest("content-length-negative",
                   b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n", _BAD),
    HostileRequest("content-length-conflicting",
                   b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n"
                   b"content-length: 2\r\n\r\n", _BAD),
    HostileRequest("chunk-size-5000-digits",
                   b"POST /health HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                   + b"f" * 5000 + b"\r\n", frozenset({400, 413})),
    HostileRequest("huge-header",
                   b"GET /health HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 100_000 + b"\r\n\r\n",
                   frozenset({431})),
    HostileRequest("many-headers",
                   b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"a: b\r\n" * 5000 + b"\r\n",
                   frozenset({431})),
    HostileRequest("huge-target", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
                   frozenset({414, 431})),
    HostileRequest("body-over-limit",
                   b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n"
                   + b"x" * 100_000, frozenset({413})),
    HostileRequest("non-ascii-target", "GET /hé HTTP/1.1\r\nhost: x\r\n\r\n".encode(), _BAD),
    HostileRequest("non-ascii-header", b"GET /health HTTP/1.1\r\nhost: x\r\nx-\xff: \xfe\r\n\r\n",
                   _BAD),
    HostileRequest("nul-in-method", b"G\x00T /health HTTP/1.1\r\nhost: x\r\n\r\n", _BAD),
    HostileRequest("unknown-method", b"BREW /health HTTP/1.1\r\nhost: x\r\n\r\n",
                   frozenset({400, 405, 501})),
    HostileRequest("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                   frozenset({400, 405, 505})),
    HostileRequest("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + bytes(100),
                   frozenset({CLOSED})),
    HostileRequest("no-host", b"GET /health HTTP/1.1\r\n\r\n", _BAD),
)  # fmt: skip


def assert_admin_serves(gateway: Gateway) -> None:
    assert gateway.server.running, _exited(gateway.server)
    status, body = http_get(gateway.admin_port, "/health")
    assert (status, body.strip()) == (200, b"ok")


@pytest.mark.parametrize("case", HOSTILE_REQUESTS, ids=[c.name for c in HOSTILE_REQUESTS])
def test_a_hostile_request_to_the_admin_endpoint_costs_only_its_connection(
    hostile: _Targets, case: HostileRequest
) -> None:
    gateway = hostile.gateway
    try:
        with socket.create_connection((LOOPBACK, gateway.admin_port), timeout=TIMEOUT) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(case.payload)
            try:
                status, _, _ = read_http_response(sock)
            except ConnectionError:
                status = CLOSED
            assert status in case.statuses
    finally:
        assert_admin_serves(gateway)
        assert_zookeeper_face_serves(gateway.server)


def test_a_request_sent_a_byte_at_a_time_holds_up_no_one_else(hostile: _Targets) -> None:
    gateway = hostile.gateway
    request = f"GET /health HTTP/1.1\r\nhost: {LOOPBACK}\r\nconnection: close\r\n\r\n".encode()
    with socket.create_connection((LOOPBACK, gateway.admin_port), timeout=TIMEOUT) as slow:
        for index, byte in enumerate(request):
            slow.sendall(bytes([byte]))
            if index % 10 == 0:
                # Other clients are answered while this one is still sending.
                assert_admin_serves(gateway)
            # The slowness is the subject: a byte every 20 ms, well inside the
            # endpoint's request deadline.
            time.sleep(0.02)
        status, _, body = read_http_response(slow)
    assert (status, body.strip()) == (200, b"ok")


def test_after_the_hostile_frames_zookeeper_clients_still_work(
    hostile: _Targets, unique_path: str
) -> None:
    """kazoo, a client nobody here wrote, against the gateway the frames above hit."""
    server = hostile.gateway.server
    client = KazooClient(hosts=server.address, timeout=TIMEOUT)
    client.start(timeout=15)
    try:
        client.create(unique_path, b"still here")
        assert client.get(unique_path)[0] == b"still here"
    finally:
        client.stop()
        client.close()


# ========================================================================= storms


class _ZkFrames:
    """Length-prefixed frames from a trio stream (ZooKeeper's framing)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def frame(self) -> bytes | None:
        while True:
            if len(self._buffer) >= 4:
                (length,) = struct.unpack_from(">i", self._buffer)
                if len(self._buffer) >= 4 + length:
                    payload = bytes(self._buffer[4 : 4 + length])
                    del self._buffer[: 4 + length]
                    return payload
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data


def _request(xid: int, opcode: int, record: CreateRequest | PathWatchRequest | None) -> bytes:
    w = jute.Writer()
    w.int(xid)
    w.int(opcode)
    if record is not None:
        record.write(w)
    return zk_frame(bytes(w.out))


async def zookeeper_session(port: int, index: int, root: str) -> None:
    """Connect, maybe leave an ephemeral and a watch behind, then close politely
    (closeSession) or just drop the connection (the session must then expire)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        frames = _ZkFrames(stream)
        w = jute.Writer()
        ConnectRequest(0, 0, SHORT_SESSION_MS, 0, bytes(16), False).write(w)
        await stream.send_all(zk_frame(bytes(w.out)))
        payload = await frames.frame()
        assert payload is not None, "closed instead of answering the connect request"
        assert ConnectResponse.read(jute.Reader(payload)).session_id != 0
        requests: list[bytes] = []
        if index % 4 == 1:
            requests.append(
                _request(
                    1,
                    OpCode.CREATE,
                    CreateRequest(f"{root}/e{index}", b"", OPEN_ACL_UNSAFE, CreateMode.EPHEMERAL),
                )
            )
            requests.append(_request(2, OpCode.EXISTS, PathWatchRequest(f"{root}/w{index}", True)))
        polite = index % 2 == 0
        if polite:
            requests.append(_request(3, OpCode.CLOSE_SESSION, None))
        await stream.send_all(b"".join(requests))
        for _ in requests:
            payload = await frames.frame()
            assert payload is not None, f"session {index}: closed before answering"
            header = ReplyHeader.read(jute.Reader(payload))
            assert header.err in (Err.OK, Err.NONODE), header
        if polite:
            assert await frames.frame() is None, "still open after closeSession"


async def subscription_session(port: int, index: int) -> None:
    stream = wire.WireStream(await trio.open_tcp_stream(LOOPBACK, port))
    try:
        await stream.send(wire.Hello(wire.PROTOCOL_VERSION, SUBSCRIPTION_TOKEN, f"storm-{index}"))
        assert isinstance(await stream.receive(), wire.Welcome)
        await stream.send(wire.Subscribe({f"storm-{index % 16}": None}))
        assert isinstance(await stream.receive(), wire.Full)
    finally:
        await stream.aclose()


async def meta_session(port: int, index: int) -> None:
    stream = wire.WireStream(await trio.open_tcp_stream(LOOPBACK, port))
    try:
        await stream.send(wire.Hello(wire.PROTOCOL_VERSION, META_TOKEN, f"storm-{index}"))
        assert isinstance(await stream.receive(), wire.Welcome)
        await stream.send(wire.Lookup((f"storm-{index % 16}",)))
        assert isinstance(await stream.receive(), wire.Assignment)
    finally:
        await stream.aclose()


async def admin_session(port: int, index: int) -> None:
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nhost: storm\r\nconnection: close\r\n\r\n")
        answer = bytearray()
        while data := await stream.receive_some(65536):
            answer += data
        assert answer.startswith(b"HTTP/1.1 200 "), bytes(answer[:200])


async def storm(count: int, session: Callable[[int], Awaitable[None]], batch: int) -> float:
    """``count`` sessions, ``batch`` at a time; the seconds it took."""
    started = time.monotonic()
    for first in range(0, count, batch):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(first, min(first + batch, count)):
                    nursery.start_soon(session, index)
    return time.monotonic() - started


@attrs.frozen
class _Usage:
    fds: int
    rss: int


def usage(pid: int) -> _Usage:
    return _Usage(open_fds(pid), rss_bytes(pid))


async def storm_and_measure(
    pid: int, session: Callable[[int], Awaitable[None]], what: str, batch: int = STORM_BATCH
) -> None:
    """A warm-up quarter (the allocator's high-water mark and the listener's
    first-use costs), then the rest of the storm; fds and memory must not have
    grown with it."""
    before = usage(pid)
    warmup = max(1, STORM_CONNECTIONS // 4)
    seconds = await storm(warmup, session, batch)
    warm = usage(pid)
    seconds += await storm(STORM_CONNECTIONS - warmup, lambda i: session(warmup + i), batch)

    def settled() -> _Usage | None:
        now = usage(pid)
        return now if now.fds <= before.fds + FD_MARGIN else None

    after = await trio.to_thread.run_sync(
        lambda: wait_for(settled, timeout=TIMEOUT, message=f"{what}: fds back to baseline")
    )
    assert isinstance(after, _Usage)
    print(
        f"\nstorm {what}: connections={STORM_CONNECTIONS} seconds={seconds:.1f} "
        f"fds {before.fds}->{after.fds} rss_mib {before.rss / 2**20:.1f}->"
        f"{warm.rss / 2**20:.1f}->{after.rss / 2**20:.1f}"
    )
    assert after.rss - warm.rss <= RSS_MARGIN, (before, warm, after)


def _raise_fd_limit() -> None:
    """Room for a batch of client sockets beside everything else this process holds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * STORM_BATCH + 1024))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def gateway(zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path) -> Gateway:
    _raise_fd_limit()
    return start_gateway(zkgate_factory, tmp_path / "config")


_ZK_COUNTS: Final = (
    "zk_num_alive_connections", "zk_global_sessions", "zk_ephemerals_count", "zk_watch_count",
)  # fmt: skip


async def test_a_zookeeper_connection_storm_leaves_no_session_ephemeral_or_watch(
    gateway: Gateway, unique_path: str
) -> None:
    server = gateway.server
    with WireClient(server.host, server.port) as setup:
        setup.connect()
        reply = setup.call(OpCode.CREATE, CreateRequest(unique_path, b"", OPEN_ACL_UNSAFE, 0))
        assert reply.header.err == Err.OK
        # Closed, not dropped: a session expiring during the storm would move the baseline.
        assert setup.call(OpCode.CLOSE_SESSION).header.err == Err.OK
    baseline = {key: mntr(server)[key] for key in _ZK_COUNTS}
    errors = internal_errors(gateway)

    await storm_and_measure(
        gateway.pid, lambda i: zookeeper_session(server.port, i, unique_path), "zookeeper"
    )

    def left() -> dict[str, str] | None:
        now = {key: mntr(server)[key] for key in _ZK_COUNTS}
        return None if now != baseline else now

    # Dropped sessions expire after their timeout; then nothing may remain.
    after = await trio.to_thread.run_sync(
        lambda: wait_for(left, timeout=TIMEOUT, message=f"mntr back to {baseline}")
    )
    print(f"storm zookeeper: mntr before {baseline}, after {after}")
    assert server.four_letter("cons").strip() == "", "connections listed after the storm"
    assert server.four_letter("wchs").splitlines()[-1] == "Total watches:0"
    assert internal_errors(gateway) == errors


async def test_a_subscription_storm_leaves_no_connection_or_subscription(
    gateway: Gateway,
) -> None:
    names = ("zkgate_subscription_connections", "zkgate_subscribers",
             "zkgate_subscription_connections_refused_total")  # fmt: skip
    baseline = {name: metrics(gateway)[name] for name in names}
    errors = internal_errors(gateway)

    await storm_and_measure(
        gateway.pid, lambda i: subscription_session(gateway.subscription_port, i), "subscriptions"
    )

    def back() -> dict[str, float] | None:
        now = {name: metrics(gateway)[name] for name in names}
        return now if now == baseline else None

    after = await trio.to_thread.run_sync(
        lambda: wait_for(back, timeout=TIMEOUT, message=f"/metrics back to {baseline}")
    )
    print(f"storm subscriptions: /metrics before {baseline}, after {after}")
    assert internal_errors(gateway) == errors
    await trio.to_thread.run_sync(assert_subscriptions_serve, gateway)


async def test_an_admin_storm_is_answered_in_full_and_leaves_nothing_open(
    gateway: Gateway,
) -> None:
    # Nothing refused or evicted: every storm connection was served.
    names = ("zkgate_admin_connections_refused_total", "zkgate_admin_connections_evicted_total")
    baseline = {name: metrics(gateway).get(name, 0.0) for name in names}
    errors = internal_errors(gateway)

    await storm_and_measure(
        gateway.pid, lambda i: admin_session(gateway.admin_port, i), "admin", ADMIN_STORM_BATCH
    )

    assert {name: metrics(gateway).get(name, 0.0) for name in names} == baseline
    assert internal_errors(gateway) == errors
    await trio.to_thread.run_sync(assert_admin_serves, gateway)


async def test_a_meta_server_storm_leaves_nothing_open(gateway: Gateway, tmp_path: Path) -> None:
    metas = ServerFactory(MetaProcess, tmp_path, "meta")
    try:
        meta = start_meta(metas, gateway)
        assert meta.pid is not None
        await storm_and_measure(meta.pid, lambda i: meta_session(meta.port, i), "meta")
        await trio.to_thread.run_sync(assert_meta_serves, meta)
    finally:
        metas.close()
