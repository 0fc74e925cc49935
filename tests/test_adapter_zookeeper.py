"""ZooKeeperUpstream against a real ZooKeeper 3.8.

Registrations are made with kazoo the way real clients make them (a Dubbo
provider URL znode, Curator's ServiceInstance JSON, a Finagle ``member_``
sequential ephemeral, a plain JSON record); the adapter's events are folded
into a snapshot exactly as the fan-in folds them (tests/upstream_fold.py).

The adapter holds one persistent recursive watch per root and nothing else;
the tests check that on the server itself (``wchp``, ``mntr``).

The shared ``zookeeper`` serves the tests that only read and write under
their own ``unique_path``; the tests that count the server's watches or kill
the server get one of their own from ``zookeeper_factory``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
from kazoo.client import KazooClient
from kazoo.security import make_digest_acl

from adapters.layouts import dubbo
from adapters.zookeeper import ZooKeeperUpstream
from dispatcher.core.model import Health, Instance
from dispatcher.core.snapshot import Put, Remove
from dispatcher.core.upstream import Changed, ConfigError, Listing, Status, UpstreamEvent
from tests.partition import Partition
from tests.servers import ServerFactory, ZooKeeperServer
from tests.upstream_fold import Fold
from tests.waiting import until

# ----------------------------------------------------------------------- helpers


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking kazoo call, in a worker thread so the adapter's trio task keeps running."""
    return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


@contextlib.asynccontextmanager
async def kazoo(hosts: str, timeout: float = 10.0) -> AsyncIterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=timeout)
    await call(client.start, 15)
    try:
        yield client
    finally:
        await call(client.stop)
        await call(client.close)


class StrictFold(Fold):
    """A Fold that also records every incremental change that changes nothing.

    A Put of the value already held or a Remove of an instance not held is a
    duplicate: the adapter told the fan-in something twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.redundant: list[Put | Remove] = []

    def apply(self, event: UpstreamEvent) -> Any:
        if isinstance(event, Changed):
            for change in event.changes:
                if isinstance(change, Put):
                    held = self.instances(change.instance.service)
                    if held.get(change.instance.instance_id) == change.instance:
                        self.redundant.append(change)
                elif change.instance_id not in self.instances(change.service):
                    self.redundant.append(change)
        return super().apply(event)


@attrs.define
class Running:
    upstream: ZooKeeperUpstream
    receive: trio.MemoryReceiveChannel[UpstreamEvent]
    fold: StrictFold

    async def until(
        self, predicate: Callable[[StrictFold], object], message: str, timeout: float = 15.0
    ) -> None:
        await self.fold.until(self.receive, predicate, timeout=timeout, message=message)


@contextlib.asynccontextmanager
async def running(upstream: ZooKeeperUpstream) -> AsyncIterator[Running]:
    send, receive = trio.open_memory_channel[UpstreamEvent](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        yield Running(upstream, receive, StrictFold())
        nursery.cancel_scope.cancel()


def make_upstream(hosts: str, *roots: tuple[str, str], **options: Any) -> ZooKeeperUpstream:
    return ZooKeeperUpstream.from_config(
        "zk-test",
        {
            "hosts": hosts,
            "roots": [{"path": path, "layout": layout} for path, layout in roots],
            **options,
        },
    )


@contextlib.asynccontextmanager
async def forwarding(server: ZooKeeperServer) -> AsyncIterator[Partition]:
    link = Partition((server.host, server.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        yield link
        nursery.cancel_scope.cancel()


def session_of(upstream: ZooKeeperUpstream) -> tuple[int, bytes]:
    """The adapter's session id and password (private: only a test steals sessions)."""
    tracker = upstream._tracker
    assert tracker is not None and tracker.client is not None
    return tracker.client.session_id, tracker.client.password


def ids(fold: Fold, service: str) -> set[str]:
    return set(fold.instances(service))


def plain_record(host: str, port: int, **extra: Any) -> bytes:
    return json.dumps({"host": host, "port": port, **extra}).encode()


# ----------------------------------------------------------------------- config


