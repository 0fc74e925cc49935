"""The jute records of ZooKeeper 3.8 that zkgate reads and writes.

Field order and types follow ``zookeeper.jute``. Every record can be read and
written, so the same code serves the server and the test clients that check it.

A null string, buffer or vector (jute length -1) decodes to None, distinct from
an empty one, in every request field: ZooKeeper's Java server reads it as null
and answers according to what each operation then does with it, so the request
handlers decide, never the decoder. Re-encoding writes -1 again, so a mirror
forwards a null field unchanged.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Protocol, Self

import attrs

from dispatcher.zk.codec.jute import DecodeError, Reader, Writer
from dispatcher.zk.codec.protocol import OpCode

#: czxid, mzxid, ctime, mtime, version, cversion, aversion, ephemeralOwner,
#: dataLength, numChildren, pzxid.
_STAT = struct.Struct(">qqqqiiiqiiq")

__all__ = [
    "ACL",
    "MULTI_END",
    "MULTI_RESULTS",
    "OPEN_ACL_UNSAFE",
    "OPS",
    "REQUESTS",
    "AddWatchRequest",
    "AuthPacket",
    "CheckVersionRequest",
    "ClientInfo",
    "ConnectRequest",
    "ConnectResponse",
    "CountResponse",
    "Create2Response",
    "CreateRequest",
    "CreateResponse",
    "CreateTTLRequest",
    "DeleteRequest",
    "Empty",
    "ErrorResult",
    "GetACLResponse",
    "GetChildren2Response",
    "GetChildrenResponse",
    "GetDataResponse",
    "GetSASLRequest",
    "Id",
    "MultiHeader",
    "MultiReadRequest",
    "MultiRequest",
    "MultiResponse",
    "Op",
    "PathRequest",
    "PathResponse",
    "PathWatchRequest",
    "PathsResponse",
    "ReconfigRequest",
    "Record",
    "ReplyHeader",
    "RequestHeader",
    "SetACLRequest",
    "SetDataRequest",
    "SetSASLResponse",
    "SetWatches",
    "SetWatches2",
    "Stat",
    "StatResponse",
    "WatchPaths",
    "WatcherEvent",
    "WatchesRequest",
    "WhoAmIResponse",
    "encode",
    "op_name",
    "read_acls",
    "write_acls",
]


class Record(Protocol):
    @classmethod
    def read(cls, r: Reader) -> Self: ...

    def write(self, w: Writer) -> None: ...


def encode(record: Record) -> bytes:
    w = Writer()
    record.write(w)
    return bytes(w.out)


@attrs.frozen
class Empty:
    """No body: whoAmI's request, delete's and check's result inside a multi."""

    @classmethod
    def read(cls, r: Reader) -> Empty:
        return cls()

    def write(self, w: Writer) -> None:
        pass


@attrs.frozen
class Id:
    scheme: str | None
    #: kazoo sends ``Id("auth", "")`` with a null id (its empty strings are null).
    id: str | None

    @classmethod
    def read(cls, r: Reader) -> Id:
        return cls(r.ustring(), r.ustring())

    def write(self, w: Writer) -> None:
        w.ustring(self.scheme)
        w.ustring(self.id)


@attrs.frozen
class ACL:
    perms: int
    id: Id

    @classmethod
    def read(cls, r: Reader) -> ACL:
        return cls(r.int(), Id.read(r))

    def write(self, w: Writer) -> None:
        w.int(self.perms)
        self.id.write(w)


def read_acls(r: Reader) -> tuple[ACL, ...] | None:
    acls = r.vector(ACL.read)
    return None if acls is None else tuple(acls)


def write_acls(w: Writer, acls: tuple[ACL, ...] | None) -> None:
    w.vector(acls, lambda w, acl: acl.write(w))


OPEN_ACL_UNSAFE = (ACL(31, Id("world", "anyone")),)


