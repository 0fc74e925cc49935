"""EtcdUpstream against real etcd 3.4: listing, watching, leases, interest, outages.

Writes go through both ``etcdctl`` (what an operator or a registration script
uses) and python-etcd3. Events are folded into a snapshot the way the fan-in
does (tests/upstream_fold.py), so the assertions are about what consumers
would see: which instances, and exactly which deltas. Tests on the shared
etcd work under their own key prefix; tests that kill, restart or compact
etcd get a server of their own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import etcd3
import pytest
import trio

import adapters.etcd
from adapters.etcd import LEASE_KEY, EtcdUpstream, PrefixSpec
from dispatcher.core.model import Instance
from dispatcher.core.snapshot import Delta
from dispatcher.core.upstream import ConfigError, Listing, Status, UpstreamEvent
from tests.servers import EtcdServer, ServerFactory, free_port
from tests.upstream_fold import Fold
from tests.waiting import until

ADAPTER = "etcd-test"


# ----------------------------------------------------------------------- helpers


def grpc_value(addr: str, metadata: object = None, op: int = 0) -> str:
    """A value as etcd's naming package writes it."""
    return json.dumps({"Op": op, "Addr": addr, "Metadata": metadata})


async def etcdctl(server: EtcdServer, *args: str) -> str:
    result = await trio.run_process(
        ["etcdctl", f"--endpoints={server.endpoint}", *args],
        capture_stdout=True,
        capture_stderr=True,
        env={**os.environ, "ETCDCTL_API": "3"},
    )
    return result.stdout.decode()


@contextlib.contextmanager
def client_for(server: EtcdServer) -> Iterator[etcd3.Etcd3Client]:
    client = etcd3.client(server.host, server.port, timeout=10)
    try:
        yield client
    finally:
        client.close()


def upstream_for(server: EtcdServer, *prefixes: str | PrefixSpec) -> EtcdUpstream:
    specs = [p if isinstance(p, PrefixSpec) else PrefixSpec(p) for p in prefixes]
    return EtcdUpstream.from_config(
        ADAPTER,
        {
            "endpoint": server.endpoint,
            "prefixes": [{"prefix": s.prefix, "layout": s.layout} for s in specs],
            "max_backoff": 0.5,
        },
    )


