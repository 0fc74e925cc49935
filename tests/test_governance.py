"""Governance: the policy model, and the versioned store on real ZooKeeper and real etcd.

What an operator and every Dispatcher rely on: a policy document is refused with a message
naming the key that is wrong; a change is a new version with who, when and why, kept in a
bounded history; two writers who saw the same version cannot both win, and the loser is told
the current version while the store stays as the winner left it; a rollback is a new version
with the old body; every Dispatcher's feed sees a change within a second, and a Dispatcher
that starts serves the current version as soon as it reports started.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from dispatcher.governance.backends import open_governance_store
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import (
    CircuitBreaking,
    LoadBalancing,
    Policy,
    PolicyError,
    PolicySet,
    Retries,
    Split,
    Weights,
    diff,
)
from dispatcher.governance.store import (
    Conflict,
    GovernanceStore,
    InvalidWrite,
    Revision,
    UnknownVersion,
)
from dispatcher.governance.store_etcd import EtcdGovernanceStore
from dispatcher.governance.store_memory import MemoryGovernance
from dispatcher.governance.store_zookeeper import ZooKeeperGovernanceStore, open_zookeeper_store
from dispatcher.sharding.membership import MembershipConfig
from tests.partition import Partition
from tests.servers import ZooKeeperServer
from tests.waiting import until

TIMEOUT = 20
"""Seconds any single wait on a real server may take before the test fails."""

Opener = Callable[..., AbstractAsyncContextManager[GovernanceStore]]

CART_V1 = {"services": {"shop.Cart": {"request_timeout": 2, "retries": {"count": 2}}}}
CART_V2 = {
    "services": {"shop.Cart": {"request_timeout": 1, "split": {"version=v1": 95, "version=v2": 5}}}
}


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["zookeeper", "etcd"])
def membership(request: pytest.FixtureRequest, unique_path: str) -> MembershipConfig:
    """A ``[membership]`` table on the shared real server of each kind, under a fresh root."""
    server = request.getfixturevalue(request.param)
    return MembershipConfig(request.param, server.address, unique_path)


@pytest.fixture
def opener(membership: MembershipConfig) -> Opener:
    """Opens a store of ``policies`` (one session or client per call, like one Dispatcher)."""

    def open_store(**options: Any) -> AbstractAsyncContextManager[GovernanceStore]:
        return open_governance_store(membership, "policies", **options)

    return open_store


def body(document: dict[str, Any]) -> str:
    return PolicySet.from_mapping(document).to_json()


async def raw_revision_count(store: GovernanceStore) -> int:
    """Revision nodes or keys actually in the server, read past the store's own API."""
    if isinstance(store, ZooKeeperGovernanceStore):
        children = await store.client.get_children(store.base)
        return sum(1 for name in children if name.startswith("rev-"))
    assert isinstance(store, EtcdGovernanceStore)
    client, prefix = store.client, f"{store.base}/rev/"
    return await trio.to_thread.run_sync(lambda: len(list(client.get_prefix(prefix))))


async def race(
    stores: dict[str, GovernanceStore], expected_version: int, round_: int
) -> dict[str, Revision | Conflict]:
    """Each store writes on top of ``expected_version`` at the same moment; what each got."""
    outcomes: dict[str, Revision | Conflict] = {}

    async def write(name: str, store: GovernanceStore) -> None:
        try:
            outcomes[name] = await store.write(
                body({"services": {name: {"request_timeout": round_ + 1}}}),
                expected_version=expected_version,
                who=name,
                why="race",
            )
        except Conflict as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        for name, store in stores.items():
            nursery.start_soon(write, name, store)
    return outcomes


@asynccontextmanager
async def running_feed(opener: Opener, **options: Any) -> AsyncIterator[GovernanceFeed]:
    """A "Dispatcher": its own store session and a feed, started (so loaded) on entry."""
    async with opener(**options) as store, trio.open_nursery() as nursery:
        feed = GovernanceFeed(store)
        with trio.fail_after(TIMEOUT):
            await nursery.start(feed.run)
        yield feed
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------- the store


