"""The sans-I/O ZooKeeper codec: the opcode table, both connection objects, their states.

Every byte zkgate's server and client exchange goes through
:class:`ServerConnection` and :class:`ClientConnection`, so what is checked
here is what a ZooKeeper client or server on the other end relies on: each
opcode's records cross the wire and come back equal, in both directions; the
table carries ZooKeeper's own numbers and names; and a conversation that went
wrong stays refused rather than misread.
"""

from __future__ import annotations

import struct
import types
import typing
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.zk.codec import records
from dispatcher.zk.codec.client_connection import (
    RESPONSES,
    ClientConnection,
    Connect,
    Connected,
    ReplyReceived,
    Request,
    WatchNotified,
    decode_body,
)
from dispatcher.zk.codec.connection import (
    ConnectAccepted,
    ConnectRequested,
    FourLetterReply,
    FourLetterWord,
    LocalProtocolError,
    Notification,
    ProtocolError,
    Reply,
    RequestReceived,
    ServerConnection,
    State,
)
from dispatcher.zk.codec.jute import Reader
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import (
    MULTI_RESULTS,
    OPS,
    REQUESTS,
    ConnectRequest,
    ConnectResponse,
    MultiReadRequest,
    MultiRequest,
    MultiResponse,
    Record,
    WatcherEvent,
)

CONNECT = ConnectRequest(0, 0, 30_000, 0, bytes(16), False)
ACCEPTED = ConnectResponse(0, 30_000, 0x1234, b"p" * 16, False)

#: ZooKeeper 3.8's ``ZooDefs.OpCode`` numbers and ``Request.op2String`` names,
#: written out from its source: the table must say exactly this.
ZOOKEEPER_OPCODES = {
    "notification": 0, "create": 1, "delete": 2, "exists": 3, "getData": 4, "setData": 5,
    "getACL": 6, "setACL": 7, "getChildren": 8, "sync": 9, "ping": 11, "getChildren2": 12,
    "check": 13, "multi": 14, "create2": 15, "reconfig": 16, "checkWatches": 17,
    "removeWatches": 18, "createContainer": 19, "deleteContainer": 20, "createTtl": 21,
    "multiRead": 22, "auth": 100, "setWatches": 101, "sasl": 102, "getEphemerals": 103,
    "getAllChildrenNumber": 104, "setWatches2": 105, "addWatch": 106, "whoAmI": 107,
    "createSession": -10, "closeSession": -11, "error": -1,
}  # fmt: skip
#: The opcodes ZooKeeper logs as transactions (``Request.isQuorum``, sessions included).
ZOOKEEPER_WRITES = {
    "create", "delete", "setData", "setACL", "check", "multi", "create2", "reconfig",
    "createContainer", "deleteContainer", "createTtl", "createSession", "closeSession",
}  # fmt: skip


# ---------------------------------------------------------------- helpers


def connected_pair() -> tuple[ClientConnection, ServerConnection]:
    """A client and a server codec that have opened a session with each other."""
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(Connect(CONNECT)))
    assert server.next_event() == ConnectRequested(CONNECT)
    client.receive_data(server.send(ConnectAccepted(ACCEPTED)))
    assert client.next_event() == Connected(ACCEPTED)
    assert client.state is State.CONNECTED and server.state is State.CONNECTED
    return client, server


def broken_server() -> ServerConnection:
    """A server codec whose client sent a frame longer than max_buffer."""
    server = ServerConnection(max_buffer=100)
    server.receive_data(struct.pack(">i", 101))
    with pytest.raises(ProtocolError):
        server.next_event()
    return server


_INT = st.integers(-(2**31), 2**31 - 1)
_TEXT = st.text(max_size=20)


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """Values of a record field's type, nested records included."""
    if isinstance(hint, types.UnionType):
        return st.one_of(*(strategy_for(arg) for arg in typing.get_args(hint)))
    if hint is type(None):
        return st.none()
    if hint is str:
        return _TEXT
    if hint is bytes:
        return st.binary(max_size=20)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return _INT
    if typing.get_origin(hint) is tuple:
        item, _ellipsis = typing.get_args(hint)
        return st.lists(strategy_for(item), max_size=3).map(tuple)
    if attrs.has(hint):
        return record_strategy(hint)
    raise AssertionError(f"no strategy for {hint!r}")