@attrs.frozen
class Stat:
    czxid: int
    mzxid: int
    ctime: int
    mtime: int
    version: int
    cversion: int
    aversion: int
    ephemeral_owner: int
    data_length: int
    num_children: int
    pzxid: int

    @classmethod
    def read(cls, r: Reader) -> Stat:
        # One unpack for the eleven fields: stats come by the tens of thousands.
        if r.offset + _STAT.size > len(r.data):
            raise DecodeError("record truncated")
        values = _STAT.unpack_from(r.data, r.offset)
        r.offset += _STAT.size
        return cls(*values)

    def write(self, w: Writer) -> None:
        w.long(self.czxid)
        w.long(self.mzxid)
        w.long(self.ctime)
        w.long(self.mtime)
        w.int(self.version)
        w.int(self.cversion)
        w.int(self.aversion)
        w.long(self.ephemeral_owner)
        w.int(self.data_length)
        w.int(self.num_children)
        w.long(self.pzxid)


@attrs.frozen
class ConnectRequest:
    protocol_version: int
    last_zxid_seen: int
    timeout: int
    session_id: int
    passwd: bytes
    #: None when the client sent no trailing readOnly byte (clients before 3.4).
    read_only: bool | None = None

    @classmethod
    def read(cls, r: Reader) -> ConnectRequest:
        proto, zxid, timeout, sid = r.int(), r.long(), r.int(), r.long()
        passwd = r.buffer() or b""
        read_only = r.bool() if r.remaining else None
        return cls(proto, zxid, timeout, sid, passwd, read_only)

    def write(self, w: Writer) -> None:
        w.int(self.protocol_version)
        w.long(self.last_zxid_seen)
        w.int(self.timeout)
        w.long(self.session_id)
        w.buffer(self.passwd)
        if self.read_only is not None:
            w.bool(self.read_only)


@attrs.frozen
class ConnectResponse:
    protocol_version: int
    timeout: int
    session_id: int
    passwd: bytes
    read_only: bool | None = False

    @classmethod
    def read(cls, r: Reader) -> ConnectResponse:
        proto, timeout, sid = r.int(), r.int(), r.long()
        passwd = r.buffer() or b""
        read_only = r.bool() if r.remaining else None
        return cls(proto, timeout, sid, passwd, read_only)

    def write(self, w: Writer) -> None:
        w.int(self.protocol_version)
        w.int(self.timeout)
        w.long(self.session_id)
        w.buffer(self.passwd)
        if self.read_only is not None:
            w.bool(self.read_only)


@attrs.frozen
class RequestHeader:
    xid: int
    type: int

    @classmethod
    def read(cls, r: Reader) -> RequestHeader:
        return cls(r.int(), r.int())

    def write(self, w: Writer) -> None:
        w.int(self.xid)
        w.int(self.type)


@attrs.frozen
class ReplyHeader:
    xid: int
    zxid: int
    err: int

    @classmethod
    def read(cls, r: Reader) -> ReplyHeader:
        return cls(r.int(), r.long(), r.int())

    def write(self, w: Writer) -> None:
        w.int(self.xid)
        w.long(self.zxid)
        w.int(self.err)


# --- requests -----------------------------------------------------------------


@attrs.frozen
class CreateRequest:
    path: str | None
    data: bytes | None
    acl: tuple[ACL, ...] | None
    flags: int

    @classmethod
    def read(cls, r: Reader) -> CreateRequest:
        return cls(r.ustring(), r.buffer(), read_acls(r), r.int())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.buffer(self.data)
        write_acls(w, self.acl)
        w.int(self.flags)


@attrs.frozen
class CreateTTLRequest:
    path: str | None
    data: bytes | None
    acl: tuple[ACL, ...] | None
    flags: int
    ttl: int

    @classmethod
    def read(cls, r: Reader) -> CreateTTLRequest:
        return cls(r.ustring(), r.buffer(), read_acls(r), r.int(), r.long())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.buffer(self.data)
        write_acls(w, self.acl)
        w.int(self.flags)
        w.long(self.ttl)


@attrs.frozen
class DeleteRequest:
    path: str | None
    version: int

    @classmethod
    def read(cls, r: Reader) -> DeleteRequest:
        return cls(r.ustring(), r.int())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.int(self.version)


CheckVersionRequest = DeleteRequest


