"""Fuzz target: the ZooKeeper codec as the server reads it.

Contract: whatever a client sends, :class:`~dispatcher.zk.codec.connection.ServerConnection`
and the request records of :data:`~dispatcher.zk.codec.records.REQUESTS` raise only
:class:`~dispatcher.zk.codec.connection.ProtocolError` or
:class:`~dispatcher.zk.codec.jute.DecodeError` (the server closes the connection on
either); anything else escaping is a crash. A record that decodes must also
survive a write and a second read unchanged, or the codec disagrees with
itself.

Input layout: the first byte chooses the mode.

* below 0x80: a byte stream from a client, delivered in chunks of
  ``first byte + 1`` bytes, framed by ``ServerConnection`` (connect request or
  four-letter word, then requests; the session is accepted as a server
  would) with every request body decoded as the engine decodes it;
* 0x80 and above: the rest is one body, decoded by the record that the low
  seven bits choose from :data:`DECODERS` (modulo its length).
"""

from __future__ import annotations

from dispatcher.zk.codec.connection import (
    ConnectAccepted,
    ConnectRequested,
    FourLetterWord,
    ProtocolError,
    RequestReceived,
    ServerConnection,
)
from dispatcher.zk.codec.jute import DecodeError, Reader
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import (
    REQUESTS,
    ConnectRequest,
    ConnectResponse,
    Record,
    encode,
)
from dispatcher.zk.server.engine import _path_and_watch
from fuzz._common import chunks, fuzz_main

#: The engine decodes these (path, watch) bodies in place, not through a record.
READ_OPCODES = frozenset({OpCode.GET_DATA, OpCode.EXISTS, OpCode.GET_CHILDREN,
                          OpCode.GET_CHILDREN2})  # fmt: skip
#: Opcodes whose bodies the engine never reads.
BODYLESS_OPCODES = frozenset({OpCode.PING, OpCode.CLOSE_SESSION})
#: Small limit so that the fuzzer reaches the oversized-frame refusal.
MAX_BUFFER = 4096
#: Record decoders for the direct mode, in a fixed order the corpus relies on.
DECODERS: tuple[type[Record], ...] = (
    ConnectRequest,
    *(REQUESTS[opcode] for opcode in sorted(REQUESTS)),
)
#: The answer to every ConnectRequest, so that requests after it are read.
ACCEPTED = ConnectResponse(0, 30_000, 1, bytes(16), False)
#: Index of the in-place (path, watch) decoder in the direct mode.
PATH_AND_WATCH = len(DECODERS)


def check_record(record_type: type[Record], body: bytes) -> None:
    """Decode ``body``; if it decodes, re-encoding must give back the same record."""
    record = record_type.read(Reader(body))
    again = record_type.read(Reader(encode(record)))
    if again != record:
        raise AssertionError(
            f"{record_type.__name__} changed in a round trip: {record!r} {again!r}"
        )


def check_request(opcode: int, body: bytes) -> None:
    """Decode one request body the way :meth:`Engine.handle` does."""
    if opcode in READ_OPCODES:
        _path_and_watch(body)
    elif opcode not in BODYLESS_OPCODES:
        record_type = REQUESTS.get(opcode)
        if record_type is not None:
            check_record(record_type, body)


def feed_stream(payload: bytes, chunk: int) -> None:
    conn = ServerConnection(max_buffer=MAX_BUFFER)
    for piece in chunks(payload, chunk):
        conn.receive_data(piece)
        while (event := conn.next_event()) is not None:
            if isinstance(event, RequestReceived):
                check_request(event.opcode, event.body)
            elif isinstance(event, FourLetterWord):
                return  # the word is the whole conversation
            else:
                assert isinstance(event, ConnectRequested)
                conn.send(ConnectAccepted(ACCEPTED))
        # The buffer never holds more than one frame and one read.
        if conn.buffered > 4 + MAX_BUFFER + chunk:
            raise AssertionError(f"{conn.buffered} bytes buffered")


def decode_direct(choice: int, body: bytes) -> None:
    if choice == PATH_AND_WATCH:
        _path_and_watch(body)
    else:
        check_record(DECODERS[choice], body)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0], data[1:]
    try:
        if mode < 0x80:
            feed_stream(payload, mode + 1)
        else:
            decode_direct((mode & 0x7F) % (PATH_AND_WATCH + 1), payload)
    except (ProtocolError, DecodeError):
        pass


if __name__ == "__main__":
    fuzz_main(TestOneInput, "dispatcher.zk", "fuzz")