def record_strategy(record_type: type[Any]) -> st.SearchStrategy[Any]:
    """Any value of ``record_type`` that its encoding can carry."""
    if issubclass(record_type, MultiRequest):
        kind = record_type.kind
        allowed = [(code, op.request) for code, op in OPS.items() if op.multi == kind]
        one = st.sampled_from(allowed).flatmap(
            lambda pair: record_strategy(pair[1]).map(lambda r: (pair[0], r))
        )
        return st.lists(one, max_size=3).map(lambda ops: record_type(tuple(ops)))
    if record_type is MultiResponse:
        one = st.sampled_from(sorted(MULTI_RESULTS)).flatmap(
            lambda code: record_strategy(MULTI_RESULTS[code]).map(lambda r: (code, r))
        )
        return st.lists(one, max_size=3).map(lambda results: MultiResponse(tuple(results)))
    hints = typing.get_type_hints(record_type, vars(records))
    fields = {f.name: strategy_for(hints[f.name]) for f in attrs.fields(record_type) if f.init}
    return st.builds(record_type, **fields)


# ---------------------------------------------------------------- the table


def test_the_table_holds_every_zookeeper_opcode_with_its_number_and_name() -> None:
    assert {op.name: code for code, op in OPS.items()} == ZOOKEEPER_OPCODES
    assert set(OPS) == {int(code) for code in OpCode}
    assert all(op.code == code for code, op in OPS.items())


def test_the_table_marks_as_writes_what_zookeeper_logs_as_transactions() -> None:
    assert {op.name for op in OPS.values() if op.write} == ZOOKEEPER_WRITES


def test_every_other_opcode_table_is_read_from_the_one_table() -> None:
    assert {c: op.request for c, op in OPS.items() if op.request is not None} == REQUESTS
    assert {c: op.response for c, op in OPS.items() if op.response is not None} == RESPONSES
    # Inside a multi, an operation answers with its own response, or an empty
    # one where the operation alone answers with a header (delete, check).
    for code, op in OPS.items():
        if op.multi is not None:
            assert MULTI_RESULTS[code] is (op.response or records.Empty)
            assert op.request is not None
    assert {c for c, op in OPS.items() if op.multi == "multiRead"} == {
        OpCode.GET_DATA,
        OpCode.GET_CHILDREN,
    }


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("code", sorted(OPS), ids=[OPS[c].name for c in sorted(OPS)])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), xid=st.integers(1, 2**31 - 1), zxid=st.integers(0, 2**63 - 1))
def test_every_opcode_crosses_the_wire_both_ways(
    code: int, data: st.DataObject, xid: int, zxid: int
) -> None:
    op = OPS[code]
    client, server = connected_pair()
    request = None if op.request is None else data.draw(record_strategy(op.request))
    server.receive_data(client.send(Request(xid, code, request)))
    received = server.next_event()
    assert isinstance(received, RequestReceived)
    assert (received.xid, received.opcode) == (xid, code)
    if op.request is None:
        assert received.body == b""
    else:
        assert op.request.read(Reader(received.body)) == request

    response = None if op.response is None else data.draw(record_strategy(op.response))
    body: bytes | Record = b"" if response is None else response
    client.receive_data(server.send(Reply(xid, zxid, 0, body)))
    answered = client.next_event()
    assert isinstance(answered, ReplyReceived)
    assert (answered.xid, answered.zxid, answered.err) == (xid, zxid, 0)
    assert decode_body(code, answered.err, answered.body) == response


@settings(max_examples=40, deadline=None)
@given(record=record_strategy(MultiReadRequest), xid=st.integers(1, 1000))
def test_pre_encoded_reply_bodies_frame_exactly_as_records(
    record: MultiReadRequest, xid: int
) -> None:
    _, server = connected_pair()
    as_record = server.send(Reply(xid, 7, 0, record))
    as_bytes = server.send(Reply(xid, 7, 0, records.encode(record)))
    assert as_record == as_bytes
    assert server.send_reply(xid, 7, 0, record) == as_bytes


