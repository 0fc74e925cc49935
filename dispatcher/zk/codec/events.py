"""The events of a ZooKeeper conversation, in both directions.

A client *sends* :class:`Connect`, :class:`Request` and :class:`FourLetterWord`
and *receives* :class:`Connected`, :class:`ReplyReceived`,
:class:`WatchNotified` and :class:`FourLetterReply`. A server *receives*
:class:`ConnectRequested`, :class:`RequestReceived` and
:class:`FourLetterWord` and *sends* :class:`ConnectAccepted`, :class:`Reply`,
:class:`Notification` and :class:`FourLetterReply`. The connection objects
turn sent events into bytes and received bytes into events.

Bodies that cross the wire stay ``bytes`` on the receiving side
(:class:`RequestReceived`, :class:`ReplyReceived`): only the receiver knows
which record to decode (by opcode on the server, by the xid's request on the
client), and the server's hot reads decode their body in place.
"""

from __future__ import annotations

import struct

import attrs

from dispatcher.zk.codec.jute import Writer
from dispatcher.zk.codec.protocol import XID_NOTIFICATION, Err
from dispatcher.zk.codec.records import ConnectRequest, ConnectResponse, Record, WatcherEvent

__all__ = [
    "FRAMED_REPLY_HEADER",
    "ClientEvent",
    "Connect",
    "ConnectAccepted",
    "ConnectRequested",
    "Connected",
    "FourLetterReply",
    "FourLetterWord",
    "Notification",
    "Reply",
    "ReplyReceived",
    "Request",
    "RequestReceived",
    "ServerEvent",
    "WatchNotified",
]

#: length, xid, zxid, err: the framed reply header.
FRAMED_REPLY_HEADER = struct.Struct(">iiqi")


# --- both directions ------------------------------------------------------------


@attrs.frozen
class FourLetterWord:
    """A four-letter word (``ruok``, ``mntr``...): the whole of what the client says."""

    word: str


@attrs.frozen
class FourLetterReply:
    """The server's text answer to a four-letter word; the server then closes."""

    text: str


# --- client to server -----------------------------------------------------------


@attrs.frozen
class Connect:
    """The client opens (or resumes) a session."""

    request: ConnectRequest


@attrs.frozen
class Request:
    """One request: ``record`` is None for the body-less ones (ping, closeSession)."""

    xid: int
    opcode: int
    record: Record | None = None


@attrs.frozen
class ConnectRequested:
    """The server received a client's ConnectRequest."""

    request: ConnectRequest


@attrs.frozen
class RequestReceived:
    """The server received one request; ``body`` is the record's encoding."""

    xid: int
    opcode: int
    body: bytes


# --- server to client -----------------------------------------------------------


@attrs.frozen
class ConnectAccepted:
    """The server's answer to a ConnectRequest.

    ``response.timeout <= 0`` refuses the session (ZooKeeper's answer to an
    expired session or a wrong password), which ends the conversation.
    """

    response: ConnectResponse


@attrs.frozen
class Reply:
    """The answer to the request sent with ``xid``.

    ``body`` is the result record, or its encoding as bytes when the server
    has it already (the cached data and Stat of a znode, an upstream's answer
    forwarded as it came): bytes are framed as they are, without a copy.
    """

    xid: int
    zxid: int
    err: int
    body: bytes | Record = b""


@attrs.frozen
class Notification:
    """A watch event for one watcher.

    The frame is encoded once, when the event is made, and every connection's
    ``send`` returns that same ``bytes`` object: firing one event to a
    thousand watchers encodes it once, not a thousand times.
    """

    event: WatcherEvent
    frame: bytes = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        w = Writer(bytearray(FRAMED_REPLY_HEADER.size))
        self.event.write(w)
        # ZooKeeper 3.8 puts -1, not the txn's zxid, in a notification's header.
        FRAMED_REPLY_HEADER.pack_into(w.out, 0, len(w.out) - 4, XID_NOTIFICATION, -1, int(Err.OK))
        object.__setattr__(self, "frame", bytes(w.out))


@attrs.frozen
class Connected:
    """The client received the server's ConnectResponse (``timeout <= 0``: refused)."""

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
    """The client received a watch event."""

    event: WatcherEvent


#: What a server's ``next_event`` returns.
ServerEvent = FourLetterWord | ConnectRequested | RequestReceived
#: What a client's ``next_event`` returns.
ClientEvent = Connected | ReplyReceived | WatchNotified | FourLetterReply
