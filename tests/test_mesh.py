"""Mesh onboarding in the ZooKeeper face: consumers known, the switch, the ratio, the
version check (issue #18, items 1 to 3).

Real ZooKeeper 3.8 is the upstream (Dubbo layout) and the governance store; ``zkgate serve``
runs as a child process; the consumers are kazoo clients from two source addresses
(127.0.0.1 and 127.0.0.2: loopback accepts both) that register and read as Dubbo does.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import pytest
from kazoo.client import KazooClient
from kazoo.handlers.threading import SequentialThreadingHandler

from adapters.layouts.dubbo import encode
from dispatcher.faces.mesh.config import parse_version
from dispatcher.faces.mesh.views import sidecar_weight
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, free_port, wait_for

SERVICE = "shop.Cart"
TOKEN = "mesh-test-token"
PROVIDERS = [("10.0.0.1", 20880, 100), ("10.0.0.2", 20880, 100)]
SIDECAR_A = "127.0.0.1:15001"
SIDECAR_B = "127.0.0.2:15001"


def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait (kazoo's threads deliver events) until ``check()`` holds; fail naming ``what``."""
    wait_for(check, timeout=timeout, interval=0.01, message=what)


class _SourceBound(SequentialThreadingHandler):
    """kazoo's handler, with every connection made from ``source`` (a loopback address)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def create_connection(self, *args: Any, **kwargs: Any) -> socket.socket:
        from kazoo.handlers import utils

        source = self.source

        class _Socket(types.ModuleType):
            """The socket module, whose connections start from ``source``."""

            def __getattr__(self, name: str) -> Any:
                return getattr(socket, name)

            @staticmethod
            def create_connection(address: Any, timeout: Any = None) -> socket.socket:
                return socket.create_connection(address, timeout, source_address=(source, 0))

        shim = _Socket("socket")
        return utils.create_tcp_connection(shim, *args, **kwargs)  # type: ignore[no-any-return]


def _consumer_url(host: str, application: str, release: str) -> str:
    return encode(
        f"consumer://{host}/{SERVICE}?application={application}&category=consumers"
        f"&dubbo=2.0.2&interface={SERVICE}&release={release}&side=consumer"
    )


class DubboConsumer:
    """A Dubbo-layout consumer over kazoo: registers, lists providers with a watch, and
    counts the watch events it hears."""

    def __init__(self, zkgate: str, source: str, application: str, release: str) -> None:
        self.client = KazooClient(hosts=zkgate, handler=_SourceBound(source), timeout=10)
        self.client.start(timeout=15)
        self.host = source
        self.events = 0
        self._lock = threading.Lock()
        base = f"/dubbo/{encode(SERVICE)}/consumers"
        self.client.create(f"{base}/{_consumer_url(source, application, release)}",
                           ephemeral=True)  # fmt: skip

    def _heard(self, _event: Any) -> None:
        with self._lock:
            self.events += 1

    def providers(self, *, watch: bool = True) -> tuple[list[str], Any]:
        """``getChildren2`` of the providers: the decoded URLs and the directory's stat."""
        path = f"/dubbo/{encode(SERVICE)}/providers"
        names, stat = self.client.get_children(
            path, watch=self._heard if watch else None, include_data=True
        )
        return sorted(unquote_plus(name) for name in names), stat

    def stop(self) -> None:
        self.client.stop()
        self.client.close()


def _weights(urls: list[str]) -> dict[str, int]:
    """``host:port`` -> the weight Dubbo reads from each provider URL (default 100)."""
    result = {}
    for url in urls:
        parts = urlsplit(url)
        weight = parse_qs(parts.query).get("weight", ["100"])[-1]
        result[parts.netloc] = int(weight)
    return result


