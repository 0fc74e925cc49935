"""Differential tests: zkgate's answers against real ZooKeeper 3.8's.

Randomized request sequences (hypothesis) run on two clients of each server;
every answer (error code, decoded body, stats with zxids mapped to the step
that made them, and the watch events each client received) must match.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.zk.codec.protocol import CreateMode, OpCode
from dispatcher.zk.codec.records import (
    ACL,
    OPEN_ACL_UNSAFE,
    AddWatchRequest,
    AuthPacket,
    CheckVersionRequest,
    CreateRequest,
    CreateTTLRequest,
    DeleteRequest,
    Empty,
    GetChildrenResponse,
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
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer, four_letter, wait_for
from tests.zkwire import WireClient

# A small universe of names makes collisions (NODEEXISTS, NOTEMPTY, watches that
# fire) frequent; a few illegal paths check the argument errors.
NAMES = ["a", "b", "a/c", "a/c/d", "b/e", "a/f"]
# ("" and "/" are left out: both name the root, whose children and counters
# differ between the shared reference server and a fresh zkgate.)
ILLEGAL = ["x", "//", "/./y", "/a/"]

clients = st.sampled_from(["A", "B"])
versions = st.sampled_from([-1, -1, 0, 1, 2])
datas = st.sampled_from([b"", b"v1", b"value-2", None])
modes = st.sampled_from(list(CreateMode)[:4])
watch = st.booleans()


@st.composite
def paths(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 19)) == 0:
        return "!" + draw(st.sampled_from(ILLEGAL))
    return draw(st.sampled_from(NAMES))


def _write_ops() -> st.SearchStrategy[tuple[int, Record]]:
    return st.one_of(
        st.builds(lambda p, d, m: (OpCode.CREATE, CreateRequest(p, d, OPEN_ACL_UNSAFE, m)),
                  paths(), datas, modes),
        st.builds(lambda p, d, m: (OpCode.CREATE2, CreateRequest(p, d, OPEN_ACL_UNSAFE, m)),
                  paths(), datas, modes),
        st.builds(lambda p, v: (OpCode.DELETE, DeleteRequest(p, v)), paths(), versions),
        st.builds(lambda p, d, v: (OpCode.SET_DATA, SetDataRequest(p, d, v)),
                  paths(), datas, versions),
    )  # fmt: skip


def _multi_ops() -> st.SearchStrategy[tuple[int, Record]]:
    check = st.builds(lambda p, v: (OpCode.CHECK, CheckVersionRequest(p, v)), paths(), versions)
    sub = st.one_of(_write_ops(), check)
    return st.builds(lambda ops: (OpCode.MULTI, MultiRequest(tuple(ops))),
                     st.lists(sub, min_size=0, max_size=4))  # fmt: skip


def _read_ops() -> st.SearchStrategy[tuple[int, Record]]:
    return st.one_of(
        st.builds(lambda p, w: (OpCode.EXISTS, PathWatchRequest(p, w)), paths(), watch),
        st.builds(lambda p, w: (OpCode.GET_DATA, PathWatchRequest(p, w)), paths(), watch),
        st.builds(lambda p, w: (OpCode.GET_CHILDREN, PathWatchRequest(p, w)), paths(), watch),
        st.builds(lambda p, w: (OpCode.GET_CHILDREN2, PathWatchRequest(p, w)), paths(), watch),
        st.builds(lambda p: (OpCode.GET_ACL, PathRequest(p)), paths()),
        st.builds(lambda p: (OpCode.SYNC, PathRequest(p)), paths()),
    )


steps = st.lists(
    st.tuples(clients, st.one_of(_write_ops(), _read_ops(), _multi_ops())),
    min_size=1,
    max_size=25,
)


def _rooted(record: Record, root: str) -> Record:
    """Put the record's symbolic path under this example's root."""
    import attrs

    if isinstance(record, MultiRequest):
        return MultiRequest(tuple((op, _rooted(r, root)) for op, r in record.ops))
    path: str = record.path  # type: ignore[attr-defined]  # each drawn request but Multi has one
    real = path[1:] if path.startswith("!") else f"{root}/{path}"
    if path.startswith("!/") and len(path) > 2:
        real = root + path[1:]
    return attrs.evolve(record, path=real)  # type: ignore[misc]  # Record is a protocol; all attrs


def _strip(value: object, root: str) -> object:
    """Remove the example's root from paths in an answer, so both sides compare."""
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, dict):
        return {k: _strip(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strip(v, root) for v in value]
    return value


@pytest.fixture
def pair(zookeeper: ZooKeeperServer, zkgate: ZkgateServer) -> Iterator[Pair]:
    p = Pair(Side(zookeeper.host, zookeeper.port), Side(zkgate.host, zkgate.port))
    yield p
    p.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=steps)
