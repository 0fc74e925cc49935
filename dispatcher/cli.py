"""The ``zkgate`` command line."""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from dispatcher import mesh_command, operator, policy_command
from dispatcher.config import Config, load_config, parse_config
from dispatcher.gateway import run_gateway
from dispatcher.inspection import cli as inspection_cli
from dispatcher.logs import LOG_FORMATS, configure_logging
from dispatcher.settings import ConfigError
from dispatcher.stopping import run_until_stopped
from dispatcher.zk.server.store import StoreError

log = logging.getLogger("zkgate")

#: Entry points of other programs' subcommands: a module with
#: ``add_subcommand(subparsers)`` whose parser sets ``run(args) -> exit code``.
COMMANDS = "zkgate.commands"

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

#: serve's flags that set a ``[zookeeper]`` key; given, they override the file.
_ZOOKEEPER_FLAGS = ("listen", "data_dir", "tick_ms", "max_buffer", "max_client_cnxns",
                    "extended_types", "container_check_ms", "super_digest",
                    "four_letter_words")  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zkgate",
        description="A ZooKeeper-compatible service-registry gateway.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_log_arguments(parser, default=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the ZooKeeper protocol (and fan in the configured registries)",
        description="Serve the ZooKeeper wire protocol. With no registry configured, "
        "zkgate is a single-node ZooKeeper-compatible registry on a durable embedded tree. "
        "Flags left out take their value from --config, else ZooKeeper's defaults.",
    )
    # Defaults live in the config classes, once: a flag left out is None here,
    # so a given flag and the file's value can never be confused.
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file naming the upstream registries to fan in and the "
        "settings below; flags given on the command line override it",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address of the ZooKeeper port (default: 127.0.0.1:2181)",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where the embedded tree is kept (default: $XDG_DATA_HOME/zkgate)",
    )
    serve.add_argument(
        "--tick-ms",
        type=int,
        metavar="MS",
        help="ZooKeeper's tickTime; session timeouts are clamped to 2x..20x of it (default: 2000)",
    )
    serve.add_argument(
        "--max-buffer",
        type=int,
        metavar="BYTES",
        help="largest frame accepted, as jute.maxbuffer (default: 1048575)",
    )
    serve.add_argument(
        "--max-client-cnxns",
        type=int,
        metavar="N",
        help="connections allowed per client IP, as maxClientCnxns; 0 for no limit (default: 60)",
    )
    serve.add_argument(
        "--extended-types",
        action="store_true",
        default=None,
        help="allow TTL nodes, as zookeeper.extendedTypesEnabled=true",
    )
    serve.add_argument(
        "--container-check-ms",
        type=int,
        metavar="MS",
        help="how often empty containers and expired TTL nodes are "
        "reaped, as znode.container.checkIntervalMs (default: 60000)",
    )
    serve.add_argument(
        "--super-digest",
        metavar="USER:BASE64SHA1",
        help="digest id allowed everything, as ZooKeeper's superDigest",
    )
    serve.add_argument(
        "--4lw",
        dest="four_letter_words",
        metavar="WORDS",
        help="four-letter words answered, comma separated, as "
        "4lw.commands.whitelist; '*' for all, srvr always "
        "(default: ruok,srvr,mntr,isro)",
    )
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT|off",
        help="address of the admin HTTP endpoint (/metrics, /health, /ready, "
        "the status page at /), or 'off' (default: 127.0.0.1:8081)",
    )
    operator.add_commands(commands)
    policy_command.add_command(commands)
    mesh_command.add_command(commands)
    inspection_cli.add_command(commands)
    # The other programs (meta, proxy) bring their own subcommand, found like
    # upstreams and layouts: the Dispatcher's package imports neither.
    for entry in sorted(metadata.entry_points(group=COMMANDS), key=lambda e: e.name):
        entry.load().add_subcommand(commands)
    for subcommand in commands.choices.values():
        # Also after the subcommand (`zkgate serve --log-level DEBUG`), where
        # people put them; given there, they win over the ones before it.
        _add_log_arguments(subcommand, default=False)
    return parser


def _add_log_arguments(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """``--log-level`` and ``--log-format``; without ``default`` a flag left out sets
    nothing, so that a subcommand's parser does not undo the flag given before it."""
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO" if default else argparse.SUPPRESS,
        help="least severe level written (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="logfmt" if default else argparse.SUPPRESS,
        help="logfmt: one key=value line per event, for log pipelines "
        "(default); plain: the classic human layout (see dispatcher/logs.py)",
    )


def _version() -> str:
    try:
        return metadata.version("zkgate")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


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
        return _to_stdout(functools.partial(operator.status, args))
    if args.command == "check-config":
        return _to_stdout(functools.partial(operator.check_config, args))
    run = getattr(args, "run", None)
    if run is not None:  # a subcommand from the zkgate.commands entry points
        return int(run(args))
    try:
        config = _config(args)
    except ConfigError as exc:
        where = "" if args.config is None else f"config {str(args.config)!r}: "
        print(f"zkgate: error: {where}{exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_until_stopped(functools.partial(run_gateway, config), what="zkgate serve")
    except ConfigError as exc:
        print(f"zkgate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, StoreError) as exc:
        log.error("cannot serve", extra={"error": str(exc)})
        return EXIT_RUNTIME
    return EXIT_OK


class _ClosedPipeGuard:
    """Standard output that goes quiet once its reader is gone (``zkgate status | head``):
    the rest of the output is dropped, and the command still exits with its own status."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, text: str) -> int:
        if not self.closed:
            try:
                sys.stdout.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.closed:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.closed = True
        # What is still buffered would fail again when the interpreter flushes
        # at exit, with a message on stderr: send it nowhere instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _to_stdout(command: Callable[..., int]) -> int:
    """Run an operator command printing to a :class:`_ClosedPipeGuard`."""
    out = _ClosedPipeGuard()
    code = command(out=out)
    out.flush()
    return code
