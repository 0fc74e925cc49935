"""Benchmark: Meta Server shard assignment (simulation), and lookups from a real Meta Server.

Simulation. Assigns N services over K simulated Dispatchers with
:func:`dispatcher.sharding.assignment.assign` and prints the load spread (max over mean), the
share of
services moved when one Dispatcher joins and when one leaves, the time ``assign`` takes, and
in-process lookup throughput of ``Assignment.owner``. The peer measured in the same run is plain
weighted rendezvous hashing (the same code with a balance factor large enough that no bound
binds), which shows what the bounded loads buy in spread and cost in movement.

Each of ``--trials`` joins adds a different new Dispatcher to the same K, and each leave
removes a different one of the K (spread evenly over the sorted ids); the last line reports
the worst of them, so a pass means every measured event met the target.

Network. Then a real ZooKeeper 3.8 (started here, unless ``--no-network``) is given the same K
Dispatchers as ephemeral member znodes and the N services as the catalog, exactly as shards
register, and ``zkgate meta`` runs as its own process on it. The load generator is
``--processes`` worker processes (spawned, so the driver's work never lands in the window)
holding ``--connections`` TCP connections in all; each connection says Hello and then keeps
``--window`` Lookups in flight, each Lookup asking for 1 to 10 services (uniformly; names
drawn from the catalog). The Lookup frames are encoded once, up front; replies are framed by
their length prefix and checked only to be ``assignment`` messages, never decoded, so the
generator stays cheap beside the server on a small machine. Replies are counted for
``--seconds`` after a ``--warmup``; ``lookups_per_s`` is Lookup messages answered per second
(not services: ``services_per_s`` is printed beside it). The Meta Server's own CPU use in the
window is printed too, to show whether it or the generator was the limit.

Usage: ``python bench/sharding.py [--services N] [--dispatchers K] [--trials T]
[--connections C] [--processes P] [--window W] [--seconds S] [--no-network]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if __package__ in (None, ""):
    # Run as a script (python bench/sharding.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatcher import wire
from dispatcher.sharding.assignment import DEFAULT_BALANCE, Assignment, Member, assign

if TYPE_CHECKING:
    from kazoo.client import KazooClient

MOVE_TARGET = 1.3
"""A join may move at most 1.3 fair shares of n/(K+1) services; a leave 1.3 of n/K."""
LOOKUP_TARGET = 20_000
"""Lookups per second one Meta Server must answer."""
TOKEN = "bench-token"
_LENGTH = struct.Struct(">I")
_ASSIGNMENT_HEAD = b'{"type":"assignment"'


@attrs.frozen
class Event:
    """One membership change and the share of all services it moved."""

    kind: str
    member_id: str
    moved_share: float
    fair_share: float
    plain_moved_share: float

    @property
    def in_fair_shares(self) -> float:
        """Moved share divided by the fair share of one Dispatcher after or before the event."""
        return self.moved_share / self.fair_share


def service_names(count: int) -> list[str]:
    """Plausible, fixed service names: teams with many services each."""
    return [f"com.example.team{i % 97:02d}.Service{i:05d}" for i in range(count)]


def dispatcher(index: int) -> Member:
    """Simulated Dispatcher ``index`` with made-up addresses for its two faces."""
    host = f"10.0.{index // 250}.{index % 250 + 1}"
    return Member(
        id=f"dispatcher-{index:03d}",
        endpoints={"zookeeper": f"{host}:2181", "subscribe": f"{host}:7411"},
    )


def timed_assign(
    services: Sequence[str], members: Sequence[Member], c: float, timings: list[float]
) -> Assignment:
    """``assign`` with its wall time appended to ``timings``."""
    start = time.perf_counter()
    result = assign(services, members, c)
    timings.append(time.perf_counter() - start)
    return result


def max_over_mean(result: Assignment, n_services: int) -> float:
    """Fullest member's load over the mean load."""
    return max(result.loads().values()) / (n_services / len(result.members))


def lookups_per_second(result: Assignment, names: Sequence[str], count: int) -> float:
    """Calls per second of ``result.owner`` over ``count`` names drawn from ``names``."""
    order = [names[i] for i in random.Random(7).choices(range(len(names)), k=count)]
    owner = result.owner
    start = time.perf_counter()
    for name in order:
        owner(name)
    return count / (time.perf_counter() - start)


# ------------------------------------------------------------------ the networked half


