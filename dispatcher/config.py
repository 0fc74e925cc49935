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

    [admin]                         # the admin HTTP endpoint (faces/admin.py); on by default
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

    [[upstream]]                    # one table per registry, in precedence order
    name = "zk-main"                # unique; becomes every instance's source.adapter
    kind = "zookeeper"              # an entry point of the zkgate.upstreams group
    # ... the kind's own options, checked by its from_config

    [health]                        # central health checking (dispatcher.core.health)
    enabled = false                 # probe the instances of the services this node owns
    interval = 5.0                  # seconds between two probes of one instance
    timeout = 1.0                   # seconds a probe may take; less than interval
    rise = 2                        # passes in a row that bring a failing instance back
    fall = 3                        # failures in a row that make a passing one failing
    jitter = 0.1                    # fraction of interval added per probe, in [0, 0.5]
    concurrency = 256               # probes in flight at once (sockets)
    recheck = 0.5                   # seconds between report-triggered probes of one instance
    probe = "tcp"                   # default probe: "tcp", "http" or "none"
    path = "/health"                # default path of the http probe

    [[health.service]]              # per-service overrides
    name = "orders"
    probe = "http"
    path = "/healthz"

    [membership]                    # sharding: where the Dispatchers register (both tables
    kind = "zookeeper"              # or neither); zookeeper | etcd | memory
    address = "10.0.0.5:2181"       # ZooKeeper connect string, or etcd host:port
    root = "/zkgate"                # znode root / etcd key prefix
    session_timeout = 10.0          # ZooKeeper session / etcd lease TTL, seconds

    [sharding]                      # this Dispatcher as one shard (dispatcher.sharding.ownership)
    id = "gw-eu-1"                  # member id; default node_id
    weight = 1.0                    # capacity weight
    balance = 1.10                  # bounded-load factor: the same everywhere, Meta Servers too
    subscribe_address = "10.0.0.7:7000"   # advertised; default the bound [subscriptions] port
    zookeeper_address = "10.0.0.7:2181"   # advertised; default the bound ZooKeeper port
    services = ["orders", "users"]  # names to put in the shared catalog at start
    warm_timeout = 10.0             # a service not loaded by then is served anyway

With ``[sharding]`` the fan-in loads only the services this shard owns (and
those it is handing over), so ``[dispatcher] interest`` is ``"subscribed"``
and may not be written as ``"all"``.

The order of the ``[[upstream]]`` tables is the merge precedence (the first
upstream that reports an endpoint wins; see :mod:`dispatcher.core.fanin`).

Every mistake is found when the file is loaded, before anything starts, and
raised as one :class:`~dispatcher.core.upstream.ConfigError` whose message starts
with the path of the bad key, e.g. ``zookeeper.tick_ms: ...`` or
``upstream[1]: ...`` (array indexes count from 0) followed by the adapter's
own message for the kind's options. Unknown keys are errors, not ignored: a
misspelt option that silently falls back to its default is the worst kind of
configuration bug.

