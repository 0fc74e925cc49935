"""The mesh's automatic rollback (issue #18, items 2 (registration), 4 and 6).

Unit tests of the window and the rule run on trio's MockClock (autojump) over an in-memory
governance store. The end-to-end test runs everything as users do: real ZooKeeper 3.8 (the
upstream registry, Dubbo layout, and the governance store), two ``zkgate serve`` processes
on it, zkgate's Meta Server, a real ``zkgate proxy --register`` process, a kazoo consumer in
the Dubbo layout, and a real TCP echo provider.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from adapters.layouts.dubbo import encode
from dispatcher import wire
from dispatcher.config import ConfigError
from dispatcher.faces.mesh.config import RollbackConfig, parse_mesh
from dispatcher.faces.mesh.rollback import Figures, MeshRollback, OutcomeWindow, judge
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.mesh import MeshError, MeshSettings, Switch
from dispatcher.governance.store import Revision
from dispatcher.governance.store_memory import MemoryGovernance, MemoryGovernanceStore
from proxy.forward import ListenAddress
from proxy.outcomes import OutcomeCounter
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, free_port
from tests.test_mesh import TOKEN, DubboConsumer, _admin, _switch
from tests.test_proxy_policy import SlowEcho, one_exchange

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "shop.Cart"
WIRE_TOKEN = "rollback-subscription-token"
TIMEOUT = 30.0
"""Seconds any wait on a real process may take before the test fails."""
RULE = RollbackConfig(max_failure_ratio=0.2, max_p99_ms=500, relative_to_direct=2.0,
                      window=10, min_requests=20)  # fmt: skip


def _report(path: str = "mesh", app: str = "web", **counts: int) -> wire.Outcomes:
    latency = [0] * (len(wire.LATENCY_BUCKETS_MS) + 1)
    latency[0] = sum(counts.values())  # every call within 1 ms
    return wire.Outcomes(SERVICE, app, path, counts, tuple(latency))


# ----------------------------------------------------------------- the window


def test_window_counts_an_outcome_for_exactly_window_seconds() -> None:
    """An outcome added at t = 0.5 counts in the 10 s window until t = 9.99 and no longer
    at t = 10.0; the p99 is the upper bound of the bucket holding the 99th percentile."""
    window = OutcomeWindow(10)
    window.add("web", SERVICE, "mesh", {"timeout": 3}, [0] * 5 + [3], 0.5)
    assert window.figures("web", SERVICE, "mesh", 9.99).counts["timeout"] == 3
    assert window.figures("web", SERVICE, "mesh", 9.99).p99_ms == wire.LATENCY_BUCKETS_MS[5]
    assert window.figures("web", SERVICE, "mesh", 10.0).total == 0
    assert window.figures("web", SERVICE, "mesh", 10.0).p99_ms is None
    # 99 fast calls and one slow: the 99th percentile is still fast; two slow ones: slow.
    window.add("web", SERVICE, "direct", {"success": 100}, [99] + [0] * 20 + [1], 11)
    assert window.figures("web", SERVICE, "direct", 11).p99_ms == 1
    window.add("web", SERVICE, "direct", {"success": 1}, [0] * 21 + [1], 11)
    assert window.figures("web", SERVICE, "direct", 11).p99_ms == wire.LATENCY_BUCKETS_MS[21]


def test_window_is_bounded() -> None:
    """Series beyond the bound are dropped and counted; expired series make room."""
    window = OutcomeWindow(2, max_series=2)
    window.add("a", SERVICE, "mesh", {"success": 1}, [], 0)
    window.add("b", SERVICE, "mesh", {"success": 1}, [], 0)
    window.add("c", SERVICE, "mesh", {"success": 1}, [], 1)
    assert (len(window), window.dropped) == (2, 1)
    window.add("c", SERVICE, "mesh", {"success": 1}, [], 5)
    assert window.figures("c", SERVICE, "mesh", 5).total == 1


# ----------------------------------------------------------------- the rule


def _figures(success: int = 0, timeout: int = 0, p99: float | None = 1) -> Figures:
    return Figures({"success": success, "timeout": timeout}, p99)


def test_rule_absolute_thresholds_need_enough_requests() -> None:
    """Below min_requests nothing is judged; above it a failure ratio or p99 past the
    absolute threshold trips, with the figures in the reason; at the threshold it does not."""
    assert judge(RULE, _figures(timeout=19), None) is None
    reason = judge(RULE, _figures(success=16, timeout=4 + 1), None)
    assert reason is not None and "mesh failure ratio 0.24 > 0.2" in reason
    assert "21 calls, 16 success, 5 timeout" in reason and "direct: unknown" in reason
    assert judge(RULE, _figures(success=16, timeout=4), None) is None  # 0.2 is not > 0.2
    assert judge(RULE, _figures(success=30, p99=500), None) is None
    reason = judge(RULE, _figures(success=30, p99=700), None)
    assert reason is not None and "mesh p99 700 ms > 500 ms" in reason


def test_rule_relative_to_the_direct_path_where_known() -> None:
    """Relative to the same consumer's direct path: a mesh p99 more than twice the direct
    one trips (not within the 10 ms resolution floor), and so does a failure ratio more
    than twice the direct one; with the direct path unknown (too few calls) only the
    absolute thresholds apply; relative_to_direct = 0 turns it off."""
    mesh = _figures(success=100, p99=200)
    assert judge(RULE, mesh, _figures(success=100, p99=70)) is not None
    assert judge(RULE, mesh, _figures(success=100, p99=100)) is None
    assert judge(RULE, mesh, _figures(success=19, p99=1)) is None  # direct unknown
    assert judge(RULE, _figures(success=100, p99=5), _figures(success=100, p99=1)) is None
    flaky = _figures(success=90, timeout=10)  # 0.10: under the absolute 0.2
    reason = judge(RULE, flaky, _figures(success=100, timeout=3))
    assert reason is not None and "2 x the direct path's 0.03" in reason
    assert judge(RULE, flaky, _figures(success=95, timeout=5)) is None  # 0.10 = 2 x 0.05
    # No direct failure counts as one in its 100 calls: 0.10 > 2 x 0.01.
    assert judge(RULE, flaky, _figures(success=100)) is not None
    off = parse_mesh({"rollback": {"relative_to_direct": 0}}).rollback
    assert off is not None and off.relative_to_direct is None
    assert judge(off, flaky, _figures(success=100)) is None


def test_rollback_config_and_locked_documents_refuse_bad_input() -> None:
    """The [mesh] rollback table and the mesh document's lock say what is wrong."""
    with pytest.raises(ConfigError, match="max_failure_ratio"):
        parse_mesh({"rollback": {"max_failure_ratio": 2}})
    with pytest.raises(ConfigError, match="windw"):
        parse_mesh({"rollback": {"windw": 10}})
    assert parse_mesh({"rollback": {}}).rollback == RollbackConfig()
    with pytest.raises(MeshError, match="only an 'off' switch is locked"):
        MeshSettings.from_mapping({"consumers": {"web": {SERVICE: {"mode": "on",
                                                                   "locked": True}}}})  # fmt: skip
    locked = {"mode": "off", "locked": True, "reason": "why"}
    document = MeshSettings.from_mapping({"consumers": {"web": {SERVICE: locked}}})
    assert document.to_mapping() == {"consumers": {"web": {SERVICE: locked}}}


