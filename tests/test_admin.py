"""The admin HTTP endpoint: metrics an operator scrapes, health and readiness, the
snapshot as JSON, the shard map, and the bounds that keep a bad client harmless.

The gateway runs in-process (``run_gateway``) with a static upstream file that
the tests rewrite, so every value the endpoint shows can be changed from the
test and seen to change. The HTTP client is h11 over a real socket; the
bounds tests speak raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
from kazoo.client import KazooClient
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.config import AdminConfig, ConfigError, parse_config
from dispatcher.faces.admin.http import AdminLimits, AdminServer
from dispatcher.faces.admin.metrics import RequestMetrics
from dispatcher.gateway import Gateway, run_gateway
from dispatcher.wire import Owner
from dispatcher.zk.codec.protocol import OpCode
from tests.servers import ServerFactory, ZkgateServer, free_port
from tests.waiting import until

TIMEOUT = 10.0

ORDERS = """\
[[instance]]
service = "orders"
id = "orders-a"
host = "10.0.0.7"
port = 8080
health = "passing"
zone = "eu-west-1a"
metadata = { version = "1.4.2" }

[[instance]]
service = "orders"
host = "10.0.0.8"
port = 8080
health = "failing"
"""

BILLING = """
[[instance]]
service = "billing"
host = "10.0.1.1"
port = 9000
"""


# ---------------------------------------------------------------------- helpers


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


async def _read_response(stream: trio.abc.Stream, conn: h11.Connection) -> Reply:
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            headers = {k.decode(): v.decode() for k, v in response.headers}
            return Reply(response.status_code, headers, bytes(body))
        else:
            raise AssertionError(f"unexpected {event!r}")


async def get(
    port: int, path: str, *, method: str = "GET", headers: Iterable[tuple[str, str]] = ()
) -> Reply:
    """One request on a fresh connection."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method=method, target=path,
                headers=[("host", f"127.0.0.1:{port}"), ("connection", "close"), *headers],
            )  # fmt: skip
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            return await _read_response(stream, conn)


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and read everything until the server closes."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            return bytes(received)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (sample name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = await get(port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return metrics(reply.text)


def replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def gateway_config(tmp_path: Path, **tables: Any) -> Any:
    """A gateway on ports 0 over the static file ``tmp_path/services.toml``, plus ``tables``."""
    return parse_config({
        "node_id": "gw-test",
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
                      "tick_ms": 200},
        "admin": {"listen": "127.0.0.1:0"},
        "upstream": [{"name": "files", "kind": "static", "path": str(tmp_path / "services.toml"),
                      "poll_interval": 0.05}],
        **tables,
    })  # fmt: skip


@asynccontextmanager
async def gateway(
    tmp_path: Path, text: str | None = ORDERS, **tables: Any
) -> AsyncIterator[tuple[Gateway, int]]:
    """A running gateway over ``tmp_path/services.toml`` (absent when ``text`` is None)."""
    if text is not None:
        replace(tmp_path / "services.toml", text)
    async with trio.open_nursery() as nursery:
        running: Gateway = await nursery.start(run_gateway, gateway_config(tmp_path, **tables))
        assert running.admin is not None and running.admin.port is not None
        try:
            yield running, running.admin.port
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def admin_only(
    tmp_path: Path, limits: AdminLimits | None = None, **kwargs: Any
) -> AsyncIterator[tuple[AdminServer, int]]:
    """An admin endpoint over a gateway that is not running (no port bound)."""
    idle = Gateway(gateway_config(tmp_path))
    admin = AdminServer(idle, limits=limits, **kwargs)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(admin.serve, "127.0.0.1", 0)
        try:
            yield admin, port
        finally:
            nursery.cancel_scope.cancel()


def kazoo(port: int) -> KazooClient:
    client = KazooClient(hosts=f"127.0.0.1:{port}", timeout=4.0)
    client.start(timeout=TIMEOUT)
    return client


# ---------------------------------------------------------------------- /metrics


