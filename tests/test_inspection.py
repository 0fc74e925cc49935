"""Inspection: divergences put in on purpose are found, reported and repaired; churn is not one.

A gateway runs in-process over real etcd (and real ZooKeeper beside it),
with a projection; faults are injected through the fan-in's test hook (an
upstream event dropped) and by writing the embedded tree directly (a
projection znode left stale). Detection is awaited with a deadline of two
inspection intervals plus the grace period and a margin.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import etcd3
import h11
import pytest
import trio
from kazoo.client import KazooClient
from prometheus_client.parser import text_string_to_metric_families

from adapters.layouts import curator
from bench.inspection_pass import Churn
from dispatcher import wire
from dispatcher.config import ConfigError, parse_config
from dispatcher.core.model import Instance
from dispatcher.core.snapshot import Put
from dispatcher.core.upstream import Changed, Listing
from dispatcher.gateway import Gateway, run_gateway
from dispatcher.inspection import Divergence, parse_inspection
from dispatcher.zk.codec.paths import join
from proxy.endpoints import ServiceTable
from tests.consul_double import ConsulDouble
from tests.servers import EtcdServer, ZooKeeperServer, free_port
from tests.test_admin import ORDERS, gateway_config, replace
from tests.test_status_page import chromium, open_page
from tests.test_subscription_server import ep, merged_id, serving
from tests.waiting import until

INTERVAL = 1.0
GRACE = 0.3
#: Two intervals, the grace period's second look, and a margin for a loaded machine.
DETECTION_DEADLINE = 2 * INTERVAL + GRACE + 5.0


def grpc_value(addr: str) -> str:
    return json.dumps({"Op": 0, "Addr": addr, "Metadata": None})


def config(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, prefix: str, *,
    enabled: bool = True, zk_root: str = "/inspected",
) -> Any:  # fmt: skip
    return parse_config({
        "node_id": "gw-inspect",
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"), "tick_ms": 200},
        "admin": {"listen": "127.0.0.1:0"},
        "upstream": [
            {"name": "etcd", "kind": "etcd", "endpoint": etcd.endpoint, "max_backoff": 0.5,
             "prefixes": [{"prefix": prefix, "layout": "grpc"}]},
            {"name": "zk", "kind": "zookeeper", "hosts": f"127.0.0.1:{zookeeper.port}",
             "roots": [{"path": zk_root, "layout": "curator"}]},
        ],
        "projection": [{"root": "/projected", "layout": "plain"}],
        "inspection": {"enabled": enabled, "interval": INTERVAL, "grace": GRACE},
    })  # fmt: skip


@asynccontextmanager
async def gateway(cfg: Any) -> AsyncIterator[Gateway]:
    async with trio.open_nursery() as nursery:
        running: Gateway = await nursery.start(run_gateway, cfg)
        await until(lambda: all(s.connected for s in running.fanin.status.values()),
                    "upstreams connected", timeout=20)  # fmt: skip
        try:
            yield running
        finally:
            nursery.cancel_scope.cancel()


def put(etcd: EtcdServer, key: str, value: str) -> None:
    client = etcd3.client(etcd.host, etcd.port, timeout=10)
    try:
        client.put(key, value)
    finally:
        client.close()


async def http(port: int, method: str, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method=method, target=path, headers=[
            ("host", "127.0.0.1"), ("content-length", "0"), ("connection", "close")])  # fmt: skip
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body


async def metric(port: int, name: str, layer: str) -> float:
    _, body = await http(port, "GET", "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("layer") == layer:
                return float(sample.value)
    raise AssertionError(f"no {name}{{layer={layer!r}}} in /metrics")


def instance_ids(gw: Gateway, service: str) -> set[str]:
    entry = gw.fanin.snapshot.get(service)
    return set() if entry is None else set(entry.instances)


async def test_a_dropped_upstream_event_is_found_logged_counted_and_repaired(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, "dispatcher.inspection")
    prefix = f"{unique_path}/"
    service = "orders"
    await trio.to_thread.run_sync(put, etcd, f"{prefix}{service}/a", grpc_value("10.0.0.1:80"))
    async with gateway(config(tmp_path, etcd, zookeeper, prefix)) as gw:
        assert gw.admin is not None and gw.admin.port is not None
        await until(lambda: instance_ids(gw, service) == {"10.0.0.1:80"}, "first instance")
        gw.fanin.drop_next_change("etcd", service)
        await trio.to_thread.run_sync(put, etcd, f"{prefix}{service}/b", grpc_value("10.0.0.2:80"))
        dropped_at = trio.current_time()
        stats = gw.inspector.stats["upstream"] if gw.inspector else None
        assert stats is not None
        await until(lambda: stats.divergences_total >= 1, "the divergence found",
                    timeout=DETECTION_DEADLINE)  # fmt: skip
        detected = trio.current_time() - dropped_at
        # Repaired by a re-list of that service: the snapshot (and so every face) has it.
        await until(lambda: instance_ids(gw, service) == {"10.0.0.1:80", "10.0.0.2:80"},
                    "the repair", timeout=DETECTION_DEADLINE)  # fmt: skip
        last = stats.last
        assert last is not None
        found = [d for d in last.divergences if d.service == service]
        assert found and found[0].missing == ("b",) and found[0].repaired is True
        assert found[0].target == "etcd" and found[0].age >= GRACE
        assert await metric(gw.admin.port, "zkgate_inspection_divergences_total", "upstream") >= 1
        assert (
            await metric(
                gw.admin.port, "zkgate_inspection_last_success_timestamp_seconds", "upstream"
            )
            > 0
        )
        line = next(r for r in caplog.records if r.getMessage() == "inspection found a divergence")
        assert line.__dict__["layer"] == "upstream" and line.__dict__["service"] == service
        assert line.__dict__["missing"] == "b" and line.__dict__["repaired"] is True
        # Checked again: the next passes find nothing more.
        before = stats.divergences_total
        passes = stats.passes
        await until(lambda: stats.passes >= passes + 2, "two more passes", timeout=10)
        assert stats.divergences_total == before
        print(f"detect_s={detected:.2f}", file=sys.stderr)


def zk_register(zookeeper: ZooKeeperServer, root: str, instance: Instance) -> None:
    """Register ``instance`` under ``root`` in the Curator layout, as a Curator client would."""
    name, data = curator.render(instance)
    client = KazooClient(hosts=f"127.0.0.1:{zookeeper.port}")
    client.start(timeout=10)
    try:
        client.create(f"{root}/{curator.directory(instance.service)}/{name}", data, makepath=True)
    finally:
        client.stop()
        client.close()


async def test_a_dropped_zookeeper_event_is_found_and_repaired(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    root = unique_path
    first = Instance("inventory", "i1", "10.0.3.1", 80)
    await trio.to_thread.run_sync(zk_register, zookeeper, root, first)
    cfg = config(tmp_path, etcd, zookeeper, f"{unique_path}/", zk_root=root)
    async with gateway(cfg) as gw:
        assert gw.inspector is not None
        await until(lambda: instance_ids(gw, "inventory") == {"10.0.3.1:80"}, "first instance")
        gw.fanin.drop_next_change("zk", "inventory")
        second = Instance("inventory", "i2", "10.0.3.2", 80)
        await trio.to_thread.run_sync(zk_register, zookeeper, root, second)
        stats = gw.inspector.stats["upstream"]
        await until(lambda: stats.divergences_total >= 1, "the divergence found",
                    timeout=DETECTION_DEADLINE)  # fmt: skip
        await until(lambda: instance_ids(gw, "inventory") == {"10.0.3.1:80", "10.0.3.2:80"},
                    "the repair", timeout=DETECTION_DEADLINE)  # fmt: skip
        assert stats.last is not None
        (divergence,) = stats.last.divergences
        assert (divergence.target, divergence.service) == ("zk", "inventory")
        assert divergence.missing == ("i2",) and divergence.repaired is True
        # Bounded cost: a handful of requests for two services, whatever their size.
        assert stats.last.reads <= 10


async def test_a_stale_projection_znode_is_found_and_reloaded(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, "dispatcher.inspection")
    prefix = f"{unique_path}/"
    await trio.to_thread.run_sync(put, etcd, f"{prefix}payments/a", grpc_value("10.0.1.1:80"))
    async with gateway(config(tmp_path, etcd, zookeeper, prefix)) as gw:
        assert gw.engine is not None and gw.inspector is not None and gw.admin is not None
        await until(lambda: instance_ids(gw, "payments"), "the instance")
        projection = gw.inspector._layers["projection"].projections[0]  # type: ignore[attr-defined]
        directory, expected = projection.rendered("payments")
        await until(lambda: gw.engine is not None and gw.engine.tree.get(directory) is not None,
                    "the projection rendered")  # fmt: skip
        (name,) = expected
        # The fault: the tree written directly, as a missed re-render would leave it.
        gw.engine.sync_projection(directory, {name: b"stale", "ghost": b"{}"})
        stats = gw.inspector.stats["projection"]
        await until(lambda: stats.divergences_total >= 1, "the divergence found",
                    timeout=DETECTION_DEADLINE)  # fmt: skip
        node = gw.engine.tree.get(join(directory, name))
        assert node is not None and node.data == expected[name]
        assert gw.engine.tree.get(join(directory, "ghost")) is None
        assert stats.last is not None
        (divergence,) = stats.last.divergences
        assert (divergence.target, divergence.service) == ("/projected", "payments")
        assert divergence.extra == ("ghost",) and divergence.differing == (name,)
        assert divergence.repaired is True
        assert await metric(gw.admin.port, "zkgate_inspection_divergences_total", "projection") >= 1
        assert any(r.__dict__.get("layer") == "projection" for r in caplog.records)


async def test_the_first_pass_after_a_start_finds_what_was_missed_before_it(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """The first pass reuses what the adapters decoded and the projection
    rendered rather than decoding and rendering everything again; each miss made
    before it still shows: a changed value the fan-in never applied (etcd and
    ZooKeeper alike, the adapter having seen it at the revision the read
    finds) and a projection znode left stale."""
    prefix, root = f"{unique_path}/", unique_path
    orders_key = f"{prefix}orders/a"
    await trio.to_thread.run_sync(put, etcd, orders_key, grpc_value("10.0.4.1:80"))
    await trio.to_thread.run_sync(put, etcd, f"{prefix}carts/a", grpc_value("10.0.4.2:80"))
    first = Instance("inventory", "i1", "10.0.4.3", 80)
    await trio.to_thread.run_sync(zk_register, zookeeper, root, first)
    cfg = config(tmp_path, etcd, zookeeper, prefix, enabled=False, zk_root=root)
    async with gateway(cfg) as gw:
        assert gw.engine is not None and gw.inspector is not None
        await until(lambda: all(instance_ids(gw, s) for s in ("orders", "carts", "inventory")),
                    "every instance")  # fmt: skip
        projection = gw.inspector._layers["projection"].projections[0]  # type: ignore[attr-defined]
        directory, expected = projection.rendered("carts")
        await until(lambda: gw.engine is not None and gw.engine.tree.get(directory) is not None,
                    "the projection rendered")  # fmt: skip
        adapters: dict[str, Any] = {upstream.name: upstream for upstream in gw.upstreams}
        etcd_key = orders_key.encode()
        zk_path = f"{root}/{curator.directory('inventory')}/{curator.render(first)[0]}"
        etcd_seen, zk_seen = adapters["etcd"].applied[etcd_key], adapters["zk"].applied()[zk_path]
        # The faults: two changes the fan-in drops once the adapters applied them,
        # and the tree written directly, as a missed re-render would leave it.
        gw.fanin.drop_next_change("etcd", "orders")
        await trio.to_thread.run_sync(put, etcd, orders_key, grpc_value("10.0.4.9:80"))
        gw.fanin.drop_next_change("zk", "inventory")
        moved = curator.render(attrs.evolve(first, port=81))[1]
        await trio.to_thread.run_sync(zk_set, zookeeper, zk_path, moved)
        await until(lambda: adapters["etcd"].applied[etcd_key][0] > etcd_seen[0]
                    and adapters["zk"].applied()[zk_path][0] > zk_seen[0],
                    "the adapters applied the changes")  # fmt: skip
        (name,) = expected
        gw.engine.sync_projection(directory, {name: b"stale"})
        assert all(stats.passes == 0 for stats in gw.inspector.stats.values())

        reports = {report.layer: report for report in await gw.inspector.inspect()}

        upstream = {(d.target, d.service): d for d in reports["upstream"].divergences}
        assert set(upstream) == {("etcd", "orders"), ("zk", "inventory")}
        assert upstream["etcd", "orders"].differing == ("a",)
        assert upstream["zk", "inventory"].differing == ("i1",)
        (stale,) = reports["projection"].divergences
        assert (stale.service, stale.differing) == ("carts", (name,))
        # On demand: reported, not repaired.
        assert all(d.repaired is None for d in (*upstream.values(), stale))
        assert instance_ids(gw, "orders") == {"10.0.4.1:80"}


def zk_set(zookeeper: ZooKeeperServer, path: str, data: bytes) -> None:
    client = KazooClient(hosts=f"127.0.0.1:{zookeeper.port}")
    client.start(timeout=10)
    try:
        client.set(path, data)
    finally:
        client.stop()
        client.close()


async def test_the_etcd_adapter_keeps_one_revision_per_live_key(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """What inspection compares revisions with costs one entry per key the
    adapter watches: a deleted key's goes with its deletion."""
    prefix = f"{unique_path}/"
    keys = [f"{prefix}stock/{n}" for n in "abc"]
    for n, key in enumerate(keys):
        await trio.to_thread.run_sync(put, etcd, key, grpc_value(f"10.0.5.{n + 1}:80"))
    async with gateway(config(tmp_path, etcd, zookeeper, prefix, enabled=False)) as gw:
        upstream: Any = next(u for u in gw.upstreams if u.name == "etcd")
        assert set(upstream.applied) == {key.encode() for key in keys}
        await trio.to_thread.run_sync(delete, etcd, keys[1])
        await until(lambda: len(instance_ids(gw, "stock")) == 2, "the deletion applied")
        assert set(upstream.applied) == {keys[0].encode(), keys[2].encode()}
        # And a pass over what is left reads it all as consistent.
        reports = await gw.inspector.inspect() if gw.inspector else ()
        assert reports and all(report.consistent for report in reports)


