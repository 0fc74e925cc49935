"""Benchmark: Meta Server shard assignment (simulation half).

Assigns N services over K simulated Dispatchers with :func:`metaserver.assignment.assign` and
prints the load spread (max over mean), the share of services moved when one Dispatcher joins
and when one leaves, the time ``assign`` takes, and in-process lookup throughput of
``Assignment.owner``. The peer measured in the same run is plain weighted rendezvous hashing
(the same code with a balance factor large enough that no bound binds), which shows what the
bounded loads buy in spread and cost in movement.

Each of ``--trials`` joins adds a different new Dispatcher to the same K, and each leave
removes a different one of the K (spread evenly over the sorted ids); the last line reports
the worst of them, so a pass means every measured event met the target.

The networked Meta Server does not exist yet, so the last line says ``lookups_per_s=pending``;
the in-process figure is printed on its own, clearly labelled line.

Usage: ``python bench/sharding.py [--services N] [--dispatchers K] [--trials T]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

import attrs

from metaserver.assignment import DEFAULT_BALANCE, Assignment, Member, assign

MOVE_TARGET = 1.3
"""A join may move at most 1.3 fair shares of n/(K+1) services; a leave 1.3 of n/K."""


@attrs.frozen
class Event:
    """One membership change and the share of all services it moved."""

    kind: str
    member_id: str
    moved_share: float
    fair_share: float
    plain_moved_share: float

    @property
    def in_fair_shares(self) -> float:
        """Moved share divided by the fair share of one Dispatcher after or before the event."""
        return self.moved_share / self.fair_share


def service_names(count: int) -> list[str]:
    """Plausible, fixed service names: teams with many services each."""
    return [f"com.example.team{i % 97:02d}.Service{i:05d}" for i in range(count)]


def dispatcher(index: int) -> Member:
    """Simulated Dispatcher ``index`` with made-up addresses for its two faces."""
    host = f"10.0.{index // 250}.{index % 250 + 1}"
    return Member(
        id=f"dispatcher-{index:03d}",
        endpoints={"zookeeper": f"{host}:2181", "subscribe": f"{host}:7411"},
    )


def timed_assign(
    services: Sequence[str], members: Sequence[Member], c: float, timings: list[float]
) -> Assignment:
    """``assign`` with its wall time appended to ``timings``."""
    start = time.perf_counter()
    result = assign(services, members, c)
    timings.append(time.perf_counter() - start)
    return result


def max_over_mean(result: Assignment, n_services: int) -> float:
    """Fullest member's load over the mean load."""
    return max(result.loads().values()) / (n_services / len(result.members))


def lookups_per_second(result: Assignment, names: Sequence[str], count: int) -> float:
    """Calls per second of ``result.owner`` over ``count`` names drawn from ``names``."""
    order = [names[i] for i in random.Random(7).choices(range(len(names)), k=count)]
    owner = result.owner
    start = time.perf_counter()
    for name in order:
        owner(name)
    return count / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--dispatchers", type=int, default=100)
    parser.add_argument("--trials", type=int, default=5, help="joins and leaves to measure")
    parser.add_argument("--balance", type=float, default=DEFAULT_BALANCE, help="c")
    parser.add_argument("--lookups", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    n, k, c = args.services, args.dispatchers, args.balance
    if n < 1 or k < 2 or not 1 <= args.trials <= k:
        parser.error("need --services >= 1, --dispatchers >= 2, 1 <= --trials <= dispatchers")
    plain_c = float(k)  # c >= K: every bound is >= n, so this is plain rendezvous hashing

    names = service_names(n)
    members = [dispatcher(i) for i in range(k)]
    timings: list[float] = []
    base = timed_assign(names, members, c, timings)
    plain = assign(names, members, plain_c)
    spread = max_over_mean(base, n)
    print(f"assign: services={n} dispatchers={k} c={c} seconds={timings[0]:.3f}")
    print(
        f"spread: max_over_mean={spread:.3f} "
        f"plain_rendezvous_max_over_mean={max_over_mean(plain, n):.3f}"
    )

    events: list[Event] = []
    for t in range(args.trials):
        joiner = dispatcher(k + t)
        grown = [*members, joiner]
        moved = len(base.moved(timed_assign(names, grown, c, timings))) / n
        plain_moved = len(plain.moved(assign(names, grown, plain_c))) / n
        events.append(Event("join", joiner.id, moved, 1 / (k + 1), plain_moved))
    for t in range(args.trials):
        leaver = members[t * k // args.trials]
        shrunk = [m for m in members if m is not leaver]
        moved = len(base.moved(timed_assign(names, shrunk, c, timings))) / n
        plain_moved = len(plain.moved(assign(names, shrunk, plain_c))) / n
        events.append(Event("leave", leaver.id, moved, 1 / k, plain_moved))
    for e in events:
        print(
            f"{e.kind}: member={e.member_id} moved={e.moved_share:.5f} "
            f"fair_shares={e.in_fair_shares:.3f} "
            f"plain_rendezvous_fair_shares={e.plain_moved_share / e.fair_share:.3f}"
        )
    joins = [e for e in events if e.kind == "join"]
    leaves = [e for e in events if e.kind == "leave"]
    worst_join = max(joins, key=lambda e: e.moved_share)
    worst_leave = max(leaves, key=lambda e: e.moved_share)
    print(
        f"movement: join_fair_shares mean={statistics.mean(e.in_fair_shares for e in joins):.3f} "
        f"max={worst_join.in_fair_shares:.3f} "
        f"leave_fair_shares mean={statistics.mean(e.in_fair_shares for e in leaves):.3f} "
        f"max={worst_leave.in_fair_shares:.3f} (target <= {MOVE_TARGET})"
    )
    print(
        f"assign_seconds: mean={statistics.mean(timings):.3f} max={max(timings):.3f} "
        f"over {len(timings)} runs"
    )

    inprocess = lookups_per_second(base, names, args.lookups)
    unknown = [f"com.example.new.Service{i:05d}" for i in range(2_000)]
    fallback = lookups_per_second(base, unknown, len(unknown))
    print(f"lookups_per_s_inprocess={inprocess:.0f} (Assignment.owner, assigned services)")
    print(f"fallback_lookups_per_s_inprocess={fallback:.0f} (Assignment.owner, unknown services)")

    checks = {
        "max_over_mean<=c": spread <= c + 1e-9,
        "moved_on_join<=1.3/(K+1)": worst_join.moved_share <= MOVE_TARGET / (k + 1),
        "moved_on_leave<=1.3/K": worst_leave.moved_share <= MOVE_TARGET / k,
    }
    verdicts = " ".join(f"{name}={'ok' if ok else 'MISSED'}" for name, ok in checks.items())
    print(f"targets: {verdicts}")
    print(
        f"sharding: services={n} dispatchers={k} max_over_mean={spread:.3f} "
        f"moved_on_join={worst_join.moved_share:.5f} moved_on_leave={worst_leave.moved_share:.5f} "
        f"lookups_per_s=pending"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
