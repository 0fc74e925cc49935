"""TLS on every listener, checked with certificates made by the test (a throwaway CA).

The ZooKeeper face is compared with a real ZooKeeper 3.8 serving the same
certificates on its ``secureClientPort`` (one for the module): the same clients
(kazoo, zkCli.sh) connect to both, an ``x509`` ACL written for a certificate's
subject lets in the same client on both and refuses the same other one, and
the x509 superuser may do the same things on both. For each listener
(ZooKeeper, subscriptions, Meta Server, admin): a good certificate connects;
an expired one, one from another CA, a plain-text client on the TLS port and a
TLS client on the plain port are refused with a log line naming the cause, and
the listener goes on serving.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import attrs
import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import InvalidACLError, NoAuthError
from kazoo.security import ACL, Id, Permissions

from dispatcher import operator, wire
from dispatcher.config import parse_config
from dispatcher.containment import InternalErrors
from dispatcher.gateway import run_gateway
from dispatcher.settings import ConfigError
from dispatcher.sharding.membership import MemoryMembership, MemoryStore
from dispatcher.tls import ClientTls, client_context, x509_subject
from dispatcher.wire_client import ClientSettings, Closed, connect
from metaserver.cli import parse_meta_config, run_meta
from tests.certs import Authority, Issued, pkcs12, truststore
from tests.servers import (
    NETTY_TLS_JARS,
    ServerFactory,
    ZkgateServer,
    ZooKeeperServer,
    free_port,
    secure_zookeeper_config,
    wait_for,
)
from tests.waiting import until

TIMEOUT = 15.0
PASSWORD = "keystore-secret"
#: A subject with a comma inside a value: the DN's escaping is compared too.
ALICE_SUBJECT = "/C=US/O=Example, Inc./OU=apps/CN=alice"
BOB_SUBJECT = "/O=Example/CN=bob"
ADMIN_SUBJECT = "/O=Example/CN=admin"
#: ADMIN_SUBJECT as RFC 2253 writes it: what ``x509_superuser`` names.
ADMIN_DN = "CN=admin,O=Example"
#: The JVM property ZooKeeper 3.8 reads its x509 superuser from.
SUPERUSER_PROPERTY = "zookeeper.X509AuthenticationProvider.superUser"


@attrs.frozen
class Pki:
    ca: Authority
    server: Issued
    alice: Issued
    bob: Issued
    admin: Issued
    expired: Issued
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = Authority(base / "ca")
    other = Authority(base / "other", name="someone else's CA")
    return Pki(
        ca=ca,
        server=ca.issue("server", "/CN=localhost"),
        alice=ca.issue("alice", ALICE_SUBJECT),
        bob=ca.issue("bob", BOB_SUBJECT),
        admin=ca.issue("admin", ADMIN_SUBJECT),
        expired=ca.issue("expired", "/CN=expired", expired=True),
        stranger=other.issue("stranger", "/CN=stranger"),
    )


def _der(issued: Issued) -> bytes:
    return ssl.PEM_cert_to_DER_cert(issued.cert.read_text())


def _tls_table(pki: Pki, *, verify_client: bool = True, cert: Issued | None = None) -> str:
    cert = cert or pki.server
    return (
        f'cert = "{cert.cert}"\nkey = "{cert.key}"\nca = "{pki.ca.cert}"\n'
        f"verify_client = {'true' if verify_client else 'false'}\nhandshake_timeout = 3.0\n"
        f'x509_superuser = "{ADMIN_DN}"\n'
    )


@contextmanager
def kazoo(port: int, client: Issued | None, pki: Pki, **kwargs: object) -> Iterator[KazooClient]:
    """A started kazoo client on 127.0.0.1:``port`` over TLS with ``client``'s certificate."""
    options: dict[str, object] = {"use_ssl": True, "ca": str(pki.ca.cert)}
    if client is not None:
        options.update(certfile=str(client.cert), keyfile=str(client.key))
    options.update(kwargs)
    zk = KazooClient(hosts=f"127.0.0.1:{port}", timeout=10, **options)
    zk.start(timeout=TIMEOUT)
    try:
        yield zk
    finally:
        zk.stop()
        zk.close()


#: A ZooKeeper ConnectRequest (protocol 0, no session, 10 s, read-write), framed.
_CONNECT = struct.pack(">iqiqi16s?", 0, 0, 10000, 0, 16, bytes(16), False)
_CONNECT_FRAME = struct.pack(">i", len(_CONNECT)) + _CONNECT


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count and (chunk := sock.recv(count - len(data))):
        data += chunk
    return data


