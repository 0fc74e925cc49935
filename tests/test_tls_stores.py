"""zkgate's clients of secured stores: etcd with client certificates, ZooKeeper over TLS and SASL.

A real etcd 3.4 serves TLS and requires a client certificate signed by the test's CA
(``--client-cert-auth``); a real ZooKeeper 3.8 serves a ``secureClientPort`` that needs one
too, and another requires DIGEST-MD5 of every session. What users rely on: the etcd adapter
lists and follows with a good certificate, and with one from another CA it reports the
outage with a log line naming the refusal and keeps trying; membership and the policy store
work on each secured store from nothing but the ``[membership]`` table; the table's keys
are checked, its paths read beside the file, and the SASL password never written back.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.etcd import EtcdUpstream
from dispatcher.config import ConfigError, parse_config
from dispatcher.core.upstream import Changed, Listing, Status, UpstreamEvent
from dispatcher.gateway import Gateway, run_gateway
from dispatcher.governance.backends import open_governance_store
from dispatcher.governance.policy import PolicySet
from dispatcher.sharding.membership import (
    MembershipConfig,
    MembershipConfigError,
    Registration,
    View,
    open_membership,
)
from dispatcher.store_clients import etcd_client
from dispatcher.tls import ClientTls
from tests.certs import Pki, make_pki, pkcs12, truststore
from tests.servers import (
    EtcdServer,
    EtcdTls,
    ZooKeeperServer,
    free_port,
    sasl_zookeeper,
    secure_zookeeper_config,
)
from tests.waiting import until

TIMEOUT = 30.0
"""Seconds any single wait on a real server may take before the test fails."""
PASSWORD = "keystore-secret"
SASL_PASSWORD = "bob-secret"
TOKEN = "policy-write-token"
CART = {"services": {"shop.Cart": {"request_timeout": 2, "retries": {"count": 2}}}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EtcdServer]:
    """An etcd that speaks only TLS and requires a client certificate from the test's CA."""
    server = EtcdServer(
        tls=EtcdTls(pki.server.cert, pki.server.key, pki.ca.cert),
        base_dir=tmp_path_factory.mktemp("tls-etcd"),
    )
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def secure_zookeeper(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[ZooKeeperServer, int]]:
    """A ZooKeeper with a ``secureClientPort`` that needs a client certificate, and that port."""
    base = tmp_path_factory.mktemp("secure-zookeeper")
    secure_port = free_port()
    keystore = pkcs12(pki.server, pki.ca, base / "keystore.p12", PASSWORD)
    trust = truststore(pki.ca, base / "truststore.p12", PASSWORD)
    server = ZooKeeperServer(
        config=secure_zookeeper_config(secure_port, keystore, trust, PASSWORD),
        base_dir=base / "server",
    )
    server.start()
    yield server, secure_port
    server.close()


@pytest.fixture(scope="module")
def sasl_zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """A ZooKeeper that ends every session that does not authenticate with DIGEST-MD5 first."""
    base = tmp_path_factory.mktemp("sasl-zookeeper")
    jaas = base / "jaas.conf"
    jaas.write_text(
        "Server {\n    org.apache.zookeeper.server.auth.DigestLoginModule required\n"
        f'    user_bob="{SASL_PASSWORD}";\n}};\n'
    )
    server = ZooKeeperServer(base_dir=base / "server", **sasl_zookeeper(jaas, required=True))
    server.start()
    yield server
    server.close()


# ----------------------------------------------------------------------- helpers


