"""Benchmark: write throughput, cost per write against the tree's size, and memory
per idle session, zkgate against a real ZooKeeper 3.8.

Both servers start side by side (or are given by address) and are driven in
turn with the same raw-socket generator (the framing of :mod:`bench.loadgen`;
no client library, so the client is not the limit). Every write is
acknowledged only after it is durable: zkgate commits to SQLite with full
sync, ZooKeeper fsyncs its transaction log (``forceSync=yes``, its default).

* **create, setData, delete**: ``--connections`` sessions, each keeping
  ``--window`` requests in flight, each writing ``--per-connection`` znodes
  of ``--data-size`` bytes under a parent of its own: first creates, then
  setData on the same znodes, then deletes of them;
* **siblings** (zkgate only): creates under one parent that already has
  1,000 children, then under one that has ``--siblings-large`` (100,000): a
  write's cost must not grow with its parent's children;
* **sessions**: ``--sessions`` idle sessions opened at once; the memory the
  server holds with them, less before, per session: zkgate's RSS, and
  ZooKeeper's live heap after a full GC plus any RSS beyond its committed
  heap (its RSS alone, printed beside it, mostly shows which heap pages the
  JVM happened to touch).

The last line is::

    zk_writes: create_ratio=<a> setdata_ratio=<b> delete_ratio=<c>
        sibling_100k_over_1k=<d> session_kib: zkgate=<e> zookeeper=<f>

(one line), the ratios being zkgate's rate over ZooKeeper's, and
``sibling_100k_over_1k`` zkgate's create rate under the large parent over its
rate under 1,000 siblings.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (
    _INT,
    _REPLY_HEADER,
    _REPLY_HEADER_SIZE,
    LoadError,
    Session,
    _frame,
    _ustring,
    close_session_frame,
    connect_frame,
    create_frame,
    read_frame,
    set_data_frame,
)
from bench.zk_reads import SERVERS, Target
from bench.zk_reads import _targets as targets_of

OP_DELETE = 2
OP_PING = 11
XID_PING = -2
# "def new generation   total 116224K, used 0K [...]", "tenured generation ...",
# or G1's "garbage-first heap   total ...": the heap's parts, whatever the GC.
_HEAP_PART = re.compile(r"(?:generation|heap)\s+total (\d+)K, used (\d+)K")
_RECEIVE_SIZE = 1 << 18
#: What an idle session asks for: the most both servers grant by default (20
#: ticks of 2 s), so the sessions outlive the measurement without pinging.
_IDLE_SESSION_TIMEOUT_MS = 40_000


def delete_frame(xid: int, path: str) -> bytes:
    return _frame(xid, OP_DELETE, _ustring(path) + _INT.pack(-1))


def ping_frame() -> bytes:
    return _frame(XID_PING, OP_PING, b"")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------ the closed loop


class _Conn:
    __slots__ = ("expected", "frames", "leftover", "next", "outstanding", "session", "unsent")

    def __init__(self, session: Session, frames: list[bytes]) -> None:
        self.session = session
        self.frames = frames
        self.next = 0
        self.expected = 1
        self.outstanding = 0
        self.leftover = b""
        self.unsent = b""


def run_frames(
    host: str, port: int, per_connection: Sequence[Callable[[int], bytes]], count: int,
    window: int,
) -> float:  # fmt: skip
    """Send ``count`` requests on each connection (one per builder, whose
    argument is the request's index; its xid is index + 1), ``window`` in
    flight; every reply must be OK and in order. Returns requests per second."""
    sessions = [Session(host, port) for _ in per_connection]
    conns = [
        _Conn(session, [build(i) for i in range(count)])
        for session, build in zip(sessions, per_connection, strict=True)
    ]
    selector = selectors.DefaultSelector()
    try:
        for conn in conns:
            conn.session.sock.setblocking(False)
            selector.register(conn.session.sock, selectors.EVENT_READ, conn)
        started = time.perf_counter()
        for conn in conns:
            _top_up(conn, window)
        remaining = len(conns) * count
        deadline = time.monotonic() + 600
        while remaining:
            if time.monotonic() > deadline:
                raise LoadError(f"{remaining} replies missing after 600 s")
            for key, mask in selector.select(1.0):
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    _flush(conn)
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.session.sock.recv(_RECEIVE_SIZE)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise LoadError("the server closed a connection under load")
                    got = _replies(conn, data)
                    remaining -= got
                    _top_up(conn, window)
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.unsent else 0)
                if key.events != events:
                    selector.modify(conn.session.sock, events, conn)
        elapsed = time.perf_counter() - started
    finally:
        selector.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.session.sock.setblocking(True)
            conn.session.close()
    return len(conns) * count / elapsed


def _top_up(conn: _Conn, window: int) -> None:
    room = min(window - conn.outstanding, len(conn.frames) - conn.next)
    if room <= 0:
        return
    data = b"".join(conn.frames[conn.next : conn.next + room])
    conn.next += room
    conn.outstanding += room
    conn.unsent += data
    _flush(conn)


def _flush(conn: _Conn) -> None:
    if not conn.unsent:
        return
    try:
        sent = conn.session.sock.send(conn.unsent)
    except BlockingIOError:
        return
    conn.unsent = conn.unsent[sent:]


def _replies(conn: _Conn, data: bytes) -> int:
    data = conn.leftover + data if conn.leftover else data
    offset = count = 0
    while offset + _REPLY_HEADER_SIZE <= len(data):
        length, xid, _zxid, err = _REPLY_HEADER.unpack_from(data, offset)
        stop = offset + 4 + length
        if stop > len(data):
            break
        offset = stop
        if xid == -1:
            continue  # a watch notification
        if xid != conn.expected or err != 0:
            raise LoadError(f"reply xid {xid} err {err}, expected xid {conn.expected} err 0")
        conn.expected += 1
        count += 1
    conn.leftover = data[offset:]
    conn.outstanding -= count
    return count


# ------------------------------------------------------------ workloads


def _ensure(target: Target, paths: Sequence[str]) -> None:
    with Session(target.host, target.port) as session:
        for path in paths:
            session.ensure_node(path, b"")


def write_rates(target: Target, args: argparse.Namespace, run: str) -> dict[str, float]:
    data = bytes(args.data_size)
    parents = [f"/zkw-{run}/p{c}" for c in range(args.connections)]
    _ensure(target, parents)

    def path(c: int, i: int) -> str:
        return f"{parents[c]}/n{i}"

    rates = {}
    for name, build in (
        ("create", lambda c: lambda i: create_frame(i + 1, path(c, i), data)),
        ("setdata", lambda c: lambda i: set_data_frame(i + 1, path(c, i), data)),
        ("delete", lambda c: lambda i: delete_frame(i + 1, path(c, i))),
    ):
        builders = [build(c) for c in range(args.connections)]
        rates[name] = run_frames(
            target.host, target.port, builders, args.per_connection, args.window
        )
        _say(f"{target.name:<9} {name:<7} {rates[name]:>9.0f} /s")
    return rates


def sibling_rate(target: Target, args: argparse.Namespace, existing: int, run: str) -> float:
    """Creates per second under one parent that already has ``existing`` children."""
    parent = f"/zks-{run}-{existing}"
    _ensure(target, [parent])
    per = max(1, existing // args.connections + 1)
    fill = [_creates(f"{parent}/f{c}-", b"") for c in range(args.connections)]
    run_frames(target.host, target.port, fill, per, args.window)
    data = bytes(args.data_size)
    measured = [_creates(f"{parent}/m{c}-", data) for c in range(args.connections)]
    rate = run_frames(target.host, target.port, measured, args.sibling_creates, args.window)
    _say(f"{target.name:<9} create under ~{existing} siblings {rate:>9.0f} /s")
    return rate


def _creates(prefix: str, data: bytes) -> Callable[[int], bytes]:
    return lambda i: create_frame(i + 1, f"{prefix}{i}", data)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LoadError(f"no RSS for pid {pid}")


def session_kib(target: Target, sessions: int) -> float:
    """Memory per idle session: with ``sessions`` open, less before, per session.

    zkgate: its resident memory (RSS). ZooKeeper: its live heap after a full
    GC (``jcmd GC.heap_info``) plus its RSS outside the heap. A JVM's RSS says
    little about what sessions cost: it reserves its heap in steps and keeps
    what it touched, so the same run measured 0.5 to 15 KiB per session by
    RSS alone. Live heap is the JVM's fairest figure (it leaves out garbage
    and GC headroom, which zkgate's RSS includes).
    """
    pid = target.pid
    if pid is None:
        raise LoadError(f"{target.name}: no pid to read memory from")
    measure = _jvm_kib if target.name == "zookeeper" else _rss_kib
    before, rss_before = measure(pid), _rss_kib(pid)
    with _idle_sessions(target, sessions):
        after, rss_after = measure(pid), _rss_kib(pid)
    per = (after - before) / sessions
    _say(
        f"{target.name:<9} {sessions} idle sessions: +{after - before} KiB, {per:.2f} KiB each"
        f" (RSS alone: {(rss_after - rss_before) / sessions:.2f} KiB each)"
    )
    return per


def _jvm_kib(pid: int) -> int:
    """Live heap after a full GC, plus what the JVM holds outside its heap, in KiB."""
    subprocess.run(["jcmd", str(pid), "GC.run"], check=True, capture_output=True, timeout=60)
    info = subprocess.run(
        ["jcmd", str(pid), "GC.heap_info"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    parts = _HEAP_PART.findall(info)
    if not parts:
        raise LoadError(f"no heap use in jcmd's answer: {info[:200]!r}")
    committed = sum(int(total) for total, _ in parts)
    used = sum(int(used) for _, used in parts)
    return used + max(0, _rss_kib(pid) - committed)


@contextlib.contextmanager
def _idle_sessions(target: Target, count: int) -> Iterator[None]:
    """``count`` established sessions, closed with closeSession afterwards (a
    dropped socket would leave the session alive until its timeout)."""
    socks: list[socket.socket] = []
    try:
        # One at a time: thousands of connects at once overflow a listen
        # backlog, and the retried SYNs stretched the opening past the first
        # sessions' timeout.
        for _ in range(count):
            sock = socket.create_connection((target.host, target.port), timeout=30)
            socks.append(sock)
            sock.sendall(connect_frame(timeout_ms=_IDLE_SESSION_TIMEOUT_MS))
            read_frame(sock, bytearray())
        yield
        # A session that expired (or a connection the server dropped) before
        # the measurement would have made it look cheap: every one must still
        # answer a ping.
        alive = sum(_answers_ping(sock) for sock in socks)
        if alive < count:
            raise LoadError(
                f"{target.name}: only {alive} of {count} idle sessions were alive when"
                " measured (a session timeout shorter than the measurement?)"
            )
        for sock in socks:
            sock.sendall(close_session_frame(1))
        for sock in socks:
            with contextlib.suppress(LoadError):
                read_frame(sock, bytearray())
    finally:
        for sock in socks:
            sock.close()


def _answers_ping(sock: socket.socket) -> bool:
    try:
        sock.sendall(ping_frame())
        reply = read_frame(sock, bytearray())
    except (LoadError, OSError):
        return False
    (xid,) = _INT.unpack_from(reply)
    return xid == XID_PING


# ------------------------------------------------------------ servers, report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--per-connection", type=int, default=1250,
                        help="znodes each connection creates, sets and deletes")  # fmt: skip
    parser.add_argument("--data-size", type=int, default=100)
    parser.add_argument("--sibling-creates", type=int, default=1000,
                        help="measured creates per connection under each parent")  # fmt: skip
    parser.add_argument("--siblings-large", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--workloads", default="writes,siblings,sessions",
                        help="comma-separated: writes, siblings, sessions")  # fmt: skip
    parser.add_argument("--only", choices=SERVERS)
    parser.add_argument("--zkgate-address")
    parser.add_argument("--zookeeper-address")
    parser.add_argument("--zookeeper-heap", default="512m")
    # The servers are started by zk_reads' helper, which also knows TLS ports;
    # writes are measured on the plain ones.
    parser.set_defaults(tls=False)
    args = parser.parse_args(argv)
    # Every session is a socket here and in the server (a child: it inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.sessions * 2 + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    run = f"{int(time.time())}"
    rates: dict[str, dict[str, float]] = {}
    kib: dict[str, float] = {}
    sibling: float | None = None
    workloads = set(args.workloads.split(","))
    with targets_of(args) as targets:
        for target in targets:
            if "writes" in workloads:
                rates[target.name] = write_rates(target, args, run)
        for target in targets:
            if target.name == "zkgate" and "siblings" in workloads:
                small = sibling_rate(target, args, 1000, run)
                large = sibling_rate(target, args, args.siblings_large, run)
                sibling = large / small
        for target in targets:
            if "sessions" in workloads:
                kib[target.name] = session_kib(target, args.sessions)

    def ratio(op: str) -> float | None:
        if "zkgate" in rates and "zookeeper" in rates:
            return rates["zkgate"][op] / rates["zookeeper"][op]
        return None

    for name, by_op in rates.items():
        print(f"{name:<9} " + "  ".join(f"{op}={rate:.0f}/s" for op, rate in by_op.items()))
    print(
        f"zk_writes: create_ratio={_fmt(ratio('create'))} setdata_ratio={_fmt(ratio('setdata'))}"
        f" delete_ratio={_fmt(ratio('delete'))} sibling_100k_over_1k={_fmt(sibling)}"
        f" session_kib: zkgate={_fmt(kib.get('zkgate'))}"
        f" zookeeper={_fmt(kib.get('zookeeper'))}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