def test_random_sequences_match_zookeeper(pair: Pair, sequence: list) -> None:
    root = f"/diff-{next(_roots)}"
    for side in (pair.reference, pair.candidate):
        side.clients["A"].call(OpCode.CREATE, CreateRequest(root, b"", OPEN_ACL_UNSAFE, 0))
    for who, (opcode, record) in sequence:
        request = _rooted(record, root)
        expected, actual = pair.run(who, opcode, request)
        assert _strip(actual, root) == _strip(expected, root), (who, opcode, request)


_roots = itertools.count()


def _scenario(pair: Pair, root: str, script: list[tuple[str, int, Record | None]]) -> None:
    for who, opcode, record in script:
        expected, actual = pair.run(who, opcode, record)
        assert _strip(actual, root) == _strip(expected, root), (who, opcode, record)


def test_watch_kinds_and_one_shot(pair: Pair) -> None:
    root = "/diff-watches"
    c = OPEN_ACL_UNSAFE
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", c, 0)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/n", True)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/n", b"1", c, 0)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/n", True)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(f"{root}/n", True)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/n", b"2", -1)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/n", b"3", -1)),  # one-shot: no event
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/n", True)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/n", -1)),  # data+child watch: one event
        ("A", OpCode.CREATE, CreateRequest(f"{root}/n", b"", c, 0)),  # no watch left
    ])  # fmt: skip


def test_set_watches_replays_what_changed(pair: Pair) -> None:
    root = "/diff-setwatches"
    c = OPEN_ACL_UNSAFE
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/same", b"", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/changed", b"", c, 0)),
    ])  # fmt: skip
    # relative zxid = the zxid of the last step, on each server: only what
    # changed after it fires at once, the rest is re-armed.
    expected, actual = [], []
    for side, out in ((pair.reference, expected), (pair.candidate, actual)):
        last = max(side.zxid_labels)
        side.clients["A"].call(OpCode.SET_DATA, SetDataRequest(f"{root}/changed", b"x", -1))
        reply = side.clients["B"].call(OpCode.SET_WATCHES, SetWatches(
            last,
            (f"{root}/same", f"{root}/changed", f"{root}/gone"),
            (f"{root}/same", f"{root}/new"),
            (root,),
        ), xid=-8)  # fmt: skip
        out.append((reply.header.err, [(e.type, e.path) for _, e in reply.events]))
        side.clients["A"].call(OpCode.CREATE, CreateRequest(f"{root}/new", b"", c, 0))
        side.clients["A"].call(OpCode.SET_DATA, SetDataRequest(f"{root}/same", b"y", -1))
        ping = side.clients["B"].call(OpCode.PING)
        out.append([(e.type, e.path) for _, e in ping.events])
    assert actual == expected


def _acl(scheme: str, ident: str) -> tuple[ACL, ...]:
    return (ACL(31, Id(scheme, ident)),)


def test_acl_answers_match(pair: Pair) -> None:
    root = "/diff-acl"
    c = OPEN_ACL_UNSAFE
    read_only = (ACL(1, Id("world", "anyone")),)
    digest = (ACL(31, Id("digest", "bob:Zm9vYmFy")),)
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro", b"", read_only, 0)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/ro", b"x", -1)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/ro/child", b"", c, 0)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/ro")),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/secret", b"s", digest, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/secret", False)),
        ("A", OpCode.GET_ACL, PathRequest(f"{root}/secret")),
        ("A", OpCode.EXISTS, PathWatchRequest(f"{root}/secret", False)),
        ("A", OpCode.SET_ACL, SetACLRequest(f"{root}/ro", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", _acl("digest", "nocolon"), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", _acl("auth", ""), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", _acl("ip", "10.0.0.0/8"), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad2", b"", _acl("ip", "not-an-ip"), 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad3", b"", _acl("world", "x"), 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/bad", False)),
    ])  # fmt: skip


