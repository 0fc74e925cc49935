"""Policies in the running Dispatcher: the admin endpoint's policy API and `zkgate policy`.

Dispatchers run in-process (``run_gateway``) with ``[membership]`` on the shared real
ZooKeeper or real etcd (each test under its own root); the HTTP client is urllib in a worker
thread and the command is the real ``zkgate`` executable in a child process. What operators
rely on: a change made through one Dispatcher is the version every Dispatcher serves; the
command shows the diff before writing; a refused write (no or wrong token, malformed policy,
a stale version, a listener beyond loopback) leaves the store exactly as it was, which the
tests check by reading the store itself; a restarted Dispatcher serves the current version
before it reports started.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from dispatcher.config import parse_config
from dispatcher.faces.admin.config import AdminConfig
from dispatcher.faces.admin.http import AdminServer
from dispatcher.faces.admin.policies import writes_refused_on
from dispatcher.gateway import Gateway, run_gateway
from dispatcher.governance.backends import open_governance_store
from dispatcher.governance.policy import PolicySet
from dispatcher.governance.store import Revision
from dispatcher.sharding.membership import MembershipConfig
from tests.certs import make_pki

TIMEOUT = 30.0
"""Seconds any single wait on a real server may take before the test fails."""

TOKEN = "policy-write-token"
ZKGATE = str(Path(sys.executable).with_name("zkgate"))

CART_V1 = {"services": {"shop.Cart": {"request_timeout": 2, "retries": {"count": 2}}}}
CART_V2 = {
    "services": {"shop.Cart": {"request_timeout": 1, "split": {"version=v1": 95, "version=v2": 5}}}
}
CART_V2_TOML = """\
[services."shop.Cart"]
request_timeout = 1
split = { "version=v1" = 95, "version=v2" = 5 }
"""


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["zookeeper", "etcd"])
def membership(request: pytest.FixtureRequest, unique_path: str) -> MembershipConfig:
    """A ``[membership]`` table on the shared real server of each kind, under a fresh root."""
    server = request.getfixturevalue(request.param)
    return MembershipConfig(request.param, server.address, unique_path, session_timeout=2.0)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy-token"
    path.write_text(TOKEN + "\n")
    return path


@attrs.frozen
class Answer:
    status: int
    body: Any


def _http(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> Answer:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return Answer(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, json.loads(exc.read()))


async def call(
    port: int, method: str, path: str, body: Any = None, token: str | None = None
) -> Answer:
    """One request to an in-process admin endpoint (in a thread: the server shares our loop)."""
    return await trio.to_thread.run_sync(partial(_http, port, method, path, body, token))


async def zkgate_policy(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``zkgate policy ARGS`` as a child process (it must not block the in-process servers)."""
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [ZKGATE, "policy", *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def stored(membership: MembershipConfig) -> tuple[Revision | None, list[Revision]]:
    """The current revision and the history, read from the store on a session of our own."""
    async with open_governance_store(membership, "policies") as store:
        with trio.fail_after(TIMEOUT):
            return await store.current(), await store.history()


@attrs.define
class Dispatchers:
    """In-process Dispatchers on one membership store, for one test."""

    membership: MembershipConfig
    tmp: Path
    nursery: trio.Nursery
    token_file: Path | None
    scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)

    def config(self, node: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "node_id": node,
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(self.tmp / node)},
            "admin": {"listen": "127.0.0.1:0"},
            "subscriptions": {"listen": "127.0.0.1:0", "token": "subscribe"},
            "membership": self.membership.to_mapping(),
            "sharding": {"id": node},
            "governance": {"max_history": 10},
        }
        if self.token_file is not None:
            config["governance"]["token_file"] = str(self.token_file)
        return config

    async def start(self, node: str) -> tuple[Gateway, int]:
        """Start ``node``; return it and its admin port once it reports started."""
        scope = trio.CancelScope()
        self.scopes[node] = scope

        async def run(*, task_status: Any) -> None:
            with scope:
                await run_gateway(parse_config(self.config(node)), task_status=task_status)

        with trio.fail_after(TIMEOUT):
            gateway: Gateway = await self.nursery.start(run)
        assert gateway.admin is not None and gateway.admin.port is not None
        return gateway, gateway.admin.port

    def stop(self, node: str) -> None:
        self.scopes.pop(node).cancel()


