"""The fan-in's bookkeeping: the merge it computes, and what that costs in memory.

The fan-in keeps each upstream's records filed under the endpoint id and
finds a winner by looking the endpoint up per upstream (see "Memory" in
:mod:`dispatcher.core.fanin`). Here a randomized run checks that compact
bookkeeping against a plain model of the documented rules (precedence, the
smallest id within one upstream, loop prevention, exact listings, the probe
overlay) after every event, and the subscribers' deltas for exactness; and
tracemalloc checks the 1 KiB per instance budget of issue #4 with the
records the benchmark uses, after a listing and after churn.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
import trio
import trio.testing

from bench.fanin_load import FeedUpstream, realistic_instances
from dispatcher.core.fanin import EXPORTED_BY, FanIn, combine_health, endpoint_id
from dispatcher.core.model import Health, Instance, Source
from dispatcher.core.snapshot import Change, Delta, Put, Remove
from dispatcher.core.subscriptions import EVERYTHING
from dispatcher.core.upstream import Changed, Listing, UpstreamEvent
from tests.test_fanin import Recorder, ScriptedUpstream, running

NODE = "node-1"
SERVICES = ("orders", "pay")
IDS = tuple(f"i{n}" for n in range(6))
# Few endpoints for many ids: records collide on endpoints and move between them.
# The IPv6 host checks the bracketed endpoint id on the same paths.
HOSTS = ("10.0.0.1", "10.0.0.2", "fe80::1")
PORTS = (80, 81)


# ------------------------------------------------------------------ the model


@attrs.define
class Model:
    """The merge rules written plainly: what the snapshot must hold after each event."""

    ranks: dict[str, int]
    #: upstream -> (service, its id) -> its record (after loop prevention).
    held: dict[str, dict[tuple[str, str], Instance]] = attrs.field(factory=dict)
    #: (service, endpoint id) -> the health checker's verdict.
    probe: dict[tuple[str, str], Health] = attrs.field(factory=dict)

    def apply(self, upstream: str, event: UpstreamEvent) -> None:
        held = self.held.setdefault(upstream, {})
        if isinstance(event, Listing):
            previous = dict(held)
            for key in [k for k in held if event.services is None or k[0] in event.services]:
                del held[key]
            for instance in event.instances:
                # Loop prevention comes first: a listing's later duplicate
                # replaces an earlier one only if it is not this node's own.
                if instance.metadata.get(EXPORTED_BY) != NODE:
                    held[(instance.service, instance.instance_id)] = instance
            # An exact diff: a record listed again with an equal value is not
            # a change, so the one held before (and its source) stays.
            for key, instance in held.items():
                if previous.get(key) == instance:
                    held[key] = previous[key]
        else:
            assert isinstance(event, Changed)
            for change in event.changes:
                if isinstance(change, Put):
                    self._put(held, change.instance)
                else:
                    held.pop((change.service, change.instance_id), None)
        merged = self.merged()
        self.probe = {key: v for key, v in self.probe.items() if key[1] in merged.get(key[0], {})}

    @staticmethod
    def _put(held: dict[tuple[str, str], Instance], instance: Instance) -> None:
        key = (instance.service, instance.instance_id)
        if instance.metadata.get(EXPORTED_BY) == NODE:
            held.pop(key, None)  # looped back: as if the upstream did not have it
        else:
            held[key] = instance

    def candidates(self, service: str, merged_id: str) -> list[Instance]:
        """Every upstream's record of one endpoint, in precedence order."""
        found = [
            (self.ranks[upstream], instance_id, instance)
            for upstream, held in self.held.items()
            for (s, instance_id), instance in held.items()
            if s == service and endpoint_id(instance.host, instance.port) == merged_id
        ]
        return [instance for _, _, instance in sorted(found, key=lambda f: f[:2])]

    def merged(self) -> dict[str, dict[str, Instance]]:
        endpoints = {
            (service, endpoint_id(instance.host, instance.port))
            for held in self.held.values()
            for (service, _), instance in held.items()
        }
        result: dict[str, dict[str, Instance]] = {}
        for service, merged_id in endpoints:
            winner = self.candidates(service, merged_id)[0]
            health = combine_health(winner.health, self.probe.get((service, merged_id)))
            result.setdefault(service, {})[merged_id] = attrs.evolve(
                winner, instance_id=merged_id, health=health
            )
        return result


def random_record(rng: random.Random, upstream: str, service: str | None = None) -> Instance:
    service = service or rng.choice(SERVICES)
    instance_id = rng.choice(IDS)
    metadata = {"v": rng.choice("12")}
    if rng.random() < 0.08:
        metadata[EXPORTED_BY] = rng.choice((NODE, "node-2"))
    return Instance(
        service,
        instance_id,
        rng.choice(HOSTS),
        rng.choice(PORTS),
        weight=rng.choice((1, 2)),
        health=rng.choice(list(Health)),
        metadata=metadata,
        source=Source(upstream, f"/{service}/{instance_id}", rng.randrange(1000)),
    )