async def test_write_read_history_and_rollback(opener: Opener) -> None:
    """Each write is the next version with its author, time and reason, the body stored in
    canonical form; the history lists them newest first; a rollback writes the old body again
    as a new version; another session reads the same."""
    async with opener() as store:
        with trio.fail_after(TIMEOUT):
            assert await store.current() is None
            assert await store.history() == []
            before = datetime.now(UTC)
            # Spaces and key order are the writer's; the store keeps the canonical text.
            first = await store.write(
                json.dumps(CART_V1, indent=2), expected_version=0, who="alice", why="initial"
            )
            second = await store.write(
                body(CART_V2), expected_version=1, who="bob", why="canary v2 at 5%"
            )
            after = datetime.now(UTC)
            assert (first.version, second.version) == (1, 2)
            assert first.body == body(CART_V1)
            assert (second.who, second.why) == ("bob", "canary v2 at 5%")
            assert before <= first.when <= second.when <= after
            assert await store.current() == second
            assert await store.history() == [second, first]
            assert await store.history(limit=1) == [second]
            assert await store.history(limit=0) == []
            assert await store.revision(1) == first

            rolled = await store.rollback(1, expected_version=2, who="carol", why="v2 errors")
            assert (rolled.version, rolled.body, rolled.restores) == (3, first.body, 1)
            assert PolicySet.from_json(rolled.body) == PolicySet.from_mapping(CART_V1)

    async with opener() as other:
        with trio.fail_after(TIMEOUT):
            assert await other.current() == rolled
            assert [r.version for r in await other.history()] == [3, 2, 1]


async def test_concurrent_writers_with_the_same_version_one_wins(opener: Opener) -> None:
    """Two Dispatchers write on top of the same version at once: one gets the next version,
    the other a Conflict naming it, and the store holds exactly the winner's write. The first
    round races on the very first write (nothing there yet)."""
    async with opener() as one, opener() as two:
        with trio.fail_after(TIMEOUT):
            version = 0
            for round_ in range(5):
                outcomes = await race({"one": one, "two": two}, version, round_)
                won = [r for r in outcomes.values() if isinstance(r, Revision)]
                lost = [e for e in outcomes.values() if isinstance(e, Conflict)]
                assert len(won) == 1 and len(lost) == 1, outcomes
                winner = won[0]
                assert winner.version == version + 1
                assert lost[0].current_version == winner.version
                assert f"the current version is {winner.version}" in str(lost[0])
                for store in (one, two):
                    assert await store.current() == winner
                assert [r.version for r in await one.history()] == list(
                    range(winner.version, 0, -1)
                )
                version = winner.version

            # A stale writer, and one that names a version from the future, change nothing.
            for wrong in (version - 1, version + 1):
                with pytest.raises(Conflict, match=f"current version is {version},"):
                    await two.write(body(CART_V2), expected_version=wrong, who="x", why="")
            assert await one.current() == winner


async def test_the_history_is_bounded_in_the_same_write(opener: Opener) -> None:
    """Only the last ``max_history`` revisions stay in the server, older ones are gone after
    the very write that pushed them out, and a rollback to one of them says so."""
    async with opener(max_history=3) as store:
        with trio.fail_after(TIMEOUT):
            for version in range(1, 6):
                await store.write(
                    body({"services": {"s": {"request_timeout": version}}}),
                    expected_version=version - 1,
                    who="op",
                    why=f"step {version}",
                )
                assert await raw_revision_count(store) == min(version, 3)
            assert [r.version for r in await store.history()] == [5, 4, 3]
            assert await store.revision(2) is None
            with pytest.raises(UnknownVersion, match="version 2 is not in the history"):
                await store.rollback(2, expected_version=5, who="op", why="")
            assert (await store.rollback(3, expected_version=5, who="op", why="")).version == 6

    # A Dispatcher configured with a smaller history prunes down to it on its next write.
    async with opener(max_history=1) as store:
        with trio.fail_after(TIMEOUT):
            await store.write(body(CART_V1), expected_version=6, who="op", why="")
            assert [r.version for r in await store.history()] == [7]
            assert await raw_revision_count(store) == 1


async def test_bad_writes_are_refused_and_change_nothing(opener: Opener) -> None:
    """A body that is not JSON or is too large, or a write without an author, is refused
    with a clear error before anything is written."""
    async with opener(max_body=200) as store:
        with trio.fail_after(TIMEOUT):
            kept = await store.write(body(CART_V1), expected_version=0, who="op", why="")
            large = json.dumps({"services": {f"s{i}": {} for i in range(40)}})
            with pytest.raises(InvalidWrite, match=r"bytes of canonical JSON; the limit is 200"):
                await store.write(large, expected_version=1, who="op", why="")
            with pytest.raises(InvalidWrite, match="not valid JSON"):
                await store.write("{services", expected_version=1, who="op", why="")
            with pytest.raises(InvalidWrite, match="who must be"):
                await store.write(body(CART_V2), expected_version=1, who=" ", why="")
            assert await store.history() == [kept]