@asynccontextmanager
async def dispatchers(
    membership: MembershipConfig, tmp: Path, token_file: Path | None
) -> AsyncIterator[Dispatchers]:
    async with trio.open_nursery() as nursery:
        yield Dispatchers(membership, tmp, nursery, token_file)
        nursery.cancel_scope.cancel()


def put(document: Any, expected: int, why: str = "test") -> dict[str, Any]:
    return {"document": document, "expected_version": expected, "why": why, "who": "tester"}


# ------------------------------------------------------------------- the HTTP API


async def test_set_get_diff_history_and_rollback_over_http(
    membership: MembershipConfig, tmp_path: Path, token_file: Path
) -> None:
    """The API's answers follow the store: version 0 and an empty document first; a diff
    lists the changed fields without writing; each PUT is the next version with who and why;
    history lists them newest first; a rollback writes the old document as a new version;
    /status shows the current policy, its version and the last versions."""
    async with dispatchers(membership, tmp_path, token_file) as cluster:
        _gateway, port = await cluster.start("d1")
        empty = await call(port, "GET", "/policies")
        assert (empty.status, empty.body["version"], empty.body["document"]) == (200, 0, {})

        diffed = await call(port, "POST", "/policies/diff", CART_V1)
        assert diffed.status == 200 and diffed.body["base_version"] == 0
        assert [c["path"] for c in diffed.body["changes"]] == ["request_timeout", "retries.count"]
        assert (await stored(membership))[0] is None  # a diff writes nothing

        first = await call(port, "PUT", "/policies", put(CART_V1, 0, "first"), TOKEN)
        assert first.status == 200, first.body
        assert (first.body["version"], first.body["who"], first.body["why"]) == (
            1,
            "tester",
            "first",
        )
        assert first.body["seen"] is True
        second = await call(port, "PUT", "/policies", put(CART_V2, 1, "canary"), TOKEN)
        assert second.status == 200 and second.body["version"] == 2
        current = await call(port, "GET", "/policies")
        assert current.body["version"] == 2
        assert current.body["document"] == PolicySet.from_mapping(CART_V2).to_mapping()

        history = await call(port, "GET", "/policies/history?limit=5")
        assert [v["version"] for v in history.body["versions"]] == [2, 1]
        assert [v["why"] for v in history.body["versions"]] == ["canary", "first"]

        rolled = await call(port, "POST", "/policies/rollback", {
            "to_version": 1, "expected_version": 2, "why": "canary failed", "who": "oncall",
        }, TOKEN)  # fmt: skip
        assert rolled.status == 200, rolled.body
        assert (rolled.body["version"], rolled.body["restores"]) == (3, 1)
        head, revisions = await stored(membership)
        assert head is not None and head.version == 3 and head.restores == 1
        assert head.document() == PolicySet.from_mapping(CART_V1).to_mapping()
        assert [r.version for r in revisions] == [3, 2, 1]

        status = await call(port, "GET", "/status")
        policies = status.body["policies"]
        assert (policies["version"], policies["who"], policies["why"]) == (
            3,
            "oncall",
            "canary failed",
        )
        assert policies["services"] == {
            "shop.Cart": {"request_timeout": 2, "retries": {"count": 2}}
        }
        assert [h["version"] for h in policies["history"]] == [3, 2, 1]