async def test_metrics_show_the_gateway_and_change_with_it(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (running, port):
        await until(
            lambda: _has(port, ("zkgate_instances", ()), 2.0), "the file's instances counted"
        )
        first = await scrape(port)
        upstream = (("kind", "static"), ("upstream", "files"))
        assert first[("zkgate_services", ())] == 1
        assert first[("zkgate_instances_by_health", (("health", "passing"),))] == 1
        assert first[("zkgate_instances_by_health", (("health", "failing"),))] == 1
        assert first[("zkgate_instances_by_health", (("health", "unknown"),))] == 0
        assert first[("zkgate_upstream_connected", upstream)] == 1
        assert first[("zkgate_upstream_stale_seconds", upstream)] == 0
        assert first[("zkgate_upstream_ever_connected", upstream)] == 1
        assert first[("zkgate_snapshot_version", ())] == running.fanin.snapshot.version >= 1
        assert first[("zkgate_snapshot_age_seconds", ())] >= 0
        assert first[("zkgate_fanin_events_total", ())] >= 2  # a Listing and a Status
        assert first[("zkgate_fanin_restarts_total", ())] == 0
        assert first[("zkgate_zk_sessions", ())] == 0
        assert first[("zkgate_zk_connections", ())] == 0
        assert first[("zkgate_zk_watches", ())] == 0
        assert first[("zkgate_zk_znodes", ())] >= 1  # / and /zookeeper...
        assert first[("zkgate_subscribers", ())] == 0
        assert first[("zkgate_subscriber_lag_max", ())] == 0
        assert ("process_resident_memory_bytes", ()) in first

        # A ZooKeeper client with a watch, and a subscriber that does not read.
        zk_port = running.port
        assert zk_port is not None
        client = await trio.to_thread.run_sync(kazoo, zk_port)
        try:
            await trio.to_thread.run_sync(lambda: client.create("/app", b"x"))
            await trio.to_thread.run_sync(lambda: client.get("/app", watch=lambda event: None))
            subscription = running.fanin.subscribe(["orders", "billing"])
            replace(tmp_path / "services.toml", ORDERS + BILLING)
            await until(lambda: _has(port, ("zkgate_services", ()), 2.0), "the new service counted")
            second = await scrape(port)
            assert second[("zkgate_zk_sessions", ())] == 1
            assert second[("zkgate_zk_connections", ())] == 1
            assert second[("zkgate_zk_watches", ())] == 1
            assert second[("zkgate_zk_znodes", ())] == first[("zkgate_zk_znodes", ())] + 1
            assert second[("zkgate_zk_packets_received_total", ())] >= 2
            assert second[("zkgate_instances", ())] == 3
            assert second[("zkgate_snapshot_version", ())] > first[("zkgate_snapshot_version", ())]
            assert (
                second[("zkgate_fanin_versions_total", ())]
                > first[("zkgate_fanin_versions_total", ())]
            )
            assert second[("zkgate_subscribers", ())] == 1
            # Two full entries wait to be read, then the new version's delta.
            assert second[("zkgate_subscriber_lag_max", ())] >= 2
            assert second[("zkgate_subscription_interest_added_total", ())] == 2
            subscription.close()
        finally:
            await trio.to_thread.run_sync(client.stop)
            await trio.to_thread.run_sync(client.close)
        await until(
            lambda: _has(port, ("zkgate_zk_connections", ()), 0.0), "the client's disconnect"
        )
        third = await scrape(port)
        assert third[("zkgate_subscribers", ())] == 0
        assert third[("zkgate_subscription_interest_removed_total", ())] == 2


async def _has(port: int, key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> bool:
    return (await scrape(port)).get(key) == value


def test_request_metrics_count_by_opcode_into_histogram_buckets() -> None:
    requests = RequestMetrics(buckets=(0.001, 0.01))
    for _ in range(3):
        requests.observe(OpCode.GET_DATA, 0.0005)
    requests.observe(OpCode.GET_DATA, 0.001)  # "le" includes the bound
    requests.observe(OpCode.CREATE, 0.5)
    requests.observe(9999, 0.002)  # not a ZooKeeper opcode
    requests.observe(8888, 0.002)
    counter, histogram = requests.families()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in (counter, histogram)
        for s in family.samples
    }
    get_data = ("opcode", "get_data")
    assert samples[("zkgate_zk_requests_total", (get_data,))] == 4
    bucket = "zkgate_zk_request_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.001"), get_data))] == 4
    assert samples[(bucket, (("le", "0.01"), get_data))] == 4
    assert samples[(bucket, (("le", "+Inf"), get_data))] == 4
    assert samples[("zkgate_zk_request_duration_seconds_sum", (get_data,))] == pytest.approx(0.0025)
    create = ("opcode", "create")
    assert samples[(bucket, (("le", "0.01"), create))] == 0
    assert samples[(bucket, (("le", "+Inf"), create))] == 1
    # Garbage opcodes share one series: they cannot grow the label set.
    assert samples[("zkgate_zk_requests_total", (("opcode", "other"),))] == 2
    assert requests.count(OpCode.GET_DATA) == 4