@attrs.frozen
class PathWatchRequest:
    """exists, getData, getChildren and getChildren2 all send (path, watch)."""

    path: str | None
    watch: bool

    @classmethod
    def read(cls, r: Reader) -> PathWatchRequest:
        return cls(r.ustring(), r.bool())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.bool(self.watch)


@attrs.frozen
class PathRequest:
    """getACL, sync, getEphemerals and getAllChildrenNumber send only a path."""

    path: str | None

    @classmethod
    def read(cls, r: Reader) -> PathRequest:
        return cls(r.ustring())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)


@attrs.frozen
class SetDataRequest:
    path: str | None
    data: bytes | None
    version: int

    @classmethod
    def read(cls, r: Reader) -> SetDataRequest:
        return cls(r.ustring(), r.buffer(), r.int())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.buffer(self.data)
        w.int(self.version)


@attrs.frozen
class SetACLRequest:
    path: str | None
    acl: tuple[ACL, ...] | None
    version: int

    @classmethod
    def read(cls, r: Reader) -> SetACLRequest:
        return cls(r.ustring(), read_acls(r), r.int())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        write_acls(w, self.acl)
        w.int(self.version)


def _read_paths(r: Reader) -> tuple[str, ...]:
    return tuple(r.vector(Reader.string) or ())


def _write_paths(w: Writer, paths: tuple[str | None, ...] | None) -> None:
    w.vector(paths, Writer.ustring)


#: A setWatches path list as sent: None for a null vector, None entries for null strings.
WatchPaths = tuple[str | None, ...] | None


def _read_watch_paths(r: Reader) -> WatchPaths:
    paths = r.vector(Reader.ustring)
    return None if paths is None else tuple(paths)


@attrs.frozen
class SetWatches:
    relative_zxid: int
    data: WatchPaths
    exist: WatchPaths
    child: WatchPaths

    @classmethod
    def read(cls, r: Reader) -> SetWatches:
        return cls(r.long(), _read_watch_paths(r), _read_watch_paths(r), _read_watch_paths(r))

    def write(self, w: Writer) -> None:
        w.long(self.relative_zxid)
        for paths in (self.data, self.exist, self.child):
            _write_paths(w, paths)


@attrs.frozen
class SetWatches2:
    relative_zxid: int
    data: WatchPaths
    exist: WatchPaths
    child: WatchPaths
    persistent: WatchPaths
    persistent_recursive: WatchPaths

    @classmethod
    def read(cls, r: Reader) -> SetWatches2:
        return cls(r.long(), *(_read_watch_paths(r) for _ in range(5)))

    def write(self, w: Writer) -> None:
        w.long(self.relative_zxid)
        for paths in (
            self.data,
            self.exist,
            self.child,
            self.persistent,
            self.persistent_recursive,
        ):
            _write_paths(w, paths)


@attrs.frozen
class AuthPacket:
    type: int
    scheme: str | None
    #: kazoo writes an empty auth as null.
    auth: bytes | None

    @classmethod
    def read(cls, r: Reader) -> AuthPacket:
        return cls(r.int(), r.ustring(), r.buffer())

    def write(self, w: Writer) -> None:
        w.int(self.type)
        w.ustring(self.scheme)
        w.buffer(self.auth)


@attrs.frozen
class AddWatchRequest:
    path: str | None
    mode: int

    @classmethod
    def read(cls, r: Reader) -> AddWatchRequest:
        return cls(r.ustring(), r.int())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.int(self.mode)


@attrs.frozen
class WatchesRequest:
    """checkWatches and removeWatches: a path and a watcher type."""

    path: str | None
    type: int

    @classmethod
    def read(cls, r: Reader) -> WatchesRequest:
        return cls(r.ustring(), r.int())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        w.int(self.type)


@attrs.frozen
class ReconfigRequest:
    joining_servers: str | None
    leaving_servers: str | None
    new_members: str | None
    cur_config_id: int

    @classmethod
    def read(cls, r: Reader) -> ReconfigRequest:
        return cls(r.ustring(), r.ustring(), r.ustring(), r.long())

    def write(self, w: Writer) -> None:
        w.ustring(self.joining_servers)
        w.ustring(self.leaving_servers)
        w.ustring(self.new_members)
        w.long(self.cur_config_id)


