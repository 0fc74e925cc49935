"""A Dubbo consumer registering and subscribing on a Dubbo projection.

Dubbo's ``ZookeeperRegistry`` does not only read: before it lists providers
it makes sure the service's ``providers``, ``configurators`` and ``routers``
directories exist (creating them when absent), watches all three, and it
registers the consumer itself as an ephemeral ``consumer://`` znode under
``consumers``. Here that sequence runs against a Dubbo projection and against
a real ZooKeeper 3.8 holding the same znodes, and both must answer alike;
then a real Python Dubbo consumer (the ``dubbo-python3`` package, which
speaks to ZooKeeper through kazoo) registers and subscribes on the projection.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError, NodeExistsError
from kazoo.protocol.states import WatchedEvent
from kazoo.security import OPEN_ACL_UNSAFE

from adapters.layouts import dubbo
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, wait_for

SERVICE = "com.acme.Orders"
ORDERS_A = {"service": SERVICE, "id": "a", "host": "10.0.0.1", "port": 20880,
            "protocol": "jsonrpc", "zone": "eu west 1", "metadata": {"version": ""}}  # fmt: skip
ORDERS_B = {"service": SERVICE, "id": "b", "host": "10.0.0.2", "port": 20880,
            "protocol": "jsonrpc"}  # fmt: skip
#: What a Dubbo 3 consumer registers (URL.toFullString of its consumer URL).
CONSUMER_URL = (
    f"consumer://10.9.9.9/{SERVICE}?application=shop&category=consumers&check=false"
    f"&dubbo=2.0.2&interface={SERVICE}&pid=4242&release=3.2.0&side=consumer"
)
#: Curator writes the client's address as the data of a znode made without data.
CURATOR_DATA = b"10.9.9.9"


def _write_instances(path: Path, instances: list[dict[str, Any]]) -> None:
    # Write then rename: the static upstream must never see half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"instances": instances}))
    os.replace(tmp, path)


def _start(zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path, root: str,
           instances: list[dict[str, Any]]) -> tuple[ZkgateServer, Path]:  # fmt: skip
    path = tmp_path / "instances.json"
    _write_instances(path, instances)
    config = tmp_path / "zkgate.toml"
    config.write_text(f"""
node_id = "gw-test"

[[upstream]]
name = "file"
kind = "static"
path = "{path}"
poll_interval = 0.05