@contextlib.asynccontextmanager
async def running(
    upstream: EtcdUpstream, buffer: int = 100
) -> AsyncIterator[tuple[Fold, trio.MemoryReceiveChannel[UpstreamEvent]]]:
    """Run ``upstream`` until the block ends; yield a fold and its event channel."""
    send, receive = trio.open_memory_channel[UpstreamEvent](buffer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        yield Fold(), receive
        nursery.cancel_scope.cancel()


def ids(fold: Fold, service: str) -> set[str]:
    return set(fold.instances(service))


def connected(fold: Fold) -> bool:
    return bool(fold.statuses) and fold.statuses[-1].connected


def listings(fold: Fold, since: int = 0) -> list[frozenset[str] | None]:
    """The ``services`` of every Listing folded since event number ``since``."""
    return [e.services for e in fold.events[since:] if isinstance(e, Listing)]


def summary(deltas: list[Delta]) -> list[tuple[str, str, str]]:
    """Every instance change in ``deltas`` as (service, change, id), sorted."""
    return sorted(
        (delta.service, change, instance.instance_id)
        for delta in deltas
        for change, group in (
            ("added", delta.added),
            ("updated", delta.updated),
            ("removed", delta.removed),
        )
        for instance in group
    )


def warnings_about(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    """The reasons of the warnings logged about etcd key ``key`` (its ``key=`` field)."""
    return [
        vars(record)["reason"]
        for record in caplog.records
        if record.name == "adapters.etcd"
        and record.levelno == logging.WARNING
        and vars(record).get("key") == key
    ]


# ------------------------------------------------------------------------ config


def test_client_library_imports_without_any_environment_variable() -> None:
    """etcd3-fc imports on protobuf's default backend; no PROTOCOL_BUFFERS_* setting needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOCOL_BUFFERS_")}
    probe = (
        "import etcd3; from google.protobuf.internal import api_implementation as a; "
        "print(a.Type())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() != "python"  # the slow pure-Python fallback


def test_from_config_reads_every_key() -> None:
    upstream = EtcdUpstream.from_config(
        "reg",
        {
            "endpoint": "[::1]:2379",
            "prefixes": [{"prefix": "/services/", "layout": "grpc"}, {"prefix": "/plain/"}],
            "timeout": 2,
            "max_backoff": 3.5,
        },
    )
    assert (upstream.name, upstream.host, upstream.port) == ("reg", "[::1]", 2379)
    assert upstream.prefixes == (PrefixSpec("/services/", "grpc"), PrefixSpec("/plain/", "grpc"))
    assert (upstream.timeout, upstream.max_backoff) == (2.0, 3.5)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"prefixes": [{"prefix": "/s/"}]}, "'endpoint'"),
        ({"endpoint": "localhost", "prefixes": [{"prefix": "/s/"}]}, "'endpoint'"),
        ({"endpoint": "::1:2379", "prefixes": [{"prefix": "/s/"}]}, "'endpoint'"),
        ({"endpoint": "h:99999", "prefixes": [{"prefix": "/s/"}]}, "'endpoint'"),
        ({"endpoint": "h:1"}, "'prefixes'"),
        ({"endpoint": "h:1", "prefixes": []}, "'prefixes'"),
        ({"endpoint": "h:1", "prefixes": ["/s/"]}, "prefixes[0]"),
        ({"endpoint": "h:1", "prefixes": [{"layout": "grpc"}]}, "'prefix'"),
        ({"endpoint": "h:1", "prefixes": [{"prefix": ""}]}, "'prefix'"),
        ({"endpoint": "h:1", "prefixes": [{"prefix": "/s/", "layout": "dubbo"}]}, "'layout'"),
        ({"endpoint": "h:1", "prefixes": [{"prefix": "/s/", "root": "x"}]}, ".root: unknown key"),
        (
            {"endpoint": "h:1", "prefixes": [{"prefix": "/s/"}, {"prefix": "/s/a/"}]},
            "prefixes[1]",
        ),
        ({"endpoint": "h:1", "prefixes": [{"prefix": "/s/"}], "timeout": 0}, "'timeout'"),
        ({"endpoint": "h:1", "prefixes": [{"prefix": "/s/"}], "timeout": "5"}, "'timeout'"),
        ({"endpoint": "h:1", "prefixes": [{"prefix": "/s/"}], "retries": 3}, ".retries: unknown"),
    ],
)
def test_from_config_errors_name_the_key(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        EtcdUpstream.from_config("reg", options)


# ------------------------------------------------------------ listing and watching


async def test_grpc_registrations_are_listed_then_followed(
    etcd: EtcdServer, unique_path: str
) -> None:
    prefix = f"{unique_path}/services/"
    target = "foo/bar/greeter"
    first = f"{prefix}{target}/10.0.0.1:50051"
    await etcdctl(
        etcd, "put", first, grpc_value("10.0.0.1:50051", {"version": "1.2", "shard": 3, "t": [1]})
    )
    with client_for(etcd) as client:
        first_revision = client.get(first)[1].mod_revision
        async with running(upstream_for(etcd, prefix)) as (fold, events):
            await fold.until(events, connected, message="connected")
            # The complete state first, then "connected": never fresh-but-empty.
            assert isinstance(fold.events[0], Listing) and fold.events[0].services is None
            assert fold.events[1] == Status(True, fold.events[1].detail)
            instance = fold.instances(target)["10.0.0.1:50051"]
            assert instance == Instance(
                target,
                "10.0.0.1:50051",
                "10.0.0.1",
                50051,
                protocol="grpc",
                metadata={"version": "1.2", "shard": "3", "t": "[1]"},
            )
            assert instance.source is not None
            assert (instance.source.adapter, instance.source.key) == (ADAPTER, first)
            assert instance.source.revision == first_revision

            # python-etcd3 write, IPv6 address, an id that is not the address.
            client.put(f"{prefix}{target}/e2", grpc_value("[::1]:9000"))
            await fold.until(events, lambda f: "e2" in ids(f, target), message="e2 put")
            assert fold.instances(target)["e2"].endpoint == ("::1", 9000)

            # An Op 1 (Delete) value takes the endpoint away; so does deleting the key.
            await etcdctl(etcd, "put", first, grpc_value("10.0.0.1:50051", op=1))
            await fold.until(events, lambda f: ids(f, target) == {"e2"}, message="Op=1 removal")
            await etcdctl(etcd, "del", f"{prefix}{target}/e2")
            await fold.until(events, lambda f: target not in f.snapshot, message="delete")
            assert summary(fold.deltas) == sorted(
                [
                    (target, "added", "10.0.0.1:50051"),
                    (target, "added", "e2"),
                    (target, "removed", "10.0.0.1:50051"),
                    (target, "removed", "e2"),
                ]
            )


async def test_lease_expiry_removes_the_instance(etcd: EtcdServer, unique_path: str) -> None:
    prefix = f"{unique_path}/"
    async with running(upstream_for(etcd, prefix)) as (fold, events):
        await fold.until(events, connected, message="connected")
        granted = await etcdctl(etcd, "lease", "grant", "1")
        lease = re.search(r"lease ([0-9a-f]+) granted", granted)
        assert lease, granted
        key = f"{prefix}pay/10.0.0.7:7000"
        await etcdctl(etcd, "put", f"--lease={lease[1]}", key, grpc_value("10.0.0.7:7000"))
        await fold.until(events, lambda f: "pay" in f.snapshot, message="leased put")
        assert fold.instances("pay")["10.0.0.7:7000"].metadata[LEASE_KEY] == lease[1]
        # Nobody keeps the lease alive: etcd expires it and deletes the key.
        await fold.until(events, lambda f: "pay" not in f.snapshot, message="expiry")
        assert summary(fold.deltas) == [
            ("pay", "added", "10.0.0.7:7000"),
            ("pay", "removed", "10.0.0.7:7000"),
        ]


async def test_garbage_is_skipped_with_one_log_line(
    etcd: EtcdServer, unique_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.etcd")
    prefix = f"{unique_path}/"
    with client_for(etcd) as client:
        async with running(upstream_for(etcd, prefix)) as (fold, events):
            await fold.until(events, connected, message="connected")
            client.put(f"{prefix}svc/1", grpc_value("10.0.0.1:1"))
            garbage = f"{prefix}svc/2"
            client.put(garbage, "{not json")
            # A later write on the same watch: once it shows, the garbage was read.
            client.put(f"{prefix}svc/3", grpc_value("10.0.0.3:3"))
            await fold.until(events, lambda f: "3" in ids(f, "svc"), message="marker")
            assert ids(fold, "svc") == {"1", "3"}
            assert len(warnings_about(caplog, garbage)) == 1

            # A key that held an instance and now holds garbage no longer
            # describes one: removed, as a re-list would find it.
            client.put(f"{prefix}svc/1", grpc_value("no-port-here"))
            await fold.until(events, lambda f: ids(f, "svc") == {"3"}, message="overwrite")
            assert len(warnings_about(caplog, f"{prefix}svc/1")) == 1


async def test_plain_layout(etcd: EtcdServer, unique_path: str) -> None:
    prefix = f"{unique_path}/"
    record = {"host": "10.1.1.1", "port": 8080, "weight": 50, "zone": "az1", "metadata": {"v": 2}}
    with client_for(etcd) as client:
        client.put(f"{prefix}orders/i-1", json.dumps(record))
        client.put(f"{prefix}orders/x/y", json.dumps(record))  # not <service>/<id>: ignored
        async with running(upstream_for(etcd, PrefixSpec(prefix, "plain"))) as (fold, events):
            await fold.until(events, connected, message="connected")
            assert ids(fold, "orders") == {"i-1"}
            assert fold.instances("orders")["i-1"] == Instance(
                "orders", "i-1", "10.1.1.1", 8080, weight=50, zone="az1", metadata={"v": "2"}
            )
            lease = client.lease(60)
            client.put(f"{prefix}orders/i-2", json.dumps({"host": "h2", "port": 1}), lease=lease)
            await fold.until(events, lambda f: "i-2" in ids(f, "orders"), message="leased put")
            assert fold.instances("orders")["i-2"].metadata == {LEASE_KEY: format(lease.id, "016x")}
            lease.revoke()
            client.delete(f"{prefix}orders/i-1")
            await fold.until(events, lambda f: "orders" not in f.snapshot, message="removals")


# ---------------------------------------------------------------------- interest


async def test_interest_narrows_and_widens(etcd: EtcdServer, unique_path: str) -> None:
    prefix = f"{unique_path}/"
    with client_for(etcd) as client:

        def put(name: str) -> None:
            client.put(f"{prefix}{name}", grpc_value("10.0.0.1:80", {"n": name}))

        for name in ("a/1", "b/1", "a/b/1"):
            put(name)
        upstream = upstream_for(etcd, prefix)
        upstream.set_interest(frozenset({"a"}))
        async with running(upstream) as (fold, events):
            await fold.until(events, connected, message="connected")
            assert fold.events[0] == Listing(fold.events[0].instances, frozenset({"a"}))
            assert set(fold.snapshot) == {"a"}
            put("b/2")
            put("a/2")
            await fold.until(events, lambda f: "2" in ids(f, "a"), message="a/2")
            assert "b" not in fold.snapshot

            # Widening lists just the new services, then follows them.
            mark = len(fold.events)
            upstream.set_interest(frozenset({"a", "b", "a/b"}))
            await fold.until(
                events,
                lambda f: ids(f, "b") == {"1", "2"} and ids(f, "a/b") == {"1"},
                message="widened",
            )
            assert listings(fold, mark) == [frozenset({"b", "a/b"})]
            before = len(fold.deltas)
            put("a/b/3")  # under the watch of "a/" too, but not a's key
            await fold.until(events, lambda f: "3" in ids(f, "a/b"), message="a/b/3")
            put("b/3")
            await fold.until(events, lambda f: "3" in ids(f, "b"), message="b/3")
            assert summary(fold.deltas[before:]) == [("a/b", "added", "3"), ("b", "added", "3")]

            # Narrowing drops watches: a's changes no longer arrive.
            upstream.set_interest(frozenset({"b"}))
            put("a/3")
            put("b/4")
            await fold.until(events, lambda f: "4" in ids(f, "b"), message="b/4")
            assert ids(fold, "a") == {"1", "2"}

            # Everything: one listing of all services catches up on a/3.
            mark = len(fold.events)
            upstream.set_interest(None)
            await fold.until(events, lambda f: "3" in ids(f, "a"), message="all")
            assert listings(fold, mark) == [None]

            # From everything to a set: the service's watch resumes where the
            # prefix watch was, with no listing and no gap.
            mark = len(fold.events)
            upstream.set_interest(frozenset({"a"}))
            put("b/5")
            put("a/4")
            await fold.until(events, lambda f: "4" in ids(f, "a"), message="a/4")
            assert "5" not in ids(fold, "b")
            assert listings(fold, mark) == []


# ----------------------------------------------------------------------- outages


async def test_sigkill_keeps_the_snapshot_then_follows_again(
    etcd_factory: ServerFactory[EtcdServer],
) -> None:
    server = etcd_factory()
    with client_for(server) as client:
        for name in ("a/1", "a/2", "b/1"):
            client.put(f"/svc/{name}", grpc_value("10.0.0.1:80"))
    async with running(upstream_for(server, "/svc/")) as (fold, events):
        await fold.until(events, connected, message="connected")
        held = fold.snapshot

        await trio.to_thread.run_sync(server.kill)
        await fold.until(events, lambda f: f.stale, message="Status(False)")
        assert fold.statuses[-1].connected is False
        assert fold.statuses[-1].detail
        assert fold.snapshot is held  # still served, unchanged, only marked stale

        await trio.to_thread.run_sync(server.start)  # same port, same data
        await fold.until(events, connected, timeout=20, message="reconnected")
        assert fold.snapshot is held  # the re-list found nothing new: no delta at all
        assert [s.connected for s in fold.statuses] == [True, False, True]

        with client_for(server) as client:
            client.put("/svc/a/3", grpc_value("10.0.0.3:80"))
            client.delete("/svc/a/1")
            client.put("/svc/b/1", grpc_value("10.0.0.9:80"))
        await fold.until(
            events,
            lambda f: ids(f, "a") == {"2", "3"} and f.instances("b")["1"].host == "10.0.0.9",
            message="changes after restart",
        )
        fold.drain(events)
        assert summary([d for d in fold.deltas if d.to_version > held.version]) == [
            ("a", "added", "3"),
            ("a", "removed", "1"),
            ("b", "updated", "1"),
        ]


async def test_changes_and_compaction_during_an_outage_resync_exactly(
    etcd_factory: ServerFactory[EtcdServer],
) -> None:
    """etcd comes back with new data and compacted history: exactly the net changes appear.

    While the adapter is cut off (etcd dead, then briefly up on another port
    so that the adapter cannot reach it), keys change and the history of those
    changes is compacted away, so no watch could replay them: only the full
    re-list after the reconnect can report them, once each.
    """
    server = etcd_factory()
    with client_for(server) as client:
        for name in ("a/1", "a/2", "b/1", "c/1"):
            client.put(f"/svc/{name}", grpc_value("10.0.0.1:80"))
    async with running(upstream_for(server, "/svc/")) as (fold, events):
        await fold.until(events, connected, message="connected")
        held = fold.snapshot

        await trio.to_thread.run_sync(server.kill)
        await fold.until(events, lambda f: f.stale, message="Status(False)")

        home = server.port
        server.port = free_port()  # same data, an address the adapter does not know
        await trio.to_thread.run_sync(server.start)
        with client_for(server) as client:
            client.put("/svc/a/3", grpc_value("10.0.0.3:80"))
            client.delete("/svc/a/1")
            client.put("/svc/b/1", grpc_value("10.0.0.9:80"))
            client.put("/svc/c/1", grpc_value("10.0.0.1:80"))  # rewritten, same value
            client.put("/svc/d/1", grpc_value("10.0.0.4:80"))  # came and went
            client.delete("/svc/d/1")
            lease = client.lease(60)
            client.put("/svc/e/1", grpc_value("10.0.0.5:80"), lease=lease)
            revision = client.get_response("/svc/").header.revision
            client.compact(revision, physical=True)
        await trio.to_thread.run_sync(server.kill)
        assert fold.drain(events) == 0  # nothing reached the adapter meanwhile
        assert fold.snapshot is held

        server.port = home
        await trio.to_thread.run_sync(server.start)
        await fold.until(events, connected, timeout=20, message="reconnected")
        assert summary([d for d in fold.deltas if d.to_version > held.version]) == [
            ("a", "added", "3"),
            ("a", "removed", "1"),
            ("b", "updated", "1"),
            ("e", "added", "1"),
        ]
        assert fold.instances("e")["1"].metadata[LEASE_KEY] == format(lease.id, "016x")

        # And the watch after it follows from the new revision.
        with client_for(server) as client:
            client.put("/svc/a/4", grpc_value("10.0.0.4:80"))
        await fold.until(events, lambda f: "4" in ids(f, "a"), message="a/4 after resync")


async def test_compacted_watch_start_resyncs_without_an_outage(
    etcd_factory: ServerFactory[EtcdServer],
) -> None:
    """Narrowing restarts a service's watch from the prefix watch's revision; if etcd
    compacted that revision away, the adapter re-lists (ErrCompacted), without
    reporting an outage or any change that did not happen."""
    server = etcd_factory()
    with client_for(server) as client:
        client.put("/svc/a/1", grpc_value("10.0.0.1:80"))
        upstream = upstream_for(server, "/svc/")
        async with running(upstream) as (fold, events):
            await fold.until(events, connected, message="connected")
            for index in range(5):
                client.put(f"/elsewhere/{index}", "x")
            client.compact(client.get_response("/elsewhere/").header.revision, physical=True)
            held = fold.snapshot

            mark = len(fold.events)
            upstream.set_interest(frozenset({"a"}))
            await fold.until(events, lambda f: listings(f, mark), message="resync listing")
            assert listings(fold, mark) == [frozenset({"a"})]
            assert fold.snapshot is held
            assert [s.connected for s in fold.statuses] == [True]
            client.put("/svc/a/2", grpc_value("10.0.0.2:80"))
            await fold.until(events, lambda f: "2" in ids(f, "a"), message="a/2 after resync")


async def test_a_dispatcher_that_falls_behind_gets_a_resync(
    etcd: EtcdServer, unique_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch inbox is bounded: overflowing it re-lists instead of growing or blocking."""
    monkeypatch.setattr(adapters.etcd, "_INBOX", 4)
    prefix = f"{unique_path}/"
    upstream = upstream_for(etcd, prefix)
    with client_for(etcd) as client:
        async with running(upstream, buffer=1) as (fold, events):
            await fold.until(events, connected, message="connected")
            for index in range(40):  # one watch response each, and nobody reading
                client.put(f"{prefix}s/{index}", grpc_value(f"10.0.0.1:{index + 1}"))
            await until(
                lambda: upstream._session and upstream._session.inbox.overflowed,
                "the watch inbox overflowed",
            )
            await fold.until(events, lambda f: len(ids(f, "s")) == 40, message="all 40")
            assert listings(fold) == [None, None]
            assert [s.connected for s in fold.statuses] == [True]
