"""Central health checking, with real sockets: listeners the test opens and closes.

Every probe here is a real TCP connect (or HTTP GET) to a trio listener on
127.0.0.1 that records when it accepted each connection (wall clock, the
checker's slot clock), or to a port that refuses: a socket bound but not
listening, held for the whole test so nobody else can take the port. The
instances reach the checker the way they do in production: an upstream
lists them, a real :class:`FanIn` merges them, and the verdicts come back
as snapshot deltas that a subscriber reads.

Timing assertions use the bounds the module documents (``fall * interval +
timeout``, ``rise`` passes, 100 ms from a report). The checker's own tests run
on trio's ``MockClock`` with autojump and give the checker :func:`wall` (trio's
time on a wall-clock scale) as its slot clock: the sockets are real, time is
virtual, so a schedule is checked without waiting for it and without the
scheduling noise of a busy machine. The two tests that run a whole gateway
(kazoo's threads, a static file's poll) stay on the real clock.
"""

from __future__ import annotations

import functools
import itertools
import json
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import attrs
import pytest
import trio
from kazoo.client import KazooClient
from trio.testing import MockClock

from dispatcher import wire
from dispatcher.config import ConfigError, HealthConfig, ServiceProbe, parse_config
from dispatcher.core.fanin import FanIn, combine_health
from dispatcher.core.health import (
    TICK,
    HealthChecker,
    first_slot,
    http_probe,
    phase,
    slot_time,
    tcp_probe,
)
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.snapshot import Put, Remove
from dispatcher.core.subscriptions import Subscription
from dispatcher.core.upstream import Changed, Listing, Status, UpstreamEvent
from dispatcher.gateway import Gateway, run_gateway
from tests.waiting import until

TIMEOUT = 10
EPOCH = 1_800_000_000.0
"""Where :func:`wall` starts: any wall-clock-like value (slots are phases of it)."""
SLACK = 0.05
"""Seconds of scheduling noise allowed on top of a documented bound."""


def wall() -> float:
    """The checkers' slot clock here: wall-clock scale, but read from trio.

    Under a ``MockClock`` it is virtual time, so a test that advances the clock
    moves the slots with it; under the real clock it is as good as ``time.time()``
    for everything measured here (differences, and slots of one checker).
    """
    return EPOCH + trio.current_time()


# ------------------------------------------------------------------ listeners


class Listener:
    """A real listener on 127.0.0.1 that records every accepted connection.

    ``http`` answers each request with that status line, after ``gate`` is
    set when one is given (a probe is then in flight until the test lets
    it finish). ``accepted`` holds the wall-clock accept times; ``open_now``
    and ``max_open`` count connections the listener still holds.
    """

    def __init__(
        self, nursery: trio.Nursery, *, http: int | None = None, gate: trio.Event | None = None
    ) -> None:
        self.nursery = nursery
        self.http = http
        self.gate = gate
        self.port = 0
        self.accepted: list[float] = []
        self.requests = 0
        self.open_now = 0
        self.max_open = 0
        self._listener: trio.SocketListener | None = None
        self._changed = trio.Event()

    async def open(self) -> Self:
        """Listen (again, on the same port after a close)."""
        (listener,) = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self._listener = listener
        self.port = listener.socket.getsockname()[1]
        self.nursery.start_soon(self._accept, listener)
        return self

    async def close(self) -> None:
        """Stop listening: connects are refused from now on."""
        assert self._listener is not None
        await self._listener.aclose()
        self._listener = None

    async def _accept(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, OSError):
                return
            self.accepted.append(wall())
            self._notify()
            self.nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            async with stream:
                if self.http is None:
                    return
                received = b""
                while b"\r\n\r\n" not in received:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    received += data
                self.requests += 1
                self._notify()
                if self.gate is not None and not await self._held(stream, self.gate):
                    return
                await stream.send_all(
                    f"HTTP/1.1 {self.http} Whatever\r\nContent-Length: 0\r\n\r\n".encode()
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.open_now -= 1

    @staticmethod
    async def _held(stream: trio.SocketStream, gate: trio.Event) -> bool:
        """Wait for ``gate``; False if the client hung up first (its probe timed out)."""
        released = False
        async with trio.open_nursery() as nursery:

            async def wait_gate() -> None:
                nonlocal released
                await gate.wait()
                released = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_gate)
            await stream.receive_some(1)  # b"" (or an error) once the client is gone
            nursery.cancel_scope.cancel()
        return released

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_accepted(self, count: int) -> float:
        """Wait until ``count`` connections were accepted; the last one's time."""
        with trio.fail_after(TIMEOUT):
            while len(self.accepted) < count:
                await self._changed.wait()
        return self.accepted[count - 1]

    async def wait_requests(self, count: int) -> None:
        with trio.fail_after(TIMEOUT):
            while self.requests < count:
                await self._changed.wait()


