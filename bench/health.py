"""Benchmark: the central health checker over 10,000 instances.

One :class:`~dispatcher.core.health.HealthChecker` (owning every service) probes
``--instances`` instances with TCP connects. As many as the file-descriptor
limit comfortably allows are real listeners on 127.0.0.1, served by a
separate listener process (this script with ``--serve``: a plain selector
loop that accepts and closes), so that the checker process's CPU time is
the checker's alone; the rest are refused endpoints (``127.0.x.y:9``, where
nothing listens). The instances come from a scripted upstream through a real
:class:`~dispatcher.core.fanin.FanIn`, and detection is observed the way a proxy
sees it: through a subscription to the fan-in's deltas.

Measured:

* probes per cycle: slot probes started per interval, over ``--cycles``
  complete cycles after a warm-up cycle (the target is exactly one per
  instance); the peer-to-peer equivalent is ``M * N``, every one of ``M``
  proxies probing every one of ``N`` instances once per interval;
* CPU per cycle: ``time.process_time()`` of the checker process over those
  cycles, divided by their number (fan-in and subscription included);
* detection latency: ``--kill`` listeners are closed at one instant (their
  close time taken in the listener process); each one's latency is the time
  until the subscription shows it failing. The target is
  ``fall * interval + timeout + 100 ms``.

The last line is (one line)::

    health: instances=<n> probes_per_cycle=<p> p2p_equivalent=<m*n>
    detect_p99_ms=<d> cpu_s_per_cycle=<c>

Usage: ``python bench/health.py [--instances N] [--interval S] [--proxies M] [--cycles C]
[--kill K] [--fall F] [--timeout S]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import trio

from dispatcher.config import HealthConfig
from dispatcher.core.fanin import FanIn
from dispatcher.core.health import HealthChecker
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.subscriptions import EVERYTHING
from dispatcher.core.upstream import Listing, Status, UpstreamEvent

FD_MARGIN = 1000
"""File descriptors kept free in the listener process for accepted connections and the rest."""


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# ------------------------------------------------------------ listener process


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where connects take their source)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def serve(count: int) -> None:
    """Listener process: open ``count`` listeners, print their ports, accept and close.

    Commands on stdin, one a line: ``close PORT...`` closes those listeners
    and answers ``closed <time.time()>``.
    """
    raise_fd_limit()
    selector = selectors.DefaultSelector()
    listeners: dict[int, socket.socket] = {}
    # Below the ephemeral range: a probe of a closed listener's port must
    # not be able to pick that port as its own source and connect to itself.
    # Below 20000 too: the test harness (tests/servers.py) starts servers on
    # random ports in 20000..ephemeral, and one of them taking a port we just
    # closed would look like the instance coming back.
    candidates = iter(range(min(ephemeral_low(), 20000) - 1, 1023, -1))
    while len(listeners) < count:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", next(candidates)))
        except OSError:
            sock.close()
            continue
        sock.listen(64)
        sock.setblocking(False)
        listeners[sock.getsockname()[1]] = sock
        selector.register(sock, selectors.EVENT_READ)
    print(json.dumps(sorted(listeners)), flush=True)
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                line = sys.stdin.readline()
                if not line:
                    return
                command, *ports = line.split()
                if command == "close":
                    for port in map(int, ports):
                        sock = listeners.pop(port)
                        selector.unregister(sock)
                        sock.close()
                    print(f"closed {time.time()!r}", flush=True)
                continue
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # reset before we got to it
                conn.close()


# ------------------------------------------------------------ checker process


class ListedUpstream:
    """An upstream that lists a fixed set of instances once, then stays connected."""

    def __init__(self, name: str, instances: Sequence[Instance]) -> None:
        self.name = name
        self.instances = tuple(instances)

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name, ())

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        await events.send(Listing(self.instances))
        await events.send(Status(True, "bench"))
        await trio.sleep_forever()

    def set_interest(self, services: frozenset[str] | None) -> None:
        pass


class LineReader:
    """Lines from a byte stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError("listener process ended")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def instances_for(ports: Sequence[int], total: int, services: int) -> list[Instance]:
    """``total`` instances over ``services`` services: the listeners first, then refused ones."""
    result = []
    for index in range(total):
        if index < len(ports):
            host, port = "127.0.0.1", ports[index]
        else:
            refused = index - len(ports) + 1
            host, port = f"127.0.{refused // 250 + 1}.{refused % 250 + 2}", 9
        service = f"svc{index % services:04d}"
        result.append(Instance(service, f"i{index}", host, port, source=Source("bench", "")))
    return result


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def bench(args: argparse.Namespace) -> None:
    soft = raise_fd_limit()
    # The listener process gets the same limit (inherited); keep a margin.
    listeners = max(0, min(args.instances, soft - FD_MARGIN))
    if args.listeners is not None:
        listeners = min(listeners, args.listeners)
    print(f"fd limit {soft}: {listeners} real listeners, "
          f"{args.instances - listeners} refused endpoints")  # fmt: skip
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve", str(listeners)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    reader = LineReader(process.stdout)
    try:
        ports: list[int] = json.loads(await reader.line())
        await run_checker(args, process, reader, ports)
    finally:
        await process.stdin.aclose()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def run_checker(
    args: argparse.Namespace, process: trio.Process, reader: LineReader, ports: list[int]
) -> None:
    assert process.stdin is not None
    config = HealthConfig(
        enabled=True, interval=args.interval, timeout=args.timeout, rise=args.rise,
        fall=args.fall, jitter=args.jitter, concurrency=args.concurrency,
    )  # fmt: skip
    instances = instances_for(ports, args.instances, args.services)
    fanin = FanIn("bench")
    checker = HealthChecker(fanin, None, config)
    interval = config.interval
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [ListedUpstream("bench", instances)])
        subscription = fanin.subscribe([EVERYTHING], max_queue=1 << 20)
        failing_at: dict[tuple[str, str], float] = {}

        async def watch() -> None:
            async for update in subscription:
                now = time.time()
                changed = (
                    update.delta.updated if update.delta is not None
                    else update.full.instances.values() if update.full is not None else ()
                )  # fmt: skip
                for instance in changed:
                    if instance.health is Health.FAILING:
                        failing_at.setdefault((instance.service, instance.instance_id), now)

        nursery.start_soon(watch)
        with trio.fail_after(60):
            while len(fanin.snapshot) < args.services:
                await trio.sleep(0.05)
        await nursery.start(checker.run)
        started = time.time()

        # Warm-up: every instance probed once (its first result decides).
        with trio.fail_after(interval * 3 + 30):
            while checker.metrics.cycle < int(started // interval) + 1:
                await trio.sleep(0.05)
        passing = sum(
            1 for entry in fanin.snapshot.values() for i in entry.instances.values()
            if i.health is Health.PASSING
        )  # fmt: skip
        print(f"after warm-up: {passing} passing, {len(instances) - passing} failing")

        # Steady state: CPU and probes over complete cycles.
        first = checker.metrics.cycle
        with trio.fail_after(interval * 3):
            while checker.metrics.cycle == first:
                await trio.sleep(0.01)
        checker.metrics.lag_max = 0.0
        usage_start = resource.getrusage(resource.RUSAGE_SELF)
        cpu_start, wall_start, cycle_start = time.process_time(), time.time(), checker.metrics.cycle
        per_cycle: list[int] = []
        with trio.fail_after(interval * (args.cycles + 3)):
            while len(per_cycle) < args.cycles:
                seen = checker.metrics.cycle
                while checker.metrics.cycle == seen:
                    await trio.sleep(0.01)
                per_cycle.append(checker.metrics.probes_per_cycle)
        cycles = checker.metrics.cycle - cycle_start
        cpu = (time.process_time() - cpu_start) / cycles
        usage = resource.getrusage(resource.RUSAGE_SELF)
        user = (usage.ru_utime - usage_start.ru_utime) / cycles
        system = (usage.ru_stime - usage_start.ru_stime) / cycles
        wall = (time.time() - wall_start) / cycles
        print(f"cycles {cycle_start + 1}..{checker.metrics.cycle}: probes per cycle {per_cycle}, "
              f"cpu {cpu:.3f} s per {wall:.2f} s cycle ({cpu / wall:.1%} of a core; "
              f"user {user:.3f} s, system {system:.3f} s), "
              f"latest slot {checker.metrics.lag_max * 1000:.0f} ms late, "
              f"skipped in flight {checker.metrics.skipped_in_flight}")  # fmt: skip

        # Detection: close listeners at one instant.
        victims = [i for i in instances if i.host == "127.0.0.1"][: args.kill]
        keys = [(i.service, f"{i.host}:{i.port}") for i in victims]
        failing_at.clear()
        checker.metrics.lag_max = 0.0
        await process.stdin.send_all(
            ("close " + " ".join(str(i.port) for i in victims) + "\n").encode()
        )
        closed = float((await reader.line()).split()[1])
        bound = config.fall * interval + config.timeout + 0.1
        with trio.move_on_after(bound + interval + 5):
            while not all(key in failing_at for key in keys):
                await trio.sleep(0.05)
        latencies = [failing_at[key] - closed for key in keys if key in failing_at]
        for service, iid in keys:
            if (service, iid) not in failing_at:
                print(
                    f"not seen failing: {service}/{iid}: {checker.state(service, iid)}, "
                    f"snapshot {fanin.snapshot.full(service).instances[iid].health}"
                )
        missed = len(keys) - len(latencies)
        p50 = percentile(latencies, 0.5) if latencies else float("nan")
        p99 = percentile(latencies, 0.99) if latencies else float("inf")
        print(
            f"detection of {len(keys)} closed listeners: p50 {p50 * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms, max {max(latencies, default=0) * 1000:.0f} ms, "
            f"missed {missed}; bound fall*interval+timeout+100ms = {bound * 1000:.0f} ms; "
            f"checker's own estimate max {checker.metrics.detection_max * 1000:.0f} ms, "
            f"latest slot {checker.metrics.lag_max * 1000:.0f} ms late"
        )
        subscription.close()
        nursery.cancel_scope.cancel()

    probes = min(per_cycle)
    p2p = args.proxies * args.instances
    print(
        f"targets: probes_per_cycle == instances: {probes == args.instances and max(per_cycle) == probes}; "  # noqa: E501
        f"detect p99 <= {bound * 1000:.0f} ms: {p99 <= bound and not missed}; "
        f"cpu < 0.5 core at {interval:g} s: {cpu / interval < 0.5}"
    )
    print(
        f"health: instances={args.instances} probes_per_cycle={probes} p2p_equivalent={p2p} "
        f"detect_p99_ms={p99 * 1000:.0f} cpu_s_per_cycle={cpu:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument(
        "--listeners",
        type=int,
        default=None,
        help="at most this many real listeners (default: as the fd limit allows)",
    )
    parser.add_argument("--proxies", type=int, default=1000, help="M, for the p2p equivalent")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--rise", type=int, default=2)
    parser.add_argument("--fall", type=int, default=3)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--kill", type=int, default=200)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return
    # One line per verdict change is right for operators, noise here.
    logging.getLogger("dispatcher").setLevel(logging.ERROR)
    trio.run(bench, args)


if __name__ == "__main__":
    main()
