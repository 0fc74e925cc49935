"""Benchmark: the fan-in's propagation latency against the upstream's own, apply rate, memory.

What a Dispatcher adds between a registry and its consumers must stay small
next to what the registry itself costs, so every latency here is measured
beside the upstream's own watch latency *in the same run*, on the same writes:

1. **Propagation, ZooKeeper.** A real ZooKeeper 3.8; a :class:`FanIn` with a
   :class:`ZooKeeperUpstream` over ``/bench/zk`` (plain layout) and one
   subscriber to the service ``svc``, which already holds
   ``--service-size`` instances. A peer process (:mod:`bench.fanin_peer`)
   registers one instance znode per sample with a raw client and removes it
   again, each write ``--gap-ms`` after the previous one's reply, noting
   ``t0`` just before each write leaves. A second raw connection in that
   process holds a child watch on the directory (re-armed after each event)
   and notes when the notification arrived (the reference), and when the
   reads that a client needs to learn what changed came back
   (``getChildren``, plus ``getData`` for a registration). The fan-in
   process notes when its subscriber reads the delta that adds or removes
   the instance.
2. **Propagation, etcd.** The same with a real etcd 3.4 and an
   :class:`EtcdUpstream` (grpc layout). The direct watcher is python-etcd3's
   prefix watch in the peer process: the same library and gRPC stream the
   adapter uses, so the difference is the adapter and the fan-in alone.
   (etcd's HTTP gateway ``/v3/watch`` is a gRPC client inside etcd; it would
   add etcd-side latency to the reference, not remove any.) An etcd event
   carries the value, so there is no read to add.
3. **Apply rate.** Instance changes per second through ``FanIn.run`` from an
   in-process upstream into the snapshot, with one ``*`` subscriber draining
   (:mod:`bench.fanin_load`).
4. **Memory per instance** of a 100k-instance snapshot built through the
   fan-in, in a fresh process: tracemalloc and RSS growth.

Run ``python bench/fanin.py --help``. Progress goes to stderr, the report to
stdout; the last line is always::

    fanin: zk_added_p99_ms=<x> etcd_added_p99_ms=<y> apply_per_s=<n> bytes_per_instance=<b>

``*_added_p99_ms`` is the fan-in subscriber's p99 minus the direct
notification's p99 over all timed writes (the table also has the per-write
differences, which pair each write's two times); a write whose effect the
fan-in never delivered (a registration and its removal both happened before
the adapter re-read the directory: correct coalescing, counted as "missed")
is left out of both. ``apply_per_s`` is the wall-clock rate of the big
``Changed`` batches phase; ``bytes_per_instance`` the tracemalloc figure
(snapshot + the fan-in's bookkeeping + the instance records it keeps).
``n/a`` marks a part that was not run (``--only``). Targets: added p99 <=
2 ms, apply >= 50,000/s, <= 1024 B per instance; ``--check`` makes the exit
status 1 when one is missed.

Every part reports the CPU that other processes used meanwhile: on a shared
2-core machine a neighbour's test run inflates the tails several times over.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

if __package__ in (None, ""):
    # Run as a script (python bench/fanin.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.etcd import EtcdUpstream
from adapters.layouts import plain
from adapters.zookeeper import ZooKeeperUpstream
from bench.fanin_load import BATCHES, ApplyPhase, MemoryResult, apply_rate, memory_worker
from bench.fanin_peer import (
    PeerResult,
    etcd_peer,
    grpc_value,
    preload_instance,
    sample_host,
    write_number,
    zk_peer,
)
from bench.loadgen import machine_busy_seconds, percentile, process_cpu_seconds
from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Instance
from dispatcher.core.upstream import Upstream
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import OPEN_ACL_UNSAFE, CreateRequest
from tests.servers import EtcdServer, ZooKeeperServer
from tests.zkwire import WireClient

PARTS = ("zk", "etcd", "apply", "memory")
SERVICE = "svc"
ZK_ROOT = "/bench/zk"
ETCD_PREFIX = "/bench/etcd/"

TARGET_ADDED_P99_MS = 2.0
TARGET_APPLY_PER_S = 50_000
TARGET_BYTES_PER_INSTANCE = 1024

_CONNECT_TIMEOUT = 60.0
# After the peer's last write, how long the fan-in may still take to deliver.
_DELIVERY_GRACE = 5.0
#: Other processes' CPU (share of a core) above which the report warns.
_BUSY_NEIGHBOURS = 0.2


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ latency


@attrs.frozen
class Distribution:
    """Milliseconds, sorted."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        return cls(tuple(sorted(values)))

    def p(self, fraction: float) -> float:
        return percentile(self.values, fraction) if self.values else float("nan")

    @property
    def max(self) -> float:
        return self.values[-1] if self.values else float("nan")


