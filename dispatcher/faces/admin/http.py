"""The admin HTTP server: metrics, health, readiness, the snapshot and the status page.

Every gateway process serves, on a port of its own (loopback by default; see
the ``[admin]`` table in :mod:`dispatcher.config`)::

    GET /            the status page (one self-contained HTML file, no external assets)
    GET /metrics     Prometheus text format (OpenMetrics when the scraper asks for it)
    GET /health      200 "ok" while the process serves
    GET /ready       200 once the ZooKeeper port is bound and every upstream has
                     connected at least once; 503 with the reasons (JSON) before
    GET /snapshot    the merged snapshot as JSON; ``?service=NAME`` (repeatable) narrows it
    GET /shards      the shard map as JSON, or {"sharding": "off"}
    GET /status      what the status page shows besides the snapshot: upstreams and
                     their staleness, the ZooKeeper face's counters, readiness, policies
    /policies...     the policy API (read, diff, write, roll back; see
                     :mod:`~dispatcher.faces.admin.policies`)

This module is the server: routing, connection caps and deadlines. What the
answers contain comes from its neighbours in :mod:`dispatcher.faces.admin`:
``/metrics`` from the collector in :mod:`~dispatcher.faces.admin.prometheus`
(fed, for per-opcode requests, by :mod:`~dispatcher.faces.admin.metrics`),
``/snapshot`` and ``/shards`` from :mod:`~dispatcher.faces.admin.rendering`.

Readiness is "has every upstream delivered at least once", not "is every
upstream connected now": a gateway whose upstream went down keeps serving the
last snapshot (marked stale), and taking it out of a load balancer then would
turn one registry's outage into an outage of every gateway. Staleness is for
metrics and alerts (``zkgate_upstream_stale_seconds``). Which upstreams have
ever connected is sampled by
:class:`~dispatcher.faces.admin.prometheus.GatewayObserver` every
``sample_interval`` (0.1 s) and on every request.

The HTTP server is h11 on trio and bounded everywhere: at most
``max_connections`` connections, ``max_connections_per_address`` of them from
one client address (at a cap, the connection waiting longest for its request
is evicted to make room, and when every one is busy answering, the newcomer is
answered 503 and closed: see :meth:`AdminServer._admit`), a request head of at
most ``max_request_head`` bytes (431) that must arrive within
``header_timeout`` seconds of the request's start and a body of at most
``max_request_body`` bytes (413) within ``request_timeout`` (408), a keep-alive
connection idle for at most ``idle_timeout`` seconds (then closed), and
``send_timeout`` seconds to take a response. On Linux the listening socket
defers each connection until its first bytes arrive (``TCP_DEFER_ACCEPT``).
Slow clients hold slots for seconds at most, and never one that a client
sending its request at once needs.
Rendering a large snapshot as JSON runs in a worker thread (a snapshot is
immutable, so this needs no lock), one render at a time, and the last full
rendering is kept until the version changes, so a room full of open status
pages costs one rendering per snapshot version.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from dispatcher.containment import InternalErrors
from dispatcher.core.snapshot import Snapshot
from dispatcher.faces.admin.mesh import MeshApi
from dispatcher.faces.admin.metrics import RequestMetrics
from dispatcher.faces.admin.policies import PolicyApi
from dispatcher.faces.admin.prometheus import GatewayCollector, GatewayObserver, proxy_lag
from dispatcher.faces.admin.rendering import json_body, render_snapshot
from dispatcher.tls import PlainGuard, SecureHalfCloseable, ServerTls

if TYPE_CHECKING:
    from dispatcher.core.subscriptions import Subscription
    from dispatcher.gateway import Gateway

__all__ = ["AdminLimits", "AdminServer"]

log = logging.getLogger(__name__)

_RECEIVE_SIZE: Final = 16384
_PAGE: Final = "status_page.html"
_ROUTES: Final = (
    "/", "/metrics", "/health", "/ready", "/snapshot", "/shards", "/status", "/policies",
    "/inspect", "/mesh",
)  # fmt: skip


@attrs.frozen
class AdminLimits:
    """Bounds of the admin HTTP server (see the module docstring)."""

    max_connections: int = 64
    #: Open connections from one client address; one more evicts the
    #: address's own connection waiting longest, or is answered 503.
    max_connections_per_address: int = 8
    max_request_head: int = 8192
    max_request_body: int = 1024
    #: The body of a policy write or diff (``/policies``), the only requests whose body is
    #: read: room for the largest policy document the store takes (256 KiB of canonical
    #: JSON) written out with indentation.
    max_write_body: int = 512 * 1024
    #: Seconds from a request's start to the end of its head. A request starts
    #: at its first byte, the first request of a connection at the accept: curl
    #: and Prometheus open a connection to send a request and write its whole
    #: head (well under one TCP segment) at once, so it arrives within one
    #: round trip even after a retransmission or two; only a client trickling
    #: bytes needs longer.
    header_timeout: float = 2.0
    #: Seconds a keep-alive connection may wait for its next request. Generous,
    #: so that a status page polling every second and a scraper on a 15 s
    #: interval keep their connection: idle connections are the first to be
    #: evicted when the caps are reached, so they cost nothing under pressure.
    idle_timeout: float = 15.0
    #: Seconds from a request's start to its end, body included.
    request_timeout: float = 10.0
    send_timeout: float = 10.0
    #: How long a refused or failed connection is drained before it is closed,
    #: so that the client reads the error instead of a reset.
    linger: float = 0.5


class _Slot:
    """One admitted connection, as the connection caps see it."""

    __slots__ = ("address", "evicted", "fresh", "method", "released", "waiting")

    def __init__(self, address: str) -> None:
        self.address = address
        #: The scope of the connection's current wait for a request: cancelled
        #: to evict it. A request being answered is outside it, never evicted.
        self.waiting = trio.CancelScope()
        #: Nothing received yet on this connection.
        self.fresh = True
        #: The method of the request being read, once its head is in: an
        #: error answer to a HEAD request must go without its body.
        self.method = b""
        self.evicted = False
        self.released = False


class _Queue:
    """Slots in the order they joined, in all and by client address."""

    def __init__(self) -> None:
        self._all: dict[_Slot, None] = {}  # a dict as an ordered set
        self._by_address: dict[str, dict[_Slot, None]] = {}

    def add(self, slot: _Slot) -> None:
        self._all[slot] = None
        self._by_address.setdefault(slot.address, {})[slot] = None

    def discard(self, slot: _Slot) -> None:
        if self._all.pop(slot, False) is None:
            own = self._by_address[slot.address]
            del own[slot]
            if not own:
                del self._by_address[slot.address]

    def first(self, address: str | None = None) -> _Slot | None:
        """The earliest slot to join (from ``address``, if given), if any."""
        slots = self._all if address is None else self._by_address.get(address, {})
        return next(iter(slots), None)


def _throttled(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th... event: a flood of connections must
    not become a flood of log lines."""
    return count & (count - 1) == 0


