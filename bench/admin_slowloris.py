"""Benchmark: does the admin endpoint's ``/health`` keep answering under slowloris?

Issue #13: 64 to 200 connections that send a header byte every few seconds
used to hold every admin slot, and ``/health`` answered 0-3% of probes. This
script repeats that attack against a real zkgate and counts the probes
answered:

1. A real zkgate starts (``tests.servers.ZkgateServer``: ``python -m dispatcher
   serve``) with its admin endpoint on a free loopback port and the default
   ``[admin]`` limits, or ``--admin HOST:PORT`` names a running endpoint.
2. ``--connections`` slow clients (200) each open a connection and send an
   endless request head one byte every ``--pace-min``..``--pace-max`` seconds
   (1-2 s). When the server closes one (408, 503 or a plain close), it opens
   a new one at its next tick, as slowloris does, so the attack keeps its
   size. They come from ``--addresses`` loopback addresses (1: all from
   127.0.0.1, the prober's own address; N: round-robin over 127.0.0.1 ..
   127.0.0.N), so the per-address cap does not shield the prober.
3. Once every slow client has connected, ``/health`` is probed ``--probe-rate``
   times a second (20) for ``--seconds`` (30) from 127.0.0.1, each probe a new
   connection with ``--probe-timeout`` seconds (1, a Kubernetes probe's
   default) to get its answer; a probe counts as answered only with a 200.

Progress and details go to stderr and stdout; the last line is always::

    admin_slowloris: connections=<n> seconds=<s> health_ok_percent=<x>

``--check`` makes the exit status 1 below 99%. tests/test_admin_slow_clients.py
runs the same measurement for 10 seconds.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

if __package__ in (None, ""):
    # Run as a script (python bench/admin_slowloris.py): make the repository
    # importable, for the server harness in tests.servers.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import ZkgateServer, free_port

SLOW_HEAD: Final = b"GET /health HTTP/1.1\r\nhost: slowloris\r\nx-padding: "
"""What a slow client trickles; after it, ``a`` forever: the head never ends."""

PROBE: Final = b"GET /health HTTP/1.1\r\nhost: prober\r\nconnection: close\r\n\r\n"
_MAX_ANSWER: Final = 65536
_BROKEN: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.define
class AttackStats:
    """What the slow clients saw (mutated by them while the attack runs)."""

    connections: int
    #: Connections opened, all slow clients together.
    connects: int = 0
    connect_errors: int = 0
    #: How the server ended slow connections: its status code, or "closed".
    endings: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Slow clients that have connected at least once.
    started: int = 0
    all_started: trio.Event = attrs.field(factory=trio.Event)

    def note_started(self) -> None:
        self.started += 1
        if self.started == self.connections:
            self.all_started.set()


@attrs.frozen
class Report:
    """One measurement: the probes' outcomes and what the attack looked like."""

    connections: int
    addresses: int
    seconds: float
    #: Probe outcomes: a status code, "timeout", "closed" (closed without an
    #: answer), "garbled", or "error:<exception>" (connection failed).
    outcomes: dict[str, int]
    #: Seconds each answered (200) probe took.
    latencies: tuple[float, ...]
    attack: AttackStats

    @property
    def probes(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok_percent(self) -> float:
        return 100.0 * self.outcomes.get("200", 0) / self.probes if self.probes else 0.0

    def summary(self) -> str:
        return (
            f"admin_slowloris: connections={self.connections} seconds={self.seconds:g} "
            f"health_ok_percent={self.ok_percent:.2f}"
        )

    def details(self) -> list[str]:
        latencies = sorted(self.latencies)
        p50 = p99 = "n/a"
        if latencies:
            p50 = f"{statistics.median(latencies) * 1000:.1f}"
            p99 = f"{latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000:.1f}"
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        endings = " ".join(f"{k}={v}" for k, v in sorted(self.attack.endings.items()))
        return [
            f"probes: {self.probes} ({outcomes}); answered in p50={p50} ms p99={p99} ms",
            f"attack: {self.connections} slow clients from {self.addresses} address(es), "
            f"{self.attack.connects} connections opened, {self.attack.connect_errors} "
            f"failed to open; the server ended them with: {endings or 'nothing'}",
        ]


async def slow_client(
    host: str, port: int, source: str, pace: tuple[float, float], rng: random.Random,
    stats: AttackStats,
) -> None:  # fmt: skip
    """Forever: a connection trickling :data:`SLOW_HEAD` (then ``a``s), one byte
    per tick; a new one at the next tick when the server ends it."""
    started = False
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port, local_address=source)
        except OSError:
            stats.connect_errors += 1
            await trio.sleep(rng.uniform(*pace))
            continue
        stats.connects += 1
        ending = "closed"
        async with stream:
            try:
                for sent in range(1 << 30):
                    await stream.send_all(SLOW_HEAD[sent : sent + 1] or b"a")
                    if not started:
                        started = True
                        stats.note_started()
                    with trio.move_on_after(rng.uniform(*pace)):
                        answer = await stream.receive_some(_MAX_ANSWER)
                        if answer.startswith(b"HTTP/1.1 "):
                            ending = answer.split(b" ", 2)[1].decode("ascii", "replace")
                        break  # answered or closed: this connection is over
            except _BROKEN:
                pass
        stats.endings[ending] += 1
        await trio.sleep(rng.uniform(*pace))