Adapter kinds are resolved one at a time by name in the entry-point group, so
a broken or missing adapter module only fails the configurations that use
it. Each upstream table is validated by calling its kind's ``from_config``
here, at load time; the gateway calls it again to build the live object, so
``from_config`` must have no side effects (no connections, no threads).
"""

from __future__ import annotations

import copy
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import attrs

from dispatcher.core.fanin import Interest
from dispatcher.core.subscriptions import DEFAULT_QUEUE
from dispatcher.core.upstream import (
    ConfigError,
    Upstream,
    layout_kind,
    reject_unknown,
    upstream_kind,
)
from dispatcher.faces.admin import AdminLimits
from dispatcher.faces.subscription_server import DEFAULT_HISTORY, SubscriptionLimits
from dispatcher.sharding.assignment import DEFAULT_BALANCE
from dispatcher.sharding.membership import MembershipConfig, MembershipConfigError
from dispatcher.sharding.ownership import DEFAULT_WARM_TIMEOUT
from dispatcher.wire import join_address, parse_address
from dispatcher.zk.fourletter import DEFAULT_WHITELIST, FourLetterWhitelist
from dispatcher.zk.mirror import MirrorConfig
from dispatcher.zk.paths import InvalidPath, is_within, validate_path
from dispatcher.zk.protocol import DEFAULT_MAX_BUFFER

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DispatcherConfig",
    "HealthConfig",
    "ServiceProbe",
    "ShardingConfig",
    "SubscriptionsConfig",
    "UpstreamConfig",
    "ZooKeeperConfig",
    "default_data_dir",
    "load_config",
    "parse_config",
]

_TOP_KEYS: Final = (
    "node_id", "zookeeper", "dispatcher", "upstream", "projection", "mirror", "health", "admin",
    "subscriptions", "membership", "sharding",
)  # fmt: skip
_PROJECTION_KEYS: Final = ("root", "layout", "hide_failing")
_MIRROR_KEYS: Final = (
    "root", "hosts", "session_timeout", "auth", "max_sessions", "max_cached", "connect_timeout",
    "idle_timeout",
)  # fmt: skip
_ZOOKEEPER_KEYS: Final = (
    "listen",
    "data_dir",
    "tick_ms",
    "max_buffer",
    "max_client_cnxns",
    "extended_types",
    "container_check_ms",
    "super_digest",
    "four_letter_words",
)
#: Command-line flags whose name is not ``--`` plus the key with dashes.
_FLAG_NAMES: Final = {"four_letter_words": "--4lw"}
_DISPATCHER_KEYS: Final = ("interest", "subscriber_queue")
_ADMIN_KEYS: Final = (
    "enabled", "listen", "max_connections", "max_connections_per_address", "header_timeout",
    "idle_timeout",
)  # fmt: skip
DEFAULT_ADMIN_LISTEN: Final = "127.0.0.1:8081"
_SUBSCRIPTIONS_KEYS: Final = ("listen", "unix", "token", "history", "max_connections")
DEFAULT_SUBSCRIPTIONS_LISTEN: Final = "127.0.0.1:7000"
_INTERESTS: Final = ("all", "subscribed")

KindLookup = Callable[[str], type[Upstream]]
"""Resolves an upstream kind to its class; raises ConfigError for an unknown one."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zkgate``, as ``zkgate serve`` uses without ``--data-dir``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zkgate"


def _valid_listen(_instance: object, _attribute: object, value: str) -> None:
    parse_address(value)


@attrs.frozen
class ZooKeeperConfig:
    """The ``[zookeeper]`` table: the ZooKeeper face on the embedded tree."""

    listen: str = attrs.field(default="127.0.0.1:2181", validator=_valid_listen)
    data_dir: Path = attrs.field(factory=default_data_dir)
    tick_ms: int = 2000
    max_buffer: int = DEFAULT_MAX_BUFFER
    max_client_cnxns: int = 60
    extended_types: bool = False
    container_check_ms: int = 60000
    super_digest: str | None = None
    four_letter_words: FourLetterWhitelist = DEFAULT_WHITELIST

    @property
    def host(self) -> str:
        return parse_address(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_address(self.listen)[1]


@attrs.frozen
class DispatcherConfig:
    """The ``[dispatcher]`` table: how the fan-in loads and serves."""

    interest: Interest = "all"
    subscriber_queue: int = DEFAULT_QUEUE


@attrs.frozen
class AdminConfig:
    """The ``[admin]`` table: the admin HTTP endpoint (see :mod:`dispatcher.faces.admin`).

    ``listen`` None means "not configured": the endpoint then tries
    :data:`DEFAULT_ADMIN_LISTEN` and, if that port is taken (a second
    gateway on the host), logs it and runs without one, as ZooKeeper does
    with its own AdminServer. A ``listen`` written out is a promise: failing
    to bind it stops the start.
    """

    enabled: bool = True
    listen: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_valid_listen)
    )
    max_connections: int = AdminLimits().max_connections
    max_connections_per_address: int = AdminLimits().max_connections_per_address
    header_timeout: float = AdminLimits().header_timeout
    idle_timeout: float = AdminLimits().idle_timeout

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to listen on."""
        return parse_address(self.listen or DEFAULT_ADMIN_LISTEN)

    def limits(self) -> AdminLimits:
        """The admin server's bounds: these settings, the rest at their defaults."""
        return AdminLimits(
            max_connections=self.max_connections,
            max_connections_per_address=self.max_connections_per_address,
            header_timeout=self.header_timeout,
            idle_timeout=self.idle_timeout,
        )

    def to_mapping(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "enabled": self.enabled, "max_connections": self.max_connections,
            "max_connections_per_address": self.max_connections_per_address,
            "header_timeout": self.header_timeout, "idle_timeout": self.idle_timeout,
        }  # fmt: skip
        if self.listen is not None:
            result["listen"] = self.listen
        return result


