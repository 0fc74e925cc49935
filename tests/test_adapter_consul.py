"""The Consul adapter against the Consul double (tests/consul_double.py).

Consul cannot be installed on the machines that run this suite, so these
tests talk HTTP to an in-process double of Consul's documented API, blocking
queries and ``X-Consul-Index`` included; real Consul is covered by the
compose files under docker/. The double's own blocking semantics are checked
first, so that the adapter tests stand on something verified.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import requests
import trio

from adapters.consul import ConsulUpstream, instance_from_entry
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.upstream import ConfigError, Listing, Status, UpstreamEvent
from tests.consul_double import ConsulDouble, parse_go_duration
from tests.upstream_fold import Fold
from tests.waiting import until

WEB = "/v1/health/service/web"
CATALOG = "/v1/catalog/services"
CONSUL = "/v1/health/service/consul"


@pytest.fixture
def double() -> Iterator[ConsulDouble]:
    with ConsulDouble() as consul_double:
        yield consul_double


@asynccontextmanager
async def running(
    double: ConsulDouble,
    interest: frozenset[str] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[ConsulUpstream, trio.MemoryReceiveChannel[UpstreamEvent], Fold]]:
    """Run a ConsulUpstream against ``double`` for the body of the ``async with``."""
    config = {"address": double.address, "wait": 5.0, "min_interval": 0.05, **options}
    upstream = ConsulUpstream.from_config("consul-test", config)
    if interest is not None:
        upstream.set_interest(interest)
    send, receive = trio.open_memory_channel[UpstreamEvent](256)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        try:
            yield upstream, receive, Fold()
        finally:
            nursery.cancel_scope.cancel()


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


def test_double_holds_blocking_queries_until_a_change_or_the_wait(double: ConsulDouble) -> None:
    base = f"http://{double.address}"
    first = requests.get(f"{base}{CATALOG}", timeout=5)
    assert first.status_code == 200
    assert first.json() == {"consul": []}
    index = int(first.headers["X-Consul-Index"])
    assert index >= 1

    # Nothing changes: held for the wait (plus at most wait/16), then the same index.
    started = time.monotonic()
    same = requests.get(f"{base}{CATALOG}", params={"index": index, "wait": "300ms"}, timeout=5)
    held = time.monotonic() - started
    assert 0.29 <= held < 2.0
    assert int(same.headers["X-Consul-Index"]) == index

    # A registration releases a held query at once, with a higher index.
    def register_soon() -> None:
        deadline = time.monotonic() + 5
        while not in_flight(double, CATALOG, index) and time.monotonic() < deadline:
            time.sleep(0.005)
        double.register("web", "web-1", port=80)

    thread = threading.Thread(target=register_soon)
    thread.start()
    started = time.monotonic()
    woken = requests.get(f"{base}{CATALOG}", params={"index": index, "wait": "30s"}, timeout=40)
    thread.join()
    assert time.monotonic() - started < 5
    assert int(woken.headers["X-Consul-Index"]) > index
    assert woken.json() == {"consul": [], "web": []}

    # Errors carry no index, as Consul's do.
    double.fail(requests=1)
    failed = requests.get(f"{base}{WEB}", timeout=5)
    assert failed.status_code == 500 and "X-Consul-Index" not in failed.headers
    assert requests.get(f"{base}{WEB}", timeout=5).status_code == 200
    bad = requests.get(f"{base}{WEB}", params={"index": 1, "wait": "soon"}, timeout=5)
    assert bad.status_code == 400


def test_check_updates_move_the_service_index_but_not_the_catalog_index(
    double: ConsulDouble,
) -> None:
    double.register("web", "web-1", port=80, checks={"http": "passing"})
    base = f"http://{double.address}"
    catalog = int(requests.get(f"{base}{CATALOG}", timeout=5).headers["X-Consul-Index"])
    service = int(requests.get(f"{base}{WEB}", timeout=5).headers["X-Consul-Index"])
    double.set_check("http", "critical", service_id="web-1")
    assert int(requests.get(f"{base}{CATALOG}", timeout=5).headers["X-Consul-Index"]) == catalog
    after = requests.get(f"{base}{WEB}", timeout=5)
    assert int(after.headers["X-Consul-Index"]) > service
    statuses = {c["CheckID"]: c["Status"] for c in after.json()[0]["Checks"]}
    assert statuses == {"serfHealth": "passing", "http": "critical"}


# ---------------------------------------------------------------- conversion


def test_an_entry_becomes_an_instance() -> None:
    entry = {
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


# ---------------------------------------------------------------- the adapter


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


async def test_blocking_queries_carry_the_index_and_idle_costs_no_requests(
    double: ConsulDouble,
) -> None:
    double.register("web", "web-1", port=80)
    async with running(double, wait=5.0) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        await until(lambda: len(double.requests(WEB)) >= 2, what="second query")
        first, second = double.requests(WEB)[:2]
        assert first.blocking_index is None  # the first read lists
        assert first.index is not None and second.blocking_index == first.index
        # The wait sent is jittered down by at most 1/16 of the configured one.
        assert 5.0 * 15 / 16 <= parse_go_duration(second.params["wait"]) <= 5.0

        # Idle: every loop sits in one held query; a second without changes costs nothing.
        await until(lambda: all(held(double, path) for path in (CATALOG, WEB, CONSUL)))
        before = len(double.requests())
        await trio.sleep(1.0)  # the measurement window, not a synchronisation
        idle_requests = len(double.requests()) - before
        assert idle_requests == 0, double.requests()[before:]

        # A change releases the held query; the next one waits past the new index.
        double.register("web", "web-2", port=81)
        await fold.until(events, lambda f: "node-1/web-2" in f.instances("web"))
        answered = [r for r in double.requests(WEB) if r.index is not None][-1]
        await until(lambda: in_flight(double, WEB, answered.index or -1), what="re-armed")
    assert len(double.requests(WEB)) <= 4


async def test_an_index_that_goes_backwards_resets_the_loop_without_losing_state(
    double: ConsulDouble,
) -> None:
    for n in range(10):  # push the index well above where the restore puts it
        double.register("filler", f"filler-{n}", port=1000 + n)
    double.register("web", "web-1", port=80)
    # A long wait: a client that kept blocking on the old index would hang for it.
    async with running(double, wait=60.0) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        high = [r for r in double.requests(WEB) if r.index is not None][-1].index
        assert high is not None and high > 5
        await until(lambda: in_flight(double, WEB, high), what="blocking on the high index")

        double.reset_index(to=2)  # a snapshot restore: every index goes back to 2
        await until(
            lambda: any(r.blocking_index == 2 for r in double.requests(WEB)),
            what="blocking on the new, lower index",
        )
        log = double.requests(WEB)
        held = next(i for i, r in enumerate(log) if r.blocking_index == high)
        after = log[held:]
        assert len(after) == 3, after
        # Answered with the lower index, the adapter re-lists (index 0: a plain read)...
        assert after[0].blocking_index == high and after[0].index == 2
        assert after[1].blocking_index is None
        # ...then blocks past the index that read returned.
        assert after[2].blocking_index == 2

        double.register("web", "web-2", port=81)  # index 3, below the old one
        with trio.fail_after(5):  # well under the 60 s wait
            await fold.until(events, lambda f: "node-1/web-2" in f.instances("web"))
        double.deregister("web-1")
        await fold.until(events, lambda f: ids(f, "web") == {"node-1/web-2"})

    removed = [d.removed_ids for d in fold.deltas if d.removed]
    assert removed == [("node-1/web-1",)]  # only the real deregistration


async def test_an_agent_answering_index_zero_at_once_does_not_cause_a_busy_loop(
    double: ConsulDouble,
) -> None:
    double.register("web", "web-1", port=80)
    async with running(double, services=["web"], min_interval=0.2) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        double.answer_zero_index()
        await until(lambda: double.requests(WEB)[-1].blocking_index == 1, what="index 1")
        before = len(double.requests(WEB))
        await trio.sleep(1.0)  # the measurement window, not a synchronisation
        burst = double.requests(WEB)[before:]
    # Never index 0 on the wire for a blocking query (py-consul drops index=0:
    # those are plain reads); at most one call per min_interval.
    assert all(r.blocking_index in (None, 1) for r in burst)
    assert 2 <= len(burst) <= 1.0 / 0.2 + 1, len(burst)
    assert not double.requests(CATALOG)  # a fixed list of services needs no catalog


async def test_server_errors_mark_stale_and_recovery_relists(double: ConsulDouble) -> None:
    double.register("web", "web-1", port=80)
    async with running(double) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        await fold.until(events, lambda f: f.statuses == [Status(True, f"consul {double.address}")])

        double.fail()
        await fold.until(events, lambda f: f.stale, message="stale")
        await until(lambda: failed_everywhere(double), what="every loop saw the outage")
        down = fold.statuses[-1]
        assert not down.connected and "500" in down.detail and double.address in down.detail
        double.register("web", "web-2", port=81)  # changes while the agent errors
        double.deregister("web-1")
        assert "node-1/web-1" in fold.instances("web")  # the last state stays served

        double.recover()
        await fold.until(events, lambda f: not f.stale, message="recovered")
        # The re-list happened before the upstream was reported back.
        assert ids(fold, "web") == {"node-1/web-2"}
    assert [s.connected for s in fold.statuses] == [True, False, True]


async def test_after_an_outage_that_lost_the_index_the_loop_relists_at_once(
    double: ConsulDouble,
) -> None:
    # An agent restarted with less state answers errors, then lower indexes: a
    # loop that came back blocking on its old index would hear nothing until
    # the 60 s wait ran out.
    for n in range(10):
        double.register("filler", f"filler-{n}", port=1000 + n)
    double.register("web", "web-1", port=80)
    async with running(double, wait=60.0) as (_, events, fold):
        await fold.until(events, lambda f: "node-1/web-1" in f.instances("web"))
        double.fail()
        await until(lambda: failed_everywhere(double), what="every loop saw the outage")
        double.reset_index(to=2)
        double.register("web", "web-2", port=81)
        double.recover()
        with trio.fail_after(5):
            await fold.until(events, lambda f: "node-1/web-2" in f.instances("web"))
        log = double.requests(WEB)
        last_error = max(i for i, r in enumerate(log) if r.status == 500)
        # The first call after the outage is a plain read, not a blocking one.
        assert log[last_error + 1].blocking_index is None


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


async def test_a_fixed_service_list_needs_no_catalog(double: ConsulDouble) -> None:
    double.register("web", "web-1", port=80)
    double.register("api", port=81)
    nothing: frozenset[str] = frozenset()
    async with running(double, nothing, services=["web", "missing", "api"]) as (
        upstream,
        events,
        fold,
    ):
        # Interested in none of them: no queries at all, but the upstream stays up.
        await trio.sleep(0.2)  # a measurement window: nothing may be asked
        assert double.requests() == []
        upstream.set_interest(frozenset({"web", "missing", "db"}))
        await fold.until(
            events,
            lambda f: sum(isinstance(e, Listing) for e in f.events) >= 2,
            message="both listed",
        )
    listings = {e.services: e.instances for e in fold.events if isinstance(e, Listing)}
    assert listings[frozenset({"missing"})] == ()
    assert set(fold.snapshot) == {"web"}
    assert not double.requests(CATALOG)
    assert all(r.path in (WEB, "/v1/health/service/missing") for r in double.requests())
