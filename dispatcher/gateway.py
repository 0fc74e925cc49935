"""The process wiring: the ZooKeeper face and the fan-in, in one nursery.

:func:`run_gateway` is what ``zkgate serve --config FILE`` runs. It serves
the ZooKeeper protocol on the embedded durable tree (exactly as
``zkgate serve`` without a configuration does) and, beside it, runs the
fan-in over the configured upstreams. The merged snapshot is not projected
into ZooKeeper paths yet; it is kept in :attr:`Gateway.fanin` for the faces
that will read it.

If either half fails, the nursery cancels the other and the error ends the
process: a gateway that silently lost its ZooKeeper port, or its fan-in,
would look healthy while serving nothing. Upstream outages are not failures
here; the fan-in rides them out (see :mod:`dispatcher.fanin`).
"""

from __future__ import annotations

import logging

import trio

from dispatcher.config import Config
from dispatcher.fanin import FanIn
from dispatcher.projection import Projection
from dispatcher.upstream import ConfigError, Upstream, layout_kind
from dispatcher.zk.engine import Engine, EngineConfig
from dispatcher.zk.server import ServerLimits, ZooKeeperServer
from dispatcher.zk.store import TreeStore

__all__ = ["Gateway", "run_gateway"]

log = logging.getLogger(__name__)


class Gateway:
    """One running gateway: its configuration, its fan-in and (once serving) its port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.fanin = FanIn(
            config.node,
            interest=config.dispatcher.interest,
            subscriber_queue=config.dispatcher.subscriber_queue,
        )
        #: The bound ZooKeeper port (useful when the configuration says port 0).
        self.port: int | None = None
        #: The live upstream objects, in precedence order, once running.
        self.upstreams: tuple[Upstream, ...] = ()

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``task_status.started(self)`` once the port is bound."""
        config = self.config
        zk = config.zookeeper
        # Built before anything starts, so that a failing from_config (it
        # passed at load time, but may depend on the environment) stops the
        # start instead of killing a half-started gateway.
        upstreams = self.upstreams = tuple(upstream.build() for upstream in config.upstreams)
        store = TreeStore(zk.data_dir)
        try:
            engine = Engine(store, EngineConfig(
                tick_ms=zk.tick_ms,
                super_digest=zk.super_digest,
                extended_types=zk.extended_types,
                container_check_ms=zk.container_check_ms,
            ))
            projections = self._projections(engine)
            server = ZooKeeperServer(
                engine,
                ServerLimits(max_buffer=zk.max_buffer, max_client_cnxns=zk.max_client_cnxns),
                settings={"dataDir": zk.data_dir, "clientPortAddress": zk.host,
                          "jute.maxbuffer": zk.max_buffer,
                          "maxClientCnxns": zk.max_client_cnxns},
            )
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(server.serve, zk.host, zk.port)
                log.info(
                    "gateway %r: %d upstream(s) (%s), interest=%s",
                    config.node,
                    len(upstreams),
                    ", ".join(f"{u.name}:{u.kind}" for u in config.upstreams) or "none",
                    config.dispatcher.interest,
                )
                nursery.start_soon(self.fanin.run, upstreams)
                for projection in projections:
                    await nursery.start(projection.run)
                task_status.started(self)
        finally:
            store.close()

    def _projections(self, engine: Engine) -> list[Projection]:
        projections = []
        for spec in self.config.projections:
            projection = Projection(
                engine, self.fanin, spec.root, layout_kind(spec.layout), self.config.node,
                hide_failing=spec.hide_failing,
            )
            try:
                projection.mount()
            except ValueError as exc:
                raise ConfigError(f"projection {spec.root}: {exc}") from None
            projections.append(projection)
        return projections


async def run_gateway(
    config: Config, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a :class:`Gateway` for ``config`` until cancelled.

    With ``nursery.start(run_gateway, config)`` the caller gets the running
    :class:`Gateway` (its ``fanin.snapshot``, its bound ``port``).
    """
    await Gateway(config).run(task_status=task_status)
