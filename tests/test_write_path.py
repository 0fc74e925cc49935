"""The write path's shortcuts mean exactly what the general code means.

create, setData and delete are decoded in place and answered with encodings
made straight from the znode (issue #21). A client must not be able to tell:
whatever bytes it sends, the shortcut either decodes the very request the
record decoder reads, or leaves the body to that decoder (which answers or
refuses it as always); and the Stat a write answers with is the Stat a read
of the same znode encodes.
"""

from __future__ import annotations

import functools
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.zk.codec.connection import ConnectRequested, ServerConnection
from dispatcher.zk.codec.jute import DecodeError, Reader
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import (
    ACL,
    AuthPacket,
    ConnectRequest,
    CreateRequest,
    DeleteRequest,
    Id,
    PathWatchRequest,
    Record,
    SetDataRequest,
    encode,
)
from dispatcher.zk.server import engine as engine_module
from dispatcher.zk.server.engine import Client, Engine, _decode_write
from dispatcher.zk.server.store import TreeStore
from dispatcher.zk.server.tree import (
    CONTAINER_OWNER,
    OPEN_WORLD,
    READ_ONLY_WORLD,
    DataTree,
    Trigger,
    Txn,
    Znode,
    ttl_owner,
)

_texts = st.one_of(st.none(), st.text(max_size=12))
_buffers = st.one_of(st.none(), st.binary(max_size=12))
_ints = st.integers(-(2**31), 2**31 - 1)
_acls = st.one_of(
    st.none(),
    st.lists(st.builds(ACL, _ints, st.builds(Id, _texts, _texts)), max_size=3).map(tuple),
)
_requests = st.one_of(
    st.tuples(st.just(OpCode.CREATE), st.builds(CreateRequest, _texts, _buffers, _acls, _ints)),
    st.tuples(st.just(OpCode.CREATE2), st.builds(CreateRequest, _texts, _buffers, _acls, _ints)),
    st.tuples(st.just(OpCode.SET_DATA), st.builds(SetDataRequest, _texts, _buffers, _ints)),
    st.tuples(st.just(OpCode.DELETE), st.builds(DeleteRequest, _texts, _ints)),
)
_RECORDS: dict[int, type[CreateRequest] | type[SetDataRequest] | type[DeleteRequest]] = {
    OpCode.CREATE: CreateRequest,
    OpCode.CREATE2: CreateRequest,
    OpCode.SET_DATA: SetDataRequest,
    OpCode.DELETE: DeleteRequest,
}


def _general(opcode: int, body: bytes) -> Record | None:
    try:
        return _RECORDS[opcode].read(Reader(body))
    except DecodeError:
        return None


@settings(max_examples=400, deadline=None)
@given(_requests, st.data())
def test_the_shortcut_decodes_what_the_record_decoder_reads(
    request: tuple[int, Record], data: st.DataObject
) -> None:
    opcode, record = request
    body = encode(record)
    # The whole body, with trailing bytes, cut short, or with bytes changed.
    cut = data.draw(st.integers(0, len(body)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, max(len(body) - 1, 0)), st.integers(0, 255)), max_size=3)
    )
    mutated = bytearray(body)
    for at, value in flips:
        if mutated:
            mutated[at] = value
    for sent in (body, body + b"\x00\x01", body[:cut], bytes(mutated)):
        cache: dict[bytes, tuple[ACL, ...]] = {}
        fast = _decode_write(opcode, sent, cache)
        if fast is not None:
            assert fast == _general(opcode, sent)
            # A second decode from the ACL cache reads the same.
            assert _decode_write(opcode, sent, cache) == fast
    assert _decode_write(opcode, body, {}) in (None, record)


def test_the_common_requests_take_the_shortcut() -> None:
    """The requests every client sends are the ones decoded in place."""
    acl = (ACL(31, Id("world", "anyone")),)
    for opcode, record in (
        (OpCode.CREATE, CreateRequest("/a/b", b"data", acl, 0)),
        (OpCode.CREATE2, CreateRequest("/a/b-", b"", acl, 3)),
        (OpCode.SET_DATA, SetDataRequest("/a/b", b"data", -1)),
        (OpCode.DELETE, DeleteRequest("/a/b", 7)),
    ):
        assert _decode_write(opcode, encode(record), {}) == record