@attrs.frozen
class SubscriptionsConfig:
    """The ``[subscriptions]`` table: the subscription server proxies connect to.

    See :mod:`dispatcher.faces.subscription_server`. Without the table the gateway
    serves no subscriptions. ``token`` is left out of ``repr`` so that it
    never reaches a log line.
    """

    token: str = attrs.field(repr=False)
    listen: str = attrs.field(default=DEFAULT_SUBSCRIPTIONS_LISTEN, validator=_valid_listen)
    unix: Path | None = None
    history: int = DEFAULT_HISTORY
    max_connections: int = SubscriptionLimits().max_connections

    @property
    def host(self) -> str:
        return parse_address(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_address(self.listen)[1]

    def to_mapping(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "listen": self.listen, "token": self.token, "history": self.history,
            "max_connections": self.max_connections,
        }  # fmt: skip
        if self.unix is not None:
            result["unix"] = str(self.unix)
        return result


@attrs.frozen
class ShardingConfig:
    """The ``[sharding]`` table: this Dispatcher as one shard
    (see :mod:`dispatcher.sharding.ownership`).

    ``id`` None means the node id. Advertised addresses left empty are taken from the bound
    ports when the gateway starts.
    """

    id: str | None = None
    weight: float = 1.0
    balance: float = DEFAULT_BALANCE
    subscribe_address: str = ""
    zookeeper_address: str = ""
    services: tuple[str, ...] = ()
    warm_timeout: float = DEFAULT_WARM_TIMEOUT

    def to_mapping(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "weight": self.weight, "balance": self.balance, "services": list(self.services),
            "warm_timeout": self.warm_timeout,
        }  # fmt: skip
        for key in ("id", "subscribe_address", "zookeeper_address"):
            if getattr(self, key):
                result[key] = getattr(self, key)
        return result


@attrs.frozen
class UpstreamConfig:
    """One ``[[upstream]]`` table: its name, kind, the kind's class and its options.

    ``options`` is the table without ``name`` and ``kind``, exactly as read
    (nested tables and arrays included), behind a read-only view.
    """

    name: str
    kind: str
    factory: type[Upstream] = attrs.field(repr=False)
    options: Mapping[str, Any] = attrs.field(
        factory=lambda: MappingProxyType({}),
        hash=False,
        converter=lambda value: MappingProxyType(copy.deepcopy(dict(value))),
    )

    def build(self) -> Upstream:
        """A new live upstream object for this table.

        The adapter gets its own deep copy of the options, so nothing it
        keeps or changes can alter this value.
        """
        return self.factory.from_config(self.name, copy.deepcopy(dict(self.options)))


@attrs.frozen
class ProjectionConfig:
    """A read-only subtree at ``root`` showing the unified registry in ``layout``."""

    root: str
    layout: str
    #: Leave failing instances out (layouts without a status field); ServerSet
    #: shows them with status DEAD instead.
    hide_failing: bool = True


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
    #: ``[membership]`` and ``[sharding]``: both set, or both None (no sharding).
    membership: MembershipConfig | None = None
    sharding: ShardingConfig | None = None

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
            overridden = _zookeeper(table, None, where=None)
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
        zk = self.zookeeper
        zookeeper: dict[str, Any] = {
            "listen": zk.listen,
            "data_dir": str(zk.data_dir),
            "tick_ms": zk.tick_ms,
            "max_buffer": zk.max_buffer,
            "max_client_cnxns": zk.max_client_cnxns,
            "extended_types": zk.extended_types,
            "container_check_ms": zk.container_check_ms,
            "four_letter_words": str(zk.four_letter_words),
        }
        if zk.super_digest is not None:
            zookeeper["super_digest"] = zk.super_digest
        result: dict[str, Any] = {
            "zookeeper": zookeeper,
            "dispatcher": {
                "interest": self.dispatcher.interest,
                "subscriber_queue": self.dispatcher.subscriber_queue,
            },
            "upstream": [
                {"name": u.name, "kind": u.kind, **copy.deepcopy(dict(u.options))}
                for u in self.upstreams
            ],
        }
        if self.node_id is not None:
            result["node_id"] = self.node_id
        if self.projections:
            result["projection"] = [
                {"root": p.root, "layout": p.layout, "hide_failing": p.hide_failing}
                for p in self.projections
            ]
        if self.mirrors:
            result["mirror"] = [
                {
                    "root": m.root,
                    "hosts": ",".join(join_address(h, p) for h, p in m.hosts),
                    "session_timeout": m.session_timeout_ms / 1000,
                    "auth": [f"{scheme}:{cred.decode()}" for scheme, cred in m.auth],
                    "max_sessions": m.max_sessions,
                    "max_cached": m.max_cached,
                    "connect_timeout": m.connect_timeout,
                    "idle_timeout": m.idle_timeout,
                }
                for m in self.mirrors
            ]
        if self.health != HealthConfig():
            result["health"] = self.health.to_mapping()
        if self.admin != AdminConfig():
            result["admin"] = self.admin.to_mapping()
        if self.subscriptions is not None:
            result["subscriptions"] = self.subscriptions.to_mapping()
        if self.membership is not None:
            result["membership"] = attrs.asdict(self.membership)
        if self.sharding is not None:
            result["sharding"] = self.sharding.to_mapping()
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
    reject_unknown(data, _TOP_KEYS, "")
    node_id = None
    if "node_id" in data:
        node_id = _string(data["node_id"], "node_id")
    zookeeper = _zookeeper(_table(data, "zookeeper"), base_dir)
    dispatcher = _dispatcher(_table(data, "dispatcher"))
    upstreams = _upstreams(data.get("upstream", []), lookup)
    projections = _projections(data.get("projection", []))
    mirrors = _mirrors(data.get("mirror", []), projections)
    health = _health(_table(data, "health"))
    admin = _admin(_table(data, "admin"))
    subscriptions = None
    if "subscriptions" in data:
        subscriptions = _subscriptions(_table(data, "subscriptions"), base_dir)
    membership, sharding = _membership_and_sharding(data)
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
        subscriptions=subscriptions,
        membership=membership,
        sharding=sharding,
        mirrors=mirrors,
    )