@settings(max_examples=40, deadline=None)
@given(event=record_strategy(WatcherEvent).filter(lambda e: e.path is not None))
def test_a_notification_is_encoded_once_for_every_watcher(event: WatcherEvent) -> None:
    notification = Notification(event)
    pairs = [connected_pair() for _ in range(3)]
    sent = [server.send(notification) for _, server in pairs]
    # The very same bytes object: a thousand watchers cost one encoding.
    assert all(packet is notification.frame for packet in sent)
    for client, _ in pairs:
        client.receive_data(notification.frame)
        assert client.next_event() == WatchNotified(event)


def test_events_do_not_depend_on_how_the_client_bytes_are_split() -> None:
    client = ClientConnection()
    stream = client.send(Connect(CONNECT))
    stream += client.send(Request(1, OpCode.GET_DATA, records.PathWatchRequest("/a", True)))
    stream += client.send(Request(2, OpCode.PING))
    for chunk in (1, 3, 7, len(stream)):
        server = ServerConnection()
        events: list[object] = []
        for start in range(0, len(stream), chunk):
            server.receive_data(stream[start : start + chunk])
            while (event := server.next_event()) is not None:
                events.append(event)
                if isinstance(event, ConnectRequested):
                    server.send(ConnectAccepted(ACCEPTED))
        assert events == [
            ConnectRequested(CONNECT),
            RequestReceived(
                1, OpCode.GET_DATA, records.encode(records.PathWatchRequest("/a", True))
            ),
            RequestReceived(2, OpCode.PING, b""),
        ]


# ---------------------------------------------------------------- states


def test_a_reply_before_the_session_is_answered_is_refused() -> None:
    server = ServerConnection()
    with pytest.raises(LocalProtocolError):
        server.send(Reply(1, 0, 0))
    server.receive_data(ClientConnection().send(Connect(CONNECT)))
    assert isinstance(server.next_event(), ConnectRequested)
    assert server.state is State.CONNECTING
    for early in (Reply(1, 0, 0), Notification(WatcherEvent(1, 3, "/a")), FourLetterReply("x")):
        with pytest.raises(LocalProtocolError):
            server.send(early)
    server.send(ConnectAccepted(ACCEPTED))
    assert server.state is State.CONNECTED
    with pytest.raises(LocalProtocolError):
        server.send(ConnectAccepted(ACCEPTED))


def test_requests_wait_for_the_session_to_be_answered() -> None:
    client = ClientConnection()
    server = ServerConnection()
    # A client may pipeline requests behind its ConnectRequest...
    server.receive_data(client.send(Connect(CONNECT)) + client.send(Request(1, OpCode.PING)))
    assert isinstance(server.next_event(), ConnectRequested)
    # ...but the server reads none of them until it has answered.
    assert server.next_event() is None
    server.send(ConnectAccepted(ACCEPTED))
    assert server.next_event() == RequestReceived(1, OpCode.PING, b"")


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda s: s.receive_data(struct.pack(">i", 101)), id="oversized-frame"),
        pytest.param(lambda s: s.receive_data(struct.pack(">i", -5)), id="negative-length"),
        pytest.param(lambda s: s.receive_data(struct.pack(">i", 3) + b"abc"), id="bad-connect"),
    ],
)
def test_a_server_connection_refuses_every_call_once_the_client_broke_the_protocol(
    break_it: Any,
) -> None:
    server = ServerConnection(max_buffer=100)
    break_it(server)
    with pytest.raises(ProtocolError):
        server.next_event()
    assert server.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"ruok")
    with pytest.raises(LocalProtocolError):
        server.next_event()
    for event in (ConnectAccepted(ACCEPTED), Reply(1, 0, 0), FourLetterReply("imok")):
        with pytest.raises(LocalProtocolError):
            server.send(event)
    with pytest.raises(LocalProtocolError):
        server.send_reply(1, 0, 0)


