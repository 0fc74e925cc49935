"""The ``[xds]`` table: where the xDS management server listens and its bounds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher.core.upstream import ConfigError, reject_unknown
from dispatcher.tls import TlsConfig, parse_tls

__all__ = ["DEFAULT_LISTEN", "XdsConfig", "XdsLimits", "parse_xds"]

DEFAULT_LISTEN: Final = "127.0.0.1:18000"
"""go-control-plane's example port; loopback, so turning xDS on exposes nothing."""


def _at_least_one(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"xds.{attribute.name}: expected an integer >= 1, got {value!r}")


@attrs.frozen(slots=True)
class XdsLimits:
    """What one client can make the server hold.

    ``max_streams`` counts ADS streams of every client together (each holds a
    grpc call, per-type state and its watches); ``max_names`` the resource
    names one stream subscribes to over all types (and the services a node's
    metadata may ask outbound listeners for); ``max_request_bytes`` one
    request's size on the wire; ``max_inflight`` requests of one stream
    read but not yet handled (the reader stops reading beyond it, so gRPC's
    flow control pushes back on the client).
    """

    max_streams: int = attrs.field(default=10_000, validator=_at_least_one)
    max_names: int = attrs.field(default=10_000, validator=_at_least_one)
    max_request_bytes: int = attrs.field(default=1 << 20, validator=_at_least_one)
    max_inflight: int = attrs.field(default=16, validator=_at_least_one)


@attrs.frozen(slots=True)
class XdsConfig:
    """``[xds]``: ``listen`` (``HOST:PORT``, port 0 picks a free one), the limits, an
    optional ``token`` and an optional ``tls`` table.

    With a token, every ADS call must carry the gRPC metadata
    ``authorization: Bearer <token>`` (Envoy: ``initial_metadata`` of its ADS
    ``grpc_service``) or ends with UNAUTHENTICATED. Without one, anyone who
    can reach ``listen`` reads every service's endpoints, which is why the
    default address is loopback.

    With ``tls`` (the table every listener takes, :class:`~dispatcher.tls.TlsConfig`)
    the port speaks only TLS 1.2+, and with ``verify_client`` only to clients
    whose certificate ``ca`` signed. It is also what lets proxyless gRPC
    clients send the token: gRPC sends call credentials over secure channels
    only. gRPC bounds the handshake itself, so ``handshake_timeout`` is
    accepted but not used here.
    """

    listen: str = DEFAULT_LISTEN
    limits: XdsLimits = XdsLimits()
    token: str | None = attrs.field(default=None, repr=False)
    tls: TlsConfig | None = None

    def to_mapping(self) -> dict[str, Any]:
        """The ``[xds]`` table as TOML would give it (token included), so that
        :func:`parse_xds` turns it back into an equal config."""
        result: dict[str, Any] = {"listen": self.listen, **attrs.asdict(self.limits)}
        if self.token is not None:
            result["token"] = self.token
        if self.tls is not None:
            result["tls"] = self.tls.to_mapping()
        return result


_LIMIT_KEYS: Final = ("max_streams", "max_names", "max_request_bytes", "max_inflight")


def _split_listen(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"xds.listen: expected HOST:PORT, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"xds.listen: expected HOST:PORT with a port in 0..65535, got {value!r}")
    return value


def parse_xds(table: Mapping[str, Any], base_dir: Path | None = None) -> XdsConfig:
    """Build an :class:`XdsConfig` from the ``[xds]`` table of the config file;
    relative paths in its ``tls`` table are relative to ``base_dir``.

    Unknown keys and bad values raise :class:`~dispatcher.core.upstream.ConfigError`
    naming ``xds.<key>`` (a ``tls`` whose files cannot be loaded included).
    """
    reject_unknown(table, ("listen", "token", "tls", *_LIMIT_KEYS), "xds")
    listen = _split_listen(table.get("listen", DEFAULT_LISTEN))
    limits = XdsLimits(**{key: table[key] for key in _LIMIT_KEYS if key in table})
    token = table.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        # The value is a secret: never echoed.
        raise ConfigError("xds.token: expected a non-empty string")
    tls = parse_tls(table["tls"], "xds.tls", base_dir) if "tls" in table else None
    return XdsConfig(listen, limits, token, tls)