@attrs.frozen
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class _BodyTooLarge(Exception):
    pass


class _HeadTooLarge(Exception):
    pass


def _json(status: int, value: object, *headers: tuple[str, str]) -> _Response:
    return _Response(status, json_body(value), "application/json", headers)


def _text(status: int, text: str, *headers: tuple[str, str]) -> _Response:
    return _Response(status, text.encode(), "text/plain; charset=utf-8", headers)


def _load_page() -> tuple[bytes, str]:
    """The status page, and a Content-Security-Policy that allows exactly its
    inline script and style (by hash) and fetches to this origin: the page
    renders strings from upstream registries, so nothing else may run."""
    page = resources.files("dispatcher.faces.admin").joinpath(_PAGE).read_bytes()
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag in hashes:
        pattern = rf"<{tag}>(.*?)</{tag}>".encode()
        for block in re.findall(pattern, page, flags=re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(block).digest()).decode()
            hashes[tag].append(f"'sha256-{digest}'")
    policy = (
        "default-src 'none'; connect-src 'self'; img-src 'self' data:; "
        f"script-src {' '.join(hashes['script'])}; style-src {' '.join(hashes['style'])}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy


class AdminServer:
    """The admin endpoint of one :class:`~dispatcher.gateway.Gateway`.

    ``shards`` returns the shard map as a JSON-able mapping (None: sharding
    is off). Further collectors (the health checker's, for instance) can be
    passed in ``collectors`` or registered on :attr:`registry` later.
    ``clock`` is monotonic time, for the snapshot's age.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        limits: AdminLimits | None = None,
        shards: Callable[[], Mapping[str, Any] | None] | None = None,
        collectors: Iterable[Collector] = (),
        sample_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.limits = limits or AdminLimits()
        self.requests = RequestMetrics()
        #: The ``/policies`` routes.
        self.policies = PolicyApi(gateway)
        #: The ``/mesh`` routes (mesh onboarding).
        self.mesh = MeshApi(gateway)
        self.observer = GatewayObserver(gateway, clock)
        self.sample_interval = sample_interval
        self._shards = shards
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(self))
        self.registry.register(ProcessCollector(registry=None))
        for collector in collectors:
            self.registry.register(collector)
        #: Connections refused (503) because ``max_connections`` or
        #: ``max_connections_per_address`` were open and none was evictable.
        self.refused = 0
        #: Connections closed to make room for a new one (see :meth:`_admit`).
        self.evicted = 0
        #: Requests whose head or body did not arrive in time (408).
        self.timed_out = 0
        self.internal_errors = InternalErrors("admin")
        #: Requests answered, by route (anything else counts as "other").
        self.served: dict[str, int] = dict.fromkeys((*_ROUTES, "other"), 0)
        #: Admitted connections: in all, and by client address.
        self._connections = 0
        self._per_address: dict[str, int] = {}
        # The admitted connections waiting for (the rest of) a request, in the
        # order they began to wait: the eviction candidates (see _admit).
        self._started = _Queue()  # something received: part of a request, or a request before
        self._fresh = _Queue()  # nothing received yet
        self._refusals: dict[str, int] = {}  # by cap, for the log's throttle
        # A process-unique ETag prefix: versions restart at 0 with the process,
        # and a browser must not revalidate an old process's body against them.
        self._etag_prefix = secrets.token_hex(4)
        self._render_limiter = trio.CapacityLimiter(1)
        # Whole-snapshot renderings of the current version, by limit (a few at most).
        self._rendered: dict[int | None, tuple[Snapshot, bytes]] = {}
        self._page, self._page_policy = _load_page()
        self.port: int | None = None
        self._tls: ServerTls | None = None

    # ------------------------------------------------------------- serving

    async def serve(
        self,
        host: str,
        port: int,
        tls: ServerTls | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` until cancelled; ``task_status.started(bound port)``.

        With ``tls``, HTTPS: each connection's handshake completes before its
        request is read (and before it takes a slot)."""
        self._tls = tls
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        defer = getattr(socket, "TCP_DEFER_ACCEPT", None)
        if defer is not None:
            # Linux hands over a connection only once its first bytes are in
            # (or header_timeout, rounded up, has passed): a client that
            # connects and says nothing takes no slot, and a probe's request
            # is there to read when its connection is admitted, so the next
            # arrivals cannot evict it first. nginx's "deferred" and Apache's
            # default AcceptFilter do the same.
            seconds = max(1, math.ceil(self.limits.header_timeout))
            for listener in listeners:
                listener.socket.setsockopt(socket.IPPROTO_TCP, defer, seconds)
        log.info("admin endpoint listening", extra={"listen": f"{host}:{self.port}"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample)
            task_status.started(self.port)
            await trio.serve_listeners(self._serve_connection, listeners)

    async def _sample(self) -> None:
        while True:
            self.observer.sample()
            await trio.sleep(self.sample_interval)

    def subscriptions(self) -> Iterator[Subscription]:
        """Every open subscription of the fan-in's hub, once each."""
        return self.gateway.fanin.hub.subscriptions()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            address, port, *_ = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)  # gone before it could be served
            return
        tls = self._tls
        if tls is None:
            await self.serve_stream(PlainGuard(stream, "admin", f"{address}:{port}"), address)
            return
        secure = await tls.accept(stream, f"{address}:{port}")
        if secure is not None:
            await self.serve_stream(SecureHalfCloseable(secure), str(address))

    async def serve_stream(self, stream: trio.abc.HalfCloseableStream, address: str) -> None:
        """Serve one accepted connection whose client is ``address`` (the key of
        ``max_connections_per_address``), under every limit, until it closes."""
        slot = self._admit(address)
        if slot is None:
            await self._refuse(stream)
            return
        try:
            await self._http(stream, slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell it
        except Exception as exc:
            # What _http's own error handling did not foresee ends this
            # connection only (a failing page already answers 500 there).
            self.internal_errors.record(exc)
        finally:
            self._release(slot)
            await trio.aclose_forcefully(stream)

    def _admit(self, address: str) -> _Slot | None:
        """A slot for a new connection from ``address``, or None: refuse it (503).

        At a cap, the admitted connection that has waited longest for its
        request (an idle keep-alive one, or one whose head is still arriving)
        is evicted to make room: among the address's own connections for
        ``max_connections_per_address``, among all for ``max_connections``.
        It is answered 503 (retry-after 1) if part of a request had come, and
        closed without a word otherwise, as at its idle deadline. Only when
        every connection in the cap's reach is busy answering a request is the
        newcomer refused; those are bounded by ``send_timeout``.
        A connection on which nothing has arrived yet goes last, after every
        one that has sent something: it is most likely a client that has just
        connected and whose request is on its way (a probe arriving during a
        flood of slow connections must not lose its slot to the next arrivals
        before its first bytes are read), and it gets header_timeout at most.

        Eviction rather than reserved capacity, because nothing at accept time
        tells a health probe from a slowloris connection (on loopback they even
        share an address): reserved slots would fill with slow clients as fast
        as the shared ones. Behaviour tells them apart. A client that sends
        its request at once is answered within milliseconds and is never the
        one waiting longest, while a connection trickling its head or idling
        grows older with every arrival until it is the one evicted. The cost
        to the victim is a retry: HTTP clients reopen an idle keep-alive
        connection by themselves, and a head still incomplete after every
        younger connection has arrived is a slow client's. The deadlines then
        bound how long a slow connection holds a slot when nobody needs it.
        """
        limits = self.limits
        if self._per_address.get(address, 0) >= limits.max_connections_per_address:
            victim = self._started.first(address) or self._fresh.first(address)
            if victim is None:
                self._refusal("max_connections_per_address", address)
                return None
            self._evict(victim, "max_connections_per_address")
        if self._connections >= limits.max_connections:
            victim = self._started.first() or self._fresh.first()
            if victim is None:
                self._refusal("max_connections", address)
                return None
            self._evict(victim, "max_connections")
        self._connections += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return _Slot(address)

    def _refusal(self, cap: str, address: str) -> None:
        self.refused += 1
        count = self._refusals[cap] = self._refusals.get(cap, 0) + 1
        if _throttled(count):
            log.warning(f"admin endpoint refusing connections ({cap})", extra={
                "open": self._connections, "address": address, "refused": count,
            })  # fmt: skip

    def _evict(self, slot: _Slot, cap: str) -> None:
        slot.evicted = True
        slot.waiting.cancel()
        self._release(slot)
        self.evicted += 1
        if _throttled(self.evicted):
            log.warning("admin endpoint evicting the connection waiting longest", extra={
                "cap": cap, "address": slot.address, "open": self._connections,
                "evicted": self.evicted,
            })  # fmt: skip

    def _release(self, slot: _Slot) -> None:
        """Give the slot back (once: eviction and the connection's end both call this)."""
        if slot.released:
            return
        slot.released = True
        self._stop_waiting(slot)
        self._connections -= 1
        left = self._per_address[slot.address] - 1
        if left:
            self._per_address[slot.address] = left
        else:
            del self._per_address[slot.address]

    def _start_waiting(self, slot: _Slot, waiting: trio.CancelScope) -> None:
        slot.waiting = waiting
        (self._fresh if slot.fresh else self._started).add(slot)

    def _heard(self, slot: _Slot) -> None:
        """The first bytes on ``slot``'s connection arrived."""
        slot.fresh = False
        if not slot.released:
            self._fresh.discard(slot)
            self._started.add(slot)

    def _stop_waiting(self, slot: _Slot) -> None:
        self._fresh.discard(slot)
        self._started.discard(slot)

    async def _refuse(self, stream: trio.abc.HalfCloseableStream) -> None:
        body = b"too many admin connections\n"
        data = (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
        ) % (len(body), body)
        with trio.move_on_after(self.limits.linger):
            try:
                await stream.send_all(data)
                await self._drain(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(stream)

    async def _drain(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Half-close, then read and drop what the client still sends (bounded by
        the caller's deadline and 64 KiB): closing with unread input would
        reset the connection and could destroy the response before it is read."""
        await stream.send_eof()
        left = 65536
        while left > 0:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return
            left -= len(data)

    async def _http(self, stream: trio.abc.HalfCloseableStream, slot: _Slot) -> None:
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_request_head)
        # The first request starts at the accept (see AdminLimits.header_timeout).
        start: float | None = trio.current_time()
        while not slot.evicted:
            error: _Response | None = None
            request: h11.Request | None = None
            body = b""
            if start is None and conn.trailing_data[0]:
                start = trio.current_time()  # pipelined: the next request is here already
            if start is None:
                deadline = trio.current_time() + limits.idle_timeout
            else:
                deadline = start + min(limits.header_timeout, limits.request_timeout)
            slot.method = b""
            with trio.CancelScope(deadline=deadline) as waiting:
                self._start_waiting(slot, waiting)
                try:
                    request, body = await self._read_request(stream, conn, slot, start)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    error = _text(status, f"bad request: {exc}\n")
                except _BodyTooLarge as exc:
                    error = _text(413, f"request body over {exc.args[0]} bytes\n")
                except _HeadTooLarge:
                    error = _text(431, f"request head over {limits.max_request_head} bytes\n")
            self._stop_waiting(slot)
            if waiting.cancelled_caught:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return  # nothing of a request yet: just close
                if slot.evicted:
                    error = _text(503, "admin endpoint busy; evicted for a newer connection\n",
                                  ("retry-after", "1"))  # fmt: skip
                else:
                    self.timed_out += 1
                    if _throttled(self.timed_out):
                        log.info(
                            "admin endpoint closing a request not complete in time",
                            extra={"address": slot.address, "timed_out": self.timed_out},
                        )
                    error = _text(408, "request not complete in time\n")
            elif error is not None:
                log.info("admin endpoint answering a bad request", extra={
                    "status": error.status, "error": error.body.decode(errors="replace").strip(),
                })  # fmt: skip
            if error is not None:
                # Done with this connection: its slot is free at once, and the
                # answer's linger is bounded by time.
                self._release(slot)
                await self._fail(stream, conn, error, head_only=slot.method == b"HEAD")
                return
            if request is None:
                return  # the client closed the connection between requests
            try:
                response = await self._route(request, body)
            except Exception:
                # A bug behind one page must not take the process down with it.
                log.exception("admin request failed", extra={
                    "method": request.method.decode(),
                    "target": request.target.decode("ascii", "replace"),
                })  # fmt: skip
                response = _text(500, "internal error; see the gateway's log\n")
            head_only = request.method == b"HEAD"
            with trio.move_on_after(limits.send_timeout) as sending:
                await self._send(stream, conn, response, head_only=head_only)
            if sending.cancelled_caught:
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            start = None  # a later request starts at its first byte

    async def _read_request(
        self,
        stream: trio.abc.HalfCloseableStream,
        conn: h11.Connection,
        slot: _Slot,
        start: float | None,
    ) -> tuple[h11.Request | None, bytes]:
        """The next complete request and its body, or None at EOF.

        Only the policy API's writes have their body kept (up to ``max_write_body``); every
        other body is read and dropped (up to ``max_request_body``).

        ``start`` is when the request began, None while a keep-alive
        connection waits for its first byte. From its start, the head must be
        complete within ``header_timeout`` and the whole request within
        ``request_timeout``; the deadline of ``slot.waiting`` is moved so.
        """
        limits = self.limits
        waiting = slot.waiting
        request: h11.Request | None = None
        body = 0
        limit = limits.max_request_body
        kept: bytearray | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if data and slot.fresh:
                    self._heard(slot)
                if start is None and data:
                    start = trio.current_time()
                    waiting.deadline = start + min(limits.header_timeout, limits.request_timeout)
                # bytes() is free on bytes; a bytearray (the stream may
                # return one) is copied, as h11's signature asks for bytes.
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
                slot.method = event.method
                target_path = urlsplit(event.target.decode("ascii", "replace")).path
                if event.method in (b"PUT", b"POST") and (
                    PolicyApi.handles(target_path) or MeshApi.handles(target_path)
                ):
                    limit, kept = limits.max_write_body, bytearray()
                if start is not None:
                    waiting.deadline = start + limits.request_timeout
                # h11 bounds only a head still incomplete; one that arrived
                # whole in a single read is measured here.
                head = len(event.method) + len(event.target) + 16
                for name, value in event.headers:
                    head += len(name) + len(value) + 4
                    if name == b"content-length" and int(value) > limit:
                        raise _BodyTooLarge(limit)
                if head > limits.max_request_head:
                    raise _HeadTooLarge
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > limit:
                    raise _BodyTooLarge(limit)
                if kept is not None:
                    kept += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, b"" if kept is None else bytes(kept)
            else:  # ConnectionClosed, or PAUSED (cannot happen: one cycle at a time)
                return None, b""

    async def _fail(
        self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, error: _Response,
        *, head_only: bool,
    ) -> None:  # fmt: skip
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        error = attrs.evolve(error, headers=(*error.headers, ("connection", "close")))
        with trio.move_on_after(self.limits.linger):
            try:
                await self._send(stream, conn, error, head_only=head_only)
                await self._drain(stream)
            except h11.LocalProtocolError:
                return

    async def _send(
        self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, response: _Response,
        *, head_only: bool,
    ) -> None:  # fmt: skip
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("x-content-type-options", "nosniff"),
            ("server", "zkgate"),
            *response.headers,
        ]
        if not any(name == "cache-control" for name, _ in response.headers):
            headers.append(("cache-control", "no-store"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        assert data is not None
        if response.body and not head_only:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)

    # ------------------------------------------------------------- routes

    async def _route(self, request: h11.Request, body: bytes = b"") -> _Response:
        target = urlsplit(request.target.decode("ascii", "replace"))
        query = parse_qs(target.query)
        if PolicyApi.handles(target.path):
            self.served["/policies"] += 1
            answer = await self.policies.handle(
                request.method, target.path, query, dict(request.headers), body
            )
            return _json(answer.status, answer.body, *answer.headers)
        if MeshApi.handles(target.path):
            self.served["/mesh"] += 1
            answer = await self.mesh.handle(
                request.method, target.path, query, dict(request.headers), body
            )
            return _json(answer.status, answer.body, *answer.headers)
        if target.path == "/inspect":
            self.served["/inspect"] += 1
            return await self._inspect(request)
        if request.method not in (b"GET", b"HEAD"):
            return _text(405, "only GET and HEAD\n", ("allow", "GET, HEAD"))
        self.observer.sample()
        path = target.path
        self.served[path if path in self.served else "other"] += 1
        if path == "/":
            return _Response(200, self._page, "text/html; charset=utf-8",
                             (("content-security-policy", self._page_policy),))  # fmt: skip
        if path == "/health":
            return _text(200, "ok\n")
        if path == "/ready":
            reasons = self.observer.not_ready()
            if reasons:
                return _json(503, {"ready": False, "reasons": reasons})
            return _json(200, {"ready": True})
        if path == "/metrics":
            accept = ""
            for name, value in request.headers:
                if name == b"accept":
                    accept = value.decode("latin-1")
            encoder, content_type = choose_encoder(accept)
            return _Response(200, encoder(self.registry), content_type)
        if path == "/snapshot":
            limit = query.get("limit", [""])[-1]
            if limit and not (limit.isdigit() and int(limit) > 0):
                return _text(400, "limit must be a positive integer\n")
            services = query.get("service")
            return await self._snapshot(request, services, int(limit) if limit else None)
        if path == "/shards":
            shards = self._shards() if self._shards is not None else None
            return _json(200, shards if shards is not None else {"sharding": "off"})
        if path == "/status":
            await self.policies.refresh_status()
            await self.mesh.refresh_status()
            return _json(200, self.status())
        return _text(404, f"no such page: {path} (try /, /metrics, /health, /ready, "
                          "/snapshot, /shards, /status)\n")  # fmt: skip

    async def _snapshot(
        self, request: h11.Request, services: list[str] | None, limit: int | None
    ) -> _Response:
        snapshot = self.gateway.fanin.snapshot
        etag = f'"{self._etag_prefix}-{snapshot.version}"'
        headers = (("etag", etag), ("cache-control", "no-cache"))
        for name, value in request.headers:
            if name == b"if-none-match" and etag in value.decode("latin-1"):
                return _Response(304, b"", "application/json", headers)
        rendered = self._rendered.get(limit) if services is None else None
        if rendered is not None and rendered[0] is snapshot:
            return _Response(200, rendered[1], "application/json", headers)
        body = await trio.to_thread.run_sync(
            render_snapshot, snapshot, services, limit, limiter=self._render_limiter
        )
        if services is None:
            cache = self._rendered
            if len(cache) >= 4 or any(old is not snapshot for old, _ in cache.values()):
                cache.clear()  # bounded, and only the current version's
            cache[limit] = (snapshot, body)
        return _Response(200, body, "application/json", headers)

    async def _inspect(self, request: h11.Request) -> _Response:
        """``POST /inspect``: one inspection pass, reported, nothing repaired.

        It costs upstream reads, so where the endpoint has a write token
        (``[governance] token``) the request must carry it as a bearer token.
        """
        if request.method != b"POST":
            return _text(405, "only POST\n", ("allow", "POST"))
        inspector = self.gateway.inspector
        if inspector is None:
            return _text(503, "inspection is not available until the gateway serves\n")
        token = self.gateway.config.governance.token
        if token is not None:
            sent = b""
            for name, value in request.headers:
                if name == b"authorization" and value.startswith(b"Bearer "):
                    sent = value[len(b"Bearer ") :].strip()
            if not hmac.compare_digest(sent, token.encode()):
                refusal = "POST /inspect needs 'Authorization: Bearer <token>' ([governance] token)"
                return _text(401, refusal + "\n", ("www-authenticate", "Bearer"))
        reports = await inspector.inspect(repair=False)
        return _json(200, {
            "consistent": all(report.consistent for report in reports),
            "layers": [report.to_json() for report in reports],
        })  # fmt: skip

    def _proxies_status(self) -> dict[str, Any] | None:
        server = self.gateway.subscriptions
        if server is None:
            return None
        connections = server.connections
        behind, unsent = proxy_lag(self.gateway.fanin.snapshot, connections)
        return {"connections": len(connections), "services_behind": behind,
                "unsent_bytes_max": unsent, "refused": server.refused}  # fmt: skip

    def status(self) -> dict[str, Any]:
        """What ``/status`` answers: readiness, upstreams, the ZooKeeper face, subscribers."""
        gateway = self.gateway
        observer = self.observer
        observer.sample()
        now = time.time()
        kinds = {u.name: u.kind for u in gateway.config.upstreams}
        upstreams = []
        for name, state in gateway.fanin.status.items():
            upstreams.append({
                "name": name,
                "kind": kinds.get(name, ""),
                "connected": state.connected,
                "ever_connected": name in observer.ever_connected,
                "since": state.since,
                "stale_seconds": 0.0 if state.connected else max(0.0, now - state.since),
                "detail": state.detail,
            })  # fmt: skip
        for mirror in gateway.mirrors:
            status = mirror.status()
            upstreams.append({
                "name": f"mirror:{mirror.root}",
                "kind": "mirror",
                "connected": mirror.connected,
                "ever_connected": bool(mirror.resyncs),
                "since": mirror.since,
                "stale_seconds": mirror.stale_seconds,
                "detail": f"{status['zk_mirror_cached_znodes']} znodes cached, "
                          f"{status['zk_mirror_upstream_sessions']} upstream sessions",
            })  # fmt: skip
        snapshot = gateway.fanin.snapshot
        engine = gateway.engine
        zookeeper: dict[str, Any] = {
            "listen": gateway.config.zookeeper.listen,
            "port": gateway.port,
        }
        if engine is not None:
            zookeeper.update(
                sessions=len(engine.sessions),
                connections=len(engine.clients),
                znodes=len(engine.tree.nodes),
                watches=engine.watches.watch_count,
            )
        reasons = observer.not_ready()
        pending = [s.pending for s in self.subscriptions()]
        interest = gateway.fanin.interest
        return {
            "node": gateway.config.node,
            "time": now,
            "ready": not reasons,
            "reasons": reasons,
            "snapshot": {
                "version": snapshot.version,
                "age_seconds": observer.snapshot_age(),
                "services": len(snapshot),
            },
            "zookeeper": zookeeper,
            "upstreams": upstreams,
            "subscribers": {
                "count": gateway.fanin.hub.subscriber_count,
                "lag_max": max(pending, default=0),
            },
            "proxies": self._proxies_status(),
            "policies": self.policies.status(),
            "mesh": self.mesh.status(),
            "xds": self._xds_status(),
            "interest": None if interest is None else sorted(interest),
            "inspection": None if gateway.inspector is None else gateway.inspector.status(),
        }

    def _xds_status(self) -> dict[str, Any] | None:
        server = self.gateway.xds
        if server is None:
            return None
        m = server.metrics
        return {"listen": server.config.listen, "port": server.port, "streams": m.streams_active,
                "refused": m.streams_refused, "nacks": m.nacks}  # fmt: skip
