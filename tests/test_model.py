"""The model's values: validation, immutability, equality and identity."""

from __future__ import annotations

import pickle
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.core.model import EMPTY_METADATA, Health, Instance, Metadata, Source


def make(**changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "service": "orders",
        "instance_id": "i-1",
        "host": "10.0.0.1",
        "port": 8080,
    }
    fields.update(changes)
    return Instance(**fields)


def test_defaults_describe_a_routable_instance() -> None:
    instance = make()
    assert instance.weight == 100
    assert instance.zone == ""
    assert instance.protocol == ""
    assert instance.metadata == {}
    assert instance.metadata is EMPTY_METADATA
    assert instance.health is Health.UNKNOWN
    assert instance.source is None


def test_endpoint_is_host_and_port() -> None:
    assert make(host="10.1.2.3", port=20880).endpoint == ("10.1.2.3", 20880)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": -1}, "port must be in 0..65535"),
        ({"port": 65536}, "port must be in 0..65535"),
        ({"service": ""}, "service must not be empty"),
        ({"instance_id": ""}, "instance_id must not be empty"),
        ({"host": ""}, "host must not be empty"),
        ({"weight": -1}, "weight must be >= 0"),
        ({"health": "sick"}, "sick"),
    ],
)
def test_bad_values_raise_a_clear_value_error(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"port": True},
        {"port": "80"},
        {"weight": 1.5},
        {"service": 7},
        {"metadata": {"k": 1}},
        {"metadata": {1: "v"}},
        {"source": "zookeeper"},
    ],
)
def test_wrongly_typed_values_raise_type_error(changes: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        make(**changes)


def test_boundary_ports_are_valid() -> None:
    assert make(port=0).port == 0
    assert make(port=65535).port == 65535


def test_health_accepts_its_wire_spelling() -> None:
    assert make(health="failing").health is Health.FAILING
    assert Health("passing") is Health.PASSING
    assert str(Health.UNKNOWN) == "unknown"


def test_instances_are_frozen_and_slotted() -> None:
    instance = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        instance.port = 9090  # type: ignore[misc]  # the point: the field is frozen
    assert not hasattr(instance, "__dict__")
    assert not hasattr(Source("zk", "/a"), "__dict__")
    assert not hasattr(Metadata({"a": "b"}), "__dict__")


def test_metadata_is_a_private_copy() -> None:
    original = {"version": "1.0"}
    instance = make(metadata=original)
    original["version"] = "2.0"
    assert instance.metadata["version"] == "1.0"
    with pytest.raises(TypeError):
        instance.metadata["version"] = "3.0"  # type: ignore[index]  # the point: read-only


def test_metadata_compares_and_hashes_by_value_in_any_order() -> None:
    a = Metadata({"b": "2", "a": "1"})
    b = Metadata([("a", "1"), ("b", "2")])
    assert a == b
    assert hash(a) == hash(b)
    assert a == {"a": "1", "b": "2"}
    assert a != Metadata({"a": "1"})
    assert a != {"a": "1", "b": "3"}
    assert list(a) == ["a", "b"]
    assert dict(a.items()) == {"a": "1", "b": "2"}
    assert list(a.values()) == ["1", "2"]
    assert "a" in a
    assert "c" not in a
    assert a.get("c") is None
    with pytest.raises(KeyError):
        a["c"]


@given(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=8))
def test_metadata_behaves_like_the_dict_it_was_built_from(entries: dict[str, str]) -> None:
    metadata = Metadata(entries)
    assert metadata == entries
    assert len(metadata) == len(entries)
    assert dict(metadata) == entries
    for key, value in entries.items():
        assert metadata[key] == value
        assert key in metadata
    assert Metadata(reversed(list(entries.items()))) == metadata
    assert hash(Metadata(reversed(list(entries.items())))) == hash(metadata)


def test_equal_instances_are_interchangeable_in_sets() -> None:
    a = make(metadata={"k": "v"}, zone="az1")
    b = make(metadata={"k": "v"}, zone="az1")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert make(weight=50) != a


def test_source_is_provenance_not_value() -> None:
    """A record rewritten upstream with the same content is not a change."""
    first = make(source=Source("zookeeper", "/services/orders/i-1", revision=10))
    rewritten = make(source=Source("zookeeper", "/services/orders/i-1", revision=42))
    assert first == rewritten
    assert hash(first) == hash(rewritten)
    assert first.source != rewritten.source


def test_source_validation() -> None:
    assert Source("etcd", "/registry/orders/1", 7).revision == 7
    with pytest.raises(ValueError, match="adapter must not be empty"):
        Source("", "/a")
    with pytest.raises(TypeError):
        Source("etcd", "/a", revision="7")  # type: ignore[arg-type]  # the point: a wrong type


def test_evolve_revalidates() -> None:
    instance = make()
    assert attrs.evolve(instance, health=Health.FAILING).health is Health.FAILING
    with pytest.raises(ValueError):
        attrs.evolve(instance, port=70000)


def test_instances_pickle() -> None:
    instance = make(metadata={"k": "v"}, source=Source("consul", "orders-1", 3))
    copy = pickle.loads(pickle.dumps(instance))
    assert copy == instance
    assert copy.source == instance.source


def test_low_cardinality_strings_are_shared() -> None:
    """Parsed records allocate fresh strings; equal services must not cost twice."""
    a = make(service="".join(["ord", "ers"]), zone="".join(["az", "1"]))
    b = make(service="".join(["or", "ders"]), zone="".join(["a", "z1"]))
    assert a.service is b.service
    assert a.zone is b.zone
