"""Benchmark: watch collapse, zkgate's mirror against a real ZooKeeper 3.8.

zkgate's promise to a ZooKeeper fleet is that N clients watching the same
znodes cost the ensemble one watch, not N, without making change
notifications slower or reads dearer. This benchmark checks all three against
a real ZooKeeper, measured in the same run on the same machine:

1. **Watches.** N client sessions (``--clients``, 1000) each watch the same P
   znodes (``--paths``, 10) with ``getData(watch=True)``: once all directly on
   ZooKeeper, once all through a zkgate that mirrors ``--root`` (``/bench``)
   of that ZooKeeper, never both at once. ZooKeeper's ``mntr``
   ``zk_watch_count`` says what each way costs the ensemble: N x P watches
   directly, and through zkgate a number that must not depend on N (it is
   read with one client and again with N).
2. **Fan-out latency.** A writer connected directly to ZooKeeper sets the data
   of one watched znode; the latency of a round is the time from just before
   that write until the last of the N clients has its NodeDataChanged event.
   Every client re-arms its watch (``getData(watch=True)``) when its event
   comes, and must read the data just written; the next round starts when
   all have. p50/p99 over ``--rounds`` (50) rounds, after ``--warmup-rounds``.
3. **Mirror reads.** Pipelined getData of one cached znode through zkgate and
   directly on ZooKeeper with :mod:`bench.loadgen` (as ``bench/zk_reads.py``),
   median of ``--repeats``; the ratio zkgate/ZooKeeper.

The N sessions are raw wire-protocol sessions multiplexed with ``selectors``
in ``--swarm-processes`` worker processes (spawned, so the driver's own work
never competes inside a round): a session costs a socket and a few bytes of
state, not a kazoo client's thread. Arrival times are the kernel's receive
timestamps (``SO_TIMESTAMPNS``) of the bytes carrying each event, so the
latency is when the server *delivered* the event, however long the swarm takes
to get round to reading a thousand sockets on a 2-core machine.

Run ``python bench/watch_collapse.py --help``; bench/README.md explains the
numbers. The last line is always (one line)::

    watch_collapse: clients=<n> upstream_watches=<u> direct_watches=<d>
        fanout_p99_ms: zkgate=<x> zookeeper=<y> mirror_read_ratio=<r>
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import resource
import selectors
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import attrs

if __package__ in (None, ""):
    # Run as a script (python bench/watch_collapse.py): make the repository
    # importable, for bench.loadgen and for the server harness in tests.servers.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (
    LoadError,
    Session,
    connect_frame,
    get_data_frame,
    machine_busy_seconds,
    percentile,
    process_cpu_seconds,
    read_frame,
    set_data_frame,
    split_connections,
)
from bench.zk_reads import Target as Server
from bench.zk_reads import ThroughputRun
from bench.zk_reads import measure_throughput as measure_reads
from tests.servers import (
    ServerStartError,
    ZkgateServer,
    ZooKeeperServer,
    four_letter,
    wait_for,
)

SERVERS = ("zookeeper", "zkgate")

# ----------------------------------------------------------------------------- wire

#: Watcher.Event.EventType.NodeDataChanged.
EVENT_NODE_DATA_CHANGED = 3
XID_NOTIFICATION = -1
XID_PING = -2
OP_PING = 11
OP_CLOSE_SESSION = -11

_INT = struct.Struct(">i")
_REPLY = struct.Struct(">iqi")  # xid, zxid, err: the payload's header after the length
_EVENT = struct.Struct(">iii")  # type, state, path length: a WatcherEvent's start
_CONNECT_RESPONSE = struct.Struct(">iiq")  # protocolVersion, timeOut, sessionId
_TIMESPEC = struct.Struct("@qq")

#: Linux's value; Python's socket module does not export it.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_RECEIVE_SIZE = 1 << 16

#: Sessions connected per batch: ZooKeeper's listen backlog is Java's default of
#: 50, and a connect beyond it waits a second for the SYN to be retried.
_CONNECT_BATCH = 40
#: The session timeout the swarm asks for; servers clamp it to 2..20 ticks.
_SESSION_TIMEOUT_MS = 30_000
#: ZooKeeper's tickTime here: ZooKeeper's own default, so that the 30 s asked
#: for above is granted (the harness's 200 ms would clamp it to 4 s).
_ZOOKEEPER_TICK_MS = 2000
#: Time given to the read load's connections before its measurement window.
_SETTLE_SECONDS = 1.0
#: Other processes' CPU (share of a core) above which the report warns.
_BUSY_NEIGHBOURS = 0.2


def _request(xid: int, opcode: int) -> bytes:
    return _INT.pack(8) + struct.pack(">ii", xid, opcode)


def _round_data(tag: str, round_number: int, size: int) -> bytes:
    """What the writer stores in a round: unique per round, ``size`` bytes when it fits."""
    head = f"{tag}-{round_number:06d}".encode()
    return head + b"." * max(0, size - len(head))


# ------------------------------------------------------------ the swarm (worker side)


class _Client:
    """One raw session of the swarm: its socket, unframed bytes and round state."""

    __slots__ = ("buffer", "notified", "rearm_xid", "sock", "xid")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.xid = 0
        #: The xid of the re-arming getData in flight, 0 when none is.
        self.rearm_xid = 0
        self.notified = False

    def next_xid(self) -> int:
        self.xid += 1
        return self.xid

    def frames(self) -> Iterator[bytes]:
        """Complete frame payloads buffered so far (length prefix stripped)."""
        buffer = self.buffer
        offset = 0
        end = len(buffer)
        while end - offset >= 4:
            (length,) = _INT.unpack_from(buffer, offset)
            stop = offset + 4 + length
            if stop > end:
                break
            yield bytes(buffer[offset + 4 : stop])
            offset = stop
        if offset:
            del buffer[:offset]


@attrs.frozen
class RoundReport:
    """What one swarm process saw in one round (times are CLOCK_REALTIME, ns)."""

    first_ns: int
    last_ns: int
    #: Re-arming reads that did not return the data the writer had just stored.
    stale_reads: int
    #: Events whose time is the swarm's clock at read time, not the kernel's stamp.
    unstamped: int
    cpu_seconds: float


class _Swarm:
    """N raw sessions in one process, watching the same paths, driven by commands.

    Runs in a worker process (:func:`swarm_worker`); the driver sends commands
    over a pipe and the swarm answers each one.
    """

    def __init__(
        self, host: str, port: int, count: int, paths: Sequence[str], poll_interval: float
    ) -> None:
        self.host = host
        self.port = port
        self.count = count
        self.paths = tuple(paths)
        self.poll_interval = poll_interval
        self.clients: list[_Client] = []
        self.selector = selectors.DefaultSelector()
        self.timeout_ms = _SESSION_TIMEOUT_MS
        self.last_activity = time.monotonic()

    # ------------------------------------------------------------------ setup

    def open(self) -> None:
        """Connect every session (in batches) and arm a data watch on every path."""
        _raise_fd_limit(self.count + 64)
        for start in range(0, self.count, _CONNECT_BATCH):
            batch = [self._connect() for _ in range(min(_CONNECT_BATCH, self.count - start))]
            for client in batch:
                _version, timeout_ms, session_id = _CONNECT_RESPONSE.unpack_from(
                    read_frame(client.sock, client.buffer), 0
                )
                if session_id == 0:
                    raise LoadError(f"{self.host}:{self.port} refused a session")
                self.timeout_ms = min(self.timeout_ms, timeout_ms)
        arming = b"".join(
            get_data_frame(xid, path, watch=True) for xid, path in enumerate(self.paths, 1)
        )
        for client in self.clients:
            client.sock.sendall(arming)
            client.xid = len(self.paths)
        for client in self.clients:
            for expected in range(1, len(self.paths) + 1):
                xid, _zxid, err = _REPLY.unpack_from(read_frame(client.sock, client.buffer), 0)
                if xid != expected or err != 0:
                    raise LoadError(
                        f"watching {self.paths[expected - 1]}: reply xid {xid} err {err}"
                    )
        for client in self.clients:
            client.sock.setblocking(False)
            self.selector.register(client.sock, selectors.EVENT_READ, client)
        self.last_activity = time.monotonic()

    def _connect(self) -> _Client:
        sock = socket.create_connection((self.host, self.port), timeout=30.0)
        client = _Client(sock)
        self.clients.append(client)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.sendall(connect_frame(_SESSION_TIMEOUT_MS))
        return client

    # ----------------------------------------------------------------- rounds

    def run_round(self, path: str, data: bytes, timeout: float) -> RoundReport:
        """Wait until every session had its event for ``path`` and re-read ``data``.

        Each event is stamped with the kernel's receive time of the bytes that
        completed it; each session re-arms its watch at once, as a client
        library's watcher does, and the re-read must return ``data``.
        """
        cpu_before = _cpu_seconds()
        for client in self.clients:
            client.notified = False
            client.rearm_xid = 0
        waiting_events = waiting_reads = len(self.clients)
        first_ns, last_ns = 0, 0
        stale = unstamped = 0
        expected_body = _INT.pack(len(data)) + data
        encoded_path = path.encode()
        deadline = time.monotonic() + timeout
        select = self.selector.select
        while waiting_events or waiting_reads:
            now = time.monotonic()
            if now > deadline:
                raise LoadError(
                    f"{waiting_events} of {len(self.clients)} sessions had no event for "
                    f"{path} and {waiting_reads} had not re-read it within {timeout:.0f} s"
                )
            for key, _mask in select(min(1.0, deadline - now)):
                client: _Client = key.data
                try:
                    chunk, ancillary, _flags, _address = client.sock.recvmsg(
                        _RECEIVE_SIZE, _ANCILLARY_SIZE
                    )
                except BlockingIOError:
                    continue
                if not chunk:
                    raise LoadError("the server closed a session's connection mid-round")
                kernel_stamp = _kernel_stamp(ancillary)
                stamp = time.time_ns() if kernel_stamp is None else kernel_stamp
                client.buffer += chunk
                for payload in client.frames():
                    xid, _zxid, err = _REPLY.unpack_from(payload, 0)
                    if xid == XID_NOTIFICATION:
                        kind, _state, length = _EVENT.unpack_from(payload, 16)
                        event_path = payload[28 : 28 + length]
                        if (
                            kind != EVENT_NODE_DATA_CHANGED
                            or event_path != encoded_path
                            or client.notified
                        ):
                            raise LoadError(
                                f"unexpected event type {kind} for {event_path!r} "
                                f"(waiting for NodeDataChanged of {path})"
                            )
                        client.notified = True
                        waiting_events -= 1
                        if kernel_stamp is None:
                            unstamped += 1
                        first_ns = stamp if not first_ns else min(first_ns, stamp)
                        last_ns = max(last_ns, stamp)
                        client.rearm_xid = client.next_xid()
                        client.sock.send(get_data_frame(client.rearm_xid, path, watch=True))
                    elif xid == XID_PING:
                        continue
                    elif xid == client.rearm_xid and client.rearm_xid:
                        if err != 0:
                            raise LoadError(f"re-arming the watch on {path}: error {err}")
                        if payload[16 : 16 + len(expected_body)] != expected_body:
                            stale += 1
                        client.rearm_xid = 0
                        waiting_reads -= 1
                    else:
                        raise LoadError(f"unexpected reply xid {xid} err {err} mid-round")
            if self.poll_interval > 0:
                # Look at the sockets at most once per interval: a burst of a
                # thousand events then costs a few wake-ups, not a thousand, and
                # the kernel's stamps keep the latency exact all the same.
                spare = now + self.poll_interval - time.monotonic()
                if spare > 0:
                    time.sleep(spare)
        self.last_activity = time.monotonic()
        return RoundReport(first_ns, last_ns, stale, unstamped, _cpu_seconds() - cpu_before)

    # ------------------------------------------------------------------- idle

    def idle(self, control: Connection) -> None:
        """Until the driver speaks: keep the sessions alive, drain what they receive."""
        ping_every = self.timeout_ms / 3000
        self.selector.register(control.fileno(), selectors.EVENT_READ, None)
        try:
            while True:
                due = self.last_activity + ping_every
                now = time.monotonic()
                if now >= due:
                    for client in self.clients:
                        client.sock.send(_request(XID_PING, OP_PING))
                    self.last_activity = now
                    continue
                for key, _mask in self.selector.select(due - now):
                    if key.data is None:
                        return
                    self._drain_idle(key.data)
        finally:
            self.selector.unregister(control.fileno())

    def _drain_idle(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            raise LoadError("the server closed a session's connection")
        client.buffer += chunk
        for payload in client.frames():
            xid, _zxid, err = _REPLY.unpack_from(payload, 0)
            if xid != XID_PING:
                raise LoadError(f"between rounds: unexpected frame xid {xid} err {err}")

    # -------------------------------------------------------------- teardown

    def close(self) -> None:
        """Close every session (so the server drops its watches now), then the sockets."""
        self.selector.close()
        pending: list[tuple[_Client, int]] = []
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.sock.setblocking(True)
                client.sock.settimeout(10.0)
                xid = client.next_xid()
                client.sock.sendall(_request(xid, OP_CLOSE_SESSION))
                pending.append((client, xid))
        for client, xid in pending:
            with contextlib.suppress(OSError, LoadError):
                while _REPLY.unpack_from(read_frame(client.sock, client.buffer), 0)[0] != xid:
                    pass
        for client in self.clients:
            client.sock.close()
        self.clients.clear()


def _kernel_stamp(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanos = _TIMESPEC.unpack_from(payload, 0)
            return seconds * 1_000_000_000 + nanos
    return None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def swarm_worker(
    host: str,
    port: int,
    count: int,
    paths: Sequence[str],
    poll_interval: float,
    round_timeout: float,
    control: Connection,
) -> None:
    """A worker process: ``count`` sessions watching ``paths``, driven over ``control``.

    Answers ``("ready", timeout_ms)`` once every session is connected and
    watching; then, per ``("round", path, data)``, ``("armed",)`` before the
    driver writes and ``("done", RoundReport)`` after; ``("close",)`` closes the
    sessions and answers ``("closed",)``. Any failure answers ``("error", text)``.
    """
    swarm = _Swarm(host, port, count, paths, poll_interval)
    try:
        try:
            swarm.open()
            control.send(("ready", swarm.timeout_ms))
            while True:
                swarm.idle(control)
                command = control.recv()
                if command[0] == "close":
                    break
                _, path, data = command
                control.send(("armed",))
                control.send(("done", swarm.run_round(path, data, round_timeout)))
        finally:
            swarm.close()
        control.send(("closed",))
    except Exception as exc:
        with contextlib.suppress(OSError):
            control.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        control.close()


# ------------------------------------------------------------ the swarm (driver side)


class SwarmHandle:
    """The driver's end of the swarm processes: start, rounds, close."""

    def __init__(self, pipes: list[Connection], reply_timeout: float) -> None:
        self.pipes = pipes
        self.reply_timeout = reply_timeout

    def expect(self, pipe: Connection, kind: str, timeout: float) -> tuple[Any, ...]:
        """The next message from one process, which must be ``kind`` (else LoadError)."""
        if not pipe.poll(timeout):
            raise LoadError(f"a swarm process did not answer {kind!r} within {timeout:.0f} s")
        message = pipe.recv()
        if message[0] == "error":
            raise LoadError(f"swarm process: {message[1]}")
        if message[0] != kind:
            raise LoadError(f"swarm process answered {message[0]!r}, expected {kind!r}")
        return message

    def fan_out(self, path: str, data: bytes, write: Callable[[], None]) -> list[RoundReport]:
        """One round: every process ready for ``path``, ``write()``, then every report."""
        for pipe in self.pipes:
            pipe.send(("round", path, data))
        for pipe in self.pipes:
            self.expect(pipe, "armed", self.reply_timeout)
        write()
        return [self.expect(pipe, "done", self.reply_timeout)[1] for pipe in self.pipes]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("close",))
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError, LoadError):
                self.expect(pipe, "closed", 60.0)


