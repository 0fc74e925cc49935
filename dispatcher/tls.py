"""TLS for every listener and client of zkgate: one table, one context builder.

A listener takes a ``tls`` sub-table (``[zookeeper.tls]``, ``[subscriptions.tls]``,
``[admin.tls]``, ``[meta.tls]``)::

    [zookeeper.tls]
    cert = "server.pem"        # PEM certificate chain, leaf first
    key = "server-key.pem"     # PEM private key
    ca = "clients-ca.pem"      # CA that signs client certificates (needed for verify_client)
    verify_client = true       # require a client certificate signed by ``ca``
    handshake_timeout = 10.0   # seconds a connection may take to finish its handshake

``[zookeeper.tls]`` alone also takes ``verify_client = "want"`` (a certificate
is asked for and verified if given, not required: ZooKeeper's
``ssl.clientAuth=want``) and ``x509_superuser = "CN=admin,O=Example"`` (the
client whose certificate subject, as :func:`x509_subject` writes it, is this
string is a superuser: ZooKeeper's ``zookeeper.X509AuthenticationProvider.superUser``).

A client (a ``[[mirror]]``, a ZooKeeper ``[[upstream]]``, the proxy, ``zkgate
status``) takes ``tls = { ca = "...", cert = "...", key = "..." }``: ``ca``
verifies the server (the system's CAs without it), ``cert``/``key`` is the
client certificate, ``server_name`` overrides the name checked against the
server's certificate (the host dialled otherwise).

Only TLS 1.2 and 1.3 are spoken. :class:`ServerTls` does each connection's
handshake in that connection's own task with a deadline, so a client that
speaks plain text (or nothing) on a TLS port is refused with one log line and
holds no one else up; it rereads the certificate files when their
modification time changes (checked as each connection arrives), and
connections already open keep the context they were made with.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import trio

from dispatcher import settings
from dispatcher.settings import ConfigError

__all__ = [
    "ClientTls",
    "PlainGuard",
    "SecureHalfCloseable",
    "ServerTls",
    "TlsConfig",
    "TlsSession",
    "add_client_arguments",
    "client_context",
    "client_context_from_args",
    "client_tls_from_args",
    "is_loopback",
    "looks_like_tls",
    "parse_client_tls",
    "parse_tls",
    "refuse_tls_on_plain_port",
    "server_context",
    "warn_if_exposed",
    "x509_subject",
]

log = logging.getLogger(__name__)

_SERVER_KEYS: Final = ("cert", "key", "ca", "verify_client", "handshake_timeout")
#: The keys only a listener that identifies clients by certificate takes.
_X509_KEYS: Final = ("x509_superuser",)
_CLIENT_KEYS: Final = ("ca", "cert", "key", "server_name")
#: Seconds a closing TLS connection may take to send its close_notify.
_CLOSE_NOTIFY_TIMEOUT: Final = 1.0
#: OpenSSL's reasons for a first record that is not TLS at all.
_NOT_TLS: Final = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD",
                   "RECORD_LAYER_FAILURE")  # fmt: skip


@attrs.frozen
class TlsConfig:
    """A listener's ``tls`` table: its certificate, and which clients it accepts."""

    cert: Path
    key: Path
    ca: Path | None = None
    #: True: require a client certificate signed by ``ca`` (ZooKeeper's
    #: ``ssl.clientAuth=need``); ``"want"``: ask for one and verify it if given
    #: (``ssl.clientAuth=want``); False: ask for none.
    verify_client: bool | Literal["want"] = False
    handshake_timeout: float = 10.0
    #: The certificate subject (RFC 2253, as :func:`x509_subject` writes it) of
    #: the ZooKeeper face's superuser; None: no such user.
    x509_superuser: str | None = None

    @property
    def verifies_clients(self) -> bool:
        """Whether a client certificate, when there is one, is verified and names the client."""
        return self.verify_client is not False

    def to_mapping(self) -> dict[str, Any]:
        """The ``tls`` table as TOML would give it."""
        result: dict[str, Any] = {
            "cert": str(self.cert), "key": str(self.key),
            "verify_client": self.verify_client, "handshake_timeout": self.handshake_timeout,
        }  # fmt: skip
        if self.ca is not None:
            result["ca"] = str(self.ca)
        if self.x509_superuser is not None:
            result["x509_superuser"] = self.x509_superuser
        return result


@attrs.frozen
class TlsSession:
    """A finished server handshake, for a caller that moves the bytes itself:
    the TLS state and its two memory buffers (ciphertext in and out)."""

    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