@attrs.frozen
class GetSASLRequest:
    token: bytes | None

    @classmethod
    def read(cls, r: Reader) -> GetSASLRequest:
        return cls(r.buffer())

    def write(self, w: Writer) -> None:
        w.buffer(self.token)


@attrs.frozen
class MultiHeader:
    type: int
    done: bool
    err: int

    @classmethod
    def read(cls, r: Reader) -> MultiHeader:
        return cls(r.int(), r.bool(), r.int())

    def write(self, w: Writer) -> None:
        w.int(self.type)
        w.bool(self.done)
        w.int(self.err)


MULTI_END = MultiHeader(-1, True, -1)


@attrs.frozen
class MultiRequest:
    ops: tuple[tuple[int, Record], ...]
    #: Which operations this kind of multi may carry (:attr:`Op.multi`).
    kind: ClassVar[str] = "multi"

    @classmethod
    def read(cls, r: Reader) -> Self:
        ops: list[tuple[int, Record]] = []
        while True:
            header = MultiHeader.read(r)
            if header.done:
                return cls(tuple(ops))
            op = OPS.get(header.type)
            if op is None or op.multi != cls.kind or op.request is None:
                raise DecodeError(f"operation {header.type} is not allowed in this multi")
            ops.append((header.type, op.request.read(r)))

    def write(self, w: Writer) -> None:
        for op, record in self.ops:
            MultiHeader(op, False, -1).write(w)
            record.write(w)
        MULTI_END.write(w)


@attrs.frozen
class MultiReadRequest(MultiRequest):
    kind: ClassVar[str] = "multiRead"


# --- responses ----------------------------------------------------------------


@attrs.frozen
class CreateResponse:
    path: str

    @classmethod
    def read(cls, r: Reader) -> CreateResponse:
        return cls(r.string())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)


@attrs.frozen
class Create2Response:
    path: str
    stat: Stat

    @classmethod
    def read(cls, r: Reader) -> Create2Response:
        return cls(r.string(), Stat.read(r))

    def write(self, w: Writer) -> None:
        w.ustring(self.path)
        self.stat.write(w)


@attrs.frozen
class StatResponse:
    """exists, setData and setACL answer with a bare Stat."""

    stat: Stat

    @classmethod
    def read(cls, r: Reader) -> StatResponse:
        return cls(Stat.read(r))

    def write(self, w: Writer) -> None:
        self.stat.write(w)


@attrs.frozen
class GetDataResponse:
    data: bytes | None
    stat: Stat

    @classmethod
    def read(cls, r: Reader) -> GetDataResponse:
        return cls(r.buffer(), Stat.read(r))

    def write(self, w: Writer) -> None:
        w.buffer(self.data)
        self.stat.write(w)


@attrs.frozen
class GetACLResponse:
    acl: tuple[ACL, ...]
    stat: Stat

    @classmethod
    def read(cls, r: Reader) -> GetACLResponse:
        return cls(read_acls(r) or (), Stat.read(r))

    def write(self, w: Writer) -> None:
        write_acls(w, self.acl)
        self.stat.write(w)


@attrs.frozen
class GetChildrenResponse:
    children: tuple[str, ...]

    @classmethod
    def read(cls, r: Reader) -> GetChildrenResponse:
        return cls(_read_paths(r))

    def write(self, w: Writer) -> None:
        _write_paths(w, self.children)


@attrs.frozen
class GetChildren2Response:
    children: tuple[str, ...]
    stat: Stat

    @classmethod
    def read(cls, r: Reader) -> GetChildren2Response:
        return cls(_read_paths(r), Stat.read(r))

    def write(self, w: Writer) -> None:
        _write_paths(w, self.children)
        self.stat.write(w)


@attrs.frozen
class PathResponse:
    """sync answers with the path it synced (null when the request's was)."""

    path: str | None

    @classmethod
    def read(cls, r: Reader) -> PathResponse:
        return cls(r.ustring())

    def write(self, w: Writer) -> None:
        w.ustring(self.path)