def test_a_short_request_frame_breaks_an_established_session() -> None:
    _, server = connected_pair()
    server.receive_data(struct.pack(">i", 4) + b"\0\0\0\1")
    with pytest.raises(ProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(Notification(WatcherEvent(1, 3, "/a")))


def test_next_request_reads_what_next_event_reads_without_the_event() -> None:
    # The server's hot path takes requests as tuples: the same frames, split
    # anywhere, must give the same requests in the same order, and a
    # closeSession must end the reading exactly as through next_event.
    requests = [(1, OpCode.GET_DATA, b"\0\0\0\2/a\0"), (2, OpCode.PING, b""),
                (3, OpCode.CLOSE_SESSION, b"")]  # fmt: skip
    stream = b"".join(
        struct.pack(">iii", 8 + len(body), xid, opcode) + body for xid, opcode, body in requests
    )
    _, by_event = connected_pair()
    by_event.receive_data(stream)
    expected = []
    while (event := by_event.next_event()) is not None:
        assert isinstance(event, RequestReceived)
        expected.append((event.xid, event.opcode, event.body))
    assert [xid for xid, _, _ in expected] == [1, 2, 3]
    for cut in range(len(stream) + 1):
        _, server = connected_pair()
        got = []
        for part in (stream[:cut], stream[cut:]):
            server.receive_data(part)
            while server.state is State.CONNECTED and (request := server.next_request()):
                got.append(request)
        assert got == expected
        assert server.state is State.CLOSING


def test_next_request_refuses_outside_a_session_and_after_a_broken_frame() -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection().next_request()  # no session yet: next_event reads the connect
    _, server = connected_pair()
    server.receive_data(struct.pack(">i", 4) + b"\0\0\0\1")
    with pytest.raises(ProtocolError):
        server.next_request()
    with pytest.raises(LocalProtocolError):
        server.next_request()


def test_a_client_connection_refuses_every_call_once_the_server_broke_the_protocol() -> None:
    client = ClientConnection()
    client.send(Connect(CONNECT))
    client.receive_data(struct.pack(">i", 2) + b"\0\0")  # no ConnectResponse fits in 2 bytes
    with pytest.raises(ProtocolError):
        client.next_event()
    assert client.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, OpCode.PING))


def test_a_client_that_sent_nothing_has_nothing_to_read() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, OpCode.PING))


def test_a_four_letter_word_is_the_whole_conversation() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(FourLetterWord("ruok")) + b"more bytes")
    assert server.next_event() == FourLetterWord("ruok")
    assert server.state is State.FOUR_LETTER
    assert server.next_event() is None  # what follows the word is never read
    before = server.buffered
    server.receive_data(b"x" * 100_000)
    assert server.buffered == before  # nor kept: no buffer grows behind the word
    client.receive_data(server.send(FourLetterReply("imok")))
    assert server.state is State.CLOSED
    # The answer ends where the server's stream ends.
    assert client.next_event() is None
    client.receive_data(b"")
    assert client.next_event() == FourLetterReply("imok")
    assert client.state is State.CLOSED and client.next_event() is None
    with pytest.raises(LocalProtocolError):
        server.send(Reply(1, 0, 0))
    with pytest.raises(LocalProtocolError):
        server.send(FourLetterReply("imok"))
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, OpCode.PING))


def test_the_close_session_reply_ends_the_conversation_on_both_sides() -> None:
    client, server = connected_pair()
    server.receive_data(
        client.send(Request(5, OpCode.CLOSE_SESSION)) + struct.pack(">iii", 8, 6, OpCode.PING)
    )
    assert client.state is State.CLOSING
    with pytest.raises(LocalProtocolError):
        client.send(Request(6, OpCode.PING))
    assert server.next_event() == RequestReceived(5, OpCode.CLOSE_SESSION, b"")
    assert server.state is State.CLOSING
    assert server.next_event() is None  # nothing after closeSession is read
    before = server.buffered
    server.receive_data(b"x" * 100_000)
    assert server.buffered == before
    # The session's own watch events may still go out before the reply.
    out = server.send(Notification(WatcherEvent(2, 3, "/eph")))
    out += server.send(Reply(5, 9, 0))
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(Reply(6, 9, 0))
    client.receive_data(out)
    assert client.next_event() == WatchNotified(WatcherEvent(2, 3, "/eph"))
    assert client.next_event() == ReplyReceived(5, 9, 0, b"")
    assert client.state is State.CLOSED


def test_a_refused_session_ends_the_conversation() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(Connect(CONNECT)))
    assert isinstance(server.next_event(), ConnectRequested)
    refused = ConnectResponse(0, 0, 0, bytes(16), False)
    client.receive_data(server.send(ConnectAccepted(refused)))
    assert server.state is State.CLOSED
    assert client.next_event() == Connected(refused)
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(Reply(1, 0, 0))