async def test_refused_writes_leave_the_store_unchanged(
    membership: MembershipConfig, tmp_path: Path, token_file: Path
) -> None:
    """No token, a wrong token, a malformed policy, a body that is not JSON, a stale
    expected_version, a rollback to a version never written and an oversized body are each
    refused with a status and a message that say why, and the store keeps version 1."""
    async with dispatchers(membership, tmp_path, token_file) as cluster:
        _gateway, port = await cluster.start("d1")
        assert (await call(port, "PUT", "/policies", put(CART_V1, 0), TOKEN)).status == 200
        before = await stored(membership)

        refusals: list[tuple[Answer, int, str]] = [
            (await call(port, "PUT", "/policies", put(CART_V2, 1)), 401, "missing"),
            (await call(port, "PUT", "/policies", put(CART_V2, 1), "not-the-token"), 401, "wrong"),
            (await call(port, "POST", "/policies/rollback",
                        {"to_version": 1, "expected_version": 1, "why": "x"}, "nope"),
             401, "wrong"),
            (await call(port, "PUT", "/policies",
                        put({"services": {"shop.Cart": {"request_timeot": 1}}}, 1), TOKEN),
             400, "request_timeot"),
            (await call(port, "PUT", "/policies",
                        put({"services": {"shop.Cart": {"retries": {"count": 11}}}}, 1), TOKEN),
             400, "retries.count: must be between 0 and 10"),
            (await call(port, "PUT", "/policies", b"{not json", TOKEN), 400, "not valid JSON"),
            (await call(port, "PUT", "/policies", put(CART_V2, 0), TOKEN), 409,
             "the current version is 1"),
            (await call(port, "POST", "/policies/rollback",
                        {"to_version": 7, "expected_version": 1, "why": "x"}, TOKEN), 404,
             "version 7 is not in the history"),
        ]  # fmt: skip
        for answer, status, message in refusals:
            assert answer.status == status, answer.body
            assert message in answer.body["error"], answer.body
        conflict = refusals[6][0]
        assert conflict.body["current_version"] == 1

        oversized = await trio.to_thread.run_sync(_oversized_put, port)
        assert oversized.startswith("HTTP/1.1 413"), oversized

        assert await stored(membership) == before
        current = await call(port, "GET", "/policies")
        assert current.body["version"] == 1


def _oversized_put(port: int) -> str:
    """A PUT announcing a 10 MB body: the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"PUT /policies HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + TOKEN.encode() + b"\r\ncontent-length: 10000000\r\n\r\n"
        )
        return sock.makefile("rb").readline().decode()


async def test_concurrent_conflicting_writes_one_wins(
    membership: MembershipConfig, tmp_path: Path, token_file: Path
) -> None:
    """Two operators who both read version 1 write through two Dispatchers at once: one gets
    version 2, the other 409 naming version 2, and the store holds the winner's document."""
    async with dispatchers(membership, tmp_path, token_file) as cluster:
        _a, port_a = await cluster.start("d1")
        _b, port_b = await cluster.start("d2")
        assert (await call(port_a, "PUT", "/policies", put(CART_V1, 0), TOKEN)).status == 200
        documents = {
            port_a: {"services": {"a.Service": {"request_timeout": 3}}},
            port_b: {"services": {"b.Service": {"request_timeout": 4}}},
        }
        answers: dict[int, Answer] = {}

        async def write(port: int) -> None:
            answers[port] = await call(port, "PUT", "/policies", put(documents[port], 1), TOKEN)

        async with trio.open_nursery() as nursery:
            for port in documents:
                nursery.start_soon(write, port)
        statuses = sorted(answer.status for answer in answers.values())
        assert statuses == [200, 409], answers
        (winner,) = [port for port, answer in answers.items() if answer.status == 200]
        (loser,) = [answer for answer in answers.values() if answer.status == 409]
        assert loser.body["current_version"] == 2
        assert "the current version is 2" in loser.body["error"]
        head, revisions = await stored(membership)
        assert head is not None and head.version == 2
        assert head.document() == PolicySet.from_mapping(documents[winner]).to_mapping()
        assert [r.version for r in revisions] == [2, 1]


