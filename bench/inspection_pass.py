"""Inspection at scale: one full pass over 100,000 instances in real etcd and ZooKeeper.

What it does:

1. Starts a real etcd 3.4 and a real ZooKeeper 3.8 (``tests.servers``) and
   registers ``--instances`` instances over ``--services`` services, half in
   each: etcd in transactions of 128 puts (etcd's default ``max-txn-ops``),
   ZooKeeper in ``multi`` batches of 500 creates (Curator layout).
2. Runs a gateway in this process over both (with a projection of every
   service), waits until its snapshot holds every instance and the
   projection shows them (so that the projection's writing is not timed
   as inspection).
3. Times the first inspection pass after the start, then a second one, over
   every layer, on demand (nothing to repair): wall time, this process's CPU
   time (the etcd read's decoding runs in a worker thread of this process
   and is counted) and the upstream requests made (etcd range pages of
   1,000 keys, ZooKeeper syncs, listings and multiReads, all counted).
4. Runs passes while a thread churns etcd (puts and deletes at
   ``--churn-rate`` per second, the rate reached is reported): every
   divergence they report is a false one, as are any of the quiet pass.
5. Starts the scheduled inspector (``--interval``), lets one pass finish,
   then drops one upstream event (the fan-in's test hook) and times until a
   pass reports it: ``detect_s``, to be compared with two intervals.

Last line (one line)::

    inspect: instances=<N> pass_s=<a> cpu_s=<b> upstream_reads=<c>
    false_divergences=<d> detect_s=<e>

Targets: ``pass_s`` <= 10, ``cpu_s`` <= 2, ``upstream_reads`` bounded by the
services (not the instances), ``false_divergences`` 0, ``detect_s`` < 2
intervals; the first pass after the start (the line before, ``first_pass_s``
and ``first_pass_cpu_s``) meets the same time and CPU targets. ``--check``
exits 1 when one is missed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python bench/inspection_pass.py): the repository root
    # goes on the path so that ``bench`` and ``dispatcher`` import.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import cProfile
import json
import multiprocessing
import threading
import time
from tempfile import TemporaryDirectory
from typing import Any

import etcd3
import trio
from kazoo.client import KazooClient

from adapters.layouts import curator, plain
from dispatcher.config import parse_config
from dispatcher.core.model import Instance
from dispatcher.gateway import Gateway, run_gateway
from tests.servers import EtcdServer, ZooKeeperServer

ETCD_PREFIX = "/bench/inspect/"
ZK_ROOT = "/bench-inspect"
PROJECTION_ROOT = "/projected"
#: etcd's default --max-txn-ops.
TXN_OPS = 128
ZK_BATCH = 500


def _progress(message: str) -> None:
    print(f"inspect: {message}", file=sys.stderr, flush=True)


def grpc_value(addr: str) -> str:
    return json.dumps({"Op": 0, "Addr": addr, "Metadata": None})


def _address(service: int, slot: int) -> tuple[str, int]:
    return f"10.{service // 250}.{service % 250}.{1 + slot % 250}", 1000 + slot // 250


def fill_etcd(etcd: EtcdServer, services: range, per_service: int) -> int:
    client = etcd3.client(etcd.host, etcd.port, timeout=60)
    written = 0
    try:
        ops: list[Any] = []
        for s in services:
            for slot in range(per_service):
                host, port = _address(s, slot)
                key = f"{ETCD_PREFIX}svc{s}/i{slot}"
                ops.append(client.transactions.put(key, grpc_value(f"{host}:{port}")))
                if len(ops) == TXN_OPS:
                    client.transaction(compare=[], success=ops, failure=[])
                    written += len(ops)
                    ops = []
        if ops:
            client.transaction(compare=[], success=ops, failure=[])
            written += len(ops)
    finally:
        client.close()
    return written


def fill_zookeeper(zookeeper: ZooKeeperServer, services: range, per_service: int) -> int:
    client = KazooClient(hosts=f"127.0.0.1:{zookeeper.port}", timeout=30)
    client.start(timeout=30)
    written = 0
    try:
        client.ensure_path(ZK_ROOT)
        batch = client.transaction()
        pending = 0
        for s in services:
            service = f"svc{s}"
            batch.create(f"{ZK_ROOT}/{curator.directory(service)}")
            for slot in range(per_service):
                host, port = _address(s, slot)
                name, data = curator.render(Instance(service, f"i{slot}", host, port))
                batch.create(f"{ZK_ROOT}/{curator.directory(service)}/{name}", data)
                pending += 1
                if pending >= ZK_BATCH:
                    _commit(batch)
                    written += pending
                    batch, pending = client.transaction(), 0
        if pending:
            _commit(batch)
            written += pending
    finally:
        client.stop()
        client.close()
    return written


def _commit(batch: Any) -> None:
    results = batch.commit()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"zookeeper multi failed: {failed[0]!r}")


def _churn(
    host: str,
    port: int,
    prefix: str,
    services: int,
    rate: float,
    writers: int,
    stop: Any,
    count: Any,
    began: Any,
) -> None:
    """The churn process: ``writers`` threads, one etcd client each, paced to ``rate``;
    ``began`` gets the wall-clock time of its first write."""

    def write(writer: int) -> None:
        client = etcd3.client(host, port, timeout=10)
        started = time.monotonic()
        try:
            step = 0
            while not stop.is_set():
                n = step * writers + writer
                key = f"{prefix}svc{n % services}/churn{n % 40}"
                if n % 7 == 3:
                    client.delete(key)
                else:
                    client.put(key, grpc_value(f"10.250.{n % 250}.1:{2000 + n % 50}"))
                step += 1
                with count.get_lock():
                    count.value += 1
                ahead = started + step * writers / rate - time.monotonic()
                if ahead > 0:
                    stop.wait(ahead)  # paces the writer; not a synchronisation
        finally:
            client.close()

    began.value = time.time()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Churn:
    """Puts and deletes in etcd at about ``rate`` per second, from a process of its own
    (so that the pass measured here does not slow it) with ``writers`` threads (one
    blocking client cannot make 1,000 round trips a second)."""

    def __init__(
        self, etcd: EtcdServer, services: int, rate: float, writers: int = 4,
        prefix: str = ETCD_PREFIX,
    ) -> None:  # fmt: skip
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._count = context.Value("q", 0)
        self._began = context.Value("d", 0.0)
        self._process = context.Process(
            target=_churn,
            args=(
                etcd.host,
                etcd.port,
                prefix,
                services,
                rate,
                writers,
                self._stop,
                self._count,
                self._began,
            ),
            daemon=True,
        )
        self.written = 0
        self.seconds = 0.0

    def __enter__(self) -> Churn:
        self._process.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._process.join(30)
        # From its first write: the process's start (imports) is not churn.
        self.seconds = time.time() - self._began.value if self._began.value else 0.0
        self.written = int(self._count.value)


def gateway_config(base: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, args: Any) -> Any:
    return parse_config(
        {
            "node_id": "gw-bench-inspect",
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(base / "data")},
            "upstream": [
                {
                    "name": "etcd",
                    "kind": "etcd",
                    "endpoint": etcd.endpoint,
                    "prefixes": [{"prefix": ETCD_PREFIX, "layout": "grpc"}],
                },
                {
                    "name": "zk",
                    "kind": "zookeeper",
                    "hosts": f"127.0.0.1:{zookeeper.port}",
                    "roots": [{"path": ZK_ROOT, "layout": "curator"}],
                },
            ],
            "projection": [{"root": PROJECTION_ROOT, "layout": "plain"}] if args.projection else [],
            "inspection": {"enabled": False, "interval": args.interval, "grace": args.grace},
        }
    )


def projected(gw: Gateway) -> int:
    """The instance znodes the projection (:data:`PROJECTION_ROOT`) shows."""
    assert gw.engine is not None
    nodes = gw.engine.tree.nodes
    shown = 0
    for service in gw.fanin.snapshot:
        node = nodes.get(f"{PROJECTION_ROOT}/{plain.directory(service)}")
        shown += 0 if node is None else len(node.children)
    return shown


async def measure(gw: Gateway, etcd: EtcdServer, args: Any) -> dict[str, Any]:
    inspector = gw.inspector
    assert inspector is not None
    profiler = cProfile.Profile() if args.profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    first = await inspector.inspect()
    first_s, first_cpu = time.perf_counter() - wall, time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    _progress(f"  first pass: {first_s:.2f} s, {first_cpu:.2f} CPU-s")
    false = sum(len(r.divergences) for r in first) + sum(bool(r.error) for r in first)
    wall, cpu = time.perf_counter(), time.process_time()
    reports = await inspector.inspect()
    pass_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    for report in reports:
        _progress(
            f"  {report.layer}: {report.services} compared, {report.reads} reads, "
            f"{report.duration:.2f} s, {len(report.divergences)} divergences"
            f"{', error ' + report.error if report.error else ''}"
        )
    reads = sum(r.reads for r in reports)
    false += sum(len(r.divergences) for r in reports) + sum(bool(r.error) for r in reports)
    _progress(f"churn at {args.churn_rate:g}/s for {args.churn_passes} passes")
    with Churn(etcd, args.services // 2, args.churn_rate) as churn:
        for _ in range(args.churn_passes):
            churned = await inspector.inspect()
            false += sum(len(r.divergences) for r in churned) + sum(bool(r.error) for r in churned)
    churn_rate = churn.written / max(churn.seconds, 1e-9)
    _progress(f"  churn reached {churn_rate:.0f} changes/s ({churn.written} changes)")
    detect_s = await detect(gw, args)
    return {
        "pass_s": pass_s,
        "cpu_s": cpu_s,
        "reads": reads,
        "false": false,
        "detect_s": detect_s,
        "churn_rate": churn_rate,
        "first_s": first_s,
        "first_cpu": first_cpu,
    }


async def detect(gw: Gateway, args: Any) -> float:
    inspector = gw.inspector
    assert inspector is not None
    stats = inspector.stats["upstream"]
    async with trio.open_nursery() as nursery:
        await nursery.start(inspector.run)
        passes = stats.passes
        while stats.passes <= passes:  # one scheduled pass done: the fault lands mid-interval
            await trio.sleep(0.05)
        before = stats.divergences_total
        gw.fanin.drop_next_change("etcd", "svc0")
        client = etcd3.client(args.etcd_host, args.etcd_port, timeout=10)
        try:
            client.put(f"{ETCD_PREFIX}svc0/injected", grpc_value("10.251.0.1:9"))
        finally:
            client.close()
        injected = trio.current_time()
        with trio.move_on_after(3 * args.interval + 30):
            while stats.divergences_total == before:
                await trio.sleep(0.02)
        detected = trio.current_time() - injected
        nursery.cancel_scope.cancel()
    return detected if stats.divergences_total > before else float("inf")


async def run(args: Any) -> dict[str, Any]:
    with (
        TemporaryDirectory(prefix="bench-inspect-") as tmp,
        EtcdServer(extra_args=["--quota-backend-bytes", str(4 << 30)]) as etcd,
        ZooKeeperServer(heap="1g", config={"maxSessionTimeout": 600_000}) as zookeeper,
    ):
        half = args.services // 2
        per_service = max(1, args.instances // args.services)
        started = time.perf_counter()
        written = await trio.to_thread.run_sync(fill_etcd, etcd, range(half), per_service)
        written += await trio.to_thread.run_sync(
            fill_zookeeper, zookeeper, range(half, args.services), per_service
        )
        _progress(f"registered {written} instances in {time.perf_counter() - started:.1f} s")
        args.etcd_host, args.etcd_port = etcd.host, etcd.port
        async with trio.open_nursery() as nursery:
            gw: Gateway = await nursery.start(
                run_gateway, gateway_config(Path(tmp), etcd, zookeeper, args)
            )
            with trio.fail_after(300):
                while sum(len(e.instances) for e in gw.fanin.snapshot.values()) < written:
                    await trio.sleep(0.1)
                # The projection writes them after the snapshot has them: a pass
                # timed before it is done would count its writing as inspection.
                while args.projection and projected(gw) < written:
                    await trio.sleep(0.1)
            _progress("the gateway holds and projects every instance; one full pass")
            result = await measure(gw, etcd, args)
            nursery.cancel_scope.cancel()
        result["instances"] = written
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument(
        "--interval",
        type=float,
        default=15.0,
        help="the scheduled inspector's interval for detect_s (default: %(default)s)",
    )
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--churn-rate", type=float, default=1000.0)
    parser.add_argument("--churn-passes", type=int, default=2)
    parser.add_argument(
        "--no-projection",
        dest="projection",
        action="store_false",
        help="leave the projection (and its layer) out",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of the first pass")
    args = parser.parse_args(argv)
    if args.services < 2 or args.instances < args.services:
        parser.error("--services must be at least 2 and --instances at least --services")
    result = trio.run(run, args)
    print(
        f"first_pass_s={result['first_s']:.2f} first_pass_cpu_s={result['first_cpu']:.2f} "
        f"churn_rate_reached={result['churn_rate']:.0f}/s interval={args.interval:g}"
    )
    print(
        f"inspect: instances={result['instances']} pass_s={result['pass_s']:.2f} "
        f"cpu_s={result['cpu_s']:.2f} upstream_reads={result['reads']} "
        f"false_divergences={result['false']} detect_s={result['detect_s']:.2f}"
    )
    missed = (
        max(result["pass_s"], result["first_s"]) > 10
        or max(result["cpu_s"], result["first_cpu"]) > 2
        or result["reads"] > args.services
        or result["false"]
        or not result["detect_s"] < 2 * args.interval
    )
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
