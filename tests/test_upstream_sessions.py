"""The mirror's pool of write sessions closes only sessions nothing depends on.

A write session idle for ``idle_timeout`` is closed, unless it holds
ephemerals of a downstream session or watches a downstream client waits on
(set upstream by a read the mirror forwarded because its own session may not
read the znode): closing it would delete the ephemerals, or lose the events,
without the downstream client ever being told. Time is the subject here, so
the pool runs on trio's MockClock; its sessions are never connected.
"""

from __future__ import annotations

import trio
import trio.testing

from dispatcher.zk.client import ZooKeeperClient
from dispatcher.zk.upstream_sessions import Credentials, UpstreamSession, UpstreamSessions

IDLE = 60.0
ALICE: Credentials = (("digest", b"alice:secret"),)
BOB: Credentials = (("digest", b"bob:secret"),)
CAROL: Credentials = (("digest", b"carol:secret"),)


def _pool(watched: set[Credentials]) -> UpstreamSessions:
    return UpstreamSessions(
        [("127.0.0.1", 1)], session_timeout_ms=10_000, max_sessions=2, connect_timeout=1.0,
        idle_timeout=IDLE, on_expired=lambda _session: None,
        on_watch=lambda _session, _event: None, watched=watched.__contains__,
    )  # fmt: skip


def _add(pool: UpstreamSessions, credentials: Credentials) -> UpstreamSession:
    """A session in the pool, as ``get`` files it, without connecting it."""
    client = ZooKeeperClient([("127.0.0.1", 1)], session_timeout_ms=10_000, auth=credentials)
    session = pool.sessions[credentials] = UpstreamSession(client, credentials, max_queued=1)
    return session


async def test_an_idle_session_closes_unless_it_holds_ephemerals_or_watches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watched = {BOB}
    pool = _pool(watched)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        _add(pool, ALICE)
        _add(pool, BOB)
        _add(pool, CAROL).holders.add(7)  # a downstream session's ephemerals
        await trio.sleep(IDLE * 1.5)
        assert set(pool.sessions) == {BOB, CAROL}

        # Once its last watch has fired, the session is unused again.
        watched.clear()
        await trio.sleep(IDLE * 1.5)
        assert set(pool.sessions) == {CAROL}
        nursery.cancel_scope.cancel()


async def test_a_full_pool_evicts_only_a_session_nothing_depends_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = _pool({ALICE})
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        _add(pool, ALICE)
        _add(pool, BOB).holders.add(7)
        # Two sessions, both needed: a third identity is refused, not made
        # room for by dropping a watch or an ephemeral.
        assert pool.get(CAROL) is None
        assert set(pool.sessions) == {ALICE, BOB}
        nursery.cancel_scope.cancel()
