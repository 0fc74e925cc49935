"""Null strings, buffers and vectors: zkgate answers them as ZooKeeper 3.8 does.

jute writes a null string, buffer or vector as length -1 and an empty one as
length 0. Clients differ in which they send for "nothing": kazoo writes every
empty string as null (so its ``CREATOR_ALL_ACL``, ``Id("auth", "")``, sends a
null id, and ``add_auth("digest", "")`` a null auth) and ``None`` data as a
null buffer; the Java client (Curator) writes ``null`` as -1 and ``""`` as 0,
and a null list as a -1 vector; the C client writes a NULL ``char *`` as -1,
``""`` as 0, a value of length -1 as a null buffer, and never a null vector.
So every string, buffer and vector field of every request record is sent here
both ways, raw, to a real ZooKeeper 3.8 and to zkgate, and the answers must
match: the error code, the body, the watch events, how the zxid moved, and
whether the connection stayed open.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from kazoo.client import KazooClient
from kazoo.protocol import serialization as kazoo_wire
from kazoo.security import CREATOR_ALL_ACL

from dispatcher.zk.codec.client_connection import RESPONSES
from dispatcher.zk.codec.jute import Reader, Writer
from dispatcher.zk.codec.protocol import XID_NOTIFICATION, Err, OpCode
from dispatcher.zk.codec.records import (
    ACL,
    REQUESTS,
    AddWatchRequest,
    AuthPacket,
    CheckVersionRequest,
    CreateRequest,
    CreateTTLRequest,
    DeleteRequest,
    GetSASLRequest,
    Id,
    MultiReadRequest,
    MultiRequest,
    MultiResponse,
    PathRequest,
    PathWatchRequest,
    ReconfigRequest,
    Record,
    SetACLRequest,
    SetDataRequest,
    SetWatches,
    SetWatches2,
    Stat,
    WatchesRequest,
    encode,
)
from tests.differential import WRITES
from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer
from tests.zkwire import WireClient

WORLD = ACL(31, Id("world", "anyone"))
Step = tuple[int, Record]


def _acl(*entries: tuple[int, str | None, str | None]) -> tuple[ACL, ...]:
    return tuple(ACL(perms, Id(scheme, ident)) for perms, scheme, ident in entries)


@attrs.frozen
class Case:
    """Steps run on one fresh connection of each server, under a fresh root."""

    name: str
    #: Who sends these bytes for "nothing" (documentation, shown on failure).
    sent_by: str
    steps: Callable[[str], list[Step]]
    #: Authenticate as digest u:p first (the ``auth`` scheme needs an identity).
    auth: bool = False


def _cases() -> Iterator[Case]:
    kazoo_str = "kazoo '' / Java null / C NULL"
    java_empty = "Java and C ''"
    java_null_list = "Java null list"
    creates = (OpCode.CREATE, OpCode.CREATE2, OpCode.CREATE_CONTAINER)
    for op in creates:
        name = OpCode(op).name.lower()

        def create(
            acl: tuple[ACL, ...] | None, data: bytes | None = b"", op: int = op, path: str = "c"
        ) -> Callable[[str], list[Step]]:
            return lambda r: [
                (op, CreateRequest(f"{r}/{path}", data, acl, 0)),
                (OpCode.GET_ACL, PathRequest(f"{r}/{path}")),
                (OpCode.GET_DATA, PathWatchRequest(f"{r}/{path}", False)),
            ]

        yield Case(
            f"{name} path null",
            kazoo_str,
            lambda r, op=op: [
                (op, CreateRequest(None, b"", (WORLD,), 0)),
                (op, CreateRequest(f"{r}/after", b"", (WORLD,), 0)),
            ],
        )
        yield Case(
            f"{name} path empty",
            java_empty,
            lambda r, op=op: [(op, CreateRequest("", b"", (WORLD,), 0))],
        )
        yield Case(f"{name} data null", "kazoo/Java None, C value NULL", create((WORLD,), None))
        yield Case(f"{name} data empty", "kazoo/Java b''", create((WORLD,), b""))
        yield Case(f"{name} acl vector null", java_null_list, create(None))
        yield Case(f"{name} acl vector empty", "kazoo [] / Java empty list / C count 0", create(()))
        for scheme in ("auth", "world", "digest", "ip", "sasl", "x509", "super", "other"):
            yield Case(
                f"{name} {scheme} id null", kazoo_str, create(_acl((31, scheme, None))), auth=True
            )
        yield Case(
            f"{name} auth id null unauthenticated", kazoo_str, create(_acl((31, "auth", None)))
        )
        yield Case(f"{name} auth id empty", java_empty, create(_acl((31, "auth", ""))), auth=True)
        yield Case(f"{name} scheme null", kazoo_str, create(_acl((31, None, "anyone"))))
        yield Case(f"{name} scheme empty", java_empty, create(_acl((31, "", "anyone"))))
    # Where ZooKeeper's duplicate removal compares entries, and which null it trips on.
    for label, entries in {
        "world then null scheme": ((31, "world", "anyone"), (31, None, "x")),
        "null scheme other perms": ((31, "world", "anyone"), (1, None, "x")),
        "null scheme first": ((31, None, "x"), (31, "world", "anyone")),
        "two null schemes": ((31, None, "x"), (31, None, "x")),
        "digest then null id": ((31, "digest", "u:x"), (31, "digest", None)),
        "null digest id first": ((31, "digest", None), (31, "digest", "u:x")),
        "auth null id twice": ((31, "auth", None), (31, "auth", None)),
        "auth empty then null": ((31, "auth", ""), (31, "auth", None)),
        "invalid then world null": ((31, "other", "x"), (1, "world", None)),
    }.items():
        yield Case(
            f"create acl {label}",
            kazoo_str,
            lambda r, e=entries: [
                (OpCode.CREATE, CreateRequest(f"{r}/c", b"", _acl(*e), 0)),
                (OpCode.GET_ACL, PathRequest(f"{r}/c")),
            ],
            auth=True,
        )
    yield Case(
        "createTTL path null",
        kazoo_str,
        lambda r: [(OpCode.CREATE_TTL, CreateTTLRequest(None, b"", (WORLD,), 5, 100))],
    )
    yield Case(
        "delete path null",
        kazoo_str,
        lambda r: [
            (OpCode.DELETE, DeleteRequest(None, -1)),
            (OpCode.CREATE, CreateRequest(f"{r}/after", b"", (WORLD,), 0)),
        ],
    )
    yield Case("delete path empty", java_empty, lambda r: [(OpCode.DELETE, DeleteRequest("", -1))])
    for op in (OpCode.EXISTS, OpCode.GET_DATA, OpCode.GET_CHILDREN, OpCode.GET_CHILDREN2):
        for watch in (False, True):
            yield Case(
                f"{OpCode(op).name.lower()} path null watch={watch}",
                kazoo_str,
                lambda r, op=op, w=watch: [(op, PathWatchRequest(None, w))],
            )
            yield Case(
                f"{OpCode(op).name.lower()} path empty watch={watch}",
                java_empty,
                lambda r, op=op, w=watch: [
                    (op, PathWatchRequest("", w)),
                    (OpCode.GET_ACL, PathRequest("")),
                ],
            )
    yield Case(
        "setData path null",
        kazoo_str,
        lambda r: [
            (OpCode.SET_DATA, SetDataRequest(None, b"x", -1)),
            (OpCode.CREATE, CreateRequest(f"{r}/after", b"", (WORLD,), 0)),
        ],
    )
    yield Case(
        "setData data null",
        "kazoo/Java None, C NULL",
        lambda r: [
            (OpCode.SET_DATA, SetDataRequest(f"{r}/n", None, -1)),
            (OpCode.GET_DATA, PathWatchRequest(f"{r}/n", False)),
        ],
    )
    yield Case(
        "setData data empty",
        "kazoo/Java b''",
        lambda r: [
            (OpCode.SET_DATA, SetDataRequest(f"{r}/n", b"", -1)),
            (OpCode.GET_DATA, PathWatchRequest(f"{r}/n", False)),
        ],
    )
    for label, path in (("null", None), ("empty", "")):
        for op in (OpCode.GET_ACL, OpCode.SYNC, OpCode.GET_ALL_CHILDREN_NUMBER):
            if op == OpCode.GET_ALL_CHILDREN_NUMBER and path == "":
                continue  # the root's descendants: the shared reference has others' znodes
            yield Case(
                f"{OpCode(op).name.lower()} path {label}",
                kazoo_str if path is None else java_empty,
                lambda r, op=op, p=path: [(op, PathRequest(p))],
            )
    yield Case(
        "setACL path null",
        kazoo_str,
        lambda r: [(OpCode.SET_ACL, SetACLRequest(None, (WORLD,), -1))],
    )
    for label, acl in {
        "acl vector null": None,
        "acl vector empty": (),
        "scheme null": _acl((31, None, "anyone")),
        "world id null": _acl((31, "world", None)),
        "auth id null": _acl((31, "auth", None)),
        "digest id null": _acl((31, "digest", None)),
        "ip id null": _acl((31, "ip", None)),
        "other id null": _acl((31, "other", None)),
    }.items():
        yield Case(
            f"setACL {label}",
            kazoo_str,
            lambda r, a=acl: [
                (OpCode.SET_ACL, SetACLRequest(f"{r}/n", a, -1)),
                (OpCode.GET_ACL, PathRequest(f"{r}/n")),
            ],
            auth=True,
        )
    yield Case(
        "getEphemerals prefixes",
        kazoo_str + "; blanks as Java trims them",
        lambda r: (
            [(OpCode.CREATE, CreateRequest(f"{r}/e", b"", (WORLD,), 1))]
            + [
                (OpCode.GET_EPHEMERALS, PathRequest(p))
                for p in (None, "", "  ", " / ", "/", r, f"{r}/x")
            ]
        ),
    )
    for mode in (0, 1):
        yield Case(
            f"addWatch path null mode={mode}",
            kazoo_str,
            lambda r, m=mode: [
                (OpCode.ADD_WATCH, AddWatchRequest(None, m)),
                (OpCode.SET_DATA, SetDataRequest(f"{r}/n", b"y", -1)),
            ],
        )
        yield Case(
            f"addWatch path empty mode={mode}",
            java_empty,
            lambda r, m=mode: [(OpCode.ADD_WATCH, AddWatchRequest("", m))],
        )
    for kind in (1, 2, 3):
        yield Case(
            f"checkWatches path null type={kind}",
            kazoo_str,
            lambda r, t=kind: [(OpCode.CHECK_WATCHES, WatchesRequest(None, t))],
        )
        yield Case(
            f"removeWatches path null type={kind}",
            kazoo_str,
            lambda r, t=kind: [(OpCode.REMOVE_WATCHES, WatchesRequest(None, t))],
        )
    # ZooKeeper keeps a watch on a null path; what removes and re-adds it answer.
    rm = OpCode.REMOVE_WATCHES
    null_watch_sequences: dict[str, list[Step]] = {
        "addWatch null then remove each table": [
            (OpCode.ADD_WATCH, AddWatchRequest(None, 1)),
            (rm, WatchesRequest(None, 1)),
            (rm, WatchesRequest(None, 2)),
            (rm, WatchesRequest(None, 2)),
            (OpCode.ADD_WATCH, AddWatchRequest(None, 1)),
            (OpCode.ADD_WATCH, AddWatchRequest(None, 0)),
            (rm, WatchesRequest(None, 1)),
            (rm, WatchesRequest(None, 1)),
        ],
        "addWatch null twice": [
            (OpCode.ADD_WATCH, AddWatchRequest(None, 0)),
            (OpCode.ADD_WATCH, AddWatchRequest(None, 0)),
            (rm, WatchesRequest(None, 1)),
            (rm, WatchesRequest(None, 2)),
        ],
        "addWatch null then remove any": [
            (OpCode.ADD_WATCH, AddWatchRequest(None, 0)),
            (rm, WatchesRequest(None, 3)),
            (rm, WatchesRequest(None, 3)),
            (rm, WatchesRequest(None, 3)),
            (OpCode.CHECK_WATCHES, WatchesRequest(None, 3)),
        ],
        "setWatches2 null persistent then remove": [
            (OpCode.SET_WATCHES2, SetWatches2(0, (), (), (), (None,), ())),
            (rm, WatchesRequest(None, 2)),
            (rm, WatchesRequest(None, 1)),
            (rm, WatchesRequest(None, 1)),
            (rm, WatchesRequest(None, 3)),
        ],
        "setWatches2 null recursive, table order": [
            (OpCode.SET_WATCHES2, SetWatches2(0, (), (), (), (), (None,))),
            (rm, WatchesRequest(None, 2)),
            (OpCode.SET_WATCHES2, SetWatches2(0, (), (), (), (None,), ())),
            (rm, WatchesRequest(None, 2)),
            (rm, WatchesRequest(None, 1)),
        ],
        "setWatches2 null recursive twice": [
            (OpCode.SET_WATCHES2, SetWatches2(0, (), (), (), (), (None, None))),
            (rm, WatchesRequest(None, 1)),
            (rm, WatchesRequest(None, 2)),
        ],
    }
    for label, steps in null_watch_sequences.items():
        yield Case(label, kazoo_str, lambda r, s=steps: list(s))
    multi_ops: dict[str, Callable[[str], tuple[Step, ...]]] = {
        "create path null": lambda r: ((OpCode.CREATE, CreateRequest(None, b"", (WORLD,), 0)),),
        "delete path null": lambda r: ((OpCode.DELETE, DeleteRequest(None, -1)),),
        "setData path null": lambda r: ((OpCode.SET_DATA, SetDataRequest(None, b"", -1)),),
        "check path null": lambda r: ((OpCode.CHECK, CheckVersionRequest(None, -1)),),
        "valid then null path": lambda r: (
            (OpCode.CREATE, CreateRequest(f"{r}/m", b"", (WORLD,), 0)),
            (OpCode.DELETE, DeleteRequest(None, -1)),
        ),
        "create auth id null": lambda r: (
            (OpCode.CREATE, CreateRequest(f"{r}/m", b"", _acl((31, "auth", None)), 0)),
        ),
        "create world id null after valid": lambda r: (
            (OpCode.CREATE, CreateRequest(f"{r}/m", b"", (WORLD,), 0)),
            (OpCode.CREATE, CreateRequest(f"{r}/m2", b"", _acl((31, "world", None)), 0)),
        ),
        "create acl null": lambda r: ((OpCode.CREATE, CreateRequest(f"{r}/m", b"", None, 0)),),
        "create scheme null": lambda r: (
            (OpCode.CREATE, CreateRequest(f"{r}/m", b"", _acl((31, None, "x")), 0)),
        ),
        "setData data null": lambda r: ((OpCode.SET_DATA, SetDataRequest(f"{r}/n", None, -1)),),
    }
    for label, ops in multi_ops.items():
        for auth in (False, True):
            yield Case(
                f"multi {label} auth={auth}",
                kazoo_str,
                lambda r, o=ops: [
                    (OpCode.MULTI, MultiRequest(o(r))),
                    (OpCode.EXISTS, PathWatchRequest(f"{r}/m", False)),
                    (OpCode.CREATE, CreateRequest(f"{r}/after", b"", (WORLD,), 0)),
                ],
                auth=auth,
            )
    for label, reads in {
        "getData path null": lambda r: ((OpCode.GET_DATA, PathWatchRequest(None, False)),),
        "getChildren path null": lambda r: ((OpCode.GET_CHILDREN, PathWatchRequest(None, False)),),
        "results before a null path": lambda r: (
            (OpCode.GET_DATA, PathWatchRequest(f"{r}/n", False)),
            (OpCode.GET_CHILDREN, PathWatchRequest(f"{r}/missing", False)),
            (OpCode.GET_DATA, PathWatchRequest(None, False)),
            (OpCode.GET_DATA, PathWatchRequest(f"{r}/n", False)),
        ),
    }.items():
        yield Case(
            f"multiRead {label}",
            kazoo_str,
            lambda r, o=reads: [(OpCode.MULTI_READ, MultiReadRequest(o(r)))],
        )
    for label, packet in {
        "scheme null": AuthPacket(0, None, b"u:p"),
        "scheme empty": AuthPacket(0, "", b"u:p"),
        "digest auth null": AuthPacket(0, "digest", None),
        "digest auth empty": AuthPacket(0, "digest", b""),
        "ip auth null": AuthPacket(0, "ip", None),
    }.items():
        yield Case(
            f"auth {label}",
            "kazoo add_auth(scheme, '') / Java null / C NULL",
            lambda r, p=packet: [(OpCode.AUTH, p)],
        )
    yield Case(
        "sasl token null", "Java null token", lambda r: [(OpCode.SASL, GetSASLRequest(None))]
    )
    yield Case("sasl token empty", "kazoo/Java b''", lambda r: [(OpCode.SASL, GetSASLRequest(b""))])
    yield Case(
        "reconfig strings null",
        kazoo_str,
        lambda r: [(OpCode.RECONFIG, ReconfigRequest(None, None, None, -1))],
    )
    missing, n = "missing", "n"
    for op, count in ((OpCode.SET_WATCHES, 3), (OpCode.SET_WATCHES2, 5)):
        record_type = SetWatches if op == OpCode.SET_WATCHES else SetWatches2
        for k in range(count):
            for label, value, by in (
                ("vector null", None, java_null_list),
                ("entry null", (missing, None, n), kazoo_str),
                ("entry empty", (missing, "", n), java_empty),
            ):

                def steps(
                    r: str,
                    k: int = k,
                    value: Any = value,
                    t: Any = record_type,
                    op: int = op,
                    count: int = count,
                ) -> list[Step]:
                    lists: list[Any] = [(f"{r}/{n}",)] * count
                    if value is not None:
                        value = tuple(p if p in (None, "") else f"{r}/{p}" for p in value)
                    lists[k] = value
                    # Then: which watches the steps before the null left set.
                    return [(op, t(0, *lists))] + [
                        (OpCode.CHECK_WATCHES, WatchesRequest(f"{r}/{p}", 3)) for p in (n, missing)
                    ]

                yield Case(f"{OpCode(op).name.lower()} list {k} {label}", by, steps)


CASES = list(_cases())


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkgateServer]:
    """One zkgate for all cases: each works under a root of its own."""
    with ZkgateServer(base_dir=tmp_path_factory.mktemp("zkgate-nulls")) as server:
        yield server


def _normalized(value: Any) -> Any:
    """An answer without what differs between two servers (zxids, times, session ids)."""
    if isinstance(value, Stat):
        stat = {
            "version": value.version,
            "cversion": value.cversion,
            "aversion": value.aversion,
            "ephemeral": value.ephemeral_owner != 0,
            "data_length": value.data_length,
            "num_children": value.num_children,
            "mzxid>czxid": value.mzxid > value.czxid,
        }
        if value.czxid == 0:
            # The root (an empty path reads it) and the system nodes: their
            # children are whatever the servers' other tests left there.
            del stat["cversion"], stat["num_children"]
        return stat
    if attrs.has(type(value)):
        fields = {f.name: _normalized(getattr(value, f.name)) for f in attrs.fields(type(value))}
        for unordered in ("children", "paths"):
            if unordered in fields:
                fields[unordered] = sorted(fields[unordered])
        if "zookeeper" in fields.get("children", ()):
            # The root's listing (an empty path reads the root): besides the
            # system node it holds whatever the servers' other tests made.
            fields["children"] = ["zookeeper"]
        return {"type": type(value).__name__, **fields}
    if isinstance(value, tuple | list):
        return [_normalized(item) for item in value]
    return value


def _decoded(opcode: int, err: int, body: bytes) -> Any:
    if not body:
        return None
    if err != Err.OK:
        # A failed multiRead (and multi) still carries a result list.
        if opcode in (OpCode.MULTI, OpCode.MULTI_READ):
            return _normalized(MultiResponse.read(Reader(body)))
        return body.hex()
    return _normalized(RESPONSES[opcode].read(Reader(body)))


def run_case(host: str, port: int, root: str, case: Case) -> dict[str, Any]:
    """The case's answers on one server, with the root written as ``<root>``."""
    with WireClient(host, port) as setup:
        setup.connect()
        setup.call(OpCode.CREATE, CreateRequest(root, b"", (WORLD,), 0))
        setup.call(OpCode.CREATE, CreateRequest(f"{root}/n", b"x", (WORLD,), 0))
    answers: list[Any] = []
    with WireClient(host, port) as client:
        client.connect()
        if case.auth:
            assert client.call(OpCode.AUTH, AuthPacket(0, "digest", b"u:p")).header.err == 0
        base: int | None = None
        for opcode, record in case.steps(root):
            try:
                reply = client.call(opcode, record)
            except ConnectionError:
                answers.append("connection closed without an answer")
                break
            err, zxid = reply.header.err, reply.header.zxid
            if base is None and zxid > 0:
                base = zxid
            answers.append(
                {
                    "err": Err(err).name,
                    "body": _decoded(opcode, err, reply.body),
                    "events": [(e.type, e.path) for _, e in reply.events],
                    # A write's zxid, counted from the case's first: shows which
                    # failed requests spent one (reads answer the latest, which a
                    # spent but unapplied zxid leaves behind in ZooKeeper).
                    "zxid": zxid - base if opcode in WRITES and base is not None else None,
                }
            )
        open_after = _still_open(client)
    text = repr({"answers": answers, "open": open_after}).replace(root, "<root>")
    return {"answers": text, "open": open_after}