async def test_two_dispatchers_agree_within_a_second(
    membership: MembershipConfig, tmp_path: Path, token_file: Path
) -> None:
    """A write through one Dispatcher is the version the other serves within a second."""
    async with dispatchers(membership, tmp_path, token_file) as cluster:
        a, port_a = await cluster.start("d1")
        b, port_b = await cluster.start("d2")
        assert a.policies is not None and b.policies is not None
        for version, document in ((1, CART_V1), (2, CART_V2)):
            answer = await call(port_a, "PUT", "/policies", put(document, version - 1), TOKEN)
            assert answer.status == 200, answer.body
            written = time.monotonic()
            with trio.fail_after(TIMEOUT):
                await b.policies.wait_version(version)
            assert time.monotonic() - written < 1.0
            seen = await call(port_b, "GET", "/policies")
            assert seen.body["version"] == version
            assert seen.body["document"] == PolicySet.from_mapping(document).to_mapping()


async def test_a_restarted_dispatcher_serves_the_current_version_when_started(
    membership: MembershipConfig, tmp_path: Path, token_file: Path
) -> None:
    """A Dispatcher that was down while the policies changed holds the current version as
    soon as it reports started: its feed, its API and its /status all say so, with /ready."""
    async with dispatchers(membership, tmp_path, token_file) as cluster:
        _a, port_a = await cluster.start("d1")
        assert (await call(port_a, "PUT", "/policies", put(CART_V1, 0), TOKEN)).status == 200
        cluster.stop("d1")
        _b, port_b = await cluster.start("d2")
        assert (await call(port_b, "PUT", "/policies", put(CART_V2, 1), TOKEN)).status == 200

        restarted, port = await cluster.start("d1")
        assert restarted.policies is not None and restarted.policies.version == 2
        answer = await call(port, "GET", "/policies")
        assert answer.body["version"] == 2
        assert answer.body["document"] == PolicySet.from_mapping(CART_V2).to_mapping()
        ready = await call(port, "GET", "/ready")
        assert ready.status == 200, ready.body


# --------------------------------------------------------------- `zkgate policy`


