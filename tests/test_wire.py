"""The subscription protocol's codec: round trips, and refusals of bad frames."""

from __future__ import annotations

import json
import struct

import pytest
import trio
import trio.testing

from dispatcher import wire
from dispatcher.wire import (
    Ack,
    Assignment,
    Deltas,
    Error,
    FrameDecoder,
    Full,
    Hello,
    Lookup,
    Owner,
    Ping,
    Redirect,
    Report,
    Subscribe,
    WatchAssignments,
    WireError,
    WireInstance,
    WireStream,
)

INSTANCE = WireInstance("i-1", "10.0.0.1", 8080, 50, "z1", "passing", {"k": "v"})
OWNER = Owner("d1", "127.0.0.1:7000", "127.0.0.1:2181")

EXAMPLES = [
    Hello(1, "secret", "proxy-a"),
    wire.Welcome(1, "d1"),
    Error("unauthenticated", "hello first"),
    Subscribe({"orders": None, "users": 42}),
    wire.Unsubscribe(("orders",)),
    Full("orders", 7, (INSTANCE,)),
    Deltas("orders", 7, 9, (INSTANCE,), ("i-2",)),
    Redirect("orders", OWNER, 3),
    Redirect("orders", None, 3),
    Ack("orders", 9),
    Hello(1, "secret", "proxy-b", policies=True, application="web-frontend"),
    wire.PolicyUpdate(
        "orders",
        12,
        {
            "connect_timeout": 0.5,
            "split": {"version=v1": 90, "version=v2": 10},
            "weights": {"instances": {"10.0.0.1:8080": 50}},
        },
    ),
    wire.PolicyUpdate("orders", 0, {}),
    wire.PolicyAck("orders", 12),
    Report("orders", "i-1", "connect-refused"),
    Lookup(("orders", "users")),
    WatchAssignments(("orders",)),
    Assignment(4, {"orders": OWNER, "gone": None}),
    Ping(),
    wire.Pong(),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.type)
def test_every_message_round_trips(message: wire.Message) -> None:
    decoder = FrameDecoder()
    assert list(decoder.feed(wire.encode(message))) == [message]


def test_an_older_peer_hello_decodes_and_a_new_one_adds_only_what_it_sets() -> None:
    """A proxy that predates policies sends no ``policies``/``application``: it decodes
    with them off (and is sent no PolicyUpdate); a new proxy that sets neither sends the
    same bytes as before, so an older server sees nothing new."""
    old = _frame({"type": "hello", "version": 1, "token": "t", "client_id": "c"})
    (hello,) = FrameDecoder().feed(old)
    assert hello == Hello(1, "t", "c") and not hello.policies and hello.application == ""
    assert json.loads(wire.encode(Hello(1, "t", "c"))[4:]) == {
        "type": "hello", "version": 1, "token": "t", "client_id": "c"}  # fmt: skip


def test_a_policy_nested_as_deep_as_the_model_allows_fits_the_depth_limit() -> None:
    policy = {"weights": {"instances": {"a:1": 5}, "zones": {"z": 1}},
              "retries": {"on": ["reset"]}}  # fmt: skip
    message = wire.PolicyUpdate("s", 3, policy)
    assert list(FrameDecoder().feed(wire.encode(message))) == [message]


def test_frames_split_anywhere_still_decode() -> None:
    stream = b"".join(wire.encode(m) for m in EXAMPLES)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == EXAMPLES


def _frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"\x00\x00\x00\x03abc", "not JSON"),
        (_frame([1, 2]), "JSON object"),
        (_frame({"type": "launch-missiles"}), "unknown message type"),
        (_frame({"type": "hello", "version": "1", "token": "t", "client_id": "c"}), "'version'"),
        (_frame({"type": "subscribe", "services": {"a": "x"}}), "version number"),
        (_frame({"type": "policy", "service": "s", "version": 1, "policy": [1]}), "'policy'"),
        (_frame({"type": "policy", "service": "s", "version": 1}), "'policy'"),
        (_frame({"type": "policy", "service": "s", "version": -1, "policy": {}}), ">= 0"),
        (_frame({"type": "policy", "service": 5, "version": 1, "policy": {}}), "'service'"),
        (_frame({"type": "policy-ack", "service": "s", "version": True}), "'version'"),
        (
            _frame(
                {"type": "hello", "version": 1, "token": "t", "client_id": "c", "policies": "yes"}
            ),
            "'policies'",
        ),
        (
            _frame(
                {
                    "type": "hello",
                    "version": 1,
                    "token": "t",
                    "client_id": "c",
                    "application": ["web"],
                }
            ),
            "'application'",
        ),
        (_frame({"type": "full", "service": "s", "version": 1, "instances": [{"id": 1}]}), "'id'"),
        (
            _frame(
                {
                    "type": "delta",
                    "service": "s",
                    "from_version": 1,
                    "to_version": 2,
                    "removed": [3],
                }
            ),
            "list of strings",
        ),
    ],
)
def test_bad_frames_are_refused_with_a_reason(raw: bytes, complaint: str) -> None:
    with pytest.raises(WireError, match=complaint):
        list(FrameDecoder().feed(raw))


