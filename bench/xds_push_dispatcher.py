"""The Dispatcher under test in ``bench/xds_push.py``: a process of its own.

One :class:`~dispatcher.core.fanin.FanIn` over a real etcd
(:class:`~adapters.etcd.EtcdUpstream`, ``grpc`` layout) feeds both faces
being compared: the :class:`~dispatcher.faces.xds.XdsServer` (its gRPC
thread included) and zkgate's own
:class:`~dispatcher.faces.subscription_server.SubscriptionServer`. They run
here rather than in a ``zkgate serve`` because ``[xds]`` is not wired into
the configuration yet; the objects are the ones a gateway builds.

The driver talks to it over a pipe: it first receives ``("ready", xds_port,
subscription_port, pid)``, then may send ``"metrics"`` (answered with the
xDS counters as a dict) and ``"stop"``. A separate process keeps the load
clients' and the driver's CPU out of the server's, and lets the report
give the server's CPU alone.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from typing import Final

import attrs
import trio

from adapters.etcd import EtcdUpstream
from dispatcher.cli import tune_gc
from dispatcher.core.fanin import FanIn
from dispatcher.core.ownership import SoleOwnership
from dispatcher.faces.subscription_server import SubscriptionLimits, SubscriptionServer
from dispatcher.faces.xds import XdsConfig, XdsLimits, XdsServer
from dispatcher.wire import Owner

__all__ = ["TOKEN", "dispatcher_main"]

#: The subscription server's shared secret (loopback only, for the benchmark).
TOKEN: Final = "xds-push-bench"
_CONNECT_TIMEOUT: Final = 60.0
# Headroom over the load's streams: the witness Envoy and any reconnection.
_SPARE_STREAMS: Final = 64


def dispatcher_main(endpoint: str, prefix: str, streams: int, conn: Connection) -> None:
    """Process entry point: serve until the driver says ``"stop"`` or goes away."""
    # As `zkgate serve` does at start: the default thresholds make the cyclic
    # collector walk every stream's objects many times per push.
    tune_gc()
    try:
        trio.run(_serve, endpoint, prefix, streams, conn)
    finally:
        conn.close()


async def _serve(endpoint: str, prefix: str, streams: int, conn: Connection) -> None:
    fanin = FanIn("bench-xds", subscriber_queue=max(1024, 4 * streams))
    upstream = EtcdUpstream.from_config(
        "etcd", {"endpoint": endpoint, "prefixes": [{"prefix": prefix, "layout": "grpc"}]}
    )
    xds = XdsServer(
        fanin.hub,
        XdsConfig("127.0.0.1:0", XdsLimits(max_streams=streams + _SPARE_STREAMS)),
    )
    subscriptions = SubscriptionServer(
        fanin,
        SoleOwnership(Owner("bench-xds", "127.0.0.1:0")),
        TOKEN,
        "bench-xds",
        limits=SubscriptionLimits(max_connections=streams + _SPARE_STREAMS),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        with trio.fail_after(_CONNECT_TIMEOUT):
            while not (state := fanin.status.get(upstream.name)) or not state.connected:
                await trio.sleep(0.01)
        xds_port = await nursery.start(xds.serve)
        subscription_port = await nursery.start(subscriptions.serve_tcp, "127.0.0.1", 0)
        conn.send(("ready", xds_port, subscription_port, os.getpid()))
        while True:
            try:
                command = await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
            except EOFError:
                break
            if command == "metrics":
                conn.send(attrs.asdict(xds.metrics))
            else:
                break
        nursery.cancel_scope.cancel()
