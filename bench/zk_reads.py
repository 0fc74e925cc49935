"""Benchmark: getData throughput and latency, zkgate against a real ZooKeeper 3.8.

Reads of an unchanged registry are zkgate's hot path, and "as fast as the
ZooKeeper it replaces" is the bar, so this benchmark starts both servers side
by side (or uses ones already running, for profiling), stores the same node in
both, and drives each in turn, never both at once, with the very same raw-socket
load generator (:mod:`bench.loadgen`) running in separate processes:

* throughput: several connections, each keeping a window of pipelined getData
  requests in flight, for a fixed duration, repeated; the median counts;
* latency: one connection, one getData at a time; p50/p99 over N requests.

Repeats alternate between the servers (zookeeper, zkgate, zookeeper, ...) so a
slow drift of the machine hurts both alike. ZooKeeper's JIT needs a few seconds
of load before it reaches speed, so both servers get the same warm-up first.

Run ``python bench/zk_reads.py --help``; bench/README.md explains the numbers
and how to profile. The last line is always (one line)::

    zk_reads: zkgate=<ops/s> zookeeper=<ops/s> ratio=<zkgate/zookeeper>
        p99_ms: zkgate=<x> zookeeper=<y>

With ``--tls`` the same load runs over TLS, against zkgate's ``secure_listen``
and ZooKeeper's ``secureClientPort``, both verifying the load generator's client
certificate (a throwaway PKI made for the run), and the last line is::

    zk_reads_tls: zkgate=<ops/s> zookeeper=<ops/s> ratio=<zkgate/zookeeper>
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.pool import Pool
from pathlib import Path

import attrs

if __package__ in (None, ""):
    # Run as a script (python bench/zk_reads.py): make the repository importable,
    # for bench.loadgen and for the server harness in tests.servers.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (
    ClientTls,
    LatencySample,
    LoadError,
    Session,
    ThroughputSample,
    latency_worker,
    listener_pid,
    machine_busy_seconds,
    parse_address,
    percentile,
    pipelined_worker,
    process_cpu_seconds,
    split_connections,
)
from tests.certs import Authority, pkcs12, truststore
from tests.servers import (
    ServerProcess,
    ZkgateServer,
    ZooKeeperServer,
    free_port,
    secure_zookeeper_config,
)

SERVERS = ("zookeeper", "zkgate")
#: ZooKeeper's own default tickTime (the test harness's is shorter, for quick
#: expiry tests): sessions then last up to 40 s, as zkgate's do by default.
ZOOKEEPER_TICK_MS = 2000

#: Time given to the worker processes to open their connections before a
#: measurement window may begin (their load starts as soon as they are connected).
_SETTLE_SECONDS = 1.0
#: Other processes' CPU (share of a core) above which the report warns.
_BUSY_NEIGHBOURS = 0.2
#: What ZooKeeper 3.8 negotiates by default (its ``ssl.protocol`` is TLSv1.2), offered
#: alone so that zkgate (which would pick TLS 1.3 with AES-256) protects its records
#: the same way and the two servers do the same cryptographic work per byte.
_CIPHER = "ECDHE-RSA-AES128-GCM-SHA256"
#: Guards the Java keystores of the throwaway PKI; nothing secret is behind it.
_KEYSTORE_PASSWORD = "zk-reads-bench"


@attrs.frozen
class Target:
    """A server under test: where it listens and, if known, its process id."""

    name: str
    host: str
    port: int
    pid: int | None
    #: How to reach ``port`` if it is a TLS port.
    tls: ClientTls | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class ThroughputRun:
    rate: float
    #: CPU used in the window as a share of one core (1.0 = one core busy).
    server_cpu: float | None
    loadgen_cpu: float
    #: CPU the whole machine used in the window, for spotting busy neighbours.
    machine_cpu: float | None

    @property
    def other_cpu(self) -> float | None:
        """CPU taken by processes that are neither the server nor the load generator."""
        if self.machine_cpu is None or self.server_cpu is None:
            return None
        return max(0.0, self.machine_cpu - self.server_cpu - self.loadgen_cpu)


@attrs.frozen
class LatencyRun:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float


@attrs.define
class Results:
    throughput: dict[str, list[ThroughputRun]] = attrs.Factory(dict)
    latency: dict[str, list[LatencyRun]] = attrs.Factory(dict)
    #: The TLS version and cipher each server chose, when the run is over TLS.
    tls: dict[str, str] = attrs.Factory(dict)

    def median_rate(self, name: str) -> float | None:
        runs = self.throughput.get(name)
        return statistics.median(r.rate for r in runs) if runs else None

    def median_p99(self, name: str) -> float | None:
        runs = self.latency.get(name)
        return statistics.median(r.p99_ms for r in runs) if runs else None


# ------------------------------------------------------------------ measurement


def measure_throughput(
    pool: Pool,
    target: Target,
    args: argparse.Namespace,
    seconds_before: float,
    duration: float,
    *,
    path: str | None = None,
) -> ThroughputRun:
    """One pipelined run of getData on ``path`` (``args.path`` by default): load
    for ``seconds_before``, then count for ``duration``.

    While the workers count, this process sleeps, waking only at the window's
    two ends to sample CPU times, so it takes nothing from the server.
    """
    measure_at = time.monotonic() + seconds_before
    stop_at = measure_at + duration
    pending = [
        pool.apply_async(
            pipelined_worker,
            (
                target.host,
                target.port,
                path or args.path,
                share,
                args.window,
                measure_at,
                stop_at,
                args.poll_interval_ms / 1000,
                target.tls,
            ),
        )
        for share in split_connections(args.connections, args.processes)
    ]
    time.sleep(max(0.0, measure_at - time.monotonic()))
    server_before = process_cpu_seconds(target.pid) if target.pid else None
    machine_before = machine_busy_seconds()
    time.sleep(max(0.0, stop_at - time.monotonic()))
    server_after = process_cpu_seconds(target.pid) if target.pid else None
    machine_after = machine_busy_seconds()
    samples: list[ThroughputSample] = [p.get(timeout=duration + 120) for p in pending]
    server_cpu = machine_cpu = None
    if server_before is not None and server_after is not None:
        server_cpu = (server_after - server_before) / duration
    if machine_before is not None and machine_after is not None:
        machine_cpu = (machine_after - machine_before) / duration
    return ThroughputRun(
        rate=sum(s.rate for s in samples),
        server_cpu=server_cpu,
        loadgen_cpu=sum(s.cpu_seconds / s.seconds for s in samples if s.seconds > 0),
        machine_cpu=machine_cpu,
    )


def _measure_latency(pool: Pool, target: Target, args: argparse.Namespace) -> LatencyRun:
    sample: LatencySample = pool.apply(
        latency_worker,
        (
            target.host,
            target.port,
            args.path,
            args.latency_warmup,
            args.latency_requests,
            target.tls,
        ),
    )
    millis = sorted(n / 1e6 for n in sample.nanos)
    return LatencyRun(
        p50_ms=percentile(millis, 0.50),
        p90_ms=percentile(millis, 0.90),
        p99_ms=percentile(millis, 0.99),
        p999_ms=percentile(millis, 0.999),
        max_ms=millis[-1],
        mean_ms=statistics.fmean(millis),
    )


def _prepare_tree(target: Target, path: str, data_size: int, siblings: int) -> str | None:
    """Store the benchmark node (and a few siblings, as a registry has) on one server;
    over TLS, return the version and cipher the server chose."""
    data = bytes(i % 251 for i in range(data_size))
    with Session(target.host, target.port, tls=target.tls) as session:
        session.ensure_node(path, data)
        for i in range(siblings):
            session.ensure_node(f"{path}-sibling-{i}", data)
        sock = session.sock
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            return f"{sock.version()} {cipher[0] if cipher else '?'}"
    return None


def run(targets: Sequence[Target], args: argparse.Namespace, out: Results) -> None:
    for target in targets:
        negotiated = _prepare_tree(target, args.path, args.data_size, args.siblings)
        if negotiated is not None:
            out.tls[target.name] = negotiated
    context = multiprocessing.get_context("spawn")
    with context.Pool(max(1, min(args.processes, args.connections))) as pool:
        for target in targets:
            _say(f"warming up {target.name} at {target.address} for {args.warmup:.0f} s ...")
            measure_throughput(pool, target, args, _SETTLE_SECONDS, args.warmup)
        for repeat in range(1, args.repeats + 1):
            for target in targets:
                tput = measure_throughput(pool, target, args, _SETTLE_SECONDS, args.duration)
                out.throughput.setdefault(target.name, []).append(tput)
                lat = _measure_latency(pool, target, args)
                out.latency.setdefault(target.name, []).append(lat)
                _say(
                    f"run {repeat}/{args.repeats} {target.name:<9} {tput.rate:>9.0f} ops/s"
                    f"  p99 {lat.p99_ms:.3f} ms"
                )


# ---------------------------------------------------------------------- servers


@attrs.frozen
class _Pki:
    """The run's throwaway certificates: one CA, a server and a client certificate,
    and the server's as the Java keystores ZooKeeper reads."""

    ca: Path
    server_cert: Path
    server_key: Path
    client: ClientTls
    keystore: Path
    truststore: Path


