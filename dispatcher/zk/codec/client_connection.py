"""Sans-I/O ZooKeeper, the client's side of one connection.

The mirror of :mod:`dispatcher.zk.codec.connection`: the client's requests go
in as events to :meth:`ClientConnection.send`, which returns the bytes to
write; bytes read from the server go in with
:meth:`ClientConnection.receive_data`; typed events come out of
:meth:`ClientConnection.next_event` in exactly the order their frames
arrived. No sockets, no trio: :mod:`dispatcher.zk.client` owns those.

The conversation, as :class:`~dispatcher.zk.codec.framing.State` tracks it::

    IDLE --send(Connect)--> CONNECTING --Connected--> CONNECTED
    CONNECTING --Connected with timeout <= 0 (session refused)--> CLOSED
    CONNECTED --send(Request(closeSession))--> CLOSING --its ReplyReceived--> CLOSED
    IDLE --send(FourLetterWord)--> FOUR_LETTER --end of stream--> FourLetterReply, CLOSED
    any --next_event raised ProtocolError--> ERROR (every later call raises)

Requests may be sent while CONNECTING: the server reads them once it has
answered the ConnectRequest. The first frame from the server is its
ConnectResponse; every later frame is a reply header followed by a body,
where xid -1 marks a watch notification.

Reply bodies stay bytes here because only the caller knows which request an
xid answered; :func:`decode_body` turns them into records by opcode.
"""

from __future__ import annotations

import struct

from dispatcher.zk.codec.events import (
    ClientEvent,
    Connect,
    Connected,
    FourLetterReply,
    FourLetterWord,
    ReplyReceived,
    Request,
    WatchNotified,
)
from dispatcher.zk.codec.framing import FrameBuffer, LocalProtocolError, ProtocolError, State
from dispatcher.zk.codec.jute import DecodeError, Reader, Writer
from dispatcher.zk.codec.protocol import DEFAULT_MAX_BUFFER, XID_NOTIFICATION, OpCode
from dispatcher.zk.codec.records import OPS, ConnectResponse, Record, WatcherEvent

__all__ = [
    "FRAME_SLACK",
    "RESPONSES",
    "ClientConnection",
    "Connect",
    "Connected",
    "Event",
    "FourLetterReply",
    "FourLetterWord",
    "LocalProtocolError",
    "ProtocolError",
    "ReplyReceived",
    "Request",
    "State",
    "WatchNotified",
    "decode_body",
]

_LENGTH = struct.Struct(">i")
_REQUEST_HEADER = struct.Struct(">iii")
_REPLY_HEADER = struct.Struct(">iqi")
_CLOSE_SESSION = int(OpCode.CLOSE_SESSION)

#: Bytes a frame may carry beyond ``max_buffer``: ZooKeeper bounds the *data*
#: of a znode by jute.maxbuffer, and the reply that carries such data adds a
#: reply header (16 bytes), a length prefix and a Stat (68 bytes). Without the
#: slack a client with the server's own limit could not read the largest znode
#: the server accepts.
FRAME_SLACK = 1024

#: How to decode the body of a successful (err == 0) reply, by request opcode,
#: from the opcode table. Opcodes not listed answer with no body (delete,
#: checkWatches, removeWatches, setWatches, setWatches2, ping, closeSession, auth).
RESPONSES: dict[int, type[Record]] = {
    code: op.response for code, op in OPS.items() if op.response is not None
}

#: What the client receives.
Event = ClientEvent