def _served(port: int, client: Issued | None, pki: Pki, *, tls: bool = True) -> bool:
    """Whether ``port`` gives a ZooKeeper session to a client connecting over TLS
    with ``client``'s certificate (or none), or in plain text (``tls=False``).

    A raw socket, so a refusal shows at once rather than after a client's retries.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        sock: socket.socket = raw
        try:
            if tls:
                context = ssl.create_default_context(cafile=str(pki.ca.cert))
                if client is not None:
                    context.load_cert_chain(client.cert, client.key)
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(_CONNECT_FRAME)
            header = _receive_exactly(sock, 4)
            # A ConnectResponse is 36 or 37 bytes; anything else (an alert read as
            # a length, or the end) is no session.
            length = int.from_bytes(header, "big") if len(header) == 4 else 0
            return length in (36, 37) and len(_receive_exactly(sock, length)) == length
        except (ssl.SSLError, ConnectionError):
            return False


def _log(server: ZkgateServer) -> str:
    return server.log_path.read_text(errors="replace")


@attrs.frozen
class SecureZkgate:
    server: ZkgateServer
    secure_port: int
    config: Path


@pytest.fixture
def secure_zkgate(
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path, pki: Pki
) -> SecureZkgate:
    secure_port = free_port()
    # Copies, so the reload test may replace them.
    cert = tmp_path / "server.pem"
    key = tmp_path / "server-key.pem"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    config = tmp_path / "zkgate.toml"
    config.write_text(
        f'[zookeeper]\nsecure_listen = "127.0.0.1:{secure_port}"\n\n[zookeeper.tls]\n'
        + _tls_table(pki, cert=Issued(cert, key))
    )
    server = zkgate_factory(["--config", str(config)])
    return SecureZkgate(server, secure_port, config)


@pytest.fixture(scope="module")
def secure_zookeeper(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[ZooKeeperServer, int]]:
    """One real ZooKeeper for the module (a JVM start costs seconds): each test
    works under paths of its own. Its x509 superuser is the admin certificate."""
    base = tmp_path_factory.mktemp("secure-zookeeper")
    secure_port = free_port()
    keystore = pkcs12(pki.server, pki.ca, base / "keystore.p12", PASSWORD)
    trust = truststore(pki.ca, base / "truststore.p12", PASSWORD)
    with ZooKeeperServer(
        base_dir=base / "server",
        config=secure_zookeeper_config(secure_port, keystore, trust, PASSWORD),
        system_properties={SUPERUSER_PROPERTY: ADMIN_DN},
    ) as server:
        yield server, secure_port


# ----------------------------------------------------------------- x509 names


def test_the_x509_identity_is_the_subject_as_java_names_it(pki: Pki) -> None:
    # RFC 2253 as X500Principal.getName() writes it: the most specific RDN first,
    # a comma inside a value escaped.
    assert x509_subject(_der(pki.alice)) == "CN=alice,OU=apps,O=Example\\, Inc.,C=US"
    assert x509_subject(_der(pki.bob)) == "CN=bob,O=Example"


# ------------------------------------------------------------ the ZooKeeper face


def test_a_client_with_a_good_certificate_gets_a_session_and_its_x509_identity(
    secure_zkgate: SecureZkgate, pki: Pki
) -> None:
    with kazoo(secure_zkgate.secure_port, pki.alice, pki) as zk:
        zk.create("/tls-hello", b"over tls")
        assert zk.get("/tls-hello")[0] == b"over tls"
    # The plain port still serves plain clients beside the TLS one.
    plain = KazooClient(hosts=secure_zkgate.server.address, timeout=10)
    plain.start(timeout=TIMEOUT)
    try:
        assert plain.get("/tls-hello")[0] == b"over tls"
    finally:
        plain.stop()
        plain.close()


@pytest.mark.parametrize(
    ("who", "kwargs", "reason"),
    [
        ("expired", {}, "client certificate refused: certificate has expired"),
        ("stranger", {}, "client certificate refused: unable to get local issuer certificate"),
        (None, {}, "no client certificate"),
    ],
)
def test_bad_client_certificates_are_refused_with_a_reason_and_the_port_serves_on(
    secure_zkgate: SecureZkgate, pki: Pki, who: str | None, kwargs: dict[str, object], reason: str
) -> None:
    client = None if who is None else getattr(pki, who)
    assert not _served(secure_zkgate.secure_port, client, pki, **kwargs)
    wait_for(lambda: reason in _log(secure_zkgate.server), timeout=TIMEOUT)
    assert "refused a TLS connection" in _log(secure_zkgate.server)
    with kazoo(secure_zkgate.secure_port, pki.alice, pki) as zk:
        assert zk.exists("/") is not None


def test_a_plain_client_on_the_tls_port_and_a_tls_client_on_the_plain_port_are_refused(
    secure_zkgate: SecureZkgate, pki: Pki
) -> None:
    assert _served(secure_zkgate.server.port, None, pki, tls=False)
    assert not _served(secure_zkgate.secure_port, None, pki, tls=False)
    wait_for(lambda: "not a TLS client" in _log(secure_zkgate.server), timeout=TIMEOUT)
    assert not _served(secure_zkgate.server.port, pki.alice, pki)
    wait_for(
        lambda: "a TLS client on the plain-text port" in _log(secure_zkgate.server),
        timeout=TIMEOUT,
    )
    with kazoo(secure_zkgate.secure_port, pki.alice, pki) as zk:
        assert zk.exists("/") is not None


def test_a_silent_client_on_the_tls_port_holds_no_one_up(
    secure_zkgate: SecureZkgate, pki: Pki
) -> None:
    # A connection that never starts its handshake: others connect meanwhile,
    # and it is dropped after handshake_timeout with a line saying so.
    with socket.create_connection(("127.0.0.1", secure_zkgate.secure_port)) as silent:
        with kazoo(secure_zkgate.secure_port, pki.alice, pki) as zk:
            assert zk.exists("/") is not None
        silent.settimeout(TIMEOUT)
        assert silent.recv(1) == b""
    assert "no TLS handshake within 3 s" in _log(secure_zkgate.server)


def test_replaced_certificates_are_used_for_new_connections_and_sessions_stay(
    secure_zkgate: SecureZkgate, pki: Pki, tmp_path: Path
) -> None:
    renewed = pki.ca.issue("renewed", "/CN=renewed")
    with kazoo(secure_zkgate.secure_port, pki.alice, pki) as zk:
        zk.create("/reload", b"before")
        session = zk.client_id
        cert = tmp_path / "server.pem"
        key = tmp_path / "server-key.pem"
        # Key first, then the certificate: until both match, the old pair serves.
        shutil.copy(renewed.key, key)
        shutil.copy(renewed.cert, cert)
        os.utime(cert, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))

        def served_subject() -> str:
            context = ssl.create_default_context(cafile=str(pki.ca.cert))
            context.load_cert_chain(pki.alice.cert, pki.alice.key)
            context.check_hostname = False
            with (
                socket.create_connection(("127.0.0.1", secure_zkgate.secure_port)) as raw,
                context.wrap_socket(raw) as tls,
            ):
                return x509_subject(tls.getpeercert(binary_form=True) or b"")

        wait_for(lambda: served_subject() == "CN=renewed", timeout=TIMEOUT)
        zk.set("/reload", b"after")
        assert zk.get("/reload")[0] == b"after"
        assert zk.client_id == session
    assert "TLS certificates reloaded" in _log(secure_zkgate.server)


# ------------------------------------------- x509 ACLs, against real ZooKeeper


def _x509_acl_outcomes(port: int, pki: Pki, path: str) -> list[str]:
    """What alice and bob may do on a node whose ACL names alice's subject."""
    alice_id = x509_subject(_der(pki.alice))
    outcomes = []
    with kazoo(port, pki.alice, pki) as alice:
        alice.create(path, b"alice's", acl=[ACL(Permissions.ALL, Id("x509", alice_id))])
        outcomes.append(f"alice reads {alice.get(path)[0]!r}")
        outcomes.append(f"acl {[(a.perms, a.id.scheme, a.id.id) for a in alice.get_acls(path)[0]]}")
        alice.create(path + "-auth", b"", acl=[ACL(Permissions.READ, Id("auth", ""))])
        expanded = alice.get_acls(path + "-auth")[0]
        outcomes.append(f"auth acl {[(a.id.scheme, a.id.id) for a in expanded]}")
    with kazoo(port, pki.bob, pki) as bob:
        try:
            bob.get(path)
            outcomes.append("bob reads")
        except NoAuthError:
            outcomes.append("bob: NOAUTH")
        try:
            bob.set(path, b"bob's")
            outcomes.append("bob writes")
        except NoAuthError:
            outcomes.append("bob: NOAUTH on write")
    return outcomes