@attrs.frozen
class WorkerSample:
    """What one load-generator process counted inside the window."""

    lookups: int
    services: int
    seconds: float
    cpu_seconds: float


def lookup_frames(names: Sequence[str], count: int, seed: int) -> list[tuple[bytes, int]]:
    """``count`` encoded Lookup frames of 1 to 10 names each, with their name counts."""
    rng = random.Random(seed)
    frames = []
    for _ in range(count):
        asked = rng.sample(names, rng.randint(1, 10))
        frames.append((wire.encode(wire.Lookup(tuple(asked))), len(asked)))
    return frames


class _Conn:
    __slots__ = ("buffer", "in_flight", "next", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.unsent = b""
        self.in_flight: list[int] = []  # name counts of the lookups sent, oldest first
        self.next = 0


def _hello(sock: socket.socket) -> None:
    sock.sendall(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, f"bench-{os.getpid()}")))
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    (length,) = _LENGTH.unpack(header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    if not isinstance(wire.decode(body), wire.Welcome):
        raise RuntimeError(f"no Welcome: {body[:200]!r}")


def lookup_worker(
    host: str,
    port: int,
    names: Sequence[str],
    connections: int,
    window: int,
    seed: int,
    measure_at: float,
    stop_at: float,
) -> WorkerSample:
    """Keep ``window`` Lookups in flight on each of ``connections``; count in the window."""
    frames = lookup_frames(names, 4096, seed)
    selector = selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _hello(sock)
        sock.setblocking(False)
        conn = _Conn(sock)
        conns.append(conn)
        selector.register(sock, selectors.EVENT_READ, conn)

    def top_up(conn: _Conn) -> None:
        missing = window - len(conn.in_flight)
        if missing <= 0:
            return
        batch = []
        for _ in range(missing):
            frame, asked = frames[conn.next]
            conn.next = (conn.next + 1) % len(frames)
            batch.append(frame)
            conn.in_flight.append(asked)
        data = conn.unsent + b"".join(batch)
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        conn.unsent = data[sent:]

    for conn in conns:
        top_up(conn)
    lookups = services = 0
    cpu_start = time.process_time()
    measuring = False
    window_start = measure_at
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        if not measuring and now >= measure_at:
            measuring, lookups, services = True, 0, 0
            cpu_start, window_start = time.process_time(), now
        for key, _ in selector.select(timeout=0.05):
            conn = key.data
            data = conn.sock.recv(1 << 18)
            if not data:
                raise RuntimeError("the Meta Server closed a connection")
            buffer = conn.buffer + data if conn.buffer else data
            offset, end = 0, len(buffer)
            while end - offset >= 4:
                (length,) = _LENGTH.unpack_from(buffer, offset)
                stop = offset + 4 + length
                if stop > end:
                    break
                if not buffer.startswith(_ASSIGNMENT_HEAD, offset + 4):
                    raise RuntimeError(f"not an assignment: {buffer[offset : offset + 200]!r}")
                asked = conn.in_flight.pop(0)
                lookups += 1
                services += asked
                offset = stop
            conn.buffer = buffer[offset:]
            top_up(conn)
    seconds = time.monotonic() - window_start
    cpu = time.process_time() - cpu_start
    for conn in conns:
        conn.sock.close()
    return WorkerSample(lookups, services, seconds, cpu)


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _register(
    zk_address: str, root: str, members: Sequence[Member], names: Sequence[str]
) -> KazooClient:
    """Write the members (ephemeral) and the catalog as shards would; return the client,
    whose session keeps the members alive."""
    from kazoo.client import KazooClient

    from dispatcher.sharding.membership import Registration, owner_endpoints, quote_service

    client = KazooClient(hosts=zk_address, timeout=30)
    client.start(timeout=30)
    client.ensure_path(f"{root}/members")
    client.ensure_path(f"{root}/services")
    for member in members:
        subscribe, zookeeper = owner_endpoints(member)
        data = Registration(member.id, subscribe, zookeeper, member.weight).to_json()
        client.create(f"{root}/members/{member.id}", data, ephemeral=True)
    for start in range(0, len(names), 500):
        pending = [client.create_async(f"{root}/services/{quote_service(name)}", b"")
                   for name in names[start : start + 500]]  # fmt: skip
        for result in pending:
            result.get()
    return client


def _wait_for_meta(host: str, port: int, probe: str, deadline: float) -> int:
    """Wait until the Meta Server answers ``probe`` with an owner; return the epoch."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                _hello(sock)
                sock.sendall(wire.encode(wire.Lookup((probe,))))
                decoder = wire.FrameDecoder()
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    answers = list(decoder.feed(data))
                    if answers:
                        answer = answers[0]
                        if isinstance(answer, wire.Assignment) and answer.owners.get(probe):
                            return answer.epoch
                        break
        except (OSError, RuntimeError):
            pass
        time.sleep(0.1)
    raise RuntimeError("the Meta Server did not answer with an owner in time")


@attrs.frozen
class NetworkResult:
    lookups_per_s: float
    services_per_s: float
    meta_cpu: float
    loadgen_cpu: float
    epoch: int


def measure_meta_server(
    names: Sequence[str], members: Sequence[Member], args: argparse.Namespace
) -> NetworkResult:
    """Start ZooKeeper and ``zkgate meta``, register, load, and count (see the docstring)."""
    from tests.servers import ZooKeeperServer, free_port

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="zkgate-bench-sharding-") as tmp:
        zookeeper = ZooKeeperServer(base_dir=Path(tmp) / "zookeeper")
        zookeeper.start()
        meta: subprocess.Popen[bytes] | None = None
        client: KazooClient | None = None
        try:
            root = "/zkgate-bench"
            client = _register(zookeeper.address, root, members, names)
            port = free_port()
            config = Path(tmp) / "meta.toml"
            config.write_text(
                f'token = {json.dumps(TOKEN)}\n[membership]\nkind = "zookeeper"\n'
                f"address = {json.dumps(zookeeper.address)}\nroot = {json.dumps(root)}\n"
                f"session_timeout = 30.0\n"
            )
            log = open(Path(tmp) / "meta.log", "wb")  # noqa: SIM115 (closed with the process)
            meta = subprocess.Popen(
                [sys.executable, "-m", "dispatcher", "--log-level", "WARNING", "meta",
                 "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=repo,
                env={**os.environ, "PYTHONPATH": str(repo)},
            )  # fmt: skip
            epoch = _wait_for_meta("127.0.0.1", port, names[0], time.monotonic() + 60)
            per_process = [args.connections // args.processes
                           + (1 if i < args.connections % args.processes else 0)
                           for i in range(args.processes)]  # fmt: skip
            context = multiprocessing.get_context("spawn")
            with context.Pool(args.processes) as pool:
                measure_at = time.monotonic() + 1.0 + args.warmup
                stop_at = measure_at + args.seconds
                pending = [
                    pool.apply_async(lookup_worker, ("127.0.0.1", port, list(names), count,
                                                     args.window, 1000 + i, measure_at, stop_at))
                    for i, count in enumerate(per_process) if count
                ]  # fmt: skip
                time.sleep(max(0.0, measure_at - time.monotonic()))
                cpu_before = _process_cpu(meta.pid)
                time.sleep(max(0.0, stop_at - time.monotonic()))
                cpu_after = _process_cpu(meta.pid)
                samples = [result.get(timeout=args.seconds + 60) for result in pending]
            if meta.poll() is not None:
                raise RuntimeError(f"zkgate meta exited with {meta.returncode}")
            seconds = statistics.mean(s.seconds for s in samples)
            return NetworkResult(
                lookups_per_s=sum(s.lookups for s in samples) / seconds,
                services_per_s=sum(s.services for s in samples) / seconds,
                meta_cpu=(cpu_after - cpu_before) / args.seconds,
                loadgen_cpu=sum(s.cpu_seconds for s in samples) / seconds,
                epoch=epoch,
            )
        finally:
            if meta is not None:
                meta.terminate()
                try:
                    meta.wait(10)
                except subprocess.TimeoutExpired:
                    meta.kill()
            if client is not None:
                client.stop()
                client.close()
            zookeeper.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--dispatchers", type=int, default=100)
    parser.add_argument("--trials", type=int, default=5, help="joins and leaves to measure")
    parser.add_argument("--balance", type=float, default=DEFAULT_BALANCE, help="c")
    parser.add_argument("--lookups", type=int, default=1_000_000)
    parser.add_argument(
        "--no-network", action="store_true", help="skip the real Meta Server measurement"
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes")
    parser.add_argument("--window", type=int, default=16, help="lookups in flight per connection")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    n, k, c = args.services, args.dispatchers, args.balance
    if n < 1 or k < 2 or not 1 <= args.trials <= k:
        parser.error("need --services >= 1, --dispatchers >= 2, 1 <= --trials <= dispatchers")
    plain_c = float(k)  # c >= K: every bound is >= n, so this is plain rendezvous hashing

    names = service_names(n)
    members = [dispatcher(i) for i in range(k)]
    timings: list[float] = []
    base = timed_assign(names, members, c, timings)
    plain = assign(names, members, plain_c)
    spread = max_over_mean(base, n)
    print(f"assign: services={n} dispatchers={k} c={c} seconds={timings[0]:.3f}")
    print(
        f"spread: max_over_mean={spread:.3f} "
        f"plain_rendezvous_max_over_mean={max_over_mean(plain, n):.3f}"
    )

    events: list[Event] = []
    for t in range(args.trials):
        joiner = dispatcher(k + t)
        grown = [*members, joiner]
        moved = len(base.moved(timed_assign(names, grown, c, timings))) / n
        plain_moved = len(plain.moved(assign(names, grown, plain_c))) / n
        events.append(Event("join", joiner.id, moved, 1 / (k + 1), plain_moved))
    for t in range(args.trials):
        leaver = members[t * k // args.trials]
        shrunk = [m for m in members if m is not leaver]
        moved = len(base.moved(timed_assign(names, shrunk, c, timings))) / n
        plain_moved = len(plain.moved(assign(names, shrunk, plain_c))) / n
        events.append(Event("leave", leaver.id, moved, 1 / k, plain_moved))
    for e in events:
        print(
            f"{e.kind}: member={e.member_id} moved={e.moved_share:.5f} "
            f"fair_shares={e.in_fair_shares:.3f} "
            f"plain_rendezvous_fair_shares={e.plain_moved_share / e.fair_share:.3f}"
        )
    joins = [e for e in events if e.kind == "join"]
    leaves = [e for e in events if e.kind == "leave"]
    worst_join = max(joins, key=lambda e: e.moved_share)
    worst_leave = max(leaves, key=lambda e: e.moved_share)
    print(
        f"movement: join_fair_shares mean={statistics.mean(e.in_fair_shares for e in joins):.3f} "
        f"max={worst_join.in_fair_shares:.3f} "
        f"leave_fair_shares mean={statistics.mean(e.in_fair_shares for e in leaves):.3f} "
        f"max={worst_leave.in_fair_shares:.3f} (target <= {MOVE_TARGET})"
    )
    print(
        f"assign_seconds: mean={statistics.mean(timings):.3f} max={max(timings):.3f} "
        f"over {len(timings)} runs"
    )

    inprocess = lookups_per_second(base, names, args.lookups)
    unknown = [f"com.example.new.Service{i:05d}" for i in range(2_000)]
    fallback = lookups_per_second(base, unknown, len(unknown))
    print(f"lookups_per_s_inprocess={inprocess:.0f} (Assignment.owner, assigned services)")
    print(f"fallback_lookups_per_s_inprocess={fallback:.0f} (Assignment.owner, unknown services)")

    lookups = "skipped"
    if not args.no_network:
        result = measure_meta_server(names, members, args)
        lookups = f"{result.lookups_per_s:.0f}"
        print(
            f"meta_server: lookups_per_s={result.lookups_per_s:.0f} "
            f"services_per_s={result.services_per_s:.0f} epoch={result.epoch} "
            f"(zkgate meta on ZooKeeper 3.8, {args.connections} connections in "
            f"{args.processes} process(es), {args.window} lookups of 1-10 services in flight "
            f"each) meta_cpu={result.meta_cpu:.2f} loadgen_cpu={result.loadgen_cpu:.2f} "
            f"cores={os.cpu_count()}"
        )
    checks = {
        "max_over_mean<=c": spread <= c + 1e-9,
        "moved_on_join<=1.3/(K+1)": worst_join.moved_share <= MOVE_TARGET / (k + 1),
        "moved_on_leave<=1.3/K": worst_leave.moved_share <= MOVE_TARGET / k,
    }
    if not args.no_network:
        checks[f"lookups_per_s>={LOOKUP_TARGET}"] = result.lookups_per_s >= LOOKUP_TARGET
    verdicts = " ".join(f"{name}={'ok' if ok else 'MISSED'}" for name, ok in checks.items())
    print(f"targets: {verdicts}")
    print(
        f"sharding: services={n} dispatchers={k} max_over_mean={spread:.3f} "
        f"moved_on_join={worst_join.moved_share:.5f} moved_on_leave={worst_leave.moved_share:.5f} "
        f"lookups_per_s={lookups}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
