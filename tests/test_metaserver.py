"""The Meta Server, over real TCP, as a proxy sees it; and two of them on real stores.

Protocol behaviour runs on the in-process membership store (fast, exact). Agreement runs on
real ZooKeeper and real etcd: two ``zkgate meta`` processes (the command line users run) read
the same store while members join, leave and die and the catalog grows, and after every step
both answer with the same epoch and the same owners, which are what
:func:`dispatcher.sharding.assignment.assign` gives for that membership.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dispatcher import wire
from dispatcher.sharding.assignment import assign
from dispatcher.sharding.membership import (
    EtcdMembership,
    MembershipConfig,
    MembershipStore,
    MemoryMembership,
    MemoryStore,
    Registration,
    ZooKeeperMembership,
)
from metaserver.cli import MetaConfig, parse_meta_config, run_meta
from metaserver.server import MetaLimits, MetaServer
from tests.servers import REPO_ROOT, EtcdServer, ServerProcess, ZooKeeperServer, free_port

TOKEN = "meta-token"
TIMEOUT = 15


# ------------------------------------------------------------------ a wire client


class WireClient:
    """A proxy's side of one connection (frames in, typed messages out)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.wire = wire.WireStream(stream)

    @classmethod
    async def connect(cls, address: str, *, token: str = TOKEN, hello: bool = True) -> WireClient:
        host, port = address.rsplit(":", 1)
        client = cls(await trio.open_tcp_stream(host, int(port)))
        if hello:
            await client.send(wire.Hello(wire.PROTOCOL_VERSION, token, "test-proxy"))
            welcome = await client.receive()
            assert isinstance(welcome, wire.Welcome), welcome
        return client

    async def send(self, message: wire.Message) -> None:
        await self.wire.send(message)

    async def receive(self) -> wire.Message:
        with trio.fail_after(TIMEOUT):
            return await self.wire.receive()

    async def lookup(self, services: Iterable[str]) -> wire.Assignment:
        await self.send(wire.Lookup(tuple(services)))
        answer = await self.receive()
        assert isinstance(answer, wire.Assignment), answer
        return answer

    async def closed(self) -> bool:
        """True once the server has closed the connection (reads until EOF)."""
        with trio.fail_after(TIMEOUT):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def connected(address: str, **kwargs: Any) -> AsyncIterator[WireClient]:
    client = await WireClient.connect(address, **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


def expected(catalog: Iterable[str], registrations: Iterable[Registration], epoch: int,
             services: Iterable[str]) -> dict[str, str | None]:  # fmt: skip
    """Owner id per service as assign() computes it (None without members)."""
    members = [r.member() for r in registrations]
    if not members:
        return dict.fromkeys(services)
    result = assign(catalog, members, epoch=epoch)
    return {s: result.owner(s).id for s in services}


def ids(answer: wire.Assignment) -> dict[str, str | None]:
    return {s: (o.id if o is not None else None) for s, o in answer.owners.items()}


def reg(member_id: str, weight: float = 1.0) -> Registration:
    n = sum(map(ord, member_id)) % 200
    return Registration(member_id, f"127.0.0.{n + 1}:7000", f"127.0.0.{n + 1}:2181", weight)


# ------------------------------------------------------------------ in-process


@asynccontextmanager
async def meta_on_memory(
    store: MemoryStore, *, limits: MetaLimits | None = None
) -> AsyncIterator[tuple[MetaServer, str]]:
    config = MetaConfig(MembershipConfig("memory"), TOKEN, "127.0.0.1:0", "meta-a",
                        limits=limits or MetaLimits())  # fmt: skip
    async with trio.open_nursery() as nursery:
        server, port = await nursery.start(
            functools.partial(run_meta, config, membership=MemoryMembership(store))
        )
        await server.wait_epoch(store.epoch)
        yield server, f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def members(store: MemoryStore, *registrations: Registration) -> AsyncIterator[None]:
    """Keep ``registrations`` joined (each as its own handle) while the block runs."""
    async with trio.open_nursery() as nursery:
        for registration in registrations:
            handle = MemoryMembership(store)
            handle.register(registration)
            await nursery.start(handle.run)
        yield
        nursery.cancel_scope.cancel()


SERVICES = [f"svc-{i:02d}" for i in range(40)]


async def test_lookup_answers_assign_for_cataloged_and_fallback_for_new_services() -> None:
    store = MemoryStore()
    store.add_services(SERVICES)
    regs = [reg("d1"), reg("d2", 2.0), reg("d3")]
    async with members(store, *regs), meta_on_memory(store) as (server, address):
        await server.wait_epoch(store.epoch)
        async with connected(address) as client:
            wanted = [*SERVICES[:7], "brand-new", SERVICES[3]]
            answer = await client.lookup(wanted)
            assert answer.epoch == store.epoch
            assert list(answer.owners) == list(dict.fromkeys(wanted))  # asked order, once each
            assert ids(answer) == expected(SERVICES, regs, store.epoch, dict.fromkeys(wanted))
            owner = answer.owners[SERVICES[0]]
            assert owner is not None
            registration = next(r for r in regs if r.id == owner.id)
            assert owner == wire.Owner(registration.id, registration.subscribe_address,
                                       registration.zookeeper_address)  # fmt: skip
            # Pipelined: ten lookups in one write, ten answers in order.
            batches = [SERVICES[i : i + 4] for i in range(0, 40, 4)]
            await client.stream.send_all(b"".join(wire.encode(wire.Lookup(tuple(b)))
                                                  for b in batches))  # fmt: skip
            for batch in batches:
                reply = await client.receive()
                assert isinstance(reply, wire.Assignment)
                assert list(reply.owners) == batch


async def test_without_members_every_owner_is_null() -> None:
    store = MemoryStore()
    store.add_services(SERVICES)
    async with meta_on_memory(store) as (_, address), connected(address) as client:
        answer = await client.lookup(["svc-01", "unknown"])
        assert answer.owners == {"svc-01": None, "unknown": None}


async def test_hello_is_required_and_checked() -> None:
    store = MemoryStore()
    async with meta_on_memory(store) as (_, address):
        for first, code in [
            (wire.Lookup(("a",)), "unauthenticated"),
            (wire.Hello(wire.PROTOCOL_VERSION, "wrong", "p"), "unauthenticated"),
            (wire.Hello(wire.PROTOCOL_VERSION + 1, TOKEN, "p"), "unsupported-version"),
        ]:
            client = await WireClient.connect(address, hello=False)
            await client.send(first)
            error = await client.receive()
            assert isinstance(error, wire.Error) and error.code == code, error
            assert await client.closed()
            await client.aclose()


async def test_bad_frames_close_only_their_connection() -> None:
    store = MemoryStore()
    store.add_services(SERVICES)
    limits = MetaLimits(max_frame=4096, max_services=50)
    async with (
        members(store, reg("d1")),
        meta_on_memory(store, limits=limits) as (_, address),
        connected(address) as healthy,
    ):
        for payload in [
            struct.pack(">I", 1 << 20) + b"x",  # oversized frame announced
            struct.pack(">I", 5) + b"{nope",  # not JSON
            wire.encode(wire.Lookup(tuple(f"s{i}" for i in range(51)))),  # too many names
            wire.encode(wire.Subscribe({"svc-01": None})),  # a Dispatcher's message
        ]:
            async with connected(address) as client:
                await client.stream.send_all(payload)
                error = await client.receive()
                assert isinstance(error, wire.Error) and error.code == "bad-request", error
                assert await client.closed()
        answer = await healthy.lookup(["svc-01"])
        assert answer.owners["svc-01"] is not None
        await healthy.send(wire.Ping())
        assert isinstance(await healthy.receive(), wire.Pong)


async def test_connections_beyond_the_limit_are_told_overloaded() -> None:
    store = MemoryStore()
    async with (
        meta_on_memory(store, limits=MetaLimits(max_connections=2)) as (server, address),
        connected(address),
        connected(address),
    ):
        extra = await WireClient.connect(address, hello=False)
        error = await extra.receive()
        assert isinstance(error, wire.Error) and error.code == "overloaded"
        assert await extra.closed()
        await extra.aclose()
        assert server.connections == 2


async def test_lookups_before_the_first_view_are_unavailable_not_fatal() -> None:
    class NeverStarted(MemoryMembership):
        async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            await trio.sleep_forever()

    server = MetaServer(NeverStarted(MemoryStore()), token=TOKEN)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with connected(f"127.0.0.1:{port}") as client:
            await client.send(wire.Lookup(("a",)))
            error = await client.receive()
            assert isinstance(error, wire.Error) and error.code == "unavailable"
            await client.send(wire.Ping())
            assert isinstance(await client.receive(), wire.Pong)
        nursery.cancel_scope.cancel()


async def test_watch_pushes_every_epoch_change_for_the_watched_services() -> None:
    store = MemoryStore()
    store.add_services(SERVICES)
    d1, d2 = reg("d1"), reg("d2")
    async with (
        members(store, d1),
        meta_on_memory(store) as (_, address),
        connected(address) as client,
        connected(address) as everything,
    ):
        await client.send(wire.WatchAssignments(("svc-01", "svc-02")))
        first = await client.receive()
        assert isinstance(first, wire.Assignment)
        assert ids(first) == {"svc-01": "d1", "svc-02": "d1"}
        await client.send(wire.WatchAssignments(("svc-03",)))  # adds to the watch
        second = await client.receive()
        assert isinstance(second, wire.Assignment) and set(second.owners) == {
            "svc-01", "svc-02", "svc-03"}  # fmt: skip
        await everything.send(wire.WatchAssignments(()))
        whole = await everything.receive()
        assert isinstance(whole, wire.Assignment) and set(whole.owners) == set(SERVICES)

        async with members(store, d2):
            pushed = await client.receive()
            assert isinstance(pushed, wire.Assignment) and pushed.epoch > second.epoch
            assert ids(pushed) == expected(SERVICES, [d1, d2], pushed.epoch,
                                           ["svc-01", "svc-02", "svc-03"])  # fmt: skip
            pushed_all = await everything.receive()
            assert isinstance(pushed_all, wire.Assignment)
            assert ids(pushed_all) == expected(SERVICES, [d1, d2], pushed_all.epoch, SERVICES)
            store.add_services(["svc-new"])  # a catalog change is an epoch change too
            grown = await everything.receive()
            assert isinstance(grown, wire.Assignment) and "svc-new" in grown.owners
            assert grown.epoch > pushed_all.epoch
            pushed_again = await client.receive()
            assert isinstance(pushed_again, wire.Assignment) and pushed_again.epoch == grown.epoch


# ------------------------------------------------------------------ configuration


def test_meta_config_names_the_bad_key() -> None:
    good = {"token": "s3cr3t", "membership": {"kind": "zookeeper", "address": "127.0.0.1:2181"}}
    config = parse_meta_config(good, listen="127.0.0.1:7400")
    assert config.membership.kind == "zookeeper" and config.listen == "127.0.0.1:7400"
    assert "s3cr3t" not in repr(config)  # the token stays out of log lines
    for bad, message in [
        ({**good, "token": ""}, "token:"),
        ({**good, "membership": {"kind": "memory"}}, "membership.kind: 'memory'"),
        ({**good, "membership": {"kind": "etcd", "address": "nope"}}, "membership.address"),
        ({**good, "sharding": {"balance": 0.5}}, "sharding.balance"),
        ({**good, "meta": {"max_frame": 0}}, "meta.max_frame"),
        ({**good, "meta": {"listen": "x"}}, "meta.listen"),
        ({**good, "surprise": 1}, "surprise: unknown key"),
    ]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            parse_meta_config(bad)


def test_zkgate_meta_refuses_a_bad_config_with_exit_status_2(tmp_path: Path) -> None:
    config = tmp_path / "meta.toml"
    config.write_text('token = "t"\n[membership]\nkind = "memory"\n')
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "meta", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert "membership.kind" in result.stderr


# ------------------------------------------------------------------ real stores


class MetaProcess(ServerProcess):
    """``zkgate meta`` as its own process; ready when it answers a Ping."""

    kind = "meta"

    def __init__(self, config_text: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config_text = config_text

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _prepare(self) -> None:
        (self.base_dir / "meta.toml").write_text(self.config_text)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "dispatcher", "--log-format", "plain", "meta",
                "--config", str(self.base_dir / "meta.toml"), "--listen", self.address]  # fmt: skip

    def _child_env(self) -> dict[str, str]:
        return {**super()._child_env(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}

    def _is_ready(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "probe")))
                return bool(sock.recv(4))
        except OSError:
            return False


