"""Upstream sessions a mirror writes through, one per set of client credentials.

A write through the mirror must reach the ensemble as its client's own: with
the client's digest credentials, so the ensemble's ACLs decide, and never with
more. Clients that authenticated alike share one upstream session, so however
many downstream clients connect, the ensemble sees few connections from zkgate
(its ``maxClientCnxns``, 60 per address by default, caps connections, not
zkgate's clients). Sessions are opened on first use, held while they carry
ephemerals, requests or watches a downstream client waits on, and closed
after ``idle_timeout`` otherwise.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence

import trio

from dispatcher.zk.client import (
    AuthFailed,
    Connected,
    ConnectionLost,
    Disconnected,
    Expired,
    KeeperError,
    Reply,
    ZooKeeperClient,
)
from dispatcher.zk.codec.protocol import Err
from dispatcher.zk.codec.records import Record, WatcherEvent
from dispatcher.zk.sasl_client import SaslCredentials

log = logging.getLogger(__name__)

Credentials = tuple[tuple[str, bytes], ...]
SessionEvent = Connected | Disconnected | Expired | AuthFailed

_LOST = Reply(Err.CONNECTIONLOSS, -1, None)


class UpstreamSession:
    """One pooled upstream session: submits now when connected, else queues
    (bounded) until it connects or ``connect_timeout`` passes."""

    def __init__(
        self, client: ZooKeeperClient, credentials: Credentials, *, max_queued: int,
    ) -> None:  # fmt: skip
        self.client = client
        self.credentials = credentials
        self.max_queued = max_queued
        self.in_flight = 0
        self.last_used = trio.current_time()
        #: Downstream sessions whose ephemerals this session holds upstream.
        self.holders: set[int] = set()
        self.cancel_scope = trio.CancelScope()
        self._queued: deque[tuple[int, Record, Callable[[Reply], None]]] = deque()
        #: Queue only while the first connection is being made; after that (or
        #: once it timed out) a disconnected session fails requests at once.
        self.queueing = True

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.holders and not self._queued

    def submit(self, opcode: int, record: Record, on_reply: Callable[[Reply], None]) -> None:
        """Send now, or queue until connected; ``on_reply`` is called exactly once."""
        self.last_used = trio.current_time()
        if not self.client.connected:
            if not self.queueing or len(self._queued) >= self.max_queued:
                on_reply(_LOST)  # an outage: clients retry CONNECTIONLOSS
            else:
                self._queued.append((opcode, record, on_reply))
            return
        self._send(opcode, record, on_reply)

    def _send(self, opcode: int, record: Record, on_reply: Callable[[Reply], None]) -> None:
        def finished(reply: Reply) -> None:
            self.in_flight -= 1
            on_reply(reply)

        try:
            self.client.submit(opcode, record, finished)
        except ConnectionLost:
            on_reply(_LOST)
            return
        self.in_flight += 1

    def connected(self) -> None:
        self.queueing = False
        while self._queued and self.client.connected:
            self._send(*self._queued.popleft())

    def fail_queued(self) -> None:
        self.queueing = False
        while self._queued:
            self._queued.popleft()[2](_LOST)


class UpstreamSessions:
    """The pool: one :class:`UpstreamSession` per credentials, bounded in number."""

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        *,
        session_timeout_ms: int,
        max_sessions: int,
        connect_timeout: float,
        idle_timeout: float,
        on_expired: Callable[[UpstreamSession], None],
        on_watch: Callable[[UpstreamSession, WatcherEvent], None],
        watched: Callable[[Credentials], bool] = lambda _credentials: False,
        max_queued: int = 1000,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        sasl: SaslCredentials | None = None,
    ) -> None:
        self.hosts = tuple(hosts)
        self.sasl = sasl
        self.tls = tls
        self.server_name = server_name
        self.session_timeout_ms = session_timeout_ms
        self.max_sessions = max_sessions
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.on_expired = on_expired
        self.on_watch = on_watch
        #: Whether downstream clients wait on watches the session of these
        #: credentials holds upstream: closing it would lose their events.
        self.watched = watched
        self.max_queued = max_queued
        self.sessions: dict[Credentials, UpstreamSession] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(max(self.idle_timeout / 4, 0.05))
                self._close_idle()

    def session_ids(self) -> set[int]:
        return {s.client.session_id for s in self.sessions.values() if s.client.session_id}

    def get(self, credentials: Credentials) -> UpstreamSession | None:
        """The session for ``credentials``, opened if need be; None when the
        pool is full of busy sessions."""
        session = self.sessions.get(credentials)
        if session is not None:
            return session
        if len(self.sessions) >= self.max_sessions and not self._evict_one():
            log.warning("upstream session pool full", extra={"max": self.max_sessions})
            return None
        assert self._nursery is not None, "UpstreamSessions.run is not running"
        holder: list[UpstreamSession] = []
        client = ZooKeeperClient(
            self.hosts, session_timeout_ms=self.session_timeout_ms, auth=credentials,
            on_session=lambda event: self._session_event(holder[0], event),
            on_watch=lambda event: self.on_watch(holder[0], event),
            tls=self.tls, server_name=self.server_name, sasl=self.sasl,
        )  # fmt: skip
        session = UpstreamSession(client, credentials, max_queued=self.max_queued)
        holder.append(session)
        self.sessions[credentials] = session
        self._nursery.start_soon(self._run_session, session)
        return session

    async def _run_session(self, session: UpstreamSession) -> None:
        with session.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, session)
                with trio.move_on_after(self.connect_timeout):
                    await session.client.wait_connected()
                if not session.client.connected:
                    session.fail_queued()
        session.fail_queued()

    async def _keep(self, session: UpstreamSession) -> None:
        # A session the upstream refuses ends alone: the gateway goes on.
        try:
            await session.client.run()
        except KeeperError as exc:
            log.warning("upstream write session stopped", extra={"error": str(exc)})
            self._close(session)

    def _session_event(self, session: UpstreamSession, event: SessionEvent) -> None:
        if isinstance(event, Connected):
            session.connected()
        elif isinstance(event, Expired):
            log.warning("upstream write session expired", extra={"holders": len(session.holders)})
            self.on_expired(session)
            session.holders.clear()
        elif isinstance(event, AuthFailed):
            log.warning("upstream refused a client's credentials", extra={"scheme": event.scheme})
            self._close(session)

    def _unused(self, session: UpstreamSession) -> bool:
        return session.idle and not self.watched(session.credentials)

    def _evict_one(self) -> bool:
        unused = [s for s in self.sessions.values() if self._unused(s)]
        if not unused:
            return False
        self._close(min(unused, key=lambda s: s.last_used))
        return True

    def _close_idle(self) -> None:
        now = trio.current_time()
        for session in list(self.sessions.values()):
            if self._unused(session) and now - session.last_used > self.idle_timeout:
                self._close(session)

    def _close(self, session: UpstreamSession) -> None:
        if self.sessions.get(session.credentials) is session:
            del self.sessions[session.credentials]
        session.fail_queued()
        session.cancel_scope.cancel()


__all__ = ["Credentials", "UpstreamSession", "UpstreamSessions"]