# ---------------------------------------------------------------------- the feed


async def test_two_dispatchers_see_a_write_within_a_second(opener: Opener) -> None:
    """Two feeds on their own sessions, started on an empty store, both hold a write made
    through a third session within a second of its acknowledgement, and again for the next
    write (the watch is re-armed)."""
    async with running_feed(opener) as a, running_feed(opener) as b, opener() as writer:
        assert a.current is None and b.current is None
        async with a.subscribe() as subscription:
            for version, document in ((1, CART_V1), (2, CART_V2)):
                with trio.fail_after(TIMEOUT):
                    written = await writer.write(
                        body(document), expected_version=version - 1, who="op", why=""
                    )
                started = trio.current_time()
                with trio.fail_after(1.0):
                    assert await a.wait_version(version) == written
                    assert await b.wait_version(version) == written
                    assert await subscription.__anext__() == written
                assert trio.current_time() - started < 1.0
        assert a.version == b.version == 2


async def test_a_restarted_dispatcher_starts_with_the_current_version(opener: Opener) -> None:
    """A feed reports started only once it holds the current version, including versions
    written while no Dispatcher ran; its first subscription item is that version."""
    async with opener() as writer:
        with trio.fail_after(TIMEOUT):
            await writer.write(body(CART_V1), expected_version=0, who="op", why="")
        async with running_feed(opener) as feed:
            assert feed.version == 1
        # Written while no feed runs.
        with trio.fail_after(TIMEOUT):
            latest = await writer.write(body(CART_V2), expected_version=1, who="op", why="")
        async with running_feed(opener) as feed:
            assert feed.loaded.is_set()
            assert feed.current == latest
            async with feed.subscribe() as subscription:
                assert subscription.pending == 1
                assert await subscription.__anext__() == latest


