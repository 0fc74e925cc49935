"""The Consul adapter against the Consul double (tests/consul_double.py).

Consul cannot be installed on the machines that run this suite, so these
tests talk to an in-process double of Consul's documented API, blocking
queries and ``X-Consul-Index`` included; real Consul is covered by the
compose files under docker/. The double's own blocking semantics are checked
first, so that the adapter tests stand on something verified.

Two kinds of adapter test. Those about what is listed (fields, health,
deregistration, interest) run the adapter as it runs in production: py-consul
in worker threads, over HTTP on a loopback socket, on the real clock. Those
whose subject is time (how long a query is held, how often a loop asks, the
backoff after errors, what happens in an hour of idling) give the adapter the
double's in-process ``Fetch`` and run on trio's ``MockClock`` with autojump:
the double holds each query on trio's clock, so the tests assert exact
request times and counts in virtual time and take milliseconds.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import requests
import trio
import trio.testing

from adapters.consul import ConsulConfig, ConsulUpstream, Fetch, instance_from_entry
from dispatcher.backoff import Backoff
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.upstream import ConfigError, Listing, Status, UpstreamEvent
from tests.consul_double import BusyLoopError, ConsulDouble, RequestRecord, parse_go_duration
from tests.upstream_fold import Fold
from tests.waiting import until

WEB = "/v1/health/service/web"
CATALOG = "/v1/catalog/services"
CONSUL = "/v1/health/service/consul"
IN_PROCESS = "consul-double.invalid:8500"
"""The address an in-process upstream is configured with: it only names the agent."""
DEFAULT_WAIT = 60.0
DEFAULT_MIN_INTERVAL = 1.0
BACKOFF = Backoff()
"""The adapter's backoff with its defaults: the source of the ceilings asserted below."""


@pytest.fixture
async def double() -> AsyncIterator[ConsulDouble]:
    """A double served over HTTP on 127.0.0.1, from inside the test's trio run."""
    with ConsulDouble() as consul_double:
        yield consul_double


@pytest.fixture
def exact() -> ConsulDouble:
    """An in-process double that holds each blocking query for exactly its ``wait``."""
    return ConsulDouble(jitter=False)


@asynccontextmanager
async def running(
    double: ConsulDouble,
    interest: frozenset[str] | None = None,
    *,
    http: bool = True,
    **options: Any,
) -> AsyncIterator[tuple[ConsulUpstream, trio.MemoryReceiveChannel[UpstreamEvent], Fold]]:
    """Run a ConsulUpstream against ``double`` for the body of the ``async with``.

    Over HTTP (py-consul, real clock) the wait and rate limit are shortened so
    that the tests' changes are seen quickly; in process the adapter keeps
    its production defaults (60 s wait, 1 s between calls), which cost
    nothing in virtual time.
    """
    connect: Callable[[], Fetch] | None = None
    if http:
        options = {"address": double.address, "wait": 5.0, "min_interval": 0.05, **options}
    else:
        options = {"address": IN_PROCESS, **options}
        connect = functools.partial(in_process_fetch, double)
    config = ConsulConfig.from_options("consul-test", options)
    upstream = ConsulUpstream("consul-test", config, connect=connect)
    if interest is not None:
        upstream.set_interest(interest)
    send, receive = trio.open_memory_channel[UpstreamEvent](256)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        try:
            yield upstream, receive, Fold()
        finally:
            nursery.cancel_scope.cancel()


def in_process_fetch(double: ConsulDouble) -> Fetch:
    """What each loop of an in-process upstream asks through: the double's handler."""
    return double.fetch


def in_flight(double: ConsulDouble, path: str, index: int) -> bool:
    """Whether a blocking query for ``path`` past ``index`` is being held right now."""
    return any(r.blocking_index == index and r.status is None for r in double.requests(path))


def held(double: ConsulDouble, path: str) -> bool:
    """Whether a blocking query for ``path`` is being held right now."""
    return any(r.blocking_index is not None and r.status is None for r in double.requests(path))


