"""Benchmark: one policy change pushed to N subscribed proxies, beside one endpoint change.

Issue #17, Targets. An operator's ``policy set`` must reach every proxy about as fast as a
registry write does, and well within a second. One run:

1. A real store (``--store``: ZooKeeper 3.8 or etcd 3.4, from ``tests.servers``) is both the
   Dispatcher's ``[membership]`` (where policies are kept) and the registry of the service
   (``--service``, ``bench.svc``): zkgate's plain JSON layout under ``/bench/registry``.
2. ``zkgate serve`` (a child process) with ``[membership]``, ``[sharding]``,
   ``[subscriptions]``, ``[governance]`` and that registry as its upstream; zkgate's Meta
   Server runs in this process; one real ``zkgate proxy`` (a child process) forwards the
   service to two echo servers here, tagged ``version=v1`` and ``version=v2``.
3. ``--proxies`` (1000) control loops: in-process clients of the subscription protocol
   (:func:`dispatcher.wire_client.connect`, ``policies=True``), each subscribed to the
   service, acknowledging every ``Full``/``Deltas`` (``Ack``) and every ``PolicyUpdate``
   (``PolicyAck``) as a proxy's control loop does.
4. Rounds, each a policy change then an endpoint change, never at once:

   * **policy**: ``PUT /policies`` on the Dispatcher's admin endpoint (what ``zkgate policy
     set`` sends) flipping the split between 100 % v1 and 100 % v2; latency per control
     loop from just before the request to the moment it queued its ``PolicyAck`` of that
     version. The real proxy's traffic (one connection at a time) is watched until a
     connection reaches the instance the new split chose: ``proxy_seen_ms``.
   * **endpoint**: one registry write (an instance tagged ``version=spare``, which the
     split gives no traffic, added, then deleted the next round); latency per control loop
     from just before the write to the moment it queued its ``Ack`` of the delta.

   ``--warmup-rounds`` (3) untimed, then ``--rounds`` (20) timed; each phase starts once
   every control loop acknowledged the previous one and ``--gap-ms`` (50) passed.

Run ``python bench/policy_push.py --help``. Progress goes to stderr, the report to stdout;
the last line is always::

    policy_push: proxies=<N> p99_ms=<a> endpoint_p99_ms=<b> store=<zookeeper|etcd>

``p99_ms`` and ``endpoint_p99_ms`` are nearest-rank p99 over every control loop's
acknowledgement in every timed round (N x rounds samples); the report also gives each
phase's p50 and its slowest "last loop acknowledged" over the rounds. Targets
(``--check`` makes the exit status 1 when one is missed): p99 under 1 s and at most twice
the endpoint p99.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any, Final

import attrs
import trio

if __package__ in (None, ""):
    # Run as a script (python bench/policy_push.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import machine_busy_seconds, percentile, process_cpu_seconds
from dispatcher import wire
from dispatcher.containment import InternalErrors
from dispatcher.wire_client import ClientSettings, Link, connect
from tests.servers import EtcdServer, ZkgateServer, ZooKeeperServer, free_port

__all__ = ["main"]

REGISTRY: Final = "/bench/registry"
MEMBERSHIP_ROOT: Final = "/bench/zkgate"
TOKEN: Final = "bench-subscription-token"
POLICY_TOKEN: Final = "bench-policy-token"
TARGET_P99_MS: Final = 1000.0
TARGET_RATIO: Final = 2.0
_START_TIMEOUT: Final = 60.0
_ROUND_TIMEOUT: Final = 30.0
#: Connections opened at once while the control loops start.
_CONNECT_BATCH: Final = 50
#: Other processes' CPU (share of a core) above which the report warns.
_BUSY_NEIGHBOURS: Final = 0.2
_ROOT: Final = Path(__file__).resolve().parents[1]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _now() -> int:
    return time.perf_counter_ns()


# ------------------------------------------------------------------ the control loops


class ControlLoop:
    """One proxy's control loop: subscribed to the service, acknowledging what it gets.

    Everything it records is a ``perf_counter_ns`` taken right after it queued the
    acknowledgement, so that the measured time includes its own handling.
    """

    def __init__(self, link: Link, service: str) -> None:
        self.link = link
        self.service = service
        #: The endpoint version held, and when each newer one was acknowledged.
        self.version = -1
        self.updates: list[tuple[int, int]] = []
        #: The governance version held, and when each one was acknowledged.
        self.policy_version = -1
        self.policy_acks: dict[int, int] = {}

    def handle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Full):
            version = message.version
        elif isinstance(message, wire.Deltas):
            version = message.to_version
        elif isinstance(message, wire.PolicyUpdate):
            self.link.send(wire.PolicyAck(message.service, message.version))
            self.policy_version = message.version
            self.policy_acks[message.version] = _now()
            return
        else:
            return
        self.link.send(wire.Ack(self.service, version))
        if version != self.version:
            self.version = version
            self.updates.append((version, _now()))


async def start_loops(
    nursery: trio.Nursery, address: str, service: str, count: int
) -> list[ControlLoop]:
    """``count`` welcomed, subscribed control loops; returns once every one holds a Full."""
    errors = InternalErrors("bench")
    loops: list[ControlLoop] = []

    async def one(index: int) -> None:
        settings = ClientSettings(
            token=TOKEN, client_id=f"bench-proxy-{index}", policies=True,
            ping_interval=60.0, dead_after=600.0, connect_timeout=30.0,
        )  # fmt: skip
        link = await connect(address, "the Dispatcher", settings, errors)
        loop = ControlLoop(link, service)
        loops.append(loop)
        link.send(wire.Subscribe({service: None}))
        nursery.start_soon(link.run, loop.handle)

    for first in range(0, count, _CONNECT_BATCH):
        async with trio.open_nursery() as batch:
            for index in range(first, min(count, first + _CONNECT_BATCH)):
                batch.start_soon(one, index)
    await _until(lambda: all(loop.version >= 0 for loop in loops), "every loop's Full")
    return loops


def _policies_at(loops: Sequence[ControlLoop], version: int) -> bool:
    return all(loop.policy_version >= version for loop in loops)


def _endpoints_past(loops: Sequence[ControlLoop], held: Sequence[int]) -> bool:
    return all(loop.version > old for loop, old in zip(loops, held, strict=True))


async def _until(check: Callable[[], bool], what: str, timeout: float = _ROUND_TIMEOUT) -> None:
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.001)
        return
    raise RuntimeError(f"{what}: not within {timeout:g} s")


# ------------------------------------------------------------------ the registry


class Registry:
    """The service's instances in the store, plain JSON layout, written from a thread."""

    def __init__(self, store: str, address: str, service: str) -> None:
        self.store = store
        self.service = service
        self._put: Callable[[str, bytes], None]
        self._delete: Callable[[str], None]
        self._close: Callable[[], None]
        if store == "zookeeper":
            from kazoo.client import KazooClient

            client = KazooClient(hosts=address)
            client.start(timeout=30)
            client.ensure_path(f"{REGISTRY}/{service}")
            self._put = lambda path, value: client.create(path, value)
            self._delete = lambda path: client.delete(path)

            def close() -> None:
                client.stop()
                client.close()

            self._close = close
        else:
            import etcd3

            host, port = address.rsplit(":", 1)
            etcd = etcd3.client(host=host, port=int(port))
            self._put = lambda key, value: etcd.put(key, value)
            self._delete = lambda key: etcd.delete(key)
            self._close = etcd.close

    def _key(self, instance_id: str) -> str:
        return f"{REGISTRY}/{self.service}/{instance_id}"

    def add(self, instance_id: str, host: str, port: int, version: str) -> None:
        value = {"host": host, "port": port, "metadata": {"version": version}}
        self._put(self._key(instance_id), json.dumps(value).encode())

    def remove(self, instance_id: str) -> None:
        self._delete(self._key(instance_id))

    def close(self) -> None:
        self._close()


