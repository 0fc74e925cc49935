"""Mesh onboarding for a Curator ServiceDiscovery consumer (issue #18, items 2 and 6).

A Curator client writes nothing that names its application, so a ``[[mesh.consumer]]`` rule
on its address does. Curator's layout has no weights: the ratio R applies per consumer
instance, hashed on (application, host, service).

Real ZooKeeper 3.8 is the upstream (Curator layout) and the governance store; ``zkgate
serve`` runs as a child process with a Curator projection; the consumers are Apache Curator
5.4's ServiceDiscovery (Debian's jars, ``tests/compat/CuratorMeshConsumer.java`` compiled
once per session). The Java client cannot choose its source address, so a consumer on
another loopback host (127.0.0.x) connects through a relay that opens its connection to
zkgate from that address: zkgate sees the session come from 127.0.0.x, as it would see a
consumer on that host.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from adapters.layouts.curator import render
from dispatcher.core.model import Instance
from dispatcher.faces.mesh.views import hashed_onto_sidecar
from tests.compat.harness import compile_java, curator_classpath
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, free_port
from tests.test_mesh import TOKEN, _admin, until

SOURCE = Path(__file__).parent / "compat" / "CuratorMeshConsumer.java"
LOGGING_JAR = "/usr/share/java/slf4j-nop.jar"
SERVICE = "orders"
APPLICATION = "billing"
TRUE = {"10.0.0.1:8080", "10.0.0.2:8080"}
#: The hosts of the R = 30 run: 40 consumer instances of one application.
HOSTS = [f"127.0.0.{i}" for i in range(2, 42)]
#: A consumer whose rule says Curator 4.0.0, below the minimum.
OLD_HOST = "127.0.0.100"


def sidecar_of(host: str) -> str:
    return f"{host}:15001"


class SourceRelay:
    """A TCP relay on 127.0.0.1 whose connections to ``target`` start from ``source``."""

    def __init__(self, source: str, target: tuple[str, int]) -> None:
        self.source = source
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                outbound = socket.create_connection(self.target, 10, (self.source, 0))
            except OSError:
                inbound.close()
                continue
            with self._lock:
                self._sockets += [inbound, outbound]
                for a, b in ((inbound, outbound), (outbound, inbound)):
                    pump = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                    pump.start()
                    self._threads.append(pump)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        # Closing alone does not wake a thread blocked in accept(); a shutdown does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)


@pytest.fixture(scope="session")
def consumer_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CuratorMeshConsumer compiled once per session."""
    return compile_java(SOURCE, tmp_path_factory.mktemp("curator-mesh-classes"), LOGGING_JAR)