@contextlib.contextmanager
def open_swarm(
    host: str, port: int, clients: int, paths: Sequence[str], args: argparse.Namespace
) -> Iterator[SwarmHandle]:
    """``clients`` sessions on ``host:port`` over ``--swarm-processes``, all watching ``paths``.

    Returns once every session watches every path; closes every session (and
    waits for the server to confirm) on the way out, also on errors.
    """
    context = multiprocessing.get_context("spawn")
    shares = split_connections(clients, args.swarm_processes)
    pipes: list[Connection] = []
    processes: list[multiprocessing.process.BaseProcess] = []
    handle = SwarmHandle(pipes, args.round_timeout + 30.0)
    try:
        for share in shares:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=swarm_worker,
                args=(
                    host,
                    port,
                    share,
                    tuple(paths),
                    args.poll_interval_ms / 1000,
                    args.round_timeout,
                    theirs,
                ),
                daemon=True,
            )
            process.start()
            theirs.close()
            pipes.append(ours)
            processes.append(process)
        # Setup is bounded by the connects (about a millisecond each, batched)
        # and ZooKeeper's session-creating transactions; a minute per thousand
        # sessions is generous.
        setup_timeout = 60.0 + 60.0 * clients / 1000
        for pipe in pipes:
            handle.expect(pipe, "ready", setup_timeout)
        yield handle
    finally:
        handle.close()
        for process in processes:
            process.join(timeout=10.0)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in pipes:
            pipe.close()


