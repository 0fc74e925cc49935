"""The subscription server: the face that proxies subscribe to.

It speaks :mod:`dispatcher.wire` over TCP and Unix sockets and serves the
fan-in's merged snapshot to proxies: a :class:`~dispatcher.wire.Full` per
service, then :class:`~dispatcher.wire.Deltas` as the snapshot changes.

One connection, as the server sees it:

* **Hello first.** The first message must be ``Hello`` with
  :data:`~dispatcher.wire.PROTOCOL_VERSION` and the shared token (compared in
  constant time), within ``hello_timeout``; anything else is answered
  ``Error("unsupported-version")`` or ``Error("unauthenticated")`` and the
  connection closes. Then ``Welcome``.
* **Subscribe** ``{service: version held or None}``. A service this
  Dispatcher does not own is answered ``Redirect(service, owner, epoch)``
  and not subscribed. For an owned one: if the client holds version ``v`` and
  the delta history still chains from ``v`` to the current version, the
  missing ``Deltas`` are sent (resume without a full resend; an empty
  ``Deltas(v, v)`` when ``v`` is already current, so that every subscribed
  service gets an answer); otherwise a ``Full``. After that, ``Deltas`` as
  the fan-in publishes, each chaining on the previous one
  (``from_version`` is the version the client holds). A client that falls so
  far behind that the hub collapses its queue gets a ``Full`` instead.
* **Unsubscribe**, **Ack** (recorded per connection, for lag metrics; its
  optional table digest is compared with what was sent, and a proxy whose
  table differs gets a ``Full``: inspection's "proxy" layer),
  **Report** (handed to ``on_report``: the central health checker),
  **Outcomes** (handed to ``on_outcomes``, and accepted only when one is set: the
  ``Welcome`` says ``outcomes`` then, and a client sends none otherwise), **Ping**
  (answered ``Pong``).
* Anything malformed, oversized or out of place: ``Error("bad-request")``,
  one log line, and that connection closes. The server never dies of a
  client's bytes.

Versions. A version is the fan-in's snapshot version at which a service
changed, so it means something only to the fan-in that made it. The
``Welcome`` therefore names the server as ``<server_id>/<incarnation>``, with
a random incarnation per server object: a client must only send held
versions that it got under the very same ``server_id`` string. A version
from another Dispatcher, or from before this one restarted, could match a
number in this history by accident and resume the client onto the wrong
state.

The delta history. Every delta that reaches the server is kept, per
service, for the last ``history`` versions of that service (and
``history_total`` deltas across all services), so that a proxy that
reconnects with a recent version resumes. Deltas of one service chain
(:mod:`dispatcher.core.snapshot` guarantees ``from_version`` equals the previous
``to_version``, across emptying and re-creation too); a gap (deltas nobody
here read) restarts the chain. With ``interest = "all"`` the server keeps
one subscription to every service just to record history, so a service's
changes are kept while no proxy is connected. With ``interest =
"subscribed"`` that subscription would load every service upstream, so the
history is fed only by the deltas that subscribed connections read; a
service nobody subscribes to is dropped from the snapshot there anyway.

Bounds. ``max_connections`` connections (one more gets
``Error("overloaded")``); frames of :data:`~dispatcher.wire.MAX_FRAME`; one
hub subscription per connection, whose queue the hub bounds and collapses;
updates are taken from it only while the connection's unsent output is
below ``output_high_water``, so a slow reader's backlog stays in the hub
(where it collapses) rather than in bytes here; unsent output past
``max_output`` (a client that sends but never reads), or a socket that does
not take the next 64 KiB within ``send_stall`` seconds, closes the
connection.

Policies. Given a :class:`~dispatcher.governance.feed.GovernanceFeed` of policy documents
(``policies``: the constructor's argument, or set once later), the server sends each
client that said ``policies`` in its Hello a :class:`~dispatcher.wire.PolicyUpdate` per
subscribed service: the effective policy
(:meth:`~dispatcher.governance.policy.PolicySet.effective`) of that service for the
application the Hello named, at the governance version, right after each Subscribe and then
whenever a new governance version changes that effective policy for that client (a change
to another service or another application's policy sends nothing). The client answers
``PolicyAck``, recorded per connection like ``Ack``. Until the feed has loaded, nothing is
sent; once it has, every subscribed service gets its policy. A document that does not parse
as policies (it cannot be written so, but a store can be edited by hand) is logged and the
last good one stays in force.

Ownership. :meth:`SubscriptionServer.ownership_changed` re-asks the
:class:`~dispatcher.core.ownership.Ownership` for every subscribed service and
sends a ``Redirect`` (and drops the subscription) for each one this
Dispatcher no longer owns.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from types import MappingProxyType
from typing import Final

import attrs
import trio

from dispatcher import wire
from dispatcher.containment import InternalErrors
from dispatcher.core.fanin import FanIn
from dispatcher.core.model import Instance
from dispatcher.core.ownership import Ownership
from dispatcher.core.snapshot import Delta, ServiceEntry
from dispatcher.core.subscriptions import EVERYTHING, Subscription, Update
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.governance.policy import PolicyError, PolicySet, canonical_json
from dispatcher.inspection.model import Divergence
from dispatcher.tls import PlainGuard, ServerTls

__all__ = [
    "DEFAULT_HISTORY",
    "DeltaHistory",
    "OutcomesHandler",
    "ReportHandler",
    "SubscriberConnection",
    "SubscriptionLimits",
    "SubscriptionServer",
    "wire_deltas",
    "wire_full",
    "wire_instance",
]

log = logging.getLogger(__name__)

DEFAULT_HISTORY: Final = 256
"""Deltas kept per service for resuming clients."""

_RECEIVE_SIZE: Final = 65536
#: Services whose current table digest is kept (see SubscriptionServer._check_digest).
_MAX_DIGESTS: Final = 65_536
#: Bytes handed to the socket per send: the unit of the send_stall bound.
_SEND_CHUNK: Final = 65536

OutcomesHandler = Callable[[wire.Outcomes, str], object]
"""``on_outcomes(outcomes, application)``: a client's report of call outcomes (the mesh
automatic rollback's input). ``application`` is the report's own, or else the one its
client's Hello named. Called on the trio thread; it must not block."""