class ClientConnection(FrameBuffer):
    """One connection to a ZooKeeper server as the client sees it.

    :meth:`next_event` raises :class:`ProtocolError` for a frame longer than
    ``max_buffer`` + :data:`FRAME_SLACK` (as soon as its length prefix
    arrives, so the buffer never grows past one frame plus one read), for a
    frame too short to hold a reply header, and for an undecodable
    ConnectResponse or notification; the connection is then in ERROR.
    """

    __slots__ = ("_close_xid", "_eof", "max_frame")

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__()
        self.max_frame = max_buffer + FRAME_SLACK
        self._close_xid: int | None = None
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the server; ``b""`` marks the end of its stream,
        which completes a four-letter answer."""
        super().receive_data(data)
        if not data:
            self._eof = True

    def send(self, event: Connect | Request | FourLetterWord) -> bytes:
        """The bytes that carry ``event`` to the server.

        Raises :class:`LocalProtocolError` for an event the state does not
        allow: a second Connect, a request before Connect or after
        closeSession, a four-letter word once anything else was sent, and
        anything once CLOSED or in ERROR.
        """
        state = self.state
        if isinstance(event, Request) and state in (State.CONNECTED, State.CONNECTING):
            w = Writer(bytearray(_REQUEST_HEADER.size))
            if event.record is not None:
                event.record.write(w)
            _REQUEST_HEADER.pack_into(w.out, 0, len(w.out) - 4, event.xid, event.opcode)
            if event.opcode == _CLOSE_SESSION:
                self.state = State.CLOSING
                self._close_xid = event.xid
            return bytes(w.out)
        if state is State.ERROR:
            self._refuse("send")
        if isinstance(event, Connect) and state is State.IDLE:
            w = Writer(bytearray(_LENGTH.size))
            event.request.write(w)
            _LENGTH.pack_into(w.out, 0, len(w.out) - _LENGTH.size)
            self.state = State.CONNECTING
            return bytes(w.out)
        if isinstance(event, FourLetterWord) and state is State.IDLE:
            self.state = State.FOUR_LETTER
            return event.word.encode("ascii")
        raise LocalProtocolError(f"cannot send {type(event).__name__} in state {state.name}")

    def next_event(self) -> ClientEvent | None:
        """The next complete event, or None until more bytes arrive (or none may)."""
        state = self.state
        if state is State.CONNECTED or state is State.CLOSING:
            return self._next_reply()
        if state is State.CONNECTING:
            return self._next_connect_response()
        if state is State.FOUR_LETTER:
            return self._four_letter_reply()
        if state is State.ERROR:
            self._refuse("next_event")
        if state is State.IDLE:
            raise LocalProtocolError("next_event before anything was sent")
        return None  # CLOSED: the conversation is over

    def _payload(self) -> memoryview | bytes | None:
        """The next whole frame's payload, None until it has arrived."""
        start = self._offset
        length = self._frame_length(start, self.max_frame)
        if length is None:
            return None
        end = start + _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        self._offset = end
        return bytes(self._buffer[start + _LENGTH.size : end])

    def _next_connect_response(self) -> Connected | None:
        payload = self._payload()
        if payload is None:
            return None
        try:
            response = ConnectResponse.read(Reader(payload))
        except DecodeError as exc:
            raise self._fail(f"undecodable ConnectResponse: {exc}") from exc
        self.state = State.CONNECTED if response.timeout > 0 else State.CLOSED
        return Connected(response)

    def _next_reply(self) -> ReplyReceived | WatchNotified | None:
        payload = self._payload()
        if payload is None:
            return None
        if len(payload) < _REPLY_HEADER.size:
            raise self._fail(f"frame of {len(payload)} bytes is shorter than a reply header")
        xid, zxid, err = _REPLY_HEADER.unpack_from(payload)
        if xid == XID_NOTIFICATION:
            try:
                return WatchNotified(WatcherEvent.read(Reader(payload, _REPLY_HEADER.size)))
            except DecodeError as exc:
                raise self._fail(f"undecodable watch notification: {exc}") from exc
        if self.state is State.CLOSING and xid == self._close_xid:
            self.state = State.CLOSED
        return ReplyReceived(xid, zxid, err, bytes(payload[_REPLY_HEADER.size :]))

    def _four_letter_reply(self) -> FourLetterReply | None:
        if self.buffered > self.max_frame:
            raise self._fail(f"four-letter answer longer than {self.max_frame} bytes")
        if not self._eof:
            return None
        text = bytes(self._buffer[self._offset :])
        self._buffer, self._offset = b"", 0
        self.state = State.CLOSED
        return FourLetterReply(text.decode("utf-8", "replace"))


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