# ------------------------------------------------------------------ measurements


def mntr(host: str, port: int) -> dict[str, str]:
    """A server's ``mntr`` as a mapping of key to (string) value."""
    rows = (line.split("\t", 1) for line in four_letter(host, port, "mntr").splitlines())
    return {row[0]: row[1].strip() for row in rows if len(row) == 2}


def _mntr_int(host: str, port: int, key: str) -> int:
    value = mntr(host, port).get(key)
    if value is None:
        raise LoadError(f"{host}:{port} mntr has no {key}")
    return int(value)


@attrs.frozen
class FanoutRun:
    """One side's watch counts and fan-out rounds."""

    name: str
    clients: int
    paths: int
    #: ZooKeeper's zk_watch_count with the swarm watching (its own sessions or zkgate's).
    upstream_watches: int
    #: The same with one client watching every path (through zkgate), else None.
    upstream_watches_one_client: int | None
    #: ZooKeeper's zk_num_alive_connections with the swarm watching.
    upstream_connections: int
    #: The serving zkgate's own zk_watch_count (its downstream watches), else None.
    downstream_watches: int | None
    setup_seconds: float
    #: Per timed round, ns from just before the write: to the first event, to the last.
    first_ns: tuple[int, ...]
    last_ns: tuple[int, ...]
    #: Per timed round, the write's own round trip (ZooKeeper's setData reply), ns.
    ack_ns: tuple[int, ...]
    #: Per timed round, until the driver heard that every session had re-read, ns.
    rearmed_ns: tuple[int, ...]
    stale_reads: int
    unstamped_events: int
    #: CPU seconds per timed round, by process (server names, and "swarm").
    cpu_per_round: dict[str, float]

    def p(self, fraction: float, which: str = "last") -> float:
        """Nearest-rank percentile, in ms, of one of the per-round series above."""
        values = {
            "first": self.first_ns,
            "last": self.last_ns,
            "ack": self.ack_ns,
            "rearmed": self.rearmed_ns,
        }[which]
        return percentile(sorted(values), fraction) / 1e6


