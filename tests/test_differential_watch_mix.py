"""Differential tests: persistent and one-shot watches mixed on one path.

ZooKeeper 3.8 keeps a data-watch table and a child-watch table, each with its
own mode per (connection, path): ``addWatch`` writes both, a one-shot read
writes one (see dispatcher/zk/server/watches.py). So a connection that mixes an
``addWatch`` with getData/exists/getChildren watches on one path, or on a
parent and its child, hears a mix of both kinds' events, and what it hears
depends on the order. Every mix below runs on real ZooKeeper 3.8 and on
zkgate (the embedded tree, and a mirror of a second ZooKeeper), and every
step's answer and the events each client got must be the same: client B sets
the watches, client A makes the changes of zkgate issue #14's sequence.

Also here: ``deleteContainer`` sent by a client (ZooKeeper answers
BADARGUMENTS and keeps the connection).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from dispatcher.zk.codec.protocol import Err, EventType, OpCode
from dispatcher.zk.codec.records import (
    OPEN_ACL_UNSAFE,
    AddWatchRequest,
    CreateRequest,
    DeleteRequest,
    PathRequest,
    PathWatchRequest,
    Record,
    SetDataRequest,
    SetWatches2,
    WatchesRequest,
)
from tests.differential import Pair, Side
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer
from tests.test_differential import _strip
from tests.test_differential_mirror import MOUNT, Servers, _check_step, _ensure, open_pair
from tests.zkwire import WireClient

C = OPEN_ACL_UNSAFE
PERSISTENT, RECURSIVE = 0, 1
Step = tuple[str, int, Record | None]

#: The one-shot reads that set a watch, by the name a case id uses.
ONE_SHOT = {
    "getData": OpCode.GET_DATA,
    "exists": OpCode.EXISTS,
    "getChildren": OpCode.GET_CHILDREN,
}
MODES = {"persistent": PERSISTENT, "recursive": RECURSIVE}


@attrs.frozen
class Mix:
    """B's watches: an addWatch on ``/w`` and a one-shot read of ``/w`` (or of
    its existing child ``/w/z``), in either order, then optionally a
    removeWatches of one type on ``/w``."""

    mode: str
    read: str
    persistent_first: bool
    on_child: bool = False
    remove: int | None = None

    @property
    def id(self) -> str:
        order = "addWatch-then-read" if self.persistent_first else "read-then-addWatch"
        where = "-read-on-child" if self.on_child else ""
        removed = f"-remove{self.remove}" if self.remove is not None else ""
        return f"{self.mode}-{self.read}-{order}{where}{removed}"

    def watches(self, w: str) -> list[Step]:
        add: Step = ("B", OpCode.ADD_WATCH, AddWatchRequest(w, MODES[self.mode]))
        target = f"{w}/z" if self.on_child else w
        read: Step = ("B", ONE_SHOT[self.read], PathWatchRequest(target, True))
        steps = [add, read] if self.persistent_first else [read, add]
        if self.remove is not None:
            steps.append(("B", OpCode.REMOVE_WATCHES, WatchesRequest(w, self.remove)))
        return steps


MIXES = [
    Mix(mode, read, first, on_child, remove)
    for mode in MODES
    for read in ONE_SHOT
    for first in (True, False)
    for on_child, removes in ((False, (None, 1, 2, 3)), (True, (None,)))
    for remove in removes
]


def _checks(who: str, *paths: str) -> list[Step]:
    return [
        (who, OpCode.CHECK_WATCHES, WatchesRequest(path, kind))
        for path in paths
        for kind in (1, 2, 3)
    ]


def issue_sequence(w: str, writer: str = "A") -> list[Step]:
    """Issue #14's writes (create and set /w/x, set /w, create /w/y, delete
    /w/x, set /w), then changes of the child /w/z and below it."""
    return [
        (writer, OpCode.CREATE, CreateRequest(f"{w}/x", b"", C, 0)),
        (writer, OpCode.SET_DATA, SetDataRequest(f"{w}/x", b"1", -1)),
        (writer, OpCode.SET_DATA, SetDataRequest(w, b"1", -1)),
        (writer, OpCode.CREATE, CreateRequest(f"{w}/y", b"", C, 0)),
        (writer, OpCode.DELETE, DeleteRequest(f"{w}/x", -1)),
        (writer, OpCode.SET_DATA, SetDataRequest(w, b"2", -1)),
        (writer, OpCode.SET_DATA, SetDataRequest(f"{w}/z", b"1", -1)),
        (writer, OpCode.CREATE, CreateRequest(f"{w}/z/k", b"", C, 0)),
        (writer, OpCode.SET_DATA, SetDataRequest(f"{w}/z/k", b"1", -1)),
        (writer, OpCode.DELETE, DeleteRequest(f"{w}/z/k", -1)),
        (writer, OpCode.DELETE, DeleteRequest(f"{w}/z", -1)),
        (writer, OpCode.CREATE, CreateRequest(f"{w}/z", b"", C, 0)),
        (writer, OpCode.DELETE, DeleteRequest(f"{w}/y", -1)),
    ]


def mix_script(w: str, mix: Mix, writer: str = "A") -> list[Step]:
    return [
        ("A", OpCode.CREATE, CreateRequest(w, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{w}/z", b"", C, 0)),
        *mix.watches(w),
        *_checks("B", w, f"{w}/z"),
        *issue_sequence(w, writer),
        *_checks("B", w, f"{w}/z"),
    ]


#: Two addWatch calls on one path, and the one-shot reads around them.
ADD_P, ADD_R = (OpCode.ADD_WATCH, "persistent"), (OpCode.ADD_WATCH, "recursive")
SEQUENCES: dict[str, list[tuple[int, str]]] = {
    "persistent-then-recursive": [ADD_P, ADD_R],
    "recursive-then-persistent": [ADD_R, ADD_P],
    "getData-getChildren-then-recursive": [
        (OpCode.GET_DATA, ""), (OpCode.GET_CHILDREN, ""), ADD_R,
    ],
    "recursive-then-getData-getChildren": [
        ADD_R, (OpCode.GET_DATA, ""), (OpCode.GET_CHILDREN, ""),
    ],
    "persistent-getChildren-recursive": [
        ADD_P, (OpCode.GET_CHILDREN, ""), ADD_R,
    ],
}  # fmt: skip


def sequence_script(w: str, calls: list[tuple[int, str]]) -> list[Step]:
    steps: list[Step] = [
        ("A", OpCode.CREATE, CreateRequest(w, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{w}/z", b"", C, 0)),
    ]
    for opcode, mode in calls:
        record: Record = (
            AddWatchRequest(w, MODES[mode]) if opcode == OpCode.ADD_WATCH
            else PathWatchRequest(w, True)
        )  # fmt: skip
        steps.append(("B", opcode, record))
    return [*steps, *_checks("B", w), *issue_sequence(w), *_checks("B", w)]


def other_watcher_script(w: str) -> list[Step]:
    """checkWatches and removeWatches while ANOTHER connection watches the path:
    ZooKeeper 3.8.0's checkWatches looks at the path, not at the asker."""
    return [
        ("A", OpCode.CREATE, CreateRequest(w, b"", C, 0)),
        ("A", OpCode.GET_DATA, PathWatchRequest(w, True)),
        ("A", OpCode.ADD_WATCH, AddWatchRequest(f"{w}/r", RECURSIVE)),
        ("A", OpCode.GET_CHILDREN, PathWatchRequest(w, True)),
        *_checks("B", w, f"{w}/r", f"{w}/r/below"),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(w, 2)),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(w, 3)),
        ("B", OpCode.REMOVE_WATCHES, WatchesRequest(f"{w}/r", 3)),
        ("B", OpCode.SET_DATA, SetDataRequest(w, b"1", -1)),
        *_checks("B", w),
        *_checks("A", w, f"{w}/r"),
        ("A", OpCode.REMOVE_WATCHES, WatchesRequest(f"{w}/r", 1)),
        *_checks("B", f"{w}/r"),
        ("B", OpCode.CREATE, CreateRequest(f"{w}/r", b"", C, 0)),
        ("B", OpCode.CREATE, CreateRequest(f"{w}/r/x", b"", C, 0)),
        ("A", OpCode.REMOVE_WATCHES, WatchesRequest(f"{w}/r", 2)),
        *_checks("B", f"{w}/r"),
        ("B", OpCode.DELETE, DeleteRequest(f"{w}/r/x", -1)),
    ]