def meta_config_text(kind: str, address: str, root: str, timeout: float = 2.0) -> str:
    return (
        f"token = {json.dumps(TOKEN)}\n[membership]\nkind = {json.dumps(kind)}\n"
        f"address = {json.dumps(address)}\nroot = {json.dumps(root)}\n"
        f"session_timeout = {timeout}\n"
    )


def store_handle(kind: str, address: str, root: str, timeout: float = 2.0) -> MembershipStore:
    if kind == "zookeeper":
        return ZooKeeperMembership(address, root, timeout)
    host, port = address.rsplit(":", 1)
    return EtcdMembership(host, int(port), root, timeout)


@pytest.fixture(params=["zookeeper", "etcd"])
def store_server(request: pytest.FixtureRequest) -> ZooKeeperServer | EtcdServer:
    server = request.getfixturevalue(request.param)
    assert isinstance(server, ZooKeeperServer | EtcdServer)
    return server


def kind_of(server: ZooKeeperServer | EtcdServer) -> str:
    return "zookeeper" if isinstance(server, ZooKeeperServer) else "etcd"


async def agreed(
    addresses: list[str],
    services: list[str],
    at_least: int,
    check: Callable[[wire.Assignment], bool] = lambda a: True,
) -> wire.Assignment:
    """Poll every Meta Server until all answer the same, at ``at_least`` or later, and pass
    ``check``; return that answer."""
    with trio.fail_after(TIMEOUT):
        while True:
            answers = []
            for address in addresses:
                async with connected(address) as client:
                    await client.send(wire.Lookup(tuple(services)))
                    answer = await client.receive()
                # A Meta Server answers "unavailable" until it has read the
                # store once; that is "not yet", not a disagreement.
                if isinstance(answer, wire.Error) and answer.code == "unavailable":
                    break
                assert isinstance(answer, wire.Assignment), answer
                answers.append(answer)
            if len(answers) < len(addresses):
                await trio.sleep(0.05)
                continue
            first = answers[0]
            same = all(a.epoch == first.epoch and a.owners == first.owners for a in answers)
            if same and first.epoch >= at_least and check(first):
                return first
            await trio.sleep(0.05)


