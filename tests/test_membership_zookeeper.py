"""The ZooKeeper membership backend on zkgate's own client, against a real ZooKeeper: what a
Dispatcher relies on beyond the shard tests (test_sharding.py, test_metaserver.py): its
registration outlives a session expiry, a chroot in the connect string is honoured, and a
connect string that cannot work is refused when the configuration is read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from dispatcher.sharding.membership import (
    MembershipConfig,
    MembershipConfigError,
    Registration,
    View,
    ViewFeed,
    ZooKeeperMembership,
)
from dispatcher.zk.client import ZooKeeperClient
from tests.partition import Partition
from tests.servers import ZooKeeperServer

TIMEOUT = 20


async def view_where(feed: ViewFeed, check: Callable[[View], bool], what: str) -> View:
    """The first view (the current one included) that passes ``check``."""
    with trio.fail_after(TIMEOUT):
        async for view in feed:
            if check(view):
                return view
    raise AssertionError(f"the feed ended before {what}")


@asynccontextmanager
async def direct(server: ZooKeeperServer) -> AsyncIterator[ZooKeeperClient]:
    """A plain client session, to look at the znodes themselves."""
    client = ZooKeeperClient([(server.host, server.port)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(TIMEOUT):
            await client.wait_connected()
        yield client
        nursery.cancel_scope.cancel()


async def test_the_registration_is_recreated_after_a_session_expiry(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """Cut off for longer than its session timeout, a member loses its ephemerals on the
    server; once it reaches the server again it writes its record and warm marker under the
    new session, and everyone sees it back at a newer epoch."""
    me = Registration("d1", "127.0.0.1:7000", "127.0.0.1:2181", 2.0)
    partition = Partition((zookeeper.host, zookeeper.port))
    reader = ZooKeeperMembership(zookeeper.address, unique_path, 10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        member = ZooKeeperMembership(partition.address, unique_path, 0.8)
        member.register(me)
        member.set_warm(7)
        await nursery.start(member.run)
        await nursery.start(reader.run)
        joined = await view_where(
            reader.feed, lambda v: v.warm.get("d1") == 7, "the member joined, warm"
        )
        assert joined.member("d1") == me.member()
        await view_where(member.feed, lambda v: v.warm.get("d1") == 7, "the member read itself")

        partition.cut()
        await view_where(member.feed, lambda v: not v.connected, "the member saw the cut")
        gone = await view_where(
            reader.feed, lambda v: v.member("d1") is None, "the server expired the session"
        )
        assert gone.epoch > joined.epoch and "d1" not in gone.warm

        partition.heal()
        back = await view_where(
            reader.feed, lambda v: v.warm.get("d1") == 7, "the member is back, warm"
        )
        assert back.member("d1") == me.member() and back.epoch > gone.epoch
        # The member's own view is fresh again, and includes itself.
        await view_where(
            member.feed, lambda v: v.connected and v.member("d1") == me.member(), "fresh again"
        )

        async with direct(zookeeper) as zk:
            data, stat = await zk.get_data(f"{unique_path}/members/d1")
            assert data == me.to_json() and stat.ephemeral_owner != 0
            warm, warm_stat = await zk.get_data(f"{unique_path}/warm/d1")
            assert warm == b"7" and warm_stat.ephemeral_owner == stat.ephemeral_owner
        nursery.cancel_scope.cancel()


async def test_a_chroot_in_the_connect_string_is_prefixed_to_the_root(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    member = ZooKeeperMembership(f"{zookeeper.address}{unique_path}", "/zkgate", 10.0)
    member.register(Registration("d1", "127.0.0.1:7000"))
    member.add_services(["orders/v1"])
    async with trio.open_nursery() as nursery:
        await nursery.start(member.run)
        await view_where(
            member.feed,
            lambda v: v.member("d1") is not None and "orders/v1" in v.catalog,
            "the member and the service written",
        )
        async with direct(zookeeper) as zk:
            assert await zk.get_children(f"{unique_path}/zkgate/members") == ["d1"]
            assert await zk.get_children(f"{unique_path}/zkgate/services") == ["orders%2Fv1"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "address", ["127.0.0.1:notaport", "127.0.0.1:99999", ":2181", "127.0.0.1:2181/a//b"]
)
def test_a_connect_string_that_cannot_work_is_refused_with_the_key(address: str) -> None:
    with pytest.raises(MembershipConfigError, match=r"^membership\.address: "):
        MembershipConfig.from_table({"kind": "zookeeper", "address": address})


def test_connect_strings_zookeeper_clients_accept_are_accepted() -> None:
    for address in ("127.0.0.1:2181", "a:1,b:2,[::1]:3", "zk1,zk2/chroot/path"):
        config = MembershipConfig.from_table({"kind": "zookeeper", "address": address})
        assert config.address == address
