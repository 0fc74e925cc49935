"""The data plane: accept the application's connections and splice them to endpoints.

One :class:`ServiceForwarder` per service listens on a TCP address
(``127.0.0.1:PORT``) or a Unix socket path. For every accepted connection:

1. **Pick** an endpoint from the service's table with the service's
   balancer. A connection that arrives before the control plane delivered
   any endpoint waits for one (``endpoint_wait``) instead of failing: a
   sidecar that is starting up must not refuse its application.
2. **Connect** with ``connect_timeout``. A refused, timed-out or otherwise
   failed connect is counted by the outlier detector (which may eject the
   endpoint and, if it does, the endpoint is reported to the owning
   Dispatcher) and retried on another endpoint, up to ``attempts`` distinct
   endpoints. Nothing has been read from the client yet, so a retry is
   always safe.
3. **Splice** bytes both ways until both sides have closed their write
   halves (a half-close is passed on with ``shutdown(SHUT_WR)``). An error
   on either side (a reset) aborts both, and the other side is closed with
   ``SO_LINGER`` 0 so that it sees the reset too rather than a clean end of
   stream it could mistake for a complete reply.

The copy loop is the hot path, so it does not go through trio's socket
wrappers: it calls the non-blocking stdlib socket directly and waits with
:func:`trio.lowlevel.wait_readable` / :func:`~trio.lowlevel.wait_writable`
only when the socket would block. Two measured details:

* a read shorter than the buffer means the socket is drained, so the loop
  waits for readability at once instead of paying for a ``recv`` that
  would only say ``EAGAIN``;
* a loop that never has to wait (a bulk transfer that keeps both sockets
  ready) yields to the scheduler every :data:`_SPIN` chunks, so one busy
  connection cannot starve the others.

That loop is the ``trio`` engine. The ``epoll`` engine (:mod:`proxy.splicer`)
does steps 1 and 2 here the same way and hands step 3 to one thread with its
own epoll, which costs less than half the CPU per message.

``TCP_NODELAY`` is set on both legs: the proxy must not add Nagle's delay
to small request/response messages.

A governance policy (:mod:`proxy.policy`), when one is in force for the
service, replaces the flags' settings and balancer for new connections, and
adds circuit breaking (refuse beyond ``max_connections`` held or
``max_pending`` waiting), a retry filter and budget, and a first-byte
timeout between the connect and the splice.

Given an :class:`~proxy.outcomes.OutcomeCounter`, each connection's outcome and latency are
counted there (see :mod:`proxy.outcomes`) for the mesh's automatic rollback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs
import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from dispatcher import wire
from proxy.balancer import Balancer
from proxy.endpoints import EndpointState, ServiceTable
from proxy.outcomes import OutcomeCounter
from proxy.outlier import OutlierDetector
from proxy.splicer import EpollSplicer

if TYPE_CHECKING:
    from proxy.policy import Route, ServicePolicy

__all__ = [
    "FailureHandler",
    "ForwardSettings",
    "ForwardStats",
    "ListenAddress",
    "ServiceForwarder",
]

log = logging.getLogger(__name__)

#: Chunks copied without waiting before the loop yields to other tasks.
_SPIN: Final = 16
#: SO_LINGER on, timeout 0: close() sends a reset.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: accept() errors that mean "out of a resource for now", not "broken listener".
_ACCEPT_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                                            errno.ENOBUFS})  # fmt: skip
#: accept() errors about the one connection being accepted (it is gone already).
_ACCEPT_CONNECTION_ERRORS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO,
                                              errno.EPERM})  # fmt: skip

FailureHandler = Callable[[str, str, str], None]
"""``on_eject(service, instance_id, reason)``: an endpoint was ejected locally.

