"""``zkgate proxy``: the command-line face of the sidecar.

:func:`add_arguments` fills the ``proxy`` subcommand's parser (the
``zkgate`` CLI in :mod:`dispatcher.cli` hooks it in) and :func:`run` runs
it with the parsed arguments::

    zkgate proxy --meta 127.0.0.1:7000 --service orders=127.0.0.1:9001 \\
                 --service users=/run/zkgate/users.sock --token-file /etc/zkgate/token

A sidecar for mesh onboarding registers itself in zkgate's ZooKeeper face, as the proxy of
the consumers on its host (``--register HOST:PORT``, ``--register-host``), and reports its
application's (``--application``) call outcomes for the automatic rollback::

    zkgate proxy --meta 127.0.0.1:7000 --service shop.Cart=10.1.2.3:15001 \\
                 --application web --register 127.0.0.1:2181 --token-file /etc/zkgate/token

A ZooKeeper face that serves only TLS (its ``secure_listen``) and wants SASL is reached with
``--register-tls-ca`` (``--register-tls-cert``/``--register-tls-key`` when it verifies
clients) and ``--register-sasl-username`` with ``--register-sasl-password-file`` (the
password is never given on the command line)::

    zkgate proxy ... --register 10.1.2.3:2281 --register-tls-ca /etc/zkgate/ca.pem \\
                 --register-sasl-username sidecar \\
                 --register-sasl-password-file /etc/zkgate/sidecar.pass

The shared token may come from ``--token``, ``--token-file`` or the
``ZKGATE_TOKEN`` environment variable (a token on the command line is
visible to every user of the machine in ``ps``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from dispatcher.stopping import run_until_stopped
from dispatcher.tls import ClientTls, add_client_arguments, client_tls_from_args
from dispatcher.zk.sasl_client import SaslCredentials, load_credentials
from proxy import balancer
from proxy.control import ControlSettings
from proxy.forward import ForwardSettings, ListenAddress
from proxy.outlier import OutlierPolicy
from proxy.registration import DEFAULT_ROOT, RegistrationSettings
from proxy.sidecar import ENGINES, Sidecar, SidecarConfig

__all__ = ["add_arguments", "config_from_args", "run"]

log = logging.getLogger("zkgate.proxy")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


def _service(text: str) -> tuple[str, ListenAddress]:
    name, sep, listen = text.partition("=")
    if not sep or not name or not listen:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=LISTEN")
    try:
        return name, ListenAddress.parse(listen)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``zkgate proxy``."""
    parser.add_argument(
        "--meta",
        required=True,
        metavar="HOST:PORT",
        help="the Meta Server that says which Dispatcher owns each service",
    )
    parser.add_argument(
        "--service",
        dest="services",
        action="append",
        type=_service,
        required=True,
        metavar="NAME=LISTEN",
        help="route service NAME for the application listening on LISTEN: "
        "127.0.0.1:PORT or a Unix socket path (repeat for more services)",
    )
    parser.add_argument(
        "--token",
        help="the shared token the Meta Server and Dispatchers ask "
        "for (or --token-file, or $ZKGATE_TOKEN)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the token from FILE (surrounding whitespace stripped)",
    )
    parser.add_argument(
        "--client-id",
        help="how this proxy names itself to the servers (default: zkgate-proxy/HOST/PID)",
    )
    parser.add_argument(
        "--application",
        default="",
        metavar="NAME",
        help="the application this proxy calls for: its per-consumer policies apply "
        "(default: none, the per-service policies only)",
    )
    parser.add_argument(
        "--zone",
        default="",
        metavar="ZONE",
        help="the zone this proxy runs in, for the policies' zone affinity (default: unknown)",
    )
    parser.add_argument(
        "--balancer",
        choices=balancer.BALANCERS,
        default="wrr",
        help="wrr: smooth weighted round robin; p2c: power of two choices "
        "on open connections (default: wrr)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="epoll",
        help="data plane: epoll (one copying thread with its own epoll; "
        "less than half the CPU per message, see proxy/splicer.py) or trio "
        "(two trio tasks per connection) (default: %(default)s)",
    )
    defaults = ForwardSettings()
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout,
        metavar="SECONDS",
        help="per endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=defaults.attempts,
        metavar="N",
        help="distinct endpoints tried per connection (default: %(default)s)",
    )
    parser.add_argument(
        "--endpoint-wait",
        type=float,
        default=defaults.endpoint_wait,
        metavar="SECONDS",
        help="how long a connection waits for a first "
        "endpoint while there is none (default: %(default)s)",
    )
    policy = OutlierPolicy()
    parser.add_argument(
        "--eject-after",
        type=int,
        default=policy.consecutive_failures,
        metavar="N",
        help="consecutive connect failures that eject an endpoint locally (default: %(default)s)",
    )
    parser.add_argument(
        "--eject-base",
        type=float,
        default=policy.base_ejection,
        metavar="SECONDS",
        help="first ejection's length; the n-th lasts n times as long (default: %(default)s)",
    )
    parser.add_argument(
        "--eject-max",
        type=float,
        default=policy.max_ejection,
        metavar="SECONDS",
        help="longest ejection (default: %(default)s)",
    )
    parser.add_argument(
        "--eject-max-percent",
        type=int,
        default=policy.max_ejection_percent,
        metavar="PCT",
        help="most of a service's endpoints ejected at once; "
        "0 turns ejection off (default: %(default)s)",
    )
    parser.add_argument(
        "--register",
        metavar="HOST:PORT",
        help="register as this host's sidecar in zkgate's ZooKeeper face at HOST:PORT "
        "(a connect string), for mesh onboarding; also reports the outcomes of the calls "
        "carried, for the automatic rollback (default: neither)",
    )
    parser.add_argument(
        "--register-host",
        metavar="HOST",
        help="with --register: the address the consumers on this host connect from "
        "(default: the services' listen host)",
    )
    parser.add_argument(
        "--sidecars",
        default=DEFAULT_ROOT,
        metavar="PATH",
        help="with --register: the Dispatchers' [mesh] sidecars path (default: %(default)s)",
    )
    parser.add_argument(
        "--register-tls-ca",
        type=Path,
        metavar="FILE",
        help="with --register: reach the ZooKeeper face's TLS port (its secure_listen), "
        "trusting this CA (PEM)",
    )
    parser.add_argument(
        "--register-tls-cert",
        type=Path,
        metavar="FILE",
        help="with --register: the client certificate (PEM) to present to the ZooKeeper "
        "face, with --register-tls-key (TLS even without --register-tls-ca: the system's CAs)",
    )
    parser.add_argument(
        "--register-tls-key",
        type=Path,
        metavar="FILE",
        help="with --register: the client certificate's key (PEM)",
    )
    parser.add_argument(
        "--register-sasl-username",
        metavar="NAME",
        help="with --register: authenticate to the ZooKeeper face with SASL DIGEST-MD5 as "
        "NAME, with --register-sasl-password-file",
    )
    parser.add_argument(
        "--register-sasl-password-file",
        type=Path,
        metavar="FILE",
        help="with --register-sasl-username: read the password from FILE (one trailing "
        "newline dropped); there is no flag for the password itself",
    )
    add_client_arguments(parser, "the Meta Server and the Dispatchers")


