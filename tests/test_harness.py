"""The test harness itself: real servers start, answer, keep data across a crash, stop.

Everything else in the suite trusts these servers as the reference, so the
harness gets checked against them with real clients (kazoo, python-etcd3).
"""

from __future__ import annotations

import importlib.util
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import etcd3
import pytest
from kazoo.client import KazooClient

from tests.servers import (
    LOOPBACK,
    EtcdServer,
    ServerFactory,
    ServerStartError,
    ZkgateServer,
    ZooKeeperEnsemble,
    ZooKeeperServer,
    four_letter,
    free_port,
)


@contextmanager
def kazoo_client(hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=15.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@contextmanager
def etcd_client(server: EtcdServer) -> Iterator[etcd3.Etcd3Client]:
    client = etcd3.client(host=server.host, port=server.port, timeout=10)
    try:
        yield client
    finally:
        client.close()


# ----------------------------------------------------------------------- ports


def test_free_port_gives_distinct_bindable_loopback_ports() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, port))


def test_four_letter_to_a_closed_port_raises() -> None:
    with pytest.raises(ConnectionRefusedError):
        four_letter(LOOPBACK, free_port(), "ruok", timeout=2.0)


# ------------------------------------------------------------------- ZooKeeper


def test_zookeeper_create_and_read_with_kazoo(zookeeper: ZooKeeperServer, unique_path: str) -> None:
    with kazoo_client(zookeeper.address) as client:
        client.create(f"{unique_path}/node", b"hello", makepath=True)
        data, stat = client.get(f"{unique_path}/node")
        assert data == b"hello"
        assert stat.version == 0
        assert client.get_children(unique_path) == ["node"]


def test_zookeeper_four_letter_words(zookeeper: ZooKeeperServer) -> None:
    assert zookeeper.host == LOOPBACK
    assert zookeeper.address == f"127.0.0.1:{zookeeper.port}"
    assert zookeeper.four_letter("ruok") == "imok"
    assert "zk_version\t3.8.0" in zookeeper.four_letter("mntr")
    assert zookeeper.mode == "standalone"


def test_zookeeper_grants_session_timeouts_by_the_tick_rule(zookeeper: ZooKeeperServer) -> None:
    """A 10 s request is capped at 20 ticks (4 s): short expiry tests rely on it."""
    assert zookeeper.max_session_timeout_ms == 20 * zookeeper.tick_time_ms == 4000
    with kazoo_client(zookeeper.address) as client:
        session_id, _ = client.client_id
        connections = zookeeper.four_letter("cons")
    ours = [line for line in connections.splitlines() if f"sid=0x{session_id:x}," in line]
    assert len(ours) == 1, connections
    assert re.search(r"\bto=4000\b", ours[0]), ours[0]