@attrs.frozen
class ClientTls:
    """A client's ``tls`` table: whom it trusts and what it presents."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    #: The name checked against the server's certificate; the host dialled if None.
    server_name: str | None = None

    def to_mapping(self) -> dict[str, Any]:
        """The ``tls`` table as TOML would give it."""
        return {key: str(value) for key, value in attrs.asdict(self).items() if value is not None}


def _path(value: Any, where: str, base_dir: Path | None) -> Path:
    path = settings.user_path(value, where)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


#: A comma that separates two RDNs followed by a space: not how RFC 2253 (Java's
#: ``X500Principal.getName()``) writes a subject, so such a name never matches.
_SPACED_RDN: Final = re.compile(r"(?<!\\),\s")


def _verify_client(value: Any, where: str, x509: bool) -> bool | Literal["want"]:
    if isinstance(value, bool):
        return value
    if value == "want" and x509:
        return "want"
    if value == "want":
        raise ConfigError(f'{where}: "want" is for [zookeeper.tls] only; here true or false')
    choices = 'true, false or "want"' if x509 else "true or false"
    raise ConfigError(f"{where}: must be {choices}, not {value!r}")


def _x509_superuser(value: Any, where: str) -> str:
    subject = settings.string(value, where)
    if "=" not in subject:
        raise ConfigError(f"{where}: must be a certificate subject such as CN=admin,O=Example")
    if _SPACED_RDN.search(subject):
        raise ConfigError(
            f"{where}: write the subject as RFC 2253 does, with no space after the commas "
            f"(CN=admin,O=Example), as ZooKeeper compares it; got {subject!r}"
        )
    return subject


def parse_tls(
    value: Any, where: str, base_dir: Path | None = None, *, x509: bool = False
) -> TlsConfig:
    """Check a listener's ``tls`` table; relative paths are relative to ``base_dir``.

    ``x509``: the listener names clients by their certificates (the ZooKeeper
    face), so ``verify_client = "want"`` and ``x509_superuser`` are allowed.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a table, not {settings.type_name(value)}")
    settings.reject_unknown(value, _SERVER_KEYS + _X509_KEYS if x509 else _SERVER_KEYS, where)
    for key in ("cert", "key"):
        if key not in value:
            raise ConfigError(f"{where}.{key}: missing (a TLS listener needs a {key})")
    options: dict[str, Any] = {
        "cert": _path(value["cert"], f"{where}.cert", base_dir),
        "key": _path(value["key"], f"{where}.key", base_dir),
    }
    if "ca" in value:
        options["ca"] = _path(value["ca"], f"{where}.ca", base_dir)
    if "verify_client" in value:
        options["verify_client"] = _verify_client(
            value["verify_client"], f"{where}.verify_client", x509
        )
        if options["verify_client"] is not False and "ca" not in options:
            raise ConfigError(f"{where}.verify_client: needs {where}.ca to verify clients against")
    if "x509_superuser" in value:
        options["x509_superuser"] = _x509_superuser(
            value["x509_superuser"], f"{where}.x509_superuser"
        )
        if options.get("verify_client", False) is False:
            raise ConfigError(
                f'{where}.x509_superuser: needs verify_client = true or "want" '
                "(the subject comes from a verified client certificate)"
            )
    if "handshake_timeout" in value:
        options["handshake_timeout"] = settings.seconds(
            value["handshake_timeout"], f"{where}.handshake_timeout"
        )
    config = TlsConfig(**options)
    try:
        server_context(config)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the certificate files: {exc}") from None
    return config


def parse_client_tls(value: Any, where: str, base_dir: Path | None = None) -> ClientTls:
    """Check a client's ``tls`` table (``true`` alone: the system's CAs, no client certificate)."""
    if value is True:
        return ClientTls()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a table or true, not {settings.type_name(value)}")
    settings.reject_unknown(value, _CLIENT_KEYS, where)
    options: dict[str, Any] = {}
    for key in ("ca", "cert", "key"):
        if key in value:
            options[key] = _path(value[key], f"{where}.{key}", base_dir)
    if ("cert" in options) != ("key" in options):
        raise ConfigError(f"{where}: cert and key go together")
    if "server_name" in value:
        options["server_name"] = settings.string(value["server_name"], f"{where}.server_name")
    config = ClientTls(**options)
    try:
        client_context(config)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the certificate files: {exc}") from None
    return config


def add_client_arguments(parser: argparse.ArgumentParser, server: str) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``: how a command reaches a TLS ``server``."""
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help=f"connect to {server} over TLS, trusting this CA (PEM)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="the client certificate (PEM) to present, with --tls-key",
    )
    parser.add_argument("--tls-key", type=Path, metavar="FILE",
                        help="the client certificate's key (PEM)")  # fmt: skip


def client_tls_from_args(args: argparse.Namespace) -> ClientTls | None:
    """The :class:`ClientTls` the ``--tls-*`` flags describe; None without any.
    Raises ValueError for a certificate without its key (or the reverse)."""
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def client_context_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client context the ``--tls-*`` flags describe; None without any (plain text).
    Raises ValueError for flags that do not go together, OSError for files that do not load."""
    tls = client_tls_from_args(args)
    return None if tls is None else client_context(tls)