async def test_a_feed_cut_off_from_zookeeper_catches_up(
    zookeeper: ZooKeeperServer, unique_path: str
) -> None:
    """A Dispatcher whose connection to ZooKeeper is cut while a change is written holds
    the change once the connection is back (its watch is re-armed, nothing is missed)."""
    partition = Partition((zookeeper.host, zookeeper.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(partition.serve)
        async with (
            open_zookeeper_store(zookeeper.address, unique_path, "policies") as writer,
            open_zookeeper_store(partition.address, unique_path, "policies") as cut_off,
        ):
            feed = GovernanceFeed(cut_off)
            with trio.fail_after(TIMEOUT):
                await nursery.start(feed.run)
                first = await writer.write(body(CART_V1), expected_version=0, who="op", why="")
                await feed.wait_version(1)
                partition.cut()
                await until(lambda: not cut_off.client.connected, "the feed saw the cut")
                second = await writer.write(body(CART_V2), expected_version=1, who="op", why="")
                assert feed.current == first
                partition.heal()
                assert await feed.wait_version(2) == second
        nursery.cancel_scope.cancel()


async def test_a_slow_subscriber_collapses_to_the_newest_revision() -> None:
    """A subscriber that does not read keeps at most its queue bound, then only the newest
    revision (model-level: the in-memory store)."""
    config = MembershipConfig("memory")
    shared = MemoryGovernance()
    async with (
        open_governance_store(config, "policies", memory=shared) as store,
        trio.open_nursery() as nursery,
    ):
        feed = GovernanceFeed(store, max_queue=2)
        await nursery.start(feed.run)
        subscription = feed.subscribe()
        for version in range(1, 6):
            await store.write(
                body({"services": {"s": {"request_timeout": version}}}),
                expected_version=version - 1,
                who="op",
                why="",
            )
            await feed.wait_version(version)
            assert subscription.pending <= 2
        assert subscription.collapses >= 1
        seen = [(await subscription.__anext__()).version for _ in range(subscription.pending)]
        assert seen[-1] == 5 and seen == sorted(seen)
        subscription.close()
        assert [revision async for revision in subscription] == []
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the policy model


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"services": {"shop.Cart": {"retries": {"count": 50}}}},
            'policy "shop.Cart": retries.count: must be between 0 and 10, got 50',
        ),
        (
            {"services": {"shop.Cart": {"retrys": {"count": 1}}}},
            'policy "shop.Cart": retrys: unknown key (known here: connect_timeout, '
            "request_timeout, retries, load_balancing, weights, zone_affinity, "
            "outlier_ejection, circuit_breaking, split)",
        ),
        (
            {"services": {"shop.Cart": {"retries": {"cnt": 1}}}},
            'policy "shop.Cart": retries.cnt: unknown key (known here: count, on, budget)',
        ),
        (
            {"service": {}},
            "policies: service: unknown key (known here: services, consumers)",
        ),
        (
            {"services": {"s": {"connect_timeout": 0}}},
            'policy "s": connect_timeout: must be between 0.001 and 300 seconds, got 0',
        ),
        (
            {"services": {"s": {"request_timeout": "2s"}}},
            "policy \"s\": request_timeout: must be a number, got '2s'",
        ),
        (
            {"services": {"s": {"retries": {"on": ["reset", "teapot"]}}}},
            'policy "s": retries.on: must be some of 5xx, connect-failure, gateway-error, '
            "refused-stream, reset, timeout, unavailable, got 'teapot'",
        ),
        (
            {"services": {"s": {"retries": {"budget": 101}}}},
            'policy "s": retries.budget: must be between 0 and 100, got 101',
        ),
        (
            {"services": {"s": {"load_balancing": {"policy": "random"}}}},
            "policy \"s\": load_balancing.policy: must be one of wrr, p2c, ring_hash, got 'random'",
        ),
        (
            {"consumers": {"web": {"s": {"load_balancing": {"policy": "ring_hash"}}}}},
            'policy "s" for consumer "web": load_balancing.hash_key: required with ring_hash',
        ),
        (
            {"services": {"s": {"load_balancing": {"policy": "wrr", "hash_key": "source_ip"}}}},
            'policy "s": load_balancing.hash_key: only applies to ring_hash, not wrr',
        ),
        (
            {"services": {"s": {"weights": {"instances": {"10.0.0.1:80": 20000}}}}},
            'policy "s": weights.instances."10.0.0.1:80": must be between 0 and 10000, got 20000',
        ),
        (
            {"services": {"s": {"zone_affinity": {"enabled": "yes"}}}},
            "policy \"s\": zone_affinity.enabled: must be true or false, got 'yes'",
        ),
        (
            {"services": {"s": {"outlier_ejection": {"consecutive_failures": 0}}}},
            'policy "s": outlier_ejection.consecutive_failures: must be between 1 and 1000, got 0',
        ),
        (
            {"services": {"s": {"circuit_breaking": {"max_connections": 1.5}}}},
            'policy "s": circuit_breaking.max_connections: must be a whole number, got 1.5',
        ),
        (
            {"services": {"s": {"split": {"version=v1": 95, "version=v2": 10}}}},
            'policy "s": split: the shares must sum to 100, got 105',
        ),
        (
            {"services": {"s": {"split": {"version=v1": 50, "zone=a": 50}}}},
            'policy "s": split: every share must select on the same tag, got version, zone',
        ),
        (
            {"services": {"s": {"split": {"v1": 100}}}},
            'policy "s": split.v1: the key must be "<tag>=<value>", like "version=v2"',
        ),
        (
            {"services": {"s": []}},
            'policy "s": must be a table, got []',
        ),
    ],
)
def test_policy_validation_names_the_key(document: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicySet.from_mapping(document)
    assert str(caught.value) == message


def test_policy_json_is_canonical_and_round_trips() -> None:
    """Key order and ``95`` versus ``95.0`` do not change the rendering, and the rendering
    reads back to an equal set; malformed JSON is a PolicyError, not a crash."""
    full = {
        "services": {
            "shop.Cart": {
                "split": {"version=v2": 5.0, "version=v1": 95},
                "connect_timeout": 0.25,
                "request_timeout": 2,
                "retries": {"on": ["reset", "connect-failure"], "count": 2, "budget": 20},
                "load_balancing": {"policy": "ring_hash", "hash_key": "header:x-user-id"},
                "weights": {"zones": {"eu-1a": 200}, "instances": {"10.0.0.7:8080": 50}},
                "zone_affinity": {"enabled": True, "fallback_threshold": 70},
                "outlier_ejection": {"consecutive_failures": 5, "interval": 10},
                "circuit_breaking": {"max_connections": 1000, "max_pending": 100},
            }
        },
        "consumers": {"web": {"shop.Cart": {"request_timeout": 5}}},
    }
    policies = PolicySet.from_mapping(full)
    text = policies.to_json()
    assert text == PolicySet.from_mapping(json.loads(text)).to_json()
    assert PolicySet.from_json(text) == policies
    assert '"split":{"version=v1":95,"version=v2":5}' in text
    assert '"on":["connect-failure","reset"]' in text
    with pytest.raises(PolicyError, match="policies: not valid JSON"):
        PolicySet.from_json("{")
    cart = policies.effective("shop.Cart", "web")
    assert Policy.from_json(cart.to_json()) == cart
    assert json.loads(cart.to_json())["request_timeout"] == 5


def test_diff_lists_changed_fields_by_path() -> None:
    old = PolicySet.from_mapping(
        {
            "services": {
                "shop.Cart": {
                    "request_timeout": 2,
                    "retries": {"count": 2, "on": ["reset"]},
                    "split": {"version=v1": 95, "version=v2": 5},
                }
            }
        }
    )
    new = PolicySet.from_mapping(
        {
            "services": {
                "shop.Cart": {
                    "request_timeout": 2,
                    "retries": {"count": 3, "on": ["reset"]},
                    "split": {"version=v1": 90, "version=v2": 10},
                    "weights": {"instances": {"10.0.0.7:8080": 0}},
                }
            },
            "consumers": {"web": {"shop.Cart": {"connect_timeout": 0.5}}},
        }
    )
    assert [str(change) for change in diff(old, new)] == [
        'policy "shop.Cart": retries.count: 2 -> 3',
        'policy "shop.Cart": split."version=v1": 95 -> 90',
        'policy "shop.Cart": split."version=v2": 5 -> 10',
        'policy "shop.Cart": weights.instances."10.0.0.7:8080": (unset) -> 0',
        'policy "shop.Cart" for consumer "web": connect_timeout: (unset) -> 0.5',
    ]
    assert diff(new, new) == ()
    assert [str(c) for c in diff(new, old)][-1] == (
        'policy "shop.Cart" for consumer "web": connect_timeout: 0.5 -> (unset)'
    )


def test_effective_policy_overlays_the_consumer_field_by_field() -> None:
    policies = PolicySet.from_mapping(
        {
            "services": {
                "shop.Cart": {
                    "request_timeout": 2,
                    "connect_timeout": 0.5,
                    "retries": {"count": 2, "on": ["reset"], "budget": 20},
                    "load_balancing": {"policy": "ring_hash", "hash_key": "source_ip"},
                    "weights": {"zones": {"eu-1a": 200, "eu-1b": 100}},
                    "split": {"version=v1": 95, "version=v2": 5},
                    "circuit_breaking": {"max_connections": 100},
                }
            },
            "consumers": {
                "web": {
                    "shop.Cart": {
                        "request_timeout": 5,
                        "retries": {"count": 0},
                        "load_balancing": {"policy": "p2c"},
                        "weights": {"zones": {"eu-1b": 0}},
                        "split": {"version=v1": 100},
                        "circuit_breaking": {"max_pending": 10},
                    }
                }
            },
        }
    )
    service = policies.effective("shop.Cart")
    assert policies.effective("shop.Cart", "batch") == service  # no per-consumer policy
    assert policies.effective("shop.Orders", "web") == Policy()  # nothing set at all
    web = policies.effective("shop.Cart", "web")
    assert web.request_timeout == 5 and web.connect_timeout == 0.5
    assert web.retries == Retries(count=0, on=("reset",), budget=20)
    # Load balancing and the split only make sense whole: the consumer's replaces them.
    assert web.load_balancing == LoadBalancing(policy="p2c")
    assert web.split == Split(tag="version", shares={"v1": 100})
    assert web.weights == Weights(zones={"eu-1a": 200, "eu-1b": 0})
    assert web.circuit_breaking == CircuitBreaking(max_connections=100, max_pending=10)
    assert policies.consumer("web", "shop.Cart") is not None
    assert policies.consumer("web", "shop.Orders") is None
