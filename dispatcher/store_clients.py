"""Opening a client of an existing store (ZooKeeper, etcd), with TLS and SASL.

One place for everyone who dials a store zkgate does not run: the membership backends and
the governance stores (both from a ``[membership]`` table), the etcd adapter, the sidecar's
registration in a ZooKeeper face, and the inspection's direct reads of a mirror's ensemble or
a ZooKeeper upstream (with the TLS and SASL of the component they inspect). A store
opened here speaks TLS when given a :class:`~dispatcher.tls.ClientTls` (the client
certificate, if any, presented to a server that requires one) and, for ZooKeeper,
authenticates with DIGEST-MD5 when given :class:`~dispatcher.zk.sasl_client.SaslCredentials`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Final

import trio

from dispatcher.tls import ClientTls, client_context
from dispatcher.zk.client import (
    ConnectionLost,
    KeeperError,
    SessionEvent,
    ZooKeeperClient,
    split_connect_string,
)
from dispatcher.zk.codec.records import WatcherEvent
from dispatcher.zk.sasl_client import SaslCredentials

__all__ = [
    "SESSION_FAILURES",
    "describe_etcd_error",
    "etcd_client",
    "short_session",
    "zookeeper_client",
    "zookeeper_session",
]

#: What a :func:`short_session` block raises when the ensemble fails it.
SESSION_FAILURES: Final = (ConnectionLost, KeeperError, ConnectionError, trio.TooSlowError)


def zookeeper_client(
    hosts: str,
    session_timeout: float,
    *,
    tls: ClientTls | None = None,
    sasl: SaslCredentials | None = None,
    on_watch: Callable[[WatcherEvent], None] | None = None,
    on_session: Callable[[SessionEvent], None] | None = None,
) -> tuple[ZooKeeperClient, str]:
    """A trio ZooKeeper client for the connect string ``hosts`` (not running yet) and the
    chroot the string names ("" if none), which the caller prefixes to its own paths.

    Raises ValueError for a connect string that does not parse."""
    servers, chroot = split_connect_string(hosts)
    client = zookeeper_session(
        servers, session_timeout, tls=tls, sasl=sasl, on_watch=on_watch, on_session=on_session
    )
    return client, chroot


def zookeeper_session(
    servers: Sequence[tuple[str, int]],
    session_timeout: float,
    *,
    tls: ClientTls | None = None,
    sasl: SaslCredentials | None = None,
    auth: Sequence[tuple[str, bytes]] = (),
    on_watch: Callable[[WatcherEvent], None] | None = None,
    on_session: Callable[[SessionEvent], None] | None = None,
) -> ZooKeeperClient:
    """A trio ZooKeeper client of ``servers`` (not running yet), for callers that hold the
    servers already parsed; ``auth`` is sent (``addAuth``) on every connection, after SASL.

    Raises OSError or ssl.SSLError if a certificate file of ``tls`` cannot be loaded."""
    return ZooKeeperClient(
        servers,
        session_timeout_ms=max(1, round(session_timeout * 1000)),
        auth=auth,
        on_watch=on_watch,
        on_session=on_session,
        tls=None if tls is None else client_context(tls),
        server_name=None if tls is None else tls.server_name,
        sasl=sasl,
    )


@contextlib.asynccontextmanager
async def short_session(
    client: ZooKeeperClient, connect_timeout: float, what: str
) -> AsyncIterator[ZooKeeperClient]:
    """``client`` running and connected for the block, stopped after it (a read on a
    session of its own). No session within ``connect_timeout`` raises ConnectionError
    naming ``what``.

    The session's task and the block run in one nursery; when the ensemble fails them,
    the failure comes out alone, as one of :data:`SESSION_FAILURES` (the session's own
    :class:`KeeperError` first: it names the cause, such as a refused SASL user), so that
    a caller can catch it. Anything else, a cancellation among it, comes out as the
    nursery raised it."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            try:
                with trio.fail_after(connect_timeout):
                    await client.wait_connected()
            except trio.TooSlowError:
                raise ConnectionError(f"{what}: no session") from None
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failures, rest = group.split(SESSION_FAILURES)
        if failures is None or rest is not None:
            raise
        leaves = list(_leaves(failures))
        raise next((e for e in leaves if isinstance(e, KeeperError)), leaves[0]) from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _read(path: object) -> bytes | None:
    if path is None:
        return None
    with open(str(path), "rb") as file:
        return file.read()


def etcd_client(
    host: str,
    port: int,
    *,
    timeout: float,
    tls: ClientTls | None = None,
    grpc_options: Sequence[tuple[str, Any]] = (),
) -> Any:
    """A python-etcd3 client of ``host:port`` (blocking: call it in a worker thread).

    With ``tls``: a TLS channel that verifies etcd against ``tls.ca`` (gRPC's own roots
    without one), presents ``tls.cert``/``tls.key`` (etcd's ``--client-cert-auth``), and
    checks ``tls.server_name`` against etcd's certificate instead of ``host`` if set.
    python-etcd3's ``ca_cert`` path cannot do without a CA file or override the name, so the
    secure endpoint is built here. Raises OSError if a certificate file cannot be read.
    """
    import etcd3
    import grpc

    options = list(grpc_options)
    if tls is None:
        return etcd3.client(host, port, timeout=timeout, grpc_options=options or None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key),
        certificate_chain=_read(tls.cert),
    )
    if tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    endpoint = etcd3.Endpoint(host, port, secure=True, creds=credentials, opts=options or None)
    return etcd3.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=timeout)


def describe_etcd_error(exc: BaseException | None) -> str:
    """What went wrong with an etcd request, in one line: gRPC's status and details for
    gRPC's errors (a refused certificate among them), the message otherwise."""
    if exc is None:
        return "no error"
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    # python-etcd3 replaces gRPC's error with its own ("etcd connection failed") while
    # handling it; the reason (a refused certificate, say) is in the one it replaced.
    for candidate in (exc, exc.__cause__, exc.__context__):
        # grpc's RpcError carries its status as methods; etcd3 exposes no type for it.
        code = getattr(candidate, "code", None)
        details = getattr(candidate, "details", None)
        if callable(code) and callable(details):
            with contextlib.suppress(Exception):
                text = f"{code().name}: {details()}"
                return f"{text} ({hint})" if (hint := _tls_hint(text)) else text
    return str(exc) or type(exc).__name__


def _tls_hint(text: str) -> str | None:
    """What a failed TLS handshake most likely means: gRPC's own words for it are obscure
    (a client certificate etcd refused reaches the client as "Unwrap failed
    (TSI_DATA_CORRUPTED)", its alert only in gRPC's own log)."""
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "etcd's certificate is not trusted: check tls.ca and tls.server_name"
    if "TSI_" in text or "handshake" in text.lower():
        return "the TLS handshake failed: etcd refused the client certificate, or is not TLS"
    return None
