"""The ``zkgate`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from dispatcher.config import Config, ConfigError, load_config
from dispatcher.gateway import run_gateway
from dispatcher.zk.engine import Engine, EngineConfig
from dispatcher.zk.protocol import DEFAULT_MAX_BUFFER
from dispatcher.zk.server import ServerLimits, ZooKeeperServer, parse_listen
from dispatcher.zk.store import StoreError, TreeStore

log = logging.getLogger("zkgate")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_RUNTIME = 1


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zkgate"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zkgate",
        description="A ZooKeeper-compatible service-registry gateway.",
    )
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the ZooKeeper protocol on the embedded tree",
        description="Serve the ZooKeeper wire protocol. With no registry configured, "
        "zkgate is a single-node ZooKeeper-compatible registry on a durable embedded tree.",
    )
    serve.add_argument("--listen", default="127.0.0.1:2181", metavar="HOST:PORT",
                       help="address of the ZooKeeper port (default: %(default)s)")
    serve.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                       help="where the embedded tree is kept (default: $XDG_DATA_HOME/zkgate)")
    serve.add_argument("--tick-ms", type=int, default=2000, metavar="MS",
                       help="ZooKeeper's tickTime; session timeouts are clamped to "
                       "2x..20x of it (default: %(default)s)")
    serve.add_argument("--max-buffer", type=int, default=DEFAULT_MAX_BUFFER, metavar="BYTES",
                       help="largest frame accepted, as jute.maxbuffer (default: %(default)s)")
    serve.add_argument("--max-client-cnxns", type=int, default=60, metavar="N",
                       help="connections allowed per client IP, as maxClientCnxns; "
                       "0 for no limit (default: %(default)s)")
    serve.add_argument("--extended-types", action="store_true",
                       help="allow TTL nodes, as zookeeper.extendedTypesEnabled=true")
    serve.add_argument("--container-check-ms", type=int, default=60000, metavar="MS",
                       help="how often empty containers and expired TTL nodes are "
                       "reaped, as znode.container.checkIntervalMs (default: %(default)s)")
    serve.add_argument("--super-digest", default=None, metavar="USER:BASE64SHA1",
                       help="digest id allowed everything, as ZooKeeper's superDigest")
    serve.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="TOML file naming the upstream registries to fan in, and the "
                       "settings above; flags given on the command line override it")
    return parser


# The serve flags that, given with --config, override the file's [zookeeper] table.
_OVERRIDES = ("listen", "data_dir", "tick_ms", "max_buffer", "max_client_cnxns",
              "extended_types", "container_check_ms", "super_digest")


def _typed_flags(argv: Sequence[str]) -> set[str]:
    """Which of the overriding flags the user actually typed.

    argparse fills in defaults, so ``--listen 127.0.0.1:2181`` typed out and
    the default look alike; a probe parser whose defaults are suppressed
    tells them apart (it accepts the same abbreviations, and leaves the rest
    of the command line alone).
    """
    probe = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for dest in _OVERRIDES:
        flag = "--" + dest.replace("_", "-")
        if dest == "extended_types":
            probe.add_argument(flag, dest=dest, action="store_true")
        else:
            probe.add_argument(flag, dest=dest)
    given, _rest = probe.parse_known_args(argv)
    return set(vars(given))


def _load_config(args: argparse.Namespace, argv: Sequence[str]) -> Config:
    typed = _typed_flags(argv)
    config = load_config(args.config)
    return config.with_overrides(**{dest: getattr(args, dest) for dest in typed})


def _run_config(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        config = _load_config(args, argv)
    except ConfigError as exc:
        print(f"zkgate: error: config {str(args.config)!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(run_gateway, config)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return EXIT_RUNTIME
    return EXIT_OK


async def _serve(args: argparse.Namespace) -> None:
    host, port = parse_listen(args.listen)
    data_dir = args.data_dir or _default_data_dir()
    store = TreeStore(data_dir)
    try:
        engine = Engine(store, EngineConfig(
            tick_ms=args.tick_ms,
            super_digest=args.super_digest,
            extended_types=args.extended_types,
            container_check_ms=args.container_check_ms,
        ))
        server = ZooKeeperServer(
            engine,
            ServerLimits(max_buffer=args.max_buffer, max_client_cnxns=args.max_client_cnxns),
            settings={"dataDir": data_dir, "clientPortAddress": host,
                      "jute.maxbuffer": args.max_buffer,
                      "maxClientCnxns": args.max_client_cnxns},
        )
        await server.serve(host, port)
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            parser.error(f"--listen: {exc}")
        if args.config is not None:
            return _run_config(args, sys.argv[1:] if argv is None else argv)
        try:
            trio.run(_serve, args)
        except KeyboardInterrupt:
            return EXIT_OK
        except (OSError, StoreError) as exc:
            log.error("cannot serve: %s", exc)
            return EXIT_RUNTIME
    return EXIT_OK