@attrs.frozen
class ReadRun(ThroughputRun):
    """A pipelined read run, and what the upstream ZooKeeper received meanwhile
    (the reads themselves when it is the server under test; ~0 for zkgate's cache)."""

    upstream_packets: int = 0


@attrs.define
class Results:
    fanout: dict[str, FanoutRun] = attrs.Factory(dict)
    throughput: dict[str, list[ThroughputRun]] = attrs.Factory(dict)

    def median_rate(self, name: str) -> float | None:
        runs = self.throughput.get(name)
        return statistics.median(r.rate for r in runs) if runs else None


def _paths(args: argparse.Namespace) -> list[str]:
    return [f"{args.root}/w{i}" for i in range(args.paths)]


def prepare_tree(zookeeper: Server, args: argparse.Namespace) -> None:
    """The watched znodes, on the real ZooKeeper (zkgate mirrors them from there)."""
    data = _round_data("initial", 0, args.data_size)
    with Session(zookeeper.host, zookeeper.port) as session:
        for path in _paths(args):
            session.ensure_node(path, data)


def measure_fanout(
    side: Server, zookeeper: Server, args: argparse.Namespace, pids: dict[str, int | None]
) -> FanoutRun:
    """Watch counts and fan-out rounds with the swarm on ``side`` (zkgate or ZooKeeper)."""
    paths = _paths(args)
    through_zkgate = side.name == "zkgate"
    one_client = None
    if through_zkgate:
        one_client = _watches_with_one_client(side, zookeeper, paths)
    _say(f"{side.name}: connecting {args.clients} sessions, each watching {len(paths)} paths ...")
    started = time.monotonic()
    with open_swarm(side.host, side.port, args.clients, paths, args) as swarm:
        setup = time.monotonic() - started
        upstream = mntr(zookeeper.host, zookeeper.port)
        downstream = _mntr_int(side.host, side.port, "zk_watch_count") if through_zkgate else None
        _say(
            f"{side.name}: {args.clients} sessions watching after {setup:.1f} s; "
            f"ZooKeeper zk_watch_count={upstream.get('zk_watch_count')}"
        )
        with Session(zookeeper.host, zookeeper.port) as writer:
            total = args.warmup_rounds + args.rounds
            first: list[int] = []
            last: list[int] = []
            acks: list[int] = []
            rearmed: list[int] = []
            stale = unstamped = 0
            cpu_before: dict[str, float | None] = {}
            machine_before: float | None = None
            swarm_cpu = 0.0
            for number in range(1, total + 1):
                timed = number > args.warmup_rounds
                if number == args.warmup_rounds + 1:
                    cpu_before = {name: _cpu_of(pid) for name, pid in pids.items()}
                    machine_before = machine_busy_seconds()
                path = paths[number % len(paths)]
                data = _round_data(side.name, number, args.data_size)
                wrote: list[int] = []

                def write(path: str = path, data: bytes = data, wrote: list[int] = wrote) -> None:
                    wrote.append(time.time_ns())
                    _xid, err, _body = writer.call(set_data_frame(writer.next_xid(), path, data))
                    wrote.append(time.time_ns())
                    if err != 0:
                        raise LoadError(f"setData {path}: ZooKeeper error {err}")

                reports = swarm.fan_out(path, data, write)
                done = time.time_ns()
                stale += sum(r.stale_reads for r in reports)
                if timed:
                    before = wrote[0]
                    first.append(min(r.first_ns for r in reports) - before)
                    last.append(max(r.last_ns for r in reports) - before)
                    acks.append(wrote[1] - before)
                    rearmed.append(done - before)
                    unstamped += sum(r.unstamped for r in reports)
                    swarm_cpu += sum(r.cpu_seconds for r in reports)
            cpu_after = {name: _cpu_of(pid) for name, pid in pids.items()}
            machine_after = machine_busy_seconds()
    cpu: dict[str, float] = {}
    for name, before in cpu_before.items():
        after = cpu_after.get(name)
        if before is not None and after is not None:
            cpu[name] = (after - before) / args.rounds
    cpu["swarm"] = swarm_cpu / args.rounds
    if machine_before is not None and machine_after is not None:
        # Everything else, the driver and its writer included: a busy neighbour
        # shows up here.
        machine = (machine_after - machine_before) / args.rounds
        cpu["rest"] = max(0.0, machine - sum(cpu.values()))
    return FanoutRun(
        name=side.name,
        clients=args.clients,
        paths=len(paths),
        upstream_watches=int(upstream.get("zk_watch_count", -1)),
        upstream_watches_one_client=one_client,
        upstream_connections=int(upstream.get("zk_num_alive_connections", -1)),
        downstream_watches=downstream,
        setup_seconds=setup,
        first_ns=tuple(first),
        last_ns=tuple(last),
        ack_ns=tuple(acks),
        rearmed_ns=tuple(rearmed),
        stale_reads=stale,
        unstamped_events=unstamped,
        cpu_per_round=cpu,
    )


