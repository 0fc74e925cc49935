"""The fan-in: merge by endpoint, precedence, provenance, loop prevention, staleness, batching.

The upstreams here are :class:`ScriptedUpstream`: a real implementation of
the adapter contract whose events the test scripts (what a registry would
report), driving the fan-in through its public ``run``. After sending,
``trio.testing.wait_all_tasks_blocked`` waits until the fan-in has consumed
everything: every task in the test is then idle, which is exactly "the
events were applied", without sleeping.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import attrs
import pytest
import trio
import trio.testing

from adapters.static import StaticUpstream
from dispatcher.core.fanin import EXPORTED_BY, FanIn, endpoint_id
from dispatcher.core.model import Instance, Source
from dispatcher.core.snapshot import Delta, Put, Remove, Snapshot
from dispatcher.core.subscriptions import Subscription
from dispatcher.core.upstream import Changed, Listing, Status, UpstreamEvent, reject_unknown
from tests.waiting import until


class ScriptedUpstream:
    """An :class:`~dispatcher.core.upstream.Upstream` whose events the test sends.

    ``crash_first`` makes the first ``run`` raise after it sent its script
    (an adapter bug); ``interest_calls`` records every ``set_interest``.
    """

    def __init__(self, name: str, *, crash_first: bool = False) -> None:
        self.name = name
        self.crash_first = crash_first
        self.interest_calls: list[frozenset[str] | None] = []
        self.runs = 0
        self.script: list[UpstreamEvent] = []
        self._events: trio.MemorySendChannel[UpstreamEvent] | None = None
        self._running = trio.Event()

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        reject_unknown(options, ("crash_first",), f"upstream {name!r}")
        return cls(name, crash_first=bool(options.get("crash_first", False)))

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        self.runs += 1
        self._events = events
        for event in self.script:
            await events.send(event)
        self._running.set()
        if self.crash_first and self.runs == 1:
            raise RuntimeError("adapter bug")
        await trio.sleep_forever()

    def set_interest(self, services: frozenset[str] | None) -> None:
        self.interest_calls.append(services)

    async def running(self) -> None:
        await self._running.wait()

    async def send(self, *events: UpstreamEvent) -> None:
        """Send events as the adapter would, then wait until the fan-in applied them."""
        assert self._events is not None, "not running"
        for event in events:
            await self._events.send(event)
        await trio.testing.wait_all_tasks_blocked()

    def send_now(self, *events: UpstreamEvent) -> None:
        """Queue events without yielding: they arrive together, as one burst."""
        assert self._events is not None, "not running"
        for event in events:
            self._events.send_nowait(event)


def inst(
    name: str,
    service: str = "orders",
    host: str = "10.0.0.1",
    port: int = 8080,
    *,
    upstream: str = "a",
    **kw: Any,
) -> Instance:
    return Instance(service, name, host, port, source=Source(upstream, f"/{service}/{name}"), **kw)


@asynccontextmanager
async def running(fanin: FanIn, *upstreams: ScriptedUpstream) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, upstreams)
        with trio.fail_after(10):
            for upstream in upstreams:
                await upstream.running()
            await trio.testing.wait_all_tasks_blocked()
        yield
        nursery.cancel_scope.cancel()


def only(snapshot: Snapshot, service: str = "orders") -> Instance:
    (instance,) = snapshot.full(service).instances.values()
    return instance


class Recorder:
    """The deltas the fan-in publishes for some services, through a subscription."""

    def __init__(self, fanin: FanIn, *services: str) -> None:
        self.subscription = fanin.subscribe(services or ["orders"])
        self.drain()  # the first full entries

    def drain(self) -> list[Delta]:
        """The deltas published since the last drain (full entries skipped)."""
        new: list[Delta] = []
        while (update := self.subscription._next_ready()) is not None:
            if update.delta is not None:
                new.append(update.delta)
        return new


# ------------------------------------------------------------------- merge


async def test_first_upstream_in_config_order_wins_and_keeps_its_source() -> None:
    fanin = FanIn("node-1")
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    async with running(fanin, a, b):
        # b reports first; a, ranked first, must still win once it reports.
        await b.send(Listing((inst("b-id", upstream="b", weight=5),)))
        merged = only(fanin.snapshot)
        assert merged.instance_id == "10.0.0.1:8080"
        assert merged.source == Source("b", "/orders/b-id")
        assert merged.weight == 5

        await a.send(Listing((inst("a-id", weight=50),)))
        merged = only(fanin.snapshot)
        assert merged.source == Source("a", "/orders/a-id")
        assert merged.weight == 50
        assert [r.source.adapter for r in fanin.reports("orders", "10.0.0.1", 8080)] == [
            "a",
            "b",
        ]


async def test_winner_record_is_taken_whole_metadata_is_not_merged() -> None:
    fanin = FanIn("node-1")
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    async with running(fanin, a, b):
        await a.send(Listing((inst("x", metadata={"version": "2", "zone-hint": "eu"}),)))
        await b.send(
            Listing(
                (
                    inst(
                        "y", upstream="b", zone="us-1", metadata={"version": "1", "owner": "team-b"}
                    ),
                )
            )
        )
        merged = only(fanin.snapshot)
        assert dict(merged.metadata) == {"version": "2", "zone-hint": "eu"}
        # Not stitched: b's zone and b-only key do not leak into a's record.
        assert merged.zone == ""
        assert "owner" not in merged.metadata


async def test_withdrawn_winner_hands_over_as_one_update_with_the_same_id() -> None:
    fanin = FanIn("node-1")
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    async with running(fanin, a, b):
        recorder = Recorder(fanin)
        await a.send(Listing((inst("x", metadata={"from": "a"}),)))
        await b.send(Listing((inst("y", upstream="b", metadata={"from": "b"}),)))
        recorder.drain()

        await a.send(Changed((Remove("orders", "x"),)))
        (delta,) = recorder.drain()
        assert delta.added == () and delta.removed == ()
        (updated,) = delta.updated
        assert updated.instance_id == "10.0.0.1:8080"
        assert updated.source is not None and updated.source.adapter == "b"
        assert dict(updated.metadata) == {"from": "b"}

        await b.send(Changed((Remove("orders", "y"),)))
        (delta,) = recorder.drain()
        assert [i.instance_id for i in delta.removed] == ["10.0.0.1:8080"]
        assert "orders" not in fanin.snapshot


async def test_a_losing_record_changing_is_invisible() -> None:
    fanin = FanIn("node-1")
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    async with running(fanin, a, b):
        await a.send(Listing((inst("x", weight=10),)))
        await b.send(Listing((inst("y", upstream="b", weight=20),)))
        version = fanin.snapshot.version
        await b.send(Changed((Put(inst("y", upstream="b", weight=99)),)))
        assert fanin.snapshot.version == version
        assert only(fanin.snapshot).weight == 10


async def test_one_upstream_two_ids_on_one_endpoint_smallest_id_wins() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        await a.send(Changed((Put(inst("zz", weight=1)), Put(inst("aa", weight=2)))))
        assert only(fanin.snapshot).weight == 2
        await a.send(Changed((Remove("orders", "aa"),)))
        assert only(fanin.snapshot).weight == 1


async def test_an_instance_moving_endpoint_moves_in_the_merge() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        recorder = Recorder(fanin)
        await a.send(Listing((inst("x", port=1000),)))
        recorder.drain()
        await a.send(Changed((Put(inst("x", port=2000)),)))
        (delta,) = recorder.drain()
        assert [i.instance_id for i in delta.added] == ["10.0.0.1:2000"]
        assert [i.instance_id for i in delta.removed] == ["10.0.0.1:1000"]
        assert list(fanin.snapshot.full("orders").instances) == ["10.0.0.1:2000"]


async def test_the_merged_instance_is_the_winner_record_under_the_endpoint_id() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    record = inst("x", weight=3, zone="eu-1", protocol="grpc", metadata={"k": "v"})
    async with running(fanin, a):
        await a.send(Listing((record,)))
        merged = only(fanin.snapshot)
        assert merged == attrs.evolve(record, instance_id="10.0.0.1:8080")
        assert hash(merged) == hash(attrs.evolve(record, instance_id="10.0.0.1:8080"))
        assert merged.source == record.source


def test_endpoint_ids_are_unambiguous_for_ipv6() -> None:
    assert endpoint_id("10.0.0.1", 80) == "10.0.0.1:80"
    assert endpoint_id("db.example", 5432) == "db.example:5432"
    assert endpoint_id("fe80::1", 80) == "[fe80::1]:80"


async def test_an_adapter_that_forgets_the_source_gets_one() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        await a.send(Listing((Instance("orders", "x", "10.0.0.1", 80),)))
        assert only(fanin.snapshot).source == Source("a", "x")


# --------------------------------------------------------- loop prevention


async def test_instances_this_node_exported_are_dropped_and_counted() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        ours = inst("ours", port=1, metadata={EXPORTED_BY: "node-1"})
        theirs = inst("theirs", port=2, metadata={EXPORTED_BY: "node-2"})
        native = inst("native", port=3)
        await a.send(Listing((ours, theirs, native)))
        assert sorted(fanin.snapshot.full("orders").instances) == [
            "10.0.0.1:2",
            "10.0.0.1:3",
        ]
        assert fanin.counters.looped_back == 1

        # A record this upstream had as foreign that turns out to be ours
        # (the projection just stamped it) must leave, not linger.
        await a.send(Changed((Put(inst("native", port=3, metadata={EXPORTED_BY: "node-1"})),)))
        assert sorted(fanin.snapshot.full("orders").instances) == ["10.0.0.1:2"]
        assert fanin.counters.looped_back == 2


# -------------------------------------------------------------- staleness


async def test_status_marks_stale_and_the_last_state_stays_served() -> None:
    fanin = FanIn("node-1")
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    before = time.time()
    async with running(fanin, a, b):
        # Nobody said "connected" yet: both are stale.
        assert set(fanin.stale) == {"a", "b"}
        await a.send(Status(True, "zk1:2181"), Listing((inst("x"), inst("y", port=9))))
        assert set(fanin.stale) == {"b"}
        assert fanin.status["a"].connected and fanin.status["a"].detail == "zk1:2181"

        snapshot = fanin.snapshot
        await a.send(Status(False, "connection lost"))
        assert fanin.snapshot is snapshot  # nothing withdrawn, no new version
        stale = fanin.stale["a"]
        assert not stale.connected
        assert stale.detail == "connection lost"
        assert before <= stale.since <= time.time()

        # Reconnected: the re-listing emits exactly what changed meanwhile.
        recorder = Recorder(fanin)
        await a.send(Status(True), Listing((inst("x", weight=7), inst("z", port=10))))
        assert "a" not in fanin.stale
        (delta,) = recorder.drain()
        assert [i.instance_id for i in delta.added] == ["10.0.0.1:10"]
        assert [(i.instance_id, i.weight) for i in delta.updated] == [("10.0.0.1:8080", 7)]
        assert [i.instance_id for i in delta.removed] == ["10.0.0.1:9"]


async def test_a_crashed_adapter_is_marked_stale_kept_and_restarted() -> None:
    fanin = FanIn("node-1", restart_initial=0.01, restart_max=0.05)
    a = ScriptedUpstream("a", crash_first=True)
    a.script = [Status(True), Listing((inst("x"),))]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [a])
        await until(lambda: a.runs >= 2, "the crashed adapter restarted")
        with trio.fail_after(10):
            await a.running()
            await trio.testing.wait_all_tasks_blocked()
        assert fanin.counters.restarts == 1
        assert len(fanin.snapshot.full("orders").instances) == 1
        assert "a" not in fanin.stale  # the second run said connected again
        nursery.cancel_scope.cancel()


async def test_crash_leaves_the_upstream_stale_until_it_reconnects() -> None:
    fanin = FanIn("node-1", restart_initial=30, restart_max=30)
    a = ScriptedUpstream("a", crash_first=True)
    a.script = [Status(True), Listing((inst("x"),))]
    async with running(fanin, a):
        assert "adapter crashed" in fanin.stale["a"].detail
        assert len(fanin.snapshot.full("orders").instances) == 1


# ----------------------------------------------------------------- listings


async def test_listing_diff_is_exact() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        recorder = Recorder(fanin, "orders", "pay")
        await a.send(
            Listing(
                (
                    inst("1", port=1),
                    inst("2", port=2),
                    inst("3", port=3),
                    inst("p1", service="pay", port=1),
                )
            )
        )
        assert sorted(len(d.added) for d in recorder.drain()) == [1, 3]
        version = fanin.snapshot.version

        # The same listing again (new revisions, same values): nothing.
        await a.send(
            Listing(
                (
                    inst("1", port=1),
                    inst("2", port=2),
                    inst("3", port=3),
                    inst("p1", service="pay", port=1),
                )
            )
        )
        assert fanin.snapshot.version == version
        assert recorder.drain() == []

        await a.send(
            Listing(
                (
                    inst("1", port=1),
                    inst("2", port=2, weight=1),
                    inst("4", port=4),
                    inst("p1", service="pay", port=1),
                )
            )
        )
        (delta,) = recorder.drain()
        assert delta.service == "orders"
        assert [i.port for i in delta.added] == [4]
        assert [(i.port, i.weight) for i in delta.updated] == [(2, 1)]
        assert [i.port for i in delta.removed] == [3]


async def test_a_scoped_listing_replaces_only_its_services() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        await a.send(Listing((inst("o", service="orders"), inst("p", service="pay"))))
        await a.send(Listing((), services=frozenset({"pay"})))
        assert "pay" not in fanin.snapshot
        assert "orders" in fanin.snapshot
        # A stray instance outside the listing's scope is ignored and counted.
        await a.send(Listing((inst("s", service="stray"),), services=frozenset({"orders"})))
        assert "stray" not in fanin.snapshot
        assert "orders" not in fanin.snapshot
        assert fanin.counters.out_of_scope == 1


async def test_a_burst_of_events_is_applied_as_one_version() -> None:
    fanin = FanIn("node-1", event_buffer=512)
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        recorder = Recorder(fanin)
        batches = fanin.counters.batches
        a.send_now(*(Changed((Put(inst(str(n), port=n)),)) for n in range(1, 301)))
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
        assert len(fanin.snapshot.full("orders").instances) == 300
        assert fanin.counters.batches - batches == 1
        assert fanin.snapshot.version == 1
        (delta,) = recorder.drain()
        assert len(delta.added) == 300


async def test_batches_are_bounded() -> None:
    fanin = FanIn("node-1", event_buffer=512, max_batch=100)
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        a.send_now(*(Changed((Put(inst(str(n), port=n)),)) for n in range(1, 301)))
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
        assert len(fanin.snapshot.full("orders").instances) == 300
        assert fanin.counters.batches == 3
        assert fanin.snapshot.version == 3


async def test_upstream_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        await FanIn("n").run([ScriptedUpstream("a"), ScriptedUpstream("a")])


async def test_precedence_follows_the_order_given_not_the_names() -> None:
    fanin = FanIn("node-1")
    z, a = ScriptedUpstream("z"), ScriptedUpstream("a")
    async with running(fanin, z, a):
        await a.send(Listing((inst("from-a", upstream="a", weight=1),)))
        await z.send(Listing((inst("from-z", upstream="z", weight=2),)))
        assert only(fanin.snapshot).source == Source("z", "/orders/from-z")
        assert list(fanin.status) == ["z", "a"]


async def test_equal_records_keep_the_first_source_but_reports_tell_the_winner() -> None:
    # The documented caveat: the snapshot does not make a version for a
    # change of provenance alone, so when two registries hold equal records
    # the snapshot keeps whichever source arrived first. reports() is the
    # exact provenance.
    fanin = FanIn("node-1")
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    async with running(fanin, a, b):
        await b.send(Listing((inst("same", upstream="b"),)))
        version = fanin.snapshot.version
        await a.send(Listing((inst("same", upstream="a"),)))
        assert fanin.snapshot.version == version
        assert only(fanin.snapshot).source == Source("b", "/orders/same")
        reports = fanin.reports("orders", "10.0.0.1", 8080)
        assert [r.source.adapter for r in reports if r.source] == ["a", "b"]


async def test_one_debug_line_per_snapshot_version(caplog: pytest.LogCaptureFixture) -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    with caplog.at_level("DEBUG", logger="dispatcher.core.fanin"):
        async with running(fanin, a):
            await a.send(Listing((inst("x"), inst("p", service="pay"))))
            await a.send(Listing((inst("x"), inst("p", service="pay"))))  # no change
            await a.send(Changed((Remove("pay", "p"),)))
    lines = [r.getMessage() for r in caplog.records if r.name == "dispatcher.core.fanin"]
    versions = [line for line in lines if line.startswith("snapshot version")]
    assert versions == [
        "snapshot version 1: 2 service(s) changed (orders, pay)",
        "snapshot version 2: 1 service(s) changed (pay)",
    ]


# ------------------------------------------------------- with a real adapter


def write_instances(path: Path, *tables: str) -> None:
    """Replace the file atomically (write aside, rename over), as the adapter advises."""
    aside = path.with_suffix(".tmp")
    aside.write_text("".join(f"[[instance]]\n{table}\n" for table in tables))
    os.replace(aside, path)


async def until_update(condition: Callable[[], bool], subscription: Subscription) -> None:
    """Read the subscription's updates until ``condition`` holds (checked first)."""
    with trio.fail_after(10):
        while not condition():
            await subscription.__anext__()