@given(
    data=_buffers,
    numbers=st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 4),
    versions=st.tuples(*[_ints] * 3),
    owner=st.sampled_from([0, 0x1234_0000_0001, CONTAINER_OWNER, ttl_owner(5000)]),
    children=st.sets(st.text(min_size=1, max_size=3), max_size=4),
)
def test_a_writes_stat_is_the_stat_a_read_encodes(
    data: bytes | None,
    numbers: tuple[int, int, int, int],
    versions: tuple[int, int, int],
    owner: int,
    children: set[str],
) -> None:
    czxid, mzxid, ctime, mtime = numbers
    node = Znode(data, OPEN_WORLD, czxid, mzxid, ctime, mtime, *versions, owner, mzxid)
    node.children = children
    assert node.stat_bytes() == encode(node.stat())


# ------------------------------------------------------------- writes done in place
#
# On a server that commits in groups, a create, setData or delete that will
# succeed and touches nothing special is done straight on the tree, without a
# transaction. Two engines, one with that shortcut and one without, are given
# the same requests: every byte each client receives (replies and watch
# events, in order), every path handed to the store and the row it would
# write, the zxid and the whole tree must be the same.


class _Peer:
    remote_ip = "127.0.0.1"
    remote = "/127.0.0.1:40000"

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    def send(self, data: bytes) -> None:
        self.received += data

    def close(self) -> None:
        self.closed = True


class _Gate:
    """Group commit as the engine sees it, each request its own group: the
    paths it hands over are kept for the test, output goes straight out."""

    holding = False
    held_bytes = 0

    def __init__(self) -> None:
        self.paths: list[str] = []

    def add(self, paths: Iterable[str]) -> None:
        self.paths.extend(paths)

    def add_path(self, path: str) -> None:
        self.paths.append(path)

    def send(self, peer: _Peer, data: bytes) -> None:
        peer.send(data)

    def close(self, peer: _Peer) -> None:
        peer.close()


_WALL_CLOCK = 1_700_000_000.0


class _Side:
    """One engine over its own store, with a writing and a watching client."""

    def __init__(self, directory: Path, *, in_place: bool) -> None:
        self.store = TreeStore(directory)
        self.engine = Engine(self.store, clock=lambda: 100.0, wall_clock=lambda: _WALL_CLOCK)
        self.gate = _Gate()
        self.engine.durability = self.gate  # type: ignore[assignment]  # the engine's view of it
        if not in_place:
            self.engine._shortcuts.clear()
        #: What the engine told its ``changed`` hook, per request.
        self.changes: list[list[Trigger]] = []
        self.engine.changed = lambda triggers: self.changes.append(list(triggers))
        self.writer, self.writer_peer = self._connect()
        self.watcher, self.watcher_peer = self._connect()
        self.xid = 0

    def _connect(self) -> tuple[Client, _Peer]:
        conn = ServerConnection()
        body = encode(ConnectRequest(0, 0, 30_000, 0, bytes(16), False))
        conn.receive_data(struct.pack(">i", len(body)) + body)
        event = conn.next_event()
        assert isinstance(event, ConnectRequested)
        peer = _Peer()
        client = self.engine.connect(peer, conn, event.request)
        assert client is not None
        peer.received.clear()  # the session's random password differs between the sides
        return client, peer

    def request(self, client: Client, opcode: int, record: Record) -> None:
        self.xid += 1
        assert self.engine.handle(client, self.xid, opcode, encode(record)) is None

    def outcome(self) -> tuple[object, ...]:
        """What a request left behind; empties what it compares once read."""
        rows = self.store.prepare_commit(self.engine.tree, self.gate.paths)
        assert isinstance(rows, functools.partial)
        tree = self.engine.tree
        seen = (
            bytes(self.writer_peer.received), bytes(self.watcher_peer.received),
            list(self.gate.paths), rows.args, self.engine.zxid, list(self.changes),
            self.writer.sent, self.writer.last_op, self.engine.stats.packets_sent,
            {path: (node.stat_bytes(), node.data, node.acl, node.world_perms,
                    node.ephemeral_owner, node.child_creates, sorted(node.children))
             for path, node in tree.nodes.items()},
            tree.ephemerals, tree.containers,
        )  # fmt: skip
        self.writer_peer.received.clear()
        self.watcher_peer.received.clear()
        self.gate.paths.clear()
        self.changes.clear()
        return seen


