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
    idle_timeout = 60.0             # seconds a write session without ephemerals is kept
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Final

from dispatcher import settings
from dispatcher.settings import ConfigError
from dispatcher.wire import join_address, parse_address
from dispatcher.zk.mirror import MirrorConfig
from dispatcher.zk.server.config import mount_root

__all__ = ["mirror_to_mapping", "parse_mirrors"]

_MIRROR_KEYS: Final = (
    "root", "hosts", "session_timeout", "auth", "max_sessions", "max_cached", "connect_timeout",
    "idle_timeout",
)  # fmt: skip


def parse_mirrors(value: Any, taken: Iterable[str]) -> tuple[MirrorConfig, ...]:
    """Check the ``[[mirror]]`` array; no root may overlap another mount's (``taken``)."""
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
        ))  # fmt: skip
    return tuple(result)


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
    }