def _raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        # Each of these ended the process: json.loads raised RecursionError or
        # ValueError, which the decoder did not turn into a WireError.
        (_raw(b"[" * 100_000 + b"]" * 100_000), "deeper than 16"),
        (_raw(b"{" * 17 + b"}" * 17), "deeper than 16"),
        (
            _raw(b'{"type":"hello","version":' + b"9" * 5000 + b',"token":"t","client_id":"c"}'),
            "more than 20 digits",
        ),
        (_raw(b'{"type":"ack","service":"s","version":-' + b"9" * 30 + b"}"), "more than 20"),
        (_raw(b'{"type":"ack","service":"s","version":18446744073709551616}'), "out of range"),
        (_raw(b'{"type":"ack","service":"s","version":1e999}'), "'version' must be an integer"),
        (_raw(b'{"type":"hello","token":"\xff"}'), "not JSON"),
        (_raw(b'{"type":"hello","version":1,"token":"t","client_id":"c"]'), "brackets"),
    ],
)
def test_frames_built_to_break_the_parser_are_refused(raw: bytes, complaint: str) -> None:
    with pytest.raises(WireError, match=complaint):
        list(FrameDecoder().feed(raw))


def test_brackets_and_digits_inside_strings_do_not_count() -> None:
    metadata = {"note": "[" * 100 + "{" * 100 + "\\" + '"' + "9" * 500}
    message = wire.Full("s", 1, (wire.WireInstance("a:1", "a", 1, metadata=metadata),))
    assert list(FrameDecoder().feed(wire.encode(message))) == [message]
    nested = {"type": "ack", "service": "s", "version": 1, "x": [[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]}
    assert list(FrameDecoder().feed(_frame(nested))) == [wire.Ack("s", 1)]


def test_oversized_frames_are_refused_before_buffering() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(WireError, match="exceeds"):
        list(decoder.feed(struct.pack(">I", 1025)))


async def test_wire_stream_carries_messages_both_ways() -> None:
    left, right = trio.testing.memory_stream_pair()
    a, b = WireStream(left), WireStream(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send, Hello(1, "t", "c"))
        assert await b.receive() == Hello(1, "t", "c")
        nursery.start_soon(b.send, Full("s", 1, (INSTANCE,)))
        assert await a.receive() == Full("s", 1, (INSTANCE,))
    await a.aclose()
    with pytest.raises(EOFError):
        await b.receive()


# --- addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("zk1:2181", ("zk1", 2181)),
        ("10.0.0.1:0", ("10.0.0.1", 0)),
        (":2181", ("127.0.0.1", 2181)),
        ("[::1]:2379", ("::1", 2379)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ],
)
def test_addresses_parse_the_same_everywhere(text: str, expected: tuple[str, int]) -> None:
    assert wire.parse_address(text) == expected
    assert wire.parse_address(wire.join_address(*expected)) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("zk1", "expected HOST:PORT"),
        ("zk1:", "expected HOST:PORT"),
        ("zk1:65536", "1..65535"),
        ("zk1:-1", "expected HOST:PORT"),
        ("zk1:\uff18\uff10", "expected HOST:PORT"),  # fullwidth digits: str.isdigit says yes
        ("zk1:0000000080", "expected HOST:PORT"),
        ("::1:2379", r"IPv6 host as \[addr\]"),
        ("[::1:2379", "unclosed"),
        ("[]:1", "unclosed or empty"),
        ("[::1]2379", "expected HOST:PORT"),
    ],
)
def test_bad_addresses_are_refused_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        wire.parse_address(text)


def test_peer_addresses_need_a_host_and_a_real_port() -> None:
    with pytest.raises(ValueError, match="no host"):
        wire.parse_address(":80", default_host=None)
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        wire.parse_address("h:0", allow_port_zero=False)


# --- the handshake ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        (wire.Ping(), "unauthenticated", "say hello first, not ping"),
        (Hello(wire.PROTOCOL_VERSION + 1, "s3cret", "p"), "unsupported-version", "not 2"),
        (Hello(wire.PROTOCOL_VERSION, "s3cre", "p"), "unauthenticated", "wrong token (client p)"),
        (Hello(wire.PROTOCOL_VERSION, "", "p"), "unauthenticated", "wrong token"),
        # A lone surrogate survives JSON decoding; it must be refused, not crash the server.
        (Hello(wire.PROTOCOL_VERSION, "\ud800", "p"), "unauthenticated", "wrong token"),
        (Hello(wire.PROTOCOL_VERSION, "s3cret", "p" * 257), "bad-request", "longer than 256"),
        (
            Hello(wire.PROTOCOL_VERSION, "s3cret", "p", True, "a" * 257),
            "bad-request",
            "application longer than 256",
        ),
    ],
)
def test_the_handshake_refuses_with_a_code(message: wire.Message, code: str, reason: str) -> None:
    for token in ("s3cret", b"s3cret"):
        answer = wire.check_hello(message, token, "server-1")
        assert isinstance(answer, wire.Error)
        assert answer.code == code and reason in answer.message


def test_the_handshake_welcomes_the_right_token() -> None:
    hello = Hello(wire.PROTOCOL_VERSION, "s3cret", "p" * 256)
    assert wire.check_hello(hello, "s3cret", "server-1") == wire.Welcome(
        wire.PROTOCOL_VERSION, "server-1"
    )


def test_a_long_client_id_is_clipped_in_the_refusal() -> None:
    answer = wire.check_hello(Hello(wire.PROTOCOL_VERSION, "no", "x" * 10_000), "s3cret", "s")
    assert isinstance(answer, wire.Error)
    assert len(answer.message) < 400 and "(10000 characters)" in answer.message