# Half of the paths, ACLs and flags are the common ones (under the open /w,
# which holds /w/a and /w/b to begin with), for the shortcut to have work;
# the rest are what it must leave to the transactions.
_COMMON_PATHS = ["/w/a", "/w/b", "/w/a/c", "/w/a-"]
_OTHER_PATHS = [
    "/a", "/a/b", "/r", "/r/x", "/w", "/zookeeper/q", "/zookeeper", "/", "/w/./b", "/w/", "w",
    "/w/b\x01", "",
]  # fmt: skip
_OTHER_ACLS = [
    (ACL(1, Id("world", "anyone")),),  # read only: no create below, no setData
    (ACL(31 & ~8, Id("world", "anyone")),),  # no delete below
    (ACL(31, Id("auth", "")),),  # the writer's digest, once it has one
    (ACL(31, Id("digest", "u:" + "A" * 27 + "=")),),
    (ACL(31, Id("ip", "127.0.0.1")),),
    (ACL(31, Id("nosuchscheme", "x")),),
    (),
]
_PATHS = st.one_of(st.sampled_from(_COMMON_PATHS), st.sampled_from(_OTHER_PATHS))
_CREATE_ACLS = st.one_of(st.just(OPEN_WORLD), st.sampled_from(_OTHER_ACLS))
_FLAGS = st.one_of(st.just(0), st.sampled_from([1, 2, 3, 4, 5, 6, 42]))
_VERSIONS = st.one_of(st.just(-1), st.sampled_from([0, 1, 2]))
#: setData and delete mostly of znodes that are there.
_TARGETS = st.one_of(st.sampled_from(["/w/a", "/w/b"]), _PATHS)
_OPS = st.one_of(
    st.tuples(
        st.sampled_from([OpCode.CREATE, OpCode.CREATE2, OpCode.CREATE_CONTAINER]),
        st.builds(
            CreateRequest,
            _PATHS,
            st.binary(max_size=4),
            _CREATE_ACLS,
            _FLAGS,
        ),
    ),
    st.tuples(
        st.just(OpCode.SET_DATA),
        st.builds(SetDataRequest, _PATHS, st.binary(max_size=4), _VERSIONS),
    ),
    st.tuples(st.just(OpCode.DELETE), st.builds(DeleteRequest, _TARGETS, _VERSIONS)),
    # The watcher's reads and the writer's authentication, between the writes.
    st.tuples(
        st.sampled_from([OpCode.GET_DATA, OpCode.EXISTS, OpCode.GET_CHILDREN]),
        st.builds(PathWatchRequest, _PATHS, st.just(True)),
    ),
    st.tuples(st.just(OpCode.AUTH), st.just(AuthPacket(0, "digest", b"u:p"))),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_OPS, max_size=40))
