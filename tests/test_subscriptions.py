"""Subscriptions: a full entry first, then chained deltas; slow subscribers collapse, never gap.

Consumers are checked with :class:`Mirror`, which applies updates the way a
real consumer would and asserts the promises they rely on: versions never go
down, a service starts with a full entry, and each delta starts at the
version the consumer last saw. At the end its state must equal the snapshot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any

import pytest
import trio
import trio.testing

from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Instance, Source
from dispatcher.core.snapshot import Put, Remove, Snapshot
from dispatcher.core.subscriptions import Subscription, SubscriptionHub, Update
from dispatcher.core.upstream import Changed, Listing
from tests.test_fanin import ScriptedUpstream, running


def inst(name: str, service: str = "orders", port: int = 8080, **kw: Any) -> Instance:
    return Instance(service, name, "10.0.0.1", port, source=Source("a", name), **kw)


class Mirror:
    """A consumer's copy of some services, built only from updates."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Instance]] = {}
        self.versions: dict[str, int] = {}
        self.last = 0
        self.fulls = 0
        self.deltas = 0

    def apply(self, update: Update) -> None:
        assert update.version >= self.last, "versions went down"
        self.last = update.version
        service = update.service
        if update.full is not None:
            assert update.delta is None
            assert update.full.service == service
            assert update.full.version >= self.versions.get(service, 0)
            assert update.full.version <= update.version
            self.state[service] = dict(update.full.instances)
            self.versions[service] = update.full.version
            self.fulls += 1
            return
        delta = update.delta
        assert delta is not None and delta.service == service
        assert service in self.versions, "a delta before the first full entry"
        assert delta.from_version == self.versions[service], "a gap"
        assert delta.to_version == update.version
        held = self.state[service]
        for instance in delta.removed:
            del held[instance.instance_id]
        for instance in delta.added:
            assert instance.instance_id not in held
            held[instance.instance_id] = instance
        for instance in delta.updated:
            assert instance.instance_id in held
            held[instance.instance_id] = instance
        self.versions[service] = delta.to_version
        self.deltas += 1

    def drain(self, subscription: Subscription) -> int:
        """Apply everything that is ready now; return how many updates that was."""
        count = 0
        while (update := subscription._next_ready()) is not None:
            self.apply(update)
            count += 1
        return count

    def assert_matches(self, snapshot: Snapshot, services: Iterable[str]) -> None:
        for service in services:
            entry = snapshot.full(service)
            assert self.state.get(service, {}) == dict(entry.instances), service
            assert self.versions.get(service) == entry.version, service


async def next_update(subscription: Subscription) -> Update:
    with trio.fail_after(10):
        return await subscription.__anext__()


# -------------------------------------------------------------- the basics


async def test_first_a_full_entry_per_key_then_deltas() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        await a.send(Listing((inst("x"), inst("p", service="pay"))))
        async with fanin.subscribe(["orders", "pay", "unknown"]) as sub:
            mirror = Mirror()
            firsts = [await next_update(sub) for _ in range(3)]
            for update in firsts:
                mirror.apply(update)
            assert sorted(u.service for u in firsts) == ["orders", "pay", "unknown"]
            assert all(u.full is not None for u in firsts)
            assert firsts[2].full is not None and dict(firsts[2].full.instances) == {}

            await a.send(Changed((Put(inst("y", port=9)),)))
            update = await next_update(sub)
            assert update.delta is not None and update.full is None
            mirror.apply(update)
            assert sub.pending == 0
            mirror.assert_matches(fanin.snapshot, ["orders", "pay", "unknown"])


async def test_everything_subscriber_gets_a_full_entry_for_each_new_service() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        await a.send(Listing((inst("x"),)))
        async with fanin.subscribe(["*", "orders"]) as sub:
            assert sub.keys == frozenset({"*"})
            mirror = Mirror()
            mirror.apply(await next_update(sub))
            await a.send(Changed((Put(inst("p", service="pay")),)))
            update = await next_update(sub)
            assert update.service == "pay" and update.full is not None
            mirror.apply(update)
            await a.send(Changed((Put(inst("q", service="pay", port=1)),)))
            update = await next_update(sub)
            assert update.delta is not None  # known now: deltas from here on
            mirror.apply(update)
            mirror.assert_matches(fanin.snapshot, ["orders", "pay"])