def random_event(rng: random.Random, upstream: str) -> UpstreamEvent:
    roll = rng.random()
    if roll < 0.15:
        return Listing(tuple(random_record(rng, upstream) for _ in range(rng.randrange(8))))
    if roll < 0.25:
        service = rng.choice(SERVICES)
        records = tuple(random_record(rng, upstream, service) for _ in range(rng.randrange(5)))
        return Listing(records, services=frozenset({service}))
    changes: list[Change] = []
    for _ in range(rng.randrange(1, 5)):
        if rng.random() < 0.3:
            changes.append(Remove(rng.choice(SERVICES), rng.choice(IDS)))
        else:
            changes.append(Put(random_record(rng, upstream)))
    return Changed(tuple(changes))


class Replica:
    """A subscriber's copy built from deltas alone, checking that each one is exact."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Instance]] = {}
        self.versions: dict[str, int] = {}

    def apply(self, deltas: Iterable[Delta]) -> None:
        for delta in deltas:
            assert delta.from_version == self.versions.get(delta.service, 0), "a gap"
            self.versions[delta.service] = delta.to_version
            held = self.state.setdefault(delta.service, {})
            assert delta.added or delta.updated or delta.removed, "an empty delta"
            for instance in delta.removed:
                assert held.pop(instance.instance_id) == instance
            for instance in delta.added:
                assert instance.instance_id not in held
                held[instance.instance_id] = instance
            for instance in delta.updated:
                # An update that changes nothing would be noise the fan-in exists to absorb.
                assert held[instance.instance_id] != instance
                held[instance.instance_id] = instance
            if not held:
                del self.state[delta.service]


async def test_the_compact_bookkeeping_merges_exactly_as_the_rules_say() -> None:
    rng = random.Random(4)
    names = ("a", "b", "c")
    upstreams = [ScriptedUpstream(name) for name in names]
    model = Model({name: rank for rank, name in enumerate(names)})
    fanin = FanIn(NODE)
    async with running(fanin, *upstreams):
        recorder = Recorder(fanin, *SERVICES)
        replica = Replica()
        for step in range(1000):
            before = model.merged()
            version = fanin.snapshot.version
            if step % 10 == 9 and before:
                # The health checker's verdicts, some withdrawn, some for gone instances.
                results: list[tuple[str, str, Health | None]] = []
                for service, instances in before.items():
                    for merged_id in instances:
                        verdict = rng.choice((None, Health.PASSING, Health.FAILING))
                        results.append((service, merged_id, verdict))
                        if verdict is None:
                            model.probe.pop((service, merged_id), None)
                        else:
                            model.probe[(service, merged_id)] = verdict
                results.append(("orders", "10.9.9.9:1", Health.FAILING))
                fanin.set_probe_health(results)
            else:
                upstream = rng.choice(upstreams)
                event = random_event(rng, upstream.name)
                # One event per batch, so that the model's per-event view of
                # "the endpoint left" (which drops its verdict) is the fan-in's.
                await upstream.send(event)
                model.apply(upstream.name, event)

            expected = model.merged()
            actual = {s: dict(fanin.snapshot.full(s).instances) for s in SERVICES}
            assert {s: i for s, i in actual.items() if i} == expected, f"step {step}"
            # A version exactly when something a consumer can see changed.
            assert (fanin.snapshot.version != version) == (expected != before), f"step {step}"
            replica.apply(recorder.drain())
            assert replica.state == expected, f"step {step}"
            for service, instances in expected.items():
                for merged_id, merged in instances.items():
                    reports = fanin.reports(service, merged.host, merged.port)
                    wanted = model.candidates(service, merged_id)
                    # As the upstreams sent them: their own ids and sources.
                    assert [(r, r.source) for r in reports] == [(w, w.source) for w in wanted]
                    assert fanin.probe_health(service, merged_id) is model.probe.get(
                        (service, merged_id)
                    )
        recorder.subscription.close()


async def test_one_upstream_reporting_an_endpoint_under_several_ids_then_moving_one() -> None:
    fanin = FanIn(NODE)
    a = ScriptedUpstream("a")

    def record(instance_id: str, port: int, weight: int) -> Instance:
        source = Source("a", f"/orders/{instance_id}")
        return Instance("orders", instance_id, "10.0.0.1", port, weight=weight, source=source)

    async with running(fanin, a):
        await a.send(Listing((record("c", 80, 3), record("b", 80, 2), record("a", 80, 1))))
        assert fanin.snapshot.full("orders").instances["10.0.0.1:80"].weight == 1
        assert [r.instance_id for r in fanin.reports("orders", "10.0.0.1", 80)] == ["a", "b", "c"]
        # The winning id moves away: the next smallest takes over the endpoint.
        await a.send(Changed((Put(record("a", 81, 1)),)))
        instances = fanin.snapshot.full("orders").instances
        assert (instances["10.0.0.1:80"].weight, instances["10.0.0.1:81"].weight) == (2, 1)
        assert [r.instance_id for r in fanin.reports("orders", "10.0.0.1", 80)] == ["b", "c"]
        await a.send(Changed((Remove("orders", "b"), Put(record("c", 81, 3)))))
        assert list(fanin.snapshot.full("orders").instances) == ["10.0.0.1:81"]
        assert [r.weight for r in fanin.reports("orders", "10.0.0.1", 81)] == [1, 3]
        assert fanin.reports("orders", "10.0.0.1", 80) == ()


async def test_a_record_already_under_its_endpoint_id_is_served_as_sent() -> None:
    fanin = FanIn(NODE)
    a = ScriptedUpstream("a")
    record = Instance(
        "orders", "10.0.0.1:80", "10.0.0.1", 80, weight=7, source=Source("a", "/orders/x")
    )
    async with running(fanin, a):
        await a.send(Listing((record,)))
        assert fanin.snapshot.full("orders").instances == {"10.0.0.1:80": record}
        assert fanin.reports("orders", "10.0.0.1", 80) == (record,)
        # Listing it again unchanged is no change.
        version = fanin.snapshot.version
        await a.send(Listing((record,)))
        assert fanin.snapshot.version == version


# ------------------------------------------------------------------ memory

#: The target of issue #4 (and of bench/fanin.py): everything the fan-in keeps,
#: the upstreams' records included, per instance.
BUDGET = 1024
#: What dispatcher/core/fanin.py and dispatcher/core/snapshot.py themselves allocate per
#: instance: the record under the endpoint id (120 B), the endpoint id string
#: (~65 B), two dict slots in the fan-in and one in the snapshot. 286 B today.
OWN_BUDGET = 320
COUNT = 2000
_OWN = (str(Path("dispatcher", "fanin.py")), str(Path("dispatcher", "snapshot.py")))


def _bumped(round_: int) -> Callable[[Instance], Instance]:
    def bump(instance: Instance) -> Instance:
        assert instance.source is not None
        source = attrs.evolve(instance.source, revision=instance.source.revision + round_)
        return attrs.evolve(instance, weight=100 + round_, source=source)

    return bump


async def test_memory_per_instance_stays_under_a_kibibyte_after_a_listing_and_churn() -> None:
    fanin = FanIn("bench-memory")
    upstream = FeedUpstream("feed")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        subscription = fanin.subscribe([EVERYTHING])
        send = await upstream.running()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        tracemalloc.start()
        try:
            start = tracemalloc.take_snapshot()

            def per_instance() -> tuple[float, float]:
                gc.collect()
                stats = tracemalloc.take_snapshot().compare_to(start, "filename")
                total = sum(stat.size_diff for stat in stats)
                own = sum(
                    stat.size_diff for stat in stats if stat.traceback[0].filename.endswith(_OWN)
                )
                return total / COUNT, own / COUNT

            # Built inside the send, as in bench/fanin.py: only the fan-in keeps them.
            await send.send(Listing(tuple(realistic_instances(COUNT))))
            await trio.testing.wait_all_tasks_blocked()
            listed = per_instance()

            # Churn: every instance updated three times, a tenth removed and
            # re-added in the same batch. Memory must not grow with history
            # (copies of ids or endpoint strings kept beside the current ones).
            for round_ in range(1, 4):
                bump = _bumped(round_)
                rng = random.Random(round_)
                changes: list[Change] = []
                for instance in realistic_instances(COUNT):
                    if rng.random() < 0.1:
                        changes.append(Remove(instance.service, instance.instance_id))
                    changes.append(Put(bump(instance)))
                await send.send(Changed(tuple(changes)))
                del changes
                await trio.testing.wait_all_tasks_blocked()
            churned = per_instance()
        finally:
            tracemalloc.stop()
        assert sum(len(fanin.snapshot[s].instances) for s in fanin.snapshot) == COUNT
        snapshot = fanin.snapshot
        assert all(i.weight == 103 for s in snapshot for i in snapshot[s].instances.values())
        subscription.close()
        nursery.cancel_scope.cancel()
    for label, (total, own) in (("after the listing", listed), ("after churn", churned)):
        assert total <= BUDGET, f"{label}: {total:.0f} B per instance"
        assert own <= OWN_BUDGET, f"{label}: the fan-in and snapshot keep {own:.0f} B per instance"
    assert churned[0] <= listed[0] + 8, f"grew with churn: {listed[0]:.0f} -> {churned[0]:.0f}"