def _make_pki(directory: Path) -> _Pki:
    authority = Authority(directory / "ca")
    server = authority.issue("server", "/CN=localhost")
    client = authority.issue("loadgen", "/O=zkgate bench/CN=loadgen")
    return _Pki(
        ca=authority.cert,
        server_cert=server.cert,
        server_key=server.key,
        client=ClientTls(
            ca=authority.cert,
            cert=client.cert,
            key=client.key,
            maximum_version=ssl.TLSVersion.TLSv1_2,
            ciphers=_CIPHER,
        ),
        keystore=pkcs12(server, authority, directory / "keystore.p12", _KEYSTORE_PASSWORD),
        truststore=truststore(authority, directory / "truststore.p12", _KEYSTORE_PASSWORD),
    )


def _secure_zkgate(pki: _Pki, directory: Path) -> tuple[ZkgateServer, int]:
    secure_port = free_port()
    config = directory / "zkgate.toml"
    config.write_text(
        f'[zookeeper]\nsecure_listen = "127.0.0.1:{secure_port}"\n\n[zookeeper.tls]\n'
        f'cert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca}"\n'
        "verify_client = true\n"
    )
    server = ZkgateServer(extra_args=["--max-client-cnxns", "0", "--config", str(config)])
    return server, secure_port


