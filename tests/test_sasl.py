"""SASL (DIGEST-MD5) on the ZooKeeper face and on zkgate's own client.

The mechanisms and the JAAS reader are checked alone first; then real
ZooKeeper 3.8 and zkgate, given the same JAAS file, must answer alike:
the ``sasl`` opcode, ``sasl:`` identities in ACLs (kazoo's ``sasl_options``,
the Java client through zkCli.sh, and request by request on the wire), and
ZooKeeper's ``sessionRequireClientSASLAuth``. Last, the mirror reaches an
ensemble that requires SASL.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import make_acl

from adapters.zookeeper import parse_config as parse_upstream
from dispatcher.config import ConfigError, load_config, parse_config
from dispatcher.zk.client import AuthFailed, KeeperError, SessionEvent, ZooKeeperClient
from dispatcher.zk.codec.protocol import Err, OpCode, Perm
from dispatcher.zk.codec.records import (
    ACL,
    CreateRequest,
    DeleteRequest,
    GetSASLRequest,
    Id,
    PathRequest,
    PathWatchRequest,
    SetACLRequest,
    SetSASLResponse,
)
from dispatcher.zk.digest_md5 import SaslError
from dispatcher.zk.sasl_client import DigestMd5Client, SaslCredentials, load_credentials
from dispatcher.zk.server.jaas import JaasError, parse_users
from dispatcher.zk.server.sasl import DigestMd5Server
from tests.differential import Pair, Side
from tests.servers import (
    ServerError,
    ZkgateServer,
    ZooKeeperServer,
    free_port,
    sasl_zookeeper,
)
from tests.zkwire import WireClient

USERS = {"alice": "alice-secret", "bob": "bob-secret", "super": "super-secret"}
JAAS = (
    "// the same file for ZooKeeper and zkgate\n"
    "Server {\n"
    "    org.apache.zookeeper.server.auth.DigestLoginModule required\n"
    + "".join(f'    user_{name}="{password}"\n' for name, password in USERS.items())
    + ";\n};\n"
)
ZKCLI = Path("/usr/share/zookeeper/bin/zkCli.sh")
DIGEST = "org.apache.zookeeper.server.auth.DigestLoginModule"


def _exchange(server: DigestMd5Server, client: DigestMd5Client) -> None:
    token: bytes | None = client.initial()
    while token is not None:
        token = client.evaluate(server.evaluate(token))


# ------------------------------------------------------------ the JAAS file


def test_the_server_section_lists_the_users_and_hides_their_passwords() -> None:
    text = (
        "/* a JAAS file as ZooKeeper's docs show it, with a Client section too */\n"
        "Client { org.apache.zookeeper.server.auth.DigestLoginModule required\n"
        '  username="alice" password="alice-secret"; };\n'
        "Server {\n  org.apache.zookeeper.server.auth.DigestLoginModule required\n"
        '  user_alice="with \\"quotes\\"" // a comment\n  user_bob=bare;\n};\n'
    )
    users = parse_users(text)
    assert users.names == ("alice", "bob")
    assert users.password("alice") == 'with "quotes"'
    assert users.password("bob") == "bare"
    assert users.password("carol") is None
    assert "quotes" not in repr(users) and "bare" not in repr(users)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Client { x required; };", "no Server section"),
        ('Server { com.example.Krb5LoginModule required user_a="b"; };',
         "Krb5LoginModule is not supported"),
        (f'Server {{ {DIGEST} required username="a"; }};', "option username is not supported"),
        (f'Server {{ {DIGEST} always user_a="b"; }};', "control flag 'always'"),
        (f'Server {{\n {DIGEST} required user_a="b;\n}};', ":2: unexpected"),
        (f'Server {{ {DIGEST} required user_a@R="b"; }};', "without '@'"),
        (f'Server {{ {DIGEST} required user_a="b"', "ended where"),
        (f'Server {{ {DIGEST} required user_a="b"; {DIGEST} required user_c="d"; }};',
         "exactly one"),
    ],
)  # fmt: skip
def test_anything_but_digest_users_is_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(JaasError, match=re.escape(message)) as raised:
        parse_users(text, "jaas.conf")
    assert str(raised.value).startswith("jaas.conf")
    assert '"b"' not in str(raised.value)


# ------------------------------------------------------------ the mechanism


def test_a_right_password_authenticates_both_ways() -> None:
    server = DigestMd5Server(parse_users(JAAS))
    client = DigestMd5Client(SaslCredentials("alice", "alice-secret"))
    _exchange(server, client)
    assert server.complete and server.authorization_id == "alice"
    assert client.complete


def test_a_wrong_password_or_unknown_user_is_refused_without_the_password_in_the_reason() -> None:
    for user, password in (("alice", "guess"), ("mallory", "alice-secret")):
        server = DigestMd5Server(parse_users(JAAS))
        with pytest.raises(SaslError) as raised:
            _exchange(server, DigestMd5Client(SaslCredentials(user, password)))
        assert server.authorization_id is None
        assert password not in str(raised.value)
        with pytest.raises(SaslError):  # the exchange is over: nothing more is taken
            server.evaluate(b"")


def test_a_server_that_does_not_know_the_password_is_found_out() -> None:
    impostor = DigestMd5Server(parse_users(JAAS.replace("alice-secret", "other")))
    client = DigestMd5Client(SaslCredentials("alice", "alice-secret"))
    response = client.evaluate(impostor.evaluate(client.initial()))
    assert response is not None
    with pytest.raises(SaslError, match="rspauth"):
        client.evaluate(b"rspauth=" + b"0" * 32)
    assert not client.complete


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda r: r.replace(b"nc=00000001", b"nc=00000002"), "nonce count"),
        (lambda r: r.replace(b"zookeeper/zk-sasl-md5", b"zookeeper/elsewhere"), "digest-uri"),
        (lambda r: r.replace(b"qop=auth", b"qop=auth-conf"), "qop"),
        (lambda r: r + b',nonce="again"', "given twice"),
    ],
)
def test_a_response_java_would_refuse_is_refused(
    tamper: Callable[[bytes], bytes], reason: str
) -> None:
    server = DigestMd5Server(parse_users(JAAS))
    client = DigestMd5Client(SaslCredentials("alice", "alice-secret"))
    response = client.evaluate(server.evaluate(client.initial()))
    assert response is not None
    with pytest.raises(SaslError, match=reason):
        server.evaluate(tamper(response))


# ------------------------------------------------------------ configuration


def test_the_zookeeper_table_reads_the_jaas_file_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "jaas.conf").write_text(JAAS)
    path = tmp_path / "zkgate.toml"
    path.write_text('[zookeeper]\nsasl_jaas_file = "jaas.conf"\nsasl_required = true\n')
    config = load_config(path)
    assert config.zookeeper.sasl_users is not None
    assert config.zookeeper.sasl_users.names == ("alice", "bob", "super")
    assert config.zookeeper.sasl_required
    mapping = config.to_mapping()
    assert mapping["zookeeper"]["sasl_jaas_file"] == str(tmp_path / "jaas.conf")
    assert "alice-secret" not in repr(mapping) and "alice-secret" not in repr(config)
    assert parse_config(mapping) == config


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"sasl_required": True}, "zookeeper.sasl_required: needs sasl_jaas_file"),
        ({"sasl_jaas_file": "/nonexistent/jaas.conf"},
         "zookeeper.sasl_jaas_file: /nonexistent/jaas.conf: cannot read"),
        ({"sasl_required": "yes"}, "zookeeper.sasl_required"),
    ],
)  # fmt: skip
def test_bad_sasl_settings_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"zookeeper": table})


def test_the_mirror_reads_its_password_from_a_file_and_never_writes_it_back(
    tmp_path: Path,
) -> None:
    (tmp_path / "zk.pass").write_text("mirror-secret\n")
    mirror = {"root": "/m", "hosts": "127.0.0.1:2181", "sasl_username": "mirror",
              "sasl_password_file": str(tmp_path / "zk.pass")}  # fmt: skip
    config = parse_config({"mirror": [mirror]})
    sasl = config.mirrors[0].sasl
    assert sasl == load_credentials("mirror", tmp_path / "zk.pass")
    assert sasl is not None and sasl.password == "mirror-secret"
    assert "mirror-secret" not in repr(config.to_mapping()) and "mirror-secret" not in repr(config)
    assert parse_config(config.to_mapping()) == config
    with pytest.raises(ConfigError, match=r"mirror\[0\]\.sasl_username: needs sasl_password_file"):
        parse_config({"mirror": [{"root": "/m", "hosts": "h:1", "sasl_username": "u"}]})
    with pytest.raises(ConfigError, match="cannot read the SASL password file"):
        parse_config({"mirror": [{**mirror, "sasl_password_file": str(tmp_path / "none")}]})


# ------------------------------------------------------------ both servers


@attrs.frozen
class Servers:
    zookeeper: ZooKeeperServer
    zkgate: ZkgateServer
    jaas: Path

    def each(self) -> Iterator[tuple[str, str]]:
        yield "zookeeper", self.zookeeper.address
        yield "zkgate", self.zkgate.address


def _start_servers(base: Path, *, required: bool) -> Servers:
    base.mkdir(parents=True, exist_ok=True)
    jaas = base / "jaas.conf"
    jaas.write_text(JAAS)
    config = base / "zkgate.toml"
    config.write_text(
        f'[zookeeper]\nsasl_jaas_file = "{jaas}"\nsasl_required = {str(required).lower()}\n'
    )
    zookeeper = ZooKeeperServer(
        base_dir=base / "zookeeper", **sasl_zookeeper(jaas, required=required)
    )
    zkgate = ZkgateServer(["--config", str(config)], base_dir=base / "zkgate")
    zookeeper.start()
    try:
        zkgate.start()
    except BaseException:
        zookeeper.close()
        raise
    return Servers(zookeeper, zkgate, jaas)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pair = _start_servers(tmp_path_factory.mktemp("sasl"), required=False)
    yield pair
    pair.zkgate.close()
    pair.zookeeper.close()


@pytest.fixture(scope="module")
def required_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pair = _start_servers(tmp_path_factory.mktemp("sasl-required"), required=True)
    yield pair
    pair.zkgate.close()
    pair.zookeeper.close()


def _kazoo(address: str, user: str | None = None, password: str | None = None) -> KazooClient:
    options = None
    if user is not None:
        options = {"mechanism": "DIGEST-MD5", "username": user,
                   "password": password or USERS[user]}  # fmt: skip
    client = KazooClient(address, sasl_options=options, connection_retry={"max_tries": 0})
    client.start(timeout=15)
    return client


def _kazoo_story(address: str, path: str) -> list[object]:
    """What kazoo users see: alice's node read by alice, bob, super and nobody."""
    seen: list[object] = []
    alice = _kazoo(address, "alice")
    try:
        alice.create(path, b"for alice", acl=[make_acl("sasl", "alice", all=True)])
        seen.append(("alice reads", alice.get(path)[0]))
        acl = alice.get_acls(path)[0]
        seen.append(("acl", [(a.id.scheme, a.id.id, a.perms) for a in acl]))
        for who in ("bob", None, "super"):
            other = _kazoo(address, who)
            try:
                seen.append((f"{who} reads", other.get(path)[0]))
            except NoAuthError:
                seen.append((f"{who} reads", "NoAuth"))
            finally:
                other.stop()
                other.close()
        alice.delete(path)
    finally:
        alice.stop()
        alice.close()
    return seen