async def first_view(config: MembershipConfig, wanted: Any) -> View:
    """The first connected view, read on a backend of our own, for which ``wanted`` holds."""
    reader = open_membership(config, watch_warm=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        with trio.fail_after(TIMEOUT):
            async for view in reader.feed:
                if view.connected and wanted(view):
                    nursery.cancel_scope.cancel()
                    return view
    raise AssertionError("the membership feed ended")


async def membership_and_policies(config: MembershipConfig) -> None:
    """A member registers and catalogs a service, another party sees both; a policy written
    through one store session is read back through another."""
    member = open_membership(config)
    member.register(Registration("d1", "127.0.0.1:7411", "127.0.0.1:2181"))
    member.add_services(["shop.Cart"])
    async with trio.open_nursery() as nursery:
        await nursery.start(member.run)
        view = await first_view(
            config, lambda v: [m.id for m in v.members] == ["d1"] and "shop.Cart" in v.catalog
        )
        assert view.epoch > 0
        nursery.cancel_scope.cancel()
    body = PolicySet.from_mapping(CART).to_json()
    async with open_governance_store(config, "policies") as writer:
        with trio.fail_after(TIMEOUT):
            written = await writer.write(body, expected_version=0, who="tester", why="tls")
    async with open_governance_store(config, "policies") as reader:
        with trio.fail_after(TIMEOUT):
            assert await reader.current() == written
    assert (written.version, written.body) == (1, body)


@asynccontextmanager
async def following(upstream: EtcdUpstream) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    send, receive = trio.open_memory_channel[UpstreamEvent](100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream.run, send)
        yield receive
        nursery.cancel_scope.cancel()


async def next_event(events: trio.MemoryReceiveChannel[Any], kind: type) -> Any:
    with trio.fail_after(TIMEOUT):
        while not isinstance(event := await events.receive(), kind):
            pass
    return event


def plain_value(port: int) -> str:
    return json.dumps({"host": "10.0.0.1", "port": port})


def upstream_for(server: EtcdServer, prefix: str, tls: dict[str, str]) -> EtcdUpstream:
    return EtcdUpstream.from_config(
        "secured",
        {
            "endpoint": server.endpoint,
            "prefixes": [{"prefix": prefix, "layout": "plain"}],
            "max_backoff": 0.2,
            "tls": tls,
        },
    )


# ------------------------------------------------------------------- etcd adapter


async def test_the_etcd_adapter_lists_and_follows_with_a_good_client_certificate(
    tls_etcd: EtcdServer, pki: Pki, unique_path: str
) -> None:
    prefix = f"{unique_path}/services/"
    client = etcd_client(tls_etcd.host, tls_etcd.port, timeout=10, tls=pki.client_tls())
    try:
        await trio.to_thread.run_sync(client.put, f"{prefix}shop.Cart/a", plain_value(1))
        async with following(upstream_for(tls_etcd, prefix, pki.tls_table())) as events:
            listing = await next_event(events, Listing)
            assert [(i.service, i.instance_id) for i in listing.instances] == [("shop.Cart", "a")]
            status = await next_event(events, Status)
            assert status.connected
            await trio.to_thread.run_sync(client.put, f"{prefix}shop.Cart/b", plain_value(2))
            changed = await next_event(events, Changed)
            assert [c.instance.instance_id for c in changed.changes] == ["b"]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("side", "reason"),
    [
        ("client", "etcd refused the client certificate"),
        ("server", "etcd's certificate is not trusted: check tls.ca"),
    ],
)
async def test_a_certificate_from_another_ca_is_refused_and_the_adapter_keeps_trying(
    tls_etcd: EtcdServer,
    pki: Pki,
    unique_path: str,
    caplog: pytest.LogCaptureFixture,
    side: str,
    reason: str,
) -> None:
    """Our client certificate signed by a CA etcd does not trust, or etcd's certificate
    checked against a CA that did not sign it: the log line says which."""
    tls = (
        pki.tls_table(pki.stranger)
        if side == "client"
        else {**pki.tls_table(), "ca": str(pki.other.cert)}
    )
    caplog.set_level(logging.WARNING, logger="adapters.etcd")

    def refusals() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "adapters.etcd" and r.getMessage() == "etcd upstream failed; reconnecting"
        ]

    upstream = upstream_for(tls_etcd, f"{unique_path}/", tls)
    async with following(upstream) as events:
        status = await next_event(events, Status)
        assert not status.connected
        assert tls_etcd.endpoint in status.detail
        # Retried, not given up on: a second attempt is refused the same way.
        await until(lambda: len(refusals()) >= 2, "a second refused attempt", TIMEOUT)
    record = refusals()[0]
    assert vars(record)["address"] == tls_etcd.endpoint
    assert vars(record)["error"].startswith("UNAVAILABLE: ")
    assert reason in vars(record)["error"]
    assert tls_etcd.running


# --------------------------------------------------- membership and governance


async def test_membership_and_governance_on_an_etcd_that_requires_client_certificates(
    tls_etcd: EtcdServer, pki: Pki, unique_path: str
) -> None:
    config = MembershipConfig.from_table(
        {"kind": "etcd", "address": tls_etcd.endpoint, "root": unique_path, "tls": pki.tls_table()}
    )
    await membership_and_policies(config)