def test_config_accepts_the_documented_keys() -> None:
    upstream = ZooKeeperUpstream.from_config(
        "zk",
        {
            "hosts": "127.0.0.1:2181,127.0.0.1:2182/chroot",
            "roots": [
                {"path": "/dubbo/", "layout": "dubbo"},
                {"path": "/services", "layout": "curator"},
            ],
            "session_timeout": 4,
            "auth": ["digest:user:secret"],
        },
    )
    assert upstream.name == "zk"
    assert [(r.path, r.layout) for r in upstream.config.roots] == [
        ("/dubbo", "dubbo"),
        ("/services", "curator"),
    ]
    assert upstream.config.session_timeout == 4.0
    assert upstream.config.auth == (("digest", "user:secret"),)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"roots": [{"path": "/a", "layout": "plain"}]}, "'hosts'"),
        ({"hosts": "h:1"}, "'roots'"),
        ({"hosts": "h:1", "roots": [], "chroot": "/x"}, r"\.chroot: unknown key"),
        ({"hosts": "h:1", "roots": []}, "'roots'"),
        ({"hosts": 2181, "roots": [{"path": "/a", "layout": "plain"}]}, "'hosts'"),
        ({"hosts": "h:1", "roots": [{"path": "/a", "layout": "eureka"}]}, "'roots[0].layout'"),
        ({"hosts": "h:1", "roots": [{"path": "a", "layout": "plain"}]}, "'roots[0].path'"),
        ({"hosts": "h:1", "roots": [{"path": "/a//b", "layout": "plain"}]}, "'roots[0].path'"),
        ({"hosts": "h:1", "roots": [{"layout": "plain"}]}, "'path'"),
        ({"hosts": "h:1", "roots": [{"path": "/a", "layout": "plain", "x": 1}]}, r"\.x: unknown"),
        ({"hosts": "h:1", "roots": ["/a"]}, "'roots[0]'"),
        (
            {
                "hosts": "h:1",
                "roots": [{"path": "/a", "layout": "plain"}, {"path": "/a/b", "layout": "dubbo"}],
            },
            "'roots[1].path'",
        ),
        (
            {"hosts": "h:1", "roots": [{"path": "/a", "layout": "plain"}], "session_timeout": "5"},
            "'session_timeout'",
        ),
        (
            {"hosts": "h:1", "roots": [{"path": "/a", "layout": "plain"}], "session_timeout": 0},
            "'session_timeout'",
        ),
        ({"hosts": "h:1", "roots": [{"path": "/a", "layout": "plain"}], "auth": "x"}, "'auth'"),
        (
            {"hosts": "h:1", "roots": [{"path": "/a", "layout": "plain"}], "auth": ["digest"]},
            "'auth[0]'",
        ),
    ],
)
def test_config_errors_name_the_key(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream 'zk'.*" + named.replace("[", r"\[")):
        ZooKeeperUpstream.from_config("zk", options)


# ----------------------------------------------------------------------- layouts


@attrs.frozen
class LayoutCase:
    """How one kind of real client registers, updates and what the adapter must see."""

    layout: str
    service: str
    register: Callable[[KazooClient, str], Awaitable[str]]
    update: Callable[[KazooClient, str, str], Awaitable[str]]
    expected: Instance
    updated: Instance

    def __str__(self) -> str:
        return self.layout


DUBBO_SERVICE = "com.example.DemoService"
DUBBO_URL = (
    f"dubbo://10.0.0.1:20880/{DUBBO_SERVICE}?anyhost=true&application=demo"
    f"&interface={DUBBO_SERVICE}&methods=sayHello,sayHelloAsync&side=provider&weight=50"
)


async def dubbo_register(client: KazooClient, root: str) -> str:
    # What Dubbo's ZookeeperRegistry does: persistent interface and category
    # nodes, an ephemeral provider znode named by the encoded URL, holding
    # Curator's default data (the local address). A consumer registration
    # sits next to it and is not a provider.
    base = f"{root}/{DUBBO_SERVICE}"
    consumer = dubbo.encode(f"consumer://10.0.0.9/{DUBBO_SERVICE}?category=consumers&side=consumer")
    await call(client.create, f"{base}/consumers/{consumer}", b"10.0.0.9", makepath=True)
    path = f"{base}/providers/{dubbo.encode(DUBBO_URL)}"
    await call(client.create, path, b"10.0.0.1", ephemeral=True, makepath=True)
    return path


async def dubbo_update(client: KazooClient, root: str, path: str) -> str:
    # A provider changing its parameters re-registers under a new name and
    # unregisters the old one; for a moment both exist.
    reweighted = dubbo.encode(DUBBO_URL.replace("weight=50", "weight=80"))
    new = f"{root}/{DUBBO_SERVICE}/providers/{reweighted}"
    await call(client.create, new, b"10.0.0.1", ephemeral=True)
    await call(client.delete, path)
    return new


CURATOR_ID = "5f1c2a9e-3b7d-4c1e-9a55-0d6f1e2b3c4d"
# Exactly what Curator 5.4's JsonInstanceSerializer<Map> writes.
CURATOR_JSON = (
    '{"name":"orders","id":"' + CURATOR_ID + '","address":"10.0.0.7","port":8080,'
    '"sslPort":null,"payload":{"@class":"java.util.LinkedHashMap","version":"1.4"},'
    '"registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC","uriSpec":{"parts":['
    '{"value":"scheme","variable":true},{"value":"://","variable":false},'
    '{"value":"address","variable":true},{"value":":","variable":false},'
    '{"value":"port","variable":true}]}}'
)


CURATOR_METADATA = {
    "version": "1.4",
    "curator.registrationTimeUTC": "1700000000000",
    "curator.uriSpec": "{scheme}://{address}:{port}",
}


async def curator_register(client: KazooClient, root: str) -> str:
    path = f"{root}/orders/{CURATOR_ID}"
    await call(client.create, path, CURATOR_JSON.encode(), ephemeral=True, makepath=True)
    return path


async def curator_update(client: KazooClient, root: str, path: str) -> str:
    # ServiceDiscovery.updateService: setData on the same znode.
    await call(client.set, path, CURATOR_JSON.replace('"port":8080', '"port":8081').encode())
    return path


SERVERSET_JSON = {
    "serviceEndpoint": {"host": "10.0.0.5", "port": 31010},
    "additionalEndpoints": {"http": {"host": "10.0.0.5", "port": 8080}},
    "status": "ALIVE",
    "shard": 0,
}


async def serverset_register(client: KazooClient, root: str) -> str:
    path = await call(
        client.create,
        f"{root}/api/member_",
        json.dumps(SERVERSET_JSON).encode(),
        ephemeral=True,
        sequence=True,
        makepath=True,
    )
    # A lock znode in the set's directory, as Aurora leaves, is not a member.
    await call(client.create, f"{root}/api/singleton_lock", b"")
    return path


async def serverset_update(client: KazooClient, root: str, path: str) -> str:
    await call(client.set, path, json.dumps({**SERVERSET_JSON, "status": "DEAD"}).encode())
    return path


async def plain_register(client: KazooClient, root: str) -> str:
    path = f"{root}/inventory/i-1"
    data = plain_record("10.0.0.9", 8080, weight=30, zone="az2", metadata={"version": "2"})
    await call(client.create, path, data, makepath=True)
    return path


async def plain_update(client: KazooClient, root: str, path: str) -> str:
    data = plain_record("10.0.0.9", 9090, weight=30, zone="az2", metadata={"version": "3"})
    await call(client.set, path, data)
    return path


LAYOUT_CASES = [
    LayoutCase(
        "dubbo",
        DUBBO_SERVICE,
        dubbo_register,
        dubbo_update,
        Instance(
            DUBBO_SERVICE,
            "10.0.0.1:20880",
            "10.0.0.1",
            20880,
            weight=50,
            protocol="dubbo",
            metadata={
                "anyhost": "true",
                "application": "demo",
                "interface": DUBBO_SERVICE,
                "methods": "sayHello,sayHelloAsync",
                "side": "provider",
            },
        ),
        Instance(
            DUBBO_SERVICE,
            "10.0.0.1:20880",
            "10.0.0.1",
            20880,
            weight=80,
            protocol="dubbo",
            metadata={
                "anyhost": "true",
                "application": "demo",
                "interface": DUBBO_SERVICE,
                "methods": "sayHello,sayHelloAsync",
                "side": "provider",
            },
        ),
    ),
    LayoutCase(
        "curator",
        "orders",
        curator_register,
        curator_update,
        Instance(
            "orders",
            CURATOR_ID,
            "10.0.0.7",
            8080,
            protocol="http",
            metadata=CURATOR_METADATA,
        ),
        Instance(
            "orders",
            CURATOR_ID,
            "10.0.0.7",
            8081,
            protocol="http",
            metadata=CURATOR_METADATA,
        ),
    ),
    LayoutCase(
        "serverset",
        "api",
        serverset_register,
        serverset_update,
        Instance(
            "api",
            "0000000000",
            "10.0.0.5",
            31010,
            health=Health.PASSING,
            metadata={"serverset.endpoint.http": "10.0.0.5:8080", "serverset.shard": "0"},
        ),
        Instance(
            "api",
            "0000000000",
            "10.0.0.5",
            31010,
            health=Health.FAILING,
            metadata={"serverset.endpoint.http": "10.0.0.5:8080", "serverset.shard": "0"},
        ),
    ),
    LayoutCase(
        "plain",
        "inventory",
        plain_register,
        plain_update,
        Instance(
            "inventory", "i-1", "10.0.0.9", 8080, weight=30, zone="az2", metadata={"version": "2"}
        ),
        Instance(
            "inventory", "i-1", "10.0.0.9", 9090, weight=30, zone="az2", metadata={"version": "3"}
        ),
    ),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
async def test_layout_registration_update_and_removal(
    zookeeper: ZooKeeperServer, unique_path: str, case: LayoutCase
) -> None:
    root = f"{unique_path}/{case.layout}"
    upstream = make_upstream(zookeeper.address, (root, case.layout))
    async with kazoo(zookeeper.address) as client, running(upstream) as run:
        await call(client.ensure_path, root)
        await run.until(lambda f: f.statuses and f.statuses[-1].connected, "connected")
        assert len(run.fold.snapshot) == 0

        path = await case.register(client, root)
        await run.until(lambda f: case.service in f.snapshot, "registration seen")
        [seen] = run.fold.instances(case.service).values()
        assert seen == case.expected
        stat = await call(client.exists, path)
        assert seen.source is not None
        assert seen.source.adapter == "zk-test"
        assert seen.source.key == path.removeprefix(root + "/")
        assert seen.source.revision == stat.mzxid
        # One watch for the whole root, however deep the layout's instances sit.
        assert upstream.watches() == {("recursive", root)}
        assert set(await call(data_watches, zookeeper)) >= {root}
        assert not any(p.startswith(root + "/") for p in await call(data_watches, zookeeper))

        path = await case.update(client, root, path)
        await run.until(
            lambda f: f.instances(case.service).get(case.updated.instance_id) == case.updated,
            "update seen",
        )
        assert list(run.fold.instances(case.service).values()) == [case.updated]

        await call(client.delete, path)
        await run.until(lambda f: case.service not in f.snapshot, "removal seen")
        assert run.fold.redundant == []


async def test_ephemeral_registration_goes_with_its_session(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    upstream = make_upstream(zookeeper.address, (unique_path, "plain"))
    async with kazoo(zookeeper.address) as admin, running(upstream) as run:
        await call(admin.ensure_path, f"{unique_path}/cart")
        async with kazoo(zookeeper.address) as provider:
            await call(
                provider.create,
                f"{unique_path}/cart/c-1",
                plain_record("10.1.0.1", 80),
                ephemeral=True,
            )
            await run.until(lambda f: ids(f, "cart") == {"c-1"}, "ephemeral seen")
        # The provider closed its session: ZooKeeper deletes its ephemerals.
        await run.until(lambda f: ids(f, "cart") == set(), "ephemeral gone with its session")


async def test_garbage_is_skipped_with_one_log_line(
    zookeeper: ZooKeeperServer, unique_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.zookeeper")
    upstream = make_upstream(zookeeper.address, (unique_path, "plain"))
    svc = f"{unique_path}/svc"

    def log_lines(name: str) -> int:
        return sum(
            r.levelno == logging.WARNING and vars(r).get("path") == f"{svc}/{name}"
            for r in caplog.records
        )

    async with kazoo(zookeeper.address) as client, running(upstream) as run:
        await call(client.create, f"{svc}/good", plain_record("10.2.0.1", 80), makepath=True)
        await call(client.create, f"{svc}/bad", b"\xff not json")
        await call(client.create, f"{svc}/bad-port", plain_record("10.2.0.2", 70000))
        await run.until(lambda f: ids(f, "svc") == {"good"}, "good listed, garbage skipped")

        # Churn in the directory and on the good znode re-reads nothing that
        # did not change: the garbage is not retried, nor logged again.
        await call(client.create, f"{svc}/good2", plain_record("10.2.0.3", 80))
        await call(client.set, f"{svc}/good", plain_record("10.2.0.1", 81))
        await run.until(
            lambda f: ids(f, "svc") == {"good", "good2"} and f.instances("svc")["good"].port == 81,
            "churn seen",
        )
        assert (log_lines("bad"), log_lines("bad-port")) == (1, 1)

        # Repaired, it appears; broken again, it goes, with one new line.
        await call(client.set, f"{svc}/bad", plain_record("10.2.0.4", 80))
        await run.until(lambda f: "bad" in ids(f, "svc"), "repaired znode seen")
        await call(client.set, f"{svc}/good", b"{}")
        await run.until(lambda f: ids(f, "svc") == {"bad", "good2"}, "broken znode dropped")
        assert (log_lines("bad"), log_lines("bad-port"), log_lines("good")) == (1, 1, 1)
        assert run.fold.redundant == []


async def test_digest_auth_reads_protected_registrations(
    zookeeper: ZooKeeperServer, unique_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    acl = [make_digest_acl("registry", "s3cret", all=True)]
    owner = KazooClient(hosts=zookeeper.address, auth_data={("digest", "registry:s3cret")})
    await call(owner.start, 15)
    try:
        await call(owner.create, unique_path, b"", acl=acl)
        await call(owner.create, f"{unique_path}/svc", b"", acl=acl)
        await call(owner.create, f"{unique_path}/svc/s1", plain_record("10.8.0.1", 80), acl=acl)

        authed = make_upstream(
            zookeeper.address, (unique_path, "plain"), auth=["digest:registry:s3cret"]
        )
        async with running(authed) as run:
            await run.until(lambda f: ids(f, "svc") == {"s1"}, "protected instance listed")

        # Without the credential: an empty listing and a log line, not a crash.
        caplog.set_level(logging.WARNING, logger="adapters.zookeeper")
        anonymous = make_upstream(zookeeper.address, (unique_path, "plain"))
        async with running(anonymous) as run:
            await run.until(lambda f: not f.stale and f.statuses, "connected")
            assert [e for e in run.fold.events if isinstance(e, Listing)] == [Listing(())]
        assert any("no permission" in r.getMessage() for r in caplog.records)
    finally:
        await call(owner.stop)
        await call(owner.close)


async def test_refused_credentials_are_retried_with_a_new_session(
    zookeeper: ZooKeeperServer, unique_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    # ZooKeeper refuses a scheme it has no provider for, and closes the connection.
    caplog.set_level(logging.ERROR, logger="dispatcher.zk.client")
    upstream = make_upstream(zookeeper.address, (unique_path, "plain"), auth=["nosuch:x"])

    def refusals() -> int:
        return sum("refused credentials" in r.getMessage() for r in caplog.records)

    async with running(upstream) as run:
        await run.until(
            lambda f: any(s.detail == "authentication failed" for s in f.statuses), "refused"
        )
        # The client that was refused cannot run again; the upstream starts
        # another after a pause, rather than failing or spinning.
        await until(lambda: refusals() >= 2, "a second refused client", timeout=15, poll=0.05)
        assert not any(s.connected for s in run.fold.statuses)
        assert not any(isinstance(e, Listing) for e in run.fold.events)


async def test_interest_narrows_and_widening_lists(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    a1, b1, b2 = (f"{unique_path}/svc-a/a1", f"{unique_path}/svc-b/b1", f"{unique_path}/svc-b/b2")
    async with kazoo(zookeeper.address) as client:
        await call(client.create, a1, plain_record("10.3.0.1", 1), makepath=True)
        await call(client.create, b1, plain_record("10.3.0.2", 1), makepath=True)

        # Interest given before run: the first listing is scoped to it.
        scoped = make_upstream(zookeeper.address, (unique_path, "plain"))
        scoped.set_interest(frozenset({"svc-a"}))
        async with running(scoped) as run:
            await run.until(lambda f: any(isinstance(e, Listing) for e in f.events), "listing")
            [listing] = [e for e in run.fold.events if isinstance(e, Listing)]
            assert listing.services == frozenset({"svc-a"})
            assert {i.instance_id for i in listing.instances} == {"a1"}
            # Interest decides what is read, not what is watched: one root, one watch.
            assert scoped.watches() == {("recursive", unique_path)}

        upstream = make_upstream(zookeeper.address, (unique_path, "plain"))
        async with running(upstream) as run:
            await run.until(
                lambda f: ids(f, "svc-a") == {"a1"} and ids(f, "svc-b") == {"b1"}, "all"
            )
            assert upstream.watches() == {("recursive", unique_path)}

            upstream.set_interest(frozenset({"svc-a"}))
            deltas_before = len(run.fold.deltas)
            # svc-b changes first, so its (ignored) events reach the adapter
            # before svc-a's change, which the test then waits for.
            await call(client.set, b1, plain_record("10.3.0.2", 2))
            await call(client.create, b2, plain_record("10.3.0.3", 1))
            await call(client.set, a1, plain_record("10.3.0.1", 2))
            await run.until(lambda f: f.instances("svc-a")["a1"].port == 2, "svc-a change seen")
            assert [d.service for d in run.fold.deltas[deltas_before:]] == ["svc-a"]
            # Still the root's one watch; nothing per service came or went.
            assert upstream.watches() == {("recursive", unique_path)}
            assert b1 not in await call(zookeeper.four_letter, "wchp")

            upstream.set_interest(frozenset({"svc-a", "svc-b"}))
            await run.until(
                lambda f: ids(f, "svc-b") == {"b1", "b2"} and f.instances("svc-b")["b1"].port == 2,
                "widened listing",
            )
            assert isinstance(run.fold.events[-1], Listing)
            assert run.fold.events[-1].services == frozenset({"svc-b"})
            assert run.fold.redundant == []


# ----------------------------------------------------------------------- watches


def data_watches(server: ZooKeeperServer) -> dict[str, list[str]]:
    """``wchp``: every data watch, as path -> the sessions holding one on it."""
    watches: dict[str, list[str]] = {}
    path = ""
    # A path line is any unindented one: tests/test_differential_nulls.py leaves the
    # shared server a watch on a null path, which ZooKeeper keeps and prints as "null".
    # Session lines are the tab-indented ones.
    for line in server.four_letter("wchp").split("\n"):
        if line.startswith("\t"):
            watches.setdefault(path, []).append(line.strip())
        elif line:
            path = line
            watches[path] = []
    return watches


def watch_count(server: ZooKeeperServer) -> int:
    """``mntr``'s zk_watch_count: data and child watches together."""
    for line in server.four_letter("mntr").splitlines():
        key, _, value = line.partition("\t")
        if key == "zk_watch_count":
            return int(value)
    raise AssertionError("mntr has no zk_watch_count")


async def wait_watches(
    server: ZooKeeperServer, upstream: ZooKeeperUpstream, roots: set[str]
) -> None:
    """Until the server holds exactly one watch per root, on one session, as the adapter says.

    ZooKeeper 3.8 files a persistent recursive watch in both its data and its
    child watch tables, so ``zk_watch_count`` counts it twice; ``wchp`` shows it
    once, under its path.
    """
    expected = {("recursive", root) for root in roots}
    seen: tuple[object, ...] = ()
    with trio.move_on_after(15):
        while True:
            by_path = await call(data_watches, server)
            count = await call(watch_count, server)
            seen = (by_path, count, upstream.watches())
            if (
                set(by_path) == roots
                and len({session for sessions in by_path.values() for session in sessions}) == 1
                and all(len(sessions) == 1 for sessions in by_path.values())
                and count == 2 * len(roots)
                and upstream.watches() == expected
            ):
                return
            await trio.sleep(0.05)  # polling the server's own view, with a deadline
    raise AssertionError(f"watches never became {expected!r}; last seen {seen!r}")


async def test_one_upstream_watch_per_root(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = await trio.to_thread.run_sync(zookeeper_factory)
    plain_root, dubbo_root = "/plain", "/dubbo"
    upstream = make_upstream(server.address, (plain_root, "plain"), (dubbo_root, "dubbo"))
    instances = {f"{plain_root}/svc-{s}/i-{i}" for s in "ab" for i in range(3)}
    provider = f"{dubbo_root}/{DUBBO_SERVICE}/providers/{dubbo.encode(DUBBO_URL)}"
    # An interface whose providers directory does not exist yet.
    later = f"{dubbo_root}/com.example.Later"
    async with kazoo(server.address) as client:
        for path in sorted(instances):
            await call(client.create, path, plain_record("10.4.0.1", 80), makepath=True)
        await call(client.create, provider, b"10.0.0.1", makepath=True)
        await call(client.ensure_path, f"{later}/consumers")
        async with running(upstream) as run:
            await run.until(
                lambda f: (
                    len(ids(f, "svc-a") | ids(f, "svc-b")) == 3 and DUBBO_SERVICE in f.snapshot
                ),
                "everything listed",
            )
            await wait_watches(server, upstream, {plain_root, dubbo_root})

            # Churn: every change is seen, and nothing is ever armed again.
            hot = f"{plain_root}/svc-a/i-0"
            for port in range(81, 101):
                await call(client.set, hot, plain_record("10.4.0.1", port))
            await call(client.delete, f"{plain_root}/svc-b/i-2")
            await call(client.create, f"{plain_root}/svc-b/i-3", plain_record("10.4.0.2", 80))
            await call(client.create, f"{plain_root}/svc-c/i-0", plain_record("10.4.0.3", 80),
                       makepath=True)  # fmt: skip
            await call(
                client.create,
                f"{later}/providers/{dubbo.encode(DUBBO_URL.replace('20880', '20881'))}",
                b"",
                makepath=True,
            )
            await run.until(
                lambda f: (
                    f.instances("svc-a")["i-0"].port == 100
                    and ids(f, "svc-b") == {"i-0", "i-1", "i-3"}
                    and ids(f, "svc-c") == {"i-0"}
                    and "com.example.Later" in f.snapshot
                ),
                "churn seen",
            )
            await wait_watches(server, upstream, {plain_root, dubbo_root})
            assert run.fold.redundant == []


# ----------------------------------------------------------------------- outages


async def test_sigkill_keeps_state_then_resyncs_exactly_the_changes(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = await trio.to_thread.run_sync(zookeeper_factory)
    root = "/registry"
    svc = f"{root}/svc"
    upstream = make_upstream(server.address, (root, "plain"), session_timeout=4.0)
    # Registered before the adapter starts (see test_one_upstream_watch_per_path), by a client
    # that is gone before the outage: a test client's session would expire
    # in it, and kazoo's default retry policy gives up on a dead server.
    async with kazoo(server.address) as admin:
        for name in ("i1", "i2", "i3"):
            await call(admin.create, f"{svc}/{name}", plain_record("10.5.0.1", 80), makepath=True)
    # An ephemeral of a client that dies with the server and never comes back.
    doomed = KazooClient(hosts=server.address, timeout=1.0)
    await call(doomed.start, 15)
    await call(doomed.create, f"{svc}/e1", plain_record("10.5.0.9", 80), ephemeral=True)

    async with running(upstream) as run:
        await run.until(
            lambda f: ids(f, "svc") == {"i1", "i2", "i3", "e1"} and not f.stale, "listed"
        )
        before = run.fold.snapshot
        deltas_before = len(run.fold.deltas)

        await trio.to_thread.run_sync(server.kill)
        await run.until(lambda f: f.stale, "Status(False) after SIGKILL")
        assert not run.fold.statuses[-1].connected
        await call(doomed.stop)
        await call(doomed.close)
        # While it is down the adapter reports nothing else, and removes nothing.
        run.fold.drain(run.receive)
        assert run.fold.snapshot is before and run.fold.stale

        await trio.to_thread.run_sync(server.start)
        async with kazoo(server.address) as other:
            # Changes made as soon as the server is back, most likely before
            # the adapter's session has reconnected; e1 expires on its own.
            await call(other.delete, f"{svc}/i1")
            await call(other.set, f"{svc}/i2", plain_record("10.5.0.2", 81))
            await call(other.create, f"{svc}/i4", plain_record("10.5.0.4", 80))
            await run.until(
                lambda f: (
                    not f.stale
                    and ids(f, "svc") == {"i2", "i3", "i4"}
                    and f.instances("svc")["i2"].port == 81
                ),
                "converged after the restart",
                timeout=30,
            )
            # A sentinel change made after convergence: when it arrives,
            # anything the adapter could still have emitted about the outage
            # has arrived too, and its watches are evidently armed again.
            await call(other.create, f"{svc}/i5", plain_record("10.5.0.5", 80))
            await run.until(lambda f: "i5" in ids(f, "svc"), "a change after the resync")

        changes = sorted(
            (kind, instance.instance_id)
            for delta in run.fold.deltas[deltas_before:]
            for kind, group in (
                ("added", delta.added),
                ("updated", delta.updated),
                ("removed", delta.removed),
            )
            for instance in group
        )
        assert changes == [
            ("added", "i4"),
            ("added", "i5"),
            ("removed", "e1"),
            ("removed", "i1"),
            ("updated", "i2"),
        ]
        assert run.fold.redundant == []
        assert [s.connected for s in run.fold.statuses][-2:] == [False, True]
        await wait_watches(server, upstream, {root})


async def test_ensemble_down_at_start_then_up(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = zookeeper_factory(start=False)
    upstream = make_upstream(server.address, ("/svc", "plain"))
    async with running(upstream) as run:
        await run.until(lambda f: f.statuses, "a first status")
        assert run.fold.events == [Status(False, f"connecting to {server.address}")]
        await trio.to_thread.run_sync(server.start)
        async with kazoo(server.address) as client:
            await call(client.create, "/svc/a/a1", plain_record("10.6.0.1", 80), makepath=True)
            await run.until(lambda f: ids(f, "a") == {"a1"} and not f.stale, "listed once up")
        assert [type(e) for e in run.fold.events[:3]] == [Status, Listing, Status]


async def test_session_expiry_relists_on_a_new_session(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    server = await trio.to_thread.run_sync(zookeeper_factory)
    svc = "/registry/svc"
    async with kazoo(server.address) as admin, forwarding(server) as link:
        upstream = make_upstream(link.address, ("/registry", "plain"), session_timeout=4.0)
        await call(admin.ensure_path, svc)
        async with running(upstream) as run:
            for name in ("i1", "i2"):
                await call(
                    admin.create, f"{svc}/{name}", plain_record("10.7.0.1", 80), makepath=True
                )
            await run.until(lambda f: ids(f, "svc") == {"i1", "i2"} and not f.stale, "listed")
            deltas_before = len(run.fold.deltas)

            # Expire the adapter's session the way ZooKeeper's own tests do: a
            # second connection takes the session over, then closes it. The
            # link is cut meanwhile, or the adapter would take it back first.
            session_id, password = session_of(upstream)
            link.cut()
            await run.until(lambda f: f.stale, "Status(False) once cut off")
            thief = KazooClient(hosts=server.address, client_id=(session_id, password))
            await call(thief.start, 15)
            await call(thief.stop)
            await call(thief.close)
            await call(admin.delete, f"{svc}/i1")
            await call(admin.create, f"{svc}/i3", plain_record("10.7.0.3", 80))
            link.heal()

            await run.until(
                lambda f: not f.stale and ids(f, "svc") == {"i2", "i3"}, "converged", timeout=30
            )
            details = [e.detail for e in run.fold.statuses]
            assert any("expired" in detail for detail in details), details
            assert session_of(upstream)[0] != session_id
            changes = sorted(
                (kind, instance.instance_id)
                for delta in run.fold.deltas[deltas_before:]
                for kind, group in (("added", delta.added), ("removed", delta.removed))
                for instance in group
            )
            assert changes == [("added", "i3"), ("removed", "i1")]
            assert all(not d.updated for d in run.fold.deltas[deltas_before:])
            assert run.fold.redundant == []
            # The watch is back, on the new session only.
            await wait_watches(server, upstream, {"/registry"})


async def test_resumed_session_relists_what_changed_while_away(
    zookeeper_factory: ServerFactory[ZooKeeperServer],
) -> None:
    """SIGKILL, restart on the same data dir within the session timeout: the
    session resumes, with its watch, but ZooKeeper does not replay what a
    persistent watch missed, so the adapter lists again and emits exactly
    the changes made while it was away."""
    server = await trio.to_thread.run_sync(zookeeper_factory)
    root, svc = "/registry", "/registry/svc"
    async with kazoo(server.address) as admin:
        for name in ("i1", "i2", "i3"):
            await call(admin.create, f"{svc}/{name}", plain_record("10.9.0.1", 80), makepath=True)
    async with forwarding(server) as link:
        upstream = make_upstream(link.address, (root, "plain"), session_timeout=20.0)
        async with running(upstream) as run:
            await run.until(lambda f: ids(f, "svc") == {"i1", "i2", "i3"} and not f.stale, "listed")
            session_id = session_of(upstream)[0]
            events_before, deltas_before = len(run.fold.events), len(run.fold.deltas)

            # The link stays cut while the server is back, so the changes are
            # certainly made while the adapter is away.
            link.cut()
            await trio.to_thread.run_sync(server.kill)
            await run.until(lambda f: f.stale, "Status(False) after SIGKILL")
            await trio.to_thread.run_sync(server.start)
            async with kazoo(server.address) as other:
                await call(other.delete, f"{svc}/i1")
                await call(other.set, f"{svc}/i2", plain_record("10.9.0.2", 81))
                await call(other.create, f"{svc}/i4", plain_record("10.9.0.4", 80))
                link.heal()
                await run.until(lambda f: not f.stale, "reconnected", timeout=30)
                assert session_of(upstream)[0] == session_id, "the session was not resumed"
                assert ids(run.fold, "svc") == {"i2", "i3", "i4"}
                assert run.fold.instances("svc")["i2"].port == 81
                # One Listing carried the outage's changes, then connected again.
                assert [type(e) for e in run.fold.events[events_before:]] == [
                    Status,
                    Listing,
                    Status,
                ]
                assert [s.detail for s in run.fold.statuses[-2:]] == [
                    "connection lost; session kept while reconnecting",
                    "connected",
                ]
                # The resumed session's watch works without being added again.
                await call(other.create, f"{svc}/i5", plain_record("10.9.0.5", 80))
                await run.until(lambda f: "i5" in ids(f, "svc"), "a change after resuming")

        changes = sorted(
            (kind, instance.instance_id)
            for delta in run.fold.deltas[deltas_before:]
            for kind, group in (
                ("added", delta.added),
                ("updated", delta.updated),
                ("removed", delta.removed),
            )
            for instance in group
        )
        assert changes == [("added", "i4"), ("added", "i5"), ("removed", "i1"), ("updated", "i2")]
        assert run.fold.redundant == []


# ----------------------------------------------------------------------- directories


async def test_deleted_service_directory_takes_its_instances(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    upstream = make_upstream(zookeeper.address, (unique_path, "plain"))
    svc = f"{unique_path}/svc"
    async with kazoo(zookeeper.address) as client, running(upstream) as run:
        for name in ("i1", "i2"):
            await call(client.create, f"{svc}/{name}", plain_record("10.10.0.1", 80), makepath=True)
        await call(client.create, f"{unique_path}/other/o1", plain_record("10.10.0.9", 80),
                   makepath=True)  # fmt: skip
        await run.until(lambda f: ids(f, "svc") == {"i1", "i2"} and ids(f, "other") == {"o1"},
                        "listed")  # fmt: skip

        await call(client.delete, svc, recursive=True)
        await run.until(lambda f: "svc" not in f.snapshot, "service gone with its directory")
        assert ids(run.fold, "other") == {"o1"}

        # Created again, empty first, then with an instance: followed again.
        await call(client.create, svc)
        await call(client.create, f"{svc}/i3", plain_record("10.10.0.3", 80))
        await run.until(lambda f: ids(f, "svc") == {"i3"}, "re-created service seen")

        # The whole root goes, and comes back.
        await call(client.delete, unique_path, recursive=True)
        await run.until(lambda f: len(f.snapshot) == 0, "everything gone with the root")
        await call(client.create, f"{svc}/i4", plain_record("10.10.0.4", 80), makepath=True)
        await run.until(lambda f: ids(f, "svc") == {"i4"}, "re-created root seen")
        assert upstream.watches() == {("recursive", unique_path)}
        assert run.fold.redundant == []


async def test_dubbo_providers_directory_comes_and_goes(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    upstream = make_upstream(zookeeper.address, (unique_path, "dubbo"))
    interface = f"{unique_path}/{DUBBO_SERVICE}"
    provider = f"{interface}/providers/{dubbo.encode(DUBBO_URL)}"
    async with kazoo(zookeeper.address) as client, running(upstream) as run:
        await call(client.ensure_path, unique_path)
        await run.until(lambda f: f.statuses and f.statuses[-1].connected, "connected")
        # The interface's znode first, with only consumers: no service yet.
        consumer = dubbo.encode(f"consumer://10.0.0.9/{DUBBO_SERVICE}?side=consumer")
        await call(client.create, f"{interface}/consumers/{consumer}", b"", makepath=True)
        await call(client.create, provider, b"10.0.0.1", makepath=True)
        await run.until(lambda f: DUBBO_SERVICE in f.snapshot, "provider seen")

        await call(client.delete, f"{interface}/providers", recursive=True)
        await run.until(lambda f: DUBBO_SERVICE not in f.snapshot, "providers directory gone")
        await call(client.create, provider, b"10.0.0.1", makepath=True)
        await run.until(lambda f: DUBBO_SERVICE in f.snapshot, "provider back")
        await call(client.delete, interface, recursive=True)
        await run.until(lambda f: DUBBO_SERVICE not in f.snapshot, "interface gone")
        assert run.fold.redundant == []


async def test_chroot_in_the_connect_string(
    zookeeper: ZooKeeperServer, unique_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.zookeeper")
    upstream = make_upstream(f"{zookeeper.address}{unique_path}", ("/services", "plain"))
    async with kazoo(zookeeper.address) as client, running(upstream) as run:
        await call(client.create, f"{unique_path}/services/svc/i1", plain_record("10.11.0.1", 80),
                   makepath=True)  # fmt: skip
        await call(client.create, f"{unique_path}/services/svc/bad", b"garbage")
        await run.until(lambda f: ids(f, "svc") == {"i1"}, "registration under the chroot seen")
        seen = run.fold.instances("svc")["i1"]
        assert seen.source is not None and seen.source.key == "svc/i1"
        assert upstream.watches() == {("recursive", "/services")}
        assert f"{unique_path}/services" in await call(data_watches, zookeeper)
        # Paths in logs are as the configuration spells them, chroot-relative.
        assert [vars(r).get("path") for r in caplog.records] == ["/services/svc/bad"]


async def test_changes_racing_the_listing_converge_and_never_go_back(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """Writes pipelined while the adapter lists a big directory: the end state is
    exact, no change is told twice, and no instance's revision ever goes back
    (an answer an event overtook never wins)."""
    svc = f"{unique_path}/svc"
    count = 400
    async with kazoo(zookeeper.address) as client:
        await call(client.ensure_path, svc)

        def preload() -> None:
            for result in [
                client.create_async(f"{svc}/i{n}", plain_record("10.12.0.1", 1000))
                for n in range(count)
            ]:
                result.get()

        await trio.to_thread.run_sync(preload)
        upstream = make_upstream(zookeeper.address, (unique_path, "plain"))

        def churn() -> None:
            results = []
            for n in range(count):
                if n % 4 == 0:
                    results.append(client.delete_async(f"{svc}/i{n}"))
                else:
                    for port in (1001, 1002, 1003):
                        results.append(
                            client.set_async(f"{svc}/i{n}", plain_record("10.12.0.1", port))
                        )
                if n % 10 == 0:
                    results.append(
                        client.create_async(f"{svc}/new{n}", plain_record("10.12.0.2", 7))
                    )
            for result in results:
                result.get()

        async with running(upstream) as run:
            await trio.to_thread.run_sync(churn)
            expected = {f"i{n}" for n in range(count) if n % 4} | {
                f"new{n}" for n in range(0, count, 10)
            }
            await run.until(
                lambda f: (
                    not f.stale
                    and ids(f, "svc") == expected
                    and all(
                        i.port == 1003 for k, i in f.instances("svc").items() if k.startswith("i")
                    )
                ),
                "converged",
                timeout=30,
            )
        assert run.fold.redundant == []
        last: dict[str, int] = {}
        for event in run.fold.events:
            puts = (
                event.instances
                if isinstance(event, Listing)
                else [c.instance for c in event.changes if isinstance(c, Put)]
                if isinstance(event, Changed)
                else []
            )
            for instance in puts:
                assert instance.source is not None
                revision = instance.source.revision
                assert revision >= last.get(instance.instance_id, 0), instance
                last[instance.instance_id] = revision


async def test_a_znode_written_faster_than_a_round_trip_still_moves_forward(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """Pipelined writes to one znode overtake every read the adapter sends; it
    still shows newer values while they go on (never an older one), and ends
    on the last."""
    hot = f"{unique_path}/svc/hot"
    writes = 2000
    upstream = make_upstream(zookeeper.address, (unique_path, "plain"))
    async with kazoo(zookeeper.address) as client, running(upstream) as run:
        await call(client.create, hot, plain_record("10.13.0.1", 1), makepath=True)
        await run.until(lambda f: ids(f, "svc") == {"hot"} and not f.stale, "listed")

        def churn() -> None:
            pending = [
                client.set_async(hot, plain_record("10.13.0.1", port))
                for port in range(2, writes + 2)
            ]
            for result in pending:
                result.get()

        await trio.to_thread.run_sync(churn)
        await run.until(lambda f: f.instances("svc")["hot"].port == writes + 1, "last write")
        ports = [
            change.instance.port
            for event in run.fold.events
            if isinstance(event, Changed)
            for change in event.changes
            if isinstance(change, Put)
        ]
        assert ports == sorted(ports), "an older value came after a newer one"
        assert len(ports) > 2, "nothing shown between the first value and the last"
        assert run.fold.redundant == []


@pytest.mark.parametrize(
    ("hosts", "servers", "chroot"),
    [
        ("127.0.0.1:2181", (("127.0.0.1", 2181),), ""),
        ("zk1, zk2:2182/app/", (("zk1", 2181), ("zk2", 2182)), "/app"),
        ("[::1]:2181,[fe80::1]/a/b", (("::1", 2181), ("fe80::1", 2181)), "/a/b"),
    ],
)
def test_connect_strings(hosts: str, servers: tuple[tuple[str, int], ...], chroot: str) -> None:
    config = make_upstream(hosts, ("/r", "plain")).config
    assert (config.servers, config.chroot) == (servers, chroot)


@pytest.mark.parametrize("hosts", ["h:99999", "h:x", ":2181", "h:1,", "h:1/a//b", "h:1/.."])
def test_bad_connect_strings_name_the_key(hosts: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream 'zk-test': key 'hosts' is not a connect"):
        make_upstream(hosts, ("/r", "plain"))