def test_kazoo_sees_sasl_acls_as_on_zookeeper(servers: Servers, unique_path: str) -> None:
    reference = _kazoo_story(servers.zookeeper.address, unique_path)
    assert reference[0] == ("alice reads", b"for alice")
    assert ("bob reads", "NoAuth") in reference and ("None reads", "NoAuth") in reference
    assert _kazoo_story(servers.zkgate.address, unique_path) == reference


def _sasl_on_wire(client: WireClient, user: str, password: str) -> list[tuple[str, bool]]:
    """Run DIGEST-MD5 on a raw connection: each reply's error and whether a token came."""
    mechanism = DigestMd5Client(SaslCredentials(user, password))
    answers: list[tuple[str, bool]] = []
    token: bytes | None = mechanism.initial()
    while token is not None:
        reply = client.call(OpCode.SASL, GetSASLRequest(token))
        assert reply.header.zxid == 0
        answers.append((Err(reply.header.err).name, bool(reply.body)))
        if reply.header.err != Err.OK:
            break
        body = reply.decode(OpCode.SASL)
        assert isinstance(body, SetSASLResponse)
        token = mechanism.evaluate(body.token)
    return answers


def test_the_sasl_opcode_and_sasl_acls_answer_as_on_zookeeper(
    servers: Servers, unique_path: str
) -> None:
    sides = []
    for _, address in servers.each():
        host, port = address.rsplit(":", 1)
        side = Side(host, int(port))
        assert _sasl_on_wire(side.clients["A"], "alice", USERS["alice"]) == [
            ("OK", True), ("OK", True),
        ]  # fmt: skip
        sides.append(side)
    pair = Pair(sides[0], sides[1])
    alice_all = (ACL(Perm.ALL, Id("sasl", "alice")),)
    child = unique_path + "/auth"
    steps: list[tuple[str, int, Any]] = [
        ("A", OpCode.WHO_AM_I, None),
        ("B", OpCode.WHO_AM_I, None),
        ("A", OpCode.CREATE, CreateRequest(unique_path, b"d", alice_all, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(unique_path, False)),
        ("B", OpCode.GET_DATA, PathWatchRequest(unique_path, False)),
        ("B", OpCode.GET_ACL, PathRequest(unique_path)),
        # auth: stands for the caller's sasl identity, as for a digest one.
        ("A", OpCode.CREATE, CreateRequest(child, b"", (ACL(Perm.READ, Id("auth", "")),), 0)),
        ("A", OpCode.GET_ACL, PathRequest(unique_path + "/auth")),
        # Kerberos' name syntax decides what a sasl id may be.
        *[("A", OpCode.SET_ACL, SetACLRequest(child, (ACL(Perm.ALL, Id("sasl", ident)),), -1))
          for ident in ("a@b@c", "svc/host@REALM", "with space", "x/y", "@", "carol")],
        ("A", OpCode.GET_ACL, PathRequest(unique_path + "/auth")),
        ("B", OpCode.DELETE, DeleteRequest(unique_path + "/auth", -1)),
    ]  # fmt: skip
    try:
        for who, opcode, record in steps:
            reference, candidate = pair.run(who, opcode, record)
            assert candidate == reference, (who, OpCode(opcode).name, record)
    finally:
        pair.close()


@pytest.mark.parametrize(
    "attempt",
    ["wrong password", "unknown user", "after success"],
)
def test_a_refused_sasl_token_closes_the_connection_as_on_zookeeper(
    servers: Servers, attempt: str
) -> None:
    outcomes = []
    for _, address in servers.each():
        host, port = address.rsplit(":", 1)
        with WireClient(host, int(port)) as client:
            client.connect(30000)
            if attempt == "wrong password":
                answers = _sasl_on_wire(client, "alice", "wrong-password-guess")
            elif attempt == "unknown user":
                answers = _sasl_on_wire(client, "carol", "carol")
            else:
                answers = _sasl_on_wire(client, "alice", USERS["alice"])
                reply = client.call(OpCode.SASL, GetSASLRequest(b""))
                answers.append((Err(reply.header.err).name, bool(reply.body)))
            outcomes.append((answers, client.is_closed_by_server()))
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][0][-1][0] == "AUTHFAILED"
    assert outcomes[0][1], "ZooKeeper closes the connection after a refused token"
    assert "wrong-password-guess" not in servers.zkgate.log_tail(400)