def _zookeeper(
    table: Mapping[str, Any], base_dir: Path | None, where: str | None = "zookeeper"
) -> ZooKeeperConfig:
    """Check the ``[zookeeper]`` table (``where=None``: command-line flags, named as such)."""

    def name(key: str) -> str:
        if where:
            return f"{where}.{key}"
        return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))

    reject_unknown(table, _ZOOKEEPER_KEYS, where or "")
    options: dict[str, Any] = {}
    if "listen" in table:
        options["listen"] = _address(table["listen"], name("listen"))
    if "data_dir" in table:
        data_dir = _user_path(table["data_dir"], name("data_dir"))
        if not data_dir.is_absolute() and base_dir is not None:
            data_dir = base_dir / data_dir
        options["data_dir"] = data_dir
    for key in ("tick_ms", "max_buffer", "container_check_ms"):
        if key in table:
            options[key] = _integer(table[key], name(key), minimum=1)
    if "max_client_cnxns" in table:
        options["max_client_cnxns"] = _integer(
            table["max_client_cnxns"], name("max_client_cnxns"), minimum=0
        )
    if "extended_types" in table:
        options["extended_types"] = _boolean(table["extended_types"], name("extended_types"))
    if "super_digest" in table:
        digest = _string(table["super_digest"], name("super_digest"))
        if ":" not in digest:
            raise ConfigError(f"{name('super_digest')}: expected USER:BASE64SHA1")
        options["super_digest"] = digest
    if "four_letter_words" in table:
        options["four_letter_words"] = _four_letter_words(
            table["four_letter_words"], name("four_letter_words")
        )
    return ZooKeeperConfig(**options)


