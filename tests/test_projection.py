"""Projections: the unified registry as read-only znodes in the layouts clients parse.

zkgate runs as users run it (``zkgate serve --config``) with a static upstream
file, and kazoo reads the projected subtrees like a Dubbo consumer, a Curator
ServiceDiscovery client, a Finagle ServerSet resolver or a plain-JSON reader
would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.protocol.states import WatchedEvent

from tests.servers import ServerFactory, ZkgateServer, wait_for

CONFIG = """
node_id = "gw-test"

[[upstream]]
name = "file"
kind = "static"
path = "{instances}"
poll_interval = 0.05

[[projection]]
root = "/dubbo"
layout = "dubbo"

[[projection]]
root = "/services"
layout = "curator"

[[projection]]
root = "/serversets"
layout = "serverset"

[[projection]]
root = "/plain"
layout = "plain"
"""


def _write_instances(path: Path, instances: list[dict[str, object]]) -> None:
    # Write then rename: the static upstream must never see half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"instances": instances}))
    os.replace(tmp, path)


ORDERS_A = {"service": "com.acme.Orders", "id": "a", "host": "10.0.0.1", "port": 20880,
            "weight": 50, "metadata": {"version": "1.2"}, "health": "passing"}  # fmt: skip
#: The fan-in names a merged instance by its endpoint, whatever its source called it.
A_ID = "10.0.0.1:20880"
ORDERS_B = {"service": "com.acme.Orders", "id": "b", "host": "10.0.0.2", "port": 20880,
            "health": "failing"}  # fmt: skip


@pytest.fixture
def gateway(
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path
) -> Iterator[tuple[ZkgateServer, Path, KazooClient]]:
    instances = tmp_path / "instances.json"
    _write_instances(instances, [ORDERS_A, ORDERS_B])
    config = tmp_path / "zkgate.toml"
    config.write_text(CONFIG.format(instances=instances))
    server = zkgate_factory(["--config", str(config)])
    client = KazooClient(hosts=server.address, timeout=10)
    client.start(timeout=10)
    yield server, instances, client
    client.stop()
    client.close()


def test_dubbo_consumers_find_providers(gateway: tuple[ZkgateServer, Path, KazooClient]) -> None:
    _, _, zk = gateway
    providers = "/dubbo/com.acme.Orders/providers"
    wait_for(lambda: zk.exists(providers) and zk.get_children(providers), timeout=10,
             message="the Dubbo providers to be projected")  # fmt: skip
    (url,) = zk.get_children(providers)  # the failing instance is hidden
    decoded = unquote(url)
    assert decoded.startswith("dubbo://10.0.0.1:20880/com.acme.Orders?")
    assert "weight=50" in decoded
    assert "zkgate.exported-by=gw-test" in decoded


def test_curator_discovery_json_and_serverset_status(
    gateway: tuple[ZkgateServer, Path, KazooClient],
) -> None:
    _, _, zk = gateway
    wait_for(lambda: zk.exists(f"/services/com.acme.Orders/{A_ID}"), timeout=10,
             message="the Curator instance to be projected")  # fmt: skip
    data, _ = zk.get(f"/services/com.acme.Orders/{A_ID}")
    record = json.loads(data)
    assert (record["name"], record["id"], record["address"], record["port"]) == (
        "com.acme.Orders",
        A_ID,
        "10.0.0.1",
        20880,
    )
    assert zk.get_children("/services/com.acme.Orders") == [A_ID]
    members = sorted(zk.get_children("/serversets/com.acme.Orders"))
    statuses = sorted(
        json.loads(zk.get(f"/serversets/com.acme.Orders/{m}")[0])["status"] for m in members
    )
    assert statuses == ["ALIVE", "DEAD"]


def test_changes_fire_watches_and_unchanged_nodes_keep_their_stats(
    gateway: tuple[ZkgateServer, Path, KazooClient],
) -> None:
    _, instances, zk = gateway
    directory = "/plain/com.acme.Orders"
    wait_for(lambda: zk.exists(f"{directory}/{A_ID}"), timeout=10, message="the plain projection")
    _, stat_before = zk.get(f"{directory}/{A_ID}")
    events: list[WatchedEvent] = []
    fired = threading.Event()

    def watcher(event: WatchedEvent) -> None:
        events.append(event)
        fired.set()

    assert zk.get_children(directory, watch=watcher) == [A_ID]
    added = {"service": "com.acme.Orders", "id": "c", "host": "10.0.0.3", "port": 20880}
    _write_instances(instances, [ORDERS_A, ORDERS_B, added])
    assert fired.wait(10), "no child watch fired for the new instance"
    assert [(e.type, e.path) for e in events] == [("CHILD", directory)]
    assert sorted(zk.get_children(directory)) == [A_ID, "10.0.0.3:20880"]
    _, stat_after = zk.get(f"{directory}/{A_ID}")
    assert stat_after == stat_before  # nothing about "a" changed, so nothing moved

    changed = threading.Event()
    zk.get(f"{directory}/{A_ID}", watch=lambda event: changed.set())
    _write_instances(instances, [{**ORDERS_A, "weight": 75}, ORDERS_B, added])
    assert changed.wait(10), "no data watch fired for the changed instance"
    data, stat = zk.get(f"{directory}/{A_ID}")
    assert json.loads(data)["weight"] == 75
    assert stat.version == stat_before.version + 1
    assert stat.mzxid > stat_before.mzxid

    _write_instances(instances, [])
    wait_for(lambda: not zk.exists(directory), timeout=10,
             message="the service directory to go with its last instance")  # fmt: skip
    assert zk.exists("/plain") is not None  # the projection root stays


def test_projections_are_read_only(gateway: tuple[ZkgateServer, Path, KazooClient]) -> None:
    _, _, zk = gateway
    wait_for(lambda: zk.exists(f"/plain/com.acme.Orders/{A_ID}"), timeout=10, message="projection")
    with pytest.raises(NoAuthError):
        zk.set(f"/plain/com.acme.Orders/{A_ID}", b"hijack")
    with pytest.raises(NoAuthError):
        zk.create("/plain/com.acme.Orders/mine", b"")
    with pytest.raises(NoAuthError):
        zk.delete(f"/plain/com.acme.Orders/{A_ID}")
    with pytest.raises(NoAuthError):
        zk.delete("/plain")
    # The rest of the tree is as writable as ever.
    zk.create("/elsewhere", b"ok")
    assert zk.get("/elsewhere")[0] == b"ok"


def test_projection_survives_restart_without_storing_itself(
    gateway: tuple[ZkgateServer, Path, KazooClient],
) -> None:
    server, _, zk = gateway
    wait_for(lambda: zk.exists(f"/plain/com.acme.Orders/{A_ID}"), timeout=10, message="projection")
    zk.create("/kept", b"mine")
    zk.stop()
    server.stop()
    server.start()
    zk.start(timeout=10)
    assert zk.get("/kept")[0] == b"mine"
    wait_for(lambda: zk.exists(f"/plain/com.acme.Orders/{A_ID}"), timeout=10,
             message="the projection to be rebuilt after the restart")  # fmt: skip


def test_a_projection_root_that_holds_data_is_refused(
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path
) -> None:
    server = zkgate_factory()
    client = KazooClient(hosts=server.address, timeout=10)
    client.start(timeout=10)
    client.create("/dubbo/x", b"", makepath=True)
    client.stop()
    server.stop()
    config = tmp_path / "zkgate.toml"
    config.write_text('[[projection]]\nroot = "/dubbo"\nlayout = "dubbo"\n')
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(server.data_dir), "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "projection /dubbo" in result.stderr
    assert "already exists" in result.stderr
