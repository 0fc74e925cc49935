"""The ``[[mirror]]`` tables: subtrees of an existing ZooKeeper ensemble served through
zkgate's ZooKeeper face (see :mod:`dispatcher.zk.mirror`)::

    [[mirror]]
    root = "/legacy"                # where the subtree is mounted (the same path upstream)
    hosts = "10.0.0.5:2181,10.0.0.6:2181"
    session_timeout = 10.0          # seconds
    auth = ["digest:user:password"] # the mirror's own session's credentials
    max_sessions = 32               # upstream sessions for writes, one per client identity
    max_cached = 200000             # cached znodes; beyond this, unwatched ones are dropped
    connect_timeout = 5.0           # seconds; unreachable at start stops the start
    idle_timeout = 60.0             # seconds an unused write session is kept (one that
                                    # holds ephemerals or watches stays)
    tls = { ca = "ca.pem", cert = "client.pem", key = "client-key.pem" }  # secure port
    sasl_username = "zkgate"        # DIGEST-MD5 on every upstream session, with
    sasl_password_file = "zk.pass"  # the password in this file (both or neither)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from dispatcher import settings
from dispatcher.settings import ConfigError
from dispatcher.tls import parse_client_tls
from dispatcher.wire import join_address, parse_address
from dispatcher.zk.mirror import MirrorConfig
from dispatcher.zk.sasl_client import SaslCredentials, load_credentials
from dispatcher.zk.server.config import mount_root

__all__ = ["mirror_to_mapping", "parse_mirrors"]

_MIRROR_KEYS: Final = (
    "root", "hosts", "session_timeout", "auth", "max_sessions", "max_cached", "connect_timeout",
    "idle_timeout", "tls", "sasl_username", "sasl_password_file",
)  # fmt: skip


def parse_mirrors(
    value: Any, taken: Iterable[str], base_dir: Path | None = None
) -> tuple[MirrorConfig, ...]:
    """Check the ``[[mirror]]`` array; no root may overlap another mount's (``taken``).

    Relative paths in a ``tls`` table are relative to ``base_dir``."""
    result: list[MirrorConfig] = []
    others = list(taken)
    for where, table in settings.array_of_tables(value, "mirror"):
        settings.reject_unknown(table, _MIRROR_KEYS, where)
        root = mount_root(table, where, ("root", "hosts"), others + [m.root for m in result])
        hosts = []
        for part in settings.string(table["hosts"], f"{where}.hosts").split(","):
            try:
                hosts.append(parse_address(part.strip()))
            except ValueError as exc:
                raise ConfigError(f"{where}.hosts: {exc}") from None
        auth = []
        entries = table.get("auth", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{where}.auth: must be an array, not {settings.type_name(entries)}")
        for index, entry in enumerate(entries):
            text = settings.string(entry, f"{where}.auth[{index}]")
            scheme, colon, credential = text.partition(":")
            if scheme != "digest" or not colon:
                raise ConfigError(f"{where}.auth[{index}]: must be 'digest:user:password'")
            auth.append((scheme, credential.encode()))
        timeout = settings.seconds(table.get("session_timeout", 10.0), f"{where}.session_timeout")
        if not math.isfinite(timeout * 1000):  # kept in whole milliseconds: int() would raise
            raise ConfigError(
                f"{where}.session_timeout: must be a finite number of seconds, not {timeout!r}"
            )
        result.append(MirrorConfig(
            root, tuple(hosts), session_timeout_ms=int(timeout * 1000), auth=tuple(auth),
            max_sessions=settings.integer(table.get("max_sessions", 32), f"{where}.max_sessions",
                                          minimum=1),
            max_cached=settings.integer(table.get("max_cached", 200_000), f"{where}.max_cached",
                                        minimum=100),
            connect_timeout=settings.seconds(table.get("connect_timeout", 5.0),
                                             f"{where}.connect_timeout"),
            idle_timeout=settings.seconds(table.get("idle_timeout", 60.0),
                                          f"{where}.idle_timeout"),
            tls=None if "tls" not in table
            else parse_client_tls(table["tls"], f"{where}.tls", base_dir),
            sasl=parse_sasl(table, where, base_dir),
        ))  # fmt: skip
    return tuple(result)


def parse_sasl(table: Any, where: str, base_dir: Path | None) -> SaslCredentials | None:
    """``sasl_username`` and ``sasl_password_file`` (both or neither), the file
    read now so that a missing one stops the start; relative to ``base_dir``."""
    given = [key for key in ("sasl_username", "sasl_password_file") if key in table]
    if not given:
        return None
    if len(given) == 1:
        other = "sasl_password_file" if given[0] == "sasl_username" else "sasl_username"
        raise ConfigError(f"{where}.{given[0]}: needs {other} too")
    username = settings.string(table["sasl_username"], f"{where}.sasl_username")
    path = settings.user_path(table["sasl_password_file"], f"{where}.sasl_password_file")
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return load_credentials(username, path)
    except ValueError as exc:
        raise ConfigError(f"{where}.sasl_password_file: {exc}") from None


def mirror_to_mapping(mirror: MirrorConfig) -> dict[str, Any]:
    """One ``[[mirror]]`` table as TOML would give it."""
    return {
        "root": mirror.root,
        "hosts": ",".join(join_address(h, p) for h, p in mirror.hosts),
        "session_timeout": mirror.session_timeout_ms / 1000,
        "auth": [f"{scheme}:{cred.decode()}" for scheme, cred in mirror.auth],
        "max_sessions": mirror.max_sessions,
        "max_cached": mirror.max_cached,
        "connect_timeout": mirror.connect_timeout,
        "idle_timeout": mirror.idle_timeout,
        **({} if mirror.tls is None else {"tls": mirror.tls.to_mapping()}),
        **({} if mirror.sasl is None else mirror.sasl.to_mapping()),
    }