def _secure_zookeeper(pki: _Pki, heap: str) -> tuple[ZooKeeperServer, int]:
    secure_port = free_port()
    config = secure_zookeeper_config(
        secure_port, pki.keystore, pki.truststore, _KEYSTORE_PASSWORD, client_auth="need"
    )
    return ZooKeeperServer(heap=heap, config=config, tick_time_ms=ZOOKEEPER_TICK_MS), secure_port


@contextlib.contextmanager
def _targets(args: argparse.Namespace) -> Iterator[list[Target]]:
    """The servers to measure: given addresses, or servers started (and stopped) here."""
    wanted = [args.only] if args.only else list(SERVERS)
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        if args.tls:
            # Both servers on their TLS ports, both verifying the client's
            # certificate (ZooKeeper's ssl.clientAuth=need), so each pays for
            # the same handshake and the same records.
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zk-reads-")))
            _say("making a throwaway PKI ...")
            pki = _make_pki(directory)
            for name in wanted:
                _say(f"starting {name} with TLS ...")
                secure: tuple[ServerProcess, int] = (
                    _secure_zkgate(pki, directory)
                    if name == "zkgate"
                    else _secure_zookeeper(pki, args.zookeeper_heap)
                )
                started = stack.enter_context(secure[0])
                targets.append(Target(name, "127.0.0.1", secure[1], started.pid, pki.client))
            yield targets
            return
        for name in wanted:
            given = args.zkgate_address if name == "zkgate" else args.zookeeper_address
            if given:
                host, port = parse_address(given)
                targets.append(Target(name, host, port, listener_pid(port)))
                continue
            _say(f"starting {name} ...")
            server: ServerProcess
            if name == "zkgate":
                # The harness's ZooKeeper runs with maxClientCnxns=0 (no per-IP
                # limit); zkgate gets the same, or --connections above its
                # default of 60 would be refused.
                server = ZkgateServer(extra_args=["--max-client-cnxns", "0"])
            else:
                server = ZooKeeperServer(heap=args.zookeeper_heap, tick_time_ms=ZOOKEEPER_TICK_MS)
            stack.enter_context(server)
            targets.append(Target(name, server.host, server.port, server.pid))
        yield targets