def test_x509_acls_match_as_on_real_zookeeper(
    secure_zkgate: SecureZkgate, secure_zookeeper: tuple[ZooKeeperServer, int], pki: Pki
) -> None:
    reference = _x509_acl_outcomes(secure_zookeeper[1], pki, "/x509-acl")
    assert reference[0] == 'alice reads b"alice\'s"'
    assert _x509_acl_outcomes(secure_zkgate.secure_port, pki, "/x509-acl") == reference


def _superuser_outcomes(port: int, pki: Pki, path: str) -> list[str]:
    """What the x509 superuser may do on a node only alice may touch."""
    alice_acl = [ACL(Permissions.ALL, Id("x509", x509_subject(_der(pki.alice))))]
    outcomes = []
    with kazoo(port, pki.alice, pki) as alice:
        alice.create(path, b"alice's", acl=alice_acl)
    with kazoo(port, pki.admin, pki) as admin:
        outcomes.append(f"admin reads {admin.get(path)[0]!r}")
        admin.set(path, b"admin's")
        outcomes.append(f"admin wrote, alice's acl kept: {admin.get_acls(path)[0] == alice_acl}")
        admin.create(path + "/mine", b"", acl=[ACL(Permissions.READ, Id("auth", ""))])
        expanded = admin.get_acls(path + "/mine")[0]
        outcomes.append(f"auth acl {[(a.id.scheme, a.id.id) for a in expanded]}")
        admin.set_acls(path, [ACL(Permissions.ALL, Id("x509", "CN=nobody"))])
        outcomes.append(f"admin reads after setACL {admin.get(path)[0]!r}")
    with kazoo(port, pki.alice, pki) as alice:
        try:
            alice.get(path)
            outcomes.append("alice reads")
        except NoAuthError:
            outcomes.append("alice: NOAUTH")
    with kazoo(port, pki.admin, pki) as admin:
        admin.delete(path, recursive=True)
        outcomes.append(f"admin deleted it: {admin.exists(path) is None}")
    return outcomes