async def test_the_policy_command(
    membership: MembershipConfig, tmp_path: Path, token_file: Path
) -> None:
    """`zkgate policy` from a shell: get, set (the diff first; --dry-run writes nothing;
    --why required), diff, history and rollback; a wrong token and a malformed document are
    refused with exit 1 and the server's message, an unreachable endpoint is exit 3."""
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(CART_V1))
    v2 = tmp_path / "v2.toml"
    v2.write_text(CART_V2_TOML)
    bad = tmp_path / "bad.toml"
    bad.write_text('[services."shop.Cart"]\nload_balancing = { policy = "random" }\n')
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    async with dispatchers(membership, tmp_path, token_file) as cluster:
        _gateway, port = await cluster.start("d1")
        admin = ("--admin", f"127.0.0.1:{port}")
        auth = (*admin, "--token-file", str(token_file))

        got = await zkgate_policy("get", *admin)
        assert got.returncode == 0 and b"version 0" in got.stdout

        dry = await zkgate_policy("set", str(v1), "--dry-run", *auth)
        assert dry.returncode == 0, dry.stderr
        assert b'policy "shop.Cart": request_timeout: (unset) -> 2' in dry.stdout
        assert b"dry run: nothing written" in dry.stdout
        assert (await stored(membership))[0] is None

        no_why = await zkgate_policy("set", str(v1), *auth)
        assert no_why.returncode == 2 and b"--why" in no_why.stderr

        first = await zkgate_policy("set", str(v1), "--why", "first", "--who", "ops", *auth)
        assert first.returncode == 0, first.stderr
        assert b"changes from version 0:" in first.stdout
        assert b"written: version 1" in first.stdout

        changes = await zkgate_policy("diff", str(v2), *admin)
        assert changes.returncode == 0
        assert b'policy "shop.Cart": request_timeout: 2 -> 1' in changes.stdout
        assert b'split."version=v2": (unset) -> 5' in changes.stdout

        second = await zkgate_policy("set", str(v2), "--why", "canary 5%", *auth)
        assert second.returncode == 0 and b"written: version 2" in second.stdout

        listed = await zkgate_policy("history", *admin)
        lines = listed.stdout.decode().splitlines()
        assert [line.split()[1] for line in lines] == ["2", "1"]
        assert lines[0].endswith(": canary 5%") and "by ops" in lines[1]

        denied = await zkgate_policy("set", str(v1), "--why", "x", *admin,
                                     "--token-file", str(wrong))  # fmt: skip
        assert denied.returncode == 1 and b"HTTP 401" in denied.stderr
        invalid = await zkgate_policy("set", str(bad), "--why", "x", *auth)
        assert invalid.returncode == 1
        assert b"load_balancing.policy: must be one of wrr, p2c, ring_hash" in invalid.stderr
        stale = await zkgate_policy("set", str(v1), "--why", "x", "--expected-version", "1", *auth)
        assert stale.returncode == 1 and b"the current version is 2" in stale.stderr
        head, revisions = await stored(membership)
        assert head is not None and head.version == 2 and len(revisions) == 2

        back = await zkgate_policy("rollback", "1", "--why", "canary failed", *auth)
        assert back.returncode == 0, back.stderr
        assert b"written: version 3" in back.stdout and b"restores version 1" in back.stdout
        shown = await zkgate_policy("get", "--json", *admin)
        assert json.loads(shown.stdout)["document"] == PolicySet.from_mapping(CART_V1).to_mapping()

    unreachable = await zkgate_policy("get", "--admin", f"127.0.0.1:{port}")
    assert unreachable.returncode == 3 and b"cannot reach" in unreachable.stderr


# ------------------------------------------------------- without a store, beyond loopback


async def test_without_membership_policies_are_unavailable(tmp_path: Path) -> None:
    """Without [membership] the API answers 503 saying a [membership] store is required, and
    /status says policies are unavailable."""
    config = parse_config({
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
        "admin": {"listen": "127.0.0.1:0"},
        "governance": {"token": TOKEN},
    })  # fmt: skip
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(run_gateway, config)
        assert gateway.policies is None and gateway.admin is not None
        port = gateway.admin.port
        assert port is not None
        for method, path, body in (("GET", "/policies", None), ("PUT", "/policies", put({}, 0))):
            answer = await call(port, method, path, body, TOKEN)
            assert answer.status == 503
            assert "a [membership] store (ZooKeeper or etcd) is required" in answer.body["error"]
        status = await call(port, "GET", "/status")
        assert status.body["policies"]["available"] is False
        nursery.cancel_scope.cancel()