def test_a_write_done_in_place_is_the_write_a_transaction_does(
    ops: list[tuple[int, Record]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        sides = [_Side(Path(directory) / name, in_place=name == "in-place")
                 for name in ("in-place", "transaction")]  # fmt: skip
        try:
            for side in sides:
                # Parents to write under, an open one and a read-only one, and
                # znodes to change.
                for path, acl in (
                    ("/w", OPEN_WORLD), ("/r", READ_ONLY_WORLD), ("/w/a", OPEN_WORLD),
                    ("/w/b", OPEN_WORLD),
                ):  # fmt: skip
                    side.request(side.writer, OpCode.CREATE, CreateRequest(path, b"", acl, 0))
                side.outcome()
            for opcode, record in ops:
                outcomes = []
                for side in sides:
                    client = side.watcher if opcode in _READS else side.writer
                    side.request(client, opcode, record)
                    outcomes.append(side.outcome())
                assert outcomes[0] == outcomes[1], (opcode, record)
        finally:
            for side in sides:
                side.store.close()


_READS = frozenset({OpCode.GET_DATA, OpCode.EXISTS, OpCode.GET_CHILDREN})


def test_the_common_writes_are_done_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain creates (of every kind a registry makes), setData and delete with
    or without a version take no transaction on a server that commits in groups."""
    side = _Side(tmp_path, in_place=True)
    try:

        def no_transaction(*args: object, **kwargs: object) -> NoReturn:
            raise AssertionError("a transaction was made")

        monkeypatch.setattr(engine_module, "Txn", no_transaction)
        writer = side.writer
        # Persistent, sequential, ephemeral, ephemeral sequential, container.
        for opcode, path, flags in (
            (OpCode.CREATE, "/p", 0), (OpCode.CREATE2, "/p-", 2), (OpCode.CREATE, "/e", 1),
            (OpCode.CREATE2, "/e-", 3), (OpCode.CREATE_CONTAINER, "/c", 0),
            (OpCode.CREATE, "/n", 0),
        ):  # fmt: skip
            side.request(writer, opcode, CreateRequest(path, b"x", OPEN_WORLD, flags))
        side.request(writer, OpCode.SET_DATA, SetDataRequest("/n", b"y", -1))
        side.request(writer, OpCode.SET_DATA, SetDataRequest("/n", b"z", 1))
        side.request(writer, OpCode.DELETE, DeleteRequest("/n", 2))
        side.request(writer, OpCode.DELETE, DeleteRequest("/p-0000000001", -1))
        replies = _replies(bytes(side.writer_peer.received))
        assert replies == [(xid, 0) for xid in range(1, 11)]
        tree = side.engine.tree
        assert {"/p", "/e", "/e-0000000003", "/c"} <= tree.nodes.keys()
        assert "/n" not in tree.nodes and "/p-0000000001" not in tree.nodes
        assert tree.ephemerals == {writer.session.id: {"/e", "/e-0000000003"}}
        assert tree.containers == {"/c"}
    finally:
        side.store.close()


def _replies(data: bytes) -> list[tuple[int, int]]:
    """(xid, err) of each reply frame in ``data``."""
    out = []
    offset = 0
    while offset < len(data):
        length, xid, _zxid, err = struct.unpack_from(">iiqi", data, offset)
        out.append((xid, err))
        offset += 4 + length
    return out


# ------------------------------------------------------------- the group's rows


def _stored(directory: Path) -> dict[str, tuple[object, ...]]:
    """Every znode the store at ``directory`` holds, as a fresh start reads it."""
    store = TreeStore(directory)
    try:
        tree = DataTree()
        store.load(tree)
    finally:
        store.close()
    return _rows_of(tree)


def _rows_of(tree: DataTree) -> dict[str, tuple[object, ...]]:
    """What the store should hold for ``tree``, (as :func:`_stored` reads it back)."""
    return {
        path: (node.stat_bytes(), node.data, node.acl, node.child_creates, sorted(node.children))
        for path, node in tree.nodes.items()
    }


_GROUP_SIZES = (1, 2, 3, 4, 5, 511, 512, 513, 1100)


@pytest.mark.parametrize("rows_per_statement", [512, 4])
def test_a_group_of_any_size_is_stored_as_the_tree_holds_it(
    tmp_path: Path, rows_per_statement: int
) -> None:
    """Groups write many rows per statement: groups of every size, around
    the statement's size and past it, deletes among them, read back equal."""
    store = TreeStore(tmp_path)
    tree = DataTree()
    store.load(tree)
    store._rows_per_statement = rows_per_statement  # several statements, and the rest
    zxid = 1
    try:
        for size in _GROUP_SIZES:
            zxid += 1
            txn = Txn(tree, zxid, zxid * 1000)
            parent = f"/g{size}"
            txn.create(parent, b"", OPEN_WORLD, 0)
            for i in range(size):
                txn.create(f"{parent}/n{i}", i.to_bytes(4, "big"), OPEN_WORLD, 0)
            store.prepare_commit(tree, txn.touched_paths)()
            # Then a group that deletes every other one and changes the rest.
            zxid += 1
            txn = Txn(tree, zxid, zxid * 1000)
            for i in range(size):
                if i % 2:
                    txn.delete(f"{parent}/n{i}")
                else:
                    txn.set_data(f"{parent}/n{i}", b"changed", 1)
            store.prepare_commit(tree, txn.touched_paths)()
    finally:
        store.close()
    expected = _rows_of(tree)
    assert _stored(tmp_path) == expected
    # Each size's parent, and the half of its children that stays.
    kept = sum(1 + (size + 1) // 2 for size in _GROUP_SIZES)
    assert sum(path.startswith("/g") for path in expected) == kept


def test_a_stored_znode_written_again_keeps_every_column_of_the_new_state(
    tmp_path: Path,
) -> None:
    """A row already on disk is updated in place, not replaced: every column
    (ACL, counters, owner, children's bookkeeping) must still be the tree's."""
    store = TreeStore(tmp_path)
    tree = DataTree()
    store.load(tree)
    try:
        txn = Txn(tree, 2, 2000)
        txn.create("/u", b"old", OPEN_WORLD, 0)
        txn.create("/u/child", None, OPEN_WORLD, 0)
        store.prepare_commit(tree, txn.touched_paths)()
        txn = Txn(tree, 3, 3000)
        txn.set_data("/u", None, 0)  # a null data column replaces bytes
        txn.set_acl("/u", READ_ONLY_WORLD, 0)
        txn.delete("/u/child")
        txn.create("/u/other", b"x", OPEN_WORLD, 0)
        store.prepare_commit(tree, txn.touched_paths)()
    finally:
        store.close()
    expected = _rows_of(tree)
    assert expected["/u"][1] is None and expected["/u"][2] == READ_ONLY_WORLD
    assert _stored(tmp_path) == expected