async def test_versions_only_grow_and_deltas_chain_under_random_load() -> None:
    rng = random.Random(20240611)
    services = ["orders", "pay", "users"]
    fanin = FanIn("node-1", subscriber_queue=3)
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        subs = [fanin.subscribe(services), fanin.subscribe(["*"]), fanin.subscribe(["pay"])]
        mirrors = [Mirror() for _ in subs]
        for _ in range(400):
            changes = []
            for _ in range(rng.randint(1, 4)):
                service = rng.choice(services)
                port = rng.randint(1, 6)
                if rng.random() < 0.3:
                    changes.append(Remove(service, f"i{port}"))
                else:
                    changes.append(Put(inst(f"i{port}", service, port, weight=rng.randint(0, 3))))
            if rng.random() < 0.5:
                await a.send(Changed(tuple(changes)))
            else:
                a.send_now(Changed(tuple(changes)))
            for sub, mirror in zip(subs, mirrors, strict=True):
                if rng.random() < 0.3:
                    mirror.drain(sub)
        await trio.testing.wait_all_tasks_blocked()
        for sub, mirror in zip(subs, mirrors, strict=True):
            mirror.drain(sub)
        mirrors[0].assert_matches(fanin.snapshot, services)
        mirrors[1].assert_matches(fanin.snapshot, services)
        mirrors[2].assert_matches(fanin.snapshot, ["pay"])
        assert any(sub.collapses for sub in subs), "the load never filled a queue"


# --------------------------------------------------------- slow subscribers


def _versions(count: int) -> list[tuple[Snapshot, tuple]]:
    snapshot = Snapshot()
    steps = []
    for n in range(count):
        snapshot, deltas = snapshot.apply([Put(inst("x", weight=n))])
        steps.append((snapshot, deltas))
    return steps


async def test_a_full_queue_collapses_into_one_full_entry_at_the_current_version() -> None:
    hub = SubscriptionHub(max_queue=2)
    slow = hub.subscribe(["orders"])
    mirror = Mirror()
    mirror.drain(slow)  # the first (empty) full entry
    for snapshot, deltas in _versions(10):
        hub.publish(snapshot, deltas)
    assert slow.collapses == 1
    assert slow.pending == 1
    update = await next_update(slow)
    assert update.full is not None
    assert update.version == 10 and update.full.version == 10
    assert update.full.instances["x"].weight == 9
    mirror.apply(update)
    assert slow.pending == 0
    # After the collapse, deltas again, chaining on the full entry.
    snapshot, deltas = hub.snapshot.apply([Remove("orders", "x")])
    hub.publish(snapshot, deltas)
    mirror.apply(await next_update(slow))
    mirror.assert_matches(snapshot, ["orders"])


