"""A raw-socket ZooKeeper load generator, the same for every server it measures.

Benchmarks compare zkgate with a real ZooKeeper on a 2-core machine where the
generator shares the CPU with the server under test, so the generator must be
both *identical* for the two servers and *cheap*. A real client library
(kazoo: a thread per connection, a full decode of every reply, a Python object
per request) would cost more CPU than the server it measures. So this module
speaks the wire protocol directly:

* every request frame is encoded once, up front; the hot loop only slices a
  pre-built buffer of ready frames;
* replies are framed by their 4-byte length prefix and checked only for the
  xid (per-connection FIFO order, which both servers promise) and the error
  code; bodies are never decoded;
* several connections are multiplexed by ``selectors`` in one process, and the
  workers run in separate processes (:mod:`multiprocessing`, spawn) so the
  benchmark driver's own work never lands inside a measurement window.

Two workloads: :func:`pipelined_worker` keeps ``window`` getData requests
outstanding on each connection (throughput), :func:`latency_worker` sends one
request at a time on one connection (latency). Phases are given as absolute
``time.monotonic()`` instants, which are system-wide on Linux, so several worker
processes and the driver (which samples the server's CPU time) agree on the
measurement window without any further coordination.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

# ----------------------------------------------------------------------------- wire

OP_CREATE = 1
OP_GET_DATA = 4
OP_SET_DATA = 5
OP_CLOSE_SESSION = -11
ERR_NODEEXISTS = -110
PERMS_ALL = 31

_INT = struct.Struct(">i")
_LONG = struct.Struct(">q")
_REQUEST_HEADER = struct.Struct(">ii")  # xid, opcode
_REPLY_HEADER = struct.Struct(">iiqi")  # length, xid, zxid, err
_REPLY_HEADER_SIZE = _REPLY_HEADER.size

#: How many distinct xids the pre-built request buffer cycles through; any
#: positive value works (servers echo xids), a large one makes reordering visible.
XID_CYCLE = 1 << 16

_RECEIVE_SIZE = 1 << 18
#: TLS records read per readable socket before looking at the others again.
_TLS_RECORDS_PER_WAKEUP = 64
#: "Nothing now" from a non-blocking socket, plain or TLS.
_NOT_NOW = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class LoadError(RuntimeError):
    """The server answered something the benchmark did not ask for."""


def _ustring(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _INT.pack(len(raw)) + raw


def _buffer(value: bytes) -> bytes:
    return _INT.pack(len(value)) + value


def _frame(xid: int, opcode: int, body: bytes) -> bytes:
    payload = _REQUEST_HEADER.pack(xid, opcode) + body
    return _INT.pack(len(payload)) + payload


def connect_frame(timeout_ms: int = 30000) -> bytes:
    """A ConnectRequest for a new session (protocol 0, no zxid seen, readOnly false)."""
    body = (
        _INT.pack(0)
        + _LONG.pack(0)
        + _INT.pack(timeout_ms)
        + _LONG.pack(0)
        + _buffer(bytes(16))
        + b"\x00"
    )
    return _INT.pack(len(body)) + body


def get_data_frame(xid: int, path: str, watch: bool = False) -> bytes:
    return _frame(xid, OP_GET_DATA, _ustring(path) + (b"\x01" if watch else b"\x00"))


def create_frame(xid: int, path: str, data: bytes) -> bytes:
    """A persistent create with the open world ACL."""
    acl = _INT.pack(1) + _INT.pack(PERMS_ALL) + _ustring("world") + _ustring("anyone")
    return _frame(xid, OP_CREATE, _ustring(path) + _buffer(data) + acl + _INT.pack(0))


def set_data_frame(xid: int, path: str, data: bytes) -> bytes:
    return _frame(xid, OP_SET_DATA, _ustring(path) + _buffer(data) + _INT.pack(-1))


def close_session_frame(xid: int) -> bytes:
    return _frame(xid, OP_CLOSE_SESSION, b"")


def parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


# --------------------------------------------------------------------------- TLS


@attrs.frozen
class ClientTls:
    """How the load generator reaches a TLS port: the CA that signed the server's
    certificate and, for a port that verifies clients, a client certificate.

    Paths rather than an :class:`ssl.SSLContext`, so that it can be handed to
    worker processes (a context cannot be pickled); each process builds its own.
    """

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    #: The newest TLS version offered; servers compared should speak the same one.
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
    #: The TLS 1.2 cipher suites offered (OpenSSL's list syntax); None: the defaults.
    ciphers: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = self.maximum_version
        if self.ciphers is not None:
            context.set_ciphers(self.ciphers)
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key)
        return context


# ------------------------------------------------------------ one blocking session


def read_frame(sock: socket.socket, buffer: bytearray) -> bytes:
    """Blocking read of one length-prefixed frame's payload from ``sock``;
    bytes of later frames stay in ``buffer``."""
    while True:
        if len(buffer) >= 4:
            (length,) = _INT.unpack_from(buffer, 0)
            if len(buffer) >= 4 + length:
                payload = bytes(buffer[4 : 4 + length])
                del buffer[: 4 + length]
                return payload
        chunk = sock.recv(_RECEIVE_SIZE)
        if not chunk:
            raise LoadError("the server closed the connection")
        buffer += chunk


class Session:
    """One blocking ZooKeeper connection with a session: setup, latency, teardown.

    Blocking on purpose: setup is not measured, and the latency workload is
    request/response, where a blocking ``recv`` is the cheapest possible wait.
    """

    def __init__(
        self, host: str, port: int, timeout: float = 10.0, tls: ClientTls | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            # The handshake happens here, outside any measurement window.
            self.sock = tls.context().wrap_socket(self.sock, server_hostname=host)
        self._pending = bytearray()
        self._xid = 0
        self.sock.sendall(connect_frame())
        reply = self.read_frame()
        # ConnectResponse: protocolVersion int, timeOut int, sessionId long, ...
        if len(reply) < 16:
            raise LoadError(f"short ConnectResponse from {host}:{port}")
        (self.session_id,) = _LONG.unpack_from(reply, 8)
        if self.session_id == 0:
            raise LoadError(f"{host}:{port} refused the session")

    def next_xid(self) -> int:
        self._xid += 1
        return self._xid

    def read_frame(self) -> bytes:
        """The next length-prefixed frame's payload (without its prefix)."""
        return read_frame(self.sock, self._pending)

    def call(self, frame: bytes) -> tuple[int, int, bytes]:
        """Send one request frame and return (xid, err, body) of the next non-event reply."""
        self.sock.sendall(frame)
        while True:
            payload = self.read_frame()
            xid, _zxid, err = struct.unpack_from(">iqi", payload, 0)
            if xid != -1:  # -1: a watch notification, not our reply
                return xid, err, payload[16:]

    def ensure_node(self, path: str, data: bytes) -> None:
        """Create ``path`` (and its parents) holding ``data``; overwrite it if present."""
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            node = "/" + "/".join(parts[:depth])
            leaf = depth == len(parts)
            _, err, _ = self.call(create_frame(self.next_xid(), node, data if leaf else b""))
            if err == ERR_NODEEXISTS and leaf:
                _, err, _ = self.call(set_data_frame(self.next_xid(), node, data))
            if err not in (0, ERR_NODEEXISTS):
                raise LoadError(f"creating {node}: ZooKeeper error {err}")

    def close(self) -> None:
        with contextlib.suppress(OSError, LoadError):
            self.sock.settimeout(2.0)
            self.call(close_session_frame(self.next_xid()))
        self.sock.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------ results