def test_the_x509_superuser_may_do_anything_as_on_real_zookeeper(
    secure_zkgate: SecureZkgate, secure_zookeeper: tuple[ZooKeeperServer, int], pki: Pki
) -> None:
    """``x509_superuser`` against ZooKeeper's ``X509AuthenticationProvider.superUser``:
    the subject RFC 2253 names, every ACL passed, and an ``auth`` entry that
    names the certificate (not the superuser)."""
    assert x509_subject(_der(pki.admin)) == ADMIN_DN
    reference = _superuser_outcomes(secure_zookeeper[1], pki, "/x509-super")
    assert reference[0] == 'admin reads b"alice\'s"'
    assert reference[2] == f"auth acl [('x509', '{ADMIN_DN}')]"
    assert _superuser_outcomes(secure_zkgate.secure_port, pki, "/x509-super") == reference


def _x509_acl_without_tls(address: str, path: str) -> str:
    client = KazooClient(hosts=address)
    client.start(timeout=10)
    try:
        client.create(path, b"", acl=[ACL(Permissions.ALL, Id("x509", "CN=alice"))])
        return "created"
    except InvalidACLError:
        return "INVALIDACL"
    finally:
        client.stop()
        client.close()


def test_x509_acls_need_a_port_that_verifies_certificates_as_on_real_zookeeper(
    zookeeper: ZooKeeperServer, zkgate: ZkgateServer, unique_path: str
) -> None:
    """Without a TLS port that verifies client certificates no x509 provider is
    registered, so ZooKeeper refuses an ``x509:`` ACL; so does zkgate."""
    reference = _x509_acl_without_tls(zookeeper.address, unique_path)
    assert reference == "INVALIDACL"
    assert _x509_acl_without_tls(zkgate.address, unique_path) == reference