def _unique(name: str) -> str:
    return f"mix-{name}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------ the embedded tree


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkgateServer]:
    """One zkgate (embedded tree) for every case of this module: each case
    has its own root and its own sessions."""
    factory = ServerFactory(ZkgateServer, tmp_path_factory.mktemp("gate"), "zkgate")
    try:
        yield factory()
    finally:
        factory.close()


@pytest.fixture
def pair(zookeeper: ZooKeeperServer, gate: ZkgateServer) -> Iterator[Pair]:
    p = Pair(Side(zookeeper.host, zookeeper.port), Side(gate.host, gate.port))
    try:
        yield p
    finally:
        p.close()


def _run(pair: Pair, root: str, script: list[Step]) -> list[dict]:
    """Each step on both servers; the reference's answers, for further checks."""
    answers = []
    for who, opcode, record in script:
        expected, actual = pair.run(who, opcode, record)
        assert _strip(actual, root) == _strip(expected, root), (who, opcode, record)
        answers.append(expected)
    return answers


def _events_of(answers: list[dict], who: str) -> list[tuple[int, str]]:
    return [event for answer in answers for event in answer["events"][who]]


def test_issue_sequence_gives_every_event(pair: Pair) -> None:
    """The issue's case: a recursive watch and a getChildren watch on /w hear
    seven events of the six writes (zkgate used to deliver two)."""
    w = f"/{_unique('issue')}"
    answers = _run(pair, w, [
        ("A", OpCode.CREATE, CreateRequest(w, b"", C, 0)),
        ("B", OpCode.ADD_WATCH, AddWatchRequest(w, RECURSIVE)),
        ("B", OpCode.GET_CHILDREN, PathWatchRequest(w, True)),
        *issue_sequence(w)[:6],
    ])  # fmt: skip
    assert sorted(_events_of(answers, "B")) == sorted([
        (EventType.NODE_CREATED, f"{w}/x"),
        (EventType.NODE_CHILDREN_CHANGED, w),
        (EventType.NODE_DATA_CHANGED, f"{w}/x"),
        (EventType.NODE_DATA_CHANGED, w),
        (EventType.NODE_CREATED, f"{w}/y"),
        (EventType.NODE_DELETED, f"{w}/x"),
        (EventType.NODE_DATA_CHANGED, w),
    ])  # fmt: skip