async def cataloged(handle: MembershipStore, names: list[str]) -> int:
    """Wait until ``handle`` reads every one of ``names`` in the catalog; return that epoch.

    The catalog is written one name at a time (every name is its own epoch), and bounded loads
    make every owner depend on the whole catalog: an answer is only comparable with
    ``assign(names, ...)`` at an epoch that has all of them.
    """
    with trio.fail_after(TIMEOUT):
        async for view in handle.feed:
            if view.catalog >= set(names):
                return view.epoch
    raise AssertionError("the view feed ended")  # pragma: no cover (it never ends)


async def test_two_meta_servers_always_agree(
    store_server: ZooKeeperServer | EtcdServer, unique_path: str, tmp_path: Path
) -> None:
    kind = kind_of(store_server)
    text = meta_config_text(kind, store_server.address, unique_path)
    metas = [MetaProcess(text, base_dir=tmp_path / f"meta-{i}") for i in range(2)]
    try:
        for meta in metas:
            meta.launch()
        for meta in metas:
            meta.wait_ready()
        addresses = [meta.address for meta in metas]
        services = [f"svc-{i:02d}" for i in range(30)]
        regs = [reg(f"d{i}", 1.0 + i % 2) for i in range(4)]

        def owned_by(ids_wanted: set[str]) -> Callable[[wire.Assignment], bool]:
            return lambda a: {o.id for o in a.owners.values() if o is not None} <= ids_wanted

        def exactly(ids_wanted: set[str]) -> Callable[[wire.Assignment], bool]:
            return lambda a: {o.id for o in a.owners.values() if o is not None} == ids_wanted

        async with trio.open_nursery() as nursery:
            scopes: dict[str, trio.CancelScope] = {}

            async def member(registration: Registration, *, task_status: Any) -> None:
                handle = store_handle(kind, store_server.address, unique_path)
                handle.register(registration)
                with trio.CancelScope() as scope:
                    scopes[registration.id] = scope
                    await handle.run(task_status=task_status)

            catalog_writer = store_handle(kind, store_server.address, unique_path)
            await nursery.start(catalog_writer.run)
            catalog_writer.add_services(services)
            # The whole catalog first, with both Meta Servers at it, before anyone joins:
            # otherwise a join can land while the names are still being written, and the
            # two Meta Servers (rightly) agree on an assignment of part of the catalog.
            cataloged_at = await cataloged(catalog_writer, services)
            answer = await agreed(addresses, services, cataloged_at, exactly(set()))
            epoch = answer.epoch
            for step, registration in enumerate(regs):
                await nursery.start(member, registration)
                joined = {r.id for r in regs[: step + 1]}
                answer = await agreed(addresses, services, epoch + 1, exactly(joined))
                assert answer.epoch > epoch
                epoch = answer.epoch
                assert ids(answer) == expected(services, regs[: step + 1], epoch, services)
            # A graceful leave, then the catalog grows.
            scopes["d1"].cancel()
            left = {"d0", "d2", "d3"}
            answer = await agreed(addresses, services, epoch + 1, owned_by(left))
            epoch = answer.epoch
            live = [r for r in regs if r.id in left]
            assert ids(answer) == expected(services, live, epoch, services)
            catalog_writer.add_services(["svc-late"])
            grown = [*services, "svc-late"]
            answer = await agreed(addresses, grown, await cataloged(catalog_writer, grown))
            assert answer.epoch > epoch
            assert ids(answer) == expected(grown, live, answer.epoch, grown)
            nursery.cancel_scope.cancel()
    finally:
        for meta in metas:
            meta.close()