def _zkcli_whoami(port: int, pki: Pki, tmp_path: Path) -> list[str]:
    keystore = pkcs12(pki.alice, pki.ca, tmp_path / f"alice-{port}.p12", PASSWORD)
    trust = tmp_path / "cli-trust.p12"
    if not trust.exists():
        truststore(pki.ca, trust, PASSWORD)
    # zkEnv.sh's class path lacks the Netty jars of the TLS socket; a later -cp wins.
    classpath = ":".join(["/etc/zookeeper/conf", "/usr/share/java/zookeeper.jar", *NETTY_TLS_JARS])
    flags = " ".join([
        f"-cp {classpath}",
        "-Dzookeeper.client.secure=true",
        "-Dzookeeper.clientCnxnSocket=org.apache.zookeeper.ClientCnxnSocketNetty",
        f"-Dzookeeper.ssl.keyStore.location={keystore}",
        f"-Dzookeeper.ssl.keyStore.password={PASSWORD}",
        "-Dzookeeper.ssl.keyStore.type=PKCS12",
        f"-Dzookeeper.ssl.trustStore.location={trust}",
        f"-Dzookeeper.ssl.trustStore.password={PASSWORD}",
        "-Dzookeeper.ssl.trustStore.type=PKCS12",
    ])  # fmt: skip
    result = subprocess.run(
        ["/usr/share/zookeeper/bin/zkCli.sh", "-server", f"127.0.0.1:{port}", "whoami"],
        env={**os.environ, "CLIENT_JVMFLAGS": flags},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    return sorted(line for line in lines if line.startswith(("x509:", "ip:")))


def test_zkcli_over_tls_sees_the_same_identity_on_both_servers(
    secure_zkgate: SecureZkgate,
    secure_zookeeper: tuple[ZooKeeperServer, int],
    pki: Pki,
    tmp_path: Path,
) -> None:
    reference = _zkcli_whoami(secure_zookeeper[1], pki, tmp_path)
    assert f"x509: {x509_subject(_der(pki.alice))}" in reference
    assert _zkcli_whoami(secure_zkgate.secure_port, pki, tmp_path) == reference


# ------------------------------------------- the trio client to a secure port


def test_the_mirror_reaches_an_ensemble_that_only_has_a_tls_port(
    secure_zookeeper: tuple[ZooKeeperServer, int],
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
    pki: Pki,
) -> None:
    _, secure_port = secure_zookeeper
    with kazoo(secure_port, pki.alice, pki) as direct:
        direct.create("/secured/app", b"v1", makepath=True)
        config = tmp_path / "mirror.toml"
        config.write_text(
            f'[[mirror]]\nroot = "/secured"\nhosts = "127.0.0.1:{secure_port}"\n'
            f'tls = {{ ca = "{pki.ca.cert}", cert = "{pki.alice.cert}", '
            f'key = "{pki.alice.key}" }}\n'
        )
        gate = zkgate_factory(["--config", str(config)])
        through = KazooClient(hosts=gate.address, timeout=10)
        through.start(timeout=TIMEOUT)
        try:
            assert through.get("/secured/app")[0] == b"v1"
            through.create("/secured/app/child", b"written through zkgate")
            assert direct.get("/secured/app/child")[0] == b"written through zkgate"
            seen: list[bytes | None] = []
            through.get("/secured/app", watch=lambda event: seen.append(event.path))
            direct.set("/secured/app", b"v2")
            wait_for(lambda: seen, timeout=TIMEOUT, message="the watch through the mirror")
            assert through.get("/secured/app")[0] == b"v2"
        finally:
            through.stop()
            through.close()


# ------------------------------------------------------- the control plane


TOKEN = "control-plane-token"


async def _wire_exchange(stream: trio.abc.Stream) -> bool:
    conn = wire.WireStream(stream)
    await conn.send(wire.Hello(wire.PROTOCOL_VERSION, TOKEN, "tls-test"))
    return isinstance(await conn.receive(), wire.Welcome)


async def _http_exchange(stream: trio.abc.Stream) -> bool:
    await stream.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data.startswith(b"HTTP/1.1 200")


@attrs.frozen
class Listener:
    name: str
    port: int
    exchange: Callable[[trio.abc.Stream], Awaitable[bool]]


@asynccontextmanager
async def control_plane(pki: Pki, tmp_path: Path, *, tls: bool) -> AsyncIterator[list[Listener]]:
    """The subscription server and admin endpoint of a gateway, and a Meta Server,
    in this process, all with TLS (client certificates required) or all without."""
    table = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.cert),
             "verify_client": True, "handshake_timeout": 3.0}  # fmt: skip
    secured: dict[str, object] = {"tls": table} if tls else {}
    config = parse_config({
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / f"data-{tls}")},
        "admin": {"listen": "127.0.0.1:0", **secured},
        "subscriptions": {"listen": "127.0.0.1:0", "token": TOKEN, **secured},
    })  # fmt: skip
    meta_config = parse_meta_config({
        "token": TOKEN, "membership": {"kind": "zookeeper", "address": "127.0.0.1:1"},
        "meta": {"listen": "127.0.0.1:0", **secured},
    })  # fmt: skip
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(run_gateway, config)
        _, meta_port = await nursery.start(
            functools.partial(run_meta, meta_config, membership=MemoryMembership(MemoryStore()))
        )
        assert gateway.admin is not None and gateway.admin.port is not None
        assert gateway.subscription_port is not None
        yield [
            Listener("subscriptions", gateway.subscription_port, _wire_exchange),
            Listener("meta", meta_port, _wire_exchange),
            Listener("admin", gateway.admin.port, _http_exchange),
        ]
        nursery.cancel_scope.cancel()


