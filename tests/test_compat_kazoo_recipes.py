"""kazoo 2.11's recipes against zkgate and real ZooKeeper.

The recipes are where a ZooKeeper client leans on the subtle parts of the
protocol: sequential names from the parent's counter, ephemerals that go with
their session, child and data watches that fire exactly once and in order,
versioned compare-and-set. Each test drives one recipe the way an application
does (several sessions contending where the recipe is about contention) and
runs against real ZooKeeper 3.8 (the reference: a failure there is a wrong
test) and against ``zkgate serve``.

Waits are on queues and events with deadlines. Where a test must show that
something does *not* happen (a lock is not granted, a barrier does not open),
it waits a short bounded time for it and asserts that it did not come.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.recipe.cache import TreeCache, TreeEvent
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from tests.compat.harness import TARGET_KINDS, Target, make_target
from tests.servers import wait_for

#: How long any one expected event, grant or thread may take.
WAIT = 10.0
#: How long to watch for something that must not happen.
ABSENCE = 0.3

ClientMaker = Callable[[], KazooClient]


@pytest.fixture(params=TARGET_KINDS)
def target(request: pytest.FixtureRequest, unique_path: str) -> Target:
    return make_target(request, request.param, unique_path)


@pytest.fixture
def new_client(target: Target) -> Iterator[ClientMaker]:
    """Makes started kazoo clients (one session each); all are stopped after the test."""
    clients: list[KazooClient] = []

    def make() -> KazooClient:
        client = KazooClient(hosts=target.address, timeout=4.0)
        client.start(timeout=WAIT)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop()
        client.close()


def _next(events: queue.Queue[Any], what: str) -> Any:
    try:
        return events.get(timeout=WAIT)
    except queue.Empty:
        pytest.fail(f"no {what} within {WAIT}s")


def _run_threads(workers: list[threading.Thread]) -> None:
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=4 * WAIT)
        assert not worker.is_alive(), f"{worker.name} did not finish"


# ------------------------------------------------------------------------ Lock


def test_lock_mutual_exclusion(target: Target, new_client: ClientMaker) -> None:
    """Four workers on two sessions: a read-modify-write without versions stays exact."""
    holder, waiter = new_client(), new_client()
    lock_path, counter_path = f"{target.base}/lock", f"{target.base}/counter"
    holder.create(counter_path, b"0", makepath=True)

    first = holder.Lock(lock_path, "first")
    second = waiter.Lock(lock_path, "second")
    assert first.acquire(timeout=WAIT)
    assert not second.acquire(blocking=False), "a held lock was granted to another session"
    assert first.contenders() == ["first"]
    first.release()
    assert second.acquire(timeout=WAIT)
    second.release()

    rounds, overlaps, errors = 10, [], []
    inside = threading.Semaphore(1)

    def worker(client: KazooClient, name: str) -> None:
        lock = client.Lock(lock_path, name)
        try:
            for _ in range(rounds):
                with lock:
                    if not inside.acquire(blocking=False):
                        overlaps.append(name)
                        continue
                    value = int(client.get(counter_path)[0])
                    client.set(counter_path, str(value + 1).encode())
                    inside.release()
        except Exception as exc:  # reported below with the worker's name
            errors.append(f"{name}: {exc!r}")

    _run_threads(
        [
            threading.Thread(target=worker, args=(client, f"w{i}"), name=f"w{i}")
            for i, client in enumerate([holder, waiter, holder, waiter])
        ]
    )
    assert errors == []
    assert overlaps == [], "two workers were inside the lock at once"
    assert holder.get(counter_path)[0] == str(4 * rounds).encode()
    assert holder.get_children(lock_path) == []


def test_lock_released_when_holder_session_ends(target: Target, new_client: ClientMaker) -> None:
    holder, waiter = new_client(), new_client()
    lock_path = f"{target.base}/lock"
    assert holder.Lock(lock_path, "holder").acquire(timeout=WAIT)
    granted = threading.Event()
    lock = waiter.Lock(lock_path, "waiter")

    def wait_for_lock() -> None:
        if lock.acquire(timeout=WAIT):
            granted.set()

    thread = threading.Thread(target=wait_for_lock, name="waiter")
    thread.start()
    wait_for(
        lambda: len(lock.contenders()) == 2,
        timeout=WAIT,
        message="the waiter queued behind the holder",
    )
    assert not granted.wait(ABSENCE), "the lock was granted while held"
    holder.stop()  # the session ends: its ephemeral lock node goes
    assert granted.wait(WAIT), "the lock was not handed on when the holder's session ended"
    thread.join(WAIT)
    lock.release()


# -------------------------------------------------------------------- Election


def test_election(target: Target, new_client: ClientMaker) -> None:
    path = f"{target.base}/election"
    leaders: queue.Queue[str] = queue.Queue()
    step_down = {name: threading.Event() for name in ("alpha", "beta")}
    elections = {name: new_client().Election(path, name) for name in ("alpha", "beta")}

    def lead(name: str) -> None:
        leaders.put(name)
        step_down[name].wait(4 * WAIT)

    threads = {
        name: threading.Thread(target=election.run, args=(lead, name), name=name, daemon=True)
        for name, election in elections.items()
    }
    threads["alpha"].start()
    assert _next(leaders, "first leader") == "alpha"
    threads["beta"].start()
    wait_for(
        lambda: len(elections["alpha"].contenders()) == 2, timeout=WAIT, message="both contenders"
    )
    assert elections["beta"].contenders() == ["alpha", "beta"]
    assert leaders.empty(), "two leaders at once"

    step_down["alpha"].set()
    assert _next(leaders, "next leader") == "beta"
    threads["alpha"].join(WAIT)
    assert elections["alpha"].contenders() == ["beta"]
    step_down["beta"].set()
    threads["beta"].join(WAIT)
    assert not threads["beta"].is_alive()


# --------------------------------------------------------------------- Counter


def test_counter(target: Target, new_client: ClientMaker) -> None:
    one, two = new_client(), new_client()
    path = f"{target.base}/counter"
    rounds, errors = 15, []

    def add(client: KazooClient, name: str) -> None:
        counter = client.Counter(path)
        try:
            for _ in range(rounds):
                counter += 1
        except Exception as exc:
            errors.append(f"{name}: {exc!r}")

    _run_threads(
        [
            threading.Thread(target=add, args=(client, f"c{i}"), name=f"c{i}")
            for i, client in enumerate([one, two, one, two])
        ]
    )
    assert errors == []
    counter = one.Counter(path)
    assert counter.value == 4 * rounds
    counter -= 5
    assert (counter.pre_value, counter.post_value) == (4 * rounds, 4 * rounds - 5)
    assert two.Counter(path).value == 4 * rounds - 5

    floating = one.Counter(f"{target.base}/float", default=0.5)
    floating += 1.25
    assert two.Counter(f"{target.base}/float", default=0.0).value == 1.75

    # Curator's SharedCount layout: a big-endian 4-byte int.
    curator = one.Counter(f"{target.base}/curator", support_curator=True)
    curator += 7
    assert two.get(f"{target.base}/curator")[0] == (7).to_bytes(4, "big")


# --------------------------------------------------------------------- Barrier


def test_barrier(target: Target, new_client: ClientMaker) -> None:
    owner, waiter = new_client(), new_client()
    path = f"{target.base}/barrier"
    owner.Barrier(path).create()
    barrier = waiter.Barrier(path)
    assert barrier.wait(timeout=ABSENCE) is False, "the barrier opened while it stood"
    opened: queue.Queue[bool] = queue.Queue()
    thread = threading.Thread(target=lambda: opened.put(barrier.wait(timeout=WAIT)), name="wait")
    thread.start()
    owner.Barrier(path).remove()
    assert _next(opened, "barrier to open") is True
    thread.join(WAIT)


def test_double_barrier(target: Target, new_client: ClientMaker) -> None:
    path = f"{target.base}/double"
    barriers = [new_client().DoubleBarrier(path, 2, identifier=f"p{i}") for i in range(2)]
    entered = [threading.Event() for _ in barriers]
    left = [threading.Event() for _ in barriers]
    may_leave = threading.Event()

    def participate(index: int) -> None:
        barriers[index].enter()
        entered[index].set()
        may_leave.wait(WAIT)
        barriers[index].leave()
        left[index].set()

    threads = [
        threading.Thread(target=participate, args=(i,), name=f"p{i}", daemon=True) for i in (0, 1)
    ]
    threads[0].start()
    assert not entered[0].wait(ABSENCE), "entered a double barrier alone"
    threads[1].start()
    assert all(event.wait(WAIT) for event in entered), "both did not get in together"
    may_leave.set()
    assert all(event.wait(WAIT) for event in left), "both did not get out"
    for thread in threads:
        thread.join(WAIT)


# ----------------------------------------------------------------------- Queue


def test_queue_priority_order(target: Target, new_client: ClientMaker) -> None:
    producer, consumer = new_client(), new_client()
    path = f"{target.base}/queue"
    sink = producer.Queue(path)
    for value, priority in [(b"low", 200), (b"first", 100), (b"second", 100), (b"urgent", 1)]:
        sink.put(value, priority=priority)
    source = consumer.Queue(path)
    assert len(source) == 4
    assert [source.get() for _ in range(4)] == [b"urgent", b"first", b"second", b"low"]
    assert source.get() is None
    assert len(source) == 0


def test_locking_queue(target: Target, new_client: ClientMaker) -> None:
    producer, one, two = new_client(), new_client(), new_client()
    path = f"{target.base}/lqueue"
    producer.LockingQueue(path).put_all([b"a", b"b", b"c"])
    first, second = one.LockingQueue(path), two.LockingQueue(path)

    assert first.get(timeout=WAIT) == b"a"
    assert first.holds_lock()
    assert second.get(timeout=WAIT) == b"b", "a locked entry was handed out twice"
    assert second.consume()
    assert first.release()  # not consumed: "a" goes back for someone else
    assert second.get(timeout=WAIT) == b"a"
    assert second.consume()
    assert first.get(timeout=WAIT) == b"c"
    assert first.consume()
    assert len(first) == 0
    assert first.get(timeout=ABSENCE) is None


# ----------------------------------------------------------------------- Party


def test_party(target: Target, new_client: ClientMaker) -> None:
    path = f"{target.base}/party"
    watcher = new_client()
    members = {name: new_client() for name in ("ann", "bob", "cat")}
    parties = {name: client.Party(path, name) for name, client in members.items()}
    for party in parties.values():
        party.join()
    view = watcher.Party(path)
    assert sorted(view) == ["ann", "bob", "cat"]
    assert len(view) == 3

    parties["ann"].leave()
    members["bob"].stop()  # bob's session ends: his membership is ephemeral
    assert sorted(view) == ["cat"]
    assert len(view) == 1

    shallow = [new_client().ShallowParty(f"{target.base}/shallow", name) for name in ("x", "y")]
    for party in shallow:
        party.join()
    assert sorted(watcher.ShallowParty(f"{target.base}/shallow")) == ["x", "y"]


# ------------------------------------------------------- ChildrenWatch, DataWatch


def test_children_watch(target: Target, new_client: ClientMaker) -> None:
    client, writer = new_client(), new_client()
    path = f"{target.base}/kids"
    client.create(path, makepath=True)
    calls: queue.Queue[list[str]] = queue.Queue()
    stop = threading.Event()

    def on_children(children: list[str]) -> bool | None:
        calls.put(sorted(children))
        return False if stop.is_set() else None

    ChildrenWatch(client, path, on_children)
    assert _next(calls, "the initial call") == []
    writer.create(f"{path}/a")
    assert _next(calls, "a call after a create") == ["a"]
    writer.create(f"{path}/b", ephemeral=True)
    assert _next(calls, "a call after a second create") == ["a", "b"]
    writer.delete(f"{path}/a")
    assert _next(calls, "a call after a delete") == ["b"]
    stop.set()  # the next call returns False: kazoo stops watching
    writer.stop()  # the ephemeral b goes with its session
    assert _next(calls, "a call after the session end") == []
    client.create(f"{path}/c")
    client.sync(path)
    assert calls.empty(), "ChildrenWatch called again after returning False"


def test_data_watch(target: Target, new_client: ClientMaker) -> None:
    client, writer = new_client(), new_client()
    path = f"{target.base}/datum"
    calls: queue.Queue[tuple[bytes | None, int | None]] = queue.Queue()

    def on_data(data: bytes | None, stat: Any) -> None:
        calls.put((data, None if stat is None else stat.version))

    DataWatch(client, path, on_data)
    assert _next(calls, "the initial call") == (None, None)
    writer.create(path, b"one", makepath=True)
    assert _next(calls, "a call after create") == (b"one", 0)
    writer.set(path, b"two")
    assert _next(calls, "a call after set") == (b"two", 1)
    writer.delete(path)
    assert _next(calls, "a call after delete") == (None, None)
    writer.create(path, b"again")
    assert _next(calls, "a call after re-create") == (b"again", 0)


# ------------------------------------------------------------------- TreeCache


def test_tree_cache(target: Target, new_client: ClientMaker) -> None:
    client, writer = new_client(), new_client()
    root = f"{target.base}/tree"
    writer.create(f"{root}/pre/inner", b"i", makepath=True)
    events: queue.Queue[tuple[int, str | None, bytes | None]] = queue.Queue()

    def listen(event: TreeEvent) -> None:
        data = event.event_data
        events.put((event.event_type, getattr(data, "path", None), getattr(data, "data", None)))

    cache = TreeCache(client, root)
    cache.listen(listen)
    cache.start()
    try:
        initial = set()
        while (event := _next(events, "the initial load"))[0] != TreeEvent.INITIALIZED:
            initial.add(event)
        assert initial == {
            (TreeEvent.NODE_ADDED, root, b""),
            (TreeEvent.NODE_ADDED, f"{root}/pre", b""),
            (TreeEvent.NODE_ADDED, f"{root}/pre/inner", b"i"),
        }

        writer.create(f"{root}/a", b"1")
        assert _next(events, "NODE_ADDED") == (TreeEvent.NODE_ADDED, f"{root}/a", b"1")
        writer.set(f"{root}/a", b"2")
        assert _next(events, "NODE_UPDATED") == (TreeEvent.NODE_UPDATED, f"{root}/a", b"2")
        writer.create(f"{root}/a/deep", b"d")
        assert _next(events, "a deep NODE_ADDED") == (TreeEvent.NODE_ADDED, f"{root}/a/deep", b"d")
        writer.delete(f"{root}/a/deep")
        assert _next(events, "NODE_REMOVED") == (TreeEvent.NODE_REMOVED, f"{root}/a/deep", b"d")
        writer.delete(f"{root}/pre", recursive=True)
        removed = {_next(events, "NODE_REMOVED"), _next(events, "NODE_REMOVED")}
        assert removed == {
            (TreeEvent.NODE_REMOVED, f"{root}/pre/inner", b"i"),
            (TreeEvent.NODE_REMOVED, f"{root}/pre", b""),
        }

        node = cache.get_data(f"{root}/a")
        assert node is not None and node.data == b"2" and node.stat.version == 1
        assert cache.get_children(root) == frozenset({"a"})
        assert cache.get_data(f"{root}/pre") is None
    finally:
        cache.close()
