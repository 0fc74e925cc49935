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

    [dispatcher]                    # the fan-in (all optional)
    interest = "all"                # or "subscribed": load only subscribed services
    subscriber_queue = 1024         # updates a subscriber may lag before it is collapsed

    [[upstream]]                    # one table per registry, in precedence order
    name = "zk-main"                # unique; becomes every instance's source.adapter
    kind = "zookeeper"              # an entry point of the zkgate.upstreams group
    # ... the kind's own options, checked by its from_config

The order of the ``[[upstream]]`` tables is the merge precedence (the first
upstream that reports an endpoint wins; see :mod:`dispatcher.fanin`).

Every mistake is found when the file is loaded, before anything starts, and
raised as one :class:`~dispatcher.upstream.ConfigError` whose message starts
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

from dispatcher.fanin import Interest
from dispatcher.subscriptions import DEFAULT_QUEUE
from dispatcher.upstream import ConfigError, Upstream, upstream_kind
from dispatcher.zk.protocol import DEFAULT_MAX_BUFFER
from dispatcher.zk.server import parse_listen

__all__ = [
    "Config",
    "ConfigError",
    "DispatcherConfig",
    "UpstreamConfig",
    "ZooKeeperConfig",
    "default_data_dir",
    "load_config",
    "parse_config",
]

_TOP_KEYS: Final = ("node_id", "zookeeper", "dispatcher", "upstream")
_ZOOKEEPER_KEYS: Final = (
    "listen",
    "data_dir",
    "tick_ms",
    "max_buffer",
    "max_client_cnxns",
    "extended_types",
    "container_check_ms",
    "super_digest",
)
_DISPATCHER_KEYS: Final = ("interest", "subscriber_queue")
_INTERESTS: Final = ("all", "subscribed")

KindLookup = Callable[[str], type[Upstream]]
"""Resolves an upstream kind to its class; raises ConfigError for an unknown one."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zkgate``, as ``zkgate serve`` uses without ``--data-dir``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zkgate"


def _valid_listen(_instance: object, _attribute: object, value: str) -> None:
    parse_listen(value)


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

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


@attrs.frozen
class DispatcherConfig:
    """The ``[dispatcher]`` table: how the fan-in loads and serves."""

    interest: Interest = "all"
    subscriber_queue: int = DEFAULT_QUEUE


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
        factory=lambda: MappingProxyType({}), hash=False,
        converter=lambda value: MappingProxyType(copy.deepcopy(dict(value))),
    )

    def build(self) -> Upstream:
        """A new live upstream object for this table.

        The adapter gets its own deep copy of the options, so nothing it
        keeps or changes can alter this value.
        """
        return self.factory.from_config(self.name, copy.deepcopy(dict(self.options)))


@attrs.frozen
class Config:
    """The whole configuration. ``node_id`` None means the default (see :attr:`node`)."""

    node_id: str | None = None
    # Factories: the default data directory depends on the environment at
    # load time, not at import time.
    zookeeper: ZooKeeperConfig = attrs.field(factory=ZooKeeperConfig)
    dispatcher: DispatcherConfig = attrs.field(factory=DispatcherConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()

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
    return parse_config(data, base_dir=path.parent, kinds=kinds)


def parse_config(
    data: Mapping[str, Any], *, base_dir: Path | None = None, kinds: KindLookup | None = None
) -> Config:
    """Check an already parsed TOML document; see :func:`load_config`."""
    lookup = kinds or upstream_kind
    _reject_unknown(data, _TOP_KEYS, "")
    node_id = None
    if "node_id" in data:
        node_id = _string(data["node_id"], "node_id")
    zookeeper = _zookeeper(_table(data, "zookeeper"), base_dir)
    dispatcher = _dispatcher(_table(data, "dispatcher"))
    upstreams = _upstreams(data.get("upstream", []), lookup)
    return Config(node_id, zookeeper, dispatcher, upstreams)


def _zookeeper(
    table: Mapping[str, Any], base_dir: Path | None, where: str | None = "zookeeper"
) -> ZooKeeperConfig:
    """Check the ``[zookeeper]`` table (``where=None``: command-line flags, named as such)."""

    def name(key: str) -> str:
        return f"{where}.{key}" if where else "--" + key.replace("_", "-")

    _reject_unknown(table, _ZOOKEEPER_KEYS, where or "")
    options: dict[str, Any] = {}
    if "listen" in table:
        listen = _string(table["listen"], name("listen"))
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(f"{name('listen')}: {exc}") from None
        options["listen"] = listen
    if "data_dir" in table:
        data_dir = Path(_string(table["data_dir"], name("data_dir"))).expanduser()
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
    return ZooKeeperConfig(**options)


def _dispatcher(table: Mapping[str, Any]) -> DispatcherConfig:
    _reject_unknown(table, _DISPATCHER_KEYS, "dispatcher")
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


def _upstreams(value: Any, lookup: KindLookup) -> tuple[UpstreamConfig, ...]:
    if isinstance(value, Mapping):
        raise ConfigError("upstream: must be an array of tables, written [[upstream]]")
    if not isinstance(value, list):
        raise ConfigError(f"upstream: must be an array of tables, not {_type(value)}")
    result: list[UpstreamConfig] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(value):
        where = f"upstream[{index}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: must be a table, not {_type(table)}")
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


def _adapter_message(where: str, name: str, message: str) -> str:
    # Adapters name the table by its name ("upstream 'zk': ..."); put the
    # index in front so the message points into the file either way.
    own = f"upstream {name!r}"
    if message.startswith(own):
        return f"{where} ({name!r}){message[len(own):]}"
    return f"{where} ({name!r}): {message}"


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


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"{path}: unknown key (known here: {', '.join(known)})")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {_type(value)}")
    if not value:
        raise ConfigError(f"{where}: must not be empty")
    return value


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