async def _attempt(listener: Listener, tls: ClientTls | None) -> bool:
    """Whether ``listener`` serves a client connecting with ``tls`` (None: plain text)."""
    with trio.fail_after(TIMEOUT):
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
        try:
            if tls is not None:
                secure = trio.SSLStream(stream, client_context(tls), server_hostname="127.0.0.1")
                await secure.do_handshake()
                stream = secure
            return await listener.exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, wire.WireError):
            return False
        finally:
            await trio.aclose_forcefully(stream)


def _refusals(caplog: pytest.LogCaptureFixture, listener: str) -> list[str]:
    return [
        f"{record.getMessage()}: {getattr(record, 'reason', '')}"
        for record in caplog.records
        if getattr(record, "listener", None) == listener and record.levelname == "WARNING"
    ]


def _as(pki: Pki, who: Issued) -> ClientTls:
    return ClientTls(ca=pki.ca.cert, cert=who.cert, key=who.key)


async def test_each_control_plane_listener_accepts_a_good_certificate_and_refuses_bad_ones(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher.tls")
    async with control_plane(pki, tmp_path, tls=True) as listeners:
        for listener in listeners:
            assert await _attempt(listener, _as(pki, pki.alice)), listener.name
            assert not await _attempt(listener, _as(pki, pki.expired)), listener.name
            assert not await _attempt(listener, _as(pki, pki.stranger)), listener.name
            assert not await _attempt(listener, ClientTls(ca=pki.ca.cert)), listener.name
            assert not await _attempt(listener, None), listener.name
            # ... and it goes on serving.
            assert await _attempt(listener, _as(pki, pki.bob)), listener.name
            assert _refusals(caplog, listener.name) == [
                "refused a TLS connection: client certificate refused: certificate has expired",
                "refused a TLS connection: client certificate refused: "
                "unable to get local issuer certificate",
                "refused a TLS connection: no client certificate presented",
                "refused a TLS connection: not a TLS client (plain text on the TLS port)",
            ], listener.name


async def test_a_tls_client_on_a_plain_control_plane_port_is_refused_with_a_log_line(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher.tls")
    async with control_plane(pki, tmp_path, tls=False) as listeners:
        for listener in listeners:
            assert not await _attempt(listener, _as(pki, pki.alice)), listener.name
            assert await _attempt(listener, None), listener.name
            assert _refusals(caplog, listener.name) == [
                "refused a connection: a TLS client on the plain-text port: "
            ], listener.name


async def test_the_wire_client_and_zkgate_status_connect_over_tls(pki: Pki, tmp_path: Path) -> None:
    async with control_plane(pki, tmp_path, tls=True) as listeners:
        subscriptions, meta, admin = listeners
        for listener in (subscriptions, meta):
            settings = ClientSettings(token=TOKEN, tls=_as(pki, pki.alice))
            link = await connect(f"127.0.0.1:{listener.port}", listener.name, settings,
                                 InternalErrors("test"))  # fmt: skip
            assert link.server_id
            await trio.aclose_forcefully(link.conn.stream)
            with pytest.raises(Closed, match=r"TLS handshake failed|no welcome"):
                await connect(f"127.0.0.1:{listener.port}", listener.name,
                              ClientSettings(token=TOKEN, tls=ClientTls(ca=pki.stranger.cert)),
                              InternalErrors("test"))  # fmt: skip
        out = io.StringIO()
        args = argparse.Namespace(
            admin=f"127.0.0.1:{admin.port}", services=10, json=True,
            tls_ca=pki.ca.cert, tls_cert=pki.alice.cert, tls_key=pki.alice.key,
        )  # fmt: skip
        code = await trio.to_thread.run_sync(operator.status, args, out)
        assert code in (operator.EXIT_READY, operator.EXIT_NOT_READY)
        assert "ready" in json.loads(out.getvalue())
        plain = argparse.Namespace(**{**vars(args), "tls_ca": None, "tls_cert": None,
                                      "tls_key": None})  # fmt: skip
        code = await trio.to_thread.run_sync(operator.status, plain, io.StringIO())
        assert code == operator.EXIT_UNREACHABLE


async def test_a_tls_only_zookeeper_face_serves_no_plain_port(pki: Pki, tmp_path: Path) -> None:
    config = parse_config({"zookeeper": {
        "listen": "off", "secure_listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
    }, "admin": {"enabled": False}})  # fmt: skip
    assert config.zookeeper.to_mapping()["listen"] == "off"
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(run_gateway, config)
        assert gateway.secure_port is not None and gateway.port == gateway.secure_port

        def over_tls() -> bytes:
            with kazoo(gateway.secure_port, None, pki) as zk:
                zk.create("/tls-only", b"yes")
                return bytes(zk.get("/tls-only")[0])

        assert await trio.to_thread.run_sync(over_tls) == b"yes"
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", config.zookeeper.port)
        nursery.cancel_scope.cancel()


def test_listen_off_needs_a_secure_listen() -> None:
    with pytest.raises(ConfigError, match=r"zookeeper\.listen: can be off only beside"):
        parse_config({"zookeeper": {"listen": "off"}})


# ------------------------------------- the ZooKeeper face's TLS port, in-process


@asynccontextmanager
async def secure_face(
    pki: Pki, tmp_path: Path, tls: dict[str, object], **zookeeper: object
) -> AsyncIterator[int]:
    """A gateway in this process serving only a TLS ZooKeeper port; yields the port."""
    table = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.cert),
             "handshake_timeout": 10.0, **tls}  # fmt: skip
    config = parse_config({"zookeeper": {
        "listen": "off", "secure_listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data"),
        "tls": table, **zookeeper,
    }, "admin": {"enabled": False}})  # fmt: skip
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(run_gateway, config)
        assert gateway.secure_port is not None
        yield gateway.secure_port
        nursery.cancel_scope.cancel()