def test_a_first_token_that_is_not_empty_still_gets_the_challenge(servers: Servers) -> None:
    # Java's DIGEST-MD5 server ignores it; the connection goes on.
    outcomes = []
    for _, address in servers.each():
        host, port = address.rsplit(":", 1)
        with WireClient(host, int(port)) as client:
            client.connect(30000)
            reply = client.call(OpCode.SASL, GetSASLRequest(b"username=alice"))
            body = reply.decode(OpCode.SASL)
            assert isinstance(body, SetSASLResponse) and body.token is not None
            ping = client.call(OpCode.PING)
            outcomes.append((Err(reply.header.err).name, b"nonce=" in body.token,
                             Err(ping.header.err).name))  # fmt: skip
    assert outcomes == [("OK", True, "OK")] * 2


def test_a_required_sasl_refuses_everything_before_it_as_zookeeper_does(
    required_servers: Servers, unique_path: str
) -> None:
    outcomes: list[list[object]] = []
    for _, address in required_servers.each():
        host, port = address.rsplit(":", 1)
        seen: list[object] = []
        # A ping before SASL ends the connection.
        with WireClient(host, int(port)) as client:
            client.connect(30000)
            reply = client.call(OpCode.PING)
            seen.append(("ping", Err(reply.header.err).name, reply.header.zxid))
            seen.append(("closed", client.is_closed_by_server()))
        # A failed SASL says why, and ends it too.
        with WireClient(host, int(port)) as client:
            client.connect(30000)
            seen.append(("bad", _sasl_on_wire(client, "alice", "guess")))
            seen.append(("closed", client.is_closed_by_server()))
        # After SASL, everything goes.
        with WireClient(host, int(port)) as client:
            client.connect(30000)
            seen.append(("good", _sasl_on_wire(client, "bob", USERS["bob"])))
            reply = client.call(OpCode.EXISTS, PathWatchRequest(unique_path, False))
            seen.append(("exists", Err(reply.header.err).name))
        outcomes.append(seen)
    assert outcomes[0][0] == ("ping", "SESSIONCLOSEDREQUIRESASLAUTH", 0)
    assert outcomes[1] == outcomes[0]


