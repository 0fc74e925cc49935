"""The process wiring: the ZooKeeper face and the fan-in, in one nursery.

:func:`run_gateway` is what ``zkgate serve --config FILE`` runs. It serves
the ZooKeeper protocol on the embedded durable tree (exactly as
``zkgate serve`` without a configuration does) and, beside it, runs the
fan-in over the configured upstreams, and renders the merged snapshot into
the ``[[projection]]`` roots of the ZooKeeper face
(:mod:`dispatcher.faces.projection`).

With a ``[subscriptions]`` table it also serves the subscription protocol to
proxies (:mod:`dispatcher.faces.subscription_server`), by default as the sole
owner of every service.

With ``[health] enabled = true`` it also runs the central health checker
(:mod:`dispatcher.core.health`) on the services this node owns; its verdicts go
into the fan-in's snapshot, and proxies' failure reports reach it (unless
the caller passes its own ``on_report``).

With ``[membership]`` and ``[sharding]`` it is one shard of several
(:class:`ShardWiring`): it registers in the membership store once its ports
are bound, owns the services :mod:`dispatcher.sharding.ownership` gives it, loads only
those (plus the ones it is handing over) from its upstreams, and its
subscription server redirects the rest.

The admin HTTP endpoint (:mod:`dispatcher.faces.admin.http`: metrics, health, readiness,
the snapshot, the shard map, the status page) starts first, unless
``[admin] enabled = false``; a busy *default* port is logged and skipped.

If either half fails, the nursery cancels the other and the error ends the
process: a gateway that silently lost its ZooKeeper port, or its fan-in,
would look healthy while serving nothing. Upstream outages are not failures
here; the fan-in rides them out (see :mod:`dispatcher.core.fanin`).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dispatcher import wire
from dispatcher.config import Config
from dispatcher.core.fanin import FanIn
from dispatcher.core.health import HealthChecker
from dispatcher.core.ownership import Ownership, SoleOwnership
from dispatcher.core.upstream import ConfigError, Upstream, layout_kind
from dispatcher.faces.admin.http import AdminServer
from dispatcher.faces.admin.rendering import shard_map
from dispatcher.faces.projection import Projection
from dispatcher.faces.subscription_server import (
    ReportHandler,
    SubscriptionLimits,
    SubscriptionServer,
)
from dispatcher.sharding.membership import MembershipStore
from dispatcher.sharding.ownership import member_owner
from dispatcher.sharding.wiring import ShardWiring
from dispatcher.zk.mirror import Mirror
from dispatcher.zk.server.engine import Engine, EngineConfig
from dispatcher.zk.server.fourletter import WHITELIST_SETTING
from dispatcher.zk.server.listener import ServerLimits, ZooKeeperServer
from dispatcher.zk.server.store import TreeStore

__all__ = ["Gateway", "ListenError", "ShardWiring", "run_gateway"]

log = logging.getLogger(__name__)


class Gateway:
    """One running gateway: its configuration, its fan-in and (once serving) its port."""

    def __init__(
        self,
        config: Config,
        *,
        ownership: Ownership | None = None,
        on_report: ReportHandler | None = None,
        membership: MembershipStore | None = None,
    ) -> None:
        """``ownership`` (default: this node owns every service, or with ``[sharding]``
        its shard's share) and ``on_report`` (default: log the report) are for the
        subscription server, if configured. ``membership`` replaces the store that
        ``[membership]`` names (in-process shards sharing one memory store)."""
        self.config = config
        self.fanin = FanIn(
            config.node,
            interest=config.dispatcher.interest,
            subscriber_queue=config.dispatcher.subscriber_queue,
        )
        #: This gateway as a shard; None without ``[sharding]`` (or with an ``ownership``).
        self.sharding: ShardWiring | None = None
        if ownership is None and config.sharding is not None:
            if config.membership is None:  # only a Config built by hand can lack it
                raise ValueError("ShardWiring needs [membership] and [sharding]")
            self.sharding = ShardWiring(
                config.sharding, config.membership, config.node, self.fanin, membership=membership
            )
            ownership = self.sharding.ownership
        #: The central health checker; None unless ``[health] enabled``.
        self.health: HealthChecker | None = None
        if config.health.enabled:
            self.health = HealthChecker(self.fanin, ownership, config.health)
            if on_report is None:
                on_report = self.health.on_report
        #: The bound ZooKeeper port (useful when the configuration says port 0).
        self.port: int | None = None
        #: The live upstream objects, in precedence order, once running.
        self.upstreams: tuple[Upstream, ...] = ()
        #: The subscription server proxies connect to; None without ``[subscriptions]``.
        self.subscriptions: SubscriptionServer | None = None
        #: Its bound TCP port, once serving.
        self.subscription_port: int | None = None
        if config.subscriptions is not None:
            settings = config.subscriptions
            self.subscriptions = SubscriptionServer(
                self.fanin,
                ownership or SoleOwnership(wire.Owner(
                    config.node, settings.listen, config.zookeeper.listen
                )),
                settings.token,
                config.node,
                history=settings.history,
                limits=SubscriptionLimits(max_connections=settings.max_connections),
                on_report=on_report,
            )  # fmt: skip
        #: The ZooKeeper engine, once running (the admin endpoint reads its counters).
        self.engine: Engine | None = None
        #: The ZooKeeper face's server, once running.
        self.zookeeper_server: ZooKeeperServer | None = None
        #: The ``[[mirror]]`` mounts, once the engine exists.
        self.mirrors: tuple[Mirror, ...] = ()
        #: The admin endpoint once serving; None when ``[admin]`` is off, or its
        #: default port was taken (see :class:`~dispatcher.faces.admin.config.AdminConfig`).
        self.admin: AdminServer | None = None
        #: Who owns which service when sharded; None: this node owns them all.
        self.ownership = ownership

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
            engine = Engine(
                store,
                EngineConfig(
                    tick_ms=zk.tick_ms,
                    super_digest=zk.super_digest,
                    extended_types=zk.extended_types,
                    container_check_ms=zk.container_check_ms,
                ),
            )
            self.engine = engine
            projections = self._projections(engine)
            mirrors = self._mirrors(engine)
            self.mirrors = tuple(mirrors)
            server = ZooKeeperServer(
                engine,
                ServerLimits(max_buffer=zk.max_buffer, max_client_cnxns=zk.max_client_cnxns),
                settings={
                    "dataDir": zk.data_dir,
                    "clientPortAddress": zk.host,
                    "jute.maxbuffer": zk.max_buffer,
                    "maxClientCnxns": zk.max_client_cnxns,
                    WHITELIST_SETTING: zk.four_letter_words,
                },
            )
            self.zookeeper_server = server
            async with trio.open_nursery() as nursery:
                await self._start_admin(nursery, engine)
                for mirror in mirrors:
                    await self._start_mirror(nursery, mirror)
                self.port = await _start_listener(
                    nursery, "the ZooKeeper client port (--listen, [zookeeper] listen)",
                    f"{zk.host}:{zk.port}", server.serve, zk.host, zk.port,
                )  # fmt: skip
                log.info(
                    "gateway serving",
                    extra={
                        "node": config.node,
                        "listen": f"[{zk.host}]:{self.port}"
                        if ":" in zk.host
                        else f"{zk.host}:{self.port}",
                        "data_dir": str(zk.data_dir),
                        "upstreams": ",".join(f"{u.name}:{u.kind}" for u in config.upstreams),
                        "interest": config.dispatcher.interest,
                    },
                )
                sharding = self.sharding
                if sharding is not None:
                    await nursery.start(sharding.run)
                    nursery.start_soon(self.fanin.run, sharding.track(upstreams))
                else:
                    nursery.start_soon(self.fanin.run, upstreams)
                if self.health is not None:
                    await nursery.start(self.health.run)
                for projection in projections:
                    await nursery.start(projection.run)
                await self._start_subscriptions(nursery)
                if sharding is not None:
                    sharding.join(self)
                task_status.started(self)
        finally:
            store.close()

    async def _start_admin(self, nursery: trio.Nursery, engine: Engine) -> None:
        """Start the admin endpoint (before the ZooKeeper port, so that /ready
        can say what is still missing while the rest starts)."""
        settings = self.config.admin
        if not settings.enabled:
            return
        admin = AdminServer(
            self,
            limits=settings.limits(),
            shards=None if self.ownership is None else self._shard_map,
        )
        # The engine calls its observer once per handled request, with the
        # opcode and the seconds it took: the per-opcode metrics.
        engine.observer = admin.requests.observe
        host, port = settings.address
        try:
            await _start_listener(
                nursery, "the admin endpoint (--admin-listen, [admin] listen)",
                f"{host}:{port}", admin.serve, host, port,
            )  # fmt: skip
        except ListenError as exc:
            if settings.listen is not None:
                raise
            log.warning(
                "admin endpoint not started: cannot listen; set --admin-listen HOST:PORT "
                "([admin] listen) to a free address, or --admin-listen off "
                "([admin] enabled = false)",
                extra={"listen": f"{host}:{port}", "error": exc.strerror},
            )
            return
        self.admin = admin

    def _shard_map(self) -> dict[str, Any]:
        """``/shards``: the owner of every cataloged or loaded service, and every member."""
        assert self.ownership is not None
        services = set(self.fanin.snapshot)
        members: tuple[wire.Owner, ...] = ()
        connected = None
        view = self.sharding.ownership.view if self.sharding is not None else None
        if view is not None:
            services |= view.catalog
            members = tuple(member_owner(member) for member in view.members)
            connected = view.connected
        return shard_map(
            self.ownership, services, self.config.node, members, membership_connected=connected
        )

    async def _start_subscriptions(self, nursery: trio.Nursery) -> None:
        """Serve subscriptions on the configured TCP address and Unix socket, if any."""
        server, settings = self.subscriptions, self.config.subscriptions
        if server is None or settings is None:
            return
        self.subscription_port = await _start_listener(
            nursery, "subscriptions ([subscriptions] listen)", f"{settings.host}:{settings.port}",
            server.serve_tcp, settings.host, settings.port,
        )  # fmt: skip
        if settings.unix is not None:
            await nursery.start(server.serve_unix, settings.unix)

    def _mirrors(self, engine: Engine) -> list[Mirror]:
        mirrors = []
        for spec in self.config.mirrors:
            mirror = Mirror(engine, spec)
            try:
                engine.mount(mirror)
            except ValueError as exc:
                raise ConfigError(f"mirror {spec.root}: {exc}") from None
            mirrors.append(mirror)
        return mirrors

    async def _start_mirror(self, nursery: trio.Nursery, mirror: Mirror) -> None:
        """Start a mirror and wait for its first sync: a mirror whose ensemble
        cannot be reached at start is a configuration error, named as such."""
        await nursery.start(mirror.run)
        spec = mirror.config
        with trio.move_on_after(spec.connect_timeout):
            await mirror.wait_synced()
            return
        hosts = ",".join(f"{host}:{port}" for host, port in spec.hosts)
        raise ConfigError(
            f"mirror {spec.root}: upstream {hosts} unreachable "
            f"(no session within connect_timeout = {spec.connect_timeout} s)"
        )

    def _projections(self, engine: Engine) -> list[Projection]:
        projections = []
        for spec in self.config.projections:
            projection = Projection(
                engine,
                self.fanin,
                spec.root,
                layout_kind(spec.layout),
                self.config.node,
                hide_failing=spec.hide_failing,
            )
            try:
                projection.mount()
            except ValueError as exc:
                raise ConfigError(f"projection {spec.root}: {exc}") from None
            projections.append(projection)
        return projections


class ListenError(OSError):
    """A listener that cannot be bound; the message says which one, where and why."""

    def __init__(self, listener: str, address: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.listener = listener
        self.address = address

    def __str__(self) -> str:
        return f"cannot listen on {self.address} for {self.listener}: {self.strerror}"


async def _start_listener(
    nursery: trio.Nursery, listener: str, address: str, serve: Any, *args: Any
) -> Any:
    """``nursery.start(serve, *args)``, a failure to bind named by :class:`ListenError`."""
    try:
        return await nursery.start(serve, *args)
    except OSError as exc:
        raise ListenError(listener, address, exc) from exc


async def run_gateway(
    config: Config,
    *,
    membership: MembershipStore | None = None,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`Gateway` for ``config`` until cancelled.

    With ``nursery.start(run_gateway, config)`` the caller gets the running
    :class:`Gateway` (its ``fanin.snapshot``, its bound ``port``). ``membership``
    is passed on to :class:`Gateway`.
    """
    await Gateway(config, membership=membership).run(task_status=task_status)