@attrs.frozen
class ThroughputSample:
    """What one worker process counted inside the measurement window."""

    replies: int
    seconds: float
    #: The worker's own user+system CPU time inside the window.
    cpu_seconds: float
    #: ``recv`` calls inside the window: replies per receive shows how well the
    #: server batches its writes (and what each reply costs the worker).
    receives: int
    #: Replies counted over the whole run (warm-up included), for sanity checks.
    total_replies: int

    @property
    def rate(self) -> float:
        return self.replies / self.seconds if self.seconds > 0 else 0.0


@attrs.frozen
class LatencySample:
    """Round-trip times of sequential requests, in nanoseconds, in send order."""

    nanos: tuple[int, ...]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------ pipelined workload


class _Pipe:
    """One non-blocking connection of the pipelined workload."""

    __slots__ = ("expected_xid", "leftover", "outstanding", "position", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.leftover = b""
        self.unsent: memoryview | None = None
        self.outstanding = 0
        #: Index (0-based) of the next pre-built frame to send; its xid is position + 1.
        self.position = 0
        self.expected_xid = 1


def _request_ring(path: str) -> tuple[memoryview, int]:
    """XID_CYCLE getData frames with xids 1..XID_CYCLE, then the same again.

    Sending ``n`` requests from position ``p`` is one zero-copy slice
    ``ring[p*size:(p+n)*size]`` as long as ``n <= XID_CYCLE``, whatever ``p`` is:
    that is why the cycle is stored twice.
    """
    frames = b"".join(get_data_frame(xid, path) for xid in range(1, XID_CYCLE + 1))
    size = len(frames) // XID_CYCLE
    return memoryview(frames + frames), size


def _send(pipe: _Pipe, ring: memoryview, size: int, count: int) -> None:
    start = pipe.position
    pipe.position = (start + count) % XID_CYCLE
    pipe.outstanding += count
    data = ring[start * size : (start + count) * size]
    if pipe.unsent is not None:
        # The socket is already full; queue behind what it did not take.
        pipe.unsent = memoryview(bytes(pipe.unsent) + bytes(data))
        return
    try:
        sent = pipe.sock.send(data)
    except _NOT_NOW:
        # A TLS socket that could not take a record retries with the same bytes
        # first (OpenSSL requires it), which queueing them here guarantees.
        sent = 0
    if sent < len(data):
        pipe.unsent = data[sent:]


def _flush(pipe: _Pipe) -> None:
    assert pipe.unsent is not None
    try:
        sent = pipe.sock.send(pipe.unsent)
    except _NOT_NOW:
        return
    pipe.unsent = pipe.unsent[sent:] if sent < len(pipe.unsent) else None


def _receive(sock: socket.socket) -> bytes | None:
    """What ``sock`` has now (b"" at its end), None if nothing yet.

    A TLS socket hands out one record (at most 16 KiB) per ``recv``; the
    records already in the kernel are read too, so that a window of replies
    costs one wake-up, as on a plain socket.
    """
    try:
        data = sock.recv(_RECEIVE_SIZE)
    except _NOT_NOW:
        return None
    if not data or not isinstance(sock, ssl.SSLSocket):
        return data
    chunks = [data]
    for _ in range(_TLS_RECORDS_PER_WAKEUP):
        try:
            more = sock.recv(_RECEIVE_SIZE)
        except _NOT_NOW:
            break
        if not more:
            break
        chunks.append(more)
    return b"".join(chunks)


def _count_replies(pipe: _Pipe, data: bytes) -> int:
    """Frame ``data`` (plus what was left from before); return complete replies.

    Checks each reply's xid against the FIFO order it was sent in and its error
    code, reading only the 20-byte reply header.
    """
    if pipe.leftover:
        data = pipe.leftover + data
    end = len(data)
    offset = 0
    count = 0
    expected = pipe.expected_xid
    unpack = _REPLY_HEADER.unpack_from
    while offset + _REPLY_HEADER_SIZE <= end:
        length, xid, _zxid, err = unpack(data, offset)
        stop = offset + 4 + length
        if stop > end:
            break
        if xid != expected or err != 0:
            if xid == -1:  # a notification: not a reply, skip it
                offset = stop
                continue
            raise LoadError(f"reply xid {xid} err {err}, expected xid {expected} err 0")
        expected = expected + 1 if expected < XID_CYCLE else 1
        count += 1
        offset = stop
    pipe.expected_xid = expected
    pipe.leftover = data[offset:] if offset < end else b""
    pipe.outstanding -= count
    return count


def _open_pipes(
    host: str, port: int, connections: int, tls: ClientTls | None = None
) -> list[tuple[Session, _Pipe]]:
    opened: list[tuple[Session, _Pipe]] = []
    try:
        for _ in range(connections):
            session = Session(host, port, tls=tls)
            opened.append((session, _Pipe(session.sock)))
    except BaseException:
        for session, _ in opened:
            session.close()
        raise
    return opened


def pipelined_worker(
    host: str,
    port: int,
    path: str,
    connections: int,
    window: int,
    measure_at: float,
    stop_at: float,
    poll_interval: float = 0.0,
    tls: ClientTls | None = None,
) -> ThroughputSample:
    """Keep ``window`` getData requests in flight on each of ``connections`` sessions.

    Load starts as soon as the connections are up; replies are counted from
    ``measure_at`` to ``stop_at`` (``time.monotonic()`` instants). Afterwards
    every outstanding reply is drained, so the server is idle again when this
    returns and the next measurement starts from a quiet machine.

    ``poll_interval`` > 0 makes the worker look at its sockets at most that
    often: a server that writes every reply in its own segment would otherwise
    make the worker pay a wake-up, a ``recv`` and a ``send`` per reply, CPU
    taken from the server on a 2-core machine. With a window of requests in
    flight the server never waits for the worker as long as the interval is
    short against the time the server needs to answer a whole window.

    With ``tls`` the connections speak TLS (handshakes before any load).
    """
    if not 0 < window <= XID_CYCLE:
        raise ValueError(f"window must be in 1..{XID_CYCLE}")
    ring, size = _request_ring(path)
    opened = _open_pipes(host, port, connections, tls)
    selector = selectors.DefaultSelector()
    try:
        for _, pipe in opened:
            pipe.sock.setblocking(False)
            selector.register(pipe.sock, selectors.EVENT_READ, pipe)
            _send(pipe, ring, size, window)
            if pipe.unsent is not None:
                selector.modify(pipe.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, pipe)
        total = receives = 0
        counted_from: tuple[float, int, float, int] | None = None
        counted_to: tuple[float, int, float, int] | None = None
        sending = True
        outstanding = connections * window
        deadline = stop_at + 30.0  # draining must never hang the benchmark
        select = selector.select
        while outstanding:
            now = time.monotonic()
            if counted_from is None and now >= measure_at:
                counted_from = (now, total, _cpu_seconds(), receives)
            if counted_to is None and now >= stop_at:
                counted_to = (now, total, _cpu_seconds(), receives)
                sending = False
            if now > deadline:
                raise LoadError(f"{outstanding} replies still missing 30 s after the run")
            next_phase = measure_at if counted_from is None else stop_at
            timeout = max(0.0, next_phase - now) if counted_to is None else 1.0
            for key, mask in select(timeout):
                pipe: _Pipe = key.data
                if mask & selectors.EVENT_WRITE and pipe.unsent is not None:
                    _flush(pipe)
                if mask & selectors.EVENT_READ:
                    data = _receive(pipe.sock)
                    if data is None:
                        continue
                    receives += 1
                    if not data:
                        raise LoadError("server closed a connection under load")
                    got = _count_replies(pipe, data)
                    total += got
                    outstanding -= got
                    if sending and got:
                        _send(pipe, ring, size, got)
                        outstanding += got
                events = selectors.EVENT_READ
                if pipe.unsent is not None:
                    events |= selectors.EVENT_WRITE
                if key.events != events:
                    selector.modify(pipe.sock, events, pipe)
            if poll_interval > 0:
                spare = now + poll_interval - time.monotonic()
                if spare > 0:
                    time.sleep(spare)
        if counted_from is None or counted_to is None:
            raise LoadError("the run ended before its measurement window")
        return ThroughputSample(
            replies=counted_to[1] - counted_from[1],
            seconds=counted_to[0] - counted_from[0],
            cpu_seconds=counted_to[2] - counted_from[2],
            receives=counted_to[3] - counted_from[3],
            total_replies=total,
        )
    finally:
        selector.close()
        for session, pipe in opened:
            with contextlib.suppress(OSError):
                pipe.sock.setblocking(True)
            session.close()


# -------------------------------------------------------------- latency workload


def latency_worker(
    host: str,
    port: int,
    path: str,
    warmup_requests: int,
    requests: int,
    tls: ClientTls | None = None,
) -> LatencySample:
    """One connection, one getData at a time; the round trip of each of ``requests``.

    The clock is ``perf_counter_ns`` around ``sendall`` .. the last byte of the
    reply, so it includes both kernels' loopback path and the client's own
    framing (a few microseconds, the same for both servers).
    """
    frames = [get_data_frame(xid, path) for xid in range(1, XID_CYCLE + 1)]
    nanos: list[int] = []
    clock = time.perf_counter_ns
    with Session(host, port, tls=tls) as session:
        sock = session.sock
        sock.settimeout(10.0)
        for i in range(warmup_requests + requests):
            frame = frames[i % XID_CYCLE]
            started = clock()
            sock.sendall(frame)
            data = sock.recv(_RECEIVE_SIZE)
            while len(data) < 4 or len(data) < 4 + _INT.unpack_from(data, 0)[0]:
                more = sock.recv(_RECEIVE_SIZE)
                if not more:
                    raise LoadError("server closed the connection")
                data += more
            elapsed = clock() - started
            _length, xid, _zxid, err = _REPLY_HEADER.unpack_from(data, 0)
            if xid != i % XID_CYCLE + 1 or err != 0:
                raise LoadError(f"reply xid {xid} err {err}, expected xid {i % XID_CYCLE + 1}")
            if i >= warmup_requests:
                nanos.append(elapsed)
    return LatencySample(tuple(nanos))


# --------------------------------------------------------------- process helpers


def split_connections(connections: int, processes: int) -> list[int]:
    """``connections`` spread as evenly as possible over ``processes`` (none empty)."""
    processes = max(1, min(processes, connections))
    base, extra = divmod(connections, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, int(-(-fraction * len(sorted_values) // 1)))  # ceil
    return sorted_values[min(rank, len(sorted_values)) - 1]


def process_cpu_seconds(pid: int) -> float | None:
    """User+system CPU time of process ``pid`` (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields after the command name: state is [0], utime [11], stime [12].
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_busy_seconds() -> float | None:
    """CPU time all cores spent busy since boot (user, system, irq, steal), from /proc/stat.

    Sampled around a measurement window, it shows how much CPU processes other
    than the server and the load generator took: on a shared 2-core machine a
    busy neighbour halves a server's throughput, and the report should say so.
    """
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def listener_pid(port: int) -> int | None:
    """The process that holds the socket listening on ``port``, if /proc can tell.

    For servers the benchmark did not start (``--zkgate-address``), so that
    their CPU time can still be reported.
    """
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for pid in _pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        return pid
    return None
