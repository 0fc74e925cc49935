"""The watch index: one upstream interest per key, and recursive prefix matching."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.core.watch_index import WatchIndex


def test_first_subscriber_creates_and_last_removes_the_upstream_interest() -> None:
    index: WatchIndex[str, str] = WatchIndex()
    assert index.add("orders", "proxy-1") is True
    assert index.add("orders", "proxy-2") is False
    assert index.add("orders", "proxy-1") is False  # already there: no-op
    assert index.subscribers("orders") == ("proxy-1", "proxy-2")
    assert index.remove("orders", "proxy-1") is False
    assert index.remove("orders", "proxy-1") is False  # not there any more
    assert index.remove("orders", "proxy-2") is True
    assert index.subscribers("orders") == ()
    assert "orders" not in index
    assert index.add("orders", "proxy-3") is True  # a new first subscriber


def test_removing_from_an_unknown_key_is_harmless() -> None:
    index: WatchIndex[str, int] = WatchIndex()
    assert index.remove("nowhere", 1) is False
    index.add("orders", 1)
    assert index.remove("orders", 2) is False
    assert index.subscribers("orders") == (1,)


def test_len_keys_and_contains() -> None:
    index: WatchIndex[str, int] = WatchIndex()
    index.add("a", 1)
    index.add("b", 1)
    index.add("b", 2)
    assert len(index) == 2
    assert set(index.keys()) == {"a", "b"}
    assert "a" in index
    assert index.keys_of(1) == ("a", "b")
    assert index.keys_of(3) == ()


def test_remove_subscriber_reports_the_keys_it_emptied() -> None:
    """A closing session leaves every watch at once; only orphaned keys go upstream."""
    index: WatchIndex[str, str] = WatchIndex()
    index.add("/a", "s1")
    index.add("/b", "s1")
    index.add("/b", "s2")
    index.add("/c", "s1")
    assert index.remove_subscriber("s1") == ("/a", "/c")
    assert set(index.keys()) == {"/b"}
    assert index.subscribers("/b") == ("s2",)
    assert index.keys_of("s1") == ()
    assert index.remove_subscriber("s1") == ()


def test_lookups_are_snapshots_safe_to_mutate_during_fan_out() -> None:
    index: WatchIndex[str, int] = WatchIndex()
    for subscriber in range(5):
        index.add("/a", subscriber)
    fired = []
    for subscriber in index.subscribers("/a"):  # a one-shot watch fires and goes
        fired.append(subscriber)
        index.remove("/a", subscriber)
    assert fired == [0, 1, 2, 3, 4]
    assert len(index) == 0


def test_matching_walks_whole_path_components() -> None:
    index: WatchIndex[str, str] = WatchIndex()
    index.add("/", "root")
    index.add("/a", "a")
    index.add("/a/b", "ab")
    index.add("/ab", "ab-sibling")
    index.add("/a/b/c/d", "deeper")
    assert index.matching("/a/b/c") == ("root", "a", "ab")
    assert index.matching("/a") == ("root", "a")
    assert index.matching("/ab") == ("root", "ab-sibling")
    assert index.matching("/") == ("root",)
    assert index.matching("/zzz") == ("root",)


def test_matching_reports_each_subscriber_once() -> None:
    """Like ZooKeeper: one event per watcher, however many of its watches cover the path."""
    index: WatchIndex[str, str] = WatchIndex()
    index.add("/a", "s1")
    index.add("/a/b", "s1")
    index.add("/a/b", "s2")
    assert index.matching("/a/b/c") == ("s1", "s2")


def test_matching_works_for_relative_keys() -> None:
    index: WatchIndex[str, str] = WatchIndex()
    index.add("dubbo", "s1")
    index.add("dubbo/com.foo.Bar", "s2")
    assert index.matching("dubbo/com.foo.Bar/providers") == ("s1", "s2")
    assert index.matching("dubbox") == ()


def test_matching_does_not_scan_all_keys() -> None:
    """200k unrelated keys must not slow down a lookup (a scan would take minutes)."""
    index: WatchIndex[str, int] = WatchIndex()
    for n in range(200_000):
        index.add(f"/services/s{n}", n)
    index.add("/services", -1)
    started = time.perf_counter()
    for n in range(10_000):
        assert index.matching(f"/services/s{n}/providers/x") == (-1, n)
    assert time.perf_counter() - started < 2.0


# --- against a naive reference --------------------------------------------------

PATHS = st.sampled_from(["/", "/a", "/a/b", "/a/b/c", "/ab", "/b", "/b/a"])
operations = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "drop"]), PATHS, st.integers(0, 3)),
    max_size=40,
)


@given(operations, PATHS)
def test_index_agrees_with_a_naive_model(ops: list[tuple[str, str, int]], probe: str) -> None:
    index: WatchIndex[str, int] = WatchIndex()
    model: dict[str, set[int]] = {}
    for op, key, subscriber in ops:
        if op == "add":
            expected = not model.get(key)
            model.setdefault(key, set()).add(subscriber)
            assert index.add(key, subscriber) is expected
        elif op == "remove":
            present = subscriber in model.get(key, set())
            model.get(key, set()).discard(subscriber)
            expected = present and not model[key]
            assert index.remove(key, subscriber) is expected
        else:
            emptied = {k for k, subs in model.items() if subs == {subscriber}}
            for subs in model.values():
                subs.discard(subscriber)
            assert set(index.remove_subscriber(subscriber)) == emptied
        model = {k: v for k, v in model.items() if v}
        assert set(index.keys()) == set(model)
        for k, subs in model.items():
            assert set(index.subscribers(k)) == subs

    def covers(key: str, path: str) -> bool:
        return key == "/" or path == key or path.startswith(key + "/")

    expected_matching = set().union(*(s for k, s in model.items() if covers(k, probe)))
    found = index.matching(probe)
    assert set(found) == expected_matching
    assert len(found) == len(set(found))
