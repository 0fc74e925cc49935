"""Fuzz target: the ZooKeeper codec as zkgate's own client reads a server.

Contract: whatever a server sends, :class:`~dispatcher.zk.codec.client_connection.ClientConnection`,
:func:`~dispatcher.zk.codec.client_connection.decode_body` and the reply records
raise only :class:`~dispatcher.zk.codec.connection.ProtocolError` (which
``client_connection`` re-exports and raises for every undecodable frame) or
:class:`~dispatcher.zk.codec.jute.DecodeError` (the direct decoding of a record);
anything else escaping is a crash. A record that decodes must survive a write
and a second read unchanged.

Input layout: the first byte chooses the mode.

* below 0x80: a byte stream from a server, delivered in chunks of
  ``first byte + 1`` bytes, after the client sent its ConnectRequest: a
  ConnectResponse (one with a timeout of 0 refuses the session and ends the
  stream), then replies and watch
  notifications. The client knows which request an xid answered; here the
  reply with xid ``x`` answers ``REPLY_OPCODES[x % len(REPLY_OPCODES)]``;
* 0x80 and above: the rest is one body, decoded by the record that the low
  seven bits choose from :data:`DECODERS` (modulo its length).
"""

from __future__ import annotations

from dispatcher.zk.codec.client_connection import (
    RESPONSES,
    ClientConnection,
    Connect,
    Connected,
    ProtocolError,
    ReplyReceived,
    WatchNotified,
    decode_body,
)
from dispatcher.zk.codec.jute import DecodeError, Reader
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import (
    ConnectRequest,
    ConnectResponse,
    Record,
    WatcherEvent,
    encode,
)
from fuzz._common import chunks, fuzz_main

#: Every opcode a client sends, the body-less ones included (their replies
#: decode to None), in a fixed order the corpus relies on.
REPLY_OPCODES: tuple[int, ...] = tuple(sorted(
    {*RESPONSES, OpCode.DELETE, OpCode.PING, OpCode.CLOSE_SESSION, OpCode.AUTH,
     OpCode.SET_WATCHES, OpCode.SET_WATCHES2, OpCode.CHECK_WATCHES, OpCode.REMOVE_WATCHES}
))  # fmt: skip
#: Record decoders for the direct mode, in a fixed order the corpus relies on.
DECODERS: tuple[type[Record], ...] = (
    ConnectResponse,
    WatcherEvent,
    *(RESPONSES[opcode] for opcode in sorted(RESPONSES)),
)
#: What the client asks before the server's bytes arrive.
CONNECT = ConnectRequest(0, 0, 30_000, 0, bytes(16), False)
#: Small limit so that the fuzzer reaches the oversized-frame refusal.
MAX_BUFFER = 4096


def check_record(record: Record) -> None:
    """Re-encoding a decoded record must give back the same record."""
    again = type(record).read(Reader(encode(record)))
    if again != record:
        raise AssertionError(f"{type(record).__name__} changed in a round trip: "
                             f"{record!r} {again!r}")  # fmt: skip


def feed_stream(payload: bytes, chunk: int) -> None:
    conn = ClientConnection(max_buffer=MAX_BUFFER)
    conn.send(Connect(CONNECT))
    for piece in chunks(payload, chunk):
        conn.receive_data(piece)
        while (event := conn.next_event()) is not None:
            if isinstance(event, Connected):
                check_record(event.response)
            elif isinstance(event, WatchNotified):
                check_record(event.event)
            else:
                assert isinstance(event, ReplyReceived)
                opcode = REPLY_OPCODES[event.xid % len(REPLY_OPCODES)]
                record = decode_body(opcode, event.err, event.body)
                if record is not None:
                    check_record(record)
        if conn.buffered > 4 + conn.max_frame + chunk:
            raise AssertionError(f"{conn.buffered} bytes buffered")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0], data[1:]
    try:
        if mode < 0x80:
            feed_stream(payload, mode + 1)
        else:
            record_type = DECODERS[(mode & 0x7F) % len(DECODERS)]
            check_record(record_type.read(Reader(payload)))
    except (ProtocolError, DecodeError):
        pass


if __name__ == "__main__":
    fuzz_main(TestOneInput, "dispatcher.zk", "fuzz")