ReportHandler = Callable[[str, str, str, str], object]
"""``on_report(service, instance_id, reason, client_id)``: a proxy saw an endpoint fail.

Called on the trio thread; it must not block (queue the work). An exception
it raises is logged and does not affect the connection; what it returns is
ignored (the health checker's handler says whether it acted, for its tests).
"""


@attrs.frozen
class SubscriptionLimits:
    """The bounds of one :class:`SubscriptionServer`; see the module docstring."""

    #: Open connections, TCP and Unix together; one more is refused "overloaded".
    max_connections: int = 1024
    #: Services one connection may subscribe to at once.
    max_services: int = 100_000
    #: Deltas kept in the history across all services.
    history_total: int = 65_536
    #: Take no update from the hub while this many bytes are unsent.
    output_high_water: int = 1024 * 1024
    #: Close a connection whose unsent output passes this (it sends but does not read).
    max_output: int = 2 * wire.MAX_FRAME + 1024 * 1024
    #: Close a connection whose socket takes no 64 KiB chunk for this long (seconds).
    send_stall: float = 30.0
    #: Seconds a new connection has to say Hello.
    hello_timeout: float = 10.0
    #: Seconds a closing connection has to take its last bytes (an Error).
    close_flush_timeout: float = 5.0
    #: Longest wait (seconds) for the history recorder to catch up when resuming.
    resume_wait: float = 2.0
    #: Bytes of encoded frames shared between connections (one encoding per delta).
    frame_cache: int = 32 * 1024 * 1024


# ---------------------------------------------------------------- conversions


def wire_instance(instance: Instance) -> wire.WireInstance:
    """An instance as proxies get it (``Metadata`` is immutable: shared, not copied)."""
    return wire.WireInstance(
        instance.instance_id, instance.host, instance.port, instance.weight, instance.zone,
        instance.health.value, instance.metadata,
    )  # fmt: skip


def wire_full(entry: ServiceEntry) -> wire.Full:
    """A service's whole state at its own version (the version its next delta chains on)."""
    instances = sorted(entry.instances.values(), key=lambda i: i.instance_id)
    return wire.Full(entry.service, entry.version, tuple(map(wire_instance, instances)))


def wire_deltas(delta: Delta) -> wire.Deltas:
    """A snapshot delta as the wire says it: added and updated are both upserts."""
    return wire.Deltas(
        delta.service, delta.from_version, delta.to_version,
        tuple(wire_instance(i) for i in (*delta.added, *delta.updated)), delta.removed_ids,
    )  # fmt: skip


# ---------------------------------------------------------------- the history


class _Chain:
    __slots__ = ("deltas", "head")

    def __init__(self, head: int) -> None:
        self.deltas: collections.deque[Delta] = collections.deque()
        #: The version this chain is current to: its last delta's to_version,
        #: or where it restarted after a gap.
        self.head = head