def delete(etcd: EtcdServer, key: str) -> None:
    client = etcd3.client(etcd.host, etcd.port, timeout=10)
    try:
        client.delete(key)
    finally:
        client.close()


#: The issue's churn rate.
CHURN_RATE = 1000.0


async def test_steady_churn_reports_no_divergence(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """Steady heavy churn (puts and deletes over 5 services) through four passes finds
    no divergence.

    The churn aims at the issue's 1,000 changes/s from a process of its own
    (bench/inspection_pass.py's, four writers); the rate reached is measured and
    printed. This shared 2-core machine, with etcd, ZooKeeper and the gateway
    on the same cores, does not always drive it: runs here reached 357 to
    950 changes/s depending on the other load. It must exceed 100/s, i.e.
    the churn ran hard throughout.
    """
    prefix = f"{unique_path}/"
    async with gateway(config(tmp_path, etcd, zookeeper, prefix)) as gw:
        assert gw.inspector is not None
        stats = gw.inspector.stats
        with Churn(etcd, services=5, rate=CHURN_RATE, prefix=prefix) as churn:
            passes = stats["upstream"].passes
            await until(lambda: stats["upstream"].passes >= passes + 4, "four passes under churn",
                        timeout=60)  # fmt: skip
        rate = churn.written / max(churn.seconds, 1e-9)
        assert rate > 100, f"the churn reached only {rate:.0f} changes/s"
        assert stats["upstream"].divergences_total == 0, stats["upstream"].last
        assert stats["projection"].divergences_total == 0, stats["projection"].last
        print(f"churn: {rate:.0f} changes/s, {stats['upstream'].passes - passes} passes",
              file=sys.stderr)  # fmt: skip


async def test_zkgate_inspect_exits_0_consistent_1_diverged_3_unreachable(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    prefix = f"{unique_path}/"
    await trio.to_thread.run_sync(put, etcd, f"{prefix}carts/a", grpc_value("10.0.2.1:80"))
    # Scheduled passes off: nothing repairs behind the command's back.
    async with gateway(config(tmp_path, etcd, zookeeper, prefix, enabled=False)) as gw:
        assert gw.admin is not None and gw.engine is not None and gw.inspector is not None
        await until(lambda: instance_ids(gw, "carts"), "the instance")
        admin = f"127.0.0.1:{gw.admin.port}"

        async def inspect(*extra: str) -> tuple[int, str]:
            done = await trio.run_process(
                [sys.executable, "-m", "dispatcher", "inspect", "--admin", admin, *extra],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            return done.returncode, done.stdout.decode() + done.stderr.decode()

        code, out = await inspect()
        assert code == 0, out
        assert "upstream: consistent" in out and "projection: consistent" in out
        projection = gw.inspector._layers["projection"].projections[0]  # type: ignore[attr-defined]
        directory, _ = projection.rendered("carts")
        gw.engine.sync_projection(directory, {})
        code, out = await inspect()
        assert code == 1, out
        assert "projection: DIVERGED" in out and "/projected carts: missing" in out
        # On demand nothing is repaired: the stale state is still there.
        node = gw.engine.tree.get(directory)
        assert node is None or not node.children
        _, body = await http(gw.admin.port, "GET", "/status")
        section = json.loads(body)["inspection"]
        assert section["layers"]["projection"]["last"]["consistent"] is False
    code, out = await inspect_unreachable(free_port())
    assert code == 3 and "cannot reach" in out


async def inspect_unreachable(port: int) -> tuple[int, str]:
    done = await trio.run_process(
        [sys.executable, "-m", "dispatcher", "inspect", "--admin", f"127.0.0.1:{port}"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout.decode() + done.stderr.decode()


def test_inspection_table_is_checked() -> None:
    assert parse_inspection({}).enabled is False
    parsed = parse_config({"inspection": {"enabled": True, "interval": 10, "grace": 2}})
    assert parse_config(parsed.to_mapping()).inspection == parsed.inspection
    for table, named in (
        ({"intervall": 1}, "intervall"),
        ({"interval": 0}, "interval"),
        ({"grace": "5"}, "grace"),
        ({"interval": 2, "grace": 2}, "grace"),
    ):
        with pytest.raises(ConfigError, match=named):
            parse_config({"inspection": table})


async def test_a_dropped_consul_listing_is_found_and_repaired(tmp_path: Path) -> None:
    with ConsulDouble() as double:
        double.register("web", "web-1", port=80)
        cfg = parse_config({
            "node_id": "gw-inspect",
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
            "admin": {"listen": "127.0.0.1:0"},
            "upstream": [{"name": "consul", "kind": "consul", "address": double.address,
                          "wait": 5.0, "min_interval": 0.05}],
            "inspection": {"enabled": True, "interval": INTERVAL, "grace": GRACE},
        })  # fmt: skip
        async with gateway(cfg) as gw:
            assert gw.inspector is not None
            await until(lambda: len(instance_ids(gw, "web")) == 1, "first instance")
            gw.fanin.drop_next_change("consul", "web")
            double.register("web", "web-2", port=81)
            stats = gw.inspector.stats["upstream"]
            await until(lambda: stats.divergences_total >= 1, "the divergence found",
                        timeout=DETECTION_DEADLINE)  # fmt: skip
            await until(lambda: len(instance_ids(gw, "web")) == 2, "the repair",
                        timeout=DETECTION_DEADLINE)  # fmt: skip
            assert stats.last is not None
            (divergence,) = stats.last.divergences
            assert (divergence.target, divergence.service) == ("consul", "web")
            assert divergence.missing == ("node-1/web-2",) and divergence.repaired is True


READ_INSPECTION = """JSON.stringify(Array.from(
  document.querySelectorAll('#inspection tbody tr[data-layer]'),
  (tr) => Array.from(tr.cells, (td) => td.textContent)))"""


async def test_the_status_page_shows_each_layers_last_pass(tmp_path: Path) -> None:
    replace(tmp_path / "services.toml", ORDERS)
    cfg = gateway_config(tmp_path, inspection={"enabled": True, "interval": INTERVAL,
                                               "grace": GRACE})  # fmt: skip
    with trio.fail_after(60):
        async with gateway(cfg) as gw, chromium(tmp_path / "chromium") as browser:
            assert gw.admin is not None
            session = await open_page(browser, f"http://127.0.0.1:{gw.admin.port}/")
            rows: list[list[str]] = []

            async def shown() -> bool:
                nonlocal rows
                result = await browser.call(
                    "Runtime.evaluate", session, expression=READ_INSPECTION, returnByValue=True
                )
                if "exceptionDetails" in result:
                    return False
                rows = json.loads(result["result"]["value"])
                return len(rows) == 5 and all(r[2] == "consistent" for r in rows[:4])

            await until(shown, "every pass layer's last pass on the page", timeout=20)
            assert [r[0] for r in rows] == ["upstream", "projection", "mirror", "xds", "proxy"]
            assert rows[4][2] == "no pass yet"  # no proxy has acknowledged anything
            assert all(r[3] == "0" for r in rows)  # no divergence in total
            await browser.call("Browser.close")


# --------------------------------------------------------------- layer "proxy"


async def test_a_proxy_that_skipped_a_delta_is_found_at_its_ack_and_sent_a_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "dispatcher.faces.subscription_server")
    checked: list[Divergence | None] = []
    async with serving() as h:
        h.server.on_inspected = checked.append
        await h.upstream.send(Listing((ep(8081),)))
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": None}))
        table = ServiceTable("orders")  # the proxy's own table and digest
        full = await client.expect(wire.Full)
        table.apply_full(full, "d1")
        await client.send(wire.Ack("orders", full.version, table.digest()))
        assert await client.settle() == []
        assert checked == [None]

        await h.upstream.send(Changed((Put(ep(8082)),)))
        delta = await client.expect(wire.Deltas)
        # The fault: the delta acknowledged, not applied.
        await client.send(wire.Ack("orders", delta.to_version, table.digest()))
        repair = await client.expect(wire.Full)
        assert repair.version == delta.to_version
        table.apply_full(repair, "d1")
        await client.send(wire.Ack("orders", repair.version, table.digest()))
        assert await client.settle() == []
        assert {endpoint.instance.id for endpoint in table} == {merged_id(8081), merged_id(8082)}
        assert [found is None for found in checked] == [True, False, True]
        divergence = checked[1]
        assert divergence is not None and divergence.layer == "proxy"
        assert (divergence.target, divergence.service, divergence.repaired) == (
            "proxy-1",
            "orders",
            True,
        )
        (line,) = [r for r in caplog.records if r.getMessage() == "inspection found a divergence"]
        assert line.__dict__["layer"] == "proxy" and line.__dict__["service"] == "orders"


async def test_a_proxy_whose_table_still_differs_is_not_sent_full_after_full() -> None:
    checked: list[Divergence | None] = []
    async with serving() as h:
        h.server.on_inspected = checked.append
        await h.upstream.send(Listing((ep(8081),)))
        client = await h.connect()
        await client.send(wire.Subscribe({"orders": None}))
        full = await client.expect(wire.Full)
        await client.send(wire.Ack("orders", full.version, "0" * 32))
        assert isinstance(await client.expect(wire.Full), wire.Full)  # the one repair
        await client.send(wire.Ack("orders", full.version, "0" * 32))
        assert await client.settle() == []  # reported again, no second Full
        assert [d is not None and d.repaired for d in checked] == [True, False]
        # An Ack of a version the snapshot has moved past is in flight, not compared.
        await h.upstream.send(Changed((Put(ep(8082)),)))
        await client.expect(wire.Deltas)
        await client.send(wire.Ack("orders", full.version, "1" * 32))
        assert await client.settle() == []
        assert len(checked) == 2


def test_the_proxys_digest_follows_fulls_and_deltas_and_acks_stay_compatible() -> None:
    a = wire.WireInstance("10.0.0.1:1", "10.0.0.1", 1, metadata={"v": "1"})
    b = wire.WireInstance("10.0.0.1:2", "10.0.0.1", 2)
    table = ServiceTable("orders")
    table.apply_full(wire.Full("orders", 1, (a,)), "d1")
    assert table.apply_deltas(wire.Deltas("orders", 1, 2, (b,), ()), "d1")
    assert table.digest() == wire.table_digest((b, a))
    assert table.digest() != wire.table_digest((a,))
    changed = wire.WireInstance("10.0.0.1:2", "10.0.0.1", 2, weight=5)
    assert wire.table_digest((a, changed)) != table.digest()
    # Optional on the wire: an Ack without it still decodes, and one with it round-trips.
    assert wire.decode(wire.encode(wire.Ack("orders", 2))[4:]) == wire.Ack("orders", 2)
    with_digest = wire.Ack("orders", 2, table.digest())
    assert wire.decode(wire.encode(with_digest)[4:]) == with_digest
