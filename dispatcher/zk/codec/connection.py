"""Sans-I/O ZooKeeper, the server's side of one connection.

Bytes from the client go in with :meth:`ServerConnection.receive_data`;
typed events come out of :meth:`ServerConnection.next_event`; the server's
answers go in as events to :meth:`ServerConnection.send`, which returns the
bytes to write. No sockets, no trio: the listener around it owns those.

The conversation, as :class:`~dispatcher.zk.codec.framing.State` tracks it::

    IDLE --ConnectRequested--> CONNECTING --send(ConnectAccepted)--> CONNECTED
    IDLE --FourLetterWord--> FOUR_LETTER --send(FourLetterReply)--> CLOSED
    CONNECTED --RequestReceived(closeSession)--> CLOSING --send(its Reply)--> CLOSED
    CONNECTING --send(ConnectAccepted with timeout <= 0)--> CLOSED
    any --next_event raised ProtocolError--> ERROR (every later call raises)

The first frame of a connection is a ConnectRequest, unless its first four
bytes spell a four-letter word, in which case that word is the whole
conversation. Requests are not read while a ConnectRequest awaits its answer
nor after a closeSession, as ZooKeeper reads none then either.
"""

from __future__ import annotations

import struct

from dispatcher.zk.codec.events import (
    FRAMED_REPLY_HEADER,
    ConnectAccepted,
    ConnectRequested,
    FourLetterReply,
    FourLetterWord,
    Notification,
    Reply,
    RequestReceived,
    ServerEvent,
)
from dispatcher.zk.codec.framing import FrameBuffer, LocalProtocolError, ProtocolError, State
from dispatcher.zk.codec.jute import DecodeError, Reader, Writer
from dispatcher.zk.codec.protocol import DEFAULT_MAX_BUFFER, OpCode
from dispatcher.zk.codec.records import ConnectRequest, Record

__all__ = [
    "FOUR_LETTER_WORDS",
    "ConnectAccepted",
    "ConnectRequested",
    "Event",
    "FourLetterReply",
    "FourLetterWord",
    "LocalProtocolError",
    "Notification",
    "ProtocolError",
    "Reply",
    "RequestReceived",
    "ServerConnection",
    "State",
]

_LENGTH = struct.Struct(">i")
_HEADER = struct.Struct(">ii")
_REPLY_HEADER_SIZE = FRAMED_REPLY_HEADER.size
_CLOSE_SESSION = int(OpCode.CLOSE_SESSION)
# Module constants rather than attribute lookups: the checks below run per frame.
_CONNECTED = State.CONNECTED
_CLOSING = State.CLOSING

#: Every four-letter word ZooKeeper 3.8 knows; anything else is a frame length.
FOUR_LETTER_WORDS = frozenset({
    "conf", "cons", "crst", "dirs", "dump", "envi", "gtmk", "hash", "isro", "mntr",
    "ruok", "srst", "srvr", "stat", "stmk", "wchc", "wchp", "wchs",
})  # fmt: skip

#: What the server receives (kept under the name the listener has always used).
Event = ServerEvent