def test_outcome_messages_are_compatible_and_bounded() -> None:
    """Outcomes round-trip; a Welcome offers them only when it says so (an older client
    ignores the field, an older server never says it); bad counts are refused."""
    counter = OutcomeCounter(SERVICE)
    counter.outcome("timeout")
    counter.latency(0.004)
    report = counter.take("web", "mesh")
    assert report is not None and counter.take("web", "mesh") is None
    assert report.latency[3] == 1  # 4 ms: the (3, 5] bucket
    assert wire.decode(wire.encode(report)[4:]) == report
    assert b"outcomes" not in wire.encode(wire.Welcome(1, "d1"))
    assert wire.decode(wire.encode(wire.Welcome(1, "d1", True))[4:]) == wire.Welcome(1, "d1", True)
    for bad in ({"counts": {"success": -1}}, {"counts": {"lost": 1}}, {"path": "side"},
                {"latency": [0] * 100}):  # fmt: skip
        body = {"type": "outcomes", "service": SERVICE, "path": "mesh", **bad}
        with pytest.raises(wire.WireError):
            wire.decode(json.dumps(body).encode())


# ----------------------------------------------------------------- the writer


class _Racing(MemoryGovernanceStore):
    """A store where another writer gets in once, between the rule's read and its write."""

    raced = False

    async def _commit(self, revision: Revision, expected_version: int) -> None:
        if not self.raced and revision.who.startswith("zkgate-rollback"):
            self.raced = True
            head = self.shared.head(self.kind)
            assert head is not None
            other = MeshSettings.from_json(head.body).with_switch("billing", SERVICE,
                                                                  Switch("on", 50))  # fmt: skip
            await self.write(other.to_json(), expected_version=head.version, who="operator",
                             why="billing on")  # fmt: skip
        await super()._commit(revision, expected_version)