async def test_verify_client_want_asks_for_a_certificate_but_needs_none(
    pki: Pki, tmp_path: Path
) -> None:
    """ZooKeeper's ``ssl.clientAuth=want``: a certificate, when given, is verified
    and names the client; a client without one gets a session and no x509 id."""
    alice_acl = [ACL(Permissions.ALL, Id("x509", x509_subject(_der(pki.alice))))]

    def scenario(port: int) -> list[str]:
        with kazoo(port, pki.alice, pki) as alice:
            alice.create("/want", b"alice's", acl=alice_acl)
            outcomes = [f"alice reads {alice.get('/want')[0]!r}"]
        with kazoo(port, None, pki) as anonymous:
            anonymous.create("/open", b"anyone's")
            outcomes.append(f"no certificate reads /open {anonymous.get('/open')[0]!r}")
            try:
                anonymous.get("/want")
                outcomes.append("no certificate reads /want")
            except NoAuthError:
                outcomes.append("no certificate: NOAUTH on /want")
        outcomes += [f"{who} served: {_served(port, getattr(pki, who), pki)}"
                     for who in ("expired", "stranger")]  # fmt: skip
        return outcomes

    async with secure_face(pki, tmp_path, {"verify_client": "want"}) as port:
        assert await trio.to_thread.run_sync(scenario, port) == [
            'alice reads b"alice\'s"',
            'no certificate reads /open b"anyone\'s"',
            "no certificate: NOAUTH on /want",
            "expired served: False",
            "stranger served: False",
        ]