@attrs.frozen
class CountResponse:
    """getAllChildrenNumber answers with one int."""

    count: int

    @classmethod
    def read(cls, r: Reader) -> CountResponse:
        return cls(r.int())

    def write(self, w: Writer) -> None:
        w.int(self.count)


@attrs.frozen
class PathsResponse:
    """getEphemerals answers with a list of paths."""

    paths: tuple[str, ...]

    @classmethod
    def read(cls, r: Reader) -> PathsResponse:
        return cls(_read_paths(r))

    def write(self, w: Writer) -> None:
        _write_paths(w, self.paths)


@attrs.frozen
class ClientInfo:
    auth_scheme: str
    user: str

    @classmethod
    def read(cls, r: Reader) -> ClientInfo:
        return cls(r.string(), r.string())

    def write(self, w: Writer) -> None:
        w.ustring(self.auth_scheme)
        w.ustring(self.user)


@attrs.frozen
class WhoAmIResponse:
    client_info: tuple[ClientInfo, ...]

    @classmethod
    def read(cls, r: Reader) -> WhoAmIResponse:
        return cls(tuple(r.vector(ClientInfo.read) or ()))

    def write(self, w: Writer) -> None:
        w.vector(self.client_info, lambda w, info: info.write(w))


@attrs.frozen
class SetSASLResponse:
    token: bytes | None

    @classmethod
    def read(cls, r: Reader) -> SetSASLResponse:
        return cls(r.buffer())

    def write(self, w: Writer) -> None:
        w.buffer(self.token)


@attrs.frozen
class ErrorResult:
    """A failed (or rolled back) operation inside a multi."""

    err: int

    @classmethod
    def read(cls, r: Reader) -> ErrorResult:
        return cls(r.int())

    def write(self, w: Writer) -> None:
        w.int(self.err)


@attrs.frozen
class MultiResponse:
    results: tuple[tuple[int, Record], ...]

    @classmethod
    def read(cls, r: Reader) -> MultiResponse:
        results: list[tuple[int, Record]] = []
        while True:
            header = MultiHeader.read(r)
            if header.done:
                return cls(tuple(results))
            record_type = MULTI_RESULTS.get(header.type)
            if record_type is None:
                raise DecodeError(f"unexpected multi result type {header.type}")
            results.append((header.type, record_type.read(r)))

    def write(self, w: Writer) -> None:
        for op, record in self.results:
            err = record.err if isinstance(record, ErrorResult) else 0
            MultiHeader(op, False, err).write(w)
            record.write(w)
        MULTI_END.write(w)


@attrs.frozen
class WatcherEvent:
    type: int
    state: int
    path: str

    @classmethod
    def read(cls, r: Reader) -> WatcherEvent:
        return cls(r.int(), r.int(), r.string())

    def write(self, w: Writer) -> None:
        w.int(self.type)
        w.int(self.state)
        w.ustring(self.path)


# --- the opcode table -----------------------------------------------------------


@attrs.frozen
class Op:
    """What zkgate knows of one opcode; every other opcode table derives from :data:`OPS`."""

    code: OpCode
    #: ZooKeeper's name for it (``Request.op2String``), as its logs and audit print it.
    name: str
    #: The record the request carries; None for a request with no body.
    request: type[Record] | None
    #: The record a successful reply carries; None for a reply of the header alone.
    response: type[Record] | None
    #: It changes the tree: ZooKeeper makes it a transaction (``Request.isQuorum``).
    write: bool = False
    #: The kind of multi that may carry it (``"multi"`` or ``"multiRead"``), if any.
    multi: str | None = None