async def test_a_member_record_deleted_under_a_live_member_comes_back(
    store_server: ZooKeeperServer | EtcdServer, unique_path: str
) -> None:
    """An operator (or a stale process) deleting a live member's record does not make the
    member vanish for good: the member writes it again, and the epoch moves on."""
    kind = kind_of(store_server)
    handle = store_handle(kind, store_server.address, unique_path)
    handle.register(reg("d1"))
    async with trio.open_nursery() as nursery:
        await nursery.start(handle.run)
        with trio.fail_after(TIMEOUT):
            async for view in handle.feed:
                if view.member("d1") is not None:
                    break
        first = view.epoch

        def delete() -> None:
            if kind == "zookeeper":
                from kazoo.client import KazooClient

                client = KazooClient(hosts=store_server.address)
                client.start(timeout=10)
                client.delete(f"{unique_path}/members/d1")
                client.stop()
                client.close()
            else:
                import etcd3

                host, port = store_server.address.rsplit(":", 1)
                client = etcd3.client(host, int(port))
                client.delete(f"{unique_path}/members/d1")
                client.close()

        await trio.to_thread.run_sync(delete)
        with trio.fail_after(TIMEOUT):
            async for view in handle.feed:
                if view.member("d1") is not None and view.epoch > first:
                    break
        nursery.cancel_scope.cancel()
