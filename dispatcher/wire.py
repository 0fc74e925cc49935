"""The subscription protocol shared by Dispatchers, Meta Servers and proxies.

Sans-I/O core plus one small trio adapter:

* a frame is a 4-byte big-endian length and a UTF-8 JSON object; frames above
  :data:`MAX_FRAME` are refused (the connection closes), so a peer can never
  make the other side buffer without bound;
* every message is a JSON object with a ``"type"``; the message classes below
  are the whole vocabulary, and :func:`decode` refuses anything else with a
  :class:`WireError` that names the problem.

Conversation::

    client                                   server (Dispatcher or Meta Server)
    Hello(version, token, client_id[, policies, application]) ──►
                                    ◄──────  Welcome(version, server_id) | Error
    Subscribe(services={name: version held or None}) ──►        (Dispatcher)
                                    ◄──────  Full(service, version, instances)
                                    ◄──────  Deltas(service, from, to, ...)...
                                    ◄──────  Redirect(service, owner, epoch)  (not the owner)
                                    ◄──────  PolicyUpdate(service, version, policy)
    Ack(service, version) ──────────►
    PolicyAck(service, version) ────►
    Report(service, instance_id, reason) ─►  (a proxy saw an endpoint fail)
    Outcomes(service, application, path, ...) ─►  (only if the Welcome said ``outcomes``)
    Lookup(services) ───────────────►                              (Meta Server)
                                    ◄──────  Assignment(epoch, owners)
    WatchAssignments() ─────────────►
                                    ◄──────  Assignment(...) on every change
    Ping / Pong either way.

Nothing may be sent before the Hello is answered; the server answers anything
else with ``Error("unauthenticated")`` and closes. Instances travel as plain
JSON objects (:class:`WireInstance`), so this module depends on nothing else
in zkgate: the Meta Server and the proxy import it alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import attrs
import trio

PROTOCOL_VERSION = 1
#: The largest frame either side accepts (a snapshot of a few thousand instances).
MAX_FRAME = 8 * 1024 * 1024
#: The deepest nesting of arrays and objects a frame may have. The vocabulary
#: needs 4 (message, instances, instance, metadata); Python's parser recurses
#: per level and a deep enough frame would exhaust the stack.
MAX_DEPTH = 16
#: The most digits an integer may have: every integer of the protocol (ports,
#: versions, epochs) fits in 64 bits, and int() of a very long digit string is
#: quadratic, so longer numbers are refused before they are parsed.
MAX_INT_DIGITS = 20
_LENGTH = struct.Struct(">I")
# Every byte but quotes and brackets, for the depth check (bytes.translate
# deletes them at C speed, so the check costs a fraction of the parse).
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')
# A \u escape of one half of a surrogate pair without the other: json.loads
# accepts it, and the str it makes cannot be encoded (a token compared as
# bytes, a log line).
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


class WireError(Exception):
    """A peer sent something this protocol does not allow; the connection closes."""


@attrs.frozen
class WireInstance:
    """One endpoint of a service, as proxies need it."""

    id: str
    host: str
    port: int
    weight: int = 100
    zone: str = ""
    health: str = "unknown"
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "host": self.host, "port": self.port, "weight": self.weight,
            "zone": self.zone, "health": self.health, "metadata": dict(self.metadata),
        }  # fmt: skip

    @classmethod
    def from_json(cls, raw: Any) -> WireInstance:
        obj = _object(raw, "instance")
        return cls(
            id=_str(obj, "id"), host=_str(obj, "host"), port=_int(obj, "port"),
            weight=_int(obj, "weight", 100), zone=_str(obj, "zone", ""),
            health=_str(obj, "health", "unknown"), metadata=_str_map(obj, "metadata"),
        )  # fmt: skip


def table_digest(instances: Iterable[WireInstance]) -> str:
    """A digest of an endpoint table: equal exactly when the instances are equal.

    What a client reports in :class:`Ack` and the Dispatcher compares with what
    it sent (inspection of the proxies' tables): a few bytes, not the table.
    Independent of order; canonical JSON of each instance, hashed with SHA-256.
    """
    digest = hashlib.sha256()
    for instance in sorted(instances, key=lambda i: i.id):
        digest.update(json.dumps(instance.to_json(), sort_keys=True, separators=(",", ":"))
                      .encode())  # fmt: skip
        digest.update(b"\n")
    return digest.hexdigest()[:32]


@attrs.frozen
class Owner:
    """A Dispatcher shard: who it is and where to reach it."""

    id: str
    subscribe_address: str
    zookeeper_address: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "subscribe_address": self.subscribe_address,
                "zookeeper_address": self.zookeeper_address}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Any) -> Owner:
        obj = _object(raw, "owner")
        return cls(_str(obj, "id"), _str(obj, "subscribe_address"),
                   _str(obj, "zookeeper_address", ""))  # fmt: skip


# --- messages -------------------------------------------------------------------


class Message:
    type: ClassVar[str]

    def fields_to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Message:
        raise NotImplementedError


@attrs.frozen
class Hello(Message):
    """The first message of a connection.

    ``policies``: the client understands :class:`PolicyUpdate` (a server sends none to a
    client that does not say so, since an older client would refuse the unknown type);
    ``application``: the consumer application the client calls on behalf of, whose
    per-consumer policies apply ("" for none). Both are left out of the frame when unset,
    and an older server ignores them, so either side may be the older one.
    """

    type: ClassVar[str] = "hello"
    version: int
    token: str
    client_id: str
    policies: bool = False
    application: str = ""

    def fields_to_json(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "version": self.version, "token": self.token, "client_id": self.client_id,
        }  # fmt: skip
        if self.policies:
            fields["policies"] = True
        if self.application:
            fields["application"] = self.application
        return fields

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Hello:
        policies = obj.get("policies", False)
        if not isinstance(policies, bool):
            raise WireError("'policies' must be true or false")
        return cls(_int(obj, "version"), _str(obj, "token"), _str(obj, "client_id"),
                   policies, _str(obj, "application", ""))  # fmt: skip


@attrs.frozen
class Welcome(Message):
    """The server's answer to a good Hello.

    ``outcomes``: the server takes :class:`Outcomes` reports. Left out of the frame when
    false, and ignored by an older client; a client sends Outcomes only to a server that
    said so, since an older server would refuse the unknown type and close.
    """

    type: ClassVar[str] = "welcome"
    version: int
    server_id: str
    outcomes: bool = False

    def fields_to_json(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"version": self.version, "server_id": self.server_id}
        if self.outcomes:
            fields["outcomes"] = True
        return fields

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Welcome:
        outcomes = obj.get("outcomes", False)
        if not isinstance(outcomes, bool):
            raise WireError("'outcomes' must be true or false")
        return cls(_int(obj, "version"), _str(obj, "server_id"), outcomes)


@attrs.frozen
class Error(Message):
    """A refusal. Codes: unauthenticated, unsupported-version, bad-request, overloaded,
    internal (the server met a bug handling this peer; see its log)."""

    type: ClassVar[str] = "error"
    code: str
    message: str = ""

    def fields_to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Error:
        return cls(_str(obj, "code"), _str(obj, "message", ""))


@attrs.frozen
class Subscribe(Message):
    """Services wanted, each with the version the client already holds (None: nothing).

    A server that still knows the changes since a held version resumes with
    :class:`Deltas`; otherwise it sends a :class:`Full`.
    """

    type: ClassVar[str] = "subscribe"
    services: Mapping[str, int | None]

    def fields_to_json(self) -> dict[str, Any]:
        return {"services": dict(self.services)}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Subscribe:
        raw = _object(obj.get("services"), "services")
        services: dict[str, int | None] = {}
        for name, version in raw.items():
            if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
                raise WireError(f"services[{name!r}] must be a version number or null")
            services[name] = version
        return cls(services)


@attrs.frozen
class Unsubscribe(Message):
    type: ClassVar[str] = "unsubscribe"
    services: tuple[str, ...]

    def fields_to_json(self) -> dict[str, Any]:
        return {"services": list(self.services)}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Unsubscribe:
        return cls(_str_list(obj, "services"))


@attrs.frozen
class Full(Message):
    """The whole current state of one service."""

    type: ClassVar[str] = "full"
    service: str
    version: int
    instances: tuple[WireInstance, ...]

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "version": self.version,
                "instances": [i.to_json() for i in self.instances]}  # fmt: skip

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Full:
        return cls(_str(obj, "service"), _int(obj, "version"), _instances(obj, "instances"))


@attrs.frozen
class Deltas(Message):
    """What changed in one service from ``from_version`` to ``to_version``."""

    type: ClassVar[str] = "delta"
    service: str
    from_version: int
    to_version: int
    upserted: tuple[WireInstance, ...] = ()
    removed: tuple[str, ...] = ()

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "from_version": self.from_version,
                "to_version": self.to_version,
                "upserted": [i.to_json() for i in self.upserted],
                "removed": list(self.removed)}  # fmt: skip

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Deltas:
        return cls(_str(obj, "service"), _int(obj, "from_version"), _int(obj, "to_version"),
                   _instances(obj, "upserted"), _str_list(obj, "removed"))  # fmt: skip


@attrs.frozen
class Redirect(Message):
    """This server does not own ``service``; ``owner`` does, as of ``epoch``."""

    type: ClassVar[str] = "redirect"
    service: str
    owner: Owner | None
    epoch: int

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "epoch": self.epoch,
                "owner": None if self.owner is None else self.owner.to_json()}  # fmt: skip

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Redirect:
        owner = obj.get("owner")
        return cls(_str(obj, "service"), None if owner is None else Owner.from_json(owner),
                   _int(obj, "epoch"))  # fmt: skip


@attrs.frozen
class Ack(Message):
    """The client holds ``version`` of ``service``; ``digest`` (optional, for
    inspection) is :func:`table_digest` of the table it holds at that version.
    A receiver that does not know ``digest`` ignores it."""

    type: ClassVar[str] = "ack"
    service: str
    version: int
    digest: str | None = None

    def fields_to_json(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"service": self.service, "version": self.version}
        if self.digest is not None:
            fields["digest"] = self.digest
        return fields

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Ack:
        digest = _str(obj, "digest") if obj.get("digest") is not None else None
        return cls(_str(obj, "service"), _int(obj, "version"), digest)


@attrs.frozen
class PolicyUpdate(Message):
    """The effective policy of one subscribed service for the client's application.

    ``version`` is the governance version it comes from (the same number on every
    Dispatcher of a cluster; 0 when no policy was ever written); ``policy`` is the policy
    as plain JSON (what ``dispatcher.governance.policy.Policy.to_mapping`` gives), an empty
    object meaning "no policy: the client's own defaults". Sent after a Subscribe, and
    whenever the effective policy of a subscribed service changes for this client; the
    client answers :class:`PolicyAck`. This module does not check the policy's fields
    (it depends on nothing else in zkgate): the receiver parses it.
    """

    type: ClassVar[str] = "policy"
    service: str
    version: int
    policy: Mapping[str, Any] = attrs.field(factory=dict)

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "version": self.version, "policy": dict(self.policy)}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> PolicyUpdate:
        version = _int(obj, "version")
        if version < 0:
            raise WireError("'version' must be >= 0")
        return cls(_str(obj, "service"), version, _object(obj.get("policy"), "'policy'"))


@attrs.frozen
class PolicyAck(Message):
    """The client applied (or refused, see its log) the policy of ``service`` at ``version``."""

    type: ClassVar[str] = "policy-ack"
    service: str
    version: int

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "version": self.version}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> PolicyAck:
        return cls(_str(obj, "service"), _int(obj, "version"))


@attrs.frozen
class Report(Message):
    """A proxy saw an endpoint fail (reason: connect-refused, connect-timeout, reset, ...)."""

    type: ClassVar[str] = "report"
    service: str
    instance_id: str
    reason: str

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "instance_id": self.instance_id, "reason": self.reason}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Report:
        return cls(_str(obj, "service"), _str(obj, "instance_id"), _str(obj, "reason"))


#: Upper bounds (milliseconds) of the latency buckets of :class:`Outcomes`; one more bucket
#: counts everything above the last. Roughly 1-2-3-5 steps: a p99 read from them is at most
#: about 1.5 times the true one.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 1500, 2000,
    3000, 5000, 7000, 10000, 15000, 30000, 60000,
)  # fmt: skip
#: What a path is: ``mesh`` (through a sidecar proxy) or ``direct`` (consumer to provider).
OUTCOME_PATHS: tuple[str, ...] = ("mesh", "direct")
#: Outcome kinds; every one but ``success`` is a failure.
OUTCOME_KINDS: tuple[str, ...] = ("success", "connect_failure", "reset", "timeout")
#: The largest count one Outcomes message may carry per field.
MAX_OUTCOME_COUNT = 2**40


@attrs.frozen
class Outcomes(Message):
    """What one client saw of calls to ``service`` for ``application`` since its last report.

    ``path`` is ``mesh`` (traffic through the sidecar) or ``direct``; ``counts`` maps each of
    :data:`OUTCOME_KINDS` to how many calls ended so; ``latency`` counts the calls per bucket
    of :data:`LATENCY_BUCKETS_MS` (one more entry for above the last). Increments, never
    totals: the receiver sums them over its window. Sent only to a server whose Welcome said
    ``outcomes``; the size is fixed by the vocabulary (a few hundred bytes).
    """

    type: ClassVar[str] = "outcomes"
    service: str
    application: str
    path: str
    counts: Mapping[str, int] = attrs.field(factory=dict)
    latency: tuple[int, ...] = ()

    def fields_to_json(self) -> dict[str, Any]:
        return {"service": self.service, "application": self.application, "path": self.path,
                "counts": dict(self.counts), "latency": list(self.latency)}  # fmt: skip

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Outcomes:
        path = _str(obj, "path")
        if path not in OUTCOME_PATHS:
            raise WireError(f"'path' must be one of {', '.join(OUTCOME_PATHS)}")
        raw = _object(obj.get("counts", {}), "'counts'")
        counts: dict[str, int] = {}
        for kind, value in raw.items():
            if kind not in OUTCOME_KINDS:
                raise WireError(f"'counts' has an unknown outcome {clip(kind, 40)!r}")
            counts[kind] = _count(value, f"counts[{kind!r}]")
        latency = obj.get("latency", [])
        if not isinstance(latency, list) or len(latency) > len(LATENCY_BUCKETS_MS) + 1:
            raise WireError(f"'latency' must be a list of at most "
                            f"{len(LATENCY_BUCKETS_MS) + 1} counts")  # fmt: skip
        buckets = tuple(_count(value, "latency") for value in latency)
        return cls(_str(obj, "service"), _str(obj, "application", ""), path, counts, buckets)


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_OUTCOME_COUNT:
        raise WireError(f"{what} must be a count from 0 to {MAX_OUTCOME_COUNT}")
    return value


@attrs.frozen
class Lookup(Message):
    type: ClassVar[str] = "lookup"
    services: tuple[str, ...]

    def fields_to_json(self) -> dict[str, Any]:
        return {"services": list(self.services)}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Lookup:
        return cls(_str_list(obj, "services"))


@attrs.frozen
class WatchAssignments(Message):
    type: ClassVar[str] = "watch-assignments"
    services: tuple[str, ...]

    def fields_to_json(self) -> dict[str, Any]:
        return {"services": list(self.services)}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> WatchAssignments:
        return cls(_str_list(obj, "services"))


@attrs.frozen
class Assignment(Message):
    """Owners of the services asked about, as of ``epoch`` (which only grows)."""

    type: ClassVar[str] = "assignment"
    epoch: int
    owners: Mapping[str, Owner | None]

    def fields_to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "owners": {
            name: None if owner is None else owner.to_json()
            for name, owner in self.owners.items()
        }}  # fmt: skip

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Assignment:
        raw = _object(obj.get("owners"), "owners")
        owners = {name: None if o is None else Owner.from_json(o) for name, o in raw.items()}
        return cls(_int(obj, "epoch"), owners)


@attrs.frozen
class Ping(Message):
    type: ClassVar[str] = "ping"

    def fields_to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Ping:
        return cls()


@attrs.frozen
class Pong(Message):
    type: ClassVar[str] = "pong"

    def fields_to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def fields_from_json(cls, obj: dict[str, Any]) -> Pong:
        return cls()


MESSAGES: dict[str, type[Message]] = {
    m.type: m
    for m in (Hello, Welcome, Error, Subscribe, Unsubscribe, Full, Deltas, Redirect, Ack,
              PolicyUpdate, PolicyAck, Report, Outcomes, Lookup, WatchAssignments, Assignment,
              Ping, Pong)
}  # fmt: skip


# --- codec ----------------------------------------------------------------------


def encode(message: Message) -> bytes:
    body = json.dumps(
        {"type": message.type, **message.fields_to_json()}, separators=(",", ":")
    ).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise WireError(f"{message.type} message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """The message in one frame's body; anything else raises :class:`WireError`."""
    _check_depth(body)
    if b"\\u" in body and _LONE_SURROGATE.search(body):
        raise WireError("a string in the frame holds half of a surrogate pair")
    try:
        obj = json.loads(body, parse_int=_bounded_int)
    # ValueError covers JSONDecodeError and whatever the parser raises for a
    # number it will not convert; RecursionError is a backstop for the depth.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"frame is not JSON: {_clip(str(exc))}") from None
    obj = _object(obj, "message")
    name = obj.get("type")
    kind = MESSAGES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise WireError(f"unknown message type {obj.get('type')!r}")
    return kind.fields_from_json(obj)


def _check_depth(body: bytes) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before the parser, which
    recurses per level, sees it.

    Escaped backslashes and quotes go first, then everything but quotes and
    brackets, then whole strings, so that brackets inside strings do not
    count; matched empty pairs are then removed one level per round, so a
    frame within the limit is empty after ``MAX_DEPTH`` rounds.
    """
    structure = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    brackets = _STRING.sub(b"", structure)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    if brackets:
        raise WireError(f"frame nests deeper than {MAX_DEPTH} levels, or its brackets do not match")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise WireError(f"a number in the frame has more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class FrameDecoder:
    """Bytes in, messages out; refuses frames above ``max_frame``."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> Iterator[Message]:
        """Buffer ``data``; yield every message it completes, in order."""
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self.max_frame:
                raise WireError(f"frame of {length} bytes exceeds {self.max_frame}")
            if len(self._buffer) < 4 + length:
                return
            body = bytes(self._buffer[4 : 4 + length])
            del self._buffer[: 4 + length]
            yield decode(body)


class WireStream:
    """Messages over a trio stream (TCP or Unix socket)."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame)
        self._ready: list[Message] = []

    async def send(self, message: Message) -> None:
        await self.stream.send_all(encode(message))

    async def receive(self) -> Message:
        """The next message; raises EOFError when the peer closed."""
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("peer closed the connection")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    def __aiter__(self) -> WireStream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except EOFError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- the handshake ------------------------------------------------------------------

MAX_CLIENT_ID = 256
"""Longest ``client_id`` a server accepts in a Hello (it goes into logs and status)."""


def check_hello(message: Message, token: bytes | str, server_id: str) -> Welcome | Error:
    """The server's answer to a connection's first message: Welcome, or the Error to
    send before closing.

    Shared by the Dispatcher's subscription server and the Meta Server so that
    both refuse the same things with the same codes. The token is compared in
    constant time (``hmac.compare_digest``): how long a refusal takes must not
    tell a guesser how many leading bytes were right.
    """
    if not isinstance(message, Hello):
        return Error("unauthenticated", f"say hello first, not {message.type}")
    if message.version != PROTOCOL_VERSION:
        return Error(
            "unsupported-version",
            f"this server speaks version {PROTOCOL_VERSION}, not {message.version}",
        )
    expected = token.encode("utf-8") if isinstance(token, str) else token
    if not hmac.compare_digest(message.token.encode("utf-8", "surrogatepass"), expected):
        return Error("unauthenticated", f"wrong token (client {clip(message.client_id)})")
    if len(message.client_id) > MAX_CLIENT_ID:
        return Error("bad-request", f"client_id longer than {MAX_CLIENT_ID} characters")
    if len(message.application) > MAX_CLIENT_ID:
        return Error("bad-request", f"application longer than {MAX_CLIENT_ID} characters")
    return Welcome(PROTOCOL_VERSION, server_id)


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut for a log line or an error message (a peer chose it: any length)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# --- addresses ----------------------------------------------------------------------


def parse_address(
    value: str, *, default_host: str | None = "127.0.0.1", allow_port_zero: bool = True
) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``[V6]:PORT``; the host comes without brackets.

    The one parser of ``HOST:PORT`` in zkgate: listen and advertised
    addresses, upstream endpoints and the addresses registries store. An
    empty host is ``default_host`` (refused when None). Port 0 ("any free
    port") makes sense for a listener only; ``allow_port_zero=False`` refuses
    it for a peer's address. An IPv6 host must be bracketed: in ``::1:80``
    nobody can tell the port from the last group. Raises ValueError.
    """
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        colon, port_text = rest[:1], rest[1:]
        if not bracket or not host:
            raise ValueError(f"expected HOST:PORT, got {value!r} (an unclosed or empty [])")
    else:
        host, colon, port_text = value.rpartition(":")
        if ":" in host:
            raise ValueError(f"expected HOST:PORT, got {value!r} (write an IPv6 host as [addr])")
    # ASCII digits only: str.isdigit also accepts other scripts' digits.
    if colon != ":" or not (0 < len(port_text) <= 5 and port_text.isascii()
                            and port_text.isdigit()):  # fmt: skip
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"expected HOST:PORT, got {value!r} (port must be 1..65535)")
    if not host:
        if default_host is None:
            raise ValueError(f"expected HOST:PORT, got {value!r} (no host)")
        host = default_host
    return host, port


