"""The gateway's TOML configuration: ``zkgate serve --config FILE``.

::

    node_id = "gw-eu-1"            # loop prevention; default "<hostname>:<port>"

    [zookeeper]                     # the ZooKeeper face (all optional)
    listen = "127.0.0.1:2181"
    data_dir = "/var/lib/zkgate"    # relative paths are relative to this file
    tick_ms = 2000
    max_buffer = 1048576            # jute.maxbuffer
    max_client_cnxns = 60           # per client IP, 0 for no limit
    extended_types = false          # TTL nodes
    container_check_ms = 60000      # znode.container.checkIntervalMs
    super_digest = "super:BASE64SHA1"
    four_letter_words = "ruok, srvr, mntr, isro"  # 4lw.commands.whitelist; "*" for all

    [dispatcher]                    # the fan-in (all optional)
    interest = "all"                # or "subscribed": load only subscribed services
    subscriber_queue = 1024         # updates a subscriber may lag before it is collapsed

    [admin]                         # the admin HTTP endpoint (faces/admin/); on by default
    enabled = true                  # /metrics, /health, /ready, /snapshot, /shards, /status, /
    listen = "127.0.0.1:8081"       # written out: a port that cannot be bound stops the
                                    # start; left out: a busy 8081 is logged and skipped
    max_connections = 64            # open admin connections; at the cap, the one waiting
                                    # longest for its request is evicted, or (all busy) 503
    max_connections_per_address = 8 # the same, per client address
    header_timeout = 2.0            # seconds from a request's start to the end of its head
    idle_timeout = 15.0             # seconds a keep-alive connection may wait between requests

    [subscriptions]                 # the face proxies subscribe to; off without this table
    listen = "127.0.0.1:7000"
    unix = "/run/zkgate/subscribe.sock"  # optional, beside the TCP port
    token = "a long random secret"  # required: every client must present it
    history = 256                   # deltas kept per service for reconnecting proxies
    max_connections = 1024          # open subscriber connections; one more is refused

    [xds]                           # Envoy and proxyless gRPC (faces/xds/); off without this table
    listen = "127.0.0.1:18000"      # ADS over gRPC (plaintext); port 0 picks a free one
    token = "a long random secret"  # optional: calls must carry "authorization: Bearer <token>"
    max_streams = 10000             # ADS streams of all clients together; one more is refused
    max_names = 10000               # resource names one stream may subscribe to, all types
    max_request_bytes = 1048576     # one request's size; a larger one ends its stream
    max_inflight = 16               # requests of one stream read but not yet handled

    [[upstream]]                    # one table per registry, in precedence order
    name = "zk-main"                # unique; becomes every instance's source.adapter
    kind = "zookeeper"              # an entry point of the zkgate.upstreams group
    # ... the kind's own options, checked by its from_config

    [health]                        # central health checking, and [[health.service]]
    enabled = false                 # overrides: every key in dispatcher.core.health_config

    [membership]                    # the store of shards and policies; alone (no [sharding]):
    kind = "zookeeper"              # policies only, no shard; zookeeper | etcd | memory
    address = "10.0.0.5:2181"       # ZooKeeper connect string, or etcd host:port
    root = "/zkgate"                # znode root / etcd key prefix
    session_timeout = 10.0          # ZooKeeper session / etcd lease TTL, seconds

    [sharding]                      # this Dispatcher as one shard (needs [membership];
                                    # see dispatcher.sharding.ownership)
    id = "gw-eu-1"                  # member id; default node_id
    weight = 1.0                    # capacity weight
    balance = 1.10                  # bounded-load factor: the same everywhere, Meta Servers too
    subscribe_address = "10.0.0.7:7000"   # advertised; default the bound [subscriptions] port
    zookeeper_address = "10.0.0.7:2181"   # advertised; default the bound ZooKeeper port
    services = ["orders", "users"]  # names to put in the shared catalog at start
    warm_timeout = 10.0             # a service not loaded by then is served anyway

    [governance]                    # policies (kept in the [membership] store; all optional)
    max_history = 100               # versions kept, the current one included
    token_file = "policy-token"     # bearer token for policy writes (or token = "..."); none:
                                    # the admin endpoint's policy API is read-only

With ``[sharding]`` the fan-in loads only the services this shard owns (and
those it is handing over), so ``[dispatcher] interest`` is ``"subscribed"``
and may not be written as ``"all"``.

The order of the ``[[upstream]]`` tables is the merge precedence (the first
upstream that reports an endpoint wins; see :mod:`dispatcher.core.fanin`).

Each table is read by its owner, beside the code it configures:
:mod:`dispatcher.zk.server.config` (``[zookeeper]``), :mod:`dispatcher.core.fanin_config`
(``[dispatcher]``), :mod:`dispatcher.core.upstream_config` (``[[upstream]]``),
:mod:`dispatcher.faces.projection_config` (``[[projection]]``),
:mod:`dispatcher.zk.mirror_config` (``[[mirror]]``), :mod:`dispatcher.core.health_config`
(``[health]``), :mod:`dispatcher.faces.admin.config` (``[admin]``),
:mod:`dispatcher.faces.xds.config` (``[xds]``),
:mod:`dispatcher.faces.subscription_config` (``[subscriptions]``),
:mod:`dispatcher.governance.config` (``[governance]``) and
:mod:`dispatcher.sharding.config` (``[membership]``, ``[sharding]``), all with the
readers of :mod:`dispatcher.settings`. This module composes them and checks what
one table requires of another; none of them imports it.

Every mistake is found when the file is loaded, before anything starts, and
raised as one :class:`~dispatcher.settings.ConfigError` whose message starts
with the path of the bad key, e.g. ``zookeeper.tick_ms: ...`` or
``upstream[1]: ...`` (array indexes count from 0) followed by the adapter's
own message for the kind's options. Unknown keys are errors, not ignored: a
misspelt option that silently falls back to its default is the worst kind of
configuration bug.

Adapter kinds are resolved one at a time by name in the entry-point group, so
a broken or missing adapter module only fails the configurations that use
it. Each upstream table is validated by calling its kind's ``from_config``
at load time; the gateway calls it again to build the live object, so
``from_config`` must have no side effects (no connections, no threads).
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.core.fanin_config import DispatcherConfig, parse_dispatcher
from dispatcher.core.health_config import HealthConfig, ServiceProbe, parse_health
from dispatcher.core.upstream import upstream_kind
from dispatcher.core.upstream_config import KindLookup, UpstreamConfig, parse_upstreams
from dispatcher.faces.admin.config import DEFAULT_ADMIN_LISTEN, AdminConfig, parse_admin
from dispatcher.faces.mesh.config import MeshConfig, parse_mesh
from dispatcher.faces.projection_config import ProjectionConfig, parse_projections
from dispatcher.faces.subscription_config import SubscriptionsConfig, parse_subscriptions
from dispatcher.faces.xds.config import XdsConfig, parse_xds
from dispatcher.governance.config import GovernanceConfig, parse_governance
from dispatcher.inspection.config import InspectionConfig, parse_inspection
from dispatcher.settings import ConfigError
from dispatcher.sharding.config import ShardingConfig, parse_membership, parse_sharding
from dispatcher.sharding.membership import MembershipConfig
from dispatcher.wire import parse_address
from dispatcher.zk.mirror import MirrorConfig
from dispatcher.zk.mirror_config import mirror_to_mapping, parse_mirrors
from dispatcher.zk.server.config import ZooKeeperConfig, default_data_dir, parse_zookeeper

# The section classes are re-exported: this is where a reader of the whole
# configuration looks for them.
__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DispatcherConfig",
    "GovernanceConfig",
    "HealthConfig",
    "KindLookup",
    "ProjectionConfig",
    "ServiceProbe",
    "ShardingConfig",
    "SubscriptionsConfig",
    "UpstreamConfig",
    "XdsConfig",
    "ZooKeeperConfig",
    "default_data_dir",
    "load_config",
    "parse_config",
]

_TOP_KEYS: Final = (
    "node_id", "zookeeper", "dispatcher", "upstream", "projection", "mirror", "health", "admin",
    "subscriptions", "membership", "sharding", "xds", "governance", "inspection", "mesh",
)  # fmt: skip


@attrs.frozen
class Config:
    """The whole configuration. ``node_id`` None means the default (see :attr:`node`)."""

    node_id: str | None = None
    # Factories: the default data directory depends on the environment at
    # load time, not at import time.
    zookeeper: ZooKeeperConfig = attrs.field(factory=ZooKeeperConfig)
    dispatcher: DispatcherConfig = attrs.field(factory=DispatcherConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    projections: tuple[ProjectionConfig, ...] = ()
    mirrors: tuple[MirrorConfig, ...] = ()
    health: HealthConfig = attrs.field(factory=lambda: HealthConfig())
    admin: AdminConfig = attrs.field(factory=lambda: AdminConfig())
    subscriptions: SubscriptionsConfig | None = None
    #: ``[membership]``: the store of the shards (with ``[sharding]``) and of the
    #: governance policies; alone, it holds the policies only and this node is no shard.
    membership: MembershipConfig | None = None
    #: ``[sharding]``: this node as one shard; needs ``[membership]``. None: not sharded.
    sharding: ShardingConfig | None = None
    #: ``[governance]``: policy history and the write token (policies need ``[membership]``).
    governance: GovernanceConfig = attrs.field(factory=lambda: GovernanceConfig())
    #: ``[xds]``: the xDS management server; None (off) without the table.
    xds: XdsConfig | None = None
    #: ``[inspection]``: scheduled consistency checks of every layer (off by default).
    inspection: InspectionConfig = attrs.field(factory=lambda: InspectionConfig())
    #: ``[mesh]``: consumer rules, minimum client versions, where sidecars register.
    mesh: MeshConfig = attrs.field(factory=lambda: MeshConfig())

    @property
    def node(self) -> str:
        """This gateway's id: ``node_id``, or ``<hostname>:<ZooKeeper port>``.

        The default is stable across restarts of one deployment and differs
        between gateways on one host, which is what loop prevention needs.
        """
        if self.node_id is not None:
            return self.node_id
        return f"{socket.gethostname()}:{self.zookeeper.port}"

    def with_overrides(self, **flags: Any) -> Config:
        """This configuration with command-line flags taking precedence.

        ``flags`` are ``[zookeeper]`` keys (``listen``, ``data_dir``, ...)
        with the values typed on the command line; they are checked like the
        file's, and a ConfigError names the flag.
        """
        if not flags:
            return self
        table = {key: str(value) if key == "data_dir" else value for key, value in flags.items()}
        try:
            overridden = parse_zookeeper(table, None, where=None)
        except ConfigError as exc:
            raise ConfigError(f"command line {exc}") from None
        changes = {key: getattr(overridden, key) for key in flags}
        return attrs.evolve(self, zookeeper=attrs.evolve(self.zookeeper, **changes))

    def with_admin_listen(self, listen: str) -> Config:
        """This configuration with ``--admin-listen``: ``HOST:PORT``, or ``off``."""
        if listen == "off":
            return attrs.evolve(self, admin=attrs.evolve(self.admin, enabled=False))
        try:
            parse_address(listen)
        except ValueError as exc:
            raise ConfigError(f"command line --admin-listen: {exc}") from None
        return attrs.evolve(self, admin=attrs.evolve(self.admin, enabled=True, listen=listen))

    def to_mapping(self) -> dict[str, Any]:
        """The plain mapping (as TOML would give it) that :func:`parse_config` turns back
        into an equal Config."""
        result: dict[str, Any] = {
            "zookeeper": self.zookeeper.to_mapping(),
            "dispatcher": self.dispatcher.to_mapping(),
            "upstream": [u.to_mapping() for u in self.upstreams],
        }
        if self.node_id is not None:
            result["node_id"] = self.node_id
        if self.projections:
            result["projection"] = [p.to_mapping() for p in self.projections]
        if self.mirrors:
            result["mirror"] = [mirror_to_mapping(m) for m in self.mirrors]
        if self.health != HealthConfig():
            result["health"] = self.health.to_mapping()
        if self.admin != AdminConfig():
            result["admin"] = self.admin.to_mapping()
        if self.subscriptions is not None:
            result["subscriptions"] = self.subscriptions.to_mapping()
        if self.membership is not None:
            result["membership"] = self.membership.to_mapping()
        if self.sharding is not None:
            result["sharding"] = self.sharding.to_mapping()
        if self.governance != GovernanceConfig():
            result["governance"] = self.governance.to_mapping()
        if self.xds is not None:
            result["xds"] = self.xds.to_mapping()
        if self.inspection != InspectionConfig():
            result["inspection"] = self.inspection.to_mapping()
        if self.mesh != MeshConfig():
            result["mesh"] = self.mesh.to_mapping()
        return result


# ----------------------------------------------------------------- loading


def load_config(path: Path | str, *, kinds: KindLookup | None = None) -> Config:
    """Read and check the TOML file at ``path``; raise ConfigError naming the bad key.

    Relative paths in the file (``zookeeper.data_dir``) are relative to the
    file's directory, so a configuration means the same from any working
    directory. ``kinds`` replaces the entry-point lookup of adapter kinds
    (for embedding and tests).
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        # tomllib decodes the whole file before parsing, outside its own errors.
        raise ConfigError(f"not valid TOML: not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        # tomllib recurses once per nested array or inline table.
        raise ConfigError("not valid TOML: arrays or inline tables nested too deeply") from None
    return parse_config(data, base_dir=path.parent, kinds=kinds)


def parse_config(
    data: Mapping[str, Any], *, base_dir: Path | None = None, kinds: KindLookup | None = None
) -> Config:
    """Check an already parsed TOML document; see :func:`load_config`."""
    lookup = kinds or upstream_kind
    settings.reject_unknown(data, _TOP_KEYS, "")
    node_id = None
    if "node_id" in data:
        node_id = settings.string(data["node_id"], "node_id")
    zookeeper = parse_zookeeper(settings.table(data, "zookeeper"), base_dir)
    dispatcher = parse_dispatcher(settings.table(data, "dispatcher"))
    upstreams = parse_upstreams(data.get("upstream", []), lookup)
    projections = parse_projections(data.get("projection", []))
    mirrors = parse_mirrors(data.get("mirror", []), [p.root for p in projections], base_dir)
    health = parse_health(settings.table(data, "health"))
    admin = parse_admin(settings.table(data, "admin"), base_dir=base_dir)
    inspection = parse_inspection(settings.table(data, "inspection"))
    subscriptions = None
    if "subscriptions" in data:
        subscriptions = parse_subscriptions(settings.table(data, "subscriptions"), base_dir)
    membership, sharding = _membership_and_sharding(data, base_dir)
    governance = parse_governance(settings.table(data, "governance"), base_dir)
    xds = parse_xds(settings.table(data, "xds"), base_dir) if "xds" in data else None
    if sharding is not None:
        dispatcher = attrs.evolve(dispatcher, interest="subscribed")
    return Config(
        node_id,
        zookeeper,
        dispatcher,
        upstreams,
        projections,
        health=health,
        admin=admin,
        inspection=inspection,
        subscriptions=subscriptions,
        membership=membership,
        sharding=sharding,
        mirrors=mirrors,
        governance=governance,
        xds=xds,
        mesh=parse_mesh(settings.table(data, "mesh")),
    )


def _membership_and_sharding(
    data: Mapping[str, Any], base_dir: Path | None = None
) -> tuple[MembershipConfig | None, ShardingConfig | None]:
    """Check ``[membership]`` and ``[sharding]``, and what a shard requires of the other
    tables.

    ``[sharding]`` needs ``[membership]`` (where the shards register). ``[membership]``
    alone is the governance store only: this gateway registers nowhere and owns every
    service, so the shard-only rules below (interest, projections) do not apply to it.
    """
    if "membership" not in data:
        if "sharding" in data:
            raise ConfigError("sharding: needs a [membership] table (where the shards register)")
        return None, None
    membership = parse_membership(settings.table(data, "membership"), base_dir)
    if "sharding" not in data:
        return membership, None
    if settings.table(data, "dispatcher").get("interest") == "all":
        raise ConfigError(
            "dispatcher.interest: must be 'subscribed' with [sharding] "
            "(a shard loads only the services it owns)"
        )
    if data.get("projection"):
        # A projection subscribes to every service, which would make the shard load them all.
        raise ConfigError(
            "projection: not supported with [sharding] yet (a projection shows every service, "
            "a shard loads only the ones it owns); for policies on a projection, keep "
            "[membership] without [sharding]"
        )
    return membership, parse_sharding(settings.table(data, "sharding"))