@pytest.mark.parametrize("mix", MIXES, ids=lambda mix: mix.id)
def test_persistent_and_one_shot_watches_mixed(pair: Pair, mix: Mix) -> None:
    w = f"/{_unique('m')}"
    _run(pair, w, mix_script(w, mix))


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_successive_registrations_on_one_path(pair: Pair, name: str) -> None:
    w = f"/{_unique('s')}"
    _run(pair, w, sequence_script(w, SEQUENCES[name]))


def test_check_and_remove_watches_with_another_watcher(pair: Pair) -> None:
    w = f"/{_unique('other')}"
    _run(pair, w, other_watcher_script(w))


#: A relative zxid above any the servers reached: setWatches re-arms every
#: watch instead of reporting a change, alike on both servers.
FUTURE = 2**62


@pytest.mark.parametrize("packets", ["one-packet", "persistent-packet-first"])
def test_set_watches2_mixing_persistent_and_one_shot_lists(pair: Pair, packets: str) -> None:
    """One packet: ZooKeeper applies its one-shot lists, then its persistent
    ones, which win in both tables. Two packets, persistent first (how a
    client restores a mix after a reconnect): the one-shot watches win."""
    w = f"/{_unique('sw2')}"
    if packets == "one-packet":
        arm: list[Step] = [("B", OpCode.SET_WATCHES2, SetWatches2(
            FUTURE, (w,), (f"{w}/x",), (w,), (), (w,),
        ))]  # fmt: skip
    else:
        arm = [
            ("B", OpCode.SET_WATCHES2, SetWatches2(FUTURE, (), (), (), (), (w,))),
            ("B", OpCode.SET_WATCHES2, SetWatches2(FUTURE, (w,), (f"{w}/x",), (w,), (), ())),
        ]
    _run(pair, w, [
        ("A", OpCode.CREATE, CreateRequest(w, b"", C, 0)),
        ("A", OpCode.CREATE, CreateRequest(f"{w}/z", b"", C, 0)),
        *arm,
        *_checks("B", w, f"{w}/x"),
        *issue_sequence(w),
        *_checks("B", w, f"{w}/x"),
    ])  # fmt: skip


def test_session_close_drops_mixed_watches(pair: Pair) -> None:
    """A closed connection's watches go from both tables, whatever their modes."""
    w = f"/{_unique('close')}"
    answers = []
    for side in (pair.reference, pair.candidate):
        b = side.clients["B"]
        b.call(OpCode.CREATE, CreateRequest(w, b"", C, 0))
        b.call(OpCode.ADD_WATCH, AddWatchRequest(w, RECURSIVE))
        b.call(OpCode.GET_CHILDREN, PathWatchRequest(w, True))
        b.call(OpCode.GET_DATA, PathWatchRequest(w, True))
        b.call(OpCode.CLOSE_SESSION)
        # ZooKeeper drops a connection's watches when it closes the socket,
        # after it has sent the close's reply: B's EOF is the moment they go.
        assert b.read_frame() is None
        a = side.clients["A"]
        answers.append([
            Err(a.call(OpCode.CHECK_WATCHES, WatchesRequest(w, kind)).header.err).name
            for kind in (1, 2, 3)
        ])  # fmt: skip
    assert answers[1] == answers[0] == ["NOWATCHER"] * 3


# ------------------------------------------------------------ deleteContainer


def _raw_call(client: WireClient, opcode: int, body: bytes) -> tuple[int, int]:
    """Send a request with exactly ``body``; (err, reply zxid)."""
    xid = client.next_xid()
    client.send_frame(struct.pack(">ii", xid, opcode) + body)
    reply = client.receive(xid)
    return reply.header.err, reply.header.zxid