# ------------------------------------------------------------------ echo servers, traffic


async def named_server(nursery: trio.Nursery, name: bytes) -> int:
    """A TCP server that answers any bytes with ``name`` and closes; its port."""

    async def answer(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(64)
            await stream.send_all(name)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), answer, 0)
    return int(listeners[0].socket.getsockname()[1])


async def ask(port: int) -> bytes:
    """One connection through the real proxy; which server answered (b"" if none)."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await stream.send_all(b"?")
                return await stream.receive_some(16)
            finally:
                await trio.aclose_forcefully(stream)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return b""


async def until_answered_by(port: int, name: bytes) -> int:
    """Connections one at a time until ``name`` answers; the time it did (ns)."""
    with trio.fail_after(_ROUND_TIMEOUT):
        while await ask(port) != name:
            pass
    return _now()


# ------------------------------------------------------------------ the admin API


def put_policy(admin: str, document: dict[str, Any], expected: int) -> int:
    """``PUT /policies`` (what ``zkgate policy set`` sends); the new version."""
    host, port = admin.rsplit(":", 1)
    body = json.dumps({"document": document, "expected_version": expected,
                       "why": "bench", "who": "bench"})  # fmt: skip
    connection = http.client.HTTPConnection(host, int(port), timeout=_ROUND_TIMEOUT)
    try:
        connection.request("PUT", "/policies", body, {
            "content-type": "application/json", "authorization": f"Bearer {POLICY_TOKEN}",
        })  # fmt: skip
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"PUT /policies: HTTP {response.status}: {answer}")
    return int(answer["version"])


def split(service: str, target: str) -> dict[str, Any]:
    other = "v2" if target == "v1" else "v1"
    return {"services": {service: {"split": {f"version={target}": 100, f"version={other}": 0}}}}


# ------------------------------------------------------------------ one run


@attrs.frozen
class Round:
    """One timed round: every loop's latency (ms) for each change, the proxy's (ms)."""

    policy: tuple[float, ...]
    endpoint: tuple[float, ...]
    proxy_seen: float


def _dispatcher_config(
    tmp: Path, store: str, address: str, service: str, admin: str, subscribe: str, proxies: int
) -> Path:
    token_file = tmp / "policy-token"
    token_file.write_text(POLICY_TOKEN + "\n")
    if store == "zookeeper":
        upstream = (f'kind = "zookeeper"\nhosts = "{address}"\n'
                    f'roots = [{{ path = "{REGISTRY}", layout = "plain" }}]')  # fmt: skip
    else:
        upstream = (f'kind = "etcd"\nendpoint = "{address}"\n'
                    f'prefixes = [{{ prefix = "{REGISTRY}/", layout = "plain" }}]')  # fmt: skip
    path = tmp / "dispatcher.toml"
    path.write_text(f"""
