"""Dispatcher shards on a real membership store: who owns what, handovers, crashes, outages.

Three Dispatchers (in-process gateways, and one ``zkgate serve`` process where a test must
``kill -9`` it) register in a real ZooKeeper or a real etcd (every scenario runs on both), fan
in a registry kept in that same server (the ZooKeeper adapter, or the etcd adapter, plain
layout), and two Meta Servers read the same store. What users rely on:

* the shards split the catalog between them, and each loads only its own services upstream;
* a joining shard takes about 1/(K+1) of the services, and no service is ever left without a
  shard that serves it *with its data loaded* (the new owner warms before the old one lets go);
* a shard killed with SIGKILL loses its services to the survivors within the session (lease)
  timeout plus one second, and a subscriber that was on it ends up on the new owner with every
  change, including those made while it moved;
* a subscriber on a shard that hands its service over follows the Redirect without missing a
  change and without ever seeing its endpoints shrink;
* after the store itself is killed and restarted, the assignment comes back, and everybody
  (shards and Meta Servers) agrees on it again.

The handover rule itself is pinned down first, on the in-process store, where each step can be
driven by hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from dispatcher import wire
from dispatcher.config import parse_config
from dispatcher.gateway import Gateway, run_gateway
from dispatcher.sharding.assignment import assign
from dispatcher.sharding.membership import (
    MembershipConfig,
    MemoryMembership,
    MemoryStore,
    Registration,
)
from dispatcher.sharding.ownership import ShardedOwnership
from dispatcher.sharding.wiring import ShardWiring
from metaserver.server import MetaServer
from tests.servers import EtcdServer, ServerFactory, ZkgateServer, ZooKeeperServer, free_port
from tests.test_metaserver import (
    TOKEN,
    MetaProcess,
    WireClient,
    connected,
    meta_config_text,
    store_handle,
)
from tests.waiting import until

TIMEOUT = 20
SESSION = 2.0
"""Session timeout / lease TTL the shards register with (ZooKeeper grants 0.4 s to 4 s here)."""


# ---------------------------------------------------------------- the handover rule


def pick(services: Iterable[str], owner_of: Callable[[str], str], member: str) -> list[str]:
    return sorted(s for s in services if owner_of(s) == member)


def wiring(gateway: Gateway) -> ShardWiring:
    """The gateway's shard wiring (every gateway these tests start is a shard)."""
    assert gateway.sharding is not None
    return gateway.sharding


class ListeningMetaServer(MetaServer):
    """An in-process Meta Server, with the loopback address it serves on."""

    address: str