# ---------------------------------------------------------------------- reports


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cpu(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:.0f}%"


def report(targets: Sequence[Target], args: argparse.Namespace, results: Results) -> str:
    """The human-readable table, then the one machine-readable last line."""
    procs = len(split_connections(args.connections, args.processes))
    lines = [
        "",
        f"zk_reads: getData of a {args.data_size}-byte znode ({args.path}), "
        f"{args.repeats} repeats, warm-up {args.warmup:.0f} s",
        "",
        f"pipelined throughput: {args.connections} connections x window {args.window} "
        f"in {procs} loadgen process(es), polling every {args.poll_interval_ms:g} ms, "
        f"{args.duration:g} s per run",
        f"{'server':<10} {'run':>3} {'ops/s':>10} {'server CPU':>11} {'loadgen CPU':>12}"
        f" {'other CPU':>10}",
    ]
    if results.tls:
        lines[3:3] = [
            "over TLS, client certificates verified: "
            + ", ".join(f"{name} {chosen}" for name, chosen in results.tls.items()),
            "",
        ]
    for target in targets:
        for i, t in enumerate(results.throughput.get(target.name, []), 1):
            lines.append(
                f"{target.name:<10} {i:>3} {t.rate:>10.0f} {_cpu(t.server_cpu):>11} "
                f"{_cpu(t.loadgen_cpu):>12} {_cpu(t.other_cpu):>10}"
            )
        median = results.median_rate(target.name)
        if median is not None:
            lines.append(f"{target.name:<10} {'med':>3} {median:>10.0f}")
    lines += [
        "",
        f"request/response latency: 1 connection, {args.latency_requests} sequential getData "
        f"after {args.latency_warmup} warm-up, ms",
        f"{'server':<10} {'run':>3} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} "
        f"{'max':>8} {'mean':>8}",
    ]
    for target in targets:
        for i, r in enumerate(results.latency.get(target.name, []), 1):
            lines.append(
                f"{target.name:<10} {i:>3} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} {r.p99_ms:>8.3f} "
                f"{r.p999_ms:>8.3f} {r.max_ms:>8.3f} {r.mean_ms:>8.3f}"
            )
    lines.append("")
    others = [
        run.other_cpu
        for runs in results.throughput.values()
        for run in runs
        if run.other_cpu is not None
    ]
    if others and max(others) > _BUSY_NEIGHBOURS:
        lines.append(
            f"note: other processes used up to {max(others) * 100:.0f}% of a core during the "
            "runs; on a 2-core machine that skews the numbers, rerun on a quiet machine"
        )
        lines.append("")
    lines.append(tls_summary_line(results) if args.tls else summary_line(results))
    return "\n".join(lines)


def _ratio(zkgate: float | None, zookeeper: float | None) -> str:
    return f"{zkgate / zookeeper:.2f}" if zkgate is not None and zookeeper else "n/a"


