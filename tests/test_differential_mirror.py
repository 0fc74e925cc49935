"""Differential tests through the mirror: zkgate mirroring a real ZooKeeper 3.8
subtree must answer, on the raw wire, what a real ZooKeeper answers directly.

The reference is the shared ZooKeeper, spoken to directly. The candidate is a
zkgate mirroring ``/m`` of a second, private ZooKeeper. Each side has the two
clients of :mod:`tests.differential` ("A" and "B", on the server under
comparison) and a third, "U", connected straight to the ensemble behind it:
the reference itself, or the mirror's upstream. U's writes are the changes a
mirror learns of only through its upstream watch, so sequences that mix U with
A and B check the cache and the events of changes made behind zkgate's back.

The two sides count zxids in different spaces (zkgate's reply headers are its
own, its stats are the upstream's), so both sides label stat zxids by first
appearance (``Side(header_zxids=False)``) and check header zxids only grow.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.zk.codec.protocol import Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    ACL,
    OPEN_ACL_UNSAFE,
    AddWatchRequest,
    AuthPacket,
    CheckVersionRequest,
    CreateRequest,
    DeleteRequest,
    Empty,
    GetSASLRequest,
    Id,
    MultiReadRequest,
    MultiRequest,
    PathRequest,
    PathWatchRequest,
    ReconfigRequest,
    Record,
    SetACLRequest,
    SetDataRequest,
    SetWatches,
    SetWatches2,
    WatchesRequest,
)
from dispatcher.zk.server.acl import digest_id
from tests.differential import Pair, Side
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer
from tests.test_differential import NAMES, _multi_ops, _read_ops, _rooted, _strip, _write_ops
from tests.zkwire import Reply, WireClient

MOUNT = "/m"
SESSION_MS = 30000
C = OPEN_ACL_UNSAFE


class SettlingClient(WireClient):
    """A client of the mirror's upstream whose every answer waits for the mirror.

    A change made straight on the upstream reaches zkgate as watch events
    some time after the writer's answer, on two kinds of upstream session:
    the mirror's own (its recursive watch, for what it may read) and, for a
    znode it may not read, the write session of the credentials whose
    forwarded read set the watch. After each request U's settler, a zkgate
    client with U's credentials (it repeats U's AUTH packets), sends a
    ``sync``: zkgate answers it after a ``sync`` on its own session and on
    the write session of those credentials, with the events of both gone
    out before the answer. The differential's pings then collect them as
    they would on the reference. (Forwarded watches of credentials U never
    uses are not settled: no scenario changes such znodes from U.)
    """

    def __init__(self, host: str, port: int, settler: WireClient) -> None:
        super().__init__(host, port)
        self.settler = settler

    def call(self, opcode: int, record: Record | None = None, xid: int | None = None) -> Reply:
        reply = super().call(opcode, record, xid)
        if opcode == OpCode.AUTH and reply.header.err == Err.OK:
            # The settler's sync must wait on the write session of U's credentials.
            assert self.settler.call(opcode, record).header.err == Err.OK
        if opcode != OpCode.PING:
            settled = self.settler.call(OpCode.SYNC, PathRequest(MOUNT))
            assert settled.header.err == Err.OK, Err(settled.header.err).name
        return reply


def _add_client(side: Side, name: str, client: WireClient) -> None:
    side.owners[client.connect(SESSION_MS).session_id] = name
    side.clients[name] = client


def _ensure(server: ZooKeeperServer, path: str) -> None:
    with WireClient(server.host, server.port) as client:
        client.connect()
        reply = client.call(OpCode.CREATE, CreateRequest(path, b"", C, 0))
        assert reply.header.err in (Err.OK, Err.NODEEXISTS), Err(reply.header.err).name


@attrs.frozen
class Servers:
    #: The shared ZooKeeper, spoken to directly.
    reference: ZooKeeperServer
    #: The mirror's own ZooKeeper.
    upstream: ZooKeeperServer
    #: zkgate mirroring ``/m`` of ``upstream``.
    gate: ZkgateServer


@contextmanager
def open_pair(servers: Servers) -> Iterator[Pair]:
    """Fresh sessions A, B and U on both sides (a failed step leaves its
    connections mid-answer: nothing after it may reuse them)."""
    ref, up, gate = servers.reference, servers.upstream, servers.gate
    reference = Side(ref.host, ref.port, SESSION_MS, header_zxids=False)
    candidate = Side(gate.host, gate.port, SESSION_MS, header_zxids=False)
    _add_client(reference, "U", WireClient(ref.host, ref.port))
    settler = WireClient(gate.host, gate.port)
    settler.connect(SESSION_MS)
    _add_client(candidate, "U", SettlingClient(up.host, up.port, settler))
    try:
        yield Pair(reference, candidate)
    finally:
        for client in (*reference.clients.values(), *candidate.clients.values(), settler):
            _close_session(client)


def _close_session(client: WireClient) -> None:
    """End the session now rather than at its timeout, when the connection
    can still say so."""
    try:
        client.call(OpCode.CLOSE_SESSION)
    except (OSError, ConnectionError, AssertionError):
        pass  # a failed step's connection: the session expires instead
    finally:
        client.close()


@pytest.fixture
def servers(
    zookeeper: ZooKeeperServer, zookeeper_factory: ServerFactory[ZooKeeperServer],
    zkgate_factory: ServerFactory[ZkgateServer], tmp_path: Path,
) -> Servers:  # fmt: skip
    upstream = zookeeper_factory()
    for server in (zookeeper, upstream):
        _ensure(server, MOUNT)
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[zookeeper]\nmax_client_cnxns = 0\n\n[[mirror]]\nroot = "{MOUNT}"\n'
        f'hosts = "{upstream.address}"\n'
    )
    return Servers(zookeeper, upstream, zkgate_factory(["--config", str(config)]))


@attrs.frozen
class Mirrored:
    pair: Pair
    #: This test's own root, ``/m/<unique>``, on both sides.
    root: str


@pytest.fixture
def mirrored(servers: Servers, unique_path: str) -> Iterator[Mirrored]:
    with open_pair(servers) as pair:
        yield Mirrored(pair, f"{MOUNT}{unique_path}")


def _seen_by_u(answer: Any) -> Any:
    """U's answers with other sessions' ephemerals owned by "another session".

    Upstream, an ephemeral made through zkgate belongs to the mirror's write
    session, not to the downstream client that asked for it (zkgate shows the
    downstream owner only to its own clients): to U, that owner is someone
    else's, as A and B are to U on the reference.
    """
    if isinstance(answer, dict):
        return {
            key: (
                value if value in ("U", 0) else "another session"
            ) if key == "ephemeral_owner" else _seen_by_u(value)
            for key, value in answer.items()
        }  # fmt: skip
    if isinstance(answer, list):
        return [_seen_by_u(item) for item in answer]
    return answer


def _check_step(pair: Pair, root: str, who: str, opcode: int, record: Record | None) -> None:
    expected, actual = pair.run(who, opcode, record)
    if who == "U":
        expected, actual = _seen_by_u(expected), _seen_by_u(actual)
    assert _strip(actual, root) == _strip(expected, root), (who, opcode, record)


def _scenario(m: Mirrored, script: list[tuple[str, int, Record | None]]) -> None:
    for who, opcode, record in script:
        _check_step(m.pair, m.root, who, opcode, record)


# ------------------------------------------------------------------ random sequences

clients = st.sampled_from(["A", "B", "U"])


@st.composite
def sequences(draw: st.DrawFn) -> list[tuple[str, tuple[int, Record], bool]]:
    """tests/test_differential.py's random steps, on a subtree that exists.

    From an empty root most random writes fail on a missing parent, and a
    read rarely meets a znode that changed since it was last read, which is
    where a cache goes wrong; so each sequence starts by creating a drawn
    part of the names, and a drawn half of the steps is followed by a probe
    (:func:`_probe`).
    """
    seed = [name for name in NAMES if draw(st.booleans())]  # parents come first
    setup = [(draw(clients), (OpCode.CREATE, CreateRequest(name, b"", C, 0)), False)
             for name in seed]  # fmt: skip
    body = draw(st.lists(
        st.tuples(clients, st.one_of(_write_ops(), _read_ops(), _multi_ops()), st.booleans()),
        min_size=1, max_size=25,
    ))  # fmt: skip
    return setup + body


_roots = itertools.count()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=sequences())
def test_random_sequences_through_the_mirror_match_zookeeper(
    servers: Servers, unique_path: str, sequence: list[tuple[str, tuple[int, Record], bool]]
) -> None:
    """Writes through zkgate (A, B) and straight upstream (U), reads through both."""
    root = f"{MOUNT}{unique_path}-{next(_roots)}"
    with open_pair(servers) as pair:
        for side in (pair.reference, pair.candidate):
            reply = side.clients["A"].call(OpCode.CREATE, CreateRequest(root, b"", C, 0))
            assert reply.header.err == Err.OK
        for who, (opcode, record), probe in sequence:
            request = _rooted(record, root)
            _check_step(pair, root, who, opcode, request)
            if probe:
                _probe(pair, root)


def _probe(pair: Pair, root: str) -> None:
    """Read every name through A on both sides and compare: a cache entry
    that an earlier step left stale shows here, whichever name it is."""
    answers = []
    for side in (pair.reference, pair.candidate):
        client = side.clients["A"]
        answer = []
        for path in (root, *(f"{root}/{name}" for name in NAMES)):
            for opcode in (OpCode.GET_DATA, OpCode.GET_CHILDREN2):
                reply = client.call(opcode, PathWatchRequest(path, False))
                answer.append((
                    path, Err(reply.header.err).name, side.normalize(reply.decode(opcode)),
                    [(event.type, event.path) for _, event in reply.events],
                ))  # fmt: skip
        answers.append(_strip(answer, root))
    assert answers[1] == answers[0]


# ------------------------------------------------------------------ scripted scenarios


def test_watch_kinds_and_one_shot(mirrored: Mirrored) -> None:
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/n", True)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/n", b"1", C, 0)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/n", True)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(f"{root}/n", True)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/n", b"2", -1)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/n", b"3", -1)),  # one-shot: no event
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/n", True)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/n", -1)),  # data+child watch: one event
        ("A", OpCode.CREATE, CreateRequest(f"{root}/n", b"", C, 0)),  # no watch left
        # The same through changes made upstream, behind zkgate's back.
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/n", True)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/n", True)),
        ("B", OpCode.GET_CHILDREN2, PathWatchRequest(root, True)),
        ("U", OpCode.SET_DATA, SetDataRequest(f"{root}/n", b"u1", -1)),  # A and B: one each
        ("U", OpCode.SET_DATA, SetDataRequest(f"{root}/n", b"u2", -1)),  # nobody
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/n", True)),  # shows u2, not cached u1
        ("U", OpCode.CREATE, CreateRequest(f"{root}/m", b"", C, 0)),  # B's child watch
        ("B", OpCode.GET_CHILDREN2, PathWatchRequest(root, False)),
        ("U", OpCode.DELETE, DeleteRequest(f"{root}/n", -1)),  # A's data watch
        ("A", OpCode.EXISTS, PathWatchRequest(f"{root}/n", False)),
    ])  # fmt: skip


def test_set_watches_replays_what_changed(mirrored: Mirrored) -> None:
    """A reconnecting client's watches, on znodes the mirror had loaded
    before the client's last zxid: the mirror can tell what changed, and
    answers exactly as ZooKeeper does."""
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/same", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/changed", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/reloaded", b"", C, 0)),
        # Reads that load the mirror's cache before B's last zxid.
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/same", False)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/changed", False)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/reloaded", False)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/gone", False)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/new", False)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, False)),
    ])  # fmt: skip
    assert _replay_set_watches(mirrored) == _replay_set_watches(mirrored, "reference")


def _replay_set_watches(m: Mirrored, which: str = "candidate") -> list[Any]:
    root = m.root
    side: Side = getattr(m.pair, which)
    # relative zxid = the last zxid B saw, in the header space of its server.
    last = side.last_zxids["B"]
    out: list[Any] = []
    u, a = side.clients["U"], side.clients["A"]
    u.call(OpCode.SET_DATA, SetDataRequest(f"{root}/changed", b"x", -1))
    # Changed, then loaded again after B's last zxid: cached, yet it changed.
    u.call(OpCode.SET_DATA, SetDataRequest(f"{root}/reloaded", b"x", -1))
    a.call(OpCode.GET_DATA, PathWatchRequest(f"{root}/reloaded", False))
    reply = side.clients["B"].call(OpCode.SET_WATCHES, SetWatches(
        last,
        (f"{root}/same", f"{root}/changed", f"{root}/gone", f"{root}/reloaded"),
        (f"{root}/same", f"{root}/new"),
        (root,),
    ))  # fmt: skip
    out.append((reply.header.err, sorted((e.type, e.path) for _, e in reply.events)))
    u.call(OpCode.CREATE, CreateRequest(f"{root}/new", b"", C, 0))
    a.call(OpCode.SET_DATA, SetDataRequest(f"{root}/same", b"y", -1))
    ping = side.clients["B"].call(OpCode.PING)
    out.append(sorted((e.type, e.path) for _, e in ping.events))
    stripped = _strip(out, root)
    assert isinstance(stripped, list)
    return stripped


def test_set_watches_without_a_cache_errs_towards_events(mirrored: Mirrored) -> None:
    """Documented departure, so no equality here: for znodes the mirror had
    not loaded before the client's last zxid it cannot tell whether they
    changed, so it fires at once (a client reads again after an event; it
    would wait forever after a missed one), with the event of a change of
    the watch's kind since it cannot tell which change it was. What must hold
    is that nothing is lost: every watch ZooKeeper fires at once or later, the
    mirror has fired by then too, on the same path."""
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/same", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/changed", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/reloaded", b"", C, 0)),
    ])  # fmt: skip
    (zk_err, zk_now), zk_later = _replay_set_watches(mirrored, "reference")
    (gate_err, gate_now), gate_later = _replay_set_watches(mirrored)
    assert gate_err == zk_err == Err.OK
    fired_now = {path for _, path in gate_now}
    assert {path for _, path in zk_now} <= fired_now, (gate_now, zk_now)
    fired = fired_now | {path for _, path in gate_later}
    assert {path for _, path in zk_later} <= fired, (gate_now, gate_later, zk_later)
    # A watch that already fired does not fire twice.
    assert {tuple(event) for event in gate_later} <= {tuple(event) for event in zk_later}


def test_set_watches2_replays_persistent_watches(mirrored: Mirrored) -> None:
    root = mirrored.root
    _scenario(mirrored, [("A", OpCode.CREATE, CreateRequest(root, b"", C, 0))])
    results = []
    for side in (mirrored.pair.reference, mirrored.pair.candidate):
        # B re-arms, as a client does after a reconnect: a persistent watch on
        # the root and a recursive one below it (no zxid question for these).
        reply = side.clients["B"].call(OpCode.SET_WATCHES2, SetWatches2(
            side.last_zxids["B"], (), (), (), (root,), (f"{root}/tree",),
        ))  # fmt: skip
        a, u = side.clients["A"], side.clients["U"]
        a.call(OpCode.CREATE, CreateRequest(f"{root}/tree", b"", C, 0))
        u.call(OpCode.CREATE, CreateRequest(f"{root}/tree/leaf", b"", C, 0))
        a.call(OpCode.SET_DATA, SetDataRequest(root, b"1", -1))
        u.call(OpCode.SET_DATA, SetDataRequest(root, b"2", -1))
        ping = side.clients["B"].call(OpCode.PING)
        results.append((reply.header.err, [(e.type, e.path) for _, e in ping.events]))
    assert results[1] == results[0]
    assert (EventType.NODE_DATA_CHANGED, root) in results[0][1]


def _acl(scheme: str, ident: str) -> tuple[ACL, ...]:
    return (ACL(31, Id(scheme, ident)),)


def test_acl_answers_match(mirrored: Mirrored) -> None:
    root = mirrored.root
    read_only = (ACL(1, Id("world", "anyone")),)
    digest = (ACL(31, Id("digest", "bob:Zm9vYmFy")),)
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro", b"", read_only, 0)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/ro", b"x", -1)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro/child", b"", C, 0)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/ro")),
        ("A", OpCode.GET_CHILDREN2, PathWatchRequest(f"{root}/ro", True)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/secret", b"s", digest, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/secret", False)),
        ("A", OpCode.GET_CHILDREN, PathWatchRequest(f"{root}/secret", False)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/secret")),
        ("A", OpCode.EXISTS, PathWatchRequest(f"{root}/secret", False)),
        ("A", OpCode.SET_ACL, SetACLRequest(f"{root}/ro", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro/child2", b"", C, 0)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/ro")),
        ("U", OpCode.SET_ACL, SetACLRequest(f"{root}/ro", read_only, 1)),  # behind zkgate
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/ro")),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro/child3", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", _acl("digest", "nocolon"), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", _acl("auth", ""), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", _acl("ip", "10.0.0.0/8"), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad2", b"", _acl("ip", "not-an-ip"), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad3", b"", _acl("world", "x"), 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/bad", False)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/bad")),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/bad", True)),
    ])  # fmt: skip


def test_digest_auth_is_enforced_like_zookeeper(mirrored: Mirrored) -> None:
    root = mirrored.root
    alice = (ACL(31, Id("digest", digest_id("alice:secret"))),)
    creator_only = (ACL(31, Id("auth", "")),)
    read_only_alice = (
        ACL(1, Id("digest", digest_id("alice:secret"))),
        ACL(8, Id("world", "anyone")),
    )
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/mine", b"m", creator_only, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/alice", b"a", alice, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro", b"r", read_only_alice, 0)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/mine")),
        ("B", OpCode.GET_ACL, PathRequest(f"{root}/mine")),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("B", OpCode.GET_CHILDREN2, PathWatchRequest(f"{root}/alice", True)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", False)),
        ("B", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"x", -1)),
        ("B", OpCode.CREATE, CreateRequest(f"{root}/alice/kid", b"", C, 0)),
        ("B", OpCode.SET_ACL, SetACLRequest(f"{root}/alice", C, -1)),
        ("B", OpCode.MULTI_READ, MultiReadRequest((
            (OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", False)),
            (OpCode.GET_CHILDREN, PathWatchRequest(f"{root}/alice", False)),
        ))),
        ("B", OpCode.MULTI, MultiRequest((
            (OpCode.CHECK, CheckVersionRequest(f"{root}/alice", -1)),
            (OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"y", -1)),
        ))),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"x", -1)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", False)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/ro", b"x", -1)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/ro", False)),
        ("B", OpCode.AUTH, AuthPacket(0, "digest", b"alice:wrong")),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/ro", False)),
        ("B", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"z", -1)),
        ("B", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/ro", False)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", False)),
        ("B", OpCode.SET_ACL, SetACLRequest(f"{root}/alice", C, 5)),
        ("B", OpCode.SET_ACL, SetACLRequest(f"{root}/alice", C, 0)),
        ("B", OpCode.WHO_AM_I, Empty()),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/ro", -1)),
    ])  # fmt: skip


def test_changes_to_znodes_the_mirror_cannot_read_fire_like_zookeeper(
    mirrored: Mirrored,
) -> None:
    """The mirror's own session may not read alice's znodes, so its upstream
    watch hears nothing of them; alice's watches through zkgate still fire
    on U's changes exactly as ZooKeeper's do."""
    root = mirrored.root
    alice = (ACL(31, Id("digest", digest_id("alice:secret"))),)
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("U", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/alice", b"a", alice, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("A", OpCode.GET_CHILDREN2, PathWatchRequest(f"{root}/alice", True)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),  # NOAUTH: no watch
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
        ("U", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"u", -1)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("U", OpCode.CREATE, CreateRequest(f"{root}/alice/kid", b"", alice, 0)),
        ("A", OpCode.GET_CHILDREN2, PathWatchRequest(f"{root}/alice", True)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice/kid", True)),
        ("U", OpCode.DELETE, DeleteRequest(f"{root}/alice/kid", -1)),
        ("U", OpCode.DELETE, DeleteRequest(f"{root}/alice", -1)),  # B: child of root
        ("A", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", False)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", False)),
    ])  # fmt: skip


def test_no_event_for_a_watcher_that_may_not_read(mirrored: Mirrored) -> None:
    root = mirrored.root
    alice = (ACL(31, Id("digest", digest_id("alice:secret"))),)
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/alice", b"a", alice, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", True)),  # exists needs no READ
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"b", -1)),  # A's event only
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/alice", -1)),  # A's event only
    ])  # fmt: skip


def test_znodes_the_mirror_cannot_read_are_not_served_stale(mirrored: Mirrored) -> None:
    root = mirrored.root
    alice = (ACL(31, Id("digest", digest_id("alice:secret"))),)
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", False)),  # cached: absent
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, False)),  # cached: none
        ("A", OpCode.CREATE, CreateRequest(f"{root}/alice", b"a", alice, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", False)),  # NONODE on the mirror
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", False)),  # NONODE on the mirror
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, False)),  # [] on the mirror
        ("U", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("U", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"u", -1)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", False)),
    ])  # fmt: skip


def test_session_close_removes_ephemerals_and_fires_watches(mirrored: Mirrored) -> None:
    root = mirrored.root
    answers = []
    for side in (mirrored.pair.reference, mirrored.pair.candidate):
        a, b, u = side.clients["A"], side.clients["B"], side.clients["U"]
        a.call(OpCode.CREATE, CreateRequest(root, b"", C, 0))
        a.call(OpCode.CREATE, CreateRequest(f"{root}/e", b"", C, 1))
        a.call(OpCode.CREATE, CreateRequest(f"{root}/s-", b"", C, 3))
        b.call(OpCode.GET_DATA, PathWatchRequest(f"{root}/e", True))
        b.call(OpCode.GET_CHILDREN, PathWatchRequest(root, True))
        closed = a.call(OpCode.CLOSE_SESSION)
        # ZooKeeper deletes a session's ephemerals before it answers the
        # close; the mirror promises the same of the upstream.
        upstream_after_close = u.call(OpCode.GET_CHILDREN, PathWatchRequest(root, False))
        events = []
        while len(events) < 2:
            got = b.read_event()
            assert got is not None
            events.append((got[1].type, got[1].path))
        children = b.call(OpCode.GET_CHILDREN2, PathWatchRequest(root, False))
        answers.append(_strip((
            closed.header.err,
            side.normalize(upstream_after_close.decode(OpCode.GET_CHILDREN)),
            sorted(events),
            side.normalize(children.decode(OpCode.GET_CHILDREN2)),
        ), root))  # fmt: skip
    assert answers[1] == answers[0]
    assert answers[0][1]["children"] == []


def test_persistent_and_recursive_watches(mirrored: Mirrored) -> None:
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(root, 0)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(f"{root}/r", 1)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(f"{root}/r", 7)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/r", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/r/x", b"", C, 0)),
        ("U", OpCode.CREATE, CreateRequest(f"{root}/r/x/y", b"", C, 0)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/r/x/y", b"1", -1)),
        ("U", OpCode.SET_DATA, SetDataRequest(f"{root}/r/x/y", b"2", -1)),
        ("A", OpCode.SET_DATA, SetDataRequest(root, b"1", -1)),
        ("U", OpCode.SET_DATA, SetDataRequest(root, b"2", -1)),  # persistent: fires again
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(root, 1)),
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(root, 2)),
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(f"{root}/r/x", 3)),
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(root, 9)),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(root, 2)),
        ("A", OpCode.SET_DATA, SetDataRequest(root, b"3", -1)),  # data watch gone
        ("A", OpCode.CREATE, CreateRequest(f"{root}/z", b"", C, 0)),  # child watch stays
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(root, 3)),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(root, 3)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/z", -1)),
        ("U", OpCode.DELETE, DeleteRequest(f"{root}/r/x/y", -1)),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.CREATE, CreateRequest(f"{root}/r/m1", b"", C, 0)),
            (OpCode.CREATE, CreateRequest(f"{root}/r/m1/m2", b"", C, 0)),
            (OpCode.DELETE, DeleteRequest(f"{root}/r/m1/m2", -1)),
        ))),
    ])  # fmt: skip


def test_the_other_opcodes(mirrored: Mirrored) -> None:
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"r", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/e1", b"", C, 1)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/p", b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/p/e2", b"", C, 3)),
        ("A", OpCode.CREATE2, CreateRequest(f"{root}/p/e3", b"", C, 1)),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.CREATE, CreateRequest(f"{root}/p/e4", b"", C, 1)),
            (OpCode.CREATE2, CreateRequest(f"{root}/p/s-", b"", C, 2)),
        ))),
        ("U", OpCode.CREATE, CreateRequest(f"{root}/p/u", b"", C, 1)),  # U's, not A's
        # getEphemerals lists only what the mirror saw its clients create;
        # every ephemeral of A and B here was made through zkgate.
        ("A", OpCode.GET_EPHEMERALS, PathRequest(root)),
        ("A", OpCode.GET_EPHEMERALS, PathRequest(f"{root}/p")),
        ("A", OpCode.GET_EPHEMERALS, PathRequest(f"{root}/p/e")),
        ("B", OpCode.GET_EPHEMERALS, PathRequest(root)),
        ("A", OpCode.GET_ALL_CHILDREN_NUMBER, PathRequest(root)),
        ("A", OpCode.GET_ALL_CHILDREN_NUMBER, PathRequest(f"{root}/p")),
        ("A", OpCode.GET_ALL_CHILDREN_NUMBER, PathRequest(f"{root}/none")),
        ("A", OpCode.MULTI_READ, MultiReadRequest((
            (OpCode.GET_DATA, PathWatchRequest(root, True)),
            (OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
            (OpCode.GET_DATA, PathWatchRequest(f"{root}/none", False)),
            (OpCode.GET_CHILDREN, PathWatchRequest(f"{root}/p", False)),
        ))),
        ("B", OpCode.SET_DATA, SetDataRequest(root, b"changed", -1)),
        ("B", OpCode.CREATE, CreateRequest(f"{root}/new", b"", C, 0)),
        ("A", OpCode.MULTI_READ, MultiReadRequest(())),
        ("A", OpCode.MULTI, MultiRequest(())),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.CHECK, CheckVersionRequest(root, 1)),
            (OpCode.SET_DATA, SetDataRequest(root, b"m", 1)),
            (OpCode.DELETE, DeleteRequest(f"{root}/new", -1)),
        ))),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.CHECK, CheckVersionRequest(root, 7)),
            (OpCode.SET_DATA, SetDataRequest(root, b"n", -1)),
        ))),
        ("A", OpCode.GET_DATA, PathWatchRequest(root, False)),
        ("A", OpCode.WHO_AM_I, Empty()),
        ("A", OpCode.RECONFIG, ReconfigRequest(None, None, "server.1=127.0.0.1:1:2", -1)),
        ("A", OpCode.SASL, GetSASLRequest(b"token")),
        ("A", OpCode.SYNC, PathRequest(root)),
        ("U", OpCode.SET_DATA, SetDataRequest(root, b"behind", -1)),
        ("B", OpCode.SYNC, PathRequest(f"{root}/p")),
        ("B", OpCode.GET_DATA, PathWatchRequest(root, False)),
        ("A", OpCode.SYNC, PathRequest(f"{root}/none")),
    ])  # fmt: skip


def test_multi_with_a_malformed_path_is_one_multi(mirrored: Mirrored) -> None:
    """A relative path belongs to no backend: the multi still goes upstream
    whole, which answers it per op (it once was refused as crossing mounts)."""
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.CREATE, CreateRequest(f"{root}/a", b"", C, 0)),
            (OpCode.DELETE, DeleteRequest("x", -1)),
        ))),
        ("A", OpCode.EXISTS, PathWatchRequest(f"{root}/a", False)),
    ])  # fmt: skip


def test_multi_results_show_the_downstream_owner(mirrored: Mirrored) -> None:
    root = mirrored.root
    _scenario(mirrored, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/e", b"", C, 1)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/e", b"1", -1)),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.SET_DATA, SetDataRequest(f"{root}/e", b"2", -1)),
        ))),
    ])  # fmt: skip