async def test_a_gateway_shards_and_keeps_policies_on_an_etcd_with_client_certificates(
    tls_etcd: EtcdServer, pki: Pki, unique_path: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "policy-token"
    token_file.write_text(TOKEN + "\n")
    membership = {
        "kind": "etcd", "address": tls_etcd.endpoint, "root": unique_path,
        "session_timeout": 2.0, "tls": pki.tls_table(),
    }  # fmt: skip
    config = parse_config({
        "node_id": "d1",
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
        "admin": {"listen": "127.0.0.1:0"},
        "subscriptions": {"listen": "127.0.0.1:0", "token": "subscribe"},
        "membership": membership,
        "sharding": {"id": "d1"},
        "governance": {"token_file": str(token_file)},
    })  # fmt: skip
    assert config.membership is not None and config.membership.tls == pki.client_tls()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            gateway: Gateway = await nursery.start(partial(run_gateway, config))
        assert gateway.admin is not None and gateway.admin.port is not None
        port = gateway.admin.port
        view = await first_view(config.membership, lambda v: [m.id for m in v.members] == ["d1"])
        assert view.connected
        written = await trio.to_thread.run_sync(
            partial(http, port, "PUT", "/policies",
                    {"document": CART, "expected_version": 0, "who": "tester", "why": "tls"})
        )  # fmt: skip
        assert written["version"] == 1, written
        current = await trio.to_thread.run_sync(partial(http, port, "GET", "/policies"))
        assert (current["version"], current["document"]) == (1, CART)
        nursery.cancel_scope.cancel()


def http(port: int, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


async def test_membership_and_governance_on_a_zookeeper_secure_port(
    secure_zookeeper: tuple[ZooKeeperServer, int], pki: Pki, unique_path: str
) -> None:
    _, secure_port = secure_zookeeper
    config = MembershipConfig.from_table(
        {
            "kind": "zookeeper",
            "address": f"127.0.0.1:{secure_port}",
            "root": unique_path,
            "tls": pki.tls_table(),
        }
    )
    await membership_and_policies(config)


async def test_membership_and_governance_on_a_zookeeper_that_requires_sasl(
    sasl_zookeeper_server: ZooKeeperServer, unique_path: str, tmp_path: Path
) -> None:
    (tmp_path / "zk.pass").write_text(SASL_PASSWORD + "\n")
    config = MembershipConfig.from_table(
        {"kind": "zookeeper", "address": sasl_zookeeper_server.address, "root": unique_path,
         "sasl_username": "bob", "sasl_password_file": "zk.pass"},
        base_dir=tmp_path,
    )  # fmt: skip
    await membership_and_policies(config)


# --------------------------------------------------------------- the [membership] table


def test_the_membership_table_reads_tls_and_sasl_beside_the_file(tmp_path: Path, pki: Pki) -> None:
    """Relative paths are the configuration file's; writing the table back gives the same
    table, with the password file's name and never the password."""
    (tmp_path / "zk.pass").write_text(SASL_PASSWORD)
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        source = {"ca.pem": pki.ca.cert, "client.pem": pki.client.cert}.get(name, pki.client.key)
        (tmp_path / name).write_bytes(source.read_bytes())
    table = {
        "kind": "zookeeper", "address": "127.0.0.1:2281",
        "tls": {"ca": "ca.pem", "cert": "client.pem", "key": "client-key.pem"},
        "sasl_username": "bob", "sasl_password_file": "zk.pass",
    }  # fmt: skip
    config = parse_config({"membership": table}, base_dir=tmp_path)
    assert config.membership is not None
    assert config.membership.tls == ClientTls(
        tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client-key.pem"
    )
    assert config.membership.sasl is not None
    assert config.membership.sasl.password == SASL_PASSWORD
    written = config.to_mapping()["membership"]
    assert SASL_PASSWORD not in json.dumps(written)
    assert written["sasl_password_file"] == str(tmp_path / "zk.pass")
    assert parse_config(config.to_mapping()).membership == config.membership


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "etcd", "address": "h:2379", "sasl_username": "bob",
          "sasl_password_file": "zk.pass"}, "membership.sasl_username: SASL is for kind"),
        ({"kind": "zookeeper", "address": "h:2181", "sasl_username": "bob"},
         "membership.sasl_username: needs sasl_password_file too"),
        ({"kind": "zookeeper", "address": "h:2181", "sasl_username": "bob",
          "sasl_password_file": "missing.pass"}, "membership.sasl_password_file: cannot read"),
        ({"kind": "memory", "tls": True}, "membership.tls: kind 'memory' has no connection"),
        ({"kind": "etcd", "address": "h:2379", "tls": {"cert": "client.pem"}},
         "membership.tls: cert and key go together"),
        ({"kind": "etcd", "address": "h:2379", "tls": {"ca": "missing.pem"}},
         "membership.tls: cannot load the certificate files"),
        ({"kind": "etcd", "address": "h:2379", "tls": {"verify": True}},
         "membership.tls.verify: unknown key"),
    ],
)  # fmt: skip
def test_a_bad_security_key_in_the_membership_table_is_named(
    table: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(MembershipConfigError) as raised:
        MembershipConfig.from_table(table, base_dir=tmp_path)
    assert message in str(raised.value)
    with pytest.raises(ConfigError):
        parse_config({"membership": table}, base_dir=tmp_path)