def _admin(admin: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    request = urllib.request.Request(f"http://{admin}{path}", data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _switch(admin: str, switches: dict[str, dict[str, Any]]) -> int:
    """Write the mesh document (one service per application); the new version."""
    _, current = _admin(admin, "GET", "/mesh")
    document = {"consumers": {app: {SERVICE: value} for app, value in switches.items()}}
    status, answer = _admin(admin, "PUT", "/mesh", {
        "document": document, "expected_version": current["version"], "why": "test",
    })  # fmt: skip
    assert status == 200, answer
    assert answer["seen"] is True
    return int(answer["version"])


@pytest.fixture
def mesh_setup(
    tmp_path: Path,
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    unique_path: str,
) -> Iterator[tuple[str, ZkgateServer]]:
    upstream = KazooClient(hosts=zookeeper.address)
    upstream.start(timeout=15)
    root = f"{unique_path}/dubbo"
    for host, port, weight in PROVIDERS:
        url = f"dubbo://{host}:{port}/{SERVICE}?interface={SERVICE}&methods=add&weight={weight}"
        upstream.create(f"{root}/{encode(SERVICE)}/providers/{encode(url)}", makepath=True)
    config = tmp_path / "mesh.toml"
    config.write_text(f"""
node_id = "d1"
[membership]
kind = "zookeeper"
address = "{zookeeper.address}"
root = "{unique_path}/zkgate"
session_timeout = 2.0
[governance]
token = "{TOKEN}"
[mesh]
min_version = {{ dubbo = "2.7.8" }}
[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "{zookeeper.address}"
roots = [{{ path = "{root}", layout = "dubbo" }}]
[[projection]]
root = "/dubbo"
layout = "dubbo"
""")
    admin = f"127.0.0.1:{free_port()}"
    server = zkgate_factory(["--config", str(config), "--admin-listen", admin])
    # The sidecars of both hosts register as `zkgate proxy --register` does.
    sidecars = KazooClient(hosts=server.address)
    sidecars.start(timeout=15)
    for address in (SIDECAR_A, SIDECAR_B):
        host = address.rpartition(":")[0]
        sidecars.create(f"/zkgate/sidecars/{host}/{SERVICE}", address.encode(),
                        ephemeral=True, makepath=True)  # fmt: skip
    try:
        yield admin, server
    finally:
        sidecars.stop()
        sidecars.close()
        upstream.stop()
        upstream.close()


def test_sidecar_weight_edges() -> None:
    """R = 0 shows no sidecar, R = 100 the sidecar alone, and between them its weight is
    R / (100 - R) times the providers' sum; nothing to weigh against shows no sidecar."""
    assert sidecar_weight(0, [100, 100]) is None
    assert sidecar_weight(100, [100, 100]) == 100
    assert sidecar_weight(30, [100, 100]) == 86  # 30/70 * 200 = 85.7
    assert sidecar_weight(50, [100, 100]) == 200
    assert sidecar_weight(30, []) is None
    assert sidecar_weight(100, []) == 100
    assert parse_version("2.7.8-SNAPSHOT") == (2, 7, 8)
    assert parse_version("2.7") is not None and parse_version("2.7") < (2, 7, 8)  # type: ignore[operator]


def test_switch_ratio_and_version_check(mesh_setup: tuple[str, ZkgateServer]) -> None:
    """One consumer switched on sees its sidecar (alone at R=100, weighted at R=30, not at
    all when off) while the other consumer's view and watches are untouched; a consumer
    below the minimum version is refused with the reason; a session's stats never go
    backwards across the switches."""
    admin, server = mesh_setup
    web = DubboConsumer(server.address, "127.0.0.1", "web", "2.7.8")
    other = DubboConsumer(server.address, "127.0.0.2", "billing", "3.0.1")
    old = DubboConsumer(server.address, "127.0.0.2", "legacy", "2.6.5")
    true_hosts = {f"{host}:{port}" for host, port, _ in PROVIDERS}
    try:
        until(lambda: set(_weights(web.providers(watch=False)[0])) == true_hosts,
              "the providers projected")  # fmt: skip
        web_before, web_stat = web.providers()
        other_before, _ = other.providers()
        old.providers()
        assert set(_weights(web_before)) == true_hosts
        stats = [web_stat]

        # R = 100: only the sidecar, and the switched consumer's watch fired.
        _switch(admin, {"web": {"mode": "on", "ratio": 100},
                        "legacy": {"mode": "on", "ratio": 100}})  # fmt: skip
        until(lambda: web.events == 1, "the switched consumer's watch event")
        urls, stat = web.providers()
        assert _weights(urls) == {SIDECAR_A: 100}
        stats.append(stat)

        # R = 30: the true providers unchanged and the sidecar at 30/70 of their sum.
        _switch(admin, {"web": {"mode": "on", "ratio": 30},
                        "legacy": {"mode": "on", "ratio": 100}})  # fmt: skip
        until(lambda: web.events == 2, "the ratio change's watch event")
        urls, stat = web.providers()
        weights = _weights(urls)
        assert weights == {**dict.fromkeys(true_hosts, 100), SIDECAR_A: 86}
        stats.append(stat)
        picks = random.Random(18).choices(list(weights), list(weights.values()), k=2000)
        share = picks.count(SIDECAR_A) / len(picks)
        assert 0.25 <= share <= 0.35, share

        # Off: the true providers again.
        _switch(admin, {"web": {"mode": "off"}, "legacy": {"mode": "on", "ratio": 100}})
        until(lambda: web.events == 3, "the switch-off's watch event")
        urls, stat = web.providers()
        assert set(_weights(urls)) == true_hosts
        stats.append(stat)

        # Never backwards for the session: cversion and pzxid only grow.
        for earlier, later in itertools.pairwise(stats):
            assert later.cversion > earlier.cversion
            assert later.pzxid >= earlier.pzxid

        # The other consumer: no event, and the same providers as before.
        assert other.events == 0
        assert other.providers(watch=False)[0] == other_before
        # The consumer below the minimum version: refused, never shown a sidecar.
        assert old.events == 0
        assert set(_weights(old.providers(watch=False)[0])) == true_hosts

        status, listing = _admin(admin, "GET", "/mesh/consumers")
        assert status == 200
        by_app = {c["application"]: c for c in listing["consumers"]}
        assert by_app["web"]["version"] == "2.7.8" and by_app["web"]["host"] == "127.0.0.1"
        assert by_app["web"]["sessions"] == [f"0x{web.client.client_id[0]:x}"]
        legacy = by_app["legacy"]
        assert legacy["refused"] == "dubbo 2.6.5 is below the minimum 2.7.8"
        assert [(r["service"], r["state"]) for r in legacy["services"]] == [(SERVICE, "refused")]
        assert by_app["billing"]["services"][0]["state"] == "off"
    finally:
        for consumer in (web, other, old):
            consumer.stop()


def test_mesh_writes_need_the_token(mesh_setup: tuple[str, ZkgateServer]) -> None:
    """A mesh write without the bearer token is refused with 401 and changes nothing; a bad
    document is refused with 400 naming the key."""
    admin, _ = mesh_setup
    request = urllib.request.Request(
        f"http://{admin}/mesh", json.dumps({"document": {}, "expected_version": 0,
                                            "why": "x"}).encode(), method="PUT",
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    status, answer = _admin(admin, "PUT", "/mesh", {
        "document": {"consumers": {"web": {SERVICE: {"mode": "on", "ratio": 101}}}},
        "expected_version": 0, "why": "x",
    })  # fmt: skip
    assert status == 400 and "ratio" in answer["error"]
    assert _admin(admin, "GET", "/mesh")[1]["version"] == 0