async def test_a_slow_subscriber_never_blocks_the_others_and_sees_no_gap() -> None:
    fanin = FanIn("node-1", subscriber_queue=4)
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        fast = fanin.subscribe(["orders", "pay"])
        slow = fanin.subscribe(["orders", "pay"])
        fast_mirror, slow_mirror = Mirror(), Mirror()
        slow_mirror.drain(slow)  # it reads its first entries, then stalls

        async def read_fast(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            async for update in fast:
                fast_mirror.apply(update)

        async with trio.open_nursery() as nursery:
            await nursery.start(read_fast)
            for n in range(50):
                service = "pay" if n % 5 == 0 else "orders"
                # a.send returns once every task is blocked: the fan-in has
                # published, and the fast reader has read everything.
                await a.send(Changed((Put(inst(f"i{n % 7}", service, n % 7, weight=n)),)))
                assert fast.pending == 0
                # The slow one holds at most its bound plus one entry per service.
                assert slow.pending <= 4 + 2
            fast.close()

        assert fast_mirror.fulls == 2 and fast_mirror.deltas == 50
        assert slow.collapses >= 1
        slow_mirror.drain(slow)
        # The first two, then at most one per service: the deltas it missed
        # are not replayed, it jumps to the current state.
        assert slow_mirror.fulls <= 2 + 2
        assert slow_mirror.deltas < 50
        fast_mirror.assert_matches(fanin.snapshot, ["orders", "pay"])
        slow_mirror.assert_matches(fanin.snapshot, ["orders", "pay"])


# ------------------------------------------------------------ interest


async def test_ten_thousand_subscribers_cost_one_interest_and_all_get_the_publish() -> None:
    fanin = FanIn("node-1", interest="subscribed")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        assert a.interest_calls == [frozenset()]  # nothing wanted yet: load nothing
        started = time.perf_counter()
        subs = [fanin.subscribe(["orders"]) for _ in range(10_000)]
        subscribed = time.perf_counter() - started
        assert a.interest_calls == [frozenset(), frozenset({"orders"})]
        assert fanin.hub.interest_added == 1
        assert fanin.hub.subscriber_count == 10_000
        for sub in subs:
            update = await next_update(sub)
            assert update.full is not None and not update.full.instances

        started = time.perf_counter()
        await a.send(Listing((inst("x"),), services=frozenset({"orders"})))
        updates = [await next_update(sub) for sub in subs]
        delivered = time.perf_counter() - started
        assert all(
            u.delta is not None and [i.instance_id for i in u.delta.added] == ["10.0.0.1:8080"]
            for u in updates
        )
        print(
            f"\n10,000 subscribers: subscribe {subscribed * 1000:.1f} ms, "
            f"publish + one read each {delivered * 1000:.1f} ms"
        )
        assert delivered < 30, "a publish to 10k subscribers took absurdly long"
        for sub in subs:
            sub.close()
        assert a.interest_calls[-1] == frozenset()
        assert fanin.hub.interest_removed == 1


async def test_unsubscribe_on_context_exit_and_a_blocked_reader_stops() -> None:
    fanin = FanIn("node-1", interest="subscribed")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        async with fanin.subscribe(["orders"]) as sub:
            await next_update(sub)
            assert fanin.hub.interest == frozenset({"orders"})
        assert sub.closed
        assert fanin.hub.subscriber_count == 0
        assert fanin.hub.interest == frozenset()
        assert a.interest_calls[-1] == frozenset()

        other = fanin.subscribe(["orders"])
        await next_update(other)
        seen: list[Update] = []

        async def reader() -> None:
            async for update in other:
                seen.append(update)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                other.close()  # the reader wakes and its loop ends
        assert seen == []


async def test_the_last_leaver_drops_the_interest_and_the_service() -> None:
    fanin = FanIn("node-1", interest="subscribed")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        first = fanin.subscribe(["orders"])
        second = fanin.subscribe(["orders", "pay"])
        assert a.interest_calls[-1] == frozenset({"orders", "pay"})
        await a.send(Listing((inst("x"), inst("p", service="pay"))))
        assert set(fanin.snapshot) == {"orders", "pay"}

        calls = len(a.interest_calls)
        first.close()
        assert len(a.interest_calls) == calls  # "orders" still has a subscriber
        second.close()
        assert a.interest_calls[-1] == frozenset()
        # Nobody watches them upstream any more: they must not linger stale.
        assert len(fanin.snapshot) == 0
        # A late event for a service nobody wants is ignored.
        await a.send(Changed((Put(inst("y", port=2)),)))
        assert len(fanin.snapshot) == 0


async def test_an_everything_subscriber_asks_upstreams_for_everything() -> None:
    fanin = FanIn("node-1", interest="subscribed")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        async with fanin.subscribe(["orders"]), fanin.subscribe(["*"]):
            assert a.interest_calls[-1] is None
        assert a.interest_calls[-1] == frozenset()


async def test_interest_all_never_narrows_the_upstreams() -> None:
    fanin = FanIn("node-1")
    a = ScriptedUpstream("a")
    async with running(fanin, a):
        async with fanin.subscribe(["orders"]):
            pass
        assert a.interest_calls == []


# ------------------------------------------------------------ misuse


async def test_subscribe_checks_its_keys() -> None:
    hub = SubscriptionHub()
    with pytest.raises(ValueError):
        hub.subscribe([])
    with pytest.raises(ValueError):
        hub.subscribe([""])
    with pytest.raises(ValueError):
        hub.subscribe(["orders"], max_queue=0)


async def test_one_reader_at_a_time() -> None:
    hub = SubscriptionHub()
    sub = hub.subscribe(["orders"])
    await next_update(sub)

    async def first_reader() -> None:
        with pytest.raises(StopAsyncIteration):
            await sub.__anext__()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_reader)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await sub.__anext__()
        sub.close()