def _still_open(client: WireClient) -> bool:
    """Whether the server still answers on the connection (a ping round trip)."""
    try:
        reply = client.call(OpCode.PING)
    except (ConnectionError, OSError):
        return False
    return reply.header.xid != XID_NOTIFICATION


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_null_field_answers_as_zookeeper(
    case: Case, zookeeper: ZooKeeperServer, gate: ZkgateServer
) -> None:
    root = f"/nulls-{uuid.uuid4().hex[:12]}"
    expected = run_case(zookeeper.host, zookeeper.port, root, case)
    actual = run_case(gate.host, gate.port, root, case)
    assert actual == expected, f"sent as by {case.sent_by}"


def test_every_request_record_has_null_cases() -> None:
    """The table covers every request record that carries a string, buffer or vector."""
    covered: set[type] = set()
    for case in CASES:
        for _, record in case.steps("/r"):
            covered.add(type(record))
            if isinstance(record, MultiRequest):
                covered.update(type(r) for _, r in record.ops)
    with_fields = {t for t in REQUESTS.values() if attrs.has(t) and attrs.fields(t)}
    # deleteContainer is refused before its body is read; whoAmI has no body.
    assert with_fields - covered == set()


def test_null_fields_survive_reencoding() -> None:
    """What a mirror forwards upstream is what the client sent: -1 stays -1."""
    records: list[Record] = [
        CreateRequest("/a", None, _acl((31, "auth", None), (31, None, "x")), 0),
        SetACLRequest("/a", None, -1),
        SetWatches2(0, None, (None, "/a"), (), ("",), None),
        AuthPacket(0, None, None),
        PathRequest(None),
        MultiRequest(((OpCode.CREATE, CreateRequest(None, b"", None, 0)),)),
    ]
    for record in records:
        raw = encode(record)
        decoded = type(record).read(Reader(raw))
        assert decoded == record
        assert encode(decoded) == raw


