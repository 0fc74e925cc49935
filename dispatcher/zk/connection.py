"""Sans-I/O framing of one ZooKeeper server connection.

Bytes go in with :meth:`ServerConnection.receive_data`; typed events come out
of :meth:`ServerConnection.next_event`. No sockets, no trio: the server around
it owns those. The first frame of a connection is a ConnectRequest, unless its
first four bytes spell a four-letter word, in which case that word is the whole
conversation.
"""

from __future__ import annotations

import struct

import attrs

from dispatcher.zk.jute import DecodeError, Reader
from dispatcher.zk.protocol import DEFAULT_MAX_BUFFER
from dispatcher.zk.records import ConnectRequest

_LENGTH = struct.Struct(">i")
_HEADER = struct.Struct(">ii")

#: Every four-letter word ZooKeeper 3.8 knows; anything else is a frame length.
FOUR_LETTER_WORDS = frozenset({
    "conf", "cons", "crst", "dirs", "dump", "envi", "gtmk", "hash", "isro", "mntr",
    "ruok", "srst", "srvr", "stat", "stmk", "wchc", "wchp", "wchs",
})  # fmt: skip


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must close."""


@attrs.frozen
class FourLetterWord:
    word: str


@attrs.frozen
class ConnectRequested:
    request: ConnectRequest


@attrs.frozen
class RequestReceived:
    xid: int
    opcode: int
    body: bytes


Event = FourLetterWord | ConnectRequested | RequestReceived


class FrameBuffer:
    """Bytes received and not yet taken as frames, for either end of a connection.

    Consumed frames are only marked (``_offset``) and dropped on the next
    receive, so taking many small frames out of one read copies nothing. A read
    that arrives when everything before it was taken is kept as the ``bytes``
    it came in (no copy); only a frame split across reads is assembled in a
    ``bytearray``.
    """

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer: bytes | bytearray = b""
        self._offset = 0

    def receive_data(self, data: bytes) -> None:
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
        return len(self._buffer) - self._offset


class ServerConnection(FrameBuffer):
    """Turns a byte stream from a client into events, one frame at a time."""

    __slots__ = ("_connected", "_finished", "max_buffer")

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__()
        self.max_buffer = max_buffer
        self._connected = False
        self._finished = False

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes arrive."""
        if self._finished:
            return None
        buf, start = self._buffer, self._offset
        if len(buf) - start < 4:
            if start and start == len(buf):
                # All taken: an idle connection keeps no copy of its last read.
                self._buffer, self._offset = b"", 0
            return None
        if not self._connected:
            word = bytes(buf[start : start + 4])
            if word.isascii() and word.decode("ascii") in FOUR_LETTER_WORDS:
                self._finished = True
                return FourLetterWord(word.decode("ascii"))
        (length,) = _LENGTH.unpack_from(buf, start)
        if length < 0 or length > self.max_buffer:
            raise ProtocolError(f"frame length {length} outside 0..{self.max_buffer}")
        end = start + 4 + length
        if len(buf) < end:
            return None
        self._offset = end
        if not self._connected:
            self._connected = True
            try:
                return ConnectRequested(ConnectRequest.read(Reader(bytes(buf[start + 4 : end]))))
            except DecodeError as exc:
                raise ProtocolError(f"undecodable ConnectRequest: {exc}") from exc
        if length < _HEADER.size:
            raise ProtocolError(f"frame of {length} bytes is shorter than a request header")
        xid, opcode = _HEADER.unpack_from(buf, start + 4)
        return RequestReceived(xid, opcode, bytes(buf[start + 12 : end]))
