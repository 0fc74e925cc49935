"""TLS on the xDS server, checked with certificates made by the test (a throwaway CA).

``[xds] tls`` is the table every listener takes. A grpcio ADS client with the
CA and a client certificate is served; one without a client certificate, one
whose certificate another CA signed and a plain-text one are refused, and the
port serves on. A token then travels as gRPC call credentials, which gRPC
sends over secure channels only. Replaced certificate files are used for the
next connection. Then the real clients: an Envoy whose ADS cluster has an
``UpstreamTlsContext``, and a proxyless gRPC client whose xDS bootstrap says
``channel_creds: [{"type": "tls", ...}]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from envoy.service.discovery.v3 import discovery_pb2

from dispatcher.config import parse_config
from dispatcher.core.upstream import ConfigError
from dispatcher.faces.xds import XdsConfig, XdsLimits, XdsServer, parse_xds
from dispatcher.faces.xds.resources import CLUSTER
from dispatcher.tls import TlsConfig
from tests.certs import Issued, Pki, make_pki
from tests.envoy import ads_bootstrap, running_envoy
from tests.servers import free_port
from tests.test_xds import (
    _ECHO_METHOD,
    _GRPC_CLIENT,
    ADS,
    Lines,
    Registry,
    echo_server,
    grpc_echo,
    host_lines,
    http_get,
    inst,
)
from tests.waiting import until

TIMEOUT = 10.0
"""Seconds one ADS answer may take: far above the milliseconds it takes."""
WAIT = 30.0
"""Seconds a real client (Envoy, proxyless gRPC) may take to be configured."""
TOKEN = "xds-tls-test-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("xds-pki"), "envoy", "/O=Example/CN=envoy")


def mutual(pki: Pki) -> TlsConfig:
    """The server's certificate, and client certificates required (signed by the CA)."""
    return TlsConfig(pki.server.cert, pki.server.key, pki.ca.cert, verify_client=True)


@contextlib.asynccontextmanager
async def serving(
    registry: Registry, tls: TlsConfig, token: str | None = None
) -> AsyncIterator[int]:
    server = XdsServer(registry.hub, XdsConfig("127.0.0.1:0", XdsLimits(), token, tls))
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve)
        yield port
        nursery.cancel_scope.cancel()


