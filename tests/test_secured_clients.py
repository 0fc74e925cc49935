"""The ZooKeeper clients zkgate opens besides its stores reach secured servers (TLS and SASL).

Two real servers per module: zkgate's own face with a ``secure_listen`` that verifies client
certificates and SASL users from a JAAS file, and a real ZooKeeper 3.8 with only a
``secureClientPort`` worth using (it needs a client certificate) that also requires
DIGEST-MD5 of every session. What users rely on:

* ``zkgate proxy --register`` with the ``--register-tls-*`` and ``--register-sasl-*`` flags
  registers the sidecar over TLS, as the SASL user, under a root only that user may write;
  a CA that does not sign the face's certificate, or a wrong password, is named in the log
  (the password never is) and the sidecar keeps trying instead of stopping;
* the inspection's direct reads of a ``[[mirror]]`` and of a ``[[upstream]] kind =
  "zookeeper"`` on that ensemble use their TLS and SASL, so both layers are compared and
  found consistent instead of skipped or failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from dispatcher.config import parse_config
from dispatcher.store_clients import zookeeper_session
from dispatcher.zk.client import ZooKeeperClient
from dispatcher.zk.codec.protocol import CreateMode, Perm
from dispatcher.zk.codec.records import ACL, Id
from dispatcher.zk.sasl_client import SaslCredentials
from proxy.cli import add_arguments, config_from_args
from proxy.registration import SidecarRegistration
from tests.certs import Pki, make_pki, pkcs12, truststore
from tests.servers import (
    ZkgateServer,
    ZooKeeperServer,
    free_port,
    sasl_zookeeper,
    secure_zookeeper_config,
)
from tests.test_inspection import gateway
from tests.waiting import until

TIMEOUT = 30.0
"""Seconds any single wait on a real server may take before the test fails."""
KEYSTORE_PASSWORD = "keystore-secret"
USERS = {"alice": "alice-sidecar-secret", "bob": "bob-mirror-secret"}
OPEN = (ACL(Perm.ALL, Id("world", "anyone")),)


def _jaas(path: Path) -> Path:
    path.write_text(
        "Server {\n    org.apache.zookeeper.server.auth.DigestLoginModule required\n"
        + "".join(f'    user_{name}="{password}"\n' for name, password in USERS.items())
        + ";\n};\n"
    )
    return path


@attrs.frozen
class SecureFace:
    """zkgate's ZooKeeper face: a plain port (for the test's own checks) and a TLS one."""

    server: ZkgateServer
    secure_port: int


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def face(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureFace]:
    base = tmp_path_factory.mktemp("secure-face")
    secure_port = free_port()
    config = base / "zkgate.toml"
    config.write_text(
        f'[zookeeper]\nsecure_listen = "127.0.0.1:{secure_port}"\n'
        f'sasl_jaas_file = "{_jaas(base / "jaas.conf")}"\n\n[zookeeper.tls]\n'
        f'cert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nca = "{pki.ca.cert}"\n'
        "verify_client = true\n"
    )
    server = ZkgateServer(["--config", str(config)], base_dir=base / "zkgate")
    server.start()
    yield SecureFace(server, secure_port)
    server.close()


@pytest.fixture(scope="module")
def ensemble(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[ZooKeeperServer, int]]:
    """A ZooKeeper whose secure port needs a client certificate and which requires SASL of
    every session; and that port."""
    base = tmp_path_factory.mktemp("secure-zookeeper")
    secure_port = free_port()
    keystore = pkcs12(pki.server, pki.ca, base / "keystore.p12", KEYSTORE_PASSWORD)
    trust = truststore(pki.ca, base / "truststore.p12", KEYSTORE_PASSWORD)
    sasl = sasl_zookeeper(_jaas(base / "jaas.conf"), required=True)
    server = ZooKeeperServer(
        config={
            **secure_zookeeper_config(secure_port, keystore, trust, KEYSTORE_PASSWORD),
            **sasl["config"],
        },
        system_properties=sasl["system_properties"],
        base_dir=base / "server",
    )
    server.start()
    yield server, secure_port
    server.close()


# ----------------------------------------------------------------------- helpers


@asynccontextmanager
async def session(client: ZooKeeperClient) -> AsyncIterator[ZooKeeperClient]:
    """``client`` running and connected; its session closed on the way out."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(TIMEOUT):
            await client.wait_connected()
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()