def discover(classes: Path, connects: list[str]) -> list[set[str]]:
    """What each Curator consumer (one per connect string) finds of the service."""
    result = subprocess.run(
        ["java", "-Xmx256m", "-XX:+UseSerialGC",
         "-cp", curator_classpath(str(classes), LOGGING_JAR),
         "CuratorMeshConsumer", "/services", SERVICE, *connects],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen: list[set[str]] = []
    for index, line in enumerate(result.stdout.splitlines()):
        number, _, instances = line.partition(" ")
        assert int(number) == index, result.stdout
        seen.append(set() if instances == "none" else set(instances.split(",")))
    assert len(seen) == len(connects), result.stdout
    return seen


def _switch(admin: str, switches: dict[str, dict[str, object]]) -> None:
    _, current = _admin(admin, "GET", "/mesh")
    document = {"consumers": {app: {SERVICE: value} for app, value in switches.items()}}
    status, answer = _admin(admin, "PUT", "/mesh", {
        "document": document, "expected_version": current["version"], "why": "test",
    })  # fmt: skip
    assert status == 200, answer
    assert answer["seen"] is True  # this Dispatcher's views hold the new version


@pytest.fixture
def curator_mesh(
    tmp_path: Path,
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    unique_path: str,
) -> Iterator[tuple[str, ZkgateServer]]:
    upstream = KazooClient(hosts=zookeeper.address)
    upstream.start(timeout=15)
    root = f"{unique_path}/services"
    for address in sorted(TRUE):
        host, _, port = address.partition(":")
        name, data = render(Instance(SERVICE, f"id-{host}", host, int(port), protocol="http"))
        upstream.create(f"{root}/{SERVICE}/{name}", data, makepath=True)
    config = tmp_path / "mesh.toml"
    config.write_text(f"""
node_id = "d1"
[membership]
kind = "zookeeper"
address = "{zookeeper.address}"
root = "{unique_path}/zkgate"
session_timeout = 2.0
[governance]
token = "{TOKEN}"
[mesh]
min_version = {{ curator = "5.0.0" }}
[[mesh.consumer]]
application = "legacy"
address = "{OLD_HOST}"
framework = "curator"
version = "4.0.0"
[[mesh.consumer]]
application = "{APPLICATION}"
address = "127.0.0.0/8"
framework = "curator"
version = "5.4.0"
[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "{zookeeper.address}"
roots = [{{ path = "{root}", layout = "curator" }}]
[[projection]]
root = "/services"
layout = "curator"
""")
    admin = f"127.0.0.1:{free_port()}"
    server = zkgate_factory(["--config", str(config), "--admin-listen", admin,
                             "--max-client-cnxns", "0"])  # fmt: skip
    # Every consumer host's sidecar registers as `zkgate proxy --register` does.
    sidecars = KazooClient(hosts=server.address)
    sidecars.start(timeout=15)
    for host in ["127.0.0.1", OLD_HOST, *HOSTS]:
        sidecars.create(f"/zkgate/sidecars/{host}/{SERVICE}", sidecar_of(host).encode(),
                        ephemeral=True, makepath=True)  # fmt: skip
    until(lambda: set(sidecars.get_children(f"/services/{SERVICE}") if sidecars.exists(
        f"/services/{SERVICE}") else ()) == TRUE, "the instances projected")  # fmt: skip
    try:
        yield admin, server
    finally:
        sidecars.stop()
        sidecars.close()
        upstream.stop()
        upstream.close()


@contextlib.contextmanager
def relays(server: ZkgateServer, hosts: list[str]) -> Iterator[list[str]]:
    """A connect string per host, whose sessions reach zkgate from that host."""
    opened = [SourceRelay(host, (server.host, server.port)) for host in hosts]
    try:
        yield [relay.address for relay in opened]
    finally:
        for relay in opened:
            relay.close()


def test_a_curator_consumer_is_switched_by_its_address_rule(
    curator_mesh: tuple[str, ZkgateServer], consumer_classes: Path
) -> None:
    """A Curator ServiceDiscovery consumer named by a [[mesh.consumer]] rule finds its
    host's sidecar as the only instance at R = 100 (its data readable, marked as the
    sidecar), and the true instances at R = 0 and when off; a consumer whose rule says a
    version below the minimum is never switched."""
    admin, server = curator_mesh
    with relays(server, [OLD_HOST]) as (old,):
        connects = [server.address, old]
        assert discover(consumer_classes, connects) == [TRUE, TRUE]

        _switch(admin, {APPLICATION: {"mode": "on", "ratio": 100},
                        "legacy": {"mode": "on", "ratio": 100}})  # fmt: skip
        assert discover(consumer_classes, connects) == [{"127.0.0.1:15001 sidecar"}, TRUE]

        _switch(admin, {APPLICATION: {"mode": "on", "ratio": 0}})
        assert discover(consumer_classes, connects) == [TRUE, TRUE]

        _switch(admin, {APPLICATION: {"mode": "off"}})
        assert discover(consumer_classes, connects) == [TRUE, TRUE]


def test_a_ratio_switches_the_hashed_share_of_curator_instances(
    curator_mesh: tuple[str, ZkgateServer], consumer_classes: Path
) -> None:
    """At R = 30, of 40 instances of one application (one per host), exactly those the
    views' hash picks find their own sidecar alone, about 30 % of them, and every other
    finds the true instances; the same instances again on a second read."""
    admin, server = curator_mesh
    expected = {host for host in HOSTS if hashed_onto_sidecar(APPLICATION, host, SERVICE, 30)}
    assert 0.2 <= len(expected) / len(HOSTS) <= 0.4, len(expected)
    _switch(admin, {APPLICATION: {"mode": "on", "ratio": 30}})
    with relays(server, HOSTS) as connects:
        for _ in range(2):
            seen = discover(consumer_classes, connects)
            switched = set()
            for host, instances in zip(HOSTS, seen, strict=True):
                if instances == {f"{sidecar_of(host)} sidecar"}:
                    switched.add(host)
                else:
                    assert instances == TRUE, (host, instances)
            assert switched == expected