def test_session_close_removes_ephemerals_and_fires_watches(
    zookeeper: ZooKeeperServer, zkgate: ZkgateServer
) -> None:
    root = "/diff-session"
    answers = []
    for server in (zookeeper, zkgate):
        side = Side(server.host, server.port)
        a, b = side.clients["A"], side.clients["B"]
        a.call(OpCode.CREATE, CreateRequest(root, b"", OPEN_ACL_UNSAFE, 0))
        a.call(OpCode.CREATE, CreateRequest(f"{root}/e", b"", OPEN_ACL_UNSAFE, 1))
        a.call(OpCode.CREATE, CreateRequest(f"{root}/s-", b"", OPEN_ACL_UNSAFE, 3))
        b.call(OpCode.GET_DATA, PathWatchRequest(f"{root}/e", True))
        b.call(OpCode.GET_CHILDREN, PathWatchRequest(root, True))
        closed = a.call(OpCode.CLOSE_SESSION)
        events = []
        while len(events) < 2:
            got = b.read_event()
            assert got is not None
            events.append((got[1].type, got[1].path))
        children = b.call(OpCode.GET_CHILDREN2, PathWatchRequest(root, False))
        answers.append(
            (
                closed.header.err,
                sorted(events),
                side.normalize(children.decode(OpCode.GET_CHILDREN2)),
            )
        )
        side.close()
    assert answers[1] == answers[0]


def test_persistent_and_recursive_watches(pair: Pair) -> None:
    root = "/diff-persistent"
    c = OPEN_ACL_UNSAFE
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", c, 0)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(root, 0)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(f"{root}/r", 1)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(f"{root}/r", 7)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/r", b"", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/r/x", b"", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/r/x/y", b"", c, 0)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/r/x/y", b"1", -1)),
        ("A", OpCode.SET_DATA, SetDataRequest(root, b"1", -1)),
        ("A", OpCode.SET_DATA, SetDataRequest(root, b"2", -1)),  # persistent: fires again
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(root, 1)),
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(root, 2)),
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(f"{root}/r/x", 3)),
        ("B", OpCode.CHECK_WATCHES, WatchesRequest(root, 9)),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(root, 2)),
        ("A", OpCode.SET_DATA, SetDataRequest(root, b"3", -1)),  # data watch gone
        ("A", OpCode.CREATE, CreateRequest(f"{root}/z", b"", c, 0)),  # child watch stays
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(root, 3)),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(root, 3)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/z", -1)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/r/x/y", -1)),
    ])  # fmt: skip


def test_the_other_opcodes(pair: Pair) -> None:
    root = "/diff-other"
    c = OPEN_ACL_UNSAFE
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"r", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/e1", b"", c, 1)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/p", b"", c, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/p/e2", b"", c, 3)),
        ("A", OpCode.GET_EPHEMERALS, PathRequest(root)),
        ("A", OpCode.GET_EPHEMERALS, PathRequest(f"{root}/p")),
        ("B", OpCode.GET_EPHEMERALS, PathRequest(root)),
        ("A", OpCode.GET_ALL_CHILDREN_NUMBER, PathRequest(root)),
        ("A", OpCode.GET_ALL_CHILDREN_NUMBER, PathRequest(f"{root}/none")),
        ("A", OpCode.MULTI_READ, MultiReadRequest((
            (OpCode.GET_DATA, PathWatchRequest(root, True)),
            (OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
            (OpCode.GET_DATA, PathWatchRequest(f"{root}/none", False)),
        ))),
        ("B", OpCode.SET_DATA, SetDataRequest(root, b"changed", -1)),
        ("B", OpCode.CREATE, CreateRequest(f"{root}/new", b"", c, 0)),
        ("A", OpCode.MULTI_READ, MultiReadRequest(())),
        ("A", OpCode.WHO_AM_I, Empty()),
        ("A", OpCode.RECONFIG, ReconfigRequest(None, None, "server.1=127.0.0.1:1:2", -1)),
        ("A", OpCode.SASL, GetSASLRequest(b"token")),
        ("A", OpCode.SYNC, PathRequest(root)),
    ])  # fmt: skip


def test_digest_auth_is_enforced_like_zookeeper(pair: Pair) -> None:
    root = "/diff-auth"
    c = OPEN_ACL_UNSAFE
    alice = (ACL(31, Id("digest", digest_id("alice:secret"))),)
    creator_only = (ACL(31, Id("auth", "")),)
    read_only_alice = (
        ACL(1, Id("digest", digest_id("alice:secret"))),
        ACL(8, Id("world", "anyone")),
    )
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", c, 0)),
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
        ("B", OpCode.CREATE, CreateRequest(f"{root}/alice/kid", b"", c, 0)),
        ("B", OpCode.SET_ACL, SetACLRequest(f"{root}/alice", c, -1)),
        ("B", OpCode.MULTI_READ, MultiReadRequest((
            (OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", False)),
            (OpCode.GET_CHILDREN, PathWatchRequest(f"{root}/alice", False)),
        ))),
        ("B", OpCode.MULTI, MultiRequest((
            (OpCode.CHECK, CheckVersionRequest(f"{root}/alice", -1)),
            (OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"y", -1)),
        ))),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"x", -1)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/ro", b"x", -1)),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/ro", False)),
        ("B", OpCode.AUTH, AuthPacket(0, "digest", b"alice:wrong")),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/ro", False)),
        ("B", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("B", OpCode.GET_DATA, PathWatchRequest(f"{root}/ro", False)),
        ("B", OpCode.SET_ACL, SetACLRequest(f"{root}/alice", c, 5)),
        ("B", OpCode.SET_ACL, SetACLRequest(f"{root}/alice", c, 0)),
        ("B", OpCode.WHO_AM_I, Empty()),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/ro", -1)),
    ])  # fmt: skip