async def _setup(nursery: trio.Nursery) -> tuple[MemoryGovernanceStore, GovernanceFeed,
                                                  MeshRollback]:  # fmt: skip
    store = _Racing(MemoryGovernance(), "mesh")
    on = MeshSettings().with_switch("web", SERVICE, Switch("on", 100))
    await store.write(on.to_json(), expected_version=0, who="operator", why="web on")
    feed = GovernanceFeed(store)
    await nursery.start(feed.run)
    rule = MeshRollback(RULE, who="zkgate-rollback/d1")
    await nursery.start(rule.run, feed)
    return store, feed, rule


async def test_rollback_locks_the_pair_off_without_flapping(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """19 failing calls do not trip the rule, and 10 s later they have left the window;
    then 20 failing calls within the window roll the consumer back: off, locked, the reason
    and figures in the document and the revision's why, written over a concurrent operator
    write (a conflict, re-read and re-applied: the operator's change stays). More failing
    reports then write nothing; an operator turning the pair on again clears the lock, and
    failures after that roll it back again."""
    store, feed, rule = await _setup(nursery)
    rule.record(_report(timeout=19), "web")
    await trio.testing.wait_all_tasks_blocked()
    assert feed.version == 1
    await trio.sleep(10)
    rule.record(_report(timeout=1), "web")
    await trio.testing.wait_all_tasks_blocked()
    assert feed.version == 1 and rule.window.figures("web", SERVICE, "mesh",
                                                     trio.current_time()).total == 1  # fmt: skip
    rule.record(_report(timeout=19), "web")
    revision = await feed.wait_version(3)  # 2: the operator's racing write; 3: ours
    document = MeshSettings.from_json(revision.body)
    switch = document.switch("web", SERVICE)
    assert switch is not None and switch.mode == "off" and switch.locked
    assert "mesh failure ratio 1.00 > 0.2" in switch.reason and "20 timeout" in switch.reason
    assert revision.why == switch.reason and revision.who == "zkgate-rollback/d1"
    assert document.switch("billing", SERVICE) == Switch("on", 50)
    assert rule.rolled_back == 1

    # No flapping: reports of the pair's mesh path while it is off are not even kept.
    for _ in range(5):
        rule.record(_report(timeout=50), "web")
        await trio.sleep(1)
    await trio.testing.wait_all_tasks_blocked()
    assert feed.version == 3 and rule.rolled_back == 1
    assert rule.window.figures("web", SERVICE, "mesh", trio.current_time()).total == 0

    # Only an operator turns it on again (which clears the lock); bad figures then trip again.
    on = document.with_switch("web", SERVICE, Switch("on", 30))
    await store.write(on.to_json(), expected_version=3, who="operator", why="retry")
    await feed.wait_version(4)
    rule.record(_report(success=20), "web")
    await trio.testing.wait_all_tasks_blocked()
    assert feed.version == 4
    rule.record(_report(timeout=20), "web")
    revision = await feed.wait_version(5)
    again = MeshSettings.from_json(revision.body).switch("web", SERVICE)
    assert again is not None and again.locked and "failure ratio 0.50" in again.reason


async def test_pairs_judged_together_are_rolled_back_in_one_revision(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A sidecar that fails every consumer it carries trips them all at once: the pairs
    judged while no rollback is being written go in one revision, each off and locked with
    its own reason and figures, the revision's why naming each; a pair on whose mesh path
    is fine stays on."""
    store = MemoryGovernanceStore(MemoryGovernance(), "mesh")
    on = MeshSettings()
    for application in ("web", "api", "batch"):
        on = on.with_switch(application, SERVICE, Switch("on", 100))
    await store.write(on.to_json(), expected_version=0, who="operator", why="all on")
    feed = GovernanceFeed(store)
    await nursery.start(feed.run)
    rule = MeshRollback(RULE, who="zkgate-rollback/d1")
    await nursery.start(rule.run, feed)
    rule.record(_report(app="web", timeout=20), "web")
    rule.record(_report(app="api", reset=20), "api")
    rule.record(_report(app="batch", success=20), "batch")
    revision = await feed.wait_version(2)
    await trio.testing.wait_all_tasks_blocked()
    assert feed.version == 2 and rule.rolled_back == 2
    document = MeshSettings.from_json(revision.body)
    for application, kind in (("web", "20 timeout"), ("api", "20 reset")):
        switch = document.switch(application, SERVICE)
        assert switch is not None and switch.mode == "off" and switch.locked
        assert switch.reason.startswith("automatic rollback: mesh failure ratio 1.00")
        assert kind in switch.reason
        assert f"{application} {SERVICE}: mesh failure ratio 1.00" in revision.why
    assert revision.why.startswith("automatic rollback of 2 consumers: ")
    assert document.switch("batch", SERVICE) == Switch("on", 100)


async def test_reports_without_an_application_change_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A report that names no consumer application (and came over a connection that named
    none) is counted as unattributed: there is no switch to turn off."""
    _, feed, rule = await _setup(nursery)
    rule.record(_report(app="", timeout=100), "")
    await trio.testing.wait_all_tasks_blocked()
    assert rule.unattributed == 1 and feed.version == 1 and len(rule.window) == 0


# ----------------------------------------------------------------- end to end


def _config(tmp: Path, node: str, zookeeper: str, root: str, *, owner: bool) -> Path:
    subscriptions = f"""
[subscriptions]
listen = "127.0.0.1:{free_port()}"
token = "{WIRE_TOKEN}"
[sharding]
id = "{node}"
services = ["{SERVICE}"]
warm_timeout = 2.0
""" if owner else ""  # fmt: skip
    # A shard serves no projection: the consumers read from the other Dispatcher.
    projection = "" if owner else '[[projection]]\nroot = "/dubbo"\nlayout = "dubbo"\n'
    path = tmp / f"{node}.toml"
    path.write_text(f"""
node_id = "{node}"
[membership]
kind = "zookeeper"
address = "{zookeeper}"
root = "{root}/zkgate"
session_timeout = 2.0
[governance]
token = "{TOKEN}"
[mesh]
rollback = {{ max_failure_ratio = 0.2, max_p99_ms = 5000, window = 10, min_requests = 5 }}
{subscriptions}
[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "{zookeeper}"
roots = [{{ path = "{root}/dubbo", layout = "dubbo" }}]
{projection}""")
    return path


@asynccontextmanager
async def sidecar(tmp: Path, meta: str, listen: str, register: str) -> AsyncIterator[None]:
    """``zkgate proxy --register`` for the consumer application ``web`` on this host."""
    command = [sys.executable, "-m", "dispatcher", "--log-format", "plain", "proxy",
               "--meta", meta, "--service", f"{SERVICE}={listen}", "--application", "web",
               "--register", register, "--engine", "epoll"]  # fmt: skip
    env = {**os.environ, "ZKGATE_TOKEN": WIRE_TOKEN}
    with open(tmp / "proxy.log", "wb") as log:
        process = await trio.lowlevel.open_process(command, cwd=ROOT, env=env, stderr=log)
    try:
        yield
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def _call(function: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(function, *args))


def _hosts(urls: list[str]) -> set[str]:
    return {url.split("/")[2] for url in urls}


async def test_a_real_sidecar_registers_and_a_mesh_only_failure_rolls_the_consumer_back(
    nursery: trio.Nursery,
    tmp_path: Path,
    zookeeper: ZooKeeperServer,
    zkgate_factory: ServerFactory[ZkgateServer],
    unique_path: str,
) -> None:
    """A consumer switched on at R = 100 on Dispatcher d2 sees the sidecar that registered
    itself there, and a call through it reaches the provider (d1 owns the service as a
    shard, so it serves the proxy and no projection). A consumer policy for that
    application (request timeout 50 ms, the provider answers in 300 ms) fails the calls on
    the mesh path only; the sidecar reports them to d1 (the service's owner), which rolls
    the consumer back: the mesh document shows it off, locked, with the reason; d1 and d2
    agree on the mesh version within 1 s; the consumer's watch fires, its next read shows
    the true provider, and its call there succeeds directly."""
    from metaserver.cli import parse_meta_config, run_meta

    provider = await SlowEcho(0.3).start(nursery)
    from kazoo.client import KazooClient

    upstream = KazooClient(hosts=zookeeper.address)
    await _call(upstream.start, 15)
    url = f"dubbo://127.0.0.1:{provider.port}/{SERVICE}?interface={SERVICE}&methods=add"
    await _call(functools.partial(upstream.create, makepath=True),
                f"{unique_path}/dubbo/{encode(SERVICE)}/providers/{encode(url)}")  # fmt: skip
    admins = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    servers = []
    for node, admin in zip(("d1", "d2"), admins, strict=True):
        config = _config(tmp_path, node, zookeeper.address, unique_path, owner=node == "d1")
        servers.append(await _call(zkgate_factory, ["--config", str(config),
                                                    "--admin-listen", admin]))  # fmt: skip
    meta_config = parse_meta_config({
        "token": WIRE_TOKEN, "server_id": "meta-1", "meta": {"listen": "127.0.0.1:0"},
        "membership": {"kind": "zookeeper", "address": zookeeper.address,
                       "root": f"{unique_path}/zkgate", "session_timeout": 2.0},
    })  # fmt: skip
    _, meta_port = await nursery.start(run_meta, meta_config)
    listen = ListenAddress("127.0.0.1", free_port())
    consumer = await _call(DubboConsumer, servers[1].address, "127.0.0.1", "web", "2.7.8")
    try:
        async with sidecar(tmp_path, f"127.0.0.1:{meta_port}", str(listen), servers[1].address):
            await _call(_switch, admins[1], {"web": {"mode": "on", "ratio": 100}})
            with trio.fail_after(TIMEOUT):
                while _hosts((await _call(consumer.providers))[0]) != {str(listen)}:
                    await trio.sleep(0.1)
                while not await one_exchange(listen):
                    await trio.sleep(0.1)  # the sidecar's first endpoints
            assert provider.accepted >= 1
            await _call(consumer.providers)  # arms the watch the rollback must fire
            events = consumer.events

            status, answer = await _call(_admin, admins[0], "PUT", "/policies", {
                "document": {"consumers": {"web": {SERVICE: {"request_timeout": 0.05}}}},
                "expected_version": 0, "why": "a mesh-path-only failure",
            })  # fmt: skip
            assert status == 200, answer
            failed = 0
            with trio.fail_after(TIMEOUT):
                while True:
                    _, current = await _call(_admin, admins[0], "GET", "/mesh")
                    if current["document"]["consumers"]["web"][SERVICE]["mode"] == "off":
                        break
                    if not await one_exchange(listen):
                        failed += 1
            assert failed >= 5
            seen_at = time.monotonic()
            entry = current["document"]["consumers"]["web"][SERVICE]
            assert entry["locked"] is True
            assert entry["reason"].startswith("automatic rollback: mesh failure ratio")
            assert "timeout" in entry["reason"] and current["why"] == entry["reason"]
            assert current["who"] == "zkgate-rollback/d1"
            while (await _call(_admin, admins[1], "GET", "/mesh"))[1]["version"] != current[
                "version"
            ]:
                assert time.monotonic() - seen_at < 1.0, "d2 did not follow within 1 s"
                await trio.sleep(0.02)

            with trio.fail_after(TIMEOUT):
                while consumer.events == events:
                    await trio.sleep(0.05)
            urls, _ = await _call(consumer.providers)
            assert _hosts(urls) == {f"127.0.0.1:{provider.port}"}
            direct = ListenAddress("127.0.0.1", provider.port)
            before = provider.accepted
            assert await one_exchange(direct)
            assert provider.accepted == before + 1
    finally:
        await _call(consumer.stop)
        await _call(upstream.stop)
        await _call(upstream.close)