KINDS = ("registration", "removal", "all writes")


@attrs.frozen
class LatencyRun:
    """One upstream's propagation run: per-write times (ns) from both processes.

    Keys are write numbers (:func:`bench.fanin_peer.write_number`); the first
    ``warmup`` samples' writes are left out of every figure.
    """

    source: str
    peer: PeerResult
    arrivals: dict[int, int]
    warmup: int
    gap_ms: float
    service_size: int
    #: CPU seconds during the run: the fan-in process, the upstream server, the whole machine.
    fanin_cpu: float
    server_cpu: float
    machine_cpu: float
    #: Wall seconds of the run.
    wall: float

    @property
    def other_cpu(self) -> float:
        """Share of one core that nobody in this benchmark used (neighbours on the machine)."""
        if not self.wall:
            return 0.0
        ours = self.fanin_cpu + self.server_cpu + self.peer.cpu
        return max(0.0, self.machine_cpu - ours) / self.wall

    def measured(self, kind: str = "all writes") -> list[int]:
        return [
            j
            for j in self.peer.sent
            if j >= 2 * self.warmup
            and (kind == "all writes" or (j % 2 == 1) == (kind == "removal"))
        ]

    def _ms(self, until: dict[int, int], kind: str) -> dict[int, float]:
        sent = self.peer.sent
        return {j: (until[j] - sent[j]) / 1e6 for j in self.measured(kind) if j in until}

    def fanin(self, kind: str = "all writes") -> dict[int, float]:
        return self._ms(self.arrivals, kind)

    def direct(self, kind: str = "all writes") -> dict[int, float]:
        return self._ms(self.peer.notified, kind)

    def direct_read(self, kind: str = "all writes") -> dict[int, float]:
        return self._ms(self.peer.read, kind)

    def paired(self, reference: dict[int, float], kind: str = "all writes") -> Distribution:
        fanin = self.fanin(kind)
        return Distribution.of(fanin[j] - reference[j] for j in fanin if j in reference)

    @property
    def added_p99(self) -> float:
        """The headline: the subscriber's p99 minus the direct notification's p99, all writes.

        Both over the writes that both sides saw, so that a write the fan-in
        coalesced away (or the direct watcher missed) skews neither side.
        """
        fanin, direct = self.fanin(), self.direct()
        both = fanin.keys() & direct.keys()
        fanin_p99 = Distribution.of(fanin[j] for j in both).p(0.99)
        return fanin_p99 - Distribution.of(direct[j] for j in both).p(0.99)


async def _propagation(
    upstream: Upstream,
    peer: Callable[..., None],
    peer_args: tuple[Any, ...],
    samples: int,
    gap: float,
    server_pid: int | None,
) -> tuple[PeerResult, dict[int, int], float, float, float, float]:
    """Run a FanIn over ``upstream`` and the peer process; per-write arrival times."""
    hosts = {sample_host(k): k for k in range(samples)}
    arrivals: dict[int, int] = {}
    complete = trio.Event()
    fanin = FanIn("bench-latency")
    subscription = fanin.subscribe([SERVICE])

    def arrived(instances: Iterable[Instance], removal: bool, now: int) -> None:
        for instance in instances:
            k = hosts.get(instance.host)
            if k is not None:
                arrivals.setdefault(write_number(k, removal), now)

    async def consume() -> None:
        async for update in subscription:
            now = time.monotonic_ns()
            if update.delta is not None:
                arrived(update.delta.added, False, now)
                arrived(update.delta.removed, True, now)
            else:
                # Only the first update (or a collapse, which would be a bug
                # here: one write at a time cannot fill a queue of 1024).
                assert update.full is not None
                arrived(update.full.instances.values(), False, now)
            if len(arrivals) >= 2 * samples:
                complete.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        nursery.start_soon(consume)
        with trio.fail_after(_CONNECT_TIMEOUT):
            # Connected means listed and watching (both adapters say so only then).
            while not (state := fanin.status.get(upstream.name)) or not state.connected:
                await trio.sleep(0.01)

        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=peer, args=(*peer_args, samples, gap, send), daemon=True)
        wall0, busy0 = time.monotonic(), machine_busy_seconds()
        cpu0 = process_cpu_seconds(os.getpid())
        server0 = process_cpu_seconds(server_pid) if server_pid else None
        process.start()
        send.close()
        try:
            with trio.fail_after(_CONNECT_TIMEOUT + 2 * samples * (gap + 1.0)):
                raw = await trio.to_thread.run_sync(receive.recv, abandon_on_cancel=True)
            with trio.move_on_after(_DELIVERY_GRACE):
                await complete.wait()
            cpu1, busy1 = process_cpu_seconds(os.getpid()), machine_busy_seconds()
            server1 = process_cpu_seconds(server_pid) if server_pid else None
            wall = time.monotonic() - wall0
        finally:
            receive.close()
            await trio.to_thread.run_sync(process.join, 10.0)
            if process.is_alive():
                process.kill()
        nursery.cancel_scope.cancel()
    subscription.close()
    fanin_cpu = (cpu1 or 0.0) - (cpu0 or 0.0)
    server_cpu = (server1 or 0.0) - (server0 or 0.0)
    machine_cpu = (busy1 or 0.0) - (busy0 or 0.0)
    return PeerResult(**raw), arrivals, fanin_cpu, server_cpu, machine_cpu, wall


