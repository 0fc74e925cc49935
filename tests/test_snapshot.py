"""The snapshot: structural sharing, growing versions, minimal deltas and diffs."""

from __future__ import annotations

import gc
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.snapshot import Change, Delta, Put, Remove, ServiceEntry, Snapshot, diff


def inst(service: str, instance_id: str, port: int = 80, **kw: Any) -> Instance:
    return Instance(service, instance_id, "10.0.0.1", port, **kw)


def build(*instances: Instance) -> Snapshot:
    snapshot, _ = Snapshot().apply(Put(i) for i in instances)
    return snapshot


def contents(snapshot: Snapshot) -> dict[tuple[str, str], Instance]:
    return {
        (service, instance_id): instance
        for service, entry in snapshot.items()
        for instance_id, instance in entry.instances.items()
    }


def test_empty_snapshot() -> None:
    snapshot = Snapshot()
    assert snapshot.version == 0
    assert len(snapshot) == 0
    assert "orders" not in snapshot
    assert snapshot.full("orders") == ServiceEntry("orders", 0)
    assert dict(snapshot.full("orders").instances) == {}


def test_apply_adds_and_reports_a_delta() -> None:
    a = inst("orders", "a")
    snapshot, deltas = Snapshot().apply([Put(a)])
    assert snapshot.version == 1
    assert snapshot["orders"].version == 1
    assert dict(snapshot["orders"].instances) == {"a": a}
    assert deltas == (Delta("orders", 0, 1, added=(a,)),)


def test_unchanged_entries_and_instances_are_shared() -> None:
    """Readers of the old snapshot and the new one share every unchanged object."""
    old = build(inst("orders", "a"), inst("orders", "b"), inst("users", "u"))
    new, _ = old.apply([Put(inst("orders", "a", port=81))])
    assert new["users"] is old["users"]
    assert new["orders"] is not old["orders"]
    assert new["orders"].instances["b"] is old["orders"].instances["b"]


def test_the_old_snapshot_stays_valid() -> None:
    old = build(inst("orders", "a"))
    before = contents(old)
    new, _ = old.apply([Remove("orders", "a"), Put(inst("users", "u"))])
    assert contents(old) == before
    assert old.version == 1
    assert "users" not in old
    assert "orders" not in new


def test_entries_are_read_only() -> None:
    snapshot = build(inst("orders", "a"))
    with pytest.raises(TypeError):
        snapshot["orders"].instances["b"] = inst("orders", "b")  # type: ignore[index]  # on purpose
    with pytest.raises(TypeError):
        snapshot["x"] = snapshot["orders"]  # type: ignore[index]  # the point: read-only


@pytest.mark.parametrize(
    "changes",
    [
        [],
        [Put(inst("orders", "a"))],  # same value again
        [Remove("orders", "missing")],
        [Remove("nowhere", "missing")],
        [Put(inst("orders", "new")), Remove("orders", "new")],  # net nothing
        [Put(inst("orders", "a", port=9)), Put(inst("orders", "a"))],  # back to same
    ],
)
def test_no_op_changes_produce_no_delta_and_no_version(changes: list[Change]) -> None:
    snapshot = build(inst("orders", "a"))
    new, deltas = snapshot.apply(changes)
    assert new is snapshot
    assert deltas == ()


def test_equal_value_with_newer_source_keeps_the_current_object() -> None:
    current = inst("orders", "a", source=Source("zookeeper", "/a", 1))
    snapshot = build(current)
    new, deltas = snapshot.apply([Put(inst("orders", "a", source=Source("zookeeper", "/a", 2)))])
    assert new is snapshot
    assert deltas == ()
    assert new["orders"].instances["a"] is current


def test_a_batch_reports_only_its_net_effect() -> None:
    a, b = inst("orders", "a"), inst("orders", "b")
    snapshot = build(a, b)
    a2, a3 = inst("orders", "a", port=2), inst("orders", "a", port=3)
    c = inst("orders", "c")
    new, deltas = snapshot.apply(
        [Put(a2), Put(a3), Remove("orders", "b"), Put(c), Put(inst("users", "u"))]
    )
    assert new.version == 2
    assert deltas == (
        Delta("orders", 1, 2, added=(c,), updated=(a3,), removed=(b,)),
        Delta("users", 0, 2, added=(inst("users", "u"),)),
    )
    assert deltas[0].removed_ids == ("b",)
    assert dict(new["orders"].instances) == {"a": a3, "c": c}


def test_health_change_is_an_update() -> None:
    snapshot = build(inst("orders", "a"))
    failing = inst("orders", "a", health=Health.FAILING)
    _, deltas = snapshot.apply([Put(failing)])
    assert deltas == (Delta("orders", 1, 2, updated=(failing,)),)


def test_emptied_service_keeps_its_version_and_deltas_chain() -> None:
    """A consumer never sees a service's version go down, even across deletion."""
    s1 = build(inst("orders", "a"))
    s2, (gone,) = s1.apply([Remove("orders", "a")])
    assert "orders" not in s2
    assert len(s2) == 0
    assert s2.full("orders") == ServiceEntry("orders", 2)
    s3, _ = s2.apply([Put(inst("users", "u"))])
    assert s3.full("orders").version == 2
    s4, (back,) = s3.apply([Put(inst("orders", "a"))])
    assert back.from_version == gone.to_version == 2
    assert s4["orders"].version == 4
    assert s4.full("orders").version == 4


