"""The xDS management server: ADS over gRPC, with trio owning every piece of state.

grpcio's asyncio server runs in a thread of its own with its own event loop;
it only moves bytes. Each ADS call there:

* hands its requests (raw bytes, decoded on the trio side so a malformed one
  gets INVALID_ARGUMENT rather than an opaque error) to the trio thread; at
  most ``max_inflight`` of one stream's requests are read and not yet
  handled, beyond that it stops reading and gRPC's flow control pushes back
  on the client;
* writes the responses the trio side hands back. The trio side builds a
  response only while fewer than two of that stream's responses are waiting
  to be written (:data:`_MAX_UNSENT`); a change meanwhile is folded into the
  response built next (see :mod:`dispatcher.faces.xds.stream`), so a client
  that does not read costs two responses of memory, not one per change.

The trio side (:class:`XdsServer`) holds the :class:`ResourceCache` and one
:class:`~dispatcher.faces.xds.stream.AdsStream` per call. Streams over
``max_streams`` end at once with RESOURCE_EXHAUSTED; a request over
``max_request_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED); with a
``token`` configured, a call without ``authorization: Bearer <token>`` ends
with UNAUTHENTICATED before it holds anything.

With a ``tls`` table the port speaks TLS only (gRPC's SSL server credentials,
TLS 1.2 and 1.3), asking for a client certificate signed by ``ca`` when
``verify_client`` is set. The certificate files are reread when their
modification time changes, checked as each connection's handshake begins;
connections already open keep the certificate they were made with.

Work crosses between the threads through two :class:`Handoff` queues, one
per direction, so that a push to a thousand streams (and their thousand
ACKs) wakes the other loop a few times rather than once per stream; a
request is handled in the trio callback that receives it, with no task
switch in between.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import grpc
import grpc.aio
import trio

from dispatcher.core.subscriptions import SubscriptionHub
from dispatcher.faces.xds.cache import ResourceCache
from dispatcher.faces.xds.config import XdsConfig
from dispatcher.faces.xds.handoff import Handoff
from dispatcher.faces.xds.metrics import XdsMetrics
from dispatcher.faces.xds.stream import AdsStream, DeltaStream, Refusal, SotwStream, StreamError
from dispatcher.governance.feed import GovernanceFeed
from dispatcher.tls import TlsConfig, server_context

__all__ = ["ADS_SERVICE", "XdsServer"]

_log = logging.getLogger(__name__)

ADS_SERVICE: Final = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_MAX_UNSENT: Final = 2
_STOP_GRACE: Final = 1.0
_BIND_TIMEOUT: Final = 30.0


@attrs.frozen(slots=True)
class _End:
    """The call ends: normally (``refusal`` None) or with a gRPC error."""

    refusal: Refusal | None = None
    message: str = ""


class _Call:
    """One ADS call as both threads see it.

    ``queue`` and the futures belong to the asyncio thread; the trio side
    reaches them only through ``to_grpc``, the handoff every call of the
    server shares (a push to many streams wakes the asyncio loop once).

    Flow control is counted rather than signalled: ``written`` (responses
    written) and ``read`` (requests read) are stored by the asyncio thread
    only, ``handled`` (requests handled) by the trio thread only, and each
    side reads the other's. A side that must wait raises its flag
    (``pump_waits``, ``reader_waits``) and then looks at the counter again,
    while the other side updates its counter and then looks at the flag, so
    under the GIL one of them always sees the other and no wake-up is lost.
    A wake-up therefore crosses threads only when someone actually waits,
    not once per response and once per request.
    """

    def __init__(self, to_grpc: Handoff, variant: str, peer: str):
        # Made on the asyncio thread; kept because asyncio.get_running_loop()
        # costs a getpid system call each time.
        self.loop = asyncio.get_running_loop()
        self.to_grpc = to_grpc
        self.variant = variant
        self.peer = peer
        # At most _MAX_UNSENT responses and an _End: the trio side counts them.
        self.queue: collections.deque[bytes | _End] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.written = 0
        self.pump_waits = False
        self.read = 0
        self.handled = 0
        self.reader_waits = False
        self.reader_wake: asyncio.Future[None] | None = None

    def deliver(self, item: bytes | _End) -> None:
        """From the trio thread: hand ``item`` to the writer."""
        # False means the loop is closed: the server is stopping and nobody is
        # left to write to.
        self.to_grpc.call(self._put, item)

    def _put(self, item: bytes | _End) -> None:
        self.queue.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes | _End:
        """The next item to write (on the asyncio thread; asyncio.Queue costs more per item)."""
        while not self.queue:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.queue.popleft()

    def request_handled(self) -> None:
        """From the trio thread: one request was handled; the reader may read another."""
        self.handled += 1
        if self.reader_waits:
            self.reader_waits = False
            self.to_grpc.call(self._wake_reader)

    def _wake_reader(self) -> None:
        wake = self.reader_wake
        if wake is not None and not wake.done():
            wake.set_result(None)


@attrs.define(slots=True, eq=False)
class _Open:
    """The trio side of one call."""

    call: _Call
    stream: AdsStream | None = None
    #: Responses handed to the writer; ``delivered - call.written`` are unsent.
    delivered: int = 0
    ended: bool = False


class XdsServer:
    """Serves the hub's services over ADS (State-of-the-World and Delta).

    ``serve`` binds ``config.listen`` and reports the bound port through
    ``task_status``; cancelling it stops the gRPC server (open streams end)
    and closes every hub subscription the server held. With ``policies``, the
    resources carry the governance policies (see :mod:`~dispatcher.faces.xds.cache`).
    """

    def __init__(
        self,
        hub: SubscriptionHub,
        config: XdsConfig,
        metrics: XdsMetrics | None = None,
        *,
        policies: GovernanceFeed | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else XdsMetrics()
        self.cache = ResourceCache(hub, self.metrics, policies)
        self.port: int | None = None
        self._calls: dict[_Call, _Open] = {}
        self._to_trio: Handoff | None = None
        self._to_grpc: Handoff | None = None
        # Requests that arrive before the cache runs (it owns the hub
        # subscriptions they open); at most max_inflight per stream.
        self._early: list[tuple[_Call, bytes]] | None = []

    @property
    def streams(self) -> tuple[AdsStream, ...]:
        """The open streams' protocol state (for tests and the admin endpoint)."""
        return tuple(o.stream for o in self._calls.values() if o.stream is not None)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Raises ``OSError`` naming the address if it cannot listen."""
        self._to_trio = Handoff(trio.lowlevel.current_trio_token().run_sync_soon)
        grpc_thread = _GrpcThread(self.config, self._handler)
        # Bound before anything else starts, so a taken address is a plain
        # OSError. Requests arriving before the cache runs wait in _early.
        self.port = await trio.to_thread.run_sync(grpc_thread.start)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.cache.run)
                early, self._early = self._early or [], None
                for call, raw in early:
                    self._received(call, raw)
                _log.info("xds: serving ADS on %s (port %d)", self.config.listen, self.port)
                task_status.started(self.port)
                try:
                    await trio.sleep_forever()
                finally:
                    # Ended first, so the calls return at once rather than
                    # waiting out the gRPC server's grace period.
                    for opened in tuple(self._calls.values()):
                        self._end(opened, None)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(grpc_thread.stop)

    # ------------------------------------------------------------ trio side

    def _opened(self, call: _Call) -> None:
        opened = _Open(call)
        limits = self.config.limits
        if len(self._calls) >= limits.max_streams:
            self.metrics.streams_refused += 1
            call.deliver(
                _End(Refusal.RESOURCE_EXHAUSTED, f"at most {limits.max_streams} xDS streams")
            )
            return
        stream_class = DeltaStream if call.variant == "delta" else SotwStream
        opened.stream = stream_class(
            self.cache, limits, self.metrics, lambda: self._pump(opened), call.peer
        )
        self._calls[call] = opened
        self.metrics.streams_opened += 1
        self.metrics.streams_active += 1

    def _closed(self, call: _Call) -> None:
        opened = self._calls.get(call)
        if opened is not None:
            self._end(opened, None)

    def _written(self, call: _Call) -> None:
        opened = self._calls.get(call)
        if opened is not None:
            self._pump(opened)

    def _end(self, opened: _Open, error: StreamError | None) -> None:
        if opened.ended:
            return
        opened.ended = True
        if self._calls.pop(opened.call, None) is not None:
            self.metrics.streams_active -= 1
        if opened.stream is not None:
            opened.stream.close()
        if error is None:
            opened.call.deliver(_End())
        else:
            opened.call.deliver(_End(error.refusal, error.message))

    def _pump(self, opened: _Open) -> None:
        stream, call = opened.stream, opened.call
        while stream is not None and not opened.ended:
            if opened.delivered - call.written >= _MAX_UNSENT:
                call.pump_waits = True
                # Looked at again after the flag is up: see _Call.
                if opened.delivered - call.written >= _MAX_UNSENT:
                    return
                call.pump_waits = False
            response = stream.next_response()
            if response is None:
                return
            opened.delivered += 1
            call.deliver(response)

    def _received(self, call: _Call, raw: bytes) -> None:
        if self._early is not None:
            self._early.append((call, raw))
            return
        call.request_handled()
        opened = self._calls.get(call)
        if opened is None or opened.stream is None or opened.ended:
            return
        try:
            opened.stream.receive(raw)
        except StreamError as error:
            _log.info("xds: stream from %s refused: %s", call.peer, error.message)
            self._end(opened, error)
        except Exception:
            # A bug met by one request ends that stream only (INTERNAL, as the
            # other listeners answer); every other stream goes on.
            self.metrics.internal_errors += 1
            _log.exception("xds: internal error on a stream from %s", call.peer)
            self._end(opened, StreamError(Refusal.INTERNAL, "internal"))
        else:
            self._pump(opened)

    # --------------------------------------------------------- asyncio side

    def _post(self, function: Callable[..., None], *args: Any) -> bool:
        to_trio = self._to_trio
        return to_trio is not None and to_trio.call(function, *args)

    def _grpc_handoff(self) -> Handoff:
        # Made on the asyncio thread by the first call; every call shares it.
        if self._to_grpc is None:
            self._to_grpc = Handoff(asyncio.get_running_loop().call_soon_threadsafe)
        return self._to_grpc

    def _handler(self, variant: str) -> Callable[..., AsyncIterator[bytes]]:
        inflight = self.config.limits.max_inflight
        token = self.config.token
        expected = None if token is None else _bearer(token)

        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            if expected is not None and not _authorized(context, expected):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")
            call = _Call(self._grpc_handoff(), variant, context.peer())
            if not self._post(self._opened, call):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "xDS server stopping")
            reader = asyncio.ensure_future(self._read(requests, call, inflight))
            try:
                while True:
                    item = await call.get()
                    if isinstance(item, _End):
                        if item.refusal is not None:
                            await context.abort(grpc.StatusCode[item.refusal.value], item.message)
                        return
                    yield item
                    call.written += 1
                    if call.pump_waits:
                        call.pump_waits = False
                        self._post(self._written, call)
            finally:
                reader.cancel()
                self._post(self._closed, call)

        return handle

    async def _read(self, requests: AsyncIterator[bytes], call: _Call, inflight: int) -> None:
        loop = call.loop
        async for raw in requests:
            call.read += 1
            if not self._post(self._received, call, raw):
                return
            while call.read - call.handled >= inflight:
                call.reader_wake = loop.create_future()
                call.reader_waits = True
                # Looked at again after the flag is up: see _Call.
                if call.read - call.handled < inflight:
                    call.reader_waits = False
                    break
                await call.reader_wake


def _bearer(token: str) -> bytes:
    return ("Bearer " + token).encode("utf-8", "surrogatepass")


def _authorized(context: grpc.aio.ServicerContext[bytes, bytes], expected: bytes) -> bool:
    """Whether the call's ``authorization`` metadata is ``expected``, compared in constant
    time so that how long a refusal takes tells nothing about the token."""
    presented = b""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            presented = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hmac.compare_digest(presented, expected)


class _CertificateFiles:
    """The ``tls`` table's files as gRPC's server credentials, reread when they change.

    gRPC asks :meth:`_fetch` (on one of its own threads) before each handshake;
    it answers None, which keeps the current certificates, unless a file's
    modification time moved and the files load.
    """

    def __init__(self, config: TlsConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        # A bad file here is a start-up error: the config check loaded these already.
        self._initial = self._load()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self._config.verify_client
        )

    def _stamps(self) -> tuple[int, ...]:
        stamps = []
        for path in (self._config.cert, self._config.key, self._config.ca):
            if path is not None:
                try:
                    stamps.append(os.stat(path).st_mtime_ns)
                except OSError:
                    stamps.append(-1)
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        config = self._config
        # gRPC would take malformed PEM and fail every handshake after; loading
        # the files into an SSL context first refuses them here.
        server_context(config)
        chain, key = config.cert.read_bytes(), config.key.read_bytes()
        root = None if config.ca is None else config.ca.read_bytes()
        return grpc.ssl_server_certificate_configuration([(key, chain)], root)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            # Once per change, even if the load fails: a half-written file is
            # retried when its writer finishes (and moves the stamp again).
            self._stamp = stamp
            try:
                loaded = self._load()
            except (OSError, ssl.SSLError) as exc:
                _log.error("xds: cannot reload TLS certificates; keeping the previous ones: %s",
                           exc)  # fmt: skip
                return None
        _log.info("xds: TLS certificates reloaded")
        return loaded


class _GrpcThread:
    """grpcio's asyncio server on a thread and event loop of its own."""

    def __init__(
        self, config: XdsConfig, handler: Callable[[str], Callable[..., AsyncIterator[bytes]]]
    ) -> None:
        self._config = config
        self._handler = handler
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._port = 0
        self._error: BaseException | None = None

    def start(self) -> int:
        """Start the thread and return the bound port (blocking; run it in a worker thread)."""
        self._thread = threading.Thread(target=self._run, name="xds-grpc", daemon=True)
        self._thread.start()
        if not self._bound.wait(_BIND_TIMEOUT):
            raise OSError(f"xds: the gRPC server did not start on {self._config.listen}")
        if self._error is not None:
            raise self._error
        return self._port

    def stop(self) -> None:
        """Stop serving (open calls end) and wait for the thread (blocking)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._bound.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        limits = self._config.limits
        server = grpc.aio.server(
            options=(
                ("grpc.max_receive_message_length", limits.max_request_bytes),
                ("grpc.so_reuseport", 0),
                # Requests are small (max_request_bytes), so growing the window
                # clients may send into buys nothing, while each probe is a PING
                # per message received and its ACK: two more writes per stream
                # per push.
                ("grpc.http2.bdp_probe", 0),
            ),
            maximum_concurrent_rpcs=limits.max_streams + 1,
        )
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._handler("sotw")
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._handler("delta")
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),)
        )
        tls = self._config.tls
        try:
            if tls is None:
                port = server.add_insecure_port(self._config.listen)
            else:
                port = server.add_secure_port(
                    self._config.listen, _CertificateFiles(tls).credentials()
                )
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self._config.listen} for xDS: {exc}") from None
        if not port and not self._config.listen.endswith(":0"):
            raise OSError(f"cannot listen on {self._config.listen} for xDS")
        await server.start()
        self._port = port
        self._bound.set()
        await self._stop.wait()
        await server.stop(_STOP_GRACE)