async def test_two_static_files_merge_hand_over_and_go_stale(tmp_path: Path) -> None:
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    write_instances(
        first,
        'service = "orders"\nhost = "10.0.0.1"\nport = 80\nid = "o-1"\nmetadata = {owner = "a"}',
    )
    write_instances(
        second,
        'service = "orders"\nhost = "10.0.0.1"\nport = 80\nid = "legacy"\nweight = 5\n'
        'metadata = {owner = "b", tier = "gold"}',
        'service = "orders"\nhost = "10.0.0.2"\nport = 80',
    )
    upstreams = [
        StaticUpstream.from_config("first", {"path": str(first), "poll_interval": 0.05}),
        StaticUpstream.from_config("second", {"path": str(second), "poll_interval": 0.05}),
    ]
    fanin = FanIn("node-1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, upstreams)
        sub = fanin.subscribe(["orders"])

        def instances() -> dict[str, Instance]:
            return dict(fanin.snapshot.full("orders").instances)

        def merged() -> bool:
            current = instances()
            winner = current.get("10.0.0.1:80")
            return (
                len(current) == 2
                and winner is not None
                and winner.source is not None
                and (winner.source.adapter == "first")
            )

        await until_update(merged, sub)
        winner = instances()["10.0.0.1:80"]
        assert dict(winner.metadata) == {"owner": "a"} and winner.weight == 100
        await until(lambda: not fanin.stale)

        # The first file withdraws the endpoint: the second's record takes over.
        write_instances(first)
        await until_update(lambda: instances()["10.0.0.1:80"].weight == 5, sub)
        assert dict(instances()["10.0.0.1:80"].metadata) == {"owner": "b", "tier": "gold"}

        # A broken file: the last good state stays, marked stale.
        version = fanin.snapshot.version
        second.write_text("[[instance]\n")
        await until(lambda: "second" in fanin.stale)
        assert "second.toml" in fanin.stale["second"].detail
        assert fanin.snapshot.version == version and len(instances()) == 2
        nursery.cancel_scope.cancel()