def test_cases_send_kazoo_bytes() -> None:
    """kazoo's own encoding of CREATOR_ALL_ACL and of an empty auth is the null
    one these cases send."""
    path = "/a/b"
    kazoo_create = kazoo_wire.Create(path, b"", CREATOR_ALL_ACL, 0).serialize()
    ours = encode(CreateRequest(path, b"", _acl((31, "auth", None)), 0))
    assert bytes(kazoo_create) == ours
    kazoo_auth = kazoo_wire.Auth(0, "digest", "").serialize()
    assert bytes(kazoo_auth) == encode(AuthPacket(0, "digest", None))
    w = Writer()
    w.ustring(None)
    assert bytes(w.out) == b"\xff\xff\xff\xff"


def _creator_all_acl(hosts: str, path: str) -> tuple[list[Any], Any]:
    client = KazooClient(hosts=hosts, timeout=10)
    client.start(timeout=10)
    try:
        client.add_auth("digest", "u:p")
        client.create(path, b"v", makepath=True, acl=CREATOR_ALL_ACL)
        acl, stat = client.get_acls(path)
        parent_acl, _ = client.get_acls(path.rsplit("/", 1)[0])
        data, _ = client.get(path)
        return [(a.perms, a.id.scheme, a.id.id) for a in acl + parent_acl], (data, stat.version)
    finally:
        client.stop()
        client.close()


