"""The ``zkgate`` command line."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from dispatcher import operator
from dispatcher.config import Config, ConfigError, load_config, parse_config
from dispatcher.gateway import run_gateway
from dispatcher.logs import LOG_FORMATS, configure_logging
from dispatcher.zk.store import StoreError
from metaserver import cli as meta_cli
from proxy import cli as proxy_cli

log = logging.getLogger("zkgate")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

#: serve's flags that set a ``[zookeeper]`` key; given, they override the file.
_ZOOKEEPER_FLAGS = ("listen", "data_dir", "tick_ms", "max_buffer", "max_client_cnxns",
                    "extended_types", "container_check_ms", "super_digest")  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zkgate",
        description="A ZooKeeper-compatible service-registry gateway.",
    )
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="logfmt", choices=LOG_FORMATS,
                        help="logfmt: one key=value line per event, for log pipelines "
                        "(default); plain: the classic human layout (see dispatcher/logs.py)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the ZooKeeper protocol (and fan in the configured registries)",
        description="Serve the ZooKeeper wire protocol. With no registry configured, "
        "zkgate is a single-node ZooKeeper-compatible registry on a durable embedded tree. "
        "Flags left out take their value from --config, else ZooKeeper's defaults.",
    )
    # Defaults live in dispatcher/config.py, once: a flag left out is None here,
    # so a given flag and the file's value can never be confused.
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="TOML file naming the upstream registries to fan in and the "
                       "settings below; flags given on the command line override it")
    serve.add_argument("--listen", metavar="HOST:PORT",
                       help="address of the ZooKeeper port (default: 127.0.0.1:2181)")
    serve.add_argument("--data-dir", type=Path, metavar="DIR",
                       help="where the embedded tree is kept (default: $XDG_DATA_HOME/zkgate)")
    serve.add_argument("--tick-ms", type=int, metavar="MS",
                       help="ZooKeeper's tickTime; session timeouts are clamped to "
                       "2x..20x of it (default: 2000)")
    serve.add_argument("--max-buffer", type=int, metavar="BYTES",
                       help="largest frame accepted, as jute.maxbuffer (default: 1048575)")
    serve.add_argument("--max-client-cnxns", type=int, metavar="N",
                       help="connections allowed per client IP, as maxClientCnxns; "
                       "0 for no limit (default: 60)")
    serve.add_argument("--extended-types", action="store_true", default=None,
                       help="allow TTL nodes, as zookeeper.extendedTypesEnabled=true")
    serve.add_argument("--container-check-ms", type=int, metavar="MS",
                       help="how often empty containers and expired TTL nodes are "
                       "reaped, as znode.container.checkIntervalMs (default: 60000)")
    serve.add_argument("--super-digest", metavar="USER:BASE64SHA1",
                       help="digest id allowed everything, as ZooKeeper's superDigest")
    serve.add_argument("--admin-listen", metavar="HOST:PORT|off",
                       help="address of the admin HTTP endpoint (/metrics, /health, /ready, "
                       "the status page at /), or 'off' (default: 127.0.0.1:8081)")
    meta_cli.add_subcommand(commands)
    operator.add_commands(commands)
    proxy = commands.add_parser(
        "proxy",
        help="run a sidecar proxy that routes an application's connections (see proxy/)",
        description="Learn from the Meta Server which Dispatcher owns each service, subscribe "
        "there, and forward the application's connections to healthy endpoints.",
    )
    proxy_cli.add_arguments(proxy)
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = parse_config({}) if args.config is None else load_config(args.config)
    given = {
        flag: getattr(args, flag) for flag in _ZOOKEEPER_FLAGS if getattr(args, flag) is not None
    }
    config = config.with_overrides(**given)
    if getattr(args, "admin_listen", None) is not None:
        config = config.with_admin_listen(args.admin_listen)
    return config


def tune_gc() -> None:
    """Collect young objects less often, as every zkgate process does at start.

    A registry holds hundreds of thousands of long-lived objects; with the
    default thresholds a full collection stalls the one trio thread for most
    of a second every few thousand allocations (measured by bench/fanin.py).
    """
    gc.set_threshold(50_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    tune_gc()
    if args.command == "status":
        return operator.status(args)
    if args.command == "check-config":
        return operator.check_config(args)
    if args.command == "proxy":
        return proxy_cli.run(args)
    if args.command == "meta":
        return meta_cli.run(args)
    try:
        config = _config(args)
    except ConfigError as exc:
        where = "" if args.config is None else f"config {str(args.config)!r}: "
        print(f"zkgate: error: {where}{exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(run_gateway, config)
    except BaseException as raised:  # sorted below; anything else is re-raised
        exc = _sole_cause(raised)
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_OK
        if isinstance(exc, ConfigError):
            print(f"zkgate: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError | StoreError):
            log.error("cannot serve", extra={"error": str(exc)})
            return EXIT_RUNTIME
        raise
    return EXIT_OK


def _sole_cause(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (trio's nurseries
    wrap a task's failure in one), so that a taken port reads as an OSError."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