async def test_zookeeper_requests_are_counted_by_opcode(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (running, port):
        assert running.port is not None
        client = await trio.to_thread.run_sync(kazoo, running.port)
        try:
            await trio.to_thread.run_sync(lambda: client.create("/counted", b""))
            for _ in range(5):
                await trio.to_thread.run_sync(lambda: client.get("/counted"))
        finally:
            await trio.to_thread.run_sync(client.stop)
            await trio.to_thread.run_sync(client.close)
        samples = await scrape(port)
        get_data = (("opcode", "get_data"),)
        assert samples[("zkgate_zk_requests_total", get_data)] == 5
        assert samples[("zkgate_zk_requests_total", (("opcode", "create"),))] == 1
        assert samples[(
            "zkgate_zk_request_duration_seconds_bucket", (("le", "+Inf"), ("opcode", "get_data"))
        )] == 5  # fmt: skip


async def test_health_checker_and_subscription_server_metrics(tmp_path: Path) -> None:
    # Probed for real, on loopback only: one port that accepts, one that refuses.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    up = listeners[0].socket.getsockname()[1]
    down = free_port()
    instances = "".join(
        f'[[instance]]\nservice = "db"\nhost = "127.0.0.1"\nport = {port}\n' for port in (up, down)
    )
    health = {"enabled": True, "interval": 0.2, "timeout": 0.1, "rise": 1, "fall": 1,
              "jitter": 0.0}  # fmt: skip
    subscriptions = {"listen": "127.0.0.1:0", "token": "secret"}
    async with trio.open_nursery() as accepting:
        accepting.start_soon(trio.serve_listeners, _close_at_once, listeners)
        async with gateway(tmp_path, instances, health=health, subscriptions=subscriptions) as (
            _running,
            port,
        ):
            failing = ("zkgate_instances_by_health", (("health", "failing"),))
            passing = ("zkgate_instances_by_health", (("health", "passing"),))
            await until(lambda: _has(port, failing, 1.0), "the closed port found failing")
            await until(lambda: _has(port, passing, 1.0), "the open port found passing")
            samples = await scrape(port)
            assert samples[("zkgate_health_probes_total", ())] >= 2
            assert samples[("zkgate_health_to_failing_total", ())] >= 1
            assert samples[("zkgate_health_failures_total", ())] >= 1
            assert samples[("zkgate_health_tracked", ())] == 2
            # Detection time counts from a last passing result; this one never passed.
            assert samples[("zkgate_health_detection_seconds_count", ())] == 0
            assert samples[("zkgate_subscription_connections", ())] == 0
            assert samples[("zkgate_subscription_services_behind", ())] == 0
            proxies = (await get(port, "/status")).json()["proxies"]
            assert proxies == {"connections": 0, "services_behind": 0, "unsent_bytes_max": 0,
                               "refused": 0}  # fmt: skip
        accepting.cancel_scope.cancel()


async def _close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


# ---------------------------------------------------------------------- /health and /ready


async def test_ready_waits_for_every_upstream_then_rides_out_an_outage(tmp_path: Path) -> None:
    async with gateway(tmp_path, text=None) as (_running, port):
        health = await get(port, "/health")
        assert (health.status, health.text) == (200, "ok\n")
        not_ready = await get(port, "/ready")
        assert not_ready.status == 503
        assert not_ready.headers["content-type"] == "application/json"
        body = not_ready.json()
        assert body["ready"] is False
        assert len(body["reasons"]) == 1
        assert "'files' has not connected yet" in body["reasons"][0]

        async def says_why() -> bool:
            return "cannot read" in (await get(port, "/ready")).json()["reasons"][0]

        await until(says_why, "the upstream's own explanation in the reason")

        replace(tmp_path / "services.toml", ORDERS)
        await until(lambda: _status_is(port, "/ready", 200), "ready once the file loads")
        assert (await get(port, "/ready")).json() == {"ready": True}

        # The upstream goes away: stale, but still ready (the last state is served).
        (tmp_path / "services.toml").unlink()

        async def stale() -> bool:
            upstream = (await get(port, "/status")).json()["upstreams"][0]
            return not upstream["connected"] and upstream["stale_seconds"] > 0

        await until(stale, "the upstream marked stale")
        assert (await get(port, "/ready")).status == 200
        status = (await get(port, "/status")).json()
        assert status["ready"] is True
        assert status["upstreams"][0]["ever_connected"] is True
        assert status["snapshot"]["services"] == 1  # still served
        samples = await scrape(port)
        upstream = (("kind", "static"), ("upstream", "files"))
        assert samples[("zkgate_upstream_connected", upstream)] == 0
        assert samples[("zkgate_upstream_stale_seconds", upstream)] > 0


async def _not(check: Callable[[], Awaitable[bool]]) -> bool:
    return not await check()


async def _status_is(port: int, path: str, status: int) -> bool:
    return (await get(port, path)).status == status


async def test_not_ready_while_the_zookeeper_port_is_not_bound(tmp_path: Path) -> None:
    async with admin_only(tmp_path) as (_admin, port):
        reply = await get(port, "/ready")
        assert reply.status == 503
        assert "the ZooKeeper port is not bound yet" in reply.json()["reasons"]
        assert (await get(port, "/health")).status == 200


# ---------------------------------------------------------------------- /snapshot, /status, /shards


async def test_snapshot_json_names_every_instance_with_health_and_source(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (running, port):
        await until(lambda: _status_is(port, "/ready", 200), "ready")
        reply = await get(port, "/snapshot")
        assert reply.status == 200
        snapshot = reply.json()
        assert snapshot["version"] == running.fanin.snapshot.version
        orders = snapshot["services"]["orders"]
        assert [i["id"] for i in orders["instances"]] == ["10.0.0.7:8080", "10.0.0.8:8080"]
        first, second = orders["instances"]
        assert first == {
            "id": "10.0.0.7:8080", "host": "10.0.0.7", "port": 8080, "weight": 100,
            "zone": "eu-west-1a", "protocol": "", "health": "passing",
            "metadata": {"version": "1.4.2"},
            "source": {"adapter": "files", "key": "orders/orders-a", "revision": 1},
        }  # fmt: skip
        assert second["health"] == "failing"
        assert second["source"]["adapter"] == "files"

        # Narrowed to named services; an unknown one is listed empty.
        narrowed = (await get(port, "/snapshot?service=orders&service=nothing")).json()
        assert sorted(narrowed["services"]) == ["nothing", "orders"]
        assert narrowed["services"]["nothing"] == {"version": 0, "instances": []}

        # A large registry's head: the first N services by name, and how many there are.
        replace(tmp_path / "services.toml", ORDERS + BILLING)

        async def both() -> bool:
            return len((await get(port, "/snapshot")).json()["services"]) == 2

        await until(both, "both services")
        head = (await get(port, "/snapshot?limit=1")).json()
        assert list(head["services"]) == ["billing"]
        assert (head["total_services"], head["truncated"]) == (2, True)
        assert (await get(port, "/snapshot?limit=2")).json()["truncated"] is False
        assert (await get(port, "/snapshot?limit=0")).status == 400
        assert (await get(port, "/snapshot?limit=x")).status == 400
        replace(tmp_path / "services.toml", ORDERS)
        await until(lambda: _not(both), "billing gone again")
        reply = await get(port, "/snapshot")

        # Revalidation: 304 while the version holds, a new body once it changes.
        etag = reply.headers["etag"]
        again = await get(port, "/snapshot", headers=[("if-none-match", etag)])
        assert (again.status, again.body) == (304, b"")
        replace(tmp_path / "services.toml", ORDERS + BILLING)

        async def changed() -> bool:
            reply = await get(port, "/snapshot", headers=[("if-none-match", etag)])
            return reply.status == 200 and "billing" in reply.json()["services"]

        await until(changed, "the new version served")


async def test_status_reports_upstreams_zookeeper_and_subscribers(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (running, port):
        await until(lambda: _status_is(port, "/ready", 200), "ready")
        status = (await get(port, "/status")).json()
        assert status["node"] == "gw-test"
        assert status["ready"] is True and status["reasons"] == []
        assert status["zookeeper"]["port"] == running.port
        assert status["zookeeper"]["sessions"] == 0
        assert status["snapshot"]["services"] == 1
        [upstream] = status["upstreams"]
        assert upstream["name"] == "files" and upstream["kind"] == "static"
        assert upstream["connected"] is True and upstream["stale_seconds"] == 0
        assert status["subscribers"] == {"count": 0, "lag_max": 0}
        assert status["interest"] is None


@attrs.frozen
class TwoShards:
    """An :class:`~dispatcher.core.ownership.Ownership`: ``orders`` is gw-2's, the rest unowned."""

    epoch: int = 7

    def owns(self, service: str) -> bool:
        return False

    def owner_of(self, service: str) -> Owner | None:
        return Owner("gw-2", "10.1.0.2:9200", "10.1.0.2:2181") if service == "orders" else None


async def test_shards_are_off_without_an_ownership_and_mapped_with_one(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (_running, port):
        assert (await get(port, "/shards")).json() == {"sharding": "off"}
    replace(tmp_path / "services.toml", ORDERS + BILLING)
    async with trio.open_nursery() as nursery:
        sharded = Gateway(gateway_config(tmp_path), ownership=TwoShards())
        await nursery.start(sharded.run)
        assert sharded.admin is not None and sharded.admin.port is not None
        port = sharded.admin.port
        await until(lambda: _has(port, ("zkgate_services", ()), 2.0), "both services")
        assert (await get(port, "/shards")).json() == {
            "sharding": "on",
            "node": "gw-test",
            "epoch": 7,
            "members": [{"id": "gw-2", "subscribe_address": "10.1.0.2:9200",
                         "zookeeper_address": "10.1.0.2:2181", "services": 1}],
            "services": {"billing": None, "orders": "gw-2"},
        }  # fmt: skip
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- HTTP and its bounds


async def test_keep_alive_head_unknown_paths_and_methods(tmp_path: Path) -> None:
    async with admin_only(tmp_path) as (_admin, port):
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                for path in ("/health", "/status"):  # two requests, one connection
                    request = h11.Request(method="GET", target=path, headers=[("host", "x")])
                    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                    assert (await _read_response(stream, conn)).status == 200
                    conn.start_next_cycle()
        head = await get(port, "/health", method="HEAD")
        assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")
        missing = await get(port, "/nope")
        assert missing.status == 404 and "/metrics" in missing.text
        post = await get(port, "/health", method="POST")
        assert post.status == 405 and post.headers["allow"] == "GET, HEAD"


async def test_bad_requests_get_an_error_and_a_close(tmp_path: Path) -> None:
    limits = AdminLimits(max_request_head=1024, max_request_body=16)
    async with admin_only(tmp_path, limits) as (_admin, port):
        assert status_of(await raw(port, b"NOT HTTP AT ALL\r\n\r\n")) == 400
        huge_head = b"GET / HTTP/1.1\r\nhost: x\r\nx-junk: " + b"a" * 4096 + b"\r\n\r\n"
        assert status_of(await raw(port, huge_head)) == 431
        big_body = b"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n"
        assert status_of(await raw(port, big_body + b"x" * 1000)) == 413
        small_body = b"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
        small_body += b"connection: close\r\n\r\nhello"
        assert status_of(await raw(port, small_body)) == 200
        # The server still serves after all that.
        assert (await get(port, "/health")).status == 200


async def test_a_failing_page_answers_500_and_the_rest_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("ownership bug")

    async with admin_only(tmp_path, shards=broken) as (_admin, port):
        assert (await get(port, "/shards")).status == 500
        assert (await get(port, "/health")).status == 200
    assert "ownership bug" in caplog.text


async def test_slow_and_idle_clients_are_timed_out(tmp_path: Path) -> None:
    limits = AdminLimits(request_timeout=0.3)
    async with admin_only(tmp_path, limits) as (_admin, port):
        # Half a request, then nothing: 408 and a close.
        assert status_of(await raw(port, b"GET /health HTTP/1.1\r\nhost:")) == 408
        # A connection that never sends anything is closed without a word.
        assert await raw(port, b"") == b""


async def test_a_connection_beyond_the_limit_evicts_a_slow_one_and_is_served(
    tmp_path: Path,
) -> None:
    # Refusal when every connection is busy: tests/test_admin_slow_clients.py.
    limits = AdminLimits(max_connections=2)
    async with admin_only(tmp_path, limits) as (admin, port):
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        try:
            for stream in held:  # two slow clients: a head begun, never finished
                await stream.send_all(b"GET /health HTTP/1.1\r\n")
            # Both held connections are accepted before the third arrives.
            await until(lambda: admin._connections >= 2, "both slow clients accepted", TIMEOUT)
            request = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            served = await raw(port, request)
            assert status_of(served) == 200
            # One of the two slow ones made room: told 503, and closed.
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:

                    async def closed(stream: trio.SocketStream) -> None:
                        answer = await stream.receive_some(65536)
                        assert status_of(answer) == 503 and b"evicted" in answer
                        nursery.cancel_scope.cancel()

                    for stream in held:
                        nursery.start_soon(closed, stream)
        finally:
            for stream in held:
                await stream.aclose()
        samples = await scrape(port)
        assert samples[("zkgate_admin_connections_evicted_total", ())] == 1
        assert samples[("zkgate_admin_connections_refused_total", ())] == 0


# ---------------------------------------------------------------------- configuration


def test_the_admin_table_is_checked_and_round_trips() -> None:
    with pytest.raises(ConfigError, match=r"^admin\.lisen: unknown key"):
        parse_config({"admin": {"lisen": "127.0.0.1:1"}})
    with pytest.raises(ConfigError, match=r"^admin\.listen: expected HOST:PORT"):
        parse_config({"admin": {"listen": "nowhere"}})
    with pytest.raises(ConfigError, match=r"^admin\.max_connections: must be at least 1"):
        parse_config({"admin": {"max_connections": 0}})
    default = parse_config({})
    assert default.admin == AdminConfig(enabled=True, listen=None, max_connections=64)
    assert default.admin.address == ("127.0.0.1", 8081)
    configured = parse_config({"admin": {"listen": "0.0.0.0:9999", "max_connections": 3}})
    assert parse_config(configured.to_mapping()).admin == configured.admin
    assert default.with_admin_listen("off").admin.enabled is False
    assert default.with_admin_listen("[::1]:7").admin.address == ("::1", 7)
    with pytest.raises(ConfigError, match="--admin-listen"):
        default.with_admin_listen("7")


async def test_a_busy_default_port_is_skipped_but_a_configured_one_stops_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replace(tmp_path / "services.toml", ORDERS)
    held: list[trio.SocketListener] = []
    # Make sure the default port is taken (if nobody else holds it already).
    with contextlib.suppress(OSError):
        held += await trio.open_tcp_listeners(8081, host="127.0.0.1")
    try:
        unconfigured = attrs.evolve(gateway_config(tmp_path), admin=AdminConfig())
        async with trio.open_nursery() as nursery:
            running: Gateway = await nursery.start(run_gateway, unconfigured)
            assert running.admin is None and running.port is not None  # serves without it
            nursery.cancel_scope.cancel()
        assert any(
            r.getMessage().startswith("admin endpoint not started: cannot listen")
            and vars(r).get("listen") == "127.0.0.1:8081"
            for r in caplog.records
        )

        busy = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        held.append(busy)
        port = busy.socket.getsockname()[1]
        configured = attrs.evolve(
            gateway_config(tmp_path), admin=AdminConfig(listen=f"127.0.0.1:{port}")
        )
        with pytest.raises(BaseExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_gateway, configured)
        assert raised.value.subgroup(OSError) is not None
    finally:
        for listener in held:
            await listener.aclose()


# ---------------------------------------------------------------------- the page and the process


async def test_the_status_page_is_self_contained_and_locked_down(tmp_path: Path) -> None:
    async with admin_only(tmp_path) as (_admin, port):
        page = await get(port, "/")
        assert page.status == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
        assert "unsafe-inline" not in policy
        for external in ("http://", "https://", "//cdn", "src="):
            assert external not in page.text


def test_zkgate_serve_has_an_admin_endpoint(
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    admin_port = free_port()
    server = zkgate_factory(["--admin-listen", f"127.0.0.1:{admin_port}"])

    def fetch(path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", admin_port), timeout=TIMEOUT) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return status_of(head), body

    assert fetch("/ready") == (200, b'{"ready":true}\n')  # no upstreams: ready once bound
    status, body = fetch("/metrics")
    assert status == 200
    samples = metrics(body.decode())
    assert samples[("zkgate_zk_connections", ())] == 0
    server.four_letter("ruok")
    log = server.log_path.read_text()
    assert f'msg="admin endpoint listening" listen=127.0.0.1:{admin_port}' in log