def _watches_with_one_client(zkgate: Server, zookeeper: Server, paths: Sequence[str]) -> int:
    """ZooKeeper's watch count while one session watches every path through zkgate."""
    with Session(zkgate.host, zkgate.port) as probe:
        for path in paths:
            _xid, err, _body = probe.call(get_data_frame(probe.next_xid(), path, watch=True))
            if err != 0:
                raise LoadError(f"getData {path} through zkgate: error {err}")
        # The mirror may place its upstream watch a moment after it answers;
        # give it that moment, but a mirror with no upstream watch reads 0.
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: _mntr_int(zookeeper.host, zookeeper.port, "zk_watch_count") > 0,
                timeout=5.0,
                message="an upstream watch",
            )
        return _mntr_int(zookeeper.host, zookeeper.port, "zk_watch_count")


def _cpu_of(pid: int | None) -> float | None:
    return None if pid is None else process_cpu_seconds(pid)


def measure_throughput(
    pool: Pool, target: Server, zookeeper: Server, args: argparse.Namespace, duration: float
) -> ReadRun:
    """One pipelined getData run, as bench/zk_reads.py measures it, counting
    the packets the upstream ZooKeeper received meanwhile."""
    before = _mntr_int(zookeeper.host, zookeeper.port, "zk_packets_received")
    run = measure_reads(pool, target, args, _SETTLE_SECONDS, duration, path=_paths(args)[0])
    after = _mntr_int(zookeeper.host, zookeeper.port, "zk_packets_received")
    return ReadRun(**attrs.asdict(run, recurse=False), upstream_packets=after - before)