def _four_letter_words(value: Any, where: str) -> FourLetterWhitelist:
    """ZooKeeper's ``4lw.commands.whitelist`` string (``"ruok, srvr"``, ``"*"``), so a
    value copied from zoo.cfg means the same here; an empty string leaves only ``srvr``."""
    if not isinstance(value, str):
        raise ConfigError(
            f'{where}: must be a comma-separated string such as "ruok, srvr", not {_type(value)}'
        )
    try:
        return FourLetterWhitelist.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _dispatcher(table: Mapping[str, Any]) -> DispatcherConfig:
    reject_unknown(table, _DISPATCHER_KEYS, "dispatcher")
    options: dict[str, Any] = {}
    if "interest" in table:
        interest = _string(table["interest"], "dispatcher.interest")
        if interest not in _INTERESTS:
            raise ConfigError(
                f"dispatcher.interest: must be one of {', '.join(map(repr, _INTERESTS))}, "
                f"not {interest!r}"
            )
        options["interest"] = interest
    if "subscriber_queue" in table:
        options["subscriber_queue"] = _integer(
            table["subscriber_queue"], "dispatcher.subscriber_queue", minimum=1
        )
    return DispatcherConfig(**options)


def _admin(table: Mapping[str, Any], where: str = "admin") -> AdminConfig:
    """Check the ``[admin]`` table (``where="--admin"``: the command line's flags)."""
    reject_unknown(table, _ADMIN_KEYS, where)
    options: dict[str, Any] = {}
    if "enabled" in table:
        options["enabled"] = _boolean(table["enabled"], f"{where}.enabled")
    if "listen" in table:
        options["listen"] = _address(table["listen"], f"{where}.listen")
    for key in ("max_connections", "max_connections_per_address"):
        if key in table:
            options[key] = _integer(table[key], f"{where}.{key}", minimum=1)
    # A head allowed longer than a whole request (request_timeout) would be a
    # setting without effect, and an idle connection kept for days a leak of
    # slots: refuse both rather than ignore them.
    request_timeout = AdminLimits().request_timeout
    for key, most in (("header_timeout", request_timeout), ("idle_timeout", 86400.0)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key}: must be a number of seconds, not {_type(value)}")
            if not 0 < value <= most:
                raise ConfigError(
                    f"{where}.{key}: must be above 0 and at most {most:g} seconds, not {value}"
                )
            options[key] = float(value)
    return AdminConfig(**options)


def _subscriptions(table: Mapping[str, Any], base_dir: Path | None) -> SubscriptionsConfig:
    where = "subscriptions"
    reject_unknown(table, _SUBSCRIPTIONS_KEYS, where)
    if "token" not in table:
        raise ConfigError(f"{where}.token: missing (every subscriber must present it)")
    options: dict[str, Any] = {"token": _string(table["token"], f"{where}.token")}
    if "listen" in table:
        options["listen"] = _address(table["listen"], f"{where}.listen")
    if "unix" in table:
        unix = _user_path(table["unix"], f"{where}.unix")
        if not unix.is_absolute() and base_dir is not None:
            unix = base_dir / unix
        options["unix"] = unix
    if "history" in table:
        options["history"] = _integer(table["history"], f"{where}.history", minimum=0)
    if "max_connections" in table:
        options["max_connections"] = _integer(
            table["max_connections"], f"{where}.max_connections", minimum=1
        )
    return SubscriptionsConfig(**options)


_SHARDING_KEYS: Final = (
    "id", "weight", "balance", "subscribe_address", "zookeeper_address", "services",
    "warm_timeout",
)  # fmt: skip


