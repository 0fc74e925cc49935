"""``bench/fanin.py``'s in-process parts: the apply rate and the memory per instance.

Both drive a real :class:`~dispatcher.core.fanin.FanIn` through its public
``run`` with a :class:`FeedUpstream`, an adapter whose events the benchmark
sends (as ``tests/test_fanin.py``'s ScriptedUpstream does), so that what is
measured is the fan-in alone: the forwarder, the consumer's merge, one
:meth:`Snapshot.apply` per batch and the publication to subscribers. The
instances are built before the clock starts, the way an adapter would build
them (each one parsed from its plain-layout JSON, so metadata values are
fresh strings per instance exactly as in production), and one subscriber to
``*`` drains every update, as the ZooKeeper projection does.

The end of each timed phase is observed, not guessed: after the phase's
events the upstream sends one *marker* change (a service of its own), and the
phase ends when the subscriber reads it. Updates reach a subscriber in
publication order, so everything before the marker has been applied and
delivered by then.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, Self

import attrs
import trio

from adapters import layouts
from adapters.layouts import plain
from bench.loadgen import machine_busy_seconds
from dispatcher.cli import tune_gc
from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Instance, Source
from dispatcher.core.snapshot import Change, Put, Remove, Snapshot
from dispatcher.core.subscriptions import EVERYTHING, Subscription
from dispatcher.core.upstream import Changed, Listing, UpstreamEvent

__all__ = [
    "BATCHES",
    "ApplyPhase",
    "FeedUpstream",
    "MemoryResult",
    "apply_rate",
    "memory_worker",
    "realistic_instances",
]

BATCHES: Final = "Changed batches"
"""The name of the phase whose rate is the benchmark's headline apply rate."""

_MARKER_SERVICE = "zz.bench.marker"
_INSTANCES_PER_SERVICE = 100
_INSTANCES_PER_HOST = 20
_PHASE_TIMEOUT = 600.0


class FeedUpstream:
    """An :class:`~dispatcher.core.upstream.Upstream` whose events the benchmark sends itself."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: trio.MemorySendChannel[UpstreamEvent] | None = None
        self._running = trio.Event()

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Self:
        return cls(name)

    async def run(self, events: trio.MemorySendChannel[UpstreamEvent]) -> None:
        self.events = events
        self._running.set()
        await trio.sleep_forever()

    def set_interest(self, services: frozenset[str] | None) -> None:
        pass

    async def running(self) -> trio.MemorySendChannel[UpstreamEvent]:
        await self._running.wait()
        assert self.events is not None
        return self.events


# ------------------------------------------------------------------ instances


def _service(s: int) -> str:
    return f"com.example.service{s:05d}"


def realistic_instances(count: int, adapter: str = "feed") -> Iterator[Instance]:
    """``count`` instances as an adapter would hand them over.

    About 100 instances per service and 20 per host (one host runs many
    services, each on its own port), a 36-character id, three metadata keys
    (``version``, ``application``, ``env``), a zone, and a
    :class:`~dispatcher.core.model.Source` with its own key and a zxid-sized
    revision. Each is parsed from its plain-layout JSON, so every instance owns
    fresh copies of its metadata values and id, as a parsed record does.
    """
    services = max(1, count // _INSTANCES_PER_SERVICE)
    for i in range(count):
        s = i % services
        service = _service(s)
        h = i // _INSTANCES_PER_HOST
        record = {
            "host": f"10.{h // 65536 % 256}.{h // 256 % 256}.{h % 256}",
            "port": 20000 + s,
            "weight": 100,
            "zone": f"az{i % 3 + 1}",
            "metadata": {
                "version": f"1.{i % 7}.{i % 3}",
                "application": f"app-{s}",
                "env": "prod",
            },
        }
        instance_id = str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15) % (1 << 128)))
        source = Source(adapter, f"/services/{service}/{instance_id}", 0x1_0000_0000 + i)
        data = layouts.json_bytes(record)
        instance = plain.parse(service, instance_id, data, source=source)
        assert instance is not None, record
        yield instance


def _bumped(instance: Instance) -> Instance:
    """``instance`` with another weight and a newer revision: a real update."""
    source = instance.source
    assert source is not None
    return attrs.evolve(
        instance,
        weight=instance.weight % 200 + 1,
        source=attrs.evolve(source, revision=source.revision + 1),
    )


# ------------------------------------------------------------------ apply rate


@attrs.frozen
class ApplyPhase:
    """One timed phase: what was sent, how many instance changes it carried, how long it took."""

    name: str
    events: int
    changes: int
    seconds: float
    versions: int
    batches: int
    updates_read: int
    collapses: int
    #: Instances listed, for listing phases (their rate is also worth knowing).
    listed: int = 0
    #: Seconds spent in the garbage collector during the phase, and its full collections.
    gc_seconds: float = 0.0
    gc_full: int = 0
    gc_longest: float = 0.0
    #: CPU seconds of this process (all threads) during the phase.
    cpu_seconds: float = 0.0
    #: CPU seconds the whole machine was busy during the phase (all processes).
    machine_seconds: float = 0.0

    @property
    def other_cpu(self) -> float:
        """Share of one core that other processes used meanwhile (neighbours)."""
        if self.seconds <= 0:
            return 0.0
        return max(0.0, self.machine_seconds - self.cpu_seconds) / self.seconds

    @property
    def per_second(self) -> float:
        return self.changes / self.seconds if self.seconds > 0 else float("inf")


class GcClock:
    """Time spent in CPython's cyclic garbage collector, via ``gc.callbacks``.

    A snapshot of 100k instances is millions of GC-tracked objects, and a
    full (generation 2) collection walks all of them: that cost lands in
    whichever allocation triggered it, so a profiler blames random lines.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.longest = 0.0
        self.full = 0
        self._started = 0.0

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._started
            self.seconds += pause
            self.longest = max(self.longest, pause)
            self.full += info["generation"] == 2