def _zk_create(client: WireClient, path: str, data: bytes = b"") -> None:
    reply = client.call(OpCode.CREATE, CreateRequest(path, data, OPEN_ACL_UNSAFE, 0))
    if reply.header.err not in (0, -110):  # -110: NodeExists
        raise RuntimeError(f"create {path} failed: error {reply.header.err}")


def run_zookeeper(
    samples: int, warmup: int, gap_ms: float, service_size: int, heap: str
) -> LatencyRun:
    total = warmup + samples
    # Sessions outlive the run without pings; the peer's raw clients send none.
    config = {"maxSessionTimeout": 600_000}
    _progress("zookeeper: starting server")
    with ZooKeeperServer(heap=heap, config=config) as server:
        directory = f"{ZK_ROOT}/{SERVICE}"
        with WireClient(server.host, server.port) as client:
            client.connect()
            for path in ("/bench", ZK_ROOT, directory):
                _zk_create(client, path)
            for p in range(service_size):
                name, data = plain.render(preload_instance(SERVICE, p))
                _zk_create(client, f"{directory}/{name}", data)
        upstream = ZooKeeperUpstream.from_config(
            "zk", {"hosts": server.address, "roots": [{"path": ZK_ROOT, "layout": "plain"}]}
        )
        _progress(f"zookeeper: {2 * total} writes, {gap_ms:g} ms apart")
        peer_args = (server.host, server.port, directory, SERVICE)
        result = trio.run(
            _propagation, upstream, zk_peer, peer_args, total, gap_ms / 1000, server.pid
        )
    return LatencyRun("zookeeper", *result[:2], warmup, gap_ms, service_size, *result[2:])


def run_etcd(samples: int, warmup: int, gap_ms: float, service_size: int) -> LatencyRun:
    import etcd3  # the fan-in's adapter imports it anyway

    total = warmup + samples
    _progress("etcd: starting server")
    with EtcdServer() as server:
        client = etcd3.client(server.host, server.port, timeout=30)
        try:
            for p in range(service_size):
                instance = preload_instance(SERVICE, p)
                client.put(f"{ETCD_PREFIX}{SERVICE}/{instance.instance_id}", grpc_value(instance))
        finally:
            client.close()
        upstream = EtcdUpstream.from_config(
            "etcd",
            {"endpoint": server.endpoint, "prefixes": [{"prefix": ETCD_PREFIX, "layout": "grpc"}]},
        )
        _progress(f"etcd: {2 * total} writes, {gap_ms:g} ms apart")
        peer_args = (server.host, server.port, ETCD_PREFIX, SERVICE)
        result = trio.run(
            _propagation, upstream, etcd_peer, peer_args, total, gap_ms / 1000, server.pid
        )
    return LatencyRun("etcd", *result[:2], warmup, gap_ms, service_size, *result[2:])


# ------------------------------------------------------------------ memory