def test_kazoo_creator_all_acl(
    zookeeper: ZooKeeperServer, gate: ZkgateServer, unique_path: str
) -> None:
    """kazoo's ``create(makepath=True, acl=CREATOR_ALL_ACL)`` after a digest
    add_auth works on zkgate as on ZooKeeper, and the ACLs read back alike."""
    path = f"{unique_path}/a/b"
    expected = _creator_all_acl(zookeeper.address, path)
    actual = _creator_all_acl(gate.address, path)
    assert actual == expected
    assert ("digest", "u:") in [(scheme, ident[:2]) for _, scheme, ident in actual[0]]


# Under a mirror the same cases go upstream: a null field must reach the
# ensemble as sent (or be answered as ZooKeeper would) and the answer relayed.
MIRROR_CASES = [
    c
    for c in CASES
    if c.name.startswith(("create ", "create2 ", "setACL", "setData", "multi ", "sync"))
]


def test_null_fields_through_a_mirror(
    zookeeper: ZooKeeperServer,
    zookeeper_factory: ServerFactory[ZooKeeperServer],
    zkgate_factory: ServerFactory[ZkgateServer],
    tmp_path: Path,
) -> None:
    upstream = zookeeper_factory()
    mount = "/nullmirror"
    for server in (zookeeper, upstream):
        with WireClient(server.host, server.port) as client:
            client.connect()
            err = client.call(OpCode.CREATE, CreateRequest(mount, b"", (WORLD,), 0)).header.err
            assert err in (Err.OK, Err.NODEEXISTS)
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[zookeeper]\nmax_client_cnxns = 0\n\n[[mirror]]\nroot = "{mount}"\n'
        f'hosts = "{upstream.address}"\n'
    )
    mirror = zkgate_factory(["--config", str(config)])
    mismatches = []
    for case in MIRROR_CASES:
        root = f"{mount}/{uuid.uuid4().hex[:12]}"
        expected = run_case(zookeeper.host, zookeeper.port, root, case)
        actual = run_case(mirror.host, mirror.port, root, case)
        # A mirror's headers count its own zxids: compare all but those.
        for answer in (expected, actual):
            answer["answers"] = _without_zxids(answer["answers"])
        if actual != expected:
            mismatches.append((case.name, expected, actual))
    assert not mismatches, "\n".join(map(repr, mismatches))
    assert len(MIRROR_CASES) > 40


def _without_zxids(text: str) -> str:
    return re.sub(r"'zxid': -?\d+", "'zxid': _", text)