# ---------------------------------------------------------------------- the run


def _mirror_config(zookeeper: Server, args: argparse.Namespace) -> str:
    return (
        "# Written by bench/watch_collapse.py\n"
        "[zookeeper]\n"
        "max_client_cnxns = 0  # the swarm is many sessions from one address\n"
        "\n"
        "[[mirror]]\n"
        f'root = "{args.root}"\n'
        f'hosts = "{zookeeper.address}"\n'
        "session_timeout = 10.0\n"
    )


def run(args: argparse.Namespace, results: Results) -> None:
    """Start ZooKeeper, measure the direct side, start the mirror, measure it; then reads.

    The direct side goes first, before zkgate exists, so that ZooKeeper's watch
    count is the swarm's alone; zkgate's phase follows once those sessions are
    closed and their watches gone.
    """
    wanted = [args.only] if args.only else list(SERVERS)
    with contextlib.ExitStack() as stack:
        _say("starting zookeeper ...")
        zk_process = stack.enter_context(
            ZooKeeperServer(heap=args.zookeeper_heap, tick_time_ms=_ZOOKEEPER_TICK_MS)
        )
        zookeeper = Server("zookeeper", zk_process.host, zk_process.port, zk_process.pid)
        prepare_tree(zookeeper, args)
        if "zookeeper" in wanted:
            results.fanout["zookeeper"] = measure_fanout(
                zookeeper, zookeeper, args, {"zookeeper": zookeeper.pid}
            )
            # Closed sessions take their watches with them; zkgate's count must
            # not include a straggler.
            wait_for(
                lambda: _mntr_int(zookeeper.host, zookeeper.port, "zk_watch_count") == 0,
                timeout=30.0,
                message="ZooKeeper dropping the direct sessions' watches",
            )
        targets = {"zookeeper": zookeeper}
        if "zkgate" in wanted:
            config_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wc-")))
            config = config_dir / "mirror.toml"
            config.write_text(_mirror_config(zookeeper, args))
            _say("starting zkgate (mirror of the ZooKeeper) ...")
            try:
                zkgate_process = stack.enter_context(
                    ZkgateServer(extra_args=["--config", str(config)])
                )
            except ServerStartError as exc:
                raise LoadError(f"zkgate did not start with a [[mirror]] mount: {exc}") from exc
            zkgate = Server("zkgate", zkgate_process.host, zkgate_process.port, zkgate_process.pid)
            targets["zkgate"] = zkgate
            results.fanout["zkgate"] = measure_fanout(
                zkgate, zookeeper, args, {"zkgate": zkgate.pid, "zookeeper": zookeeper.pid}
            )
        if args.repeats == 0:
            return
        context = multiprocessing.get_context("spawn")
        warmup = args.duration if args.warmup is None else args.warmup
        with context.Pool(max(1, min(args.processes, args.connections))) as pool:
            for name in wanted:
                _say(f"read load: warming up {name} for {warmup:g} s ...")
                measure_throughput(pool, targets[name], zookeeper, args, warmup)
            for repeat in range(1, args.repeats + 1):
                for name in wanted:
                    tput = measure_throughput(pool, targets[name], zookeeper, args, args.duration)
                    results.throughput.setdefault(name, []).append(tput)
                    _say(f"read run {repeat}/{args.repeats} {name:<9} {tput.rate:>9.0f} ops/s")