def run_memory(count: int) -> MemoryResult:
    """:func:`bench.fanin_load.memory_worker` in a fresh process (a clean heap and RSS)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=memory_worker, args=(count, send), daemon=True)
    process.start()
    send.close()
    try:
        raw = receive.recv()
    finally:
        receive.close()
        process.join(30.0)
        if process.is_alive():
            process.kill()
    return MemoryResult(**raw)


# ------------------------------------------------------------------ report


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.{digits}f}"


def _row(cells: Sequence[str], widths: Sequence[int], left: int = 1) -> str:
    """One table row: the first ``left`` cells left-aligned, the rest right-aligned."""
    return " ".join(
        f"{cell:<{width}}" if index < left else f"{cell:>{width}}"
        for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()


def report_latency(runs: Sequence[LatencyRun]) -> list[str]:
    if not runs:
        return []
    first = runs[0]
    lines = [
        "propagation latency: ms from just before the upstream write to the event; "
        f"{len(first.measured()) // 2} instances registered and removed again after "
        f"{first.warmup} warm-up ones, writes {first.gap_ms:g} ms apart, "
        f"service of {first.service_size}+1 instances",
    ]
    widths = (10, 13, 41, 4, 6, 6, 6, 6)
    header = ("source", "write", "measured at", "n", "p50", "p90", "p99", "max")
    lines.append(_row(header, widths, left=3))
    for run in runs:
        for kind in KINDS:
            direct = run.direct(kind)
            rows: list[tuple[str, Distribution]] = [
                ("direct watch: notification (reference)", Distribution.of(direct.values())),
            ]
            if run.peer.read:
                read = run.direct_read(kind)
                rows.append(
                    ("direct watch + the reads to learn it", Distribution.of(read.values()))
                )
            rows.append(
                ("fan-in subscriber: delta read", Distribution.of(run.fanin(kind).values()))
            )
            rows.append(("added per write: fan-in - notification", run.paired(direct, kind)))
            if run.peer.read:
                rows.append(("added per write: fan-in - direct reads", run.paired(read, kind)))
            for label, dist in rows:
                cells = (
                    run.source,
                    kind,
                    label,
                    str(len(dist.values)),
                    _fmt(dist.p(0.5)),
                    _fmt(dist.p(0.9)),
                    _fmt(dist.p(0.99)),
                    _fmt(dist.max),
                )
                lines.append(_row(cells, widths, left=3))
        measured = run.measured()
        missing_fanin = sum(1 for j in measured if j not in run.arrivals)
        missing_direct = sum(1 for j in measured if j not in run.peer.notified)
        slow = sum(1 for v in run.fanin().values() if v > run.gap_ms)
        writes = max(1, len(run.peer.sent))
        lines.append(
            f"  {run.source}: added p99 = fan-in p99 - notification p99 (all writes) = "
            f"{_fmt(run.added_p99)} ms; CPU per write: fan-in process "
            f"{run.fanin_cpu * 1000 / writes:.2f} ms, {run.source} server "
            f"{run.server_cpu * 1000 / writes:.2f} ms, writer+watcher "
            f"{run.peer.cpu * 1000 / writes:.2f} ms; other CPU {run.other_cpu:.0%} of a core"
        )
        if run.other_cpu > _BUSY_NEIGHBOURS:
            lines.append(
                f"  NOTE: other processes used {run.other_cpu:.0%} of a core during this run "
                f"({os.cpu_count()} cores): the tails measure the machine's scheduling as much "
                "as the fan-in; compare runs only when this is near zero"
            )
        if missing_fanin or missing_direct or slow or run.peer.error:
            lines.append(
                f"  NOTE: fan-in missed {missing_fanin}, direct missed {missing_direct}, "
                f"{slow} fan-in writes slower than the gap"
                + (f"; peer error: {run.peer.error}" if run.peer.error else "")
            )
    return lines


_APPLY_HEADER = (
    "phase", "events", "changes", "seconds", "changes/s", "per cpu-s", "versions",
    "sub reads", "collapses", "gc s", "full gc", "gc max s", "other cpu",
)  # fmt: skip
_APPLY_WIDTHS = (28, 6, 7, 7, 9, 9, 8, 9, 9, 6, 7, 8, 9)


def report_apply(phases: Sequence[ApplyPhase]) -> list[str]:
    if not phases:
        return []
    lines = [
        "apply rate: instance changes through FanIn.run from an in-process upstream into the "
        "snapshot, one '*' subscriber draining; 'per cpu-s' divides by this process's CPU time "
        "instead of wall time"
    ]
    lines.append(_row(_APPLY_HEADER, _APPLY_WIDTHS))
    for phase in phases:
        per_cpu = phase.changes / phase.cpu_seconds if phase.cpu_seconds else None
        cells = (
            phase.name,
            str(phase.events),
            str(phase.changes),
            f"{phase.seconds:.3f}",
            f"{phase.per_second:,.0f}",
            f"{per_cpu:,.0f}" if per_cpu else "n/a",
            str(phase.versions),
            str(phase.updates_read),
            str(phase.collapses),
            f"{phase.gc_seconds:.3f}",
            str(phase.gc_full),
            f"{phase.gc_longest:.3f}",
            f"{phase.other_cpu:.0%}",
        )
        lines.append(_row(cells, _APPLY_WIDTHS))
        if phase.listed:
            lines.append(
                f"{'':<28} ({phase.listed:,} instances listed: "
                f"{phase.listed / phase.seconds:,.0f} listed/s)"
            )
    if any(phase.other_cpu > _BUSY_NEIGHBOURS for phase in phases):
        lines.append(
            "  NOTE: other processes used CPU during these phases: compare 'per cpu-s' "
            "between runs rather than 'changes/s'"
        )
    return lines


def report_memory(memory: MemoryResult | None) -> list[str]:
    if memory is None:
        return []
    per_100k = memory.traced * 100_000 / 2**20
    lines = [
        f"memory for {memory.count:,} instances built through the fan-in, bytes per instance",
        f"  everything the fan-in keeps (tracemalloc):  {memory.traced:6.0f}"
        f"  ({per_100k:.1f} MiB per 100k instances)",
    ]
    lines.extend(f"    {size:6.0f}  {label}" for label, size in memory.parts)
    lines.append(f"  reachable from the snapshot alone:          {memory.snapshot:6.0f}")
    lines.append(f"  RSS growth (a run without tracemalloc):     {memory.rss:6.0f}")
    lines.append(
        "  biggest allocation sites: "
        + ", ".join(f"{site} {size:.0f}" for site, size in memory.sites)
    )
    return lines


def _headline(phases: Sequence[ApplyPhase]) -> ApplyPhase | None:
    for phase in phases:
        if phase.name.startswith(BATCHES):
            return phase
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--samples",
        type=int,
        default=300,
        help="instances registered and removed again (2 timed writes each), per upstream",
    )
    parser.add_argument(
        "--warmup", type=int, default=30, help="untimed instances (registered and removed) first"
    )
    parser.add_argument("--gap-ms", type=float, default=10.0, help="pause after each write")
    parser.add_argument(
        "--service-size",
        type=int,
        default=100,
        help="instances the watched service holds besides the sample's",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=100_000,
        help="instances for the apply-rate and memory parts",
    )
    parser.add_argument("--batch", type=int, default=1000, help="changes per big Changed event")
    parser.add_argument(
        "--small-events",
        type=int,
        default=20_000,
        help="one-change Changed events in the small-events phase",
    )
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only these parts (repeatable)"
    )
    parser.add_argument("--zookeeper-heap", default="256m")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    parts = set(args.only or PARTS)

    runs: list[LatencyRun] = []
    if "zk" in parts:
        runs.append(
            run_zookeeper(
                args.samples, args.warmup, args.gap_ms, args.service_size, args.zookeeper_heap
            )
        )
    if "etcd" in parts:
        runs.append(run_etcd(args.samples, args.warmup, args.gap_ms, args.service_size))
    phases: list[ApplyPhase] = []
    if "apply" in parts:
        _progress(f"apply rate: {args.instances} instances")
        phases = trio.run(
            lambda: apply_rate(args.instances, batch=args.batch, small_events=args.small_events)
        )
    memory = None
    if "memory" in parts:
        _progress(f"memory: {args.instances} instances, in a fresh process")
        memory = run_memory(args.instances)

    lines = [*report_latency(runs), *report_apply(phases), *report_memory(memory)]
    by_source = {run.source: run for run in runs}
    zk = by_source.get("zookeeper")
    etcd = by_source.get("etcd")
    headline = _headline(phases)
    verdicts: list[tuple[str, bool]] = []
    for run in runs:
        verdicts.append(
            (
                f"{run.source} added p99 <= {TARGET_ADDED_P99_MS} ms",
                run.added_p99 <= TARGET_ADDED_P99_MS,
            )
        )
    if headline is not None:
        verdicts.append(
            (f"apply >= {TARGET_APPLY_PER_S:,}/s", headline.per_second >= TARGET_APPLY_PER_S)
        )
    if memory is not None:
        verdicts.append(
            (
                f"<= {TARGET_BYTES_PER_INSTANCE} B/instance",
                memory.traced <= TARGET_BYTES_PER_INSTANCE,
            )
        )
    if verdicts:
        lines.append(
            "targets: " + "; ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in verdicts)
        )
    lines.append(
        "fanin: "
        f"zk_added_p99_ms={_fmt(zk.added_p99 if zk else None)} "
        f"etcd_added_p99_ms={_fmt(etcd.added_p99 if etcd else None)} "
        f"apply_per_s={f'{headline.per_second:.0f}' if headline else 'n/a'} "
        f"bytes_per_instance={f'{memory.traced:.0f}' if memory else 'n/a'}"
    )
    print("\n".join(lines), flush=True)
    return 1 if args.check and not all(ok for _, ok in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