Called on the trio thread; must not block (the control plane queues a Report).
"""


@attrs.frozen
class ListenAddress:
    """Where a forwarder listens: ``HOST:PORT`` (TCP) or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """``unix:/run/x.sock``, ``/run/x.sock``, ``./x.sock`` or ``127.0.0.1:8080``."""
        if text.startswith("unix:"):
            text = text[len("unix:") :]
            if not text:
                raise ValueError("unix: needs a socket path")
            return cls(path=text)
        if "/" in text:
            return cls(path=text)
        try:
            host, port = wire.parse_address(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither HOST:PORT nor a Unix socket path") from None
        return cls(host=host, port=port)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def _at_least(
    minimum: float,
) -> Callable[[object, attrs.Attribute[float] | attrs.Attribute[int], float], None]:
    def check(
        instance: object, attribute: attrs.Attribute[float] | attrs.Attribute[int], value: float
    ) -> None:
        if value < minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, not {value!r}")

    return check


@attrs.frozen
class ForwardSettings:
    """How a forwarder connects and copies; see the module docstring."""

    #: Seconds a connect to one endpoint may take before it counts as failed.
    connect_timeout: float = attrs.field(default=1.0, validator=_at_least(0.001))
    #: Distinct endpoints tried per accepted connection.
    attempts: int = attrs.field(default=3, validator=_at_least(1))
    #: Seconds an accepted connection waits for an endpoint when there is none.
    endpoint_wait: float = attrs.field(default=5.0, validator=_at_least(0))
    #: Bytes asked of the socket per receive.
    chunk: int = attrs.field(default=256 * 1024, validator=_at_least(1024))


@attrs.define
class ForwardStats:
    """Counters of one forwarder (read by tests and the status output)."""

    accepted: int = 0
    active: int = 0
    #: Connections spliced to an endpoint.
    forwarded: int = 0
    #: Connect attempts that failed (each retried on another endpoint, if any).
    connect_failures: int = 0
    #: Accepted connections closed because no endpoint could be reached.
    unrouted: int = 0
    #: Spliced connections that ended with an error on either side.
    aborted: int = 0
    #: Connections waiting for an endpoint to appear, now.
    waiting: int = 0
    #: Connections connecting to a second (or later) endpoint, now.
    retrying: int = 0
    #: Connect attempts after a failed one, over the forwarder's life.
    retries: int = 0
    #: Connections refused by the policy's circuit breaking: beyond max_connections held,
    #: or beyond max_pending waiting (those also count as unrouted).
    refused: int = 0
    #: Connections reset because the endpoint sent nothing within the request timeout.
    request_timeouts: int = 0


class _ConnectFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ServiceForwarder:
    """Accepts connections for one service and forwards them; see the module docstring."""

    def __init__(
        self,
        table: ServiceTable,
        balancer: Balancer,
        outlier: OutlierDetector,
        settings: ForwardSettings | None = None,
        on_eject: FailureHandler | None = None,
        splicer: EpollSplicer | None = None,
        policy: ServicePolicy | None = None,
        outcomes: OutcomeCounter | None = None,
    ) -> None:
        self.table = table
        #: The ``epoll`` engine's thread, or None: copy in trio tasks (see proxy.splicer).
        self.splicer = splicer
        self.service = table.service
        self.balancer = balancer
        self.outlier = outlier
        self.settings = settings or ForwardSettings()
        self.on_eject = on_eject
        #: The service's governance policy; while it has no route, the settings above apply.
        self.policy = policy
        self.stats = ForwardStats()
        #: Where each connection's outcome and latency are counted; None: nowhere.
        self.outcomes = outcomes

    # ------------------------------------------------------------- listening

    async def serve(
        self,
        address: ListenAddress,
        *,
        task_status: trio.TaskStatus[ListenAddress] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``address`` until cancelled; ``task_status.started(bound address)``
        (the real port when ``address`` asked for port 0)."""
        listener, bound, identity = await _listen(address)
        log.info("forwarder listening", extra={"service": self.service, "listen": str(bound)})
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(bound)
                await self._accept(listener, nursery, tcp=not address.is_unix)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()
            if identity is not None:
                wire.unlink_if_ours(address.path, identity)

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery, *, tcp: bool) -> None:
        accepted = 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_CONNECTION_ERRORS:
                    continue
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.error("cannot accept a connection; pausing 100 ms",
                              extra={"service": self.service, "error": str(exc)})  # fmt: skip
                    await trio.sleep(0.1)
                    continue
                raise
            conn.setblocking(False)
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats.accepted += 1
            nursery.start_soon(self.handle, conn)
            accepted += 1
            if accepted % _SPIN == 0:
                await checkpoint()

    # ------------------------------------------------------------- one connection

    async def handle(self, client: socket.socket) -> None:
        """Forward one accepted (non-blocking) connection; closes it in the end."""
        stats = self.stats
        outcomes = self.outcomes
        accepted_at = trio.current_time()
        route = None if self.policy is None else self.policy.route
        if route is not None and not route.admit(stats.active):
            stats.refused += 1
            if outcomes is not None:
                outcomes.outcome("connect_failure")
            _abort(client)
            return
        stats.active += 1
        upstream: socket.socket | None = None
        endpoint: EndpointState | None = None
        handed_over = False
        try:
            found = await self._connect(route, _client_key(client, route))
            if found is None:
                stats.unrouted += 1
                if outcomes is not None:
                    outcomes.outcome("connect_failure")
                _abort(client)
                return
            upstream, endpoint = found
            stats.forwarded += 1
            endpoint.open_connections += 1
            if route is not None and route.request_timeout is not None:
                answered = await _first_byte(client, upstream, route.request_timeout,
                                             self.settings.chunk)  # fmt: skip
                if not answered:
                    if outcomes is not None:
                        # Waited the whole timeout: that wait is the call's latency.
                        outcomes.latency(trio.current_time() - accepted_at)
                        outcomes.outcome("timeout")
                    self._request_timed_out(route, endpoint, client, upstream)
                    return
                route.outlier.success(self.table, endpoint)
            if outcomes is not None:
                outcomes.latency(trio.current_time() - accepted_at)
            if self.splicer is not None:
                # The splicer's thread owns both sockets from here; _spliced
                # settles the counters when it is done with them.
                self.splicer.add(client, upstream, functools.partial(self._spliced, endpoint))
                handed_over = True
                return
            ok = await _splice(client, upstream, self.settings.chunk)
            if not ok:
                stats.aborted += 1
            if outcomes is not None:
                outcomes.outcome("success" if ok else "reset")
        finally:
            if not handed_over:
                stats.active -= 1
                if endpoint is not None:
                    endpoint.open_connections -= 1
                client.close()
                if upstream is not None:
                    upstream.close()

    def _spliced(self, endpoint: EndpointState, ok: bool) -> None:
        self.stats.active -= 1
        endpoint.open_connections -= 1
        if not ok:
            self.stats.aborted += 1
        if self.outcomes is not None:
            self.outcomes.outcome("success" if ok else "reset")

    def _request_timed_out(
        self, route: Route, endpoint: EndpointState, client: socket.socket,
        upstream: socket.socket,
    ) -> None:  # fmt: skip
        """The endpoint sent nothing within the request timeout: reset both sides."""
        self.stats.request_timeouts += 1
        log.info("no response within the request timeout; resetting the connection", extra={
            "service": self.service, "instance": endpoint.id,
            "timeout_s": route.request_timeout,
        })  # fmt: skip
        self._failed(route.outlier, endpoint, "request-timeout")
        _set_reset(client)
        _set_reset(upstream)

    def _failed(self, outlier: OutlierDetector, endpoint: EndpointState, reason: str) -> None:
        """Count a failure of ``endpoint``; eject and report it if that is one too many."""
        if outlier.failure(self.table, endpoint, trio.current_time()):
            log.warning("endpoint ejected after consecutive failures", extra={
                "service": self.service, "instance": endpoint.id,
                "address": f"{endpoint.address[0]}:{endpoint.address[1]}", "reason": reason,
            })  # fmt: skip
            if self.on_eject is not None:
                self.on_eject(self.service, endpoint.id, reason)

    async def _connect(
        self, route: Route | None = None, key: str = ""
    ) -> tuple[socket.socket, EndpointState] | None:
        """A connected socket to an endpoint, trying up to ``attempts`` of them (the
        policy's ``route`` when one is in force, else the flags)."""
        settings = self.settings if route is None else route.settings
        outlier = self.outlier if route is None else route.outlier
        table = self.table
        stats = self.stats
        tried: set[str] = set()
        retrying = False
        deadline = trio.current_time() + settings.endpoint_wait
        try:
            while len(tried) < settings.attempts:
                now = trio.current_time()
                if not table.ready:
                    endpoint = None
                elif route is None:
                    endpoint = self.balancer.pick(table.candidates(now), tried)
                else:
                    endpoint = route.pick(table, now, tried, key)
                if endpoint is None:
                    if tried or now >= deadline:
                        # Every endpoint left was tried, or none came in time.
                        return None
                    if route is not None and not route.may_wait(stats.waiting):
                        stats.refused += 1
                        return None
                    stats.waiting += 1
                    try:
                        with trio.move_on_at(deadline):
                            await table.wait_changed()
                    finally:
                        stats.waiting -= 1
                    continue
                tried.add(endpoint.id)
                try:
                    sock = await _open(endpoint.address, settings.connect_timeout)
                except _ConnectFailed as exc:
                    stats.connect_failures += 1
                    log.debug("connect to an endpoint failed", extra={
                        "service": self.service, "instance": endpoint.id,
                        "address": f"{endpoint.address[0]}:{endpoint.address[1]}",
                        "reason": exc.reason, "error": str(exc),
                    })  # fmt: skip
                    self._failed(outlier, endpoint, exc.reason)
                    if len(tried) >= settings.attempts:
                        return None
                    if route is not None and not route.may_retry(
                        exc.reason, held=stats.active, retrying=stats.retrying,
                        first=not retrying,
                    ):  # fmt: skip
                        return None
                    stats.retries += 1
                    if not retrying:
                        retrying = True
                        stats.retrying += 1
                    continue
                if route is None or route.request_timeout is None:
                    # Under a request timeout, success is the answer, not the connect.
                    outlier.success(table, endpoint)
                return sock, endpoint
            return None
        finally:
            if retrying:
                stats.retrying -= 1


# ---------------------------------------------------------------- connecting


async def _open(address: tuple[str, int], timeout: float) -> socket.socket:
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        target: tuple[str, int] = (host, port)
    except ValueError:
        # A name, not an address: resolve it (in a thread, as trio does).
        try:
            with trio.fail_after(timeout):
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, trio.TooSlowError) as exc:
            raise _ConnectFailed("resolve-failed", f"cannot resolve {host!r}: {exc}") from None
        if not infos:
            raise _ConnectFailed("resolve-failed", f"{host!r} has no address") from None
        family, _, _, _, sockaddr = infos[0]
        # An AF_INET or AF_INET6 address (SOCK_STREAM over TCP): host and port come first.
        target = (str(sockaddr[0]), int(sockaddr[1]))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(target)
        if err == errno.EINPROGRESS:
            with trio.move_on_after(timeout) as scope:
                await wait_writable(sock)
            if scope.cancelled_caught:
                raise _ConnectFailed("connect-timeout", f"no answer within {timeout:g} s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            reason = "connect-refused" if err == errno.ECONNREFUSED else "connect-error"
            raise _ConnectFailed(reason, os.strerror(err))
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return sock


def _client_key(client: socket.socket, route: Route | None) -> str:
    """The client's address, when the route hashes on it ("" for a Unix socket)."""
    if route is None or not route.needs_key or client.family == socket.AF_UNIX:
        return ""
    try:
        return str(client.getpeername()[0])
    except OSError:
        return ""  # gone already; the connect or the splice will notice


async def _first_byte(
    client: socket.socket, upstream: socket.socket, timeout: float, chunk: int
) -> bool:
    """Pass the client's bytes on until the upstream answers (a byte, its close or an
    error); False if it has not within ``timeout`` of the client's first byte passed on.

    Nothing is read from the upstream: its answer stays in the socket for the splice. The
    relay is only ever interrupted while it waits for the client, never between a receive
    and its send, so no byte of the client's is lost at the handover. A client that fails
    meanwhile ends the wait (True: the splice sees the failure and resets the upstream).
    """
    answered = client_failed = False
    idle: trio.CancelScope | None = None  # the relay's wait for the client, if it waits

    async def answer(timer: trio.CancelScope) -> None:
        nonlocal answered
        await wait_readable(upstream)
        answered = True
        timer.deadline = math.inf  # a send in progress finishes, however long it takes
        if idle is not None:
            idle.cancel()

    async def relay(timer: trio.CancelScope) -> None:
        nonlocal idle, client_failed
        while not answered:
            with trio.CancelScope() as idle:
                await wait_readable(client)
            idle = None
            if answered:
                return
            try:
                data = client.recv(chunk)
            except BlockingIOError:
                continue
            except OSError:
                client_failed = True
                timer.cancel()  # nothing left to time
                return
            if not data:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                with trio.CancelScope() as idle:
                    await trio.sleep_forever()  # until the answer (or the timer)
                return
            if timer.deadline == math.inf:
                timer.deadline = trio.current_time() + timeout
            await _send_rest(upstream, memoryview(data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, nursery.cancel_scope)
        nursery.start_soon(relay, nursery.cancel_scope)
    return answered or client_failed


# ---------------------------------------------------------------- splicing


async def _splice(a: socket.socket, b: socket.socket, chunk: int) -> bool:
    """Copy both ways until both directions ended; False if either side failed."""
    failed = False

    async def pump(src: socket.socket, dst: socket.socket, scope: trio.CancelScope) -> None:
        nonlocal failed
        try:
            await _copy(src, dst, chunk)
        except OSError:
            failed = True
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, b, a, nursery.cancel_scope)
        await pump(a, b, nursery.cancel_scope)
    if failed:
        # Pass the failure on as a reset, to whichever side is still there.
        _set_reset(a)
        _set_reset(b)
    return not failed


async def _copy(src: socket.socket, dst: socket.socket, chunk: int) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, then half-close ``dst``."""
    recv = src.recv
    send = dst.send
    spins = 0
    while True:
        try:
            data = recv(chunk)
        except BlockingIOError:
            await wait_readable(src)
            spins = 0
            continue
        if not data:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            await _send_rest(dst, memoryview(data)[sent:])
            spins = 0
        elif len(data) < chunk:
            # A short read drained the socket: wait now instead of a recv
            # that would only raise EAGAIN.
            await wait_readable(src)
            spins = 0
        else:
            spins += 1
            if spins >= _SPIN:
                await checkpoint()
                spins = 0


async def _send_rest(dst: socket.socket, data: memoryview) -> None:
    while data:
        await wait_writable(dst)
        try:
            sent = dst.send(data)
        except BlockingIOError:
            continue
        data = data[sent:]


def _set_reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _abort(sock: socket.socket) -> None:
    """Close with a reset: the application learns at once that nothing is behind us."""
    _set_reset(sock)
    sock.close()


# ---------------------------------------------------------------- listeners


async def _listen(
    address: ListenAddress,
) -> tuple[socket.socket, ListenAddress, os.stat_result | None]:
    if address.is_unix:
        await wire.remove_stale_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address.path)
            identity = os.stat(address.path)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock, address, identity
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, ListenAddress(host=address.host, port=sock.getsockname()[1]), None
