"""Fixtures that give tests real servers (see tests/servers.py).

Shared, session-scoped servers keep the suite fast: one standalone ZooKeeper,
one etcd, and (only if some test asks for it) one 3-node ensemble. Because
tests share them, each test must work under its own path or key prefix:
``unique_path`` gives one. A test that needs to kill or reconfigure a server
should build its own through ``zookeeper_factory`` / ``etcd_factory``; if a
test does kill a shared server anyway, it is started again (same port, same
data) after that test, so the damage does not spread to the next one.

zkgate servers are per test (``zkgate``, ``zkgate_factory``), each in the
test's tmp_path, so their data and logs stay with the test that made them.
Every server is stopped at teardown, also when the test failed; a failing
test's report carries the log tails of the servers its factories started.

All fixtures are sync on purpose: they block only while servers start or
stop, and sync fixtures work alike for trio and plain tests.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.servers import (
    EtcdServer,
    ServerFactory,
    ServerProcess,
    ZkgateServer,
    ZooKeeperEnsemble,
    ZooKeeperServer,
)

_SHARED_SERVERS = ("zookeeper", "etcd", "zk_ensemble")
_FACTORIES = ("zkgate_factory", "zookeeper_factory", "etcd_factory")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ensemble: uses the 3-node ZooKeeper ensemble (a few seconds to start)"
    )


# ---------------------------------------------------------------- shared servers


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """One standalone ZooKeeper 3.8 for the whole session (tickTime 200 ms)."""
    with ZooKeeperServer(base_dir=tmp_path_factory.mktemp("zookeeper")) as server:
        yield server


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One single-member etcd 3.4 for the whole session."""
    with EtcdServer(base_dir=tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture(scope="session")
def zk_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    """A 3-node ZooKeeper ensemble, started the first time a test asks for it."""
    with ZooKeeperEnsemble(3, base_dir=tmp_path_factory.mktemp("ensemble")) as ensemble:
        yield ensemble


@pytest.fixture(autouse=True)
def _revive_shared_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test, start again any shared server (or ensemble member) it left dead.

    Looks only at shared servers the test actually used, so it never starts
    one that nobody asked for.
    """
    used = [
        request.getfixturevalue(name) for name in _SHARED_SERVERS if name in request.fixturenames
    ]
    yield
    for shared in used:
        if isinstance(shared, ZooKeeperEnsemble):
            if not all(member.running for member in shared.members):
                shared.start()
        elif isinstance(shared, ServerProcess) and not shared.running:
            shared.start()


# ------------------------------------------------------------ per-test servers


@pytest.fixture
def zkgate_factory(tmp_path: Path) -> Iterator[ServerFactory[ZkgateServer]]:
    """Call it to start a zkgate (``factory(*extra_cli_args, port=..., env=...)``).

    Each server gets its own directory under the test's tmp_path; all are
    stopped at teardown.
    """
    factory = ServerFactory(ZkgateServer, tmp_path, "zkgate")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def zkgate(zkgate_factory: ServerFactory[ZkgateServer]) -> ZkgateServer:
    """One fresh zkgate for this test, with no registry configured (embedded tree)."""
    return zkgate_factory()


@pytest.fixture
def zookeeper_factory(tmp_path: Path) -> Iterator[ServerFactory[ZooKeeperServer]]:
    """Standalone ZooKeeper servers of the test's own, free to kill, restart or reconfigure
    (``factory(tick_time_ms=..., config={...}, system_properties={...})``)."""
    factory = ServerFactory(ZooKeeperServer, tmp_path, "zookeeper")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[ServerFactory[EtcdServer]]:
    """etcd servers of the test's own, free to kill and restart."""
    factory = ServerFactory(EtcdServer, tmp_path, "etcd")
    try:
        yield factory
    finally:
        factory.close()


# --------------------------------------------------------------------- helpers


@pytest.fixture
def unique_path(request: pytest.FixtureRequest) -> str:
    """A znode path (also usable as a key prefix) that no other test uses:
    ``/t-<test name>-<8 hex digits>``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:48]
    return f"/t-{name}-{uuid.uuid4().hex[:8]}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log tails of a failed test's own servers to its report."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in _FACTORIES:
            factory = funcargs.get(name)
            if isinstance(factory, ServerFactory):
                for server in factory.servers:
                    report.sections.append(
                        (f"{server.kind} log ({server.log_path})", server.log_tail(60))
                    )
    return report