class ServerConnection(FrameBuffer):
    """One client connection as the server sees it: bytes in, events out, and back."""

    __slots__ = ("_close_xid", "max_buffer")

    # After a four-letter word or a closeSession the server reads nothing more.
    _DISCARDING = frozenset({State.FOUR_LETTER, State.CLOSING, State.CLOSED})

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__()
        self.max_buffer = max_buffer
        #: The xid of the closeSession whose reply ends the conversation.
        self._close_xid: int | None = None

    def next_event(self) -> ServerEvent | None:
        """The next complete event, or None until more bytes arrive (or none may).

        Raises :class:`ProtocolError` for a frame longer than ``max_buffer``
        (from its length prefix alone), a request frame shorter than its
        header, or an undecodable ConnectRequest.
        """
        state = self.state
        if state is not _CONNECTED:
            return self._next_event_outside_session(state)
        request = self.next_request()
        return None if request is None else RequestReceived(*request)

    def next_request(self) -> tuple[int, int, bytes] | None:
        """In a session (state CONNECTED), the next complete request as
        ``(xid, opcode, body)``: :meth:`next_event`'s ``RequestReceived``
        without the event object, for the server's hot path, which reads
        hundreds of thousands of requests a second. None until more bytes
        arrive. Raises as :meth:`next_event` does; in any other state it
        raises :class:`LocalProtocolError` (use :meth:`next_event` there).
        """
        if self.state is not _CONNECTED:
            if self.state is State.ERROR:
                self._refuse("next_request")
            raise LocalProtocolError(f"cannot read a request in state {self.state.name}")
        buf, start = self._buffer, self._offset
        if len(buf) - start < 4:
            if start and start == len(buf):
                # All taken: an idle connection keeps no copy of its last read.
                self._buffer, self._offset = b"", 0
            return None
        (length,) = _LENGTH.unpack_from(buf, start)
        if length < 0 or length > self.max_buffer:
            raise self._fail(f"frame length {length} outside 0..{self.max_buffer}")
        end = start + 4 + length
        if len(buf) < end:
            return None
        if length < _HEADER.size:
            raise self._fail(f"frame of {length} bytes is shorter than a request header")
        self._offset = end
        xid, opcode = _HEADER.unpack_from(buf, start + 4)
        if opcode == _CLOSE_SESSION:
            self.state = _CLOSING
            self._close_xid = xid
        return xid, opcode, bytes(buf[start + 12 : end])

    def _next_event_outside_session(self, state: State) -> ServerEvent | None:
        if state is State.ERROR:
            self._refuse("next_event")
        if state is not State.IDLE:
            # CONNECTING, CLOSING, FOUR_LETTER, CLOSED: nothing is read until
            # the server has answered, or ever again.
            return None
        buf, start = self._buffer, self._offset
        if len(buf) - start < 4:
            return None
        word = bytes(buf[start : start + 4])
        if word.isascii() and word.decode("ascii") in FOUR_LETTER_WORDS:
            self._offset = start + 4
            self.state = State.FOUR_LETTER
            return FourLetterWord(word.decode("ascii"))
        length = self._frame_length(start, self.max_buffer)
        end = start + 4 + (length or 0)
        if length is None or len(buf) < end:
            return None
        self._offset = end
        try:
            request = ConnectRequest.read(Reader(bytes(buf[start + 4 : end])))
        except DecodeError as exc:
            raise self._fail(f"undecodable ConnectRequest: {exc}") from exc
        self.state = State.CONNECTING
        return ConnectRequested(request)

    def send(self, event: ConnectAccepted | Reply | Notification | FourLetterReply) -> bytes:
        """The bytes that carry ``event`` to the client.

        Raises :class:`LocalProtocolError` for an event the state does not
        allow: anything but ConnectAccepted while a ConnectRequest awaits its
        answer, replies and notifications outside a session, a four-letter
        reply without its word, anything once CLOSED or in ERROR.
        """
        state = self.state
        if type(event) is Reply:
            return self.send_reply(event.xid, event.zxid, event.err, event.body)
        if type(event) is Notification and (state is _CONNECTED or state is _CLOSING):
            return event.frame
        if state is State.ERROR:
            self._refuse("send")
        if isinstance(event, ConnectAccepted) and state is State.CONNECTING:
            w = Writer(bytearray(_LENGTH.size))
            event.response.write(w)
            _LENGTH.pack_into(w.out, 0, len(w.out) - _LENGTH.size)
            self.state = _CONNECTED if event.response.timeout > 0 else State.CLOSED
            return bytes(w.out)
        if isinstance(event, FourLetterReply) and state is State.FOUR_LETTER:
            self.state = State.CLOSED
            return event.text.encode()
        raise LocalProtocolError(f"cannot send {type(event).__name__} in state {state.name}")

    def send_reply(self, xid: int, zxid: int, err: int, body: bytes | Record = b"") -> bytes:
        """``send(Reply(xid, zxid, err, body))`` without making the event.

        The server's hot path: a pipelined getData costs a few microseconds,
        and building a frozen event for each reply would add a tenth to it.
        The same state rules apply.
        """
        state = self.state
        if state is not _CONNECTED:
            if state is not _CLOSING:
                if state is State.ERROR:
                    self._refuse("send")
                raise LocalProtocolError(f"cannot send Reply in state {state.name}")
            if xid == self._close_xid:
                self.state = State.CLOSED
        if isinstance(body, bytes):
            # One concatenation: the body is not copied twice.
            return FRAMED_REPLY_HEADER.pack(16 + len(body), xid, zxid, err) + body
        w = Writer(bytearray(_REPLY_HEADER_SIZE))
        body.write(w)
        FRAMED_REPLY_HEADER.pack_into(w.out, 0, len(w.out) - 4, xid, zxid, err)
        return bytes(w.out)