def join_address(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets: the inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- Unix socket files --------------------------------------------------------------
# Dispatchers and proxies both listen on Unix sockets; the file outlives a
# process that crashed, so each claims the path the same way.


async def remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live one, or any other file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket", path)
    try:
        live = await trio.open_unix_socket(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody answers: a dead process's leftover
        return
    await live.aclose()
    raise OSError(errno.EADDRINUSE, f"another process listens on {path}", path)


def unlink_if_ours(path: str, identity: os.stat_result) -> None:
    """Remove the socket file we bound, not one another process put there since."""
    try:
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
            os.unlink(path)
    except OSError:
        pass


# --- validation helpers -----------------------------------------------------------

_MISSING = object()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _object(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise WireError(f"{what} must be a JSON object")
    return raw


def _str(obj: dict[str, Any], key: str, default: Any = _MISSING) -> str:
    value = obj.get(key, default)
    if value is _MISSING or not isinstance(value, str):
        raise WireError(f"{key!r} must be a string")
    return value


def _int(obj: dict[str, Any], key: str, default: Any = _MISSING) -> int:
    value = obj.get(key, default)
    if value is _MISSING or not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{key!r} must be an integer")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise WireError(f"{key!r} is out of range")
    return value


def _str_list(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WireError(f"{key!r} must be a list of strings")
    return tuple(value)


def _str_map(obj: dict[str, Any], key: str) -> dict[str, str]:
    value = obj.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise WireError(f"{key!r} must map strings to strings")
    return value


def _instances(obj: dict[str, Any], key: str) -> tuple[WireInstance, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise WireError(f"{key!r} must be a list")
    return tuple(WireInstance.from_json(item) for item in value)