def _restrict(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation would let a client restart the handshake mid-session.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """A server context for ``config``; raises OSError or ssl.SSLError on bad files."""
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(config.cert, config.key)
    if config.ca is not None:
        context.load_verify_locations(config.ca)
    if config.verify_client == "want":
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_REQUIRED if config.verify_client else ssl.CERT_NONE
    return context


def client_context(config: ClientTls) -> ssl.SSLContext:
    """A client context for ``config``: the server verified, hostname included."""
    context = _restrict(ssl.create_default_context(cafile=config.ca))
    if config.cert is not None:
        context.load_cert_chain(config.cert, config.key)
    return context


def _stamp(config: TlsConfig) -> tuple[int, ...]:
    stamps = []
    for path in (config.cert, config.key, config.ca):
        if path is None:
            continue
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def _refusal(exc: BaseException) -> str:
    """Why a handshake failed, in words an operator can act on."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"client certificate refused: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if reason in _NOT_TLS:
            return "not a TLS client (plain text on the TLS port)"
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE",):
            return "no client certificate presented"
        if "ALERT" in reason:
            return f"the client gave up the handshake: {reason.lower()}"
        return reason.lower()
    if cause is None or isinstance(cause, trio.BrokenResourceError):
        return "the client closed the connection during the handshake"
    return str(cause) or type(cause).__name__


class ServerTls:
    """A listener's TLS: the current context, reloaded when its files change,
    and the handshake of each accepted connection."""

    def __init__(self, config: TlsConfig, listener: str) -> None:
        self.config = config
        self.listener = listener
        self._stamp = _stamp(config)
        self._context = server_context(config)
        #: Handshakes refused since start, for tests and metrics.
        self.refused = 0

    @property
    def context(self) -> ssl.SSLContext:
        """The context for a new connection: rebuilt if a certificate file changed
        (a file being rewritten, or a bad one, keeps the previous context)."""
        stamp = _stamp(self.config)
        if stamp != self._stamp:
            try:
                context = server_context(self.config)
            except (OSError, ssl.SSLError) as exc:
                log.error(
                    "cannot reload TLS certificates; keeping the previous ones",
                    extra={"listener": self.listener, "error": str(exc)},
                )
            else:
                self._context = context
                log.info("TLS certificates reloaded", extra={"listener": self.listener})
            self._stamp = stamp
        return self._context

    async def accept(self, stream: trio.abc.Stream, peer: str) -> trio.SSLStream[Any] | None:
        """``stream`` after a completed handshake, or None (logged, stream closed)."""
        tls = trio.SSLStream(stream, self.context, server_side=True)
        reason = None
        with trio.move_on_after(self.config.handshake_timeout) as scope:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = _refusal(exc)
        if scope.cancelled_caught:
            reason = f"no TLS handshake within {self.config.handshake_timeout:g} s"
        if reason is None:
            return tls
        self.refused += 1
        log.warning(
            "refused a TLS connection",
            extra={"listener": self.listener, "peer": peer, "reason": reason},
        )
        await trio.aclose_forcefully(stream)
        return None

    async def handshake(self, sock: trio.socket.SocketType, peer: str) -> TlsSession | None:
        """The server handshake on ``sock``, within ``handshake_timeout``, done on
        memory buffers so that the caller can then read and write the socket
        without waiting (as the plain-text path does); None if refused (logged;
        the caller closes ``sock``)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        reason = None
        with trio.move_on_after(self.config.handshake_timeout) as scope:
            try:
                while True:
                    try:
                        tls.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    if outgoing.pending:
                        await _send_all(sock, outgoing.read())
                    if done:
                        break
                    data = await sock.recv(_HANDSHAKE_RECEIVE)
                    if not data:
                        raise trio.BrokenResourceError
                    incoming.write(data)
            except ssl.SSLError as exc:
                # The alert says why to the client too, if its socket takes it now.
                _send_now(sock, outgoing.read())
                reason = _refusal(exc)
            except (OSError, trio.BrokenResourceError):
                reason = _refusal(trio.BrokenResourceError())
        if scope.cancelled_caught:
            reason = f"no TLS handshake within {self.config.handshake_timeout:g} s"
        if reason is None:
            return TlsSession(tls, incoming, outgoing)
        self.refused += 1
        log.warning(
            "refused a TLS connection",
            extra={"listener": self.listener, "peer": peer, "reason": reason},
        )
        return None


#: Bytes read at a time during a handshake (a ClientHello with its certificate
#: chain fits in a few of these).
_HANDSHAKE_RECEIVE: Final = 16384


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


def _send_now(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write what ``sock`` takes at once, ignoring a socket already broken."""
    if data:
        with contextlib.suppress(OSError):
            os.write(sock.fileno(), data)


def looks_like_tls(data: bytes) -> bool:
    """Whether ``data`` starts like a TLS ClientHello record (handshake, version 3.x)."""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


def refuse_tls_on_plain_port(listener: str, peer: str) -> None:
    """Log that a TLS client reached a plain-text port (the caller closes it)."""
    log.warning(
        "refused a connection: a TLS client on the plain-text port",
        extra={"listener": listener, "peer": peer},
    )


class PlainGuard(trio.abc.HalfCloseableStream):
    """A plain-text stream that ends at once, with one log line, if its first
    bytes are a TLS ClientHello: a TLS client on a plain port gets a closed
    connection instead of a protocol error about a frame it never sent."""

    def __init__(self, stream: trio.SocketStream, listener: str, peer: str) -> None:
        self.stream = stream
        self.listener = listener
        self.peer = peer
        self._first = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        if self._first and data:
            self._first = False
            if looks_like_tls(bytes(data[:2])):
                refuse_tls_on_plain_port(self.listener, self.peer)
                await trio.aclose_forcefully(self.stream)
                return b""
        return data

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class SecureHalfCloseable(trio.abc.HalfCloseableStream):
    """A TLS stream for code that half-closes when its answer is complete.

    TLS has no half-close: its close_notify ends the connection. So
    :meth:`send_eof` sends the close_notify and closes, and reading after it
    finds the end at once. A client thus learns that the answer is whole
    (rather than cut short, which a TLS client reports as an error).
    """

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self.stream = stream
        self._ended = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._ended:
            await trio.lowlevel.checkpoint()
            return b""
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        self._ended = True
        await self.aclose()

    async def aclose(self) -> None:
        # Even a forceful close (a cancelled scope) sends the close_notify, so
        # an answer sent whole is not reported as cut short; within a bound,
        # since a client that does not read could hold it.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT):
                await self.stream.aclose()
            await trio.aclose_forcefully(self.stream)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(listener: str, host: str, tls: object | None) -> None:
    """The loud warning for a listener bound beyond loopback without TLS."""
    if tls is None and not is_loopback(host):
        log.warning(
            "listening beyond loopback without TLS: anyone on the network can read "
            "and forge this traffic; set a tls table for it",
            extra={"listener": listener, "listen": host},
        )


_DN_KEYWORDS: Final = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O",
    "2.5.4.11": "OU", "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}  # fmt: skip
#: DER string types Java prints as text in an RFC 2253 name.
_TEXT_TAGS: Final = {0x0C: "utf-8", 0x13: "latin-1", 0x14: "latin-1", 0x16: "latin-1",
                     0x1B: "latin-1", 0x1E: "utf-16-be"}  # fmt: skip
_ESCAPED: Final = ',=+<>#;"\\'


def _der(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``offset``."""
    tag = data[offset]
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    return tag, offset, offset + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, content start, content end, element start) of each element in a range."""
    out = []
    while start < end:
        tag, content, stop = _der(data, start)
        out.append((tag, content, stop, start))
        start = stop
    return out


def _oid(raw: bytes) -> str:
    parts = [raw[0] // 40, raw[0] % 40]
    value = 0
    for byte in raw[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _escape(text: str) -> str:
    out = "".join("\\" + c if c in _ESCAPED else ("\\00" if c == "\0" else c) for c in text)
    if out.startswith(" "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def x509_subject(der: bytes) -> str:
    """The subject of a DER certificate as ZooKeeper's ``X509AuthenticationProvider``
    names the client: Java's ``X500Principal.getName()`` (RFC 2253: the most
    specific RDN first, the attributes Java names by keyword, others as
    ``OID=#hex``)."""
    _, cert_start, _ = _der(der, 0)
    _, tbs_start, tbs_end = _der(der, cert_start)
    fields = _children(der, tbs_start, tbs_end)
    if fields and fields[0][0] == 0xA0:  # the explicit version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    _, subject_start, subject_end, _ = fields[4]
    rdns = []
    for _, set_start, set_end, _ in _children(der, subject_start, subject_end):
        avas = []
        for _, ava_start, ava_end, _ in _children(der, set_start, set_end):
            (_, oid_start, oid_end, _), (tag, value_start, value_end, element) = _children(
                der, ava_start, ava_end
            )
            oid = _oid(der[oid_start:oid_end])
            keyword = _DN_KEYWORDS.get(oid)
            if keyword is not None and tag in _TEXT_TAGS:
                text = der[value_start:value_end].decode(_TEXT_TAGS[tag], "replace")
                avas.append(f"{keyword}={_escape(text)}")
            else:
                avas.append(f"{keyword or oid}=#{der[element:value_end].hex()}")
        rdns.append("+".join(avas))
    return ",".join(reversed(rdns))
