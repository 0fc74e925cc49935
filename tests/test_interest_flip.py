"""A service dropped and wanted again before an adapter catches up keeps its data.

The fan-in forgets a service's instances the moment the last subscriber
leaves (interest = "subscribed"). If a subscriber comes back before the
adapter has applied the narrowing, the two interest changes cancel out in the
adapter, which still has to list the service again: otherwise the snapshot
would stay empty for a service that has instances. Shards hit this whenever
ownership flips quickly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest
import trio

from adapters.etcd import EtcdUpstream
from adapters.zookeeper import ZooKeeperUpstream
from dispatcher.core.fanin import FanIn
from dispatcher.core.subscriptions import Subscription
from dispatcher.core.upstream import Upstream
from tests.servers import EtcdServer, ZooKeeperServer

INSTANCE = json.dumps({"host": "10.1.0.1", "port": 8080}).encode()


def _zookeeper(server: ZooKeeperServer, root: str) -> tuple[Upstream, Callable[[], None]]:
    from kazoo.client import KazooClient

    def register() -> None:
        client = KazooClient(hosts=server.address)
        client.start(timeout=10)
        client.create(f"{root}/svc/i1", INSTANCE, makepath=True)
        client.stop()
        client.close()

    upstream = ZooKeeperUpstream.from_config(
        "zk", {"hosts": server.address, "roots": [{"path": root, "layout": "plain"}]}
    )
    return upstream, register


def _etcd(server: EtcdServer, root: str) -> tuple[Upstream, Callable[[], None]]:
    import etcd3

    def register() -> None:
        host, port = server.endpoint.rsplit(":", 1)
        client = etcd3.client(host, int(port))
        client.put(f"{root}/svc/i1", INSTANCE)
        client.close()

    prefixes = [{"prefix": f"{root}/", "layout": "plain"}]
    upstream = EtcdUpstream.from_config("etcd", {"endpoint": server.endpoint, "prefixes": prefixes})
    return upstream, register


@pytest.mark.parametrize("kind", ["zookeeper", "etcd"])
async def test_resubscribing_at_once_brings_the_data_back(
    kind: str, request: pytest.FixtureRequest
) -> None:
    root = f"/flip-{uuid.uuid4().hex[:8]}"
    server = request.getfixturevalue(kind)
    upstream, register = (_zookeeper if kind == "zookeeper" else _etcd)(server, root)
    await trio.to_thread.run_sync(register)
    fanin = FanIn("flip-test", interest="subscribed")

    async def instances_seen(subscription: Subscription) -> int:
        async for update in subscription:
            entry = update.full if update.full is not None else None
            count = len(entry.instances) if entry is not None else len(fanin.snapshot.full(
                update.service).instances)  # fmt: skip
            if count:
                return count
        return 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        with trio.fail_after(20):
            async with fanin.subscribe(["svc"]) as first:
                assert await instances_seen(first) == 1
            # Dropped (the fan-in forgets svc) and wanted again in the same
            # trio step: the adapter sees both changes only afterwards.
            async with fanin.subscribe(["svc"]) as second:
                assert await instances_seen(second) == 1
                assert len(fanin.snapshot.full("svc").instances) == 1
        nursery.cancel_scope.cancel()