def test_watch_events_go_only_to_watchers_that_may_read(pair: Pair) -> None:
    """ZooKeeper 3.8 as patched for CVE-2024-23944 (the Debian package here)
    tells a watcher of a change only if it may READ the znode: an exists
    watch needs no permission to set, but hears nothing of alice's znode."""
    root = "/diff-watch-acl"
    alice = (ACL(31, Id("digest", digest_id("alice:secret"))),)
    _scenario(pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", OPEN_ACL_UNSAFE, 0)),
        ("A", OpCode.AUTH, AuthPacket(0, "digest", b"alice:secret")),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/alice", b"a", alice, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", True)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(root, True)),
        ("A", OpCode.SET_DATA, SetDataRequest(f"{root}/alice", b"b", -1)),
        ("A", OpCode.GET_DATA, PathWatchRequest(f"{root}/alice", True)),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/alice", -1)),
        ("B", OpCode.EXISTS, PathWatchRequest(f"{root}/alice", True)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/alice", b"a", alice, 0)),
    ])  # fmt: skip


def test_unknown_auth_scheme_closes_like_zookeeper(
    zookeeper: ZooKeeperServer, zkgate: ZkgateServer
) -> None:
    answers = []
    for server in (zookeeper, zkgate):
        client = WireClient(server.host, server.port)
        client.connect()
        reply = client.call(OpCode.AUTH, AuthPacket(0, "kerberos", b"x"), xid=-4)
        answers.append((reply.header.xid, reply.header.err, client.is_closed_by_server()))
        client.close()
    assert answers[1] == answers[0] == (-4, -115, True)


@pytest.fixture
def extended_pair(
    zookeeper_factory: ServerFactory[ZooKeeperServer], zkgate_factory: ServerFactory[ZkgateServer]
) -> Iterator[Pair]:
    zookeeper = zookeeper_factory(system_properties={
        "zookeeper.extendedTypesEnabled": "true", "znode.container.checkIntervalMs": 100,
    })  # fmt: skip
    zkgate = zkgate_factory(["--extended-types", "--container-check-ms", "100"])
    p = Pair(Side(zookeeper.host, zookeeper.port), Side(zkgate.host, zkgate.port))
    yield p
    p.close()