def proxy_args(face: SecureFace, root: str, *extra: str) -> argparse.Namespace:
    """``zkgate proxy`` flags of a sidecar that registers in ``face``'s TLS port."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([
        "--meta", "127.0.0.1:1", "--token", "control-token",
        "--service", "shop.Cart=127.0.0.1:15001",
        "--register", f"127.0.0.1:{face.secure_port}", "--sidecars", root, *extra,
    ])  # fmt: skip


def tls_flags(pki: Pki, ca: Path | None = None) -> list[str]:
    return [
        "--register-tls-ca", str(ca or pki.ca.cert),
        "--register-tls-cert", str(pki.client.cert), "--register-tls-key", str(pki.client.key),
    ]  # fmt: skip


def password_file(tmp_path: Path, password: str) -> Path:
    path = tmp_path / "sidecar.pass"
    path.write_text(password + "\n")
    return path


def logged(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage().startswith(message)]


def secrets_in_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every password of the module that appears in a log record, message or fields."""
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    return [password for password in USERS.values() if password in text]


# ------------------------------------------------------------ the sidecar's registration


async def test_the_sidecar_registers_over_tls_as_its_sasl_user_where_only_it_may_write(
    face: SecureFace, pki: Pki, tmp_path: Path, unique_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    alice = SaslCredentials("alice", USERS["alice"])
    plain = zookeeper_session([("127.0.0.1", face.server.port)], 10.0, sasl=alice)
    async with session(plain) as checker:
        # The sidecars' root: only alice may create under it.
        await checker.create(unique_path, acl=[ACL(Perm.ALL, Id("sasl", "alice"))])
        config = config_from_args(proxy_args(
            face, unique_path, *tls_flags(pki), "--register-host", "10.1.2.3",
            "--register-sasl-username", "alice",
            "--register-sasl-password-file", str(password_file(tmp_path, USERS["alice"])),
        ))  # fmt: skip
        assert config.register is not None and config.register.sasl is not None
        assert USERS["alice"] not in repr(config)
        registration = SidecarRegistration(config.register, {"shop.Cart": "10.1.2.3:15001"})
        # The same sidecar without SASL: TLS alone does not pass the root's ACL.
        anonymous = SidecarRegistration(
            attrs.evolve(config.register, host="10.9.9.9", sasl=None),
            {"shop.Cart": "10.9.9.9:15001"},
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(registration.run)
            await nursery.start(anonymous.run)
            with trio.fail_after(TIMEOUT):
                await registration.wait_registered()
            path = f"{unique_path}/10.1.2.3/shop.Cart"
            data, stat = await checker.get_data(path)
            assert data == b"10.1.2.3:15001" and stat.ephemeral_owner != 0
            await until(lambda: any(
                "NOAUTH" in str(r.__dict__.get("error"))
                for r in logged(caplog, "cannot register the sidecar yet")
            ), "the registration without SASL refused", timeout=TIMEOUT)  # fmt: skip
            assert anonymous.registered == set()
            assert await checker.exists(f"{unique_path}/10.9.9.9/shop.Cart") is None
            nursery.cancel_scope.cancel()

        # Stopping closes the session, and its registration goes with it.
        async def gone() -> bool:
            return await checker.exists(path) is None

        await until(gone, "the registration gone with its session", timeout=TIMEOUT)
    assert secrets_in_log(caplog) == []


async def test_a_wrong_ca_or_password_is_named_in_the_log_and_the_sidecar_keeps_trying(
    face: SecureFace, pki: Pki, tmp_path: Path, unique_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    wrong_ca = config_from_args(proxy_args(
        face, unique_path, *tls_flags(pki, ca=pki.other.cert),
        "--register-host", "10.1.2.3",
    )).register  # fmt: skip
    wrong_password = config_from_args(proxy_args(
        face, unique_path, *tls_flags(pki), "--register-host", "10.1.2.4",
        "--register-sasl-username", "alice",
        "--register-sasl-password-file", str(password_file(tmp_path, USERS["bob"])),
    )).register  # fmt: skip
    assert wrong_ca is not None and wrong_password is not None
    untrusting = SidecarRegistration(wrong_ca, {"shop.Cart": "10.1.2.3:15001"})
    refused = SidecarRegistration(wrong_password, {"shop.Cart": "10.1.2.4:15001"})
    async with trio.open_nursery() as nursery:
        await nursery.start(untrusting.run)
        await nursery.start(refused.run)
        # The handshake twice: the first refusal did not end the registration.
        await until(lambda: len(logged(caplog, "TLS handshake with ZooKeeper failed")) >= 2,
                    "the untrusted certificate logged twice", timeout=TIMEOUT)  # fmt: skip
        await until(lambda: logged(caplog, "the ZooKeeper face refused the sidecar's SASL"),
                    "the refused password logged", timeout=TIMEOUT)  # fmt: skip
        handshake = logged(caplog, "TLS handshake with ZooKeeper failed")[0]
        # OpenSSL's words for "not signed by the CA given", with or without the chain sent.
        assert handshake.__dict__["reason"] in {
            "unable to get local issuer certificate",
            "self-signed certificate in certificate chain",
        }
        refusal = logged(caplog, "the ZooKeeper face refused the sidecar's SASL")[0]
        assert refusal.levelno == logging.ERROR and refusal.__dict__["user"] == "alice"
        assert untrusting.registered == set() and refused.registered == set()
        nursery.cancel_scope.cancel()
    assert secrets_in_log(caplog) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--register-sasl-username", "alice"], "--register-sasl-password-file is missing"),
        (["--register-sasl-password-file", "PASSWORD_FILE"], "--register-sasl-username is"),
        (["--register-sasl-username", "alice", "--register-sasl-password-file", "MISSING"],
         "--register-sasl-password-file: cannot read the SASL password file"),
        (["--register-tls-cert", "CERT"], "--register-tls-cert and --register-tls-key go"),
        (["--register-tls-ca", "MISSING"], "--register-tls-*: cannot load the certificate"),
    ],
)  # fmt: skip
def test_bad_registration_security_flags_are_usage_errors_that_name_the_flag(
    tmp_path: Path, pki: Pki, flags: list[str], message: str
) -> None:
    secret = password_file(tmp_path, USERS["alice"])
    names = {"PASSWORD_FILE": str(secret), "MISSING": str(tmp_path / "missing"),
             "CERT": str(pki.client.cert)}  # fmt: skip
    args = argparse.ArgumentParser()
    add_arguments(args)
    argv = ["--meta", "127.0.0.1:1", "--token", "t", "--service", "a=127.0.0.1:1",
            "--register", "127.0.0.1:2281", *[names.get(flag, flag) for flag in flags]]  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        config_from_args(args.parse_args(argv))
    assert USERS["alice"] not in str(raised.value)


def test_registration_security_flags_without_register_are_refused() -> None:
    args = argparse.ArgumentParser()
    add_arguments(args)
    argv = ["--meta", "127.0.0.1:1", "--token", "t", "--service", "a=127.0.0.1:1",
            "--register-sasl-username", "alice"]  # fmt: skip
    with pytest.raises(ValueError, match="--register-sasl-username needs --register"):
        config_from_args(args.parse_args(argv))


# ----------------------------------------------------------------------- inspection


async def test_the_mirror_and_zookeeper_upstream_inspections_read_a_secured_ensemble(
    ensemble: tuple[ZooKeeperServer, int], pki: Pki, tmp_path: Path, unique_path: str
) -> None:
    _, secure_port = ensemble
    bob = password_file(tmp_path, USERS["bob"])
    secured: dict[str, Any] = {
        "hosts": f"127.0.0.1:{secure_port}", "tls": pki.tls_table(),
        "sasl_username": "bob", "sasl_password_file": str(bob),
    }  # fmt: skip
    legacy, services = f"{unique_path}/legacy", f"{unique_path}/services"
    direct = zookeeper_session(
        [("127.0.0.1", secure_port)], 10.0, tls=pki.client_tls(),
        sasl=SaslCredentials("bob", USERS["bob"]),
    )  # fmt: skip
    async with session(direct):
        for path in (unique_path, legacy, services, f"{services}/shop.Cart"):
            await direct.create(path, acl=OPEN)
        await direct.create(f"{legacy}/db", b"primary", acl=OPEN)
        await direct.create(
            f"{services}/shop.Cart/i1", json.dumps({"host": "10.0.0.1", "port": 8080}).encode(),
            acl=OPEN, flags=CreateMode.PERSISTENT,
        )  # fmt: skip
        cfg = parse_config({
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
            "mirror": [{"root": legacy, **secured}],
            "upstream": [{"name": "legacy-zk", "kind": "zookeeper", **secured,
                          "roots": [{"path": services, "layout": "plain"}]}],
        })  # fmt: skip
        async with gateway(cfg) as gw:
            assert gw.inspector is not None and gw.port is not None
            through = ZooKeeperClient([("127.0.0.1", gw.port)])
            async with session(through):
                # Fills the mirror's cache: the inspection compares what is cached.
                assert (await through.get_data(f"{legacy}/db"))[0] == b"primary"
                assert await through.get_children(legacy) == ["db"]
                with trio.fail_after(TIMEOUT):
                    reports = {r.layer: r for r in await gw.inspector.inspect()}
    mirror, upstream = reports["mirror"], reports["upstream"]
    assert (mirror.error, mirror.skipped, mirror.divergences) == (None, (), ())
    assert mirror.services == 2  # the root's children and its znode's data
    assert (upstream.error, upstream.skipped, upstream.divergences) == (None, (), ())
    assert upstream.services == 1
