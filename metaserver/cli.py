"""``zkgate meta --listen HOST:PORT --config FILE``: run one Meta Server.

The configuration file (TOML)::

    token = "a long random secret"   # required: proxies present it in their Hello
    server_id = "meta-1"             # optional: named in the Welcome (default meta-<host>)

    [membership]                     # the same store as the Dispatchers' (required)
    kind = "zookeeper"               # zookeeper | etcd
    address = "10.0.0.5:2181"
    root = "/zkgate"
    session_timeout = 10.0

    [sharding]
    balance = 1.10                   # must be the Dispatchers' value (the default is theirs)

    [meta]                           # all optional
    listen = "127.0.0.1:7400"        # --listen overrides it
    max_connections = 10000
    max_frame = 1048576
    max_services = 10000             # names per Lookup / WatchAssignments
    max_watched = 100000             # names watched per connection
    hello_timeout = 10.0
    send_timeout = 30.0

    [meta.tls]                       # optional: TLS for proxies (see dispatcher.tls)
    cert = "meta.pem"                # relative paths: relative to this file
    key = "meta-key.pem"
    ca = "proxies-ca.pem"
    verify_client = true

Kind ``memory`` is refused here: in-memory membership lives inside one process, and a Meta
Server process of its own would see no Dispatcher. (In one process, embed
:class:`~metaserver.server.MetaServer` on the same
:class:`~dispatcher.sharding.membership.MemoryStore`.)

Several Meta Servers may run with the same file: they keep no state and answer the same.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from dispatcher.settings import ConfigError, reject_unknown
from dispatcher.sharding.assignment import DEFAULT_BALANCE
from dispatcher.sharding.membership import (
    MembershipConfig,
    MembershipConfigError,
    MembershipStore,
    open_membership,
)
from dispatcher.stopping import run_until_stopped
from dispatcher.tls import ServerTls, TlsConfig, parse_tls, warn_if_exposed
from dispatcher.wire import parse_address
from metaserver.server import MetaLimits, MetaServer

__all__ = ["DEFAULT_LISTEN", "MetaConfig", "add_subcommand", "load_meta_config", "run_meta"]

log = logging.getLogger("zkgate.meta")

DEFAULT_LISTEN: Final = "127.0.0.1:7400"
_TOP_KEYS: Final = ("token", "server_id", "membership", "sharding", "meta")
_META_INTS: Final = ("max_connections", "max_frame", "max_services", "max_watched")
_META_SECONDS: Final = ("hello_timeout", "send_timeout")


@attrs.frozen
class MetaConfig:
    """A checked ``zkgate meta`` configuration. ``token`` stays out of ``repr``."""

    membership: MembershipConfig
    token: str = attrs.field(repr=False)
    listen: str = DEFAULT_LISTEN
    server_id: str = ""
    balance: float = DEFAULT_BALANCE
    limits: MetaLimits = attrs.field(factory=MetaLimits)
    #: TLS for the proxies' connections; None: plain text.
    tls: TlsConfig | None = None


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise MembershipConfigError(f"{key}: must be a table")
    return value


def parse_meta_config(
    data: Mapping[str, Any], *, listen: str | None = None, base_dir: Path | None = None
) -> MetaConfig:
    """Check a parsed file; ``listen`` (the command line's) wins over ``[meta] listen``.
    Raises :class:`MembershipConfigError` naming the bad key; relative paths in
    ``[meta.tls]`` are relative to ``base_dir``."""
    reject_unknown(data, _TOP_KEYS, "", MembershipConfigError)
    token = data.get("token")
    if not isinstance(token, str) or not token:
        raise MembershipConfigError("token: required, a non-empty string (proxies present it)")
    server_id = data.get("server_id", "")
    if not isinstance(server_id, str):
        raise MembershipConfigError("server_id: must be a string")
    if "membership" not in data:
        raise MembershipConfigError("membership: missing (the store the Dispatchers register in)")
    membership = MembershipConfig.from_table(_table(data, "membership"), base_dir=base_dir)
    if membership.kind == "memory":
        raise MembershipConfigError(
            "membership.kind: 'memory' lives inside one process; zkgate meta needs "
            "'zookeeper' or 'etcd'"
        )
    sharding = _table(data, "sharding")
    reject_unknown(sharding, ("balance",), "sharding", MembershipConfigError)
    balance = sharding.get("balance", DEFAULT_BALANCE)
    if isinstance(balance, bool) or not isinstance(balance, int | float):
        raise MembershipConfigError("sharding.balance: must be a number")
    if not (math.isfinite(balance) and balance >= 1):
        raise MembershipConfigError(f"sharding.balance: must be >= 1, not {balance}")
    meta = _table(data, "meta")
    reject_unknown(
        meta, ("listen", "tls", *_META_INTS, *_META_SECONDS), "meta", MembershipConfigError
    )
    tls = None
    if "tls" in meta:
        try:
            tls = parse_tls(meta["tls"], "meta.tls", base_dir)
        except ConfigError as exc:
            raise MembershipConfigError(str(exc)) from None
    limits: dict[str, Any] = {}
    for key in _META_INTS:
        if key in meta:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MembershipConfigError(f"meta.{key}: must be an integer >= 1")
            limits[key] = value
    for key in _META_SECONDS:
        if key in meta:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise MembershipConfigError(f"meta.{key}: must be a number of seconds > 0")
            limits[key] = float(value)
    where = "--listen" if listen is not None else "meta.listen"
    address = listen if listen is not None else meta.get("listen", DEFAULT_LISTEN)
    if not isinstance(address, str):
        raise MembershipConfigError(f"{where}: must be a string")
    try:
        parse_address(address)
    except ValueError as exc:
        raise MembershipConfigError(f"{where}: {exc}") from None
    return MetaConfig(
        membership, token, address, server_id, float(balance), MetaLimits(**limits), tls
    )


def load_meta_config(path: Path | str, *, listen: str | None = None) -> MetaConfig:
    try:
        with Path(path).open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise MembershipConfigError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MembershipConfigError(f"not valid TOML: {exc}") from None
    return parse_meta_config(data, listen=listen, base_dir=Path(path).parent)


async def run_meta(
    config: MetaConfig,
    *,
    membership: MembershipStore | None = None,
    task_status: trio.TaskStatus[tuple[MetaServer, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a Meta Server until cancelled; ``started((server, bound port))``.

    ``membership`` replaces the store the configuration names (tests, embedding).
    """
    store = membership or open_membership(config.membership, watch_warm=False)
    server = MetaServer(
        store,
        token=config.token,
        server_id=config.server_id,
        balance=config.balance,
        limits=config.limits,
    )
    host, port = parse_address(config.listen)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(server.run)
        tls = None if config.tls is None else ServerTls(config.tls, "meta")
        bound = await nursery.start(server.serve, host, port, tls)
        warn_if_exposed("meta", host, config.tls)
        task_status.started((server, bound))


def add_subcommand(commands: Any) -> None:
    """Add ``meta`` to the ``zkgate`` command line (``commands``: its subparsers)."""
    meta: argparse.ArgumentParser = commands.add_parser(
        "meta",
        help="answer proxies which Dispatcher shard owns each service",
        description="Run a Meta Server: a stateless reader of the Dispatchers' membership "
        "that answers Lookup and WatchAssignments over the subscription protocol. Run "
        "several with the same configuration; they answer the same.",
    )
    meta.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        required=True,
        help="TOML file: token, [membership], [sharding] balance, [meta] limits",
    )
    meta.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to serve on (default: [meta] listen, else {DEFAULT_LISTEN})",
    )
    meta.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``zkgate meta``: 0 when stopped (SIGINT or SIGTERM), 2 for a bad configuration,
    1 if it cannot serve."""
    try:
        config = load_meta_config(args.config, listen=args.listen)
    except MembershipConfigError as exc:
        print(f"zkgate: error: config {str(args.config)!r}: {exc}", file=sys.stderr)
        return 2
    try:
        run_until_stopped(functools.partial(run_meta, config), what="zkgate meta")
    except OSError as exc:
        log.error("cannot serve", extra={"error": str(exc)})
        return 1
    return 0