def _membership_and_sharding(
    data: Mapping[str, Any],
) -> tuple[MembershipConfig | None, ShardingConfig | None]:
    """Check ``[membership]`` and ``[sharding]``, which come together or not at all."""
    if "membership" not in data and "sharding" not in data:
        return None, None
    if "sharding" not in data:
        raise ConfigError("membership: needs a [sharding] table (this shard's id and weight)")
    if "membership" not in data:
        raise ConfigError("sharding: needs a [membership] table (where the shards register)")
    try:
        membership = MembershipConfig.from_table(_table(data, "membership"))
    except MembershipConfigError as exc:
        raise ConfigError(str(exc)) from None
    if _table(data, "dispatcher").get("interest") == "all":
        raise ConfigError(
            "dispatcher.interest: must be 'subscribed' with [sharding] "
            "(a shard loads only the services it owns)"
        )
    if data.get("projection"):
        # A projection subscribes to every service, which would make the shard load them all.
        raise ConfigError(
            "projection: not supported with [sharding] yet (a projection shows every service, "
            "a shard loads only the ones it owns)"
        )
    table = _table(data, "sharding")
    where = "sharding"
    reject_unknown(table, _SHARDING_KEYS, where)
    options: dict[str, Any] = {}
    if "id" in table:
        member_id = _string(table["id"], f"{where}.id")
        if "/" in member_id or member_id in (".", ".."):
            raise ConfigError(f"{where}.id: must not contain '/' or be '.' or '..'")
        options["id"] = member_id
    for key, low in (("weight", 0.0), ("balance", 1.0), ("warm_timeout", 0.0)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key}: must be a number, not {_type(value)}")
            bounded = value >= low if key == "balance" else value > low
            if not bounded or value in (float("inf"), float("nan")) or value != value:
                bound = ">= 1" if key == "balance" else "> 0"
                raise ConfigError(f"{where}.{key}: must be a finite number {bound}, not {value}")
            options[key] = float(value)
    for key in ("subscribe_address", "zookeeper_address"):
        if key in table:
            options[key] = _address(table[key], f"{where}.{key}")
    if "services" in table:
        services = table["services"]
        if not isinstance(services, list) or not all(
            isinstance(name, str) and name and name not in (".", "..") for name in services
        ):
            raise ConfigError(f"{where}.services: must be an array of service names")
        options["services"] = tuple(services)
    return membership, ShardingConfig(**options)


def _upstreams(value: Any, lookup: KindLookup) -> tuple[UpstreamConfig, ...]:
    result: list[UpstreamConfig] = []
    seen: dict[str, int] = {}
    for index, (where, table) in enumerate(_array_of_tables(value, "upstream")):
        for key in ("name", "kind"):
            if key not in table:
                raise ConfigError(f"{where}.{key}: missing (every upstream needs one)")
        name = _string(table["name"], f"{where}.name")
        if name in seen:
            raise ConfigError(
                f"{where}.name: {name!r} is already the name of upstream[{seen[name]}]"
            )
        seen[name] = index
        kind = _string(table["kind"], f"{where}.kind")
        try:
            factory = lookup(kind)
        except ConfigError as exc:
            raise ConfigError(f"{where}.kind: {exc}") from None
        options = {k: v for k, v in table.items() if k not in ("name", "kind")}
        upstream = UpstreamConfig(name, kind, factory, options)
        try:
            upstream.build()
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise ConfigError(_adapter_message(where, name, str(exc))) from None
        result.append(upstream)
    return tuple(result)


def _array_of_tables(value: Any, key: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The tables of ``[[key]]``, each with its place for messages (``key[2]``)."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables, written [[{key}]]")
    tables = []
    for index, table in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: must be a table, not {_type(table)}")
        tables.append((where, table))
    return tables


def _projections(value: Any) -> tuple[ProjectionConfig, ...]:
    result: list[ProjectionConfig] = []
    for where, table in _array_of_tables(value, "projection"):
        reject_unknown(table, _PROJECTION_KEYS, where)
        root = _mount_root(table, where, ("root", "layout"), [p.root for p in result])
        layout_name = _string(table["layout"], f"{where}.layout")
        try:
            layout_kind(layout_name)
        except ConfigError as exc:
            raise ConfigError(f"{where}.layout: {exc}") from None
        hide = table.get("hide_failing", True)
        if not isinstance(hide, bool):
            raise ConfigError(f"{where}.hide_failing: must be a boolean, not {_type(hide)}")
        result.append(ProjectionConfig(root, layout_name, hide))
    return tuple(result)


