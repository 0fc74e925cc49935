"""The ``[admin]`` table: the admin HTTP endpoint (see :mod:`dispatcher.faces.admin.http`)::

[admin]                         # on by default
enabled = true                  # /metrics, /health, /ready, /snapshot, /shards, /status, /
listen = "127.0.0.1:8081"       # written out: a port that cannot be bound stops the
                                # start; left out: a busy 8081 is logged and skipped
max_connections = 64            # open admin connections; at the cap, the one waiting
                                # longest for its request is evicted, or (all busy) 503
max_connections_per_address = 8 # the same, per client address
header_timeout = 2.0            # seconds from a request's start to the end of its head
idle_timeout = 15.0             # seconds a keep-alive connection may wait between requests

[admin.tls]                     # optional: HTTPS (see dispatcher.tls); with it, the
cert = "admin.pem"              # policy write routes are allowed
key = "admin-key.pem"
ca = "operators-ca.pem"
verify_client = true
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.faces.admin.http import AdminLimits
from dispatcher.settings import ConfigError
from dispatcher.tls import TlsConfig, parse_tls
from dispatcher.wire import parse_address

__all__ = ["DEFAULT_ADMIN_LISTEN", "AdminConfig", "parse_admin"]

_ADMIN_KEYS: Final = (
    "enabled", "listen", "max_connections", "max_connections_per_address", "header_timeout",
    "idle_timeout", "tls",
)  # fmt: skip
DEFAULT_ADMIN_LISTEN: Final = "127.0.0.1:8081"


@attrs.frozen
class AdminConfig:
    """The ``[admin]`` table: the admin HTTP endpoint (see :mod:`dispatcher.faces.admin.http`).

    ``listen`` None means "not configured": the endpoint then tries
    :data:`DEFAULT_ADMIN_LISTEN` and, if that port is taken (a second
    gateway on the host), logs it and runs without one, as ZooKeeper does
    with its own AdminServer. A ``listen`` written out is a promise: failing
    to bind it stops the start.
    """

    enabled: bool = True
    listen: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(settings.valid_listen)
    )
    max_connections: int = AdminLimits().max_connections
    max_connections_per_address: int = AdminLimits().max_connections_per_address
    header_timeout: float = AdminLimits().header_timeout
    idle_timeout: float = AdminLimits().idle_timeout
    #: HTTPS on the endpoint; None: plain HTTP.
    tls: TlsConfig | None = None

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
        """The ``[admin]`` table as TOML would give it."""
        result: dict[str, Any] = {
            "enabled": self.enabled, "max_connections": self.max_connections,
            "max_connections_per_address": self.max_connections_per_address,
            "header_timeout": self.header_timeout, "idle_timeout": self.idle_timeout,
        }  # fmt: skip
        if self.listen is not None:
            result["listen"] = self.listen
        if self.tls is not None:
            result["tls"] = self.tls.to_mapping()
        return result


def parse_admin(
    table: Mapping[str, Any], where: str = "admin", base_dir: Path | None = None
) -> AdminConfig:
    """Check the ``[admin]`` table (``where="--admin"``: the command line's flags);
    relative paths in its ``tls`` table are relative to ``base_dir``."""
    settings.reject_unknown(table, _ADMIN_KEYS, where)
    options: dict[str, Any] = {}
    if "enabled" in table:
        options["enabled"] = settings.boolean(table["enabled"], f"{where}.enabled")
    if "listen" in table:
        options["listen"] = settings.address(table["listen"], f"{where}.listen")
    for key in ("max_connections", "max_connections_per_address"):
        if key in table:
            options[key] = settings.integer(table[key], f"{where}.{key}", minimum=1)
    # A head allowed longer than a whole request (request_timeout) would be a
    # setting without effect, and an idle connection kept for days a leak of
    # slots: refuse both rather than ignore them.
    request_timeout = AdminLimits().request_timeout
    for key, most in (("header_timeout", request_timeout), ("idle_timeout", 86400.0)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{where}.{key}: must be a number of seconds, not {settings.type_name(value)}"
                )
            if not 0 < value <= most:
                raise ConfigError(
                    f"{where}.{key}: must be above 0 and at most {most:g} seconds, not {value}"
                )
            options[key] = float(value)
    if "tls" in table:
        options["tls"] = parse_tls(table["tls"], f"{where}.tls", base_dir)
    return AdminConfig(**options)