class DeltaHistory:
    """The recent deltas of each service, chained, for resuming subscribers.

    :meth:`record` may be called with the same delta many times (every reader
    of a service offers it); duplicates are ignored, and a delta that does
    not chain on the last one recorded restarts that service's chain, since
    the changes in between are unknown here.
    """

    def __init__(self, per_service: int = DEFAULT_HISTORY, total: int = 65_536) -> None:
        if per_service < 0 or total < 0:
            raise ValueError("history bounds must be >= 0")
        self.per_service = per_service
        self.total = total
        self._chains: dict[str, _Chain] = {}
        # One marker per recorded delta, oldest first, for the global bound.
        # Markers of deltas already dropped per service are skipped when they
        # come up; there are never more markers than ``total``, so never more
        # deltas either.
        self._order: collections.deque[tuple[str, int]] = collections.deque()
        self._changed: trio.Event | None = None

    def head(self, service: str) -> int | None:
        """The version the history of ``service`` is current to; None if never seen."""
        chain = self._chains.get(service)
        return None if chain is None else chain.head

    def __len__(self) -> int:
        """Deltas held, across services."""
        return sum(len(chain.deltas) for chain in self._chains.values())

    def record(self, delta: Delta) -> None:
        chain = self._chains.get(delta.service)
        if chain is None:
            chain = self._chains[delta.service] = _Chain(delta.from_version)
        elif delta.to_version <= chain.head:
            return  # already recorded through another reader
        elif delta.from_version != chain.head:
            chain.deltas.clear()
        chain.deltas.append(delta)
        chain.head = delta.to_version
        if len(chain.deltas) > self.per_service:
            chain.deltas.popleft()
        self._order.append((delta.service, delta.to_version))
        if len(self._order) > self.total:
            service, version = self._order.popleft()
            oldest = self._chains[service].deltas
            if oldest and oldest[0].to_version == version:
                oldest.popleft()
        self._notify()

    def reset(self, service: str, version: int) -> None:
        """``service`` is at ``version`` by a way other than recorded deltas (a full entry)."""
        chain = self._chains.get(service)
        if chain is None:
            self._chains[service] = _Chain(version)
        elif version > chain.head:
            chain.deltas.clear()
            chain.head = version
        else:
            return
        self._notify()

    def chain(self, service: str, since: int, until: int) -> tuple[Delta, ...] | None:
        """The deltas that take ``service`` from ``since`` to exactly ``until``, or None.

        ``since == until`` needs none (an empty tuple); None means the
        history cannot tell, and the client needs the full entry.
        """
        if since == until:
            return ()
        chain = self._chains.get(service)
        if chain is None or since > until or until > chain.head:
            return None
        found: list[Delta] = []
        for delta in chain.deltas:
            if not found and delta.from_version != since:
                continue
            found.append(delta)
            if delta.to_version == until:
                return tuple(found)
            if delta.to_version > until:
                break
        return None

    async def wait_changed(self) -> None:
        """Until the next :meth:`record` or :meth:`reset` that changed something."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class _FrameCache:
    """Encoded frames by identity, least recently used evicted past ``max_bytes``.

    A delta or a full entry is the same bytes for every subscriber, and a
    service's ``(version)`` names one state for the life of the fan-in, so
    a thousand proxies of one service cost one encoding per change.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: collections.OrderedDict[Hashable, bytes] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable, build: Callable[[], wire.Message]) -> bytes:
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
            return frame
        frame = wire.encode(build())
        if len(frame) <= self.max_bytes // 4:
            self._frames[key] = frame
            self._bytes += len(frame)
            while self._bytes > self.max_bytes:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= len(dropped)
        return frame


# ---------------------------------------------------------------- the server


def _log_report(service: str, instance_id: str, reason: str, client_id: str) -> None:
    log.info("failure report", extra={
        "service": service, "instance": instance_id, "client": client_id, "reason": reason,
    })  # fmt: skip