[[projection]]
root = "{root}"
layout = "dubbo"
""")
    return zkgate_factory(["--config", str(config)]), path


def _client(address: str) -> KazooClient:
    client = KazooClient(hosts=address, timeout=10)
    client.start(timeout=10)
    return client


@pytest.fixture
def clients() -> Iterator[Callable[[str], KazooClient]]:
    started: list[KazooClient] = []

    def start(address: str) -> KazooClient:
        client = _client(address)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()
        client.close()


class DubboRegistry:
    """Dubbo 3's ``ZookeeperRegistry`` over ``Curator5ZookeeperClient``, call for call.

    ``create(path, ephemeral, faultTolerant)`` as ``AbstractZookeeperClient``
    does it: a persistent path known to exist (cached) or found by
    ``checkExists`` is left alone; otherwise its parents are created first
    (fault tolerant), then the node; a persistent create that finds the node
    tolerates NODEEXISTS, an ephemeral one deletes and creates again.
    ``doRegister`` creates the URL's znode ephemeral (``dynamic`` defaults to
    true); ``doSubscribe`` creates each category directory and lists it with
    a watch. Every ZooKeeper call and its answer goes into ``transcript``.
    """

    def __init__(self, zk: KazooClient, root: str) -> None:
        self.zk = zk
        self.root = root
        self.transcript: list[tuple[str, str, object]] = []
        self.events: list[tuple[str, str]] = []
        self.fired = threading.Event()
        self._known: set[str] = set()

    def _call(self, op: str, path: str, call: Callable[[], object]) -> object:
        try:
            result = call()
        except KazooException as exc:
            self.transcript.append((op, path, type(exc).__name__))
            raise
        self.transcript.append((op, path, result))
        return result

    def _check_exists(self, path: str) -> bool:
        return bool(self._call("exists", path, lambda: self.zk.exists(path) is not None))

    def create(self, path: str, ephemeral: bool, fault_tolerant: bool) -> None:
        if not ephemeral:
            if path in self._known:
                return
            if self._check_exists(path):
                self._known.add(path)
                return
        cut = path.rfind("/")
        if cut > 0:
            self.create(path[:cut], False, True)
        try:
            made = lambda: self.zk.create(path, CURATOR_DATA, ephemeral=ephemeral) and "OK"  # noqa: E731
            self._call("create", path, made)
        except NodeExistsError:
            if not fault_tolerant:
                raise
            if ephemeral:
                self._call("delete", path, lambda: self.zk.delete(path, recursive=True) and "OK")
                self.create(path, True, True)
        if not ephemeral:
            self._known.add(path)

    def service_path(self, service: str) -> str:
        return f"{self.root}/{dubbo.encode(service)}"

    def register(self, service: str, url: str) -> str:
        path = f"{self.service_path(service)}/consumers/{dubbo.encode(url)}"
        self.create(path, True, True)
        return path

    def subscribe(self, service: str) -> list[str]:
        found: list[str] = []
        for category in ("providers", "configurators", "routers"):
            path = f"{self.service_path(service)}/{category}"
            self.create(path, False, True)
            listed = lambda p=path: sorted(self.zk.get_children(p, watch=self._watch))  # noqa: E731
            children = self._call("getChildren", path, listed)
            assert isinstance(children, list)
            found += children
        return found

    def _watch(self, event: WatchedEvent) -> None:
        # Dubbo's CuratorWatcherImpl re-lists with a new watch on every event.
        self.events.append((event.type, event.path))
        if event.type == "CHILD":
            self.zk.get_children(event.path, watch=self._watch)
        self.fired.set()


def _transcript(registry: DubboRegistry, session_id: int) -> list[tuple[str, str, object]]:
    """The registry's answers, with the session's own id where it shows."""
    return [(op, path, "<own>" if result == session_id else result)
            for op, path, result in registry.transcript]  # fmt: skip


def _consumer_sequence(zk: KazooClient, root: str) -> tuple[list[Any], DubboRegistry]:
    registry = DubboRegistry(zk, root)
    steps: list[Any] = []
    steps.append(registry.register(SERVICE, CONSUMER_URL))
    steps.append(registry.subscribe(SERVICE))
    # A service nobody provides yet: the consumer makes its directories.
    steps.append(registry.register("com.acme.Unknown", CONSUMER_URL))
    steps.append(registry.subscribe("com.acme.Unknown"))
    # What Curator5ZookeeperClient.createPersistent sees when checkExists raced.
    for category in ("providers", "configurators", "routers", "consumers"):
        try:
            zk.create(f"{registry.service_path(SERVICE)}/{category}", CURATOR_DATA)
        except NodeExistsError:
            steps.append(("NODEEXISTS", category))
    own = zk.exists(steps[0])
    assert own is not None
    steps.append(("ephemeralOwner", own.ephemeralOwner == zk.client_id[0]))
    service = registry.service_path(SERVICE)
    steps.append(("consumers", sorted(zk.get_children(f"{service}/consumers"))))
    steps.append(("service", sorted(zk.get_children(service))))
    return steps, registry


def test_dubbo_consumer_sequence_answers_as_zookeeper_does(
    zkgate_factory: ServerFactory[ZkgateServer], zookeeper: ZooKeeperServer,
    clients: Callable[[str], KazooClient], tmp_path: Path, unique_path: str,
) -> None:  # fmt: skip
    root = unique_path
    server, instances = _start(zkgate_factory, tmp_path, root, [ORDERS_A])
    gateway = clients(server.address)
    providers = f"{root}/{SERVICE}/providers"
    wait_for(lambda: gateway.exists(providers) and gateway.get_children(providers),
             timeout=10, message="the provider to be projected")  # fmt: skip
    (provider,) = gateway.get_children(providers)

    # The real ZooKeeper holds what the projection serves, as a Dubbo
    # provider and an earlier consumer would have left it.
    real = clients(zookeeper.address)
    real.create(f"{providers}/{provider}", CURATOR_DATA, makepath=True)
    for category in ("configurators", "routers", "consumers"):
        real.create(f"{root}/{SERVICE}/{category}", CURATOR_DATA)

    on_gateway, gateway_registry = _consumer_sequence(gateway, root)
    on_zookeeper, zookeeper_registry = _consumer_sequence(real, root)
    assert on_gateway == on_zookeeper
    assert _transcript(gateway_registry, gateway.client_id[0]) == _transcript(
        zookeeper_registry, real.client_id[0]
    )
    # The consumer found the provider and registered, nothing refused.
    assert on_gateway[1] == [provider]
    assert ("consumers", [dubbo.encode(CONSUMER_URL)]) in on_gateway
    assert ("service", ["configurators", "consumers", "providers", "routers"]) in on_gateway

    # A provider arriving fires the providers watch on both, once.
    added = provider.replace("10.0.0.1", "10.0.0.2")  # what the projection renders for it
    _write_instances(instances, [ORDERS_A, {**ORDERS_A, "id": "b", "host": "10.0.0.2"}])
    real.create(f"{providers}/{added}", CURATOR_DATA)
    for registry in (gateway_registry, zookeeper_registry):
        assert registry.fired.wait(10), "no providers watch fired for the new provider"
    assert sorted(gateway.get_children(providers)) == sorted(real.get_children(providers))
    assert len(real.get_children(providers)) == 2
    assert gateway_registry.events == zookeeper_registry.events == [("CHILD", providers)]


def test_upstream_changes_fire_the_consumers_watch_and_keep_its_registration(
    zkgate_factory: ServerFactory[ZkgateServer], clients: Callable[[str], KazooClient],
    tmp_path: Path,
) -> None:  # fmt: skip
    server, instances = _start(zkgate_factory, tmp_path, "/dubbo", [ORDERS_A])
    zk = clients(server.address)
    providers = f"/dubbo/{SERVICE}/providers"
    wait_for(lambda: zk.exists(providers) and zk.get_children(providers), timeout=10,
             message="the provider to be projected")  # fmt: skip
    registry = DubboRegistry(zk, "/dubbo")
    mine = registry.register(SERVICE, CONSUMER_URL)
    assert len(registry.subscribe(SERVICE)) == 1

    def changed(instances_now: list[dict[str, Any]], count: int) -> None:
        registry.fired.clear()
        _write_instances(instances, instances_now)
        assert registry.fired.wait(10), "the consumer's providers watch did not fire"
        wait_for(lambda: len(zk.get_children(providers)) == count or None, timeout=10,
                 message=f"{count} providers")  # fmt: skip
        assert zk.exists(mine) is not None  # re-syncs leave the registration alone

    changed([ORDERS_A, ORDERS_B], 2)
    # The failing instance is hidden, but the service is known: providers stays.
    changed([{**ORDERS_A, "health": "failing"}], 0)
    changed([ORDERS_B], 1)
    # The service leaves the registry: its providers go; the consumer's
    # registration keeps the directories it watches, with providers empty.
    changed([], 0)
    assert sorted(zk.get_children(f"/dubbo/{SERVICE}")) == [
        "configurators", "consumers", "providers", "routers",
    ]  # fmt: skip
    assert zk.get_children(f"/dubbo/{SERVICE}/consumers") == [mine.rpartition("/")[2]]
    assert registry.events == [("CHILD", providers)] * 4
    # And when it comes back, the same watch hears it.
    changed([ORDERS_A], 1)


def test_a_consumer_registration_is_seen_by_others_and_goes_with_its_session(
    zkgate_factory: ServerFactory[ZkgateServer], clients: Callable[[str], KazooClient],
    tmp_path: Path,
) -> None:  # fmt: skip
    server, _ = _start(zkgate_factory, tmp_path, "/dubbo", [ORDERS_A])
    consumers = f"/dubbo/{SERVICE}/consumers"
    observer = clients(server.address)
    wait_for(lambda: observer.exists(consumers), timeout=10, message="the consumers directory")
    heard: list[tuple[str, str]] = []
    fired = threading.Event()

    def watch(event: WatchedEvent) -> None:
        heard.append((event.type, event.path))
        fired.set()

    assert observer.get_children(consumers, watch=watch) == []
    consumer = _client(server.address)
    try:
        mine = DubboRegistry(consumer, "/dubbo").register(SERVICE, CONSUMER_URL)
        assert fired.wait(10), "the registration fired no child watch"
        stat = observer.exists(mine)
        assert stat is not None
        assert stat.ephemeralOwner == consumer.client_id[0]
        assert observer.get_children(consumers, watch=watch) == [mine.rpartition("/")[2]]
        fired.clear()
    finally:
        consumer.stop()
        consumer.close()
    assert fired.wait(10), "the session's end fired no child watch"
    assert heard == [("CHILD", consumers)] * 2
    assert observer.get_children(consumers) == []


def test_projected_providers_still_refuse_writes(
    zkgate_factory: ServerFactory[ZkgateServer], clients: Callable[[str], KazooClient],
    tmp_path: Path,
) -> None:  # fmt: skip
    server, _ = _start(zkgate_factory, tmp_path, "/dubbo", [ORDERS_A])
    zk = clients(server.address)
    service = f"/dubbo/{SERVICE}"
    wait_for(lambda: zk.exists(f"{service}/providers") and zk.get_children(f"{service}/providers"),
             timeout=10, message="the provider to be projected")  # fmt: skip
    (provider,) = zk.get_children(f"{service}/providers")
    refused: list[Callable[[], object]] = [
        lambda: zk.create(f"{service}/providers/{dubbo.encode('dubbo://6.6.6.6:1/x')}", b""),
        lambda: zk.create(f"{service}/providers/x", b"", ephemeral=True),
        lambda: zk.delete(f"{service}/providers/{provider}"),
        lambda: zk.set(f"{service}/providers/{provider}", b"hijack"),
        lambda: zk.set_acls(f"{service}/providers/{provider}", list(OPEN_ACL_UNSAFE)),
        lambda: zk.delete(f"{service}/providers"),
        lambda: zk.delete(f"{service}/consumers"),
        lambda: zk.create(f"{service}/configurators/{dubbo.encode('override://0.0.0.0/x')}", b""),
        lambda: zk.create(f"{service}/routers/r", b""),
        lambda: zk.create(f"{service}/elsewhere", b""),
        lambda: zk.set(service, b"x"),
        lambda: zk.delete("/dubbo", recursive=True),
    ]
    for write in refused:
        with pytest.raises(NoAuthError):
            write()
    assert zk.get_children(f"{service}/providers") == [provider]
    assert zk.get_children(f"{service}/configurators") == []
    assert zk.get_children(f"{service}/routers") == []


def test_a_real_python_dubbo_consumer_registers_and_subscribes(
    zkgate_factory: ServerFactory[ZkgateServer], clients: Callable[[str], KazooClient],
    tmp_path: Path,
) -> None:  # fmt: skip
    # dubbo-python3: a Dubbo consumer that reaches ZooKeeper through kazoo.
    # It makes the consumers directory with ensure_path, registers ephemeral,
    # then lists providers and configurators with watches. Imported here
    # because importing it configures logging.
    from dubbo_client import ZookeeperRegistry

    server, instances = _start(zkgate_factory, tmp_path, "/dubbo", [ORDERS_A])
    zk = clients(server.address)
    providers = f"/dubbo/{SERVICE}/providers"
    wait_for(lambda: zk.exists(providers) and zk.get_children(providers), timeout=10,
             message="the provider to be projected")  # fmt: skip
    registry = ZookeeperRegistry(server.address)
    try:
        registry.register(SERVICE)
        registry.subscribe(SERVICE)
        assert set(registry.get_providers(SERVICE)) == {"10.0.0.1:20880"}
        (registration,) = zk.get_children(f"/dubbo/{SERVICE}/consumers")
        assert dubbo.decode(registration).startswith(f"consumer://127.0.0.1/{SERVICE}?")
        # Its watch on providers carries the upstream's change to it.
        _write_instances(instances, [ORDERS_A, ORDERS_B])
        wait_for(lambda: set(registry.get_providers(SERVICE)) == {"10.0.0.1:20880",
                                                                  "10.0.0.2:20880"},
                 timeout=10, message="the consumer to see the second provider")  # fmt: skip
    finally:
        # The package has no way to close its registry; stop its kazoo client.
        own: KazooClient = registry._ZookeeperRegistry__zk
        own.stop()
        own.close()
    wait_for(lambda: zk.get_children(f"/dubbo/{SERVICE}/consumers") == [], timeout=10,
             message="the registration to go with the consumer's session")  # fmt: skip