def _ops(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def tls_summary_line(results: Results) -> str:
    """The last line of a ``--tls`` run: the pipelined rates over TLS and their ratio."""
    zkgate, zookeeper = results.median_rate("zkgate"), results.median_rate("zookeeper")
    return (
        f"zk_reads_tls: zkgate={_ops(zkgate)} zookeeper={_ops(zookeeper)} "
        f"ratio={_ratio(zkgate, zookeeper)}"
    )


def summary_line(results: Results) -> str:
    zkgate, zookeeper = results.median_rate("zkgate"), results.median_rate("zookeeper")
    p99_zkgate, p99_zookeeper = results.median_p99("zkgate"), results.median_p99("zookeeper")

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    ratio = _ratio(zkgate, zookeeper)
    return (
        f"zk_reads: zkgate={_ops(zkgate)} zookeeper={_ops(zookeeper)} ratio={ratio} "
        f"p99_ms: zkgate={ms(p99_zkgate)} zookeeper={ms(p99_zookeeper)}"
    )


def targets_met(results: Results, *, tls: bool = False) -> bool:
    """The issue's bar: at least ZooKeeper's throughput, and (in plain text) a p99
    no worse than its."""
    zkgate, zookeeper = results.median_rate("zkgate"), results.median_rate("zookeeper")
    if tls:
        return zkgate is not None and zookeeper is not None and zkgate >= zookeeper
    p99_zkgate, p99_zookeeper = results.median_p99("zkgate"), results.median_p99("zookeeper")
    if zkgate is None or zookeeper is None or p99_zkgate is None or p99_zookeeper is None:
        return False
    return zkgate >= zookeeper and p99_zkgate <= p99_zookeeper


# -------------------------------------------------------------------------- CLI


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pipelined getData throughput and request/response latency, "
        "zkgate against a real ZooKeeper, with the same raw-socket load generator.",
    )
    parser.add_argument(
        "--duration",
        type=_positive(float),
        default=5.0,
        metavar="S",
        help="seconds counted per throughput run (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=_positive(float),
        default=5.0,
        metavar="S",
        help="seconds of pipelined load per server before any run counts "
        "(ZooKeeper's JIT needs it; default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive(int),
        default=3,
        metavar="N",
        help="runs per server; the median is reported (default: %(default)s)",
    )
    # The defaults are what gave ZooKeeper its best throughput on the 2-core
    # machine (it scales with connections, zkgate hardly cares); see README.md.
    parser.add_argument(
        "--connections",
        type=_positive(int),
        default=16,
        metavar="N",
        help="connections of the throughput load (default: %(default)s)",
    )
    parser.add_argument(
        "--window",
        type=_positive(int),
        default=100,
        metavar="W",
        help="getData requests in flight per connection (default: %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=_positive(int),
        default=1,
        metavar="N",
        help="load generator processes the connections are spread over (default: %(default)s)",
    )
    parser.add_argument(
        "--poll-interval-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="a load generator process looks at its sockets at most this often, "
        "so replies that trickle in one per segment cost it one wake-up per "
        "batch, not per reply; 0 reacts to every reply (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-requests",
        type=_positive(int),
        default=5000,
        metavar="N",
        help="sequential requests timed per latency run (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-warmup",
        type=int,
        default=1000,
        metavar="N",
        help="untimed requests before them (default: %(default)s)",
    )
    parser.add_argument(
        "--data-size",
        type=int,
        default=100,
        metavar="BYTES",
        help="bytes stored in the node read (default: %(default)s)",
    )
    parser.add_argument(
        "--siblings",
        type=int,
        default=4,
        metavar="N",
        help="sibling znodes stored next to it (default: %(default)s)",
    )
    parser.add_argument(
        "--path", default="/bench/node", help="the znode read (default: %(default)s)"
    )
    parser.add_argument(
        "--only", choices=SERVERS, help="measure one server only (for profiling it)"
    )
    parser.add_argument(
        "--zkgate-address",
        metavar="HOST:PORT",
        help="use this running zkgate instead of starting one",
    )
    parser.add_argument(
        "--zookeeper-address",
        metavar="HOST:PORT",
        help="use this running ZooKeeper instead of starting one",
    )
    parser.add_argument(
        "--zookeeper-heap",
        default="512m",
        metavar="SIZE",
        help="-Xmx of the ZooKeeper started here (default: %(default)s)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="run the same load over TLS, on each server's TLS port, with a client "
        "certificate from a throwaway PKI; the last line is then zk_reads_tls",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless zkgate meets the targets (ratio >= 1.00 and "
        "p99 no worse than ZooKeeper's; with --tls the ratio alone)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.data_size, args.siblings, args.latency_warmup, args.poll_interval_ms) < 0:
        build_parser().error(
            "--data-size, --siblings, --latency-warmup and --poll-interval-ms must be >= 0"
        )
    if args.tls and (args.zkgate_address or args.zookeeper_address):
        build_parser().error(
            "--tls starts its own servers with their certificates; it takes no addresses"
        )
    results = Results()
    try:
        with _targets(args) as targets:
            run(targets, args, results)
    except (ConnectionError, LoadError) as exc:
        # A server that is not there or answers nonsense: say so, without a
        # traceback through multiprocessing's machinery.
        print(f"zk_reads: error: {exc!r}", file=sys.stderr)
        return 2
    print(report(targets, args, results), flush=True)
    if args.check and not targets_met(results, tls=args.tls):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