@pytest.fixture
def refused_port() -> Iterable[int]:
    """A port where connects are refused: bound (so nobody else gets it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# ------------------------------------------------------------------ fan-in


class ListedUpstream:
    """An upstream whose listing the test sets (a registry, as the fan-in sees it)."""

    def __init__(self, name: str, instances: Sequence[Instance]) -> None:
        self.name = name
        self.instances = tuple(instances)
        self._events: trio.MemorySendChannel[UpstreamEvent] | None = None

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name, ())

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        self._events = events
        await events.send(Listing(self.instances))
        await events.send(Status(True))
        await trio.sleep_forever()

    def set_interest(self, services: frozenset[str] | None) -> None:
        pass

    async def send(self, *events: UpstreamEvent) -> None:
        assert self._events is not None
        for event in events:
            await self._events.send(event)


def inst(service: str, port: int, host: str = "127.0.0.1", **kw: Any) -> Instance:
    return Instance(service, f"reg-{port}", host, port, source=Source("reg", f"/{port}"), **kw)


def merged(port: int, host: str = "127.0.0.1") -> str:
    return f"{host}:{port}"


def quiet_service(port: int, config: HealthConfig, horizon: float = 10.0) -> str:
    """A service name under which ``127.0.0.1:port`` has no slot in the next ``horizon`` s.

    For tests about report-triggered probes: a slot probe in the middle
    would be a second, legitimate probe that the test did not ask for.
    """
    now = wall()
    for n in itertools.count():
        service = f"orders{n}"
        k = first_slot(service, merged(port), now, config.interval, config.jitter)
        if slot_time(service, merged(port), k, config.interval, config.jitter) > now + horizon:
            return service
    raise AssertionError("unreachable")


def health_config(**kw: Any) -> HealthConfig:
    options: dict[str, Any] = {"interval": 0.3, "timeout": 0.2, "rise": 2, "fall": 2}
    return HealthConfig(enabled=True, **(options | kw))


@attrs.define
class World:
    nursery: trio.Nursery
    fanin: FanIn
    upstream: ListedUpstream

    async def checker(
        self, config: HealthConfig, ownership: Any = None, fanin: FanIn | None = None
    ) -> HealthChecker:
        checker = HealthChecker(fanin or self.fanin, ownership, config, clock=wall)
        await self.nursery.start(checker.run)
        return checker

    def health(self, service: str, instance_id: str) -> Health:
        return self.fanin.snapshot.full(service).instances[instance_id].health


@asynccontextmanager
async def world(*instances: Instance) -> AsyncIterator[World]:
    """A running fan-in over one upstream listing ``instances``."""
    async with trio.open_nursery() as nursery:
        fanin = FanIn("gw-test")
        upstream = ListedUpstream("reg", instances)
        nursery.start_soon(fanin.run, [upstream])
        services = {i.service for i in instances}
        await until(lambda: services <= set(fanin.snapshot))
        yield World(nursery, fanin, upstream)
        nursery.cancel_scope.cancel()


async def next_health(
    subscription: Subscription, instance_id: str, wanted: Health
) -> tuple[float, str]:
    """Read updates until one shows ``instance_id`` with ``wanted`` health: (time, how)."""
    with trio.fail_after(TIMEOUT):
        async for update in subscription:
            if update.delta is not None:
                for instance in update.delta.updated:
                    if instance.instance_id == instance_id and instance.health is wanted:
                        return wall(), "updated"
                assert instance_id not in update.delta.removed_ids
            elif update.full is not None:
                found = update.full.instances.get(instance_id)
                if found is not None and found.health is wanted:
                    return wall(), "full"
    raise AssertionError("subscription ended")


# ------------------------------------------------------------------ detection


async def test_closed_listener_fails_within_bound_and_recovers_after_rise(
    autojump_clock: MockClock,
) -> None:
    config = health_config(interval=0.3, timeout=0.2, rise=2, fall=2, jitter=0.1)
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery).open()
        iid = merged(listener.port)
        async with world(inst("orders", listener.port)) as w:
            subscription = w.fanin.subscribe(["orders"])
            checker = await w.checker(config)
            # The first result decides: one accepted connect makes it passing.
            await next_health(subscription, iid, Health.PASSING)
            assert len(listener.accepted) == 1

            closed = wall()
            await listener.close()
            failed, how = await next_health(subscription, iid, Health.FAILING)
            # A delta updates the instance in place (a proxy keeps its entry).
            assert how == "updated"
            assert failed - closed <= config.fall * config.interval + config.timeout
            state = checker.state("orders", iid)
            assert state is not None and state.fails == config.fall

            accepted_before = len(listener.accepted)
            reopened = wall()
            await listener.open()
            recovered, _ = await next_health(subscription, iid, Health.PASSING)
            # Exactly ``rise`` passing probes brought it back, at most rise
            # intervals (plus jitter) and a probe's time after the reopening.
            assert len(listener.accepted) - accepted_before == config.rise
            bound = config.rise * config.interval * (1 + config.jitter) + config.timeout
            assert recovered - reopened <= bound + SLACK

            metrics = checker.metrics
            assert metrics.to_failing == 1 and metrics.to_passing == 2  # unknown->, failing->
            assert metrics.detection_count == 1
            assert metrics.detection_max <= config.fall * config.interval * 1.1 + config.timeout
            subscription.close()
        nursery.cancel_scope.cancel()


async def test_every_instance_is_probed_once_per_cycle(
    refused_port: int, autojump_clock: MockClock
) -> None:
    config = health_config(interval=0.2, timeout=0.1)
    async with trio.open_nursery() as nursery:
        listeners = [await Listener(nursery).open() for _ in range(5)]
        instances = [inst(f"svc{i % 2}", x.port) for i, x in enumerate(listeners)]
        instances.append(inst("svc0", refused_port))
        async with world(*instances) as w:
            checker = await w.checker(config)
            await until(lambda: checker.metrics.cycle >= 0)
            first = checker.metrics.cycle
            await until(lambda: checker.metrics.cycle >= first + 3)
            assert checker.metrics.probes_per_cycle == len(instances)
            assert checker.metrics.tracked == len(instances)
            assert w.health("svc0", merged(refused_port)) is Health.FAILING
            assert all(
                w.health(i.service, merged(i.port)) is Health.PASSING for i in instances[:-1]
            )
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the snapshot


@pytest.mark.parametrize(
    ("source", "probe", "result"),
    [
        (Health.UNKNOWN, None, Health.UNKNOWN),
        (Health.PASSING, None, Health.PASSING),
        (Health.FAILING, None, Health.FAILING),
        (Health.UNKNOWN, Health.PASSING, Health.PASSING),
        (Health.UNKNOWN, Health.FAILING, Health.FAILING),
        (Health.PASSING, Health.FAILING, Health.FAILING),
        (Health.FAILING, Health.PASSING, Health.FAILING),
    ],
)
def test_combination_rule(source: Health, probe: Health | None, result: Health) -> None:
    assert combine_health(source, probe) is result


async def test_source_failing_wins_and_probes_override_the_rest(
    refused_port: int, autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        up = await Listener(nursery).open()
        # Consul says passing, but nothing listens: the probe wins.
        dead = inst("orders", refused_port, health=Health.PASSING)
        # The registry says failing (a Dubbo provider disabled), the port is open.
        disabled = inst("orders", up.port, health=Health.FAILING)
        async with world(dead, disabled) as w:
            subscription = w.fanin.subscribe(["orders"])
            await w.checker(health_config())
            await next_health(subscription, merged(refused_port), Health.FAILING)
            await until(lambda: w.fanin.probe_health("orders", merged(up.port)) is not None)
            assert w.fanin.probe_health("orders", merged(up.port)) is Health.PASSING
            assert w.health("orders", merged(up.port)) is Health.FAILING
            # The registries' own records are untouched.
            (record,) = w.fanin.reports("orders", "127.0.0.1", refused_port)
            assert record.health is Health.PASSING
            subscription.close()
        nursery.cancel_scope.cancel()


async def test_verdicts_follow_the_instance_not_the_endpoint_forever(
    refused_port: int, autojump_clock: MockClock
) -> None:
    dead = inst("orders", refused_port)
    async with world(dead) as w:
        iid = merged(refused_port)
        # Results for instances the snapshot does not have are dropped.
        assert w.fanin.set_probe_health([("orders", "10.9.9.9:1", Health.FAILING)]) == ()
        (delta,) = w.fanin.set_probe_health([("orders", iid, Health.FAILING)])
        assert [i.health for i in delta.updated] == [Health.FAILING]
        # Re-stating the same verdict is no change; withdrawing it is.
        assert w.fanin.set_probe_health([("orders", iid, Health.FAILING)]) == ()
        (delta,) = w.fanin.set_probe_health([("orders", iid, None)])
        assert [i.health for i in delta.updated] == [Health.UNKNOWN]
        w.fanin.set_probe_health([("orders", iid, Health.FAILING)])
        # Deregistered and registered again: the old verdict is gone with it.
        await w.upstream.send(Changed((Remove("orders", dead.instance_id),)))
        await until(lambda: "orders" not in w.fanin.snapshot)
        await w.upstream.send(Changed((Put(dead),)))
        await until(lambda: "orders" in w.fanin.snapshot)
        assert w.health("orders", iid) is Health.UNKNOWN
        assert w.fanin.probe_health("orders", iid) is None


async def test_a_verdict_survives_a_change_of_winning_registry(autojump_clock: MockClock) -> None:
    primary = ListedUpstream("primary", [inst("orders", 9100, weight=10)])
    fallback = ListedUpstream("fallback", [inst("orders", 9100, weight=20)])
    fanin = FanIn("gw-test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [primary, fallback])
        iid = merged(9100)
        await until(lambda: len(fanin.reports("orders", "127.0.0.1", 9100)) == 2)
        fanin.set_probe_health([("orders", iid, Health.FAILING)])
        await primary.send(Changed((Remove("orders", "reg-9100"),)))
        # The fallback's record wins now: same instance, its weight, still failing.
        await until(lambda: fanin.snapshot.full("orders").instances[iid].weight == 20)
        assert fanin.snapshot.full("orders").instances[iid].health is Health.FAILING
        nursery.cancel_scope.cancel()


async def test_a_checker_that_stops_withdraws_its_verdicts(
    refused_port: int, autojump_clock: MockClock
) -> None:
    async with world(inst("orders", refused_port)) as w:
        checker = HealthChecker(w.fanin, None, health_config(), clock=wall)
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.run)
            await until(lambda: w.health("orders", merged(refused_port)) is Health.FAILING)
            nursery.cancel_scope.cancel()
        assert w.health("orders", merged(refused_port)) is Health.UNKNOWN


async def test_probe_none_leaves_a_service_alone(
    refused_port: int, autojump_clock: MockClock
) -> None:
    config = health_config(services=(ServiceProbe("batch", "none"),))
    async with world(inst("batch", refused_port), inst("orders", refused_port)) as w:
        checker = await w.checker(config)
        await until(lambda: w.health("orders", merged(refused_port)) is Health.FAILING)
        assert checker.state("batch", merged(refused_port)) is None
        assert w.health("batch", merged(refused_port)) is Health.UNKNOWN


# ------------------------------------------------------------------ probes


@pytest.mark.parametrize(
    ("status", "passes"), [(200, True), (204, True), (302, True), (404, False), (503, False)]
)
async def test_http_probe_passes_on_2xx_and_3xx(
    status: int, passes: bool, autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery, http=status).open()
        result = await http_probe("127.0.0.1", listener.port, "/health")
        assert (result is None) is passes, result
        if not passes:
            assert result == f"http: status {status}"
        nursery.cancel_scope.cancel()


async def test_http_probe_rejects_what_is_not_http(
    refused_port: int, autojump_clock: MockClock
) -> None:
    async def babble(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, babble, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        assert (await http_probe("127.0.0.1", port, "/")) == (
            "http: not a status line: b'SSH-2.0-OpenSSH_9.2'"
        )
        nursery.cancel_scope.cancel()
    assert (await tcp_probe("127.0.0.1", refused_port) or "").startswith("connect:")
    assert (await http_probe("127.0.0.1", refused_port, "/") or "").startswith("connect:")


async def test_a_probe_that_hangs_fails_after_timeout_and_concurrency_is_bounded(
    autojump_clock: MockClock,
) -> None:
    gate = trio.Event()  # never set: every HTTP probe hangs until its timeout
    config = health_config(interval=0.5, timeout=0.15, concurrency=3, probe="http", fall=1)
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery, http=200, gate=gate).open()
        # Twelve services share the endpoint: twelve instances, one socket each.
        instances = [inst(f"svc{i}", listener.port) for i in range(12)]
        async with world(*instances) as w:
            started = wall()
            checker = await w.checker(config)
            iid = merged(listener.port)
            await until(lambda: all(
                w.health(f"svc{i}", iid) is Health.FAILING for i in range(12)
            ))  # fmt: skip
            # Twelve probes, three at a time, each cut off at the timeout.
            assert wall() - started >= 4 * config.timeout
            assert listener.max_open <= config.concurrency
            assert checker.metrics.failures >= 12
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ reports


async def test_a_report_triggers_a_probe_within_100ms(autojump_clock: MockClock) -> None:
    # A long interval: the next slot is far away, so the probe is the report's.
    config = health_config(interval=60.0, timeout=1.0, recheck=0.01)
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery).open()
        iid = merged(listener.port)
        async with world(inst("orders", listener.port)) as w:
            checker = await w.checker(config)
            await until(lambda: checker.state("orders", iid) is not None)
            for round in range(3):
                seen = len(listener.accepted)
                sent = wall()
                assert checker.on_report("orders", iid, "connect-refused", "proxy-1")
                probed = await listener.wait_accepted(seen + 1)
                assert probed - sent < 0.1, f"round {round}: {probed - sent:.3f} s"
                await until(
                    lambda: (
                        (state := checker.state("orders", iid)) is not None and not state.in_flight
                    )
                )
                await trio.sleep(config.recheck)  # the minimum gap between report probes
            assert checker.metrics.reports == 3
        nursery.cancel_scope.cancel()


async def test_reports_merge_into_the_probe_in_flight(autojump_clock: MockClock) -> None:
    gate = trio.Event()
    config = health_config(interval=60.0, timeout=5.0, probe="http")
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery, http=200, gate=gate).open()
        iid = merged(listener.port)
        service = quiet_service(listener.port, config)
        async with world(inst(service, listener.port)) as w:
            checker = await w.checker(config)
            await until(lambda: checker.state(service, iid) is not None)
            assert checker.on_report(service, iid, "reset", "proxy-1")
            await listener.wait_requests(1)  # the probe is in flight, held by the server
            for proxy in range(5):
                assert checker.on_report(service, iid, "reset", f"proxy-{proxy}")
            assert checker.metrics.reports_merged == 5
            gate.set()
            await until(lambda: w.health(service, iid) is Health.PASSING)
            assert listener.requests == 1 and len(listener.accepted) == 1
            assert checker.metrics.probes_reported == 1
        nursery.cancel_scope.cancel()


async def test_reports_without_an_authenticated_client_are_refused(
    autojump_clock: MockClock,
) -> None:
    config = health_config(interval=60.0, timeout=1.0)
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery).open()
        iid = merged(listener.port)
        service = quiet_service(listener.port, config)
        async with world(inst(service, listener.port)) as w:
            checker = await w.checker(config)
            await until(lambda: checker.state(service, iid) is not None)
            assert not checker.on_report(service, iid, "reset", None)
            assert not checker.on_report(service, iid, "reset", "")
            assert checker.metrics.reports_refused == 2
            # Unknown instances and services are ignored, known ones probed.
            assert not checker.on_report(service, "10.9.9.9:1", "reset", "proxy-1")
            assert not checker.on_report("nope", iid, "reset", "proxy-1")
            assert checker.metrics.reports_ignored == 2
            assert checker.on_report(service, iid, "reset", "proxy-1")
            await listener.wait_accepted(1)
            await until(lambda: checker.metrics.in_flight == 0)
            assert len(listener.accepted) == 1  # the refused ones never probed
        nursery.cancel_scope.cancel()


async def test_a_reported_failure_is_confirmed_by_quick_rechecks(autojump_clock: MockClock) -> None:
    config = health_config(interval=60.0, timeout=0.5, fall=3, recheck=0.1)
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery).open()
        iid = merged(listener.port)
        service = quiet_service(listener.port, config)
        async with world(inst(service, listener.port)) as w:
            checker = await w.checker(config)
            await until(lambda: checker.state(service, iid) is not None)
            assert checker.on_report(service, iid, "reset", "proxy-1")
            await until(lambda: w.health(service, iid) is Health.PASSING)
            await listener.close()
            reported = wall()
            assert checker.on_report(service, iid, "connect-refused", "proxy-1")
            await until(lambda: w.health(service, iid) is Health.FAILING)
            # fall probes, recheck apart, instead of fall intervals (3 minutes).
            assert wall() - reported <= (config.fall - 1) * config.recheck + 0.5
            assert checker.metrics.probes_reported == 1 + config.fall
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ ownership


@attrs.define
class Shards:
    """Service -> owning Dispatcher, changed atomically by the test.

    ``move(..., overlap=True)`` hands a service over the way
    :mod:`dispatcher.sharding.ownership` does: the old owner keeps serving it too
    (``owns`` is True on both) and only the new one is its prober.
    """

    owners: dict[str, str]
    still_serving: dict[str, str] = attrs.Factory(dict)
    epoch: int = 0

    def view(self, node: str, *, with_prober: bool = False) -> ShardView:
        return (ProbingShardView if with_prober else ShardView)(self, node)

    def move(self, service: str, node: str, *, overlap: bool = False) -> None:
        if overlap:
            self.still_serving[service] = self.owners[service]
        self.owners[service] = node
        self.epoch += 1


@attrs.define
class ShardView:
    shards: Shards
    node: str

    @property
    def epoch(self) -> int:
        return self.shards.epoch

    def owns(self, service: str) -> bool:
        shards = self.shards
        return self.node in (shards.owners.get(service), shards.still_serving.get(service))

    def owner_of(self, service: str) -> None:
        return None


class ProbingShardView(ShardView):
    def probes(self, service: str) -> bool:
        return self.shards.owners.get(service) == self.node


def slot_of(accepted: float, service: str, iid: str, config: HealthConfig) -> int:
    """The slot a probe accepted at ``accepted`` was fired for: the last one due before it.

    Slots of one instance are at least ``(1 - jitter) * interval`` apart, so
    this is unambiguous while a probe fires less late than that.
    """
    k = first_slot(service, iid, accepted + 0.005, config.interval, config.jitter) - 1
    due = slot_time(service, iid, k, config.interval, config.jitter)
    assert accepted - due < (1 - config.jitter) * config.interval, (accepted, due)
    return k


def aligned(service: str, port: int, prefix: str, port2: int, config: HealthConfig) -> str:
    """A service name ``prefix<n>`` whose instance at ``port2`` has nearly the phase of
    ``service``'s at ``port``: their slots come together, leaving the rest of every
    interval free for a hand-over that no slot is near."""
    target = phase(service, merged(port), config.interval)
    for n in itertools.count():
        name = f"{prefix}{n}"
        if abs(phase(name, merged(port2), config.interval) - target) < 0.03 * config.interval:
            return name
    raise AssertionError("unreachable")


@pytest.mark.parametrize("overlap", [False, True], ids=["atomic-handover", "overlapping-owners"])
async def test_two_dispatchers_never_probe_one_instance_twice_in_an_interval(
    overlap: bool, autojump_clock: MockClock
) -> None:
    config = health_config(interval=0.3, timeout=0.1, jitter=0.1)
    async with trio.open_nursery() as nursery:
        ports = [(await Listener(nursery).open()) for _ in range(4)]
        # "a" (d1) and "b" (d2) change hands mid-test; "c" (d1, two instances) stays.
        a = "a"
        b = aligned(a, ports[0].port, "b", ports[1].port, config)
        listeners = {(a, 0): ports[0], (b, 0): ports[1], ("c", 0): ports[2], ("c", 1): ports[3]}
        shards = Shards({a: "d1", b: "d2", "c": "d1"})
        instances = [inst(s, x.port) for (s, _), x in listeners.items()]
        # Two Dispatchers, each with its own fan-in over the same registry.
        async with world(*instances) as w1, world(*instances) as w2:
            d1 = await w1.checker(config, shards.view("d1", with_prober=overlap))
            d2 = await w2.checker(config, shards.view("d2", with_prober=overlap))
            begin = wall()
            await trio.sleep(4 * config.interval)

            # Swap a and b at the instant farthest from their slots.
            moved = [(a, merged(ports[0].port)), (b, merged(ports[1].port))]
            now = wall()
            slots = []
            for service, iid in moved:
                k = first_slot(service, iid, now, config.interval, config.jitter)
                slots += [slot_time(service, iid, j, config.interval, config.jitter) + TICK / 2
                          for j in range(k - 1, k + 3)]  # fmt: skip
            candidates = [now + 0.05 + j * 0.002 for j in range(int(config.interval / 0.002))]
            swap = max(candidates, key=lambda t: min(abs(t - s) for s in slots))
            assert min(abs(swap - s) for s in slots) > 0.1
            await trio.sleep(swap - wall())
            shards.move(a, "d2", overlap=overlap)
            shards.move(b, "d1", overlap=overlap)
            await trio.sleep(4 * config.interval)
            end = wall()
        # Both checkers have stopped; let the listeners accept what is still queued.
        await until(lambda: all(
            len(x.accepted) >= sum(
                p.probes for d in (d1, d2) if (p := d.state(s, merged(x.port)))
            ) - 1
            for (s, _), x in listeners.items()
        ))  # fmt: skip
        nursery.cancel_scope.cancel()

    for (service, _), listener in listeners.items():
        iid = merged(listener.port)
        # Count only whole slots: both checkers were scheduling from the start.
        first = first_slot(service, iid, begin + config.interval, config.interval, config.jitter)
        last = first_slot(service, iid, end - 2 * config.interval, config.interval, config.jitter)
        slots_seen = [slot_of(t, service, iid, config) for t in listener.accepted]
        window = [k for k in slots_seen if first <= k <= last]
        # One probe per slot, across both Dispatchers, across the hand-over.
        assert window == list(range(first, last + 1)), (service, slots_seen)
        # Each connection the listener saw was a probe one of the checkers
        # started (the last one may have been cancelled before it connected).
        probes = [d.state(service, iid) for d in (d1, d2)]
        started = sum(p.probes for p in probes if p)
        assert started - 1 <= len(listener.accepted) <= started
        if service in (a, b):  # both probed it: the old owner before, the new one after
            assert all(p is not None and p.probes > 0 for p in probes), service
    assert d1.metrics.skipped_not_owned > 0 and d2.metrics.skipped_not_owned > 0


async def test_losing_a_service_withdraws_its_verdicts(
    refused_port: int, autojump_clock: MockClock
) -> None:
    shards = Shards({"orders": "d1"})
    async with world(inst("orders", refused_port)) as w:
        checker = await w.checker(health_config(), shards.view("d1"))
        iid = merged(refused_port)
        await until(lambda: w.health("orders", iid) is Health.FAILING)
        shards.move("orders", "d2")
        # The new owner's verdict lives in its own snapshot; this one falls
        # back to the registry's health.
        await until(lambda: w.health("orders", iid) is Health.UNKNOWN, timeout=1)
        assert not checker.on_report("orders", iid, "reset", "proxy-1")


# ------------------------------------------------------------------ config


def test_health_table_parses_with_defaults_and_overrides() -> None:
    config = parse_config({"health": {
        "enabled": True, "interval": 2, "timeout": 0.5, "probe": "http", "path": "/ok",
        "service": [{"name": "db", "probe": "tcp"}, {"name": "web", "path": "/ping"}],
    }})  # fmt: skip
    health = config.health
    assert health.enabled and health.interval == 2.0 and health.fall == 3
    assert health.probe_for("db") == ServiceProbe("db", "tcp", "/ok")
    assert health.probe_for("web") == ServiceProbe("web", "http", "/ping")
    assert health.probe_for("other") == ServiceProbe("other", "http", "/ok")
    assert parse_config(config.to_mapping()) == config
    assert parse_config({}).health == HealthConfig()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"interval": 1, "timeout": 1}, "health.timeout: must be positive and less than interval"),
        ({"probe": "icmp"}, "health.probe: must be one of 'tcp', 'http', 'none'"),
        ({"fall": 0}, "health.fall: must be at least 1"),
        ({"jitter": 0.9}, "health.jitter: must be in [0, 0.5]"),
        ({"interval": "5s"}, "health.interval: must be a number"),
        ({"service": [{"probe": "tcp"}]}, "health.service[0].name: missing"),
        ({"service": [{"name": "x", "path": "health"}]}, "health.service[0].path: must start"),
        ({"service": [{"name": "x"}, {"name": "x"}]}, "health.service: names must be unique"),
        ({"enable": True}, "health.enable: unknown key"),
    ],
)
def test_health_table_mistakes_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"health": table})
    assert str(info.value).startswith(message), str(info.value)


# ------------------------------------------------------------------ the gateway


async def test_the_gateway_checks_health_and_takes_proxy_reports(
    tmp_path: Path, refused_port: int
) -> None:
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery).open()
        (tmp_path / "services.toml").write_text(
            f'[[instance]]\nservice = "orders"\nhost = "127.0.0.1"\nport = {listener.port}\n'
            f'[[instance]]\nservice = "orders"\nhost = "127.0.0.1"\nport = {refused_port}\n'
        )
        config = parse_config({
            "node_id": "gw-health",
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
            "admin": {"enabled": False},
            "subscriptions": {"listen": "127.0.0.1:0", "token": "t0ken"},
            "health": {"enabled": True, "interval": 30.0, "timeout": 1.0},
            "upstream": [{"name": "files", "kind": "static",
                          "path": str(tmp_path / "services.toml"), "poll_interval": 0.05}],
        })  # fmt: skip
        gateway: Gateway = await nursery.start(run_gateway, config)
        assert gateway.health is not None and gateway.subscription_port is not None
        up, down = merged(listener.port), merged(refused_port)
        await until(lambda: "orders" in gateway.fanin.snapshot)
        await until(lambda: gateway.health is not None and gateway.health.state("orders", up))

        # A proxy that never said hello cannot get a report through.
        port = gateway.subscription_port
        stranger = wire.WireStream(await trio.open_tcp_stream("127.0.0.1", port))
        await stranger.send(wire.Report("orders", down, "connect-refused"))
        # An authenticated proxy's report is probed at once (the interval is 30 s).
        proxy = wire.WireStream(await trio.open_tcp_stream("127.0.0.1", port))
        await proxy.send(wire.Hello(wire.PROTOCOL_VERSION, "t0ken", "proxy-9"))
        assert isinstance(await proxy.receive(), wire.Welcome)
        seen = len(listener.accepted)
        sent = wall()
        await proxy.send(wire.Report("orders", up, "reset"))
        probed = await listener.wait_accepted(seen + 1)
        assert probed - sent < 0.1
        await until(lambda: gateway.fanin.snapshot.full("orders").instances[up].health
                    is Health.PASSING)  # fmt: skip
        assert gateway.health.metrics.reports == 1
        # The stranger's report never reached the checker.
        assert gateway.health.metrics.reports_refused == 0
        assert gateway.health.metrics.reports_ignored == 0
        await proxy.aclose()
        await stranger.aclose()
        nursery.cancel_scope.cancel()


async def test_projections_hide_failing_instances_or_mark_them_dead(
    tmp_path: Path, refused_port: int
) -> None:
    """What a ZooKeeper client reads once the checker has spoken (kazoo, over the wire)."""
    async with trio.open_nursery() as nursery:
        listener = await Listener(nursery).open()
        (tmp_path / "services.toml").write_text(
            f'[[instance]]\nservice = "orders"\nhost = "127.0.0.1"\nport = {listener.port}\n'
            f'[[instance]]\nservice = "orders"\nhost = "127.0.0.1"\nport = {refused_port}\n'
        )
        config = parse_config({
            "node_id": "gw-health",
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
            "admin": {"enabled": False},
            "health": {"enabled": True, "interval": 0.3, "timeout": 0.2},
            "projection": [{"root": "/plain", "layout": "plain"},
                           {"root": "/serversets", "layout": "serverset"}],
            "upstream": [{"name": "files", "kind": "static",
                          "path": str(tmp_path / "services.toml"), "poll_interval": 0.05}],
        })  # fmt: skip
        gateway: Gateway = await nursery.start(run_gateway, config)
        up, down = merged(listener.port), merged(refused_port)

        def verdicts() -> bool:
            instances = gateway.fanin.snapshot.full("orders").instances
            return (
                len(instances) == 2
                and instances[up].health is Health.PASSING
                and instances[down].health is Health.FAILING
            )

        await until(verdicts)

        def read() -> tuple[list[Any], list[Any]]:
            client = KazooClient(hosts=f"127.0.0.1:{gateway.port}", timeout=10)
            client.start(timeout=10)
            try:
                plain = [json.loads(client.get(f"/plain/orders/{child}")[0])
                         for child in client.get_children("/plain/orders")]  # fmt: skip
                serversets = [json.loads(client.get(f"/serversets/orders/{child}")[0])
                              for child in client.get_children("/serversets/orders")]  # fmt: skip
                return plain, serversets
            finally:
                client.stop()
                client.close()

        plain, serversets = await trio.to_thread.run_sync(read)
        # Plain JSON has no status: the failing instance is left out.
        assert [record["port"] for record in plain] == [listener.port]
        # ServerSet members carry a status: the failing one is there, DEAD.
        statuses = {r["serviceEndpoint"]["port"]: r["status"] for r in serversets}
        assert statuses == {listener.port: "ALIVE", refused_port: "DEAD"}
        nursery.cancel_scope.cancel()
