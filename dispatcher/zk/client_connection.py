"""Sans-I/O framing of one ZooKeeper client connection (the client's side).

The mirror of :mod:`dispatcher.zk.connection`: bytes read from a server go in
with :meth:`ClientConnection.receive_data`; typed events come out of
:meth:`ClientConnection.next_event` in exactly the order their frames arrived.
The first frame of a connection is the server's ConnectResponse; every later
frame is a reply header followed by a body, where xid -1 marks a watch
notification. No sockets, no trio: :mod:`dispatcher.zk.client` owns those.

Reply bodies stay bytes here because only the caller knows which request an
xid answered; :func:`decode_body` turns them into records by opcode.
"""

from __future__ import annotations

import struct

import attrs

from dispatcher.zk.connection import FrameBuffer, ProtocolError
from dispatcher.zk.jute import DecodeError, Reader, Writer
from dispatcher.zk.protocol import DEFAULT_MAX_BUFFER, XID_NOTIFICATION, OpCode
from dispatcher.zk.records import (
    ConnectRequest,
    ConnectResponse,
    CountResponse,
    Create2Response,
    CreateResponse,
    ErrorResult,
    GetACLResponse,
    GetChildren2Response,
    GetChildrenResponse,
    GetDataResponse,
    MultiResponse,
    PathResponse,
    PathsResponse,
    Record,
    SetSASLResponse,
    StatResponse,
    WatcherEvent,
    WhoAmIResponse,
)

__all__ = [
    "FRAME_SLACK",
    "RESPONSES",
    "ClientConnection",
    "Connected",
    "Event",
    "ProtocolError",
    "ReplyReceived",
    "WatchNotified",
    "decode_body",
    "encode_connect",
    "encode_request",
]

_LENGTH = struct.Struct(">i")
_REPLY_HEADER = struct.Struct(">iqi")

#: Bytes a frame may carry beyond ``max_buffer``: ZooKeeper bounds the *data*
#: of a znode by jute.maxbuffer, and the reply that carries such data adds a
#: reply header (16 bytes), a length prefix and a Stat (68 bytes). Without the
#: slack a client with the server's own limit could not read the largest znode
#: the server accepts.
FRAME_SLACK = 1024

#: How to decode the body of a successful (err == 0) reply, by request opcode.
#: Opcodes not listed answer with no body (delete, checkWatches, removeWatches,
#: setWatches, setWatches2, ping, closeSession, auth).
RESPONSES: dict[int, type[Record]] = {
    OpCode.CREATE: CreateResponse,
    OpCode.CREATE2: Create2Response,
    OpCode.CREATE_CONTAINER: Create2Response,
    OpCode.CREATE_TTL: Create2Response,
    OpCode.EXISTS: StatResponse,
    OpCode.SET_DATA: StatResponse,
    OpCode.SET_ACL: StatResponse,
    OpCode.GET_DATA: GetDataResponse,
    OpCode.GET_ACL: GetACLResponse,
    OpCode.GET_CHILDREN: GetChildrenResponse,
    OpCode.GET_CHILDREN2: GetChildren2Response,
    OpCode.SYNC: PathResponse,
    OpCode.MULTI: MultiResponse,
    OpCode.MULTI_READ: MultiResponse,
    # ZooKeeper 3.8's FinalRequestProcessor answers addWatch with
    # ``new ErrorResponse(0)``: a 4-byte int that is always 0.
    OpCode.ADD_WATCH: ErrorResult,
    OpCode.GET_EPHEMERALS: PathsResponse,
    OpCode.GET_ALL_CHILDREN_NUMBER: CountResponse,
    OpCode.WHO_AM_I: WhoAmIResponse,
    # reconfig answers with the new configuration as a getData would.
    OpCode.RECONFIG: GetDataResponse,
    OpCode.SASL: SetSASLResponse,
}


@attrs.frozen
class Connected:
    """The server accepted (or refused, with ``timeout <= 0``) the session."""

    response: ConnectResponse


@attrs.frozen
class ReplyReceived:
    """The answer to the request sent with ``xid`` (or to a ping, auth or setWatches)."""

    xid: int
    zxid: int
    err: int
    body: bytes


@attrs.frozen
class WatchNotified:
    event: WatcherEvent


Event = Connected | ReplyReceived | WatchNotified


class ClientConnection(FrameBuffer):
    """Turns the byte stream from a ZooKeeper server into events, one frame at a time.

    Raises :class:`ProtocolError` for a frame longer than ``max_buffer`` +
    :data:`FRAME_SLACK` (as soon as its length prefix arrives, so the buffer
    never grows past one frame plus one read), for a frame too short to hold
    a reply header, and for an undecodable ConnectResponse or notification.
    After a ProtocolError the connection is unusable and must be closed.
    """

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__()
        self.max_frame = max_buffer + FRAME_SLACK
        self._connected = False

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes arrive."""
        buf, start = self._buffer, self._offset
        if len(buf) - start < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buf, start)
        if length < 0 or length > self.max_frame:
            raise ProtocolError(f"frame length {length} outside 0..{self.max_frame}")
        end = start + _LENGTH.size + length
        if len(buf) < end:
            return None
        self._offset = end
        payload = bytes(buf[start + _LENGTH.size : end])
        if not self._connected:
            self._connected = True
            try:
                return Connected(ConnectResponse.read(Reader(payload)))
            except DecodeError as exc:
                raise ProtocolError(f"undecodable ConnectResponse: {exc}") from exc
        if length < _REPLY_HEADER.size:
            raise ProtocolError(f"frame of {length} bytes is shorter than a reply header")
        xid, zxid, err = _REPLY_HEADER.unpack_from(payload)
        if xid == XID_NOTIFICATION:
            try:
                return WatchNotified(WatcherEvent.read(Reader(payload, _REPLY_HEADER.size)))
            except DecodeError as exc:
                raise ProtocolError(f"undecodable watch notification: {exc}") from exc
        return ReplyReceived(xid, zxid, err, payload[_REPLY_HEADER.size :])


def decode_body(opcode: int, err: int, body: bytes) -> Record | None:
    """The record a reply to ``opcode`` carries, or None when it carries none.

    As ZooKeeper's own client does, a reply with ``err != 0`` is never decoded
    (the server sends only the header then). Raises :class:`ProtocolError` if
    the body does not decode as the record the opcode promises.
    """
    record_type = RESPONSES.get(opcode)
    if err != 0 or record_type is None:
        return None
    try:
        return record_type.read(Reader(body))
    except DecodeError as exc:
        raise ProtocolError(f"undecodable reply to opcode {opcode}: {exc}") from exc


def encode_connect(request: ConnectRequest) -> bytes:
    """The framed ConnectRequest that opens a connection."""
    w = Writer()
    w.int(0)  # length placeholder, patched below: one buffer, no copy of the body
    request.write(w)
    _LENGTH.pack_into(w.out, 0, len(w.out) - _LENGTH.size)
    return bytes(w.out)


def encode_request(xid: int, opcode: int, record: Record | None = None) -> bytes:
    """One framed request: length, request header (xid, opcode), then the record."""
    w = Writer()
    w.int(0)
    w.int(xid)
    w.int(opcode)
    if record is not None:
        record.write(w)
    _LENGTH.pack_into(w.out, 0, len(w.out) - _LENGTH.size)
    return bytes(w.out)