def credentials(
    trust: Path | None, client: Issued | None = None, token: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS trusting ``trust`` (None: a plain-text channel), presenting ``client``'s certificate,
    and with ``token`` sent as ``authorization: Bearer`` call credentials."""
    if trust is None:
        return None
    creds = grpc.ssl_channel_credentials(
        trust.read_bytes(),
        None if client is None else client.key.read_bytes(),
        None if client is None else client.cert.read_bytes(),
    )
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def first_answer(port: int, creds: grpc.ChannelCredentials | None) -> str:
    """The type of the first answer to a wildcard CDS request, or the call's status name."""
    target = f"127.0.0.1:{port}"
    # A pool of its own, so no connection made by an earlier attempt is reused.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.insecure_channel(target, options)
        if creds is None
        else grpc.secure_channel(target, creds, options)
    )
    with channel:
        call = channel.stream_stream(
            ADS + "StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        responses = call(iter([discovery_pb2.DiscoveryRequest(type_url=CLUSTER)]), timeout=TIMEOUT)
        try:
            response = next(responses)
        except grpc.RpcError as error:
            return str(error.code().name)
        responses.cancel()
        return str(response.type_url)


async def answer(port: int, creds: grpc.ChannelCredentials | None) -> str:
    return await trio.to_thread.run_sync(first_answer, port, creds)


# ----------------------------------------------------------- configuration


def test_the_tls_table_is_checked_and_round_trips(pki: Pki, tmp_path: Path) -> None:
    table = {"cert": "server.pem", "key": "server-key.pem", "ca": "ca.pem", "verify_client": True}
    for name, source in (("server.pem", pki.server.cert), ("server-key.pem", pki.server.key),
                         ("ca.pem", pki.ca.cert)):  # fmt: skip
        shutil.copy(source, tmp_path / name)
    config = parse_config({"xds": {"listen": "0.0.0.0:18000", "tls": table}}, base_dir=tmp_path)
    assert config.xds is not None
    assert config.xds.tls == TlsConfig(
        tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem", True
    )
    assert parse_config(config.to_mapping()) == config
    assert parse_xds({}).tls is None
    with pytest.raises(ConfigError, match=r"xds\.tls\.key: missing"):
        parse_xds({"tls": {"cert": str(pki.server.cert)}})
    with pytest.raises(ConfigError, match=r"xds\.tls\.verify_client: needs xds\.tls\.ca"):
        parse_xds({"tls": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                           "verify_client": True}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"xds\.tls: cannot load the certificate files"):
        parse_xds({"tls": {"cert": str(pki.server.key), "key": str(pki.server.key)}})


# ------------------------------------------------------------ grpcio client


async def test_a_client_certificate_signed_by_the_ca_is_served_and_others_are_refused(
    pki: Pki,
) -> None:
    registry = Registry()
    registry.put(inst("orders", 7001))
    async with serving(registry, mutual(pki)) as port:
        assert await answer(port, credentials(pki.ca.cert, pki.client)) == CLUSTER
        # No client certificate, one another CA signed, plain text, and a client
        # that does not trust the server's CA: no handshake, no stream.
        assert await answer(port, credentials(pki.ca.cert)) == "UNAVAILABLE"
        assert await answer(port, credentials(pki.ca.cert, pki.stranger)) == "UNAVAILABLE"
        assert await answer(port, None) == "UNAVAILABLE"
        assert await answer(port, credentials(pki.other.cert, pki.client)) == "UNAVAILABLE"
        # ... and the port serves on.
        assert await answer(port, credentials(pki.ca.cert, pki.client)) == CLUSTER


async def test_over_tls_the_token_travels_as_call_credentials(pki: Pki) -> None:
    registry = Registry()
    async with serving(registry, mutual(pki), token=TOKEN) as port:
        assert await answer(port, credentials(pki.ca.cert, pki.client, TOKEN)) == CLUSTER
        assert await answer(port, credentials(pki.ca.cert, pki.client, "wrong")) == (
            "UNAUTHENTICATED"
        )
        assert await answer(port, credentials(pki.ca.cert, pki.client)) == "UNAUTHENTICATED"


async def test_replaced_certificate_files_are_used_for_the_next_connection(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    registry = Registry()
    async with serving(registry, TlsConfig(cert, key)) as port:
        assert await answer(port, credentials(pki.ca.cert)) == CLUSTER
        renewed = pki.other.issue("renewed", "/CN=localhost")
        # A file that does not load is not taken: the previous certificate stays.
        key.write_text("not a key\n")
        assert await answer(port, credentials(pki.ca.cert)) == CLUSTER
        shutil.copy(renewed.cert, cert)
        shutil.copy(renewed.key, key)
        # Modification times a second apart, whatever the file system's granularity.
        later = os.stat(cert).st_mtime + 1
        for path in (cert, key):
            os.utime(path, (later, later))
        assert await answer(port, credentials(pki.other.cert)) == CLUSTER
        assert await answer(port, credentials(pki.ca.cert)) == "UNAVAILABLE"


# ------------------------------------------------------------------- Envoy


def tls_envoy_bootstrap(
    pki: Pki, client: Issued, xds_port: int, admin: int, listen: int
) -> dict[str, Any]:
    """The tests' ADS-only bootstrap with its ADS cluster speaking mutual TLS."""
    bootstrap = ads_bootstrap(
        xds_port, admin, node="sidecar-test", token=TOKEN, outbound={"echo": listen}
    )
    (cluster,) = bootstrap["static_resources"]["clusters"]
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(client.cert)},
                        "private_key": {"filename": str(client.key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(pki.ca.cert)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "localhost"}}
                    ],
                },
            },
        },
    }
    return bootstrap