async def probe_health(host: str, port: int, timeout: float) -> tuple[str, float]:
    """One ``GET /health`` on a new connection: (outcome, seconds it took)."""
    began = trio.current_time()
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(PROBE)
                answer = bytearray()
                while len(answer) < _MAX_ANSWER and (chunk := await stream.receive_some()):
                    answer += chunk
        except _BROKEN as exc:
            return f"error:{type(exc).__name__}", trio.current_time() - began
        if not answer:
            return "closed", trio.current_time() - began
        if not answer.startswith(b"HTTP/1.1 "):
            return "garbled", trio.current_time() - began
        return answer.split(b" ", 2)[1].decode("ascii", "replace"), trio.current_time() - began
    return "timeout", trio.current_time() - began


async def measure(
    host: str,
    port: int,
    *,
    connections: int = 200,
    seconds: float = 30.0,
    addresses: int = 1,
    pace: tuple[float, float] = (1.0, 2.0),
    probe_rate: float = 20.0,
    probe_timeout: float = 1.0,
    ramp_timeout: float = 30.0,
    seed: int = 13,
) -> Report:
    """Attack ``host:port`` with slow clients and probe ``/health`` meanwhile.

    Probing starts once every slow client has connected (``ramp_timeout``
    bounds that wait) and runs for ``seconds`` at ``probe_rate`` a second,
    each probe started on schedule whether or not earlier ones are done.
    """
    if not 1 <= addresses <= 254:
        raise ValueError(f"addresses: 1..254 loopback addresses, not {addresses}")
    rng = random.Random(seed)
    stats = AttackStats(connections)
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []

    async def probe() -> None:
        outcome, took = await probe_health(host, port, probe_timeout)
        outcomes[outcome] += 1
        if outcome == "200":
            latencies.append(took)

    async with trio.open_nursery() as attack:
        for index in range(connections):
            source = f"127.0.0.{1 + index % addresses}"
            client_rng = random.Random(rng.getrandbits(64))
            attack.start_soon(slow_client, host, port, source, pace, client_rng, stats)
        with trio.fail_after(ramp_timeout):
            await stats.all_started.wait()
        async with trio.open_nursery() as probes:
            start = trio.current_time()
            for index in range(round(seconds * probe_rate)):
                await trio.sleep_until(start + index / probe_rate)
                probes.start_soon(probe)
        attack.cancel_scope.cancel()
    return Report(connections, addresses, seconds, dict(outcomes), tuple(latencies), stats)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=200, help="slow clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="probing window")
    parser.add_argument(
        "--addresses",
        type=int,
        default=1,
        help="loopback source addresses of the slow clients (127.0.0.1..N)",
    )
    parser.add_argument("--pace-min", type=float, default=1.0, help="seconds between bytes, min")
    parser.add_argument("--pace-max", type=float, default=2.0, help="seconds between bytes, max")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="probes per second")
    parser.add_argument("--probe-timeout", type=float, default=1.0, help="seconds per probe")
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="attack this running admin endpoint instead of starting a zkgate",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 below 99%% answered")
    args = parser.parse_args(argv)
    if not (0 < args.pace_min <= args.pace_max and args.connections > 0 and args.seconds > 0):
        parser.error("need 0 < --pace-min <= --pace-max, --connections > 0, --seconds > 0")
    if not 1 <= args.addresses <= 254:
        parser.error("--addresses: 1..254")

    def run(host: str, port: int) -> Report:
        return trio.run(lambda: measure(
            host, port, connections=args.connections, seconds=args.seconds,
            addresses=args.addresses, pace=(args.pace_min, args.pace_max),
            probe_rate=args.probe_rate, probe_timeout=args.probe_timeout,
        ))  # fmt: skip

    if args.admin:
        host, _, port = args.admin.rpartition(":")
        print(f"attacking the admin endpoint at {args.admin}", file=sys.stderr)
        report = run(host, int(port))
    else:
        with tempfile.TemporaryDirectory(prefix="admin_slowloris-") as base:
            admin_port = free_port()
            server = ZkgateServer(["--admin-listen", f"127.0.0.1:{admin_port}"], base_dir=base)
            with server:
                print(f"zkgate started; admin endpoint 127.0.0.1:{admin_port}", file=sys.stderr)
                report = run("127.0.0.1", admin_port)
    for line in report.details():
        print(line)
    print(report.summary())
    return 1 if args.check and report.ok_percent < 99.0 else 0


if __name__ == "__main__":
    sys.exit(main())