# ------------------------------------------------------------ the Java client


def _zkcli(address: str, jaas: Path | None, *command: str) -> list[str]:
    """One zkCli.sh command; what it printed, without the JVM's and zkCli's noise."""
    flags = "-Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
    if jaas is not None:
        flags += f" -Djava.security.auth.login.config={jaas}"
    env = {**os.environ, "CLIENT_JVMFLAGS": flags}
    result = subprocess.run(
        [str(ZKCLI), "-server", address, *command],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    noise = re.compile(r"^(SLF4J: .*|Connecting to .*|WATCHER::|WatchedEvent .*|\s*)$")
    return [line for line in (result.stdout + result.stderr).splitlines() if not noise.match(line)]


@pytest.mark.skipif(not ZKCLI.exists(), reason="zkCli.sh comes with Debian's zookeeper package")
def test_zkcli_authenticates_as_the_java_client_does(
    servers: Servers, unique_path: str, tmp_path: Path
) -> None:
    jaas = tmp_path / "client.jaas"
    jaas.write_text(
        "Client {\n  org.apache.zookeeper.server.auth.DigestLoginModule required\n"
        f'  username="alice" password="{USERS["alice"]}";\n}};\n'
    )
    transcripts = []
    for _, address in servers.each():
        lines = [
            *_zkcli(address, jaas, "create", unique_path, "java", "sasl:alice:cdrwa"),
            *_zkcli(address, jaas, "get", unique_path),
            *_zkcli(address, jaas, "getAcl", unique_path),
            # ZooKeeper lists a connection's identities from a hash set.
            *sorted(_zkcli(address, jaas, "whoami")),
            *_zkcli(address, None, "get", unique_path),
            *_zkcli(address, jaas, "delete", unique_path),
        ]
        transcripts.append(lines)
    assert "java" in transcripts[0] and "sasl: alice" in transcripts[0]
    assert any("Insufficient permission" in line for line in transcripts[0])
    assert transcripts[1] == transcripts[0]


# ------------------------------------------------------------ zkgate's own client


@pytest.mark.trio
async def test_the_trio_client_authenticates_and_a_wrong_password_stops_it(
    required_servers: Servers, unique_path: str
) -> None:
    for _, address in required_servers.each():
        host, port = address.rsplit(":", 1)
        client = ZooKeeperClient([(host, int(port))], sasl=SaslCredentials("alice", USERS["alice"]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(30):
                await client.wait_connected()
                await client.create(unique_path, b"x", acl=[ACL(Perm.ALL, Id("sasl", "alice"))])
                data, _ = await client.get_data(unique_path)
                await client.delete(unique_path)
            assert data == b"x"
            nursery.cancel_scope.cancel()
        events: list[SessionEvent] = []
        refused = ZooKeeperClient(
            [(host, int(port))], sasl=SaslCredentials("alice", "guess"), on_session=events.append
        )
        with trio.fail_after(30), pytest.raises(KeeperError) as raised:
            await refused.run()
        assert raised.value.err == Err.AUTHFAILED
        assert events == [AuthFailed("sasl")]


# ------------------------------------------------------------ the mirror


def test_the_mirror_reaches_an_ensemble_that_requires_sasl(
    required_servers: Servers, unique_path: str, tmp_path: Path
) -> None:
    zookeeper = required_servers.zookeeper
    password = tmp_path / "mirror.pass"
    password.write_text(USERS["bob"] + "\n")
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[[mirror]]\nroot = "{unique_path}"\nhosts = "{zookeeper.address}"\n'
        f'sasl_username = "bob"\nsasl_password_file = "{password}"\n'
    )
    upstream = _kazoo(zookeeper.address, "bob")
    upstream.create(unique_path, b"root")
    gate = ZkgateServer(["--config", str(config)], base_dir=tmp_path / "gate", port=free_port())
    gate.start()
    try:
        # A client without SASL reads and writes through zkgate's SASL sessions.
        client = _kazoo(gate.address)
        try:
            changed = threading.Event()
            assert client.get(unique_path, watch=lambda event: changed.set())[0] == b"root"
            client.create(unique_path + "/child", b"through zkgate")
            assert upstream.get(unique_path + "/child")[0] == b"through zkgate"
            upstream.set(unique_path, b"changed upstream")
            assert changed.wait(30), "the upstream change reached no watcher through zkgate"
            assert client.get(unique_path)[0] == b"changed upstream"
        finally:
            client.stop()
            client.close()
        assert USERS["bob"] not in gate.log_tail(200)
    finally:
        gate.close()
        upstream.delete(unique_path, recursive=True)
        upstream.stop()
        upstream.close()


def test_a_mirror_with_a_wrong_password_does_not_start_and_says_why(
    required_servers: Servers, unique_path: str, tmp_path: Path
) -> None:
    password = tmp_path / "mirror.pass"
    password.write_text("not-bobs-password\n")
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[[mirror]]\nroot = "{unique_path}"\nhosts = "{required_servers.zookeeper.address}"\n'
        f'sasl_username = "bob"\nsasl_password_file = "{password}"\nconnect_timeout = 5.0\n'
    )
    gate = ZkgateServer(["--config", str(config)], base_dir=tmp_path / "gate", startup_timeout=20)
    try:
        with pytest.raises(ServerError):
            gate.start()
        log = gate.log_tail(200)
    finally:
        gate.close()
    assert "refused the mirror's credentials" in log and "scheme=sasl" in log, log
    assert "not-bobs-password" not in log


def test_the_zookeeper_upstream_takes_the_same_sasl_options(tmp_path: Path) -> None:
    (tmp_path / "zk.pass").write_text("upstream-secret\n")
    options = {
        "hosts": "127.0.0.1:2181",
        "roots": [{"path": "/services", "layout": "curator"}],
        "sasl_username": "kafka",
        "sasl_password_file": str(tmp_path / "zk.pass"),
    }
    config = parse_upstream("zk", options)
    assert config.sasl == SaslCredentials("kafka", "upstream-secret", tmp_path / "zk.pass")
    assert "upstream-secret" not in repr(config)
    del options["sasl_password_file"]
    with pytest.raises(ConfigError, match="sasl_password_file"):
        parse_upstream("zk", options)