#: Every opcode of ZooKeeper 3.8, by number.
OPS: dict[int, Op] = {op.code: op for op in (
    Op(OpCode.NOTIFICATION, "notification", None, None),
    Op(OpCode.CREATE, "create", CreateRequest, CreateResponse, write=True, multi="multi"),
    Op(OpCode.DELETE, "delete", DeleteRequest, None, write=True, multi="multi"),
    Op(OpCode.EXISTS, "exists", PathWatchRequest, StatResponse),
    Op(OpCode.GET_DATA, "getData", PathWatchRequest, GetDataResponse, multi="multiRead"),
    Op(OpCode.SET_DATA, "setData", SetDataRequest, StatResponse, write=True, multi="multi"),
    Op(OpCode.GET_ACL, "getACL", PathRequest, GetACLResponse),
    Op(OpCode.SET_ACL, "setACL", SetACLRequest, StatResponse, write=True),
    Op(OpCode.GET_CHILDREN, "getChildren", PathWatchRequest, GetChildrenResponse,
       multi="multiRead"),
    Op(OpCode.SYNC, "sync", PathRequest, PathResponse),
    Op(OpCode.PING, "ping", None, None),
    Op(OpCode.GET_CHILDREN2, "getChildren2", PathWatchRequest, GetChildren2Response),
    Op(OpCode.CHECK, "check", CheckVersionRequest, None, write=True, multi="multi"),
    Op(OpCode.MULTI, "multi", MultiRequest, MultiResponse, write=True),
    Op(OpCode.CREATE2, "create2", CreateRequest, Create2Response, write=True, multi="multi"),
    # reconfig answers with the new configuration as a getData would.
    Op(OpCode.RECONFIG, "reconfig", ReconfigRequest, GetDataResponse, write=True),
    Op(OpCode.CHECK_WATCHES, "checkWatches", WatchesRequest, None),
    Op(OpCode.REMOVE_WATCHES, "removeWatches", WatchesRequest, None),
    Op(OpCode.CREATE_CONTAINER, "createContainer", CreateRequest, Create2Response, write=True,
       multi="multi"),
    Op(OpCode.DELETE_CONTAINER, "deleteContainer", PathRequest, None, write=True),
    Op(OpCode.CREATE_TTL, "createTtl", CreateTTLRequest, Create2Response, write=True,
       multi="multi"),
    Op(OpCode.MULTI_READ, "multiRead", MultiReadRequest, MultiResponse),
    Op(OpCode.AUTH, "auth", AuthPacket, None),
    Op(OpCode.SET_WATCHES, "setWatches", SetWatches, None),
    Op(OpCode.SASL, "sasl", GetSASLRequest, SetSASLResponse),
    Op(OpCode.GET_EPHEMERALS, "getEphemerals", PathRequest, PathsResponse),
    Op(OpCode.GET_ALL_CHILDREN_NUMBER, "getAllChildrenNumber", PathRequest, CountResponse),
    Op(OpCode.SET_WATCHES2, "setWatches2", SetWatches2, None),
    # ZooKeeper 3.8's FinalRequestProcessor answers addWatch with
    # ``new ErrorResponse(0)``: a 4-byte int that is always 0.
    Op(OpCode.ADD_WATCH, "addWatch", AddWatchRequest, ErrorResult),
    Op(OpCode.WHO_AM_I, "whoAmI", Empty, WhoAmIResponse),
    # The ConnectRequest is not a request frame; the connection objects frame it.
    Op(OpCode.CREATE_SESSION, "createSession", None, None, write=True),
    Op(OpCode.CLOSE_SESSION, "closeSession", None, None, write=True),
    # Labels a failed operation's result inside a multi reply; never sent alone.
    Op(OpCode.ERROR, "error", None, None),
)}  # fmt: skip

#: The request record of every opcode that carries one.
REQUESTS: dict[int, type[Record]] = {
    code: op.request for code, op in OPS.items() if op.request is not None
}

#: What each result inside a multi reply decodes as: the operation's own
#: response (an empty one for delete and check), or a failed operation's error.
MULTI_RESULTS: dict[int, type[Record]] = {
    **{code: op.response or Empty for code, op in OPS.items() if op.multi is not None},
    OpCode.ERROR: ErrorResult,
}


def op_name(opcode: int) -> str:
    """ZooKeeper's name for ``opcode``, ``unknown N`` as ZooKeeper prints others."""
    op = OPS.get(opcode)
    return op.name if op is not None else f"unknown {opcode}"