def test_apply_rejects_unknown_changes() -> None:
    with pytest.raises(TypeError):
        Snapshot().apply([inst("orders", "a")])  # type: ignore[list-item]  # the point: no Change


def test_snapshot_mapping_interface() -> None:
    snapshot = build(inst("orders", "a"), inst("users", "u"))
    assert sorted(snapshot) == ["orders", "users"]
    assert len(snapshot) == 2
    assert snapshot.get("nope") is None
    assert "orders" in snapshot
    assert repr(snapshot) == "Snapshot(version=1, services=2)"


# --- properties --------------------------------------------------------------

SERVICES = st.sampled_from(["orders", "users", "payments"])
IDS = st.sampled_from(["a", "b", "c", "d"])
instances = st.builds(
    Instance,
    SERVICES,
    IDS,
    st.sampled_from(["10.0.0.1", "10.0.0.2"]),
    st.integers(0, 3),
    weight=st.integers(0, 2),
    health=st.sampled_from(list(Health)),
    metadata=st.dictionaries(st.sampled_from(["k", "v"]), st.sampled_from(["1", "2"]), max_size=2),
)
changes = st.one_of(
    st.builds(Put, instances),
    st.builds(Remove, SERVICES, IDS),
)


def keyed(items: list[Instance]) -> dict[tuple[str, str], Instance]:
    return {(i.service, i.instance_id): i for i in items}


@given(st.lists(instances, max_size=12), st.lists(instances, max_size=12))
def test_diff_applied_to_a_gives_b(a: list[Instance], b: list[Instance]) -> None:
    start = build(*a)
    end, deltas = start.apply(diff(a, b))
    assert contents(end) == keyed(b)
    # Versions only grow, and only when something changed.
    assert end.version == start.version + (1 if deltas else 0)


@given(st.lists(instances, max_size=12), st.lists(instances, max_size=12))
def test_diff_is_minimal(a: list[Instance], b: list[Instance]) -> None:
    before, after = keyed(a), keyed(b)
    result = diff(a, b)
    puts = {(c.instance.service, c.instance.instance_id) for c in result if isinstance(c, Put)}
    removes = {(c.service, c.instance_id) for c in result if isinstance(c, Remove)}
    assert puts == {k for k, v in after.items() if before.get(k) != v}
    assert removes == before.keys() - after.keys()
    assert len(result) == len(puts) + len(removes)
    assert diff(b, b) == ()


@given(st.lists(instances, max_size=12))
def test_diff_accepts_a_snapshot_entry(items: list[Instance]) -> None:
    snapshot = build(*items)
    for service in snapshot:
        assert diff(snapshot.full(service).instances, snapshot.full(service).instances) == ()


@settings(max_examples=200)
@given(st.lists(st.lists(changes, max_size=6), max_size=10))
def test_versions_grow_and_deltas_replay_to_the_snapshot(batches: list[list[Change]]) -> None:
    """A consumer that applies every delta in order holds exactly the snapshot."""
    snapshot = Snapshot()
    replica: dict[str, dict[str, Instance]] = {}
    seen_version: dict[str, int] = {}
    for batch in batches:
        new, deltas = snapshot.apply(batch)
        if deltas:
            assert new.version == snapshot.version + 1
        else:
            assert new is snapshot
        services = [d.service for d in deltas]
        assert len(services) == len(set(services))
        for delta in deltas:
            assert delta.to_version == new.version
            assert delta.from_version == seen_version.get(delta.service, 0)
            assert delta.added or delta.updated or delta.removed
            seen_version[delta.service] = delta.to_version
            state = replica.setdefault(delta.service, {})
            for i in delta.added:
                assert i.instance_id not in state
                state[i.instance_id] = i
            for i in delta.updated:
                assert state[i.instance_id] != i
                state[i.instance_id] = i
            for i in delta.removed:
                assert state.pop(i.instance_id) == i
        for service, entry in new.items():
            assert entry.version <= new.version
            if service not in services:
                assert snapshot[service] is entry
        snapshot = new
    assert {s: v for s, v in replica.items() if v} == {
        s: dict(e.instances) for s, e in snapshot.items()
    }
    for service, version in seen_version.items():
        assert snapshot.full(service).version == version


# --- memory ------------------------------------------------------------------


def _fleet(count: int) -> Iterator[Put]:
    """Instances as an adapter would produce them: fresh strings for every field."""
    for k in range(count):
        service = f"com.example.orders.Service{k % 1000}"
        instance_id = str(uuid.UUID(int=k))
        yield Put(
            Instance(
                service,
                instance_id,
                f"10.{k // 65536 % 256}.{k // 256 % 256}.{k // 4 % 256}",
                20880 + k % 4,
                zone=f"az{k % 3}",
                protocol="dubbo",
                metadata={
                    "application": f"app-{k % 1000}",
                    "version": f"1.4.{k % 5}",
                    "revision": f"r{k}",
                },
                source=Source("zookeeper", f"/services/{service}/{instance_id}", 5_000_000 + k),
            )
        )


def test_a_100k_instance_snapshot_costs_under_1kib_per_instance() -> None:
    count = 100_000
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        snapshot, deltas = Snapshot().apply(_fleet(count))
        del deltas
        gc.collect()
        per_instance = (tracemalloc.get_traced_memory()[0] - baseline) / count
    finally:
        tracemalloc.stop()
    assert sum(len(e.instances) for e in snapshot.values()) == count
    print(f"snapshot memory: {per_instance:.0f} bytes per instance")
    assert per_instance < 1024