def envoy_config(bootstrap: dict[str, Any], directory: Path) -> Path:
    path = directory / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    return path


async def test_envoy_with_an_upstream_tls_context_gets_its_clusters(
    pki: Pki, tmp_path: Path
) -> None:
    registry = Registry()
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(echo_server, "A")
        registry.put(inst("echo", echo))
        async with serving(registry, mutual(pki), token=TOKEN) as port:
            admin = free_port()
            bootstrap = tls_envoy_bootstrap(pki, pki.client, port, admin, free_port())

            async def healthy() -> bool:
                try:
                    text = await trio.to_thread.run_sync(
                        http_get, f"http://127.0.0.1:{admin}/clusters"
                    )
                except OSError:
                    return False
                return host_lines(text, echo).get("health_flags") == "healthy"

            with running_envoy(envoy_config(bootstrap, tmp_path), tmp_path / "envoy.log"):
                await until(healthy, "the echo cluster in Envoy", WAIT, poll=0.1)
        nursery.cancel_scope.cancel()


async def test_envoy_with_a_certificate_from_another_ca_is_refused(
    pki: Pki, tmp_path: Path
) -> None:
    registry = Registry()
    registry.put(inst("echo", 7001))
    async with serving(registry, mutual(pki), token=TOKEN) as port:
        admin = free_port()
        bootstrap = tls_envoy_bootstrap(pki, pki.stranger, port, admin, free_port())
        # A refused handshake is a failed connect to Envoy; the cluster only ever
        # has that one host, so two of them are two refusals.
        stats = f"http://127.0.0.1:{admin}/stats?filter=cluster.zkgate_xds.upstream_cx_connect_fail"

        async def handshakes_failed() -> bool:
            try:
                text = await trio.to_thread.run_sync(http_get, stats)
            except OSError:
                return False
            count = text.strip().rpartition(": ")[2]
            return count.isdigit() and int(count) >= 2

        with running_envoy(envoy_config(bootstrap, tmp_path), tmp_path / "envoy.log"):
            await until(handshakes_failed, "two refused TLS handshakes", WAIT, poll=0.1)
            connected = await trio.to_thread.run_sync(
                http_get, f"http://127.0.0.1:{admin}/stats?filter=control_plane.connected_state"
            )
            assert connected.strip() == "control_plane.connected_state: 0"
            text = await trio.to_thread.run_sync(http_get, f"http://127.0.0.1:{admin}/clusters")
            assert "echo::" not in text


# ----------------------------------------------------------- proxyless gRPC


async def test_proxyless_grpc_with_tls_channel_creds_resolves_through_xds(
    pki: Pki, tmp_path: Path
) -> None:
    registry = Registry()
    with grpc_echo("A") as echo:
        registry.put(inst("echo", echo))
        async with serving(registry, mutual(pki)) as port:
            bootstrap = {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{port}",
                        "channel_creds": [
                            {
                                "type": "tls",
                                "config": {
                                    "ca_certificate_file": str(pki.ca.cert),
                                    "certificate_file": str(pki.client.cert),
                                    "private_key_file": str(pki.client.key),
                                },
                            }
                        ],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": "proxyless-tls-test", "cluster": "test"},
            }
            path = tmp_path / "bootstrap.json"
            path.write_text(json.dumps(bootstrap))
            child = subprocess.Popen(
                [sys.executable, "-c", _GRPC_CLIENT, "echo", _ECHO_METHOD],
                env={"GRPC_XDS_BOOTSTRAP": str(path), "PATH": "/usr/bin:/bin"},
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                lines = Lines(child)
                await trio.to_thread.run_sync(lines.wait_for, "A", WAIT)
            finally:
                child.kill()
                await trio.to_thread.run_sync(child.wait)