# ---------------------------------------------------------------------- reports


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cpu(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:.0f}%"


def report(args: argparse.Namespace, results: Results) -> str:
    """The human-readable tables, then the one machine-readable last line."""
    lines = [
        "",
        f"watch_collapse: {args.clients} sessions x {args.paths} watched znodes under "
        f"{args.root} ({args.data_size} bytes each), {args.swarm_processes} swarm process(es)",
        "",
        "watches the ZooKeeper holds (mntr zk_watch_count) while the sessions watch:",
    ]
    for run in results.fanout.values():
        if run.name == "zookeeper":
            lines.append(
                f"  directly:     {run.upstream_watches:>7} watches, "
                f"{run.upstream_connections} connections (mntr's own included); "
                f"N x P = {run.clients * run.paths}"
            )
        else:
            lines.append(
                f"  through zkgate: {run.upstream_watches:>5} watches with {run.clients} clients, "
                f"{run.upstream_watches_one_client} with 1 client; "
                f"{run.upstream_connections} connections (zkgate's and mntr's); "
                f"zkgate itself holds {run.downstream_watches} watches"
            )
    lines += [
        "",
        f"fan-out: setData on one watched znode, directly on ZooKeeper, until all "
        f"{args.clients} sessions had NodeDataChanged (kernel receive stamps); each re-arms;",
        f"{args.rounds} timed rounds after {args.warmup_rounds} warm-up, ms"
        + (" (with 100 rounds or fewer, p99 is the maximum)" if args.rounds <= 100 else ""),
        "(first: the first session's event; write: the writer's setData round trip; "
        "re-read: until every session had re-read the new data and re-armed)",
        f"{'via':<10} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8} "
        f"{'first p50':>10} {'write p50':>10} {'re-read p50':>12}  CPU ms per round",
    ]
    for run in results.fanout.values():
        mean = statistics.fmean(run.last_ns) / 1e6 if run.last_ns else float("nan")
        cpu = ", ".join(f"{k} {v * 1000:.1f}" for k, v in run.cpu_per_round.items())
        lines.append(
            f"{run.name:<10} {run.p(0.50):>8.2f} {run.p(0.90):>8.2f} {run.p(0.99):>8.2f} "
            f"{run.p(1.0):>8.2f} {mean:>8.2f} {run.p(0.5, 'first'):>10.2f} "
            f"{run.p(0.5, 'ack'):>10.2f} {run.p(0.5, 'rearmed'):>12.2f}  {cpu}"
        )
    for run in results.fanout.values():
        raw = " ".join(f"{n / 1e6:.2f}" for n in run.last_ns)
        lines.append(f"{run.name} rounds, ms: {raw}")
        if run.stale_reads:
            lines.append(
                f"WARNING: {run.name}: {run.stale_reads} re-arming reads returned older data "
                "than the write whose event they had just received"
            )
        if run.unstamped_events:
            lines.append(
                f"note: {run.name}: {run.unstamped_events} events had no kernel stamp and "
                "were timed when read"
            )
    if results.throughput:
        procs = len(split_connections(args.connections, args.processes))
        lines += [
            "",
            f"mirror reads: pipelined getData of {_paths(args)[0]}, {args.connections} "
            f"connections x window {args.window} in {procs} loadgen process(es), "
            f"{args.duration:g} s per run",
            f"{'server':<10} {'run':>3} {'ops/s':>10} {'server CPU':>11} {'loadgen CPU':>12}"
            f" {'other CPU':>10} {'ZooKeeper packets':>18}",
        ]
        for name, runs in results.throughput.items():
            for i, t in enumerate(runs, 1):
                lines.append(
                    f"{name:<10} {i:>3} {t.rate:>10.0f} {_cpu(t.server_cpu):>11} "
                    f"{_cpu(t.loadgen_cpu):>12} {_cpu(t.other_cpu):>10} {t.upstream_packets:>18}"
                )
            median = results.median_rate(name)
            if median is not None:
                lines.append(f"{name:<10} {'med':>3} {median:>10.0f}")
        others = [r.other_cpu for runs in results.throughput.values() for r in runs if r.other_cpu]
        if others and max(others) > _BUSY_NEIGHBOURS:
            lines.append(
                f"note: other processes used up to {max(others) * 100:.0f}% of a core during "
                "the read runs; on a 2-core machine that skews the numbers"
            )
    lines += ["", summary_line(args, results)]
    return "\n".join(lines)