def test_delete_container_from_a_client_is_refused_and_the_connection_stays(
    zookeeper: ZooKeeperServer, gate: ZkgateServer
) -> None:
    """ZooKeeper reads deleteContainer's path from the whole request buffer
    (header included), which always holds a NUL: BADARGUMENTS, whatever the
    body, with a zxid taken as for any failed write; the container stays."""
    root = f"/{_unique('container')}"
    box = f"{root}/box"
    answers = []
    for server in (zookeeper, gate):
        with WireClient(server.host, server.port) as client:
            client.connect()
            client.call(OpCode.CREATE, CreateRequest(root, b"", C, 0))
            made = client.call(OpCode.CREATE_CONTAINER, CreateRequest(box, b"", C, 4))
            assert made.header.err == Err.OK
            before = made.header.zxid
            bodies = [
                _path(box),  # as every client encodes a path
                box.encode(),  # the bare path, as ZooKeeper's own server builds it
                _path(f"{root}/absent"),
                b"",
            ]
            got = []
            # "A zxid was taken", not how many: the shared reference server
            # also logs other tests' session expiries meanwhile.
            for body in bodies:
                err, zxid = _raw_call(client, OpCode.DELETE_CONTAINER, body)
                got.append((Err(err).name, zxid > before))
                before = zxid
            kept = client.call(OpCode.EXISTS, PathWatchRequest(box, False))
            after = client.call(OpCode.SET_DATA, SetDataRequest(box, b"x", -1))
            answers.append((got, Err(kept.header.err).name, after.header.zxid > before))
    assert answers[1] == answers[0] == ([("BADARGUMENTS", True)] * 4, "OK", True)


def _path(path: str) -> bytes:
    data = path.encode()
    return struct.pack(">i", len(data)) + data


# ------------------------------------------------------------ through the mirror


@pytest.fixture(scope="module")
def mirror_servers(
    zookeeper: ZooKeeperServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """A private ZooKeeper and a zkgate mirroring its ``/m``, for every case."""
    base: Path = tmp_path_factory.mktemp("mirror")
    upstreams = ServerFactory(ZooKeeperServer, base, "zookeeper")
    gates = ServerFactory(ZkgateServer, base, "zkgate")
    try:
        upstream = upstreams()
        for server in (zookeeper, upstream):
            _ensure(server, MOUNT)
        config = base / "mirror.toml"
        config.write_text(
            f'[zookeeper]\nmax_client_cnxns = 0\n\n[[mirror]]\nroot = "{MOUNT}"\n'
            f'hosts = "{upstream.address}"\n'
        )
        yield Servers(zookeeper, upstream, gates(["--config", str(config)]))
    finally:
        gates.close()
        upstreams.close()


def _run_mirrored(servers: Servers, script: list[Step], root: str) -> None:
    with open_pair(servers) as pair:
        for who, opcode, record in script:
            _check_step(pair, root, who, opcode, record)


@pytest.mark.parametrize("mix", MIXES, ids=lambda mix: mix.id)
def test_mixed_watches_through_the_mirror(mirror_servers: Servers, mix: Mix) -> None:
    w = f"{MOUNT}/{_unique('m')}"
    _run_mirrored(mirror_servers, mix_script(w, mix), w)


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_successive_registrations_through_the_mirror(mirror_servers: Servers, name: str) -> None:
    w = f"{MOUNT}/{_unique('s')}"
    _run_mirrored(mirror_servers, sequence_script(w, SEQUENCES[name]), w)


def test_issue_sequence_made_upstream_through_the_mirror(mirror_servers: Servers) -> None:
    """The changes made straight on the ensemble (U), which the mirror learns
    of only through its own recursive watch."""
    w = f"{MOUNT}/{_unique('issue')}"
    mix = Mix("recursive", "getChildren", persistent_first=True)
    _run_mirrored(mirror_servers, mix_script(w, mix, writer="U"), w)


def test_check_and_remove_watches_with_another_watcher_through_the_mirror(
    mirror_servers: Servers,
) -> None:
    w = f"{MOUNT}/{_unique('other')}"
    _run_mirrored(mirror_servers, other_watcher_script(w), w)


def test_delete_container_under_the_mirror_is_refused(mirror_servers: Servers) -> None:
    w = f"{MOUNT}/{_unique('container')}"
    _run_mirrored(mirror_servers, [
        ("A", OpCode.CREATE, CreateRequest(w, b"", C, 0)),
        ("A", OpCode.CREATE_CONTAINER, CreateRequest(f"{w}/box", b"", C, 4)),
        ("A", OpCode.DELETE_CONTAINER, PathRequest(f"{w}/box")),
        ("A", OpCode.EXISTS, PathWatchRequest(f"{w}/box", False)),
    ], w)  # fmt: skip