def test_containers_and_ttl_nodes(extended_pair: Pair) -> None:
    root = "/diff-containers"
    c = OPEN_ACL_UNSAFE
    _scenario(extended_pair, root, [
        ("A", OpCode.CREATE, CreateRequest(root, b"", c, 0)),
        ("A", OpCode.CREATE_CONTAINER, CreateRequest(f"{root}/box", b"", c, 4)),
        ("A", OpCode.CREATE_CONTAINER, CreateRequest(f"{root}/unused", b"", c, 4)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/box/item", b"", c, 0)),
        ("A", OpCode.CREATE_TTL, CreateTTLRequest(f"{root}/ttl", b"", c, 5, 200)),
        ("A", OpCode.CREATE_TTL, CreateTTLRequest(f"{root}/ttl-", b"", c, 6, 200)),
        ("A", OpCode.CREATE_TTL, CreateTTLRequest(f"{root}/bad", b"", c, 5, 0)),
        ("A", OpCode.CREATE_TTL, CreateTTLRequest(f"{root}/bad", b"", c, 0, 100)),
        ("A", OpCode.CREATE, CreateRequest(f"{root}/bad", b"", c, 5)),
        ("A", OpCode.MULTI, MultiRequest((
            (OpCode.CREATE_CONTAINER, CreateRequest(f"{root}/mbox", b"", c, 4)),
        ))),
        ("A", OpCode.DELETE, DeleteRequest(f"{root}/box/item", -1)),
    ])  # fmt: skip
    # Both reapers run every 100 ms: wait until each server has reaped what it
    # should, then compare what is left and the events B saw.
    for side in (extended_pair.reference, extended_pair.candidate):
        client = side.clients["A"]

        def reaped(client: WireClient = client) -> bool:
            reply = client.call(OpCode.GET_CHILDREN, PathWatchRequest(root, False))
            children = reply.decode(OpCode.GET_CHILDREN)
            assert isinstance(children, GetChildrenResponse)
            return sorted(children.children) == ["mbox", "unused"]

        wait_for(reaped, timeout=15, message="the used container and the TTL nodes to be reaped")
    expected, actual = extended_pair.run("B", OpCode.GET_CHILDREN2, PathWatchRequest(root, False))
    assert _strip(actual, root) == _strip(expected, root)
    stripped = _strip(actual, root)
    assert isinstance(stripped, dict) and stripped["body"]["children"] == ["mbox", "unused"]


def test_connections_per_ip_are_capped_like_zookeeper(
    zookeeper_factory: ServerFactory[ZooKeeperServer], zkgate_factory: ServerFactory[ZkgateServer]
) -> None:
    servers = [
        zookeeper_factory(config={"maxClientCnxns": 3}),
        zkgate_factory(["--max-client-cnxns", "3"]),
    ]
    for server in servers:
        clients = [WireClient(server.host, server.port) for _ in range(3)]
        sessions = [client.connect().session_id for client in clients]
        assert all(sessions)
        # Closed unanswered: EOF, a reset, or (when the close wins the race
        # with the connect itself) a broken pipe.
        with pytest.raises(OSError), WireClient(server.host, server.port) as extra:
            extra.connect()
        clients.pop().close()
        # A freed slot is usable again; the server notices the close first.
        wait_for(lambda server=server: _connects(server), timeout=10,
                 message="a connection slot to free up")  # fmt: skip
        for client in clients:
            client.close()


def _connects(server: ZooKeeperServer | ZkgateServer) -> bool:
    try:
        with WireClient(server.host, server.port) as client:
            return client.connect().session_id != 0
    except OSError:  # refused, reset or closed: the slot is not free yet
        return False


FOUR_LETTER_WORDS = ["ruok", "srvr", "stat", "mntr", "cons", "crst", "dump", "envi", "conf",
                     "wchs", "wchc", "wchp", "isro", "srst"]  # fmt: skip


@pytest.mark.parametrize("word", FOUR_LETTER_WORDS)
def test_every_four_letter_word_answers_and_closes(
    zookeeper: ZooKeeperServer, zkgate_factory: ServerFactory[ZkgateServer], word: str
) -> None:
    """Monitoring scripts read until EOF: each word gets its answer, then the close."""
    # Both whitelist every word (the harness's ZooKeeper has 4lw.commands.whitelist=*).
    zkgate = zkgate_factory(["--4lw", "*"])
    answers = {}
    for name, server in (("zookeeper", zookeeper), ("zkgate", zkgate)):
        # four_letter reads until the server closes; a hang would time it out.
        answers[name] = four_letter(server.host, server.port, word, timeout=10)
    assert answers["zkgate"], word
    first_line = {name: text.splitlines()[0].split(":")[0].split("\t")[0].split("=")[0]
                  for name, text in answers.items() if text}  # fmt: skip
    if word in ("ruok", "isro", "srst", "crst", "srvr", "stat", "mntr", "envi"):
        assert first_line["zkgate"] == first_line["zookeeper"], answers


def test_set_watches2_replays_persistent_watches(pair: Pair) -> None:
    root = "/diff-setwatches2"
    c = OPEN_ACL_UNSAFE
    _scenario(pair, root, [("A", OpCode.CREATE, CreateRequest(root, b"", c, 0))])
    results = []
    for side in (pair.reference, pair.candidate):
        last = max(side.zxid_labels)
        # B re-arms, as a client does after a reconnect: a persistent watch on
        # the root and a recursive one below it.
        reply = side.clients["B"].call(OpCode.SET_WATCHES2, SetWatches2(
            last, (), (), (), (root,), (f"{root}/tree",),
        ))  # fmt: skip
        a = side.clients["A"]
        a.call(OpCode.CREATE, CreateRequest(f"{root}/tree", b"", c, 0))
        a.call(OpCode.CREATE, CreateRequest(f"{root}/tree/leaf", b"", c, 0))
        a.call(OpCode.SET_DATA, SetDataRequest(root, b"1", -1))
        a.call(OpCode.SET_DATA, SetDataRequest(root, b"2", -1))
        ping = side.clients["B"].call(OpCode.PING)
        results.append((reply.header.err, [(e.type, e.path) for _, e in ping.events]))
    assert results[1] == results[0]
    assert (3, root) in results[0][1]  # persistent: both data changes fire