def add_subcommand(commands: Any) -> None:
    """Add ``proxy`` to the ``zkgate`` command line (``commands``: its subparsers)."""
    proxy: argparse.ArgumentParser = commands.add_parser(
        "proxy",
        help="run a sidecar proxy that routes an application's connections (see proxy/)",
        description="Learn from the Meta Server which Dispatcher owns each service, subscribe "
        "there, and forward the application's connections to healthy endpoints.",
    )
    add_arguments(proxy)
    proxy.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    """The sidecar's configuration from parsed flags; ValueError names what is wrong."""
    services: dict[str, ListenAddress] = {}
    for name, address in args.services:
        if name in services:
            raise ValueError(f"service {name!r} is given twice")
        services[name] = address
    token = args.token
    if token is None and args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file: {exc}") from None
    if token is None:
        token = os.environ.get("ZKGATE_TOKEN", "")
    if not token:
        # The Meta Server and the Dispatchers refuse a Hello without one.
        raise ValueError("a token is needed: --token, --token-file or $ZKGATE_TOKEN")
    control = ControlSettings(
        token=token, application=args.application, tls=client_tls_from_args(args)
    )
    if args.client_id is not None:
        control = attrs.evolve(control, client_id=args.client_id)
    register = None if args.register is None else RegistrationSettings(
        args.register, _register_host(args, services), args.sidecars,
        tls=_register_tls(args), sasl=_register_sasl(args),
    )  # fmt: skip
    if register is None:
        given = [flag for flag in _REGISTER_SECURITY if getattr(args, _dest(flag)) is not None]
        if given:
            raise ValueError(f"{given[0]} needs --register")
    try:
        return SidecarConfig(
            meta=args.meta, services=services, balancer=args.balancer, control=control,
            engine=args.engine, zone=args.zone, register=register,
            forward=ForwardSettings(connect_timeout=args.connect_timeout,
                                    attempts=args.attempts, endpoint_wait=args.endpoint_wait),
            outlier=OutlierPolicy(consecutive_failures=args.eject_after,
                                  base_ejection=args.eject_base, max_ejection=args.eject_max,
                                  max_ejection_percent=args.eject_max_percent),
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


_REGISTER_SECURITY = (
    "--register-tls-ca", "--register-tls-cert", "--register-tls-key",
    "--register-sasl-username", "--register-sasl-password-file",
)  # fmt: skip


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _register_tls(args: argparse.Namespace) -> ClientTls | None:
    """TLS to the ZooKeeper face: on with any ``--register-tls-*`` flag."""
    ca, cert, key = args.register_tls_ca, args.register_tls_cert, args.register_tls_key
    if ca is None and cert is None and key is None:
        return None
    return ClientTls(ca=ca, cert=cert, key=key)


def _register_sasl(args: argparse.Namespace) -> SaslCredentials | None:
    """The SASL user of the registration; the password only ever from its file."""
    username, password_file = args.register_sasl_username, args.register_sasl_password_file
    if username is None and password_file is None:
        return None
    if username is None or password_file is None:
        missing = "--register-sasl-password-file" if username is not None else (
            "--register-sasl-username"
        )  # fmt: skip
        raise ValueError(f"--register-sasl-username and --register-sasl-password-file go "
                         f"together: {missing} is missing")  # fmt: skip
    try:
        return load_credentials(username, password_file)
    except ValueError as exc:
        raise ValueError(f"--register-sasl-password-file: {exc}") from None


def _register_host(args: argparse.Namespace, services: dict[str, ListenAddress]) -> str:
    """``--register-host``, or the one host every service listens on."""
    if args.register_host is not None:
        return str(args.register_host)
    hosts = {address.host for address in services.values() if not address.is_unix}
    if len(hosts) != 1 or hosts & {"", "0.0.0.0", "::"}:
        raise ValueError("--register needs --register-host: the services do not listen on "
                         "one host address the consumers connect from")  # fmt: skip
    return hosts.pop()


def run(args: argparse.Namespace) -> int:
    """Run the sidecar until SIGINT or SIGTERM (exit 0); the process exit status."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"zkgate proxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> None:
        sidecar = Sidecar(config)
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(sidecar.run)
            for name, address in listening.items():
                log.info("proxy ready", extra={"service": name, "listen": str(address)})

    try:
        run_until_stopped(main, what="zkgate proxy")
    except OSError as exc:
        log.error("cannot run the proxy", extra={"error": str(exc)})
        return EXIT_RUNTIME
    except ExceptionGroup as group:
        # A listener that cannot bind fails inside the sidecar's nursery.
        matched, rest = group.split(OSError)
        if matched is None or rest is not None:
            raise
        log.error("cannot run the proxy", extra={"error": "; ".join(map(str, _leaves(matched)))})
        return EXIT_RUNTIME
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m proxy.cli``: the same as ``zkgate proxy``, without the rest of zkgate."""
    parser = argparse.ArgumentParser(prog="zkgate proxy", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")  # fmt: skip
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