class _Drain:
    """The one subscriber: reads every update; tells when a phase's marker arrived."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.updates = 0
        self.marker_weight = 0
        self._arrived = trio.Event()
        self._wanted = -1

    def expect(self, weight: int) -> trio.Event:
        self._wanted = weight
        self._arrived = trio.Event()
        return self._arrived

    async def run(self) -> None:
        async for update in self.subscription:
            self.updates += 1
            if update.service != _MARKER_SERVICE:
                continue
            instances: Sequence[Instance]
            if update.full is not None:
                instances = tuple(update.full.instances.values())
            else:
                assert update.delta is not None
                instances = (*update.delta.added, *update.delta.updated)
            for instance in instances:
                if instance.weight == self._wanted:
                    self._arrived.set()


def _marker(weight: int) -> Changed:
    return Changed((Put(Instance(_MARKER_SERVICE, "m", "127.0.0.1", 1, weight=weight)),))


async def _timed(
    fanin: FanIn,
    drain: _Drain,
    send: trio.MemorySendChannel[UpstreamEvent],
    name: str,
    events: Sequence[UpstreamEvent],
    changes: int,
    weight: int,
    listed: int = 0,
) -> ApplyPhase:
    counters = fanin.counters
    versions, batches = counters.versions, counters.batches
    updates, collapses = drain.updates, drain.subscription.collapses
    arrived = drain.expect(weight)
    marker = _marker(weight)
    # Whatever the benchmark allocated to prepare the phase (the adapter's
    # side of the work) must not push the fan-in into a full collection.
    gc.collect()
    with GcClock() as gc_clock:
        cpu = time.process_time()
        busy = machine_busy_seconds() or 0.0
        started = time.perf_counter()
        for event in events:
            await send.send(event)
        await send.send(marker)
        with trio.fail_after(_PHASE_TIMEOUT):
            await arrived.wait()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        busy = (machine_busy_seconds() or 0.0) - busy
    return ApplyPhase(
        name,
        len(events),
        changes,
        seconds,
        counters.versions - versions,
        counters.batches - batches,
        drain.updates - updates,
        drain.subscription.collapses - collapses,
        listed,
        gc_clock.seconds,
        gc_clock.full,
        gc_clock.longest,
        cpu,
        busy,
    )


def _count(snapshot: Snapshot) -> int:
    return sum(len(snapshot[s].instances) for s in snapshot if s != _MARKER_SERVICE)


async def apply_rate(
    count: int, *, batch: int = 1000, small_events: int = 20000, seed: int = 1
) -> list[ApplyPhase]:
    """Time the fan-in applying realistic load; see the module docstring.

    Phases: the initial :class:`Listing` of ``count`` instances; ``count``
    changes in :class:`Changed` events of ``batch`` changes each (90% weight
    updates, the rest removals of present and re-additions of removed
    instances); ``small_events`` Changed events of one update each (what a
    watch-driven adapter sends); a re-:class:`Listing` of everything in
    which 10% of the instances changed (a resync after a reconnect).
    """
    tune_gc()  # the collector settings every zkgate process runs with
    rng = random.Random(seed)
    originals = list(realistic_instances(count))
    fanin = FanIn("bench-apply")
    upstream = FeedUpstream("feed")
    phases: list[ApplyPhase] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        drain = _Drain(fanin.subscribe([EVERYTHING]))
        nursery.start_soon(drain.run)
        send = await upstream.running()

        current: list[Instance | None] = list(originals)
        phases.append(
            await _timed(
                fanin,
                drain,
                send,
                "initial listing",
                [Listing(tuple(originals))],
                count,
                1,
                listed=count,
            )
        )
        assert _count(fanin.snapshot) == count

        events: list[UpstreamEvent] = []
        for _ in range(max(1, count // batch)):
            changes: list[Change] = []
            for i in rng.sample(range(count), min(batch, count)):
                present = current[i]
                if present is not None and rng.random() >= 0.9:
                    current[i] = None
                    changes.append(Remove(present.service, present.instance_id))
                    continue
                value = _bumped(present if present is not None else originals[i])
                current[i] = value
                changes.append(Put(value))
            events.append(Changed(tuple(changes)))
        total = sum(len(e.changes) for e in events if isinstance(e, Changed))
        phases.append(await _timed(fanin, drain, send, f"{BATCHES} of {batch}", events, total, 2))
        present_now = sum(1 for i in current if i is not None)
        assert _count(fanin.snapshot) == present_now, (_count(fanin.snapshot), present_now)

        events = []
        present_ids = [i for i, value in enumerate(current) if value is not None]
        for i in rng.choices(present_ids, k=small_events):
            value = _bumped(current[i] or originals[i])
            current[i] = value
            events.append(Changed((Put(value),)))
        phases.append(
            await _timed(fanin, drain, send, "Changed, 1 change each", events, len(events), 3)
        )

        listing: list[Instance] = []
        changed = 0
        for i, value in enumerate(current):
            if value is None:
                continue
            if rng.random() < 0.1:
                value = current[i] = _bumped(value)
                changed += 1
            listing.append(value)
        phases.append(
            await _timed(
                fanin,
                drain,
                send,
                "resync listing (10% changed)",
                [Listing(tuple(listing))],
                changed,
                4,
                listed=len(listing),
            )
        )
        nursery.cancel_scope.cancel()
    return phases


# ------------------------------------------------------------------ memory


@attrs.frozen
class MemoryResult:
    """Memory a FanIn holds for ``count`` instances, three ways (bytes per instance).

    ``traced``: everything allocated while the instances were built and
    applied that is still alive afterwards (tracemalloc): the snapshot, the
    fan-in's own per-instance bookkeeping, and the instance records the
    adapter handed over (which the fan-in keeps as each upstream's report).
    ``snapshot``: the objects reachable from the snapshot alone, each counted
    once (``sys.getsizeof``), shared interned strings included.
    ``rss``: the growth of the process's resident set, in a run without
    tracemalloc (includes the allocator's slack).
    ``parts`` splits ``traced`` by who allocated it; ``sites`` are the
    biggest allocation sites (``file:line``).
    """

    count: int
    traced: float
    snapshot: float
    rss: float
    parts: tuple[tuple[str, float], ...]
    sites: tuple[tuple[str, float], ...]


_REPO = Path(__file__).resolve().parents[1]
_PARTS: Final = (
    ("dispatcher/core/fanin.py", "fan-in: per-endpoint bookkeeping and merged (re-id'd) copies"),
    ("dispatcher/core/snapshot.py", "snapshot: service dicts and entries"),
    ("", "instance records as the adapter built them (parse, JSON, Source, ids)"),
)


def _site(filename: str) -> str:
    path = Path(filename)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(_REPO))
    return path.name


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deep_size(root: object) -> int:
    """Bytes of the objects reachable from ``root``, each once; types and code excluded."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if (
            id(obj) in seen
            or isinstance(obj, type)
            or (callable(obj) and not hasattr(obj, "__len__"))
        ):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


async def _hold(count: int, trace: bool) -> MemoryResult:
    """Build ``count`` instances through a FanIn; what stays allocated (one way)."""
    import trio.testing  # it imports pytest: only this (separate) process pays for that

    fanin = FanIn("bench-memory")
    upstream = FeedUpstream("feed")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanin.run, [upstream])
        subscription = fanin.subscribe([EVERYTHING])
        send = await upstream.running()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        if trace:
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
        rss_before = _rss_bytes()
        # The Listing is built inside the send: nothing here keeps the
        # instances once the fan-in has them.
        await send.send(Listing(tuple(realistic_instances(count))))
        await trio.testing.wait_all_tasks_blocked()
        assert _count(fanin.snapshot) == count
        gc.collect()
        rss = (_rss_bytes() - rss_before) / count
        traced = snapshot = 0.0
        parts: list[tuple[str, float]] = []
        sites: list[tuple[str, float]] = []
        if trace:
            stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
            tracemalloc.stop()
            traced = sum(stat.size_diff for stat in stats) / count
            by_part = dict.fromkeys([label for _, label in _PARTS], 0.0)
            for stat in stats:
                site = _site(stat.traceback[0].filename)
                label = next(label for prefix, label in _PARTS if site.startswith(prefix))
                by_part[label] += stat.size_diff / count
            parts = list(by_part.items())
            sites = [
                (
                    f"{_site(stat.traceback[0].filename)}:{stat.traceback[0].lineno}",
                    stat.size_diff / count,
                )
                for stat in sorted(stats, key=lambda stat: -stat.size_diff)[:8]
            ]
            snapshot = deep_size(fanin.snapshot) / count
        subscription.close()
        nursery.cancel_scope.cancel()
    return MemoryResult(count, traced, snapshot, rss, tuple(parts), tuple(sites))


def memory_worker(count: int, out: Connection) -> None:
    """Measure :class:`MemoryResult` in this (fresh) process and send it as a dict.

    First without tracemalloc, for an RSS figure undisturbed by its traces;
    then with it.
    """
    rss = trio.run(_hold, count, False).rss
    traced = trio.run(_hold, count, True)
    out.send(attrs.asdict(attrs.evolve(traced, rss=rss), recurse=False))
    out.close()