def failed_everywhere(double: ConsulDouble) -> bool:
    """Whether each of the loops (catalog, web, consul) has been answered 500."""
    failed = {r.path for r in double.requests() if r.status == 500}
    return failed >= {CATALOG, WEB, CONSUL}


def ids(fold: Fold, service: str) -> set[str]:
    return set(fold.instances(service))


def answered(double: ConsulDouble, path: str) -> list[RequestRecord]:
    """The requests for ``path`` that have been answered, oldest first."""
    return [r for r in double.requests(path) if r.answered is not None]


def held_for(record: RequestRecord) -> float:
    assert record.answered is not None
    return record.answered - record.arrived


async def get(double: ConsulDouble, path: str, **params: str) -> tuple[int, dict[str, str], Any]:
    """One GET through the double's request handler: status, headers, decoded body."""
    status, headers, body = await double.serve("GET", path, params)
    decoded = json.loads(body) if status == 200 else body.decode()
    return status, headers, decoded


# ---------------------------------------------------------------- the double itself


def test_go_durations_parse_as_consul_takes_them() -> None:
    assert parse_go_duration("10s") == 10
    assert parse_go_duration("5m") == 300
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("250ms") == pytest.approx(0.25)
    assert parse_go_duration("0") == 0
    for bad in ("", "10", "5 s", "s", "1d"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


async def test_double_holds_blocking_queries_for_their_wait_or_until_a_change(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    status, headers, body = await get(exact, CATALOG)
    assert (status, body) == (200, {"consul": []})
    index = int(headers["X-Consul-Index"])
    assert index >= 1
    assert held_for(exact.requests()[-1]) == 0  # a plain read is answered at once

    # Nothing changes: held for exactly the wait, then the same index. With
    # no wait given, Consul's default of 5 minutes; above 10 minutes, capped.
    for wait, seconds in (("300ms", 0.3), ("90s", 90.0), (None, 300.0), ("1h", 600.0)):
        params = {"index": str(index)} | ({"wait": wait} if wait else {})
        _, same, _ = await get(exact, CATALOG, **params)
        assert int(same["X-Consul-Index"]) == index
        assert held_for(exact.requests()[-1]) == pytest.approx(seconds, abs=1e-9), wait

    # A registration releases a held query at that instant, with a higher index.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(get, exact, CATALOG, index=str(index), wait="30s"))
        await until(lambda: in_flight(exact, CATALOG, index), what="query held")
        registered_at = trio.current_time()
        exact.register("web", "web-1", port=80)
    woken = exact.requests(CATALOG)[-1]
    assert woken.answered == registered_at
    assert woken.index is not None and woken.index > index
    _, _, body = await get(exact, CATALOG)
    assert body == {"consul": [], "web": []}


async def test_double_adds_up_to_a_sixteenth_of_the_wait_as_consul_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    double = ConsulDouble()
    index = str(double.index)
    holds = []
    for _ in range(50):
        await get(double, CATALOG, index=index, wait="16s")
        holds.append(held_for(double.requests()[-1]))
    assert all(16.0 <= hold <= 17.0 for hold in holds), holds
    assert len(set(holds)) > 1  # spread, not a fixed extra


async def test_double_answers_errors_as_consul_does(exact: ConsulDouble) -> None:
    # Errors carry no index, as Consul's do.
    exact.fail(requests=1)
    status, headers, body = await get(exact, WEB)
    assert (status, body) == (500, "No cluster leader\n")
    assert "X-Consul-Index" not in headers
    assert (await get(exact, WEB))[0] == 200
    assert (await get(exact, WEB, index="1", wait="soon"))[0] == 400
    assert (await get(exact, WEB, index="-1"))[0] == 400
    assert (await get(exact, "/v1/agent/self"))[0] == 404
    assert (await exact.serve("PUT", WEB, {}))[0] == 405
    assert [r.status for r in exact.requests()] == [500, 200, 400, 400, 404, 405]


async def test_double_stops_a_client_that_asks_without_letting_time_pass(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    # On virtual time a busy loop would stop the clock and spin until the
    # suite's timeout; the double fails it at once instead.
    for _ in range(1000):
        await get(exact, CATALOG)
    with pytest.raises(BusyLoopError, match="1001 requests at one instant"):
        await get(exact, CATALOG)
    await trio.sleep(0.001)
    assert (await get(exact, CATALOG))[0] == 200


async def test_the_http_front_serves_the_same_double(double: ConsulDouble) -> None:
    base = f"http://{double.address}"

    async def http_get(path: str, **params: str) -> requests.Response:
        def call() -> requests.Response:
            return requests.get(
                f"{base}{path}", params=params, headers={"X-Consul-Token": "t0k"}, timeout=30
            )

        return await trio.to_thread.run_sync(call)

    first = await http_get(CATALOG)
    assert first.status_code == 200 and first.json() == {"consul": []}
    assert first.headers["Content-Type"] == "application/json"
    index = int(first.headers["X-Consul-Index"])

    # A query held over HTTP is released by a registration.
    woken: list[requests.Response] = []

    async def ask() -> None:
        woken.append(await http_get(CATALOG, index=str(index), wait="30s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await until(lambda: in_flight(double, CATALOG, index), what="query held over HTTP")
        double.register("web", "web-1", port=80)
    assert int(woken[0].headers["X-Consul-Index"]) > index
    assert woken[0].json() == {"consul": [], "web": []}

    double.fail(requests=1)
    failed = await http_get(WEB)
    assert failed.status_code == 500 and "X-Consul-Index" not in failed.headers
    assert failed.text == "No cluster leader\n"
    assert (await http_get("/v1/agent/self")).status_code == 404
    put = await trio.to_thread.run_sync(lambda: requests.put(f"{base}{WEB}", timeout=30))
    assert put.status_code == 405
    assert [r.token for r in double.requests()][:4] == ["t0k"] * 4


async def test_check_updates_move_the_service_index_but_not_the_catalog_index(
    exact: ConsulDouble,
) -> None:
    exact.register("web", "web-1", port=80, checks={"http": "passing"})
    catalog = int((await get(exact, CATALOG))[1]["X-Consul-Index"])
    service = int((await get(exact, WEB))[1]["X-Consul-Index"])
    exact.set_check("http", "critical", service_id="web-1")
    assert int((await get(exact, CATALOG))[1]["X-Consul-Index"]) == catalog
    _, headers, entries = await get(exact, WEB)
    assert int(headers["X-Consul-Index"]) > service
    statuses = {c["CheckID"]: c["Status"] for c in entries[0]["Checks"]}
    assert statuses == {"serfHealth": "passing", "http": "critical"}


# ---------------------------------------------------------------- conversion


def test_an_entry_becomes_an_instance() -> None:
    entry: dict[str, Any] = {
        "Node": {"Node": "node-a", "Address": "10.0.0.1"},
        "Service": {
            "ID": "web-1",
            "Service": "web",
            "Tags": ["v1", "blue"],
            "Address": "",
            "Meta": {"version": "1.2"},
            "Port": 8080,
            "Weights": {"Passing": 10, "Warning": 3},
            "ModifyIndex": 40,
        },
        "Checks": [
            {"CheckID": "serfHealth", "Status": "passing", "ServiceID": "", "ModifyIndex": 12},
            {"CheckID": "http", "Status": "passing", "ServiceID": "web-1", "ModifyIndex": 41},
        ],
    }
    instance = instance_from_entry("c", "web", entry, 99)
    assert instance == Instance(
        "web",
        "node-a/web-1",
        "10.0.0.1",
        8080,
        weight=10,
        metadata={"version": "1.2", "consul.tags": "v1,blue"},
        health=Health.PASSING,
    )
    assert instance.source == Source("c", "node-a/web-1", 41)

    entry["Checks"][1]["Status"] = "warning"
    warned = instance_from_entry("c", "web", entry, 99)
    assert (warned.health, warned.weight) == (Health.PASSING, 3)
    entry["Checks"][0]["Status"] = "critical"
    assert instance_from_entry("c", "web", entry, 99).health is Health.FAILING
    entry["Checks"][0]["Status"] = "maintenance"  # not a state Consul reports: not trusted
    assert instance_from_entry("c", "web", entry, 99).health is Health.FAILING
    entry["Checks"] = []
    assert instance_from_entry("c", "web", entry, 99).health is Health.UNKNOWN


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({}, "missing required key 'address'"),
        ({"address": "127.0.0.1"}, "'address' must be 'host:port'"),
        ({"address": "127.0.0.1:0"}, "'address' must be 'host:port'"),
        ({"address": "::1:8500"}, "IPv6"),
        ({"address": "h:8500", "scheme": "ftp"}, "'scheme'"),
        ({"address": "h:8500", "services": []}, "'services'"),
        ({"address": "h:8500", "services": "web"}, "'services' must be list"),
        ({"address": "h:8500", "wait": 601}, "'wait'"),
        ({"address": "h:8500", "wait": 0}, "'wait'"),
        ({"address": "h:8500", "min_interval": -1}, "'min_interval'"),
        ({"address": "h:8500", "token": 5}, "'token' must be str"),
        ({"address": "h:8500", "datacenter": "dc1"}, r"\.datacenter: unknown key \(known here"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_key(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        ConsulUpstream.from_config("c", options)


def test_good_config() -> None:
    upstream = ConsulUpstream.from_config(
        "c", {"address": "[::1]:8501", "scheme": "https", "services": ["a", "b"], "wait": 10}
    )
    assert upstream.name == "c"
    assert (upstream.config.host, upstream.config.port) == ("[::1]", 8501)
    assert upstream.config.services == frozenset({"a", "b"})
    assert upstream.config.wait == 10.0


# ---------------------------------------------------------------- the adapter over HTTP


async def test_registrations_appear_with_their_fields_and_health(double: ConsulDouble) -> None:
    double.add_node("node-a", "10.0.0.1")
    double.register(
        "web",
        "web-1",
        port=8080,
        node="node-a",
        tags=["v1", "blue"],
        meta={"version": "1.2"},
        weights=(10, 3),
        checks={"web-1-http": "passing"},
    )
    double.register("web", "web-2", port=8081, address="10.0.0.9", node="node-a")
    double.add_node("external", "10.0.0.5", serf_health=None)  # no agent: no checks at all
    double.register("web", "web-3", port=9000, node="external")
    # Two agents each register "web" under Consul's default id, the service name.
    double.register("api", port=7000, node="node-a")
    double.register("api", port=7000, node="node-b")

    async with running(double, token="s3cret") as (_, events, fold):
        await fold.until(events, lambda f: len(f.instances("web")) == 3, message="web listed")
        await fold.until(events, lambda f: len(f.instances("api")) == 2, message="api listed")
        await fold.until(events, lambda f: "consul" in f.snapshot, message="consul listed")

    assert fold.instances("web") == {
        "node-a/web-1": Instance(
            "web",
            "node-a/web-1",
            "10.0.0.1",
            8080,
            weight=10,
            metadata={"version": "1.2", "consul.tags": "v1,blue"},
            health=Health.PASSING,
        ),
        "node-a/web-2": Instance(
            "web", "node-a/web-2", "10.0.0.9", 8081, weight=1, health=Health.PASSING
        ),
        "external/web-3": Instance(
            "web", "external/web-3", "10.0.0.5", 9000, weight=1, health=Health.UNKNOWN
        ),
    }
    assert set(fold.instances("api")) == {"node-a/api", "node-b/api"}
    web1 = fold.instances("web")["node-a/web-1"]
    assert web1.source is not None
    assert (web1.source.adapter, web1.source.key) == ("consul-test", "node-a/web-1")
    assert web1.source.revision > 1
    # The discovered catalog includes Consul's own service, as a real one does.
    assert set(fold.snapshot) == {"web", "api", "consul"}
    assert fold.statuses[0] == Status(True, f"consul {double.address}")
    assert {r.token for r in double.requests()} == {"s3cret"}


async def test_check_states_drive_health(double: ConsulDouble) -> None:
    double.register("web", "web-1", port=80, weights=(10, 2), checks={"http": "passing"})
    async with running(double) as (_, events, fold):

        def health(f: Fold) -> tuple[Health, int] | None:
            instance = f.instances("web").get("node-1/web-1")
            return None if instance is None else (instance.health, instance.weight)

        await fold.until(events, lambda f: health(f) == (Health.PASSING, 10))
        double.set_check("http", "warning", service_id="web-1")
        await fold.until(events, lambda f: health(f) == (Health.PASSING, 2), message="warning")
        double.set_check("http", "critical", service_id="web-1")
        await fold.until(events, lambda f: health(f) == (Health.FAILING, 10), message="critical")
        double.set_check("http", "passing", service_id="web-1")
        await fold.until(events, lambda f: health(f) == (Health.PASSING, 10), message="passing")
        # The node's own check counts for every instance on the node.
        double.set_check("serfHealth", "critical")
        await fold.until(events, lambda f: health(f) == (Health.FAILING, 10), message="node")

    updates = [d for d in fold.deltas if d.service == "web" and d.updated]
    assert [d.updated[0].health for d in updates] == [
        Health.PASSING,  # warning: routed to, at the warning weight
        Health.FAILING,
        Health.PASSING,
        Health.FAILING,
    ]
    assert not any(d.removed for d in fold.deltas)


async def test_deregistration_removes_and_a_vanished_service_stops_being_watched(
    double: ConsulDouble,
) -> None:
    double.register("web", "web-1", port=80)
    double.register("web", "web-2", port=81)
    async with running(double) as (_, events, fold):
        await fold.until(events, lambda f: ids(f, "web") == {"node-1/web-1", "node-1/web-2"})
        double.deregister("web-1")
        await fold.until(events, lambda f: ids(f, "web") == {"node-1/web-2"}, message="removed")
        assert [d.removed_ids for d in fold.deltas if d.removed] == [("node-1/web-1",)]

        double.deregister("web-2")
        await fold.until(events, lambda f: "web" not in f.snapshot, message="service gone")
        # The catalog loop stops the service's loop: once settled, catalog
        # changes cause no more queries for it.
        double.register("other", port=1)
        await fold.until(events, lambda f: "other" in f.snapshot)
        asked = len(double.requests(WEB))
        double.register("other2", port=2)
        await fold.until(events, lambda f: "other2" in f.snapshot)
        assert len(double.requests(WEB)) == asked

        # It comes back when the service does.
        double.register("web", "web-3", port=82)
        await fold.until(events, lambda f: ids(f, "web") == {"node-1/web-3"}, message="back")


async def test_an_unreachable_agent_is_reported_disconnected() -> None:
    with ConsulDouble() as gone:
        address = gone.address
    upstream = ConsulUpstream.from_config("c", {"address": address, "min_interval": 0.05})
    send, receive = trio.open_memory_channel[UpstreamEvent](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        with trio.fail_after(10):
            event = await receive.receive()
        nursery.cancel_scope.cancel()
    assert isinstance(event, Status) and not event.connected
    assert f"consul {address}: catalog/services" in event.detail


async def test_interest_narrows_and_widens_the_watched_services(double: ConsulDouble) -> None:
    for service in ("web", "api", "db"):
        double.register(service, port=80)
    async with running(double, interest=frozenset({"web"})) as (upstream, events, fold):
        await fold.until(events, lambda f: "web" in f.snapshot)
        await until(lambda: in_flight(double, WEB, double.requests(WEB)[0].index or -1))
        assert set(fold.snapshot) == {"web"}
        asked = {r.path for r in double.requests()}
        assert asked == {CATALOG, WEB}

        upstream.set_interest(frozenset({"web", "api"}))
        await fold.until(events, lambda f: "api" in f.snapshot, message="widened")
        assert set(fold.snapshot) == {"web", "api"}

        upstream.set_interest(frozenset({"api"}))
        web_queries = len(double.requests(WEB))
        double.register("web", "web-9", port=99)
        double.register("api", "api-2", port=81)
        await fold.until(events, lambda f: "node-1/api-2" in f.instances("api"))
        # The held web query returns (it was in flight), but no new one is made
        # and nothing about web is emitted.
        await until(lambda: all(r.status is not None for r in double.requests(WEB)))
        assert len(double.requests(WEB)) == web_queries
        assert ids(fold, "web") == {"node-1/web"}

        upstream.set_interest(None)
        await fold.until(
            events,
            lambda f: (
                set(f.snapshot) == {"web", "api", "db", "consul"}
                and "node-1/web-9" in f.instances("web")
            ),
            message="everything",
        )


# ---------------------------------------------------------------- the adapter on virtual time


def assert_idle_schedule(log: list[RequestRecord], min_interval: float) -> None:
    """``log`` is one idle loop's: a plain read, then the same held query renewed on expiry.

    Each blocking query waits past the index of the first read, is held for
    exactly the ``wait`` it sent (drawn from ``[wait * 15/16, wait]``), and the
    next one starts as soon as it returns, or ``min_interval`` after the
    previous start if that is later: nothing else is asked.
    """
    first, *blocking = log
    assert first.blocking_index is None and held_for(first) == 0
    for previous, record in zip(log, blocking, strict=False):
        assert record.blocking_index == first.index == record.index, record
        wait = parse_go_duration(record.params["wait"])
        assert DEFAULT_WAIT * 15 / 16 <= wait <= DEFAULT_WAIT, record
        assert held_for(record) == pytest.approx(wait, abs=1e-9), record
        assert previous.answered is not None
        start = max(previous.answered, previous.arrived + min_interval)
        assert record.arrived == pytest.approx(start, abs=1e-9), record


async def test_an_idle_loop_renews_one_held_query_per_wait_and_a_change_ends_it_at_once(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    exact.register("web", "web-1", port=80)
    async with running(exact, http=False) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        # Ten waits of idling, about ten virtual minutes: every loop (catalog,
        # web, consul) asks exactly a read and then one held query per wait.
        await until(
            lambda: all(len(answered(exact, path)) >= 11 for path in (CATALOG, WEB, CONSUL)),
            what="ten renewals per loop",
            timeout=12 * DEFAULT_WAIT,
            poll=1.0,
        )
        for path in (CATALOG, WEB, CONSUL):
            assert_idle_schedule(answered(exact, path), DEFAULT_MIN_INTERVAL)
        # The waits sent are drawn, not fixed, so that gateways started
        # together do not renew their queries in lockstep.
        assert len({r.params.get("wait") for r in exact.requests()}) > 10
        assert all(r.path in (CATALOG, WEB, CONSUL) for r in exact.requests())

        # A change answers the held query at the instant of the write; the next
        # query starts as soon as the rate limit allows and waits past the new
        # index.
        before = exact.index
        registered_at = trio.current_time()
        exact.register("web", "web-2", port=81)
        await fold.until(events, lambda f: "node-1/web-2" in f.instances("web"))
        assert trio.current_time() == registered_at
        woken = answered(exact, WEB)[-1]
        assert (woken.answered, woken.index) == (registered_at, before + 1)
        await until(lambda: in_flight(exact, WEB, before + 1), what="re-armed", timeout=1.0)
        rearmed = max(registered_at, woken.arrived + DEFAULT_MIN_INTERVAL)
        assert exact.requests(WEB)[-1].arrived == pytest.approx(rearmed, abs=1e-9)


async def test_an_index_that_goes_backwards_resets_the_loop_without_losing_state(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    for n in range(10):  # push the index well above where the restore puts it
        exact.register("filler", f"filler-{n}", port=1000 + n)
    exact.register("web", "web-1", port=80)
    # The longest wait: a client that kept blocking on the old index would
    # hear nothing for 10 minutes.
    async with running(exact, http=False, wait=600.0) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        high = answered(exact, WEB)[-1].index
        assert high is not None and high > 5
        await until(lambda: in_flight(exact, WEB, high), what="blocking on the high index")

        restored_at = trio.current_time()
        exact.reset_index(to=2)  # a snapshot restore: every index goes back to 2
        await until(
            lambda: in_flight(exact, WEB, 2), what="blocking on the new, lower index", timeout=5
        )
        log = exact.requests(WEB)
        after = log[next(i for i, r in enumerate(log) if r.blocking_index == high) :]
        assert len(after) == 3, after
        # Answered at once with the lower index, the adapter re-lists (index 0:
        # a plain read) as soon as its rate limit allows...
        assert (after[0].answered, after[0].index) == (restored_at, 2)
        relist = max(restored_at, after[0].arrived + DEFAULT_MIN_INTERVAL)
        assert after[1].blocking_index is None
        assert after[1].arrived == pytest.approx(relist, abs=1e-9)
        # ...then blocks past the index that read returned.
        assert after[2].blocking_index == 2

        registered_at = trio.current_time()
        exact.register("web", "web-2", port=81)  # index 3, below the old one
        await fold.until(events, lambda f: "node-1/web-2" in f.instances("web"))
        assert trio.current_time() == registered_at  # not after the 600 s wait
        exact.deregister("web-1")
        await fold.until(events, lambda f: ids(f, "web") == {"node-1/web-2"})

    removed = [d.removed_ids for d in fold.deltas if d.removed]
    assert removed == [("node-1/web-1",)]  # only the real deregistration


async def test_an_agent_answering_index_zero_at_once_costs_one_request_per_min_interval(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    exact.register("web", "web-1", port=80)
    async with running(exact, http=False, services=["web"]) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        await until(lambda: held(exact, WEB), what="a blocking query held")
        since = trio.current_time()
        exact.answer_zero_index()

        def burst() -> list[RequestRecord]:
            return [r for r in exact.requests(WEB) if r.arrived >= since]

        # A minute of an agent that answers every query at once with index 0.
        await until(lambda: len(burst()) > 60, what="a minute of requests", timeout=120, poll=1)
    starts = [r.arrived for r in burst()][:61]
    # One call per min_interval, exactly: the rate limit is all that stands
    # between the loop and a busy one.
    assert [b - a for a, b in itertools.pairwise(starts)] == pytest.approx(
        [DEFAULT_MIN_INTERVAL] * 60, abs=1e-6
    )
    # Never index 0 on the wire for a blocking query (py-consul, and the
    # in-process fetch like it, send no index for a plain read): 1 instead.
    assert {r.blocking_index for r in burst()} == {None, 1}
    assert not exact.requests(CATALOG)  # a fixed list of services needs no catalog


def assert_backoff(failures: list[RequestRecord]) -> None:
    """Each retry after a failure waits, at most the backoff's next ceiling, and re-lists."""
    for attempt, (failed, retry) in enumerate(itertools.pairwise(failures)):
        assert failed.answered is not None
        ceiling = Backoff(BACKOFF.initial, BACKOFF.maximum, attempt=attempt).ceiling()
        # On virtual time a loop that did not wait would retry at the very
        # instant of the failure; a full-jitter delay is never exactly 0.
        assert 0 < retry.arrived - failed.answered <= ceiling + 1e-9, (failed, retry)
        assert retry.blocking_index is None  # after an error, a plain read


async def test_server_errors_back_off_mark_stale_and_recovery_relists(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    exact.register("web", "web-1", port=80)
    # No rate limit, so that what spaces the retries is the backoff alone.
    async with running(exact, http=False, min_interval=0.0) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        await fold.until(events, lambda f: f.statuses == [Status(True, f"consul {IN_PROCESS}")])

        failed_at = trio.current_time()
        exact.fail()
        await fold.until(events, lambda f: f.stale, message="stale")
        down = fold.statuses[-1]
        assert not down.connected and "500" in down.detail and IN_PROCESS in down.detail
        exact.register("web", "web-2", port=81)  # changes while the agent errors
        exact.deregister("web-1")

        def failures(path: str) -> list[RequestRecord]:
            return [r for r in exact.requests(path) if r.status == 500]

        # Eight failures per loop: the ceilings double from 0.1 s to 10 s.
        await until(
            lambda: all(len(failures(p)) >= 8 for p in (CATALOG, WEB, CONSUL)),
            what="eight failures per loop",
            timeout=60,
            poll=0.1,
        )
        for path in (CATALOG, WEB, CONSUL):
            # The query held when the leader was lost fails at once, as Consul's do.
            assert failures(path)[0].answered == failed_at
            assert_backoff(failures(path)[:8])
        assert "node-1/web-1" in fold.instances("web")  # the last state stays served

        recovered_at = trio.current_time()
        exact.recover()
        await fold.until(events, lambda f: not f.stale, message="recovered", timeout=60)
        # Back within the longest backoff, and the re-list happened before the
        # upstream was reported back.
        assert trio.current_time() - recovered_at <= BACKOFF.maximum
        assert ids(fold, "web") == {"node-1/web-2"}
    assert [s.connected for s in fold.statuses] == [True, False, True]


async def test_after_an_outage_that_lost_the_index_the_loop_relists_at_once(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    # An agent restarted with less state answers errors, then lower indexes: a
    # loop that came back blocking on its old index would hear nothing until
    # the 600 s wait ran out.
    for n in range(10):
        exact.register("filler", f"filler-{n}", port=1000 + n)
    exact.register("web", "web-1", port=80)
    async with running(exact, http=False, wait=600.0) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        exact.fail()
        await until(lambda: failed_everywhere(exact), what="every loop saw the outage")
        exact.reset_index(to=2)
        exact.register("web", "web-2", port=81)
        recovered_at = trio.current_time()
        exact.recover()
        await fold.until(events, lambda f: "node-1/web-2" in f.instances("web"), timeout=60)
        assert trio.current_time() - recovered_at <= BACKOFF.maximum
        log = exact.requests(WEB)
        last_error = max(i for i, r in enumerate(log) if r.status == 500)
        # The first call after the outage is a plain read, not a blocking one.
        assert log[last_error + 1].blocking_index is None


async def test_a_fixed_service_list_needs_no_catalog(
    autojump_clock: trio.testing.MockClock, exact: ConsulDouble
) -> None:
    exact.register("web", "web-1", port=80)
    exact.register("api", port=81)
    nothing: frozenset[str] = frozenset()
    async with running(exact, nothing, http=False, services=["web", "missing", "api"]) as (
        upstream,
        events,
        fold,
    ):
        # Interested in none of them for an hour; every timer due in that hour
        # has fired once the tasks are all blocked again.
        autojump_clock.jump(3600)
        await trio.testing.wait_all_tasks_blocked()
        interested_at = trio.current_time()
        upstream.set_interest(frozenset({"web", "missing", "db"}))
        await fold.until(
            events,
            lambda f: sum(isinstance(e, Listing) for e in f.events) >= 2,
            message="both listed",
        )
    # The upstream stayed up without a query until there was interest, then
    # read each service of the list that is wanted, at once.
    first = sorted(exact.requests(), key=lambda r: r.arrived)[:2]
    assert {(r.path, r.arrived) for r in first} == {
        (WEB, interested_at),
        ("/v1/health/service/missing", interested_at),
    }
    assert interested_at >= 3600
    listings = {e.services: e.instances for e in fold.events if isinstance(e, Listing)}
    assert listings[frozenset({"missing"})] == ()
    assert set(fold.snapshot) == {"web"}
    assert all(r.path in (WEB, "/v1/health/service/missing") for r in exact.requests())
