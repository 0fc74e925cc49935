"""A blocking, byte-exact ZooKeeper client for differential tests and benchmarks.

kazoo hides what a server really answered (it turns errors into exceptions,
drops reply zxids, reorders nothing but interprets much). Differential tests
need the raw answer: the reply header, the decoded body, and every watch event
in the order it arrived. This client sends exactly the request it is given and
returns exactly what came back, using zkgate's codec records in the client
direction.
"""

from __future__ import annotations

import socket
import struct

import attrs

from dispatcher.zk.codec.client_connection import RESPONSES
from dispatcher.zk.codec.jute import Reader, Writer
from dispatcher.zk.codec.protocol import (
    XID_AUTH,
    XID_NOTIFICATION,
    XID_PING,
    XID_SET_WATCHES,
    OpCode,
)
from dispatcher.zk.codec.records import (
    ConnectRequest,
    ConnectResponse,
    Record,
    ReplyHeader,
    WatcherEvent,
)

_LENGTH = struct.Struct(">i")

#: Requests that clients send with a fixed xid, as ZooKeeper's own client does.
_RESERVED_XIDS = {
    OpCode.PING: XID_PING,
    OpCode.AUTH: XID_AUTH,
    OpCode.SET_WATCHES: XID_SET_WATCHES,
    OpCode.SET_WATCHES2: XID_SET_WATCHES,
}


@attrs.frozen
class Reply:
    header: ReplyHeader
    body: bytes
    #: Watch events that arrived before this reply, in arrival order.
    events: tuple[tuple[ReplyHeader, WatcherEvent], ...]

    def decode(self, opcode: int) -> Record | None:
        if self.header.err or not self.body:
            return None
        return RESPONSES[opcode].read(Reader(self.body))


class WireClient:
    """One ZooKeeper connection driven request by request."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self._xid = 0
        self.session: ConnectResponse | None = None
        self.pending_events: list[tuple[ReplyHeader, WatcherEvent]] = []

    # --- framing ---

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(_LENGTH.pack(len(payload)) + payload)

    def read_frame(self) -> bytes | None:
        """The next frame's payload, or None at EOF."""
        while True:
            if len(self._buffer) >= 4:
                (length,) = _LENGTH.unpack_from(self._buffer)
                if len(self._buffer) >= 4 + length:
                    payload = bytes(self._buffer[4 : 4 + length])
                    del self._buffer[: 4 + length]
                    return payload
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data

    # --- session ---

    def connect(
        self,
        timeout_ms: int = 10000,
        session_id: int = 0,
        passwd: bytes = bytes(16),
        last_zxid: int = 0,
        read_only: bool | None = False,
    ) -> ConnectResponse:
        w = Writer()
        ConnectRequest(0, last_zxid, timeout_ms, session_id, passwd, read_only).write(w)
        self.send_frame(bytes(w.out))
        payload = self.read_frame()
        if payload is None:
            raise ConnectionError("server closed the connection instead of answering")
        self.session = ConnectResponse.read(Reader(payload))
        return self.session

    # --- requests ---

    def next_xid(self) -> int:
        self._xid += 1
        return self._xid

    def send(self, opcode: int, record: Record | None = None, xid: int | None = None) -> int:
        if xid is None:
            xid = _RESERVED_XIDS.get(opcode) or self.next_xid()
        w = Writer()
        w.int(xid)
        w.int(opcode)
        if record is not None:
            record.write(w)
        self.send_frame(bytes(w.out))
        return xid

    def receive(self, xid: int) -> Reply:
        """Read until the reply to ``xid``, collecting watch events on the way."""
        while True:
            payload = self.read_frame()
            if payload is None:
                raise ConnectionError(f"connection closed before the reply to xid {xid}")
            r = Reader(payload)
            header = ReplyHeader.read(r)
            if header.xid == XID_NOTIFICATION:
                self.pending_events.append((header, WatcherEvent.read(r)))
                continue
            if header.xid != xid:
                raise AssertionError(f"reply for xid {header.xid} while waiting for {xid}")
            events = tuple(self.pending_events)
            self.pending_events.clear()
            return Reply(header, payload[16:], events)

    def call(self, opcode: int, record: Record | None = None, xid: int | None = None) -> Reply:
        return self.receive(self.send(opcode, record, xid))

    def read_event(self) -> tuple[ReplyHeader, WatcherEvent] | None:
        """The next watch event (waiting for it), or None at EOF."""
        if self.pending_events:
            return self.pending_events.pop(0)
        payload = self.read_frame()
        if payload is None:
            return None
        r = Reader(payload)
        header = ReplyHeader.read(r)
        assert header.xid == XID_NOTIFICATION, header
        return header, WatcherEvent.read(r)

    def is_closed_by_server(self) -> bool:
        """True when the server has closed its end (reads EOF)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
