"""Write the seed corpus of every fuzz target to ``fuzz/corpus/<target>/``.

Run from the repository root: ``.venv/bin/python -m fuzz.make_corpus``. The
seeds are valid inputs in each target's layout (the module docstring of each
target describes it): a frame of every opcode and message type, every admin
route, every scenario configuration. Files are overwritten, never deleted,
so entries a long fuzzing run added by hand stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dispatcher import wire
from dispatcher.zk.codec.client_connection import RESPONSES, ClientConnection, Connect, Request
from dispatcher.zk.codec.connection import (
    ConnectAccepted,
    ConnectRequested,
    Notification,
    Reply,
    ServerConnection,
)
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.codec.records import (
    ACL,
    OPEN_ACL_UNSAFE,
    AddWatchRequest,
    AuthPacket,
    ClientInfo,
    ConnectRequest,
    ConnectResponse,
    CountResponse,
    Create2Response,
    CreateRequest,
    CreateResponse,
    CreateTTLRequest,
    DeleteRequest,
    Empty,
    ErrorResult,
    GetACLResponse,
    GetChildren2Response,
    GetChildrenResponse,
    GetDataResponse,
    GetSASLRequest,
    Id,
    MultiReadRequest,
    MultiRequest,
    MultiResponse,
    PathRequest,
    PathResponse,
    PathsResponse,
    PathWatchRequest,
    ReconfigRequest,
    Record,
    SetACLRequest,
    SetDataRequest,
    SetSASLResponse,
    SetWatches,
    SetWatches2,
    Stat,
    StatResponse,
    WatcherEvent,
    WatchesRequest,
    WhoAmIResponse,
    encode,
)
from fuzz import config as config_target
from fuzz import zk_client, zk_server

CORPUS = Path(__file__).parent / "corpus"
#: Mode bytes of the stream modes: whole 128-byte reads, and one byte at a time.
WHOLE, BYTEWISE = 0x7F, 0x00

ACLS = (*OPEN_ACL_UNSAFE, ACL(1, Id("digest", "user:hash=")), ACL(31, Id("ip", "10.0.0.0/8")))
STAT = Stat(5, 6, 1_700_000_000_000, 1_700_000_000_001, 1, 2, 0, 0x1234, 4, 2, 7)

#: A valid body of every request record, by opcode.
REQUEST_SAMPLES: dict[int, Record] = {
    OpCode.CREATE: CreateRequest("/app/node", b"data", ACLS, 0),
    OpCode.CREATE2: CreateRequest("/app/seq-", b"", OPEN_ACL_UNSAFE, 3),
    OpCode.CREATE_CONTAINER: CreateRequest("/app/box", None, OPEN_ACL_UNSAFE, 4),
    OpCode.CREATE_TTL: CreateTTLRequest("/app/ttl", b"t", OPEN_ACL_UNSAFE, 5, 60_000),
    OpCode.DELETE: DeleteRequest("/app/node", -1),
    OpCode.DELETE_CONTAINER: PathRequest("/app/box"),
    OpCode.EXISTS: PathWatchRequest("/app", True),
    OpCode.GET_DATA: PathWatchRequest("/app/node", False),
    OpCode.SET_DATA: SetDataRequest("/app/node", b"new", 3),
    OpCode.GET_ACL: PathRequest("/app"),
    OpCode.SET_ACL: SetACLRequest("/app", ACLS, -1),
    OpCode.GET_CHILDREN: PathWatchRequest("/", True),
    OpCode.GET_CHILDREN2: PathWatchRequest("/app", True),
    OpCode.SYNC: PathRequest("/"),
    OpCode.CHECK: DeleteRequest("/app", 0),
    OpCode.MULTI: MultiRequest(
        (
            (OpCode.CREATE, CreateRequest("/m/a", b"x", OPEN_ACL_UNSAFE, 0)),
            (OpCode.CREATE_TTL, CreateTTLRequest("/m/t", b"", OPEN_ACL_UNSAFE, 5, 1000)),
            (OpCode.SET_DATA, SetDataRequest("/m/a", b"y", 0)),
            (OpCode.CHECK, DeleteRequest("/m/a", 1)),
            (OpCode.DELETE, DeleteRequest("/m/a", -1)),
        )
    ),
    OpCode.MULTI_READ: MultiReadRequest(
        (
            (OpCode.GET_DATA, PathWatchRequest("/app", False)),
            (OpCode.GET_CHILDREN, PathWatchRequest("/", False)),
        )
    ),
    OpCode.AUTH: AuthPacket(0, "digest", b"user:secret"),
    OpCode.SET_WATCHES: SetWatches(9, ("/a",), ("/b", "/c"), ("/",)),
    OpCode.SET_WATCHES2: SetWatches2(9, ("/a",), ("/b",), ("/c",), ("/d",), ("/e",)),
    OpCode.GET_EPHEMERALS: PathRequest("/"),
    OpCode.GET_ALL_CHILDREN_NUMBER: PathRequest("/app"),
    OpCode.ADD_WATCH: AddWatchRequest("/app", 1),
    OpCode.CHECK_WATCHES: WatchesRequest("/app", 1),
    OpCode.REMOVE_WATCHES: WatchesRequest("/app", 3),
    OpCode.RECONFIG: ReconfigRequest(None, None, "server.1=a:2888:3888", -1),
    OpCode.SASL: GetSASLRequest(b"token"),
    OpCode.WHO_AM_I: Empty(),
}

#: A valid body of every reply record, by the opcode it answers.
RESPONSE_SAMPLES: dict[int, Record] = {
    OpCode.CREATE: CreateResponse("/app/node"),
    OpCode.CREATE2: Create2Response("/app/seq-0000000001", STAT),
    OpCode.CREATE_CONTAINER: Create2Response("/app/box", STAT),
    OpCode.CREATE_TTL: Create2Response("/app/ttl", STAT),
    OpCode.EXISTS: StatResponse(STAT),
    OpCode.SET_DATA: StatResponse(STAT),
    OpCode.SET_ACL: StatResponse(STAT),
    OpCode.GET_DATA: GetDataResponse(b"data", STAT),
    OpCode.GET_ACL: GetACLResponse(ACLS, STAT),
    OpCode.GET_CHILDREN: GetChildrenResponse(("a", "b", "zookeeper")),
    OpCode.GET_CHILDREN2: GetChildren2Response(("a",), STAT),
    OpCode.SYNC: PathResponse("/"),
    OpCode.MULTI: MultiResponse(
        (
            (OpCode.CREATE, CreateResponse("/m/a")),
            (OpCode.CREATE2, Create2Response("/m/b", STAT)),
            (OpCode.SET_DATA, StatResponse(STAT)),
            (OpCode.CHECK, Empty()),
            (OpCode.DELETE, Empty()),
            (OpCode.ERROR, ErrorResult(-101)),
        )
    ),
    OpCode.MULTI_READ: MultiResponse(
        (
            (OpCode.GET_DATA, GetDataResponse(b"x", STAT)),
            (OpCode.GET_CHILDREN, GetChildrenResponse(("c",))),
        )
    ),
    OpCode.ADD_WATCH: ErrorResult(0),
    OpCode.GET_EPHEMERALS: PathsResponse(("/app/eph",)),
    OpCode.GET_ALL_CHILDREN_NUMBER: CountResponse(12),
    OpCode.WHO_AM_I: WhoAmIResponse((ClientInfo("ip", "127.0.0.1"), ClientInfo("digest", "u"))),
    OpCode.RECONFIG: GetDataResponse(b"server.1=a:2888:3888\nversion=0", STAT),
    OpCode.SASL: SetSASLResponse(b"challenge"),
}

CONNECT_REQUEST = ConnectRequest(0, 0, 30_000, 0, b"\x00" * 16, False)
CONNECT_RESPONSE = ConnectResponse(0, 30_000, 0x0100_0000_0000_0001, b"\x07" * 16, False)
FOUR_LETTER_WORDS = ("ruok", "srvr", "stat", "mntr", "cons", "dump", "wchs", "isro")


def _name(opcode: int) -> str:
    return OpCode(opcode).name.lower()


def _client() -> tuple[ClientConnection, bytes]:
    """A client codec that has sent :data:`CONNECT_REQUEST`, and those bytes."""
    client = ClientConnection()
    return client, client.send(Connect(CONNECT_REQUEST))


def _server() -> tuple[ServerConnection, bytes]:
    """A server codec that has accepted :data:`CONNECT_REQUEST` with
    :data:`CONNECT_RESPONSE`, and the bytes of that answer."""
    server = ServerConnection()
    server.receive_data(_client()[1])
    assert isinstance(server.next_event(), ConnectRequested)
    return server, server.send(ConnectAccepted(CONNECT_RESPONSE))


def zk_server_seeds() -> Iterator[tuple[str, bytes]]:
    client, connect = _client()
    everything = bytearray(connect)
    for xid, opcode in enumerate(sorted(REQUEST_SAMPLES), start=1):
        request = client.send(Request(xid, opcode, REQUEST_SAMPLES[opcode]))
        everything += request
        yield f"stream-{_name(opcode)}", bytes([WHOLE]) + connect + request
    everything += client.send(Request(0, OpCode.PING))
    everything += client.send(Request(0, OpCode.CLOSE_SESSION))
    yield "stream-all-whole", bytes([WHOLE]) + everything
    yield "stream-all-bytewise", bytes([BYTEWISE]) + everything
    # A client older than 3.4 sends no readOnly byte.
    old = ConnectRequest(0, 0, 30_000, 0, b"", None)
    yield "stream-connect-without-readonly", bytes([WHOLE]) + ClientConnection().send(Connect(old))
    for word in FOUR_LETTER_WORDS:
        yield f"stream-4lw-{word}", bytes([WHOLE]) + word.encode()
    for index, record_type in enumerate(zk_server.DECODERS):
        sample = (
            CONNECT_REQUEST
            if record_type is ConnectRequest
            else next(r for r in REQUEST_SAMPLES.values() if type(r) is record_type)
        )
        yield f"record-{index:02d}-{record_type.__name__}", bytes([0x80 | index]) + encode(sample)
    path_and_watch = encode(PathWatchRequest("/app", True))
    yield "record-path-and-watch", bytes([0x80 | zk_server.PATH_AND_WATCH]) + path_and_watch


def zk_client_seeds() -> Iterator[tuple[str, bytes]]:
    server, connected = _server()
    everything = bytearray(connected)
    count = len(zk_client.REPLY_OPCODES)
    for index, opcode in enumerate(zk_client.REPLY_OPCODES):
        xid = count + index  # the target maps xid to REPLY_OPCODES[xid % count]
        body = RESPONSE_SAMPLES[opcode] if opcode in RESPONSES else b""
        reply = server.send(Reply(xid, 100 + index, 0, body))
        everything += reply
        yield f"stream-{_name(opcode)}", bytes([WHOLE]) + connected + reply
    failed = server.send(Reply(count + 1, 200, -101))  # NONODE: header only
    notification = server.send(Notification(WatcherEvent(3, 3, "/app")))
    everything += failed + notification
    yield "stream-error-reply", bytes([WHOLE]) + connected + failed
    yield "stream-notification", bytes([WHOLE]) + connected + notification
    yield "stream-all-whole", bytes([WHOLE]) + everything
    yield "stream-all-bytewise", bytes([BYTEWISE]) + everything
    samples: dict[type, Record] = {type(r): r for r in RESPONSE_SAMPLES.values()}
    samples[ConnectResponse] = CONNECT_RESPONSE
    samples[WatcherEvent] = WatcherEvent(4, 3, "/app/node")
    for index, record_type in enumerate(zk_client.DECODERS):
        body = encode(samples[record_type])
        yield f"record-{index:02d}-{record_type.__name__}", bytes([0x80 | index]) + body


def wire_seeds() -> Iterator[tuple[str, bytes]]:
    instance = wire.WireInstance("10.0.0.7:8080", "10.0.0.7", 8080, 100, "eu-west-1a",
                                 "passing", {"version": "1.4.2"})  # fmt: skip
    owner = wire.Owner("d1", "d1.internal:7000", "d1.internal:2181")
    messages: tuple[wire.Message, ...] = (
        wire.Hello(1, "change-me", "proxy-1"),
        wire.Welcome(1, "d1"),
        wire.Error("unauthenticated", "bad token"),
        wire.Subscribe({"orders": None, "billing": 7}),
        wire.Unsubscribe(("orders",)),
        wire.Full("orders", 7, (instance,)),
        wire.Deltas("orders", 7, 8, (instance,), ("10.0.0.8:8080",)),
        wire.Redirect("orders", owner, 3),
        wire.Redirect("orders", None, 4),
        wire.Ack("orders", 8),
        wire.Report("orders", "10.0.0.7:8080", "connect-refused"),
        wire.Lookup(("orders", "billing")),
        wire.WatchAssignments(("orders",)),
        wire.Assignment(3, {"orders": owner, "billing": None}),
        wire.Ping(),
        wire.Pong(),
    )
    everything = b""
    for message in messages:
        framed = wire.encode(message)
        everything += framed
        suffix = "-none" if isinstance(message, wire.Redirect) and message.owner is None else ""
        yield f"decode-{message.type}{suffix}", b"\x00" + framed[4:]
    yield "stream-all-whole", b"\xff" + everything  # chunks of 128 bytes
    yield "stream-all-bytewise", b"\x01" + everything


def admin_http_seeds() -> Iterator[tuple[str, bytes]]:
    def get(target: str, *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
        head = [f"{method} {target} HTTP/{version}", "host: gw", *headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode()

    requests: dict[str, bytes] = {
        "root": get("/"),
        "metrics": get("/metrics"),
        "metrics-openmetrics": get("/metrics", "accept: application/openmetrics-text"),
        "health": get("/health"),
        "ready": get("/ready"),
        "snapshot": get("/snapshot"),
        "snapshot-query": get("/snapshot?service=orders&service=billing&limit=2"),
        "snapshot-bad-limit": get("/snapshot?limit=0"),
        "snapshot-etag": get("/snapshot", 'if-none-match: "x-0"'),
        "shards": get("/shards"),
        "status": get("/status"),
        "missing": get("/nope"),
        "head": get("/health", method="HEAD"),
        "post": get("/health", method="POST"),
        "http10": get("/health", version="1.0"),
        "close": get("/health", "connection: close"),
        "keep-alive-two": get("/health") + get("/status"),
        "body": b"GET /health HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nhello",
        "body-too-large": b"GET /health HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n",
        "chunked": (
            b"POST /health HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
        "head-too-large": get("/", "x-junk: " + "a" * 1100),
        "incomplete": b"GET /health HTTP/1.1\r\nhost:",
        "not-http": b"NOT HTTP AT ALL\r\n\r\n",
    }
    for name, request in requests.items():
        yield name, b"\xff" + request  # 256-byte reads
    yield "keep-alive-two-bytewise", b"\x00" + requests["keep-alive-two"]


def config_seeds() -> Iterator[tuple[str, bytes]]:
    for index, text in enumerate(config_target.DOCUMENTS):
        yield f"raw-{index}", b"\x00" + text.lstrip().encode()
        # Structured: document ``index``, then a few mutations' worth of choices.
        yield f"structured-{index}", bytes([2 * index + 1]) + bytes(range(1, 25))
    yield "raw-empty", b"\x00"


SEEDS = {
    "zk_server": zk_server_seeds,
    "zk_client": zk_client_seeds,
    "wire": wire_seeds,
    "admin_http": admin_http_seeds,
    "config": config_seeds,
}


def main() -> None:
    for target, seeds in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        for name, data in seeds():
            (folder / name).write_bytes(data)
            written += 1
        print(f"{target}: {written} seeds in {folder}")


if __name__ == "__main__":
    main()
