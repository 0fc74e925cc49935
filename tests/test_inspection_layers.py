"""Inspection of the mirror and xDS layers, and an etcd compaction during a partition.

A gateway runs in-process over real etcd and real ZooKeeper. Faults go in
through test-only hooks: a mirror that ignores one upstream event (its
cache entry left stale), an ADS stream that ignores one change of the
cache (the client keeps, and has ACKed, an old version). Detection is
awaited with the deadline of :mod:`tests.test_inspection` (two inspection
intervals, the grace period's second look and a margin).
"""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import etcd3
import pytest
import trio
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from kazoo.client import KazooClient

from dispatcher.config import parse_config
from dispatcher.faces.xds.resources import ENDPOINTS
from tests.partition import Partition
from tests.servers import EtcdServer, ZooKeeperServer
from tests.test_inspection import (
    DETECTION_DEADLINE,
    GRACE,
    INTERVAL,
    gateway,
    grpc_value,
    instance_ids,
    metric,
    put,
)
from tests.test_xds import AdsClient, ack, endpoints, request, unpack
from tests.waiting import until


def layered_config(
    tmp_path: Path, etcd_endpoint: str, prefix: str, *, zookeeper: ZooKeeperServer | None = None,
    mirror_root: str | None = None, xds: bool = False,
) -> Any:  # fmt: skip
    table: dict[str, Any] = {
        "node_id": "gw-layers",
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"), "tick_ms": 200},
        "admin": {"listen": "127.0.0.1:0"},
        "upstream": [
            {"name": "etcd", "kind": "etcd", "endpoint": etcd_endpoint, "max_backoff": 0.5,
             "prefixes": [{"prefix": prefix, "layout": "grpc"}]},
        ],
        "inspection": {"enabled": True, "interval": INTERVAL, "grace": GRACE},
    }  # fmt: skip
    if mirror_root is not None and zookeeper is not None:
        table["mirror"] = [{"root": mirror_root, "hosts": f"127.0.0.1:{zookeeper.port}"}]
    if xds:
        table["xds"] = {"listen": "127.0.0.1:0"}
    return parse_config(table)


# --------------------------------------------------------------- layer "mirror"


async def test_a_stale_mirror_cache_entry_is_found_reloaded_and_its_watch_fires(
    tmp_path: Path, etcd: EtcdServer, zookeeper: ZooKeeperServer, unique_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, "dispatcher.inspection")
    root = f"{unique_path}/legacy"
    path = f"{root}/config/db"
    upstream = KazooClient(hosts=f"127.0.0.1:{zookeeper.port}")
    upstream.start(timeout=10)
    try:
        upstream.create(path, b"v1", makepath=True)
        cfg = layered_config(tmp_path, etcd.endpoint, f"{unique_path}/", zookeeper=zookeeper,
                             mirror_root=root)  # fmt: skip
        async with gateway(cfg) as gw:
            assert gw.inspector is not None and gw.admin is not None and gw.port is not None
            (mirror,) = gw.mirrors
            fired: list[Any] = []
            through = KazooClient(hosts=f"127.0.0.1:{gw.port}")
            await trio.to_thread.run_sync(lambda: through.start(timeout=10))
            try:
                data, _ = await trio.to_thread.run_sync(
                    lambda: through.get(path, watch=fired.append)
                )
                assert data == b"v1" and mirror.cached.get(path) is not None
                # The fault: the mirror misses the change's event; its cache keeps v1.
                mirror.drop_next_event(path)
                await trio.to_thread.run_sync(upstream.set, path, b"v2")
                stats = gw.inspector.stats["mirror"]
                await until(lambda: stats.divergences_total >= 1, "the divergence found",
                            timeout=DETECTION_DEADLINE)  # fmt: skip
                last = stats.last
                assert last is not None
                (divergence,) = last.divergences
                assert (divergence.target, divergence.service) == (root, f"{root}/config")
                assert divergence.differing == ("db",) and divergence.repaired is True
                # Repaired as after a reconnection: the missed watch fired, reads show v2.
                await until(lambda: len(fired) == 1, "the missed watch fired")
                data, _ = await trio.to_thread.run_sync(through.get, path)
                assert data == b"v2"
                assert await metric(gw.admin.port, "zkgate_inspection_divergences_total",
                                    "mirror") >= 1  # fmt: skip
                line = next(r for r in caplog.records if r.__dict__.get("layer") == "mirror")
                assert line.__dict__["differing"] == "db" and line.__dict__["repaired"] is True
                # Checked again: the next passes compare it and find nothing.
                before, passes = stats.divergences_total, stats.passes
                await until(lambda: stats.passes >= passes + 2, "two more passes", timeout=10)
                assert stats.divergences_total == before
                assert stats.last is not None and stats.last.services >= 1
                assert stats.last.reads <= 3  # a sync and one multiRead for a small sample
            finally:
                await trio.to_thread.run_sync(through.stop)
                through.close()
    finally:
        upstream.stop()
        upstream.close()


# ------------------------------------------------------------------ layer "xds"


class AckingClient:
    """An ADS client (the grpcio pattern of tests/test_xds.py) that ACKs every
    response it gets, as Envoy does, and keeps the latest per type."""

    def __init__(self, port: int) -> None:
        self.ads = AdsClient(port)
        self.latest: queue.Queue[Any] = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                response = self.ads.recv(timeout=60)
            except (EOFError, queue.Empty):
                return
            self.ads.send(ack(response, ["orders"]))
            self.latest.put(response)

    def close(self) -> None:
        self.ads.close()


