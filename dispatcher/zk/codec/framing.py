"""What both ends of a ZooKeeper connection share: states, errors, the receive buffer.

A connection object (:class:`~dispatcher.zk.codec.connection.ServerConnection`,
:class:`~dispatcher.zk.codec.client_connection.ClientConnection`) is a state
machine over :class:`State`. Two kinds of error end it:

* :class:`ProtocolError`: the *peer* broke the protocol (raised by
  ``next_event``). The connection moves to ``ERROR`` and must be closed.
* :class:`LocalProtocolError`: *this* side asked for something its state does
  not allow (a reply before the session was answered, any call once in
  ``ERROR``). It is a bug in the caller, never something a peer can cause.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "FrameBuffer",
    "LocalProtocolError",
    "ProtocolError",
    "State",
]

_LENGTH = struct.Struct(">i")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must close."""


class LocalProtocolError(Exception):
    """This side used the connection in a way its state does not allow."""


class State(enum.Enum):
    """Where a conversation is, named from the connection's own point of view.

    ``IDLE``: nothing exchanged yet. ``CONNECTING``: the ConnectRequest is on
    its way (client) or has been received and awaits its answer (server).
    ``CONNECTED``: requests, replies and notifications flow. ``CLOSING``: a
    closeSession was sent (client) or received (server) and its reply is
    owed. ``FOUR_LETTER``: the conversation is one four-letter word and its
    text answer. ``CLOSED``: the conversation is over (the closeSession reply,
    a four-letter answer, a refused session). ``ERROR``: the peer broke the
    protocol; every later call raises :class:`LocalProtocolError`.
    """

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"
    FOUR_LETTER = "four-letter"
    CLOSED = "closed"
    ERROR = "error"


class FrameBuffer:
    """Bytes received and not yet taken as frames, for either end of a connection.

    Consumed frames are only marked (``_offset``) and dropped on the next
    receive, so taking many small frames out of one read copies nothing. A read
    that arrives when everything before it was taken is kept as the ``bytes``
    it came in (no copy); only a frame split across reads is assembled in a
    ``bytearray``.
    """

    __slots__ = ("_buffer", "_error", "_offset", "state")

    #: States in which nothing received will ever be read: bytes that arrive
    #: then are dropped, not kept, so no buffer grows behind a finished
    #: conversation.
    _DISCARDING: frozenset[State] = frozenset({State.CLOSED})

    def __init__(self) -> None:
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        self.state = State.IDLE
        #: Why the connection is in ERROR, for the message of every later refusal.
        self._error = ""

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` (end of stream) adds nothing."""
        state = self.state
        if state is not State.CONNECTED:
            if state is State.ERROR:
                self._refuse("receive_data")
            if state in self._DISCARDING:
                return
        buf, offset = self._buffer, self._offset
        if offset >= len(buf):
            self._buffer = bytes(data)
        elif isinstance(buf, bytearray):
            if offset:
                del buf[:offset]
            buf += data
        else:
            self._buffer = bytearray(memoryview(buf)[offset:])
            self._buffer += data
        self._offset = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as events."""
        return len(self._buffer) - self._offset

    def _fail(self, message: str) -> ProtocolError:
        """Enter ERROR; the caller raises what this returns."""
        self.state = State.ERROR
        self._error = message
        return ProtocolError(message)

    def _refuse(self, call: str) -> None:
        raise LocalProtocolError(f"{call} after the peer broke the protocol ({self._error})")

    def _frame_length(self, start: int, limit: int) -> int | None:
        """The length prefix at ``start``, None until four bytes are there.

        Checked against ``limit`` as soon as it arrives, so the buffer never
        grows past one frame plus one read.
        """
        buf = self._buffer
        if len(buf) - start < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buf, start)
        if length < 0 or length > limit:
            raise self._fail(f"frame length {length} outside 0..{limit}")
        return int(length)