def summary_line(args: argparse.Namespace, results: Results) -> str:
    zkgate, direct = results.fanout.get("zkgate"), results.fanout.get("zookeeper")
    rate_zkgate, rate_zookeeper = results.median_rate("zkgate"), results.median_rate("zookeeper")

    def ms(run: FanoutRun | None) -> str:
        return "n/a" if run is None or not run.last_ns else f"{run.p(0.99):.2f}"

    ratio = (
        f"{rate_zkgate / rate_zookeeper:.2f}"
        if rate_zkgate is not None and rate_zookeeper
        else "n/a"
    )
    return (
        f"watch_collapse: clients={args.clients} "
        f"upstream_watches={'n/a' if zkgate is None else zkgate.upstream_watches} "
        f"direct_watches={'n/a' if direct is None else direct.upstream_watches} "
        f"fanout_p99_ms: zkgate={ms(zkgate)} zookeeper={ms(direct)} mirror_read_ratio={ratio}"
    )


def targets_met(results: Results) -> bool:
    """The issue's bar: upstream watches independent of N, fan-out p99 no worse than
    ZooKeeper's own, mirror reads at least as fast, and no stale re-read."""
    zkgate, direct = results.fanout.get("zkgate"), results.fanout.get("zookeeper")
    rate_zkgate, rate_zookeeper = results.median_rate("zkgate"), results.median_rate("zookeeper")
    if zkgate is None or direct is None or rate_zkgate is None or rate_zookeeper is None:
        return False
    return (
        zkgate.upstream_watches == zkgate.upstream_watches_one_client
        and zkgate.upstream_watches < direct.upstream_watches
        and zkgate.p(0.99) <= direct.p(0.99)
        and rate_zkgate >= rate_zookeeper
        and zkgate.stale_reads == 0
    )


# -------------------------------------------------------------------------- CLI


def _count(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return number

    return parse


def _seconds(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Watch collapse: upstream watches, fan-out latency and mirror reads, "
        "zkgate's mirror against the real ZooKeeper it mirrors.",
    )
    add = parser.add_argument
    add(
        "--clients",
        type=_count(1),
        default=1000,
        metavar="N",
        help="watching sessions, each way (default: %(default)s)",
    )
    add(
        "--paths",
        type=_count(1),
        default=10,
        metavar="P",
        help="znodes every session watches (default: %(default)s)",
    )
    add(
        "--rounds",
        type=_count(1),
        default=50,
        metavar="R",
        help="timed fan-out rounds, each way (default: %(default)s)",
    )
    add(
        "--warmup-rounds",
        type=_count(0),
        default=10,
        metavar="R",
        help="untimed fan-out rounds first, for ZooKeeper's JIT (default: %(default)s)",
    )
    add(
        "--swarm-processes",
        type=_count(1),
        default=1,
        metavar="N",
        help="processes the watching sessions are spread over (default: %(default)s)",
    )
    add(
        "--round-timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="longest a round may take before the run fails (default: %(default)s)",
    )
    add(
        "--root",
        default="/bench",
        help="the mirrored subtree holding the watched znodes (default: %(default)s)",
    )
    add(
        "--data-size",
        type=_count(0),
        default=100,
        metavar="BYTES",
        help="bytes stored in each watched znode (default: %(default)s)",
    )
    add(
        "--duration",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="seconds counted per read run (default: %(default)s)",
    )
    add(
        "--warmup",
        type=_seconds,
        default=None,
        metavar="S",
        help="seconds of read load per server before any run counts (default: --duration)",
    )
    add(
        "--repeats",
        type=_count(0),
        default=3,
        metavar="N",
        help="read runs per server, alternating; the median is reported; "
        "0 skips the reads (default: %(default)s)",
    )
    add(
        "--connections",
        type=_count(1),
        default=16,
        metavar="N",
        help="connections of the read load (default: %(default)s)",
    )
    add(
        "--window",
        type=_count(1),
        default=100,
        metavar="W",
        help="getData requests in flight per read connection (default: %(default)s)",
    )
    add(
        "--processes",
        type=_count(1),
        default=1,
        metavar="N",
        help="load generator processes for the reads (default: %(default)s)",
    )
    add(
        "--poll-interval-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="swarm and read load look at their sockets at most this often; "
        "0 reacts to every segment (default: %(default)s)",
    )
    add(
        "--only",
        choices=SERVERS,
        help="measure one side only (ZooKeeper still runs: zkgate mirrors it)",
    )
    add(
        "--zookeeper-heap",
        default="512m",
        metavar="SIZE",
        help="-Xmx of the ZooKeeper started here (default: %(default)s)",
    )
    add(
        "--check",
        action="store_true",
        help="exit 1 unless zkgate meets the targets (upstream watches independent of N, "
        "fan-out p99 no worse than ZooKeeper's, read ratio >= 1.00, no stale re-read)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.poll_interval_ms < 0:
        build_parser().error("--poll-interval-ms must be >= 0")
    results = Results()
    try:
        run(args, results)
    except (ConnectionError, LoadError, TimeoutError) as exc:
        print(f"watch_collapse: error: {exc}", file=sys.stderr)
        if results.fanout or results.throughput:
            print(report(args, results), flush=True)
        return 2
    print(report(args, results), flush=True)
    if args.check and not targets_met(results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
