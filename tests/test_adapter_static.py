"""The static upstream: a TOML or JSON file of instances, reloaded when it changes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from adapters.static import StaticFileError, StaticUpstream, parse_instances
from dispatcher.core.model import Health, Instance
from dispatcher.core.upstream import ConfigError, Listing, Status, UpstreamEvent
from tests.upstream_fold import Fold

ORDERS_TOML = """\
[[instance]]
service = "orders"
id = "orders-a"
host = "10.0.0.7"
port = 8080
weight = 50
zone = "eu-west-1a"
protocol = "grpc"
health = "passing"
metadata = { version = "1.4.2" }

[[instance]]
service = "orders"
host = "10.0.0.8"
port = 8080

[[instance]]
service = "db"
host = "10.0.1.1"
port = 5432
"""

ORDERS_A = Instance(
    "orders",
    "orders-a",
    "10.0.0.7",
    8080,
    weight=50,
    zone="eu-west-1a",
    protocol="grpc",
    health=Health.PASSING,
    metadata={"version": "1.4.2"},
)
ORDERS_B = Instance("orders", "10.0.0.8:8080", "10.0.0.8", 8080)
DB = Instance("db", "10.0.1.1:5432", "10.0.1.1", 5432)


def replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as a careful writer does."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@asynccontextmanager
async def running(
    path: Path, interest: frozenset[str] | None = None, **options: Any
) -> AsyncIterator[tuple[StaticUpstream, trio.MemoryReceiveChannel[UpstreamEvent], Fold]]:
    upstream = StaticUpstream.from_config(
        "files", {"path": str(path), "poll_interval": 0.05, **options}
    )
    if interest is not None:
        upstream.set_interest(interest)
    send, receive = trio.open_memory_channel[UpstreamEvent](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        try:
            yield upstream, receive, Fold()
        finally:
            nursery.cancel_scope.cancel()


def loaded(fold: Fold) -> bool:
    return bool(fold.statuses) and fold.statuses[-1].connected


async def test_a_toml_file_is_listed_in_full(tmp_path: Path) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(ORDERS_TOML)
    async with running(path) as (_, events, fold):
        await fold.until(events, loaded)
    listing, status = fold.events
    assert isinstance(listing, Listing) and listing.services is None
    assert listing.instances == (ORDERS_A, ORDERS_B, DB)
    assert status == Status(True, str(path))
    assert fold.instances("orders") == {"orders-a": ORDERS_A, "10.0.0.8:8080": ORDERS_B}
    source = fold.instances("orders")["orders-a"].source
    assert source is not None
    assert (source.adapter, source.key, source.revision) == ("files", "orders/orders-a", 1)


async def test_a_json_file_is_listed_in_full(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    document = {
        "instances": [
            {
                "service": "orders",
                "id": "orders-a",
                "host": "10.0.0.7",
                "port": 8080,
                "weight": 50,
                "zone": "eu-west-1a",
                "protocol": "grpc",
                "health": "passing",
                "metadata": {"version": "1.4.2"},
            },
            {"service": "db", "host": "10.0.1.1", "port": 5432},
        ]
    }
    path.write_text(json.dumps(document, indent=2))
    async with running(path) as (_, events, fold):
        await fold.until(events, loaded)
    assert fold.instances("orders") == {"orders-a": ORDERS_A}
    assert fold.instances("db") == {DB.instance_id: DB}


async def test_an_edit_becomes_exactly_its_changes(tmp_path: Path) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(ORDERS_TOML)
    async with running(path) as (_, events, fold):
        await fold.until(events, loaded)
        first = len(fold.deltas)
        # Change orders-a's weight, drop the second orders instance, add one to db.
        edited = ORDERS_TOML.replace("weight = 50", "weight = 70").replace(
            '[[instance]]\nservice = "orders"\nhost = "10.0.0.8"\nport = 8080\n\n', ""
        )
        edited += '\n[[instance]]\nservice = "db"\nid = "replica"\nhost = "10.0.1.2"\nport = 5432\n'
        replace(path, edited)
        await fold.until(events, lambda f: len(f.deltas) > first, message="reloaded")

    changes = fold.deltas[first:]
    by_service = {d.service: d for d in changes}
    assert set(by_service) == {"orders", "db"}
    orders, db = by_service["orders"], by_service["db"]
    assert (orders.added, orders.updated, orders.removed) == (
        (),
        (attrs.evolve(ORDERS_A, weight=70),),
        (ORDERS_B,),
    )
    assert db.added == (Instance("db", "replica", "10.0.1.2", 5432),)
    assert (db.updated, db.removed) == ((), ())
    # One reload, one Listing: both deltas come from the same snapshot version.
    assert {d.to_version for d in changes} == {fold.snapshot.version}


async def test_a_rewrite_in_the_same_timestamp_tick_is_not_missed(tmp_path: Path) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(ORDERS_TOML)
    stat = path.stat()
    async with running(path) as (_, events, fold):
        await fold.until(events, loaded)
        listed = len(fold.deltas)
        # Same size, same mtime, same inode: only the content tells.
        path.write_text(ORDERS_TOML.replace("10.0.0.8", "10.0.0.9"))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
        await fold.until(events, lambda f: len(f.deltas) > listed, message="rewrite seen")
    assert "10.0.0.9:8080" in fold.instances("orders")


async def test_touching_the_file_without_changing_it_emits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(ORDERS_TOML)
    async with running(path) as (_, events, fold):
        await fold.until(events, loaded)
        seen = len(fold.events)
        replace(path, ORDERS_TOML)  # new inode and mtime, same bytes
        # A measurement window of ten polls, not a synchronisation: nothing may arrive.
        with trio.move_on_after(0.5):
            await fold.until(events, lambda f: len(f.events) > seen)
        assert fold.events[seen:] == []
        # A real change still comes through.
        replace(path, ORDERS_TOML.replace("5432", "5433"))
        await fold.until(events, lambda f: "10.0.1.1:5433" in f.instances("db"))
    assert sum(isinstance(e, Listing) for e in fold.events) == 2


async def test_a_broken_file_keeps_the_last_state_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(ORDERS_TOML)
    caplog.set_level(logging.WARNING, logger="adapters.static")
    async with running(path) as (_, events, fold):
        await fold.until(events, loaded)
        snapshot = fold.snapshot

        replace(path, ORDERS_TOML.replace("port = 5432", "port = 54 32"))
        await fold.until(events, lambda f: f.stale, message="reported broken")
        down = fold.statuses[-1]
        line = ORDERS_TOML.splitlines().index("port = 5432") + 1
        assert str(path) in down.detail and f"line {line}" in down.detail
        assert fold.snapshot is snapshot  # nothing was taken away

        # Wrong values are reported by instance and key.
        replace(path, ORDERS_TOML.replace("port = 5432", 'port = "5432"'))
        await fold.until(events, lambda f: "#3" in f.statuses[-1].detail, message="bad value")
        assert "[[instance]] #3: key 'port' must be int, not str" in fold.statuses[-1].detail
        assert fold.snapshot is snapshot

        replace(path, ORDERS_TOML.replace("5432", "6432"))
        await fold.until(events, lambda f: not f.stale, message="fixed")
    # The new state arrived before the upstream was reported back.
    assert isinstance(fold.events[-2], Listing)
    assert set(fold.instances("db")) == {"10.0.1.1:6432"}
    assert [s.connected for s in fold.statuses] == [True, False, False, True]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one line per broken version, not one per poll
    assert all(vars(r)["path"] == str(path) and str(path) in vars(r)["detail"] for r in warnings)


async def test_a_missing_file_is_reported_and_loaded_when_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later.json"
    async with running(path) as (_, events, fold):
        await fold.until(events, lambda f: f.stale, message="reported missing")
        assert "cannot read" in fold.statuses[-1].detail
        replace(path, json.dumps({"instances": [{"service": "db", "host": "h", "port": 1}]}))
        await fold.until(events, lambda f: not f.stale, message="loaded")
    assert set(fold.instances("db")) == {"h:1"}


async def test_interest_filters_and_widening_lists_from_memory(tmp_path: Path) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(ORDERS_TOML)
    async with running(path, interest=frozenset({"db"})) as (upstream, events, fold):
        await fold.until(events, loaded)
        assert set(fold.snapshot) == {"db"}
        first = fold.events[0]
        assert isinstance(first, Listing) and first.services == frozenset({"db"})

        upstream.set_interest(frozenset({"db", "orders"}))
        await fold.until(events, lambda f: "orders" in f.snapshot, message="widened")
        assert fold.instances("orders") == {"orders-a": ORDERS_A, "10.0.0.8:8080": ORDERS_B}
    assert all(not d.removed for d in fold.deltas)


def test_parse_errors_name_the_place() -> None:
    toml = Path("x.toml")

    def error(text: str, path: Path = toml) -> str:
        with pytest.raises(StaticFileError) as caught:
            parse_instances("a", path, text.encode())
        return str(caught.value)

    base = '[[instance]]\nservice = "s"\nhost = "h"\nport = 1\n'
    assert "line 1" in error("[[instance]\n")
    assert error(base + "wieght = 5\n") == (
        "[[instance]] #1.wieght: unknown key (known here: health, host, id, metadata,"
        " port, protocol, service, weight, zone)"
    )
    assert error(base + base) == "[[instance]] #2: service 's' id 'h:1' repeats [[instance]] #1"
    assert "missing key 'host'" in error('[[instance]]\nservice = "s"\nport = 1\n')
    assert "'health' must be unknown, passing or failing" in error(base + 'health = "ok"\n')
    assert "metadata 'v' must be a string" in error(base + "metadata = { v = 1 }\n")
    assert "port must be in 0..65535" in error(base.replace("port = 1", "port = 70000"))
    assert "instances: unknown key (known here: instance)" in error("[[instances]]\n")
    assert error('{"instances": [}', Path("x.json")).startswith("line 1, column 16")
    assert "top level" in error("[]", Path("x.json"))
    assert parse_instances("a", toml, b"") == ()
    assert parse_instances("a", Path("x.json"), b'{"instances": []}') == ()


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({}, "missing required key 'path'"),
        ({"path": 5}, "'path' must be str"),
        ({"path": "instances.yaml"}, ".toml or .json"),
        ({"path": "a.toml", "poll_interval": 0}, "'poll_interval'"),
        ({"path": "a.toml", "poll_interval": "1s"}, "'poll_interval' must be float"),
        ({"path": "a.toml", "reload": True}, r"\.reload: unknown key \(known here: path, poll"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_key(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        StaticUpstream.from_config("files", options)