class _Frames:
    """Length-prefixed ZooKeeper frames read from a stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def next(self) -> bytes:
        while True:
            if len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) >= 4 + length:
                    frame = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    return frame
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError("the server closed the connection")
            self.buffer += data


def _get_data(xid: int, path: bytes) -> bytes:
    body = struct.pack(">iii", xid, 4, len(path)) + path + b"\0"  # getData, no watch
    return struct.pack(">i", len(body)) + body


async def test_pipelined_large_reads_over_tls_all_come_back_whole_and_in_order(
    pki: Pki, tmp_path: Path
) -> None:
    """32 MiB of replies for 64 pipelined getData: far more than the socket takes
    at once, so the output waits encrypted and unencrypted, under the same
    bounds as on the plain port, and goes out whole, in order."""
    big = bytes(range(256)) * 2048  # 512 KiB

    def store(port: int) -> None:
        with kazoo(port, pki.alice, pki) as zk:
            zk.create("/big", big)

    async with secure_face(pki, tmp_path, {"verify_client": True}) as port:
        await trio.to_thread.run_sync(store, port)
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port),
                                client_context(_as(pki, pki.alice)),
                                server_hostname="127.0.0.1")  # fmt: skip
        frames = _Frames(stream)
        with trio.fail_after(4 * TIMEOUT):
            await stream.send_all(_CONNECT_FRAME)
            await frames.next()
            await stream.send_all(b"".join(_get_data(xid, b"/big") for xid in range(1, 65)))
            replies = []
            for _ in range(64):
                body = await frames.next()
                xid, _zxid, err, length = struct.unpack(">iqii", body[:20])
                replies.append((xid, err, body[20 : 20 + length] == big))
        await trio.aclose_forcefully(stream)
        assert replies == [(xid, 0, True) for xid in range(1, 65)]


def _client_hello() -> bytes:
    """The first flight of a TLS client: what a server answers with its hello."""
    context = ssl.create_default_context()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                              server_hostname="localhost")  # fmt: skip
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def test_max_client_cnxns_refuses_at_accept_on_the_tls_port_before_any_handshake(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection over the per-address limit is closed as it is accepted: its
    ClientHello gets no ServerHello (no handshake work), and once a slot is free
    a client connects again."""
    caplog.set_level(logging.WARNING, logger="dispatcher.zk.server.listener")
    good = client_context(_as(pki, pki.alice))
    async with secure_face(pki, tmp_path, {"verify_client": True}, max_client_cnxns=2) as port:
        holders = []
        for _ in range(2):
            holder = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), good,
                                    server_hostname="127.0.0.1")  # fmt: skip
            await holder.do_handshake()  # served, so counted
            holders.append(holder)
        with trio.fail_after(TIMEOUT):
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            await extra.send_all(_client_hello())
            try:
                answer = await extra.receive_some(65536)
            except trio.BrokenResourceError:  # reset: as refused as a close
                answer = b""
            await extra.aclose()
        assert answer == b""
        assert any(r.getMessage() == "too many connections from one address"
                   for r in caplog.records)  # fmt: skip
        await trio.aclose_forcefully(holders.pop())

        async def served_again() -> bool:
            return await trio.to_thread.run_sync(_served, port, pki.alice, pki)

        await until(served_again, "a connection after a slot was freed", timeout=TIMEOUT)
        for holder in holders:
            await trio.aclose_forcefully(holder)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"zookeeper": {"verify_client": "maybe"}},
         r'zookeeper\.tls\.verify_client: must be true, false or "want", not \'maybe\''),
        ({"subscriptions": {"verify_client": "want"}},
         r'subscriptions\.tls\.verify_client: "want" is for \[zookeeper\.tls\] only'),
        ({"zookeeper": {"x509_superuser": ADMIN_DN, "verify_client": False}},
         r"zookeeper\.tls\.x509_superuser: needs verify_client = true or \"want\""),
        ({"zookeeper": {"x509_superuser": "CN=admin, O=Example", "verify_client": True}},
         r"zookeeper\.tls\.x509_superuser: write the subject as RFC 2253 does"),
        ({"subscriptions": {"x509_superuser": ADMIN_DN}},
         r"subscriptions\.tls.*x509_superuser"),
    ],
)  # fmt: skip
def test_bad_client_verification_settings_are_refused_naming_the_key(
    pki: Pki, tmp_path: Path, table: dict[str, dict[str, object]], message: str
) -> None:
    base = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.cert)}
    ((listener, tls),) = table.items()
    options: dict[str, object] = {"zookeeper": {"data_dir": str(tmp_path / "data")}}
    if listener == "zookeeper":
        options["zookeeper"] = {"data_dir": str(tmp_path / "data"),
                                "secure_listen": "127.0.0.1:0", "tls": {**base, **tls}}  # fmt: skip
    else:
        options[listener] = {"listen": "127.0.0.1:0", "token": TOKEN, "tls": {**base, **tls}}
    with pytest.raises(ConfigError, match=message):
        parse_config(options)