async def test_an_xds_stream_left_on_an_old_version_is_found_and_resent(
    tmp_path: Path, etcd: EtcdServer, unique_path: str
) -> None:
    prefix = f"{unique_path}/"
    await trio.to_thread.run_sync(put, etcd, f"{prefix}orders/a", grpc_value("127.0.0.1:7001"))
    async with gateway(layered_config(tmp_path, etcd.endpoint, prefix, xds=True)) as gw:
        assert gw.inspector is not None and gw.admin is not None
        await until(lambda: gw.xds is not None and gw.xds.port is not None, "xds serving")
        assert gw.xds is not None and gw.xds.port is not None
        client = AckingClient(gw.xds.port)
        try:
            client.ads.send(request(ENDPOINTS, ["orders"], node=base_pb2.Node(id="envoy-1")))
            first = await trio.to_thread.run_sync(lambda: client.latest.get(timeout=10))
            (assignment,) = unpack(first, endpoint_pb2.ClusterLoadAssignment)
            assert set(endpoints(assignment)) == {7001}
            (stream,) = gw.xds.streams
            await until(lambda: stream.acked_version(ENDPOINTS) == first.version_info, "ACK")
            # The fault: the stream misses the cache's signal for the change.
            stream.skip_next_change("orders")
            await trio.to_thread.run_sync(put, etcd, f"{prefix}orders/b",
                                          grpc_value("127.0.0.1:7002"))  # fmt: skip
            await until(lambda: len(instance_ids(gw, "orders")) == 2, "the change in the snapshot")
            stats = gw.inspector.stats["xds"]
            await until(lambda: stats.divergences_total >= 1, "the divergence found",
                        timeout=DETECTION_DEADLINE)  # fmt: skip
            resent = await trio.to_thread.run_sync(lambda: client.latest.get(timeout=10))
            (assignment,) = unpack(resent, endpoint_pb2.ClusterLoadAssignment)
            assert set(endpoints(assignment)) == {7001, 7002}
            await until(lambda: stats.last is not None and stats.last.divergences, "reported")
            assert stats.last is not None
            (divergence,) = stats.last.divergences
            assert divergence.target.startswith("envoy-1@") and divergence.service == "orders"
            assert divergence.differing == ("ClusterLoadAssignment",)
            assert divergence.repaired is True and divergence.age >= GRACE
            assert await metric(gw.admin.port, "zkgate_inspection_divergences_total", "xds") >= 1
            before, passes = stats.divergences_total, stats.passes
            await until(lambda: stats.passes >= passes + 2, "two more passes", timeout=10)
            assert stats.divergences_total == before
        finally:
            client.close()


# ------------------------------------------ an etcd compaction during a partition


def compact_past(etcd: EtcdServer, prefix: str) -> int:
    """Change the registry while the gateway is cut off, then compact etcd past it all."""
    client = etcd3.client(etcd.host, etcd.port, timeout=10)
    try:
        client.delete(f"{prefix}orders/a")
        client.put(f"{prefix}orders/b", grpc_value("10.0.9.2:80"))
        client.put(f"{prefix}orders/c", grpc_value("10.0.9.3:80"))
        revision = client.get_response(b"\x00").header.revision
        client.compact(revision, physical=True)
        return revision
    finally:
        client.close()


async def test_an_etcd_compaction_during_a_partition_is_caught_up_by_a_relist(
    tmp_path: Path, etcd: EtcdServer, unique_path: str
) -> None:
    prefix = f"{unique_path}/"
    await trio.to_thread.run_sync(put, etcd, f"{prefix}orders/a", grpc_value("10.0.9.1:80"))
    partition = Partition((etcd.host, etcd.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with gateway(layered_config(tmp_path, partition.address, prefix)) as gw:
            assert gw.inspector is not None
            await until(lambda: instance_ids(gw, "orders") == {"10.0.9.1:80"}, "first instance")
            partition.cut()
            await until(lambda: not gw.fanin.status["etcd"].connected, "the partition seen",
                        timeout=30)  # fmt: skip
            compacted = await trio.to_thread.run_sync(compact_past, etcd, prefix)
            partition.heal()
            # The watch cannot resume below the compaction: the adapter lists again.
            await until(
                lambda: instance_ids(gw, "orders") == {"10.0.9.2:80", "10.0.9.3:80"},
                "the re-list after the compaction", timeout=DETECTION_DEADLINE + 10,
            )  # fmt: skip
            stats = gw.inspector.stats["upstream"]
            passes = stats.passes
            await until(lambda: stats.passes >= passes + 2, "two passes after healing",
                        timeout=DETECTION_DEADLINE)  # fmt: skip
            assert stats.last is not None and stats.last.consistent, stats.last
            assert not stats.last.skipped
            assert compacted > 0
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the benchmark


def test_bench_inspect_runs_end_to_end_with_tiny_numbers() -> None:
    """bench/inspection_pass.py with 200 instances: its servers, pass, churn and injected
    fault all run, and its last line has the documented shape with no false divergence."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "inspection_pass.py"), "--instances", "200",
         "--services", "10", "--interval", "2", "--grace", "0.3", "--churn-passes", "1"],
        capture_output=True, text=True, timeout=300, cwd=root, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"inspect: instances=(\d+) pass_s=([\d.]+) cpu_s=([\d.]+) upstream_reads=(\d+) "
        r"false_divergences=(\d+) detect_s=([\d.]+|inf)",
        last,
    )
    assert match, last
    assert int(match[1]) == 200 and int(match[5]) == 0
    assert int(match[4]) <= 10 * 4  # a few requests per service at most, whatever their size
    assert float(match[6]) < 2 * 2.0 + 0.3 + 5.0  # two intervals, the grace and a margin
