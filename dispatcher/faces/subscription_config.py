"""The ``[subscriptions]`` table: the subscription server proxies connect to
(see :mod:`dispatcher.faces.subscription_server`); off without the table::

    [subscriptions]
    listen = "127.0.0.1:7000"
    unix = "/run/zkgate/subscribe.sock"  # optional, beside the TCP port
    token = "a long random secret"  # required: every client must present it
    history = 256                   # deltas kept per service for reconnecting proxies
    max_connections = 1024          # open subscriber connections; one more is refused

    [subscriptions.tls]             # optional: TLS on the TCP port (see dispatcher.tls)
    cert = "dispatcher.pem"
    key = "dispatcher-key.pem"
    ca = "proxies-ca.pem"
    verify_client = true
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.faces.subscription_server import DEFAULT_HISTORY, SubscriptionLimits
from dispatcher.settings import ConfigError
from dispatcher.tls import TlsConfig, parse_tls
from dispatcher.wire import parse_address

__all__ = ["DEFAULT_SUBSCRIPTIONS_LISTEN", "SubscriptionsConfig", "parse_subscriptions"]

_SUBSCRIPTIONS_KEYS: Final = ("listen", "unix", "token", "history", "max_connections", "tls")
DEFAULT_SUBSCRIPTIONS_LISTEN: Final = "127.0.0.1:7000"


@attrs.frozen
class SubscriptionsConfig:
    """The ``[subscriptions]`` table: the subscription server proxies connect to.

    See :mod:`dispatcher.faces.subscription_server`. Without the table the gateway
    serves no subscriptions. ``token`` is left out of ``repr`` so that it
    never reaches a log line.
    """

    token: str = attrs.field(repr=False)
    listen: str = attrs.field(default=DEFAULT_SUBSCRIPTIONS_LISTEN, validator=settings.valid_listen)
    unix: Path | None = None
    history: int = DEFAULT_HISTORY
    max_connections: int = SubscriptionLimits().max_connections
    #: TLS on the TCP port (the Unix socket stays plain: the file's permissions guard it).
    tls: TlsConfig | None = None

    @property
    def host(self) -> str:
        return parse_address(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_address(self.listen)[1]

    def to_mapping(self) -> dict[str, Any]:
        """The ``[subscriptions]`` table as TOML would give it (token included)."""
        result: dict[str, Any] = {
            "listen": self.listen, "token": self.token, "history": self.history,
            "max_connections": self.max_connections,
        }  # fmt: skip
        if self.unix is not None:
            result["unix"] = str(self.unix)
        if self.tls is not None:
            result["tls"] = self.tls.to_mapping()
        return result


def parse_subscriptions(table: Mapping[str, Any], base_dir: Path | None) -> SubscriptionsConfig:
    """Check the ``[subscriptions]`` table; a relative ``unix`` is relative to ``base_dir``."""
    where = "subscriptions"
    settings.reject_unknown(table, _SUBSCRIPTIONS_KEYS, where)
    if "token" not in table:
        raise ConfigError(f"{where}.token: missing (every subscriber must present it)")
    options: dict[str, Any] = {"token": settings.string(table["token"], f"{where}.token")}
    if "listen" in table:
        options["listen"] = settings.address(table["listen"], f"{where}.listen")
    if "unix" in table:
        unix = settings.user_path(table["unix"], f"{where}.unix")
        if not unix.is_absolute() and base_dir is not None:
            unix = base_dir / unix
        options["unix"] = unix
    if "history" in table:
        options["history"] = settings.integer(table["history"], f"{where}.history", minimum=0)
    if "max_connections" in table:
        options["max_connections"] = settings.integer(
            table["max_connections"], f"{where}.max_connections", minimum=1
        )
    if "tls" in table:
        options["tls"] = parse_tls(table["tls"], f"{where}.tls", base_dir)
    return SubscriptionsConfig(**options)
