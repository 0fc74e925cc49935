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

With an ``[xds]`` table it also serves the fan-in's services to Envoy and
proxyless gRPC over ADS (:class:`~dispatcher.faces.xds.XdsServer`, on the
fan-in's subscription hub).

With ``[membership]`` it also holds the governance policies
(:attr:`Gateway.policies`, a :class:`~dispatcher.governance.feed.GovernanceFeed` on the
membership store): loaded before anything but the admin endpoint serves, then kept current.

The admin HTTP endpoint (:mod:`dispatcher.faces.admin.http`: metrics, health, readiness,
the snapshot, the shard map, the status page) starts first, unless
``[admin] enabled = false``; a busy *default* port is logged and skipped.

If either half fails, the nursery cancels the other and the error ends the
process: a gateway that silently lost its ZooKeeper port, or its fan-in,
would look healthy while serving nothing. Upstream outages are not failures
here; the fan-in rides them out (see :mod:`dispatcher.core.fanin`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio

from dispatcher import wire
from dispatcher.config import Config
from dispatcher.core.fanin import FanIn
from dispatcher.core.health import HealthChecker
from dispatcher.core.ownership import Ownership, SoleOwnership
from dispatcher.core.subscriptions import SubscriptionHub
from dispatcher.core.upstream import ConfigError, Upstream, layout_kind
from dispatcher.faces.admin.http import AdminServer
from dispatcher.faces.admin.rendering import shard_map
from dispatcher.faces.mesh.rollback import MeshRollback
from dispatcher.faces.mesh.views import MeshViews
from dispatcher.faces.projection import Projection
from dispatcher.faces.subscription_server import (
    ReportHandler,
    SubscriptionLimits,
    SubscriptionServer,
)
from dispatcher.faces.xds import XdsServer
from dispatcher.governance.backends import open_governance_store
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import KIND as MESH_KIND
from dispatcher.inspection import Inspector
from dispatcher.sharding.follower import Follower
from dispatcher.sharding.membership import MembershipStore
from dispatcher.sharding.ownership import member_owner
from dispatcher.sharding.wiring import ShardWiring
from dispatcher.tls import ClientTls, ServerTls, warn_if_exposed
from dispatcher.wire import parse_address
from dispatcher.wire_client import ClientSettings
from dispatcher.zk.mirror import Mirror
from dispatcher.zk.server.engine import Engine, EngineConfig
from dispatcher.zk.server.fourletter import WHITELIST_SETTING
from dispatcher.zk.server.listener import ServerLimits, ZooKeeperServer
from dispatcher.zk.server.store import TreeStore

__all__ = ["Gateway", "ListenError", "ShardWiring", "run_gateway"]

log = logging.getLogger(__name__)

XDS_WARM_TIMEOUT = 10.0
"""Seconds the xDS port waits for every upstream's first listing before it opens anyway."""


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
        #: The bound ZooKeeper TLS port, with ``[zookeeper] secure_listen``.
        self.secure_port: int | None = None
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
        #: The mesh's automatic rollback, fed by the proxies' outcome reports; None without
        #: ``[mesh] rollback`` or ``[subscriptions]`` (the reports come in there).
        self.mesh_rollback: MeshRollback | None = None
        if config.mesh.rollback is not None and self.subscriptions is not None:
            self.mesh_rollback = MeshRollback(config.mesh.rollback,
                                              who=f"zkgate-rollback/{config.node}")  # fmt: skip
            self.subscriptions.on_outcomes = self.mesh_rollback.record
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
        #: Inspection of the upstream and projection layers, once the engine
        #: exists (``POST /inspect`` uses it even when ``[inspection]`` is off).
        self.inspector: Inspector | None = None
        #: The governance policies (the ``policies`` documents of the ``[membership]`` store):
        #: ``current``, ``version``, ``subscribe()``. None without ``[membership]`` (policies
        #: are unavailable). Set by :meth:`run` right after the admin endpoint starts, and
        #: loaded (``policies.loaded`` set, the store's current version held) before the
        #: ZooKeeper port, the subscriptions or any other face serves; faces built in
        #: ``__init__`` read it through the gateway when they need it.
        self.policies: GovernanceFeed | None = None
        #: The mesh settings (kind ``mesh`` of the same store), held like ``policies``.
        self.mesh: GovernanceFeed | None = None
        #: Per-consumer views of the projections (mesh onboarding), once running.
        self.mesh_views: MeshViews | None = None
        #: The xDS server once serving (its ``port`` is the bound one); None without ``[xds]``.
        self.xds: XdsServer | None = None
        #: Services other shards own, followed for the faces that serve every service
        #: (xDS); None unless sharded and one of those faces runs (see :meth:`_faces_hub`).
        self.follower: Follower | None = None

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
                    sasl_users=zk.sasl_users,
                    sasl_required=zk.sasl_required,
                    x509=zk.secure_listen is not None
                    and zk.tls is not None
                    and zk.tls.verifies_clients,
                ),
            )
            self.engine = engine
            projections = self._projections(engine)
            self.inspector = Inspector(
                self.fanin, projections, config.inspection, config.node,
                mirrors=lambda: self.mirrors, xds=lambda: self.xds,
            )  # fmt: skip
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
                await self._start_policies(nursery)
                await self._start_mesh_rollback(nursery)
                for mirror in mirrors:
                    await self._start_mirror(nursery, mirror)
                self.port = await _start_listener(
                    nursery, "the ZooKeeper client port (--listen, [zookeeper] listen)",
                    f"{zk.host}:{zk.port}", functools.partial(server.serve, plain=zk.plain),
                    zk.host, zk.port,
                )  # fmt: skip
                if zk.plain:
                    warn_if_exposed("zookeeper", zk.host, None)
                if zk.secure_listen is not None and zk.tls is not None:
                    secure_host, secure_port = parse_address(zk.secure_listen)
                    self.secure_port = await _start_listener(
                        nursery, "the ZooKeeper secure client port ([zookeeper] secure_listen)",
                        zk.secure_listen, server.serve_secure, secure_host, secure_port,
                        ServerTls(zk.tls, "zookeeper"),
                    )  # fmt: skip
                    if not zk.plain:
                        self.port = self.secure_port
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
                    await nursery.start(projection.run, self.policies)
                self.mesh_views = MeshViews(engine, projections, self.mesh, config.mesh)
                await nursery.start(self.mesh_views.run)
                if self.mesh is not None and projections:
                    # Only then can a session's view differ from the tree; otherwise
                    # every read would pay the views' lookups for nothing.
                    engine.views = self.mesh_views
                await self._start_subscriptions(nursery)
                nursery.start_soon(self._serve_xds, nursery)
                if config.inspection.enabled:
                    await nursery.start(self.inspector.run)
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
                None if settings.tls is None else ServerTls(settings.tls, "admin"),
            )  # fmt: skip
            warn_if_exposed("admin", host, settings.tls)
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

    async def _start_policies(self, nursery: trio.Nursery) -> None:
        """Open the ``policies`` store on ``[membership]`` and run its feed in ``nursery``;
        return once the current version is loaded (the feed retries an unreachable store)."""
        membership = self.config.membership
        if membership is None:
            return

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with open_governance_store(
                membership, "policies", max_history=self.config.governance.max_history
            ) as store:
                self.policies = GovernanceFeed(store)
                if self.subscriptions is not None:
                    self.subscriptions.policies = self.policies
                await self.policies.run(task_status=task_status)

        await nursery.start(run)
        assert self.policies is not None
        log.info("policies loaded", extra={"version": self.policies.version})

        async def run_mesh(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            async with open_governance_store(
                membership, MESH_KIND, max_history=self.config.governance.max_history
            ) as store:
                self.mesh = GovernanceFeed(store)
                await self.mesh.run(task_status=task_status)

        await nursery.start(run_mesh)
        assert self.mesh is not None
        log.info("mesh settings loaded", extra={"version": self.mesh.version})

    async def _start_mesh_rollback(self, nursery: trio.Nursery) -> None:
        """Run the mesh's automatic rollback on the mesh feed (both configured)."""
        if self.mesh_rollback is not None and self.mesh is not None:
            await nursery.start(self.mesh_rollback.run, self.mesh)

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
            None if settings.tls is None else ServerTls(settings.tls, "subscriptions"),
        )  # fmt: skip
        warn_if_exposed("subscriptions", settings.host, settings.tls)
        if settings.unix is not None:
            await nursery.start(server.serve_unix, settings.unix)

    async def _serve_xds(self, nursery: trio.Nursery) -> None:
        """Serve ADS to Envoy and proxyless gRPC on ``[xds] listen``, in ``nursery``
        (a task of it; returns once the server runs there).

        The port opens once every upstream has delivered its first listing (or
        after :data:`XDS_WARM_TIMEOUT`): a Dispatcher restarted under an Envoy
        that answered its first wildcard request with a half-empty snapshot
        would make the Envoy drop the clusters it still routes on. Until then
        Envoy's connects are refused and it keeps its last configuration.
        """
        settings = self.config.xds
        if settings is None:
            return
        connected: set[str] = set()
        wanted = {upstream.name for upstream in self.config.upstreams}
        with trio.move_on_after(XDS_WARM_TIMEOUT) as waiting:
            # The fan-in signals snapshot changes, not status ones (an upstream
            # with nothing registered connects without changing the snapshot).
            while not wanted <= connected:
                connected.update(n for n, state in self.fanin.status.items() if state.connected)
                await trio.sleep(0.05)
        if waiting.cancelled_caught:
            log.warning(
                "xds serving before every upstream loaded",
                extra={"waiting_for": ",".join(sorted(wanted - connected))},
            )
        server = XdsServer(await self._faces_hub(nursery), settings, policies=self.policies)
        try:
            port = await nursery.start(server.serve)
        except OSError as exc:
            # grpcio reports a failed bind without its errno (only on its own stderr).
            reason = OSError(None, "gRPC could not bind it (in use, or not this host's address)")
            raise ListenError("xDS ([xds] listen)", settings.listen, reason) from exc
        self.xds = server
        host = settings.listen.rpartition(":")[0]
        warn_if_exposed("xds", host, settings.tls)
        log.info("xds serving", extra={"listen": f"{host}:{port}", "node": self.config.node})

    async def _faces_hub(self, nursery: trio.Nursery) -> SubscriptionHub:
        """The hub of a face that serves every service a client asks for (an Envoy cannot
        be redirected): the fan-in's, or on a shard a :class:`Follower` (started here
        once) that follows the services other shards own from their owners."""
        sharding, settings = self.sharding, self.config.subscriptions
        if sharding is None:
            return self.fanin.hub
        if settings is None:
            log.warning("sharded without [subscriptions]: the services other shards own "
                        "are loaded from this node's upstreams for xDS")  # fmt: skip
            return self.fanin.hub
        if self.follower is None:
            # Dispatchers share the subscription port's TLS: a follower trusts
            # its CA and presents its certificate to the owner.
            tls = settings.tls
            client = ClientSettings(
                token=settings.token, client_id=f"zkgate-follower/{self.config.node}",
                tls=None if tls is None else ClientTls(ca=tls.ca, cert=tls.cert, key=tls.key),
            )  # fmt: skip
            self.follower = Follower(self.fanin, sharding.ownership, client)
            await nursery.start(self.follower.run)
            sharding.ownership.add_listener(self.follower.ownership_changed)
        return self.follower.hub

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