def test_zookeeper_keeps_persistent_nodes_across_kill_and_restart(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = zookeeper_factory()
    port, data_dir = server.port, server.data_dir
    with kazoo_client(server.address) as client:
        client.create("/durable", b"survives")
        client.create("/durable/child", b"too")
    server.kill()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        four_letter(server.host, port, "ruok", timeout=2.0)

    server.start()
    assert (server.port, server.data_dir) == (port, data_dir)
    with kazoo_client(server.address) as client:
        assert client.get("/durable")[0] == b"survives"
        assert client.get("/durable/child")[0] == b"too"
    assert server.log_path.read_text().count("=== start #") == 2


def test_zookeeper_passes_extra_config_and_system_properties(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = zookeeper_factory(
        tick_time_ms=100,
        config={"maxSessionTimeout": 3000},
        system_properties={"zookeeper.extendedTypesEnabled": True},
    )
    assert server.max_session_timeout_ms == 3000
    conf = server.four_letter("conf")
    assert "tickTime=100" in conf
    assert "maxSessionTimeout=3000" in conf
    jvm_flags = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-Dzookeeper.extendedTypesEnabled=true" in jvm_flags


# ------------------------------------------------------------------------ etcd


def test_etcd_put_and_get(etcd: EtcdServer, unique_path: str) -> None:
    assert etcd.endpoint == f"127.0.0.1:{etcd.port}"
    assert etcd.health()
    with etcd_client(etcd) as client:
        client.put(f"{unique_path}/key", "value")
        value, meta = client.get(f"{unique_path}/key")
        assert value == b"value"
        assert meta.key == f"{unique_path}/key".encode()


def test_etcd_keeps_data_across_kill_and_restart(etcd_factory: ServerFactory[EtcdServer]) -> None:
    server = etcd_factory()
    with etcd_client(server) as client:
        client.put("/durable", "survives")
    server.kill()
    assert not server.health()
    server.start()
    with etcd_client(server) as client:
        assert client.get("/durable")[0] == b"survives"


def test_a_server_that_cannot_start_reports_its_log() -> None:
    server = EtcdServer(extra_args=["--no-such-flag"], startup_timeout=10.0)
    try:
        with pytest.raises(ServerStartError, match="no-such-flag"):
            server.start()
        assert not server.running
    finally:
        server.close()


def test_a_lost_port_race_is_retried_on_a_fresh_port() -> None:
    server = EtcdServer()
    lost = server.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, lost))
        try:
            server.start()
            assert server.port != lost
            assert server.health()
            assert server.log_path.read_text().count("=== start #") == 2
        finally:
            server.close()


def test_another_server_on_the_port_is_not_taken_for_ours(zookeeper: ZooKeeperServer) -> None:
    """``ruok`` answered by someone else's ZooKeeper must not count as ready."""
    impostor = ZooKeeperServer(port=zookeeper.port)
    try:
        with pytest.raises(ServerStartError, match="Address already in use"):
            impostor.start()
        assert not impostor.running
    finally:
        impostor.close()


def test_context_manager_stops_the_server_and_removes_its_directory() -> None:
    with EtcdServer() as server:
        assert server.running
        assert server.health()
        base_dir = server.base_dir
    assert not server.running
    assert not base_dir.exists()


# -------------------------------------------------------------------- ensemble


@pytest.mark.ensemble
def test_ensemble_replicates_and_a_member_rejoins(zk_ensemble: ZooKeeperEnsemble) -> None:
    modes = sorted(member.mode or "none" for member in zk_ensemble)
    assert modes == ["follower", "follower", "leader"]
    assert zk_ensemble.connect_string.count("127.0.0.1:") == 3

    leader = zk_ensemble.leader_index()
    assert leader is not None
    follower = (leader + 1) % 3
    other = (leader + 2) % 3
    with kazoo_client(zk_ensemble.member(leader).address) as client:
        client.create("/ensemble-harness", b"replicated")
    with kazoo_client(zk_ensemble.member(other).address) as client:
        client.sync("/ensemble-harness")
        assert client.get("/ensemble-harness")[0] == b"replicated"

    # A killed member misses a write, then catches up when it comes back.
    zk_ensemble.kill_member(follower)
    with kazoo_client(zk_ensemble.member(other).address) as client:
        client.set("/ensemble-harness", b"while-down")
    zk_ensemble.start_member(follower)
    with kazoo_client(zk_ensemble.member(follower).address) as client:
        client.sync("/ensemble-harness")
        assert client.get("/ensemble-harness")[0] == b"while-down"
        client.delete("/ensemble-harness")


# ---------------------------------------------------------------------- zkgate


@pytest.mark.skipif(
    importlib.util.find_spec("dispatcher.__main__") is None,
    reason="dispatcher/__main__.py (the zkgate CLI) does not exist yet",
)
def test_zkgate_server_answers_and_restarts(zkgate: ZkgateServer) -> None:
    assert zkgate.four_letter("ruok") == "imok"
    port = zkgate.port
    zkgate.restart()
    assert zkgate.port == port
    assert zkgate.four_letter("ruok") == "imok"