class SubscriptionServer:
    """Serves one :class:`~dispatcher.core.fanin.FanIn` to proxies; see the module docstring.

    ``token`` is the shared secret every client must present; ``server_id``
    names this Dispatcher (its ``Welcome`` adds an incarnation). Run
    :meth:`serve_tcp` and/or :meth:`serve_unix` in a nursery; they share the
    connection limit and the history.
    """

    def __init__(
        self,
        fanin: FanIn,
        ownership: Ownership,
        token: str,
        server_id: str,
        *,
        history: int = DEFAULT_HISTORY,
        limits: SubscriptionLimits | None = None,
        on_report: ReportHandler | None = None,
        policies: GovernanceFeed | None = None,
    ) -> None:
        if not token:
            raise ValueError("a subscription server needs a non-empty token")
        self.fanin = fanin
        self.ownership = ownership
        self.limits = limits or SubscriptionLimits()
        self.server_id = server_id
        #: Changes with every server object: versions are only meaningful to it.
        self.incarnation = secrets.token_hex(4)
        self.welcome_id = f"{server_id}/{self.incarnation}"
        self.on_report: ReportHandler = on_report or _log_report
        #: Takes the clients' Outcomes reports; None: the Welcome does not offer it and
        #: an Outcomes message is refused like any unknown one. Set before serving.
        self.on_outcomes: OutcomesHandler | None = None
        self.history = DeltaHistory(history, self.limits.history_total)
        self._token = token.encode("utf-8")
        self._frames = _FrameCache(self.limits.frame_cache)
        self._connections: dict[SubscriberConnection, None] = {}
        self._unix_count = 0
        # The one history recorder (interest "all" only): its subscription,
        # and an event set when it stops, so another serve_* can take over.
        self._recorder: Subscription | None = None
        self._recorder_stopped: trio.Event | None = None
        #: Connections refused because max_connections were open.
        self.refused = 0
        self.internal_errors = InternalErrors("subscriptions")
        self._policies: GovernanceFeed | None = None
        self._policies_attached = trio.Event()
        self.policies = policies
        # The newest policy document that parsed, and its version.
        self._policy_set: tuple[int, PolicySet] = (0, PolicySet())
        self._policy_follower_stopped: trio.Event | None = None
        #: Inspection of the clients' tables: told of every Ack compared (see
        #: :meth:`_check_digest`): None when the digest matched, else the divergence.
        self.on_inspected: Callable[[Divergence | None], None] | None = None
        # service -> (version, table_digest of the snapshot's entry at it): one
        # digest per service version, however many clients acknowledge it.
        self._digests: dict[str, tuple[int, str]] = {}

    # ------------------------------------------------------------- reading

    @property
    def policies(self) -> GovernanceFeed | None:
        """The feed of policy documents; None: no policies are sent (yet).

        May be set once after construction, even while serving (a Dispatcher that opens
        its governance store after building this server): clients subscribed by then get
        their policies as soon as the feed has loaded.
        """
        return self._policies

    @policies.setter
    def policies(self, feed: GovernanceFeed | None) -> None:
        if feed is None or feed is self._policies:
            return
        if self._policies is not None:
            raise ValueError("this subscription server follows a policy feed already")
        self._policies = feed
        self._policies_attached.set()

    @property
    def connections(self) -> tuple[SubscriberConnection, ...]:
        """The open connections (each with its client id, services, sent and acked versions)."""
        return tuple(self._connections)

    # ------------------------------------------------------------- serving

    async def serve_tcp(
        self,
        host: str,
        port: int,
        tls: ServerTls | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``host:port`` until cancelled; ``task_status.started(bound port)``.

        With ``tls``, every connection completes a TLS handshake first; without,
        a TLS client is refused with a log line."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("serving subscriptions", extra={"listen": f"{host}:{bound}"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_history)
            nursery.start_soon(self._follow_policies)
            task_status.started(bound)
            await trio.serve_listeners(
                functools.partial(self._serve_tcp_connection, tls=tls), listeners
            )

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on a Unix socket at ``path`` until cancelled; ``task_status.started(path)``.

        A socket file left by a dead server is replaced; one that a live
        server answers on, or any other kind of file, is an error. The
        socket file is removed on exit.
        """
        path = os.fspath(path)
        await wire.remove_stale_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(socket.SOMAXCONN)
            identity = os.stat(path)
        except BaseException:
            sock.close()
            raise
        log.info("serving subscriptions", extra={"listen": f"unix:{path}"})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_history)
                nursery.start_soon(self._follow_policies)
                task_status.started(path)
                await trio.serve_listeners(
                    functools.partial(self._serve_unix_connection, path=path),
                    [trio.SocketListener(sock)],
                )
        finally:
            wire.unlink_if_ours(path, identity)

    def ownership_changed(self) -> None:
        """Redirect every subscriber away from the services this Dispatcher no longer owns.

        Called (synchronously, on the trio thread) by the sharded ownership
        after its answers changed.
        """
        ownership = self.ownership
        for connection in tuple(self._connections):
            lost = [s for s in connection.services if not ownership.owns(s)]
            if lost:
                connection._redirect(lost)

    async def _serve_tcp_connection(
        self, stream: trio.SocketStream, tls: ServerTls | None = None
    ) -> None:
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return  # gone before we could ask who it was
        peer = f"{host}:{port}"
        if tls is None:
            await self._serve_connection(PlainGuard(stream, "subscriptions", peer), peer)
            return
        secure = await tls.accept(stream, peer)
        if secure is not None:
            await self._serve_connection(secure, peer)

    async def _serve_unix_connection(self, stream: trio.SocketStream, path: str) -> None:
        self._unix_count += 1
        await self._serve_connection(stream, f"unix:{path}#{self._unix_count}")

    async def _serve_connection(self, stream: trio.abc.Stream, peer: str) -> None:
        if len(self._connections) >= self.limits.max_connections:
            self.refused += 1
            log.warning("refusing a subscriber (max_connections)", extra={
                "peer": peer, "open": len(self._connections),
            })  # fmt: skip
            refusal = wire.Error(
                "overloaded", f"{self.limits.max_connections} connections are open"
            )
            with (
                trio.move_on_after(self.limits.close_flush_timeout),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(wire.encode(refusal))
            await trio.aclose_forcefully(stream)
            return
        connection = SubscriberConnection(self, stream, peer)
        self._connections[connection] = None
        try:
            async with stream:
                await connection._run()
        except Exception as exc:
            # A bug met by one subscriber ends its connection, not the Dispatcher.
            self.internal_errors.record(exc, peer=peer)
        finally:
            del self._connections[connection]
            connection._drop_subscription()

    # ------------------------------------------------------------- history

    async def _keep_history(self) -> None:
        """Record every delta into the history, unless another serve_* already does."""
        if self.fanin.interest_mode != "all":
            return  # subscribing to everything would load everything upstream
        while True:
            if self._recorder_stopped is not None:
                await self._recorder_stopped.wait()
                continue
            stopped = self._recorder_stopped = trio.Event()
            try:
                async with self.fanin.subscribe([EVERYTHING]) as subscription:
                    self._recorder = subscription
                    async for update in subscription:
                        if update.delta is not None:
                            self.history.record(update.delta)
                        elif update.full is not None:
                            self.history.reset(update.service, update.full.version)
                return  # the hub closed every subscription: the fan-in is done
            finally:
                self._recorder = None
                self._recorder_stopped = None
                stopped.set()
                self.history._notify()

    async def _resumable(self, service: str, held: int, until: int) -> tuple[Delta, ...] | None:
        """The history's deltas from ``held`` to ``until``, waiting briefly for the recorder.

        ``until`` is a version already published, so the recorder (if it
        runs) has every delta up to it queued: it is worth waiting for until
        the history has caught up to ``until``, and not after.
        """
        if held > until:
            return None
        with trio.move_on_after(self.limits.resume_wait):
            while True:
                found = self.history.chain(service, held, until)
                if found is not None:
                    return found
                head = self.history.head(service)
                if (head is not None and head >= until) or self._recorder is None:
                    return None
                await self.history.wait_changed()
        return None

    # ------------------------------------------------------------- policies

    async def _follow_policies(self) -> None:
        """Send changed effective policies to every client, unless another serve_* does."""
        await self._policies_attached.wait()
        feed = self._policies
        assert feed is not None
        while True:
            if self._policy_follower_stopped is not None:
                await self._policy_follower_stopped.wait()
                continue
            stopped = self._policy_follower_stopped = trio.Event()
            try:
                await feed.loaded.wait()
                # Clients that subscribed before the feed loaded get their policies now.
                self._publish_policies()
                async with feed.subscribe() as revisions:
                    async for _ in revisions:
                        self._publish_policies()
                return
            finally:
                self._policy_follower_stopped = None
                stopped.set()

    def _publish_policies(self) -> None:
        for connection in tuple(self._connections):
            connection._refresh_policies()

    def policy_set(self) -> tuple[int, PolicySet] | None:
        """The governance version and the policies in force; None before the feed loaded
        (or without a feed)."""
        feed = self.policies
        if feed is None or not feed.loaded.is_set():
            return None
        revision = feed.current
        if revision is not None and revision.version > self._policy_set[0]:
            try:
                self._policy_set = (revision.version, PolicySet.from_json(revision.body))
            except PolicyError as exc:
                log.error("the policy document does not parse; the last good one stays", extra={
                    "version": revision.version, "in_force": self._policy_set[0],
                    "error": wire.clip(str(exc)),
                })  # fmt: skip
                # Not parsed again for every client: this version is known bad.
                self._policy_set = (revision.version, self._policy_set[1])
        return self._policy_set

    def _policy_frame(self, service: str, application: str) -> tuple[int, str, bytes] | None:
        """``(version, canonical policy, frame)`` of ``service`` for ``application``."""
        current = self.policy_set()
        if current is None:
            return None
        version, policies = current
        policy = policies.effective(service, application or None).to_mapping()
        frame = self._frames.get(("policy", service, application, version),
                                 lambda: wire.PolicyUpdate(service, version, policy))  # fmt: skip
        return version, canonical_json(policy), frame

    # ------------------------------------------------------------- inspection

    def _check_digest(self, connection: SubscriberConnection, ack: wire.Ack) -> None:
        """Compare the table a client reports holding with the one it was sent.

        Only an Ack of the snapshot's current version of the service is
        compared: an older one describes a table with updates still in flight.
        A difference is a divergence (logged, reported to :attr:`on_divergence`)
        and is repaired by a Full of that service to that client, once per
        version: a client whose tables still differ after it is reported again,
        not sent Full after Full.
        """
        service = ack.service
        entry = self.fanin.snapshot.full(service)
        if entry.version != ack.version:
            return
        cached = self._digests.get(service)
        if cached is None or cached[0] != entry.version:
            if len(self._digests) >= _MAX_DIGESTS:
                self._digests.clear()  # bounded; recomputed on demand
            cached = (entry.version, wire.table_digest(wire_full(entry).instances))
            self._digests[service] = cached
        if ack.digest == cached[1]:
            if self.on_inspected is not None:
                self.on_inspected(None)
            return
        repaired = connection._digest_repairs.get(service) != entry.version
        target = connection.client_id or connection.peer
        log.warning("inspection found a divergence", extra={
            "layer": "proxy", "target": target, "service": service,
            "version": entry.version, "instances": len(entry.instances),
            "repaired": "sending a Full" if repaired else "not repaired by a Full",
        })  # fmt: skip
        if repaired:
            connection._digest_repairs[service] = entry.version
            connection._send_update(service, entry.version, lambda: self._full_frame(entry))
        if self.on_inspected is not None:
            self.on_inspected(Divergence("proxy", target, service, (), (), (), 0.0, repaired))

    # ------------------------------------------------------------- frames

    def _full_frame(self, entry: ServiceEntry) -> bytes:
        return self._frames.get(("full", entry.service, entry.version), lambda: wire_full(entry))

    def _delta_frame(self, delta: Delta) -> bytes:
        return self._frames.get(
            ("delta", delta.service, delta.to_version), lambda: wire_deltas(delta)
        )


# ---------------------------------------------------------------- one connection


@attrs.frozen
class _Resume:
    """What to do with a service's next full entry from the hub.

    ``held`` is the version the client holds (None: nothing); ``confirm``
    asks for an empty Deltas when it is already current (the client asked
    for this service; a re-subscription of the server's own making stays
    silent).
    """

    held: int | None
    confirm: bool


class SubscriberConnection:
    """One proxy's connection. Public attributes are for reading (metrics, tests).

    Three tasks: the reader (messages in), the pump (hub updates to frames)
    and the writer (frames to the socket). All state changes happen in
    synchronous code on the trio thread.
    """

    def __init__(self, server: SubscriptionServer, stream: trio.abc.Stream, peer: str) -> None:
        self._server = server
        self._stream = stream
        #: Where the client connects from (``host:port`` or ``unix:PATH#N``).
        self.peer = peer
        #: The client's id from its Hello; None until then.
        self.client_id: str | None = None
        self.connected_at = time.time()
        self._services: dict[str, None] = {}
        self._sent: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        #: Whether the client asked for policies, and for which application.
        self.wants_policies = False
        self.application = ""
        self._policy_sent: dict[str, tuple[int, str]] = {}
        self._policy_acked: dict[str, int] = {}
        # service -> the version a Full was last sent for because the client's
        # digest differed (one repair per version; see _check_digest).
        self._digest_repairs: dict[str, int] = {}
        self._resume: dict[str, _Resume] = {}
        self._subscription: Subscription | None = None
        self._subscription_changed = trio.Event()
        self._out = bytearray()
        self._wake = trio.Event()
        self._drained = trio.Event()
        self.closing = False
        self._reader_scope = trio.CancelScope()
        self._pump_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"SubscriberConnection({self.peer}, client_id={self.client_id!r})"

    @property
    def services(self) -> frozenset[str]:
        """The services this connection is subscribed to."""
        return frozenset(self._services)

    @property
    def sent(self) -> Mapping[str, int]:
        """The version of each service last queued to this client."""
        return MappingProxyType(self._sent)

    @property
    def acked(self) -> Mapping[str, int]:
        """The version of each service this client last acknowledged."""
        return MappingProxyType(self._acked)

    @property
    def policy_sent(self) -> Mapping[str, int]:
        """The governance version of each service's policy last queued to this client."""
        return MappingProxyType({name: sent[0] for name, sent in self._policy_sent.items()})

    @property
    def policy_acked(self) -> Mapping[str, int]:
        """The governance version of each service's policy this client last acknowledged."""
        return MappingProxyType(self._policy_acked)

    @property
    def unsent(self) -> int:
        """Bytes queued for this client and not yet taken by its socket."""
        return len(self._out)

    # ------------------------------------------------------------- tasks

    async def _run(self) -> None:
        limits = self._server.limits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            nursery.start_soon(self._pump)
            self._reader_scope.deadline = trio.current_time() + limits.hello_timeout
            with self._reader_scope:
                await self._read()
            if not self.closing:
                if self.client_id is None and self._reader_scope.cancelled_caught:
                    self._fail("unauthenticated", f"no hello within {limits.hello_timeout:g} s")
                else:
                    self._close("closed by the client", level=logging.DEBUG)

    async def _read(self) -> None:
        decoder = wire.FrameDecoder(wire.MAX_FRAME)
        while True:
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                for message in decoder.feed(data):
                    self._handle(message)
                    if self.closing:
                        return
            except wire.WireError as exc:
                self._fail("bad-request", str(exc))
                return
            except Exception as exc:
                self._server.internal_errors.record(exc, peer=self.peer)
                self._fail("internal", "the server failed to handle a message; see its log")
                return

    async def _pump(self) -> None:
        high_water = self._server.limits.output_high_water
        with self._pump_scope:
            while True:
                subscription = self._subscription
                if subscription is None:
                    self._subscription_changed = trio.Event()
                    await self._subscription_changed.wait()
                    continue
                if len(self._out) > high_water:
                    # Leave the backlog in the hub, where it collapses.
                    self._drained = trio.Event()
                    await self._drained.wait()
                    continue
                try:
                    update = await subscription.__anext__()
                except StopAsyncIteration:
                    if subscription is self._subscription:
                        # Our own shutdown: not something an operator has to look at.
                        self._close(
                            "the Dispatcher closed its subscriptions (shutting down)",
                            level=logging.INFO,
                        )
                        return
                    continue  # replaced by a re-subscription
                if subscription is self._subscription:
                    await self._deliver(subscription, update)

    async def _write(self) -> None:
        limits = self._server.limits
        # One scope for the writer's life, its deadline moved per chunk: a
        # scope per send costs more than the send on a busy Dispatcher.
        stall = trio.CancelScope()
        unsent = 0
        try:
            with self._writer_scope, stall:
                while True:
                    if not self._out:
                        if self.closing:
                            return
                        stall.deadline = math.inf
                        self._wake = trio.Event()
                        await self._wake.wait()
                        continue
                    if len(self._out) <= _SEND_CHUNK:
                        chunk, self._out = self._out, bytearray()
                    else:
                        chunk = self._out[:_SEND_CHUNK]
                        del self._out[:_SEND_CHUNK]
                    unsent = len(self._out) + len(chunk)
                    stall.deadline = trio.current_time() + limits.send_stall
                    await self._stream.send_all(chunk)
                    if len(self._out) <= limits.output_high_water:
                        self._drained.set()
            if stall.cancelled_caught:
                self._abort(f"sending stalled for {limits.send_stall:g} s ({unsent} bytes "
                            "unsent); it is not reading")  # fmt: skip
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self.closing:
                self._close(f"connection lost ({exc.__cause__ or exc})", level=logging.INFO)
        finally:
            self.closing = True
            self._out.clear()
            self._reader_scope.cancel()
            self._pump_scope.cancel()

    # ------------------------------------------------------------- messages in

    def _handle(self, message: wire.Message) -> None:
        server = self._server
        if self.client_id is None:
            answer = wire.check_hello(message, server._token, server.welcome_id)
            if isinstance(answer, wire.Error):
                self._fail(answer.code, answer.message)
                return
            assert isinstance(message, wire.Hello)  # check_hello welcomes nothing else
            self.client_id = message.client_id
            self.wants_policies = message.policies
            self.application = message.application
            self._reader_scope.deadline = math.inf
            if server.on_outcomes is not None:
                answer = attrs.evolve(answer, outcomes=True)
            self._send(wire.encode(answer))
            log.info("subscriber connected", extra={"peer": self.peer, "client": self.client_id})
            return
        if isinstance(message, wire.Subscribe):
            self._subscribe(message.services)
        elif isinstance(message, wire.Unsubscribe):
            self._drop(message.services)
        elif isinstance(message, wire.Ack):
            if message.service in self._services:
                self._acked[message.service] = message.version
                if message.digest is not None:
                    server._check_digest(self, message)
        elif isinstance(message, wire.PolicyAck):
            if message.service in self._services:
                self._policy_acked[message.service] = message.version
        elif isinstance(message, wire.Report):
            self._report(message)
        elif isinstance(message, wire.Outcomes) and server.on_outcomes is not None:
            try:
                server.on_outcomes(message, message.application or self.application)
            except Exception:
                log.exception("outcomes handler failed", extra={
                    "service": message.service, "peer": self.peer, "client": self.client_id,
                })  # fmt: skip
        elif isinstance(message, wire.Ping):
            self._send(wire.encode(wire.Pong()))
        elif not isinstance(message, wire.Pong):
            self._fail("bad-request", f"unexpected {message.type} message")

    def _subscribe(self, services: Mapping[str, int | None]) -> None:
        ownership = self._server.ownership
        for name in services:
            if not name or name == EVERYTHING:
                self._fail("bad-request", f"{name!r} is not a service name")
                return
        wanted = dict(self._services)
        redirects: list[str] = []
        for name in services:
            if ownership.owns(name):
                wanted[name] = None
            else:
                redirects.append(name)
                wanted.pop(name, None)
        if len(wanted) > self._server.limits.max_services:
            self._fail("bad-request", f"more than {self._server.limits.max_services} services "
                       "on one connection")  # fmt: skip
            return
        for name, held in services.items():
            self._forget(name)
            if name in wanted:
                self._resume[name] = _Resume(held if held is None or held >= 0 else None, True)
        for name in redirects:
            self._send_redirect(name)
        for name in services:
            if name in wanted:
                self._send_policy(name)
        # A service asked for again needs a fresh full entry from the hub.
        refresh = any(name in self._services for name in services if name in wanted)
        self._resubscribe(wanted, refresh=refresh)

    def _drop(self, services: Iterable[str]) -> None:
        wanted = dict(self._services)
        for name in services:
            wanted.pop(name, None)
            self._forget(name)
        self._resubscribe(wanted)

    def _redirect(self, services: Iterable[str]) -> None:
        lost = list(services)
        self._drop(lost)
        for name in lost:
            self._send_redirect(name)

    def _report(self, report: wire.Report) -> None:
        server = self._server
        if not server.ownership.owns(report.service):
            self._send_redirect(report.service)
            return
        try:
            server.on_report(report.service, report.instance_id, report.reason,
                             self.client_id or "")  # fmt: skip
        except Exception:
            log.exception("failure report handler failed", extra={
                "service": report.service, "instance": report.instance_id,
                "peer": self.peer, "client": self.client_id,
            })  # fmt: skip

    def _forget(self, service: str) -> None:
        self._resume.pop(service, None)
        self._sent.pop(service, None)
        self._acked.pop(service, None)
        self._digest_repairs.pop(service, None)
        self._policy_sent.pop(service, None)
        self._policy_acked.pop(service, None)

    def _send_policy(self, service: str) -> None:
        """Queue the effective policy of ``service`` unless the client has it already."""
        if not self.wants_policies:
            return
        found = self._server._policy_frame(service, self.application)
        if found is None:
            return  # the feed has not loaded; it sends every policy once it has
        version, text, frame = found
        sent = self._policy_sent.get(service)
        if sent is not None and sent[1] == text:
            return
        self._send(frame)
        self._policy_sent[service] = (version, text)

    def _refresh_policies(self) -> None:
        """A new governance version: send the policies that changed for this client."""
        if self.closing:
            return
        for service in tuple(self._services):
            self._send_policy(service)

    def _resubscribe(self, wanted: dict[str, None], *, refresh: bool = False) -> None:
        """Replace the hub subscription by one for ``wanted`` (sync: nothing is published
        in between, so nothing is missed). ``refresh``: even if the services are the same."""
        if wanted.keys() == self._services.keys() and not refresh:
            return
        # A new subscription starts every service with its full entry; for
        # the ones the client already holds, that is a resume from what was
        # last sent, silent when nothing changed.
        for name in wanted:
            if name not in self._resume:
                self._resume[name] = _Resume(self._sent.get(name), False)
        old = self._subscription
        self._services = wanted
        # Subscribe before closing the old one, so that a service kept across
        # the change never has zero subscribers (the fan-in would drop it).
        self._subscription = self._server.fanin.subscribe(wanted) if wanted else None
        if old is not None:
            old.close()
        self._subscription_changed.set()

    def _drop_subscription(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        self._services = {}

    # ------------------------------------------------------------- updates out

    async def _deliver(self, subscription: Subscription, update: Update) -> None:
        server = self._server
        service = update.service
        if update.delta is not None:
            delta = update.delta
            server.history.record(delta)
            if self._sent.get(service) != delta.from_version:
                # The hub guarantees chaining; should that ever break, a
                # Full is the one answer that cannot leave the client wrong.
                log.error("delta does not chain on the version sent; sending a full entry", extra={
                    "service": service, "peer": self.peer,
                    "from_version": delta.from_version, "sent_version": self._sent.get(service),
                })  # fmt: skip
                current = server.fanin.snapshot.full(service)
                self._send_update(service, current.version, lambda: server._full_frame(current))
                return
            self._send_update(service, delta.to_version, lambda: server._delta_frame(delta))
            return
        entry = update.full
        assert entry is not None
        resume = self._resume.get(service)
        if resume is not None and resume.held is not None:
            deltas = await server._resumable(service, resume.held, entry.version)
            if subscription is not self._subscription or self.closing:
                return  # replaced meanwhile; the new subscription starts over
            self._resume.pop(service, None)
            if deltas is not None and self._send_resume(service, resume, deltas):
                self._sent[service] = entry.version
                return
        else:
            self._resume.pop(service, None)
            if self._sent.get(service) == entry.version:
                return  # a collapse that skipped nothing of this service
        self._send_update(service, entry.version, lambda: server._full_frame(entry))

    def _send_resume(self, service: str, resume: _Resume, deltas: tuple[Delta, ...]) -> bool:
        """Queue the deltas that bring the client to the present; False: send a Full instead."""
        if not deltas:
            if resume.confirm:
                assert resume.held is not None
                self._send(wire.encode(wire.Deltas(service, resume.held, resume.held)))
            return True
        try:
            frames = [self._server._delta_frame(delta) for delta in deltas]
        except wire.WireError:
            return False
        if sum(map(len, frames)) > self._server.limits.output_high_water:
            return False  # a full entry is at most one frame; this backlog is more
        for frame in frames:
            self._send(frame)
        return True

    def _send_update(self, service: str, version: int, encode: Callable[[], bytes]) -> None:
        try:
            frame = encode()
        except wire.WireError as exc:
            # Not the client's fault, and no smaller message says the same.
            log.error("cannot send a service to a subscriber", extra={
                "service": service, "peer": self.peer, "error": str(exc),
            })  # fmt: skip
            self._send(wire.encode(wire.Error("overloaded", f"{service}: {exc}")))
            self._drop([service])
            return
        self._send(frame)
        self._sent[service] = version

    def _send_redirect(self, service: str) -> None:
        ownership = self._server.ownership
        self._send(wire.encode(wire.Redirect(service, ownership.owner_of(service),
                                             ownership.epoch)))  # fmt: skip

    def _send(self, frame: bytes) -> None:
        if self.closing:
            return
        self._out += frame
        self._wake.set()
        if len(self._out) > self._server.limits.max_output:
            self._abort(f"{len(self._out)} bytes unsent; it is not reading")

    # ------------------------------------------------------------- closing

    def _fail(self, code: str, message: str) -> None:
        """Refuse: send ``Error(code, message)``, log one line, close."""
        if self.closing:
            return
        message = wire.clip(message, 1000)
        self._send(wire.encode(wire.Error(code, message)))
        self._close(f"{code}: {message}")

    def _close(self, reason: str, *, level: int = logging.WARNING) -> None:
        """Close after what is queued is sent (within close_flush_timeout)."""
        if self.closing:
            return
        log.log(level, "closing a subscriber", extra={
            "peer": self.peer, "client": self.client_id, "reason": wire.clip(reason),
        })  # fmt: skip
        self.closing = True
        self._drop_subscription()
        self._reader_scope.cancel()
        self._pump_scope.cancel()
        self._writer_scope.deadline = min(
            self._writer_scope.deadline,
            trio.current_time() + self._server.limits.close_flush_timeout,
        )
        self._wake.set()

    def _abort(self, reason: str) -> None:
        """Close at once, dropping what is unsent."""
        self._close(reason)
        self._out.clear()
        self._writer_scope.cancel()