async def test_old_owner_serves_until_the_new_owner_is_warm() -> None:
    store = MemoryStore()
    services = [f"svc-{i:02d}" for i in range(20)]
    store.add_services(services)
    a_reg = Registration("a", "10.0.0.1:7000", "10.0.0.1:2181")
    b_reg = Registration("b", "10.0.0.2:7000", "10.0.0.2:2181")
    async with trio.open_nursery() as nursery:
        a_store, b_store = MemoryMembership(store), MemoryMembership(store)
        a = ShardedOwnership("a", a_store)
        b = ShardedOwnership("b", b_store)
        b_loaded: set[str] = set()
        b.set_loaded_probe(b_loaded.__contains__)
        a_calls: list[int] = []
        a.add_listener(lambda: a_calls.append(a.epoch))
        a_store.register(a_reg)
        await nursery.start(a_store.run)
        await nursery.start(a.run)
        await until(lambda: all(a.owns(s) for s in services), "a owns everything", TIMEOUT)
        assert a.interest == set(services)

        b_scope = trio.CancelScope()

        async def run_b(*, task_status: Any) -> None:
            with b_scope:
                b_store.register(b_reg)
                await b_store.run(task_status=task_status)

        await nursery.start(run_b)
        await nursery.start(b.run)
        await until(
            lambda: b.epoch == a.epoch == store.epoch and bool(b.warming), "b warming", TIMEOUT
        )
        moving = sorted(b.warming)
        moved_at = b.epoch
        assert b.view is not None and b.view.inputs_epoch == store.inputs_epoch
        b_assignment = b.assignment
        assert b_assignment is not None
        assert moving == pick(services, lambda s: b_assignment.owners[s], "b")
        for service in moving:
            # B loads it, A keeps serving it and sends nobody to B yet.
            assert not b.owns(service)
            assert b.owner_of(service) == wire.Owner("a", "10.0.0.1:7000", "10.0.0.1:2181")
            assert a.owns(service) and service in a.interest and service in b.interest
        assert a.outgoing == set(moving)
        assert "b" not in store.warm  # not warm: nothing it owns is loaded

        # Half loaded: still nothing moves (the warm marker is per member, all or nothing).
        b_loaded.update(moving[: len(moving) // 2])
        b.loaded_changed()
        # Both shards and the store run in this process: once every task has reacted to
        # the wake-up and waits again, a warm marker would already be in the store.
        await trio.testing.wait_all_tasks_blocked()
        assert "b" not in store.warm and a.outgoing == set(moving)
        # B serves what it has loaded (A still does too: both, never neither).
        assert b.owns(moving[0]) and not b.owns(moving[-1]) and b.epoch == moved_at
        assert a.owns(moving[0]) and a.owns(moving[-1])

        calls = len(a_calls)
        b_loaded.update(moving)
        b.loaded_changed()
        await until(lambda: not a.outgoing, "a hands over everything b loaded", TIMEOUT)
        assert store.warm["b"] == store.inputs_epoch  # the marker names the inputs it covers
        # A told its subscription server to redirect, at a newer epoch than the move's (the
        # marker is an epoch change): its Redirects outrank B's earlier ones back to A.
        assert len(a_calls) > calls and a_calls[-1] > moved_at
        for service in moving:
            assert b.owns(service) and not a.owns(service)
            assert a.owner_of(service) == wire.Owner("b", "10.0.0.2:7000", "10.0.0.2:2181")
            assert service not in a.interest
        assert a.interest | b.interest == set(services) and not a.interest & b.interest

        # A brand-new name: its fallback owner serves it at once and catalogs it; the other
        # shard sends its subscribers there.
        assert a.assignment is not None
        fallback = a.assignment.owner("brand-new").id
        owner, bystander = (a, b) if fallback == "a" else (b, a)
        assert not bystander.owns("brand-new") and "brand-new" not in store.catalog
        sent_to = bystander.owner_of("brand-new")
        assert sent_to is not None and sent_to.id == fallback
        assert owner.owns("brand-new") and "brand-new" in store.catalog
        assert "brand-new" in owner.interest

        # B leaves: its services come back to A, which has nobody to wait for.
        b_scope.cancel()
        await until(lambda: all(a.owns(s) for s in services), "a owns everything again", TIMEOUT)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- real stores


@attrs.define
class Registry:
    """The registry the shards fan in, kept in the same server as the membership."""

    kind: str
    address: str
    root: str
    _client: Any = None

    def upstream(self) -> dict[str, Any]:
        if self.kind == "zookeeper":
            return {"name": "reg", "kind": "zookeeper", "hosts": self.address,
                    "session_timeout": 4.0,
                    "roots": [{"path": self.root, "layout": "plain"}]}  # fmt: skip
        return {"name": "reg", "kind": "etcd", "endpoint": self.address,
                "prefixes": [{"prefix": self.root + "/", "layout": "plain"}]}  # fmt: skip

    def _connect(self) -> Any:
        if self._client is None:
            if self.kind == "zookeeper":
                from kazoo.client import KazooClient

                self._client = KazooClient(hosts=self.address)
                self._client.start(timeout=10)
            else:
                import etcd3

                host, port = self.address.rsplit(":", 1)
                self._client = etcd3.client(host, int(port), timeout=5)
        return self._client

    def put(self, service: str, port: int) -> None:
        """Register instance ``i<port>`` of ``service`` (blocking; run it in a thread)."""
        client = self._connect()
        data = json.dumps({"host": "10.9.0.1", "port": port}).encode()
        if self.kind == "zookeeper":
            client.create(f"{self.root}/{service}/i{port}", data, makepath=True)
        else:
            client.put(f"{self.root}/{service}/i{port}", data)

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        for service, port in items:
            self.put(service, port)

    def close(self) -> None:
        if self._client is not None:
            if self.kind == "zookeeper":
                self._client.stop()
                self._client.close()
            else:
                self._client.close()
            self._client = None


def to_toml(mapping: dict[str, Any]) -> str:
    """Just enough TOML for a gateway configuration."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"

    def is_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    lines = [f"{k} = {value(v)}" for k, v in mapping.items()
             if not isinstance(v, dict) and not is_tables(v)]  # fmt: skip
    for key, table in mapping.items():
        if isinstance(table, dict):
            lines += [f"[{key}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    for key, tables in mapping.items():
        if is_tables(tables):
            for table in tables:
                lines += [f"[[{key}]]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


@attrs.define
class Cluster:
    """Shards, Meta Servers and a registry around one store server, for one test."""

    kind: str
    address: str
    root: str
    tmp: Path
    registry: Registry
    services: list[str]
    nursery: trio.Nursery
    session: float = SESSION
    gateways: dict[str, Gateway] = attrs.field(factory=dict)
    scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)

    def config(self, node: str, *, subscribe_port: int = 0) -> dict[str, Any]:
        return {
            "node_id": node,
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(self.tmp / node)},
            "admin": {"enabled": False},
            "subscriptions": {"listen": f"127.0.0.1:{subscribe_port}", "token": TOKEN},
            "membership": {
                "kind": self.kind,
                "address": self.address,
                "root": self.root,
                "session_timeout": self.session,
            },
            "sharding": {"id": node, "services": self.services},
            "upstream": [self.registry.upstream()],
        }

    async def start(self, node: str) -> Gateway:
        scope = trio.CancelScope()
        self.scopes[node] = scope

        async def run(*, task_status: Any) -> None:
            with scope:
                await run_gateway(parse_config(self.config(node)), task_status=task_status)

        gateway: Gateway = await self.nursery.start(run)
        self.gateways[node] = gateway
        return gateway

    def stop(self, node: str) -> None:
        self.scopes.pop(node).cancel()
        del self.gateways[node]

    async def meta(self) -> ListeningMetaServer:
        handle = store_handle(self.kind, self.address, self.root, self.session)
        server = ListeningMetaServer(handle, token=TOKEN)
        await self.nursery.start(server.store.run)
        await self.nursery.start(server.run)
        port = await self.nursery.start(server.serve, "127.0.0.1", 0)
        server.address = f"127.0.0.1:{port}"
        return server

    def owned(self) -> dict[str, set[str]]:
        return {
            node: {s for s in self.services if wiring(g).ownership.owns(s)}
            for node, g in self.gateways.items()
        }

    def settled(self, members: int | None = None) -> bool:
        """Every shard at one epoch with ``members`` members, nothing warming or outgoing,
        the catalog split exactly."""
        ownerships = [wiring(g).ownership for g in self.gateways.values()]
        views = [o.view for o in ownerships if o.view is not None and o.view.connected]
        if len(views) != len(ownerships):
            return False
        epochs = {o.epoch for o in ownerships}
        count = len(self.gateways) if members is None else members
        if len(epochs) != 1 or any(len(v.members) != count for v in views):
            return False
        if any(o.warming or o.outgoing or not o.marked for o in ownerships):
            return False
        if any(set(v.catalog) != set(self.services) for v in views):
            return False
        owned = self.owned().values()
        return sum(map(len, owned)) == len(self.services) and set().union(*owned) == set(
            self.services
        )

    async def wait(
        self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT
    ) -> None:
        try:
            await until(condition, what, timeout, poll=0.02)
            return
        except AssertionError:
            pass  # raised again below, with each shard's state in the message
        states = []
        for node, gateway in self.gateways.items():
            o = wiring(gateway).ownership
            view = o.view
            states.append(
                f"{node}: epoch={o.epoch} members={[m.id for m in view.members] if view else None}"
                f" warm={dict(view.warm) if view else None} warming={len(o.warming)}"
                f" outgoing={len(o.outgoing)} catalog={len(view.catalog) if view else None}"
            )
        raise AssertionError(f"timed out after {timeout}s waiting for: {what}; {'; '.join(states)}")


def loaded_in(gateway: Gateway, service: str) -> bool:
    """The gateway's snapshot holds the service's instances (each test service has one)."""
    return bool(gateway.fanin.snapshot.full(service).instances)


@pytest.fixture(params=["zookeeper", "etcd"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def cluster(
    kind: str, server: ZooKeeperServer | EtcdServer, root: str, tmp: Path, n_services: int,
    *, session: float = SESSION,
) -> AsyncIterator[Cluster]:  # fmt: skip
    registry = Registry(kind, server.address, root + "/registry")
    services = [f"svc-{i:03d}" for i in range(n_services)]
    await trio.to_thread.run_sync(registry.put_many, [(s, 10000 + i) for i, s in
                                                      enumerate(services)])  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            yield Cluster(kind, server.address, root + "/shards", tmp, registry, services,
                          nursery, session)  # fmt: skip
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(registry.close)


def store_of(request: pytest.FixtureRequest, kind: str) -> ZooKeeperServer | EtcdServer:
    server = request.getfixturevalue(kind)
    assert isinstance(server, ZooKeeperServer | EtcdServer)
    return server


async def test_shards_split_the_catalog_and_load_only_their_own(
    store_kind: str, request: pytest.FixtureRequest, unique_path: str, tmp_path: Path
) -> None:
    server = store_of(request, store_kind)
    async with cluster(store_kind, server, unique_path, tmp_path, 24) as c:
        for node in ("d1", "d2", "d3"):
            await c.start(node)
        meta = await c.meta()
        await c.wait(c.settled, "three shards settled")
        owned = c.owned()
        view = wiring(c.gateways["d1"]).ownership.view
        assert view is not None
        members = view.members
        epoch = wiring(c.gateways["d1"]).ownership.epoch
        reference = assign(c.services, members, epoch=epoch)
        for node, gateway in c.gateways.items():
            assert owned[node] == reference.services_of(node)
            # Loaded upstream: exactly its own services, and the data is there.
            await c.wait(lambda g=gateway, n=node: set(g.fanin.snapshot) == owned[n], "loaded")
            assert gateway.fanin.interest == owned[node]
            assert all(loaded_in(gateway, s) for s in owned[node])
        await meta.wait_epoch(epoch)
        async with connected(meta.address) as client:
            answer = await client.lookup(c.services)
        assert answer.epoch >= epoch  # warm markers move it on; they move no service
        for service, owner in answer.owners.items():
            assert owner is not None and service in owned[owner.id]
            gateway = c.gateways[owner.id]
            assert owner.subscribe_address == f"127.0.0.1:{gateway.subscription_port}"
            assert owner.zookeeper_address == f"127.0.0.1:{gateway.port}"


async def test_a_join_moves_about_one_share_and_never_leaves_a_service_unserved(
    store_kind: str, request: pytest.FixtureRequest, unique_path: str, tmp_path: Path
) -> None:
    server = store_of(request, store_kind)
    async with cluster(store_kind, server, unique_path, tmp_path, 60) as c:
        for node in ("d1", "d2", "d3"):
            await c.start(node)
        await c.wait(c.settled, "three shards settled")
        await c.wait(lambda: all(loaded_in(c.gateways[n], s) for n, owned in c.owned().items()
                                 for s in owned), "all loaded")  # fmt: skip
        before = {s: n for n, owned in c.owned().items() for s in owned}
        unserved: list[tuple[float, list[str]]] = []
        cold: list[tuple[str, str]] = []

        def check() -> None:
            # Called inside every shard's ownership listener: the moment answers change.
            missing = [
                s for s in c.services
                if not any(wiring(g).ownership.owns(s) and loaded_in(g, s)
                           for g in c.gateways.values())
            ]  # fmt: skip
            if missing:
                unserved.append((time.monotonic(), missing))
            # And nobody serves a service it has not loaded.
            cold.extend(
                (node, s) for node, g in c.gateways.items() for s in c.services
                if wiring(g).ownership.owns(s) and not loaded_in(g, s)
            )  # fmt: skip

        for gateway in c.gateways.values():
            wiring(gateway).ownership.add_listener(check)
        joined = await c.start("d4")
        wiring(joined).ownership.add_listener(check)
        with trio.fail_after(TIMEOUT):
            while not c.settled(4):
                check()
                await trio.sleep(0.005)
        check()
        assert unserved == []
        assert cold == []
        after = {s: n for n, owned in c.owned().items() for s in owned}
        moved = {s for s in c.services if before[s] != after[s]}
        ownership = wiring(joined).ownership
        assert ownership.assignment is not None and ownership.view is not None
        members = ownership.view.members
        reference_before = assign(c.services, [m for m in members if m.id != "d4"])
        assert moved == reference_before.moved(ownership.assignment)
        share = len(c.services) / 4
        assert 0.5 * share <= len(moved) <= 1.5 * share, (len(moved), share)
        # Mostly to the new shard; the rest is the bounded-load cascade
        # (dispatcher.sharding.assignment).
        assert sum(after[s] == "d4" for s in moved) >= 0.75 * len(moved)
        for node, gateway in c.gateways.items():
            owned = c.owned()[node]
            await c.wait(lambda g=gateway, o=owned: set(g.fanin.snapshot) == o, "unloaded")


# ------------------------------------------------------------ subscribers that move


@attrs.define
class Follower:
    """One proxy's subscription to one service: follows Redirects, and after a lost
    connection asks the Meta Server again. Keeps every state it went through."""

    service: str
    meta: str
    address: str | None = None
    instances: dict[str, wire.WireInstance] = attrs.field(factory=dict)
    #: (trio time, instance ids) after every message.
    states: list[tuple[float, frozenset[str]]] = attrs.field(factory=list)
    servers: list[str] = attrs.field(factory=list)
    redirects: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> None:
        while True:
            if self.address is None:
                async with connected(self.meta) as meta:
                    owner = (await meta.lookup([self.service])).owners[self.service]
                self.address = owner.subscribe_address if owner else None
            if self.address is None:
                await trio.sleep(0.05)
                continue
            try:
                await self._follow(self.address)
            except (OSError, trio.BrokenResourceError, EOFError):
                self.address = None
                await trio.sleep(0.05)

    async def _follow(self, address: str) -> None:
        client = await WireClient.connect(address, hello=False)
        try:
            await client.send(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "follower"))
            welcome = await client.wire.receive()
            assert isinstance(welcome, wire.Welcome), welcome
            await client.send(wire.Subscribe({self.service: None}))
            while True:
                message = await client.wire.receive()
                if isinstance(message, wire.Full):
                    self.instances = {i.id: i for i in message.instances}
                    self.servers.append(welcome.server_id)
                elif isinstance(message, wire.Deltas):
                    for instance in message.upserted:
                        self.instances[instance.id] = instance
                    for gone in message.removed:
                        self.instances.pop(gone, None)
                elif isinstance(message, wire.Redirect):
                    self.redirects += 1
                    self.address = message.owner.subscribe_address if message.owner else None
                    return
                else:
                    raise AssertionError(f"unexpected {message!r}")
                self.states.append((trio.current_time(), frozenset(self.instances)))
                self.changed.set()
                self.changed = trio.Event()
        finally:
            await client.aclose()

    async def wait_for(self, ids: set[str]) -> None:
        with trio.move_on_after(TIMEOUT):
            while set(self.instances) != ids:
                await self.changed.wait()
        held = set(self.instances)
        assert held == ids, (
            f"{self.service} after {TIMEOUT}s: missing {sorted(ids - held)}, "
            f"extra {sorted(held - ids)}, servers {self.servers}, redirects {self.redirects}"
        )

    def lagged(self, written: dict[str, float], bound: float = 0.5) -> list[tuple[float, set[str]]]:
        """States that lack an instance the registry had held for more than ``bound``
        seconds (instances are only ever added in these tests).

        Two shards read the registry through their own watches, so at a move the new owner's
        first Full may trail the old owner's last delta by the registry's watch delay (a few
        milliseconds); a cold or partial load would trail by everything.
        """
        return [
            (at, missing)
            for at, state in self.states
            if (missing := {i for i, t in written.items() if t < at - bound} - state)
        ]


def endpoint(port: int) -> str:
    return f"10.9.0.1:{port}"


async def test_a_subscriber_follows_a_handover_without_missing_a_change(
    store_kind: str, request: pytest.FixtureRequest, unique_path: str, tmp_path: Path
) -> None:
    server = store_of(request, store_kind)
    async with cluster(store_kind, server, unique_path, tmp_path, 30) as c:
        for node in ("d1", "d2", "d3"):
            await c.start(node)
        meta = await c.meta()
        await c.wait(c.settled, "three shards settled")
        # A service that d4 will take: what the assignment with d4 would give it.
        ownership = wiring(c.gateways["d1"]).ownership
        assert ownership.view is not None
        members = [*ownership.view.members, Registration("d4").member()]
        service = next(s for s in c.services if assign(c.services, members).owners[s] == "d4")
        port0 = 10000 + c.services.index(service)
        follower = Follower(service, meta.address)
        c.nursery.start_soon(follower.run)
        await follower.wait_for({endpoint(port0)})
        first_server = follower.servers[-1]

        written = {endpoint(port0): 0.0}
        stop, stopped = trio.Event(), trio.Event()

        async def writer() -> None:
            port = 30000
            try:
                while not stop.is_set():
                    await trio.to_thread.run_sync(c.registry.put, service, port)
                    written[endpoint(port)] = trio.current_time()
                    port += 1
                    await trio.sleep(0.02)
            finally:
                stopped.set()

        c.nursery.start_soon(writer)
        await c.start("d4")
        # A subscriber that arrives during the move: the Meta Server names d4 at once, and d4
        # must not serve it before it has the service loaded.
        newcomer = Follower(service, meta.address)
        c.nursery.start_soon(newcomer.run)
        await c.wait(lambda: c.settled(4) and follower.servers[-1] != first_server, "moved")
        # A few more changes after the move, written while both subscribers follow d4.
        more = len(written) + 5
        await c.wait(lambda: len(written) >= more, "five more changes after the move")
        stop.set()
        # A put may be in flight: it reaches the subscribers before the writer records it,
        # so the expected set is only complete once the writer has finished.
        await stopped.wait()
        for subscriber in (follower, newcomer):
            await subscriber.wait_for(set(written))
            assert subscriber.servers[-1].startswith("d4/")
            assert subscriber.lagged(written) == []
        assert follower.redirects >= 1


async def test_kill_9_moves_its_services_within_the_timeout_plus_one_second(
    store_kind: str,
    request: pytest.FixtureRequest,
    unique_path: str,
    tmp_path: Path,
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    server = store_of(request, store_kind)
    async with cluster(store_kind, server, unique_path, tmp_path, 24) as c:
        for node in ("d1", "d2"):
            await c.start(node)
        # The victim is a real `zkgate serve` process: SIGKILL leaves no goodbye.
        subscribe_port = free_port()
        config_file = tmp_path / "victim.toml"
        mapping = c.config("victim", subscribe_port=subscribe_port)
        del mapping["zookeeper"]
        config_file.write_text(to_toml(mapping))
        victim = zkgate_factory(["--config", str(config_file), "--admin-listen", "off"])
        meta_process = MetaProcess(meta_config_text(store_kind, c.address, c.root),
                                   base_dir=tmp_path / "meta-process")  # fmt: skip
        meta = await c.meta()
        meta_process.start()
        addresses = [meta_process.address, meta.address]
        try:
            ownerships = [wiring(g).ownership for g in c.gateways.values()]

            def victim_serving() -> bool:
                epoch = ownerships[0].epoch
                return all(
                    o.view is not None and len(o.view.members) == 3 and o.epoch == epoch
                    and not o.warming and not o.outgoing and "victim" in o.view.warm
                    for o in ownerships
                )  # fmt: skip

            await c.wait(victim_serving, "the victim joined and is warm")
            ownership = ownerships[0]
            assert ownership.assignment is not None
            theirs = ownership.assignment.services_of("victim")
            assert theirs
            service = min(theirs)
            follower = Follower(service, addresses[0])
            c.nursery.start_soon(follower.run)
            port0 = 10000 + c.services.index(service)
            await follower.wait_for({endpoint(port0)})
            assert follower.servers[-1].startswith("victim/")

            victim.kill()
            killed = time.monotonic()
            # A change while nobody serves the service: the new owner must have it.
            await trio.to_thread.run_sync(c.registry.put, service, 31000)
            written = {endpoint(port0): 0.0, endpoint(31000): trio.current_time()}
            await c.wait(lambda: all(any(wiring(g).ownership.owns(s)
                                         for g in c.gateways.values()) for s in theirs),
                         "survivors own the victim's services", timeout=c.session + 5)  # fmt: skip
            took = time.monotonic() - killed
            assert took <= c.session + 1.0, f"{took:.2f}s after SIGKILL"
            await c.wait(c.settled, "two shards settled")
            await trio.to_thread.run_sync(c.registry.put, service, 31001)
            written[endpoint(31001)] = trio.current_time()
            await follower.wait_for(set(written))
            assert follower.lagged(written) == []
            assert follower.servers[-1].split("/")[0] in ("d1", "d2")
            # Both Meta Servers answer the survivors' assignment, at the same epoch.
            epoch = ownership.epoch
            answers = []
            for address in addresses:
                with trio.fail_after(TIMEOUT):
                    while True:
                        async with connected(address) as client:
                            answer = await client.lookup(c.services)
                        if answer.epoch >= epoch:
                            break
                        await trio.sleep(0.05)
                answers.append(answer)
            assert answers[0] == answers[1]
            owned = c.owned()
            assert {s: o.id for s, o in answers[0].owners.items() if o} == {
                s: n for n, ss in owned.items() for s in ss}  # fmt: skip
        finally:
            meta_process.close()


@pytest.mark.parametrize("kind", ["zookeeper", "etcd"])
async def test_assignments_recover_after_the_store_restarts(
    kind: str,
    request: pytest.FixtureRequest,
    unique_path: str,
    tmp_path: Path,
) -> None:
    factory = request.getfixturevalue(f"{kind}_factory")
    server = factory()
    async with cluster(kind, server, unique_path, tmp_path, 18, session=4.0) as c:
        for node in ("d1", "d2", "d3"):
            await c.start(node)
        meta = await c.meta()
        await c.wait(c.settled, "three shards settled")
        before = c.owned()
        await trio.to_thread.run_sync(server.kill)
        views = [wiring(g).ownership.view for g in c.gateways.values()]

        def everyone_saw_the_outage() -> bool:
            feeds = [wiring(g).store.feed.view for g in c.gateways.values()]
            return all(view is not None and not view.connected for view in feeds)

        await c.wait(everyone_saw_the_outage, "everyone saw the outage")
        assert all(v is not None for v in views)
        # The last view stays served meanwhile.
        assert c.owned() == before
        async with connected(meta.address) as client:
            stale = await client.lookup(c.services)
        assert all(o is not None for o in stale.owners.values())
        await trio.to_thread.run_sync(server.start)
        # The test's own writer may have lost its session in the outage (kazoo
        # gives up reconnecting while the server is dead): write through a new one.
        await trio.to_thread.run_sync(c.registry.close)
        await c.wait(c.settled, "settled again", timeout=TIMEOUT + 10)
        assert c.owned() == before
        epoch = wiring(c.gateways["d1"]).ownership.epoch
        await meta.wait_epoch(epoch)
        # And the store is followed again: a new service is cataloged and loaded.
        new = "svc-after-restart"
        await trio.to_thread.run_sync(c.registry.put, new, 32000)
        c.services.append(new)
        wiring(c.gateways["d1"]).store.add_services([new])
        await c.wait(c.settled, "new service assigned")
        owner = next(n for n, owned in c.owned().items() if new in owned)
        await c.wait(lambda: loaded_in(c.gateways[owner], new), "new service loaded")
        async with connected(meta.address) as client:
            answer = await client.lookup([new])
        assert answer.owners[new] is not None and answer.owners[new].id == owner


def test_membership_config_is_checked() -> None:
    for table, message in [
        ({"kind": "consul"}, "membership.kind"),
        ({"kind": "zookeeper"}, "membership.address"),
        ({"kind": "etcd", "address": "h"}, "membership.address"),
        ({"kind": "memory", "root": "rel"}, "membership.root"),
        ({"kind": "memory", "session_timeout": 0}, "membership.session_timeout"),
        ({"kind": "memory", "bogus": 1}, "membership.bogus"),
    ]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            MembershipConfig.from_table(table)
    base = {"membership": {"kind": "memory"}, "sharding": {}}
    assert parse_config(base).dispatcher.interest == "subscribed"
    for data, message in [
        ({"sharding": {}}, "sharding: needs a \\[membership\\]"),
        ({**base, "dispatcher": {"interest": "all"}}, "dispatcher.interest"),
        ({**base, "sharding": {"weight": 0}}, "sharding.weight"),
        ({**base, "sharding": {"balance": 0.9}}, "sharding.balance"),
        ({**base, "sharding": {"id": "a/b"}}, "sharding.id"),
        ({**base, "sharding": {"subscribe_address": "nope"}}, "sharding.subscribe_address"),
        ({**base, "sharding": {"services": ["ok", 3]}}, "sharding.services"),
        ({**base, "projection": [{"root": "/p", "layout": "plain"}]}, "projection:"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_config(data)