async def _raw_request(admin: AdminServer, request: bytes) -> tuple[int, Any]:
    """``request`` through the admin server over an in-memory connection: status, JSON."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admin.serve_stream, server, "203.0.113.9")
        await client.send_all(request)
        data = b""
        while chunk := await client.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_writes_are_refused_on_an_admin_listener_beyond_loopback(
    tmp_path: Path, unique_path: str
) -> None:
    """With the admin endpoint configured on 0.0.0.0 (no TLS), a write with the right token
    is refused with 403 saying why, and the store is unchanged; reads are still answered.
    Loopback listeners (IPv4, IPv6, localhost) take writes."""
    config = parse_config({
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
        # Not bound (enabled = false): the test serves the admin routes over memory streams.
        "admin": {"enabled": False, "listen": "0.0.0.0:8081"},
        "membership": {"kind": "memory", "root": unique_path},
        "sharding": {},
        "governance": {"token": TOKEN},
    })  # fmt: skip
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(run_gateway, config)
        admin = AdminServer(gateway)
        body = json.dumps(put(CART_V1, 0)).encode()
        status, answer = await _raw_request(admin, (
            b"PUT /policies HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            b"authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        ))  # fmt: skip
        assert status == 403
        assert "beyond loopback (0.0.0.0) without TLS" in answer["error"]
        assert gateway.policies is not None and gateway.policies.version == 0
        assert await gateway.policies.store.current() is None
        status, answer = await _raw_request(
            admin, b"GET /policies HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        assert (status, answer["version"]) == (200, 0)
        nursery.cancel_scope.cancel()
    for listen in ("127.0.0.1:8081", "[::1]:8081", "localhost:8081"):
        assert writes_refused_on(AdminConfig(listen=listen)) is None
    assert writes_refused_on(AdminConfig(listen="10.0.0.5:8081")) is not None


async def test_the_commands_write_through_an_admin_endpoint_that_serves_tls(
    tmp_path: Path, unique_path: str, token_file: Path
) -> None:
    """The way a remote operator must write (beyond loopback only TLS endpoints take
    writes): `zkgate policy set` and `zkgate inspect` with --tls-ca and a client
    certificate reach an [admin.tls] endpoint that verifies clients; without the flags the
    endpoint cannot be reached (exit 3), and a certificate without its key is a usage
    error (exit 2)."""
    pki = make_pki(tmp_path / "pki")
    config = parse_config({
        "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
        "admin": {"listen": "127.0.0.1:0", "tls": {
            "cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.cert),
            "verify_client": True,
        }},
        "membership": {"kind": "memory", "root": unique_path},
        "governance": {"token": TOKEN},
    })  # fmt: skip
    document = tmp_path / "v1.json"
    document.write_text(json.dumps(CART_V1))
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(run_gateway, config)
        assert gateway.admin is not None and gateway.admin.port is not None
        admin = ("--admin", f"localhost:{gateway.admin.port}")
        tls = ("--tls-ca", str(pki.ca.cert),
               "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))  # fmt: skip
        written = await zkgate_policy(
            "set", str(document), "--why", "remote", "--token-file", str(token_file),
            *admin, *tls,
        )  # fmt: skip
        assert written.returncode == 0, written.stderr
        assert b"written: version 1" in written.stdout
        assert gateway.policies is not None and gateway.policies.version == 1
        plain = await zkgate_policy("get", *admin)
        assert plain.returncode == 3 and b"cannot reach" in plain.stderr
        half = await zkgate_policy("get", *admin, "--tls-ca", str(pki.ca.cert),
                                   "--tls-cert", str(pki.client.cert))  # fmt: skip
        assert half.returncode == 2 and b"--tls-cert and --tls-key go together" in half.stderr
        with trio.fail_after(TIMEOUT):
            inspected = await trio.run_process(
                [ZKGATE, "inspect", "--token-file", str(token_file), *admin, *tls],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert inspected.returncode == 0, inspected.stderr
        nursery.cancel_scope.cancel()


def test_the_governance_table_is_checked_and_round_trips(tmp_path: Path) -> None:
    """[governance] reads its token from token_file at load time; mistakes name the key."""
    token = tmp_path / "t"
    token.write_text("  secret \n")
    config = parse_config({"governance": {"max_history": 5, "token_file": "t"}}, base_dir=tmp_path)
    assert (config.governance.max_history, config.governance.token) == (5, "secret")
    assert "secret" not in repr(config)
    assert parse_config(config.to_mapping()) == config
    for table, message in (
        ({"max_history": 0}, "governance.max_history: must be at least 1"),
        ({"token": "a", "token_file": "t"}, "governance.token_file: give token or token_file"),
        ({"token_file": "missing"}, "governance.token_file: cannot read"),
        ({"tokn": "a"}, "governance.tokn: unknown key"),
    ):
        with pytest.raises(Exception, match=message.replace(".", r"\.")):
            parse_config({"governance": table}, base_dir=tmp_path)