def _mount_root(
    table: Mapping[str, Any], where: str, required: tuple[str, ...], taken: list[str]
) -> str:
    """The ``root`` of a mount table (projection or mirror), its required keys present."""
    kind = where.partition("[")[0]
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}.{key}: missing (every {kind} needs one)")
    root = _string(table["root"], f"{where}.root")
    try:
        validate_path(root)
    except InvalidPath as exc:
        raise ConfigError(f"{where}.root: {exc}") from None
    if root == "/" or is_within(root, "/zookeeper"):
        raise ConfigError(f"{where}.root: cannot be / or under /zookeeper")
    for other in taken:
        if is_within(root, other) or is_within(other, root):
            raise ConfigError(f"{where}.root: {root} overlaps the mount at {other}")
    return root


def _mirrors(value: Any, projections: tuple[ProjectionConfig, ...]) -> tuple[MirrorConfig, ...]:
    result: list[MirrorConfig] = []
    for where, table in _array_of_tables(value, "mirror"):
        reject_unknown(table, _MIRROR_KEYS, where)
        taken = [p.root for p in projections] + [m.root for m in result]
        root = _mount_root(table, where, ("root", "hosts"), taken)
        hosts = []
        for part in _string(table["hosts"], f"{where}.hosts").split(","):
            try:
                hosts.append(parse_address(part.strip()))
            except ValueError as exc:
                raise ConfigError(f"{where}.hosts: {exc}") from None
        auth = []
        entries = table.get("auth", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{where}.auth: must be an array, not {_type(entries)}")
        for index, entry in enumerate(entries):
            scheme, colon, credential = _string(entry, f"{where}.auth[{index}]").partition(":")
            if scheme != "digest" or not colon:
                raise ConfigError(f"{where}.auth[{index}]: must be 'digest:user:password'")
            auth.append((scheme, credential.encode()))
        timeout = _seconds(table.get("session_timeout", 10.0), f"{where}.session_timeout")
        result.append(MirrorConfig(
            root, tuple(hosts), session_timeout_ms=int(timeout * 1000), auth=tuple(auth),
            max_sessions=_integer(table.get("max_sessions", 32), f"{where}.max_sessions",
                                  minimum=1),
            max_cached=_integer(table.get("max_cached", 200_000), f"{where}.max_cached",
                                minimum=100),
            connect_timeout=_seconds(table.get("connect_timeout", 5.0),
                                     f"{where}.connect_timeout"),
            idle_timeout=_seconds(table.get("idle_timeout", 60.0), f"{where}.idle_timeout"),
        ))  # fmt: skip
    return tuple(result)


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: must be a positive number of seconds, not {value!r}")
    return float(value)


def _adapter_message(where: str, name: str, message: str) -> str:
    # Adapters name the table by its name ("upstream 'zk': ..."); put the
    # index in front so the message points into the file either way.
    own = f"upstream {name!r}"
    if message.startswith(own):
        return f"{where} ({name!r}){message[len(own) :]}"
    return f"{where} ({name!r}): {message}"


# ----------------------------------------------------------------- health

PROBES: Final = ("tcp", "http", "none")
"""Probe kinds: a TCP connect, an HTTP GET (2xx or 3xx passes), or no probing."""

_HEALTH_KEYS: Final = (
    "enabled", "interval", "timeout", "rise", "fall", "jitter", "concurrency", "recheck",
    "probe", "path", "service",
)  # fmt: skip
_HEALTH_SERVICE_KEYS: Final = ("name", "probe", "path")


def _check_probe(probe: str, path: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe: must be one of {', '.join(map(repr, PROBES))}, not {probe!r}")
    # The path goes into a request line as is: no room for whitespace.
    if not path.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in path):
        raise ValueError(f"path: must start with / and contain no whitespace, not {path!r}")


@attrs.frozen
class ServiceProbe:
    """A ``[[health.service]]`` table: how one service's instances are probed."""

    name: str
    probe: str = "tcp"
    path: str = "/health"

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        _check_probe(self.probe, self.path)


@attrs.frozen
class HealthConfig:
    """The ``[health]`` table: the central health checker (see :mod:`dispatcher.core.health`).

    Times are in seconds. Invalid values raise ``ValueError`` naming the key.
    """

    enabled: bool = False
    interval: float = 5.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1
    concurrency: int = 256
    recheck: float = 0.5
    probe: str = "tcp"
    path: str = "/health"
    services: tuple[ServiceProbe, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"interval: must be positive, not {self.interval}")
        # A probe slower than the interval would overlap the next one of the
        # same instance: one probe per instance per interval is the contract.
        if not 0 < self.timeout < self.interval:
            raise ValueError(
                f"timeout: must be positive and less than interval, not {self.timeout}"
            )
        if not 0 <= self.jitter <= 0.5:
            raise ValueError(f"jitter: must be in [0, 0.5], not {self.jitter}")
        if not self.recheck > 0:
            raise ValueError(f"recheck: must be positive, not {self.recheck}")
        for key in ("rise", "fall", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, not {getattr(self, key)}")
        _check_probe(self.probe, self.path)
        names = [service.name for service in self.services]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"service: names must be unique, repeated: {repeated}")

    def probe_for(self, service: str) -> ServiceProbe:
        """How ``service`` is probed: its own table, or the defaults."""
        for override in self.services:
            if override.name == service:
                return override
        return ServiceProbe(service, self.probe, self.path)

    def to_mapping(self) -> dict[str, Any]:
        """The ``[health]`` table as TOML would give it."""
        table: dict[str, Any] = {
            key: getattr(self, key)
            for key in _HEALTH_KEYS if key != "service"
        }  # fmt: skip
        if self.services:
            table["service"] = [
                {"name": s.name, "probe": s.probe, "path": s.path} for s in self.services
            ]
        return table


def _health(table: Mapping[str, Any]) -> HealthConfig:
    reject_unknown(table, _HEALTH_KEYS, "health")
    options: dict[str, Any] = {}
    if "enabled" in table:
        options["enabled"] = _boolean(table["enabled"], "health.enabled")
    for key in ("interval", "timeout", "jitter", "recheck"):
        if key in table:
            value = table[key]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"health.{key}: must be a number, not {_type(value)}")
            options[key] = float(value)
    for key in ("rise", "fall", "concurrency"):
        if key in table:
            options[key] = _integer(table[key], f"health.{key}", minimum=1)
    for key in ("probe", "path"):
        if key in table:
            options[key] = _string(table[key], f"health.{key}")
    overrides: list[ServiceProbe] = []
    for where, entry in _array_of_tables(table.get("service", []), "health.service"):
        reject_unknown(entry, _HEALTH_SERVICE_KEYS, where)
        if "name" not in entry:
            raise ConfigError(f"{where}.name: missing (every [[health.service]] needs one)")
        fields = {key: _string(entry[key], f"{where}.{key}") for key in entry}
        fields.setdefault("probe", options.get("probe", "tcp"))
        fields.setdefault("path", options.get("path", "/health"))
        try:
            overrides.append(ServiceProbe(**fields))
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    try:
        return HealthConfig(**options, services=tuple(overrides))
    except ValueError as exc:
        raise ConfigError(f"health.{exc}") from None


# ----------------------------------------------------------------- checks


def _type(value: object) -> str:
    """The TOML name of a parsed value's type, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a table, not {_type(value)}")
    return value


def _address(value: Any, where: str) -> str:
    """A ``HOST:PORT`` string, checked; the ConfigError names ``where``."""
    address = _string(value, where)
    try:
        parse_address(address)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return address


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {_type(value)}")
    if not value:
        raise ConfigError(f"{where}: must not be empty")
    return value


def _user_path(value: Any, where: str) -> Path:
    """A non-empty path string with ``~`` expanded; the ConfigError names ``where``."""
    try:
        return Path(_string(value, where)).expanduser()
    except RuntimeError:  # what pathlib raises for ~user when there is no such user
        raise ConfigError(f"{where}: cannot expand the ~ in {value!r}") from None


def _integer(value: Any, where: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: must be an integer, not {_type(value)}")
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, not {value}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, not {_type(value)}")
    return value