node_id = "d1"
[admin]
listen = "{admin}"
[subscriptions]
listen = "{subscribe}"
token = "{TOKEN}"
max_connections = {proxies + 64}
[membership]
kind = "{store}"
address = "{address}"
root = "{MEMBERSHIP_ROOT}"
session_timeout = 5.0
[sharding]
id = "d1"
services = ["{service}"]
warm_timeout = 2.0
[governance]
max_history = 1000
token_file = "{token_file}"
[[upstream]]
name = "registry"
{upstream}
""")
    return path


async def run(args: argparse.Namespace, tmp: Path) -> tuple[list[Round], dict[str, float]]:
    service = args.service
    with ExitStack() as stack:
        if args.store == "zookeeper":
            server: ZooKeeperServer | EtcdServer = ZooKeeperServer(base_dir=tmp / "zookeeper")
        else:
            server = EtcdServer(base_dir=tmp / "etcd")
        _progress(f"starting {args.store}")
        stack.enter_context(server)
        registry = Registry(args.store, server.address, service)
        stack.callback(registry.close)

        async with AsyncExitStack() as astack:
            nursery = await astack.enter_async_context(trio.open_nursery())
            ports = {name: await named_server(nursery, name.encode()) for name in ("v1", "v2")}
            for name, port in ports.items():
                registry.add(name, "127.0.0.1", port, name)

            admin, subscribe = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            config = _dispatcher_config(tmp, args.store, server.address, service, admin,
                                        subscribe, args.proxies)  # fmt: skip
            _progress("starting zkgate serve")
            dispatcher = ZkgateServer(
                ["--config", str(config), "--admin-listen", admin],
                base_dir=tmp / "zkgate",
                startup_timeout=_START_TIMEOUT,
            )
            stack.enter_context(dispatcher)
            # The first policy: all to v1 (before the proxy starts, so its traffic never
            # reaches the spare instances).
            version = await trio.to_thread.run_sync(put_policy, admin, split(service, "v1"), 0)

            from metaserver.cli import parse_meta_config, run_meta

            meta_config = parse_meta_config({
                "token": TOKEN, "server_id": "meta-1", "meta": {"listen": "127.0.0.1:0"},
                "membership": {"kind": args.store, "address": server.address,
                               "root": MEMBERSHIP_ROOT, "session_timeout": 5.0},
            })  # fmt: skip
            _, meta_port = await nursery.start(run_meta, meta_config)
            proxy_port = free_port()
            _progress("starting zkgate proxy")
            proxy_log = stack.enter_context(open(tmp / "proxy.log", "wb"))
            proxy = subprocess.Popen(
                [sys.executable, "-m", "dispatcher", "--log-format", "plain", "proxy",
                 "--meta", f"127.0.0.1:{meta_port}", "--service",
                 f"{service}=127.0.0.1:{proxy_port}"],
                cwd=_ROOT, env={**os.environ, "ZKGATE_TOKEN": TOKEN},
                stdin=subprocess.DEVNULL, stdout=proxy_log, stderr=proxy_log,
            )  # fmt: skip
            stack.callback(_stop, proxy)
            with trio.fail_after(_START_TIMEOUT):
                await until_answered_by(proxy_port, b"v1")

            _progress(f"connecting {args.proxies} control loops")
            loops = await start_loops(nursery, subscribe, service, args.proxies)
            await _until(lambda: all(loop.policy_version >= version for loop in loops),
                         "every loop's first policy")  # fmt: skip

            rounds: list[Round] = []
            target = "v1"
            spare = 0
            busy_before = machine_busy_seconds()
            cpu_before = process_cpu_seconds(dispatcher.pid or 0)
            window = time.monotonic()
            total = args.warmup_rounds + args.rounds
            for number in range(total):
                timed = number >= args.warmup_rounds
                # The policy phase.
                target = "v2" if target == "v1" else "v1"
                policy_start = _now()
                version = await trio.to_thread.run_sync(
                    put_policy, admin, split(service, target), version
                )
                wanted = version
                await _until(functools.partial(_policies_at, loops, wanted),
                             f"round {number}: every PolicyAck")  # fmt: skip
                seen = await until_answered_by(proxy_port, target.encode())
                policy = tuple((loop.policy_acks[wanted] - policy_start) / 1e6 for loop in loops)
                await trio.sleep(args.gap_ms / 1000)

                # The endpoint phase.
                held = [loop.version for loop in loops]
                for loop in loops:
                    loop.updates.clear()
                start = _now()
                if number % 2 == 0:
                    spare += 1
                    await trio.to_thread.run_sync(registry.add, f"spare-{spare}", "10.255.0.1",
                                                  1000 + spare, "spare")  # fmt: skip
                else:
                    await trio.to_thread.run_sync(registry.remove, f"spare-{spare}")
                await _until(functools.partial(_endpoints_past, loops, held),
                             f"round {number}: every Ack")  # fmt: skip
                endpoint = tuple((loop.updates[0][1] - start) / 1e6 for loop in loops)
                await trio.sleep(args.gap_ms / 1000)
                if timed:
                    rounds.append(Round(policy, endpoint, (seen - policy_start) / 1e6))
                _progress(
                    f"round {number + 1}/{total}{'' if timed else ' (warm-up)'}: "
                    f"policy last {max(policy):.1f} ms, endpoint last {max(endpoint):.1f} ms"
                )
            elapsed = time.monotonic() - window
            busy_after = machine_busy_seconds()
            cpu_after = process_cpu_seconds(dispatcher.pid or 0)
            nursery.cancel_scope.cancel()
    machine: dict[str, float] = {"seconds": elapsed}
    if cpu_before is not None and cpu_after is not None:
        machine["dispatcher_cpu"] = (cpu_after - cpu_before) / elapsed
    if busy_before is not None and busy_after is not None:
        machine["machine_cpu"] = (busy_after - busy_before) / elapsed
    return rounds, machine


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ------------------------------------------------------------------ report


def report(args: argparse.Namespace, rounds: Sequence[Round], machine: dict[str, float]) -> bool:
    """Print the report; True when the targets are met."""
    policy = sorted(ms for r in rounds for ms in r.policy)
    endpoint = sorted(ms for r in rounds for ms in r.endpoint)
    p99, endpoint_p99 = percentile(policy, 0.99), percentile(endpoint, 0.99)
    print(f"store {args.store}, {args.proxies} control loops, {len(rounds)} timed rounds")
    for name, values, last in (
        ("policy set -> PolicyAck", policy, [max(r.policy) for r in rounds]),
        ("registry write -> Ack", endpoint, [max(r.endpoint) for r in rounds]),
    ):
        print(
            f"{name:26} p50 {percentile(values, 0.5):8.1f} ms  p99 "
            f"{percentile(values, 0.99):8.1f} ms  slowest last-loop {max(last):8.1f} ms"
        )
    seen = sorted(r.proxy_seen for r in rounds)
    print(
        f"{'real proxy routes on it':26} p50 {percentile(seen, 0.5):8.1f} ms  max "
        f"{seen[-1]:8.1f} ms  (policy set -> first connection to the new split's instance)"
    )
    if "dispatcher_cpu" in machine:
        print(
            f"Dispatcher CPU {100 * machine['dispatcher_cpu']:.0f}% of a core over "
            f"{machine['seconds']:.1f} s"
        )
    if "machine_cpu" in machine:
        print(f"machine CPU {100 * machine['machine_cpu']:.0f}% of a core (all processes)")
    met = p99 < TARGET_P99_MS and p99 <= TARGET_RATIO * endpoint_p99
    print(
        f"targets: p99 < {TARGET_P99_MS:.0f} ms and <= {TARGET_RATIO:g}x endpoint p99: "
        f"{'met' if met else 'missed'} (ratio {p99 / endpoint_p99:.2f})"
    )
    print(
        f"policy_push: proxies={args.proxies} p99_ms={p99:.1f} endpoint_p99_ms="
        f"{endpoint_p99:.1f} store={args.store}"
    )
    return met


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="policy set -> N proxies' PolicyAck, beside a registry write -> their Ack"
    )
    parser.add_argument("--proxies", type=int, default=1000, help="control loops (1000)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (20)")
    parser.add_argument("--warmup-rounds", type=int, default=3, help="untimed rounds (3)")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="pause between phases (50)")
    parser.add_argument("--store", choices=("zookeeper", "etcd"), default="zookeeper",
                        help="membership and registry store (zookeeper)")  # fmt: skip
    parser.add_argument("--service", default="bench.svc", help="the service (bench.svc)")
    parser.add_argument("--check", action="store_true",
                        help="exit status 1 when a target is missed")  # fmt: skip
    args = parser.parse_args(argv)
    if args.proxies < 1 or args.rounds < 1 or args.warmup_rounds < 0 or args.gap_ms < 0:
        parser.error("--proxies and --rounds must be >= 1, the others >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zkgate-policy-push-") as tmp:
        rounds, machine = trio.run(run, args, Path(tmp))
    met = report(args, rounds, machine)
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
